//! Stage 1 and stage 2 against a fake boot server on 127.0.0.1:0: registration, boot plan,
//! verified downloads, and the kexec plan stage 1 would execute (kexec itself is injected).

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bearman_agent::net::TcpConnector;
use bearman_agent::stage1::download::{self, DownloadError, Limits};
use bearman_agent::stage1::kexec::{Kexec, KexecError, KexecFiles};
use bearman_agent::stage1::{self, Options, Stage2Options};
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

    fn registration(&self) -> String {
        serde_json::json!({
            "uuid": UUID, "hostname": "hv-001", "state": "registered", "bmc": null,
            "firmware_expected": {"bios": "2.1", "bmc": null, "nics": {}}
        })
        .to_string()
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

/// Records what it would have kexec'd, with the files' contents read at that moment.
#[derive(Default)]
struct RecordingKexec {
    calls: Vec<(KexecFiles, Vec<u8>, Vec<Vec<u8>>)>,
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
}

struct Node {
    dir: tempfile::TempDir,
    lines: Arc<Mutex<Vec<String>>>,
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
        }
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
        let mut options = Options::new(
            self.dir.path().join("cmdline"),
            self.dir.path().join("root"),
            self.work_dir(),
        );
        options.backoff_start = Duration::from_millis(1);
        options.backoff_cap = Duration::from_millis(4);
        options.attempts_max = Some(5);
        let lines = self.lines.clone();
        options.console = Arc::new(move |line: &str| lines.lock().unwrap().push(line.to_string()));
        options
    }

    fn lines(&self) -> Vec<String> {
        self.lines.lock().unwrap().clone()
    }
}

#[tokio::test]
async fn stage1_registers_verifies_downloads_and_stops_at_kexec() {
    let boot = FakeBoot::start().await;
    let node = Node::for_server(&boot);
    let mut kexec = RecordingKexec::default();

    let files = stage1::run_stage1(&node.options(), &TcpConnector, &mut kexec)
        .await
        .unwrap();

    let uuid_path = format!("/ipxe/{UUID}");
    assert_eq!(
        boot.requests(),
        vec![
            format!("POST {uuid_path}/register"),
            format!("GET {uuid_path}"),
            format!("GET {uuid_path}/profile"),
            format!("GET {uuid_path}/detail"),
            "GET /images/vmlinuz".to_string(),
            "GET /images/initrd.img".to_string(),
        ]
    );
    assert_eq!(kexec.calls.len(), 1);
    let (planned, kernel, initrds) = &kexec.calls[0];
    assert_eq!(planned, &files);
    assert_eq!(planned.cmdline, CMDLINE);
    assert_eq!(planned.kernel, node.work_dir().join("kernel"));
    assert_eq!(kernel, KERNEL);
    assert_eq!(initrds, &vec![INITRD.to_vec()]);
    let lines = node.lines();
    assert!(
        lines.contains(&"bearman-agent: warning: bios firmware 2.0, expected 2.1 (firmware updates are not automated yet)".to_string()),
        "{lines:#?}"
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
    let mut kexec = RecordingKexec::default();

    stage1::run_stage1(&node.options(), &TcpConnector, &mut kexec)
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
    assert_eq!(kexec.calls.len(), 1);
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
    let mut kexec = RecordingKexec::default();

    let error = stage1::run_stage1(&options, &TcpConnector, &mut kexec)
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
    assert!(kexec.calls.is_empty());
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
    let error = stage1::run_stage1(&options, &TcpConnector, &mut RecordingKexec::default())
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
    let mut options = Stage2Options::new(
        node.dir.path().join("cmdline"),
        node.dir.path().join("root"),
    );
    options.heartbeat_period = Duration::from_millis(2);
    options.backoff_start = Duration::from_millis(1);
    options.backoff_cap = Duration::from_millis(1);
    options.beats_max = Some(3);
    let lines = node.lines.clone();
    options.console = Arc::new(move |line: &str| lines.lock().unwrap().push(line.to_string()));

    stage1::run_stage2(&options, &TcpConnector).await.unwrap();

    let requests = boot.requests();
    let installed = format!("POST /ipxe/{UUID}/installed");
    let heartbeat = format!("POST /ipxe/{UUID}/heartbeat");
    assert_eq!(
        requests,
        vec![
            installed.clone(),
            installed,
            heartbeat.clone(),
            heartbeat.clone(),
            heartbeat
        ]
    );
    let lines = node.lines();
    assert!(
        lines[0].contains("reporting installed:") && lines[0].contains("HTTP 503"),
        "{lines:#?}"
    );
    assert_eq!(
        lines[1],
        "bearman-agent: reported installed; bearman says active"
    );
    assert!(lines[2].contains("heartbeat:") && lines[2].contains("trying again next period"));
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
