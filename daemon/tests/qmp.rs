//! The QMP driver against a real QEMU: `qemu-system-x86_64` started per test with no disk
//! and no kernel (it sits in its firmware), `-S` (paused at start) and `-no-shutdown`, so
//! power on, hard power off and power on again are read back through `query-status`. A
//! socket nobody listens on is a clear error; a peer that never answers is cut off at the
//! driver's bound.
//!
//! Needs `qemu-system-x86_64` (Debian `qemu-system-x86`); without it every test fails
//! telling you to run scripts/install-deps.sh.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use bearman::bmc::qmp::QmpBmc;
use bearman::bmc::{Bmc, BmcError, PowerState};

/// Bound on one driver call against QEMU; generous for TCG on a loaded CI machine.
const CALL_TIMEOUT: Duration = Duration::from_secs(10);
/// Bound on QEMU creating its QMP socket.
const STARTUP_TIMEOUT: Duration = Duration::from_secs(30);

/// One QEMU VM; killed (and reaped) on drop.
struct Qemu {
    child: Child,
    socket: PathBuf,
    _dir: tempfile::TempDir,
}

impl Qemu {
    fn start() -> Qemu {
        let dir = tempfile::tempdir().unwrap();
        let socket = dir.path().join("qmp.sock");
        let child = Command::new("qemu-system-x86_64")
            .args([
                "-machine",
                "q35,accel=tcg",
                "-nodefaults",
                "-nographic",
                "-no-shutdown",
                "-S",
                "-m",
                "64",
                "-qmp",
            ])
            .arg(format!("unix:{},server=on,wait=off", socket.display()))
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap_or_else(|error| {
                panic!("qemu-system-x86_64 cannot be run ({error}): run scripts/install-deps.sh")
            });
        let mut qemu = Qemu {
            child,
            socket,
            _dir: dir,
        };
        qemu.wait_for_socket();
        qemu
    }

    /// Waits, with a bound, for QEMU to create its socket (or fails with its stderr).
    fn wait_for_socket(&mut self) {
        let deadline = Instant::now() + STARTUP_TIMEOUT;
        while !self.socket.exists() {
            if let Some(status) = self.child.try_wait().unwrap() {
                let mut stderr = String::new();
                if let Some(mut pipe) = self.child.stderr.take() {
                    use std::io::Read;
                    let _ = pipe.read_to_string(&mut stderr);
                }
                panic!("qemu-system-x86_64 exited ({status}) before opening QMP: {stderr}");
            }
            assert!(
                Instant::now() < deadline,
                "qemu did not open {} within {STARTUP_TIMEOUT:?}",
                self.socket.display()
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    fn bmc(&self) -> QmpBmc {
        QmpBmc::new(&self.socket, CALL_TIMEOUT)
    }
}

impl Drop for Qemu {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

#[tokio::test]
async fn a_vm_is_powered_like_a_server() {
    let qemu = Qemu::start();
    let bmc = qemu.bmc();
    assert_eq!(
        bmc.power_state().await.unwrap(),
        PowerState::Off,
        "paused at start (-S)"
    );

    bmc.power_on().await.unwrap();
    assert_eq!(bmc.power_state().await.unwrap(), PowerState::On);
    bmc.power_on().await.unwrap();
    assert_eq!(
        bmc.power_state().await.unwrap(),
        PowerState::On,
        "power on of a running VM changes nothing"
    );

    bmc.power_off().await.unwrap();
    assert_eq!(bmc.power_state().await.unwrap(), PowerState::Off);
    bmc.power_off().await.unwrap();
    assert_eq!(
        bmc.power_state().await.unwrap(),
        PowerState::Off,
        "power off twice is harmless"
    );

    bmc.set_next_boot_pxe().await.unwrap();
    bmc.power_on().await.unwrap();
    assert_eq!(bmc.power_state().await.unwrap(), PowerState::On);
    assert!(
        qemu_still_running(&qemu),
        "the QEMU process outlives power cycles"
    );
}

fn qemu_still_running(qemu: &Qemu) -> bool {
    // `try_wait` needs `&mut`; the pid's /proc entry says the same without reaping.
    Path::new(&format!("/proc/{}", qemu.child.id())).exists()
}

#[tokio::test]
async fn a_socket_nobody_listens_on_is_a_clear_error() {
    let dir = tempfile::tempdir().unwrap();
    let socket = dir.path().join("absent.sock");
    let bmc = QmpBmc::new(&socket, CALL_TIMEOUT);
    let error = bmc.power_state().await.unwrap_err();
    let text = error.to_string();
    assert!(matches!(error, BmcError::Failed { .. }), "{text}");
    assert!(text.contains(&socket.display().to_string()), "{text}");
    assert!(text.contains("power_state"), "{text}");
    assert!(text.contains("connect"), "{text}");

    // A socket file left by a dead QEMU: refused, not hung.
    let stale = dir.path().join("stale.sock");
    drop(std::os::unix::net::UnixListener::bind(&stale).unwrap());
    let error = QmpBmc::new(&stale, CALL_TIMEOUT)
        .power_off()
        .await
        .unwrap_err();
    let text = error.to_string();
    assert!(
        text.contains("power_off") && text.contains("stale.sock"),
        "{text}"
    );
}

#[tokio::test]
async fn a_peer_that_never_answers_is_cut_off_at_the_bound() {
    let dir = tempfile::tempdir().unwrap();
    let socket = dir.path().join("silent.sock");
    // Connections queue in the backlog and are never greeted.
    let _listener = std::os::unix::net::UnixListener::bind(&socket).unwrap();
    let bound = Duration::from_millis(300);
    let bmc = QmpBmc::new(&socket, bound);
    let started = Instant::now();
    let error = bmc.power_on().await.unwrap_err();
    let elapsed = started.elapsed();
    assert!(
        matches!(
            &error,
            BmcError::Timeout {
                operation: "power_on",
                ..
            }
        ),
        "{error}"
    );
    assert!(error.to_string().contains("silent.sock"), "{error}");
    assert!(
        elapsed >= bound && elapsed < bound * 10,
        "cut off after {elapsed:?}"
    );
}

#[tokio::test]
async fn a_hard_power_off_before_the_first_boot_reads_back_off() {
    let qemu = Qemu::start();
    let bmc = qemu.bmc();
    bmc.power_off().await.unwrap();
    assert_eq!(bmc.power_state().await.unwrap(), PowerState::Off);
    bmc.power_on().await.unwrap();
    assert_eq!(bmc.power_state().await.unwrap(), PowerState::On);
}

/// Through the production provider: a `qmp` node is driven only when `bmc.qmp_socket_dir`
/// allows it, its address names a socket inside that directory, and the guarded driver
/// powers the real VM (soft off included: a guest with no ACPI handler ignores it).
#[tokio::test]
async fn the_provider_drives_a_vm_whose_socket_is_in_the_allowed_directory() {
    use bearman::bmc::provider::{BmcSettings, DriverBmcs};
    use bearman::bmc::BmcProvider;
    use bearman::core::model::{BmcConfig, BmcDriver, Node, NodeRole};
    use bearman_proto::uuid::NodeUuid;

    let qemu = Qemu::start();
    let dir = qemu.socket.parent().unwrap().to_path_buf();
    let node_with = |address: &str| {
        let mut node = Node::new(
            NodeUuid::from_index(5, 1),
            "vm1".into(),
            NodeRole::Compute,
            0,
        );
        node.bmc = BmcConfig {
            address: Some(address.to_string()),
            mac: None,
            driver: Some(BmcDriver::Qmp),
            credentials_ref: None,
        };
        node
    };
    let refused = DriverBmcs::new(BmcSettings::default()).unwrap();
    let error = refused
        .bmc_for(&node_with("qmp.sock"))
        .err()
        .unwrap()
        .to_string();
    assert!(error.contains("set bmc.qmp_socket_dir"), "{error}");

    let bmcs = DriverBmcs::new(BmcSettings {
        qmp_socket_dir: Some(dir.clone()),
        ..BmcSettings::default()
    })
    .unwrap();
    for outside in ["../qmp.sock", "/tmp/qmp.sock", ".hidden", "a/b.sock", ""] {
        let Err(error) = bmcs.bmc_for(&node_with(outside)) else {
            panic!("{outside:?} accepted");
        };
        let error = error.to_string();
        assert!(error.contains("vm1"), "{outside:?}: {error}");
    }
    for address in [
        "qmp.sock".to_string(),
        dir.join("qmp.sock").display().to_string(),
    ] {
        let bmc = bmcs.bmc_for(&node_with(&address)).unwrap();
        bmc.power_on().await.unwrap();
        assert_eq!(bmc.power_state().await.unwrap(), PowerState::On);
        bmc.power_off_soft().await.unwrap();
        bmc.power_off().await.unwrap();
        assert_eq!(bmc.power_state().await.unwrap(), PowerState::Off);
    }

    let error = BmcSettings {
        qmp_socket_dir: Some("relative/dir".into()),
        ..BmcSettings::default()
    }
    .validate()
    .unwrap_err()
    .to_string();
    assert!(error.contains("absolute"), "{error}");
}
