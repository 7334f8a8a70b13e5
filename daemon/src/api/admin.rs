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
use super::{apply_event, mutate_node, AppState};
use crate::core::ipam::{self, validate_pool};
use crate::core::lifecycle::{LifecycleEvent, LifecycleState};
use crate::core::model::{
    ApiToken, BmcConfig, Event, EventFilter, Flavor, IpAllocation, IpPool, NewEvent, Node,
    NodeFilter, NodeRole, TokenRole,
};
use crate::core::power_sync::PowerReading;
use crate::core::remediation::{Remediation, RemediationKind, Status as RemediationStatus};
use crate::core::validate::{self, check_hostname, FieldError};
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

#[derive(Serialize, Deserialize, Debug, PartialEq, Eq)]
pub struct Summary {
    pub total: usize,
    pub by_state: std::collections::BTreeMap<String, usize>,
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

fn check_rack(rack: &str) -> Result<(), ApiError> {
    if rack.is_empty()
        || rack.len() > 63
        || !rack
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.' | b':'))
    {
        return Err(field_error(
            "rack",
            "must be 1-63 characters of [A-Za-z0-9-_.:]",
        ));
    }
    Ok(())
}

fn check_bmc(bmc: &BmcConfig) -> Result<(), ApiError> {
    if let Some(address) = &bmc.address {
        if address.is_empty() || address.len() > 253 || address.contains(char::is_whitespace) {
            return Err(field_error("bmc.address", "must be a host name or address"));
        }
    }
    if let Some(mac) = &bmc.mac {
        if !validate::is_mac(mac) {
            return Err(field_error(
                "bmc.mac",
                format!("{mac:?} is not a MAC address"),
            ));
        }
    }
    if let Some(reference) = &bmc.credentials_ref {
        // A reference names where the secret lives (`env:VAR`, `file:KEY`); refusing
        // anything else keeps operators from pasting a password here.
        let valid = reference.len() <= 128
            && (reference.starts_with("env:") || reference.starts_with("file:"))
            && reference.bytes().all(|b| {
                b.is_ascii_alphanumeric() || matches!(b, b'_' | b'-' | b'.' | b':' | b'/')
            });
        if !valid {
            return Err(field_error(
                "bmc.credentials_ref",
                "must be env:VARIABLE or file:KEY naming where the secret is kept, never the secret itself",
            ));
        }
    }
    Ok(())
}

async fn check_flavor_exists(state: &AppState, flavor: &str) -> Result<(), ApiError> {
    if state.store.flavor_get(flavor).await?.is_none() {
        return Err(field_error(
            "flavor",
            format!("flavor {flavor} does not exist"),
        ));
    }
    Ok(())
}

async fn node_enroll(
    State(state): State<AppState>,
    Extension(caller): Extension<Caller>,
    JsonBody(request): JsonBody<EnrollRequest>,
) -> Result<(StatusCode, Json<Node>), ApiError> {
    let uuid = NodeUuid::parse(&request.uuid).map_err(|e| field_error("uuid", e.to_string()))?;
    let hostname = request
        .hostname
        .unwrap_or_else(|| crate::core::registration::default_hostname(&uuid));
    check_hostname(&hostname)?;
    if let Some(rack) = &request.rack {
        check_rack(rack)?;
    }
    if let Some(flavor) = &request.flavor {
        check_flavor_exists(&state, flavor).await?;
    }
    let now = state.clock.now_ms();
    let mut node = Node::new(
        uuid.clone(),
        hostname,
        request.role.unwrap_or(state.config.defaults.role),
        now,
    );
    node.rack = request.rack;
    node.flavor = request
        .flavor
        .or_else(|| state.config.defaults.flavor.clone());
    if let Some(bmc) = request.bmc {
        check_bmc(&bmc)?;
        node.bmc = bmc;
    }
    let event = NewEvent::for_node(
        &uuid,
        now,
        &caller.actor(),
        "enroll",
        "enrolled by operator",
    );
    let node = state.store.node_create(&node, &[event]).await?;
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
    if let Some(hostname) = &patch.hostname {
        check_hostname(hostname)?;
    }
    if let Some(rack) = &patch.rack {
        check_rack(rack)?;
    }
    if let Some(bmc) = &patch.bmc {
        check_bmc(bmc)?;
    }
    if let Some(flavor) = patch.flavor.as_deref().filter(|f| !f.is_empty()) {
        check_flavor_exists(&state, flavor).await?;
    }
    let now = state.clock.now_ms();
    let actor = caller.actor();
    let node = mutate_node(&state, &uuid, |node| {
        if let Some(expected) = patch.generation {
            if node.generation != expected {
                return Err(ApiError::conflict(
                    "generation_mismatch",
                    format!(
                        "node {uuid} is at generation {}, not {expected}",
                        node.generation
                    ),
                ));
            }
        }
        let mut changes = Vec::new();
        if let Some(hostname) = &patch.hostname {
            if &node.hostname != hostname {
                changes.push(format!("hostname {} -> {hostname}", node.hostname));
                node.hostname = hostname.clone();
            }
        }
        if let Some(role) = patch.role {
            if node.role != role {
                changes.push(format!("role {} -> {}", node.role.as_str(), role.as_str()));
                node.role = role;
            }
        }
        if let Some(rack) = &patch.rack {
            if node.rack.as_ref() != Some(rack) {
                changes.push(format!("rack -> {rack}"));
                node.rack = Some(rack.clone());
            }
        }
        if let Some(flavor) = &patch.flavor {
            let new = (!flavor.is_empty()).then(|| flavor.clone());
            if node.flavor != new {
                changes.push(format!("flavor -> {}", new.as_deref().unwrap_or("(none)")));
                node.flavor = new;
            }
        }
        if let Some(bmc) = &patch.bmc {
            if &node.bmc != bmc {
                changes.push("bmc settings".to_string());
                node.bmc = bmc.clone();
            }
        }
        if changes.is_empty() {
            return Ok(vec![]);
        }
        Ok(vec![NewEvent::for_node(
            &uuid,
            now,
            &actor,
            "update",
            changes.join(", "),
        )])
    })
    .await?;
    Ok(Json(node))
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
        match &self.reason {
            Some(reason) if reason.len() > 1024 => {
                Err(field_error("reason", "longer than 1024 bytes"))
            }
            Some(reason) if !reason.trim().is_empty() => Ok(reason.trim().to_string()),
            _ => Ok(default.to_string()),
        }
    }
}

/// Runs an operator's lifecycle action on a node and records who asked and why.
async fn node_action(
    state: &AppState,
    caller: &Caller,
    uuid: &NodeUuid,
    event: LifecycleEvent,
    reason: String,
) -> Result<Json<Node>, ApiError> {
    let now = state.clock.now_ms();
    let actor = caller.actor();
    let node = mutate_node(state, uuid, |node| {
        Ok(apply_event(node, event, now, &actor, &reason)?
            .into_iter()
            .collect())
    })
    .await?;
    tracing::info!(%uuid, action = event.name(), actor = %actor, state = %node.state, "operator action");
    Ok(Json(node))
}

async fn maintenance_on(
    State(state): State<AppState>,
    Extension(caller): Extension<Caller>,
    UuidPath(uuid): UuidPath,
    OptionalJson(body): OptionalJson<ReasonBody>,
) -> Result<Json<Node>, ApiError> {
    let reason = body.text("maintenance requested")?;
    node_action(
        &state,
        &caller,
        &uuid,
        LifecycleEvent::MaintenanceOn,
        reason,
    )
    .await
}

async fn maintenance_off(
    State(state): State<AppState>,
    Extension(caller): Extension<Caller>,
    UuidPath(uuid): UuidPath,
    OptionalJson(body): OptionalJson<ReasonBody>,
) -> Result<Json<Node>, ApiError> {
    let reason = body.text("maintenance ended")?;
    let now = state.clock.now_ms();
    let node = state
        .store
        .node_get(&uuid)
        .await?
        .ok_or_else(|| ApiError::not_found(format!("node {uuid} is not known")))?;
    let heartbeat_fresh = node
        .last_heartbeat_at_ms
        .is_some_and(|at| now - at <= state.config.heartbeat_fresh_ms);
    node_action(
        &state,
        &caller,
        &uuid,
        LifecycleEvent::MaintenanceOff { heartbeat_fresh },
        reason,
    )
    .await
}

/// Starts an operator-requested remediation. Operator requests bypass the automatic
/// guards (rack pause, fleet stop, rate limit): a human decided.
async fn start_remediation(
    state: &AppState,
    caller: &Caller,
    uuid: &NodeUuid,
    kind: RemediationKind,
    reason: String,
) -> Result<(StatusCode, Json<Remediation>), ApiError> {
    let node = state
        .store
        .node_get(uuid)
        .await?
        .ok_or_else(|| ApiError::not_found(format!("node {uuid} is not known")))?;
    if !matches!(
        node.state,
        LifecycleState::Ready
            | LifecycleState::Suspect
            | LifecycleState::Fenced
            | LifecycleState::Provisioning
            | LifecycleState::Registered
    ) {
        return Err(ApiError::conflict(
            "illegal_state",
            format!(
                "node {uuid} is {}; {} needs a node that is ready, suspect, fenced, registered or provisioning",
                node.state,
                kind.as_str()
            ),
        ));
    }
    let now = state.clock.now_ms();
    let remediation = Remediation::new(uuid.clone(), kind, &caller.actor(), &reason, now);
    let event = NewEvent::for_node(
        uuid,
        now,
        &caller.actor(),
        "remediation_started",
        format!("{}: {reason}", kind.as_str()),
    );
    let created = state
        .store
        .remediation_create(&remediation, &[event])
        .await
        .map_err(|error| match error {
            crate::store::StoreError::AlreadyExists { .. } => ApiError::conflict(
                "remediation_active",
                format!("node {uuid} already has an active remediation; cancel it first"),
            ),
            other => other.into(),
        })?;
    tracing::info!(%uuid, id = created.id, kind = kind.as_str(), actor = %caller.actor(), "operator remediation");
    Ok((StatusCode::ACCEPTED, Json(created)))
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
            start_remediation(&state, &caller, &uuid, $kind, reason).await
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
    for _ in 0..4 {
        let remediation = state
            .store
            .remediation_get(id)
            .await?
            .ok_or_else(|| ApiError::not_found(format!("remediation {id} does not exist")))?;
        let Some(step) = remediation.step() else {
            return Err(ApiError::conflict(
                "not_active",
                format!(
                    "remediation {id} is already {}",
                    remediation.status.as_str()
                ),
            ));
        };
        if !step.cancellable() {
            return Err(ApiError::conflict(
                "not_cancellable",
                format!("remediation {id} is in step {}; a power-off must finish before it can be cancelled", step.as_str()),
            ));
        }
        let now = state.clock.now_ms();
        let mut cancelled = remediation.clone();
        cancelled.status = RemediationStatus::Cancelled;
        cancelled.finished_at_ms = Some(now);
        cancelled.updated_at_ms = now;
        let event = NewEvent::for_node(
            &remediation.node_uuid,
            now,
            &caller.actor(),
            "remediation_cancelled",
            format!("remediation {id}: {reason}"),
        );
        match state
            .store
            .remediation_update(&cancelled, None, &[event])
            .await
        {
            Ok((stored, _)) => return Ok(Json(stored)),
            Err(crate::store::StoreError::Conflict { .. }) => continue,
            Err(error) => return Err(error.into()),
        }
    }
    Err(ApiError::conflict(
        "busy",
        format!("remediation {id} is changing; retry"),
    ))
}

async fn remediation_guards(State(state): State<AppState>) -> Json<serde_json::Value> {
    let guards = state
        .guards
        .lock()
        .unwrap_or_else(|p| p.into_inner())
        .clone();
    Json(match guards {
        Some(status) => serde_json::json!({ "controller_running": true, "guards": status }),
        None => serde_json::json!({ "controller_running": false, "guards": null }),
    })
}

async fn retire(
    State(state): State<AppState>,
    Extension(caller): Extension<Caller>,
    UuidPath(uuid): UuidPath,
    OptionalJson(body): OptionalJson<ReasonBody>,
) -> Result<Json<Node>, ApiError> {
    let reason = body.text("retired by operator")?;
    node_action(&state, &caller, &uuid, LifecycleEvent::Retire, reason).await
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
    let now = state.clock.now_ms();
    let actor = caller.actor();
    let node = mutate_node(&state, &uuid, |node| {
        node.serial.clear();
        node.hardware.nics.clear();
        Ok(vec![NewEvent::for_node(
            &uuid,
            now,
            &actor,
            "accept_identity",
            reason.clone(),
        )])
    })
    .await?;
    Ok(Json(node))
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
    validate::check_flavor(&flavor)?;
    let now = state.clock.now_ms();
    let event = admin_event(
        &caller,
        now,
        "flavor_create",
        format!("flavor {}", flavor.name),
    );
    // The database decides: of two concurrent creates of one name exactly one wins.
    match state.store.flavor_create(&flavor, now, &[event]).await {
        Ok(()) => Ok((StatusCode::CREATED, Json(flavor))),
        Err(crate::store::StoreError::AlreadyExists { .. }) => Err(ApiError::conflict(
            "already_exists",
            format!(
                "flavor {} already exists; use PUT to replace it",
                flavor.name
            ),
        )),
        Err(error) => Err(error.into()),
    }
}

async fn flavor_replace(
    State(state): State<AppState>,
    Extension(caller): Extension<Caller>,
    NamePath(name): NamePath,
    JsonBody(flavor): JsonBody<Flavor>,
) -> Result<Json<Flavor>, ApiError> {
    if flavor.name != name {
        return Err(field_error(
            "name",
            format!("{:?} does not match the path's {name:?}", flavor.name),
        ));
    }
    validate::check_flavor(&flavor)?;
    let now = state.clock.now_ms();
    let event = admin_event(
        &caller,
        now,
        "flavor_replace",
        format!("flavor {}", flavor.name),
    );
    state.store.flavor_put(&flavor, now, &[event]).await?;
    Ok(Json(flavor))
}

async fn flavor_delete(
    State(state): State<AppState>,
    Extension(caller): Extension<Caller>,
    NamePath(name): NamePath,
) -> Result<StatusCode, ApiError> {
    let event = admin_event(
        &caller,
        state.clock.now_ms(),
        "flavor_delete",
        format!("flavor {name}"),
    );
    state.store.flavor_delete(&name, &[event]).await?;
    Ok(StatusCode::NO_CONTENT)
}

/// The audit event of an admin write that concerns no node, written by the store in the
/// write's own transaction.
fn admin_event(caller: &Caller, at_ms: i64, action: &str, reason: String) -> NewEvent {
    NewEvent {
        at_ms,
        node_uuid: None,
        actor: caller.actor(),
        action: action.to_string(),
        from_state: None,
        to_state: None,
        reason,
    }
}

async fn pool_list(State(state): State<AppState>) -> Result<Json<Vec<IpPool>>, ApiError> {
    Ok(Json(state.store.pool_list().await?))
}

#[derive(Serialize, Deserialize, Debug)]
pub struct PoolDetail {
    pub pool: IpPool,
    pub size: u32,
    pub allocations: Vec<IpAllocation>,
}

async fn pool_show(
    State(state): State<AppState>,
    NamePath(name): NamePath,
) -> Result<Json<PoolDetail>, ApiError> {
    let pool = state
        .store
        .pool_get(&name)
        .await?
        .ok_or_else(|| ApiError::not_found(format!("ip pool {name} does not exist")))?;
    let range =
        validate_pool(&pool).map_err(|e| ApiError::internal(format!("stored pool {name}: {e}")))?;
    let size = range.end - range.start + 1
        - u32::from(
            range
                .gateway
                .is_some_and(|g| g >= range.start && g <= range.end),
        );
    let allocations = state.store.ip_list(Some(&name), None).await?;
    Ok(Json(PoolDetail {
        pool,
        size,
        allocations,
    }))
}

async fn pool_create(
    State(state): State<AppState>,
    Extension(caller): Extension<Caller>,
    JsonBody(pool): JsonBody<IpPool>,
) -> Result<(StatusCode, Json<IpPool>), ApiError> {
    validate_pool(&pool).map_err(|e| ApiError::unprocessable(e.to_string()))?;
    let event = admin_event(
        &caller,
        state.clock.now_ms(),
        "pool_create",
        format!(
            "pool {} {} {}-{}",
            pool.name, pool.cidr, pool.range_start, pool.range_end
        ),
    );
    state.store.pool_create(&pool, &[event]).await?;
    Ok((StatusCode::CREATED, Json(pool)))
}

async fn pool_delete(
    State(state): State<AppState>,
    Extension(caller): Extension<Caller>,
    NamePath(name): NamePath,
) -> Result<StatusCode, ApiError> {
    let event = admin_event(
        &caller,
        state.clock.now_ms(),
        "pool_delete",
        format!("pool {name}"),
    );
    state.store.pool_delete(&name, &[event]).await?;
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

/// A freshly created token: the only time its secret is ever shown.
#[derive(Serialize, Deserialize, Debug)]
pub struct NewToken {
    pub name: String,
    pub role: TokenRole,
    pub secret: String,
}

/// Creates a token; shared by the API and `bearman token create`.
pub async fn create_token(
    store: &dyn crate::store::Store,
    name: &str,
    role: TokenRole,
    actor: &str,
    now_ms: i64,
) -> Result<NewToken, ApiError> {
    if !ipam::is_valid_name(name) {
        return Err(ApiError::from(FieldError {
            field: "name".into(),
            problem: "must be 1-63 characters of [a-z0-9-_.]".into(),
        }));
    }
    let secret = auth::generate_secret()
        .map_err(|e| ApiError::internal(format!("operating system random generator: {e}")))?;
    let event = NewEvent {
        at_ms: now_ms,
        node_uuid: None,
        actor: actor.to_string(),
        action: "token_create".into(),
        from_state: None,
        to_state: None,
        reason: format!("token {name} with role {}", role.as_str()),
    };
    store
        .token_create(name, role, &auth::hash_secret(&secret), now_ms, &[event])
        .await?;
    Ok(NewToken {
        name: name.to_string(),
        role,
        secret,
    })
}

async fn token_create(
    State(state): State<AppState>,
    Extension(caller): Extension<Caller>,
    JsonBody(request): JsonBody<TokenRequest>,
) -> Result<(StatusCode, Json<NewToken>), ApiError> {
    let token = create_token(
        &*state.store,
        &request.name,
        request.role,
        &caller.actor(),
        state.clock.now_ms(),
    )
    .await?;
    Ok((StatusCode::CREATED, Json(token)))
}

async fn token_delete(
    State(state): State<AppState>,
    Extension(caller): Extension<Caller>,
    NamePath(name): NamePath,
) -> Result<StatusCode, ApiError> {
    let event = admin_event(
        &caller,
        state.clock.now_ms(),
        "token_delete",
        format!("token {name}"),
    );
    state.store.token_delete(&name, &[event]).await?;
    Ok(StatusCode::NO_CONTENT)
}
