//! The admin API under `/api/v1`: nodes, node actions, flavors, IP pools, events, tokens.
//!
//! Every route is declared once in [`routes`] together with the least role it needs; the
//! router is built from that table, so no route can exist without an authorization check,
//! and the tests walk the same table.

use axum::extract::State;
use axum::http::{Method, StatusCode};
use axum::middleware::from_fn_with_state;
use axum::routing::{delete, get, patch, post, put, MethodRouter};
use axum::{Extension, Json, Router};
use serde::{Deserialize, Serialize};

use super::auth::{self, Caller};
use super::error::ApiError;
use super::extract::{JsonBody, NamePath, OptionalJson, QueryParams, UuidPath};
use super::AppState;
use crate::app::nodes::{Enrollment, NodeChanges, Summary};
use crate::app::pools::PoolDetail;
use crate::app::tokens::NewToken;

use crate::core::lifecycle::{LifecycleEvent, LifecycleState};
use crate::core::model::{
    ApiToken, BmcConfig, Event, EventFilter, Flavor, IpPool, Node, NodeFilter, NodeRole, TokenRole,
};
use crate::core::power_sync::PowerReading;
use crate::core::remediation::{Remediation, RemediationKind};
use crate::core::validate;
use bearman_proto::uuid::NodeUuid;

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
        (
            spec(Method::POST, "/nodes/{uuid}/retire", Admin),
            post(retire),
        ),
        (
            spec(Method::POST, "/nodes/{uuid}/accept-identity", Admin),
            post(accept_identity),
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

async fn summary(State(state): State<AppState>) -> Result<Json<Summary>, ApiError> {
    let counts = state.store.node_count_by_state().await?;
    Ok(Json(Summary {
        total: counts.values().sum(),
        by_state: counts
            .into_iter()
            .map(|(s, n)| (s.as_str().to_string(), n))
            .collect(),
    }))
}

async fn node_list(
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

async fn node_show(
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
struct EnrollRequest {
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

async fn node_enroll(
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
struct NodePatch {
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

async fn node_update(
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

async fn node_events(
    State(state): State<AppState>,
    UuidPath(uuid): UuidPath,
    query: QueryParams,
) -> Result<Json<Vec<Event>>, ApiError> {
    query.allow_only(&["limit", "before"])?;
    let filter = EventFilter {
        node_uuid: Some(uuid),
        before_id: query.parse("before")?,
        limit: query.parse::<usize>("limit")?.unwrap_or(100),
    };
    Ok(Json(state.store.event_list(&filter).await?))
}

/// The node's last BMC power reading (power sync): `{"uuid", "power": null}` when it was
/// never polled.
#[derive(Serialize)]
struct NodePower {
    uuid: NodeUuid,
    power: Option<PowerReading>,
}

async fn node_power(
    State(state): State<AppState>,
    UuidPath(uuid): UuidPath,
) -> Result<Json<NodePower>, ApiError> {
    if state.store.node_get_shared(&uuid).await?.is_none() {
        return Err(ApiError::not_found(format!("node {uuid} is not known")));
    }
    let power = state.store.node_power_get(&uuid).await?;
    Ok(Json(NodePower { uuid, power }))
}

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

async fn maintenance_on(
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

async fn maintenance_off(
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

macro_rules! remediation_route {
    ($name:ident, $kind:expr, $default:expr) => {
        async fn $name(
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

fn parse_id(text: &str) -> Result<i64, ApiError> {
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

async fn remediation_list(
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

async fn remediation_show(
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

async fn remediation_cancel(
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
async fn remediation_guards(State(state): State<AppState>) -> Json<serde_json::Value> {
    let liveness = state.app.guards.liveness();
    Json(serde_json::json!({
        "controller_running": liveness.is_running(),
        "controller": liveness,
        "guards": state.app.guards.status(),
    }))
}

async fn retire(
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
async fn accept_identity(
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

async fn flavor_list(State(state): State<AppState>) -> Result<Json<Vec<Flavor>>, ApiError> {
    Ok(Json(state.store.flavor_list().await?))
}

async fn flavor_show(
    State(state): State<AppState>,
    NamePath(name): NamePath,
) -> Result<Json<Flavor>, ApiError> {
    state
        .store
        .flavor_get(&name)
        .await?
        .map(Json)
        .ok_or_else(|| ApiError::not_found(format!("flavor {name} does not exist")))
}

async fn flavor_create(
    State(state): State<AppState>,
    Extension(caller): Extension<Caller>,
    JsonBody(flavor): JsonBody<Flavor>,
) -> Result<(StatusCode, Json<Flavor>), ApiError> {
    let flavor = state.app.flavor_create(&caller.actor(), flavor).await?;
    Ok((StatusCode::CREATED, Json(flavor)))
}

async fn flavor_replace(
    State(state): State<AppState>,
    Extension(caller): Extension<Caller>,
    NamePath(name): NamePath,
    JsonBody(flavor): JsonBody<Flavor>,
) -> Result<Json<Flavor>, ApiError> {
    Ok(Json(
        state
            .app
            .flavor_replace(&caller.actor(), &name, flavor)
            .await?,
    ))
}

async fn flavor_delete(
    State(state): State<AppState>,
    Extension(caller): Extension<Caller>,
    NamePath(name): NamePath,
) -> Result<StatusCode, ApiError> {
    state.app.flavor_delete(&caller.actor(), &name).await?;
    Ok(StatusCode::NO_CONTENT)
}

async fn pool_list(State(state): State<AppState>) -> Result<Json<Vec<IpPool>>, ApiError> {
    Ok(Json(state.store.pool_list().await?))
}

async fn pool_show(
    State(state): State<AppState>,
    NamePath(name): NamePath,
) -> Result<Json<PoolDetail>, ApiError> {
    state
        .app
        .pool_detail(&name)
        .await?
        .map(Json)
        .ok_or_else(|| ApiError::not_found(format!("ip pool {name} does not exist")))
}

async fn pool_create(
    State(state): State<AppState>,
    Extension(caller): Extension<Caller>,
    JsonBody(pool): JsonBody<IpPool>,
) -> Result<(StatusCode, Json<IpPool>), ApiError> {
    let pool = state.app.pool_create(&caller.actor(), pool).await?;
    Ok((StatusCode::CREATED, Json(pool)))
}

async fn pool_delete(
    State(state): State<AppState>,
    Extension(caller): Extension<Caller>,
    NamePath(name): NamePath,
) -> Result<StatusCode, ApiError> {
    state.app.pool_delete(&caller.actor(), &name).await?;
    Ok(StatusCode::NO_CONTENT)
}

async fn event_list(
    State(state): State<AppState>,
    query: QueryParams,
) -> Result<Json<Vec<Event>>, ApiError> {
    query.allow_only(&["node", "limit", "before"])?;
    let node_uuid = query
        .get("node")
        .map(|text| {
            NodeUuid::parse(text).map_err(|e| {
                ApiError::bad_request("invalid_query", format!("query parameter node: {e}"))
            })
        })
        .transpose()?;
    let filter = EventFilter {
        node_uuid,
        before_id: query.parse("before")?,
        limit: query.parse::<usize>("limit")?.unwrap_or(100),
    };
    Ok(Json(state.store.event_list(&filter).await?))
}

async fn token_list(State(state): State<AppState>) -> Result<Json<Vec<ApiToken>>, ApiError> {
    Ok(Json(state.store.token_list().await?))
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct TokenRequest {
    name: String,
    role: TokenRole,
}

async fn token_create(
    State(state): State<AppState>,
    Extension(caller): Extension<Caller>,
    JsonBody(request): JsonBody<TokenRequest>,
) -> Result<(StatusCode, Json<NewToken>), ApiError> {
    let token = state
        .app
        .token_create(&caller.actor(), &request.name, request.role)
        .await?;
    Ok((StatusCode::CREATED, Json(token)))
}

async fn token_delete(
    State(state): State<AppState>,
    Extension(caller): Extension<Caller>,
    NamePath(name): NamePath,
) -> Result<StatusCode, ApiError> {
    state.app.token_delete(&caller.actor(), &name).await?;
    Ok(StatusCode::NO_CONTENT)
}
