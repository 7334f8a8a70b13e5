//! The remediation controller end to end over in-process fakes of the BMC and the cloud:
//! a silent node is fenced (verified), evacuated and rebuilt; an unverifiable fence is
//! reported and handed to a human; every saga step can run twice without harm.

use std::collections::BTreeSet;
use std::sync::atomic::{AtomicI64, Ordering};
use std::sync::{Arc, Mutex};

use async_trait::async_trait;
use bearman::api::{AppState, ServiceConfig};
use bearman::bmc::{Bmc, BmcError, PowerState};
use bearman::cloud::{Cloud, CloudError};
use bearman::controller::{BmcProvider, Controller, ControllerConfig};
use bearman::core::boot::Stage1Config;
use bearman::core::lifecycle::LifecycleState;
use bearman::core::model::{EventFilter, Node, NodeRole};
use bearman::core::registration::RegistrationDefaults;
use bearman::core::remediation::{Status, Step};
use bearman::images::MemoryImages;
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

/// A BMC whose machine obeys power commands, unless told to lie about its power.
#[derive(Default)]
struct FakeBmc {
    power_on: Mutex<bool>,
    always_reports_on: bool,
    calls: Mutex<Vec<&'static str>>,
}

#[async_trait]
impl Bmc for FakeBmc {
    async fn power_state(&self) -> Result<PowerState, BmcError> {
        self.calls.lock().unwrap().push("status");
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

struct OneBmc(Arc<FakeBmc>);

impl BmcProvider for OneBmc {
    fn bmc_for(&self, _node: &Node) -> Result<Arc<dyn Bmc>, String> {
        Ok(self.0.clone())
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
    cloud: Arc<FakeCloud>,
    controller: Arc<Controller>,
    uuid: NodeUuid,
}

async fn harness(bmc: FakeBmc) -> Harness {
    let store = Arc::new(MemoryStore::new());
    let clock = Arc::new(ManualClock(AtomicI64::new(1_000_000)));
    let bmc = Arc::new(bmc);
    *bmc.power_on.lock().unwrap() = true;
    let cloud = Arc::new(FakeCloud::default());
    // Five healthy nodes in one rack and the one that will go silent.
    let mut victim = None;
    for index in 0..6u64 {
        let uuid = NodeUuid::from_index(77, index);
        let mut node = Node::new(uuid.clone(), format!("cn{index}"), NodeRole::Compute, 0);
        node.rack = Some("r1".into());
        node.state = LifecycleState::Ready;
        node.last_heartbeat_at_ms = Some(1_000_000);
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
    let state = AppState::new(
        store.clone(),
        clock.clone(),
        Arc::new(MemoryImages::default()),
        ServiceConfig {
            public_url: "http://bearman.test".into(),
            stage1: Stage1Config::default(),
            defaults: RegistrationDefaults {
                role: NodeRole::Compute,
                flavor: None,
            },
            body_limit_bytes: 65536,
            heartbeat_fresh_ms: 30_000,
        },
    );
    let config = ControllerConfig {
        startup_quiet_ms: 0,
        ..Default::default()
    };
    let controller = Controller::new(
        state,
        Arc::new(OneBmc(bmc.clone())),
        Some(cloud.clone()),
        config,
    );
    Harness {
        store,
        clock,
        bmc,
        cloud,
        controller,
        uuid,
    }
}

impl Harness {
    /// Advances time by `ms`, keeping every node but the victim heartbeating, and ticks.
    async fn advance(&self, ms: i64) {
        let now = self.clock.0.fetch_add(ms, Ordering::SeqCst) + ms;
        for index in 1..6u64 {
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
    let verified = calls
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
