//! Chaos drills: preview, start, the kill switch (abort, unblock), the overview and one
//! drill's report.

use axum::extract::State;
use axum::http::StatusCode;
use axum::{Extension, Json};
use serde::{Deserialize, Serialize};

use super::super::auth::Caller;
use super::super::error::ApiError;
use super::super::extract::{JsonBody, NamePath, OptionalJson};
use super::super::AppState;
use super::ReasonBody;
use crate::app::drill::{DrillOverview, DrillPlan, DrillStartRequest};
use crate::core::drill::{Drill, DrillReport};

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct DrillFile {
    /// The drill file's text (TOML).
    file: String,
}

pub(super) async fn drill_preview(
    State(state): State<AppState>,
    JsonBody(body): JsonBody<DrillFile>,
) -> Result<Json<DrillPlan>, ApiError> {
    Ok(Json(state.app.drill_preview(&body.file).await?))
}

pub(super) async fn drill_start(
    State(state): State<AppState>,
    Extension(caller): Extension<Caller>,
    JsonBody(body): JsonBody<DrillStartRequest>,
) -> Result<(StatusCode, Json<DrillReport>), ApiError> {
    let report = state
        .app
        .drill_start(&caller.actor(), &body.file, &body.confirm, body.prediction)
        .await?;
    Ok((StatusCode::CREATED, Json(report)))
}

pub(super) async fn drill_abort(
    State(state): State<AppState>,
    Extension(caller): Extension<Caller>,
    OptionalJson(body): OptionalJson<ReasonBody>,
) -> Result<Json<DrillOverview>, ApiError> {
    let reason = body.text("aborted by an operator")?;
    Ok(Json(state.app.drill_abort(&caller.actor(), &reason).await?))
}

pub(super) async fn drill_unblock(
    State(state): State<AppState>,
    Extension(caller): Extension<Caller>,
) -> Result<Json<DrillOverview>, ApiError> {
    Ok(Json(state.app.drill_unblock(&caller.actor()).await?))
}

pub(super) async fn drill_twin(
    State(state): State<AppState>,
) -> Result<Json<crate::core::drill::FleetTwin>, ApiError> {
    Ok(Json(state.app.drill_twin().await?))
}

pub(super) async fn drill_list(
    State(state): State<AppState>,
) -> Result<Json<DrillOverview>, ApiError> {
    Ok(Json(state.app.drill_overview().await?))
}

/// `GET /drills/{id}`: the report, and the drill's whole record (its file, preflight,
/// prediction, what it observed).
#[derive(Serialize)]
pub(super) struct DrillShow {
    report: DrillReport,
    drill: Drill,
}

pub(super) async fn drill_show(
    State(state): State<AppState>,
    NamePath(id): NamePath,
) -> Result<Json<DrillShow>, ApiError> {
    let id = id.parse::<i64>().ok().filter(|id| *id > 0).ok_or_else(|| {
        ApiError::bad_request(
            "invalid_path",
            format!("drill id {id:?} is not a positive integer"),
        )
    })?;
    let (drill, report) = state.app.drill_get(id).await?;
    Ok(Json(DrillShow { report, drill }))
}
