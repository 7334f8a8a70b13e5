//! The systemd unit in deploy/systemd: `systemd-analyze verify` accepts it (and its
//! PostgreSQL drop-in) with no warning, `systemd-analyze security` rates its sandbox,
//! the directives the README promises are there, and `bearman serve` speaks the
//! `Type=notify` protocol the unit relies on (READY=1 once serving, STOPPING=1 on
//! SIGTERM) to a notify socket of the test's own, as systemd's would be.

use std::os::unix::net::UnixDatagram;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

#[allow(dead_code)]
#[path = "support/serve.rs"]
mod support;
use support::*;

const SYSTEMD_ANALYZE: &str = "/usr/bin/systemd-analyze";
/// Where the unit expects the binary; the copies verified here point at the test build.
const INSTALLED_BIN: &str = "/usr/local/bin/bearman";

fn deploy_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../deploy/systemd")
}

/// The unit and its drop-in directory copied into `dir`, ExecStart on the test binary
/// (verify checks that the command exists and is executable).
fn unit_copy(dir: &Path) -> PathBuf {
    let unit = std::fs::read_to_string(deploy_dir().join("bearman.service")).unwrap();
    assert!(
        unit.contains(INSTALLED_BIN),
        "ExecStart names {INSTALLED_BIN}"
    );
    let path = dir.join("bearman.service");
    std::fs::write(&path, unit.replace(INSTALLED_BIN, BIN)).unwrap();
    let dropins = dir.join("bearman.service.d");
    std::fs::create_dir_all(&dropins).unwrap();
    for entry in std::fs::read_dir(deploy_dir().join("bearman.service.d")).unwrap() {
        let entry = entry.unwrap();
        std::fs::copy(entry.path(), dropins.join(entry.file_name())).unwrap();
    }
    path
}

/// `systemd-analyze ARGS`; fails (never skips) when the tool is missing.
fn analyze(args: &[&std::ffi::OsStr]) -> std::process::Output {
    assert!(
        Path::new(SYSTEMD_ANALYZE).exists(),
        "{SYSTEMD_ANALYZE} is missing: it comes with the Debian package `systemd` \
         (scripts/install-deps.sh installs it)"
    );
    run({
        let mut command = Command::new(SYSTEMD_ANALYZE);
        command.args(args);
        command
    })
}

/// Verify's complaints about `unit` (it exits 0 on unknown keys and bad values, printing
/// them, so its stderr is the verdict), ignoring other units of the host it may mention.
fn verify_complaints(unit: &Path) -> (std::process::Output, Vec<String>) {
    let output = analyze(&["verify".as_ref(), "--man=no".as_ref(), unit.as_os_str()]);
    let complaints = text(&output.stderr)
        .lines()
        .chain(text(&output.stdout).lines())
        .filter(|line| line.contains("bearman"))
        .map(str::to_string)
        .collect();
    (output, complaints)
}

#[test]
fn systemd_analyze_verifies_the_unit_and_its_dropin_without_warnings() {
    let dir = tempfile::tempdir().unwrap();
    let unit = unit_copy(dir.path());
    let (output, complaints) = verify_complaints(&unit);
    assert_success("systemd-analyze verify", &output);
    assert!(
        complaints.is_empty(),
        "systemd-analyze verify complained:\n{}",
        complaints.join("\n")
    );

    // The check above is not vacuous: verify does read the drop-in, and a misspelt
    // directive is reported.
    std::fs::write(
        dir.path().join("bearman.service.d/typo.conf"),
        "[Service]\nNoNewPrivilegs=yes\n",
    )
    .unwrap();
    let (_, complaints) = verify_complaints(&unit);
    assert!(
        complaints.iter().any(|c| c.contains("NoNewPrivilegs")),
        "a typo in a drop-in went unreported: {complaints:?}"
    );
}

#[test]
fn the_units_sandbox_rates_ok_offline() {
    let dir = tempfile::tempdir().unwrap();
    let unit = unit_copy(dir.path());
    let output = analyze(&[
        "security".as_ref(),
        "--offline=yes".as_ref(),
        "--no-pager".as_ref(),
        unit.as_os_str(),
    ]);
    let report = text(&output.stdout);
    let exposure: f64 = report
        .lines()
        .find_map(|line| {
            line.split("Overall exposure level for bearman.service: ")
                .nth(1)
        })
        .and_then(|rest| rest.split_whitespace().next())
        .and_then(|number| number.parse().ok())
        .unwrap_or_else(|| panic!("no exposure level in:\n{report}\n{}", text(&output.stderr)));
    // systemd calls below 2 "OK"; a directive dropped by mistake shows as a rise.
    assert!(exposure < 2.0, "exposure {exposure}:\n{report}");
}

#[test]
fn the_unit_has_the_directives_the_readme_promises() {
    let unit = std::fs::read_to_string(deploy_dir().join("bearman.service")).unwrap();
    let active: Vec<&str> = unit
        .lines()
        .map(str::trim)
        .filter(|line| !line.starts_with('#') && !line.is_empty())
        .collect();
    for directive in [
        "Type=notify",
        "ExecStart=/usr/local/bin/bearman serve --config /etc/bearman/bearman.toml",
        "ExecReload=/bin/kill -HUP $MAINPID",
        "Restart=on-failure",
        "User=bearman",
        "StateDirectory=bearman",
        "Environment=BEARMAN_DATA_DIR=/var/lib/bearman",
        "LimitNOFILE=65536",
        "NoNewPrivileges=yes",
        "ProtectSystem=strict",
        "ReadWritePaths=/var/lib/bearman",
        "ProtectHome=yes",
        "PrivateTmp=yes",
        "CapabilityBoundingSet=",
    ] {
        assert!(
            active.contains(&directive),
            "bearman.service lacks {directive}"
        );
    }
    // The one capability [pxe] may need is offered, commented, with its reason.
    assert!(unit.contains("#AmbientCapabilities=CAP_NET_BIND_SERVICE"));
    let sysusers = std::fs::read_to_string(deploy_dir().join("bearman.sysusers.conf")).unwrap();
    assert!(
        sysusers.lines().any(|l| l.starts_with("u bearman ")),
        "{sysusers}"
    );
    let dropin =
        std::fs::read_to_string(deploy_dir().join("bearman.service.d/postgres.conf")).unwrap();
    assert!(dropin.contains("LoadCredential=database-url:"));
    assert!(dropin.contains("Environment=BEARMAN_DATABASE_URL_FILE=%d/database-url"));
}

/// Reads one datagram from the notify socket, or `None` within `wait`.
fn receive(socket: &UnixDatagram, wait: Duration) -> Option<String> {
    socket.set_read_timeout(Some(wait)).unwrap();
    let mut buffer = [0u8; 512];
    socket.recv(&mut buffer).ok().map(|n| text(&buffer[..n]))
}

#[test]
fn serve_notifies_ready_once_serving_and_stopping_on_sigterm() {
    let dir = tempfile::tempdir().unwrap();
    let socket_path = dir.path().join("notify");
    let socket = UnixDatagram::bind(&socket_path).unwrap();
    let data_dir = dir.path().join("data");
    let serve = Serve::start(
        dir.path(),
        &["--data-dir".as_ref(), data_dir.as_os_str()],
        &[("NOTIFY_SOCKET", socket_path.as_os_str())],
    );
    // Serve::start returned once /healthz answered; READY=1 was sent before that.
    let ready = receive(&socket, Duration::from_secs(5));
    assert_eq!(ready.as_deref(), Some("READY=1"), "{}", serve.log_text());
    assert_eq!(
        receive(&socket, Duration::from_millis(200)),
        None,
        "only one READY"
    );
    let log = serve.log.clone();
    let status = serve.stop();
    assert!(
        status.success(),
        "{status}: {}",
        std::fs::read_to_string(&log).unwrap()
    );
    let stopping = receive(&socket, Duration::from_secs(5));
    assert_eq!(stopping.as_deref(), Some("STOPPING=1"));
}

#[test]
fn serve_notifies_an_abstract_socket() {
    use std::os::linux::net::SocketAddrExt as _;
    let dir = tempfile::tempdir().unwrap();
    let name = format!("bearman-deploy-test-{}", std::process::id());
    let address = std::os::unix::net::SocketAddr::from_abstract_name(name.as_bytes()).unwrap();
    let socket = UnixDatagram::bind_addr(&address).unwrap();
    let data_dir = dir.path().join("data");
    let notify = format!("@{name}");
    let serve = Serve::start(
        dir.path(),
        &["--data-dir".as_ref(), data_dir.as_os_str()],
        &[("NOTIFY_SOCKET", notify.as_ref())],
    );
    let ready = receive(&socket, Duration::from_secs(5));
    assert_eq!(ready.as_deref(), Some("READY=1"), "{}", serve.log_text());
}

/// Starting the unit under the real systemd needs systemd as PID 1 (a machine or VM, not
/// a container that runs something else first). Where it is not, this says so rather
/// than pretending; where it is, the unit is started and stopped once.
#[test]
fn the_unit_starts_under_systemd_when_pid_1_is_systemd() {
    let pid1 = std::fs::read_to_string("/proc/1/comm").unwrap_or_default();
    if pid1.trim() != "systemd" {
        eprintln!(
            "PID 1 is {:?}, not systemd: the unit is checked by systemd-analyze only here",
            pid1.trim()
        );
        return;
    }
    let port = free_port();
    let name = format!("bearman-test-{}", std::process::id());
    let unit = std::fs::read_to_string(deploy_dir().join("bearman.service"))
        .unwrap()
        .replace(
            &format!("{INSTALLED_BIN} serve --config /etc/bearman/bearman.toml"),
            &format!("{BIN} serve --listen 127.0.0.1:{port}"),
        )
        .replace("StateDirectory=bearman", &format!("StateDirectory={name}"))
        .replace("/var/lib/bearman", &format!("/var/lib/{name}"))
        .replace("User=bearman", "DynamicUser=yes")
        .replace("Group=bearman\n", "");
    let path = PathBuf::from(format!("/run/systemd/system/{name}.service"));
    std::fs::write(&path, unit).unwrap();
    let systemctl = |args: &[&str]| {
        run({
            let mut command = Command::new("systemctl");
            command.args(args);
            command
        })
    };
    assert_success("daemon-reload", &systemctl(&["daemon-reload"]));
    // Type=notify: `start` returns once the daemon sent READY=1.
    let started = systemctl(&["start", &name]);
    let healthy = get(format!("127.0.0.1:{port}").parse().unwrap(), "/healthz");
    let stopped = systemctl(&["stop", &name]);
    let _ = std::fs::remove_file(&path);
    let _ = systemctl(&["daemon-reload"]);
    assert_success("systemctl start", &started);
    assert!(matches!(healthy, Ok((200, _))), "{healthy:?}");
    assert_success("systemctl stop", &stopped);
}
