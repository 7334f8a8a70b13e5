//! Chaos drills: the preview (targets, budget, preflight — nothing done), the start (one
//! drill at a time, never while the kill switch is set), the controller's step (inject,
//! watch, abort, restore, file the finished drill), the kill switch, and the history.
//! The decisions are `core::drill`'s; every change is one generation-checked write of
//! the drill board with its audit events, so a drill survives a daemon restart or a
//! change of leader: a drill found cut off mid-injection is aborted and restored, any
//! other is resumed where it stands.

use std::sync::Arc;

use async_trait::async_trait;
use bearman_proto::uuid::NodeUuid;
use serde::{Deserialize, Serialize};

use super::{App, AppError, SYSTEM_ACTOR};
use crate::core::drill::{
    self, ActionOutcome, Candidate, Drill, DrillAction, DrillBoard, DrillReport, DrillSpec,
    FaultKind, Observation, Prediction, PreflightCheck,
};
use crate::core::lifecycle::LifecycleState;
use crate::core::model::{Action, NewEvent, Node, NodeFilter, TimestampMs};
use crate::core::remediation::Remediation;
use crate::store::StoreError;
use crate::store::LIST_LIMIT_MAX;

/// Finished drills kept listed (all are kept in the database).
pub const HISTORY_LIST_MAX: usize = 200;

/// The out-of-band path a drill injects through: the node's BMC, behind the same guards
/// as fencing. `controller::drill_faults` is the production one.
#[async_trait]
pub trait FaultInjector: Send + Sync {
    /// The preflight's BMC check: the BMC answers with these credentials, reads On, and
    /// its driver can inject `fault`. `Err` says which of these failed.
    async fn probe(&self, node: &Node, fault: FaultKind) -> Result<(), String>;
    /// `power_loss`: a hard power-off; `kernel_panic`: an NMI. Accepted by the BMC.
    async fn inject(&self, node: &Node, fault: FaultKind) -> Result<(), String>;
    /// Powers a node back on (an aborted `power_loss`), verified by readback.
    async fn power_on(&self, node: &Node) -> Result<(), String>;
}

/// See [`App::twin_sources`].
pub struct TwinSources {
    pub remediation: crate::core::controller::ControllerConfig,
    /// How many VMs a host runs, from the cloud (`controller::drill_faults::CloudVms`).
    pub vms: Option<Arc<dyn HostVms>>,
}

/// The twin's view of the cloud: the number of VMs on one host.
#[async_trait]
pub trait HostVms: Send + Sync {
    async fn vms_on_host(&self, host: &str) -> Result<usize, String>;
}

/// A cloud call for the twin's VM sample is given this long.
const TWIN_CLOUD_CALL_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(10);

/// What `POST /drills/preview` answers, and `POST /drills` before it starts one.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct DrillPlan {
    pub spec: DrillSpec,
    pub targets: Vec<Candidate>,
    pub preflight: Vec<PreflightCheck>,
    /// Whether every check passed.
    pub ready: bool,
}

/// What `GET /drills` answers.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct DrillOverview {
    pub active: Option<DrillReport>,
    pub blocked: Option<drill::Abort>,
    pub history: Vec<DrillReport>,
}

fn invalid(detail: impl Into<String>) -> AppError {
    AppError::DrillInvalid(detail.into())
}

fn check(uuid: Option<&NodeUuid>, name: &str, result: Result<String, String>) -> PreflightCheck {
    let passed = result.is_ok();
    PreflightCheck {
        uuid: uuid.cloned(),
        check: name.to_string(),
        passed,
        detail: result.unwrap_or_else(|error| error),
    }
}

impl App {
    /// Gives the application the out-of-band path drills inject through.
    pub fn with_fault_injector(mut self, faults: Arc<dyn FaultInjector>) -> Self {
        self.faults = Some(faults);
        self
    }

    /// Gives the application what the drill twin reads beyond the store.
    pub fn with_twin_sources(mut self, sources: TwinSources) -> Self {
        self.twin_sources = Some(Arc::new(sources));
        self
    }

    /// A twin of the live fleet for a rehearsal: racks, nodes, the remediation settings,
    /// and VMs per compute node from a sample of at most `TWIN_VM_SAMPLE_MAX` Ready
    /// compute nodes asked of the cloud (sequentially, each call bounded).
    pub async fn drill_twin(&self) -> Result<drill::FleetTwin, AppError> {
        let nodes = self.all_nodes().await?;
        let fleet: Vec<Candidate> = nodes.iter().map(Candidate::of).collect();
        let sources = self.twin_sources.clone();
        let remediation = sources
            .as_ref()
            .map(|s| s.remediation.clone())
            .unwrap_or_default();
        let mut vms = None;
        if let Some(cloud) = sources.as_ref().and_then(|s| s.vms.clone()) {
            let sample: Vec<&Candidate> = fleet
                .iter()
                .filter(|n| {
                    n.role == crate::core::model::NodeRole::Compute
                        && n.state == LifecycleState::Ready
                })
                .take(drill::TWIN_VM_SAMPLE_MAX)
                .collect();
            let mut counts = Vec::new();
            for node in &sample {
                match tokio::time::timeout(
                    TWIN_CLOUD_CALL_TIMEOUT,
                    cloud.vms_on_host(&node.hostname),
                )
                .await
                {
                    Ok(Ok(count)) => counts.push(count as u32),
                    Ok(Err(error)) => {
                        tracing::warn!(host = %node.hostname, %error, "twin: the cloud did not list VMs")
                    }
                    Err(_) => {
                        tracing::warn!(host = %node.hostname, "twin: the cloud did not answer in time")
                    }
                }
            }
            if !counts.is_empty() {
                vms = Some(drill::TwinVms {
                    sampled_hosts: sample.len(),
                    answered: counts.len(),
                    mean_per_host: counts.iter().map(|c| f64::from(*c)).sum::<f64>()
                        / counts.len() as f64,
                    max_per_host: counts.iter().copied().max().unwrap_or(0),
                });
            }
        }
        Ok(drill::FleetTwin {
            taken_at_ms: self.now_ms(),
            racks: drill::FleetTwin::racks_of(&fleet),
            remediation,
            vms,
        })
    }

    fn faults(&self) -> Result<&Arc<dyn FaultInjector>, AppError> {
        self.faults.as_ref().ok_or(AppError::PowerUnavailable)
    }

    async fn all_nodes(&self) -> Result<Vec<Node>, AppError> {
        let mut nodes = Vec::new();
        let mut filter = NodeFilter {
            limit: LIST_LIMIT_MAX,
            ..Default::default()
        };
        // Bounded: a hundred pages are a million nodes.
        for _ in 0..100 {
            let page = self.store.node_list(&filter).await?;
            let full = page.len() == LIST_LIMIT_MAX;
            filter.after = page.last().map(|n| n.uuid.clone());
            nodes.extend(page);
            if !full {
                break;
            }
        }
        Ok(nodes)
    }

    /// Racks whose fencing is paused, and `fleet` while fencing is stopped fleet-wide.
    fn guards_tripped(&self) -> Vec<String> {
        let Some(status) = self.guards.status() else {
            return Vec::new();
        };
        let mut guards = status.racks_paused.clone();
        if status.fleet_fencing_stopped {
            guards.push("fleet".into());
        }
        guards
    }

    /// Parses a drill file, chooses its targets and runs every check before a start:
    /// nothing is injected or written.
    pub async fn drill_preview(&self, file: &str) -> Result<DrillPlan, AppError> {
        let spec = DrillSpec::parse(file).map_err(invalid)?;
        let nodes = self.all_nodes().await?;
        let fleet: Vec<Candidate> = nodes.iter().map(Candidate::of).collect();
        let targets = drill::select_targets(&spec.targets, &fleet).map_err(invalid)?;
        let now = self.now_ms();
        let mut checks = Vec::new();
        let board = self.store.drill_board_get().await?;
        checks.push(check(
            None,
            "kill_switch",
            match &board.blocked {
                Some(block) => Err(format!(
                    "drills are blocked by {} since {}: {} (`bearman drill unblock` clears it)",
                    block.by, block.at_ms, block.reason
                )),
                None => Ok("clear".into()),
            },
        ));
        checks.push(check(
            None,
            "one_at_a_time",
            match &board.active {
                Some(active) => Err(format!(
                    "drill {} ({}) is running",
                    active.id, active.spec.name
                )),
                None => Ok("no drill running".into()),
            },
        ));
        checks.push(check(
            None,
            "window",
            match &spec.window {
                Some(window) if !window.contains(now) => Err(format!(
                    "now is outside the window ({} {}–{} UTC)",
                    if window.days.is_empty() {
                        "every day".to_string()
                    } else {
                        window.days.join(",")
                    },
                    window.from,
                    window.to
                )),
                Some(_) => Ok("inside the window".into()),
                None => Ok("no window set".into()),
            },
        ));
        let violations = drill::budget_violations(&spec, &targets, &fleet);
        checks.push(check(
            None,
            "budget",
            if violations.is_empty() {
                Ok(format!("{} target(s) within the budget", targets.len()))
            } else {
                Err(violations.join("; "))
            },
        ));
        let guards = self.guards_tripped();
        checks.push(check(
            None,
            "guards",
            if guards.is_empty() {
                Ok("no remediation guard tripped".into())
            } else {
                Err(format!("remediation guards tripped: {}", guards.join(", ")))
            },
        ));
        let active = self
            .store
            .remediation_list(true, None, LIST_LIMIT_MAX)
            .await?;
        checks.push(check(
            None,
            "no_active_remediation",
            if active.is_empty() {
                Ok("none active".into())
            } else {
                Err(format!(
                    "{} remediation(s) active (a drill does not start in the middle of an incident): {}",
                    active.len(),
                    active
                        .iter()
                        .take(5)
                        .map(|r| format!("{} on {}", r.id, r.node_uuid))
                        .collect::<Vec<_>>()
                        .join(", ")
                ))
            },
        ));
        let faults = self.faults().ok();
        for target in &targets {
            let node = nodes
                .iter()
                .find(|n| n.uuid == target.uuid)
                .expect("targets are chosen from these nodes");
            let uuid = Some(&target.uuid);
            checks.push(check(
                uuid,
                "state",
                if node.state == LifecycleState::Ready && node.maintenance.is_none() {
                    Ok("ready".into())
                } else {
                    Err(format!(
                        "{} is {}{}: a drill breaks a healthy node",
                        node.hostname,
                        node.state.as_str(),
                        if node.maintenance.is_some() {
                            " (in maintenance)"
                        } else {
                            ""
                        }
                    ))
                },
            ));
            // Every fault needs the BMC: the fence that follows goes through it.
            let probe = match faults {
                Some(faults) => faults
                    .probe(node, spec.fault)
                    .await
                    .map(|()| format!("answers, reads on, supports {}", spec.fault.as_str())),
                None => Err("this daemon has no BMC access".into()),
            };
            checks.push(check(uuid, "bmc", probe));
        }
        let ready = checks.iter().all(|c| c.passed);
        Ok(DrillPlan {
            spec,
            targets,
            preflight: checks,
            ready,
        })
    }

    /// Starts a drill: previewed again, refused unless every check passes and `confirm`
    /// repeats the drill's name. Returns the drill as it starts; the controller injects.
    pub async fn drill_start(
        &self,
        actor: &str,
        file: &str,
        confirm: &str,
        prediction: Option<Prediction>,
    ) -> Result<DrillReport, AppError> {
        if let Some(prediction) = &prediction {
            prediction.check().map_err(invalid)?;
        }
        if let Some(block) = self.store.drill_board_get().await?.blocked {
            return Err(AppError::DrillsBlocked {
                by: block.by,
                reason: block.reason,
            });
        }
        let plan = self.drill_preview(file).await?;
        if confirm != plan.spec.name {
            return Err(AppError::DrillRefused {
                why: format!(
                    "confirm must repeat the drill's name {:?} (got {confirm:?})",
                    plan.spec.name
                ),
            });
        }
        if !plan.ready {
            let failed: Vec<String> = plan
                .preflight
                .iter()
                .filter(|c| !c.passed)
                .map(|c| match &c.uuid {
                    Some(uuid) => format!("{} {uuid}: {}", c.check, c.detail),
                    None => format!("{}: {}", c.check, c.detail),
                })
                .collect();
            return Err(AppError::DrillRefused {
                why: format!("preflight failed: {}", failed.join("; ")),
            });
        }
        let now = self.now_ms();
        let nodes: Vec<Candidate> = self.all_nodes().await?.iter().map(Candidate::of).collect();
        let active = self
            .store
            .remediation_list(true, None, LIST_LIMIT_MAX)
            .await?;
        let guards = self.guards_tripped();
        let observation = Observation {
            nodes: &nodes,
            remediations: &active,
            guards: &guards,
        };
        let board = self.store.drill_board_get().await?;
        if let Some(block) = &board.blocked {
            return Err(AppError::DrillsBlocked {
                by: block.by.clone(),
                reason: block.reason.clone(),
            });
        }
        if let Some(running) = &board.active {
            return Err(AppError::DrillRefused {
                why: format!("drill {} ({}) is running", running.id, running.spec.name),
            });
        }
        let id = board.last_id + 1;
        let mut drill = Drill::new(
            id,
            plan.spec.clone(),
            &plan.targets,
            actor,
            now,
            &observation,
        );
        drill.preflight = plan.preflight;
        drill.prediction = prediction;
        let event = NewEvent::global(
            now,
            actor,
            Action::DrillStarted,
            format!(
                "drill {id} {}: {} on {}",
                drill.spec.name,
                drill.spec.fault.as_str(),
                drill
                    .targets
                    .iter()
                    .map(|t| t.hostname.as_str())
                    .collect::<Vec<_>>()
                    .join(", ")
            ),
        );
        let next = DrillBoard {
            last_id: id,
            active: Some(drill.clone()),
            ..board
        };
        self.store
            .drill_board_put(&next, None, &[event])
            .await
            .map_err(|error| match error {
                StoreError::Conflict { .. } => AppError::Busy {
                    what: "the drill board (another drill started or the kill switch was set just now)".into(),
                },
                other => other.into(),
            })?;
        tracing::warn!(id, name = %drill.spec.name, fault = drill.spec.fault.as_str(), "drill started");
        Ok(drill.report())
    }

    /// The kill switch: aborts the running drill (the controller restores what it did)
    /// and blocks new drills until [`App::drill_unblock`].
    pub async fn drill_abort(&self, actor: &str, reason: &str) -> Result<DrillOverview, AppError> {
        let now = self.now_ms();
        for _ in 0..super::NODE_WRITE_ATTEMPTS_MAX {
            let mut board = self.store.drill_board_get().await?;
            let mut events = Vec::new();
            if let Some(active) = board.active.as_mut() {
                active.abort(now, actor, reason);
                events.push(NewEvent::global(
                    now,
                    actor,
                    Action::DrillAborted,
                    format!(
                        "drill {} {}: aborted: {reason}",
                        active.id, active.spec.name
                    ),
                ));
            }
            if board.blocked.is_none() {
                board.blocked = Some(drill::Abort {
                    at_ms: now,
                    by: actor.to_string(),
                    reason: reason.to_string(),
                });
                events.push(NewEvent::global(
                    now,
                    actor,
                    Action::DrillsBlocked,
                    format!("new drills blocked: {reason}"),
                ));
            }
            match self.store.drill_board_put(&board, None, &events).await {
                Ok(_) => {
                    tracing::warn!(%reason, "drills aborted and blocked");
                    return self.drill_overview().await;
                }
                Err(StoreError::Conflict { .. }) => continue,
                Err(error) => return Err(error.into()),
            }
        }
        Err(AppError::Busy {
            what: "the drill board".into(),
        })
    }

    /// Clears the kill switch.
    pub async fn drill_unblock(&self, actor: &str) -> Result<DrillOverview, AppError> {
        let mut board = self.store.drill_board_get().await?;
        let Some(block) = board.blocked.take() else {
            return Err(AppError::DrillsNotBlocked);
        };
        let event = NewEvent::global(
            self.now_ms(),
            actor,
            Action::DrillsUnblocked,
            format!(
                "drills allowed again (blocked by {}: {})",
                block.by, block.reason
            ),
        );
        self.store
            .drill_board_put(&board, None, &[event])
            .await
            .map_err(|error| match error {
                StoreError::Conflict { .. } => AppError::Busy {
                    what: "the drill board".into(),
                },
                other => other.into(),
            })?;
        self.drill_overview().await
    }

    pub async fn drill_overview(&self) -> Result<DrillOverview, AppError> {
        let board = self.store.drill_board_get().await?;
        let history = self.store.drill_list(HISTORY_LIST_MAX).await?;
        Ok(DrillOverview {
            active: board.active.as_ref().map(Drill::report),
            blocked: board.blocked,
            history: history.iter().map(Drill::report).collect(),
        })
    }

    /// A drill, running or finished, with its report.
    pub async fn drill_get(&self, id: i64) -> Result<(Drill, DrillReport), AppError> {
        let board = self.store.drill_board_get().await?;
        let drill = match board.active.filter(|d| d.id == id) {
            Some(active) => active,
            None => self
                .store
                .drill_get(id)
                .await?
                .ok_or(AppError::DrillNotFound { id })?,
        };
        let report = drill.report();
        Ok((drill, report))
    }

    /// One step of the running drill (the controller's, on the leader): observe, decide,
    /// carry out each action between two board writes — "sending" before the call,
    /// the outcome after — and file the drill when it finishes. A lost race with another
    /// writer ends the step; the next one starts from what the board says.
    pub async fn drill_step(&self) -> Result<(), AppError> {
        let board = self.store.drill_board_get().await?;
        let Some(mut drill) = board.active.clone() else {
            return Ok(());
        };
        let now = self.now_ms();
        let before = drill.clone();
        // An injection left "sending" by a step that never recorded its outcome: the
        // daemon died or lost the lead mid-call.
        drill.resume_after_takeover(now);
        let nodes = self.all_nodes().await?;
        let fleet: Vec<Candidate> = nodes.iter().map(Candidate::of).collect();
        let mut remediations: Vec<Remediation> = self
            .store
            .remediation_list(true, None, LIST_LIMIT_MAX)
            .await?;
        for target in &drill.targets {
            for remediation in self
                .store
                .remediation_list(false, Some(&target.uuid), 5)
                .await?
            {
                if !remediations.iter().any(|r| r.id == remediation.id) {
                    remediations.push(remediation);
                }
            }
        }
        let guards = self.guards_tripped();
        let observation = Observation {
            nodes: &fleet,
            remediations: &remediations,
            guards: &guards,
        };
        let actions = drill.poll(&observation, now);
        let mut board = self.drill_write(board, &before, &drill, now).await?;
        for action in actions {
            let node = nodes.iter().find(|n| match &action {
                DrillAction::Inject { uuid, .. }
                | DrillAction::LiftSilence { uuid }
                | DrillAction::PowerOn { uuid } => &n.uuid == uuid,
            });
            let before = drill.clone();
            let Some(node) = node.cloned() else {
                // Deleted since it was chosen: nothing to inject into or restore.
                drill.record(
                    &action,
                    ActionOutcome::Failed("the node no longer exists".into()),
                    now,
                );
                board = self.drill_write(board, &before, &drill, now).await?;
                continue;
            };
            if let DrillAction::Inject { uuid, .. } = &action {
                drill.inject_sending(uuid, now);
                board = self.drill_write(board, &before, &drill, now).await?;
            }
            let before = drill.clone();
            let outcome = self.drill_act(&action, &node, &drill).await;
            let at = self.now_ms();
            drill.record(&action, outcome, at);
            board = self.drill_write(board, &before, &drill, at).await?;
            if drill.is_finished() {
                break;
            }
        }
        Ok(())
    }

    async fn drill_act(&self, action: &DrillAction, node: &Node, drill: &Drill) -> ActionOutcome {
        let result = match action {
            DrillAction::Inject {
                fault: FaultKind::Silence,
                ..
            } => {
                let until = self.now_ms() + drill.spec.silence_ms();
                self.drill_silence(&node.uuid, Some(until), drill).await
            }
            DrillAction::Inject { fault, .. } => match self.faults() {
                Ok(faults) => faults.inject(node, *fault).await,
                Err(error) => Err(error.to_string()),
            },
            DrillAction::LiftSilence { .. } => self.drill_silence(&node.uuid, None, drill).await,
            DrillAction::PowerOn { .. } => {
                // Looked at again just before the call: a remediation that started since
                // the step's observation owns the node's power now (a power-on after its
                // verified fence would undo the fence).
                match self.remediation_owning(&node.uuid).await {
                    Ok(Some(why)) => return ActionOutcome::Skipped(why),
                    Ok(None) => {}
                    Err(error) => return ActionOutcome::Failed(error.to_string()),
                }
                match self.faults() {
                    Ok(faults) => faults.power_on(node).await,
                    Err(error) => Err(error.to_string()),
                }
            }
        };
        match result {
            Ok(()) => ActionOutcome::Done,
            Err(error) => {
                tracing::warn!(uuid = %node.uuid, ?action, %error, "drill action failed");
                ActionOutcome::Failed(error)
            }
        }
    }

    /// Why a remediation owns `uuid`'s power now, if one does.
    async fn remediation_owning(&self, uuid: &NodeUuid) -> Result<Option<String>, AppError> {
        let node = self.node(uuid).await?;
        if matches!(
            node.state,
            LifecycleState::Fencing | LifecycleState::Fenced | LifecycleState::Rebuilding
        ) {
            return Ok(Some(format!(
                "not powered on: the node is {} (its remediation owns its power)",
                node.state.as_str()
            )));
        }
        let active = self.store.remediation_list(true, Some(uuid), 1).await?;
        Ok(active.first().map(|r| {
            format!(
                "not powered on: remediation {} took it over (it owns its power)",
                r.id
            )
        }))
    }

    /// Sets (or lifts, `None`) the daemon's deafness to one node's heartbeats.
    async fn drill_silence(
        &self,
        uuid: &NodeUuid,
        until: Option<TimestampMs>,
        drill: &Drill,
    ) -> Result<(), String> {
        let now = self.now_ms();
        let reason = match until {
            Some(until) => format!(
                "drill {} {}: heartbeats ignored until {until} (at most {} s)",
                drill.id,
                drill.spec.name,
                drill.spec.silence_ms() / 1000
            ),
            None => format!(
                "drill {} {}: heartbeats heard again",
                drill.id, drill.spec.name
            ),
        };
        self.mutate_node(uuid, |node| {
            node.drill_silenced_until_ms = until;
            Ok(vec![NewEvent::for_node(
                uuid,
                now,
                SYSTEM_ACTOR,
                Action::DrillSilence,
                reason.clone(),
            )])
        })
        .await
        .map(drop)
        .map_err(|error| error.to_string())
    }

    /// Writes the board if the drill changed, with an event per change worth auditing;
    /// a finished drill leaves the board for the history in the same transaction.
    async fn drill_write(
        &self,
        mut board: DrillBoard,
        before: &Drill,
        drill: &Drill,
        now: TimestampMs,
    ) -> Result<DrillBoard, AppError> {
        if before == drill {
            return Ok(board);
        }
        let events = drill_events(before, drill, now);
        let finished = drill.is_finished();
        board.active = if finished { None } else { Some(drill.clone()) };
        let stored = self
            .store
            .drill_board_put(&board, finished.then_some(drill), &events)
            .await
            .map_err(|error| match error {
                StoreError::Conflict { .. } => AppError::Busy {
                    what: "the drill board changed during the step".into(),
                },
                other => other.into(),
            })?;
        if finished {
            let report = drill.report();
            tracing::warn!(id = drill.id, outcome = %report.outcome, "drill finished");
        }
        Ok(stored)
    }
}

/// The audit events between two versions of a drill.
fn drill_events(before: &Drill, after: &Drill, now: TimestampMs) -> Vec<NewEvent> {
    let mut events = Vec::new();
    let label = format!("drill {} {}", after.id, after.spec.name);
    for (old, new) in before.targets.iter().zip(&after.targets) {
        if old.injected_at_ms.is_none() && new.injected_at_ms.is_some() {
            events.push(NewEvent::for_node(
                &new.uuid,
                now,
                SYSTEM_ACTOR,
                Action::DrillInjected,
                format!("{label}: {} injected", after.spec.fault.as_str()),
            ));
        }
        if old.injection_error.is_none() {
            if let Some(error) = &new.injection_error {
                events.push(NewEvent::for_node(
                    &new.uuid,
                    now,
                    SYSTEM_ACTOR,
                    Action::DrillInjected,
                    format!("{label}: {} failed: {error}", after.spec.fault.as_str()),
                ));
            }
        }
        if old.restored.is_none() {
            if let Some(restored) = &new.restored {
                events.push(NewEvent::for_node(
                    &new.uuid,
                    now,
                    SYSTEM_ACTOR,
                    Action::DrillRestored,
                    format!("{label}: {restored}"),
                ));
            }
        }
    }
    if before.abort.is_none() {
        if let Some(abort) = &after.abort {
            // The operator's abort wrote its own event.
            if abort.by == "drill" {
                events.push(NewEvent::global(
                    now,
                    SYSTEM_ACTOR,
                    Action::DrillAborted,
                    format!("{label}: aborted: {}", abort.reason),
                ));
            }
        }
    }
    if !before.is_finished() && after.is_finished() {
        let report = after.report();
        events.push(NewEvent::global(
            now,
            SYSTEM_ACTOR,
            Action::DrillFinished,
            format!(
                "{label}: {}{}",
                report.outcome,
                if report.divergences.is_empty() {
                    String::new()
                } else {
                    format!("; beyond the rehearsal: {}", report.divergences.join("; "))
                }
            ),
        ));
    }
    events
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DrillStartRequest {
    /// The drill file's text.
    pub file: String,
    /// The drill's name again: a drill is never started by accident.
    pub confirm: String,
    #[serde(default)]
    pub prediction: Option<Prediction>,
}
