//! The remediation controller end to end over in-process fakes of the BMC and the cloud:
//! a silent node is fenced (verified), evacuated and rebuilt; an unverifiable fence is
//! reported and handed to a human; every saga step can run twice without harm; power
//! sync confirms a powered-off node without the confirmation wait, and changes nothing
//! when the BMC reads On or cannot be read.

use std::collections::BTreeSet;
use std::sync::atomic::{AtomicI64, Ordering};
use std::sync::{Arc, Mutex};

use async_trait::async_trait;
use bearman::app::guards::ControllerLiveness;
use bearman::app::{App, Settings};
use bearman::bmc::BmcProvider;
use bearman::bmc::{Bmc, BmcError, PowerState};
use bearman::cloud::{Cloud, CloudError, VmStatus};
use bearman::controller::{spawn_supervised_with, Controller, ControllerConfig, RestartPolicy};
use bearman::core::lifecycle::LifecycleState;
use bearman::core::model::{Action, BootPhase, BootProgress, EventFilter, Node, NodeRole};
use bearman::core::power_sync::PowerReadingState;
use bearman::core::registration::RegistrationDefaults;
use bearman::core::remediation::{Limits, Remediation, RemediationKind, Status, Step};
use bearman::runtime::Clock;
use bearman::store::memory::MemoryStore;
use bearman::store::Store;
use bearman_proto::uuid::NodeUuid;

/// A clock the test sets, which can also misbehave on purpose: panic in any task but
/// one (a bug in the controller), or write the victim node whenever it is read (another
/// writer racing every write).
#[derive(Default)]
struct ManualClock {
    ms: AtomicI64,
    /// Panics this many more times in any task but the given one.
    panics: Mutex<Option<(tokio::task::Id, u32)>>,
    /// Bumps this node's generation on every read of the clock.
    meddle: Mutex<Option<(Arc<MemoryStore>, NodeUuid)>>,
}

impl Clock for ManualClock {
    fn now_ms(&self) -> i64 {
        let explode = match self.panics.lock().unwrap().as_mut() {
            Some((spared, left)) if *left > 0 && tokio::task::try_id() != Some(*spared) => {
                *left -= 1;
                true
            }
            _ => false,
        };
        // Outside the lock, so the clock keeps working for the spared task.
        if explode {
            panic!("clock exploded");
        }
        if let Some((store, uuid)) = self.meddle.lock().unwrap().as_ref() {
            let node = MemoryStore::now_or_never(store.node_get(uuid))
                .unwrap()
                .unwrap();
            MemoryStore::now_or_never(store.node_update(&node, &[])).unwrap();
        }
        self.ms.load(Ordering::SeqCst)
    }
}

/// A BMC whose machine obeys power commands, unless told to lie about its power, fail
/// every status read, or never answer one.
#[derive(Default)]
struct FakeBmc {
    power_on: Mutex<bool>,
    always_reports_on: bool,
    status_fails: bool,
    status_hangs: bool,
    /// A driver bug: every hard power-off panics.
    power_off_panics: bool,
    /// Gets a permit per status read that hung (tests wait for them).
    hung: Option<Arc<tokio::sync::Semaphore>>,
    /// The out-of-band network is cut: every call times out, until cleared.
    dark: std::sync::atomic::AtomicBool,
    calls: Mutex<Vec<&'static str>>,
}

#[async_trait]
impl Bmc for FakeBmc {
    async fn power_state(&self) -> Result<PowerState, BmcError> {
        self.calls.lock().unwrap().push("status");
        self.reachable("power_state")?;
        if self.status_hangs {
            if let Some(hung) = &self.hung {
                hung.add_permits(1);
            }
            std::future::pending::<()>().await;
        }
        if self.status_fails {
            return Err(BmcError::Timeout {
                bmc: "fake".into(),
                operation: "power_state",
            });
        }
        let on = *self.power_on.lock().unwrap() || self.always_reports_on;
        Ok(if on { PowerState::On } else { PowerState::Off })
    }
    async fn power_on(&self) -> Result<(), BmcError> {
        self.calls.lock().unwrap().push("on");
        self.reachable("power_on")?;
        *self.power_on.lock().unwrap() = true;
        Ok(())
    }
    async fn power_off(&self) -> Result<(), BmcError> {
        self.calls.lock().unwrap().push("off");
        self.reachable("power_off")?;
        if self.power_off_panics {
            panic!("bmc driver bug");
        }
        *self.power_on.lock().unwrap() = false;
        Ok(())
    }
    async fn set_next_boot_pxe(&self) -> Result<(), BmcError> {
        self.calls.lock().unwrap().push("pxe");
        Ok(())
    }
}

impl FakeBmc {
    fn reachable(&self, operation: &'static str) -> Result<(), BmcError> {
        if self.dark.load(Ordering::SeqCst) {
            return Err(BmcError::Timeout {
                bmc: "fake".into(),
                operation,
            });
        }
        Ok(())
    }
}

/// The victim's BMC, and one healthy BMC shared by every other node.
struct FleetBmcs {
    victim: NodeUuid,
    bmc: Arc<FakeBmc>,
    others: Arc<FakeBmc>,
}

impl BmcProvider for FleetBmcs {
    fn bmc_for(&self, node: &Node) -> Result<Arc<dyn Bmc>, bearman::bmc::BmcError> {
        Ok(if node.uuid == self.victim {
            self.bmc.clone()
        } else {
            self.others.clone()
        })
    }
}

/// A cloud holding some VMs on one host; evacuation moves them to "elsewhere".
#[derive(Default)]
struct FakeCloud {
    vms: Mutex<Vec<(String, String)>>,
    forced_down: Mutex<BTreeSet<String>>,
    evacuations: Mutex<Vec<String>>,
    /// Evacuated VMs never come up where they went (Nova keeps them in REBUILD).
    vms_stuck_building: std::sync::atomic::AtomicBool,
}

#[async_trait]
impl Cloud for FakeCloud {
    async fn vms_on_host(&self, host: &str) -> Result<Vec<String>, CloudError> {
        Ok(self
            .vms
            .lock()
            .unwrap()
            .iter()
            .filter(|(_, h)| h == host)
            .map(|(vm, _)| vm.clone())
            .collect())
    }
    async fn force_down(&self, host: &str) -> Result<(), CloudError> {
        self.forced_down.lock().unwrap().insert(host.to_string());
        Ok(())
    }
    async fn vm_status(&self, vm: &str) -> Result<VmStatus, CloudError> {
        let vms = self.vms.lock().unwrap();
        let (_, host) = vms
            .iter()
            .find(|(id, _)| id == vm)
            .ok_or_else(|| CloudError::Api(format!("no vm {vm}")))?;
        let status = if self.vms_stuck_building.load(Ordering::SeqCst) {
            "REBUILD"
        } else {
            "ACTIVE"
        };
        Ok(VmStatus {
            host: Some(host.clone()),
            status: status.into(),
        })
    }
    async fn evacuate(&self, vm: &str) -> Result<(), CloudError> {
        let mut vms = self.vms.lock().unwrap();
        let entry = vms
            .iter_mut()
            .find(|(id, _)| id == vm)
            .ok_or_else(|| CloudError::Api(format!("no vm {vm}")))?;
        if !self.forced_down.lock().unwrap().contains(&entry.1) {
            return Err(CloudError::ServiceInUse {
                host: entry.1.clone(),
            });
        }
        entry.1 = "elsewhere".into();
        self.evacuations.lock().unwrap().push(vm.to_string());
        Ok(())
    }
}

struct Harness {
    store: Arc<MemoryStore>,
    clock: Arc<ManualClock>,
    bmc: Arc<FakeBmc>,
    others: Arc<FakeBmc>,
    cloud: Arc<FakeCloud>,
    controller: Arc<Controller>,
    uuid: NodeUuid,
    nodes: u64,
}

/// Starts at a whole number of poll intervals, so first polls fall at their phase.
const START_MS: i64 = 1_020_000;

async fn harness(bmc: FakeBmc) -> Harness {
    harness_with(bmc, FakeBmc::default(), ControllerConfig::default(), 6).await
}

async fn harness_with(
    bmc: FakeBmc,
    others: FakeBmc,
    config: ControllerConfig,
    nodes: u64,
) -> Harness {
    let store = Arc::new(MemoryStore::new());
    let clock = Arc::new(ManualClock {
        ms: AtomicI64::new(START_MS),
        ..Default::default()
    });
    let bmc = Arc::new(bmc);
    *bmc.power_on.lock().unwrap() = true;
    let others = Arc::new(others);
    *others.power_on.lock().unwrap() = true;
    let cloud = Arc::new(FakeCloud::default());
    // Healthy nodes in one rack and the one that will go silent (node 0).
    let mut victim = None;
    for index in 0..nodes {
        let uuid = NodeUuid::from_index(77, index);
        let mut node = Node::new(uuid.clone(), format!("cn{index}"), NodeRole::Compute, 0);
        node.rack = Some("r1".into());
        node.state = LifecycleState::Ready;
        node.last_heartbeat_at_ms = Some(START_MS);
        store.node_create(&node, &[]).await.unwrap();
        if index == 0 {
            victim = Some(uuid);
        }
    }
    let uuid = victim.unwrap();
    cloud
        .vms
        .lock()
        .unwrap()
        .extend((0..3).map(|i| (format!("vm{i}"), "cn0".to_string())));
    let app = App::new(
        store.clone(),
        clock.clone(),
        Settings {
            defaults: RegistrationDefaults {
                role: NodeRole::Compute,
                flavor: None,
            },
            enrollment: bearman::core::enrollment::EnrollmentPolicy::accept_all(),
            heartbeat_fresh_ms: 30_000,
            firmware: Default::default(),
        },
    );
    let config = ControllerConfig {
        startup_quiet_ms: 0,
        ..config
    };
    let controller = Controller::new(
        app,
        Arc::new(FleetBmcs {
            victim: uuid.clone(),
            bmc: bmc.clone(),
            others: others.clone(),
        }),
        Some(cloud.clone()),
        config,
    );
    Harness {
        store,
        clock,
        bmc,
        others,
        cloud,
        controller,
        uuid,
        nodes,
    }
}

impl Harness {
    /// Advances time by `ms`, keeping every node but the victim heartbeating, and ticks.
    async fn advance(&self, ms: i64) {
        self.advance_heard_from(ms, 1).await
    }

    /// Like `advance`, with every node heartbeating, the victim too.
    async fn advance_all_alive(&self, ms: i64) {
        self.advance_heard_from(ms, 0).await
    }

    async fn advance_heard_from(&self, ms: i64, first: u64) {
        let now = self.clock.ms.fetch_add(ms, Ordering::SeqCst) + ms;
        for index in first..self.nodes {
            self.store
                .node_record_heartbeat(&NodeUuid::from_index(77, index), now)
                .await
                .unwrap();
        }
        // One tick, and every step and power poll it started, to the end.
        self.controller.clone().tick_and_wait().await.unwrap();
    }

    /// Advances time by `ms` with every node heartbeating and ticks without waiting for
    /// what the tick started (power polls that hang never end).
    async fn advance_no_wait(&self, ms: i64) {
        let now = self.clock.ms.fetch_add(ms, Ordering::SeqCst) + ms;
        for index in 0..self.nodes {
            self.store
                .node_record_heartbeat(&NodeUuid::from_index(77, index), now)
                .await
                .unwrap();
        }
        drop(self.controller.clone().tick().await.unwrap());
    }

    async fn node_state(&self) -> LifecycleState {
        self.store
            .node_get(&self.uuid)
            .await
            .unwrap()
            .unwrap()
            .state
    }

    async fn run_until(&self, what: &str, mut done: impl FnMut(LifecycleState) -> bool) {
        for _ in 0..2_000 {
            if done(self.node_state().await) {
                return;
            }
            self.advance(1_000).await;
        }
        panic!("{what}: node stuck in {}", self.node_state().await);
    }
}

#[tokio::test]
async fn silent_node_is_fenced_verified_evacuated_and_rebuilt() {
    let h = harness(FakeBmc::default()).await;
    h.run_until("fenced", |s| s == LifecycleState::Rebuilding)
        .await;
    assert!(!*h.bmc.power_on.lock().unwrap() || h.bmc.calls.lock().unwrap().contains(&"on"));
    let calls = h.bmc.calls.lock().unwrap().clone();
    let off = calls.iter().position(|c| *c == "off").expect("powered off");
    // Power sync reads the BMC before the fence too; the readback is the first read after.
    let verified = off
        + calls[off..]
            .iter()
            .position(|c| *c == "status")
            .expect("read back");
    let pxe = calls.iter().position(|c| *c == "pxe").expect("pxe");
    assert!(
        off < verified && verified < pxe,
        "off, verify, then rebuild: {calls:?}"
    );
    assert_eq!(
        h.cloud.evacuations.lock().unwrap().len(),
        3,
        "every VM evacuated exactly once"
    );
    assert!(h.cloud.forced_down.lock().unwrap().contains("cn0"));
    // The node comes back through the boot protocol.
    let mut node = h.store.node_get(&h.uuid).await.unwrap().unwrap();
    node.state = LifecycleState::Ready;
    node.last_heartbeat_at_ms = Some(h.clock.now_ms());
    h.store.node_update(&node, &[]).await.unwrap();
    for _ in 0..30 {
        h.advance(1_000).await;
    }
    let remediations = h
        .store
        .remediation_list(false, Some(&h.uuid), 10)
        .await
        .unwrap();
    assert_eq!(remediations.len(), 1);
    assert_eq!(remediations[0].status, Status::Done);
    let events = h
        .store
        .event_list(&EventFilter {
            node_uuid: Some(h.uuid.clone()),
            limit: 200,
            ..Default::default()
        })
        .await
        .unwrap();
    let actions: Vec<&str> = events.iter().rev().map(|e| e.action.as_str()).collect();
    for expected in [
        "heartbeats_missed",
        "remediation_started",
        "fence_started",
        "fence_verified",
        "rebuild_started",
        "remediation_done",
    ] {
        assert!(
            actions.contains(&expected),
            "{expected} missing from {actions:?}"
        );
    }
    // Other nodes were never touched.
    for index in 1..6u64 {
        let other = h
            .store
            .node_get(&NodeUuid::from_index(77, index))
            .await
            .unwrap()
            .unwrap();
        assert_eq!(other.state, LifecycleState::Ready);
    }
}

/// Default settings but no fence retries: a fence that cannot be verified is given up.
fn no_fence_retries() -> ControllerConfig {
    let mut config = ControllerConfig::default();
    config.limits.fence_retry_window_ms = 0;
    config
}

#[tokio::test]
async fn an_unverifiable_fence_never_evacuates_and_goes_to_a_human() {
    let h = harness_with(
        FakeBmc {
            always_reports_on: true,
            ..Default::default()
        },
        FakeBmc::default(),
        no_fence_retries(),
        6,
    )
    .await;
    h.run_until("given up", |s| s == LifecycleState::Maintenance)
        .await;
    assert!(
        h.cloud.evacuations.lock().unwrap().is_empty(),
        "no evacuation without a verified fence"
    );
    assert!(h.cloud.forced_down.lock().unwrap().is_empty());
    let remediation = &h
        .store
        .remediation_list(false, Some(&h.uuid), 10)
        .await
        .unwrap()[0];
    assert_eq!(remediation.status, Status::Failed);
    assert!(remediation
        .last_error
        .as_deref()
        .unwrap_or("")
        .contains("still reports power on"));
    // Maintenance nodes are never touched again automatically.
    for _ in 0..120 {
        h.advance(1_000).await;
    }
    assert_eq!(
        h.store
            .remediation_list(false, Some(&h.uuid), 10)
            .await
            .unwrap()
            .len(),
        1
    );
}

impl Harness {
    /// Runs until the victim's remediation has scheduled `rounds` fence retries.
    async fn run_until_fence_retries(&self, rounds: u32) {
        for _ in 0..5_000 {
            let list = self
                .store
                .remediation_list(false, Some(&self.uuid), 1)
                .await
                .unwrap();
            if list.first().is_some_and(|r| r.fence_retries >= rounds) {
                return;
            }
            self.advance(1_000).await;
        }
        panic!("never retried the fence {rounds} time(s)");
    }
}

#[tokio::test]
async fn a_fence_the_dark_bmc_cannot_verify_is_retried_and_completes_when_it_answers() {
    let h = harness(FakeBmc::default()).await;
    h.bmc.dark.store(true, Ordering::SeqCst);
    h.run_until_fence_retries(2).await;
    // Silent, unfenced, nothing evacuated; the alert is on the board and in the trail.
    assert_eq!(h.node_state().await, LifecycleState::Suspect);
    assert!(h.cloud.evacuations.lock().unwrap().is_empty());
    let board = h.controller.app.guards.status().expect("published");
    assert_eq!(board.fences_unverified.len(), 1, "{board:?}");
    assert_eq!(board.fences_unverified[0].uuid, h.uuid);
    let events = h.victim_events().await;
    assert!(events
        .iter()
        .any(|e| e.action == Action::FenceRetryScheduled && e.reason.contains("fence retry 2")));
    // The BMC answers: the next round verifies the fence and the VMs move.
    h.bmc.dark.store(false, Ordering::SeqCst);
    h.run_until("fenced after the BMC answered", |s| {
        matches!(s, LifecycleState::Fenced | LifecycleState::Rebuilding)
    })
    .await;
    for _ in 0..30 {
        h.advance(1_000).await;
    }
    assert_eq!(h.cloud.evacuations.lock().unwrap().len(), 3);
    let remediation = h.remediation().await;
    assert_eq!(remediation.status, Status::Active);
    assert!(remediation.fenced_at_ms.is_some());
    assert!(h
        .controller
        .app
        .guards
        .status()
        .unwrap()
        .fences_unverified
        .is_empty());
}

#[tokio::test]
async fn cancelling_fence_retries_hands_the_node_to_the_operator_who_did() {
    let h = harness(FakeBmc::default()).await;
    h.bmc.dark.store(true, Ordering::SeqCst);
    h.run_until_fence_retries(1).await;
    // Mid-round the power-off is half done: refused. Between rounds: cancelled.
    let id = h.remediation().await.id;
    let mut cancelled = None;
    for _ in 0..500 {
        match h
            .controller
            .app
            .remediation_cancel("alice", id, "checking by hand")
            .await
        {
            Ok(done) => {
                cancelled = Some(done);
                break;
            }
            Err(bearman::app::AppError::RemediationNotCancellable { .. }) => h.advance(1_000).await,
            Err(other) => panic!("{other}"),
        }
    }
    assert_eq!(
        cancelled.expect("cancellable between rounds").status,
        Status::Cancelled
    );
    let node = h.store.node_get(&h.uuid).await.unwrap().unwrap();
    assert_eq!(node.state, LifecycleState::Maintenance);
    let hold = node.maintenance.expect("a hold");
    assert_eq!(hold.by, "alice");
    assert!(!hold.parked_by_controller());
    // Held by a human: never taken again automatically.
    for _ in 0..120 {
        h.advance(1_000).await;
    }
    assert_eq!(
        h.store
            .remediation_list(false, Some(&h.uuid), 10)
            .await
            .unwrap()
            .len(),
        1
    );
}

#[tokio::test]
async fn a_node_that_comes_back_while_its_fence_retry_waits_stands_the_saga_down() {
    let h = harness(FakeBmc::default()).await;
    h.bmc.dark.store(true, Ordering::SeqCst);
    h.run_until_fence_retries(1).await;
    // It rebooted by itself and heartbeats again: nothing was evacuated, so it keeps its
    // VMs and the retries stop.
    for _ in 0..200 {
        if h.remediation().await.status != Status::Active {
            break;
        }
        h.controller.app.node_heartbeat(&h.uuid, None).await.ok();
        h.advance_all_alive(1_000).await;
    }
    let remediation = h.remediation().await;
    assert_eq!(remediation.status, Status::Cancelled);
    assert_eq!(h.node_state().await, LifecycleState::Ready);
    assert!(h.cloud.evacuations.lock().unwrap().is_empty());
}

#[tokio::test]
async fn evacuated_vms_that_never_come_up_elsewhere_are_reported_and_the_rebuild_goes_on() {
    let h = harness(FakeBmc::default()).await;
    h.cloud.vms_stuck_building.store(true, Ordering::SeqCst);
    h.run_until("rebuilding after the bound", |s| {
        s == LifecycleState::Rebuilding
    })
    .await;
    let remediation = h.remediation().await;
    assert_eq!(remediation.vms_evacuated.len(), 3, "{remediation:?}");
    assert_eq!(remediation.vms_unverified.len(), 1);
    assert!(remediation.vms_unverified[0].contains("3 evacuated VM(s) not running elsewhere yet"));
    let events = h.victim_events().await;
    let reported = events
        .iter()
        .find(|e| e.action == Action::EvacuationUnverified)
        .expect("an evacuation_unverified alert");
    assert!(
        reported.reason.contains("vm0 REBUILD on elsewhere"),
        "{}",
        reported.reason
    );
    // Verified VMs are checked, not assumed: with them running, no alert.
    let h = harness(FakeBmc::default()).await;
    h.run_until("rebuilding", |s| s == LifecycleState::Rebuilding)
        .await;
    let events = h.victim_events().await;
    assert!(!events
        .iter()
        .any(|e| e.action == Action::EvacuationUnverified));
    assert!(events
        .iter()
        .any(|e| e.reason.contains("verify_evacuated done")));
}

#[tokio::test]
async fn every_step_can_run_twice_without_harm() {
    let h = harness(FakeBmc::default()).await;
    // Wait for the saga to exist, then replay each step once more after it completes, as
    // a daemon that crashed after acting but before recording would.
    h.run_until("suspect", |s| s == LifecycleState::Suspect)
        .await;
    let mut replayed = BTreeSet::new();
    for _ in 0..2_000 {
        let Some(remediation) = h
            .store
            .remediation_list(false, Some(&h.uuid), 1)
            .await
            .unwrap()
            .pop()
        else {
            h.advance(1_000).await;
            continue;
        };
        if remediation.status != Status::Active {
            break;
        }
        let step_index = remediation.step_index;
        if step_index > 0
            && replayed.insert(step_index - 1)
            && remediation.plan[step_index - 1] != Step::AwaitReady
        {
            let mut rewound = remediation.clone();
            rewound.step_index -= 1;
            rewound.attempts = 0;
            h.store
                .remediation_update(&rewound, None, &[], None)
                .await
                .unwrap();
        }
        if h.node_state().await == LifecycleState::Rebuilding {
            let mut node = h.store.node_get(&h.uuid).await.unwrap().unwrap();
            node.state = LifecycleState::Ready;
            node.last_heartbeat_at_ms = Some(h.clock.now_ms());
            h.store.node_update(&node, &[]).await.unwrap();
        }
        h.advance(1_000).await;
    }
    assert!(replayed.len() >= 4, "replayed steps: {replayed:?}");
    assert_eq!(
        h.cloud.evacuations.lock().unwrap().len(),
        3,
        "replays evacuated nothing twice"
    );
    let remediation = &h
        .store
        .remediation_list(false, Some(&h.uuid), 1)
        .await
        .unwrap()[0];
    assert_eq!(remediation.status, Status::Done, "{remediation:?}");
    assert_eq!(h.node_state().await, LifecycleState::Ready);
}

impl Harness {
    async fn victim_events(&self) -> Vec<bearman::core::model::Event> {
        let mut events = self
            .store
            .event_list(&EventFilter {
                node_uuid: Some(self.uuid.clone()),
                limit: 500,
                ..Default::default()
            })
            .await
            .unwrap();
        events.reverse();
        events
    }

    /// Silence (ms since the victim was last heard) at which the automatic remediation
    /// started, running up to `limit_ms` of virtual time.
    async fn silence_when_remediation_started(&self, limit_ms: i64) -> Option<i64> {
        for _ in 0..limit_ms / 1_000 {
            self.advance(1_000).await;
            if let Some(started) = self
                .victim_events()
                .await
                .iter()
                .find(|e| e.action == Action::RemediationStarted)
            {
                return Some(started.at_ms - START_MS);
            }
        }
        None
    }
}

#[tokio::test]
async fn a_silent_node_whose_bmc_reads_off_is_fenced_without_the_confirm_wait() {
    let h = harness(FakeBmc::default()).await;
    let health = ControllerConfig::default().health;
    // The power supply fails: the node stops heartbeating and its BMC reads Off.
    *h.bmc.power_on.lock().unwrap() = false;
    let silence = h
        .silence_when_remediation_started(120_000)
        .await
        .expect("fenced");
    assert!(
        silence > health.heartbeat_grace_ms && silence <= health.heartbeat_grace_ms + 1_000,
        "fenced at {silence} ms of silence: as soon as the grace ran out"
    );
    let events = h.victim_events().await;
    let started = events
        .iter()
        .find(|e| e.action == Action::RemediationStarted)
        .unwrap();
    assert!(
        started.reason.contains("BMC reads power off"),
        "{started:?}"
    );
    let power: Vec<&str> = events
        .iter()
        .filter(|e| e.action == Action::PowerStateChanged)
        .map(|e| e.reason.as_str())
        .collect();
    assert_eq!(power.len(), 1, "one event for the one change: {power:?}");
    assert!(power[0].starts_with("BMC reads power off"), "{power:?}");
    // The fence still goes through its own verified power-off and the saga completes.
    h.run_until("rebuilding", |s| s == LifecycleState::Rebuilding)
        .await;
    assert_eq!(h.cloud.evacuations.lock().unwrap().len(), 3);
}

#[tokio::test]
async fn a_silent_node_whose_bmc_reads_on_waits_out_the_confirm_period() {
    let h = harness(FakeBmc::default()).await;
    let health = ControllerConfig::default().health;
    // A hung kernel: silent, power still on.
    let silence = h
        .silence_when_remediation_started(120_000)
        .await
        .expect("fenced");
    assert!(
        silence > health.heartbeat_grace_ms + health.fence_confirm_ms
            && silence <= health.heartbeat_grace_ms + health.fence_confirm_ms + 1_000,
        "fenced at {silence} ms of silence: only after the confirmation period"
    );
    let reading = h.store.node_power_get(&h.uuid).await.unwrap().unwrap();
    assert_eq!(reading.state, PowerReadingState::On);
    assert!(
        reading.read_at_ms > START_MS,
        "read after the node fell silent"
    );
}

#[tokio::test]
async fn a_failed_poll_is_recorded_unknown_and_changes_nothing() {
    let h = harness(FakeBmc {
        status_fails: true,
        ..Default::default()
    })
    .await;
    let health = ControllerConfig::default().health;
    *h.bmc.power_on.lock().unwrap() = false;
    let silence = h
        .silence_when_remediation_started(120_000)
        .await
        .expect("fenced");
    assert!(
        silence > health.heartbeat_grace_ms + health.fence_confirm_ms,
        "fenced at {silence} ms of silence: an unreadable BMC confirms nothing"
    );
    let reading = h.store.node_power_get(&h.uuid).await.unwrap().unwrap();
    assert_eq!(reading.state, PowerReadingState::Unknown);
    assert!(
        reading.error.as_deref().unwrap_or("").contains("timed out"),
        "{reading:?}"
    );
}

#[tokio::test]
async fn a_power_event_is_written_only_when_the_reading_changes() {
    let h = harness(FakeBmc::default()).await;
    // Five healthy minutes: every node polled about five times, no power event.
    for _ in 0..300 {
        h.advance_all_alive(1_000).await;
    }
    let polls = h.others.calls.lock().unwrap().len() + h.bmc.calls.lock().unwrap().len();
    assert!(
        (4 * 6..=6 * 6).contains(&polls),
        "{polls} polls of 6 nodes in 5 minutes at one per minute"
    );
    let events = h.store.event_list(&EventFilter::default()).await.unwrap();
    assert!(
        events.iter().all(|e| e.action != Action::PowerStateChanged),
        "{events:?}"
    );
    // The victim loses power (but is still heard from, say, a stale heartbeat path):
    // one event at the change, none for the polls that read Off again.
    *h.bmc.power_on.lock().unwrap() = false;
    for _ in 0..200 {
        h.advance_all_alive(1_000).await;
    }
    let changes: Vec<String> = h
        .victim_events()
        .await
        .into_iter()
        .filter(|e| e.action == Action::PowerStateChanged)
        .map(|e| e.reason)
        .collect();
    assert!(h.bmc.calls.lock().unwrap().len() >= 7, "kept polling");
    assert_eq!(changes, vec!["BMC reads power off (was on)".to_string()]);
}

#[tokio::test]
async fn power_polls_are_bounded_per_tick_and_in_flight() {
    let config = ControllerConfig {
        power_polls_per_tick_max: 8,
        power_polls_in_flight_max: 16,
        ..Default::default()
    };
    // Every BMC hangs on a status read: polls pile up to the bound and no further.
    let hung = Arc::new(tokio::sync::Semaphore::new(0));
    let hangs = || FakeBmc {
        status_hangs: true,
        hung: Some(hung.clone()),
        ..Default::default()
    };
    let h = harness_with(hangs(), hangs(), config, 40).await;
    // Late in the interval, so (nearly) every node's first poll is due.
    h.advance_no_wait(59_000).await;
    assert_eq!(h.controller.power_polls_in_flight(), 8, "one tick starts 8");
    h.advance_no_wait(100).await;
    assert_eq!(h.controller.power_polls_in_flight(), 16);
    for _ in 0..5 {
        h.advance_no_wait(100).await;
    }
    assert_eq!(
        h.controller.power_polls_in_flight(),
        16,
        "never more than 16 in flight"
    );
    // Every poll reached its BMC and hangs there.
    tokio::time::timeout(std::time::Duration::from_secs(10), hung.acquire_many(16))
        .await
        .expect("16 polls hanging at their BMCs")
        .unwrap()
        .forget();
    let calls = h.others.calls.lock().unwrap().len() + h.bmc.calls.lock().unwrap().len();
    assert_eq!(calls, 16, "hung polls are not repeated");
}

#[tokio::test]
async fn power_sync_is_off_at_zero() {
    let mut config = ControllerConfig::default();
    config.health.power_poll_interval_ms = 0;
    let h = harness_with(FakeBmc::default(), FakeBmc::default(), config.clone(), 6).await;
    *h.bmc.power_on.lock().unwrap() = false;
    let silence = h
        .silence_when_remediation_started(120_000)
        .await
        .expect("fenced");
    assert!(
        silence > config.health.heartbeat_grace_ms + config.health.fence_confirm_ms,
        "fenced at {silence} ms of silence: without power sync the confirmation period holds"
    );
    assert!(h.others.calls.lock().unwrap().is_empty(), "nobody polled");
    assert_eq!(h.store.node_power_get(&h.uuid).await.unwrap(), None);
}

impl Harness {
    /// Puts the victim in `state` with a `kind` remediation at `step` after `attempts`,
    /// as if the saga had got that far (and someone had moved the node meanwhile).
    async fn remediation_at(
        &self,
        kind: RemediationKind,
        step: Step,
        attempts: u32,
        state: LifecycleState,
    ) -> Remediation {
        let mut node = self.store.node_get(&self.uuid).await.unwrap().unwrap();
        node.state = state;
        self.store.node_update(&node, &[]).await.unwrap();
        let now = self.clock.now_ms();
        let created = self
            .store
            .remediation_create(
                &Remediation::new(self.uuid.clone(), kind, "test", "test", now),
                &[],
                None,
            )
            .await
            .unwrap();
        let mut at = created.clone();
        at.step_index = at.plan.iter().position(|s| *s == step).unwrap();
        at.attempts = attempts;
        self.store
            .remediation_update(&at, None, &[], None)
            .await
            .unwrap()
            .0
    }

    async fn remediation(&self) -> Remediation {
        self.store
            .remediation_list(false, Some(&self.uuid), 1)
            .await
            .unwrap()
            .remove(0)
    }
}

#[tokio::test]
async fn an_outcome_the_nodes_state_does_not_allow_fails_the_saga_loudly() {
    let h = harness(FakeBmc {
        always_reports_on: true,
        ..Default::default()
    })
    .await;
    // The last readback of a fence whose node someone moved back to Ready: giving up
    // implies FenceFailed, which Ready does not allow.
    let readbacks_max = Limits::default().readbacks_max;
    h.remediation_at(
        RemediationKind::Fence,
        Step::VerifyOff,
        readbacks_max - 1,
        LifecycleState::Ready,
    )
    .await;
    h.advance_all_alive(1_000).await;
    let remediation = h.remediation().await;
    assert_eq!(remediation.status, Status::Failed);
    assert_eq!(remediation.attempts, readbacks_max);
    let illegal = "illegal transition: fence_failed is not allowed while the node is ready";
    assert!(
        remediation
            .last_error
            .as_deref()
            .unwrap_or("")
            .contains(illegal),
        "{remediation:?}"
    );
    // Not dropped: the node goes to a human, and the trail says why.
    assert_eq!(h.node_state().await, LifecycleState::Maintenance);
    let events = h.victim_events().await;
    let failed = events
        .iter()
        .find(|e| e.action == Action::RemediationFailed)
        .expect("remediation_failed");
    assert!(failed.reason.contains(illegal), "{failed:?}");
    let maintenance = events
        .iter()
        .find(|e| e.action == Action::MaintenanceOn)
        .expect("maintenance_on");
    assert!(maintenance.reason.contains(illegal), "{maintenance:?}");
    assert_eq!(maintenance.from_state.as_deref(), Some("ready"));
}

#[tokio::test]
async fn an_illegal_event_mid_fence_records_the_fence_failed_first() {
    let h = harness(FakeBmc::default()).await;
    // A drain's maintenance step on a node still Fencing (Maintenance is not allowed
    // there): the fence is recorded failed, then the node goes to maintenance.
    h.remediation_at(
        RemediationKind::Drain,
        Step::Maintenance,
        0,
        LifecycleState::Fencing,
    )
    .await;
    h.advance_all_alive(1_000).await;
    assert_eq!(h.remediation().await.status, Status::Failed);
    assert_eq!(h.node_state().await, LifecycleState::Maintenance);
    let actions: Vec<Action> = h.victim_events().await.iter().map(|e| e.action).collect();
    let tail = &actions[actions.len() - 3..];
    assert_eq!(
        tail,
        [
            Action::FenceFailed,
            Action::MaintenanceOn,
            Action::RemediationFailed
        ]
    );
}

#[tokio::test]
async fn exhausted_outcome_writes_are_an_error_with_an_audit_event() {
    let h = harness(FakeBmc::default()).await;
    *h.bmc.power_on.lock().unwrap() = false;
    h.remediation_at(
        RemediationKind::Fence,
        Step::VerifyOff,
        1,
        LifecycleState::Fencing,
    )
    .await;
    // Someone writes the node between every read and write of ours.
    *h.clock.meddle.lock().unwrap() = Some((h.store.clone(), h.uuid.clone()));
    h.advance_all_alive(1_000).await;
    *h.clock.meddle.lock().unwrap() = None;
    let remediation = h.remediation().await;
    assert_eq!(remediation.status, Status::Active, "{remediation:?}");
    assert_eq!(remediation.attempts, 2, "the attempt is recorded");
    assert_eq!(h.node_state().await, LifecycleState::Fencing);
    let abandoned: Vec<String> = h
        .victim_events()
        .await
        .into_iter()
        .filter(|e| e.action == Action::RemediationWriteAbandoned)
        .map(|e| e.reason)
        .collect();
    assert_eq!(abandoned.len(), 1, "{abandoned:?}");
    assert!(
        abandoned[0].contains(
            "step outcome of step verify_off attempt 2 not recorded after 4 write conflicts"
        ),
        "{abandoned:?}"
    );
    // Left alone, the step runs again and the fence is verified.
    h.advance_all_alive(1_000).await;
    h.advance_all_alive(1_000).await;
    assert_eq!(h.node_state().await, LifecycleState::Fenced);
    assert!(h.remediation().await.fenced_at_ms.is_some());
}

#[tokio::test]
async fn a_panicking_bmc_driver_fails_its_attempts_and_the_saga_never_sticks() {
    // Without fence retries the budget's end is reached (with them, the same attempts
    // repeat round after round; see the dark-BMC test).
    let h = harness_with(
        FakeBmc {
            power_off_panics: true,
            ..Default::default()
        },
        FakeBmc::default(),
        no_fence_retries(),
        6,
    )
    .await;
    h.run_until("given up", |s| s == LifecycleState::Maintenance)
        .await;
    let remediation = h.remediation().await;
    assert_eq!(remediation.status, Status::Failed);
    assert_eq!(remediation.plan[remediation.step_index], Step::PowerOff);
    assert_eq!(remediation.attempts, Limits::default().power_attempts_max);
    assert!(
        remediation
            .last_error
            .as_deref()
            .unwrap_or("")
            .contains("power_off panicked: bmc driver bug"),
        "{remediation:?}"
    );
    assert_eq!(h.controller.steps_running(), 0, "no step left in flight");
    let events = h.victim_events().await;
    assert!(events.iter().any(|e| e.action == Action::RemediationFailed));
    assert!(h.cloud.evacuations.lock().unwrap().is_empty());
}

#[tokio::test]
async fn a_panicking_controller_shows_down_on_the_guard_board_and_restarts() {
    let h = harness(FakeBmc::default()).await;
    let board = h.controller.app.guards.clone();
    assert_eq!(board.liveness(), ControllerLiveness::NotRunning);
    let supervisor = spawn_supervised_with(
        h.controller.clone(),
        RestartPolicy {
            restarts_max: 1,
            delay_initial: std::time::Duration::from_millis(1),
        },
    );
    // The controller's first tick panics, and so does the first after its restart; the
    // supervisor itself is spared. Nothing has run yet (one thread, no await so far).
    *h.clock.panics.lock().unwrap() = Some((supervisor.id(), 2));
    tokio::time::timeout(std::time::Duration::from_secs(10), supervisor)
        .await
        .expect("the supervisor gives up after one restart")
        .unwrap();
    match board.liveness() {
        ControllerLiveness::Down {
            reason,
            restarts,
            restarting,
            ..
        } => {
            assert_eq!(reason, "panicked: clock exploded");
            assert_eq!(restarts, 1, "restarted once before giving up");
            assert!(!restarting);
        }
        other => panic!("controller not shown down: {other:?}"),
    }
    assert!(!board.liveness().is_running());
}

/// Puts the victim mid-boot: registered, fetched its target OS, stage 2 never came up.
async fn victim_stuck_provisioning(h: &Harness) {
    let mut node = h.store.node_get(&h.uuid).await.unwrap().unwrap();
    node.state = LifecycleState::Provisioning;
    h.store.node_update(&node, &[]).await.unwrap();
}

/// The victim's state changes, oldest first, as (action, from, to).
async fn victim_transitions(h: &Harness) -> Vec<(String, String, String)> {
    let mut events = h
        .store
        .event_list(&EventFilter {
            node_uuid: Some(h.uuid.clone()),
            limit: 500,
            ..Default::default()
        })
        .await
        .unwrap();
    events.reverse();
    events
        .into_iter()
        .filter_map(|e| Some((e.action.to_string(), e.from_state?, e.to_state?)))
        .collect()
}

#[tokio::test]
async fn an_operator_fence_of_a_provisioning_node_records_it_fencing_then_fenced() {
    // Before `may_start`/`entering` agreed, this node was powered off and stayed recorded
    // as `provisioning`: the saga's fence_verified was illegal there and dropped.
    let h = harness(FakeBmc::default()).await;
    victim_stuck_provisioning(&h).await;
    h.controller
        .app
        .remediation_start(
            "token:ops",
            &h.uuid,
            RemediationKind::Fence,
            "stuck in boot",
        )
        .await
        .unwrap();
    h.run_until("fenced", |s| s == LifecycleState::Fenced).await;
    assert!(!*h.bmc.power_on.lock().unwrap(), "powered off");
    let remediation = &h
        .store
        .remediation_list(false, Some(&h.uuid), 10)
        .await
        .unwrap()[0];
    assert_eq!(remediation.status, Status::Done);
    assert_eq!(
        victim_transitions(&h).await,
        vec![
            (
                "fence_started".into(),
                "provisioning".into(),
                "fencing".into()
            ),
            ("fence_verified".into(), "fencing".into(), "fenced".into()),
        ]
    );
}

#[tokio::test]
async fn an_unverifiable_operator_fence_of_a_provisioning_node_goes_to_maintenance() {
    // Before: FenceFailed was illegal from `provisioning`, so the MaintenanceOn after it
    // was dropped too and the node never reached a human.
    let h = harness(FakeBmc {
        always_reports_on: true,
        ..Default::default()
    })
    .await;
    victim_stuck_provisioning(&h).await;
    h.controller
        .app
        .remediation_start(
            "token:ops",
            &h.uuid,
            RemediationKind::Fence,
            "stuck in boot",
        )
        .await
        .unwrap();
    h.run_until("given up", |s| s == LifecycleState::Maintenance)
        .await;
    let remediation = &h
        .store
        .remediation_list(false, Some(&h.uuid), 10)
        .await
        .unwrap()[0];
    assert_eq!(remediation.status, Status::Failed);
    let transitions: Vec<String> = victim_transitions(&h)
        .await
        .into_iter()
        .map(|(action, from, to)| format!("{action} {from}->{to}"))
        .collect();
    assert_eq!(
        transitions,
        vec![
            "fence_started provisioning->fencing",
            "fence_failed fencing->suspect",
            "maintenance_on suspect->maintenance",
        ]
    );
}

#[tokio::test]
async fn operators_cannot_remediate_a_node_in_maintenance() {
    let h = harness(FakeBmc::default()).await;
    let mut node = h.store.node_get(&h.uuid).await.unwrap().unwrap();
    node.state = LifecycleState::Maintenance;
    h.store.node_update(&node, &[]).await.unwrap();
    let refused = h
        .controller
        .app
        .remediation_start("token:ops", &h.uuid, RemediationKind::Rebuild, "why not")
        .await
        .unwrap_err();
    assert!(
        matches!(refused, bearman::app::AppError::RemediationRefused { .. }),
        "{refused}"
    );
    assert!(h
        .store
        .remediation_list(false, Some(&h.uuid), 10)
        .await
        .unwrap()
        .is_empty());
}

/// Puts the victim mid-first-boot, with a BMC address: it fetched its target OS at
/// `at_ms` and stage 2 never came up. No remediation on it.
async fn victim_first_boot_stalled_since(h: &Harness, at_ms: i64) {
    let mut node = h.store.node_get(&h.uuid).await.unwrap().unwrap();
    node.state = LifecycleState::Provisioning;
    node.bmc.address = Some("10.0.0.1".into());
    node.boot = Some(BootProgress {
        phase: BootPhase::OsFetched,
        at_ms,
        until_ms: None,
    });
    h.store.node_update(&node, &[]).await.unwrap();
}

#[tokio::test]
async fn a_first_boot_stalled_past_its_deadline_is_reported_and_power_cycled_into_pxe() {
    let h = harness(FakeBmc::default()).await;
    victim_first_boot_stalled_since(&h, START_MS).await;
    let deadline = Limits::default().boot_os_fetched_timeout_ms;
    // Within its deadline nothing happens; once past it (seen at the next boot scan)
    // a boot retry power-cycles it: PXE, off (verified), on.
    h.run_until("power-cycled", |s| s == LifecycleState::Rebuilding)
        .await;
    let waited = h.clock.now_ms() - START_MS;
    let scan = ControllerConfig::default().boot_scan_ms;
    assert!(
        (deadline..=deadline + scan + 5_000).contains(&waited),
        "power-cycled {waited} ms after the stall began (deadline {deadline} ms)"
    );
    let remediation = &h
        .store
        .remediation_list(true, Some(&h.uuid), 10)
        .await
        .unwrap()[0];
    assert_eq!(remediation.kind, RemediationKind::BootRetry);
    assert_eq!(remediation.requested_by, "system");
    for _ in 0..5 {
        h.advance(1_000).await;
    }
    let calls = h.bmc.calls.lock().unwrap().clone();
    let pxe = calls.iter().position(|c| *c == "pxe").expect("pxe set");
    let off = calls.iter().position(|c| *c == "off").expect("powered off");
    let on = calls.iter().rposition(|c| *c == "on").expect("powered on");
    assert!(pxe < off && off < on, "PXE, off, then on: {calls:?}");
    let node = h.store.node_get(&h.uuid).await.unwrap().unwrap();
    assert_eq!(
        node.boot.map(|b| b.phase),
        Some(BootPhase::PoweredOn),
        "the boot watchdog's clock restarts at the power-on"
    );
    // The reboot comes up: the retry is done.
    let mut node = node;
    node.state = LifecycleState::Ready;
    node.last_heartbeat_at_ms = Some(h.clock.now_ms());
    h.store.node_update(&node, &[]).await.unwrap();
    h.advance_all_alive(1_000).await;
    h.advance_all_alive(1_000).await;
    let remediation = &h
        .store
        .remediation_list(false, Some(&h.uuid), 10)
        .await
        .unwrap()[0];
    assert_eq!(remediation.status, Status::Done);
    let stalled: Vec<String> = h
        .store
        .event_list(&EventFilter {
            node_uuid: Some(h.uuid.clone()),
            limit: 500,
            ..Default::default()
        })
        .await
        .unwrap()
        .into_iter()
        .filter(|e| e.action == Action::BootStalled)
        .map(|e| e.reason)
        .collect();
    assert_eq!(stalled.len(), 1, "reported once: {stalled:?}");
    assert!(
        stalled[0].contains("os_fetched") && stalled[0].contains("power-cycling"),
        "{}",
        stalled[0]
    );
    assert_eq!(
        victim_transitions(&h).await.first().map(|t| t.0.as_str()),
        Some("rebuild_started")
    );
}

#[tokio::test]
async fn a_stalled_first_boot_that_never_comes_up_ends_with_a_human_not_a_loop() {
    let h = harness(FakeBmc::default()).await;
    victim_first_boot_stalled_since(&h, START_MS).await;
    // Each power-cycle boots nowhere: the watchdog calls each rebuild stalled in turn,
    // `rebuilds_max` in all, then the node goes to maintenance, parked by the controller.
    // (Each waits out the powered_on deadline, 10 minutes: 5 s steps.)
    for _ in 0..2_000 {
        if h.node_state().await == LifecycleState::Maintenance {
            break;
        }
        h.advance(5_000).await;
    }
    assert_eq!(h.node_state().await, LifecycleState::Maintenance);
    let remediations = h
        .store
        .remediation_list(false, Some(&h.uuid), 10)
        .await
        .unwrap();
    assert_eq!(remediations.len(), 1, "one boot retry, not one per stall");
    assert_eq!(remediations[0].status, Status::Failed);
    assert_eq!(remediations[0].rebuilds + 1, Limits::default().rebuilds_max);
    let node = h.store.node_get(&h.uuid).await.unwrap().unwrap();
    assert!(node.maintenance.unwrap().parked_by_controller());
    // Parked: no further boot retries however long it stays there.
    for _ in 0..60 {
        h.advance(15_000).await;
    }
    assert_eq!(
        h.store
            .remediation_list(false, Some(&h.uuid), 10)
            .await
            .unwrap()
            .len(),
        1
    );
}
