//! Operator power actions through the daemon (`POST /api/v1/nodes/{uuid}/power`): the
//! real daemon assembly (`server::run_daemon`) on a loopback socket with an in-memory
//! store and a fake BMC behind its provider. A viewer is refused before any BMC call; an
//! operator's off puts the node in Maintenance with the reason, powers it off, verifies
//! it and records who and why twice; a BMC that accepts off but keeps reading On is an
//! error answer and a failure event; an active remediation refuses the action untouched.

use std::sync::{Arc, Mutex};
use std::time::Duration;

use async_trait::async_trait;
use bearman::app::power::{PowerAction, PowerDone, PowerSwitch, PowerSwitchError};
use bearman::app::{App, AppError, Settings};
use bearman::bmc::{Bmc, BmcError, BmcProvider, PowerState};
use bearman::core::boot::Stage1Config;
use bearman::core::lifecycle::LifecycleState;
use bearman::core::model::{Action, BmcConfig, Event, EventFilter, Node, NodeRole, TokenRole};
use bearman::core::registration::RegistrationDefaults;
use bearman::core::remediation::{Remediation, RemediationKind};
use bearman::images::MemoryImages;
use bearman::runtime::system::SystemClock;
use bearman::server::{DaemonParts, ServiceConfig};
use bearman::store::memory::MemoryStore;
use bearman::store::Store;
use bearman_proto::http;
use bearman_proto::uuid::NodeUuid;
use serde_json::{json, Value};

const UUID: &str = "4c4c4544-0042-3510-8052-b4c04f4e4a32";

/// A machine's BMC: obeys power commands, unless it lies that the power stays on.
#[derive(Default)]
struct FakeBmc {
    on: Mutex<bool>,
    always_reports_on: bool,
    /// Every power-changing call, in order (reads are not counted).
    commands: Mutex<Vec<&'static str>>,
}

#[async_trait]
impl Bmc for FakeBmc {
    async fn power_state(&self) -> Result<PowerState, BmcError> {
        let on = *self.on.lock().unwrap() || self.always_reports_on;
        Ok(if on { PowerState::On } else { PowerState::Off })
    }
    async fn power_on(&self) -> Result<(), BmcError> {
        self.commands.lock().unwrap().push("on");
        *self.on.lock().unwrap() = true;
        Ok(())
    }
    async fn power_off(&self) -> Result<(), BmcError> {
        self.commands.lock().unwrap().push("off");
        *self.on.lock().unwrap() = false;
        Ok(())
    }
    async fn power_off_soft(&self) -> Result<(), BmcError> {
        self.commands.lock().unwrap().push("soft_off");
        *self.on.lock().unwrap() = false;
        Ok(())
    }
    async fn set_next_boot_pxe(&self) -> Result<(), BmcError> {
        self.commands.lock().unwrap().push("pxe");
        Ok(())
    }
}

struct OneBmc(Arc<FakeBmc>);

impl BmcProvider for OneBmc {
    fn bmc_for(&self, _node: &Node) -> Result<Arc<dyn Bmc>, BmcError> {
        Ok(self.0.clone())
    }
}

struct Daemon {
    address: std::net::SocketAddr,
    store: Arc<dyn Store>,
    operator: String,
    viewer: String,
    stop: Option<tokio::sync::oneshot::Sender<()>>,
}

impl Drop for Daemon {
    fn drop(&mut self) {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
    }
}

fn settings() -> Settings {
    Settings {
        defaults: RegistrationDefaults {
            role: NodeRole::Compute,
            flavor: None,
        },
        enrollment: bearman::core::enrollment::EnrollmentPolicy::default(),
        heartbeat_fresh_ms: 30_000,
        firmware: Default::default(),
    }
}

/// A Ready node with a BMC address, written straight into the store.
async fn ready_node(store: &Arc<dyn Store>) -> NodeUuid {
    let uuid = NodeUuid::parse(UUID).unwrap();
    let mut node = Node::new(uuid.clone(), "hv1".into(), NodeRole::Compute, 1);
    node.state = LifecycleState::Ready;
    node.bmc = BmcConfig {
        address: Some("10.9.0.1".into()),
        driver: Some(bearman::core::model::BmcDriver::Ipmi),
        ..Default::default()
    };
    store.node_create(&node, &[]).await.unwrap();
    uuid
}

async fn start(bmc: Arc<FakeBmc>) -> Daemon {
    let store: Arc<dyn Store> = Arc::new(MemoryStore::new());
    ready_node(&store).await;
    let clock = Arc::new(SystemClock);
    let tokens = App::new(store.clone(), clock.clone(), settings());
    let operator = tokens
        .token_create("test", "op", TokenRole::Operator)
        .await
        .unwrap()
        .secret;
    let viewer = tokens
        .token_create("test", "watcher", TokenRole::Viewer)
        .await
        .unwrap()
        .secret;
    let mut remediation = bearman::controller::ControllerConfig {
        automatic: false,
        ..Default::default()
    };
    remediation.health.power_poll_interval_ms = 0;
    remediation.limits.readbacks_max = 3;
    remediation.limits.backoff_initial_ms = 10;
    let parts = DaemonParts {
        store: store.clone(),
        clock,
        images: Arc::new(MemoryImages::default()),
        service: ServiceConfig {
            public_url: "http://bearman.test:8080".into(),
            stage1: Stage1Config::default(),
            defaults: settings().defaults,
            enrollment: settings().enrollment,
            body_limit_bytes: bearman::server::BODY_LIMIT_BYTES_DEFAULT,
            edge: bearman::edge::EdgeLimits::default(),
            heartbeat_fresh_ms: 30_000,
            firmware: Default::default(),
            dashboard: Default::default(),
            metrics_public: false,
        },
        bmcs: Arc::new(OneBmc(bmc)),
        cloud: None,
        remediation,
        cluster: None,
        metrics: Arc::default(),
        observer: None,
    };
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let address = listener.local_addr().unwrap();
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    tokio::spawn(async move {
        let shutdown = async move {
            let _ = stopped.await;
        };
        bearman::server::run_daemon(listener, parts, shutdown)
            .await
            .unwrap();
    });
    Daemon {
        address,
        store,
        operator,
        viewer,
        stop: Some(stop),
    }
}

impl Daemon {
    async fn power(&self, token: &str, body: Value) -> (u16, Value) {
        let mut stream = tokio::net::TcpStream::connect(self.address).await.unwrap();
        let authorization = format!("Bearer {token}");
        let headers = [
            ("Content-Type", "application/json"),
            ("Authorization", authorization.as_str()),
        ];
        let body = serde_json::to_vec(&body).unwrap();
        let host = self.address.to_string();
        let path = format!("/api/v1/nodes/{UUID}/power");
        let exchange = http::send(&mut stream, "POST", &host, &path, &headers, Some(&body));
        let response = tokio::time::timeout(Duration::from_secs(30), exchange)
            .await
            .expect("answer within 30 s")
            .unwrap();
        let value = serde_json::from_slice(&response.body).unwrap_or(Value::Null);
        (response.status, value)
    }

    async fn node(&self) -> Node {
        self.store
            .node_get(&NodeUuid::parse(UUID).unwrap())
            .await
            .unwrap()
            .unwrap()
    }

    async fn power_events(&self) -> Vec<Event> {
        let filter = EventFilter {
            node_uuid: Some(NodeUuid::parse(UUID).unwrap()),
            before_id: None,
            after_id: None,
            limit: 100,
        };
        let mut events: Vec<Event> = self
            .store
            .event_list(&filter)
            .await
            .unwrap()
            .into_iter()
            .filter(|e| {
                matches!(
                    e.action,
                    Action::PowerRequested | Action::PowerDone | Action::PowerFailed
                )
            })
            .collect();
        events.reverse();
        events
    }
}

fn powered_on() -> Arc<FakeBmc> {
    let bmc = FakeBmc::default();
    *bmc.on.lock().unwrap() = true;
    Arc::new(bmc)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_viewer_may_not_change_power_and_no_bmc_call_is_made() {
    let bmc = powered_on();
    let daemon = start(bmc.clone()).await;
    let (status, body) = daemon
        .power(
            &daemon.viewer,
            json!({"action": "off", "reason": "curious"}),
        )
        .await;
    assert_eq!(status, 403, "{body}");
    assert!(bmc.commands.lock().unwrap().is_empty());
    assert_eq!(daemon.node().await.state, LifecycleState::Ready);
    assert!(daemon.power_events().await.is_empty());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_operators_off_holds_the_node_in_maintenance_and_is_verified_and_audited() {
    let bmc = powered_on();
    let daemon = start(bmc.clone()).await;
    let (status, body) = daemon
        .power(
            &daemon.operator,
            json!({"action": "off", "reason": "swap DIMM B2"}),
        )
        .await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(body["power"], "off", "{body}");
    assert_eq!(body["state"], "maintenance", "{body}");
    assert!(body["readbacks"].as_u64() >= Some(1), "{body}");
    assert_eq!(*bmc.commands.lock().unwrap(), vec!["off"]);
    assert!(!*bmc.on.lock().unwrap());
    let node = daemon.node().await;
    assert_eq!(node.state, LifecycleState::Maintenance);
    let hold = node.maintenance.unwrap();
    assert_eq!(hold.by, "token:op");
    assert!(hold.reason.contains("swap DIMM B2"), "{hold:?}");
    let events = daemon.power_events().await;
    assert_eq!(events.len(), 2, "{events:?}");
    assert_eq!(events[0].action, Action::PowerRequested);
    assert_eq!(events[1].action, Action::PowerDone);
    for event in &events {
        assert_eq!(event.actor, "token:op", "{event:?}");
    }
    assert!(events[0].reason.contains("swap DIMM B2"), "{events:?}");
    assert!(events[1].reason.contains("power reads off"), "{events:?}");

    // On again: verified, and the node stays held until an operator releases it.
    let (status, body) = daemon
        .power(
            &daemon.operator,
            json!({"action": "on", "reason": "DIMM swapped"}),
        )
        .await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(body["power"], "on", "{body}");
    assert_eq!(daemon.node().await.state, LifecycleState::Maintenance);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_off_the_bmc_never_reads_back_is_an_error_and_a_failure_event() {
    let bmc = Arc::new(FakeBmc {
        on: Mutex::new(true),
        always_reports_on: true,
        ..Default::default()
    });
    let daemon = start(bmc.clone()).await;
    let (status, body) = daemon
        .power(&daemon.operator, json!({"action": "off", "reason": "test"}))
        .await;
    assert_eq!(status, 502, "{body}");
    assert_eq!(body["error"], "power_failed", "{body}");
    let message = body["message"].as_str().unwrap();
    assert!(
        message.contains("power on"),
        "names the last reading: {message}"
    );
    let events = daemon.power_events().await;
    let actions: Vec<Action> = events.iter().map(|e| e.action).collect();
    assert_eq!(actions, vec![Action::PowerRequested, Action::PowerFailed]);
    assert!(events[1].reason.contains("power on"), "{events:?}");
    // Held in maintenance either way: the controller must not fence it meanwhile.
    assert_eq!(daemon.node().await.state, LifecycleState::Maintenance);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_requests_are_refused_naming_the_field_and_change_nothing() {
    let bmc = powered_on();
    let daemon = start(bmc.clone()).await;
    for body in [
        json!({"action": "off"}),
        json!({"action": "off", "reason": "  "}),
        json!({"action": "off", "reason": "a\u{1b}[2J"}),
        json!({"action": "off", "reason": "x".repeat(2000)}),
        json!({"action": "nmi", "reason": "x"}),
    ] {
        let (status, answer) = daemon.power(&daemon.operator, body.clone()).await;
        assert_eq!(status, 422, "{body} -> {answer}");
    }
    assert!(bmc.commands.lock().unwrap().is_empty());
    assert_eq!(daemon.node().await.state, LifecycleState::Ready);
    assert!(daemon.power_events().await.is_empty());
}

/// The body limit holds at the daemon's edge: the service sets it on each request (not
/// a router layer), so a body one byte over `body_limit_bytes` is refused as too large
/// and nothing is done.
#[tokio::test]
async fn a_body_over_the_limit_is_refused_as_too_large_and_changes_nothing() {
    let bmc = powered_on();
    let daemon = start(bmc.clone()).await;
    let padding = "x".repeat(bearman::server::BODY_LIMIT_BYTES_DEFAULT);
    let (status, answer) = daemon
        .power(
            &daemon.operator,
            json!({"action": "off", "reason": padding}),
        )
        .await;
    assert_eq!(status, 413, "{answer}");
    assert!(bmc.commands.lock().unwrap().is_empty());
    assert_eq!(daemon.node().await.state, LifecycleState::Ready);
    assert!(daemon.power_events().await.is_empty());
}

/// A power switch that records whether it was ever used, and for what.
#[derive(Default)]
struct CountingSwitch {
    calls: Mutex<u32>,
    actions: Mutex<Vec<PowerAction>>,
}

#[async_trait]
impl PowerSwitch for CountingSwitch {
    fn check(&self, _node: &Node) -> Result<(), PowerSwitchError> {
        Ok(())
    }
    async fn execute(
        &self,
        _node: &Node,
        action: PowerAction,
    ) -> Result<PowerDone, PowerSwitchError> {
        *self.calls.lock().unwrap() += 1;
        self.actions.lock().unwrap().push(action);
        Ok(PowerDone {
            power: "off".into(),
            readbacks: 1,
            note: String::new(),
        })
    }
}

#[tokio::test]
async fn an_active_remediation_owns_the_power_and_refuses_the_action_untouched() {
    let store: Arc<dyn Store> = Arc::new(MemoryStore::new());
    let uuid = ready_node(&store).await;
    let switch = Arc::new(CountingSwitch::default());
    let app = App::new(store.clone(), Arc::new(SystemClock), settings())
        .with_power_switch(switch.clone());
    let remediation = Remediation::new(uuid.clone(), RemediationKind::Fence, "token:op", "x", 1);
    store
        .remediation_create(&remediation, &[], None)
        .await
        .unwrap();
    let refused = app
        .power_action("token:op", &uuid, PowerAction::Off, "swap")
        .await
        .unwrap_err();
    assert!(
        matches!(refused, AppError::PowerRefused { .. }),
        "{refused:?}"
    );
    assert!(refused.to_string().contains("remediation"), "{refused}");
    assert_eq!(*switch.calls.lock().unwrap(), 0);
    let node = store.node_get(&uuid).await.unwrap().unwrap();
    assert_eq!(node.state, LifecycleState::Ready);
}

#[tokio::test]
async fn a_node_without_a_bmc_is_refused_untouched() {
    let store: Arc<dyn Store> = Arc::new(MemoryStore::new());
    let uuid = ready_node(&store).await;
    let mut node = store.node_get(&uuid).await.unwrap().unwrap();
    node.bmc = BmcConfig::default();
    store.node_update(&node, &[]).await.unwrap();
    let switch = Arc::new(CountingSwitch::default());
    let app = App::new(store.clone(), Arc::new(SystemClock), settings())
        .with_power_switch(switch.clone());
    let refused = app
        .power_action("token:op", &uuid, PowerAction::Cycle, "reboot")
        .await
        .unwrap_err();
    assert!(matches!(refused, AppError::NoBmc { .. }), "{refused:?}");
    assert_eq!(*switch.calls.lock().unwrap(), 0);
    let after = store.node_get(&uuid).await.unwrap().unwrap();
    assert_eq!(after.state, LifecycleState::Ready);
}

const BIN: &str = env!("CARGO_BIN_EXE_bearman");

/// Runs the `bearman` binary with `args` against `url` (off the async threads).
async fn bearman_cli(url: String, token: String, args: Vec<String>) -> std::process::Output {
    tokio::task::spawn_blocking(move || {
        let mut command = std::process::Command::new(BIN);
        for (key, _) in std::env::vars_os() {
            if key.to_string_lossy().starts_with("BEARMAN_") {
                command.env_remove(key);
            }
        }
        command
            .args(&args)
            .env("BEARMAN_URL", url)
            .env("BEARMAN_TOKEN", token)
            .stdin(std::process::Stdio::null())
            .output()
            .expect("run bearman")
    })
    .await
    .unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn node_power_on_the_cli_goes_through_the_daemon() {
    let bmc = powered_on();
    let daemon = start(bmc.clone()).await;
    let url = format!("http://{}", daemon.address);
    let args = [
        "node",
        "power",
        UUID,
        "soft-off",
        "--reason",
        "firmware update",
    ];
    let output = bearman_cli(
        url.clone(),
        daemon.operator.clone(),
        args.iter().map(|a| a.to_string()).collect(),
    )
    .await;
    let stdout = String::from_utf8_lossy(&output.stdout);
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(output.status.success(), "{stdout}\n{stderr}");
    assert!(stdout.contains("power reads off"), "{stdout}");
    assert!(stdout.contains("maintenance"), "{stdout}");
    assert_eq!(daemon.node().await.state, LifecycleState::Maintenance);
    let events = daemon.power_events().await;
    assert_eq!(events.len(), 2, "{events:?}");
    assert!(
        events[0].reason.contains("soft_off: firmware update"),
        "{events:?}"
    );

    // A viewer's token is refused by the daemon, naming the role.
    let output = bearman_cli(
        url,
        daemon.viewer.clone(),
        ["node", "power", UUID, "on", "--reason", "x"]
            .iter()
            .map(|a| a.to_string())
            .collect(),
    )
    .await;
    assert_eq!(output.status.code(), Some(1));
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(stderr.contains("403"), "{stderr}");
    assert_eq!(daemon.power_events().await.len(), 2);
}

#[tokio::test]
async fn bmc_power_without_the_bypass_flag_refuses_and_points_at_node_power() {
    // Nothing listens at this URL: the refusal must come before any daemon or BMC call.
    for args in [vec!["bmc", "power", "off", UUID], vec!["bmc", "pxe", UUID]] {
        let output = bearman_cli(
            "http://127.0.0.1:9".into(),
            "bm_x".into(),
            args.iter().map(|a| a.to_string()).collect(),
        )
        .await;
        let stderr = String::from_utf8_lossy(&output.stderr);
        assert_eq!(output.status.code(), Some(1), "{args:?}: {stderr}");
        assert!(stderr.contains("bearman node power"), "{stderr}");
        assert!(stderr.contains("--direct-bypassing-audit"), "{stderr}");
        assert!(!stderr.contains("cannot connect"), "{stderr}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cycle_and_pxe_are_off_verified_then_on_verified() {
    let bmc = powered_on();
    let daemon = start(bmc.clone()).await;
    let (status, body) = daemon
        .power(
            &daemon.operator,
            json!({"action": "cycle", "reason": "hung"}),
        )
        .await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(body["power"], "on", "{body}");
    assert_eq!(*bmc.commands.lock().unwrap(), vec!["off", "on"]);
    let (status, body) = daemon
        .power(
            &daemon.operator,
            json!({"action": "pxe", "reason": "reinstall"}),
        )
        .await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(
        *bmc.commands.lock().unwrap(),
        vec!["off", "on", "pxe", "off", "on"]
    );
    assert_eq!(daemon.node().await.state, LifecycleState::Maintenance);
    assert_eq!(daemon.power_events().await.len(), 4);
}

/// A bundle whose firmware loads only from cold (`restart = "power_cycle"`): once stage 1
/// reports it written, the daemon power-cycles the machine into the network boot through
/// the same power switch operators use, tells stage 1 to wait for it, and audits it; the
/// node is not put in maintenance for it.
#[tokio::test]
async fn a_power_cycle_bundle_is_brought_into_use_through_the_power_switch_and_audited() {
    use bearman::core::firmware::FirmwareBundle;
    use bearman_proto::{
        Artifact, FirmwareNext, FirmwareOutcome, FirmwareReport, FirmwareRestart, FirmwareVersions,
        NicFacts, RegisterRequest,
    };
    let store: Arc<dyn Store> = Arc::new(MemoryStore::new());
    let flavor = bearman::core::model::Flavor {
        name: "hv".into(),
        kernel: Artifact {
            url: "/images/vmlinuz".into(),
            sha256: "1".repeat(64),
        },
        initrds: vec![],
        cmdline_template: String::new(),
        firmware_expected: FirmwareVersions {
            bmc: Some("5.10".into()),
            ..FirmwareVersions::default()
        },
    };
    store.flavor_put(&flavor, 1, &[]).await.unwrap();
    let switch = Arc::new(CountingSwitch::default());
    let app = App::new(
        store.clone(),
        Arc::new(SystemClock),
        Settings {
            defaults: RegistrationDefaults {
                role: NodeRole::Compute,
                flavor: Some("hv".into()),
            },
            enrollment: bearman::core::enrollment::EnrollmentPolicy::accept_all(),
            ..settings()
        },
    )
    .with_power_switch(switch.clone());
    app.firmware_bundle_add(
        "token:admin",
        FirmwareBundle {
            name: "bmc-5.10".into(),
            component: "bmc".into(),
            version: "5.10".into(),
            artifact: Artifact {
                url: "/images/fw/bmc.bin".into(),
                sha256: "e".repeat(64),
            },
            size_bytes: 2048,
            applies_to: Default::default(),
            command: vec!["/usr/bin/bmc-flash".into(), "{file}".into()],
            timeout_s: 300,
            success_exit_codes: vec![0],
            restart: FirmwareRestart::PowerCycle,
            created_at_ms: 0,
        },
    )
    .await
    .unwrap();
    let uuid = NodeUuid::parse(UUID).unwrap();
    let request = RegisterRequest {
        serial: "SER1".into(),
        nics: vec![NicFacts {
            name: "eth0".into(),
            mac: "52:54:00:00:00:01".into(),
            speed_mbps: None,
            lldp: None,
        }],
        firmware: FirmwareVersions {
            bmc: Some("5.01".into()),
            ..FirmwareVersions::default()
        },
        ..RegisterRequest::default()
    };
    let registered = app.node_register_hardware(&uuid, &request).await.unwrap();
    let (bundle, from) = registered.firmware_update.expect("an update is ordered");
    assert_eq!(
        (bundle.name.as_str(), from.as_deref()),
        ("bmc-5.10", Some("5.01"))
    );
    assert_eq!(
        *switch.calls.lock().unwrap(),
        0,
        "nothing is cycled before the report"
    );

    let (answer, to_cycle) = app
        .node_firmware_report(
            &uuid,
            &FirmwareReport {
                bundle: "bmc-5.10".into(),
                outcome: FirmwareOutcome::Applied,
                exit_code: Some(0),
                detail: "bmc-flash: done".into(),
            },
        )
        .await
        .unwrap();
    assert_eq!(answer.next, FirmwareNext::AwaitPowerCycle);
    let to_cycle = to_cycle.expect("the node to power-cycle");
    assert_eq!(
        *switch.calls.lock().unwrap(),
        0,
        "the cycle is the caller's to run"
    );
    app.firmware_power_cycle(&to_cycle).await;
    assert_eq!(*switch.actions.lock().unwrap(), vec![PowerAction::Pxe]);
    let node = store.node_get(&uuid).await.unwrap().unwrap();
    assert_eq!(
        node.state,
        LifecycleState::Registered,
        "no maintenance for a firmware cycle"
    );
    let events = store
        .event_list(&EventFilter {
            node_uuid: Some(uuid.clone()),
            limit: 50,
            ..Default::default()
        })
        .await
        .unwrap();
    let cycle = events
        .iter()
        .find(|event| event.action == Action::FirmwarePowerCycle)
        .expect("the power cycle is audited");
    assert!(cycle.reason.contains("power-cycled"), "{}", cycle.reason);
    assert_eq!(cycle.actor, "system");
}
