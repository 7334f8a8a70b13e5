//! HTTP surface: the unauthenticated network-boot endpoints (`/ipxe…`, `/images/…`), the
//! token-authenticated admin API (`/api/v1/…`), and the shared state and middleware.
//!
//! Architecture invariant: handlers hold no business rules of their own; they parse, call
//! the pure core for decisions, and persist through the `Store` trait.

pub mod admin;
pub mod auth;
pub mod boot;
pub mod error;
pub mod extract;

use std::sync::Arc;

use axum::extract::{DefaultBodyLimit, Request};
use axum::http::StatusCode;
use axum::middleware::Next;
use axum::response::Response;
use axum::Router;
use tracing::Instrument;

use crate::core::boot::Stage1Config;
use crate::core::model::{NewEvent, Node, TimestampMs};
use crate::core::registration::RegistrationDefaults;
use crate::images::ImageStore;
use crate::runtime::Clock;
use crate::store::{Store, StoreError};
use error::ApiError;

/// Default request body limit: a registration with 64 NICs and 256 disks is ~60 KiB.
pub const BODY_LIMIT_BYTES_DEFAULT: usize = 256 * 1024;

/// Settings the handlers need, fixed at start-up.
#[derive(Clone, Debug)]
pub struct ServiceConfig {
    /// Base URL nodes use to reach this daemon, e.g. `http://10.0.0.1:8080`.
    pub public_url: String,
    pub stage1: Stage1Config,
    pub defaults: RegistrationDefaults,
    pub body_limit_bytes: usize,
    /// A heartbeat younger than this counts as "the node is up" (leaving maintenance).
    pub heartbeat_fresh_ms: TimestampMs,
}

#[derive(Clone)]
pub struct AppState {
    pub store: Arc<dyn Store>,
    pub clock: Arc<dyn Clock>,
    pub images: Arc<dyn ImageStore>,
    pub config: Arc<ServiceConfig>,
    /// Rendered target scripts, so a boot storm's repeated fetches cost a lookup.
    pub scripts: Arc<boot::ScriptCache>,
    /// `GET /ipxe`'s script, which depends on configuration only.
    pub stage1_script: axum::body::Bytes,
    /// What the remediation guards said at the controller's last tick (none when no
    /// controller runs).
    pub guards: Arc<std::sync::Mutex<Option<crate::controller::GuardStatus>>>,
}

impl AppState {
    pub fn new(
        store: Arc<dyn Store>,
        clock: Arc<dyn Clock>,
        images: Arc<dyn ImageStore>,
        config: ServiceConfig,
    ) -> Self {
        let stage1_script = axum::body::Bytes::from(crate::core::boot::render_stage1(
            &config.stage1,
            &config.public_url,
            None,
        ));
        AppState {
            store,
            clock,
            images,
            stage1_script,
            config: Arc::new(config),
            scripts: Arc::default(),
            guards: Arc::default(),
        }
    }
}

/// The whole HTTP application.
pub fn router(state: AppState) -> Router {
    let body_limit = state.config.body_limit_bytes;
    Router::new()
        .merge(boot::router())
        .nest("/api/v1", admin::router(state.clone()))
        .route("/healthz", axum::routing::get(|| async { "ok\n" }))
        .fallback(|| async { ApiError::new(StatusCode::NOT_FOUND, "no_route", "no such endpoint") })
        .layer(DefaultBodyLimit::max(body_limit))
        .layer(axum::middleware::from_fn(request_span))
        .with_state(state)
}

/// One span per request, and one log line when it completes.
async fn request_span(request: Request, next: Next) -> Response {
    let span = tracing::info_span!(
        "request",
        method = %request.method(),
        path = %request.uri().path(),
    );
    async move {
        let started = tokio::time::Instant::now();
        let response = next.run(request).await;
        let status = response.status().as_u16();
        let elapsed_us = started.elapsed().as_micros() as u64;
        if status >= 500 {
            tracing::warn!(status, elapsed_us, "request failed");
        } else {
            tracing::debug!(status, elapsed_us, "request done");
        }
        response
    }
    .instrument(span)
    .await
}

/// Attempts at a read-modify-write of one node before reporting the conflict.
const NODE_WRITE_ATTEMPTS_MAX: usize = 4;

/// Reads a node, lets `decide` change it (purely), and writes it back under optimistic
/// concurrency, retrying when another writer got there first. `decide` returning no
/// events and an unchanged node means nothing to write.
pub async fn mutate_node<F>(
    state: &AppState,
    uuid: &bearman_proto::uuid::NodeUuid,
    mut decide: F,
) -> Result<Node, ApiError>
where
    F: FnMut(&mut Node) -> Result<Vec<NewEvent>, ApiError>,
{
    for _ in 0..NODE_WRITE_ATTEMPTS_MAX {
        let original = state
            .store
            .node_get(uuid)
            .await?
            .ok_or_else(|| ApiError::not_found(format!("node {uuid} is not known")))?;
        let mut node = original.clone();
        let events = decide(&mut node)?;
        if events.is_empty() && node == original {
            return Ok(original);
        }
        node.updated_at_ms = state.clock.now_ms();
        match state.store.node_update(&node, &events).await {
            Ok(updated) => return Ok(updated),
            Err(StoreError::GenerationMismatch { .. }) => continue,
            Err(error) => return Err(error.into()),
        }
    }
    Err(ApiError::conflict(
        "busy",
        format!("node {uuid} is being changed by others; retry"),
    ))
}

/// Applies a lifecycle event to `node`, returning the audit event when the state moved.
pub fn apply_event(
    node: &mut Node,
    event: crate::core::LifecycleEvent,
    now_ms: TimestampMs,
    actor: &str,
    reason: &str,
) -> Result<Option<NewEvent>, ApiError> {
    let from = node.state;
    let to = crate::core::lifecycle::transition(from, event)?;
    if from == to {
        return Ok(None);
    }
    node.state = to;
    Ok(Some(
        NewEvent::for_node(&node.uuid, now_ms, actor, event.name(), reason).with_states(from, to),
    ))
}
