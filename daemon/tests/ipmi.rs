//! The IPMI driver against a real IPMI v2 (RMCP+) peer: OpenIPMI's `ipmi_sim`, started per
//! test on 127.0.0.1 and a free UDP port, with `fixtures/ipmi/chassis_control` as the
//! machine, so `ipmitool` really opens lanplus sessions. Power changes are verified by
//! readback, PXE is set for the next boot only, an NMI goes out as `chassis power diag`
//! (which ipmi_sim refuses, so only the sending and the refusal are proven), a wrong
//! password is a clear error that never quotes it, and a BMC that never answers is cut off
//! at its bound while a healthy one answers.
//!
//! Needs `ipmi_sim` and `ipmitool` (Debian `openipmi`, `ipmitool`); without them every test
//! fails telling you to run scripts/install-deps.sh.

use std::io::Write;
use std::net::UdpSocket;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bearman::bmc::credentials::{Credentials, Secret};
use bearman::bmc::guard::{GuardLimits, Guards};
use bearman::bmc::ipmi::{BmcAddress, IpmiBmc, IpmiSettings};
use bearman::bmc::ops::{self, PowerAction, Readback};
use bearman::bmc::provider::{BmcSettings, DriverBmcs};
use bearman::bmc::BmcProvider;
use bearman::bmc::{Bmc, BmcError, PowerState};
use bearman::core::model::{BmcConfig, BmcDriver, Node, NodeRole};
use bearman_proto::uuid::NodeUuid;

const USERNAME: &str = "admin";
const PASSWORD: &str = "s3cret-Passw0rd";

fn fixtures() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../fixtures/ipmi")
        .canonicalize()
        .expect("fixtures/ipmi exists")
}

/// Fails (never skips) when a tool is missing.
fn require(program: &str, probe_arg: &str) {
    if let Err(error) = Command::new(program)
        .arg(probe_arg)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
    {
        panic!("{program} cannot be run ({error}): run scripts/install-deps.sh");
    }
}

/// A free UDP port on 127.0.0.1, and the socket holding it when `keep` (a BMC that
/// never answers: datagrams queue up unread).
fn udp_port() -> (u16, UdpSocket) {
    let socket = UdpSocket::bind("127.0.0.1:0").unwrap();
    (socket.local_addr().unwrap().port(), socket)
}

/// Settings bounded tightly enough for tests, loose enough for a loaded CI machine.
fn test_ipmi_settings() -> IpmiSettings {
    IpmiSettings {
        session_timeout_s: 1,
        session_retries: 1,
        command_timeout_ms: 10_000,
        attempts_max: 2,
        retry_backoff_ms: 100,
        ..IpmiSettings::default()
    }
}

fn credentials(password: &str) -> Credentials {
    Credentials {
        username: USERNAME.into(),
        password: Secret::new(password),
    }
}

/// One `ipmi_sim` BMC with its machine's state file; killed on drop.
struct SimBmc {
    child: Child,
    dir: tempfile::TempDir,
    port: u16,
}

impl SimBmc {
    async fn start() -> SimBmc {
        require("ipmi_sim", "-v");
        require("ipmitool", "-V");
        let dir = tempfile::tempdir().unwrap();
        let (port, socket) = udp_port();
        let fixtures = fixtures();
        let config = std::fs::read_to_string(fixtures.join("lan.conf.in"))
            .unwrap()
            .replace("@ADDRESS@", "127.0.0.1")
            .replace("@PORT@", &port.to_string())
            .replace(
                "@CHASSIS_CONTROL@",
                &format!("/bin/sh {}", fixtures.join("chassis_control").display()),
            )
            .replace(
                "@STATE_FILE@",
                &dir.path().join("machine").display().to_string(),
            )
            .replace("@USERNAME@", USERNAME)
            .replace("@PASSWORD@", PASSWORD);
        std::fs::write(dir.path().join("lan.conf"), config).unwrap();
        std::fs::create_dir(dir.path().join("state")).unwrap();
        let log = std::fs::File::create(dir.path().join("ipmi_sim.log")).unwrap();
        drop(socket); // free the port just before ipmi_sim binds it
        let child = Command::new("ipmi_sim")
            .arg("-c")
            .arg(dir.path().join("lan.conf"))
            .arg("-f")
            .arg(fixtures.join("bmc.emu"))
            .arg("-s")
            .arg(dir.path().join("state"))
            .args(["-n", "-p"])
            .stdin(Stdio::null())
            .stdout(log.try_clone().unwrap())
            .stderr(log)
            .spawn()
            .unwrap_or_else(|e| {
                panic!("ipmi_sim cannot be run ({e}): run scripts/install-deps.sh")
            });
        let mut bmc = SimBmc { child, dir, port };
        bmc.wait_ready().await;
        bmc
    }

    /// Bounded wait until the simulator answers a power status.
    async fn wait_ready(&mut self) {
        let probe = IpmiBmc::new(
            "probe",
            BmcAddress::parse(&self.address(), 623).unwrap(),
            credentials(PASSWORD),
            IpmiSettings {
                command_timeout_ms: 3_000,
                attempts_max: 1,
                ..test_ipmi_settings()
            },
        );
        let mut last = None;
        for _ in 0..20 {
            if let Ok(Some(status)) = self.child.try_wait() {
                panic!("ipmi_sim exited ({status}): {}", self.log());
            }
            match probe.power_state().await {
                Ok(_) => return,
                Err(error) => last = Some(error),
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        panic!(
            "ipmi_sim on port {} never answered: {last:?}\n{}",
            self.port,
            self.log()
        );
    }

    fn address(&self) -> String {
        format!("127.0.0.1:{}", self.port)
    }

    fn log(&self) -> String {
        std::fs::read_to_string(self.dir.path().join("ipmi_sim.log")).unwrap_or_default()
    }

    /// `(power, boot)` as the machine has them, per the chassis-control state file.
    fn machine(&self) -> (String, String) {
        let text = std::fs::read_to_string(self.dir.path().join("machine")).unwrap_or_default();
        let field = |name: &str| {
            text.lines()
                .find_map(|line| line.strip_prefix(&format!("{name}=")))
                .unwrap_or("")
                .to_string()
        };
        (field("power"), field("boot"))
    }

    fn driver(&self, password: &str, settings: IpmiSettings) -> IpmiBmc {
        IpmiBmc::new(
            &format!("sim at {}", self.address()),
            BmcAddress::parse(&self.address(), 623).unwrap(),
            credentials(password),
            settings,
        )
    }

    fn bmc_config(&self) -> BmcConfig {
        BmcConfig {
            address: Some(self.address()),
            mac: None,
            driver: Some(BmcDriver::Ipmi),
            credentials_ref: Some("file:sim".into()),
        }
    }
}

impl Drop for SimBmc {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// A provider whose secrets file holds `[sim]` with `password`.
fn provider(dir: &Path, password: &str) -> DriverBmcs {
    use std::os::unix::fs::PermissionsExt;
    let secrets = dir.join("bmc-secrets.toml");
    let mut file = std::fs::File::create(&secrets).unwrap();
    writeln!(
        file,
        "[sim]\nusername = \"{USERNAME}\"\npassword = \"{password}\""
    )
    .unwrap();
    std::fs::set_permissions(&secrets, std::fs::Permissions::from_mode(0o600)).unwrap();
    DriverBmcs::new(BmcSettings {
        secrets_file: Some(secrets),
        call_timeout_ms: 30_000,
        readbacks_max: 10,
        readback_backoff_ms: 50,
        ipmi: test_ipmi_settings(),
        ..BmcSettings::default()
    })
    .unwrap()
}

fn node(hostname: &str, bmc: BmcConfig) -> Node {
    let index = hostname.trim_start_matches("cn").parse().unwrap_or(0);
    let uuid = NodeUuid::from_index(42, index);
    let mut node = Node::new(uuid, hostname.into(), NodeRole::Compute, 0);
    node.bmc = bmc;
    node
}

/// No process still has `needle` in its command line (Linux /proc).
fn no_process_with(needle: &str) -> bool {
    let Ok(entries) = std::fs::read_dir("/proc") else {
        return true;
    };
    entries.flatten().all(|entry| {
        let cmdline = std::fs::read(entry.path().join("cmdline")).unwrap_or_default();
        let cmdline = String::from_utf8_lossy(&cmdline).replace('\0', " ");
        !cmdline.contains(needle)
    })
}

#[tokio::test]
async fn power_round_trip_is_verified_by_readback() {
    let sim = SimBmc::start().await;
    let tmp = tempfile::tempdir().unwrap();
    let bmcs = provider(tmp.path(), PASSWORD);
    let node = node("cn0001", sim.bmc_config());

    let status = ops::act_on_node(&bmcs, &node, PowerAction::Status)
        .await
        .unwrap();
    assert_eq!(status.power, "off");

    let on = ops::act_on_node(&bmcs, &node, PowerAction::On)
        .await
        .unwrap();
    assert_eq!(on.power, "on");
    assert!(on.readbacks >= 1, "{on:?}");
    assert_eq!(sim.machine().0, "1");
    assert!(
        on.summary().contains("cn0001 at 127.0.0.1:"),
        "{}",
        on.summary()
    );

    let off = ops::act_on_node(&bmcs, &node, PowerAction::Off)
        .await
        .unwrap();
    assert_eq!(off.power, "off");
    assert!(off.readbacks >= 1, "{off:?}");
    assert_eq!(sim.machine().0, "0");

    // The provider's guarded driver, as the controller gets it.
    let bmc = bmcs.bmc_for(&node).unwrap();
    bmc.power_on().await.unwrap();
    assert_eq!(bmc.power_state().await.unwrap(), PowerState::On);
    bmc.power_off().await.unwrap();
    assert_eq!(bmc.power_state().await.unwrap(), PowerState::Off);

    // IPMI's own soft-off and cycle are accepted (the simulated OS obeys a soft-off).
    let ipmi = sim.driver(PASSWORD, test_ipmi_settings());
    ipmi.power_on().await.unwrap();
    ipmi.power_soft().await.unwrap();
    assert_eq!(ipmi.power_state().await.unwrap(), PowerState::Off);
    ipmi.power_cycle().await.unwrap();
}

#[tokio::test]
async fn pxe_is_set_for_the_next_boot_only() {
    let sim = SimBmc::start().await;
    let tmp = tempfile::tempdir().unwrap();
    let bmcs = provider(tmp.path(), PASSWORD);
    let node = node("cn0002", sim.bmc_config());

    let report = ops::act_on_node(&bmcs, &node, PowerAction::Pxe)
        .await
        .unwrap();
    assert_eq!(report.power, "off");
    assert!(report.note.contains("network"), "{report:?}");
    assert_eq!(sim.machine().1, "pxe");

    // What the BMC stored: boot flags (parameter 5) for the next boot, not persistent.
    let output = Command::new("ipmitool")
        .args(["-I", "lanplus", "-H", "127.0.0.1", "-p"])
        .arg(sim.port.to_string())
        .args([
            "-U",
            USERNAME,
            "-E",
            "-C",
            "3",
            "chassis",
            "bootparam",
            "get",
            "5",
        ])
        .env("IPMI_PASSWORD", PASSWORD)
        .output()
        .unwrap();
    let flags = String::from_utf8_lossy(&output.stdout);
    assert!(flags.contains("Force PXE"), "{flags}");
    assert!(flags.contains("Options apply to only next boot"), "{flags}");
}

/// Everything logged while it lives, for checking that no secret is logged.
#[derive(Clone, Default)]
struct CapturedLogs(Arc<Mutex<Vec<u8>>>);

impl Write for CapturedLogs {
    fn write(&mut self, bytes: &[u8]) -> std::io::Result<usize> {
        self.0.lock().unwrap().extend_from_slice(bytes);
        Ok(bytes.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

impl<'a> tracing_subscriber::fmt::MakeWriter<'a> for CapturedLogs {
    type Writer = CapturedLogs;
    fn make_writer(&'a self) -> Self::Writer {
        self.clone()
    }
}

#[tokio::test]
async fn wrong_password_is_a_clear_auth_error_that_never_shows_the_password() {
    let sim = SimBmc::start().await;
    let wrong = "WrongPassw0rd-xyzzy";
    let logs = CapturedLogs::default();
    let subscriber = tracing_subscriber::fmt()
        .with_max_level(tracing::Level::TRACE)
        .with_writer(logs.clone())
        .with_ansi(false)
        .finish();
    let _default = tracing::subscriber::set_default(subscriber);

    let tmp = tempfile::tempdir().unwrap();
    let bmcs = provider(tmp.path(), wrong);
    let node = node("cn0003", sim.bmc_config());
    let bound = test_ipmi_settings().call_bound();
    let started = tokio::time::Instant::now();
    let error = ops::act_on_node(&bmcs, &node, PowerAction::Off)
        .await
        .unwrap_err();
    assert!(started.elapsed() <= bound, "took {:?}", started.elapsed());
    let text = error.to_string();
    assert!(text.contains("authentication failed"), "{text}");
    assert!(text.contains("cn0003 at 127.0.0.1:"), "{text}");
    assert!(text.contains("power_off"), "{text}");
    assert!(!text.contains(wrong), "{text}");
    assert!(!format!("{error:?}").contains(wrong));
    // Nothing was done to the machine.
    assert_eq!(sim.machine().0, "");

    // An unknown user is an authentication error too, and says so.
    let stranger = IpmiBmc::new(
        "sim",
        BmcAddress::parse(&sim.address(), 623).unwrap(),
        Credentials {
            username: "nobody".into(),
            password: Secret::new(wrong),
        },
        test_ipmi_settings(),
    );
    let error = stranger.power_state().await.unwrap_err().to_string();
    assert!(error.contains("does not know this user"), "{error}");

    let logged = String::from_utf8(logs.0.lock().unwrap().clone()).unwrap();
    assert!(logged.contains("authentication failed"), "logs: {logged}");
    assert!(!logged.contains(wrong), "logs: {logged}");
}

#[tokio::test]
async fn silent_address_is_reported_as_no_answer_within_its_bound() {
    require("ipmitool", "-V");
    let (port, _blackhole) = udp_port();
    let settings = test_ipmi_settings();
    let bound = settings.call_bound();
    let bmc = IpmiBmc::new(
        "silent",
        BmcAddress::parse(&format!("127.0.0.1:{port}"), 623).unwrap(),
        credentials(PASSWORD),
        settings,
    );
    let started = tokio::time::Instant::now();
    let error = bmc.power_state().await.unwrap_err().to_string();
    assert!(started.elapsed() <= bound, "took {:?}", started.elapsed());
    assert!(error.contains("no answer from 127.0.0.1:"), "{error}");
    assert!(error.contains("after 2 attempts"), "{error}");
}

#[tokio::test]
async fn ipmitool_is_killed_at_the_command_timeout() {
    require("ipmitool", "-V");
    let (port, _blackhole) = udp_port();
    // ipmitool alone would wait 5 s × 4 per request; the driver allows 1.5 s.
    let bmc = IpmiBmc::new(
        "hung",
        BmcAddress::parse(&format!("127.0.0.1:{port}"), 623).unwrap(),
        credentials(PASSWORD),
        IpmiSettings {
            session_timeout_s: 5,
            session_retries: 3,
            command_timeout_ms: 1_500,
            attempts_max: 1,
            ..IpmiSettings::default()
        },
    );
    let started = tokio::time::Instant::now();
    let error = bmc.power_off().await.unwrap_err();
    assert!(
        started.elapsed() < Duration::from_secs(5),
        "took {:?}",
        started.elapsed()
    );
    assert!(
        matches!(
            &error,
            BmcError::Timeout {
                operation: "power_off",
                ..
            }
        ),
        "{error}"
    );
    assert!(
        no_process_with(&format!("-p {port} ")),
        "ipmitool left running"
    );
}

#[tokio::test]
async fn hung_bmc_times_out_while_a_healthy_one_answers() {
    let sim = SimBmc::start().await;
    let (port, _blackhole) = udp_port();
    // Shared guards: two calls may run at once; each is cut at 3 s.
    let guards = Guards::new(
        2,
        GuardLimits {
            queue_timeout: Duration::from_secs(30),
            call_timeout: Duration::from_secs(3),
        },
    );
    let hung_address = BmcAddress::parse(&format!("127.0.0.1:{port}"), 623).unwrap();
    let hung = Arc::new(guards.guard(
        &hung_address.key(),
        "hung",
        "ipmi",
        Arc::new(IpmiBmc::new(
            "hung",
            hung_address.clone(),
            credentials(PASSWORD),
            IpmiSettings {
                session_timeout_s: 10,
                session_retries: 5,
                command_timeout_ms: 120_000,
                attempts_max: 1,
                ..IpmiSettings::default()
            },
        )),
    ));
    let healthy_address = BmcAddress::parse(&sim.address(), 623).unwrap();
    let healthy = guards.guard(
        &healthy_address.key(),
        "healthy",
        "ipmi",
        Arc::new(sim.driver(PASSWORD, test_ipmi_settings())),
    );

    let started = tokio::time::Instant::now();
    let hung_call = tokio::spawn({
        let hung = hung.clone();
        async move { hung.power_off().await }
    });
    // A second call to the hung BMC waits its turn behind the first (one at a time per
    // BMC) — and still does not hold up the healthy BMC.
    let queued_call = tokio::spawn({
        let hung = hung.clone();
        async move { hung.power_state().await }
    });
    healthy.power_on().await.unwrap();
    assert_eq!(healthy.power_state().await.unwrap(), PowerState::On);
    assert!(
        !hung_call.is_finished(),
        "the healthy BMC answered only after the hung one gave up"
    );

    let error = hung_call.await.unwrap().unwrap_err();
    let elapsed = started.elapsed();
    assert!(matches!(error, BmcError::Timeout { .. }), "{error}");
    assert!(
        error.to_string().contains("hung: power_off timed out"),
        "{error}"
    );
    assert!(elapsed >= Duration::from_secs(3), "{elapsed:?}");
    assert!(elapsed < Duration::from_secs(10), "{elapsed:?}");
    let queued = queued_call.await.unwrap().unwrap_err();
    assert!(matches!(queued, BmcError::Timeout { .. }), "{queued}");
    assert!(
        started.elapsed() >= Duration::from_secs(6),
        "the second call to the hung BMC did not wait its turn"
    );
    assert!(
        no_process_with(&format!("-p {port} ")),
        "ipmitool left running"
    );
}

#[tokio::test]
async fn check_all_reports_every_bmc_with_power_or_error() {
    let first = SimBmc::start().await;
    let second = SimBmc::start().await;
    let (silent_port, _blackhole) = udp_port();
    let tmp = tempfile::tempdir().unwrap();
    let bmcs = provider(tmp.path(), PASSWORD);
    second
        .driver(PASSWORD, test_ipmi_settings())
        .power_on()
        .await
        .unwrap();

    let nodes = vec![
        node("cn0010", first.bmc_config()),
        node("cn0011", second.bmc_config()),
        node(
            "cn0012",
            BmcConfig {
                address: Some(format!("127.0.0.1:{silent_port}")),
                ..first.bmc_config()
            },
        ),
        node(
            "cn0013",
            BmcConfig {
                driver: Some(BmcDriver::Qmp),
                ..first.bmc_config()
            },
        ),
    ];
    let rows = ops::check_all(&bmcs, &nodes, 2).await;
    let error = |index: usize| rows[index].error.clone().unwrap_or_default();
    assert_eq!(rows.len(), 4, "{rows:#?}");
    assert_eq!(rows[0].node, "cn0010", "{rows:#?}");
    assert_eq!(rows[0].power.as_deref(), Some("off"), "{rows:#?}");
    assert_eq!(rows[1].power.as_deref(), Some("on"), "{rows:#?}");
    assert_eq!(rows[1].driver, "ipmi", "{rows:#?}");
    assert!(error(2).contains("no answer from"), "{rows:#?}");
    assert!(
        error(3).contains("not available in production"),
        "{rows:#?}"
    );
    let table = ops::check_rows_table(&rows);
    assert_eq!(table.len(), 4);
    assert_eq!(table[0].len(), ops::CHECK_HEADERS.len());
    assert!(table[2][3].starts_with("error: "), "{:?}", table[2]);
}

/// ipmi_sim answers Chassis Control 4 ("pulse diagnostic interrupt", what `chassis power
/// diag` sends) with completion code 0xCC whatever its chassis-control script says
/// (OpenIPMI 2.0.33 lanserv/bmc_chassis.c), so no NMI effect can be seen here. What can:
/// ipmitool opened a session and sent the Diag control (its own refusal message names
/// it), the refusal is a clear error that says no NMI was sent, it is not repeated, and
/// nothing else happened to the machine. A wrong password fails before anything is sent.
#[tokio::test]
async fn nmi_is_sent_as_chassis_diag_and_a_bmc_without_it_refuses_clearly() {
    let sim = SimBmc::start().await;
    let ipmi = sim.driver(PASSWORD, test_ipmi_settings());
    assert!(ipmi.supports_nmi());
    ipmi.power_on().await.unwrap();

    let error = ipmi.inject_nmi().await.unwrap_err();
    let text = error.to_string();
    assert!(
        matches!(
            &error,
            BmcError::Failed {
                operation: "inject_nmi",
                ..
            }
        ),
        "{error:?}"
    );
    assert!(
        text.contains("Set Chassis Power Control to Diag failed: Invalid data field in request"),
        "{text}"
    );
    assert!(
        text.contains("does not offer the diagnostic interrupt") && text.contains("no NMI"),
        "{text}"
    );
    assert!(
        !text.contains("after"),
        "a refused NMI is not repeated: {text}"
    );
    assert_eq!(sim.machine(), ("1".to_string(), "default".to_string()));
    assert_eq!(ipmi.power_state().await.unwrap(), PowerState::On);

    // Through the provider's guard, as a drill gets it: the same refusal, named.
    let tmp = tempfile::tempdir().unwrap();
    let node = node("cn0020", sim.bmc_config());
    let guarded = provider(tmp.path(), PASSWORD).bmc_for(&node).unwrap();
    assert!(guarded.supports_nmi());
    let text = guarded.inject_nmi().await.unwrap_err().to_string();
    assert!(
        text.contains("inject_nmi") && text.contains("cn0020 at 127.0.0.1:"),
        "{text}"
    );
    assert!(
        text.contains("does not offer the diagnostic interrupt"),
        "{text}"
    );

    // A wrong password: an authentication error that never quotes it.
    let wrong = "WrongPassw0rd-nmi";
    let error = sim
        .driver(wrong, test_ipmi_settings())
        .inject_nmi()
        .await
        .unwrap_err()
        .to_string();
    assert!(
        error.contains("inject_nmi failed: authentication failed"),
        "{error}"
    );
    assert!(!error.contains(wrong), "{error}");
    assert_eq!(sim.machine().0, "1");
}

#[tokio::test]
async fn cycle_ends_verified_on() {
    // Generic cycle: verified off, then on, read back on — whatever the driver.
    let sim = SimBmc::start().await;
    let bmc = sim.driver(PASSWORD, test_ipmi_settings());
    bmc.power_on().await.unwrap();
    let report = ops::act(
        &bmc,
        "sim",
        PowerAction::Cycle,
        Readback {
            readbacks_max: 10,
            backoff: Duration::from_millis(50),
        },
    )
    .await
    .unwrap();
    assert_eq!(report.power, "on");
    assert!(report.readbacks >= 2, "{report:?}");
    assert_eq!(sim.machine().0, "1");
}
