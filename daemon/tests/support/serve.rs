//! The real `bearman` binary for tests: a command with no inherited `BEARMAN_*`
//! variables, a bounded run, and `bearman serve` on a free port until it answers
//! `/healthz` (`#[path]`-included by the deploy, backup and upgrade tests).

use std::fs::File;
use std::io::{Read as _, Write as _};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

pub const BIN: &str = env!("CARGO_BIN_EXE_bearman");
/// How long any one command, and the daemon's start-up, may take.
pub const BOUND: Duration = Duration::from_secs(30);

/// `bearman` in `dir`, with no `BEARMAN_*` variables inherited from whoever runs the tests.
pub fn bearman(dir: &Path) -> Command {
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
pub fn run(mut command: Command) -> Output {
    command.stdout(Stdio::piped()).stderr(Stdio::piped());
    let mut child = command.spawn().expect("spawn");
    let deadline = Instant::now() + BOUND;
    while child.try_wait().unwrap().is_none() {
        if Instant::now() > deadline {
            let _ = child.kill();
            let output = child.wait_with_output().unwrap();
            panic!(
                "{command:?} did not exit within {BOUND:?}\nstdout: {}\nstderr: {}",
                text(&output.stdout),
                text(&output.stderr)
            );
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    child.wait_with_output().unwrap()
}

pub fn text(bytes: &[u8]) -> String {
    String::from_utf8_lossy(bytes).into_owned()
}

pub fn assert_success(what: &str, output: &Output) {
    assert!(
        output.status.success(),
        "{what} failed ({}):\nstdout: {}\nstderr: {}",
        output.status,
        text(&output.stdout),
        text(&output.stderr)
    );
}

/// A failure the orderly way: exit `code`, an `error:` naming `mentions`, no panic.
pub fn assert_refused(what: &str, output: &Output, code: i32, mentions: &str) {
    let stderr = text(&output.stderr);
    assert_eq!(output.status.code(), Some(code), "{what}: {stderr}");
    assert!(stderr.contains("error"), "{what}: {stderr}");
    assert!(
        stderr.contains(mentions),
        "{what}: no {mentions:?} in: {stderr}"
    );
    assert!(!stderr.contains("panicked"), "{what}: {stderr}");
}

pub fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// `GET path` over plain HTTP/1.1: the status code and body.
pub fn get(address: SocketAddr, path: &str) -> std::io::Result<(u16, String)> {
    let mut stream = TcpStream::connect_timeout(&address, Duration::from_secs(2))?;
    stream.set_read_timeout(Some(Duration::from_secs(5)))?;
    write!(
        stream,
        "GET {path} HTTP/1.1\r\nHost: {address}\r\nConnection: close\r\n\r\n"
    )?;
    let mut response = String::new();
    stream.read_to_string(&mut response)?;
    let status = response
        .split(' ')
        .nth(1)
        .and_then(|code| code.parse().ok())
        .ok_or_else(|| std::io::Error::other(format!("not HTTP: {response:?}")))?;
    let body = response
        .split_once("\r\n\r\n")
        .map(|(_, body)| body.to_string())
        .unwrap_or_default();
    Ok((status, body))
}

/// A running `bearman serve`, killed when dropped.
pub struct Serve {
    pub child: Child,
    pub address: SocketAddr,
    pub log: PathBuf,
}

impl Serve {
    /// `bearman serve --listen <a free port> args…` with `envs`, logging to `dir/serve.log`,
    /// once it answers `/healthz`.
    pub fn start(
        dir: &Path,
        args: &[&std::ffi::OsStr],
        envs: &[(&str, &std::ffi::OsStr)],
    ) -> Serve {
        let address: SocketAddr = format!("127.0.0.1:{}", free_port()).parse().unwrap();
        let log = dir.join("serve.log");
        let child = bearman(dir)
            .args(["serve", "--listen", &address.to_string()])
            .args(args)
            .envs(envs.iter().copied())
            .stdout(Stdio::null())
            .stderr(File::create(&log).unwrap())
            .spawn()
            .expect("spawn bearman serve");
        let mut serve = Serve {
            child,
            address,
            log,
        };
        let deadline = Instant::now() + BOUND;
        loop {
            if let Some(status) = serve.child.try_wait().unwrap() {
                panic!(
                    "bearman serve exited early ({status}):\n{}",
                    serve.log_text()
                );
            }
            if let Ok((200, _)) = get(serve.address, "/healthz") {
                return serve;
            }
            assert!(
                Instant::now() < deadline,
                "bearman serve did not answer /healthz within {BOUND:?}:\n{}",
                serve.log_text()
            );
            std::thread::sleep(Duration::from_millis(25));
        }
    }

    pub fn log_text(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// SIGTERM (a graceful shutdown, as `systemctl stop` sends) and waits for the exit.
    pub fn stop(mut self) -> std::process::ExitStatus {
        let pid = self.child.id().to_string();
        let _ = Command::new("kill").args(["-TERM", &pid]).status();
        let deadline = Instant::now() + BOUND;
        loop {
            if let Some(status) = self.child.try_wait().unwrap() {
                return status;
            }
            assert!(
                Instant::now() < deadline,
                "bearman serve ignored SIGTERM:\n{}",
                self.log_text()
            );
            std::thread::sleep(Duration::from_millis(25));
        }
    }
}

impl Drop for Serve {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}
