//! The application layer: every operation that changes state, for every caller — the
//! HTTP handlers (`api`), the controller and the CLI. Each operation reads what it needs,
//! lets the pure core decide, and writes the result with its audit events in one store
//! transaction, returning a typed [`AppError`] that only `api::error` turns into HTTP.
//!
//! Architecture invariant: this module knows nothing of HTTP (no axum, no status codes)
//! and nothing of tokio tasks; it is called, it never runs on its own. Rules live in
//! `core`; this layer only sequences reads, decisions and writes.

pub mod cluster;
pub mod drill;
pub mod firmware;
pub mod flavors;
pub mod guards;
pub mod nodes;
pub mod pools;
pub mod power;
pub mod registration;
pub mod remediation;
pub mod saga;
pub mod sessions;
pub mod tokens;

use std::sync::Arc;

use bearman_proto::uuid::NodeUuid;

use crate::core::lifecycle::IllegalTransition;
use crate::core::model::{NewEvent, Node, TimestampMs};
use crate::core::registration::RegistrationDefaults;
use crate::core::remediation::NotStartable;
use crate::core::validate::FieldError;
use crate::runtime::Clock;
use crate::store::{Store, StoreError};

/// Who the audit trail names for requests a node makes about itself.
pub const NODE_ACTOR: &str = "node";
/// Who the audit trail names for the daemon's own actions.
pub use crate::core::model::SYSTEM_ACTOR;

/// Settings the operations need, fixed at start-up.
#[derive(Clone, Debug)]
pub struct Settings {
    pub defaults: RegistrationDefaults,
    /// Which machines that register by themselves are accepted (`core::enrollment`).
    pub enrollment: crate::core::enrollment::EnrollmentPolicy,
    /// A heartbeat younger than this counts as "the node is up" (leaving maintenance).
    pub heartbeat_fresh_ms: TimestampMs,
    /// The firmware rollout's rules (`[firmware]`).
    pub firmware: crate::core::firmware::RolloutPolicy,
}

/// The application: the store and clock every operation uses, and what the controller
/// publishes for readers. Cheap to clone.
#[derive(Clone)]
pub struct App {
    pub store: Arc<dyn Store>,
    pub clock: Arc<dyn Clock>,
    pub settings: Arc<Settings>,
    pub guards: Arc<guards::GuardBoard>,
    pub leader: Arc<cluster::LeaderBoard>,
    /// How often unauthenticated requests may write the same audit event.
    throttle: Arc<std::sync::Mutex<crate::core::event_throttle::EventThrottle>>,
    /// The way to nodes' BMCs for operator power actions; `None` in a daemon assembled
    /// without one (power actions then answer that they are unavailable).
    pub power: Option<Arc<dyn power::PowerSwitch>>,
    /// The out-of-band path chaos drills inject through; `None` without BMC access.
    pub faults: Option<Arc<dyn drill::FaultInjector>>,
    /// What a drill's twin of the fleet needs beyond the store: the controller's
    /// settings and the cloud (for VM counts).
    pub twin_sources: Option<Arc<drill::TwinSources>>,
    /// What the daemon counts for `GET /metrics`; the server assembly shares one with
    /// the BMC guards.
    pub metrics: Arc<crate::telemetry::Metrics>,
}

impl App {
    pub fn new(store: Arc<dyn Store>, clock: Arc<dyn Clock>, settings: Settings) -> Self {
        App {
            store,
            clock,
            settings: Arc::new(settings),
            guards: Arc::default(),
            leader: Arc::default(),
            throttle: Arc::default(),
            power: None,
            faults: None,
            twin_sources: None,
            metrics: Arc::default(),
        }
    }

    /// Counts `stored`, a remediation just written, as finished when it no longer is
    /// active, with the durations of its phases.
    pub(crate) fn count_if_finished(&self, stored: &crate::core::remediation::Remediation) {
        if stored.status == crate::core::remediation::Status::Active {
            return;
        }
        let phases: Vec<(&'static str, f64)> = stored
            .phase_durations_ms()
            .into_iter()
            .map(|(phase, ms)| (phase, ms as f64 / 1000.0))
            .collect();
        self.metrics
            .remediation_finished(stored.kind.as_str(), stored.status.as_str(), &phases);
    }

    /// Records what the application counts in `metrics` (shared with the BMC guards).
    pub fn with_metrics(mut self, metrics: Arc<crate::telemetry::Metrics>) -> App {
        self.metrics = metrics;
        self
    }

    /// Appends `event` unless the same `key` (a node and what it did) already wrote one
    /// within the throttle's window; repeats are counted and summarised by an
    /// `events_suppressed` event beside the next one written. For events unauthenticated
    /// requests cause, so they cannot flood the audit trail.
    pub(crate) async fn append_throttled(
        &self,
        key: &str,
        event: NewEvent,
    ) -> Result<(), AppError> {
        use crate::core::event_throttle::Verdict;
        let verdict = self
            .throttle
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .admit(key, event.at_ms);
        let Verdict::Write {
            suppressed,
            since_ms,
        } = verdict
        else {
            return Ok(());
        };
        let mut events = Vec::with_capacity(2);
        if suppressed > 0 {
            let mut summary = event.clone();
            summary.action = crate::core::model::Action::EventsSuppressed;
            summary.from_state = None;
            summary.to_state = None;
            summary.reason = format!(
                "{suppressed} more {} event(s) not written one by one since {since_ms} (at most one per {} s)",
                event.action,
                crate::core::event_throttle::WINDOW_MS_DEFAULT / 1000
            );
            events.push(summary);
        }
        events.push(event);
        self.store.event_append(&events).await?;
        Ok(())
    }
}

/// Why an operation was refused or failed. Context lives in the variants; the HTTP layer
/// maps each to a status and an error code.
#[derive(Debug, thiserror::Error)]
pub enum AppError {
    #[error("node {uuid} is not known")]
    NodeNotFound { uuid: NodeUuid },
    #[error("node {uuid} is not known; register it first")]
    NodeNotRegistered { uuid: NodeUuid },
    #[error("node {uuid} is retired")]
    NodeRetired { uuid: NodeUuid },
    #[error("remediation {id} does not exist")]
    RemediationNotFound { id: i64 },
    #[error(transparent)]
    InvalidField(#[from] FieldError),
    #[error(transparent)]
    InvalidPool(#[from] crate::core::ipam::PoolError),
    #[error(transparent)]
    IllegalTransition(#[from] IllegalTransition),
    #[error("node {uuid} is at generation {found}, not {expected}")]
    GenerationMismatch {
        uuid: NodeUuid,
        expected: i64,
        found: i64,
    },
    /// Optimistic concurrency gave up after its bounded retries.
    #[error("{what} is being changed by others; retry")]
    Busy { what: String },
    #[error("node {uuid}: {refused}")]
    RemediationRefused {
        uuid: NodeUuid,
        refused: NotStartable,
    },
    #[error("node {uuid} already has an active remediation; cancel it first")]
    RemediationActive { uuid: NodeUuid },
    #[error("remediation {id} is already {status}")]
    RemediationNotActive { id: i64, status: &'static str },
    #[error(
        "remediation {id} is in step {step}; a power-off must finish before it can be cancelled"
    )]
    RemediationNotCancellable { id: i64, step: &'static str },
    #[error("{detail}; an operator must run `bearman node accept-identity {uuid}`")]
    IdentityMismatch { uuid: NodeUuid, detail: String },
    #[error("node {uuid} waits for acceptance: it gets no addresses or boot files until an operator runs `bearman node accept {uuid}` (or an enrollment allow-list names it)")]
    AwaitingAcceptance { uuid: NodeUuid },
    #[error("node {uuid} is not waiting for acceptance")]
    NotAwaitingAcceptance { uuid: NodeUuid },
    #[error("{limit} machines already wait for acceptance (enrollment.pending_max); accept or retire some, or raise the limit")]
    EnlistmentFull { limit: usize },
    #[error("flavor {name} already exists; use PUT to replace it")]
    FlavorExists { name: String },
    #[error("node {uuid} is assigned flavor {flavor}, which does not exist")]
    FlavorMissing { uuid: NodeUuid, flavor: String },
    #[error("node {uuid} has no flavor assigned; set one with `bearman node update`")]
    NoFlavor { uuid: NodeUuid },
    #[error("node {uuid}: power action refused: {why}")]
    PowerRefused { uuid: NodeUuid, why: String },
    #[error("node {uuid} has no BMC configured; set one with `bearman node update --bmc-address`")]
    NoBmc { uuid: NodeUuid },
    #[error("node {uuid}: power {action} failed: {detail}; the node stays as it is now")]
    PowerFailed {
        uuid: NodeUuid,
        action: &'static str,
        detail: String,
    },
    #[error("this daemon was assembled without BMC access; power actions are unavailable")]
    PowerUnavailable,
    #[error("invalid or revoked token")]
    TokenInvalid,
    #[error("token {name} expired at {expired_at_ms} ms since the epoch; create a new one")]
    TokenExpired { name: String, expired_at_ms: i64 },
    #[error("invalid session or its token was revoked; log in again")]
    SessionInvalid,
    #[error("session expired; log in again")]
    SessionExpired,
    #[error("the operating system's random generator failed: {0}")]
    RandomSource(std::io::Error),
    #[error("firmware bundle {name} already exists; delete it first to replace it")]
    FirmwareBundleExists { name: String },
    #[error("firmware bundle {name} does not exist")]
    FirmwareBundleNotFound { name: String },
    #[error("the firmware rollout is already paused by {by}: {reason}")]
    RolloutPaused { by: String, reason: String },
    #[error("the firmware rollout is not paused")]
    RolloutNotPaused,
    #[error("node {uuid}: firmware report refused: {refused}")]
    FirmwareReportRefused {
        uuid: NodeUuid,
        refused: crate::core::firmware::ReportRefused,
    },
    #[error("node {uuid} has no failed firmware update to retry")]
    NoFirmwareFailures { uuid: NodeUuid },
    #[error("invalid drill: {0}")]
    DrillInvalid(String),
    #[error("drill refused: {why}")]
    DrillRefused { why: String },
    #[error("drills are blocked by {by}: {reason} (`bearman drill unblock` clears it)")]
    DrillsBlocked { by: String, reason: String },
    #[error("drills are not blocked")]
    DrillsNotBlocked,
    #[error("drill {id} does not exist")]
    DrillNotFound { id: i64 },
    #[error(transparent)]
    Store(#[from] StoreError),
}

/// Attempts at a read-modify-write of one node before reporting it busy.
pub const NODE_WRITE_ATTEMPTS_MAX: usize = 4;

impl App {
    pub fn now_ms(&self) -> TimestampMs {
        self.clock.now_ms()
    }

    /// The node, or `NodeNotFound`.
    pub async fn node(&self, uuid: &NodeUuid) -> Result<Node, AppError> {
        self.store
            .node_get(uuid)
            .await?
            .ok_or_else(|| AppError::NodeNotFound { uuid: uuid.clone() })
    }

    /// Reads a node, lets `decide` change it (purely), and writes it back with the events
    /// it returns under optimistic concurrency, deciding again with a fresh copy when
    /// another writer got there first (at most [`NODE_WRITE_ATTEMPTS_MAX`] times).
    /// `decide` returning no events and an unchanged node writes nothing.
    pub async fn mutate_node<F>(&self, uuid: &NodeUuid, mut decide: F) -> Result<Node, AppError>
    where
        F: FnMut(&mut Node) -> Result<Vec<NewEvent>, AppError>,
    {
        for _ in 0..NODE_WRITE_ATTEMPTS_MAX {
            let original = self.node(uuid).await?;
            let mut node = original.clone();
            let events = decide(&mut node)?;
            if events.is_empty() && node == original {
                return Ok(original);
            }
            node.updated_at_ms = self.clock.now_ms();
            match self.store.node_update(&node, &events).await {
                Ok(updated) => return Ok(updated),
                Err(StoreError::GenerationMismatch { .. }) => continue,
                Err(error) => return Err(error.into()),
            }
        }
        Err(AppError::Busy {
            what: format!("node {uuid}"),
        })
    }
}
