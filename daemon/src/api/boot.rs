//! The network-boot endpoints, exactly the paths of the original system:
//! `/ipxe`, `/ipxe/{uuid}`, `…/register`, `…/profile`, `…/detail`, `…/installed`,
//! `…/heartbeat`, plus `/images/{path}` for artifacts kept in the data directory.
//!
//! They are unauthenticated by design (firmware cannot hold a secret); what protects the
//! inventory is that they only ever change the calling node's own record, and that a
//! registration which does not match the hardware on record is refused and audited.

use std::net::SocketAddr;

use axum::extract::{ConnectInfo, Path, State};
use axum::http::{header, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Extension, Json, Router};
use bearman_proto::uuid::NodeUuid;
use bearman_proto::{
    BootProfile, Heartbeat, InstalledReport, NetworkDetail, RegisterRequest, RegisterResponse,
};

use super::error::ApiError;
use super::extract::{JsonBody, OptionalJson, UuidPath};
use super::AppState;
use crate::app::AppError;
use crate::core::boot::{render_profile, render_stage1, render_target_script};
use crate::core::lifecycle::LifecycleState;
use crate::core::model::{BootPhase, Flavor, Node};
use crate::core::registration::serves_boot;
use crate::core::validate::FieldError;

/// Entries kept before the script cache starts over; bounds memory on huge fleets.
const CACHED_SCRIPTS_MAX: usize = 200_000;

/// Target scripts as last rendered, per node. An entry is valid only for the node
/// generation and the very flavor record (same `Arc`) it was rendered from: any node
/// update bumps the generation and any flavor write replaces the record, so a stale
/// script is never served. Stores that do not cache hand out fresh flavor records, which
/// simply never hit.
///
/// Keyed by the uuid's 128-bit value: a boot storm looks a script up on every request,
/// and a tree of 10,000 uuids compared as 36-byte strings was about 800 instructions a
/// lookup (a tree, not a hash map: nothing the simulator runs may depend on a
/// per-process hash seed).
#[derive(Default)]
pub struct ScriptCache {
    entries: std::sync::Mutex<std::collections::BTreeMap<u128, CachedScript>>,
}

struct CachedScript {
    /// The store's content epoch when rendered, if the store keeps one: while it is
    /// unchanged no node or flavor was written, so the entry is valid without even
    /// looking the node up (the boot-storm fast path).
    epoch: Option<u64>,
    generation: i64,
    flavor: std::sync::Arc<Flavor>,
    script: axum::body::Bytes,
}

impl ScriptCache {
    /// The script for `uuid` if nothing was written since it was rendered.
    fn get_at_epoch(&self, uuid: &NodeUuid, epoch: u64) -> Option<axum::body::Bytes> {
        let entries = self.entries.lock().unwrap_or_else(|p| p.into_inner());
        entries
            .get(&uuid.to_u128())
            .filter(|e| e.epoch == Some(epoch))
            .map(|e| e.script.clone())
    }

    fn get(&self, node: &Node, flavor: &std::sync::Arc<Flavor>) -> Option<axum::body::Bytes> {
        let entries = self.entries.lock().unwrap_or_else(|p| p.into_inner());
        entries
            .get(&node.uuid.to_u128())
            .filter(|e| {
                e.generation == node.generation && std::sync::Arc::ptr_eq(&e.flavor, flavor)
            })
            .map(|e| e.script.clone())
    }

    fn put(
        &self,
        node: &Node,
        flavor: std::sync::Arc<Flavor>,
        script: axum::body::Bytes,
        epoch: Option<u64>,
    ) {
        let mut entries = self.entries.lock().unwrap_or_else(|p| p.into_inner());
        let key = node.uuid.to_u128();
        if entries.len() >= CACHED_SCRIPTS_MAX && !entries.contains_key(&key) {
            entries.clear();
        }
        entries.insert(
            key,
            CachedScript {
                epoch,
                generation: node.generation,
                flavor,
                script,
            },
        );
    }
}

pub fn router() -> Router<AppState> {
    Router::new()
        .route("/ipxe", get(stage1_script))
        .route("/ipxe/{uuid}", get(target_script))
        .route("/ipxe/{uuid}/register", post(register))
        .route("/ipxe/{uuid}/profile", get(profile))
        .route("/ipxe/{uuid}/detail", get(detail))
        .route("/ipxe/{uuid}/installed", post(installed))
        .route("/ipxe/{uuid}/progress", post(progress))
        .route("/ipxe/{uuid}/heartbeat", post(heartbeat))
        .route("/ipxe/{uuid}/firmware", post(firmware_report))
        .route("/images/{*path}", get(image))
}

fn ipxe_response(script: String) -> Response {
    (
        [(header::CONTENT_TYPE, "text/plain; charset=utf-8")],
        script,
    )
        .into_response()
}

async fn stage1_script(State(state): State<AppState>) -> Response {
    // The same for every machine: rendered once at start-up.
    ipxe_bytes(state.stage1_script.clone())
}

/// A retired node, or one waiting for acceptance, is served no boot files.
fn refuse_unservable(node: &Node) -> Result<(), ApiError> {
    if !serves_boot(node.state) {
        return Err(AppError::NodeRetired {
            uuid: node.uuid.clone(),
        }
        .into());
    }
    if node.pending_acceptance.is_some() {
        return Err(AppError::AwaitingAcceptance {
            uuid: node.uuid.clone(),
        }
        .into());
    }
    Ok(())
}

async fn known_node(state: &AppState, uuid: &NodeUuid) -> Result<Node, ApiError> {
    state
        .store
        .node_get(uuid)
        .await?
        .ok_or_else(|| ApiError::not_found(format!("node {uuid} is not known; register it first")))
}

/// The node's flavor, or a 409 saying why it has none to boot.
async fn node_flavor(state: &AppState, node: &Node) -> Result<std::sync::Arc<Flavor>, ApiError> {
    refuse_unservable(node)?;
    let name = node.flavor.as_deref().ok_or_else(|| {
        ApiError::conflict(
            "no_flavor",
            format!(
                "node {} has no flavor assigned; set one with `bearman node update`",
                node.uuid
            ),
        )
    })?;
    state.store.flavor_get_shared(name).await?.ok_or_else(|| {
        ApiError::conflict(
            "flavor_missing",
            format!(
                "node {} is assigned flavor {name}, which does not exist",
                node.uuid
            ),
        )
    })
}

fn profile_for(state: &AppState, flavor: &Flavor, node: &Node) -> Result<BootProfile, ApiError> {
    render_profile(flavor, node, &state.config.public_url)
        .map_err(|error| ApiError::internal(format!("flavor {}: {error}", flavor.name)))
}

async fn target_script(
    State(state): State<AppState>,
    UuidPath(uuid): UuidPath,
) -> Result<Response, ApiError> {
    // Read before anything else: a write after this point changes the epoch, so an entry
    // stored under it can never be served stale.
    let epoch = state.store.content_epoch();
    if let Some(script) = epoch.and_then(|epoch| state.scripts.get_at_epoch(&uuid, epoch)) {
        return Ok(ipxe_bytes(script));
    }
    let Some(node) = state.store.node_get_shared(&uuid).await? else {
        // A machine we have never seen: send it to stage 1 so it enlists itself.
        return Ok(ipxe_response(render_stage1(
            &state.config.stage1,
            &state.config.public_url,
            Some(&uuid),
        )));
    };
    match node.state {
        LifecycleState::Retired => {
            return Ok(ipxe_response(bearman_proto::ipxe::render_exit(&format!(
                "Bearman: node {uuid} is retired; not booting"
            ))))
        }
        LifecycleState::Discovered => {
            return Ok(ipxe_response(render_stage1(
                &state.config.stage1,
                &state.config.public_url,
                Some(&uuid),
            )))
        }
        _ => {}
    }
    let flavor = node_flavor(&state, &node).await?;
    // The hot path during a boot storm: a node already provisioning asks again (iPXE
    // retries, a second stage-1 attempt). Nothing is written then.
    let unchanged = crate::app::App::boot_started_is_noop(&node);
    let node = if unchanged {
        node
    } else {
        std::sync::Arc::new(state.app.node_boot_started(&node).await?)
    };
    let script = match state.scripts.get(&node, &flavor) {
        Some(script) => script,
        None => {
            let profile = profile_for(&state, &flavor, &node)?;
            axum::body::Bytes::from(render_target_script(&profile, &node))
        }
    };
    // Only a request that wrote nothing may vouch for the epoch it started under.
    let epoch = if unchanged { epoch } else { None };
    state.scripts.put(&node, flavor, script.clone(), epoch);
    Ok(ipxe_bytes(script))
}

/// The content type of every iPXE script, built once rather than validated per request.
const IPXE_CONTENT_TYPE: header::HeaderValue =
    header::HeaderValue::from_static("text/plain; charset=utf-8");

fn ipxe_bytes(script: axum::body::Bytes) -> Response {
    let mut response = Response::new(axum::body::Body::from(script));
    response
        .headers_mut()
        .insert(header::CONTENT_TYPE, IPXE_CONTENT_TYPE);
    response
}

/// `GET /ipxe/{uuid}` during a boot storm, answered before routing (by [`super::HttpService`]):
/// when the path is a well-formed uuid whose cached script is valid at the store's
/// current content epoch, this is exactly what [`target_script`] would send (it takes the
/// same fast path first). `None` for everything else, including every miss, which the
/// router then serves as before.
pub fn cached_target_script(
    state: &AppState,
    request: &axum::extract::Request,
) -> Option<Response> {
    if request.method() != axum::http::Method::GET {
        return None;
    }
    let raw = request.uri().path().strip_prefix("/ipxe/")?;
    // Longer paths (`…/profile`) and percent-encoded ones are the router's.
    if raw.len() != UUID_TEXT_LEN {
        return None;
    }
    let uuid = NodeUuid::parse(raw).ok()?;
    let epoch = state.store.content_epoch()?;
    let script = state.scripts.get_at_epoch(&uuid, epoch)?;
    Some(ipxe_bytes(script))
}

/// Characters in a hyphenated uuid.
const UUID_TEXT_LEN: usize = 36;

async fn register(
    State(state): State<AppState>,
    UuidPath(uuid): UuidPath,
    JsonBody(request): JsonBody<RegisterRequest>,
) -> Result<(StatusCode, Json<RegisterResponse>), ApiError> {
    let registered = state.app.node_register_hardware(&uuid, &request).await?;
    // 202: recorded, not accepted yet (the body says so too, for the agent).
    let status = if registered.awaiting_acceptance {
        StatusCode::ACCEPTED
    } else {
        StatusCode::OK
    };
    Ok((
        status,
        Json(RegisterResponse {
            uuid: uuid.to_string(),
            hostname: registered.node.hostname,
            state: registered.node.state.as_str().to_string(),
            bmc: registered.bmc,
            firmware_expected: registered.firmware_expected,
            awaiting_acceptance: registered.awaiting_acceptance,
            firmware_update: registered
                .firmware_update
                .map(|(bundle, from)| bundle.order(from, &state.config.public_url)),
            firmware_hold: registered.firmware_hold,
        }),
    ))
}

/// Stage 1's report of a firmware update it was ordered: what it does next.
async fn firmware_report(
    State(state): State<AppState>,
    UuidPath(uuid): UuidPath,
    JsonBody(report): JsonBody<bearman_proto::FirmwareReport>,
) -> Result<Json<bearman_proto::FirmwareReportAnswer>, ApiError> {
    let (answer, power_cycle) = state.app.node_firmware_report(&uuid, &report).await?;
    if let Some(node) = power_cycle {
        // Its own task: the machine's connection may close before the cycle ends (the
        // cycle cuts it), and a BMC sequence dropped half-way leaves a machine off.
        let app = state.app.clone();
        tokio::spawn(async move { app.firmware_power_cycle(&node).await });
    }
    Ok(Json(answer))
}

async fn profile(
    State(state): State<AppState>,
    UuidPath(uuid): UuidPath,
) -> Result<Json<BootProfile>, ApiError> {
    let node = known_node(&state, &uuid).await?;
    let flavor = node_flavor(&state, &node).await?;
    profile_for(&state, &flavor, &node).map(Json)
}

async fn detail(
    State(state): State<AppState>,
    UuidPath(uuid): UuidPath,
) -> Result<Json<NetworkDetail>, ApiError> {
    let node = known_node(&state, &uuid).await?;
    refuse_unservable(&node)?;
    Ok(Json(crate::core::boot::network_detail(&node)))
}

#[derive(serde::Serialize)]
struct StateReply {
    uuid: String,
    state: String,
}

async fn installed(
    State(state): State<AppState>,
    UuidPath(uuid): UuidPath,
    OptionalJson(report): OptionalJson<InstalledReport>,
) -> Result<Json<StateReply>, ApiError> {
    let node = state
        .app
        .node_installed(&uuid, report.os_release.as_deref())
        .await?;
    Ok(Json(StateReply {
        uuid: uuid.to_string(),
        state: node.state.as_str().to_string(),
    }))
}

/// `POST /ipxe/{uuid}/progress`: the stage-1 agent says its boot reached a milestone
/// only it can see (`{"phase": "stage1"}`), for the boot watchdog.
async fn progress(
    State(state): State<AppState>,
    UuidPath(uuid): UuidPath,
    JsonBody(report): JsonBody<bearman_proto::BootProgressReport>,
) -> Result<Json<StateReply>, ApiError> {
    let phase = BootPhase::parse(&report.phase).ok_or_else(|| {
        ApiError::from(AppError::InvalidField(FieldError {
            field: "phase".into(),
            problem: format!(
                "unknown boot phase {:?}; expected stage1",
                report.phase.chars().take(40).collect::<String>()
            ),
        }))
    })?;
    let node = state.app.node_boot_progress(&uuid, phase).await?;
    Ok(Json(StateReply {
        uuid: uuid.to_string(),
        // A machine's first boot: it is not known until it registers, next.
        state: node
            .map_or("unknown", |node| node.state.as_str())
            .to_string(),
    }))
}

/// The peer address is the heartbeat's source as the node record shows it; the edge puts
/// it in every request it serves, in-process test callers have none.
async fn heartbeat(
    State(state): State<AppState>,
    UuidPath(uuid): UuidPath,
    peer: Option<Extension<ConnectInfo<SocketAddr>>>,
    OptionalJson(_beat): OptionalJson<Heartbeat>,
) -> Result<Json<StateReply>, ApiError> {
    let source = peer.map(|Extension(ConnectInfo(address))| address.ip());
    let node_state = state.app.node_heartbeat(&uuid, source).await?;
    Ok(Json(StateReply {
        uuid: uuid.to_string(),
        state: node_state.as_str().to_string(),
    }))
}

async fn image(
    State(state): State<AppState>,
    Path(path): Path<String>,
) -> Result<Response, ApiError> {
    match state.images.get(&path).await {
        Ok(Some(bytes)) => {
            Ok(([(header::CONTENT_TYPE, "application/octet-stream")], bytes).into_response())
        }
        Ok(None) => Err(ApiError::not_found(format!("no image {path}"))),
        Err(crate::images::ImageError::InvalidPath(detail)) => Err(ApiError::bad_request(
            "invalid_path",
            format!("invalid image path {detail:?}"),
        )),
        Err(error) => Err(ApiError::internal(error.to_string())),
    }
}
