//! sushy-tools' Redfish emulator (its fake driver: in-memory systems), started by a test
//! on 127.0.0.1 with a port the kernel picks, from the virtualenv `scripts/install-deps.sh`
//! makes (`.venv-sushy/` in the repo, or `BEARMAN_SUSHY_VENV`). Shared by the tests that
//! need a real Redfish BMC (`#[path]`-included); without the emulator they fail, saying
//! so: they are never skipped.

use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::{mpsc, Arc, Mutex};
use std::time::Duration;

use bearman::bmc::redfish::{RedfishBmc, RedfishConfig};
use serde_json::Value;

/// The user in `fixtures/redfish/htpasswd` (bcrypt cost 4, so checks are cheap).
pub const USERNAME: &str = "admin";
pub const PASSWORD: &str = "fixture-password-Vq8r";
pub const WRONG_PASSWORD: &str = "wrong-password-Zt5k";
pub const NODE_A: &str = "7f0a1c52-3b7e-4d5c-9a51-0c1f9e2d3a41";
pub const NODE_B: &str = "c3d2b1a0-5e4f-4a8b-8c7d-6e5f4a3b2c1d";
/// The emulator is a Python program: importing Flask takes a second or two, more when
/// the two cores are busy compiling.
pub const STARTUP_BOUND: Duration = Duration::from_secs(60);
/// sushy's fake driver applies a power change 1 to 11 s after it is asked.
pub const POWER_BOUND: Duration = Duration::from_secs(30);
pub const POLL_INTERVAL: Duration = Duration::from_millis(250);
pub const CALL_TIMEOUT: Duration = Duration::from_secs(10);
pub const INSTALL_HINT: &str = "run scripts/install-deps.sh: it creates .venv-sushy/ with \
    sushy-tools 2.2.0 (or set BEARMAN_SUSHY_VENV to a virtualenv that has sushy-tools)";

pub fn repo_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("daemon/ has a parent")
        .to_path_buf()
}

pub fn fixture(name: &str) -> PathBuf {
    repo_root().join("fixtures/redfish").join(name)
}

#[derive(Clone, Copy)]
pub struct Options {
    /// Put the SessionService wrapper in front of the emulator.
    pub sessions: bool,
    /// Serve HTTPS with `fixtures/redfish/tls/bmc.pem` (signed by `tls/ca.pem`).
    pub tls: bool,
    /// Node A's power state at start.
    pub power: &'static str,
}

impl Default for Options {
    fn default() -> Self {
        Options {
            sessions: false,
            tls: false,
            power: "Off",
        }
    }
}

/// One sushy-emulator process, killed on drop.
pub struct Emulator {
    child: Child,
    pub port: u16,
    tls: bool,
    log: Arc<Mutex<Vec<String>>>,
    _dir: tempfile::TempDir,
}

impl Emulator {
    pub fn start(options: Options) -> Emulator {
        let venv = std::env::var_os("BEARMAN_SUSHY_VENV")
            .map(PathBuf::from)
            .unwrap_or_else(|| repo_root().join(".venv-sushy"));
        let program = if options.sessions {
            venv.join("bin/python")
        } else {
            venv.join("bin/sushy-emulator")
        };
        assert!(
            program.exists(),
            "the sushy-tools emulator is not installed ({} is missing): {INSTALL_HINT}",
            program.display()
        );
        let dir = tempfile::tempdir().expect("temporary directory");
        let mut config = format!(
            "SUSHY_EMULATOR_LISTEN_IP = '127.0.0.1'\n\
             SUSHY_EMULATOR_LISTEN_PORT = 0\n\
             SUSHY_EMULATOR_STATE_DIR = {state:?}\n\
             SUSHY_EMULATOR_AUTH_FILE = {auth:?}\n\
             SUSHY_EMULATOR_FAKE_DRIVER = True\n\
             SUSHY_EMULATOR_FAKE_SYSTEMS = [\n\
             {{'uuid': '{NODE_A}', 'name': 'node-a', 'power_state': '{power}', 'nics': []}},\n\
             {{'uuid': '{NODE_B}', 'name': 'node-b', 'power_state': 'Off', 'nics': []}},\n\
             ]\n",
            state = dir.path().join("state").display().to_string(),
            auth = fixture("htpasswd").display().to_string(),
            power = options.power,
        );
        if options.tls {
            config.push_str(&format!(
                "SUSHY_EMULATOR_SSL_CERT = {:?}\nSUSHY_EMULATOR_SSL_KEY = {:?}\n",
                fixture("tls/bmc.pem").display().to_string(),
                fixture("tls/bmc-key.pem").display().to_string(),
            ));
        }
        let config_path = dir.path().join("emulator.conf");
        std::fs::write(&config_path, config).expect("write the emulator config");

        let mut command = Command::new(&program);
        if options.sessions {
            command.arg(fixture("sushy_sessions.py"));
        }
        let mut child = command
            .arg("--config")
            .arg(&config_path)
            .arg("--fake")
            .env("PYTHONUNBUFFERED", "1")
            .env_remove("SUSHY_EMULATOR_CONFIG")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap_or_else(|error| {
                panic!(
                    "cannot start {}: {error}: {INSTALL_HINT}",
                    program.display()
                )
            });

        // Werkzeug logs the port it bound to stderr. The reader keeps draining stderr for
        // the emulator's life (a full pipe would stall it) and keeps the lines for failure
        // messages.
        let log = Arc::new(Mutex::new(Vec::new()));
        let (port_sender, port_receiver) = mpsc::channel();
        let stderr = child.stderr.take().expect("piped stderr");
        let reader_log = Arc::clone(&log);
        std::thread::spawn(move || {
            for line in BufReader::new(stderr).lines() {
                let Ok(line) = line else { break };
                if let Some(port) = listening_port(&line) {
                    let _ = port_sender.send(port);
                }
                reader_log.lock().unwrap().push(line);
            }
        });
        let port = match port_receiver.recv_timeout(STARTUP_BOUND) {
            Ok(port) => port,
            Err(failure) => {
                let _ = child.kill();
                let status = child.wait().ok();
                let what = match failure {
                    mpsc::RecvTimeoutError::Timeout => {
                        format!("did not listen within {STARTUP_BOUND:?}")
                    }
                    mpsc::RecvTimeoutError::Disconnected => "exited before listening".into(),
                };
                panic!(
                    "sushy-emulator {what} ({status:?}): {INSTALL_HINT}\nits output:\n{}",
                    log.lock().unwrap().join("\n")
                );
            }
        };
        Emulator {
            child,
            port,
            tls: options.tls,
            log,
            _dir: dir,
        }
    }

    pub fn address(&self) -> String {
        let scheme = if self.tls { "https" } else { "http" };
        format!("{scheme}://127.0.0.1:{}", self.port)
    }

    pub fn config(&self) -> RedfishConfig {
        let mut config = RedfishConfig::new(self.address(), USERNAME, PASSWORD);
        config.timeout = CALL_TIMEOUT;
        config
    }

    pub fn bmc(&self, config: RedfishConfig) -> RedfishBmc {
        RedfishBmc::new(config).expect("valid redfish config")
    }

    /// The open sessions, asked with Basic auth (the wrapper allows it) so the answer
    /// does not depend on the driver under test.
    pub async fn session_count(&self) -> usize {
        let response = reqwest::Client::new()
            .get(format!(
                "{}/redfish/v1/SessionService/Sessions",
                self.address()
            ))
            .basic_auth(USERNAME, Some(PASSWORD))
            .send()
            .await
            .expect("list sessions");
        assert!(response.status().is_success(), "{}", response.status());
        let body: Value = serde_json::from_slice(&response.bytes().await.expect("sessions body"))
            .expect("sessions json");
        body["Members"].as_array().expect("Members").len()
    }

    pub async fn delete_all_sessions(&self) {
        let client = reqwest::Client::new();
        let body = client
            .get(format!(
                "{}/redfish/v1/SessionService/Sessions",
                self.address()
            ))
            .basic_auth(USERNAME, Some(PASSWORD))
            .send()
            .await
            .expect("list sessions")
            .bytes()
            .await
            .expect("sessions body");
        let body: Value = serde_json::from_slice(&body).expect("sessions json");
        for member in body["Members"].as_array().expect("Members") {
            let path = member["@odata.id"].as_str().expect("@odata.id");
            let response = client
                .delete(format!("{}{path}", self.address()))
                .basic_auth(USERNAME, Some(PASSWORD))
                .send()
                .await
                .expect("delete session");
            assert!(response.status().is_success(), "{}", response.status());
        }
    }
}

impl Drop for Emulator {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        if std::thread::panicking() {
            eprintln!(
                "sushy-emulator output:\n{}",
                self.log.lock().unwrap().join("\n")
            );
        }
    }
}

/// The port in werkzeug's ` * Running on http://127.0.0.1:PORT`.
pub fn listening_port(line: &str) -> Option<u16> {
    let rest = &line[line.find("Running on http")?..];
    let url = rest.split_whitespace().nth(2)?;
    let digits: String = url
        .rsplit(':')
        .next()?
        .chars()
        .take_while(char::is_ascii_digit)
        .collect();
    digits.parse().ok()
}
