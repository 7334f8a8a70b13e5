//! What the xtask commands that run the daemon share: building a binary with cargo, child
//! processes that are stopped however the command ends, free ports, one-shot HTTP requests
//! to a daemon, waiting for it to serve, and the first admin token.

use std::net::{SocketAddr, TcpListener};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::time::{Duration, Instant};

use anyhow::{anyhow, bail, ensure, Context};
use bearman_proto::http::{self, Response};
use serde_json::Value;
use tokio::net::TcpStream;

const REQUEST_TIMEOUT: Duration = Duration::from_secs(30);
const STARTUP_TIMEOUT: Duration = Duration::from_secs(30);
const LOG_TAIL_LINES: usize = 20;

pub fn find_on_path(name: &str) -> Option<PathBuf> {
    let path = std::env::var_os("PATH")?;
    std::env::split_paths(&path)
        .map(|dir| dir.join(name))
        .find(|candidate| candidate.is_file())
}

/// The workspace root and the cargo target directory (CARGO_TARGET_DIR if set).
pub fn workspace_dirs() -> anyhow::Result<(PathBuf, PathBuf)> {
    let workspace = Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .context("xtask lives inside the workspace")?
        .to_path_buf();
    let target_dir = std::env::var_os("CARGO_TARGET_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| workspace.join("target"));
    Ok((workspace, target_dir))
}

/// Runs `cargo build ARGS --message-format=json-render-diagnostics` in `workspace` with
/// `envs`, and returns the path cargo reports for the executable `bin`, so that
/// CARGO_TARGET_DIR, build.target-dir and --target are honoured.
pub fn cargo_build(
    workspace: &Path,
    args: &[&str],
    envs: &[(&str, &str)],
    bin: &str,
) -> anyhow::Result<PathBuf> {
    let cargo = std::env::var_os("CARGO").unwrap_or_else(|| "cargo".into());
    let shown = format!("cargo build {}", args.join(" "));
    let output = Command::new(cargo)
        .current_dir(workspace)
        .arg("build")
        .args(args)
        .arg("--message-format=json-render-diagnostics")
        .envs(envs.iter().copied())
        .stdin(Stdio::null())
        .stderr(Stdio::inherit())
        .output()
        .context("running cargo")?;
    ensure!(
        output.status.success(),
        "{shown} failed ({})",
        output.status
    );
    String::from_utf8_lossy(&output.stdout)
        .lines()
        .filter_map(|line| serde_json::from_str::<Value>(line).ok())
        .filter(|message| {
            message["reason"] == "compiler-artifact" && message["target"]["name"] == bin
        })
        .find_map(|message| message["executable"].as_str().map(PathBuf::from))
        .with_context(|| format!("{shown} did not report the {bin} executable"))
}

/// A child process stopped when the guard is dropped: on success, on error and on Ctrl-C.
pub struct ChildGuard {
    pub name: &'static str,
    child: Child,
}

impl ChildGuard {
    /// Starts `command`. The child is also told to stop (SIGTERM) if this process dies
    /// without dropping the guard (SIGKILL, a CI timeout), so no VM or daemon outlives it.
    /// Spawn from the thread that lives as long as the guard (the kernel ties the signal
    /// to the spawning thread): xtask spawns from `block_on`'s, the main thread.
    pub fn spawn(name: &'static str, command: &mut Command) -> anyhow::Result<ChildGuard> {
        use std::os::unix::process::CommandExt;
        // SAFETY: prctl(2) is async-signal-safe and touches no memory of ours; it runs in
        // the forked child before exec.
        unsafe {
            command.pre_exec(|| {
                if libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGTERM) == -1 {
                    return Err(std::io::Error::last_os_error());
                }
                Ok(())
            });
        }
        let child = command
            .stdin(Stdio::null())
            .spawn()
            .with_context(|| format!("starting {name} ({:?})", command.get_program()))?;
        Ok(ChildGuard { name, child })
    }

    /// The child's process id (for reading its `/proc` entry).
    pub fn id(&self) -> u32 {
        self.child.id()
    }

    pub fn exit_status(&mut self) -> anyhow::Result<Option<ExitStatus>> {
        self.child
            .try_wait()
            .with_context(|| format!("checking on {}", self.name))
    }

    /// Waits without blocking the runtime, so Ctrl-C can still drop (and stop) the child.
    pub async fn wait(&mut self) -> anyhow::Result<ExitStatus> {
        loop {
            if let Some(status) = self.exit_status()? {
                return Ok(status);
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }
}

impl Drop for ChildGuard {
    fn drop(&mut self) {
        if matches!(self.child.try_wait(), Ok(Some(_))) {
            return;
        }
        // SIGTERM first: nginx's master then stops its workers, which SIGKILL would leave
        // running and holding the port; the daemon closes its database cleanly.
        // SAFETY: kill(2) touches no memory of ours. The pid is our child and not yet
        // reaped, so it cannot have been reused by an unrelated process.
        unsafe {
            libc::kill(self.child.id() as libc::pid_t, libc::SIGTERM);
        }
        // A blocking wait is acceptable here: it only happens during teardown.
        let deadline = Instant::now() + Duration::from_secs(5);
        while Instant::now() < deadline {
            if matches!(self.child.try_wait(), Ok(Some(_))) {
                return;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        eprintln!("xtask: {} ignored SIGTERM for 5s; killing it", self.name);
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Binds port 0 to let the kernel pick a free port, then releases it for the server. Another
/// process could take it in between; on a benchmark machine that is unlikely enough.
pub fn free_local_addr() -> anyhow::Result<SocketAddr> {
    let listener = TcpListener::bind("127.0.0.1:0").context("finding a free port")?;
    Ok(listener.local_addr()?)
}

/// The daemon reads BEARMAN_* settings from the environment; a stray BEARMAN_DATABASE_URL
/// would point the benchmark at a real database. RUST_LOG is dropped so the daemon logs at
/// its production default, as logging costs time on the hot path.
pub fn daemon_command(daemon: &Path) -> Command {
    let mut command = Command::new(daemon);
    for (name, _) in std::env::vars_os() {
        if name.to_string_lossy().starts_with("BEARMAN_") {
            command.env_remove(name);
        }
    }
    command.env_remove("RUST_LOG");
    command
}

pub fn log_tail(path: &Path) -> String {
    let text = std::fs::read_to_string(path).unwrap_or_default();
    let lines: Vec<&str> = text.lines().collect();
    let tail = lines[lines.len().saturating_sub(LOG_TAIL_LINES)..].join("\n");
    format!("last lines of {}:\n{tail}", path.display())
}

/// One request on a fresh connection; the minimal client closes it after each answer.
pub async fn request(
    addr: SocketAddr,
    method: &str,
    path: &str,
    token: Option<&str>,
    body: Option<&Value>,
) -> anyhow::Result<Response> {
    let attempt = async {
        let mut stream = TcpStream::connect(addr)
            .await
            .with_context(|| format!("connecting to {addr}"))?;
        let authorization = token.map(|token| format!("Bearer {token}"));
        let mut headers = vec![("Content-Type", "application/json")];
        if let Some(value) = &authorization {
            headers.push(("Authorization", value.as_str()));
        }
        let body = body.map(serde_json::to_vec).transpose()?;
        let host = addr.to_string();
        anyhow::Ok(http::send(&mut stream, method, &host, path, &headers, body.as_deref()).await?)
    };
    let response = match tokio::time::timeout(REQUEST_TIMEOUT, attempt).await {
        Ok(response) => response,
        Err(_) => Err(anyhow!("no answer within {}s", REQUEST_TIMEOUT.as_secs())),
    };
    response.with_context(|| format!("{method} {path}"))
}

/// Like [`request`], but anything other than 2xx is an error carrying the body.
pub async fn request_ok(
    addr: SocketAddr,
    method: &str,
    path: &str,
    token: Option<&str>,
    body: Option<&Value>,
) -> anyhow::Result<Response> {
    let response = request(addr, method, path, token, body).await?;
    ensure!(
        response.is_success(),
        "{method} {path}: HTTP {}: {}",
        response.status,
        response.text().trim()
    );
    Ok(response)
}

/// Polls `path` until it answers 2xx, failing early if the server exits.
pub async fn wait_until_serving(
    server: &mut ChildGuard,
    addr: SocketAddr,
    path: &str,
    log: &Path,
) -> anyhow::Result<Response> {
    let deadline = Instant::now() + STARTUP_TIMEOUT;
    loop {
        if let Some(status) = server.exit_status()? {
            bail!(
                "{} exited during start-up ({status}); {}",
                server.name,
                log_tail(log)
            );
        }
        match request(addr, "GET", path, None, None).await {
            Ok(response) if response.is_success() => return Ok(response),
            Ok(_) | Err(_) if Instant::now() < deadline => {
                tokio::time::sleep(Duration::from_millis(50)).await
            }
            Ok(response) => bail!(
                "{} answers GET {path} with HTTP {} after {}s; {}",
                server.name,
                response.status,
                STARTUP_TIMEOUT.as_secs(),
                log_tail(log)
            ),
            Err(error) => bail!(
                "{} is not serving on {addr} after {}s ({error:#}); {}",
                server.name,
                STARTUP_TIMEOUT.as_secs(),
                log_tail(log)
            ),
        }
    }
}

/// The token goes straight into the database before the daemon starts, so the two
/// processes never race to create the schema.
pub fn create_token(daemon: &Path, data_dir: &Path, name: &str) -> anyhow::Result<String> {
    let output = daemon_command(daemon)
        .args([
            "token",
            "create",
            "--name",
            name,
            "--role",
            "admin",
            "--data-dir",
        ])
        .arg(data_dir)
        .stdin(Stdio::null())
        .output()
        .context("running bearman token create")?;
    ensure!(
        output.status.success(),
        "bearman token create failed ({}): {}",
        output.status,
        String::from_utf8_lossy(&output.stderr).trim()
    );
    let token = String::from_utf8(output.stdout)
        .context("bearman token create printed a non-UTF-8 secret")?
        .trim()
        .to_string();
    ensure!(!token.is_empty(), "bearman token create printed no secret");
    Ok(token)
}
