//! `GET /metrics`: the daemon's metrics in the OpenMetrics text format. What is counted
//! as it happens lives in [`crate::telemetry::Metrics`]; the fleet's gauges (nodes by
//! state, rack and role; remediations in progress; the guards; the controller) are read
//! at each scrape, so every replica answers for the whole fleet from the database and
//! the leader adds what only its controller knows.
//!
//! Served on the main listener next to the admin API. By default it needs a token of
//! role viewer (`Authorization: Bearer`, Prometheus' `authorization.credentials_file`):
//! it names racks and counts nodes. `[metrics] public = true` serves it to anyone.

use axum::extract::{Request, State};
use axum::http::{header, StatusCode};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};

use super::error::ApiError;
use super::AppState;
use crate::app::cluster::Acting;
use crate::core::model::TokenRole;
use crate::telemetry::{FleetSnapshot, GuardSnapshot, CONTENT_TYPE};

/// Remediations in progress read per scrape, at most (the controller's own cap on
/// active remediations is far below).
const ACTIVE_REMEDIATIONS_READ_MAX: usize = 10_000;

/// The route, with the viewer check unless `[metrics] public`.
pub fn router(state: &AppState) -> axum::Router<AppState> {
    let route = axum::routing::get(metrics);
    let route = if state.config.metrics_public {
        route
    } else {
        route.route_layer(axum::middleware::from_fn_with_state(
            state.clone(),
            |state, request: Request, next: Next| {
                super::auth::require_role(state, TokenRole::Viewer, request, next)
            },
        ))
    };
    axum::Router::new().route("/metrics", route)
}

async fn metrics(State(state): State<AppState>) -> Response {
    render(&state).await
}

/// The `GET /metrics` answer for `state`: also what the simulator's `--serve` window
/// answers, over a state that shares the simulated daemon's boards and metrics.
pub async fn render(state: &AppState) -> Response {
    let snapshot = match fleet_snapshot(state).await {
        Ok(snapshot) => snapshot,
        // A scrape that cannot read the fleet fails whole, so Prometheus marks the
        // target down (`up == 0`) rather than recording zeros.
        Err(error) => return error.into_response(),
    };
    let body = state.app.metrics.render(&snapshot).await;
    (StatusCode::OK, [(header::CONTENT_TYPE, CONTENT_TYPE)], body).into_response()
}

async fn fleet_snapshot(state: &AppState) -> Result<FleetSnapshot, ApiError> {
    let nodes = state
        .store
        .node_tally()
        .await?
        .into_iter()
        .map(|tally| {
            (
                (
                    tally.state.as_str(),
                    tally.rack.unwrap_or_default(),
                    tally.role.as_str(),
                ),
                tally.count,
            )
        })
        .collect();
    let now_ms = state.app.now_ms();
    let mut active = std::collections::BTreeMap::<&'static str, u64>::new();
    let mut oldest_created_ms = now_ms;
    for remediation in state
        .store
        .remediation_list(true, None, ACTIVE_REMEDIATIONS_READ_MAX)
        .await?
    {
        *active.entry(remediation.kind.as_str()).or_default() += 1;
        oldest_created_ms = oldest_created_ms.min(remediation.created_at_ms);
    }
    let leader = !matches!(state.app.leader.acting(now_ms), Acting::Standby);
    // A standby's board is stale (its controller stood down): only the acting
    // replica reports the guards.
    let guards = state
        .app
        .guards
        .status()
        .filter(|_| leader)
        .map(|status| GuardSnapshot {
            automatic: status.automatic,
            fleet_fencing_stopped: status.fleet_fencing_stopped,
            racks_paused: status.racks_paused,
            monitored: status.monitored as u64,
            silent: status.silent as u64,
            power_readings: status
                .power_readings
                .into_iter()
                .map(|(reading, count)| (reading, count as u64))
                .collect(),
            fences_unverified: status.fences_unverified.len() as u64,
            boots_stalled: status.boots_stalled.len() as u64,
        });
    let rollout = state.store.firmware_rollout_get().await?;
    let drills = state.store.drill_board_get().await?;
    Ok(FleetSnapshot {
        drill_running: drills.active.is_some(),
        drills_blocked: drills.blocked.is_some(),
        firmware_flashing: rollout.slots.len() as u64,
        firmware_paused: rollout.paused.is_some(),
        firmware_tallies: rollout
            .tallies
            .iter()
            .map(|(bundle, tally)| {
                (
                    bundle.clone(),
                    [tally.started, tally.succeeded, tally.failed],
                )
            })
            .collect(),
        nodes,
        remediations_active: active.into_iter().collect(),
        oldest_active_remediation_s: u64::try_from((now_ms - oldest_created_ms) / 1000)
            .unwrap_or(0),
        guards,
        controller_up: state.app.guards.liveness().is_running(),
        leader,
    })
}
