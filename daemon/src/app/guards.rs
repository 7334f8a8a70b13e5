//! What the controller last said about the remediation guards, and whether it is alive:
//! the board the controller publishes to and `/healthz`, the API and the CLI read.

use std::collections::BTreeMap;
use std::sync::Mutex;

use bearman_proto::uuid::NodeUuid;
use serde::{Deserialize, Serialize};

use crate::core::model::TimestampMs;

/// What the guards currently say, for the API and the CLI.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct GuardStatus {
    pub automatic: bool,
    pub evaluated_at_ms: TimestampMs,
    pub monitored: usize,
    pub silent: usize,
    pub fleet_fencing_stopped: bool,
    pub racks_paused: Vec<String>,
    pub automatic_starts_last_minute: usize,
    pub fences_per_minute_max: u32,
    pub remediations_active: usize,
    pub remediations_active_max: usize,
    pub heartbeat_grace_ms: i64,
    pub rack_silent_fraction_max: f64,
    pub fleet_silent_fraction_max: f64,
    /// Power sync: 0 when off.
    pub power_poll_interval_ms: i64,
    pub power_polls_in_flight: usize,
    /// Monitored nodes by their last power reading (`on`, `off`, `unknown`, `none`).
    pub power_readings: BTreeMap<String, usize>,
    /// Monitored nodes whose BMC last read Off, with when.
    pub power_off: Vec<PowerOffNode>,
    /// Silent nodes confirmed dead by their BMC (fenceable without the confirm period).
    pub power_confirmed: Vec<NodeUuid>,
    /// Automatic fences not verified yet and being retried: each an alert.
    #[serde(default)]
    pub fences_unverified: Vec<crate::core::controller::FenceUnverified>,
    /// Nodes booting on their own whose boot stalled and is not being power-cycled (why
    /// not is in each): each an alert.
    #[serde(default)]
    pub boots_stalled: Vec<crate::core::controller::StalledBoot>,
    /// So many boots stalled at once that none is power-cycled.
    #[serde(default)]
    pub boot_retries_held: bool,
    pub boot_retry_automatic: bool,
}

/// A node that should be running whose BMC last read Off.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct PowerOffNode {
    pub uuid: NodeUuid,
    pub read_at_ms: TimestampMs,
    pub last_heard_at_ms: TimestampMs,
}

/// Whether the controller task is alive, as its supervisor saw it last.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "state", rename_all = "snake_case")]
pub enum ControllerLiveness {
    /// No controller in this process (tests, a daemon started without one).
    #[default]
    NotRunning,
    Running {
        since_ms: TimestampMs,
        /// Restarts after a panic so far.
        restarts: u32,
    },
    /// The task panicked and has not been restarted (yet, or ever: out of restarts).
    Down {
        since_ms: TimestampMs,
        reason: String,
        restarts: u32,
        /// Whether the supervisor will restart it.
        restarting: bool,
    },
}

impl ControllerLiveness {
    pub fn is_running(&self) -> bool {
        matches!(self, ControllerLiveness::Running { .. })
    }
}

/// The board itself: written by the controller and its supervisor, read by everyone.
#[derive(Default)]
pub struct GuardBoard {
    status: Mutex<Option<GuardStatus>>,
    liveness: Mutex<ControllerLiveness>,
}

impl GuardBoard {
    pub fn publish(&self, status: GuardStatus) {
        *self.status.lock().unwrap_or_else(|p| p.into_inner()) = Some(status);
    }

    /// The last published status; `None` before the controller's first tick.
    pub fn status(&self) -> Option<GuardStatus> {
        self.status
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
    }

    pub fn set_liveness(&self, liveness: ControllerLiveness) {
        *self.liveness.lock().unwrap_or_else(|p| p.into_inner()) = liveness;
    }

    pub fn liveness(&self) -> ControllerLiveness {
        self.liveness
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
    }
}
