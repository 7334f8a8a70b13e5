//! `GET /api/v1/cluster`: the replicas on this database, who holds the controller's
//! lease (epoch, expiry on the database clock), and what this replica is doing.

use axum::extract::State;
use axum::Json;

use super::super::error::ApiError;
use super::super::AppState;
use crate::app::cluster::Acting;

pub(super) async fn cluster_status(
    State(state): State<AppState>,
) -> Result<Json<serde_json::Value>, ApiError> {
    let status = state.app.cluster_status().await?;
    let (acting, epoch) = match state.app.leader.acting(state.app.now_ms()) {
        Acting::Alone => ("alone", None),
        Acting::Leader { epoch } => ("leader", Some(epoch)),
        Acting::Standby => ("standby", None),
    };
    Ok(Json(serde_json::json!({
        "this_replica": {
            "name": state.app.leader.replica_name(),
            "acting": acting,
            "epoch": epoch,
        },
        "cluster": status,
    })))
}
