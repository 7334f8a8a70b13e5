//! Firmware: the fleet's drift report, bundles, the rollout (pause, resume), a node's
//! per-component view, and clearing a node's failed attempts.

use axum::extract::State;
use axum::http::StatusCode;
use axum::{Extension, Json};
use serde::Serialize;

use super::super::auth::Caller;
use super::super::error::ApiError;
use super::super::extract::{JsonBody, NamePath, OptionalJson, UuidPath};
use super::super::AppState;
use super::ReasonBody;
use crate::core::firmware::{
    self, ComponentRecord, ComponentStatus, DriftReport, FirmwareBundle, FirmwareRollout,
    NodeFirmwareUpdate, RolloutPolicy,
};
use crate::core::model::Node;

/// `GET /firmware/status`: drift, and the rollout with the rules it runs by.
#[derive(Serialize)]
pub(super) struct FirmwareStatus {
    drift: DriftReport,
    rollout: FirmwareRollout,
    policy: RolloutPolicy,
}

pub(super) async fn firmware_status(
    State(state): State<AppState>,
) -> Result<Json<FirmwareStatus>, ApiError> {
    Ok(Json(FirmwareStatus {
        drift: state.app.firmware_status().await?,
        rollout: state.app.firmware_rollout().await?,
        policy: state.app.settings.firmware.clone(),
    }))
}

pub(super) async fn firmware_bundle_list(
    State(state): State<AppState>,
) -> Result<Json<Vec<FirmwareBundle>>, ApiError> {
    Ok(Json(state.app.firmware_bundle_list().await?))
}

pub(super) async fn firmware_bundle_show(
    State(state): State<AppState>,
    NamePath(name): NamePath,
) -> Result<Json<FirmwareBundle>, ApiError> {
    Ok(Json(state.app.firmware_bundle_get(&name).await?))
}

pub(super) async fn firmware_bundle_create(
    State(state): State<AppState>,
    Extension(caller): Extension<Caller>,
    JsonBody(bundle): JsonBody<FirmwareBundle>,
) -> Result<(StatusCode, Json<FirmwareBundle>), ApiError> {
    let bundle = state
        .app
        .firmware_bundle_add(&caller.actor(), bundle)
        .await?;
    Ok((StatusCode::CREATED, Json(bundle)))
}

pub(super) async fn firmware_bundle_delete(
    State(state): State<AppState>,
    Extension(caller): Extension<Caller>,
    NamePath(name): NamePath,
    OptionalJson(body): OptionalJson<ReasonBody>,
) -> Result<StatusCode, ApiError> {
    let reason = body.text("deleted by an operator")?;
    state
        .app
        .firmware_bundle_delete(&caller.actor(), &name, Some(&reason))
        .await?;
    Ok(StatusCode::NO_CONTENT)
}

pub(super) async fn firmware_rollout_show(
    State(state): State<AppState>,
) -> Result<Json<FirmwareRollout>, ApiError> {
    Ok(Json(state.app.firmware_rollout().await?))
}

pub(super) async fn firmware_rollout_pause(
    State(state): State<AppState>,
    Extension(caller): Extension<Caller>,
    OptionalJson(body): OptionalJson<ReasonBody>,
) -> Result<Json<FirmwareRollout>, ApiError> {
    let reason = body.text("paused by an operator")?;
    Ok(Json(
        state
            .app
            .firmware_rollout_pause(&caller.actor(), Some(&reason))
            .await?,
    ))
}

pub(super) async fn firmware_rollout_resume(
    State(state): State<AppState>,
    Extension(caller): Extension<Caller>,
    OptionalJson(body): OptionalJson<ReasonBody>,
) -> Result<Json<FirmwareRollout>, ApiError> {
    let reason = body.text("resumed by an operator")?;
    Ok(Json(
        state
            .app
            .firmware_rollout_resume(&caller.actor(), Some(&reason))
            .await?,
    ))
}

/// `GET /nodes/{uuid}/firmware`: each component against the node's flavor, with what
/// Bearman knows of it, and the update in flight or last failed.
#[derive(Serialize)]
pub(super) struct NodeFirmware {
    uuid: String,
    flavor: Option<String>,
    components: Vec<NodeComponent>,
    update: Option<NodeFirmwareUpdate>,
}

#[derive(Serialize)]
struct NodeComponent {
    #[serde(flatten)]
    status: ComponentStatus,
    #[serde(flatten)]
    record: Option<ComponentRecord>,
}

pub(super) async fn node_firmware(
    State(state): State<AppState>,
    UuidPath(uuid): UuidPath,
) -> Result<Json<NodeFirmware>, ApiError> {
    let node: Node = state
        .store
        .node_get(&uuid)
        .await?
        .ok_or_else(|| ApiError::not_found(format!("node {uuid} is not known")))?;
    let expected = match &node.flavor {
        Some(name) => state
            .store
            .flavor_get(name)
            .await?
            .map(|flavor| flavor.firmware_expected)
            .unwrap_or_default(),
        None => Default::default(),
    };
    let components = firmware::node_status(&node, &expected)
        .into_iter()
        .map(|status| NodeComponent {
            record: node.firmware_components.get(&status.component).cloned(),
            status,
        })
        .collect();
    Ok(Json(NodeFirmware {
        uuid: uuid.to_string(),
        flavor: node.flavor.clone(),
        components,
        update: node.firmware_update.clone(),
    }))
}

pub(super) async fn node_firmware_retry(
    State(state): State<AppState>,
    Extension(caller): Extension<Caller>,
    UuidPath(uuid): UuidPath,
    OptionalJson(body): OptionalJson<ReasonBody>,
) -> Result<Json<Node>, ApiError> {
    let reason = body.text("retry asked by an operator")?;
    Ok(Json(
        state
            .app
            .firmware_retry(&caller.actor(), &uuid, Some(&reason))
            .await?,
    ))
}
