//! Nodes: listing, enrolment, edits, events, power readings and lifecycle actions
//! (maintenance, retire, accept-identity).

use axum::extract::State;
use axum::http::StatusCode;
use axum::{Extension, Json};
use serde::{Deserialize, Serialize};

use super::super::auth::Caller;
use super::super::error::ApiError;
use super::super::extract::{JsonBody, OptionalJson, QueryParams, UuidPath};
use super::super::AppState;
use super::{field_error, ReasonBody};
use crate::app::nodes::{Enrollment, NodeChanges, Summary};
use crate::core::lifecycle::{LifecycleEvent, LifecycleState};
use crate::core::model::{BmcConfig, Event, EventFilter, Node, NodeFilter, NodeRole};
use crate::core::power_sync::PowerReading;
use bearman_proto::uuid::NodeUuid;

pub(super) async fn summary(State(state): State<AppState>) -> Result<Json<Summary>, ApiError> {
    let counts = state.store.node_count_by_state().await?;
    Ok(Json(Summary {
        total: counts.values().sum(),
        by_state: counts
            .into_iter()
            .map(|(s, n)| (s.as_str().to_string(), n))
            .collect(),
    }))
}

pub(super) async fn node_list(
    State(state): State<AppState>,
    query: QueryParams,
) -> Result<Json<Vec<Node>>, ApiError> {
    query.allow_only(&["state", "rack", "role", "after", "limit"])?;
    let state_filter = query
        .get("state")
        .map(|text| {
            LifecycleState::parse(text).ok_or_else(|| {
                ApiError::bad_request(
                    "invalid_query",
                    format!("query parameter state: unknown state {text:?}"),
                )
            })
        })
        .transpose()?;
    let role = query
        .get("role")
        .map(|text| {
            NodeRole::parse(text).ok_or_else(|| {
                ApiError::bad_request(
                    "invalid_query",
                    format!("query parameter role: unknown role {text:?}"),
                )
            })
        })
        .transpose()?;
    let after = query
        .get("after")
        .map(|text| {
            NodeUuid::parse(text).map_err(|e| {
                ApiError::bad_request("invalid_query", format!("query parameter after: {e}"))
            })
        })
        .transpose()?;
    let filter = NodeFilter {
        state: state_filter,
        rack: query.get("rack").map(str::to_string),
        role,
        after,
        limit: query.parse::<usize>("limit")?.unwrap_or(1000),
    };
    Ok(Json(state.store.node_list(&filter).await?))
}

pub(super) async fn node_show(
    State(state): State<AppState>,
    UuidPath(uuid): UuidPath,
) -> Result<Json<Node>, ApiError> {
    state
        .store
        .node_get(&uuid)
        .await?
        .map(Json)
        .ok_or_else(|| ApiError::not_found(format!("node {uuid} is not known")))
}

#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields)]
pub(super) struct EnrollRequest {
    uuid: String,
    #[serde(default)]
    hostname: Option<String>,
    #[serde(default)]
    role: Option<NodeRole>,
    #[serde(default)]
    rack: Option<String>,
    #[serde(default)]
    flavor: Option<String>,
    #[serde(default)]
    bmc: Option<BmcConfig>,
}

pub(super) async fn node_enroll(
    State(state): State<AppState>,
    Extension(caller): Extension<Caller>,
    JsonBody(request): JsonBody<EnrollRequest>,
) -> Result<(StatusCode, Json<Node>), ApiError> {
    let uuid = NodeUuid::parse(&request.uuid).map_err(|e| field_error("uuid", e.to_string()))?;
    let enrollment = Enrollment {
        uuid,
        hostname: request.hostname,
        role: request.role,
        rack: request.rack,
        flavor: request.flavor,
        bmc: request.bmc,
    };
    let node = state.app.node_enroll(&caller.actor(), enrollment).await?;
    Ok((StatusCode::CREATED, Json(node)))
}

#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields)]
pub(super) struct NodePatch {
    #[serde(default)]
    hostname: Option<String>,
    #[serde(default)]
    role: Option<NodeRole>,
    #[serde(default)]
    rack: Option<String>,
    /// An empty string clears the flavor.
    #[serde(default)]
    flavor: Option<String>,
    #[serde(default)]
    bmc: Option<BmcConfig>,
    /// If given, the update applies only while the node is still at this generation.
    #[serde(default)]
    generation: Option<i64>,
}

pub(super) async fn node_update(
    State(state): State<AppState>,
    Extension(caller): Extension<Caller>,
    UuidPath(uuid): UuidPath,
    JsonBody(patch): JsonBody<NodePatch>,
) -> Result<Json<Node>, ApiError> {
    let changes = NodeChanges {
        hostname: patch.hostname,
        role: patch.role,
        rack: patch.rack,
        flavor: patch.flavor,
        bmc: patch.bmc,
        generation: patch.generation,
    };
    Ok(Json(
        state
            .app
            .node_update(&caller.actor(), &uuid, changes)
            .await?,
    ))
}

pub(super) async fn node_events(
    State(state): State<AppState>,
    UuidPath(uuid): UuidPath,
    query: QueryParams,
) -> Result<Json<Vec<Event>>, ApiError> {
    query.allow_only(&["limit", "before"])?;
    let filter = EventFilter {
        node_uuid: Some(uuid),
        before_id: query.parse("before")?,
        after_id: None,
        limit: query.parse::<usize>("limit")?.unwrap_or(100),
    };
    Ok(Json(state.store.event_list(&filter).await?))
}

/// The node's last BMC power reading (power sync): `{"uuid", "power": null}` when it was
/// never polled.
#[derive(Serialize)]
pub(super) struct NodePower {
    uuid: NodeUuid,
    power: Option<PowerReading>,
}

pub(super) async fn node_power(
    State(state): State<AppState>,
    UuidPath(uuid): UuidPath,
) -> Result<Json<NodePower>, ApiError> {
    if state.store.node_get_shared(&uuid).await?.is_none() {
        return Err(ApiError::not_found(format!("node {uuid} is not known")));
    }
    let power = state.store.node_power_get(&uuid).await?;
    Ok(Json(NodePower { uuid, power }))
}

pub(super) async fn maintenance_on(
    State(state): State<AppState>,
    Extension(caller): Extension<Caller>,
    UuidPath(uuid): UuidPath,
    OptionalJson(body): OptionalJson<ReasonBody>,
) -> Result<Json<Node>, ApiError> {
    let reason = body.text("maintenance requested")?;
    let node = state
        .app
        .node_lifecycle(
            &caller.actor(),
            &uuid,
            LifecycleEvent::MaintenanceOn,
            &reason,
        )
        .await?;
    Ok(Json(node))
}

pub(super) async fn maintenance_off(
    State(state): State<AppState>,
    Extension(caller): Extension<Caller>,
    UuidPath(uuid): UuidPath,
    OptionalJson(body): OptionalJson<ReasonBody>,
) -> Result<Json<Node>, ApiError> {
    let reason = body.text("maintenance ended")?;
    let node = state
        .app
        .node_maintenance_off(&caller.actor(), &uuid, &reason)
        .await?;
    Ok(Json(node))
}

pub(super) async fn retire(
    State(state): State<AppState>,
    Extension(caller): Extension<Caller>,
    UuidPath(uuid): UuidPath,
    OptionalJson(body): OptionalJson<ReasonBody>,
) -> Result<Json<Node>, ApiError> {
    let reason = body.text("retired by operator")?;
    let node = state
        .app
        .node_lifecycle(&caller.actor(), &uuid, LifecycleEvent::Retire, &reason)
        .await?;
    Ok(Json(node))
}

/// Forgets the recorded serial and MACs so the next registration binds the node to the
/// hardware that answers to its uuid (after a board swap or NIC replacement).
pub(super) async fn accept_identity(
    State(state): State<AppState>,
    Extension(caller): Extension<Caller>,
    UuidPath(uuid): UuidPath,
    OptionalJson(body): OptionalJson<ReasonBody>,
) -> Result<Json<Node>, ApiError> {
    let reason = body.text("identity reset by operator")?;
    Ok(Json(
        state
            .app
            .node_accept_identity(&caller.actor(), &uuid, &reason)
            .await?,
    ))
}

/// Accepts a machine that registered by itself and waits (enrollment policy): its next
/// registration gets addresses and boot files.
pub(super) async fn accept(
    State(state): State<AppState>,
    Extension(caller): Extension<Caller>,
    UuidPath(uuid): UuidPath,
    OptionalJson(body): OptionalJson<ReasonBody>,
) -> Result<Json<Node>, ApiError> {
    let reason = body.text("accepted by operator")?;
    Ok(Json(
        state
            .app
            .node_accept(&caller.actor(), &uuid, Some(&reason))
            .await?,
    ))
}

/// `POST /nodes/{uuid}/power`: `{"action": "on"|"off"|"soft_off"|"cycle"|"pxe",
/// "reason": "…"}` (reason required).
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct PowerRequest {
    action: crate::app::power::PowerAction,
    reason: String,
}

/// Runs an operator's power action and answers with what the BMC read back. The action
/// runs in a task of its own: a client that hangs up does not cut a cycle in half or
/// leave the outcome unrecorded.
pub(super) async fn power_action(
    State(state): State<AppState>,
    Extension(caller): Extension<Caller>,
    UuidPath(uuid): UuidPath,
    JsonBody(request): JsonBody<PowerRequest>,
) -> Result<Json<crate::app::power::PowerOutcome>, ApiError> {
    let app = state.app.clone();
    let actor = caller.actor();
    let task = tokio::spawn(async move {
        app.power_action(&actor, &uuid, request.action, &request.reason)
            .await
    });
    match task.await {
        Ok(outcome) => Ok(Json(outcome?)),
        Err(error) => Err(ApiError::internal(format!("power action task: {error}"))),
    }
}
