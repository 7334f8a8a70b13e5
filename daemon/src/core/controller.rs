//! The controller's decisions, pure and sans-IO (after quinn-proto): every choice the
//! daemon's loop makes, with the fleet as data and `now` passed in.
//!
//! - [`ControllerCore::poll`]: given a [`FleetView`] (what the store says, what is in
//!   flight), which Ready nodes become Suspect, which guard changes to alert on (rack
//!   paused/resumed, fleet stopped/resumed), which automatic remediations to start
//!   (eligibility by [`may_start`], the startup quiet period, the rate limit per rolling
//!   minute, the active cap), which BMC power polls are due (`core::power_sync`), which
//!   saga steps are due, and what the guard board shows. The core remembers, as plain
//!   data, what it needs between ticks: recent automatic starts, the guards' history
//!   and what was paused before.
//! - [`begin_step`]: for one due remediation, whether it stands down (an automatic one
//!   whose node spoke again before anything was done), or the attempt to persist before
//!   acting, with the lifecycle change entering the step implies.
//! - [`StepProgram`]: which BMC and cloud calls the step makes on this attempt (the
//!   soft-off skip, re-sending the hard power-off every
//!   [`POWER_OFF_RESEND_EVERY_ATTEMPTS`]th readback, off before on in a rebuild), fed
//!   each call's result, ending in an [`Outcome`].
//! - [`handle_outcome`]: what an outcome writes — the advanced remediation, the node's
//!   lifecycle change and the audit events — and, when the outcome implies an event the
//!   node's state does not allow, a failed saga naming the illegal transition with the
//!   node handed to a human (never a dropped event).
//!
//! Architecture invariant: no I/O, no tokio, no clock. `controller/` reads the store into
//! a view, carries out the [`Command`]s and [`Call`]s through the seams and the `App`, and
//! feeds the results back; it decides nothing.

use std::collections::{BTreeMap, BTreeSet, VecDeque};

use bearman_proto::uuid::NodeUuid;
use serde::{Deserialize, Serialize};

use super::health::{self, GuardHistory, HealthConfig, Judgement, NodeHealth};
use super::lifecycle::{self, IllegalTransition, LifecycleEvent, LifecycleState};
use super::model::{Action, BootPhase, BootProgress, NewEvent, Node, NodeRole, TimestampMs};
use super::power_sync::{self, PowerReading, PowerReadingState};
use super::remediation::{
    self, may_start, Limits, Outcome, Remediation, RemediationKind, Status, Step,
};
use super::validate::InvalidSetting;

/// Who the audit trail names for the controller's actions.
pub use super::model::SYSTEM_ACTOR;

/// The window of the automatic-start rate limit (`fences_per_minute_max`).
pub const START_RATE_WINDOW_MS: i64 = 60_000;

/// A verify-off readback re-sends the hard power-off on every attempt divisible by this
/// (3rd, 6th, …): a power-off can be lost (metal3 #290), and asking on every readback
/// would hammer a BMC that is merely slow.
pub const POWER_OFF_RESEND_EVERY_ATTEMPTS: u32 = 3;

/// VMs one evacuate attempt asks the cloud to move, at most; the rest (reported as still
/// on the host) are taken by the next attempt.
pub const EVACUATIONS_PER_ATTEMPT_MAX: usize = 256;

/// Calls one step attempt makes, at most: the largest program (an evacuation: list, each
/// VM, list again) plus room. The driver stops a program that asks for more.
pub const STEP_CALLS_MAX: usize = EVACUATIONS_PER_ATTEMPT_MAX + 4;

/// Evacuated VMs one `verify_evacuated` attempt checks, at most (each a status and maybe
/// one more evacuation, within [`STEP_CALLS_MAX`]); a host with more has the rest
/// reported unverified.
pub const VERIFICATIONS_PER_ATTEMPT_MAX: usize = EVACUATIONS_PER_ATTEMPT_MAX / 2;

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct ControllerConfig {
    /// Whether silent nodes are remediated automatically (operators can always act).
    pub automatic: bool,
    /// How often the controller looks at the fleet.
    pub tick_ms: u64,
    pub health: HealthConfig,
    pub limits: Limits,
    /// Automatic remediations started per rolling minute, at most.
    pub fences_per_minute_max: u32,
    /// Remediations active at once (automatic ones wait beyond this).
    pub remediations_active_max: usize,
    /// After the controller starts, it judges no one for this long: heartbeats missed
    /// while the daemon itself was down say nothing about the nodes.
    pub startup_quiet_ms: i64,
    /// Power sync: BMC power polls started per tick, at most. With the defaults (8 per
    /// 1 s tick, every 60 s) that covers 480 nodes per interval; a larger fleet is
    /// polled less often, longest overdue first, unless this is raised.
    pub power_polls_per_tick_max: usize,
    /// Power polls in flight at once, at most. Keep it below `bmc.concurrent_max` so
    /// polls stuck on hung BMCs never hold every permit fencing needs.
    pub power_polls_in_flight_max: usize,
    /// Boot watchdog for nodes booting on their own (first provisioning, or back by
    /// themselves): whether one stalled past its milestone's deadline is power-cycled
    /// into PXE again (a `boot_retry` remediation). Off: stalls are only reported.
    pub boot_retry_automatic: bool,
    /// When this many such boots are stalled at once, the cause is shared (the image,
    /// DHCP, TFTP, the network) and power-cycling would only repeat it: the stalls are
    /// reported and none is power-cycled until fewer are stalled.
    pub boot_stalls_systemic_min: usize,
    /// How often nodes booting on their own are looked at. Their deadlines are minutes
    /// (`[remediation.limits] boot_*_timeout_ms`); this bounds how late a stall is seen.
    pub boot_scan_ms: i64,
}

impl Default for ControllerConfig {
    fn default() -> Self {
        ControllerConfig {
            automatic: true,
            tick_ms: 1_000,
            health: HealthConfig::default(),
            limits: Limits::default(),
            fences_per_minute_max: 10,
            remediations_active_max: 20,
            startup_quiet_ms: 45_000,
            power_polls_per_tick_max: 8,
            power_polls_in_flight_max: 16,
            boot_retry_automatic: true,
            boot_stalls_systemic_min: 5,
            boot_scan_ms: 15_000,
        }
    }
}

impl ControllerConfig {
    /// Rejects impossible settings; the message names the key under `[remediation]`.
    pub fn validate(&self) -> Result<(), InvalidSetting> {
        self.health.validate()?;
        self.limits.validate()?;
        let check = InvalidSetting::check_range::<i64>;
        let count = InvalidSetting::check_range::<usize>;
        check("tick_ms", self.tick_ms as i64, 10..=3_600_000, "")?;
        InvalidSetting::check_range(
            "fences_per_minute_max",
            self.fences_per_minute_max,
            1..=10_000,
            "set automatic = false to start none",
        )?;
        count(
            "remediations_active_max",
            self.remediations_active_max,
            1..=100_000,
            "",
        )?;
        check(
            "startup_quiet_ms",
            self.startup_quiet_ms,
            0..=86_400_000,
            "",
        )?;
        count(
            "power_polls_per_tick_max",
            self.power_polls_per_tick_max,
            1..=10_000,
            "",
        )?;
        count(
            "power_polls_in_flight_max",
            self.power_polls_in_flight_max,
            1..=10_000,
            "",
        )?;
        count(
            "boot_stalls_systemic_min",
            self.boot_stalls_systemic_min,
            1..=100_000,
            "set boot_retry_automatic = false to power-cycle none",
        )?;
        check("boot_scan_ms", self.boot_scan_ms, 1_000..=3_600_000, "")?;
        Ok(())
    }
}

/// What the driver read for one tick: the store's view of the fleet and what this
/// process has in flight.
#[derive(Clone, Debug, Default)]
pub struct FleetView {
    /// Health records of the monitored nodes (`Store::node_health_list`).
    pub nodes: Vec<NodeHealth>,
    /// Every active remediation.
    pub active: Vec<Remediation>,
    /// Nodes with a power poll in flight.
    pub polls_in_flight: BTreeSet<NodeUuid>,
    /// Remediations with a step in flight.
    pub steps_running: BTreeSet<i64>,
    /// Nodes booting (Registered or Provisioning; `Store::node_booting_list`), read only
    /// on the ticks [`ControllerCore::boot_scan_due`] asks for; `None` on the others.
    pub booting: Option<Vec<BootingNode>>,
}

/// What the boot watchdog needs of a node that is booting.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct BootingNode {
    pub uuid: NodeUuid,
    pub rack: Option<String>,
    pub state: LifecycleState,
    pub boot: Option<BootProgress>,
    /// Whether the node has a BMC address to power-cycle it through.
    pub bmc_configured: bool,
}

impl BootingNode {
    pub fn of(node: &Node) -> Self {
        BootingNode {
            uuid: node.uuid.clone(),
            rack: node.rack.clone(),
            state: node.state,
            boot: node.boot,
            bmc_configured: bmc_address_configured(node.bmc.address.as_deref()),
        }
    }
}

/// Whether a node's BMC address is one to power-cycle it through (set, not blank).
pub fn bmc_address_configured(address: Option<&str>) -> bool {
    address.is_some_and(|address| !address.trim().is_empty())
}

/// A node booting on its own, with no remediation on it, stuck at a boot milestone past
/// that milestone's deadline (the guard board's alert list).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct StalledBoot {
    pub uuid: NodeUuid,
    pub state: LifecycleState,
    pub phase: BootPhase,
    /// When the node reached `phase`.
    pub since_ms: TimestampMs,
    pub deadline_ms: i64,
    /// Why it is not being power-cycled, while something holds that.
    pub held: Option<String>,
}

/// What the core asks the driver to do, in order.
// A handful per tick, each moved once: boxing the large ones buys nothing.
#[allow(clippy::large_enum_variant)]
#[derive(Clone, Debug, PartialEq)]
pub enum Command {
    /// Mark a Ready node that went silent Suspect (`App::node_mark_suspect`).
    MarkSuspect { uuid: NodeUuid, grace_s: i64 },
    /// Record a guard change in the audit trail (and log it).
    Alert(GuardAlert),
    /// Create this automatic remediation with its event; then tell the core
    /// ([`ControllerCore::handle_started`]).
    StartAutomatic {
        remediation: Remediation,
        event: NewEvent,
    },
    /// Ask the node's BMC for its power state and record the reading; `before` is the
    /// reading it replaces.
    PollPower {
        uuid: NodeUuid,
        before: Option<PowerReading>,
    },
    /// Run the current step of this remediation once.
    RunStep { id: i64 },
    /// Show this on the guard board.
    Publish(GuardReport),
}

/// A guard that began or ended holding automatic fencing.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum GuardAlert {
    RackPaused {
        rack: String,
        silent: usize,
        monitored: usize,
    },
    RackResumed {
        rack: String,
    },
    FleetStopped {
        silent: usize,
        monitored: usize,
    },
    FleetResumed,
    /// The boot watchdog found a node booting on its own stalled (once per milestone it
    /// stalls at); `held` says why it is not power-cycled, `None` if it is.
    BootStalled {
        stall: StalledBoot,
        stuck_ms: i64,
    },
    /// So many boots stalled at once that none is power-cycled.
    BootRetriesHeld {
        stalled: usize,
    },
    BootRetriesResumed,
}

impl GuardAlert {
    /// The audit event for this alert.
    pub fn event(&self, now_ms: TimestampMs) -> NewEvent {
        let (action, reason) = match self {
            GuardAlert::RackPaused {
                rack,
                silent,
                monitored,
            } => (
                Action::RackFencingPaused,
                format!(
                    "{silent} of {monitored} nodes in rack {rack:?} silent: suspecting the switch, not the nodes"
                ),
            ),
            GuardAlert::RackResumed { rack } => (
                Action::RackFencingResumed,
                format!("rack {rack:?} heard again"),
            ),
            GuardAlert::FleetStopped { silent, monitored } => (
                Action::FleetFencingStopped,
                format!(
                    "{silent} of {monitored} nodes silent: suspecting our own network, fencing nobody"
                ),
            ),
            GuardAlert::FleetResumed => {
                (Action::FleetFencingResumed, "fleet heard again".to_string())
            }
            GuardAlert::BootStalled { stall, stuck_ms } => {
                let action = match &stall.held {
                    None => "power-cycling it into PXE (boot retry)".to_string(),
                    Some(why) => format!("not power-cycled: {why}"),
                };
                return NewEvent::for_node(
                    &stall.uuid,
                    now_ms,
                    SYSTEM_ACTOR,
                    Action::BootStalled,
                    format!(
                        "boot stalled: {} for {} s (deadline {} s) while {}, no remediation on it; {action}",
                        stall.phase.as_str(),
                        stuck_ms / 1000,
                        stall.deadline_ms / 1000,
                        stall.state
                    ),
                );
            }
            GuardAlert::BootRetriesHeld { stalled } => (
                Action::BootRetriesHeld,
                format!(
                    "{stalled} boots stalled at once: suspecting the image, DHCP or the network, power-cycling none"
                ),
            ),
            GuardAlert::BootRetriesResumed => (
                Action::BootRetriesResumed,
                "fewer boots stalled: boot retries resumed".to_string(),
            ),
        };
        NewEvent::global(now_ms, SYSTEM_ACTOR, action, reason)
    }
}

/// What the guard board shows after a tick (the driver adds the configured limits).
#[derive(Clone, Debug, Default, PartialEq)]
pub struct GuardReport {
    pub evaluated_at_ms: TimestampMs,
    pub monitored: usize,
    pub silent: usize,
    pub fleet_fencing_stopped: bool,
    pub racks_paused: Vec<String>,
    pub automatic_starts_last_minute: usize,
    /// Active remediations, counting those this tick starts.
    pub remediations_active: usize,
    /// Power polls in flight, counting those this tick starts.
    pub power_polls_in_flight: usize,
    /// Monitored nodes by their last power reading (`on`, `off`, `unknown`, `none`).
    pub power_readings: BTreeMap<String, usize>,
    /// Monitored nodes whose BMC last read Off: (uuid, read at, last heard at).
    pub power_off: Vec<(NodeUuid, TimestampMs, TimestampMs)>,
    pub power_confirmed: Vec<NodeUuid>,
    /// Automatic fences that could not be verified and are being retried (the alert).
    pub fences_unverified: Vec<FenceUnverified>,
    /// Nodes booting on their own whose boot stalled, as of the last boot scan.
    pub boots_stalled: Vec<StalledBoot>,
    /// Too many boots stalled at once: none is power-cycled.
    pub boot_retries_held: bool,
}

/// A fence being retried: whose, since when, how many rounds, and the next one.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct FenceUnverified {
    pub uuid: NodeUuid,
    pub remediation_id: i64,
    pub since_ms: TimestampMs,
    pub retries: u32,
    pub next_attempt_at_ms: TimestampMs,
    pub last_error: Option<String>,
}

/// What a controller remembers between ticks that its successor (another replica taking
/// the lease) must not start without: the guards' hold, which guards were tripped (so
/// they are not alerted again), and the rate limit's window. Saved with each lease
/// renewal.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct ControllerMemory {
    pub guard_history: GuardHistory,
    pub racks_paused: BTreeSet<String>,
    pub fleet_stopped: bool,
    pub recent_starts: Vec<TimestampMs>,
}

/// The rack pauses and fleet stop as of the last tick, for noticing changes.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
struct GuardsSeen {
    fleet_stopped: bool,
    racks_paused: BTreeSet<String>,
}

/// The controller's memory between ticks and the decisions made with it.
#[derive(Clone, Debug)]
pub struct ControllerCore {
    config: ControllerConfig,
    started_at_ms: TimestampMs,
    /// When automatic remediations were started, within the rate window.
    recent_starts: VecDeque<TimestampMs>,
    guard_history: GuardHistory,
    guards_seen: GuardsSeen,
    boot_watch: BootWatch,
}

/// The boot watchdog's memory: when it last looked, what it found, what it reported.
#[derive(Clone, Debug, Default)]
struct BootWatch {
    last_scan_ms: Option<TimestampMs>,
    stalled: Vec<StalledBoot>,
    /// The milestone (phase, reached at) each stalled node was reported at: one event
    /// per stall, not one per scan.
    reported: BTreeMap<NodeUuid, (BootPhase, TimestampMs)>,
    retries_held: bool,
}

impl ControllerCore {
    /// A core for a controller started at `started_at_ms` (the quiet period runs from it).
    pub fn new(config: ControllerConfig, started_at_ms: TimestampMs) -> Self {
        ControllerCore {
            config,
            started_at_ms,
            recent_starts: VecDeque::new(),
            guard_history: GuardHistory::default(),
            guards_seen: GuardsSeen::default(),
            boot_watch: BootWatch::default(),
        }
    }

    /// What a successor must start from (see [`ControllerMemory`]).
    pub fn memory(&self) -> ControllerMemory {
        ControllerMemory {
            guard_history: self.guard_history.clone(),
            racks_paused: self.guards_seen.racks_paused.clone(),
            fleet_stopped: self.guards_seen.fleet_stopped,
            recent_starts: self.recent_starts.iter().copied().collect(),
        }
    }

    /// Starts from a predecessor's memory: a rack it held paused stays held for the rest
    /// of its hold, and its automatic starts still count against the rate limit.
    pub fn restore(&mut self, memory: ControllerMemory) {
        self.guard_history = memory.guard_history;
        self.guards_seen = GuardsSeen {
            fleet_stopped: memory.fleet_stopped,
            racks_paused: memory.racks_paused,
        };
        self.recent_starts = memory.recent_starts.into_iter().collect();
    }

    /// Whether this tick should read the booting nodes (`FleetView::booting`).
    pub fn boot_scan_due(&self, now_ms: TimestampMs) -> bool {
        self.boot_watch
            .last_scan_ms
            .is_none_or(|at| now_ms - at >= self.config.boot_scan_ms)
    }

    pub fn config(&self) -> &ControllerConfig {
        &self.config
    }

    /// One look at the fleet at `now_ms`: everything the driver should do this tick, in
    /// the order to do it (suspects, alerts, starts, power polls, the guard board, steps).
    pub fn poll(&mut self, now_ms: TimestampMs, view: &FleetView) -> Vec<Command> {
        let mut commands = Vec::new();
        let mut judgement = health::judge(
            &view.nodes,
            now_ms,
            &self.config.health,
            &self.guard_history,
        );
        self.guard_history.record(&judgement, now_ms);
        if now_ms - self.started_at_ms < self.config.startup_quiet_ms {
            // Just (re)started: silence measured across our own downtime proves nothing.
            judgement.newly_silent.clear();
            judgement.fenceable.clear();
            judgement.power_confirmed.clear();
        }
        let grace_s = self.config.health.heartbeat_grace_ms / 1000;
        commands.extend(
            judgement
                .newly_silent
                .iter()
                .map(|uuid| Command::MarkSuspect {
                    uuid: uuid.clone(),
                    grace_s,
                }),
        );
        commands.extend(
            self.guard_alerts(&judgement)
                .into_iter()
                .map(Command::Alert),
        );
        self.prune_starts(now_ms);
        let mut started: Vec<(Remediation, String)> = if self.config.automatic {
            self.automatic_starts(now_ms, &judgement, view)
                .into_iter()
                .map(|remediation| {
                    let reason = if judgement.power_confirmed.contains(&remediation.node_uuid) {
                        "automatic: node silent, BMC reads power off"
                    } else {
                        "automatic: node silent"
                    };
                    (remediation, reason.to_string())
                })
                .collect()
        } else {
            Vec::new()
        };
        let mut busy: BTreeSet<NodeUuid> = view
            .active
            .iter()
            .chain(started.iter().map(|(r, _)| r))
            .map(|r| r.node_uuid.clone())
            .collect();
        if let Some(booting) = &view.booting {
            let active = view.active.len() + started.len();
            let (alerts, retries) = self.watch_boots(now_ms, booting, &judgement, &busy, active);
            commands.extend(alerts.into_iter().map(Command::Alert));
            busy.extend(retries.iter().map(|(r, _)| r.node_uuid.clone()));
            started.extend(retries);
        }
        let started_count = started.len();
        for (remediation, reason) in started {
            let event = NewEvent::for_node(
                &remediation.node_uuid,
                now_ms,
                SYSTEM_ACTOR,
                Action::RemediationStarted,
                reason,
            );
            commands.push(Command::StartAutomatic { remediation, event });
        }
        let polls = self.due_polls(now_ms, view, &busy);
        let polls_count = polls.len();
        commands.extend(polls);
        commands.push(Command::Publish(self.report(
            now_ms,
            &judgement,
            view,
            view.active.len() + started_count,
            view.polls_in_flight.len() + polls_count,
        )));
        commands.extend(
            view.active
                .iter()
                .filter(|r| is_due(r, now_ms) && !view.steps_running.contains(&r.id))
                .map(|r| Command::RunStep { id: r.id }),
        );
        commands
    }

    /// The driver created `created` (from a [`Command::StartAutomatic`]): its first step
    /// runs this tick when it is due.
    pub fn handle_started(&self, now_ms: TimestampMs, created: &Remediation) -> Option<Command> {
        is_due(created, now_ms).then_some(Command::RunStep { id: created.id })
    }

    /// Automatic starts in the last [`START_RATE_WINDOW_MS`] as of the last poll.
    pub fn starts_last_minute(&self) -> usize {
        self.recent_starts.len()
    }

    fn prune_starts(&mut self, now_ms: TimestampMs) {
        while self
            .recent_starts
            .front()
            .is_some_and(|at| now_ms - at >= START_RATE_WINDOW_MS)
        {
            self.recent_starts.pop_front();
        }
    }

    fn guard_alerts(&mut self, judgement: &Judgement) -> Vec<GuardAlert> {
        let now = GuardsSeen {
            fleet_stopped: judgement.fleet_fencing_stopped,
            racks_paused: judgement
                .racks
                .iter()
                .filter(|(_, r)| r.fencing_paused)
                .map(|(name, _)| name.clone())
                .collect(),
        };
        let before = &self.guards_seen;
        let mut alerts = Vec::new();
        for rack in now.racks_paused.difference(&before.racks_paused) {
            let health = &judgement.racks[rack];
            alerts.push(GuardAlert::RackPaused {
                rack: rack.clone(),
                silent: health.silent,
                monitored: health.monitored,
            });
        }
        for rack in before.racks_paused.difference(&now.racks_paused) {
            alerts.push(GuardAlert::RackResumed { rack: rack.clone() });
        }
        if now.fleet_stopped != before.fleet_stopped {
            alerts.push(if now.fleet_stopped {
                GuardAlert::FleetStopped {
                    silent: judgement.silent,
                    monitored: judgement.monitored,
                }
            } else {
                GuardAlert::FleetResumed
            });
        }
        self.guards_seen = now;
        alerts
    }

    /// The automatic remediations to start now, recording each start for the rate limit.
    fn automatic_starts(
        &mut self,
        now_ms: TimestampMs,
        judgement: &Judgement,
        view: &FleetView,
    ) -> Vec<Remediation> {
        let busy: BTreeSet<&NodeUuid> = view.active.iter().map(|r| &r.node_uuid).collect();
        let states: BTreeMap<&NodeUuid, LifecycleState> =
            view.nodes.iter().map(|n| (&n.uuid, n.state)).collect();
        let mut active = view.active.len();
        let mut started = Vec::new();
        for uuid in &judgement.fenceable {
            if busy.contains(uuid) {
                continue;
            }
            // Only nodes the judgement watches and we may take automatically; a node in
            // maintenance (a human holds it) or mid-saga is never touched.
            let Some(state) = states.get(uuid) else {
                continue;
            };
            if may_start(RemediationKind::Automatic, *state).is_err() {
                continue;
            }
            if active >= self.config.remediations_active_max {
                break;
            }
            if self.recent_starts.len() >= self.config.fences_per_minute_max as usize {
                break;
            }
            self.recent_starts.push_back(now_ms);
            active += 1;
            let reason = if judgement.power_confirmed.contains(uuid) {
                "node silent and its BMC reads power off; BMC fence, evacuate, rebuild"
            } else {
                "node silent; BMC fence, evacuate, rebuild"
            };
            started.push(Remediation::new(
                uuid.clone(),
                RemediationKind::Automatic,
                SYSTEM_ACTOR,
                reason,
                now_ms,
            ));
        }
        started
    }

    /// The boot watchdog for nodes booting on their own (no remediation on them, not
    /// `busy`): which are stalled past their milestone's deadline, the alerts that
    /// implies (each stall once, the systemic hold's changes), and the boot retries to
    /// start, counted against the same active cap and rate limit as fences. A stall is
    /// measured from the later of the milestone and this controller's start: time the
    /// daemon itself was down (when the node could not fetch anything) proves nothing.
    fn watch_boots(
        &mut self,
        now_ms: TimestampMs,
        booting: &[BootingNode],
        judgement: &Judgement,
        busy: &BTreeSet<NodeUuid>,
        mut active: usize,
    ) -> (Vec<GuardAlert>, Vec<(Remediation, String)>) {
        use LifecycleState as S;
        let config = &self.config;
        let stalled: Vec<(&BootingNode, BootProgress, i64, i64)> = booting
            .iter()
            .filter(|node| matches!(node.state, S::Registered | S::Provisioning))
            .filter(|node| !busy.contains(&node.uuid))
            .filter_map(|node| {
                let boot = node.boot?;
                let since_ms = boot.at_ms.max(self.started_at_ms);
                let (stuck_ms, deadline_ms) =
                    past_deadline(now_ms, boot, since_ms, &config.limits)?;
                Some((node, boot, stuck_ms, deadline_ms))
            })
            .collect();
        let stalled_count = stalled.len();
        let systemic = stalled_count >= config.boot_stalls_systemic_min;
        let mut alerts = Vec::new();
        if systemic != self.boot_watch.retries_held {
            alerts.push(if systemic {
                GuardAlert::BootRetriesHeld {
                    stalled: stalled_count,
                }
            } else {
                GuardAlert::BootRetriesResumed
            });
        }
        let mut retries = Vec::new();
        let mut board = Vec::new();
        let mut reported = BTreeMap::new();
        for (node, boot, stuck_ms, deadline_ms) in stalled {
            let rack_paused = node.rack.as_ref().filter(|rack| {
                judgement
                    .racks
                    .get(*rack)
                    .is_some_and(|health| health.fencing_paused)
            });
            let held = if !config.automatic || !config.boot_retry_automatic {
                Some("automatic boot retries are off".to_string())
            } else if systemic {
                Some(format!(
                    "{} boots stalled at once (boot_stalls_systemic_min {}): suspecting what they share",
                    stalled_count, config.boot_stalls_systemic_min
                ))
            } else if judgement.fleet_fencing_stopped {
                Some("most of the fleet is silent: suspecting our own network".to_string())
            } else if let Some(rack) = rack_paused {
                Some(format!("rack {rack:?} is silent: suspecting its switch"))
            } else if !node.bmc_configured {
                Some("it has no BMC address to power-cycle it through".to_string())
            } else if active >= config.remediations_active_max
                || self.recent_starts.len() >= config.fences_per_minute_max as usize
            {
                Some(
                    "waiting for room under remediations_active_max / fences_per_minute_max"
                        .to_string(),
                )
            } else {
                None
            };
            if held.is_none() {
                self.recent_starts.push_back(now_ms);
                active += 1;
                let reason = format!(
                    "automatic: boot stalled at {} for {} s; power-cycle into PXE",
                    boot.phase.as_str(),
                    stuck_ms / 1000
                );
                retries.push((
                    Remediation::new(
                        node.uuid.clone(),
                        RemediationKind::BootRetry,
                        SYSTEM_ACTOR,
                        &reason,
                        now_ms,
                    ),
                    reason,
                ));
            }
            let stall = StalledBoot {
                uuid: node.uuid.clone(),
                state: node.state,
                phase: boot.phase,
                since_ms: boot.at_ms,
                deadline_ms,
                held,
            };
            let milestone = (boot.phase, boot.at_ms);
            if self.boot_watch.reported.get(&node.uuid) != Some(&milestone) {
                alerts.push(GuardAlert::BootStalled {
                    stall: stall.clone(),
                    stuck_ms,
                });
            }
            reported.insert(node.uuid.clone(), milestone);
            // One being power-cycled shows as its remediation from now on.
            if stall.held.is_some() {
                board.push(stall);
            }
        }
        self.boot_watch = BootWatch {
            last_scan_ms: Some(now_ms),
            stalled: board,
            reported,
            retries_held: systemic,
        };
        (alerts, retries)
    }

    /// Power polls due now: not for nodes with a poll in flight or an active remediation
    /// (the saga reads the BMC itself, and a BMC takes one call at a time), bounded per
    /// tick and in flight.
    fn due_polls(
        &self,
        now_ms: TimestampMs,
        view: &FleetView,
        busy: &BTreeSet<NodeUuid>,
    ) -> Vec<Command> {
        if self.config.health.power_poll_interval_ms <= 0 {
            return Vec::new();
        }
        let room = self
            .config
            .power_polls_in_flight_max
            .saturating_sub(view.polls_in_flight.len())
            .min(self.config.power_polls_per_tick_max);
        if room == 0 {
            return Vec::new();
        }
        power_sync::due_polls(&view.nodes, now_ms, &self.config.health, room, |uuid| {
            view.polls_in_flight.contains(uuid) || busy.contains(uuid)
        })
        .into_iter()
        .map(|node| Command::PollPower {
            uuid: node.uuid.clone(),
            before: node.power.clone(),
        })
        .collect()
    }

    fn report(
        &self,
        now_ms: TimestampMs,
        judgement: &Judgement,
        view: &FleetView,
        remediations_active: usize,
        power_polls_in_flight: usize,
    ) -> GuardReport {
        // Counted under borrowed names, copied once per name: not a string per node.
        let mut readings: BTreeMap<&str, usize> = BTreeMap::new();
        let mut power_off = Vec::new();
        for node in &view.nodes {
            let state = node.power.as_ref().map_or("none", |p| p.state.as_str());
            *readings.entry(state).or_default() += 1;
            if let Some(reading) = node
                .power
                .as_ref()
                .filter(|p| p.state == PowerReadingState::Off)
            {
                power_off.push((node.uuid.clone(), reading.read_at_ms, node.last_heard_at_ms));
            }
        }
        let power_readings = readings
            .into_iter()
            .map(|(state, count)| (state.to_string(), count))
            .collect();
        GuardReport {
            evaluated_at_ms: now_ms,
            monitored: judgement.monitored,
            silent: judgement.silent,
            fleet_fencing_stopped: judgement.fleet_fencing_stopped,
            racks_paused: self.guards_seen.racks_paused.iter().cloned().collect(),
            automatic_starts_last_minute: self.recent_starts.len(),
            remediations_active,
            power_polls_in_flight,
            power_readings,
            power_off,
            power_confirmed: judgement.power_confirmed.clone(),
            fences_unverified: view
                .active
                .iter()
                .filter_map(|r| {
                    Some(FenceUnverified {
                        uuid: r.node_uuid.clone(),
                        remediation_id: r.id,
                        since_ms: r.fence_unverified_at_ms?,
                        retries: r.fence_retries,
                        next_attempt_at_ms: r.next_attempt_at_ms,
                        last_error: r.last_error.clone(),
                    })
                })
                .filter(|f| {
                    view.active
                        .iter()
                        .any(|r| r.id == f.remediation_id && r.fenced_at_ms.is_none())
                })
                .collect(),
            boots_stalled: self.boot_watch.stalled.clone(),
            boot_retries_held: self.boot_watch.retries_held,
        }
    }
}

/// Whether `remediation` has a step to run at `now_ms`.
fn is_due(remediation: &Remediation, now_ms: TimestampMs) -> bool {
    remediation.step().is_some() && remediation.next_attempt_at_ms <= now_ms
}

/// What to do about a due remediation before acting.
#[derive(Clone, Debug, PartialEq)]
pub enum StepStart {
    /// Not active, or not due yet: nothing to do.
    Idle,
    /// An automatic remediation whose node spoke again before anything was done stands
    /// down: it was a blip, not a death. Write the cancelled record with its event.
    StandDown {
        cancelled: Remediation,
        event: NewEvent,
    },
    /// Persist this attempt (and the node, when entering the step moved it) before
    /// acting, so a crash mid-step resumes here and the attempt budget holds.
    Attempt {
        attempt: Remediation,
        node: Option<Node>,
        audit: Vec<NewEvent>,
    },
    /// Entering the step implies a lifecycle event the node's state does not allow: the
    /// saga fails before acting (see [`handle_outcome`]).
    Refused(OutcomeWrite),
}

/// Decides what to do about `remediation` (its node as read now) before acting.
pub fn begin_step(now_ms: TimestampMs, remediation: &Remediation, node: &Node) -> StepStart {
    let Some(step) = remediation.step() else {
        return StepStart::Idle;
    };
    if remediation.next_attempt_at_ms > now_ms {
        return StepStart::Idle;
    }
    let id = remediation.id;
    if let Some(why) = stand_down_reason(remediation, node) {
        let mut cancelled = remediation.clone();
        cancelled.status = Status::Cancelled;
        cancelled.finished_at_ms = Some(now_ms);
        cancelled.updated_at_ms = now_ms;
        let event = NewEvent::for_node(
            &node.uuid,
            now_ms,
            SYSTEM_ACTOR,
            Action::RemediationCancelled,
            format!("remediation {id}: {why}"),
        );
        return StepStart::StandDown { cancelled, event };
    }
    let mut attempt = remediation.clone();
    attempt.attempts += 1;
    attempt.updated_at_ms = now_ms;
    let entering = if remediation.attempts == 0 {
        remediation::entering(step, node.state)
    } else {
        vec![]
    };
    let why = format!(
        "remediation {id} ({}) step {}",
        remediation.kind.as_str(),
        step.as_str()
    );
    match apply_saga_events(node, &entering, now_ms, &why) {
        Ok((mut after, mut audit)) => {
            after.updated_at_ms = now_ms;
            let node = (!audit.is_empty()).then_some(after);
            if remediation.attempts == 0 {
                audit.push(NewEvent::for_node(
                    &remediation.node_uuid,
                    now_ms,
                    SYSTEM_ACTOR,
                    Action::RemediationStep,
                    why,
                ));
            }
            StepStart::Attempt {
                attempt,
                node,
                audit,
            }
        }
        Err(illegal) => StepStart::Refused(fail_illegal(
            now_ms,
            remediation,
            node,
            illegal,
            &format!("entering {}", step.as_str()),
        )),
    }
}

/// Why an automatic remediation stands down before its next attempt, if it does:
/// - before anything was done, its node spoke again (a blip, not a death);
/// - between fence retry rounds (nothing evacuated, the fence never verified), its node
///   came back by itself (heartbeating, or booting: registered or provisioning), or an
///   operator took it into maintenance, which stops the retries;
/// - a boot retry, before its power-cycle, finds its node no longer booting or its boot
///   past the milestone it stalled at (the watchdog reads booting nodes every
///   `boot_scan_ms`, so its view may be that old).
fn stand_down_reason(remediation: &Remediation, node: &Node) -> Option<String> {
    use LifecycleState as S;
    if remediation.kind == RemediationKind::BootRetry
        && remediation.step_index == 0
        && remediation.attempts == 0
        && remediation.rebuilds == 0
    {
        if !matches!(node.state, S::Registered | S::Provisioning) {
            return Some(format!(
                "node is {} now, no longer booting: no power-cycle",
                node.state
            ));
        }
        if let Some(boot) = node.boot.filter(|b| b.at_ms > remediation.created_at_ms) {
            return Some(format!(
                "node's boot moved on ({}) before the power-cycle",
                boot.phase.as_str()
            ));
        }
        return None;
    }
    if remediation.kind != RemediationKind::Automatic || remediation.attempts != 0 {
        return None;
    }
    if remediation.step_index == 0 && node.state == S::Ready {
        return Some("node heartbeating again before the fence".into());
    }
    if !remediation.awaiting_fence_retry() {
        return None;
    }
    match node.state {
        S::Ready | S::Registered | S::Provisioning => Some(format!(
            "node {} again while its fence retry was pending (nothing was evacuated): fence retries stopped",
            if node.state == S::Ready { "heartbeating" } else { "booting" }
        )),
        S::Maintenance => Some(format!(
            "node put in maintenance{}: fence retries stopped",
            node.maintenance
                .as_ref()
                .map(|hold| format!(" by {}", hold.by))
                .unwrap_or_default()
        )),
        _ => None,
    }
}

/// One call a step makes through a seam.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Call {
    /// BMC: ask the OS to shut down cleanly (ACPI).
    PowerOffSoft,
    /// BMC: hard power-off.
    PowerOff,
    PowerOn,
    /// BMC: read the power state.
    PowerState,
    SetNextBootPxe,
    /// Cloud: mark the host's compute service forced-down.
    ForceDown {
        host: String,
    },
    /// Cloud: the VMs on a host.
    VmsOnHost {
        host: String,
    },
    /// Cloud: move one VM away.
    Evacuate {
        vm: String,
    },
    /// Cloud: where one VM is and what it is doing.
    VmStatus {
        vm: String,
    },
}

/// What a [`Call`] returned.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum CallResult {
    /// Accepted.
    Done,
    /// The BMC's power reading.
    Power {
        on: bool,
    },
    Vms(Vec<String>),
    /// Where the cloud has a VM (`None`: nowhere) and its status (Nova's `ACTIVE`, …).
    VmStatus {
        host: Option<String>,
        status: String,
    },
    /// The cloud still considers the host's compute service up (Nova's
    /// `ComputeServiceInUse`); the text is the error.
    ServiceInUse(String),
    /// Refused, timed out, unreachable, or no BMC/cloud to ask: the error.
    Failed(String),
}

/// What a [`StepProgram`] wants next.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Next {
    Call(Call),
    Finish(Outcome),
}

#[derive(Clone, Debug, PartialEq, Eq)]
enum Stage {
    Start,
    SoftOffAsked,
    PowerOffAsked,
    OffResent,
    ReadBack,
    ForceDownAsked,
    VmsListed,
    Evacuating {
        vms: Vec<String>,
        next: usize,
        problems: Vec<String>,
    },
    VmsRelisted {
        problems: Vec<String>,
    },
    /// Verifying evacuated VMs: the status of `to_verify[next - 1]` was asked for.
    VerifyStatus {
        next: usize,
        pending: Vec<String>,
    },
    /// A VM found still on the node was evacuated again.
    VerifyReEvacuated {
        next: usize,
        pending: Vec<String>,
    },
    PxeSet,
    RebuildRead,
    RebuildOnAsked,
    RebuildOffAsked,
    Finished,
}

/// The calls one attempt at one step makes, decided call by call from the results: the
/// driver calls [`StepProgram::next`] with `None` first, then with each call's result,
/// until it says [`Next::Finish`]. Every step is idempotent.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct StepProgram {
    step: Step,
    /// This attempt's number (1 for the first), as persisted before acting.
    attempt: u32,
    host: String,
    /// Whether the step has a cloud to call: one is configured and the node runs VMs.
    cloud: bool,
    node_state: LifecycleState,
    soft_off_grace_ms: i64,
    /// AwaitReady: the boot milestone the node is stuck at past its deadline, if it is.
    boot_stall: Option<String>,
    /// AwaitReady: the node applies a firmware update until this deadline.
    flashing_until_ms: Option<TimestampMs>,
    /// VerifyEvacuated: the VMs this remediation evacuated, to check.
    to_verify: Vec<String>,
    /// VMs the cloud accepted to evacuate during this attempt.
    evacuated: Vec<String>,
    stage: Stage,
}

impl StepProgram {
    /// The program for `attempt`'s current step on `node` (as written with the attempt);
    /// `cloud_configured` says whether a hypervisor API is there to call.
    pub fn new(
        now_ms: TimestampMs,
        attempt: &Remediation,
        node: &Node,
        cloud_configured: bool,
        limits: &Limits,
    ) -> Option<StepProgram> {
        let mut to_verify = attempt.vms_evacuated.clone();
        to_verify.truncate(VERIFICATIONS_PER_ATTEMPT_MAX);
        Some(StepProgram {
            boot_stall: boot_stall(now_ms, attempt, node, limits),
            flashing_until_ms: node
                .boot
                .filter(|boot| boot.phase == BootPhase::Firmware)
                .and_then(|boot| boot.until_ms)
                .filter(|until_ms| *until_ms > now_ms),
            to_verify,
            evacuated: Vec::new(),
            step: attempt.step()?,
            attempt: attempt.attempts,
            host: node.hostname.clone(),
            // No hypervisor API, or no VMs by role: nothing to force down or move.
            cloud: cloud_configured && node.role == NodeRole::Compute,
            node_state: node.state,
            soft_off_grace_ms: limits.soft_off_grace_ms,
            stage: Stage::Start,
        })
    }

    pub fn step(&self) -> Step {
        self.step
    }

    /// Adds the VMs the cloud accepted to evacuate during this attempt to `attempt`'s
    /// record (once each), for `verify_evacuated`; call before recording the outcome.
    pub fn record_evacuated(&self, attempt: &mut Remediation) {
        for vm in &self.evacuated {
            if !attempt.vms_evacuated.contains(vm) {
                attempt.vms_evacuated.push(vm.clone());
            }
        }
    }

    /// The next VM to verify after `next - 1`, or the outcome when all were asked.
    fn verify_next(&mut self, next: usize, pending: Vec<String>) -> (Stage, Next) {
        match self.to_verify.get(next).cloned() {
            Some(vm) => (
                Stage::VerifyStatus {
                    next: next + 1,
                    pending,
                },
                Next::Call(Call::VmStatus { vm }),
            ),
            None if pending.is_empty() => (Stage::Finished, Next::Finish(Outcome::Done)),
            None => {
                let shown: Vec<&str> = pending.iter().take(10).map(String::as_str).collect();
                (
                    Stage::Finished,
                    Next::Finish(Outcome::NotYet(format!(
                        "{} evacuated VM(s) not running elsewhere yet: {}{}",
                        pending.len(),
                        shown.join("; "),
                        if pending.len() > shown.len() {
                            "; …"
                        } else {
                            ""
                        }
                    ))),
                )
            }
        }
    }

    /// The next call, given the last one's result (`None` to begin).
    pub fn next(&mut self, last: Option<CallResult>) -> Next {
        use CallResult as R;
        use Next::{Call as Do, Finish};
        let done = || Finish(Outcome::Done);
        let stage = std::mem::replace(&mut self.stage, Stage::Finished);
        let (stage, next) = match (stage, last) {
            (Stage::Start, None) => self.first(),
            // Best effort: a BMC that fails here gets the hard power-off next anyway.
            (Stage::SoftOffAsked, Some(R::Done)) => (
                Stage::Finished,
                Finish(Outcome::NotYet(
                    "clean shutdown requested; waiting before the hard power-off".into(),
                )),
            ),
            (Stage::SoftOffAsked, Some(_)) => (Stage::Finished, done()),
            (Stage::PowerOffAsked | Stage::ForceDownAsked | Stage::RebuildOnAsked, Some(R::Done)) => {
                (Stage::Finished, done())
            }
            // The re-sent power-off is a nudge; only the readback counts.
            (Stage::OffResent, Some(_)) => (Stage::ReadBack, Do(Call::PowerState)),
            (Stage::ReadBack, Some(R::Power { on: false })) => (Stage::Finished, done()),
            (Stage::ReadBack, Some(R::Power { on: true })) => (
                Stage::Finished,
                Finish(Outcome::NotYet("BMC still reports power on".into())),
            ),
            (Stage::VmsListed, Some(R::Vms(vms))) if vms.is_empty() => (Stage::Finished, done()),
            (Stage::VmsListed, Some(R::Vms(mut vms))) => {
                vms.truncate(EVACUATIONS_PER_ATTEMPT_MAX);
                let first = vms[0].clone();
                (
                    Stage::Evacuating {
                        vms,
                        next: 1,
                        problems: Vec::new(),
                    },
                    Do(Call::Evacuate { vm: first }),
                )
            }
            (
                Stage::Evacuating {
                    vms,
                    next,
                    mut problems,
                },
                Some(result),
            ) => match result {
                R::ServiceInUse(_) => (
                    Stage::Finished,
                    Finish(Outcome::NotYet(format!(
                        "cloud still considers {}'s compute service up",
                        self.host
                    ))),
                ),
                R::Done | R::Failed(_) => {
                    match result {
                        R::Failed(error) => problems.push(format!("{}: {error}", vms[next - 1])),
                        _ => self.evacuated.push(vms[next - 1].clone()),
                    }
                    match vms.get(next).cloned() {
                        Some(vm) => (
                            Stage::Evacuating {
                                vms,
                                next: next + 1,
                                problems,
                            },
                            Do(Call::Evacuate { vm }),
                        ),
                        None => (
                            Stage::VmsRelisted { problems },
                            Do(Call::VmsOnHost {
                                host: self.host.clone(),
                            }),
                        ),
                    }
                }
                other => (
                    Stage::Finished,
                    Finish(Outcome::Failed(format!(
                        "step evacuate got {other:?} for an evacuation: the driver does not follow the program"
                    ))),
                ),
            },
            (Stage::VmsRelisted { .. }, Some(R::Vms(left))) if left.is_empty() => {
                (Stage::Finished, done())
            }
            (Stage::VmsRelisted { problems }, Some(R::Vms(left))) => (
                Stage::Finished,
                Finish(Outcome::NotYet(format!(
                    "{} VM(s) still on {}{}",
                    left.len(),
                    self.host,
                    if problems.is_empty() {
                        String::new()
                    } else {
                        format!(": {}", problems.join("; "))
                    }
                ))),
            ),
            (Stage::VerifyStatus { next, mut pending }, Some(result)) => {
                let vm = self.to_verify[next - 1].clone();
                match result {
                    R::VmStatus { host, status }
                        if status.eq_ignore_ascii_case("ACTIVE")
                            && host.as_deref().is_some_and(|h| h != self.host) =>
                    {
                        self.verify_next(next, pending)
                    }
                    // Still on the node: the evacuation was lost; ask again.
                    R::VmStatus { host, status } if host.as_deref() == Some(&self.host) => {
                        pending.push(format!("{vm} {status} still on {}: evacuated again", self.host));
                        (
                            Stage::VerifyReEvacuated { next, pending },
                            Do(Call::Evacuate { vm }),
                        )
                    }
                    R::VmStatus { host, status } => {
                        pending.push(format!(
                            "{vm} {status} on {}",
                            host.as_deref().unwrap_or("no host")
                        ));
                        self.verify_next(next, pending)
                    }
                    R::Failed(error) => {
                        pending.push(format!("{vm}: {error}"));
                        self.verify_next(next, pending)
                    }
                    other => (
                        Stage::Finished,
                        Finish(Outcome::Failed(format!(
                            "step verify_evacuated got {other:?} for a status: the driver does not follow the program"
                        ))),
                    ),
                }
            }
            (Stage::VerifyReEvacuated { next, mut pending }, Some(result)) => {
                let vm = &self.to_verify[next - 1];
                match result {
                    R::Done => {}
                    R::Failed(error) | R::ServiceInUse(error) => {
                        pending.push(format!("{vm}: evacuating again: {error}"))
                    }
                    other => pending.push(format!("{vm}: evacuating again: {other:?}")),
                }
                self.verify_next(next, pending)
            }
            (Stage::PxeSet, Some(R::Done)) => (Stage::RebuildRead, Do(Call::PowerState)),
            (Stage::RebuildRead, Some(R::Power { on: false })) => {
                (Stage::RebuildOnAsked, Do(Call::PowerOn))
            }
            // A rebuild retry finds the machine on but stuck (it never came back):
            // power-on alone would do nothing, so make sure it is off first.
            (Stage::RebuildRead, Some(R::Power { on: true })) => {
                (Stage::RebuildOffAsked, Do(Call::PowerOff))
            }
            (Stage::RebuildOffAsked, Some(R::Done)) => (
                Stage::Finished,
                Finish(Outcome::NotYet(
                    "powering off before the rebuild power-on".into(),
                )),
            ),
            (_, Some(R::Failed(error) | R::ServiceInUse(error))) => {
                (Stage::Finished, Finish(Outcome::Failed(error)))
            }
            (stage, last) => (
                Stage::Finished,
                Finish(Outcome::Failed(format!(
                    "step {} got {last:?} in {stage:?}: the driver does not follow the program",
                    self.step.as_str()
                ))),
            ),
        };
        self.stage = stage;
        next
    }

    fn first(&self) -> (Stage, Next) {
        use Next::{Call as Do, Finish};
        match self.step {
            Step::SoftOff => {
                // One ask per saga: a retry (after a crash, say) goes straight on.
                if self.soft_off_grace_ms <= 0 || self.attempt > 1 {
                    (Stage::Finished, Finish(Outcome::Done))
                } else {
                    (Stage::SoftOffAsked, Do(Call::PowerOffSoft))
                }
            }
            Step::PowerOff => (Stage::PowerOffAsked, Do(Call::PowerOff)),
            Step::VerifyOff => {
                if self.attempt.is_multiple_of(POWER_OFF_RESEND_EVERY_ATTEMPTS) {
                    (Stage::OffResent, Do(Call::PowerOff))
                } else {
                    (Stage::ReadBack, Do(Call::PowerState))
                }
            }
            Step::ForceDown if self.cloud => (
                Stage::ForceDownAsked,
                Do(Call::ForceDown {
                    host: self.host.clone(),
                }),
            ),
            Step::Evacuate if self.cloud => (
                Stage::VmsListed,
                Do(Call::VmsOnHost {
                    host: self.host.clone(),
                }),
            ),
            Step::VerifyEvacuated if self.cloud && !self.to_verify.is_empty() => {
                let vm = self.to_verify[0].clone();
                (
                    Stage::VerifyStatus {
                        next: 1,
                        pending: Vec::new(),
                    },
                    Do(Call::VmStatus { vm }),
                )
            }
            Step::ForceDown | Step::Evacuate | Step::VerifyEvacuated | Step::Maintenance => {
                (Stage::Finished, Finish(Outcome::Done))
            }
            Step::Rebuild => (Stage::PxeSet, Do(Call::SetNextBootPxe)),
            Step::AwaitReady => (
                Stage::Finished,
                Finish(if self.node_state == LifecycleState::Ready {
                    Outcome::Done
                } else if let Some(until_ms) = self.flashing_until_ms {
                    Outcome::Flashing(format!(
                        "node is {} and applying a firmware update (deadline {until_ms} ms)",
                        self.node_state
                    ))
                } else if let Some(stall) = &self.boot_stall {
                    Outcome::Stalled(stall.clone())
                } else {
                    Outcome::NotYet(format!("node is {}", self.node_state))
                }),
            ),
        }
    }
}

/// The boot watchdog: for a rebuild awaiting its node, the milestone the node has been
/// stuck at for longer than that milestone's deadline (`Limits::boot_phase_timeout_ms`),
/// in words. Only milestones reached since this rebuild's power-on count (an older one
/// belongs to a boot before it).
fn boot_stall(
    now_ms: TimestampMs,
    attempt: &Remediation,
    node: &Node,
    limits: &Limits,
) -> Option<String> {
    if attempt.step() != Some(Step::AwaitReady) || node.state == LifecycleState::Ready {
        return None;
    }
    let boot = node.boot?;
    if boot.at_ms < attempt.step_started_at_ms {
        return None;
    }
    let (stuck_ms, deadline) = past_deadline(now_ms, boot, boot.at_ms, limits)?;
    Some(format!(
        "boot stalled: {} for {} s (deadline {} s)",
        boot.phase.as_str(),
        stuck_ms / 1000,
        deadline / 1000
    ))
}

/// How long a boot has been at `phase` (counted from `since_ms`) and that milestone's
/// deadline, when it is past it; `None` while within it, or for a milestone without one.
fn past_deadline(
    now_ms: TimestampMs,
    boot: BootProgress,
    since_ms: TimestampMs,
    limits: &Limits,
) -> Option<(i64, i64)> {
    // A milestone with a deadline of its own (a firmware update) is judged by it alone.
    let deadline = match boot.until_ms {
        Some(until_ms) => until_ms - since_ms,
        None => limits.boot_phase_timeout_ms(boot.phase)?,
    };
    let stuck_ms = now_ms - since_ms;
    (stuck_ms >= deadline).then_some((stuck_ms, deadline))
}

/// What recording an outcome writes, in one transaction.
#[derive(Clone, Debug, PartialEq)]
pub struct OutcomeWrite {
    pub remediation: Remediation,
    /// The node, when its lifecycle state moves.
    pub node: Option<Node>,
    pub audit: Vec<NewEvent>,
    /// A line for the log.
    pub note: String,
    /// The lifecycle event the outcome implied but the node's state did not allow; the
    /// saga then fails (see [`handle_outcome`]).
    pub illegal: Option<IllegalTransition>,
}

/// What `outcome` of `attempt` (as persisted before acting) writes, for `node` as read
/// now: the advanced remediation with the lifecycle events it implies and its audit
/// events. When those events do not fit the node's state, the saga fails loudly instead:
/// see [`fail_illegal`].
pub fn handle_outcome(
    now_ms: TimestampMs,
    attempt: &Remediation,
    outcome: &Outcome,
    node: &Node,
    limits: &Limits,
) -> OutcomeWrite {
    let advance = remediation::advance(attempt, outcome, now_ms, limits);
    let (mut next, mut audit) =
        match apply_saga_events(node, &advance.node_events, now_ms, &advance.note) {
            Ok(applied) => applied,
            Err(illegal) => return fail_illegal(now_ms, attempt, node, illegal, &advance.note),
        };
    next.updated_at_ms = now_ms;
    // The rebuild's power-on starts the boot watchdog's clock.
    let powered_on = attempt.step() == Some(Step::Rebuild) && matches!(outcome, Outcome::Done);
    if powered_on {
        next.boot = Some(BootProgress {
            phase: BootPhase::PoweredOn,
            at_ms: now_ms,
            until_ms: None,
        });
    }
    let node_write = (!audit.is_empty() || powered_on).then_some(next);
    let gave_up_verifying = attempt.step() == Some(Step::VerifyEvacuated)
        && !matches!(outcome, Outcome::Done)
        && advance.remediation.step_index > attempt.step_index;
    let alert = if advance.remediation.fence_retries > attempt.fence_retries {
        Some(Action::FenceRetryScheduled)
    } else if gave_up_verifying {
        Some(Action::EvacuationUnverified)
    } else if matches!(outcome, Outcome::Stalled(_)) {
        Some(Action::BootStalled)
    } else {
        None
    };
    if let Some(action) = alert {
        audit.push(NewEvent::for_node(
            &node.uuid,
            now_ms,
            SYSTEM_ACTOR,
            action,
            format!("remediation {}: {}", attempt.id, advance.note),
        ));
    }
    let status = advance.remediation.status;
    if matches!(outcome, Outcome::Done) || status != Status::Active {
        let action = match status {
            Status::Active => Action::RemediationProgress,
            Status::Done => Action::RemediationDone,
            Status::Failed => Action::RemediationFailed,
            Status::Cancelled => Action::RemediationCancelled,
        };
        audit.push(NewEvent::for_node(
            &node.uuid,
            now_ms,
            SYSTEM_ACTOR,
            action,
            format!("remediation {}: {}", attempt.id, advance.note),
        ));
    }
    OutcomeWrite {
        remediation: advance.remediation,
        node: node_write,
        audit,
        note: advance.note,
        illegal: None,
    }
}

/// Applies a saga's lifecycle `events` to a copy of `node`, in order: all of them or, at
/// the first illegal one, none. An event whose result the node already shows (it is in
/// the state the event leads to, from a state the event leaves) counts as applied: a
/// step run twice (a replay after a crash between acting and recording) finds its first
/// run's events there, e.g. FenceVerified on a Fenced node.
fn apply_saga_events(
    node: &Node,
    events: &[LifecycleEvent],
    now_ms: TimestampMs,
    reason: &str,
) -> Result<(Node, Vec<NewEvent>), IllegalTransition> {
    let mut next = node.clone();
    let mut audit = Vec::new();
    for event in events {
        match lifecycle::apply_event(&mut next, *event, now_ms, SYSTEM_ACTOR, reason) {
            Ok(moved) => audit.extend(moved),
            Err(_) if already_applied(next.state, *event) => {}
            Err(illegal) => return Err(illegal),
        }
    }
    Ok((next, audit))
}

/// Whether `state` is where `event` leads from some other state.
fn already_applied(state: LifecycleState, event: LifecycleEvent) -> bool {
    LifecycleState::ALL
        .into_iter()
        .any(|from| from != state && lifecycle::transition(from, event) == Ok(state))
}

/// The saga `remediation` met a lifecycle event its node's state does not allow
/// (`illegal`, while doing `what`): it ends Failed with an event naming the transition,
/// and the node goes to Maintenance with the reason. A node mid-fence first records
/// FenceFailed (Maintenance is not allowed during a fence); a retired node is left as it
/// is; either way the event says where the node was left.
pub fn fail_illegal(
    now_ms: TimestampMs,
    remediation: &Remediation,
    node: &Node,
    illegal: IllegalTransition,
    what: &str,
) -> OutcomeWrite {
    let id = remediation.id;
    let reason = format!("remediation {id} failed: {what}: {illegal}");
    let mut events = Vec::new();
    let mut state = node.state;
    if state == LifecycleState::Fencing {
        if let Ok(next) = lifecycle::transition(state, LifecycleEvent::FenceFailed) {
            events.push(LifecycleEvent::FenceFailed);
            state = next;
        }
    }
    if let Ok(next) = lifecycle::transition(state, LifecycleEvent::MaintenanceOn) {
        events.push(LifecycleEvent::MaintenanceOn);
        state = next;
    }
    let (mut next, mut audit) =
        lifecycle::apply_events(node, &events, now_ms, SYSTEM_ACTOR, &reason)
            .expect("every event was checked against the state it applies to");
    let left = if state == LifecycleState::Maintenance {
        "node to maintenance".to_string()
    } else {
        format!("node left {state}: no lifecycle event takes it to maintenance")
    };
    next.updated_at_ms = now_ms;
    let mut failed = remediation.clone();
    failed.status = Status::Failed;
    failed.finished_at_ms = Some(now_ms);
    failed.updated_at_ms = now_ms;
    failed.last_error = Some(format!("{what}: {illegal}"));
    let note = format!("{reason}; {left}");
    audit.push(NewEvent::for_node(
        &node.uuid,
        now_ms,
        SYSTEM_ACTOR,
        Action::RemediationFailed,
        note.clone(),
    ));
    OutcomeWrite {
        remediation: failed,
        node: (next.state != node.state).then_some(next),
        audit,
        note,
        illegal: Some(illegal),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::core::power_sync::PowerReading;

    fn uuid(index: u64) -> NodeUuid {
        NodeUuid::from_index(4, index)
    }

    fn health(index: u64, rack: &str, heard_ms: i64) -> NodeHealth {
        NodeHealth {
            uuid: uuid(index),
            rack: Some(rack.into()),
            state: LifecycleState::Ready,
            last_heard_at_ms: heard_ms,
            power: None,
        }
    }

    /// A fleet of `racks` racks of `per_rack` Ready nodes, all heard at `heard_ms`.
    fn fleet(racks: u64, per_rack: u64, heard_ms: i64) -> Vec<NodeHealth> {
        (0..racks * per_rack)
            .map(|i| health(i, &format!("r{}", i / per_rack), heard_ms))
            .collect()
    }

    fn config() -> ControllerConfig {
        ControllerConfig {
            startup_quiet_ms: 0,
            ..Default::default()
        }
    }

    /// A command in words, for tables: `suspect 3`, `alert rack_fencing_paused`,
    /// `start 3`, `poll 3`, `step 7` (the guard board is left out).
    fn describe(command: &Command) -> Option<String> {
        let index = |uuid: &NodeUuid| {
            (0..1_000)
                .find(|i| uuid == &self::uuid(*i))
                .map_or(uuid.to_string(), |i| i.to_string())
        };
        Some(match command {
            Command::MarkSuspect { uuid, .. } => format!("suspect {}", index(uuid)),
            Command::Alert(alert) => format!("alert {}", alert.event(0).action),
            Command::StartAutomatic { remediation, .. }
                if remediation.kind == RemediationKind::BootRetry =>
            {
                format!("boot_retry {}", index(&remediation.node_uuid))
            }
            Command::StartAutomatic { remediation, .. } => {
                format!("start {}", index(&remediation.node_uuid))
            }
            Command::PollPower { uuid, .. } => format!("poll {}", index(uuid)),
            Command::RunStep { id } => format!("step {id}"),
            Command::Publish(_) => return None,
        })
    }

    /// One poll of `core` at `now` over `view`: the commands, in words, must be `expect`.
    fn check(core: &mut ControllerCore, now: i64, view: &FleetView, expect: &[&str]) {
        let got: Vec<String> = core.poll(now, view).iter().filter_map(describe).collect();
        assert_eq!(got, expect, "at {now}");
    }

    fn no_polls(mut config: ControllerConfig) -> ControllerConfig {
        config.health.power_poll_interval_ms = 0;
        config
    }

    fn active(id: i64, node: u64, due_ms: i64) -> Remediation {
        let mut remediation = Remediation::new(
            uuid(node),
            RemediationKind::Automatic,
            SYSTEM_ACTOR,
            "test",
            due_ms,
        );
        remediation.id = id;
        remediation
    }

    const T: i64 = 10_000_000;

    #[test]
    fn poll_table() {
        let health = HealthConfig::default();
        let dead = T - health.heartbeat_grace_ms - health.fence_confirm_ms - 1;
        let late = T - health.heartbeat_grace_ms - 1;
        // Everyone heard: nothing to do.
        let view = FleetView {
            nodes: fleet(2, 10, T),
            ..Default::default()
        };
        check(
            &mut ControllerCore::new(no_polls(config()), 0),
            T,
            &view,
            &[],
        );

        // A freshly silent node is suspected, not yet fenced.
        let mut view = FleetView {
            nodes: fleet(2, 10, T),
            ..Default::default()
        };
        view.nodes[3].last_heard_at_ms = late;
        check(
            &mut ControllerCore::new(no_polls(config()), 0),
            T,
            &view,
            &["suspect 3"],
        );

        // Silent past the confirmation: suspected and started.
        view.nodes[3].last_heard_at_ms = dead;
        check(
            &mut ControllerCore::new(no_polls(config()), 0),
            T,
            &view,
            &["suspect 3", "start 3"],
        );
        // ... unless automatic remediation is off.
        let off = ControllerConfig {
            automatic: false,
            ..no_polls(config())
        };
        check(&mut ControllerCore::new(off, 0), T, &view, &["suspect 3"]);
        // ... or the controller just started (quiet period).
        let quiet = ControllerConfig {
            startup_quiet_ms: 45_000,
            ..no_polls(config())
        };
        check(&mut ControllerCore::new(quiet, T - 44_999), T, &view, &[]);
        check(
            &mut ControllerCore::new(
                ControllerConfig {
                    startup_quiet_ms: 45_000,
                    ..no_polls(config())
                },
                T - 45_000,
            ),
            T,
            &view,
            &["suspect 3", "start 3"],
        );

        // Already Suspect: started, not suspected again.
        view.nodes[3].state = LifecycleState::Suspect;
        check(
            &mut ControllerCore::new(no_polls(config()), 0),
            T,
            &view,
            &["start 3"],
        );
        // An active remediation on the node: not started again; its step runs when due,
        // unless one is already running.
        view.active = vec![active(7, 3, T)];
        check(
            &mut ControllerCore::new(no_polls(config()), 0),
            T,
            &view,
            &["step 7"],
        );
        view.active = vec![active(7, 3, T + 1)];
        check(
            &mut ControllerCore::new(no_polls(config()), 0),
            T,
            &view,
            &[],
        );
        view.active = vec![active(7, 3, T)];
        view.steps_running.insert(7);
        check(
            &mut ControllerCore::new(no_polls(config()), 0),
            T,
            &view,
            &[],
        );
    }

    #[test]
    fn automatic_starts_respect_eligibility_the_cap_and_the_rate_limit() {
        let health = HealthConfig::default();
        let dead = T - health.heartbeat_grace_ms - health.fence_confirm_ms - 1;
        // Three lone deaths in three big racks.
        let mut view = FleetView {
            nodes: fleet(3, 10, T),
            ..Default::default()
        };
        for index in [0, 10, 20] {
            view.nodes[index as usize].last_heard_at_ms = dead;
            view.nodes[index as usize].state = LifecycleState::Suspect;
        }
        // Maintenance is never taken automatically (may_start), even when silent.
        let mut held = view.clone();
        held.nodes[10].state = LifecycleState::Maintenance;
        check(
            &mut ControllerCore::new(no_polls(config()), 0),
            T,
            &held,
            &["start 0", "start 20"],
        );
        // The active cap counts what is already active.
        let capped = ControllerConfig {
            remediations_active_max: 2,
            ..no_polls(config())
        };
        let mut busy = view.clone();
        busy.active = vec![active(1, 5, T + 1_000)];
        check(&mut ControllerCore::new(capped, 0), T, &busy, &["start 0"]);
        // The rate limit holds for a rolling minute, then lets the rest go.
        let rated = ControllerConfig {
            fences_per_minute_max: 2,
            ..no_polls(config())
        };
        let mut core = ControllerCore::new(rated, 0);
        check(&mut core, T, &view, &["start 0", "start 10"]);
        assert_eq!(core.starts_last_minute(), 2);
        let mut later = view.clone();
        later.active = vec![active(1, 0, T + 100_000), active(2, 10, T + 100_000)];
        for node in later
            .nodes
            .iter_mut()
            .filter(|n| n.state == LifecycleState::Ready)
        {
            node.last_heard_at_ms = T + START_RATE_WINDOW_MS;
        }
        check(&mut core, T + START_RATE_WINDOW_MS - 1, &later, &[]);
        check(&mut core, T + START_RATE_WINDOW_MS, &later, &["start 20"]);
        assert_eq!(core.starts_last_minute(), 1);
    }

    #[test]
    fn guard_changes_are_alerted_once_each_way() {
        let health = HealthConfig::default();
        let silent = T - health.heartbeat_grace_ms - 1;
        let mut core = ControllerCore::new(no_polls(config()), 0);
        let mut view = FleetView {
            nodes: fleet(3, 10, T),
            ..Default::default()
        };
        // Rack r1's switch dies: every r1 node is suspected, the rack paused, no start.
        for node in view
            .nodes
            .iter_mut()
            .filter(|n| n.rack.as_deref() == Some("r1"))
        {
            node.last_heard_at_ms = silent - health.fence_confirm_ms;
        }
        let suspects: Vec<String> = (10..20).map(|i| format!("suspect {i}")).collect();
        let mut expect: Vec<&str> = suspects.iter().map(String::as_str).collect();
        expect.push("alert rack_fencing_paused");
        check(&mut core, T, &view, &expect);
        // Still paused: no second alert (the nodes are Suspect by now).
        for node in view
            .nodes
            .iter_mut()
            .filter(|n| n.rack.as_deref() == Some("r1"))
        {
            node.state = LifecycleState::Suspect;
        }
        check(&mut core, T + 1_000, &view, &[]);
        // Heard again: the pause holds for pause_hold_ms, then resumes once.
        for node in view.nodes.iter_mut() {
            node.last_heard_at_ms = T + 2_000;
            node.state = LifecycleState::Ready;
        }
        check(&mut core, T + 2_000, &view, &[]);
        let resumed = T + 1_000 + health.pause_hold_ms;
        for node in view.nodes.iter_mut() {
            node.last_heard_at_ms = resumed;
        }
        check(&mut core, resumed, &view, &["alert rack_fencing_resumed"]);
        check(&mut core, resumed + 1_000, &view, &[]);

        // Most of the fleet silent (racks too small for the rack guard): the fleet stops,
        // then resumes.
        let mut core = ControllerCore::new(no_polls(config()), 0);
        let mut view = FleetView {
            nodes: fleet(2, 3, T),
            ..Default::default()
        };
        for node in view.nodes.iter_mut().take(4) {
            node.last_heard_at_ms = silent;
            node.state = LifecycleState::Suspect;
        }
        check(&mut core, T, &view, &["alert fleet_fencing_stopped"]);
        let healed = T + health.pause_hold_ms;
        for node in view.nodes.iter_mut() {
            node.last_heard_at_ms = healed;
            node.state = LifecycleState::Ready;
        }
        check(&mut core, healed, &view, &["alert fleet_fencing_resumed"]);
    }

    #[test]
    fn power_polls_are_bounded_and_skip_busy_nodes() {
        let interval = HealthConfig::default().power_poll_interval_ms;
        let last_read = Some(PowerReading::known(PowerReadingState::On, T - interval));
        let mut view = FleetView {
            nodes: fleet(1, 12, T),
            ..Default::default()
        };
        for node in &mut view.nodes {
            node.power = last_read.clone();
        }
        let polls = |commands: &[Command]| -> Vec<NodeUuid> {
            commands
                .iter()
                .filter_map(|c| match c {
                    Command::PollPower { uuid, .. } => Some(uuid.clone()),
                    _ => None,
                })
                .collect()
        };
        let config = ControllerConfig {
            power_polls_per_tick_max: 8,
            power_polls_in_flight_max: 10,
            ..config()
        };
        let mut core = ControllerCore::new(config, 0);
        assert_eq!(polls(&core.poll(T, &view)).len(), 8, "per tick");
        view.polls_in_flight = (0..8).map(uuid).collect();
        view.active = vec![active(1, 9, T + 1_000)];
        let second = polls(&core.poll(T, &view));
        assert_eq!(second.len(), 2, "in flight: {second:?}");
        assert!(second
            .iter()
            .all(|u| !view.polls_in_flight.contains(u) && *u != uuid(9)));
        // The reading a poll replaces goes with it; the board counts the new polls.
        let commands = core.poll(
            T,
            &FleetView {
                polls_in_flight: BTreeSet::new(),
                ..view.clone()
            },
        );
        assert!(commands.iter().any(|c| matches!(c,
            Command::PollPower { before, .. } if *before == last_read)));
        let Some(Command::Publish(report)) =
            commands.iter().find(|c| matches!(c, Command::Publish(_)))
        else {
            panic!("no guard report")
        };
        assert_eq!(report.power_polls_in_flight, 8);
        assert_eq!(report.power_readings["on"], 12);
        assert_eq!(report.remediations_active, 1);
    }

    #[test]
    fn a_started_remediation_runs_its_first_step_at_once() {
        let core = ControllerCore::new(config(), 0);
        let mut created = active(5, 1, T);
        assert_eq!(
            core.handle_started(T, &created),
            Some(Command::RunStep { id: 5 })
        );
        created.next_attempt_at_ms = T + 1;
        assert_eq!(core.handle_started(T, &created), None);
    }

    fn node(state: LifecycleState) -> Node {
        let mut node = Node::new(uuid(1), "cn1".into(), NodeRole::Compute, 0);
        node.state = state;
        node
    }

    fn at_step(kind: RemediationKind, step: Step, attempts: u32) -> Remediation {
        let mut remediation = Remediation::new(uuid(1), kind, SYSTEM_ACTOR, "test", T);
        remediation.id = 9;
        remediation.step_index = remediation.plan.iter().position(|s| *s == step).unwrap();
        remediation.attempts = attempts;
        remediation
    }

    /// One row of the begin table: a remediation of `kind` at `step` after `attempts`,
    /// its node in `state`. `expect`: `idle`, `stand down`, `refused`, or `attempt` with
    /// the node's state after entering the step.
    fn check_begin(
        kind: RemediationKind,
        step: Step,
        attempts: u32,
        state: LifecycleState,
        expect: &str,
    ) {
        let remediation = at_step(kind, step, attempts);
        let got = match begin_step(T, &remediation, &node(state)) {
            StepStart::Idle => "idle".to_string(),
            StepStart::StandDown { cancelled, .. } => {
                assert_eq!(cancelled.status, Status::Cancelled);
                "stand down".to_string()
            }
            StepStart::Attempt { attempt, node, .. } => {
                assert_eq!(attempt.attempts, attempts + 1);
                format!("attempt {}", node.map_or(state, |n| n.state))
            }
            StepStart::Refused(_) => "refused".to_string(),
        };
        assert_eq!(got, expect, "{kind:?} {step:?} after {attempts} in {state}");
    }

    #[test]
    fn begin_table() {
        use LifecycleState::*;
        use RemediationKind::*;
        // An automatic fence whose node spoke again before anything was done stands down.
        check_begin(Automatic, Step::SoftOff, 0, Ready, "stand down");
        // ... not once it acted, not an operator's, not a node still silent.
        check_begin(Automatic, Step::SoftOff, 1, Ready, "attempt ready");
        check_begin(Fence, Step::SoftOff, 0, Ready, "attempt fencing");
        check_begin(Automatic, Step::SoftOff, 0, Suspect, "attempt fencing");
        check_begin(Automatic, Step::Rebuild, 0, Fenced, "attempt rebuilding");
        check_begin(Automatic, Step::VerifyOff, 4, Fencing, "attempt fencing");
        let mut later = at_step(Fence, Step::PowerOff, 1);
        later.next_attempt_at_ms = T + 1;
        assert_eq!(begin_step(T, &later, &node(Fencing)), StepStart::Idle);
    }

    /// Runs `program` against `answers` (one per call, in order) and checks the calls it
    /// made and how it ended.
    fn check_program(
        step: Step,
        attempt: u32,
        cloud: bool,
        answers: &[CallResult],
        expect_calls: &[Call],
        expect: Outcome,
    ) {
        let remediation = at_step(RemediationKind::Automatic, step, attempt);
        let node = node(LifecycleState::Fencing);
        let program = StepProgram::new(0, &remediation, &node, cloud, &Limits::default()).unwrap();
        let (calls, outcome) = run_program(program, answers);
        assert_eq!(calls, expect_calls, "{step:?} attempt {attempt}");
        assert_eq!(outcome, expect, "{step:?} attempt {attempt}");
    }

    /// Runs `program` to its outcome, answering its calls with `answers` in order (all of
    /// them must be used); the calls it made and the outcome.
    fn run_program(mut program: StepProgram, answers: &[CallResult]) -> (Vec<Call>, Outcome) {
        let mut answers = answers.iter().cloned();
        let mut calls = Vec::new();
        let mut last = None;
        let outcome = loop {
            match program.next(last.take()) {
                Next::Call(call) => {
                    calls.push(call);
                    last = Some(answers.next().expect("an answer for every call"));
                }
                Next::Finish(outcome) => break outcome,
            }
        };
        assert_eq!(answers.next(), None, "answers left over");
        (calls, outcome)
    }

    #[test]
    fn step_program_table() {
        use Call::*;
        use CallResult as R;
        let on = R::Power { on: true };
        let off = R::Power { on: false };
        let failed = || R::Failed("bmc timed out".into());
        let not_yet = |s: &str| Outcome::NotYet(s.into());
        let fail = || Outcome::Failed("bmc timed out".into());
        // Soft off: asked once per saga; a failure is no reason to wait.
        let asked = "clean shutdown requested; waiting before the hard power-off";
        check_program(
            Step::SoftOff,
            1,
            true,
            &[R::Done],
            &[PowerOffSoft],
            not_yet(asked),
        );
        check_program(
            Step::SoftOff,
            1,
            true,
            &[failed()],
            &[PowerOffSoft],
            Outcome::Done,
        );
        check_program(Step::SoftOff, 2, true, &[], &[], Outcome::Done);
        // Power off.
        check_program(
            Step::PowerOff,
            1,
            true,
            &[R::Done],
            &[PowerOff],
            Outcome::Done,
        );
        check_program(Step::PowerOff, 2, true, &[failed()], &[PowerOff], fail());
        // Verify off: a readback; every third attempt re-sends the power-off first,
        // whatever it answers.
        check_program(
            Step::VerifyOff,
            1,
            true,
            std::slice::from_ref(&off),
            &[PowerState],
            Outcome::Done,
        );
        let still_on = "BMC still reports power on";
        check_program(
            Step::VerifyOff,
            2,
            true,
            std::slice::from_ref(&on),
            &[PowerState],
            not_yet(still_on),
        );
        check_program(
            Step::VerifyOff,
            3,
            true,
            &[failed(), off.clone()],
            &[PowerOff, PowerState],
            Outcome::Done,
        );
        check_program(Step::VerifyOff, 4, true, &[failed()], &[PowerState], fail());
        check_program(
            Step::VerifyOff,
            6,
            true,
            &[R::Done, on.clone()],
            &[PowerOff, PowerState],
            not_yet(still_on),
        );
        // Cloud steps: nothing to do without a cloud (or VMs).
        let host = || "cn1".to_string();
        check_program(Step::ForceDown, 1, false, &[], &[], Outcome::Done);
        check_program(
            Step::ForceDown,
            1,
            true,
            &[R::Done],
            &[ForceDown { host: host() }],
            Outcome::Done,
        );
        check_program(Step::Evacuate, 1, false, &[], &[], Outcome::Done);
        check_program(
            Step::Evacuate,
            1,
            true,
            &[R::Vms(vec![])],
            &[VmsOnHost { host: host() }],
            Outcome::Done,
        );
        let two = || R::Vms(vec!["a".into(), "b".into()]);
        check_program(
            Step::Evacuate,
            1,
            true,
            &[two(), R::Done, R::Done, R::Vms(vec![])],
            &[
                VmsOnHost { host: host() },
                Evacuate { vm: "a".into() },
                Evacuate { vm: "b".into() },
                VmsOnHost { host: host() },
            ],
            Outcome::Done,
        );
        check_program(
            Step::Evacuate,
            1,
            true,
            &[two(), R::ServiceInUse("in use".into())],
            &[VmsOnHost { host: host() }, Evacuate { vm: "a".into() }],
            not_yet("cloud still considers cn1's compute service up"),
        );
        check_program(
            Step::Evacuate,
            1,
            true,
            &[
                two(),
                R::Failed("no room".into()),
                R::Done,
                R::Vms(vec!["a".into()]),
            ],
            &[
                VmsOnHost { host: host() },
                Evacuate { vm: "a".into() },
                Evacuate { vm: "b".into() },
                VmsOnHost { host: host() },
            ],
            not_yet("1 VM(s) still on cn1: a: no room"),
        );
        // Rebuild: PXE, then off before on.
        check_program(
            Step::Rebuild,
            1,
            true,
            &[R::Done, off.clone(), R::Done],
            &[SetNextBootPxe, PowerState, PowerOn],
            Outcome::Done,
        );
        check_program(
            Step::Rebuild,
            2,
            true,
            &[R::Done, on.clone(), R::Done],
            &[SetNextBootPxe, PowerState, PowerOff],
            not_yet("powering off before the rebuild power-on"),
        );
        check_program(
            Step::Rebuild,
            1,
            true,
            &[failed()],
            &[SetNextBootPxe],
            fail(),
        );
        check_program(
            Step::Rebuild,
            1,
            true,
            &[R::Done, failed()],
            &[SetNextBootPxe, PowerState],
            fail(),
        );
        // Waiting for Ready reads the node only.
        check_program(
            Step::AwaitReady,
            1,
            true,
            &[],
            &[],
            not_yet("node is fencing"),
        );
        // A driver that answers out of turn gets a failed attempt, not a panic.
        check_program(
            Step::PowerOff,
            1,
            true,
            &[R::Vms(vec![])],
            &[PowerOff],
            Outcome::Failed(
                "step power_off got Some(Vms([])) in PowerOffAsked: the driver does not follow the program".into(),
            ),
        );
    }

    #[test]
    fn evacuations_per_attempt_are_bounded() {
        let remediation = at_step(RemediationKind::Automatic, Step::Evacuate, 1);
        let mut program = StepProgram::new(
            0,
            &remediation,
            &node(LifecycleState::Fenced),
            true,
            &Limits::default(),
        )
        .unwrap();
        let many: Vec<String> = (0..EVACUATIONS_PER_ATTEMPT_MAX + 10)
            .map(|i| format!("vm{i}"))
            .collect();
        let mut last = None;
        let mut calls = 0;
        let mut answer = Some(CallResult::Vms(many));
        loop {
            match program.next(last.take()) {
                Next::Call(Call::VmsOnHost { .. }) if calls > 0 => {
                    last = Some(CallResult::Vms(vec!["vm0".into(); 10]));
                }
                Next::Call(_) => last = Some(answer.take().unwrap_or(CallResult::Done)),
                Next::Finish(outcome) => {
                    assert_eq!(outcome, Outcome::NotYet("10 VM(s) still on cn1".into()));
                    break;
                }
            }
            calls += 1;
            assert!(calls <= STEP_CALLS_MAX, "unbounded program");
        }
        assert_eq!(calls, EVACUATIONS_PER_ATTEMPT_MAX + 2);
    }

    /// One row of the outcome table: `outcome` of the last attempt a step's budget
    /// allows (or of a first attempt when `last` is false), with the node in `state`.
    /// `expect`: the remediation's status, the node's state after, and whether an
    /// illegal transition was met.
    #[allow(clippy::too_many_arguments)]
    fn check_outcome(
        kind: RemediationKind,
        step: Step,
        last: bool,
        outcome: Outcome,
        state: LifecycleState,
        expect: (Status, LifecycleState, bool),
    ) {
        let limits = Limits::default();
        let attempts = if last { step.attempts_max(&limits) } else { 1 };
        let attempt = at_step(kind, step, attempts);
        let write = handle_outcome(T, &attempt, &outcome, &node(state), &limits);
        let after = write.node.as_ref().map_or(state, |n| n.state);
        let got = (write.remediation.status, after, write.illegal.is_some());
        assert_eq!(
            got, expect,
            "{kind:?} {step:?} {outcome:?} in {state}: {}",
            write.note
        );
        if let Some(illegal) = write.illegal {
            let failed = write
                .audit
                .iter()
                .find(|e| e.action == Action::RemediationFailed)
                .expect("a remediation_failed event");
            assert!(
                failed.reason.contains(&illegal.to_string()),
                "{}",
                failed.reason
            );
            assert!(write
                .remediation
                .last_error
                .unwrap()
                .contains(&illegal.to_string()));
        }
    }

    #[test]
    fn outcome_table() {
        use LifecycleState::*;
        use RemediationKind::*;
        use Status::{Active, Done as Finished, Failed};
        let done = || Outcome::Done;
        let refused = || Outcome::Failed("refused".into());
        // The ordinary course.
        check_outcome(
            Automatic,
            Step::VerifyOff,
            false,
            done(),
            Fencing,
            (Active, Fenced, false),
        );
        check_outcome(
            Automatic,
            Step::PowerOff,
            false,
            refused(),
            Fencing,
            (Active, Fencing, false),
        );
        // An automatic fence that cannot be verified is retried: the node is back to
        // Suspect (silent, not fenced) and the saga waits for its next round; an
        // operator's fails at once and the node goes to a human.
        check_outcome(
            Automatic,
            Step::VerifyOff,
            true,
            refused(),
            Fencing,
            (Active, Suspect, false),
        );
        check_outcome(
            Fence,
            Step::VerifyOff,
            true,
            refused(),
            Fencing,
            (Failed, Maintenance, false),
        );
        check_outcome(
            Drain,
            Step::Maintenance,
            false,
            done(),
            Fenced,
            (Finished, Maintenance, false),
        );
        check_outcome(
            Automatic,
            Step::Rebuild,
            true,
            refused(),
            Rebuilding,
            (Failed, Maintenance, false),
        );
        // Events the node's state does not allow fail the saga and hand the node over.
        // A verified fence of a node someone moved to Ready: power is off, the record
        // says running; a human must look.
        check_outcome(
            Automatic,
            Step::VerifyOff,
            false,
            done(),
            Ready,
            (Failed, Maintenance, true),
        );
        // A fence given up on a node no longer Fencing.
        check_outcome(
            Fence,
            Step::VerifyOff,
            true,
            refused(),
            Ready,
            (Failed, Maintenance, true),
        );
        check_outcome(
            Fence,
            Step::VerifyOff,
            true,
            refused(),
            Fenced,
            (Failed, Maintenance, true),
        );
        // Mid-fence, Maintenance is not allowed until FenceFailed is recorded.
        check_outcome(
            Automatic,
            Step::Rebuild,
            true,
            refused(),
            Fencing,
            (Failed, Maintenance, true),
        );
        check_outcome(
            Drain,
            Step::Maintenance,
            false,
            done(),
            Fencing,
            (Failed, Maintenance, true),
        );
        // A step run twice finds its events applied: a replayed readback of a Fenced
        // node, a given-up rebuild whose node is already in maintenance.
        check_outcome(
            Automatic,
            Step::VerifyOff,
            false,
            done(),
            Fenced,
            (Active, Fenced, false),
        );
        check_outcome(
            Automatic,
            Step::Rebuild,
            true,
            refused(),
            Maintenance,
            (Failed, Maintenance, false),
        );
        // A retired node is left as it is.
        check_outcome(
            Automatic,
            Step::VerifyOff,
            false,
            done(),
            Retired,
            (Failed, Retired, true),
        );
    }

    #[test]
    fn an_illegal_event_names_the_transition_and_where_the_node_was_left() {
        let attempt = at_step(RemediationKind::Fence, Step::VerifyOff, 1);
        let write = handle_outcome(
            T,
            &attempt,
            &Outcome::Done,
            &node(LifecycleState::Retired),
            &Limits::default(),
        );
        assert_eq!(
            write.note,
            "remediation 9 failed: verify_off done: illegal transition: fence_verified is not allowed while the node is retired; node left retired: no lifecycle event takes it to maintenance"
        );
        assert!(write.node.is_none());
        let mid_fence = handle_outcome(
            T,
            &at_step(RemediationKind::Drain, Step::Maintenance, 1),
            &Outcome::Done,
            &node(LifecycleState::Fencing),
            &Limits::default(),
        );
        let actions: Vec<Action> = mid_fence.audit.iter().map(|e| e.action).collect();
        assert_eq!(
            actions,
            vec![
                Action::FenceFailed,
                Action::MaintenanceOn,
                Action::RemediationFailed
            ]
        );
        assert!(mid_fence.audit[1]
            .reason
            .contains("maintenance_on is not allowed while the node is fencing"));
    }

    #[test]
    fn a_fence_retry_writes_its_alert_and_a_rebuild_power_on_starts_the_watchdog() {
        let limits = Limits::default();
        let attempt = at_step(
            RemediationKind::Automatic,
            Step::VerifyOff,
            limits.readbacks_max,
        );
        let write = handle_outcome(
            T,
            &attempt,
            &Outcome::NotYet("on".into()),
            &node(LifecycleState::Fencing),
            &limits,
        );
        assert_eq!(write.remediation.fence_retries, 1);
        let actions: Vec<Action> = write.audit.iter().map(|e| e.action).collect();
        assert_eq!(
            actions,
            vec![Action::FenceFailed, Action::FenceRetryScheduled]
        );
        assert_eq!(write.node.map(|n| n.state), Some(LifecycleState::Suspect));

        let attempt = at_step(RemediationKind::Automatic, Step::Rebuild, 1);
        let write = handle_outcome(
            T,
            &attempt,
            &Outcome::Done,
            &node(LifecycleState::Rebuilding),
            &limits,
        );
        let boot = write
            .node
            .and_then(|n| n.boot)
            .expect("the power-on is recorded");
        assert_eq!((boot.phase, boot.at_ms), (BootPhase::PoweredOn, T));
    }

    #[test]
    fn between_fence_retries_a_node_that_came_back_or_was_taken_stands_the_saga_down() {
        use LifecycleState::*;
        let mut waiting = at_step(RemediationKind::Automatic, Step::PowerOff, 0);
        waiting.fence_unverified_at_ms = Some(T - 60_000);
        waiting.fence_retries = 1;
        for (state, expect) in [
            (Suspect, "attempt fencing"),
            (Ready, "stand down"),
            (Registered, "stand down"),
            (Provisioning, "stand down"),
            (Maintenance, "stand down"),
        ] {
            let got = match begin_step(T, &waiting, &node(state)) {
                StepStart::StandDown { cancelled, event } => {
                    assert_eq!(cancelled.status, Status::Cancelled);
                    assert!(
                        event.reason.contains("fence retries stopped"),
                        "{}",
                        event.reason
                    );
                    "stand down".to_string()
                }
                StepStart::Attempt { node, .. } => {
                    format!("attempt {}", node.map_or(state, |n| n.state))
                }
                other => format!("{other:?}"),
            };
            assert_eq!(got, expect, "{state}");
        }
        // Mid-round (an attempt made), nothing stands down.
        let mut mid = waiting.clone();
        mid.attempts = 1;
        assert!(matches!(
            begin_step(T, &mid, &node(Ready)),
            StepStart::Attempt { .. }
        ));
    }

    #[test]
    fn the_boot_watchdog_calls_a_rebuild_stalled_past_its_milestone_deadline() {
        let limits = Limits::default();
        let mut waiting = at_step(RemediationKind::Automatic, Step::AwaitReady, 1);
        waiting.step_started_at_ms = T - 200_000;
        let outcome = |phase: BootPhase, at_ms: i64| {
            let mut booting = node(LifecycleState::Rebuilding);
            booting.boot = Some(BootProgress {
                phase,
                at_ms,
                until_ms: None,
            });
            let mut program = StepProgram::new(T, &waiting, &booting, false, &limits).unwrap();
            match program.next(None) {
                Next::Finish(outcome) => outcome,
                other => panic!("{other:?}"),
            }
        };
        let stage1 = limits.boot_stage1_timeout_ms;
        assert!(
            matches!(outcome(BootPhase::Stage1, T - stage1), Outcome::Stalled(ref why) if why.contains("stage1 for 120 s"))
        );
        assert!(matches!(
            outcome(BootPhase::Stage1, T - stage1 + 1_000),
            Outcome::NotYet(_)
        ));
        // Firmware gets far longer.
        assert!(matches!(
            outcome(BootPhase::PoweredOn, T - 150_000),
            Outcome::NotYet(_)
        ));
        // A milestone from before this rebuild's power-on says nothing about this boot.
        assert!(matches!(
            outcome(BootPhase::Stage1, T - 300_000),
            Outcome::NotYet(_)
        ));
        // A firmware update is judged by its own deadline, and never cut off before it.
        let flashing = |until_ms: i64| {
            let mut booting = node(LifecycleState::Rebuilding);
            booting.boot = Some(BootProgress {
                phase: BootPhase::Firmware,
                at_ms: T - 100_000,
                until_ms: Some(until_ms),
            });
            let mut program = StepProgram::new(T, &waiting, &booting, false, &limits).unwrap();
            match program.next(None) {
                Next::Finish(outcome) => outcome,
                other => panic!("{other:?}"),
            }
        };
        assert!(matches!(flashing(T + 1), Outcome::Flashing(_)));
        assert!(
            matches!(flashing(T), Outcome::Stalled(ref why) if why.contains("firmware for 100 s")),
            "{:?}",
            flashing(T)
        );
    }

    /// A node booting on its own, at `phase` since `at_ms`, with a BMC address.
    fn booting(index: u64, phase: BootPhase, at_ms: i64) -> BootingNode {
        BootingNode {
            uuid: uuid(index),
            rack: Some("r0".into()),
            state: if phase >= BootPhase::OsFetched {
                LifecycleState::Provisioning
            } else {
                LifecycleState::Registered
            },
            boot: Some(BootProgress {
                phase,
                at_ms,
                until_ms: None,
            }),
            bmc_configured: true,
        }
    }

    /// The boot stall alerts of one poll, as (node index, why held) in command order.
    fn stall_alerts(commands: &[Command]) -> Vec<(u64, Option<String>)> {
        commands
            .iter()
            .filter_map(|c| match c {
                Command::Alert(GuardAlert::BootStalled { stall, .. }) => Some((
                    (0..1_000).find(|i| stall.uuid == uuid(*i)).unwrap(),
                    stall.held.clone(),
                )),
                _ => None,
            })
            .collect()
    }

    fn board(commands: &[Command]) -> GuardReport {
        commands
            .iter()
            .find_map(|c| match c {
                Command::Publish(report) => Some(report.clone()),
                _ => None,
            })
            .unwrap()
    }

    #[test]
    fn a_first_boot_stalled_past_its_deadline_is_reported_once_and_power_cycled() {
        let limits = Limits::default();
        let registered = limits.boot_registered_timeout_ms;
        let mut core = ControllerCore::new(no_polls(config()), 0);
        // Stalled at `registered` just past its deadline; another well within its own.
        let view = FleetView {
            booting: Some(vec![
                booting(1, BootPhase::Registered, T - registered),
                booting(2, BootPhase::OsFetched, T - registered),
            ]),
            ..Default::default()
        };
        check(&mut core, T, &view, &["alert boot_stalled", "boot_retry 1"]);
        let commands = core.poll(T + 1_000, &FleetView::default());
        assert!(
            !commands
                .iter()
                .any(|c| matches!(c, Command::StartAutomatic { .. })),
            "a tick without a scan judges no boot"
        );
        // The next scan: its remediation is active, so the node is busy, not stalled again.
        let scan = T + core.config().boot_scan_ms;
        let mut view = view.clone();
        let mut retry = Remediation::new(uuid(1), RemediationKind::BootRetry, SYSTEM_ACTOR, "t", T);
        retry.id = 7;
        retry.next_attempt_at_ms = scan + 1;
        view.active = vec![retry];
        check(&mut core, scan, &view, &[]);
        assert!(board(&core.poll(scan, &FleetView::default()))
            .boots_stalled
            .is_empty());
    }

    #[test]
    fn a_stall_that_is_held_is_on_the_board_and_reported_once() {
        let stalled_at = T - Limits::default().boot_os_fetched_timeout_ms;
        // No BMC to power-cycle it with.
        let mut core = ControllerCore::new(no_polls(config()), 0);
        let mut node = booting(3, BootPhase::OsFetched, stalled_at);
        node.bmc_configured = false;
        let view = FleetView {
            booting: Some(vec![node]),
            ..Default::default()
        };
        let commands = core.poll(T, &view);
        let alerts = stall_alerts(&commands);
        assert_eq!(alerts.len(), 1);
        assert!(alerts[0].1.as_deref().unwrap().contains("no BMC address"));
        assert!(!commands
            .iter()
            .any(|c| matches!(c, Command::StartAutomatic { .. })));
        let shown = board(&commands).boots_stalled;
        assert_eq!((shown.len(), shown[0].phase), (1, BootPhase::OsFetched));
        // Still stalled at the same milestone on the next scan: on the board, no new alert.
        let scan = T + core.config().boot_scan_ms;
        let commands = core.poll(scan, &view);
        assert!(stall_alerts(&commands).is_empty());
        assert_eq!(board(&commands).boots_stalled.len(), 1);
        // Automatic boot retries off: reported, never power-cycled.
        let off = ControllerConfig {
            boot_retry_automatic: false,
            ..no_polls(config())
        };
        let view = FleetView {
            booting: Some(vec![booting(3, BootPhase::OsFetched, stalled_at)]),
            ..Default::default()
        };
        let commands = ControllerCore::new(off, 0).poll(T, &view);
        assert_eq!(
            stall_alerts(&commands),
            vec![(3, Some("automatic boot retries are off".to_string()))]
        );
    }

    #[test]
    fn many_boots_stalled_at_once_hold_every_retry_until_fewer_are() {
        let stalled_at = T - Limits::default().boot_os_fetched_timeout_ms;
        let mut core = ControllerCore::new(no_polls(config()), 0);
        let min = core.config().boot_stalls_systemic_min as u64;
        // A broken image: every node booting stalls after fetching it.
        let view = FleetView {
            booting: Some(
                (0..min)
                    .map(|i| booting(i, BootPhase::OsFetched, stalled_at))
                    .collect(),
            ),
            ..Default::default()
        };
        let commands = core.poll(T, &view);
        let described: Vec<String> = commands.iter().filter_map(describe).collect();
        assert_eq!(described[0], "alert boot_retries_held");
        assert_eq!(described.len(), 1 + min as usize, "{described:?}");
        assert!(stall_alerts(&commands).iter().all(|(_, held)| held
            .as_deref()
            .is_some_and(|h| h.contains("stalled at once"))));
        assert!(board(&commands).boot_retries_held);
        // One fewer than the threshold: the hold ends and the stalled are power-cycled
        // (already reported: no new stall alerts).
        let scan = T + core.config().boot_scan_ms;
        let mut view = view.clone();
        view.booting.as_mut().unwrap().pop();
        let expect: Vec<String> = std::iter::once("alert boot_retries_resumed".to_string())
            .chain((0..min - 1).map(|i| format!("boot_retry {i}")))
            .collect();
        let expect: Vec<&str> = expect.iter().map(String::as_str).collect();
        check(&mut core, scan, &view, &expect);
    }

    #[test]
    fn a_boot_stall_is_measured_from_the_controllers_start_and_respects_the_guards() {
        let deadline = Limits::default().boot_registered_timeout_ms;
        // The milestone is old, but the controller started at T: its own downtime
        // (when the node could fetch nothing) does not count.
        let mut core = ControllerCore::new(no_polls(config()), T);
        let view = FleetView {
            booting: Some(vec![booting(1, BootPhase::Registered, 0)]),
            ..Default::default()
        };
        check(&mut core, T + 1_000, &view, &[]);
        check(
            &mut core,
            T + deadline,
            &view,
            &["alert boot_stalled", "boot_retry 1"],
        );
        // A node whose rack went silent is not power-cycled: suspect the switch.
        let health = HealthConfig::default();
        let late = T - health.heartbeat_grace_ms - 1;
        let mut core = ControllerCore::new(no_polls(config()), 0);
        let mut nodes = fleet(4, 10, T);
        for node in &mut nodes[..6] {
            node.last_heard_at_ms = late;
        }
        let view = FleetView {
            nodes,
            booting: Some(vec![booting(20, BootPhase::Registered, T - deadline)]),
            ..Default::default()
        };
        let commands = core.poll(T, &view);
        assert!(!commands
            .iter()
            .any(|c| matches!(c, Command::StartAutomatic { remediation, .. } if remediation.kind == RemediationKind::BootRetry)));
        let alerts = stall_alerts(&commands);
        assert_eq!(alerts.len(), 1);
        assert!(
            alerts[0].1.as_deref().unwrap().contains("rack"),
            "{alerts:?}"
        );
    }

    #[test]
    fn a_successor_keeps_its_predecessors_rack_pause_and_rate_window() {
        let health = HealthConfig::default();
        let late = T - health.heartbeat_grace_ms - health.fence_confirm_ms - 1;
        // Rack r0 goes quiet: 6 of 10 silent. The first leader pauses it.
        let mut nodes = fleet(4, 10, T);
        for node in &mut nodes[..6] {
            node.last_heard_at_ms = late;
        }
        let mut first = ControllerCore::new(no_polls(config()), 0);
        let view = FleetView {
            nodes: nodes.clone(),
            ..Default::default()
        };
        let commands: Vec<String> = first.poll(T, &view).iter().filter_map(describe).collect();
        assert!(
            commands.contains(&"alert rack_fencing_paused".to_string()),
            "{commands:?}"
        );
        // The rack comes back but for one node, and a new leader takes over 10 s later:
        // within the hold, that straggler is not picked off, and the pause is not alerted
        // again.
        for node in &mut nodes[1..6] {
            node.last_heard_at_ms = T + 10_000;
        }
        // The first leader marked the straggler suspect.
        nodes[0].state = LifecycleState::Suspect;
        let view = FleetView {
            nodes,
            ..Default::default()
        };
        let memory: ControllerMemory =
            serde_json::from_str(&serde_json::to_string(&first.memory()).unwrap()).unwrap();
        let mut successor = ControllerCore::new(no_polls(config()), 0);
        successor.restore(memory);
        check(&mut successor, T + 10_000, &view, &[]);
        // Without the memory the same view fences the straggler at once.
        let mut forgetful = ControllerCore::new(no_polls(config()), 0);
        check(&mut forgetful, T + 10_000, &view, &["start 0"]);
    }

    #[test]
    fn a_boot_retry_stands_down_when_its_node_is_no_longer_stalled() {
        use LifecycleState::*;
        let retry = at_step(RemediationKind::BootRetry, Step::Rebuild, 0);
        let stalled = |state: LifecycleState, boot_at: i64| {
            let mut n = node(state);
            n.boot = Some(BootProgress {
                phase: BootPhase::Registered,
                at_ms: boot_at,
                until_ms: None,
            });
            n
        };
        // Still stalled (the milestone predates the start): power-cycle, Rebuilding.
        match begin_step(T, &retry, &stalled(Registered, T - 300_000)) {
            StepStart::Attempt { node, .. } => assert_eq!(node.unwrap().state, Rebuilding),
            other => panic!("{other:?}"),
        }
        // The boot moved on since the watchdog looked, or the node is Ready: stand down.
        for node in [
            stalled(Provisioning, T + 5_000),
            stalled(Ready, T - 300_000),
        ] {
            assert!(
                matches!(
                    begin_step(T + 10_000, &retry, &node),
                    StepStart::StandDown { .. }
                ),
                "{:?}",
                node.state
            );
        }
        // Mid-saga (after its power-cycle) nothing stands it down, nor the next round's
        // power-cycle (the node is Rebuilding by then).
        let awaiting = at_step(RemediationKind::BootRetry, Step::AwaitReady, 1);
        assert!(matches!(
            begin_step(T, &awaiting, &stalled(Rebuilding, T + 5_000)),
            StepStart::Attempt { .. }
        ));
        let mut again = retry.clone();
        again.rebuilds = 1;
        assert!(matches!(
            begin_step(T, &again, &stalled(Rebuilding, T + 5_000)),
            StepStart::Attempt { .. }
        ));
    }

    #[test]
    fn verifying_an_evacuation_checks_each_vm_and_evacuates_again_one_left_behind() {
        let mut attempt = at_step(RemediationKind::Automatic, Step::VerifyEvacuated, 1);
        attempt.vms_evacuated = vec!["vm1".into(), "vm2".into(), "vm3".into()];
        let status = |host: &str, status: &str| CallResult::VmStatus {
            host: Some(host.into()),
            status: status.into(),
        };
        let run = |answers: Vec<CallResult>| {
            let program = StepProgram::new(
                T,
                &attempt,
                &node(LifecycleState::Fenced),
                true,
                &Limits::default(),
            )
            .unwrap();
            run_program(program, &answers)
        };
        // All running elsewhere: done.
        let (calls, outcome) = run(vec![
            status("cn2", "ACTIVE"),
            status("cn3", "ACTIVE"),
            status("cn4", "active"),
        ]);
        assert_eq!(calls.len(), 3);
        assert_eq!(outcome, Outcome::Done);
        // One still rebuilding, one left on the node (evacuated again), one unreadable.
        let (calls, outcome) = run(vec![
            status("cn2", "REBUILD"),
            status("cn1", "ACTIVE"),
            CallResult::Done,
            CallResult::Failed("timed out".into()),
        ]);
        assert_eq!(calls[2], Call::Evacuate { vm: "vm2".into() });
        let Outcome::NotYet(why) = outcome else {
            panic!("{outcome:?}")
        };
        assert!(
            why.starts_with("3 evacuated VM(s) not running elsewhere yet"),
            "{why}"
        );
        assert!(
            why.contains("vm1 REBUILD on cn2")
                && why.contains("vm2 ACTIVE still on cn1")
                && why.contains("vm3: timed out"),
            "{why}"
        );
        // Nothing evacuated (or no cloud): nothing to verify.
        let mut none = attempt.clone();
        none.vms_evacuated.clear();
        let mut program = StepProgram::new(
            T,
            &none,
            &node(LifecycleState::Fenced),
            true,
            &Limits::default(),
        )
        .unwrap();
        assert_eq!(program.next(None), Next::Finish(Outcome::Done));
    }

    #[test]
    fn an_evacuation_records_the_vms_the_cloud_accepted() {
        let mut attempt = at_step(RemediationKind::Automatic, Step::Evacuate, 1);
        attempt.vms_evacuated = vec!["vm0".into()];
        let mut program = StepProgram::new(
            T,
            &attempt,
            &node(LifecycleState::Fenced),
            true,
            &Limits::default(),
        )
        .unwrap();
        let mut answers = vec![
            CallResult::Vms(vec!["vm1".into(), "vm2".into()]),
            CallResult::Done,
            CallResult::Failed("nova 500".into()),
            CallResult::Vms(vec!["vm2".into()]),
        ]
        .into_iter();
        let mut last = None;
        while let Next::Call(_) = program.next(last.take()) {
            last = answers.next();
        }
        program.record_evacuated(&mut attempt);
        assert_eq!(
            attempt.vms_evacuated,
            vec!["vm0".to_string(), "vm1".to_string()]
        );
    }
}
