//! Stage 1 and stage 2 against a fake boot server on 127.0.0.1:0: registration, boot plan,
//! verified downloads, and the kexec plan stage 1 would execute (kexec itself is injected);
//! the BMC through a fake ipmitool; firmware updates with shell-script updaters run for
//! real and the restart recorded; stage 2's network changes through a fake host.

use std::collections::BTreeMap;
use std::future::Future;
use std::path::{Path, PathBuf};
use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bearman_agent::firmware::REPORT_ATTEMPTS_MAX;
use bearman_agent::net::TcpConnector;
use bearman_agent::network::{HostState, Interface, NetAction, ResolvConf};
use bearman_agent::stage1::bmc::Ipmitool;
use bearman_agent::stage1::download::{self, DownloadError, Limits};
use bearman_agent::stage1::kexec::{Kexec, KexecError, KexecFiles};
use bearman_agent::stage1::netconf::HostNetwork;
use bearman_agent::stage1::{Console, SystemHost};
use bearman_agent::stages::{self, Options, Stage2Options};
use bearman_proto::{FirmwareOutcome, FirmwareReport};
use sha2::{Digest, Sha256};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpListener;

const UUID: &str = "4c4c4544-0042-3510-8052-b4c04f333232";
const KERNEL: &[u8] = b"pretend this is a bzImage";
const INITRD: &[u8] = b"pretend this is a cpio archive";
const CMDLINE: &str = "console=ttyS0 root=live bearman.url=http://x bearman.uuid=x";

/// A canned reply; `remaining` counts down how often it is served before `routes` applies.
#[derive(Clone)]
struct Reply {
    status: u16,
    body: Vec<u8>,
    /// Declared length, when it should lie (truncated bodies).
    content_length: Option<usize>,
    extra_headers: String,
}

impl Reply {
    fn ok(body: impl Into<Vec<u8>>) -> Self {
        Reply {
            status: 200,
            body: body.into(),
            content_length: None,
            extra_headers: String::new(),
        }
    }

    fn status(status: u16, body: &str) -> Self {
        Reply {
            status,
            ..Reply::ok(body)
        }
    }
}

#[derive(Default)]
struct ServerState {
    routes: BTreeMap<String, Reply>,
    /// Served instead of `routes` while their count is above zero.
    faults: BTreeMap<String, (u32, Reply)>,
    requests: Vec<String>,
    /// Request bodies by request key, last one kept.
    bodies: BTreeMap<String, Vec<u8>>,
}

#[derive(Clone)]
struct FakeBoot {
    base: String,
    state: Arc<Mutex<ServerState>>,
}

impl FakeBoot {
    async fn start() -> FakeBoot {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let base = format!("http://{}", listener.local_addr().unwrap());
        let state = Arc::new(Mutex::new(ServerState::default()));
        let server_state = state.clone();
        tokio::spawn(async move {
            loop {
                let Ok((stream, _)) = listener.accept().await else {
                    return;
                };
                tokio::spawn(serve(stream, server_state.clone()));
            }
        });
        let boot = FakeBoot { base, state };
        boot.route(
            "POST /ipxe/{uuid}/progress",
            Reply::ok(format!(r#"{{"uuid":"{UUID}","state":"unknown"}}"#)),
        );
        boot.route("POST /ipxe/{uuid}/register", Reply::ok(boot.registration()));
        boot.route("GET /ipxe/{uuid}", Reply::ok(boot.script()));
        boot.route("GET /ipxe/{uuid}/profile", Reply::ok(boot.profile(KERNEL)));
        boot.route("GET /ipxe/{uuid}/detail", Reply::ok(detail()));
        boot.route("GET /images/vmlinuz", Reply::ok(KERNEL));
        boot.route("GET /images/initrd.img", Reply::ok(INITRD));
        boot
    }

    fn route(&self, key: &str, reply: Reply) {
        let key = key.replace("{uuid}", UUID);
        self.state.lock().unwrap().routes.insert(key, reply);
    }

    fn fail(&self, key: &str, times: u32, reply: Reply) {
        let key = key.replace("{uuid}", UUID);
        self.state
            .lock()
            .unwrap()
            .faults
            .insert(key, (times, reply));
    }

    fn requests(&self) -> Vec<String> {
        self.state.lock().unwrap().requests.clone()
    }

    /// The last body sent to `key` (`{uuid}` expanded), as JSON.
    fn body(&self, key: &str) -> serde_json::Value {
        let key = key.replace("{uuid}", UUID);
        let bodies = &self.state.lock().unwrap().bodies;
        serde_json::from_slice(bodies.get(&key).expect("request was made")).unwrap()
    }

    fn registration(&self) -> String {
        self.registration_with_bmc(serde_json::Value::Null)
    }

    fn registration_with_bmc(&self, bmc: serde_json::Value) -> String {
        serde_json::json!({
            "uuid": UUID, "hostname": "hv-001", "state": "registered", "bmc": bmc,
            "firmware_expected": {"bios": "2.1", "bmc": null, "nics": {}}
        })
        .to_string()
    }

    /// The registration with `fields` added (`firmware_update`, `firmware_hold`).
    fn registration_with(&self, fields: serde_json::Value) -> String {
        let mut registration: serde_json::Value =
            serde_json::from_str(&self.registration()).unwrap();
        for (key, value) in fields.as_object().unwrap() {
            registration[key] = value.clone();
        }
        registration.to_string()
    }

    fn script(&self) -> String {
        bearman_proto::ipxe::render_boot(
            "stage 2",
            &format!("{}/images/vmlinuz", self.base),
            CMDLINE,
            &[format!("{}/images/initrd.img", self.base)],
        )
    }

    /// The profile, with the kernel checksum taken from `kernel_bytes`.
    fn profile(&self, kernel_bytes: &[u8]) -> String {
        serde_json::json!({
            "flavor": "hypervisor",
            "kernel": {"url": format!("{}/images/vmlinuz", self.base), "sha256": sha256(kernel_bytes)},
            "initrds": [{"url": format!("{}/images/initrd.img", self.base), "sha256": sha256(INITRD)}],
            "cmdline": CMDLINE,
        })
        .to_string()
    }
}

fn detail() -> String {
    serde_json::json!({
        "hostname": "hv-001", "vlan": null, "bond0_addresses": [], "bond0_slaves": [],
        "gateway": null, "dns": [], "mtu": 1500
    })
    .to_string()
}

fn sha256(bytes: &[u8]) -> String {
    hex::encode(Sha256::digest(bytes))
}

async fn serve(mut stream: tokio::net::TcpStream, state: Arc<Mutex<ServerState>>) {
    let mut buffer = Vec::new();
    let mut chunk = [0u8; 4096];
    let header_end = loop {
        if let Some(position) = buffer.windows(4).position(|w| w == b"\r\n\r\n") {
            break position;
        }
        match stream.read(&mut chunk).await {
            Ok(0) | Err(_) => return,
            Ok(read) => buffer.extend_from_slice(&chunk[..read]),
        }
    };
    let head = String::from_utf8_lossy(&buffer[..header_end]).to_string();
    let length: usize = head
        .lines()
        .find_map(|line| {
            let (name, value) = line.split_once(':')?;
            name.eq_ignore_ascii_case("content-length")
                .then(|| value.trim().parse().ok())?
        })
        .unwrap_or(0);
    while buffer.len() < header_end + 4 + length {
        match stream.read(&mut chunk).await {
            Ok(0) | Err(_) => return,
            Ok(read) => buffer.extend_from_slice(&chunk[..read]),
        }
    }
    let mut words = head.split_whitespace();
    let key = format!(
        "{} {}",
        words.next().unwrap_or_default(),
        words.next().unwrap_or_default()
    );
    let reply = {
        let mut state = state.lock().unwrap();
        state.requests.push(key.clone());
        let body = buffer[header_end + 4..header_end + 4 + length].to_vec();
        state.bodies.insert(key.clone(), body);
        let fault = match state.faults.get_mut(&key) {
            Some((remaining, reply)) if *remaining > 0 => {
                *remaining -= 1;
                Some(reply.clone())
            }
            _ => None,
        };
        fault
            .or_else(|| state.routes.get(&key).cloned())
            .unwrap_or_else(|| Reply::status(404, r#"{"error":"not_found","message":"no route"}"#))
    };
    let header = format!(
        "HTTP/1.1 {} X\r\nContent-Length: {}\r\nConnection: close\r\n{}\r\n",
        reply.status,
        reply.content_length.unwrap_or(reply.body.len()),
        reply.extra_headers
    );
    let _ = stream.write_all(header.as_bytes()).await;
    let _ = stream.write_all(&reply.body).await;
    let _ = stream.shutdown().await;
}

/// Records what it would have kexec'd, with the files' contents read at that moment, and
/// how often it would have restarted the machine.
#[derive(Default)]
struct RecordingKexec {
    calls: Vec<(KexecFiles, Vec<u8>, Vec<Vec<u8>>)>,
    restarts: u32,
}

impl Kexec for RecordingKexec {
    fn kexec(&mut self, files: &KexecFiles) -> Result<(), KexecError> {
        let kernel = std::fs::read(&files.kernel).unwrap();
        let initrds = files
            .initrds
            .iter()
            .map(|path| std::fs::read(path).unwrap())
            .collect();
        self.calls.push((files.clone(), kernel, initrds));
        Ok(())
    }

    fn restart(&mut self) -> Result<(), KexecError> {
        self.restarts += 1;
        Ok(())
    }
}

/// ipmitool as a script: records every argument vector, prints `lan_print` for
/// `lan print` and `mc_info` for `mc info`, and fails any command containing `fail_on`.
#[derive(Clone)]
struct FakeIpmitool {
    calls: Arc<Mutex<Vec<String>>>,
    available: bool,
    lan_print: String,
    mc_info: String,
    fail_on: Option<String>,
}

impl Default for FakeIpmitool {
    fn default() -> Self {
        FakeIpmitool {
            calls: Arc::default(),
            available: true,
            lan_print: "IP Address Source       : DHCP Address\n\
                        IP Address              : 0.0.0.0\n\
                        MAC Address             : 0C:C4:7A:12:34:56\n"
                .into(),
            mc_info: "Device ID                 : 32\n\
                      Device Revision           : 1\n\
                      Firmware Revision         : 1.73\n\
                      IPMI Version              : 2.0\n"
                .into(),
            fail_on: None,
        }
    }
}

impl FakeIpmitool {
    fn calls(&self) -> Vec<String> {
        self.calls.lock().unwrap().clone()
    }
}

impl Ipmitool for FakeIpmitool {
    fn available(&self) -> bool {
        self.available
    }

    fn run<'a>(
        &'a self,
        args: &'a [String],
    ) -> Pin<Box<dyn Future<Output = Result<String, String>> + Send + 'a>> {
        let line = args.join(" ");
        self.calls.lock().unwrap().push(line.clone());
        let result = match &self.fail_on {
            Some(needle) if line.contains(needle.as_str()) => {
                Err("exit status: 1: Invalid data field in request".to_string())
            }
            _ if args.get(1).is_some_and(|word| word == "print") => Ok(self.lan_print.clone()),
            _ if line == "mc info" => Ok(self.mc_info.clone()),
            _ => Ok(String::new()),
        };
        Box::pin(async move { result })
    }
}

struct Node {
    dir: tempfile::TempDir,
    lines: Arc<Mutex<Vec<String>>>,
    ipmitool: FakeIpmitool,
}

impl Node {
    /// A machine: DMI uuid, a default route (so no DHCP), and a command line.
    fn new(cmdline: &str) -> Node {
        let dir = tempfile::tempdir().unwrap();
        let root = dir.path().join("root");
        std::fs::create_dir_all(root.join("sys/class/dmi/id")).unwrap();
        std::fs::create_dir_all(root.join("proc/net")).unwrap();
        std::fs::write(
            root.join("sys/class/dmi/id/product_uuid"),
            UUID.to_uppercase(),
        )
        .unwrap();
        std::fs::write(root.join("sys/class/dmi/id/bios_version"), "2.0\n").unwrap();
        std::fs::write(
            root.join("proc/net/route"),
            "Iface\tDestination\tGateway\tFlags\tRefCnt\tUse\tMetric\tMask\tMTU\tWindow\tIRTT\n\
             eth0\t00000000\t0102A8C0\t0003\t0\t0\t0\t00000000\t0\t0\t0\n",
        )
        .unwrap();
        std::fs::write(dir.path().join("cmdline"), cmdline).unwrap();
        Node {
            dir,
            lines: Arc::default(),
            ipmitool: FakeIpmitool::default(),
        }
    }

    /// Gives the machine an in-band IPMI device node.
    fn with_bmc_device(self) -> Node {
        let dev = self.dir.path().join("root/dev");
        std::fs::create_dir_all(&dev).unwrap();
        std::fs::write(dev.join("ipmi0"), "").unwrap();
        self
    }

    fn for_server(boot: &FakeBoot) -> Node {
        Node::new(&format!(
            "console=ttyS0 bearman.url={} bearman.uuid={UUID}\n",
            boot.base
        ))
    }

    fn work_dir(&self) -> PathBuf {
        self.dir.path().join("run")
    }

    fn options(&self) -> Options {
        Options {
            backoff_start: Duration::from_millis(1),
            backoff_cap: Duration::from_millis(4),
            attempts_max: Some(5),
            ..Options::default()
        }
    }

    fn console(&self) -> Console {
        let lines = self.lines.clone();
        Arc::new(move |line: &str| lines.lock().unwrap().push(line.to_string()))
    }

    /// The machine as stage 1 sees it: real files under the temporary root, the fake
    /// ipmitool, kexec recorded instead of performed.
    fn host(&self) -> SystemHost<RecordingKexec> {
        let mut host = SystemHost::new(
            self.dir.path().join("cmdline"),
            self.dir.path().join("root"),
            self.work_dir(),
        )
        .with_kexec(RecordingKexec::default());
        host.ipmitool = Arc::new(self.ipmitool.clone());
        host.console = self.console();
        host
    }

    /// The booted OS as stage 2 sees it, its network a value.
    fn stage2_host(&self, network: FakeHost) -> SystemHost<RecordingKexec, FakeHost> {
        self.host().with_network(network)
    }

    fn lines(&self) -> Vec<String> {
        self.lines.lock().unwrap().clone()
    }
}

#[tokio::test]
async fn stage1_registers_verifies_downloads_and_stops_at_kexec() {
    let boot = FakeBoot::start().await;
    let node = Node::for_server(&boot);
    let mut host = node.host();

    let files = stages::run_stage1(&node.options(), &TcpConnector, &mut host)
        .await
        .unwrap();

    let uuid_path = format!("/ipxe/{UUID}");
    assert_eq!(
        boot.requests(),
        vec![
            // Stage 1 says it started before its slow parts (for the boot watchdog).
            format!("POST {uuid_path}/progress"),
            format!("POST {uuid_path}/register"),
            format!("GET {uuid_path}"),
            format!("GET {uuid_path}/profile"),
            format!("GET {uuid_path}/detail"),
            "GET /images/vmlinuz".to_string(),
            "GET /images/initrd.img".to_string(),
        ]
    );
    assert_eq!(boot.body("POST /ipxe/{uuid}/progress")["phase"], "stage1");
    assert_eq!(host.kexec.calls.len(), 1);
    let (planned, kernel, initrds) = &host.kexec.calls[0];
    assert_eq!(planned, &files);
    assert_eq!(planned.cmdline, CMDLINE);
    assert_eq!(planned.kernel, node.work_dir().join("kernel"));
    assert_eq!(kernel, KERNEL);
    assert_eq!(initrds, &vec![INITRD.to_vec()]);
    let lines = node.lines();
    assert!(
        lines.contains(
            &"bearman-agent: warning: bios firmware 2.0, expected 2.1 (no firmware bundle applies)"
                .to_string()
        ),
        "{lines:#?}"
    );
    // No /dev/ipmi0 under the root: one line, ipmitool never run, no BMC facts sent.
    assert!(
        lines.contains(
            &"bearman-agent: no BMC found (no /dev/ipmi0); skipping BMC configuration".to_string()
        ),
        "{lines:#?}"
    );
    assert!(node.ipmitool.calls().is_empty());
    assert_eq!(
        boot.body("POST /ipxe/{uuid}/register")["bmc"],
        serde_json::Value::Null
    );
}

#[tokio::test]
async fn profile_404_is_reported_then_retried() {
    let boot = FakeBoot::start().await;
    boot.fail(
        "GET /ipxe/{uuid}/profile",
        2,
        Reply::status(
            404,
            r#"{"error":"no_flavor","message":"node has no flavor"}"#,
        ),
    );
    let node = Node::for_server(&boot);
    let mut host = node.host();

    stages::run_stage1(&node.options(), &TcpConnector, &mut host)
        .await
        .unwrap();

    let lines = node.lines();
    let failures: Vec<&String> = lines.iter().filter(|l| l.contains("HTTP 404")).collect();
    assert_eq!(failures.len(), 2, "{lines:#?}");
    let expected_prefix = format!(
        "bearman-agent: asking bearman what to boot: GET /ipxe/{UUID}/profile: HTTP 404: node has no flavor; retrying in "
    );
    assert!(failures[0].starts_with(&expected_prefix), "{}", failures[0]);
    assert!(failures[0].ends_with(" s"), "{}", failures[0]);
    assert_eq!(host.kexec.calls.len(), 1);
}

#[tokio::test]
async fn bad_checksum_is_refused_and_nothing_is_kexeced() {
    let boot = FakeBoot::start().await;
    boot.route(
        "GET /ipxe/{uuid}/profile",
        Reply::ok(boot.profile(b"some other kernel")),
    );
    let node = Node::for_server(&boot);
    let mut options = node.options();
    options.once = true;
    let mut host = node.host();

    let error = stages::run_stage1(&options, &TcpConnector, &mut host)
        .await
        .unwrap_err();

    assert_eq!(error.what, "downloading");
    assert_eq!(
        error.why,
        format!(
            "{}/images/vmlinuz: sha256 mismatch: expected {}, got {}",
            boot.base,
            sha256(b"some other kernel"),
            sha256(KERNEL)
        )
    );
    assert!(host.kexec.calls.is_empty());
    assert!(!node.work_dir().join("kernel").exists());
    assert!(!node.work_dir().join("kernel.part").exists());
    let lines = node.lines();
    let last = lines.last().unwrap();
    assert!(last.contains("sha256 mismatch"), "{lines:#?}");
    assert!(
        last.ends_with("; giving up after 1 attempt(s)"),
        "{lines:#?}"
    );
}

#[tokio::test]
async fn unexpanded_uuid_on_the_cmdline_is_named() {
    let node = Node::new("bearman.url=http://127.0.0.1:9 bearman.uuid=${uuid}");
    let mut options = node.options();
    options.once = true;
    let error = stages::run_stage1(&options, &TcpConnector, &mut node.host())
        .await
        .unwrap_err();
    assert!(
        error
            .why
            .contains("bearman.uuid=${uuid}: iPXE did not expand the variable"),
        "{error}"
    );
}

async fn fetch(
    boot: &FakeBoot,
    path: &str,
    sha: &str,
    dir: &Path,
) -> Result<PathBuf, DownloadError> {
    let limits = Limits {
        bytes_max: 1024,
        total: Duration::from_secs(10),
        read: Duration::from_secs(5),
    };
    let url = format!("{}{path}", boot.base);
    download::download(&TcpConnector, &url, sha, dir, "artifact", limits).await
}

#[tokio::test]
async fn downloads_verify_checksums_and_refuse_bad_answers() {
    let boot = FakeBoot::start().await;
    let dir = tempfile::tempdir().unwrap();
    let good = sha256(KERNEL);

    let path = fetch(&boot, "/images/vmlinuz", &good, dir.path())
        .await
        .unwrap();
    assert_eq!(std::fs::read(&path).unwrap(), KERNEL);

    let wrong = sha256(b"nope");
    let error = fetch(&boot, "/images/vmlinuz", &wrong, dir.path())
        .await
        .unwrap_err();
    assert!(
        error
            .to_string()
            .ends_with(&format!("sha256 mismatch: expected {wrong}, got {good}")),
        "{error}"
    );
    // The earlier good file is untouched by the failed attempt.
    assert_eq!(std::fs::read(&path).unwrap(), KERNEL);

    let error = fetch(&boot, "/images/missing", &good, dir.path())
        .await
        .unwrap_err();
    assert!(
        matches!(error, DownloadError::Status { status: 404, .. }),
        "{error}"
    );

    boot.route(
        "GET /images/short",
        Reply {
            content_length: Some(KERNEL.len() + 10),
            ..Reply::ok(KERNEL)
        },
    );
    let error = fetch(&boot, "/images/short", &good, dir.path())
        .await
        .unwrap_err();
    assert_eq!(
        error.to_string(),
        format!(
            "{}/images/short: connection closed after {} of {} bytes",
            boot.base,
            KERNEL.len(),
            KERNEL.len() + 10
        )
    );

    boot.route(
        "GET /images/moved",
        Reply {
            extra_headers: "Location: http://elsewhere/k\r\n".into(),
            ..Reply::status(302, "")
        },
    );
    let error = fetch(&boot, "/images/moved", &good, dir.path())
        .await
        .unwrap_err();
    assert!(
        error
            .to_string()
            .contains("redirect to http://elsewhere/k refused"),
        "{error}"
    );

    boot.route("GET /images/huge", Reply::ok(vec![0u8; 2048]));
    let error = fetch(&boot, "/images/huge", &good, dir.path())
        .await
        .unwrap_err();
    assert!(
        matches!(error, DownloadError::TooLarge { size: 2048, .. }),
        "{error}"
    );

    let leftovers: Vec<_> = std::fs::read_dir(dir.path())
        .unwrap()
        .map(|entry| entry.unwrap().file_name())
        .collect();
    assert_eq!(leftovers, vec!["artifact"]);
}

#[tokio::test]
async fn a_failed_progress_report_is_a_line_and_the_boot_goes_on() {
    let boot = FakeBoot::start().await;
    boot.fail("POST /ipxe/{uuid}/progress", 5, Reply::status(500, "oops"));
    let node = Node::for_server(&boot);
    let mut host = node.host();
    stages::run_stage1(&node.options(), &TcpConnector, &mut host)
        .await
        .unwrap();
    let lines = node.lines();
    let said: Vec<&String> = lines
        .iter()
        .filter(|l| l.contains("stage 1 started"))
        .collect();
    assert_eq!(said.len(), 1, "tried once per run: {lines:#?}");
    assert!(
        said[0].contains("HTTP 500") && said[0].ends_with("going on"),
        "{}",
        said[0]
    );
    assert_eq!(host.kexec.calls.len(), 1, "booted anyway");
}

#[tokio::test]
async fn stage2_reports_installed_then_heartbeats_through_failures() {
    let boot = FakeBoot::start().await;
    boot.route(
        "POST /ipxe/{uuid}/installed",
        Reply::ok(r#"{"state":"active"}"#),
    );
    boot.fail("POST /ipxe/{uuid}/installed", 1, Reply::status(503, "busy"));
    boot.route(
        "POST /ipxe/{uuid}/heartbeat",
        Reply::ok(r#"{"state":"active"}"#),
    );
    boot.fail("POST /ipxe/{uuid}/heartbeat", 1, Reply::status(500, "oops"));
    let node = Node::for_server(&boot);
    let mut options = stage2_options();
    options.beats_max = Some(3);
    let mut host = node.stage2_host(FakeHost::qemu());

    stages::run_stage2(&options, &TcpConnector, &mut host)
        .await
        .unwrap();

    let requests = boot.requests();
    let installed = format!("POST /ipxe/{UUID}/installed");
    let heartbeat = format!("POST /ipxe/{UUID}/heartbeat");
    assert_eq!(
        requests,
        vec![
            format!("GET /ipxe/{UUID}/detail"),
            installed.clone(),
            installed,
            heartbeat.clone(),
            heartbeat.clone(),
            heartbeat
        ]
    );
    // The detail only names the hostname; the fake host had another one.
    assert_eq!(
        host.network.applied,
        vec![NetAction::SetHostname("hv-001".into())]
    );
    let lines = node.lines();
    assert_eq!(lines[0], "bearman-agent: network: applied hostname hv-001");
    assert!(
        lines[1].contains("reporting installed:") && lines[1].contains("HTTP 503"),
        "{lines:#?}"
    );
    assert_eq!(
        lines[2],
        "bearman-agent: reported installed; bearman says active"
    );
    assert!(lines[3].contains("heartbeat:") && lines[3].contains("trying again next period"));
}

#[test]
fn binary_explains_itself_and_stops_once() {
    let binary = env!("CARGO_BIN_EXE_bearman-agent");
    let help = std::process::Command::new(binary)
        .arg("--help")
        .output()
        .unwrap();
    assert!(help.status.success());
    let text = String::from_utf8_lossy(&help.stdout);
    assert!(text.contains("stage1") && text.contains("stage2"), "{text}");
    // The long help names every kernel command-line key the agent reads.
    for key in [
        "bearman.url=",
        "bearman.uuid=",
        "bearman.lldp_wait_s=",
        "bearman.bmc_channel=",
    ] {
        assert!(text.contains(key), "{key} missing from --help: {text}");
    }

    let node = Node::new("quiet");
    let run = std::process::Command::new(binary)
        .args(["stage1", "--once", "--no-dhcp", "--cmdline"])
        .arg(node.dir.path().join("cmdline"))
        .arg("--root")
        .arg(node.dir.path().join("root"))
        .arg("--work-dir")
        .arg(node.work_dir())
        .output()
        .unwrap();
    assert_eq!(run.status.code(), Some(1));
    let stderr = String::from_utf8_lossy(&run.stderr);
    assert!(
        stderr.contains("kernel command line has no bearman.url= (iPXE must append it); giving up"),
        "{stderr}"
    );

    let usage = std::process::Command::new(binary)
        .arg("stage3")
        .output()
        .unwrap();
    assert_eq!(usage.status.code(), Some(2));
}

/// A host whose network is a value: `state` is what stage 2 reads, `applied` what it did,
/// and actions whose text contains `fail_on` fail (and change nothing).
struct FakeHost {
    state: HostState,
    applied: Vec<NetAction>,
    fail_on: Option<String>,
}

impl FakeHost {
    /// A QEMU guest after DHCP: eth0 with a user-networking lease and a default route.
    fn qemu() -> FakeHost {
        FakeHost {
            state: HostState {
                hostname: "localhost".into(),
                interfaces: vec![
                    Interface {
                        name: "eth0".into(),
                        mtu: 1500,
                        physical: true,
                        addresses: vec!["10.0.2.15/24".into()],
                    },
                    Interface {
                        name: "lo".into(),
                        mtu: 65536,
                        physical: false,
                        addresses: vec!["127.0.0.1/8".into()],
                    },
                ],
                has_default_route: true,
                subnet_routes: vec![],
                resolv_conf: ResolvConf::File("nameserver 10.0.2.3\n".into()),
            },
            applied: Vec::new(),
            fail_on: None,
        }
    }
}

impl HostNetwork for FakeHost {
    async fn state(&self) -> Result<HostState, String> {
        Ok(self.state.clone())
    }

    async fn apply(&mut self, action: &NetAction) -> Result<(), String> {
        if let Some(needle) = &self.fail_on {
            if action.to_string().contains(needle.as_str()) {
                return Err("RTNETLINK answers: Operation not permitted".into());
            }
        }
        self.applied.push(action.clone());
        Ok(())
    }
}

fn stage2_options() -> Stage2Options {
    Stage2Options {
        heartbeat_period: Duration::from_millis(2),
        backoff_start: Duration::from_millis(1),
        backoff_cap: Duration::from_millis(1),
        beats_max: Some(1),
        ..Stage2Options::default()
    }
}

#[tokio::test]
async fn stage2_adds_the_pool_address_beside_the_lease_and_reports_installed_despite_a_failure() {
    let boot = FakeBoot::start().await;
    boot.route(
        "GET /ipxe/{uuid}/detail",
        Reply::ok(
            serde_json::json!({
                "hostname": "hv-001", "vlan": null, "bond0_addresses": ["10.1.0.21/24"],
                "bond0_slaves": [], "gateway": "10.1.0.1", "dns": ["10.1.0.53"], "mtu": 9000
            })
            .to_string(),
        ),
    );
    boot.route(
        "POST /ipxe/{uuid}/installed",
        Reply::ok(r#"{"state":"active"}"#),
    );
    boot.route(
        "POST /ipxe/{uuid}/heartbeat",
        Reply::ok(r#"{"state":"active"}"#),
    );
    let node = Node::for_server(&boot);
    let mut network = FakeHost::qemu();
    network.fail_on = Some("mtu".into());
    let mut host = node.stage2_host(network);

    stages::run_stage2(&stage2_options(), &TcpConnector, &mut host)
        .await
        .unwrap();

    // Only additions; the lease's address and default route are never touched, so no
    // route is added either.
    assert_eq!(
        host.network.applied,
        vec![
            NetAction::SetHostname("hv-001".into()),
            NetAction::WriteResolvConf {
                contents: "# written by bearman-agent stage 2 from Bearman's network detail\n\
                           nameserver 10.1.0.53\n"
                    .into()
            },
            NetAction::AddAddress {
                dev: "eth0".into(),
                cidr: "10.1.0.21/24".into()
            },
        ]
    );
    let lines = node.lines();
    assert_eq!(
        lines[..6],
        [
            "bearman-agent: network: a default route exists; gateway 10.1.0.1 not added",
            "bearman-agent: network: applied hostname hv-001",
            "bearman-agent: network: applied /etc/resolv.conf nameservers 10.1.0.53",
            "bearman-agent: network: mtu 9000 on eth0 failed: RTNETLINK answers: Operation not permitted; going on",
            "bearman-agent: network: applied address 10.1.0.21/24 on eth0",
            "bearman-agent: reported installed; bearman says active",
        ],
        "{lines:#?}"
    );
    assert_eq!(
        boot.requests(),
        vec![
            format!("GET /ipxe/{UUID}/detail"),
            format!("POST /ipxe/{UUID}/installed"),
            format!("POST /ipxe/{UUID}/heartbeat"),
        ]
    );
}

#[tokio::test]
async fn stage2_without_a_detail_still_reports_installed() {
    let boot = FakeBoot::start().await;
    boot.route(
        "GET /ipxe/{uuid}/detail",
        Reply::status(
            404,
            r#"{"error":"not_found","message":"node has no detail"}"#,
        ),
    );
    boot.route(
        "POST /ipxe/{uuid}/installed",
        Reply::ok(r#"{"state":"active"}"#),
    );
    boot.route(
        "POST /ipxe/{uuid}/heartbeat",
        Reply::ok(r#"{"state":"active"}"#),
    );
    let node = Node::for_server(&boot);
    let mut host = node.stage2_host(FakeHost::qemu());

    stages::run_stage2(&stage2_options(), &TcpConnector, &mut host)
        .await
        .unwrap();

    assert!(host.network.applied.is_empty());
    let detail = format!("GET /ipxe/{UUID}/detail");
    assert_eq!(
        boot.requests(),
        vec![
            detail.clone(),
            detail.clone(),
            detail,
            format!("POST /ipxe/{UUID}/installed"),
            format!("POST /ipxe/{UUID}/heartbeat"),
        ]
    );
    let lines = node.lines();
    assert!(
        lines[2].starts_with("bearman-agent: network detail: GET /ipxe/")
            && lines[2].ends_with(
                "HTTP 404: node has no detail; not applied after 3 attempt(s), going on"
            ),
        "{lines:#?}"
    );
    assert_eq!(
        lines[3],
        "bearman-agent: reported installed; bearman says active"
    );
}

const BMC_SETTINGS: &str =
    r#"{"address": "10.2.0.17", "prefix_len": 24, "gateway": "10.2.0.1", "vlan": 300}"#;

#[tokio::test]
async fn stage1_registers_the_bmc_mac_and_sets_bearmans_address_on_the_chosen_channel() {
    let boot = FakeBoot::start().await;
    boot.route(
        "POST /ipxe/{uuid}/register",
        Reply::ok(boot.registration_with_bmc(serde_json::from_str(BMC_SETTINGS).unwrap())),
    );
    let node = Node::new(&format!(
        "bearman.url={} bearman.uuid={UUID} bearman.bmc_channel=2 bearman.lldp_wait_s=500",
        boot.base
    ))
    .with_bmc_device();
    let mut host = node.host();

    stages::run_stage1(&node.options(), &TcpConnector, &mut host)
        .await
        .unwrap();

    assert_eq!(
        node.ipmitool.calls(),
        vec![
            "lan print 2",
            "mc info",
            "lan set 2 ipsrc static",
            "lan set 2 ipaddr 10.2.0.17",
            "lan set 2 netmask 255.255.255.0",
            "lan set 2 defgw ipaddr 10.2.0.1",
            "lan set 2 vlan id 300",
        ]
    );
    assert_eq!(
        boot.body("POST /ipxe/{uuid}/register")["bmc"],
        serde_json::json!({"mac": "0c:c4:7a:12:34:56", "address": null})
    );
    let lines = node.lines();
    for expected in [
        "bearman-agent: warning: bearman.lldp_wait_s=500 is above the 120 s limit; waiting 120 s",
        "bearman-agent: BMC on channel 2: mac 0c:c4:7a:12:34:56, address none",
        "bearman-agent: BMC configured on channel 2: 10.2.0.17/24, gateway 10.2.0.1, vlan 300",
    ] {
        assert!(lines.contains(&expected.to_string()), "{lines:#?}");
    }
    assert_eq!(host.kexec.calls.len(), 1);
}

#[tokio::test]
async fn a_bmc_that_refuses_a_setting_is_reported_and_the_boot_goes_on() {
    let boot = FakeBoot::start().await;
    boot.route(
        "POST /ipxe/{uuid}/register",
        Reply::ok(boot.registration_with_bmc(serde_json::from_str(BMC_SETTINGS).unwrap())),
    );
    let mut node = Node::for_server(&boot).with_bmc_device();
    node.ipmitool.fail_on = Some("ipaddr".into());
    let mut host = node.host();

    stages::run_stage1(&node.options(), &TcpConnector, &mut host)
        .await
        .unwrap();

    // Stops at the failed command: no netmask, gateway or VLAN on a BMC without its address.
    assert_eq!(
        node.ipmitool.calls(),
        vec![
            "lan print 1",
            "mc info",
            "lan set 1 ipsrc static",
            "lan set 1 ipaddr 10.2.0.17"
        ]
    );
    let lines = node.lines();
    assert!(
        lines.contains(
            &"bearman-agent: BMC configuration failed: ipmitool lan set 1 ipaddr 10.2.0.17: exit status: 1: Invalid data field in request; 3 later command(s) not run; booting on"
                .to_string()
        ),
        "{lines:#?}"
    );
    assert_eq!(host.kexec.calls.len(), 1);
}

#[tokio::test]
async fn a_bmc_without_settings_from_bearman_is_left_alone() {
    let boot = FakeBoot::start().await;
    let node = Node::for_server(&boot).with_bmc_device();
    let mut host = node.host();

    stages::run_stage1(&node.options(), &TcpConnector, &mut host)
        .await
        .unwrap();

    assert_eq!(node.ipmitool.calls(), vec!["lan print 1", "mc info"]);
    let lines = node.lines();
    assert!(
        lines.contains(
            &"bearman-agent: bearman sent no BMC settings (no bmc pool, or no BMC MAC was registered); BMC left as it is"
                .to_string()
        ),
        "{lines:#?}"
    );
    assert_eq!(host.kexec.calls.len(), 1);
}

#[tokio::test]
async fn a_bmc_device_without_ipmitool_is_named_and_skipped() {
    let boot = FakeBoot::start().await;
    let mut node = Node::for_server(&boot).with_bmc_device();
    node.ipmitool.available = false;
    let mut host = node.host();

    stages::run_stage1(&node.options(), &TcpConnector, &mut host)
        .await
        .unwrap();

    assert!(node.ipmitool.calls().is_empty());
    assert!(
        node.lines().contains(
            &"bearman-agent: BMC device /dev/ipmi0 found but ipmitool is not on PATH; skipping BMC configuration"
                .to_string()
        ),
        "{:#?}",
        node.lines()
    );
    assert_eq!(
        boot.body("POST /ipxe/{uuid}/register")["bmc"],
        serde_json::Value::Null
    );
}

#[tokio::test]
async fn an_lldp_socket_error_is_a_line_and_registration_goes_on() {
    let boot = FakeBoot::start().await;
    let node = Node::new(&format!(
        "bearman.url={} bearman.uuid={UUID} bearman.lldp_wait_s=1",
        boot.base
    ));
    // A NIC in the facts tree that the kernel does not have: its socket cannot be bound.
    let nic = node.dir.path().join("root/sys/class/net/bmnosuch0");
    std::fs::create_dir_all(nic.join("device")).unwrap();
    std::fs::write(nic.join("address"), "52:54:00:12:34:56\n").unwrap();
    let mut host = node.host();

    stages::run_stage1(&node.options(), &TcpConnector, &mut host)
        .await
        .unwrap();

    let lines = node.lines();
    for expected in [
        "bearman-agent: lldp: listening on bmnosuch0 for up to 1 s",
        "bearman-agent: lldp: no such interface bmnosuch0; registering bmnosuch0 without its neighbour",
    ] {
        assert!(lines.contains(&expected.to_string()), "{lines:#?}");
    }
    let register = boot.body("POST /ipxe/{uuid}/register");
    assert_eq!(register["nics"][0]["name"], "bmnosuch0");
    assert_eq!(register["nics"][0]["lldp"], serde_json::Value::Null);
    assert_eq!(host.kexec.calls.len(), 1);
}

// Firmware updates (issue 17): the daemon orders a bundle at registration; stage 1
// downloads and verifies it, runs the updater (a shell script here), reports, and does
// what the answer says.

const BUNDLE: &[u8] = b"pretend this is a BIOS image";
const BUNDLE_NAME: &str = "x11-bios-2.1";
const BUNDLE_FILE: &str = "firmware-X11_2.1.bin";

/// A firmware updater written to a temporary directory: it records its arguments, copies
/// the bundle it was given, counts its runs, prints to both streams, and exits with
/// `exit_code` (or runs `body` instead, when given).
struct Updater {
    dir: tempfile::TempDir,
}

impl Updater {
    fn exiting(exit_code: i32) -> Updater {
        Updater::with_body(&format!(
            "echo erasing\necho 'verify failed at block 7' >&2\nexit {exit_code}\n"
        ))
    }

    fn with_body(body: &str) -> Updater {
        let dir = tempfile::tempdir().unwrap();
        let out = dir.path().display();
        let script = format!(
            "printf '%s\\n' \"$@\" > {out}/argv\ncat \"$1\" > {out}/flashed\necho run >> {out}/runs\n{body}"
        );
        std::fs::write(dir.path().join("flash.sh"), script).unwrap();
        Updater { dir }
    }

    /// The order's command: the bundle twice, once inside a longer argument.
    fn command(&self) -> Vec<String> {
        vec![
            "/bin/sh".into(),
            self.dir.path().join("flash.sh").display().to_string(),
            "{file}".into(),
            "--log={file}.log".into(),
        ]
    }

    fn argv(&self) -> Vec<String> {
        std::fs::read_to_string(self.dir.path().join("argv"))
            .unwrap()
            .lines()
            .map(str::to_string)
            .collect()
    }

    fn flashed(&self) -> Vec<u8> {
        std::fs::read(self.dir.path().join("flashed")).unwrap()
    }

    fn runs(&self) -> usize {
        std::fs::read_to_string(self.dir.path().join("runs"))
            .map(|text| text.lines().count())
            .unwrap_or(0)
    }
}

impl FakeBoot {
    /// A bundle served at /images/fw/X11_2.1.bin, ordered at registration with `command`,
    /// and `answer` to its report.
    fn order_firmware(
        &self,
        command: Vec<String>,
        change: impl FnOnce(&mut serde_json::Value),
        answer: &str,
    ) {
        let mut order = serde_json::json!({
            "bundle": BUNDLE_NAME, "component": "bios", "from_version": "2.0", "to_version": "2.1",
            "artifact": {"url": format!("{}/images/fw/X11_2.1.bin", self.base), "sha256": sha256(BUNDLE)},
            "size_bytes": BUNDLE.len(), "command": command, "timeout_s": 30,
            "success_exit_codes": [0], "restart": "reboot"
        });
        change(&mut order);
        self.route(
            "POST /ipxe/{uuid}/register",
            Reply::ok(self.registration_with(serde_json::json!({ "firmware_update": order }))),
        );
        self.route("GET /images/fw/X11_2.1.bin", Reply::ok(BUNDLE));
        self.route("POST /ipxe/{uuid}/firmware", Reply::ok(next(answer)));
    }

    /// The last firmware report, as the daemon would decode it.
    fn firmware_report(&self) -> FirmwareReport {
        serde_json::from_value(self.body("POST /ipxe/{uuid}/firmware")).unwrap()
    }
}

fn next(answer: &str) -> String {
    serde_json::json!({ "next": answer }).to_string()
}

/// Asserts the requests the server saw, by short name.
fn assert_requests(boot: &FakeBoot, names: &[&str]) {
    let expected: Vec<String> = names
        .iter()
        .map(|name| match *name {
            "progress" | "register" | "firmware" => format!("POST /ipxe/{UUID}/{name}"),
            "bundle" => "GET /images/fw/X11_2.1.bin".to_string(),
            other => panic!("no request called {other}"),
        })
        .collect();
    assert_eq!(boot.requests(), expected);
}

fn has_line(node: &Node, line: &str) -> bool {
    node.lines().iter().any(|said| said == line)
}

/// Files left in the work directory (none, when it was never created).
fn work_files(node: &Node) -> Vec<String> {
    let mut names: Vec<String> = std::fs::read_dir(node.work_dir())
        .into_iter()
        .flatten()
        .map(|entry| entry.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    names.sort();
    names
}

#[tokio::test]
async fn an_ordered_update_is_downloaded_verified_run_reported_and_the_machine_restarts() {
    let boot = FakeBoot::start().await;
    let updater = Updater::exiting(0);
    boot.order_firmware(updater.command(), |_| {}, "reboot");
    let node = Node::for_server(&boot);
    let mut host = node.host();

    let error = stages::run_stage1(&node.options(), &TcpConnector, &mut host)
        .await
        .unwrap_err();

    assert_eq!(error.what, "firmware");
    assert_eq!(
        error.why,
        "restarted to bring bundle x11-bios-2.1 into use; stage 1 ends here"
    );
    assert_eq!(host.kexec.restarts, 1);
    assert!(host.kexec.calls.is_empty());
    // No script, profile or detail: nothing boots before the firmware is right.
    assert_requests(&boot, &["progress", "register", "bundle", "firmware"]);
    // The updater got the verified bundle, `{file}` replaced everywhere.
    let file = node.work_dir().join(BUNDLE_FILE).display().to_string();
    assert_eq!(
        updater.argv(),
        vec![file.clone(), format!("--log={file}.log")]
    );
    assert_eq!(updater.flashed(), BUNDLE);
    assert_eq!(updater.runs(), 1);
    let report = boot.firmware_report();
    assert_eq!(
        (report.bundle.as_str(), report.outcome, report.exit_code),
        (BUNDLE_NAME, FirmwareOutcome::Applied, Some(0))
    );
    assert!(report.detail.contains("erasing"), "{report:?}");
    assert!(
        report.detail.contains("verify failed at block 7"),
        "{report:?}"
    );
    // The bundle is gone again: the work directory is RAM.
    assert!(work_files(&node).is_empty(), "{:?}", work_files(&node));
    for line in [
        "bearman-agent: firmware: updating bios 2.0 -> 2.1 with bundle x11-bios-2.1",
        "bearman-agent: firmware updater: erasing",
        "bearman-agent: firmware updater: verify failed at block 7",
        "bearman-agent: firmware: bundle x11-bios-2.1 applied (exit code 0)",
        "bearman-agent: firmware: bearman says reboot to bring bundle x11-bios-2.1 into use; rebooting",
    ] {
        assert!(has_line(&node, line), "{line}: {:#?}", node.lines());
    }
    // The update line says what happens to the BIOS; no warning repeats it.
    assert!(
        !node
            .lines()
            .iter()
            .any(|line| line.contains("warning: bios")),
        "{:#?}",
        node.lines()
    );
}

#[tokio::test]
async fn an_updater_exit_code_outside_the_success_list_is_reported_failed_and_nothing_restarts() {
    let boot = FakeBoot::start().await;
    let updater = Updater::exiting(3);
    boot.order_firmware(updater.command(), |_| {}, "register_again");
    let node = Node::for_server(&boot);
    let mut options = node.options();
    options.once = true;
    let mut host = node.host();

    let error = stages::run_stage1(&options, &TcpConnector, &mut host)
        .await
        .unwrap_err();

    assert_eq!(
        error.to_string(),
        "firmware: bearman says register again after bundle x11-bios-2.1 (failed)"
    );
    let report = boot.firmware_report();
    assert_eq!(
        (report.outcome, report.exit_code),
        (FirmwareOutcome::Failed, Some(3))
    );
    assert!(
        report
            .detail
            .starts_with("updater exited with code 3, not a success code [0]\n"),
        "{report:?}"
    );
    for output in ["erasing", "verify failed at block 7"] {
        assert!(report.detail.contains(output), "{report:?}");
    }
    assert_eq!(host.kexec.restarts, 0);
    assert!(host.kexec.calls.is_empty());
    assert!(has_line(
        &node,
        "bearman-agent: firmware: bundle x11-bios-2.1 failed: updater exited with code 3, not a success code [0]"
    ));
}

#[tokio::test]
async fn a_bundle_that_fails_verification_is_reported_failed_and_the_updater_never_runs() {
    let boot = FakeBoot::start().await;
    let updater = Updater::exiting(0);
    boot.order_firmware(updater.command(), |_| {}, "register_again");
    boot.route("GET /images/fw/X11_2.1.bin", Reply::ok(&b"tampered"[..]));
    let node = Node::for_server(&boot);
    let mut options = node.options();
    options.once = true;
    let mut host = node.host();

    stages::run_stage1(&options, &TcpConnector, &mut host)
        .await
        .unwrap_err();

    assert_eq!(updater.runs(), 0);
    let report = boot.firmware_report();
    assert_eq!(
        (report.outcome, report.exit_code),
        (FirmwareOutcome::Failed, None)
    );
    assert_eq!(
        report.detail,
        format!(
            "bundle download failed: {}/images/fw/X11_2.1.bin: sha256 mismatch: expected {}, got {}",
            boot.base,
            sha256(BUNDLE),
            sha256(b"tampered")
        )
    );
    assert!(work_files(&node).is_empty(), "{:?}", work_files(&node));
    assert_eq!(host.kexec.restarts, 0);
}

#[tokio::test]
async fn an_order_larger_than_the_agents_download_limit_is_refused_and_reported() {
    let boot = FakeBoot::start().await;
    let updater = Updater::exiting(0);
    boot.order_firmware(updater.command(), |_| {}, "register_again");
    let node = Node::for_server(&boot);
    let mut options = node.options();
    options.once = true;
    options.limits.bytes_max = 10;
    let mut host = node.host();

    stages::run_stage1(&options, &TcpConnector, &mut host)
        .await
        .unwrap_err();

    assert_requests(&boot, &["progress", "register", "firmware"]);
    assert_eq!(updater.runs(), 0);
    assert_eq!(
        boot.firmware_report().detail,
        format!(
            "order refused: the bundle is {} bytes, more than this agent's 10-byte download limit",
            BUNDLE.len()
        )
    );
}

#[tokio::test]
async fn a_firmware_hold_is_a_console_line_and_stage_1_registers_again_without_downloading() {
    let boot = FakeBoot::start().await;
    boot.route(
        "POST /ipxe/{uuid}/register",
        Reply::ok(boot.registration_with(
            serde_json::json!({ "firmware_hold": "rollout x11-bios-2.1 is paused" }),
        )),
    );
    let node = Node::for_server(&boot);
    let mut options = node.options();
    options.attempts_max = Some(2);
    let mut host = node.host();

    let error = stages::run_stage1(&options, &TcpConnector, &mut host)
        .await
        .unwrap_err();

    assert_eq!(
        error.to_string(),
        "firmware: waiting: rollout x11-bios-2.1 is paused"
    );
    assert_requests(&boot, &["progress", "register", "register"]);
    assert!(work_files(&node).is_empty());
    let lines = node.lines();
    assert!(
        lines.iter().any(|line| line.starts_with(
            "bearman-agent: firmware: waiting: rollout x11-bios-2.1 is paused; retrying in "
        )),
        "{lines:#?}"
    );
    assert!(
        has_line(
            &node,
            "bearman-agent: warning: bios firmware 2.0, expected 2.1 (its update waits; see below)"
        ),
        "{lines:#?}"
    );
    assert_eq!(host.kexec.restarts, 0);
    assert!(host.kexec.calls.is_empty());
}

#[tokio::test]
async fn an_updater_past_its_time_limit_is_killed_with_what_it_started_and_reported_failed() {
    let boot = FakeBoot::start().await;
    let updater = Updater::with_body("echo started\nsleep 600 &\necho $! > \"$0.helper\"\nwait\n");
    let helper_pid_file = updater.dir.path().join("flash.sh.helper");
    boot.order_firmware(
        updater.command(),
        |order| order["timeout_s"] = 1.into(),
        "register_again",
    );
    let node = Node::for_server(&boot);
    let mut options = node.options();
    options.once = true;
    let mut host = node.host();

    stages::run_stage1(&options, &TcpConnector, &mut host)
        .await
        .unwrap_err();

    let report = boot.firmware_report();
    assert_eq!(
        (report.outcome, report.exit_code),
        (FirmwareOutcome::Failed, None)
    );
    assert_eq!(
        report.detail,
        "updater timed out after 1 s and was killed\nstarted"
    );
    // The script's background helper was in the updater's process group: killed too.
    let helper: u32 = std::fs::read_to_string(&helper_pid_file)
        .unwrap()
        .trim()
        .parse()
        .unwrap();
    assert!(
        gone_or_zombie(helper).await,
        "helper {helper} still running"
    );
    assert_eq!(host.kexec.restarts, 0);
}

/// Waits (bounded) for a killed process to disappear or become a zombie no one reaps.
async fn gone_or_zombie(pid: u32) -> bool {
    for _ in 0..500 {
        match std::fs::read_to_string(format!("/proc/{pid}/stat")) {
            Err(_) => return true,
            Ok(stat)
                if stat
                    .rsplit(')')
                    .next()
                    .is_some_and(|rest| rest.trim_start().starts_with('Z')) =>
            {
                return true
            }
            Ok(_) => tokio::time::sleep(Duration::from_millis(10)).await,
        }
    }
    false
}

#[tokio::test]
async fn an_undelivered_firmware_report_is_retried_and_never_re_earned_by_flashing_twice() {
    let boot = FakeBoot::start().await;
    let updater = Updater::exiting(0);
    boot.order_firmware(updater.command(), |_| {}, "reboot");
    // Every try of the first attempt fails, and the first of the second.
    let failures = REPORT_ATTEMPTS_MAX + 1;
    boot.fail(
        "POST /ipxe/{uuid}/firmware",
        failures,
        Reply::status(503, "busy"),
    );
    let node = Node::for_server(&boot);
    let mut host = node.host();

    stages::run_stage1(&node.options(), &TcpConnector, &mut host)
        .await
        .unwrap_err();

    assert_eq!(updater.runs(), 1);
    // Retried in place first: registering again before reporting would tell the daemon
    // the update failed. Once the attempt gave up, the same order gets the same report.
    let mut expected = vec!["progress", "register", "bundle"];
    expected.extend(std::iter::repeat_n(
        "firmware",
        REPORT_ATTEMPTS_MAX as usize,
    ));
    expected.extend(["register", "firmware", "firmware"]);
    assert_requests(&boot, &expected);
    assert_eq!(boot.firmware_report().outcome, FirmwareOutcome::Applied);
    let lines = node.lines();
    assert!(
        lines.iter().any(|line| line.starts_with(&format!(
            "bearman-agent: reporting firmware bundle x11-bios-2.1: POST /ipxe/{UUID}/firmware: HTTP 503: busy (after {REPORT_ATTEMPTS_MAX} tries); retrying in "
        ))),
        "{lines:#?}"
    );
    assert!(has_line(
        &node,
        "bearman-agent: firmware: bundle x11-bios-2.1 already ran in this boot; sending its report again"
    ));
    assert_eq!(host.kexec.restarts, 1);
}

#[tokio::test]
async fn an_order_repeated_after_register_again_runs_the_updater_again() {
    let boot = FakeBoot::start().await;
    let updater = Updater::exiting(0);
    boot.order_firmware(updater.command(), |_| {}, "reboot");
    boot.fail(
        "POST /ipxe/{uuid}/firmware",
        1,
        Reply::ok(next("register_again")),
    );
    let node = Node::for_server(&boot);
    let mut host = node.host();

    stages::run_stage1(&node.options(), &TcpConnector, &mut host)
        .await
        .unwrap_err();

    assert_eq!(updater.runs(), 2);
    assert_requests(
        &boot,
        &[
            "progress", "register", "bundle", "firmware", "register", "bundle", "firmware",
        ],
    );
    assert_eq!(host.kexec.restarts, 1);
}

#[tokio::test]
async fn awaiting_a_power_cycle_waits_then_registers_again() {
    let boot = FakeBoot::start().await;
    let updater = Updater::exiting(0);
    boot.order_firmware(
        updater.command(),
        |order| order["restart"] = "power_cycle".into(),
        "await_power_cycle",
    );
    let node = Node::for_server(&boot);
    let mut options = node.options();
    options.once = true;
    options.power_cycle_wait = Duration::from_millis(5);
    let mut host = node.host();

    let error = stages::run_stage1(&options, &TcpConnector, &mut host)
        .await
        .unwrap_err();

    assert_eq!(
        error.to_string(),
        "firmware: no power cycle within 0 s of bundle x11-bios-2.1; registering again"
    );
    assert!(has_line(
        &node,
        "bearman-agent: firmware: bearman power-cycles this machine through its BMC; waiting up to 0 s"
    ));
    assert_eq!(host.kexec.restarts, 0);
}

#[tokio::test]
async fn the_bmc_firmware_revision_from_mc_info_is_registered() {
    let boot = FakeBoot::start().await;
    let node = Node::for_server(&boot).with_bmc_device();
    let mut host = node.host();

    stages::run_stage1(&node.options(), &TcpConnector, &mut host)
        .await
        .unwrap();

    assert_eq!(
        boot.body("POST /ipxe/{uuid}/register")["firmware"],
        serde_json::json!({"bios": "2.0", "bmc": "1.73", "nics": {}})
    );
    assert!(has_line(&node, "bearman-agent: BMC firmware revision 1.73"));
}

#[tokio::test]
async fn a_bmc_that_cannot_tell_its_firmware_revision_registers_without_it_and_boots() {
    let boot = FakeBoot::start().await;
    let mut node = Node::for_server(&boot).with_bmc_device();
    node.ipmitool.fail_on = Some("mc info".into());
    let mut host = node.host();

    stages::run_stage1(&node.options(), &TcpConnector, &mut host)
        .await
        .unwrap();

    assert_eq!(
        boot.body("POST /ipxe/{uuid}/register")["firmware"]["bmc"],
        serde_json::Value::Null
    );
    assert!(
        has_line(
            &node,
            "bearman-agent: reading the BMC firmware revision: ipmitool mc info: exit status: 1: Invalid data field in request; registering without it"
        ),
        "{:#?}",
        node.lines()
    );
    assert_eq!(host.kexec.calls.len(), 1);
}
