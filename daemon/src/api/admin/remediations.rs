//! Remediations: operators start fence/evacuate/rebuild/drain, list, show and cancel
//! them, and read the guards.

use axum::extract::State;
use axum::http::StatusCode;
use axum::{Extension, Json};

use super::super::auth::Caller;
use super::super::error::ApiError;
use super::super::extract::{NamePath, OptionalJson, QueryParams, UuidPath};
use super::super::AppState;
use super::ReasonBody;
use crate::core::remediation::{Remediation, RemediationKind};
use bearman_proto::uuid::NodeUuid;

macro_rules! remediation_route {
    ($name:ident, $kind:expr, $default:expr) => {
        pub(super) async fn $name(
            State(state): State<AppState>,
            Extension(caller): Extension<Caller>,
            UuidPath(uuid): UuidPath,
            OptionalJson(body): OptionalJson<ReasonBody>,
        ) -> Result<(StatusCode, Json<Remediation>), ApiError> {
            let reason = body.text($default)?;
            let created = state
                .app
                .remediation_start(&caller.actor(), &uuid, $kind, &reason)
                .await?;
            Ok((StatusCode::ACCEPTED, Json(created)))
        }
    };
}

remediation_route!(fence, RemediationKind::Fence, "fence requested");
remediation_route!(evacuate, RemediationKind::Evacuate, "evacuation requested");
remediation_route!(rebuild, RemediationKind::Rebuild, "rebuild requested");
remediation_route!(drain, RemediationKind::Drain, "drain requested");

pub(super) fn parse_id(text: &str) -> Result<i64, ApiError> {
    text.parse::<i64>()
        .ok()
        .filter(|id| *id > 0)
        .ok_or_else(|| {
            ApiError::bad_request(
                "invalid_path",
                format!("remediation id {text:?} is not a positive integer"),
            )
        })
}

pub(super) async fn remediation_list(
    State(state): State<AppState>,
    query: QueryParams,
) -> Result<Json<Vec<Remediation>>, ApiError> {
    query.allow_only(&["active", "node", "limit"])?;
    let active = query.parse::<bool>("active")?.unwrap_or(false);
    let node = query
        .get("node")
        .map(|text| {
            NodeUuid::parse(text).map_err(|e| {
                ApiError::bad_request("invalid_query", format!("query parameter node: {e}"))
            })
        })
        .transpose()?;
    let limit = query.parse::<usize>("limit")?.unwrap_or(100);
    Ok(Json(
        state
            .store
            .remediation_list(active, node.as_ref(), limit)
            .await?,
    ))
}

pub(super) async fn remediation_show(
    State(state): State<AppState>,
    NamePath(id): NamePath,
) -> Result<Json<Remediation>, ApiError> {
    let id = parse_id(&id)?;
    state
        .store
        .remediation_get(id)
        .await?
        .map(Json)
        .ok_or_else(|| ApiError::not_found(format!("remediation {id} does not exist")))
}

pub(super) async fn remediation_cancel(
    State(state): State<AppState>,
    Extension(caller): Extension<Caller>,
    NamePath(id): NamePath,
    OptionalJson(body): OptionalJson<ReasonBody>,
) -> Result<Json<Remediation>, ApiError> {
    let id = parse_id(&id)?;
    let reason = body.text("cancelled by operator")?;
    Ok(Json(
        state
            .app
            .remediation_cancel(&caller.actor(), id, &reason)
            .await?,
    ))
}

/// The guards as the controller last published them, and whether the controller is
/// alive (a panicked one shows as down, with why).
pub(super) async fn remediation_guards(State(state): State<AppState>) -> Json<serde_json::Value> {
    let liveness = state.app.guards.liveness();
    Json(serde_json::json!({
        "controller_running": liveness.is_running(),
        "controller": liveness,
        "guards": state.app.guards.status(),
    }))
}
