//! The controller's driver: the daemon's own loop around the pure
//! `core::controller::ControllerCore`. Each tick it reads the store into a
//! [`FleetView`], asks the core what to do, and carries out the [`Command`]s: writes
//! through the `App` (`app::saga` for the sagas), BMC power polls (`power.rs`) and saga
//! steps (`remediation.rs`) as their own tasks through the `Bmc` and `Cloud` seams,
//! feeding every result back to the core. It also supervises itself
//! ([`spawn_supervised`]).
//!
//! Architecture invariant: no decision is made here. Who is suspected, who is
//! remediated automatically and when (eligibility, guards, quiet period, rate limit,
//! active cap), which alerts, polls and steps are due, whether a saga stands down, which
//! calls a step makes and what its outcome writes: all `core::controller` (with
//! `core::health`, `core::power_sync` and `core::remediation`). This module reads, calls
//! the outside world, and persists before and after acting. A task it spawns that panics
//! frees its slot (a drop guard), so nothing stays "in flight" forever.

pub mod drill_faults;
pub mod elector;
pub mod operator_power;
mod power;
pub mod remediation;

use std::collections::BTreeSet;
use std::future::Future;
use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};
use std::time::Duration;

use bearman_proto::uuid::NodeUuid;

use crate::app::guards::{ControllerLiveness, GuardStatus, PowerOffNode};
use crate::app::App;
use crate::bmc::BmcProvider;
use crate::cloud::Cloud;
use crate::core::controller::{Command, ControllerCore, FleetView, GuardAlert, GuardReport};
use crate::store::{StoreError, LIST_LIMIT_MAX};

pub use crate::app::SYSTEM_ACTOR;
pub use crate::core::controller::ControllerConfig;

pub struct Controller {
    pub app: App,
    pub bmcs: Arc<dyn BmcProvider>,
    pub cloud: Option<Arc<dyn Cloud>>,
    pub config: ControllerConfig,
    /// The decisions and the memory they need (never held across an await).
    core: Mutex<ControllerCore>,
    /// Remediations with a step in flight in this process.
    running: Arc<Mutex<BTreeSet<i64>>>,
    /// Nodes with a power poll in flight.
    polls_in_flight: Arc<Mutex<BTreeSet<NodeUuid>>>,
    /// The leader epoch the core's memory belongs to (clustered replicas).
    epoch: Mutex<Option<i64>>,
    /// When this process started: heartbeats have been recorded since then (by it, or by
    /// the other replicas), so a replica that takes the lease later does not wait out
    /// the startup quiet period again.
    started_at_ms: i64,
    /// Whether a drill step is in flight (one at a time).
    drill_running: Arc<Mutex<BTreeSet<()>>>,
}

/// The tasks one tick started (saga steps and power polls); dropping it lets them run on
/// their own, [`Started::wait`] awaits them all.
#[must_use = "drop it to let the tasks run on, or wait for them"]
pub struct Started {
    tasks: Vec<tokio::task::JoinHandle<()>>,
}

impl Started {
    /// How many tasks the tick started.
    pub fn len(&self) -> usize {
        self.tasks.len()
    }

    pub fn is_empty(&self) -> bool {
        self.tasks.is_empty()
    }

    /// Waits until every task the tick started has finished. The tasks catch their own
    /// panics, so one that still escapes is a bug: it is re-raised here.
    pub async fn wait(self) {
        for task in self.tasks {
            if let Err(error) = task.await {
                if error.is_panic() {
                    std::panic::resume_unwind(error.into_panic());
                }
            }
        }
    }
}

/// Holds `key` in a shared in-flight set for as long as it lives: dropped when the task
/// ends, however it ends (returned, panicked, aborted).
struct InFlight<K: Ord + Clone> {
    set: Arc<Mutex<BTreeSet<K>>>,
    key: K,
}

impl<K: Ord + Clone> InFlight<K> {
    /// `None` when `key` is already in flight.
    fn claim(set: &Arc<Mutex<BTreeSet<K>>>, key: K) -> Option<Self> {
        let inserted = set
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .insert(key.clone());
        inserted.then(|| InFlight {
            set: set.clone(),
            key,
        })
    }
}

impl<K: Ord + Clone> Drop for InFlight<K> {
    fn drop(&mut self) {
        self.set
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .remove(&self.key);
    }
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
            core: Mutex::new(ControllerCore::new(config.clone(), started_at_ms)),
            app,
            bmcs,
            cloud,
            config,
            running: Arc::default(),
            polls_in_flight: Arc::default(),
            epoch: Mutex::default(),
            started_at_ms,
            drill_running: Arc::default(),
        })
    }

    /// Runs forever: one tick per `tick_ms`. A tick's tasks run on by themselves.
    pub async fn run(self: Arc<Self>) {
        let mut ticker = tokio::time::interval(Duration::from_millis(self.config.tick_ms.max(10)));
        ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            ticker.tick().await;
            if let Err(error) = self.clone().tick().await {
                if let Some(kind) = error.fault_kind() {
                    self.app.metrics.store_error(kind);
                }
                tracing::warn!(%error, "controller tick failed");
            }
        }
    }

    /// One tick, then waits for every step and power poll it started (tests drive the
    /// controller with this on a manual clock).
    pub async fn tick_and_wait(self: Arc<Self>) -> Result<(), StoreError> {
        self.tick().await?.wait().await;
        Ok(())
    }

    /// One look at the fleet: read it, let the core decide, carry out its commands.
    /// Returns the tasks it started (steps, power polls).
    pub async fn tick(self: Arc<Self>) -> Result<Started, StoreError> {
        let now = self.app.clock.now_ms();
        let acting = self.app.leader.acting(now);
        if !self.follow_leadership(acting, now) {
            return Ok(Started { tasks: Vec::new() });
        }
        let boot_scan_due = self.lock_core().boot_scan_due(now);
        let booting = if boot_scan_due {
            Some(self.app.store.node_booting_list().await?)
        } else {
            None
        };
        let view = FleetView {
            booting,
            nodes: self.app.store.node_health_list().await?,
            active: self
                .app
                .store
                .remediation_list(true, None, LIST_LIMIT_MAX)
                .await?,
            polls_in_flight: self.lock_polls().clone(),
            steps_running: self.lock_running().clone(),
        };
        let commands = {
            let mut core = self.lock_core();
            let commands = core.poll(now, &view);
            if let crate::app::cluster::Acting::Leader { .. } = acting {
                match serde_json::to_string(&core.memory()) {
                    Ok(memory) => self.app.leader.save_memory(memory),
                    Err(error) => tracing::warn!(%error, "controller memory not saved"),
                }
            }
            commands
        };
        let mut started = Started { tasks: Vec::new() };
        let mut alerts = Vec::new();
        for command in commands {
            if !matches!(command, Command::Alert(_)) && !alerts.is_empty() {
                self.app
                    .saga_alerts_record(&std::mem::take(&mut alerts))
                    .await?;
            }
            match command {
                Command::MarkSuspect { uuid, grace_s } => {
                    if let Err(error) = self.app.node_mark_suspect(&uuid, grace_s).await {
                        tracing::warn!(%uuid, %error, "could not mark node suspect");
                    }
                }
                Command::Alert(alert) => {
                    log_alert(&alert);
                    alerts.push(alert.event(now));
                }
                Command::StartAutomatic { remediation, event } => {
                    let uuid = remediation.node_uuid.clone();
                    if let Some(created) = self
                        .app
                        .saga_start_automatic(&remediation, event, acting.fence())
                        .await?
                    {
                        tracing::warn!(%uuid, id = created.id, "automatic remediation started");
                        // The detection phase: last heard → fencing begins.
                        if let Some(heard) = view.nodes.iter().find(|node| node.uuid == uuid) {
                            self.app.metrics.phase_observed(
                                crate::core::remediation::PHASE_DETECT,
                                (now - heard.last_heard_at_ms) as f64 / 1000.0,
                            );
                        }
                        let next = self.lock_core().handle_started(now, &created);
                        if let Some(Command::RunStep { id }) = next {
                            started.tasks.extend(self.spawn_step(id));
                        }
                    }
                }
                Command::PollPower { uuid, before } => {
                    started.tasks.extend(self.spawn_power_poll(uuid, before));
                }
                Command::Publish(report) => self.publish_guards(report),
                Command::RunStep { id } => started.tasks.extend(self.spawn_step(id)),
            }
        }
        self.app.saga_alerts_record(&alerts).await?;
        started.tasks.extend(self.spawn_drill_step());
        Ok(started)
    }

    /// The running chaos drill's step, if none is in flight: a task of its own, because
    /// its BMC calls may take as long as the guard allows.
    fn spawn_drill_step(self: &Arc<Self>) -> Option<tokio::task::JoinHandle<()>> {
        let running = InFlight::claim(&self.drill_running, ())?;
        let controller = self.clone();
        Some(tokio::spawn(async move {
            let _running = running;
            let (leader, clock) = (controller.app.leader.clone(), controller.app.clock.clone());
            let permission: crate::bmc::guard::SendPermission =
                Arc::new(move || leader.acting(clock.now_ms()).may_act());
            // On the heap, made when the task first runs: the step's future is large, and
            // this task is spawned every tick, drill or not (a spawned future is copied
            // whole into its task and out again).
            let step = Box::pin(crate::bmc::guard::with_send_permission(
                permission,
                controller.app.drill_step(),
            ));
            match CatchUnwind::new(step).await {
                Ok(Ok(())) => {}
                Ok(Err(error)) => {
                    tracing::warn!(%error, "drill step failed; the next tick tries again")
                }
                Err(panic) => tracing::error!(
                    reason = %panic_message(panic),
                    "drill step panicked; the next tick tries again"
                ),
            }
        }))
    }

    /// Follows the leader board: whether this tick may act. A replica that is not
    /// leading acts on nothing; one that (again) leads under a new epoch starts with a
    /// fresh core — its quiet period runs from the takeover, and nothing it remembered
    /// from an earlier term (rate window, guard history) is trusted.
    fn follow_leadership(&self, acting: crate::app::cluster::Acting, now: i64) -> bool {
        use crate::app::cluster::Acting;
        let mut epoch = self.epoch.lock().unwrap_or_else(|p| p.into_inner());
        match acting {
            Acting::Alone => true,
            Acting::Standby => {
                *epoch = None;
                false
            }
            Acting::Leader { epoch: current } => {
                if *epoch != Some(current) {
                    let mut core = ControllerCore::new(self.config.clone(), self.started_at_ms);
                    let handed_over = self.app.leader.take_handed_over(current);
                    match handed_over.as_deref().map(serde_json::from_str) {
                        Some(Ok(memory)) => core.restore(memory),
                        Some(Err(error)) => tracing::warn!(
                            %error,
                            "the previous leader's controller memory is unreadable: starting without it"
                        ),
                        None => {}
                    }
                    tracing::info!(epoch = current, now, "controller starting its term");
                    *self.lock_core() = core;
                    *epoch = Some(current);
                }
                true
            }
        }
    }

    /// Steps with a task in flight right now (for tests: never one left after a panic).
    pub fn steps_running(&self) -> usize {
        self.lock_running().len()
    }

    fn lock_core(&self) -> std::sync::MutexGuard<'_, ControllerCore> {
        self.core.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn lock_running(&self) -> std::sync::MutexGuard<'_, BTreeSet<i64>> {
        self.running.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn lock_polls(&self) -> std::sync::MutexGuard<'_, BTreeSet<NodeUuid>> {
        self.polls_in_flight
            .lock()
            .unwrap_or_else(|p| p.into_inner())
    }

    /// Runs remediation `id`'s current step in its own task, unless one is in flight.
    /// A panic anywhere in it is caught and logged, and the slot is freed either way.
    fn spawn_step(self: &Arc<Self>, id: i64) -> Option<tokio::task::JoinHandle<()>> {
        let running = InFlight::claim(&self.running, id)?;
        let controller = self.clone();
        Some(tokio::spawn(async move {
            let _running = running;
            if let Err(panic) = CatchUnwind::new(controller.run_step(id)).await {
                tracing::error!(
                    id,
                    reason = %panic_message(panic),
                    "remediation step task panicked; the step runs again when due"
                );
            }
        }))
    }

    fn publish_guards(&self, report: GuardReport) {
        let config = &self.config;
        self.app.guards.publish(GuardStatus {
            automatic: config.automatic,
            evaluated_at_ms: report.evaluated_at_ms,
            monitored: report.monitored,
            silent: report.silent,
            fleet_fencing_stopped: report.fleet_fencing_stopped,
            racks_paused: report.racks_paused,
            automatic_starts_last_minute: report.automatic_starts_last_minute,
            fences_per_minute_max: config.fences_per_minute_max,
            remediations_active: report.remediations_active,
            remediations_active_max: config.remediations_active_max,
            heartbeat_grace_ms: config.health.heartbeat_grace_ms,
            rack_silent_fraction_max: config.health.rack_silent_fraction_max,
            fleet_silent_fraction_max: config.health.fleet_silent_fraction_max,
            power_poll_interval_ms: config.health.power_poll_interval_ms,
            power_polls_in_flight: report.power_polls_in_flight,
            power_readings: report.power_readings,
            power_off: report
                .power_off
                .into_iter()
                .map(|(uuid, read_at_ms, last_heard_at_ms)| PowerOffNode {
                    uuid,
                    read_at_ms,
                    last_heard_at_ms,
                })
                .collect(),
            power_confirmed: report.power_confirmed,
            fences_unverified: report.fences_unverified,
            boots_stalled: report.boots_stalled,
            boot_retries_held: report.boot_retries_held,
            boot_retry_automatic: config.automatic && config.boot_retry_automatic,
        });
    }
}

fn log_alert(alert: &GuardAlert) {
    match alert {
        GuardAlert::RackPaused {
            rack,
            silent,
            monitored,
        } => {
            tracing::warn!(rack = %rack, silent, monitored, "rack silent: automatic fencing paused")
        }
        GuardAlert::FleetStopped { silent, monitored } => tracing::error!(
            silent,
            monitored,
            "most of the fleet is silent: all automatic fencing stopped"
        ),
        GuardAlert::RackResumed { rack } => {
            tracing::info!(rack = %rack, "rack heard again: automatic fencing resumed")
        }
        GuardAlert::FleetResumed => {
            tracing::info!("fleet heard again: automatic fencing resumed")
        }
        GuardAlert::BootStalled { stall, stuck_ms } => tracing::warn!(
            uuid = %stall.uuid,
            phase = stall.phase.as_str(),
            stuck_s = stuck_ms / 1000,
            held = stall.held.as_deref().unwrap_or("no: power-cycling (boot retry)"),
            "boot stalled"
        ),
        GuardAlert::BootRetriesHeld { stalled } => tracing::error!(
            stalled,
            "many boots stalled at once: boot retries held, power-cycling none"
        ),
        GuardAlert::BootRetriesResumed => tracing::info!("boot retries resumed"),
    }
}

pin_project_lite::pin_project! {
    /// Polls a future, turning a panic inside it into an `Err` with the panic's payload
    /// (for the tasks that drive foreign code: BMC and cloud drivers).
    struct CatchUnwind<F> {
        #[pin]
        future: F,
    }
}

impl<F> CatchUnwind<F> {
    fn new(future: F) -> Self {
        CatchUnwind { future }
    }
}

impl<F: Future> Future for CatchUnwind<F> {
    type Output = Result<F::Output, Box<dyn std::any::Any + Send>>;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        let future = self.project().future;
        // The future is never polled again after a panic, so what it broke is not seen.
        match std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| future.poll(cx))) {
            Ok(Poll::Ready(output)) => Poll::Ready(Ok(output)),
            Ok(Poll::Pending) => Poll::Pending,
            Err(panic) => Poll::Ready(Err(panic)),
        }
    }
}

/// Restarts after a panic before the supervisor gives up and leaves the controller down.
pub const CONTROLLER_RESTARTS_MAX: u32 = 5;
/// Wait before restarting a panicked controller, doubled per restart.
pub const CONTROLLER_RESTART_DELAY: Duration = Duration::from_secs(1);

/// How the supervisor restarts a panicked controller.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct RestartPolicy {
    /// Restarts before it gives up and leaves the controller down.
    pub restarts_max: u32,
    /// Wait before the first restart, doubled per restart.
    pub delay_initial: Duration,
}

impl Default for RestartPolicy {
    fn default() -> Self {
        RestartPolicy {
            restarts_max: CONTROLLER_RESTARTS_MAX,
            delay_initial: CONTROLLER_RESTART_DELAY,
        }
    }
}

/// Runs `controller` as a supervised task with the default [`RestartPolicy`]: a panic is
/// logged with its message, shown on the guard board as down (so `/healthz` and
/// `bearman remediation guards` say so), and the controller restarted after a growing
/// delay, at most [`CONTROLLER_RESTARTS_MAX`] times. Aborting the returned handle stops
/// both. The controller keeps its memory (guard history, rate limit) across restarts.
pub fn spawn_supervised(controller: Arc<Controller>) -> tokio::task::JoinHandle<()> {
    spawn_supervised_with(controller, RestartPolicy::default())
}

/// [`spawn_supervised`] with an explicit policy. The returned task ends when the
/// controller is down for good (out of restarts).
pub fn spawn_supervised_with(
    controller: Arc<Controller>,
    policy: RestartPolicy,
) -> tokio::task::JoinHandle<()> {
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
            let restarting = restarts < policy.restarts_max;
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
            tokio::time::sleep(policy.delay_initial * 2u32.saturating_pow(restarts)).await;
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
