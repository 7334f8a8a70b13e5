//! Chaos drills end to end over in-process fakes of the machines, their BMCs and the
//! cloud, with the real application layer and controller on a manual clock: a
//! `kernel_panic` drill is injected through the BMC (an NMI), detected, fenced, evacuated,
//! rebuilt and reported against its prediction; another node going Suspect aborts a
//! `power_loss` drill and the target is powered back on; a `silence` deafens the daemon
//! to one node until its fence; the kill switch aborts and blocks; a preflight that fails
//! starts nothing; a drill cut off mid-injection is aborted when resumed.

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicI64, Ordering};
use std::sync::{Arc, Mutex};

use async_trait::async_trait;
use bearman::app::drill::TwinSources;
use bearman::app::{App, AppError, Settings};
use bearman::bmc::{Bmc, BmcError, BmcProvider, PowerState};
use bearman::cloud::{Cloud, CloudError, VmStatus};
use bearman::controller::drill_faults::BmcFaults;
use bearman::controller::{Controller, ControllerConfig};
use bearman::core::drill::{DrillPhase, PhaseSpread, Prediction};
use bearman::core::lifecycle::LifecycleState;
use bearman::core::model::{EventFilter, Node, NodeRole};
use bearman::core::registration::RegistrationDefaults;
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

/// A machine and its BMC: power, and whether its kernel panicked (an NMI on a kernel
/// booted with `unknown_nmi_panic=1`). A panicked or powered-off machine sends nothing.
#[derive(Default)]
struct Machine {
    on: Mutex<bool>,
    panicked: Mutex<bool>,
    /// Told to go quiet by the test (a crash the drill did not cause).
    crashed: Mutex<bool>,
    /// Set by the rebuild: the next power-on boots from the network.
    pxe: Mutex<bool>,
    reads_off: bool,
    no_nmi: bool,
    calls: Mutex<Vec<&'static str>>,
}

impl Machine {
    fn alive(&self) -> bool {
        *self.on.lock().unwrap()
            && !*self.panicked.lock().unwrap()
            && !*self.crashed.lock().unwrap()
    }
}

struct MachineBmc(Arc<Machine>);

#[async_trait]
impl Bmc for MachineBmc {
    async fn power_state(&self) -> Result<PowerState, BmcError> {
        let on = *self.0.on.lock().unwrap() && !self.0.reads_off;
        Ok(if on { PowerState::On } else { PowerState::Off })
    }
    async fn power_on(&self) -> Result<(), BmcError> {
        self.0.calls.lock().unwrap().push("on");
        *self.0.on.lock().unwrap() = true;
        *self.0.panicked.lock().unwrap() = false;
        *self.0.crashed.lock().unwrap() = false;
        Ok(())
    }
    async fn power_off(&self) -> Result<(), BmcError> {
        self.0.calls.lock().unwrap().push("off");
        *self.0.on.lock().unwrap() = false;
        Ok(())
    }
    async fn set_next_boot_pxe(&self) -> Result<(), BmcError> {
        self.0.calls.lock().unwrap().push("pxe");
        *self.0.pxe.lock().unwrap() = true;
        Ok(())
    }
    fn supports_nmi(&self) -> bool {
        !self.0.no_nmi
    }
    async fn inject_nmi(&self) -> Result<(), BmcError> {
        self.0.calls.lock().unwrap().push("nmi");
        if *self.0.on.lock().unwrap() {
            *self.0.panicked.lock().unwrap() = true;
        }
        Ok(())
    }
}

struct Fleet(BTreeMap<NodeUuid, Arc<Machine>>);

impl BmcProvider for Fleet {
    fn bmc_for(&self, node: &Node) -> Result<Arc<dyn Bmc>, BmcError> {
        let machine = self.0.get(&node.uuid).ok_or_else(|| BmcError::NoDriver {
            node: node.uuid.to_string(),
            detail: "no such machine".into(),
        })?;
        Ok(Arc::new(MachineBmc(machine.clone())))
    }
}

/// Two VMs per compute node; evacuation moves a VM to "elsewhere".
#[derive(Default)]
struct FakeCloud {
    vms: Mutex<Vec<(String, String)>>,
    forced_down: Mutex<Vec<String>>,
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
        self.forced_down.lock().unwrap().push(host.into());
        Ok(())
    }
    async fn evacuate(&self, vm: &str) -> Result<(), CloudError> {
        let mut vms = self.vms.lock().unwrap();
        if let Some(entry) = vms.iter_mut().find(|(id, _)| id == vm) {
            entry.1 = "elsewhere".into();
        }
        Ok(())
    }
    async fn vm_status(&self, vm: &str) -> Result<VmStatus, CloudError> {
        let vms = self.vms.lock().unwrap();
        let host = vms.iter().find(|(id, _)| id == vm).map(|(_, h)| h.clone());
        Ok(VmStatus {
            host,
            status: "ACTIVE".into(),
        })
    }
}

const NODES: u64 = 6;
const START_MS: i64 = 1_020_000;

struct Harness {
    app: App,
    store: Arc<MemoryStore>,
    clock: Arc<ManualClock>,
    machines: BTreeMap<NodeUuid, Arc<Machine>>,
    cloud: Arc<FakeCloud>,
    controller: Arc<Controller>,
}

fn uuid(index: u64) -> NodeUuid {
    NodeUuid::from_index(91, index)
}

async fn harness(adjust: impl Fn(u64, &mut Machine)) -> Harness {
    let store = Arc::new(MemoryStore::new());
    let clock = Arc::new(ManualClock(AtomicI64::new(START_MS)));
    let cloud = Arc::new(FakeCloud::default());
    let mut machines = BTreeMap::new();
    for index in 0..NODES {
        let mut node = Node::new(uuid(index), format!("hv{index}"), NodeRole::Compute, 0);
        node.rack = Some(if index < 3 { "r1" } else { "r2" }.into());
        node.state = LifecycleState::Ready;
        node.last_heartbeat_at_ms = Some(START_MS);
        store.node_create(&node, &[]).await.unwrap();
        let mut machine = Machine::default();
        *machine.on.lock().unwrap() = true;
        adjust(index, &mut machine);
        machines.insert(uuid(index), Arc::new(machine));
        cloud
            .vms
            .lock()
            .unwrap()
            .extend((0..2).map(|vm| (format!("vm-{index}-{vm}"), format!("hv{index}"))));
    }
    let provider: Arc<dyn BmcProvider> = Arc::new(Fleet(machines.clone()));
    let config = ControllerConfig {
        startup_quiet_ms: 0,
        ..ControllerConfig::default()
    };
    let readback = bearman::bmc::ops::Readback {
        readbacks_max: 3,
        backoff: std::time::Duration::from_millis(1),
    };
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
    )
    .with_fault_injector(Arc::new(BmcFaults::new(provider.clone(), readback)))
    .with_twin_sources(TwinSources {
        remediation: config.clone(),
        vms: Some(Arc::new(bearman::controller::drill_faults::CloudVms(
            cloud.clone(),
        ))),
    });
    let controller = Controller::new(app.clone(), provider, Some(cloud.clone()), config);
    Harness {
        app,
        store,
        clock,
        machines,
        cloud,
        controller,
    }
}

impl Harness {
    fn machine(&self, index: u64) -> &Arc<Machine> {
        &self.machines[&uuid(index)]
    }

    /// `ms` later: every live machine heartbeats through the application (so a drill's
    /// silence applies), a machine rebuilt and powered on comes back Ready (what stage 1
    /// and stage 2 would do), and the controller ticks to the end of what it started.
    async fn advance(&self, ms: i64) {
        let now = self.clock.0.fetch_add(ms, Ordering::SeqCst) + ms;
        for (uuid, machine) in &self.machines {
            let node = self.store.node_get(uuid).await.unwrap().unwrap();
            if node.state == LifecycleState::Rebuilding
                && *machine.on.lock().unwrap()
                && *machine.pxe.lock().unwrap()
            {
                let mut back = node.clone();
                back.state = LifecycleState::Ready;
                back.last_heartbeat_at_ms = Some(now);
                self.store.node_update(&back, &[]).await.unwrap();
                *machine.pxe.lock().unwrap() = false;
                *machine.panicked.lock().unwrap() = false;
            }
            if machine.alive() {
                let _ = self.app.node_heartbeat(uuid, None).await;
            }
        }
        self.controller.clone().tick_and_wait().await.unwrap();
    }

    async fn run_until_finished(&self, limit_s: u32) -> bearman::core::drill::DrillReport {
        for _ in 0..limit_s {
            self.advance(1_000).await;
            if self.store.drill_board_get().await.unwrap().active.is_none() {
                let history = self.store.drill_list(1).await.unwrap();
                return history[0].report();
            }
        }
        let board = self.store.drill_board_get().await.unwrap();
        panic!(
            "the drill did not finish in {limit_s} s: {:?}",
            board.active.map(|d| d.report())
        );
    }

    async fn actions(&self) -> Vec<String> {
        self.store
            .event_list(&EventFilter {
                limit: 1000,
                ..Default::default()
            })
            .await
            .unwrap()
            .into_iter()
            .rev()
            .map(|e| e.action.as_str().to_string())
            .collect()
    }
}

/// A drill on hv0; `extra` goes at the end (a table) or, starting with a key, on top.
fn drill_file(fault: &str, extra: &str) -> String {
    let (top, tail) = if extra.starts_with('[') {
        ("", extra)
    } else {
        (extra, "")
    };
    format!(
        r#"
name = "drill-one"
fault = "{fault}"
{top}
[targets]
uuids = ["{}"]
[hypothesis]
vms_elsewhere_within_s = 300
ready_within_s = 900
fences_max = 1
[budget]
nodes_max = 1
ready_compute_left_min = 3
[abort]
deadline_s = 1200
{tail}"#,
        uuid(0)
    )
}

fn prediction() -> Prediction {
    Prediction {
        seeds: 20,
        phases: [
            ("detected", 35.0, 45.0),
            ("fence_verified", 40.0, 50.0),
            ("vms_elsewhere", 45.0, 60.0),
            // Deliberately too optimistic: the run must be reported beyond it.
            ("ready", 5.0, 10.0),
        ]
        .into_iter()
        .map(|(phase, p50_s, p99_s)| (phase.to_string(), PhaseSpread { p50_s, p99_s }))
        .collect(),
        broken: Vec::new(),
    }
}

#[tokio::test]
async fn a_kernel_panic_drill_goes_through_the_bmc_heals_and_is_reported_against_the_prediction() {
    let h = harness(|_, _| {}).await;
    let started = h
        .app
        .drill_start(
            "ops",
            &drill_file("kernel_panic", ""),
            "drill-one",
            Some(prediction()),
        )
        .await
        .unwrap();
    assert_eq!(started.phase, DrillPhase::Injecting);
    let report = h.run_until_finished(1_200).await;
    assert_eq!(
        h.machine(0).calls.lock().unwrap().first(),
        Some(&"nmi"),
        "injected out of band"
    );
    assert_eq!(report.outcome, "passed", "{report:#?}");
    let phases: Vec<Option<f64>> = report.targets[0]
        .phases
        .iter()
        .map(|p| p.actual_s)
        .collect();
    assert!(phases.iter().all(Option::is_some), "{phases:?}");
    let in_order: Vec<f64> = phases.into_iter().flatten().collect();
    assert!(
        in_order.windows(2).all(|w| w[0] <= w[1]),
        "detected, fenced, VMs elsewhere, Ready in that order: {in_order:?}"
    );
    assert!(
        report.divergences.iter().any(|d| d.contains("ready")),
        "Ready took longer than the optimistic p99: {:?}",
        report.divergences
    );
    assert!(h
        .cloud
        .vms
        .lock()
        .unwrap()
        .iter()
        .filter(|(vm, _)| vm.starts_with("vm-0-"))
        .all(|(_, host)| host == "elsewhere"));
    for index in 1..NODES {
        assert!(
            h.machine(index).calls.lock().unwrap().is_empty(),
            "hv{index} untouched"
        );
    }
    let actions = h.actions().await;
    for expected in [
        "drill_started",
        "drill_injected",
        "fence_verified",
        "drill_finished",
    ] {
        assert!(
            actions.iter().any(|a| a == expected),
            "{expected} in {actions:?}"
        );
    }
    // The history keeps it; the board is free for the next one.
    let overview = h.app.drill_overview().await.unwrap();
    assert!(overview.active.is_none());
    assert_eq!(overview.history[0].id, report.id);
}

#[tokio::test]
async fn another_node_going_suspect_aborts_a_power_loss_drill_and_powers_the_target_back_on() {
    let h = harness(|_, _| {}).await;
    // hv4 (not a target) falls silent 10 s before the drill: it goes Suspect (after the
    // 20 s heartbeat grace) while the target, powered off at the start, is still only
    // silent.
    *h.machine(4).crashed.lock().unwrap() = true;
    for _ in 0..10 {
        h.advance(1_000).await;
    }
    h.app
        .drill_start("ops", &drill_file("power_loss", ""), "drill-one", None)
        .await
        .unwrap();
    let report = h.run_until_finished(600).await;
    assert_eq!(report.outcome, "aborted", "{report:#?}");
    let abort = report.abort.as_ref().unwrap();
    assert!(
        abort.reason.starts_with("abort.other_node_suspect"),
        "{}",
        abort.reason
    );
    assert!(
        abort.reason.contains(&uuid(4).to_string()),
        "{}",
        abort.reason
    );
    assert_eq!(
        report.targets[0].restored.as_deref(),
        Some("powered on"),
        "{report:#?}"
    );
    assert_eq!(*h.machine(0).calls.lock().unwrap(), vec!["off", "on"]);
    assert!(h.machine(0).alive());
    let others = report
        .hypothesis
        .iter()
        .find(|item| item.item == "others_untouched")
        .unwrap();
    assert!(!others.passed);
}

#[tokio::test]
async fn a_silence_deafens_the_daemon_to_one_node_until_its_fence_then_lifts() {
    let h = harness(|_, _| {}).await;
    h.app
        .drill_start(
            "ops",
            &drill_file("silence", "silence_s = 900"),
            "drill-one",
            None,
        )
        .await
        .unwrap();
    h.advance(1_000).await;
    let node = h.store.node_get(&uuid(0)).await.unwrap().unwrap();
    let heard = node.last_heartbeat_at_ms;
    assert!(node.drill_silenced_until_ms.is_some());
    assert!(h.machine(0).alive(), "the machine itself runs on");
    h.advance(1_000).await;
    assert_eq!(
        h.store
            .node_get(&uuid(0))
            .await
            .unwrap()
            .unwrap()
            .last_heartbeat_at_ms,
        heard,
        "its heartbeats are not recorded"
    );
    let report = h.run_until_finished(1_200).await;
    assert_eq!(report.outcome, "passed", "{report:#?}");
    assert!(
        h.machine(0).calls.lock().unwrap().contains(&"off"),
        "fenced for real"
    );
    let node = h.store.node_get(&uuid(0)).await.unwrap().unwrap();
    assert_eq!(node.drill_silenced_until_ms, None, "lifted");
    assert_eq!(node.state, LifecycleState::Ready);
    let actions = h.actions().await;
    assert_eq!(
        actions.iter().filter(|a| *a == "drill_silence").count(),
        2,
        "{actions:?}"
    );
}

#[tokio::test]
async fn the_kill_switch_aborts_restores_and_blocks_new_drills_until_cleared() {
    let h = harness(|_, _| {}).await;
    h.app
        .drill_start("ops", &drill_file("silence", ""), "drill-one", None)
        .await
        .unwrap();
    h.advance(1_000).await;
    assert!(h
        .store
        .node_get(&uuid(0))
        .await
        .unwrap()
        .unwrap()
        .drill_silenced_until_ms
        .is_some());
    let overview = h
        .app
        .drill_abort("ops", "game day cancelled")
        .await
        .unwrap();
    assert!(overview.blocked.is_some());
    h.advance(1_000).await;
    let report = h.store.drill_list(1).await.unwrap()[0].report();
    assert_eq!(report.outcome, "aborted");
    assert_eq!(report.abort.unwrap().reason, "game day cancelled");
    assert_eq!(
        h.store
            .node_get(&uuid(0))
            .await
            .unwrap()
            .unwrap()
            .drill_silenced_until_ms,
        None,
        "the silence is lifted"
    );
    let refused = h
        .app
        .drill_start("ops", &drill_file("silence", ""), "drill-one", None)
        .await;
    assert!(
        matches!(refused, Err(AppError::DrillsBlocked { .. })),
        "{refused:?}"
    );
    h.app.drill_unblock("ops").await.unwrap();
    assert!(matches!(
        h.app.drill_unblock("ops").await,
        Err(AppError::DrillsNotBlocked)
    ));
    h.app
        .drill_start("ops", &drill_file("silence", ""), "drill-one", None)
        .await
        .unwrap();
    let actions = h.actions().await;
    for expected in ["drill_aborted", "drills_blocked", "drills_unblocked"] {
        assert!(
            actions.iter().any(|a| a == expected),
            "{expected} in {actions:?}"
        );
    }
}

#[tokio::test]
async fn a_preflight_that_fails_starts_nothing_and_says_why() {
    let h = harness(|index, machine| {
        if index == 0 {
            machine.no_nmi = true;
        }
    })
    .await;
    let cases: Vec<(String, &str, &str)> = vec![
        (
            drill_file("kernel_panic", ""),
            "drill-one",
            "cannot send an NMI",
        ),
        (
            drill_file("power_loss", ""),
            "wrong-name",
            "confirm must repeat",
        ),
        (
            drill_file("power_loss", "")
                .replace("ready_compute_left_min = 3", "ready_compute_left_min = 6"),
            "drill-one",
            "budget.ready_compute_left_min: 5 Ready compute node(s) would be left",
        ),
        (
            drill_file("power_loss", "[window]\nfrom = \"00:00\"\nto = \"00:01\"\n"),
            "drill-one",
            "outside the window",
        ),
        (drill_file("meteor", ""), "drill-one", "unknown variant"),
    ];
    for (file, confirm, expect) in cases {
        let error = h
            .app
            .drill_start("ops", &file, confirm, None)
            .await
            .unwrap_err();
        assert!(error.to_string().contains(expect), "{expect}: {error}");
    }
    let board = h.store.drill_board_get().await.unwrap();
    assert_eq!(board.generation, 0, "nothing written");
    assert!(h.actions().await.is_empty());
    assert!(h
        .machines
        .values()
        .all(|m| m.calls.lock().unwrap().is_empty()));
    // The preview shows every check, the failed one named.
    let plan = h
        .app
        .drill_preview(&drill_file("kernel_panic", ""))
        .await
        .unwrap();
    assert!(!plan.ready);
    let failed: Vec<&str> = plan
        .preflight
        .iter()
        .filter(|c| !c.passed)
        .map(|c| c.check.as_str())
        .collect();
    assert_eq!(failed, vec!["bmc"]);
}

#[tokio::test]
async fn a_drill_cut_off_mid_injection_is_aborted_when_the_controller_resumes_it() {
    let h = harness(|_, _| {}).await;
    h.app
        .drill_start("ops", &drill_file("power_loss", ""), "drill-one", None)
        .await
        .unwrap();
    // What a daemon that died between "sending" and the BMC's answer leaves behind.
    let mut board = h.store.drill_board_get().await.unwrap();
    let drill = board.active.as_mut().unwrap();
    drill.inject_sending(&uuid(0), START_MS);
    h.store.drill_board_put(&board, None, &[]).await.unwrap();
    h.advance(1_000).await;
    h.advance(1_000).await;
    let report = h.store.drill_list(1).await.unwrap()[0].report();
    assert_eq!(report.outcome, "aborted");
    assert!(report
        .abort
        .unwrap()
        .reason
        .contains("whether the fault landed is unknown"));
    // Whether it landed is unknown, so the target is powered back on.
    assert_eq!(report.targets[0].restored.as_deref(), Some("powered on"));
}

#[tokio::test]
async fn the_twin_has_every_rack_and_the_clouds_vm_count() {
    let h = harness(|_, _| {}).await;
    let twin = h.app.drill_twin().await.unwrap();
    let racks: Vec<(&str, usize)> = twin
        .racks
        .iter()
        .map(|r| (r.name.as_str(), r.nodes.len()))
        .collect();
    assert_eq!(racks, vec![("r1", 3), ("r2", 3)]);
    let vms = twin.vms.unwrap();
    assert_eq!((vms.answered, vms.max_per_host), (6, 2));
    assert!((vms.mean_per_host - 2.0).abs() < 1e-9);
    assert_eq!(
        twin.remediation.startup_quiet_ms, 0,
        "the controller's own settings"
    );
}
