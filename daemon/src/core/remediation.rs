//! Remediation sagas, pure: what a remediation is made of, and how it advances given the
//! outcome of its current step.
//!
//! A remediation is persisted before every step it runs and after every outcome, and each
//! step is idempotent (power off when off, force-down when down, evacuate what is still on
//! the host, PXE + power on), so a daemon that dies at any point resumes the saga after a
//! restart without doing anything twice that matters. Which calls a step makes is
//! `core::controller::StepProgram`'s decision, making them is the driver's
//! (`controller::remediation`); deciding what comes next is this module's.

use bearman_proto::uuid::NodeUuid;
use serde::{Deserialize, Serialize};

use super::lifecycle::{LifecycleEvent, LifecycleState};
use super::model::{BootPhase, TimestampMs};
use super::validate::InvalidSetting;

#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum RemediationKind {
    /// Started by the health judgement: fence, evacuate, rebuild.
    Automatic,
    /// Operator: power off and verify.
    Fence,
    /// Operator: fence, then move every VM away.
    Evacuate,
    /// Operator: fence, evacuate, rebuild from PXE.
    Rebuild,
    /// Operator: fence, evacuate, then leave the node in maintenance.
    Drain,
    /// Started by the boot watchdog for a node booting on its own (first provisioning,
    /// or back by itself after a crash) whose boot stalled past its milestone's deadline:
    /// power-cycle it into PXE again (off, verified, on) and wait for Ready, at most
    /// `rebuilds_max` times. Nothing to fence or evacuate: a node that never reached Ready
    /// since its boot runs no VMs.
    BootRetry,
}

impl RemediationKind {
    pub fn as_str(self) -> &'static str {
        match self {
            RemediationKind::Automatic => "automatic",
            RemediationKind::Fence => "fence",
            RemediationKind::Evacuate => "evacuate",
            RemediationKind::Rebuild => "rebuild",
            RemediationKind::Drain => "drain",
            RemediationKind::BootRetry => "boot_retry",
        }
    }

    pub fn plan(self) -> Vec<Step> {
        use Step::*;
        // Every plan fences first; evacuating is always followed by verifying it.
        let fence = [SoftOff, PowerOff, VerifyOff];
        let evacuate = [ForceDown, Evacuate, VerifyEvacuated];
        match self {
            RemediationKind::Automatic | RemediationKind::Rebuild => {
                [&fence[..], &evacuate, &[Rebuild, AwaitReady]].concat()
            }
            RemediationKind::Fence => fence.to_vec(),
            RemediationKind::Evacuate => [fence, evacuate].concat(),
            RemediationKind::Drain => [&fence[..], &evacuate, &[Maintenance]].concat(),
            RemediationKind::BootRetry => vec![Rebuild, AwaitReady],
        }
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Step {
    /// Ask the operating system to shut down cleanly (ACPI, through the BMC) and give it
    /// `soft_off_grace_ms`. A hung or crashed OS ignores it; the hard power-off follows
    /// regardless, and only readbacks after that hard power-off count as verification
    /// (a stale BMC can report "off" for a running node before it).
    SoftOff,
    /// Ask the BMC to power the node off, hard (accepted is not done).
    PowerOff,
    /// Read the power state back until it is verifiably off.
    VerifyOff,
    /// Mark the node's compute service forced-down in the cloud.
    ForceDown,
    /// Evacuate every VM still on the node.
    Evacuate,
    /// Check that every VM the evacuation moved runs on another host (the cloud accepting
    /// an evacuation is not the VM running); evacuate again any still on the node.
    /// Bounded by `evacuation_verify_timeout_ms`, after which the VMs not running are
    /// reported (an alert event) and the saga goes on: the node's rebuild does not wait
    /// on another host's trouble.
    VerifyEvacuated,
    /// Next boot from the network, power on.
    Rebuild,
    /// Wait for the node to come back through stage 1 and report installed.
    AwaitReady,
    /// Put the node into maintenance (drain).
    Maintenance,
}

impl Step {
    pub fn as_str(self) -> &'static str {
        match self {
            Step::SoftOff => "soft_off",
            Step::PowerOff => "power_off",
            Step::VerifyOff => "verify_off",
            Step::ForceDown => "force_down",
            Step::Evacuate => "evacuate",
            Step::VerifyEvacuated => "verify_evacuated",
            Step::Rebuild => "rebuild",
            Step::AwaitReady => "await_ready",
            Step::Maintenance => "maintenance",
        }
    }

    /// Attempts before the step, and so the remediation, fails.
    pub fn attempts_max(self, limits: &Limits) -> u32 {
        match self {
            Step::SoftOff => SOFT_OFF_ATTEMPTS_MAX,
            Step::PowerOff => limits.power_attempts_max,
            Step::VerifyOff => limits.readbacks_max,
            Step::ForceDown | Step::Evacuate => limits.cloud_attempts_max,
            // Rebuild reads the power state back (off before on), like a fence.
            Step::Rebuild => limits.readbacks_max,
            // Waiting is bounded by time, not attempts (see `Limits::ready_timeout_ms`,
            // `Limits::evacuation_verify_timeout_ms`).
            Step::AwaitReady | Step::VerifyEvacuated => u32::MAX,
            Step::Maintenance => MAINTENANCE_ATTEMPTS_MAX,
        }
    }

    /// Whether an operator may cancel during this step: not while a power-off is half
    /// done, so nobody is left guessing the node's power state.
    pub fn cancellable(self) -> bool {
        !matches!(self, Step::SoftOff | Step::PowerOff | Step::VerifyOff)
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Status {
    Active,
    Done,
    Failed,
    Cancelled,
}

impl Status {
    pub fn as_str(self) -> &'static str {
        match self {
            Status::Active => "active",
            Status::Done => "done",
            Status::Failed => "failed",
            Status::Cancelled => "cancelled",
        }
    }

    pub fn parse(text: &str) -> Option<Status> {
        [
            Status::Active,
            Status::Done,
            Status::Failed,
            Status::Cancelled,
        ]
        .into_iter()
        .find(|s| s.as_str() == text)
    }
}

/// Attempts at the soft power-off step: one ask, one wait (a retry goes straight on).
pub const SOFT_OFF_ATTEMPTS_MAX: u32 = 2;
/// Attempts at recording a drain's maintenance step.
pub const MAINTENANCE_ATTEMPTS_MAX: u32 = 3;

/// Retry budgets and backoff; every loop in remediation is bounded by these.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Limits {
    pub power_attempts_max: u32,
    pub readbacks_max: u32,
    pub cloud_attempts_max: u32,
    pub backoff_initial_ms: i64,
    pub backoff_max_ms: i64,
    /// How long a rebuilt node has to reach Ready before the rebuild is retried.
    pub ready_timeout_ms: i64,
    /// How often a rebuilding node is checked for Ready. A plain store read, so short:
    /// a finished rebuild should free its slot (remediations_active_max) at once.
    pub ready_poll_ms: i64,
    /// Rebuilds before the node goes to maintenance.
    pub rebuilds_max: u32,
    /// How long a clean (ACPI) shutdown is given before the hard power-off; 0 skips it.
    pub soft_off_grace_ms: i64,
    /// How long an automatic remediation keeps retrying a fence it could not verify
    /// (a BMC that does not answer), counted from the first failure; 0 gives up at once.
    /// While it retries, the node stays silent and unfenced and its VMs stay down: giving
    /// up hands them to a human, so the default is a day, not minutes.
    pub fence_retry_window_ms: i64,
    /// The wait between fence retry rounds doubles from `backoff_max_ms` up to this. It
    /// bounds how long VMs stay down after the BMC answers again.
    pub fence_retry_backoff_max_ms: i64,
    /// Boot watchdog: how long a rebuilding node may stay at each boot milestone before
    /// it is power-cycled (counted against `rebuilds_max`). Powered on → the stage-1
    /// agent announces itself: POST, iPXE, the stage-1 download and kernel; servers with
    /// a lot of memory take 5-8 minutes to POST, so 10.
    pub boot_powered_on_timeout_ms: i64,
    /// Stage 1 started → registered: network up, LLDP (31 s by default), the BMC read;
    /// about a minute on real hardware, so 2.
    pub boot_stage1_timeout_ms: i64,
    /// Registered → fetched the target OS script: the BMC set-up, seconds; 3 minutes.
    pub boot_registered_timeout_ms: i64,
    /// Fetched the target OS → installed: its download, kexec and stage 2 coming up; 10.
    pub boot_os_fetched_timeout_ms: i64,
    /// How long evacuated VMs have to be running on other hosts before the ones that are
    /// not are reported (Nova rebuilds an evacuated VM in seconds to a few minutes).
    pub evacuation_verify_timeout_ms: i64,
}

impl Default for Limits {
    fn default() -> Self {
        Limits {
            power_attempts_max: 8,
            readbacks_max: 15,
            cloud_attempts_max: 30,
            backoff_initial_ms: 1_000,
            backoff_max_ms: 30_000,
            ready_timeout_ms: 15 * 60 * 1000,
            ready_poll_ms: 2_000,
            rebuilds_max: 3,
            soft_off_grace_ms: 5_000,
            fence_retry_window_ms: 24 * 3600 * 1000,
            fence_retry_backoff_max_ms: 60_000,
            boot_powered_on_timeout_ms: 10 * 60 * 1000,
            boot_stage1_timeout_ms: 2 * 60 * 1000,
            boot_registered_timeout_ms: 3 * 60 * 1000,
            boot_os_fetched_timeout_ms: 10 * 60 * 1000,
            evacuation_verify_timeout_ms: 10 * 60 * 1000,
        }
    }
}

/// `value` of `limits.{key}` within `range`, or the error naming both.
fn within(
    key: &str,
    value: i64,
    range: std::ops::RangeInclusive<i64>,
) -> Result<(), InvalidSetting> {
    if range.contains(&value) {
        Ok(())
    } else {
        Err(InvalidSetting::new(
            format!("limits.{key}"),
            format!("{value} is outside {}-{}", range.start(), range.end()),
        ))
    }
}

impl Limits {
    /// How long a rebuilding node may stay at `phase` before the watchdog power-cycles it.
    pub fn boot_phase_timeout_ms(&self, phase: BootPhase) -> Option<i64> {
        match phase {
            BootPhase::PoweredOn => Some(self.boot_powered_on_timeout_ms),
            BootPhase::Stage1 => Some(self.boot_stage1_timeout_ms),
            BootPhase::Registered => Some(self.boot_registered_timeout_ms),
            BootPhase::OsFetched => Some(self.boot_os_fetched_timeout_ms),
            BootPhase::Installed => None,
            // Bounded by the update's own deadline (`BootProgress::until_ms`).
            BootPhase::Firmware => None,
        }
    }

    pub fn validate(&self) -> Result<(), InvalidSetting> {
        within(
            "fence_retry_window_ms",
            self.fence_retry_window_ms,
            0..=7 * 86_400_000,
        )?;
        within(
            "fence_retry_backoff_max_ms",
            self.fence_retry_backoff_max_ms,
            1_000..=3_600_000,
        )?;
        for (key, value) in [
            (
                "boot_powered_on_timeout_ms",
                self.boot_powered_on_timeout_ms,
            ),
            ("boot_stage1_timeout_ms", self.boot_stage1_timeout_ms),
            (
                "boot_registered_timeout_ms",
                self.boot_registered_timeout_ms,
            ),
            (
                "boot_os_fetched_timeout_ms",
                self.boot_os_fetched_timeout_ms,
            ),
            (
                "evacuation_verify_timeout_ms",
                self.evacuation_verify_timeout_ms,
            ),
        ] {
            within(key, value, 1_000..=86_400_000)?;
        }
        for (key, value) in [
            ("power_attempts_max", self.power_attempts_max),
            ("readbacks_max", self.readbacks_max),
            ("cloud_attempts_max", self.cloud_attempts_max),
            ("rebuilds_max", self.rebuilds_max),
        ] {
            if !(1..=10_000).contains(&value) {
                return Err(InvalidSetting::new(
                    format!("limits.{key}"),
                    format!("{value} is outside 1-10000"),
                ));
            }
        }
        if !(1..=3_600_000).contains(&self.backoff_initial_ms) {
            return Err(InvalidSetting::new(
                "limits.backoff_initial_ms",
                format!("{} is outside 1-3600000", self.backoff_initial_ms),
            ));
        }
        if !(self.backoff_initial_ms..=3_600_000).contains(&self.backoff_max_ms) {
            return Err(InvalidSetting::new(
                "limits.backoff_max_ms",
                format!(
                    "{} must be at least limits.backoff_initial_ms ({}) and at most 3600000",
                    self.backoff_max_ms, self.backoff_initial_ms
                ),
            ));
        }
        if !(0..=600_000).contains(&self.soft_off_grace_ms) {
            return Err(InvalidSetting::new(
                "limits.soft_off_grace_ms",
                format!("{} is outside 0-600000", self.soft_off_grace_ms),
            ));
        }
        if !(1..=86_400_000).contains(&self.ready_timeout_ms) {
            return Err(InvalidSetting::new(
                "limits.ready_timeout_ms",
                format!("{} is outside 1-86400000", self.ready_timeout_ms),
            ));
        }
        if !(100..=600_000).contains(&self.ready_poll_ms) {
            return Err(InvalidSetting::new(
                "limits.ready_poll_ms",
                format!("{} is outside 100-600000", self.ready_poll_ms),
            ));
        }
        if self.ready_poll_ms > self.ready_timeout_ms {
            return Err(InvalidSetting::new(
                "limits.ready_poll_ms",
                format!(
                    "{} is longer than limits.ready_timeout_ms {}",
                    self.ready_poll_ms, self.ready_timeout_ms
                ),
            ));
        }
        Ok(())
    }
}

/// One remediation of one node, as persisted.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Remediation {
    pub id: i64,
    pub node_uuid: NodeUuid,
    pub kind: RemediationKind,
    pub status: Status,
    pub plan: Vec<Step>,
    pub step_index: usize,
    /// Attempts made at the current step (recorded before each attempt acts).
    pub attempts: u32,
    pub rebuilds: u32,
    pub next_attempt_at_ms: TimestampMs,
    pub step_started_at_ms: TimestampMs,
    pub created_at_ms: TimestampMs,
    pub updated_at_ms: TimestampMs,
    pub requested_by: String,
    pub reason: String,
    pub last_error: Option<String>,
    /// VM ids this remediation evacuated.
    pub vms_evacuated: Vec<String>,
    pub fenced_at_ms: Option<TimestampMs>,
    pub evacuated_at_ms: Option<TimestampMs>,
    pub finished_at_ms: Option<TimestampMs>,
    /// When a fence of this remediation first failed to verify; set while it retries.
    #[serde(default)]
    pub fence_unverified_at_ms: Option<TimestampMs>,
    /// Fence retry rounds scheduled so far.
    #[serde(default)]
    pub fence_retries: u32,
    /// Evacuated VMs not running elsewhere when `verify_evacuated` gave up waiting, with
    /// what the cloud said (reported, never assumed done).
    #[serde(default)]
    pub vms_unverified: Vec<String>,
    /// The leader epoch the controller's last write of this record was made under (with
    /// several replicas; `None` for a daemon alone, or an operator's write).
    #[serde(default)]
    pub epoch: Option<i64>,
    /// Bumped on every write; writers present the one they read.
    pub generation: i64,
}

impl Remediation {
    pub fn new(
        node_uuid: NodeUuid,
        kind: RemediationKind,
        requested_by: &str,
        reason: &str,
        now_ms: TimestampMs,
    ) -> Self {
        Remediation {
            id: 0,
            node_uuid,
            kind,
            status: Status::Active,
            plan: kind.plan(),
            step_index: 0,
            attempts: 0,
            rebuilds: 0,
            next_attempt_at_ms: now_ms,
            step_started_at_ms: now_ms,
            created_at_ms: now_ms,
            updated_at_ms: now_ms,
            requested_by: requested_by.to_string(),
            reason: reason.to_string(),
            last_error: None,
            vms_evacuated: Vec::new(),
            fenced_at_ms: None,
            evacuated_at_ms: None,
            finished_at_ms: None,
            fence_unverified_at_ms: None,
            fence_retries: 0,
            vms_unverified: Vec::new(),
            epoch: None,
            generation: 1,
        }
    }

    pub fn step(&self) -> Option<Step> {
        if self.status == Status::Active {
            self.plan.get(self.step_index).copied()
        } else {
            None
        }
    }

    /// Whether the remediation is between fence retry rounds: its fence could not be
    /// verified, nothing is half done, and the next round has not begun.
    pub fn awaiting_fence_retry(&self) -> bool {
        self.fence_unverified_at_ms.is_some()
            && self.attempts == 0
            && self.step() == Some(Step::PowerOff)
    }

    /// Whether an operator may cancel now: not while a power-off is half done, so nobody
    /// is left guessing the node's power state; between fence retry rounds, yes.
    pub fn cancellable(&self) -> bool {
        self.step()
            .is_some_and(|step| step.cancellable() || self.awaiting_fence_retry())
    }

    /// How long a finished remediation spent in each phase it went through, in ms, for
    /// the phase histograms: [`PHASE_FENCE`], [`PHASE_EVACUATE`], [`PHASE_RECOVER`] (only
    /// for one that brought its node back to Ready) and [`PHASE_TOTAL`]. Empty while it
    /// is active.
    pub fn phase_durations_ms(&self) -> Vec<(&'static str, i64)> {
        let Some(finished) = self
            .finished_at_ms
            .filter(|_| self.status != Status::Active)
        else {
            return Vec::new();
        };
        let mut phases = Vec::with_capacity(4);
        if let Some(fenced) = self.fenced_at_ms {
            phases.push((PHASE_FENCE, fenced - self.created_at_ms));
            if let Some(evacuated) = self.evacuated_at_ms {
                phases.push((PHASE_EVACUATE, evacuated - fenced));
            }
        }
        let rebuilds = self.plan.contains(&Step::AwaitReady);
        if self.status == Status::Done && rebuilds {
            let from = self
                .evacuated_at_ms
                .or(self.fenced_at_ms)
                .unwrap_or(self.created_at_ms);
            phases.push((PHASE_RECOVER, finished - from));
        }
        phases.push((PHASE_TOTAL, finished - self.created_at_ms));
        phases
    }
}

/// A node last heard → its automatic remediation started (silence, grace, quiet period,
/// the BMC's confirmation): how long a crash took to be acted on.
pub const PHASE_DETECT: &str = "detect";
/// Remediation started → fence verified (power read back off).
pub const PHASE_FENCE: &str = "fence";
/// Fence verified → every VM evacuated.
pub const PHASE_EVACUATE: &str = "evacuate";
/// Fence verified or VMs evacuated, whichever came last → the node Ready again.
pub const PHASE_RECOVER: &str = "recover";
/// Remediation started → finished, whatever the outcome.
pub const PHASE_TOTAL: &str = "total";

/// What running the current step once produced.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Outcome {
    /// The step is complete.
    Done,
    /// Not yet (a readback still says on, the node is still booting): try again.
    NotYet(String),
    /// The attempt failed (timeout, refused, unreachable): try again with backoff.
    Failed(String),
    /// Waiting is pointless: the node stopped short of its next boot milestone past its
    /// deadline (the boot watchdog). A rebuild power-cycles it now.
    Stalled(String),
    /// The node is applying a firmware update within that update's deadline: never
    /// power-cycled for it (a flash cut off can brick the machine), and the wait for Ready
    /// (`ready_timeout_ms`) starts again from here.
    Flashing(String),
}

/// What the controller must do to the node's lifecycle along with an advance.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Advance {
    pub remediation: Remediation,
    /// Lifecycle events to apply to the node, in order, in the same write.
    pub node_events: Vec<LifecycleEvent>,
    /// A line for the audit trail.
    pub note: String,
}

/// Whether a fence step that exhausted its budget is retried rather than given up: only
/// an automatic remediation (its node went silent; an operator who asked is told at once
/// and decides), only before anything was evacuated, and within the retry window.
fn fence_retry_allowed(
    remediation: &Remediation,
    step: Step,
    now_ms: TimestampMs,
    limits: &Limits,
) -> bool {
    let first_failure = remediation.fence_unverified_at_ms.unwrap_or(now_ms);
    remediation.kind == RemediationKind::Automatic
        && matches!(step, Step::SoftOff | Step::PowerOff | Step::VerifyOff)
        && remediation.plan.contains(&Step::PowerOff)
        && limits.fence_retry_window_ms > 0
        && now_ms - first_failure < limits.fence_retry_window_ms
}

/// The wait before fence retry round `round` (1 for the first): `backoff_max_ms`,
/// doubling, capped at `fence_retry_backoff_max_ms`.
pub fn fence_retry_wait_ms(round: u32, limits: &Limits) -> i64 {
    let doublings = round.saturating_sub(1).min(16);
    (limits.backoff_max_ms << doublings).min(limits.fence_retry_backoff_max_ms)
}

fn backoff_ms(attempts: u32, limits: &Limits) -> i64 {
    let doublings = attempts.saturating_sub(1).min(16);
    (limits.backoff_initial_ms << doublings).min(limits.backoff_max_ms)
}

/// The lifecycle events that entering `step` implies for a node in `state`.
pub fn entering(step: Step, state: LifecycleState) -> Vec<LifecycleEvent> {
    match step {
        Step::SoftOff | Step::PowerOff
            if matches!(
                state,
                LifecycleState::Registered
                    | LifecycleState::Provisioning
                    | LifecycleState::Ready
                    | LifecycleState::Suspect
                    | LifecycleState::Fenced
            ) =>
        {
            vec![LifecycleEvent::FenceStarted]
        }
        // After a fence, or (a boot retry) straight from a stalled boot.
        Step::Rebuild
            if matches!(
                state,
                LifecycleState::Fenced | LifecycleState::Registered | LifecycleState::Provisioning
            ) =>
        {
            vec![LifecycleEvent::RebuildStarted]
        }
        _ => vec![],
    }
}

/// Why a remediation may not start on a node.
#[derive(Clone, Copy, Debug, PartialEq, Eq, thiserror::Error)]
#[error("node is {state}; a {} remediation needs a node that is {}", kind.as_str(), startable_states(*kind))]
pub struct NotStartable {
    pub kind: RemediationKind,
    pub state: LifecycleState,
}

/// Whether a remediation of `kind` may start on a node in `state`. Automatic ones only
/// take nodes the health judgement watches (Ready, Suspect); an operator may also take a
/// node stuck mid-boot (Registered, Provisioning) or one already fenced. Never a node in
/// maintenance (a human holds it), being fenced or rebuilt (a saga holds it), never
/// registered (no BMC known) or retired. Every lifecycle event the plan can emit from an
/// admitted state is legal (`every_admitted_plan_emits_only_legal_events`).
pub fn may_start(kind: RemediationKind, state: LifecycleState) -> Result<(), NotStartable> {
    use LifecycleState as S;
    let admitted = match kind {
        RemediationKind::Automatic => matches!(state, S::Ready | S::Suspect),
        RemediationKind::BootRetry => matches!(state, S::Registered | S::Provisioning),
        _ => matches!(
            state,
            S::Registered | S::Provisioning | S::Ready | S::Suspect | S::Fenced
        ),
    };
    if admitted {
        Ok(())
    } else {
        Err(NotStartable { kind, state })
    }
}

/// The states [`may_start`] admits for `kind`, in words, for error messages.
fn startable_states(kind: RemediationKind) -> &'static str {
    match kind {
        RemediationKind::Automatic => "ready or suspect",
        RemediationKind::BootRetry => "registered or provisioning",
        _ => "registered, provisioning, ready, suspect or fenced",
    }
}

/// Advances `remediation` after its current step produced `outcome` at `now_ms`.
pub fn advance(
    remediation: &Remediation,
    outcome: &Outcome,
    now_ms: TimestampMs,
    limits: &Limits,
) -> Advance {
    let mut next = remediation.clone();
    next.updated_at_ms = now_ms;
    let Some(step) = remediation.step() else {
        return Advance {
            remediation: next,
            node_events: vec![],
            note: "remediation is not active".into(),
        };
    };
    let mut node_events = Vec::new();
    let note;
    match outcome {
        Outcome::Done => {
            next.last_error = None;
            match step {
                Step::VerifyOff => {
                    next.fenced_at_ms = Some(now_ms);
                    node_events.push(LifecycleEvent::FenceVerified);
                }
                Step::Evacuate => next.evacuated_at_ms = Some(now_ms),
                Step::Maintenance => node_events.push(LifecycleEvent::MaintenanceOn),
                _ => {}
            }
            note = format!("{} done", step.as_str());
            next.step_index += 1;
            next.attempts = 0;
            next.step_started_at_ms = now_ms;
            next.next_attempt_at_ms = now_ms;
            if next.step_index >= next.plan.len() {
                next.status = Status::Done;
                next.finished_at_ms = Some(now_ms);
            }
        }
        Outcome::NotYet(detail)
        | Outcome::Failed(detail)
        | Outcome::Stalled(detail)
        | Outcome::Flashing(detail) => {
            next.last_error = Some(detail.clone());
            let flashing = matches!(outcome, Outcome::Flashing(_));
            if flashing {
                next.step_started_at_ms = now_ms;
            }
            let timed_out = step == Step::AwaitReady
                && !flashing
                && (matches!(outcome, Outcome::Stalled(_))
                    || now_ms - remediation.step_started_at_ms >= limits.ready_timeout_ms);
            let exhausted = remediation.attempts >= step.attempts_max(limits);
            if step == Step::AwaitReady && timed_out {
                if next.rebuilds + 1 >= limits.rebuilds_max {
                    next.status = Status::Failed;
                    next.finished_at_ms = Some(now_ms);
                    node_events.push(LifecycleEvent::RebuildFailed);
                    note = format!(
                        "node not Ready after {} rebuild(s): giving up, node to maintenance ({detail})",
                        next.rebuilds + 1
                    );
                } else {
                    // Power-cycle into PXE again.
                    next.rebuilds += 1;
                    next.step_index -= 1;
                    next.attempts = 0;
                    next.step_started_at_ms = now_ms;
                    next.next_attempt_at_ms = now_ms;
                    note = format!(
                        "node not Ready in time ({detail}); rebuild attempt {}",
                        next.rebuilds + 1
                    );
                }
            } else if step == Step::VerifyEvacuated
                && now_ms - remediation.step_started_at_ms >= limits.evacuation_verify_timeout_ms
            {
                // Reported, not assumed done; the node's own recovery goes on.
                next.vms_unverified = vec![detail.clone()];
                next.step_index += 1;
                next.attempts = 0;
                next.step_started_at_ms = now_ms;
                next.next_attempt_at_ms = now_ms;
                note = format!(
                    "evacuation unverified after {} s: {detail}; going on",
                    limits.evacuation_verify_timeout_ms / 1000
                );
                if next.step_index >= next.plan.len() {
                    next.status = Status::Done;
                    next.finished_at_ms = Some(now_ms);
                }
            } else if exhausted && fence_retry_allowed(remediation, step, now_ms, limits) {
                // Nothing was evacuated and the node is still silent: its VMs are down
                // until the fence is verified, so keep trying (the BMC may answer again),
                // loudly, with a capped backoff, back from the hard power-off.
                let first_failure = remediation.fence_unverified_at_ms.unwrap_or(now_ms);
                next.fence_unverified_at_ms = Some(first_failure);
                next.fence_retries += 1;
                next.step_index = remediation
                    .plan
                    .iter()
                    .position(|s| *s == Step::PowerOff)
                    .expect("fence_retry_allowed checked the plan has a power-off");
                next.attempts = 0;
                next.step_started_at_ms = now_ms;
                let wait = fence_retry_wait_ms(next.fence_retries, limits);
                next.next_attempt_at_ms = now_ms + wait;
                node_events.push(LifecycleEvent::FenceFailed);
                note = format!(
                    "fence unverified: {} failed after {} attempt(s): {detail}; fence retry {} in {} s",
                    step.as_str(),
                    remediation.attempts,
                    next.fence_retries,
                    wait / 1000
                );
            } else if exhausted {
                next.status = Status::Failed;
                next.finished_at_ms = Some(now_ms);
                if matches!(step, Step::SoftOff | Step::PowerOff | Step::VerifyOff) {
                    // A fence we cannot verify is reported and handed to a human; it is
                    // never treated as done and never retried silently forever.
                    node_events.push(LifecycleEvent::FenceFailed);
                    node_events.push(LifecycleEvent::MaintenanceOn);
                } else if step == Step::Rebuild {
                    node_events.push(LifecycleEvent::RebuildFailed);
                }
                note = format!(
                    "{} failed after {} attempt(s): {detail}",
                    step.as_str(),
                    remediation.attempts
                );
            } else {
                let delay = match outcome {
                    Outcome::NotYet(_) if step == Step::SoftOff => limits.soft_off_grace_ms,
                    Outcome::NotYet(_) | Outcome::Flashing(_) if step == Step::AwaitReady => {
                        limits.ready_poll_ms
                    }
                    _ => backoff_ms(remediation.attempts, limits),
                };
                next.next_attempt_at_ms = now_ms + delay;
                note = format!(
                    "{} attempt {}: {detail}",
                    step.as_str(),
                    remediation.attempts
                );
            }
        }
    }
    Advance {
        remediation: next,
        node_events,
        note,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn fresh(kind: RemediationKind) -> Remediation {
        Remediation::new(NodeUuid::from_index(3, 1), kind, "test", "because", 1_000)
    }

    #[test]
    fn phase_durations_follow_what_the_remediation_went_through() {
        let timed = |kind, status, fenced, evacuated, finished| Remediation {
            status,
            fenced_at_ms: fenced,
            evacuated_at_ms: evacuated,
            finished_at_ms: finished,
            ..fresh(kind)
        };
        use RemediationKind::*;
        use Status::*;
        let check = |r: Remediation, expect: &[(&str, i64)]| {
            assert_eq!(
                r.phase_durations_ms(),
                expect,
                "{:?} {:?}",
                r.kind,
                r.status
            )
        };
        // Still active: nothing observed yet.
        check(timed(Automatic, Active, Some(5_000), None, None), &[]);
        // A full automatic run: fence, evacuate, recover, total.
        check(
            timed(Automatic, Done, Some(6_000), Some(16_000), Some(100_000)),
            &[
                ("fence", 5_000),
                ("evacuate", 10_000),
                ("recover", 84_000),
                ("total", 99_000),
            ],
        );
        // An operator's fence: no recovery phase.
        check(
            timed(Fence, Done, Some(3_000), None, Some(3_000)),
            &[("fence", 2_000), ("total", 2_000)],
        );
        // Failed before the fence verified: only the total.
        check(
            timed(Automatic, Failed, None, None, Some(61_000)),
            &[("total", 60_000)],
        );
        // A boot retry rebuilds without fencing: recovery counts from the start.
        check(
            timed(BootRetry, Done, None, None, Some(301_000)),
            &[("recover", 300_000), ("total", 300_000)],
        );
    }

    /// Runs `remediation` to its end, giving each step the outcomes `script` returns.
    fn drive(
        remediation: Remediation,
        script: impl FnMut(Step, u32) -> Outcome,
    ) -> (Remediation, Vec<LifecycleEvent>) {
        drive_with(&Limits::default(), remediation, script)
    }

    fn drive_with(
        limits: &Limits,
        mut remediation: Remediation,
        mut script: impl FnMut(Step, u32) -> Outcome,
    ) -> (Remediation, Vec<LifecycleEvent>) {
        let limits = limits.clone();
        let mut events = Vec::new();
        let mut now = 1_000;
        for _ in 0..10_000 {
            let Some(step) = remediation.step() else {
                return (remediation, events);
            };
            remediation.attempts += 1;
            let outcome = script(step, remediation.attempts);
            let advance = advance(&remediation, &outcome, now, &limits);
            events.extend(advance.node_events);
            remediation = advance.remediation;
            now = remediation.next_attempt_at_ms.max(now + 1);
        }
        panic!("remediation never ended");
    }

    /// Every way a saga can end from `state`: each step either completes or exhausts its
    /// budget, and a rebuild may time out (and be retried) before the node comes back.
    /// Walks the lifecycle with exactly the events the controller applies (`entering` on
    /// a step's first attempt, then the advance's), and returns the first illegal one.
    fn first_illegal_event(kind: RemediationKind, state: LifecycleState) -> Option<String> {
        let limits = Limits::default();
        // (remediation, node state, path so far), explored depth-first.
        let mut pending = vec![(fresh(kind), state, String::new())];
        let mut explored = 0;
        while let Some((remediation, state, path)) = pending.pop() {
            explored += 1;
            assert!(explored < 100_000, "saga exploration does not end");
            let Some(step) = remediation.step() else {
                continue;
            };
            let mut state = state;
            if remediation.attempts == 0 {
                for event in entering(step, state) {
                    match crate::core::lifecycle::transition(state, event) {
                        Ok(next) => state = next,
                        Err(error) => {
                            return Some(format!("{path} enter {}: {error}", step.as_str()))
                        }
                    }
                }
            }
            let mut attempt = remediation.clone();
            attempt.attempts += 1;
            let outcomes: Vec<(Outcome, i64)> = if step == Step::AwaitReady {
                // The node came back, or did not within the timeout.
                vec![
                    (Outcome::Done, 0),
                    (Outcome::NotYet("booting".into()), limits.ready_timeout_ms),
                ]
            } else if step == Step::VerifyEvacuated {
                // The VMs run elsewhere, or not within the bound (reported, going on).
                vec![
                    (Outcome::Done, 0),
                    (
                        Outcome::NotYet("vm1 REBUILD".into()),
                        limits.evacuation_verify_timeout_ms,
                    ),
                ]
            } else {
                // A fence that fails again after a retry fails past the retry window,
                // so the exploration ends; the first failure schedules a retry.
                let elapsed = if attempt.fence_retries > 0 {
                    limits.fence_retry_window_ms
                } else {
                    0
                };
                let exhaust = (Outcome::Failed("refused".into()), elapsed);
                if attempt.attempts >= step.attempts_max(&limits) {
                    vec![(Outcome::Done, 0), exhaust]
                } else {
                    // Failing short of the budget changes no state; skip to the last try.
                    attempt.attempts = step.attempts_max(&limits) - 1;
                    vec![
                        (Outcome::Done, 0),
                        (Outcome::Failed("refused".into()), elapsed),
                    ]
                }
            };
            for (outcome, elapsed) in outcomes {
                let mut node_state = state;
                if step == Step::AwaitReady && outcome == Outcome::Done {
                    // Coming back means stage 2 reported installed.
                    match crate::core::lifecycle::transition(node_state, LifecycleEvent::Installed)
                    {
                        Ok(next) => node_state = next,
                        Err(_) => continue,
                    }
                }
                let advance = advance(
                    &attempt,
                    &outcome,
                    attempt.step_started_at_ms + elapsed,
                    &limits,
                );
                let path = format!("{path} {}:{:?}", step.as_str(), outcome);
                for event in &advance.node_events {
                    match crate::core::lifecycle::transition(node_state, *event) {
                        Ok(next) => node_state = next,
                        Err(error) => return Some(format!("{path}: {error}")),
                    }
                }
                pending.push((advance.remediation, node_state, path));
            }
        }
        None
    }

    #[test]
    fn every_admitted_plan_emits_only_legal_events() {
        let kinds = [
            RemediationKind::Automatic,
            RemediationKind::Fence,
            RemediationKind::Evacuate,
            RemediationKind::Rebuild,
            RemediationKind::Drain,
            RemediationKind::BootRetry,
        ];
        let mut admitted = 0;
        for kind in kinds {
            for state in LifecycleState::ALL {
                if may_start(kind, state).is_err() {
                    continue;
                }
                admitted += 1;
                if let Some(illegal) = first_illegal_event(kind, state) {
                    panic!("{kind:?} from {state}: {illegal}");
                }
            }
        }
        // Automatic: 2 states; each operator kind: 5; a boot retry: 2.
        assert_eq!(admitted, 2 + 4 * 5 + 2);
    }

    #[test]
    fn the_explorer_finds_an_illegal_event() {
        // Proves the property test can fail: from Maintenance (never admitted) a fence's
        // verification is illegal, because entering it moves nothing.
        assert!(first_illegal_event(RemediationKind::Fence, LifecycleState::Maintenance).is_some());
    }

    #[test]
    fn operators_may_fence_nodes_stuck_mid_boot_but_not_held_ones() {
        use LifecycleState::*;
        for state in [Registered, Provisioning, Ready, Suspect, Fenced] {
            assert_eq!(may_start(RemediationKind::Fence, state), Ok(()), "{state}");
        }
        for state in [Discovered, Fencing, Rebuilding, Maintenance, Retired] {
            assert!(may_start(RemediationKind::Fence, state).is_err(), "{state}");
        }
        for state in [Registered, Provisioning, Fenced, Maintenance] {
            assert!(
                may_start(RemediationKind::Automatic, state).is_err(),
                "{state}"
            );
        }
        let refused = may_start(RemediationKind::Drain, Maintenance).unwrap_err();
        assert_eq!(
            refused.to_string(),
            "node is maintenance; a drain remediation needs a node that is registered, provisioning, ready, suspect or fenced"
        );
    }

    #[test]
    fn automatic_remediation_walks_every_step() {
        let (done, events) = drive(fresh(RemediationKind::Automatic), |_, _| Outcome::Done);
        assert_eq!(done.status, Status::Done);
        assert!(done.fenced_at_ms.is_some() && done.evacuated_at_ms.is_some());
        assert_eq!(events, vec![LifecycleEvent::FenceVerified]);
    }

    #[test]
    fn every_step_failing_once_is_retried_and_the_saga_completes() {
        for kind in [
            RemediationKind::Automatic,
            RemediationKind::Drain,
            RemediationKind::Fence,
        ] {
            let (done, _) = drive(fresh(kind), |_, attempt| {
                if attempt == 1 {
                    Outcome::Failed("transient".into())
                } else {
                    Outcome::Done
                }
            });
            assert_eq!(done.status, Status::Done, "{kind:?}");
        }
    }

    #[test]
    fn an_unverifiable_operator_fence_fails_and_hands_the_node_to_a_human() {
        let (failed, events) = drive(fresh(RemediationKind::Fence), |step, _| match step {
            Step::SoftOff | Step::PowerOff => Outcome::Done,
            _ => Outcome::NotYet("bmc still reports on".into()),
        });
        assert_eq!(failed.status, Status::Failed);
        assert_eq!(
            failed.plan[failed.step_index],
            Step::VerifyOff,
            "never got past the fence"
        );
        assert_eq!(failed.attempts, Limits::default().readbacks_max);
        assert_eq!(
            events,
            vec![LifecycleEvent::FenceFailed, LifecycleEvent::MaintenanceOn]
        );
        assert!(failed.fenced_at_ms.is_none());
    }

    #[test]
    fn an_unverifiable_automatic_fence_is_retried_until_the_bmc_answers() {
        // The BMC stays dark for two rounds, then answers.
        let mut rounds = 0;
        let (done, events) = drive(
            fresh(RemediationKind::Automatic),
            |step, attempt| match step {
                Step::VerifyOff if rounds < 2 => {
                    if attempt == Limits::default().readbacks_max {
                        rounds += 1;
                    }
                    Outcome::NotYet("no answer".into())
                }
                _ => Outcome::Done,
            },
        );
        assert_eq!(done.status, Status::Done);
        assert_eq!(done.fence_retries, 2);
        assert!(done.fence_unverified_at_ms.is_some() && done.fenced_at_ms.is_some());
        assert_eq!(
            events,
            vec![
                LifecycleEvent::FenceFailed,
                LifecycleEvent::FenceFailed,
                LifecycleEvent::FenceVerified
            ]
        );
    }

    #[test]
    fn a_fence_retry_restarts_at_the_hard_power_off_after_a_capped_wait() {
        let limits = Limits::default();
        let mut at_verify = fresh(RemediationKind::Automatic);
        at_verify.step_index = 2;
        at_verify.attempts = limits.readbacks_max;
        let advance = advance(&at_verify, &Outcome::NotYet("on".into()), 50_000, &limits);
        let retry = advance.remediation;
        assert_eq!(retry.status, Status::Active);
        assert_eq!(retry.step(), Some(Step::PowerOff));
        assert!(retry.awaiting_fence_retry() && retry.cancellable());
        assert_eq!(retry.next_attempt_at_ms, 50_000 + limits.backoff_max_ms);
        assert_eq!(advance.node_events, vec![LifecycleEvent::FenceFailed]);
        assert!(
            advance.note.contains("fence retry 1 in 30 s"),
            "{}",
            advance.note
        );
        assert_eq!(fence_retry_wait_ms(2, &limits), 60_000);
        assert_eq!(
            fence_retry_wait_ms(40, &limits),
            limits.fence_retry_backoff_max_ms
        );
        // Mid power-off it is not cancellable.
        let mut mid = retry.clone();
        mid.attempts = 1;
        assert!(!mid.cancellable());
    }

    #[test]
    fn fence_retries_end_at_the_window_and_hand_the_node_to_a_human() {
        let limits = Limits {
            fence_retry_window_ms: 10 * 60 * 1000,
            ..Limits::default()
        };
        let (failed, events) =
            drive_with(
                &limits,
                fresh(RemediationKind::Automatic),
                |step, _| match step {
                    Step::SoftOff => Outcome::Done,
                    _ => Outcome::Failed("unreachable".into()),
                },
            );
        assert_eq!(failed.status, Status::Failed);
        assert!(failed.fence_retries >= 1, "retried before giving up");
        assert_eq!(
            &events[events.len() - 2..],
            &[LifecycleEvent::FenceFailed, LifecycleEvent::MaintenanceOn]
        );
        let retried = events.len() - 2;
        assert_eq!(retried as u32, failed.fence_retries);
        // A zero window never retries.
        let never = Limits {
            fence_retry_window_ms: 0,
            ..Limits::default()
        };
        let (failed, _) = drive_with(
            &never,
            fresh(RemediationKind::Automatic),
            |step, _| match step {
                Step::SoftOff => Outcome::Done,
                _ => Outcome::Failed("unreachable".into()),
            },
        );
        assert_eq!((failed.status, failed.fence_retries), (Status::Failed, 0));
    }

    #[test]
    fn a_node_flashing_firmware_is_never_power_cycled_and_its_wait_for_ready_starts_after() {
        let limits = Limits::default();
        let mut waiting = fresh(RemediationKind::Automatic);
        waiting.step_index = waiting.plan.len() - 1;
        waiting.attempts = 1;
        waiting.step_started_at_ms = 10_000;
        // Long past ready_timeout_ms, but flashing: keep waiting, and count from now.
        let late = 10_000 + limits.ready_timeout_ms * 3;
        let flashing = Outcome::Flashing("applying a firmware update".into());
        let advance = super::advance(&waiting, &flashing, late, &limits);
        assert_eq!(advance.remediation.step(), Some(Step::AwaitReady));
        assert_eq!(advance.remediation.rebuilds, 0);
        assert_eq!(advance.remediation.step_started_at_ms, late);
        assert_eq!(
            advance.remediation.next_attempt_at_ms,
            late + limits.ready_poll_ms
        );
        // Once it is no longer flashing, the ordinary timeout runs from there.
        let mut after = advance.remediation.clone();
        after.attempts += 1;
        let not_yet = Outcome::NotYet("node is registered".into());
        let soon = super::advance(
            &after,
            &not_yet,
            late + limits.ready_timeout_ms - 1,
            &limits,
        );
        assert_eq!(soon.remediation.step(), Some(Step::AwaitReady));
        let timed_out = super::advance(&after, &not_yet, late + limits.ready_timeout_ms, &limits);
        assert_eq!(timed_out.remediation.step(), Some(Step::Rebuild));
    }

    #[test]
    fn a_stalled_boot_is_power_cycled_at_once_and_counts_as_a_rebuild() {
        let limits = Limits::default();
        let mut waiting = fresh(RemediationKind::Automatic);
        waiting.step_index = waiting.plan.len() - 1;
        waiting.attempts = 1;
        waiting.step_started_at_ms = 10_000;
        let stalled = Outcome::Stalled("stage1 for 130 s".into());
        let advance = advance(&waiting, &stalled, 140_000, &limits);
        assert_eq!(advance.remediation.step(), Some(Step::Rebuild));
        assert_eq!(advance.remediation.rebuilds, 1);
        assert!(
            advance.note.contains("stage1 for 130 s"),
            "{}",
            advance.note
        );
        // On the last allowed rebuild it gives up to a human.
        waiting.rebuilds = limits.rebuilds_max - 1;
        let advance = super::advance(&waiting, &stalled, 140_000, &limits);
        assert_eq!(advance.remediation.status, Status::Failed);
        assert_eq!(advance.node_events, vec![LifecycleEvent::RebuildFailed]);
    }

    #[test]
    fn an_evacuation_not_verified_in_time_is_reported_and_the_saga_goes_on() {
        let limits = Limits::default();
        let mut verifying = fresh(RemediationKind::Automatic);
        verifying.step_index = verifying
            .plan
            .iter()
            .position(|s| *s == Step::VerifyEvacuated)
            .unwrap();
        verifying.attempts = 3;
        verifying.step_started_at_ms = 0;
        let waiting = advance(
            &verifying,
            &Outcome::NotYet("vm1 REBUILD on cn2".into()),
            60_000,
            &limits,
        );
        assert_eq!(waiting.remediation.step(), Some(Step::VerifyEvacuated));
        assert!(waiting.remediation.next_attempt_at_ms > 60_000);
        let late = limits.evacuation_verify_timeout_ms;
        let reported = advance(
            &verifying,
            &Outcome::NotYet("vm1 REBUILD on cn2".into()),
            late,
            &limits,
        );
        assert_eq!(reported.remediation.step(), Some(Step::Rebuild));
        assert_eq!(
            reported.remediation.vms_unverified,
            vec!["vm1 REBUILD on cn2".to_string()]
        );
        assert!(
            reported.note.contains("evacuation unverified"),
            "{}",
            reported.note
        );
        // Every plan that evacuates verifies right after.
        for kind in [
            RemediationKind::Automatic,
            RemediationKind::Evacuate,
            RemediationKind::Drain,
        ] {
            let plan = kind.plan();
            let at = plan.iter().position(|s| *s == Step::Evacuate).unwrap();
            assert_eq!(plan[at + 1], Step::VerifyEvacuated, "{kind:?}");
        }
    }

    #[test]
    fn a_node_that_never_comes_back_is_rebuilt_then_given_up() {
        let (failed, events) = drive(fresh(RemediationKind::Automatic), |step, _| match step {
            Step::AwaitReady => Outcome::NotYet("still rebuilding".into()),
            _ => Outcome::Done,
        });
        assert_eq!(failed.status, Status::Failed);
        assert_eq!(failed.rebuilds + 1, Limits::default().rebuilds_max);
        assert_eq!(events.last(), Some(&LifecycleEvent::RebuildFailed));
    }

    #[test]
    fn advancing_a_finished_remediation_changes_nothing() {
        let (done, _) = drive(fresh(RemediationKind::Fence), |_, _| Outcome::Done);
        let again = advance(&done, &Outcome::Done, 99_999, &Limits::default());
        assert_eq!(again.remediation.status, Status::Done);
        assert_eq!(again.remediation.step_index, done.step_index);
        assert!(again.node_events.is_empty());
    }

    #[test]
    fn limits_are_validated_naming_the_key() {
        assert_eq!(Limits::default().validate(), Ok(()));
        let check = |limits: Limits, expect: &str| {
            let error = limits.validate().unwrap_err().to_string();
            assert!(error.contains(expect), "{error}");
        };
        check(
            Limits {
                readbacks_max: 0,
                ..Default::default()
            },
            "limits.readbacks_max 0",
        );
        check(
            Limits {
                backoff_max_ms: 10,
                ..Default::default()
            },
            "limits.backoff_max_ms 10",
        );
        check(
            Limits {
                soft_off_grace_ms: -1,
                ..Default::default()
            },
            "limits.soft_off_grace_ms -1",
        );
    }

    #[test]
    fn backoff_doubles_and_is_capped() {
        let limits = Limits::default();
        assert_eq!(backoff_ms(1, &limits), 1_000);
        assert_eq!(backoff_ms(2, &limits), 2_000);
        assert_eq!(backoff_ms(30, &limits), limits.backoff_max_ms);
    }
}
