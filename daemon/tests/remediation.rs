//! The remediation controller end to end over in-process fakes of the BMC and the cloud:
//! a silent node is fenced (verified), evacuated and rebuilt; an unverifiable fence is
//! reported and handed to a human; every saga step can run twice without harm; power
//! sync confirms a powered-off node without the confirmation wait, and changes nothing
//! when the BMC reads On or cannot be read.

use std::collections::BTreeSet;
use std::sync::atomic::{AtomicI64, Ordering};
use std::sync::{Arc, Mutex};

use async_trait::async_trait;
use bearman::app::{App, Settings};
use bearman::bmc::BmcProvider;
use bearman::bmc::{Bmc, BmcError, PowerState};
use bearman::cloud::{Cloud, CloudError};
use bearman::controller::{Controller, ControllerConfig};
use bearman::core::lifecycle::LifecycleState;
use bearman::core::model::{Action, EventFilter, Node, NodeRole};
use bearman::core::power_sync::PowerReadingState;
use bearman::core::registration::RegistrationDefaults;
use bearman::core::remediation::{Status, Step};
use bearman::runtime::Clock;
use bearman::store::memory::MemoryStore;
use bearman::store::Store;
use bearman_proto::uuid::NodeUuid;

struct ManualClock(AtomicI64);

impl Clock for ManualClock {
    fn now_ms(&self) -> i64 {
        self.0.load(Ordering::SeqCst)
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
    calls: Mutex<Vec<&'static str>>,
}

#[async_trait]
impl Bmc for FakeBmc {
    async fn power_state(&self) -> Result<PowerState, BmcError> {
        self.calls.lock().unwrap().push("status");
        if self.status_hangs {
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
        *self.power_on.lock().unwrap() = true;
        Ok(())
    }
    async fn power_off(&self) -> Result<(), BmcError> {
        self.calls.lock().unwrap().push("off");
        *self.power_on.lock().unwrap() = false;
        Ok(())
    }
    async fn set_next_boot_pxe(&self) -> Result<(), BmcError> {
        self.calls.lock().unwrap().push("pxe");
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
    let clock = Arc::new(ManualClock(AtomicI64::new(START_MS)));
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
            heartbeat_fresh_ms: 30_000,
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
        let now = self.clock.0.fetch_add(ms, Ordering::SeqCst) + ms;
        for index in first..self.nodes {
            self.store
                .node_record_heartbeat(&NodeUuid::from_index(77, index), now)
                .await
                .unwrap();
        }
        self.controller.clone().tick().await.unwrap();
        // Let spawned steps finish; they only touch in-process fakes.
        for _ in 0..50 {
            tokio::task::yield_now().await;
        }
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

#[tokio::test]
async fn an_unverifiable_fence_never_evacuates_and_goes_to_a_human() {
    let h = harness(FakeBmc {
        always_reports_on: true,
        ..Default::default()
    })
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
                .remediation_update(&rewound, None, &[])
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
    let hangs = || FakeBmc {
        status_hangs: true,
        ..Default::default()
    };
    let h = harness_with(hangs(), hangs(), config, 40).await;
    // Late in the interval, so (nearly) every node's first poll is due.
    h.advance_all_alive(59_000).await;
    assert_eq!(h.controller.power_polls_in_flight(), 8, "one tick starts 8");
    h.advance_all_alive(100).await;
    assert_eq!(h.controller.power_polls_in_flight(), 16);
    for _ in 0..5 {
        h.advance_all_alive(100).await;
    }
    assert_eq!(
        h.controller.power_polls_in_flight(),
        16,
        "never more than 16 in flight"
    );
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
