//! The QMP driver against a real QEMU: `qemu-system-x86_64` started per test with no disk
//! and no kernel (it sits in its firmware), `-S` (paused at start) and `-no-shutdown`, so
//! power on, hard power off and power on again are read back through `query-status`. An
//! NMI is seen arriving by a tiny probe kernel's handler. A socket nobody listens on is a
//! clear error; a peer that never answers is cut off at the driver's bound.
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
        Qemu::start_with(|_, _| {})
    }

    /// Starts QEMU with the common arguments plus what `extra` adds in its temp dir.
    fn start_with(extra: impl FnOnce(&mut Command, &Path)) -> Qemu {
        let dir = tempfile::tempdir().unwrap();
        let socket = dir.path().join("qmp.sock");
        let mut command = Command::new("qemu-system-x86_64");
        extra(&mut command, dir.path());
        let child = command
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

/// A 32-bit multiboot kernel of a few hundred bytes for `-kernel`: it loads its own GDT and
/// an IDT whose only present gate is vector 2 (NMI), writes `R` to the debug console (port
/// 0xe9) and halts; its NMI handler writes `N` and halts for good. The guest observes the
/// NMI itself, so a test can prove delivery rather than QEMU's acceptance alone.
fn nmi_probe_kernel() -> Vec<u8> {
    const BASE: u32 = 0x0010_0000; // multiboot's conventional load address (1 MiB)
    let mut image = vec![0u8; 0x308];
    let put = |image: &mut Vec<u8>, at: usize, bytes: &[u8]| {
        image[at..at + bytes.len()].copy_from_slice(bytes);
    };
    // Multiboot header with the "a.out kludge" (flag 16): load the file as-is at BASE.
    let (magic, flags) = (0x1BAD_B002u32, 0x0001_0000u32);
    let header = [
        magic,
        flags,
        0u32.wrapping_sub(magic.wrapping_add(flags)),
        BASE,        // header_addr
        BASE,        // load_addr
        0,           // load_end_addr: the whole file
        0,           // bss_end_addr: none
        BASE + 0x20, // entry
    ];
    for (n, word) in header.iter().enumerate() {
        put(&mut image, n * 4, &word.to_le_bytes());
    }
    let le = |value: u32| value.to_le_bytes();
    let mut code = vec![0xFA]; // cli
    code.extend([0x0F, 0x01, 0x15]); // lgdt [BASE+0x2A0]
    code.extend(le(BASE + 0x2A0));
    code.push(0xEA); // jmp 0x08:BASE+0x2F (reload CS from our GDT)
    code.extend(le(BASE + 0x2F));
    code.extend([0x08, 0x00]);
    assert_eq!(
        0x20 + code.len(),
        0x2F,
        "the far jump lands right after itself"
    );
    code.extend([0x66, 0xB8, 0x10, 0x00]); // mov ax, 0x10
    code.extend([0x8E, 0xD8, 0x8E, 0xC0, 0x8E, 0xD0]); // mov ds/es/ss, ax
    code.push(0xBC); // mov esp, BASE+0x400
    code.extend(le(BASE + 0x400));
    code.extend([0x0F, 0x01, 0x1D]); // lidt [BASE+0x300]
    code.extend(le(BASE + 0x300));
    code.extend([0xB0, b'R', 0xE6, 0xE9]); // out 0xe9, 'R'
    code.extend([0xF4, 0xEB, 0xFD]); // hlt; jmp hlt (an NMI wakes hlt even with IF=0)
    assert!(
        0x20 + code.len() <= 0x100,
        "the code runs into the NMI handler"
    );
    put(&mut image, 0x20, &code);
    // The NMI handler at BASE+0x100: out 0xe9, 'N'; hlt forever (no iret: NMIs stay masked).
    put(
        &mut image,
        0x100,
        &[0xB0, b'N', 0xE6, 0xE9, 0xF4, 0xEB, 0xFD],
    );
    // IDT at BASE+0x200: vector 2, a 32-bit interrupt gate to BASE+0x100 via selector 8.
    put(
        &mut image,
        0x210,
        &[0x00, 0x01, 0x08, 0x00, 0x00, 0x8E, 0x10, 0x00],
    );
    // GDT at BASE+0x280: null, flat 4 GiB code (0x08), flat data (0x10).
    put(&mut image, 0x288, &[0xFF, 0xFF, 0, 0, 0, 0x9A, 0xCF, 0]);
    put(&mut image, 0x290, &[0xFF, 0xFF, 0, 0, 0, 0x92, 0xCF, 0]);
    put(&mut image, 0x2A0, &[0x17, 0x00]); // GDTR: limit, base
    put(&mut image, 0x2A2, &le(BASE + 0x280));
    put(&mut image, 0x300, &[0x17, 0x00]); // IDTR: limit (vectors 0-2), base
    put(&mut image, 0x302, &le(BASE + 0x200));
    image
}

/// Waits, with a bound, until the guest has written `want` to its debug console.
async fn wait_for_console(console: &Path, want: &str) -> String {
    let deadline = Instant::now() + STARTUP_TIMEOUT;
    loop {
        let text = std::fs::read_to_string(console).unwrap_or_default();
        if text.contains(want) {
            return text;
        }
        assert!(
            Instant::now() < deadline,
            "the guest's console has {text:?}, never {want:?}, within {STARTUP_TIMEOUT:?}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// The NMI reaches the guest: a probe kernel's NMI handler runs only when `inject_nmi`
/// was sent (a Linux with `unknown_nmi_panic=1` would panic there). A VM that is not
/// running is refused, and nothing is delivered to it.
#[tokio::test]
async fn an_nmi_reaches_the_running_guest_and_a_stopped_vm_is_refused() {
    let mut console = PathBuf::new();
    let qemu = Qemu::start_with(|command, dir| {
        let kernel = dir.join("nmi-probe.bin");
        std::fs::write(&kernel, nmi_probe_kernel()).unwrap();
        console = dir.join("console.txt");
        command
            .arg("-kernel")
            .arg(&kernel)
            .arg("-debugcon")
            .arg(format!("file:{}", console.display()));
    });
    let bmc = qemu.bmc();
    assert!(bmc.supports_nmi());

    // Paused at start (-S): refused, and the guest never sees an NMI.
    let error = bmc.inject_nmi().await.unwrap_err();
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
        text.contains("not running (status prelaunch)") && text.contains("qmp.sock"),
        "{text}"
    );

    bmc.power_on().await.unwrap();
    assert_eq!(
        wait_for_console(&console, "R").await,
        "R",
        "the probe is up, and no NMI arrived while it was off"
    );
    bmc.inject_nmi().await.unwrap();
    assert_eq!(wait_for_console(&console, "N").await, "RN");
    assert_eq!(bmc.power_state().await.unwrap(), PowerState::On);
}
