//! Chaos drills (issue 14), pure: the drill file and its checks, which nodes it targets,
//! the blast-radius budget, the time window, and the drill's run as a state machine the
//! controller drives — what to inject next, what it observed of each target (detected,
//! fence verified, VMs elsewhere, Ready again), when to abort and what to restore — and
//! the report that sets the run beside the rehearsal's prediction.
//!
//! Nothing here performs I/O: the controller (`controller::drill`) reads the fleet into a
//! [`Observation`], calls [`Drill::poll`] with `now`, carries out the [`DrillAction`]s
//! through the BMC seam and records their outcome with [`Drill::record`].

use std::collections::{BTreeMap, BTreeSet};

use bearman_proto::uuid::NodeUuid;
use serde::{Deserialize, Serialize};

use super::lifecycle::LifecycleState;
use super::model::{NodeRole, TimestampMs};
use super::remediation::{Remediation, Status as RemediationStatus};

/// Limits on a drill file: a drill is a rehearsed, bounded experiment, not a fleet-wide
/// operation.
pub const NAME_MAX: usize = 64;
pub const DESCRIPTION_MAX: usize = 2_000;
pub const FILE_BYTES_MAX: usize = 64 * 1024;
pub const TARGETS_MAX: u32 = 100;
pub const DEADLINE_S_MAX: u64 = 24 * 3600;
pub const SPACING_S_MAX: u64 = 3600;

/// The fault a drill injects. Every one goes through the out-of-band path or the daemon
/// itself; none needs anything of the node's own software.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum FaultKind {
    /// A hard power-off through the BMC: the node's power supply fails.
    PowerLoss,
    /// A non-maskable interrupt through the BMC; a kernel booted with
    /// `unknown_nmi_panic=1` panics: the node hangs with its power on.
    KernelPanic,
    /// The daemon ignores the node's heartbeats (a partition as the daemon sees it),
    /// until the node is fenced or `silence_s` passes.
    Silence,
}

impl FaultKind {
    pub fn as_str(self) -> &'static str {
        match self {
            FaultKind::PowerLoss => "power_loss",
            FaultKind::KernelPanic => "kernel_panic",
            FaultKind::Silence => "silence",
        }
    }
}

/// A drill file.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DrillSpec {
    pub name: String,
    #[serde(default)]
    pub description: String,
    pub fault: FaultKind,
    /// `silence` only: the longest the daemon ignores a target's heartbeats (default: the
    /// abort deadline). Lifted earlier, as soon as the target's fence is verified.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub silence_s: Option<u64>,
    /// Seconds between one target's injection and the next (default 0: all at once).
    #[serde(default)]
    pub spacing_s: u64,
    pub targets: TargetSpec,
    #[serde(default)]
    pub hypothesis: Hypothesis,
    pub budget: Budget,
    #[serde(default)]
    pub abort: AbortConditions,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub window: Option<Window>,
}

/// Which nodes: named by uuid, or chosen by a selector with a count or a percentage.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TargetSpec {
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub uuids: Vec<NodeUuid>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rack: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub role: Option<NodeRole>,
    /// The state candidates must be in (default `ready`: a drill breaks a healthy node).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub state: Option<LifecycleState>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub count: Option<u32>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub percent: Option<u32>,
    /// Which of the candidates a count or percentage picks: the same seed picks the same
    /// nodes from the same fleet (the preview shows them); change it to pick others.
    #[serde(default)]
    pub seed: u64,
}

/// What the operator expects to happen; each item is judged in the report.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Hypothesis {
    /// Every target's VMs run elsewhere within this many seconds of its injection.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub vms_elsewhere_within_s: Option<u64>,
    /// Every target is Ready again within this many seconds of its injection.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ready_within_s: Option<u64>,
    /// At most this many fences in the whole fleet during the drill.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub fences_max: Option<u32>,
    /// No node but the targets goes Suspect or is remediated during the drill.
    #[serde(default = "yes")]
    pub others_untouched: bool,
}

impl Default for Hypothesis {
    fn default() -> Self {
        Hypothesis {
            vms_elsewhere_within_s: None,
            ready_within_s: None,
            fences_max: None,
            others_untouched: true,
        }
    }
}

/// The blast radius the drill may not exceed, checked against the targets before it
/// starts.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Budget {
    pub nodes_max: u32,
    /// Default: `nodes_max`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub per_rack_max: Option<u32>,
    /// Ready compute nodes that must remain outside the targets: the spare capacity the
    /// targets' VMs evacuate to.
    #[serde(default)]
    pub ready_compute_left_min: u32,
}

/// When the drill stops itself. All on by default.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AbortConditions {
    /// A node that is not a target goes Suspect (or is remediated).
    #[serde(default = "yes")]
    pub other_node_suspect: bool,
    /// A remediation guard trips: a rack's fencing paused or the fleet's stopped.
    #[serde(default = "yes")]
    pub guard_trips: bool,
    /// A target's remediation fails, or its evacuation leaves VMs unverified.
    #[serde(default = "yes")]
    pub evacuation_error: bool,
    /// Seconds from the start by which every target must be Ready again.
    #[serde(default = "default_deadline_s")]
    pub deadline_s: u64,
}

impl Default for AbortConditions {
    fn default() -> Self {
        AbortConditions {
            other_node_suspect: true,
            guard_trips: true,
            evacuation_error: true,
            deadline_s: default_deadline_s(),
        }
    }
}

fn yes() -> bool {
    true
}

fn default_deadline_s() -> u64 {
    1800
}

/// When a drill may start (UTC): on these days, from `from` until `to` (`HH:MM`).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Window {
    /// `mon` … `sun`; empty means every day.
    #[serde(default)]
    pub days: Vec<String>,
    pub from: String,
    pub to: String,
}

const DAYS: [&str; 7] = ["mon", "tue", "wed", "thu", "fri", "sat", "sun"];

fn minute_of_day(text: &str) -> Option<u32> {
    let (hours, minutes) = text.split_once(':')?;
    if hours.len() != 2 || minutes.len() != 2 {
        return None;
    }
    let hours: u32 = hours.parse().ok()?;
    let minutes: u32 = minutes.parse().ok()?;
    (hours < 24 && minutes < 60).then_some(hours * 60 + minutes)
}

impl Window {
    fn check(&self) -> Result<(), String> {
        for day in &self.days {
            if !DAYS.contains(&day.as_str()) {
                return Err(format!(
                    "window.days: {day:?} is not a day (one of {})",
                    DAYS.join(", ")
                ));
            }
        }
        let from = minute_of_day(&self.from)
            .ok_or_else(|| format!("window.from: {:?} is not HH:MM", self.from))?;
        let to = minute_of_day(&self.to)
            .ok_or_else(|| format!("window.to: {:?} is not HH:MM", self.to))?;
        if from >= to {
            return Err(format!(
                "window: from {} must be before to {} (one day, UTC)",
                self.from, self.to
            ));
        }
        Ok(())
    }

    /// Whether `now_ms` falls inside the window.
    pub fn contains(&self, now_ms: TimestampMs) -> bool {
        let days = now_ms.div_euclid(86_400_000);
        // 1970-01-01 was a Thursday.
        let weekday = DAYS[((days + 3).rem_euclid(7)) as usize];
        let minute = (now_ms.rem_euclid(86_400_000) / 60_000) as u32;
        let (Some(from), Some(to)) = (minute_of_day(&self.from), minute_of_day(&self.to)) else {
            return false;
        };
        (self.days.is_empty() || self.days.iter().any(|day| day == weekday))
            && minute >= from
            && minute < to
    }
}

impl DrillSpec {
    /// Parses and checks a drill file; the error names the key at fault.
    pub fn parse(text: &str) -> Result<DrillSpec, String> {
        if text.len() > FILE_BYTES_MAX {
            return Err(format!(
                "the drill file is {} bytes; at most {FILE_BYTES_MAX}",
                text.len()
            ));
        }
        let spec: DrillSpec = toml::from_str(text).map_err(|error| error.to_string())?;
        spec.check()?;
        Ok(spec)
    }

    pub fn check(&self) -> Result<(), String> {
        if self.name.is_empty()
            || self.name.len() > NAME_MAX
            || !self
                .name
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || b"-_.".contains(&b))
        {
            return Err(format!(
                "name: {:?} must be 1 to {NAME_MAX} characters of letters, digits, '-', '_' or '.'",
                self.name
            ));
        }
        if self.description.len() > DESCRIPTION_MAX {
            return Err(format!("description: at most {DESCRIPTION_MAX} bytes"));
        }
        match (self.fault, self.silence_s) {
            (FaultKind::Silence, Some(0)) => return Err("silence_s: must be at least 1".into()),
            (FaultKind::Silence, Some(s)) if s > DEADLINE_S_MAX => {
                return Err(format!("silence_s: at most {DEADLINE_S_MAX}"))
            }
            (FaultKind::Silence, _) | (_, None) => {}
            (fault, Some(_)) => {
                return Err(format!(
                    "silence_s: only for fault = \"silence\", not {:?}",
                    fault.as_str()
                ))
            }
        }
        if self.spacing_s > SPACING_S_MAX {
            return Err(format!("spacing_s: at most {SPACING_S_MAX}"));
        }
        let targets = &self.targets;
        let selector = targets.rack.is_some()
            || targets.role.is_some()
            || targets.state.is_some()
            || targets.count.is_some()
            || targets.percent.is_some();
        if targets.uuids.is_empty() {
            match (targets.count, targets.percent) {
                (None, None) => {
                    return Err(
                        "targets: name nodes with `uuids`, or choose them with a selector (rack, role, state) and `count` or `percent`".into(),
                    )
                }
                (Some(_), Some(_)) => {
                    return Err("targets: `count` or `percent`, not both".into())
                }
                (Some(count), None) if count == 0 || count > TARGETS_MAX => {
                    return Err(format!("targets.count: 1 to {TARGETS_MAX}"))
                }
                (None, Some(percent)) if percent == 0 || percent > 100 => {
                    return Err("targets.percent: 1 to 100".into())
                }
                _ => {}
            }
        } else {
            if selector {
                return Err(
                    "targets: `uuids` names the nodes; a selector (rack, role, state, count, percent) cannot be added to it".into(),
                );
            }
            if targets.uuids.len() > TARGETS_MAX as usize {
                return Err(format!("targets.uuids: at most {TARGETS_MAX}"));
            }
            let distinct: BTreeSet<&NodeUuid> = targets.uuids.iter().collect();
            if distinct.len() != targets.uuids.len() {
                return Err("targets.uuids: a node is named twice".into());
            }
        }
        if self.budget.nodes_max == 0 || self.budget.nodes_max > TARGETS_MAX {
            return Err(format!("budget.nodes_max: 1 to {TARGETS_MAX}"));
        }
        if self.budget.per_rack_max == Some(0) {
            return Err("budget.per_rack_max: at least 1".into());
        }
        if self.abort.deadline_s == 0 || self.abort.deadline_s > DEADLINE_S_MAX {
            return Err(format!("abort.deadline_s: 1 to {DEADLINE_S_MAX}"));
        }
        for (key, value) in [
            (
                "hypothesis.vms_elsewhere_within_s",
                self.hypothesis.vms_elsewhere_within_s,
            ),
            ("hypothesis.ready_within_s", self.hypothesis.ready_within_s),
        ] {
            if let Some(value) = value {
                if value == 0 || value > self.abort.deadline_s {
                    return Err(format!(
                        "{key}: 1 to abort.deadline_s ({}): the drill stops watching at its deadline",
                        self.abort.deadline_s
                    ));
                }
            }
        }
        if let Some(window) = &self.window {
            window.check()?;
        }
        Ok(())
    }

    /// How long a `silence` lasts at most.
    pub fn silence_ms(&self) -> i64 {
        (self.silence_s.unwrap_or(self.abort.deadline_s) * 1000) as i64
    }
}

/// What target selection and the budget need of a node.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Candidate {
    pub uuid: NodeUuid,
    pub hostname: String,
    pub rack: Option<String>,
    pub role: NodeRole,
    pub state: LifecycleState,
    /// In an operator's or the controller's maintenance hold.
    pub held: bool,
}

impl Candidate {
    pub fn of(node: &super::model::Node) -> Candidate {
        Candidate {
            uuid: node.uuid.clone(),
            hostname: node.hostname.clone(),
            rack: node.rack.clone(),
            role: node.role,
            state: node.state,
            held: node.maintenance.is_some(),
        }
    }
}

/// FNV-1a: a stable, dependency-free order for the seeded pick (not a security hash).
fn pick_order(seed: u64, uuid: &NodeUuid) -> u64 {
    let mut hash: u64 = 0xcbf2_9ce4_8422_2325;
    for byte in seed.to_le_bytes().iter().chain(uuid.to_string().as_bytes()) {
        hash ^= u64::from(*byte);
        hash = hash.wrapping_mul(0x0100_0000_01b3);
    }
    hash
}

/// The nodes the drill targets, in injection order.
pub fn select_targets(spec: &TargetSpec, fleet: &[Candidate]) -> Result<Vec<Candidate>, String> {
    if !spec.uuids.is_empty() {
        let mut chosen = Vec::with_capacity(spec.uuids.len());
        for uuid in &spec.uuids {
            let node = fleet
                .iter()
                .find(|node| &node.uuid == uuid)
                .ok_or_else(|| format!("targets.uuids: no node {uuid}"))?;
            chosen.push(node.clone());
        }
        return Ok(chosen);
    }
    let state = spec.state.unwrap_or(LifecycleState::Ready);
    let mut candidates: Vec<&Candidate> = fleet
        .iter()
        .filter(|node| {
            node.state == state
                && !node.held
                && spec
                    .rack
                    .as_ref()
                    .is_none_or(|rack| node.rack.as_ref() == Some(rack))
                && spec.role.is_none_or(|role| node.role == role)
        })
        .collect();
    let wanted = match (spec.count, spec.percent) {
        (Some(count), _) => count as usize,
        (None, Some(percent)) => (candidates.len() * percent as usize).div_ceil(100).max(1),
        (None, None) => return Err("targets: no count or percent".into()),
    };
    if candidates.len() < wanted {
        return Err(format!(
            "targets: {wanted} wanted, only {} node(s) match (state {}{}{}, not in maintenance)",
            candidates.len(),
            state.as_str(),
            spec.rack
                .as_ref()
                .map(|rack| format!(", rack {rack}"))
                .unwrap_or_default(),
            spec.role
                .map(|role| format!(", role {}", role.as_str()))
                .unwrap_or_default(),
        ));
    }
    candidates.sort_by_key(|node| (pick_order(spec.seed, &node.uuid), node.uuid.clone()));
    Ok(candidates.into_iter().take(wanted).cloned().collect())
}

/// What the budget and the preflight found wrong with a drill about to start; empty
/// when it may start. Each line names the limit and the numbers.
pub fn budget_violations(
    spec: &DrillSpec,
    targets: &[Candidate],
    fleet: &[Candidate],
) -> Vec<String> {
    let mut violations = Vec::new();
    let budget = &spec.budget;
    if targets.len() > budget.nodes_max as usize {
        violations.push(format!(
            "budget.nodes_max: {} targets, at most {}",
            targets.len(),
            budget.nodes_max
        ));
    }
    let per_rack_max = budget.per_rack_max.unwrap_or(budget.nodes_max) as usize;
    let mut per_rack: BTreeMap<&str, usize> = BTreeMap::new();
    for target in targets {
        *per_rack
            .entry(target.rack.as_deref().unwrap_or("(no rack)"))
            .or_default() += 1;
    }
    for (rack, count) in per_rack {
        if count > per_rack_max {
            violations.push(format!(
                "budget.per_rack_max: {count} targets in rack {rack}, at most {per_rack_max}"
            ));
        }
    }
    let targeted: BTreeSet<&NodeUuid> = targets.iter().map(|node| &node.uuid).collect();
    let spare = fleet
        .iter()
        .filter(|node| {
            node.role == NodeRole::Compute
                && node.state == LifecycleState::Ready
                && !node.held
                && !targeted.contains(&node.uuid)
        })
        .count();
    if spare < budget.ready_compute_left_min as usize {
        violations.push(format!(
            "budget.ready_compute_left_min: {spare} Ready compute node(s) would be left, at least {} wanted",
            budget.ready_compute_left_min
        ));
    }
    violations
}

/// One check of the preflight, for one target or the whole fleet.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct PreflightCheck {
    /// A target's uuid, or `None` for a fleet-wide check.
    pub uuid: Option<NodeUuid>,
    pub check: String,
    pub passed: bool,
    pub detail: String,
}

/// The phases a target goes through, in order.
pub const PHASES: [&str; 4] = ["detected", "fence_verified", "vms_elsewhere", "ready"];

/// When each phase was reached (absolute), for one target.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Timeline {
    pub detected_ms: Option<TimestampMs>,
    pub fence_verified_ms: Option<TimestampMs>,
    pub vms_elsewhere_ms: Option<TimestampMs>,
    pub ready_ms: Option<TimestampMs>,
}

impl Timeline {
    pub fn get(&self, phase: &str) -> Option<TimestampMs> {
        match phase {
            "detected" => self.detected_ms,
            "fence_verified" => self.fence_verified_ms,
            "vms_elsewhere" => self.vms_elsewhere_ms,
            "ready" => self.ready_ms,
            _ => None,
        }
    }
}

/// One target's run.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct TargetRun {
    pub uuid: NodeUuid,
    pub hostname: String,
    pub rack: Option<String>,
    /// Recorded before the BMC call (or the silence write) goes out: a run found with
    /// this set and no outcome was cut off mid-injection and is aborted.
    pub inject_sent_at_ms: Option<TimestampMs>,
    pub injected_at_ms: Option<TimestampMs>,
    pub injection_error: Option<String>,
    /// The remediation the fault caused, once seen.
    pub remediation_id: Option<i64>,
    pub timeline: Timeline,
    /// `silence`: when the daemon listened to it again.
    pub silence_lifted_at_ms: Option<TimestampMs>,
    /// What the abort did to put it back, if anything.
    pub restored: Option<String>,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum DrillPhase {
    Injecting,
    Watching,
    /// Aborted: undoing what the drill did.
    Restoring,
    Finished,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Abort {
    pub at_ms: TimestampMs,
    /// `drill` when an abort condition tripped, else the operator's token name.
    pub by: String,
    pub reason: String,
}

/// Something the drill did not plan: another node touched, a guard tripping.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Unexpected {
    pub at_ms: TimestampMs,
    pub uuid: Option<NodeUuid>,
    pub what: String,
}

/// The rehearsal's prediction: per phase, seconds from injection.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Prediction {
    /// Seeds the rehearsal ran.
    pub seeds: u32,
    /// Per phase (`PHASES`): p50 and p99 in seconds from injection.
    pub phases: BTreeMap<String, PhaseSpread>,
    /// Hypothesis items the rehearsal already found broken.
    #[serde(default)]
    pub broken: Vec<String>,
}

#[derive(Clone, Copy, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PhaseSpread {
    pub p50_s: f64,
    pub p99_s: f64,
}

impl Prediction {
    pub fn check(&self) -> Result<(), String> {
        for (phase, spread) in &self.phases {
            if !PHASES.contains(&phase.as_str()) {
                return Err(format!(
                    "prediction.phases: {phase:?} is not a phase (one of {})",
                    PHASES.join(", ")
                ));
            }
            if !(spread.p50_s.is_finite()
                && spread.p99_s.is_finite()
                && spread.p50_s >= 0.0
                && spread.p50_s <= spread.p99_s)
            {
                return Err(format!(
                    "prediction.phases.{phase}: need 0 <= p50_s <= p99_s, finite"
                ));
            }
        }
        Ok(())
    }
}

/// A drill, from its start to its report: what the board holds while it runs and the
/// history keeps after.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Drill {
    pub id: i64,
    pub spec: DrillSpec,
    pub started_by: String,
    pub started_at_ms: TimestampMs,
    pub phase: DrillPhase,
    pub targets: Vec<TargetRun>,
    /// Nodes already Suspect (or worse) or under remediation when the drill started: not
    /// counted as touched by it.
    pub already_unwell: BTreeSet<NodeUuid>,
    /// Racks whose fencing was paused, and whether the fleet's was stopped, at the start.
    pub guards_at_start: Vec<String>,
    /// Remediations that verified a fence during the drill (for `fences_max`).
    pub fences: BTreeSet<i64>,
    pub unexpected: Vec<Unexpected>,
    pub abort: Option<Abort>,
    pub finished_at_ms: Option<TimestampMs>,
    pub prediction: Option<Prediction>,
    pub preflight: Vec<PreflightCheck>,
}

/// What the controller reads of the fleet for one poll.
pub struct Observation<'a> {
    pub nodes: &'a [Candidate],
    /// Remediations active now, and those of the targets started since the drill began.
    pub remediations: &'a [Remediation],
    /// Racks whose fencing is paused now, plus `fleet` when fencing is stopped fleet-wide.
    pub guards: &'a [String],
}

/// What the controller must do for the drill.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum DrillAction {
    /// Record `inject_sent_at_ms` first, then inject the fault into this target.
    Inject { uuid: NodeUuid, fault: FaultKind },
    /// Stop ignoring this target's heartbeats.
    LiftSilence { uuid: NodeUuid },
    /// Power a target back on that the drill powered off and nobody remediated.
    PowerOn { uuid: NodeUuid },
}

/// What carrying out an action came to.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum ActionOutcome {
    Done,
    Failed(String),
    /// Not carried out, and rightly so (why): a restore power-on found a remediation had
    /// taken the node over since the step looked.
    Skipped(String),
}

fn unwell(state: LifecycleState) -> bool {
    matches!(
        state,
        LifecycleState::Suspect
            | LifecycleState::Fencing
            | LifecycleState::Fenced
            | LifecycleState::Rebuilding
    )
}

impl Drill {
    /// A drill about to start, its targets chosen (the caller adds its preflight and
    /// the rehearsal's prediction).
    pub fn new(
        id: i64,
        spec: DrillSpec,
        targets: &[Candidate],
        started_by: &str,
        now: TimestampMs,
        observation: &Observation<'_>,
    ) -> Drill {
        let mut already_unwell: BTreeSet<NodeUuid> = observation
            .nodes
            .iter()
            .filter(|node| unwell(node.state))
            .map(|node| node.uuid.clone())
            .collect();
        already_unwell.extend(
            observation
                .remediations
                .iter()
                .filter(|r| r.status == RemediationStatus::Active)
                .map(|r| r.node_uuid.clone()),
        );
        Drill {
            id,
            spec,
            started_by: started_by.to_string(),
            started_at_ms: now,
            phase: DrillPhase::Injecting,
            targets: targets
                .iter()
                .map(|target| TargetRun {
                    uuid: target.uuid.clone(),
                    hostname: target.hostname.clone(),
                    rack: target.rack.clone(),
                    inject_sent_at_ms: None,
                    injected_at_ms: None,
                    injection_error: None,
                    remediation_id: None,
                    timeline: Timeline::default(),
                    silence_lifted_at_ms: None,
                    restored: None,
                })
                .collect(),
            already_unwell,
            guards_at_start: observation.guards.to_vec(),
            fences: BTreeSet::new(),
            unexpected: Vec::new(),
            abort: None,
            finished_at_ms: None,
            prediction: None,
            preflight: Vec::new(),
        }
    }

    pub fn is_finished(&self) -> bool {
        self.phase == DrillPhase::Finished
    }

    fn target_mut(&mut self, uuid: &NodeUuid) -> Option<&mut TargetRun> {
        self.targets.iter_mut().find(|target| &target.uuid == uuid)
    }

    /// Stops the drill: no more injections; the next poll restores what it did.
    pub fn abort(&mut self, now: TimestampMs, by: &str, reason: &str) {
        if self.abort.is_none() && !self.is_finished() {
            self.abort = Some(Abort {
                at_ms: now,
                by: by.to_string(),
                reason: reason.to_string(),
            });
            self.phase = DrillPhase::Restoring;
        }
    }

    /// Marks a target's injection as about to be sent (persist before sending).
    pub fn inject_sending(&mut self, uuid: &NodeUuid, now: TimestampMs) {
        if let Some(target) = self.target_mut(uuid) {
            target.inject_sent_at_ms = Some(now);
        }
    }

    /// A run resumed by a daemon that did not send the injections it finds sent without
    /// an outcome (it restarted, or another replica took over, mid-call): whether the
    /// fault landed is unknown, so the drill aborts and restores.
    pub fn resume_after_takeover(&mut self, now: TimestampMs) {
        let cut_off: Vec<String> = self
            .targets
            .iter()
            .filter(|t| {
                t.inject_sent_at_ms.is_some()
                    && t.injected_at_ms.is_none()
                    && t.injection_error.is_none()
            })
            .map(|t| t.hostname.clone())
            .collect();
        if !cut_off.is_empty() {
            self.abort(
                now,
                "drill",
                &format!(
                    "the daemon stopped (or lost leadership) while injecting into {}: whether the fault landed is unknown",
                    cut_off.join(", ")
                ),
            );
        }
    }

    /// Records what an action came to.
    pub fn record(&mut self, action: &DrillAction, outcome: ActionOutcome, now: TimestampMs) {
        match action {
            DrillAction::Inject { uuid, .. } => {
                let Some(target) = self.target_mut(uuid) else {
                    return;
                };
                match outcome {
                    ActionOutcome::Done => target.injected_at_ms = Some(now),
                    ActionOutcome::Failed(error) | ActionOutcome::Skipped(error) => {
                        let hostname = target.hostname.clone();
                        target.injection_error = Some(error.clone());
                        self.abort(
                            now,
                            "drill",
                            &format!("injecting into {hostname} failed: {error}"),
                        );
                    }
                }
            }
            DrillAction::LiftSilence { uuid } => {
                let Some(target) = self.target_mut(uuid) else {
                    return;
                };
                match outcome {
                    ActionOutcome::Done => target.silence_lifted_at_ms = Some(now),
                    ActionOutcome::Failed(error) => {
                        target.restored = Some(format!("lifting the silence failed: {error}"))
                    }
                    ActionOutcome::Skipped(why) => target.restored = Some(why),
                }
            }
            DrillAction::PowerOn { uuid } => {
                let Some(target) = self.target_mut(uuid) else {
                    return;
                };
                target.restored = Some(match outcome {
                    ActionOutcome::Done => "powered on".into(),
                    ActionOutcome::Failed(error) => format!("power on failed: {error}"),
                    ActionOutcome::Skipped(why) => why,
                });
            }
        }
        if self.phase == DrillPhase::Restoring && self.restore_actions().is_empty() {
            self.finish(now);
        }
    }

    fn finish(&mut self, now: TimestampMs) {
        self.phase = DrillPhase::Finished;
        self.finished_at_ms = Some(now);
    }

    /// One look: updates what the drill observed and decides what to do next.
    pub fn poll(&mut self, observation: &Observation<'_>, now: TimestampMs) -> Vec<DrillAction> {
        if self.is_finished() {
            return Vec::new();
        }
        self.observe(observation, now);
        if self.abort.is_none() {
            if let Some(reason) = self.abort_reason(observation, now) {
                self.abort(now, "drill", &reason);
            }
        }
        match self.phase {
            DrillPhase::Finished => Vec::new(),
            DrillPhase::Restoring => {
                let actions = self.restore_actions();
                if actions.is_empty() {
                    self.finish(now);
                }
                actions
            }
            DrillPhase::Injecting | DrillPhase::Watching => {
                let mut actions = self.silence_lifts(now);
                if self.phase == DrillPhase::Injecting {
                    let spacing_ms = (self.spec.spacing_s * 1000) as i64;
                    let mut all_sent = true;
                    for (index, target) in self.targets.iter().enumerate() {
                        if target.inject_sent_at_ms.is_some() {
                            continue;
                        }
                        all_sent = false;
                        if now >= self.started_at_ms + spacing_ms * index as i64 {
                            actions.push(DrillAction::Inject {
                                uuid: target.uuid.clone(),
                                fault: self.spec.fault,
                            });
                        }
                        // One injection per poll, in order: each is persisted as sent
                        // before the next is considered.
                        break;
                    }
                    if all_sent && self.targets.iter().all(|t| t.injected_at_ms.is_some()) {
                        self.phase = DrillPhase::Watching;
                    }
                }
                if self.phase == DrillPhase::Watching
                    && self.targets.iter().all(|t| t.timeline.ready_ms.is_some())
                    && actions.is_empty()
                {
                    self.finish(now);
                }
                actions
            }
        }
    }

    fn observe(&mut self, observation: &Observation<'_>, now: TimestampMs) {
        let started = self.started_at_ms;
        let target_ids: BTreeSet<NodeUuid> = self.targets.iter().map(|t| t.uuid.clone()).collect();
        for remediation in observation.remediations {
            if remediation.created_at_ms < started {
                continue;
            }
            if remediation.fenced_at_ms.is_some() {
                self.fences.insert(remediation.id);
            }
            if !target_ids.contains(&remediation.node_uuid)
                && !self.already_unwell.contains(&remediation.node_uuid)
            {
                self.touch(
                    now,
                    &remediation.node_uuid,
                    format!("remediation {} ({})", remediation.id, remediation.reason),
                );
            }
        }
        for node in observation.nodes {
            if unwell(node.state)
                && !target_ids.contains(&node.uuid)
                && !self.already_unwell.contains(&node.uuid)
            {
                self.touch(now, &node.uuid, format!("went {}", node.state.as_str()));
            }
        }
        for target in &mut self.targets {
            let Some(injected) = target.injected_at_ms else {
                continue;
            };
            let node = observation.nodes.iter().find(|n| n.uuid == target.uuid);
            // The newest remediation of this target since its injection.
            let remediation = observation
                .remediations
                .iter()
                .filter(|r| r.node_uuid == target.uuid && r.created_at_ms >= injected)
                .max_by_key(|r| r.id);
            if let Some(remediation) = remediation {
                target.remediation_id = Some(remediation.id);
                let timeline = &mut target.timeline;
                timeline.detected_ms =
                    Some(timeline.detected_ms.map_or(remediation.created_at_ms, |d| {
                        d.min(remediation.created_at_ms)
                    }));
                timeline.fence_verified_ms =
                    timeline.fence_verified_ms.or(remediation.fenced_at_ms);
                timeline.vms_elsewhere_ms =
                    timeline.vms_elsewhere_ms.or(remediation.evacuated_at_ms);
            }
            if let Some(node) = node {
                if unwell(node.state) && target.timeline.detected_ms.is_none() {
                    target.timeline.detected_ms = Some(now);
                }
                let remediation_done =
                    remediation.is_some_and(|r| r.status == RemediationStatus::Done);
                if node.state == LifecycleState::Ready
                    && remediation_done
                    && target.timeline.ready_ms.is_none()
                {
                    target.timeline.ready_ms = Some(
                        remediation
                            .and_then(|r| r.finished_at_ms)
                            .unwrap_or(now)
                            .max(injected),
                    );
                }
            }
        }
        let new_guards: Vec<String> = observation
            .guards
            .iter()
            .filter(|guard| !self.guards_at_start.contains(guard))
            .cloned()
            .collect();
        for guard in new_guards {
            let what = if guard == "fleet" {
                "fleet-wide fencing stopped".to_string()
            } else {
                format!("fencing paused in rack {guard}")
            };
            if !self.unexpected.iter().any(|u| u.what == what) {
                self.unexpected.push(Unexpected {
                    at_ms: now,
                    uuid: None,
                    what,
                });
            }
        }
    }

    fn touch(&mut self, now: TimestampMs, uuid: &NodeUuid, what: String) {
        if !self
            .unexpected
            .iter()
            .any(|u| u.uuid.as_ref() == Some(uuid))
        {
            self.unexpected.push(Unexpected {
                at_ms: now,
                uuid: Some(uuid.clone()),
                what,
            });
        }
    }

    fn abort_reason(&self, observation: &Observation<'_>, now: TimestampMs) -> Option<String> {
        let conditions = &self.spec.abort;
        if conditions.other_node_suspect {
            if let Some(other) = self.unexpected.iter().find(|u| u.uuid.is_some()) {
                return Some(format!(
                    "abort.other_node_suspect: node {} {}",
                    other
                        .uuid
                        .as_ref()
                        .map(|u| u.to_string())
                        .unwrap_or_default(),
                    other.what
                ));
            }
        }
        if conditions.guard_trips {
            if let Some(guard) = self.unexpected.iter().find(|u| u.uuid.is_none()) {
                return Some(format!("abort.guard_trips: {}", guard.what));
            }
        }
        if conditions.evacuation_error {
            for target in &self.targets {
                let Some(id) = target.remediation_id else {
                    continue;
                };
                let Some(remediation) = observation.remediations.iter().find(|r| r.id == id) else {
                    continue;
                };
                if matches!(
                    remediation.status,
                    RemediationStatus::Failed | RemediationStatus::Cancelled
                ) {
                    return Some(format!(
                        "abort.evacuation_error: remediation {id} of {} {}: {}",
                        target.hostname,
                        remediation.status.as_str(),
                        remediation
                            .last_error
                            .as_deref()
                            .unwrap_or("no error recorded")
                    ));
                }
                if !remediation.vms_unverified.is_empty() {
                    return Some(format!(
                        "abort.evacuation_error: remediation {id} of {}: VMs not verified elsewhere: {}",
                        target.hostname,
                        remediation.vms_unverified.join(", ")
                    ));
                }
            }
        }
        let deadline = self.started_at_ms + (conditions.deadline_s * 1000) as i64;
        if now >= deadline {
            let late: Vec<&str> = self
                .targets
                .iter()
                .filter(|t| t.timeline.ready_ms.is_none())
                .map(|t| t.hostname.as_str())
                .collect();
            if !late.is_empty() {
                return Some(format!(
                    "abort.deadline_s: {} s passed, not Ready again: {}",
                    conditions.deadline_s,
                    late.join(", ")
                ));
            }
        }
        None
    }

    /// `silence`: lift it once the target's fence is verified (the partition has done
    /// its work) or its time is up.
    fn silence_lifts(&self, now: TimestampMs) -> Vec<DrillAction> {
        if self.spec.fault != FaultKind::Silence {
            return Vec::new();
        }
        self.targets
            .iter()
            .filter(|t| {
                t.silence_lifted_at_ms.is_none()
                    && t.restored.is_none()
                    && t.injected_at_ms.is_some_and(|injected| {
                        t.timeline.fence_verified_ms.is_some()
                            || now >= injected + self.spec.silence_ms()
                    })
            })
            .map(|t| DrillAction::LiftSilence {
                uuid: t.uuid.clone(),
            })
            .collect()
    }

    /// After an abort: lift every silence still on; power back on what the drill
    /// powered off and no remediation took over. A remediation under way is left to
    /// finish — stopping one between fence and evacuation would strand its VMs.
    fn restore_actions(&self) -> Vec<DrillAction> {
        let mut actions = Vec::new();
        for target in &self.targets {
            let landed = target.injected_at_ms.is_some() || target.inject_sent_at_ms.is_some();
            if !landed || target.restored.is_some() {
                continue;
            }
            match self.spec.fault {
                FaultKind::Silence if target.silence_lifted_at_ms.is_none() => {
                    actions.push(DrillAction::LiftSilence {
                        uuid: target.uuid.clone(),
                    })
                }
                FaultKind::PowerLoss if target.remediation_id.is_none() => {
                    actions.push(DrillAction::PowerOn {
                        uuid: target.uuid.clone(),
                    })
                }
                _ => {}
            }
        }
        actions
    }

    /// The report: per target, each phase's actual time beside the prediction; each
    /// hypothesis item judged; what was unexpected.
    pub fn report(&self) -> DrillReport {
        let hypothesis = &self.spec.hypothesis;
        let mut items = Vec::new();
        let mut divergences = Vec::new();
        let mut targets = Vec::new();
        for target in &self.targets {
            let mut phases = Vec::new();
            for phase in PHASES {
                let actual_s = match (target.injected_at_ms, target.timeline.get(phase)) {
                    (Some(injected), Some(at)) => Some((at - injected) as f64 / 1000.0),
                    _ => None,
                };
                let predicted = self
                    .prediction
                    .as_ref()
                    .and_then(|p| p.phases.get(phase))
                    .copied();
                let beyond_p99 = match (actual_s, predicted) {
                    (Some(actual), Some(spread)) => actual > spread.p99_s,
                    // Predicted to happen, never did.
                    (None, Some(_)) => target.injected_at_ms.is_some() && self.is_finished(),
                    _ => false,
                };
                if beyond_p99 {
                    divergences.push(format!(
                        "{} {phase}: actual {} against predicted p99 {:.1} s",
                        target.hostname,
                        actual_s.map_or("never".to_string(), |a| format!("{a:.1} s")),
                        predicted.map_or(0.0, |p| p.p99_s)
                    ));
                }
                phases.push(PhaseReport {
                    phase: phase.to_string(),
                    actual_s,
                    predicted,
                    beyond_p99,
                });
            }
            targets.push(TargetReport {
                uuid: target.uuid.clone(),
                hostname: target.hostname.clone(),
                rack: target.rack.clone(),
                injected_at_ms: target.injected_at_ms,
                injection_error: target.injection_error.clone(),
                remediation_id: target.remediation_id,
                restored: target.restored.clone(),
                phases,
            });
        }
        let within =
            |phase: &str, limit: Option<u64>, key: &str, items: &mut Vec<HypothesisItem>| {
                let Some(limit) = limit else { return };
                let mut worst: Option<f64> = None;
                let mut missing = Vec::new();
                for target in &targets {
                    match target
                        .phases
                        .iter()
                        .find(|p| p.phase == phase)
                        .and_then(|p| p.actual_s)
                    {
                        Some(actual) => worst = Some(worst.map_or(actual, |w: f64| w.max(actual))),
                        None => missing.push(target.hostname.clone()),
                    }
                }
                let passed = missing.is_empty() && worst.is_some_and(|w| w <= limit as f64);
                let actual = if missing.is_empty() {
                    worst.map_or("no target".into(), |w| format!("slowest {w:.1} s"))
                } else {
                    format!("never for {}", missing.join(", "))
                };
                items.push(HypothesisItem {
                    item: key.to_string(),
                    expected: format!("<= {limit} s"),
                    actual,
                    passed,
                });
            };
        within(
            "vms_elsewhere",
            hypothesis.vms_elsewhere_within_s,
            "vms_elsewhere_within_s",
            &mut items,
        );
        within(
            "ready",
            hypothesis.ready_within_s,
            "ready_within_s",
            &mut items,
        );
        if let Some(max) = hypothesis.fences_max {
            items.push(HypothesisItem {
                item: "fences_max".into(),
                expected: format!("<= {max}"),
                actual: self.fences.len().to_string(),
                passed: self.fences.len() <= max as usize,
            });
        }
        if hypothesis.others_untouched {
            let touched: Vec<String> = self
                .unexpected
                .iter()
                .filter_map(|u| u.uuid.as_ref().map(|uuid| format!("{uuid} {}", u.what)))
                .collect();
            items.push(HypothesisItem {
                item: "others_untouched".into(),
                expected: "no other node Suspect or remediated".into(),
                actual: if touched.is_empty() {
                    "none".into()
                } else {
                    touched.join("; ")
                },
                passed: touched.is_empty(),
            });
        }
        let outcome = if self.abort.is_some() {
            "aborted"
        } else if !self.is_finished() {
            "running"
        } else if items.iter().all(|item| item.passed) {
            "passed"
        } else {
            "failed"
        };
        DrillReport {
            id: self.id,
            name: self.spec.name.clone(),
            fault: self.spec.fault,
            outcome: outcome.to_string(),
            phase: self.phase,
            started_by: self.started_by.clone(),
            started_at_ms: self.started_at_ms,
            finished_at_ms: self.finished_at_ms,
            abort: self.abort.clone(),
            targets,
            hypothesis: items,
            unexpected: self.unexpected.clone(),
            divergences,
            prediction_seeds: self.prediction.as_ref().map(|p| p.seeds),
        }
    }
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct DrillReport {
    pub id: i64,
    pub name: String,
    pub fault: FaultKind,
    /// `running`, `passed`, `failed` (a hypothesis item broken) or `aborted`.
    pub outcome: String,
    pub phase: DrillPhase,
    pub started_by: String,
    pub started_at_ms: TimestampMs,
    pub finished_at_ms: Option<TimestampMs>,
    pub abort: Option<Abort>,
    pub targets: Vec<TargetReport>,
    pub hypothesis: Vec<HypothesisItem>,
    pub unexpected: Vec<Unexpected>,
    /// Phases that took longer than the rehearsal's p99, or never came: the twin or the
    /// daemon is wrong, and these are the numbers that disagree.
    pub divergences: Vec<String>,
    pub prediction_seeds: Option<u32>,
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct TargetReport {
    pub uuid: NodeUuid,
    pub hostname: String,
    pub rack: Option<String>,
    pub injected_at_ms: Option<TimestampMs>,
    pub injection_error: Option<String>,
    pub remediation_id: Option<i64>,
    pub restored: Option<String>,
    pub phases: Vec<PhaseReport>,
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct PhaseReport {
    pub phase: String,
    /// Seconds from injection.
    pub actual_s: Option<f64>,
    pub predicted: Option<PhaseSpread>,
    pub beyond_p99: bool,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct HypothesisItem {
    pub item: String,
    pub expected: String,
    pub actual: String,
    pub passed: bool,
}

/// Ready compute nodes the twin asks the cloud about for their VM count (one call each).
pub const TWIN_VM_SAMPLE_MAX: usize = 50;

/// A twin of the live fleet, for rehearsing a drill in the simulator: the racks and their
/// nodes (role, state), the remediation settings the controller runs by, and how many VMs
/// compute nodes carry (sampled from the cloud). `bearman drill twin` saves it;
/// `bearman-sim` turns it into a scenario.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct FleetTwin {
    pub taken_at_ms: TimestampMs,
    /// By rack name (nodes without one under `-`), each rack's nodes by uuid.
    pub racks: Vec<TwinRack>,
    pub remediation: super::controller::ControllerConfig,
    /// `None` without a cloud, or when no Ready compute node could be asked.
    pub vms: Option<TwinVms>,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct TwinRack {
    pub name: String,
    pub nodes: Vec<TwinNode>,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct TwinNode {
    pub uuid: NodeUuid,
    pub hostname: String,
    pub role: NodeRole,
    pub state: LifecycleState,
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct TwinVms {
    /// Compute nodes asked.
    pub sampled_hosts: usize,
    /// Of those, how many the cloud answered for.
    pub answered: usize,
    pub mean_per_host: f64,
    pub max_per_host: u32,
}

impl FleetTwin {
    /// The racks of `fleet`, sorted by name, their nodes by uuid.
    pub fn racks_of(fleet: &[Candidate]) -> Vec<TwinRack> {
        let mut racks: BTreeMap<String, Vec<TwinNode>> = BTreeMap::new();
        for node in fleet {
            racks
                .entry(node.rack.clone().unwrap_or_else(|| "-".into()))
                .or_default()
                .push(TwinNode {
                    uuid: node.uuid.clone(),
                    hostname: node.hostname.clone(),
                    role: node.role,
                    state: node.state,
                });
        }
        racks
            .into_iter()
            .map(|(name, mut nodes)| {
                nodes.sort_by(|a, b| a.uuid.cmp(&b.uuid));
                TwinRack { name, nodes }
            })
            .collect()
    }
}

/// The fleet's drill board: the one drill running, if any, and the kill switch. One
/// record, written with a generation check, so two replicas never start two drills.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct DrillBoard {
    #[serde(default)]
    pub generation: i64,
    /// The id the next drill gets.
    #[serde(default)]
    pub last_id: i64,
    #[serde(default)]
    pub active: Option<Drill>,
    /// Set by `bearman drill abort`: no drill starts until an operator clears it.
    #[serde(default)]
    pub blocked: Option<Abort>,
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::core::remediation::RemediationKind;

    const FILE: &str = r#"
name = "rack-7-panic"
fault = "kernel_panic"
[targets]
rack = "r7"
count = 1
[hypothesis]
vms_elsewhere_within_s = 120
ready_within_s = 600
fences_max = 1
[budget]
nodes_max = 1
ready_compute_left_min = 2
"#;

    fn uuid(i: u32) -> NodeUuid {
        NodeUuid::from_index(0xd1, u64::from(i))
    }

    fn node(i: u32, rack: &str, state: LifecycleState) -> Candidate {
        Candidate {
            uuid: uuid(i),
            hostname: format!("n{i}"),
            rack: Some(rack.into()),
            role: NodeRole::Compute,
            state,
            held: false,
        }
    }

    fn fleet() -> Vec<Candidate> {
        (0..6)
            .map(|i| node(i, if i < 3 { "r7" } else { "r8" }, LifecycleState::Ready))
            .collect()
    }

    #[test]
    fn a_drill_file_parses_and_every_bad_key_is_named() {
        let spec = DrillSpec::parse(FILE).unwrap();
        assert_eq!(spec.fault, FaultKind::KernelPanic);
        assert!(spec.hypothesis.others_untouched);
        assert_eq!(spec.abort.deadline_s, 1800);
        let cases: &[(&str, &str, &str)] = &[
            ("fault = \"kernel_panic\"", "fault = \"meteor\"", "meteor"),
            ("count = 1", "count = 1\npercent = 5", "not both"),
            ("count = 1", "", "count` or `percent"),
            (
                "rack = \"r7\"\ncount = 1",
                "uuids = []\ncount = 0",
                "targets.count",
            ),
            ("nodes_max = 1", "nodes_max = 0", "budget.nodes_max"),
            ("name = \"rack-7-panic\"", "name = \"a b\"", "name:"),
            (
                "ready_within_s = 600",
                "ready_within_s = 4000",
                "hypothesis.ready_within_s",
            ),
            ("[budget]", "[budget]\nbogus = 1", "bogus"),
            (
                "fault = \"kernel_panic\"",
                "fault = \"kernel_panic\"\nsilence_s = 5",
                "silence_s",
            ),
        ];
        for (from, to, expect) in cases {
            let text = FILE.replacen(from, to, 1);
            let error = DrillSpec::parse(&text).unwrap_err();
            assert!(error.contains(expect), "{to:?}: {error}");
        }
        let window =
            format!("{FILE}[window]\ndays = [\"mon\"]\nfrom = \"15:00\"\nto = \"09:00\"\n");
        assert!(DrillSpec::parse(&window).unwrap_err().contains("window"));
        let uuids_and_selector =
            FILE.replacen("rack = \"r7\"", &format!("uuids = [\"{}\"]", uuid(1)), 1);
        assert!(DrillSpec::parse(&uuids_and_selector)
            .unwrap_err()
            .contains("cannot be added"));
    }

    #[test]
    fn the_window_is_judged_in_utc_by_day_and_minute() {
        let window = Window {
            days: vec!["mon".into(), "tue".into()],
            from: "09:00".into(),
            to: "15:00".into(),
        };
        // 2026-12-07 is a Monday.
        let monday = crate::core::calendar::days_from_civil(2026, 12, 7) * 86_400_000;
        assert!(window.contains(monday + 9 * 3_600_000));
        assert!(window.contains(monday + 15 * 3_600_000 - 60_000));
        assert!(!window.contains(monday + 15 * 3_600_000));
        assert!(!window.contains(monday + 8 * 3_600_000));
        assert!(
            !window.contains(monday - 86_400_000 + 10 * 3_600_000),
            "sunday"
        );
    }

    #[test]
    fn selection_is_seeded_stable_and_refuses_what_it_cannot_meet() {
        let spec = DrillSpec::parse(FILE).unwrap();
        let mut fleet = fleet();
        let first = select_targets(&spec.targets, &fleet).unwrap();
        assert_eq!(first.len(), 1);
        assert_eq!(first[0].rack.as_deref(), Some("r7"));
        assert_eq!(first, select_targets(&spec.targets, &fleet).unwrap());
        let picks: BTreeSet<NodeUuid> = (0..20)
            .map(|seed| {
                let targets = TargetSpec {
                    seed,
                    ..spec.targets.clone()
                };
                select_targets(&targets, &fleet).unwrap()[0].uuid.clone()
            })
            .collect();
        assert!(picks.len() > 1, "the seed changes the pick");
        // Not Ready, or in maintenance: not a candidate.
        for node in fleet.iter_mut().filter(|n| n.rack.as_deref() == Some("r7")) {
            node.held = true;
        }
        let error = select_targets(&spec.targets, &fleet).unwrap_err();
        assert!(error.contains("only 0 node(s) match"), "{error}");
        let percent = TargetSpec {
            count: None,
            percent: Some(34),
            rack: None,
            ..spec.targets.clone()
        };
        assert_eq!(
            select_targets(&percent, &super::tests::fleet())
                .unwrap()
                .len(),
            3
        );
        let named = TargetSpec {
            uuids: vec![uuid(99)],
            ..TargetSpec::default()
        };
        assert!(select_targets(&named, &fleet)
            .unwrap_err()
            .contains("no node"));
    }

    #[test]
    fn the_budget_names_each_limit_exceeded() {
        let mut spec = DrillSpec::parse(FILE).unwrap();
        let fleet = fleet();
        let targets: Vec<Candidate> = fleet[..2].to_vec();
        spec.budget.ready_compute_left_min = 5;
        let violations = budget_violations(&spec, &targets, &fleet);
        assert_eq!(violations.len(), 3, "{violations:?}");
        assert!(violations[0].starts_with("budget.nodes_max: 2 targets"));
        assert!(violations[1].starts_with("budget.per_rack_max: 2 targets in rack r7"));
        assert!(violations[2].contains("4 Ready compute node(s) would be left, at least 5"));
        spec.budget = Budget {
            nodes_max: 2,
            per_rack_max: None,
            ready_compute_left_min: 4,
        };
        assert!(budget_violations(&spec, &targets, &fleet).is_empty());
    }

    fn remediation(id: i64, node: u32, created: i64) -> Remediation {
        let mut r = Remediation::new(
            uuid(node),
            RemediationKind::Automatic,
            "system",
            "silent",
            created,
        );
        r.id = id;
        r
    }

    fn observe<'a>(
        nodes: &'a [Candidate],
        remediations: &'a [Remediation],
        guards: &'a [String],
    ) -> Observation<'a> {
        Observation {
            nodes,
            remediations,
            guards,
        }
    }

    fn started(spec: &str, fleet: &[Candidate]) -> Drill {
        let spec = DrillSpec::parse(spec).unwrap();
        let targets = vec![fleet[0].clone()];
        let mut drill = Drill::new(1, spec, &targets, "ops", 1_000, &observe(fleet, &[], &[]));
        drill.prediction = Some(Prediction {
            seeds: 20,
            phases: [
                (
                    "detected".to_string(),
                    PhaseSpread {
                        p50_s: 20.0,
                        p99_s: 30.0,
                    },
                ),
                (
                    "fence_verified".to_string(),
                    PhaseSpread {
                        p50_s: 40.0,
                        p99_s: 50.0,
                    },
                ),
                (
                    "vms_elsewhere".to_string(),
                    PhaseSpread {
                        p50_s: 60.0,
                        p99_s: 70.0,
                    },
                ),
                (
                    "ready".to_string(),
                    PhaseSpread {
                        p50_s: 200.0,
                        p99_s: 250.0,
                    },
                ),
            ]
            .into_iter()
            .collect(),
            broken: Vec::new(),
        });
        drill
    }

    #[test]
    fn a_drill_injects_watches_each_phase_and_reports_against_the_prediction() {
        let mut fleet = fleet();
        let mut drill = started(FILE, &fleet);
        let actions = drill.poll(&observe(&fleet, &[], &[]), 1_000);
        assert_eq!(
            actions,
            vec![DrillAction::Inject {
                uuid: uuid(0),
                fault: FaultKind::KernelPanic
            }]
        );
        drill.inject_sending(&uuid(0), 1_000);
        drill.record(&actions[0], ActionOutcome::Done, 1_000);
        assert!(drill.poll(&observe(&fleet, &[], &[]), 2_000).is_empty());
        assert_eq!(drill.phase, DrillPhase::Watching);
        // Detected at 25 s, fenced at 45 s, VMs elsewhere at 65 s, Ready at 301 s.
        fleet[0].state = LifecycleState::Suspect;
        drill.poll(&observe(&fleet, &[], &[]), 26_000);
        let mut r = remediation(7, 0, 30_000);
        r.fenced_at_ms = Some(46_000);
        r.evacuated_at_ms = Some(66_000);
        fleet[0].state = LifecycleState::Rebuilding;
        drill.poll(&observe(&fleet, std::slice::from_ref(&r), &[]), 70_000);
        r.status = RemediationStatus::Done;
        r.finished_at_ms = Some(301_000);
        fleet[0].state = LifecycleState::Ready;
        assert!(drill
            .poll(&observe(&fleet, std::slice::from_ref(&r), &[]), 302_000)
            .is_empty());
        assert!(drill.is_finished());
        let report = drill.report();
        let actual: Vec<Option<f64>> = report.targets[0]
            .phases
            .iter()
            .map(|p| p.actual_s)
            .collect();
        assert_eq!(
            actual,
            vec![Some(25.0), Some(45.0), Some(65.0), Some(300.0)]
        );
        // Ready at 300 s: beyond the rehearsal's p99 of 250 s, and the hypothesis' 600 s holds.
        assert_eq!(report.divergences.len(), 1, "{:?}", report.divergences);
        assert!(
            report.divergences[0].contains("ready: actual 300.0 s against predicted p99 250.0 s")
        );
        assert_eq!(report.outcome, "passed", "{:?}", report.hypothesis);
        assert_eq!(report.hypothesis.len(), 4);
    }

    #[test]
    fn another_node_going_suspect_aborts_and_a_power_loss_is_powered_back_on() {
        let text = FILE.replace("kernel_panic", "power_loss");
        let mut fleet = fleet();
        let mut drill = started(&text, &fleet);
        let inject = drill.poll(&observe(&fleet, &[], &[]), 1_000).remove(0);
        drill.inject_sending(&uuid(0), 1_000);
        drill.record(&inject, ActionOutcome::Done, 1_000);
        fleet[4].state = LifecycleState::Suspect;
        let actions = drill.poll(&observe(&fleet, &[], &[]), 5_000);
        assert_eq!(actions, vec![DrillAction::PowerOn { uuid: uuid(0) }]);
        assert_eq!(drill.phase, DrillPhase::Restoring);
        let abort = drill.abort.clone().unwrap();
        assert!(
            abort.reason.starts_with("abort.other_node_suspect"),
            "{}",
            abort.reason
        );
        drill.record(&actions[0], ActionOutcome::Done, 6_000);
        assert!(drill.is_finished());
        let report = drill.report();
        assert_eq!(report.outcome, "aborted");
        assert_eq!(report.targets[0].restored.as_deref(), Some("powered on"));
        assert!(
            !report
                .hypothesis
                .iter()
                .find(|i| i.item == "others_untouched")
                .unwrap()
                .passed
        );
    }

    #[test]
    fn a_restore_skipped_because_a_remediation_took_over_says_so_and_finishes() {
        let text = FILE.replace("kernel_panic", "power_loss");
        let fleet = fleet();
        let mut drill = started(&text, &fleet);
        let inject = drill.poll(&observe(&fleet, &[], &[]), 1_000).remove(0);
        drill.inject_sending(&uuid(0), 1_000);
        drill.record(&inject, ActionOutcome::Done, 1_000);
        drill.abort(2_000, "ops", "stop");
        let restore = drill.poll(&observe(&fleet, &[], &[]), 2_000);
        assert_eq!(restore, vec![DrillAction::PowerOn { uuid: uuid(0) }]);
        let why = "not powered on: remediation 4 took it over (it owns its power)";
        drill.record(&restore[0], ActionOutcome::Skipped(why.into()), 2_100);
        assert!(drill.is_finished());
        assert_eq!(drill.report().targets[0].restored.as_deref(), Some(why));
    }

    #[test]
    fn abort_conditions_each_trip_and_a_failed_injection_stops_the_rest() {
        let fleet = fleet();
        // A guard trips.
        let mut drill = started(FILE, &fleet);
        let inject = drill.poll(&observe(&fleet, &[], &[]), 1_000).remove(0);
        drill.inject_sending(&uuid(0), 1_000);
        drill.record(&inject, ActionOutcome::Done, 1_000);
        drill.poll(&observe(&fleet, &[], &["r7".to_string()]), 2_000);
        assert!(drill
            .abort
            .as_ref()
            .unwrap()
            .reason
            .contains("fencing paused in rack r7"));
        assert!(drill.is_finished(), "a kernel panic has nothing to restore");
        // The evacuation fails.
        let mut drill = started(FILE, &fleet);
        let inject = drill.poll(&observe(&fleet, &[], &[]), 1_000).remove(0);
        drill.record(&inject, ActionOutcome::Done, 1_000);
        let mut r = remediation(3, 0, 20_000);
        r.vms_unverified = vec!["vm-1".into()];
        drill.poll(&observe(&fleet, std::slice::from_ref(&r), &[]), 30_000);
        assert!(drill.abort.as_ref().unwrap().reason.contains("vm-1"));
        // The deadline passes.
        let mut drill = started(FILE, &fleet);
        let inject = drill.poll(&observe(&fleet, &[], &[]), 1_000).remove(0);
        drill.record(&inject, ActionOutcome::Done, 1_000);
        drill.poll(&observe(&fleet, &[], &[]), 1_000 + 1_800_000);
        assert!(drill
            .abort
            .as_ref()
            .unwrap()
            .reason
            .starts_with("abort.deadline_s: 1800 s passed"));
        // The injection fails: aborted, nothing left to inject.
        let mut drill = started(FILE, &fleet);
        let inject = drill.poll(&observe(&fleet, &[], &[]), 1_000).remove(0);
        drill.inject_sending(&uuid(0), 1_000);
        drill.record(&inject, ActionOutcome::Failed("bmc said no".into()), 1_000);
        assert!(drill.is_finished());
        assert_eq!(drill.report().outcome, "aborted");
        // Cut off mid-injection by a restart.
        let mut drill = started(FILE, &fleet);
        drill.poll(&observe(&fleet, &[], &[]), 1_000);
        drill.inject_sending(&uuid(0), 1_000);
        drill.resume_after_takeover(9_000);
        assert!(drill
            .abort
            .as_ref()
            .unwrap()
            .reason
            .contains("whether the fault landed is unknown"));
    }

    #[test]
    fn a_silence_is_lifted_once_fenced_and_targets_are_injected_in_turn() {
        let text = FILE
            .replace("kernel_panic", "silence")
            .replace("count = 1", "count = 2")
            .replace("nodes_max = 1", "nodes_max = 2\nper_rack_max = 2")
            .replace("fault = \"silence\"", "fault = \"silence\"\nspacing_s = 60");
        let fleet = fleet();
        let spec = DrillSpec::parse(&text).unwrap();
        let targets = select_targets(&spec.targets, &fleet).unwrap();
        let mut drill = Drill::new(2, spec, &targets, "ops", 0, &observe(&fleet, &[], &[]));
        let first = drill.poll(&observe(&fleet, &[], &[]), 0);
        assert_eq!(first.len(), 1);
        drill.inject_sending(&targets[0].uuid, 0);
        drill.record(&first[0], ActionOutcome::Done, 0);
        assert!(
            drill.poll(&observe(&fleet, &[], &[]), 30_000).is_empty(),
            "spaced 60 s"
        );
        let second = drill.poll(&observe(&fleet, &[], &[]), 60_000);
        assert_eq!(
            second,
            vec![DrillAction::Inject {
                uuid: targets[1].uuid.clone(),
                fault: FaultKind::Silence
            }]
        );
        drill.inject_sending(&targets[1].uuid, 60_000);
        drill.record(&second[0], ActionOutcome::Done, 60_000);
        let index = fleet
            .iter()
            .position(|n| n.uuid == targets[0].uuid)
            .unwrap() as u32;
        let mut r = remediation(9, index, 40_000);
        r.fenced_at_ms = Some(70_000);
        let lifts = drill.poll(&observe(&fleet, std::slice::from_ref(&r), &[]), 71_000);
        assert_eq!(
            lifts,
            vec![DrillAction::LiftSilence {
                uuid: targets[0].uuid.clone()
            }]
        );
        drill.record(&lifts[0], ActionOutcome::Done, 71_000);
        // An abort lifts the other one's silence, and nothing else.
        drill.abort(80_000, "ops", "kill switch");
        let restore = drill.poll(&observe(&fleet, std::slice::from_ref(&r), &[]), 80_000);
        assert_eq!(
            restore,
            vec![DrillAction::LiftSilence {
                uuid: targets[1].uuid.clone()
            }]
        );
        drill.record(&restore[0], ActionOutcome::Done, 80_000);
        assert!(drill.is_finished());
    }
}
