//! Bearer-token authentication and role checks for the admin API.
//!
//! Tokens are random secrets shown once; only their sha256 is stored. Every admin route
//! declares the least role it needs, and the check runs before any extractor, so an
//! anonymous caller learns nothing about the request it sent.

use axum::extract::{Request, State};
use axum::http::{header, StatusCode};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};

use super::error::ApiError;
use super::AppState;
use crate::core::model::TokenRole;

/// The authenticated caller, available to handlers as an extension.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Caller {
    pub token_name: String,
    pub role: TokenRole,
}

impl Caller {
    /// How this caller appears in the audit trail.
    pub fn actor(&self) -> String {
        format!("token:{}", self.token_name)
    }
}

fn unauthorized(message: &str) -> Response {
    ApiError::new(StatusCode::UNAUTHORIZED, "unauthorized", message).into_response()
}

/// Middleware: admit the request only with a valid token of at least `required` role.
pub async fn require_role(
    State(state): State<AppState>,
    required: TokenRole,
    mut request: Request,
    next: Next,
) -> Response {
    let Some(header_value) = request.headers().get(header::AUTHORIZATION) else {
        return unauthorized("missing Authorization: Bearer <token> header");
    };
    let Some(secret) = header_value
        .to_str()
        .ok()
        .and_then(|value| value.strip_prefix("Bearer "))
        .map(str::trim)
    else {
        return unauthorized("Authorization header must be Bearer <token>");
    };
    let token = match state.app.token_authenticate(secret).await {
        Ok(token) => token,
        Err(error) => return ApiError::from(error).into_response(),
    };
    if token.role < required {
        return ApiError::new(
            StatusCode::FORBIDDEN,
            "forbidden",
            format!(
                "token {} has role {}; this needs {}",
                token.name,
                token.role.as_str(),
                required.as_str()
            ),
        )
        .into_response();
    }
    state.app.token_record_use(&token).await;
    request.extensions_mut().insert(Caller {
        token_name: token.name,
        role: token.role,
    });
    next.run(request).await
}
