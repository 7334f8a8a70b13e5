//! The controller: the daemon's own loop that feeds the pure core and carries out its
//! decisions — health judgement (silent nodes become Suspect, guards against partitions)
//! and remediation sagas (fence, evacuate, rebuild) through the `Bmc` and `Cloud` seams.
//!
//! Architecture invariant: no decision is made here. `core::health` decides who is silent
//! and whether fencing is allowed; `core::remediation` decides what a saga does next. This
//! module reads the store, calls the outside world, and persists before and after acting.

mod power;
pub mod remediation;

use std::collections::{BTreeMap, BTreeSet, VecDeque};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bearman_proto::uuid::NodeUuid;
use serde::{Deserialize, Serialize};

use crate::app::guards::{ControllerLiveness, GuardStatus, PowerOffNode};
use crate::app::App;
use crate::bmc::BmcProvider;
use crate::cloud::Cloud;
use crate::core::health::{self, HealthConfig, Judgement};
use crate::core::lifecycle::LifecycleState;
use crate::core::model::{Action, NewEvent, TimestampMs};
use crate::core::power_sync::PowerReadingState;
use crate::core::remediation::{Limits, Remediation, RemediationKind};
use crate::store::{StoreError, LIST_LIMIT_MAX};

pub use crate::app::SYSTEM_ACTOR;

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
        }
    }
}

impl ControllerConfig {
    /// Rejects impossible settings; the message names the key under `[remediation]`.
    pub fn validate(&self) -> Result<(), String> {
        self.health.validate()?;
        self.limits.validate()?;
        if !(10..=3_600_000).contains(&self.tick_ms) {
            return Err(format!("tick_ms {} is outside 10-3600000", self.tick_ms));
        }
        if !(1..=10_000).contains(&self.power_polls_per_tick_max) {
            return Err(format!(
                "power_polls_per_tick_max {} is outside 1-10000",
                self.power_polls_per_tick_max
            ));
        }
        if !(1..=10_000).contains(&self.power_polls_in_flight_max) {
            return Err(format!(
                "power_polls_in_flight_max {} is outside 1-10000",
                self.power_polls_in_flight_max
            ));
        }
        Ok(())
    }
}

pub struct Controller {
    pub app: App,
    pub bmcs: Arc<dyn BmcProvider>,
    pub cloud: Option<Arc<dyn Cloud>>,
    pub config: ControllerConfig,
    /// Remediations with a step in flight in this process.
    running: Mutex<BTreeSet<i64>>,
    /// When automatic remediations were started, for the rate limit.
    recent_starts: Mutex<VecDeque<TimestampMs>>,
    paused_before: Mutex<(bool, BTreeSet<String>)>,
    guard_history: Mutex<health::GuardHistory>,
    started_at_ms: TimestampMs,
    /// Nodes with a power poll in flight.
    polls_in_flight: Mutex<BTreeSet<NodeUuid>>,
}

impl Controller {
    pub fn new(
        app: App,
        bmcs: Arc<dyn BmcProvider>,
        cloud: Option<Arc<dyn Cloud>>,
        config: ControllerConfig,
    ) -> Arc<Controller> {
        let started_at_ms = app.clock.now_ms();
        Arc::new(Controller {
            started_at_ms,
            app,
            bmcs,
            cloud,
            config,
            running: Mutex::new(BTreeSet::new()),
            recent_starts: Mutex::new(VecDeque::new()),
            paused_before: Mutex::new((false, BTreeSet::new())),
            guard_history: Mutex::new(health::GuardHistory::default()),
            polls_in_flight: Mutex::new(BTreeSet::new()),
        })
    }

    /// Runs forever: one tick per `tick_ms`.
    pub async fn run(self: Arc<Self>) {
        let mut ticker = tokio::time::interval(Duration::from_millis(self.config.tick_ms.max(10)));
        ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            ticker.tick().await;
            if let Err(error) = self.clone().tick().await {
                tracing::warn!(%error, "controller tick failed");
            }
        }
    }

    /// One look at the fleet: judge health, suspect the silent, start and drive sagas.
    pub async fn tick(self: Arc<Self>) -> Result<(), StoreError> {
        let now = self.app.clock.now_ms();
        let nodes = self.app.store.node_health_list().await?;
        let mut judgement = {
            let mut history = self.guard_history.lock().unwrap_or_else(|p| p.into_inner());
            let judgement = health::judge(&nodes, now, &self.config.health, &history);
            history.record(&judgement, now);
            judgement
        };
        if now - self.started_at_ms < self.config.startup_quiet_ms {
            // Just (re)started: silence measured across our own downtime proves nothing.
            judgement.newly_silent.clear();
            judgement.fenceable.clear();
            judgement.power_confirmed.clear();
        }
        self.suspect_silent(&judgement).await;
        self.record_guard_changes(&judgement, now).await?;
        let active = self
            .app
            .store
            .remediation_list(true, None, LIST_LIMIT_MAX)
            .await?;
        if self.config.automatic {
            self.start_automatic(&judgement, &nodes, &active, now)
                .await?;
        }
        self.start_power_polls(&nodes, &active, now);
        self.publish_guards(&judgement, &nodes, now).await?;
        for remediation in self
            .app
            .store
            .remediation_list(true, None, LIST_LIMIT_MAX)
            .await?
        {
            if remediation.next_attempt_at_ms > now {
                continue;
            }
            let newly_running = self
                .running
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .insert(remediation.id);
            if newly_running {
                let controller = self.clone();
                tokio::spawn(async move {
                    let id = remediation.id;
                    controller.clone().run_step(id).await;
                    controller
                        .running
                        .lock()
                        .unwrap_or_else(|p| p.into_inner())
                        .remove(&id);
                });
            }
        }
        Ok(())
    }

    async fn suspect_silent(&self, judgement: &Judgement) {
        let grace_s = self.config.health.heartbeat_grace_ms / 1000;
        for uuid in &judgement.newly_silent {
            if let Err(error) = self.app.node_mark_suspect(uuid, grace_s).await {
                tracing::warn!(%uuid, %error, "could not mark node suspect");
            }
        }
    }

    /// Alerts (audit events) when a rack pause or the fleet-wide stop begins or ends.
    async fn record_guard_changes(
        &self,
        judgement: &Judgement,
        now: TimestampMs,
    ) -> Result<(), StoreError> {
        let paused: BTreeSet<String> = judgement
            .racks
            .iter()
            .filter(|(_, r)| r.fencing_paused)
            .map(|(name, _)| name.clone())
            .collect();
        let mut events = Vec::new();
        {
            let mut before = self.paused_before.lock().unwrap_or_else(|p| p.into_inner());
            let system_event = |action: Action, reason: String| {
                NewEvent::global(now, SYSTEM_ACTOR, action, reason)
            };
            for rack in paused.difference(&before.1) {
                let health = &judgement.racks[rack];
                tracing::warn!(rack = %rack, silent = health.silent, monitored = health.monitored, "rack silent: automatic fencing paused");
                events.push(system_event(
                    Action::RackFencingPaused,
                    format!(
                        "{} of {} nodes in rack {rack:?} silent: suspecting the switch, not the nodes",
                        health.silent, health.monitored
                    ),
                ));
            }
            for rack in before.1.difference(&paused) {
                events.push(system_event(
                    Action::RackFencingResumed,
                    format!("rack {rack:?} heard again"),
                ));
            }
            if judgement.fleet_fencing_stopped != before.0 {
                let (action, reason) = if judgement.fleet_fencing_stopped {
                    tracing::error!(
                        silent = judgement.silent,
                        monitored = judgement.monitored,
                        "most of the fleet is silent: all automatic fencing stopped"
                    );
                    (
                        Action::FleetFencingStopped,
                        format!(
                            "{} of {} nodes silent: suspecting our own network, fencing nobody",
                            judgement.silent, judgement.monitored
                        ),
                    )
                } else {
                    (Action::FleetFencingResumed, "fleet heard again".to_string())
                };
                events.push(system_event(action, reason));
            }
            *before = (judgement.fleet_fencing_stopped, paused);
        }
        if !events.is_empty() {
            self.app.store.event_append(&events).await?;
        }
        Ok(())
    }

    async fn start_automatic(
        &self,
        judgement: &Judgement,
        nodes: &[health::NodeHealth],
        active: &[Remediation],
        now: TimestampMs,
    ) -> Result<(), StoreError> {
        let busy: BTreeSet<&str> = active.iter().map(|r| r.node_uuid.as_str()).collect();
        let mut active_count = active.len();
        for uuid in &judgement.fenceable {
            if busy.contains(uuid.as_str()) {
                continue;
            }
            // Only nodes we have marked Suspect; Maintenance and the rest are never touched.
            let Some(node) = nodes.iter().find(|n| &n.uuid == uuid) else {
                continue;
            };
            if !matches!(node.state, LifecycleState::Ready | LifecycleState::Suspect) {
                continue;
            }
            if active_count >= self.config.remediations_active_max {
                break;
            }
            {
                let mut starts = self.recent_starts.lock().unwrap_or_else(|p| p.into_inner());
                while starts.front().is_some_and(|at| now - at >= 60_000) {
                    starts.pop_front();
                }
                if starts.len() >= self.config.fences_per_minute_max as usize {
                    break;
                }
                starts.push_back(now);
            }
            let power_off = judgement.power_confirmed.contains(uuid);
            let reason = if power_off {
                "node silent and its BMC reads power off; BMC fence, evacuate, rebuild"
            } else {
                "node silent; BMC fence, evacuate, rebuild"
            };
            let remediation = Remediation::new(
                uuid.clone(),
                RemediationKind::Automatic,
                SYSTEM_ACTOR,
                reason,
                now,
            );
            let event = NewEvent::for_node(
                uuid,
                now,
                SYSTEM_ACTOR,
                Action::RemediationStarted,
                if power_off {
                    "automatic: node silent, BMC reads power off"
                } else {
                    "automatic: node silent"
                },
            );
            match self
                .app
                .store
                .remediation_create(&remediation, &[event])
                .await
            {
                Ok(created) => {
                    active_count += 1;
                    tracing::warn!(%uuid, id = created.id, "automatic remediation started");
                }
                Err(StoreError::AlreadyExists { .. }) => {}
                Err(error) => return Err(error),
            }
        }
        Ok(())
    }

    async fn publish_guards(
        &self,
        judgement: &Judgement,
        nodes: &[health::NodeHealth],
        now: TimestampMs,
    ) -> Result<(), StoreError> {
        let mut power_readings = BTreeMap::new();
        let mut power_off = Vec::new();
        for node in nodes {
            let state = node.power.as_ref().map_or("none", |p| p.state.as_str());
            *power_readings.entry(state.to_string()).or_default() += 1;
            if let Some(reading) = node
                .power
                .as_ref()
                .filter(|p| p.state == PowerReadingState::Off)
            {
                power_off.push(PowerOffNode {
                    uuid: node.uuid.clone(),
                    read_at_ms: reading.read_at_ms,
                    last_heard_at_ms: node.last_heard_at_ms,
                });
            }
        }
        let active = self
            .app
            .store
            .remediation_list(true, None, LIST_LIMIT_MAX)
            .await?
            .len();
        let starts = self
            .recent_starts
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .len();
        let status = GuardStatus {
            automatic: self.config.automatic,
            evaluated_at_ms: now,
            monitored: judgement.monitored,
            silent: judgement.silent,
            fleet_fencing_stopped: judgement.fleet_fencing_stopped,
            racks_paused: judgement
                .racks
                .iter()
                .filter(|(_, r)| r.fencing_paused)
                .map(|(name, _)| name.clone())
                .collect(),
            automatic_starts_last_minute: starts,
            fences_per_minute_max: self.config.fences_per_minute_max,
            remediations_active: active,
            remediations_active_max: self.config.remediations_active_max,
            heartbeat_grace_ms: self.config.health.heartbeat_grace_ms,
            rack_silent_fraction_max: self.config.health.rack_silent_fraction_max,
            fleet_silent_fraction_max: self.config.health.fleet_silent_fraction_max,
            power_poll_interval_ms: self.config.health.power_poll_interval_ms,
            power_polls_in_flight: self.power_polls_in_flight(),
            power_readings,
            power_off,
            power_confirmed: judgement.power_confirmed.clone(),
        };
        self.app.guards.publish(status);
        Ok(())
    }
}

/// Restarts after a panic before the supervisor gives up and leaves the controller down.
pub const CONTROLLER_RESTARTS_MAX: u32 = 5;
/// Wait before restarting a panicked controller, doubled per restart.
const CONTROLLER_RESTART_DELAY: Duration = Duration::from_secs(1);

/// Runs `controller` as a supervised task: a panic is logged with its message, shown on
/// the guard board as down (so `/healthz` and `bearman remediation guards` say so), and
/// the controller restarted after a growing delay, at most [`CONTROLLER_RESTARTS_MAX`]
/// times. Aborting the returned handle stops both.
pub fn spawn_supervised(controller: Arc<Controller>) -> tokio::task::JoinHandle<()> {
    tokio::spawn(async move {
        let board = controller.app.guards.clone();
        let mut restarts = 0;
        loop {
            board.set_liveness(ControllerLiveness::Running {
                since_ms: controller.app.clock.now_ms(),
                restarts,
            });
            let task = tokio::spawn(controller.clone().run());
            let abort = task.abort_handle();
            // Aborting the supervisor must stop the controller too.
            let _stop_with_supervisor = AbortOnDrop(abort);
            let reason = match task.await {
                Ok(()) => "the controller loop returned".to_string(),
                Err(error) if error.is_panic() => panic_message(error.into_panic()),
                Err(_) => return,
            };
            let restarting = restarts < CONTROLLER_RESTARTS_MAX;
            tracing::error!(%reason, restarts, restarting, "controller task died");
            board.set_liveness(ControllerLiveness::Down {
                since_ms: controller.app.clock.now_ms(),
                reason,
                restarts,
                restarting,
            });
            if !restarting {
                return;
            }
            tokio::time::sleep(CONTROLLER_RESTART_DELAY * 2u32.pow(restarts)).await;
            restarts += 1;
        }
    })
}

struct AbortOnDrop(tokio::task::AbortHandle);

impl Drop for AbortOnDrop {
    fn drop(&mut self) {
        self.0.abort();
    }
}

fn panic_message(payload: Box<dyn std::any::Any + Send>) -> String {
    match payload.downcast::<String>() {
        Ok(text) => format!("panicked: {text}"),
        Err(payload) => match payload.downcast::<&'static str>() {
            Ok(text) => format!("panicked: {text}"),
            Err(_) => "panicked".to_string(),
        },
    }
}
