//! Mapping every failure to an HTTP status and a JSON [`ErrorBody`]: client mistakes get a
//! 4xx naming the problem; only our own faults are 5xx, and those are logged in full.

use axum::http::{header, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::Json;
use bearman_proto::ErrorBody;

use crate::app::AppError;
use crate::core::lifecycle::IllegalTransition;
use crate::core::validate::FieldError;
use crate::store::StoreError;

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ApiError {
    pub status: StatusCode,
    pub code: &'static str,
    pub message: String,
    /// Sent as `Retry-After` (seconds): the failure is temporary.
    pub retry_after_s: Option<u32>,
    /// The database's fault behind this answer, if it is one (counted in metrics).
    pub store_fault: Option<&'static str>,
}

/// A response extension: this answer is a database fault of that kind (see
/// `StoreError::fault_kind`); the HTTP service counts it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct StoreFault(pub &'static str);

/// What a 503 for an unreachable database tells the client to wait before retrying.
pub const UNAVAILABLE_RETRY_AFTER_S: u32 = 5;

impl ApiError {
    pub fn new(status: StatusCode, code: &'static str, message: impl Into<String>) -> Self {
        ApiError {
            status,
            code,
            message: message.into(),
            retry_after_s: None,
            store_fault: None,
        }
    }

    /// 503 with `Retry-After`: the database did not answer (logged as a warning).
    pub fn unavailable(message: impl Into<String>) -> Self {
        let message = message.into();
        tracing::warn!(error = %message, "database unavailable");
        ApiError {
            retry_after_s: Some(UNAVAILABLE_RETRY_AFTER_S),
            ..Self::new(
                StatusCode::SERVICE_UNAVAILABLE,
                "unavailable",
                "the database is unavailable; retry later",
            )
        }
    }

    pub fn bad_request(code: &'static str, message: impl Into<String>) -> Self {
        Self::new(StatusCode::BAD_REQUEST, code, message)
    }

    pub fn not_found(message: impl Into<String>) -> Self {
        Self::new(StatusCode::NOT_FOUND, "not_found", message)
    }

    pub fn conflict(code: &'static str, message: impl Into<String>) -> Self {
        Self::new(StatusCode::CONFLICT, code, message)
    }

    pub fn unprocessable(message: impl Into<String>) -> Self {
        Self::new(StatusCode::UNPROCESSABLE_ENTITY, "invalid_field", message)
    }

    pub fn internal(message: impl Into<String>) -> Self {
        let message = message.into();
        tracing::error!(error = %message, "internal error");
        Self::new(
            StatusCode::INTERNAL_SERVER_ERROR,
            "internal",
            "internal error; see the daemon log",
        )
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let body = ErrorBody {
            error: self.code.to_string(),
            message: self.message,
        };
        let mut response = (self.status, Json(body)).into_response();
        if let Some(kind) = self.store_fault {
            response.extensions_mut().insert(StoreFault(kind));
        }
        if let Some(seconds) = self.retry_after_s {
            response
                .headers_mut()
                .insert(header::RETRY_AFTER, header::HeaderValue::from(seconds));
        }
        if self.status == StatusCode::UNAUTHORIZED {
            response.headers_mut().insert(
                header::WWW_AUTHENTICATE,
                header::HeaderValue::from_static("Bearer"),
            );
        }
        response
    }
}

impl From<StoreError> for ApiError {
    fn from(error: StoreError) -> Self {
        let store_fault = error.fault_kind();
        let answer = match &error {
            StoreError::NotFound { .. } => ApiError::not_found(error.to_string()),
            StoreError::AlreadyExists { .. } => {
                ApiError::conflict("already_exists", error.to_string())
            }
            StoreError::InUse { .. } => ApiError::conflict("in_use", error.to_string()),
            StoreError::Conflict { .. } => ApiError::conflict("conflict", error.to_string()),
            StoreError::GenerationMismatch { .. } => {
                ApiError::conflict("generation_mismatch", error.to_string())
            }
            StoreError::Fenced { .. } => ApiError::conflict("fenced", error.to_string()),
            StoreError::PoolExhausted { .. } | StoreError::InvalidPool { .. } => {
                tracing::warn!(error = %error, "address allocation failed");
                ApiError::new(
                    StatusCode::SERVICE_UNAVAILABLE,
                    "pool_unavailable",
                    error.to_string(),
                )
            }
            StoreError::Unavailable(_) => ApiError::unavailable(error.to_string()),
            StoreError::Corrupt(_) | StoreError::Backend(_) => {
                ApiError::internal(error.to_string())
            }
        };
        ApiError {
            store_fault,
            ..answer
        }
    }
}

impl From<IllegalTransition> for ApiError {
    fn from(error: IllegalTransition) -> Self {
        ApiError::conflict("illegal_transition", error.to_string())
    }
}

impl From<FieldError> for ApiError {
    fn from(error: FieldError) -> Self {
        ApiError::unprocessable(error.to_string())
    }
}

impl From<AppError> for ApiError {
    fn from(error: AppError) -> Self {
        let message = error.to_string();
        match error {
            AppError::NodeNotFound { .. }
            | AppError::NodeNotRegistered { .. }
            | AppError::RemediationNotFound { .. } => ApiError::not_found(message),
            AppError::NodeRetired { .. } => ApiError::new(StatusCode::GONE, "retired", message),
            AppError::InvalidField(error) => error.into(),
            AppError::InvalidPool(_) => ApiError::unprocessable(message),
            AppError::IllegalTransition(error) => error.into(),
            AppError::GenerationMismatch { .. } => {
                ApiError::conflict("generation_mismatch", message)
            }
            AppError::Busy { .. } => ApiError::conflict("busy", message),
            AppError::RemediationRefused { .. } => ApiError::conflict("illegal_state", message),
            AppError::RemediationActive { .. } => ApiError::conflict("remediation_active", message),
            AppError::RemediationNotActive { .. } => ApiError::conflict("not_active", message),
            AppError::RemediationNotCancellable { .. } => {
                ApiError::conflict("not_cancellable", message)
            }
            AppError::IdentityMismatch { .. } => ApiError::conflict("identity_mismatch", message),
            AppError::AwaitingAcceptance { .. } => {
                ApiError::conflict("awaiting_acceptance", message)
            }
            AppError::NotAwaitingAcceptance { .. } => ApiError::conflict("not_pending", message),
            AppError::EnlistmentFull { .. } => {
                ApiError::new(StatusCode::SERVICE_UNAVAILABLE, "enlistment_full", message)
            }
            AppError::FlavorExists { .. } | AppError::FirmwareBundleExists { .. } => {
                ApiError::conflict("already_exists", message)
            }
            AppError::FirmwareBundleNotFound { .. } | AppError::DrillNotFound { .. } => {
                ApiError::not_found(message)
            }
            AppError::DrillInvalid(_) => ApiError::unprocessable(message),
            AppError::DrillRefused { .. } => ApiError::conflict("drill_refused", message),
            AppError::DrillsBlocked { .. } => ApiError::conflict("drills_blocked", message),
            AppError::DrillsNotBlocked => ApiError::conflict("not_blocked", message),
            AppError::RolloutPaused { .. } => ApiError::conflict("already_paused", message),
            AppError::RolloutNotPaused => ApiError::conflict("not_paused", message),
            AppError::FirmwareReportRefused { .. } => {
                ApiError::conflict("no_update_in_flight", message)
            }
            AppError::NoFirmwareFailures { .. } => ApiError::conflict("nothing_to_retry", message),
            AppError::FlavorMissing { .. } => ApiError::conflict("flavor_missing", message),
            AppError::NoFlavor { .. } => ApiError::conflict("no_flavor", message),
            AppError::PowerRefused { .. } => ApiError::conflict("power_refused", message),
            AppError::NoBmc { .. } => ApiError::conflict("no_bmc", message),
            // The BMC (another system) failed or did not read back what was asked.
            AppError::PowerFailed { .. } => {
                ApiError::new(StatusCode::BAD_GATEWAY, "power_failed", message)
            }
            AppError::PowerUnavailable => ApiError::new(
                StatusCode::SERVICE_UNAVAILABLE,
                "power_unavailable",
                message,
            ),
            AppError::TokenInvalid
            | AppError::TokenExpired { .. }
            | AppError::SessionInvalid
            | AppError::SessionExpired => {
                ApiError::new(StatusCode::UNAUTHORIZED, "unauthorized", message)
            }
            AppError::RandomSource(_) => ApiError::internal(message),
            AppError::Store(error) => error.into(),
        }
    }
}
