//! The admin API under `/api/v1`, one file per resource: nodes (and their lifecycle
//! actions), remediations, flavors, IP pools, events, tokens, the cluster, the fleet grid.
//!
//! Every route is declared once in [`routes`] together with the least role it needs; the
//! router is built from that table, so no route can exist without an authorization check,
//! and the tests walk the same table. Handlers are HTTP only: they parse, call the
//! application layer for every change, and read through the store.

mod cluster;
mod drills;
mod events;
mod firmware;
mod flavors;
mod fleet;
mod nodes;
mod pools;
mod remediations;
mod tokens;

use axum::http::Method;
use axum::middleware::from_fn_with_state;
use axum::routing::{delete, get, patch, post, put, MethodRouter};
use axum::{Extension, Json, Router};
use serde::{Deserialize, Serialize};

use super::auth::{self, Caller};
use super::error::ApiError;
use super::AppState;
use crate::core::model::TokenRole;
use crate::core::validate;
use cluster::*;
use drills::*;
use events::*;
use firmware::*;
use flavors::*;
use fleet::*;
use nodes::*;
use pools::*;
use remediations::*;
use tokens::*;

/// One admin route: method, path under `/api/v1`, and the least role that may call it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct RouteSpec {
    pub method: Method,
    pub path: &'static str,
    pub role: TokenRole,
}

fn spec(method: Method, path: &'static str, role: TokenRole) -> RouteSpec {
    RouteSpec { method, path, role }
}

fn routes() -> Vec<(RouteSpec, MethodRouter<AppState>)> {
    use TokenRole::{Admin, Operator, Viewer};
    vec![
        (spec(Method::GET, "/whoami", Viewer), get(whoami)),
        (spec(Method::GET, "/summary", Viewer), get(summary)),
        (spec(Method::GET, "/fleet/grid", Viewer), get(fleet_grid)),
        (spec(Method::GET, "/nodes", Viewer), get(node_list)),
        (spec(Method::POST, "/nodes", Admin), post(node_enroll)),
        (spec(Method::GET, "/nodes/{uuid}", Viewer), get(node_show)),
        (
            spec(Method::PATCH, "/nodes/{uuid}", Admin),
            patch(node_update),
        ),
        (
            spec(Method::GET, "/nodes/{uuid}/events", Viewer),
            get(node_events),
        ),
        (
            spec(Method::GET, "/nodes/{uuid}/power", Viewer),
            get(node_power),
        ),
        (
            spec(Method::POST, "/nodes/{uuid}/power", Operator),
            post(power_action),
        ),
        (
            spec(Method::POST, "/nodes/{uuid}/maintenance", Operator),
            post(maintenance_on),
        ),
        (
            spec(Method::DELETE, "/nodes/{uuid}/maintenance", Operator),
            delete(maintenance_off),
        ),
        (
            spec(Method::POST, "/nodes/{uuid}/fence", Operator),
            post(fence),
        ),
        (
            spec(Method::POST, "/nodes/{uuid}/evacuate", Operator),
            post(evacuate),
        ),
        (
            spec(Method::POST, "/nodes/{uuid}/rebuild", Operator),
            post(rebuild),
        ),
        (
            spec(Method::POST, "/nodes/{uuid}/drain", Operator),
            post(drain),
        ),
        (
            spec(Method::GET, "/remediations", Viewer),
            get(remediation_list),
        ),
        (
            spec(Method::GET, "/remediations/{id}", Viewer),
            get(remediation_show),
        ),
        (
            spec(Method::POST, "/remediations/{id}/cancel", Operator),
            post(remediation_cancel),
        ),
        (
            spec(Method::GET, "/remediation/guards", Viewer),
            get(remediation_guards),
        ),
        (spec(Method::GET, "/cluster", Viewer), get(cluster_status)),
        (
            spec(Method::POST, "/nodes/{uuid}/retire", Admin),
            post(retire),
        ),
        (
            spec(Method::POST, "/nodes/{uuid}/accept-identity", Admin),
            post(accept_identity),
        ),
        (
            spec(Method::POST, "/nodes/{uuid}/accept", Admin),
            post(accept),
        ),
        (spec(Method::GET, "/flavors", Viewer), get(flavor_list)),
        (spec(Method::POST, "/flavors", Admin), post(flavor_create)),
        (
            spec(Method::GET, "/flavors/{name}", Viewer),
            get(flavor_show),
        ),
        (
            spec(Method::PUT, "/flavors/{name}", Admin),
            put(flavor_replace),
        ),
        (
            spec(Method::DELETE, "/flavors/{name}", Admin),
            delete(flavor_delete),
        ),
        (
            spec(Method::GET, "/firmware/status", Viewer),
            get(firmware_status),
        ),
        (
            spec(Method::GET, "/firmware/bundles", Viewer),
            get(firmware_bundle_list),
        ),
        (
            spec(Method::POST, "/firmware/bundles", Admin),
            post(firmware_bundle_create),
        ),
        (
            spec(Method::GET, "/firmware/bundles/{name}", Viewer),
            get(firmware_bundle_show),
        ),
        (
            spec(Method::DELETE, "/firmware/bundles/{name}", Admin),
            delete(firmware_bundle_delete),
        ),
        (
            spec(Method::GET, "/firmware/rollout", Viewer),
            get(firmware_rollout_show),
        ),
        (
            spec(Method::POST, "/firmware/rollout/pause", Operator),
            post(firmware_rollout_pause),
        ),
        (
            spec(Method::POST, "/firmware/rollout/resume", Operator),
            post(firmware_rollout_resume),
        ),
        (
            spec(Method::GET, "/nodes/{uuid}/firmware", Viewer),
            get(node_firmware),
        ),
        (
            spec(Method::POST, "/nodes/{uuid}/firmware/retry", Operator),
            post(node_firmware_retry),
        ),
        (spec(Method::GET, "/drills", Viewer), get(drill_list)),
        (spec(Method::POST, "/drills", Operator), post(drill_start)),
        (
            spec(Method::POST, "/drills/preview", Operator),
            post(drill_preview),
        ),
        (
            spec(Method::POST, "/drills/abort", Operator),
            post(drill_abort),
        ),
        (
            spec(Method::POST, "/drills/unblock", Operator),
            post(drill_unblock),
        ),
        (spec(Method::GET, "/drills/twin", Viewer), get(drill_twin)),
        (spec(Method::GET, "/drills/{id}", Viewer), get(drill_show)),
        (spec(Method::GET, "/pools", Viewer), get(pool_list)),
        (spec(Method::POST, "/pools", Admin), post(pool_create)),
        (spec(Method::GET, "/pools/{name}", Viewer), get(pool_show)),
        (
            spec(Method::DELETE, "/pools/{name}", Admin),
            delete(pool_delete),
        ),
        (spec(Method::GET, "/events", Viewer), get(event_list)),
        (spec(Method::GET, "/tokens", Admin), get(token_list)),
        (spec(Method::POST, "/tokens", Admin), post(token_create)),
        (
            spec(Method::DELETE, "/tokens/{name}", Admin),
            delete(token_delete),
        ),
    ]
}

/// Every admin route with its required role, for documentation and the auth tests.
pub fn route_table() -> Vec<RouteSpec> {
    routes().into_iter().map(|(spec, _)| spec).collect()
}

pub fn router(state: AppState) -> Router<AppState> {
    let mut router = Router::new();
    for (spec, handler) in routes() {
        let role = spec.role;
        let guarded = handler.route_layer(from_fn_with_state(
            state.clone(),
            move |state, request, next| auth::require_role(state, role, request, next),
        ));
        router = router.route(spec.path, guarded);
    }
    router
}

/// Every `GET` route a viewer may call, with no authentication: the caller is a fixed
/// viewer. Only for a read-only window onto a daemon that is not this process's to serve
/// (the simulator's `bearman-sim run --serve`, whose store is a simulation's); never
/// mounted by `bearman serve` (`tests/tests/tidy.rs` checks only the simulator names it).
pub fn read_only_window_router() -> Router<AppState> {
    let mut router = Router::new();
    for (spec, handler) in routes() {
        if spec.method != Method::GET || spec.role != TokenRole::Viewer {
            continue;
        }
        router = router.route(
            spec.path,
            handler.route_layer(axum::middleware::from_fn(
                |mut request: axum::extract::Request, next: axum::middleware::Next| async move {
                    request.extensions_mut().insert(Caller {
                        token_name: "read-only window".into(),
                        role: TokenRole::Viewer,
                    });
                    next.run(request).await
                },
            )),
        );
    }
    router
}

fn field_error(field: &str, problem: impl Into<String>) -> ApiError {
    ApiError::unprocessable(format!("field {field}: {}", problem.into()))
}

async fn whoami(Extension(caller): Extension<Caller>) -> Json<Caller> {
    Json(caller)
}

impl Serialize for Caller {
    fn serialize<S: serde::Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        use serde::ser::SerializeStruct;
        let mut s = serializer.serialize_struct("Caller", 2)?;
        s.serialize_field("token", &self.token_name)?;
        s.serialize_field("role", &self.role)?;
        s.end()
    }
}

/// An operator's optional reason for an action, at most 1024 bytes.
#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields)]
struct ReasonBody {
    #[serde(default)]
    reason: Option<String>,
}

impl ReasonBody {
    fn text(&self, default: &str) -> Result<String, ApiError> {
        Ok(validate::reason_or(self.reason.as_deref(), default)?)
    }
}
