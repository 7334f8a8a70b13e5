//! The `bearman` binary end to end: bootstrapping a token straight into the database,
//! `bearman serve` on a real socket, the client commands against it, and the start-up
//! errors an operator sees for bad flags.

use std::fs::File;
use std::net::{SocketAddr, TcpListener};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::sync::mpsc;
use std::time::Duration;

use bearman_proto::http;
use serde_json::Value;

#[allow(dead_code)]
#[path = "support/sushy.rs"]
mod sushy;

const BIN: &str = env!("CARGO_BIN_EXE_bearman");
/// How long any one command, and the daemon's start-up, may take.
const BOUND: Duration = Duration::from_secs(30);
const UUID: &str = "4c4c4544-0042-3510-8052-b4c04f4e4a32";

/// `bearman` in `dir`, with no `BEARMAN_*` variables inherited from whoever runs the tests.
fn bearman(dir: &Path) -> Command {
    let mut command = Command::new(BIN);
    command.current_dir(dir).stdin(Stdio::null());
    for (key, _) in std::env::vars_os() {
        if key.to_string_lossy().starts_with("BEARMAN_") {
            command.env_remove(key);
        }
    }
    command
}

/// Runs a command that must exit by itself within [`BOUND`]; kills it (by its pid) if not.
fn run(mut command: Command) -> Output {
    command.stdout(Stdio::piped()).stderr(Stdio::piped());
    let child = command.spawn().expect("spawn bearman");
    let pid = child.id();
    let (done, finished) = mpsc::channel();
    std::thread::spawn(move || {
        let _ = done.send(child.wait_with_output());
    });
    match finished.recv_timeout(BOUND) {
        Ok(output) => output.expect("wait for bearman"),
        Err(_) => {
            // A hang seen once in CI and never reproduced: leave where every thread was.
            let stacks = thread_stacks(pid);
            let _ = Command::new("kill").args(["-9", &pid.to_string()]).status();
            let printed = finished
                .recv_timeout(Duration::from_secs(5))
                .ok()
                .and_then(Result::ok)
                .map(|o| format!("stdout:\n{}\nstderr:\n{}", stdout(&o), stderr(&o)))
                .unwrap_or_default();
            panic!("bearman (pid {pid}) did not exit within {BOUND:?}\n{printed}\n{stacks}");
        }
    }
}

/// Every thread's backtrace of process `pid`, by gdb when it is installed.
fn thread_stacks(pid: u32) -> String {
    match Command::new("gdb")
        .args([
            "-batch",
            "-p",
            &pid.to_string(),
            "-ex",
            "thread apply all bt",
        ])
        .stdin(Stdio::null())
        .output()
    {
        Ok(output) => format!("backtraces:\n{}", String::from_utf8_lossy(&output.stdout)),
        Err(error) => format!("no backtraces (gdb: {error})"),
    }
}

fn stdout(output: &Output) -> String {
    String::from_utf8_lossy(&output.stdout).into_owned()
}

fn stderr(output: &Output) -> String {
    String::from_utf8_lossy(&output.stderr).into_owned()
}

fn assert_success(what: &str, output: &Output) {
    assert!(
        output.status.success(),
        "{what} failed ({}):\nstdout: {}\nstderr: {}",
        output.status,
        stdout(output),
        stderr(output)
    );
}

/// Checks a command failed the orderly way: exit code 1 (not a panic's 101, not a
/// signal), an `error:` line naming `mentions`, and no panic message.
fn assert_refused(what: &str, output: &Output, mentions: &str) {
    let text = stderr(output);
    assert_eq!(
        output.status.code(),
        Some(1),
        "{what}: expected exit 1, got {}; stderr: {text}",
        output.status
    );
    assert!(text.contains("error"), "{what}: {text}");
    assert!(
        text.contains(mentions),
        "{what}: stderr does not mention {mentions:?}: {text}"
    );
    assert!(!text.contains("panicked"), "{what}: {text}");
}

/// A port nothing listens on right now.
fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// One HTTP request to `address`, bounded in time.
fn request(
    address: SocketAddr,
    method: &str,
    path: &str,
    body: Option<&[u8]>,
) -> Result<http::Response, String> {
    request_as(address, method, path, None, body)
}

/// [`request`] with an API token.
fn request_as(
    address: SocketAddr,
    method: &str,
    path: &str,
    token: Option<&str>,
    body: Option<&[u8]>,
) -> Result<http::Response, String> {
    let authorization = token.map(|token| format!("Bearer {token}"));
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    runtime.block_on(async {
        let exchange = async {
            let mut stream = tokio::net::TcpStream::connect(address)
                .await
                .map_err(|e| e.to_string())?;
            let mut headers = vec![("Content-Type", "application/json")];
            if let Some(authorization) = &authorization {
                headers.push(("Authorization", authorization.as_str()));
            }
            http::send(
                &mut stream,
                method,
                &address.to_string(),
                path,
                &headers,
                body,
            )
            .await
            .map_err(|e| e.to_string())
        };
        tokio::time::timeout(BOUND, exchange)
            .await
            .map_err(|_| "timed out".to_string())?
    })
}

/// Creates an admin token in `data_dir` with the CLI and returns its secret.
fn create_admin_token(dir: &Path, data_dir: &Path) -> String {
    create_admin_token_in(dir, &["--data-dir".as_ref(), data_dir.as_os_str()])
}

/// Creates an admin token in the database `store` names (`--data-dir D` or
/// `--database-url U`) with the CLI and returns its secret.
fn create_admin_token_in(dir: &Path, store: &[&std::ffi::OsStr]) -> String {
    let mut command = bearman(dir);
    command
        .args(["token", "create", "--name", "admin", "--role", "admin"])
        .args(store);
    let output = run(command);
    assert_success("token create", &output);
    let secret = stdout(&output).trim().to_string();
    assert!(
        secret.starts_with("bm_"),
        "stdout carries the secret: {secret:?}"
    );
    assert_eq!(secret.len(), 3 + 64, "{secret:?}");
    assert!(
        !secret.contains('\n'),
        "only the secret goes to stdout: {secret:?}"
    );
    assert!(
        stderr(&output).contains("shown only once"),
        "{}",
        stderr(&output)
    );
    secret
}

/// A running `bearman serve`, killed when dropped.
struct Serve {
    child: Child,
    address: SocketAddr,
    log: PathBuf,
}

impl Serve {
    fn start(dir: &Path, data_dir: &Path) -> Serve {
        Serve::start_with(
            dir,
            "serve.log",
            &["--data-dir".as_ref(), data_dir.as_os_str()],
            &[],
        )
    }

    /// `bearman serve --listen <a free port>` with `args` and `envs`, logging to
    /// `dir/log_name`.
    fn start_with(
        dir: &Path,
        log_name: &str,
        args: &[&std::ffi::OsStr],
        envs: &[(&str, &str)],
    ) -> Serve {
        let address: SocketAddr = format!("127.0.0.1:{}", free_port()).parse().unwrap();
        let log = dir.join(log_name);
        let mut command = bearman(dir);
        command
            .args(["serve", "--listen", &address.to_string()])
            .args(args)
            .envs(envs.iter().copied())
            .stdout(Stdio::null())
            .stderr(File::create(&log).unwrap());
        let child = command.spawn().expect("spawn bearman serve");
        let mut serve = Serve {
            child,
            address,
            log,
        };
        serve.wait_until_healthy();
        serve
    }

    fn log_text(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// Polls `GET /healthz` until it answers, the daemon exits, or [`BOUND`] passes.
    fn wait_until_healthy(&mut self) {
        let deadline = std::time::Instant::now() + BOUND;
        loop {
            if let Some(status) = self.child.try_wait().unwrap() {
                panic!(
                    "bearman serve exited early ({status}):\n{}",
                    self.log_text()
                );
            }
            if let Ok(response) = request(self.address, "GET", "/healthz", None) {
                assert_eq!(response.status, 200, "{}", response.text());
                // A replica of several says whether it leads.
                assert!(response.text().starts_with("ok"), "{}", response.text());
                return;
            }
            assert!(
                std::time::Instant::now() < deadline,
                "bearman serve did not answer /healthz within {BOUND:?}:\n{}",
                self.log_text()
            );
            std::thread::sleep(Duration::from_millis(25));
        }
    }

    fn url(&self) -> String {
        format!("http://{}", self.address)
    }

    /// A client command pointed at this daemon through the environment.
    fn client(&self, dir: &Path, token: Option<&str>, args: &[&str]) -> Output {
        let mut command = bearman(dir);
        command.args(args).env("BEARMAN_URL", self.url());
        if let Some(token) = token {
            command.env("BEARMAN_TOKEN", token);
        }
        run(command)
    }
}

impl Drop for Serve {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn registration_body() -> Vec<u8> {
    let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("../fixtures/hardware/r640.json");
    let mut body: Value = serde_json::from_str(&std::fs::read_to_string(path).unwrap()).unwrap();
    body["nics"][0]["mac"] = "52:54:00:00:00:01".into();
    body["nics"][1]["mac"] = "52:54:00:00:00:02".into();
    serde_json::to_vec(&body).unwrap()
}

#[test]
fn token_create_prints_a_secret_on_stdout_and_list_never_shows_it() {
    let dir = tempfile::tempdir().unwrap();
    let data_dir = dir.path().join("data");
    let secret = create_admin_token(dir.path(), &data_dir);
    assert!(
        data_dir.join("bearman.db").exists(),
        "the database lives in --data-dir"
    );

    let mut list = bearman(dir.path());
    list.args(["token", "list", "--output", "json", "--data-dir"])
        .arg(&data_dir);
    let output = run(list);
    assert_success("token list", &output);
    let tokens: Value =
        serde_json::from_str(&stdout(&output)).expect("token list --output json is JSON");
    assert_eq!(tokens.as_array().map(Vec::len), Some(1), "{tokens}");
    assert_eq!(tokens[0]["name"], "admin");
    assert_eq!(tokens[0]["role"], "admin");
    assert!(!stdout(&output).contains(&secret));

    let mut again = bearman(dir.path());
    again
        .args([
            "token",
            "create",
            "--name",
            "admin",
            "--role",
            "viewer",
            "--data-dir",
        ])
        .arg(&data_dir);
    assert_refused("duplicate token create", &run(again), "admin");
}

#[test]
fn serve_answers_boot_requests_and_client_commands() {
    let dir = tempfile::tempdir().unwrap();
    let data_dir = dir.path().join("data");
    let token = create_admin_token(dir.path(), &data_dir);
    let serve = Serve::start(dir.path(), &data_dir);

    let stage1 = request(serve.address, "GET", "/ipxe", None).unwrap();
    assert_eq!(stage1.status, 200);
    let script = stage1.text();
    assert!(script.starts_with("#!ipxe\n"), "{script}");
    assert!(
        script.contains(&format!("bearman.url={}", serve.url())),
        "public URL defaults to http://LISTEN: {script}"
    );

    let client = |args: &[&str]| serve.client(dir.path(), Some(&token), args);
    let pool = client(&[
        "pool",
        "create",
        "rack-a",
        "--purpose",
        "node",
        "--cidr",
        "10.10.0.0/24",
        "--range",
        "10.10.0.10-10.10.0.200",
        "--gateway",
        "10.10.0.1",
        "--vlan",
        "100",
    ]);
    assert_success("pool create", &pool);
    assert!(stdout(&pool).contains("rack-a"), "{}", stdout(&pool));

    let kernel_sha = "1".repeat(64);
    let initrd_sha = "2".repeat(64);
    let flavor = client(&[
        "flavor",
        "create",
        "--name",
        "hv",
        "--kernel",
        "/images/hv/vmlinuz",
        "--kernel-sha256",
        &kernel_sha,
        "--initrd",
        "/images/hv/initrd.img",
        "--initrd-sha256",
        &initrd_sha,
        "--cmdline",
        "console=ttyS0 ip={ip}",
    ]);
    assert_success("flavor create", &flavor);
    assert!(stdout(&flavor).contains("hv"), "{}", stdout(&flavor));

    let empty = client(&["node", "list", "--output", "json"]);
    assert_success("node list", &empty);
    let nodes: Value =
        serde_json::from_str(&stdout(&empty)).expect("node list --output json is JSON");
    assert_eq!(nodes, Value::Array(vec![]));

    // The production default: a machine nobody enrolled waits for acceptance, with its
    // hardware recorded and no address, and is served no boot files.
    let waiting = request(
        serve.address,
        "POST",
        &format!("/ipxe/{UUID}/register"),
        Some(&registration_body()),
    )
    .unwrap();
    assert_eq!(waiting.status, 202, "{}", waiting.text());
    let answer: Value = serde_json::from_str(&waiting.text()).unwrap();
    assert_eq!(answer["awaiting_acceptance"], true, "{answer}");
    assert_eq!(answer["state"], "discovered", "{answer}");
    assert_eq!(answer["bmc"], Value::Null, "{answer}");
    let shown = client(&["node", "show", UUID, "--output", "json"]);
    assert_success("node show", &shown);
    let record: Value = serde_json::from_str(&stdout(&shown)).unwrap();
    assert_eq!(record["network"]["bond0_addresses"], serde_json::json!([]));
    assert!(record["pending_acceptance"].is_object(), "{record}");
    let detail = request(serve.address, "GET", &format!("/ipxe/{UUID}/detail"), None).unwrap();
    assert_eq!(detail.status, 409, "{}", detail.text());
    assert!(
        detail.text().contains("awaiting_acceptance"),
        "{}",
        detail.text()
    );
    let pool_view = client(&["pool", "show", "rack-a", "--output", "json"]);
    assert_success("pool show", &pool_view);
    assert!(
        !stdout(&pool_view).contains(UUID),
        "a waiting machine holds no address: {}",
        stdout(&pool_view)
    );
    let table = client(&["node", "list"]);
    assert_success("node list", &table);
    assert!(
        stdout(&table).contains("discovered (awaiting acceptance)"),
        "{}",
        stdout(&table)
    );
    let accepted = client(&["node", "accept", UUID, "--reason", "rack a01 delivery"]);
    assert_success("node accept", &accepted);
    let twice = client(&["node", "accept", UUID]);
    assert!(!twice.status.success(), "accepting twice is refused");

    let registered = request(
        serve.address,
        "POST",
        &format!("/ipxe/{UUID}/register"),
        Some(&registration_body()),
    )
    .unwrap();
    assert_eq!(registered.status, 200, "{}", registered.text());

    let listed = client(&["node", "list", "--output", "json"]);
    assert_success("node list", &listed);
    let nodes: Value =
        serde_json::from_str(&stdout(&listed)).expect("node list --output json is JSON");
    let nodes = nodes.as_array().expect("a JSON array");
    assert_eq!(nodes.len(), 1);
    assert_eq!(nodes[0]["uuid"], UUID);
    assert_eq!(nodes[0]["state"], "registered");
    assert_eq!(
        nodes[0]["network"]["bond0_addresses"],
        serde_json::json!(["10.10.0.10/24"])
    );

    let filtered = client(&["node", "list", "--state", "ready", "--output", "json"]);
    assert_success("node list --state ready", &filtered);
    assert_eq!(
        serde_json::from_str::<Value>(&stdout(&filtered)).unwrap(),
        Value::Array(vec![])
    );

    let summary = client(&["summary"]);
    assert_success("summary", &summary);
    let table = stdout(&summary);
    assert!(table.contains("STATE"), "{table}");
    let row = |name: &str| {
        table
            .lines()
            .find(|l| l.split_whitespace().next() == Some(name))
            .map(|l| l.split_whitespace().collect::<Vec<_>>())
    };
    assert_eq!(row("registered"), Some(vec!["registered", "1"]), "{table}");
    assert_eq!(row("total"), Some(vec!["total", "1"]), "{table}");

    let summary = client(&["summary", "--output", "json"]);
    assert_success("summary --output json", &summary);
    let counts: Value = serde_json::from_str(&stdout(&summary)).unwrap();
    assert_eq!(
        counts,
        serde_json::json!({"total": 1, "by_state": {"registered": 1}})
    );

    let shown = client(&["pool", "show", "rack-a"]);
    assert_success("pool show", &shown);
    assert!(
        stdout(&shown).contains("1 of 191 addresses allocated"),
        "{}",
        stdout(&shown)
    );

    // The API's refusals reach the operator as errors naming the problem.
    let bogus = client(&["node", "list", "--state", "bogus"]);
    assert_refused("node list --state bogus", &bogus, "invalid_query");
    let duplicate = client(&[
        "pool",
        "create",
        "rack-a",
        "--purpose",
        "node",
        "--cidr",
        "10.10.0.0/24",
        "--range",
        "10.10.0.10-10.10.0.20",
    ]);
    assert_refused("duplicate pool create", &duplicate, "already_exists");
    let backwards = client(&[
        "pool",
        "create",
        "rack-b",
        "--purpose",
        "node",
        "--cidr",
        "10.11.0.0/24",
        "--range",
        "10.11.0.10",
    ]);
    assert_refused("pool create with a bad --range", &backwards, "--range");
}

/// What a hostile machine could have stored before input validation: an ANSI colour, an
/// OSC title change with BEL, a newline that fakes a table row, and 70,000 characters.
const HOSTILE_RACK_PREFIX: &str = "\u{1b}[31mrack\u{1b}[0m\nfake-row  ready";
const HOSTILE_HOSTNAME: &str = "evil\u{1b}]0;pwned\u{7}";
const HOSTILE_REASON: &str = "\u{1b}[2J\u{1b}[Hscreen cleared\r\n";
const LONG_CHARS: usize = 70_000;

/// Registers a node through the boot API, then (daemon stopped) writes hostile strings
/// straight into the stored record and one event, as a daemon without validation of
/// machine-supplied text would have; returns the daemon started again and the token.
fn serve_with_a_hostile_node(dir: &Path, data_dir: &Path) -> (Serve, String) {
    let token = create_admin_token(dir, data_dir);
    let serve = Serve::start(dir, data_dir);
    let pool = serve.client(
        dir,
        Some(&token),
        &[
            "pool",
            "create",
            "rack-a",
            "--purpose",
            "node",
            "--cidr",
            "10.10.0.0/24",
            "--range",
            "10.10.0.10-10.10.0.200",
        ],
    );
    assert_success("pool create", &pool);
    let registered = request(
        serve.address,
        "POST",
        &format!("/ipxe/{UUID}/register"),
        Some(&registration_body()),
    )
    .unwrap();
    // Waits for acceptance (the default policy); its hardware strings are stored.
    assert_eq!(registered.status, 202, "{}", registered.text());
    drop(serve);

    let url = format!(
        "sqlite://{}?mode=rwc",
        std::path::absolute(data_dir.join("bearman.db"))
            .unwrap()
            .display()
    );
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    runtime.block_on(async {
        use bearman::core::model::{Action, NewEvent};
        use bearman::store::Store;
        let store = bearman::store::sql::SqlStore::connect(&url).await.unwrap();
        let uuid = bearman_proto::uuid::NodeUuid::parse(UUID).unwrap();
        let mut node = store.node_get(&uuid).await.unwrap().expect("registered");
        node.rack = Some(format!("{HOSTILE_RACK_PREFIX}{}", "r".repeat(LONG_CHARS)));
        node.hostname = format!("{HOSTILE_HOSTNAME}{}", "h".repeat(LONG_CHARS));
        let event = NewEvent::for_node(
            &uuid,
            node.updated_at_ms,
            "test",
            Action::Update,
            HOSTILE_REASON,
        );
        store.node_update(&node, &[event]).await.unwrap();
    });
    (Serve::start(dir, data_dir), token)
}

#[test]
fn node_list_and_events_escape_control_characters_and_cut_long_values() {
    let dir = tempfile::tempdir().unwrap();
    let data_dir = dir.path().join("data");
    let (serve, token) = serve_with_a_hostile_node(dir.path(), &data_dir);
    for args in [
        &["node", "list"][..],
        &["events"],
        &["events", "--node", UUID],
    ] {
        let output = serve.client(dir.path(), Some(&token), args);
        let what = args.join(" ");
        assert_success(&what, &output);
        assert!(
            !stderr(&output).contains("panicked"),
            "{what}: {}",
            stderr(&output)
        );
        let text = stdout(&output);
        assert!(
            !output.stdout.contains(&0x1b) && !output.stdout.contains(&0x07),
            "{what}: raw control characters in stdout: {text:?}"
        );
        assert!(text.contains("\\x1b"), "{what}: {text}");
        assert!(
            text.lines().all(|line| line.chars().count() < 2_000),
            "{what}: a line is not cut: {} characters",
            text.lines()
                .map(|line| line.chars().count())
                .max()
                .unwrap_or(0)
        );
        if args[0] == "node" {
            assert!(text.contains("\\x1b[31mrack\\x1b[0m\\nfake-row"), "{text}");
            assert!(text.contains("evil\\x1b]0;pwned\\x07hhh"), "{text}");
            assert!(text.contains('…'), "{text}");
            assert_eq!(text.lines().count(), 2, "one header, one node: {text}");
        } else {
            assert!(
                text.contains("\\x1b[2J\\x1b[Hscreen cleared\\r\\n"),
                "{text}"
            );
        }
    }
    // JSON stays exact: the whole value, control characters escaped by JSON itself.
    let output = serve.client(
        dir.path(),
        Some(&token),
        &["node", "list", "--output", "json"],
    );
    assert_success("node list --output json", &output);
    assert!(!output.stdout.contains(&0x1b));
    let nodes: Value = serde_json::from_slice(&output.stdout).unwrap();
    assert_eq!(
        nodes[0]["rack"].as_str().unwrap(),
        format!("{HOSTILE_RACK_PREFIX}{}", "r".repeat(LONG_CHARS))
    );
}

/// Spawns a client command with stdout a pipe, reads `read` bytes of it, closes the pipe,
/// and waits (bounded) for the command to end.
fn run_into_closed_pipe(
    serve: &Serve,
    dir: &Path,
    token: &str,
    args: &[&str],
    read: usize,
) -> Output {
    use std::io::Read;
    let mut command = bearman(dir);
    command
        .args(args)
        .env("BEARMAN_URL", serve.url())
        .env("BEARMAN_TOKEN", token)
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    let mut child = command.spawn().expect("spawn bearman");
    let mut pipe = child.stdout.take().unwrap();
    let mut first = vec![0u8; read];
    pipe.read_exact(&mut first).expect("the command prints");
    drop(pipe);
    let pid = child.id();
    let (done, finished) = mpsc::channel();
    std::thread::spawn(move || {
        let _ = done.send(child.wait_with_output());
    });
    match finished.recv_timeout(BOUND) {
        Ok(output) => output.expect("wait for bearman"),
        Err(_) => {
            let _ = Command::new("kill").args(["-9", &pid.to_string()]).status();
            panic!(
                "bearman {} did not exit within {BOUND:?} after its stdout closed",
                args.join(" ")
            );
        }
    }
}

#[test]
fn a_closed_stdout_pipe_ends_the_command_quietly_with_status_0() {
    let dir = tempfile::tempdir().unwrap();
    let data_dir = dir.path().join("data");
    let (serve, token) = serve_with_a_hostile_node(dir.path(), &data_dir);
    // More than a pipe holds (the JSON carries 140,000 characters), so the command is
    // still writing when the reader goes away and its next write meets a closed pipe.
    for (args, read) in [
        (&["node", "list", "--output", "json"][..], 16),
        // The reader leaves before the command has printed anything.
        (&["events"], 0),
    ] {
        let output = run_into_closed_pipe(&serve, dir.path(), &token, args, read);
        let what = args.join(" ");
        let text = stderr(&output);
        assert!(!text.contains("panicked"), "{what}: {text}");
        assert!(
            !text.contains("Broken pipe") && !text.contains("error"),
            "{what}: {text}"
        );
        assert_eq!(
            output.status.code(),
            Some(0),
            "{what}: {}; stderr: {text}",
            output.status
        );
    }
}

#[test]
fn client_without_token_is_told_about_bearman_token() {
    let dir = tempfile::tempdir().unwrap();
    let data_dir = dir.path().join("data");
    create_admin_token(dir.path(), &data_dir);
    let serve = Serve::start(dir.path(), &data_dir);
    for args in [&["node", "list"][..], &["summary"], &["flavor", "list"]] {
        let output = serve.client(dir.path(), None, args);
        assert_refused(&args.join(" "), &output, "BEARMAN_TOKEN");
        assert!(stderr(&output).contains("401"), "{}", stderr(&output));
    }
    let output = serve.client(dir.path(), Some("bm_not-a-real-token"), &["summary"]);
    assert_refused("summary with a bad token", &output, "BEARMAN_TOKEN");
}

#[test]
fn unreachable_url_is_an_error_naming_the_address() {
    let dir = tempfile::tempdir().unwrap();
    let port = free_port();
    let url = format!("http://127.0.0.1:{port}");
    for args in [&["summary"][..], &["node", "list"], &["pool", "list"]] {
        let mut command = bearman(dir.path());
        command.args(args).args(["--url", &url, "--token", "bm_x"]);
        let output = run(command);
        assert_refused(&args.join(" "), &output, &format!("127.0.0.1:{port}"));
    }
    let mut command = bearman(dir.path());
    command.args(["summary", "--url", "nonsense", "--token", "bm_x"]);
    assert_refused("summary --url nonsense", &run(command), "--url");
}

#[test]
fn serve_refuses_bad_flags_naming_them() {
    let dir = tempfile::tempdir().unwrap();
    let data_dir = dir.path().join("data");
    let listen = format!("127.0.0.1:{}", free_port());
    let cases: [(&[&str], &str); 6] = [
        (&["--listen", "0.0.0.0:1"], "--public-url"),
        (&["--listen", "[::]:8080"], "--public-url"),
        (&["--listen", "nonsense"], "--listen"),
        (&["--listen", "127.0.0.1"], "--listen"),
        (
            &["--listen", &listen, "--log-format", "yaml"],
            "--log-format",
        ),
        (
            &["--listen", &listen, "--public-url", "ftp://10.0.0.1"],
            "--public-url",
        ),
    ];
    for (args, mentions) in cases {
        let mut command = bearman(dir.path());
        command
            .arg("serve")
            .args(args)
            .arg("--data-dir")
            .arg(&data_dir);
        let output = run(command);
        assert_refused(&format!("serve {}", args.join(" ")), &output, mentions);
    }
    assert!(
        !dir.path().join("bearman-data").exists(),
        "nothing is created in the working directory"
    );
}

#[test]
fn serve_on_a_busy_port_names_the_address() {
    let dir = tempfile::tempdir().unwrap();
    let taken = TcpListener::bind("127.0.0.1:0").unwrap();
    let address = taken.local_addr().unwrap().to_string();
    let mut command = bearman(dir.path());
    command
        .args(["serve", "--listen", &address, "--data-dir"])
        .arg(dir.path().join("data"));
    assert_refused("serve on a busy port", &run(command), &address);
    drop(taken);
}

#[test]
fn a_second_serve_on_the_same_sqlite_database_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let data_dir = dir.path().join("data");
    let first = Serve::start(dir.path(), &data_dir);
    let mut command = bearman(dir.path());
    command
        .args([
            "serve",
            "--listen",
            &format!("127.0.0.1:{}", free_port()),
            "--data-dir",
        ])
        .arg(&data_dir);
    assert_refused(
        "a second serve on one SQLite file",
        &run(command),
        "another bearman serve already serves the SQLite database",
    );
    // The first one serves on, alone; `bearman cluster status` says it is not clustered.
    let token = create_admin_token(dir.path(), &data_dir);
    let output = first.client(dir.path(), Some(&token), &["cluster", "status"]);
    assert_success("cluster status", &output);
    assert!(
        stdout(&output).contains("not clustered"),
        "{}",
        stdout(&output)
    );
}

/// PostgreSQL for the cluster test: `DATABASE_URL`, or this machine's local server, in a
/// schema of its own.
fn postgres_schema_url(schema: &str) -> String {
    let base = std::env::var("DATABASE_URL")
        .unwrap_or_else(|_| "postgres://postgres@127.0.0.1:5432/test".to_string());
    let status = Command::new("psql")
        .args([base.as_str(), "-qc", &format!("CREATE SCHEMA {schema}")])
        .status()
        .expect("psql (postgresql-client) is needed for this test");
    assert!(
        status.success(),
        "could not create schema {schema} at {base}"
    );
    let separator = if base.contains('?') { '&' } else { '?' };
    format!("{base}{separator}options=-c%20search_path%3D{schema}")
}

fn drop_postgres_schema(schema: &str) {
    let base = std::env::var("DATABASE_URL")
        .unwrap_or_else(|_| "postgres://postgres@127.0.0.1:5432/test".to_string());
    let _ = Command::new("psql")
        .args([
            base.as_str(),
            "-qc",
            &format!("DROP SCHEMA {schema} CASCADE"),
        ])
        .status();
}

/// The `/healthz` text of `serve`, or the error.
fn health(serve: &Serve) -> String {
    match request(serve.address, "GET", "/healthz", None) {
        Ok(response) => response.text(),
        Err(error) => format!("unreachable: {error}"),
    }
}

/// The remediation of node `uuid` as `serve` reports it.
fn remediation_of(serve: &Serve, dir: &Path, token: &str, uuid: &str) -> Value {
    let output = serve.client(
        dir,
        Some(token),
        &["remediation", "list", "--node", uuid, "--output", "json"],
    );
    assert_success("remediation list", &output);
    let list: Value = serde_json::from_str(&stdout(&output)).unwrap();
    list[0].clone()
}

#[test]
fn two_replicas_on_postgres_elect_one_leader_and_the_other_finishes_its_fence_after_kill_9() {
    let schema = format!("bearman_cli_ha_{}", std::process::id());
    let url = postgres_schema_url(&schema);
    let dir = tempfile::tempdir().unwrap();
    // A real Redfish BMC (sushy-tools), its machine on.
    let bmc = sushy::Emulator::start(sushy::Options {
        power: "On",
        ..Default::default()
    });
    let credentials = format!("{}:{}", sushy::USERNAME, sushy::PASSWORD);
    std::fs::write(
        dir.path().join("cluster.toml"),
        // A long clean-shutdown wait keeps the fence in flight while the leader is killed.
        "[cluster]\nenabled = true\nlease_ttl_ms = 3000\nrenew_every_ms = 500\nrenew_deadline_ms = 2000\n\
         [remediation.limits]\nsoft_off_grace_ms = 10000\nbackoff_initial_ms = 500\nbackoff_max_ms = 1000\n\
         [remediation.health]\npower_poll_interval_ms = 0\n",
    )
    .unwrap();
    let config = dir.path().join("cluster.toml");
    let start = |name: &str| {
        let args: Vec<std::ffi::OsString> = vec![
            "--database-url".into(),
            url.clone().into(),
            "--config".into(),
            config.clone().into(),
            "--data-dir".into(),
            dir.path().join(name).into(),
        ];
        let args: Vec<&std::ffi::OsStr> = args.iter().map(|a| a.as_os_str()).collect();
        Serve::start_with(
            dir.path(),
            &format!("{name}.log"),
            &args,
            &[("BM_TEST_REDFISH", credentials.as_str())],
        )
    };
    let result = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
        let mut replicas = [start("a"), start("b")];
        // Within a couple of renewals exactly one leads.
        let deadline = std::time::Instant::now() + BOUND;
        let leader = loop {
            let texts: Vec<String> = replicas.iter().map(health).collect();
            let leading: Vec<usize> = (0..2)
                .filter(|i| texts[*i].starts_with("ok: leading"))
                .collect();
            if leading.len() == 1 && texts.iter().all(|t| t.starts_with("ok")) {
                break leading[0];
            }
            assert!(leading.len() <= 1, "two leaders: {texts:?}");
            assert!(std::time::Instant::now() < deadline, "no leader: {texts:?}");
            std::thread::sleep(Duration::from_millis(100));
        };
        let other = 1 - leader;
        assert!(health(&replicas[other]).starts_with("ok: standby"));
        let token = create_admin_token_in(dir.path(), &["--database-url".as_ref(), url.as_ref()]);
        let status = replicas[other].client(dir.path(), Some(&token), &["cluster", "status"]);
        assert_success("cluster status", &status);
        let text = stdout(&status);
        assert!(
            text.contains("(standby)") && text.contains("epoch 1"),
            "{text}"
        );
        assert_eq!(
            text.matches(" *").count(),
            1,
            "one replica marked leading: {text}"
        );

        // A node with that BMC registers (through the standby: every replica serves) and
        // an operator fences it.
        let standby = &replicas[other];
        let enrolment = serde_json::to_vec(&serde_json::json!({
            "uuid": UUID,
            "bmc": {"driver": "redfish", "address": bmc.address(), "credentials_ref": "env:BM_TEST_REDFISH"},
        }))
        .unwrap();
        let enrolled = request_as(
            standby.address,
            "POST",
            "/api/v1/nodes",
            Some(&token),
            Some(&enrolment),
        )
        .unwrap();
        assert_eq!(enrolled.status, 201, "{}", enrolled.text());
        let registered = request(
            standby.address,
            "POST",
            &format!("/ipxe/{UUID}/register"),
            Some(&registration_body()),
        )
        .unwrap();
        assert!(registered.status < 300, "{}", registered.text());
        let fence = standby.client(dir.path(), Some(&token), &["node", "fence", UUID]);
        assert_success("node fence", &fence);
        // The leader asks for the clean shutdown and waits: the fence is in flight.
        let deadline = std::time::Instant::now() + BOUND;
        loop {
            let remediation = remediation_of(standby, dir.path(), &token, UUID);
            if remediation["attempts"].as_u64() >= Some(1) {
                assert_eq!(remediation["status"], "active");
                assert_eq!(remediation["epoch"], 1, "{remediation}");
                break;
            }
            assert!(
                std::time::Instant::now() < deadline,
                "the fence never started: {remediation}"
            );
            std::thread::sleep(Duration::from_millis(100));
        }

        // kill -9 the leader: no resignation, the lease must expire.
        let killed_at = std::time::Instant::now();
        replicas[leader].child.kill().unwrap();
        replicas[leader].child.wait().unwrap();
        let failover = loop {
            let text = health(&replicas[other]);
            if text.starts_with("ok: leading (epoch 2)") {
                break killed_at.elapsed();
            }
            assert!(
                killed_at.elapsed() < Duration::from_secs(15),
                "no takeover after kill -9: {text}"
            );
            std::thread::sleep(Duration::from_millis(50));
        };
        assert!(
            failover < Duration::from_millis(3000 + 2 * 500 + 1000),
            "{failover:?}"
        );
        // The new leader finishes the fence from its persisted step: verified off.
        let finished = loop {
            let remediation = remediation_of(&replicas[other], dir.path(), &token, UUID);
            if remediation["status"] != "active" {
                break remediation;
            }
            assert!(
                killed_at.elapsed() < Duration::from_secs(90),
                "the new leader did not finish the fence: {remediation}\n{}",
                replicas[other].log_text()
            );
            std::thread::sleep(Duration::from_millis(200));
        };
        let done_after = killed_at.elapsed();
        assert_eq!(finished["status"], "done", "{finished}");
        assert_eq!(
            finished["epoch"], 2,
            "finished under the new epoch: {finished}"
        );
        let node = replicas[other].client(
            dir.path(),
            Some(&token),
            &["node", "show", UUID, "--output", "json"],
        );
        assert_success("node show", &node);
        let node: Value = serde_json::from_str(&stdout(&node)).unwrap();
        assert_eq!(node["state"], "fenced", "{node}");
        eprintln!(
            "kill -9 of the leader: the other led after {failover:?} (lease_ttl_ms 3000, renew_every_ms 500) and finished the fence {done_after:?} after the kill"
        );
    }));
    drop_postgres_schema(&schema);
    if let Err(panic) = result {
        std::panic::resume_unwind(panic);
    }
}

/// The body of a registration from machine `index` reporting BIOS `bios`.
fn registration_with_bios(index: u8, bios: &str) -> Vec<u8> {
    let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("../fixtures/hardware/r640.json");
    let mut body: Value = serde_json::from_str(&std::fs::read_to_string(path).unwrap()).unwrap();
    body["serial"] = format!("FW{index}").into();
    body["nics"][0]["mac"] = format!("52:54:00:00:f0:{index:02x}").into();
    body["nics"][1]["mac"] = format!("52:54:00:00:f1:{index:02x}").into();
    body["firmware"] = serde_json::json!({ "bios": bios });
    serde_json::to_vec(&body).unwrap()
}

#[test]
fn firmware_status_shows_drift_bundles_and_the_rollout_on_a_populated_daemon() {
    let dir = tempfile::tempdir().unwrap();
    let data_dir = dir.path().join("data");
    let token = create_admin_token(dir.path(), &data_dir);
    let serve = Serve::start(dir.path(), &data_dir);
    let client = |args: &[&str]| serve.client(dir.path(), Some(&token), args);

    std::fs::write(
        dir.path().join("hv.toml"),
        format!(
            "name = \"hv\"\ncmdline_template = \"console=ttyS0\"\n\
             [kernel]\nurl = \"/images/hv/vmlinuz\"\nsha256 = \"{}\"\n\
             [firmware_expected]\nbios = \"2.0\"\nbmc = \"5.10\"\n",
            "1".repeat(64)
        ),
    )
    .unwrap();
    assert_success(
        "flavor create --file",
        &client(&["flavor", "create", "--file", "hv.toml"]),
    );
    assert_success(
        "pool create",
        &client(&[
            "pool",
            "create",
            "rack-a",
            "--purpose",
            "node",
            "--cidr",
            "10.10.0.0/24",
            "--range",
            "10.10.0.10-10.10.0.200",
        ]),
    );
    let uuids = [
        "4c4c4544-0042-3510-8052-b4c04f4ff001",
        "4c4c4544-0042-3510-8052-b4c04f4ff002",
        "4c4c4544-0042-3510-8052-b4c04f4ff003",
    ];
    for (index, (uuid, bios)) in uuids.iter().zip(["1.0", "1.0", "2.0"]).enumerate() {
        assert_success(
            "node enroll",
            &client(&["node", "enroll", uuid, "--flavor", "hv"]),
        );
        let registered = request(
            serve.address,
            "POST",
            &format!("/ipxe/{uuid}/register"),
            Some(&registration_with_bios(index as u8, bios)),
        )
        .unwrap();
        assert_eq!(registered.status, 200, "{}", registered.text());
    }

    // Before any bundle: drift, and nothing can fix it.
    let status = client(&["firmware", "status"]);
    assert_success("firmware status", &status);
    let text = stdout(&status);
    assert!(
        text.contains("0 compliant, 3 drifting"),
        "every node lacks the BMC version: {text}"
    );
    let bios_line = text
        .lines()
        .find(|line| line.starts_with("bios") && line.contains("1.0"))
        .unwrap_or_else(|| panic!("a bios line for 1.0: {text}"));
    for column in ["hv", "2.0", " 2 ", "none", uuids[0], uuids[1]] {
        assert!(bios_line.contains(column), "{column} in {bios_line:?}");
    }
    assert!(
        text.contains("unknown"),
        "the BMC version nobody reported: {text}"
    );
    assert!(text.contains("rollout: running"), "{text}");

    std::fs::write(
        dir.path().join("bios.toml"),
        format!(
            "name = \"bios-2\"\ncomponent = \"bios\"\nversion = \"2.0\"\nsize_bytes = 1024\n\
             command = [\"/usr/sbin/flash\", \"{{file}}\"]\n\
             [artifact]\nurl = \"/images/fw/bios.bin\"\nsha256 = \"{}\"\n\
             [applies_to]\nvendor = \"Dell Inc.\"\n",
            "d".repeat(64)
        ),
    )
    .unwrap();
    let added = client(&["firmware", "bundle", "add", "bios.toml"]);
    assert_success("firmware bundle add", &added);
    assert!(stdout(&added).contains("bios-2"), "{}", stdout(&added));
    let listed = client(&["firmware", "bundle", "list"]);
    assert!(stdout(&listed).contains("Dell Inc."), "{}", stdout(&listed));
    let again = client(&["firmware", "bundle", "add", "bios.toml"]);
    assert_refused("a second bundle of one name", &again, "already exists");
    std::fs::write(dir.path().join("bad.toml"), "name = \"x\"\n").unwrap();
    assert_refused(
        "a bundle file missing fields",
        &client(&["firmware", "bundle", "add", "bad.toml"]),
        "bad.toml",
    );

    let status = stdout(&client(&["firmware", "status"]));
    assert!(
        status.contains("bios-2"),
        "the bundle that fixes them: {status}"
    );

    let paused = client(&[
        "firmware",
        "rollout",
        "pause",
        "--reason",
        "vendor advisory",
    ]);
    assert_success("rollout pause", &paused);
    assert!(
        stdout(&paused).contains("PAUSED by token:admin"),
        "{}",
        stdout(&paused)
    );
    assert_refused(
        "pausing twice",
        &client(&["firmware", "rollout", "pause"]),
        "already paused",
    );
    let resumed = client(&["firmware", "rollout", "resume"]);
    assert_success("rollout resume", &resumed);
    assert!(stdout(&resumed).contains("rollout: running"));
    let json = client(&["firmware", "status", "--output", "json"]);
    let parsed: Value = serde_json::from_str(&stdout(&json)).expect("JSON status");
    assert_eq!(parsed["drift"]["drifting_nodes"], 3, "{parsed}");
    assert_eq!(parsed["policy"]["updates_max"], 10);

    let shown = client(&["node", "show", uuids[2]]);
    let node: Value = serde_json::from_str(&stdout(&shown)).unwrap();
    let bios = node["firmware_status"]
        .as_array()
        .unwrap()
        .iter()
        .find(|row| row["component"] == "bios")
        .cloned()
        .unwrap();
    assert_eq!(bios["compliant"], true, "{node}");
    assert_eq!(bios["first_seen"], "2.0");
    assert_refused(
        "retry on a node that never failed",
        &client(&["firmware", "retry", uuids[2]]),
        "no failed firmware update",
    );
}

#[test]
fn drill_commands_check_preview_refuse_block_and_save_a_twin() {
    let dir = tempfile::tempdir().unwrap();
    let data_dir = dir.path().join("data");
    let token = create_admin_token(dir.path(), &data_dir);
    // Offline: no daemon needed to validate a file.
    let uuid = "4c4c4544-0042-3510-8052-b4c04f4ff0d1";
    let drill = format!(
        "name = \"panic-one\"\nfault = \"kernel_panic\"\n[targets]\nuuids = [\"{uuid}\"]\n\
         [hypothesis]\nready_within_s = 900\n[budget]\nnodes_max = 1\n"
    );
    std::fs::write(dir.path().join("drill.toml"), &drill).unwrap();
    let checked = run({
        let mut command = bearman(dir.path());
        command.args(["drill", "check", "drill.toml"]);
        command
    });
    assert_success("drill check", &checked);
    assert!(
        stdout(&checked).contains("\"fault\": \"kernel_panic\""),
        "{}",
        stdout(&checked)
    );
    std::fs::write(
        dir.path().join("bad.toml"),
        drill.replace("nodes_max = 1", "nodes_max = 0"),
    )
    .unwrap();
    let bad = run({
        let mut command = bearman(dir.path());
        command.args(["drill", "check", "bad.toml"]);
        command
    });
    assert_refused("a drill with no budget", &bad, "budget.nodes_max");

    let serve = Serve::start(dir.path(), &data_dir);
    let client = |args: &[&str]| serve.client(dir.path(), Some(&token), args);
    assert_success("node enroll", &client(&["node", "enroll", uuid]));
    let registered = request(
        serve.address,
        "POST",
        &format!("/ipxe/{uuid}/register"),
        Some(&registration_with_bios(0xd1, "1.0")),
    )
    .unwrap();
    assert_eq!(registered.status, 200, "{}", registered.text());

    // A registered node is not Ready and has no reachable BMC: the preflight says both.
    let preview = client(&["drill", "preview", "drill.toml"]);
    assert_success("drill preview", &preview);
    let text = stdout(&preview);
    assert!(text.contains("preflight FAILED"), "{text}");
    for line in ["state", "bmc"] {
        assert!(
            text.lines()
                .any(|l| l.contains(line) && l.contains("FAILED")),
            "{line} failed in {text}"
        );
    }
    let refused = client(&["drill", "run", "drill.toml", "--yes"]);
    assert_refused(
        "a drill whose preflight failed",
        &refused,
        "preflight failed: nothing started",
    );
    let listed = client(&["drill", "list"]);
    assert_success("drill list", &listed);
    assert!(!stdout(&listed).contains("running"), "{}", stdout(&listed));

    // The kill switch blocks; unblock clears it.
    assert_success(
        "drill abort",
        &client(&["drill", "abort", "--reason", "freeze"]),
    );
    let listed = stdout(&client(&["drill", "list"]));
    assert!(listed.contains("drills BLOCKED by token:admin"), "{listed}");
    assert!(listed.contains("freeze"), "{listed}");
    let blocked = client(&["drill", "preview", "drill.toml"]);
    assert!(
        stdout(&blocked).contains("kill_switch"),
        "{}",
        stdout(&blocked)
    );
    assert_success("drill unblock", &client(&["drill", "unblock"]));
    assert_refused(
        "unblocking twice",
        &client(&["drill", "unblock"]),
        "not blocked",
    );
    assert_refused(
        "a drill that does not exist",
        &client(&["drill", "show", "7"]),
        "does not exist",
    );

    let twin = client(&["drill", "twin", "--out", "twin.json"]);
    assert_success("drill twin", &twin);
    assert!(
        stderr(&twin).contains("twin of 1 node(s)"),
        "{}",
        stderr(&twin)
    );
    let saved: Value =
        serde_json::from_str(&std::fs::read_to_string(dir.path().join("twin.json")).unwrap())
            .unwrap();
    assert_eq!(saved["racks"][0]["nodes"][0]["uuid"], uuid);
    let events = stdout(&client(&["events"]));
    for action in ["drills_blocked", "drills_unblocked"] {
        assert!(events.contains(action), "{action} in {events}");
    }
}
