//! The web dashboard in a real browser: a real `bearman serve`, populated through the
//! admin API and the boot protocol (three racks of nodes in several states, a
//! viewer and operator tokens), then `tests/browser/dashboard.py` drives
//! Debian's headless Chromium through Playwright: log in, the overview's counts, the node
//! list's filters, a node page, maintenance through the confirmation dialog, the event in
//! the live events view, a rebuild that the remediation list then shows, and a viewer who
//! cannot act. Screenshots of every page land in
//! the target directory.
//!
//! Without Chromium or the Playwright venv this test fails and says to run
//! scripts/install-deps.sh: it is never skipped.

use std::collections::BTreeMap;
use std::io::{Read as _, Write as _};
use std::net::{SocketAddr, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use serde_json::{json, Value};

#[allow(dead_code)]
#[path = "support/serve.rs"]
mod serve;

const CHROMIUM: &str = "/usr/bin/chromium";
/// The whole browser session (two logins, a dozen pages) must finish within this.
const BROWSER_BOUND: Duration = Duration::from_secs(240);

fn repo() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("..")
}

/// One JSON request over plain HTTP/1.1: the status and the parsed body (Null if none).
fn request(
    address: SocketAddr,
    method: &str,
    path: &str,
    token: Option<&str>,
    body: Option<&Value>,
) -> (u16, Value) {
    let mut stream = TcpStream::connect_timeout(&address, Duration::from_secs(2)).unwrap();
    stream
        .set_read_timeout(Some(Duration::from_secs(30)))
        .unwrap();
    let body = body.map(|b| b.to_string()).unwrap_or_default();
    let authorization = token
        .map(|t| format!("Authorization: Bearer {t}\r\n"))
        .unwrap_or_default();
    write!(
        stream,
        "{method} {path} HTTP/1.1\r\nHost: {address}\r\nConnection: close\r\n{authorization}Content-Type: application/json\r\nContent-Length: {}\r\n\r\n{body}",
        body.len()
    )
    .unwrap();
    let mut response = Vec::new();
    stream.read_to_end(&mut response).unwrap();
    let text = String::from_utf8_lossy(&response);
    let status = text.split(' ').nth(1).unwrap().parse().unwrap();
    let body = text.split_once("\r\n\r\n").map_or("", |(_, b)| b);
    (status, serde_json::from_str(body).unwrap_or(Value::Null))
}

fn token(dir: &Path, data_dir: &Path, name: &str, role: &str) -> String {
    let mut command = serve::bearman(dir);
    command
        .args([
            "token",
            "create",
            "--name",
            name,
            "--role",
            role,
            "--data-dir",
        ])
        .arg(data_dir);
    let output = serve::run(command);
    serve::assert_success("token create", &output);
    serve::text(&output.stdout).trim().to_string()
}

/// A registration body from the canned hardware fixture, unique per node.
fn registration(index: usize) -> Value {
    let mut body: Value =
        serde_json::from_str(include_str!("../../fixtures/hardware/r640.json")).unwrap();
    body["serial"] = json!(format!("{}{index:04}", body["serial"].as_str().unwrap()));
    for (nic, entry) in body["nics"].as_array_mut().unwrap().iter_mut().enumerate() {
        entry["mac"] = json!(format!("52:54:00:00:{index:02x}:{nic:02x}"));
    }
    body
}

#[test]
fn dashboard_works_in_a_real_browser() {
    let python = repo().join(".venv-browser/bin/python");
    assert!(
        python.exists() && Path::new(CHROMIUM).exists(),
        "the browser test needs {CHROMIUM} and {}: run scripts/install-deps.sh",
        python.display()
    );
    let dir = tempfile::tempdir().unwrap();
    let data_dir = dir.path().join("data");
    let admin = token(dir.path(), &data_dir, "admin", "admin");
    let operator = token(dir.path(), &data_dir, "operator", "operator");
    let viewer = token(dir.path(), &data_dir, "viewer", "viewer");
    // Nodes that reported `installed` never send a heartbeat here: a long grace keeps them
    // Ready for the whole test, and the controller does nothing on its own.
    let config_toml = dir.path().join("bearman.toml");
    std::fs::write(
        &config_toml,
        "[remediation]\nautomatic = false\nboot_retry_automatic = false\n[remediation.health]\nheartbeat_grace_ms = 3600000\npower_poll_interval_ms = 0\n",
    )
    .unwrap();
    let daemon = serve::Serve::start(
        dir.path(),
        &[
            "--data-dir".as_ref(),
            data_dir.as_ref(),
            "--config".as_ref(),
            config_toml.as_ref(),
        ],
        &[],
    );
    let address = daemon.address;
    let admin_call = |method: &str, path: &str, body: Option<Value>| {
        request(
            address,
            method,
            &format!("/api/v1{path}"),
            Some(&admin),
            body.as_ref(),
        )
    };
    let flavor = json!({
        "name": "hv",
        "kernel": {"url": "/images/hv/vmlinuz", "sha256": "1".repeat(64)},
        "initrds": [{"url": "/images/hv/initrd.img", "sha256": "2".repeat(64)}],
        "cmdline_template": "console=ttyS0 hostname={hostname} ip={ip} bearman.url={url} bearman.uuid={uuid}",
    });
    assert_eq!(admin_call("POST", "/flavors", Some(flavor)).0, 201);
    let pool = json!({
        "name": "rack-a", "purpose": "node", "vlan": 100, "cidr": "10.10.0.0/24",
        "range_start": "10.10.0.10", "range_end": "10.10.0.200", "gateway": "10.10.0.1",
        "dns": ["10.10.0.2"], "mtu": 9000,
    });
    assert_eq!(admin_call("POST", "/pools", Some(pool)).0, 201);

    // Three racks of four: what each node is made to be.
    let plan: [(&str, [&str; 4]); 3] = [
        ("r01", ["ready", "ready", "maintenance", "discovered"]),
        ("r02", ["ready", "maintenance", "maintenance", "discovered"]),
        ("r03", ["ready", "ready", "discovered", "ready"]),
    ];
    let mut counts: BTreeMap<String, usize> = BTreeMap::new();
    let mut nodes = Vec::new(); // (uuid, hostname, rack, state)
    for (rack_index, (rack, states)) in plan.iter().enumerate() {
        for (slot, state) in states.iter().enumerate() {
            let index = rack_index * 4 + slot + 1;
            let uuid = format!("00000000-0000-4000-8000-{index:012x}");
            let hostname = format!("hv-{rack}-{}", slot + 1);
            let (status, body) = admin_call(
                "POST",
                "/nodes",
                Some(json!({"uuid": uuid, "hostname": hostname, "rack": rack, "flavor": "hv"})),
            );
            assert_eq!(status, 201, "{body}");
            match *state {
                "ready" => {
                    let (status, body) = request(
                        address,
                        "POST",
                        &format!("/ipxe/{uuid}/register"),
                        None,
                        Some(&registration(index)),
                    );
                    assert_eq!(status, 200, "register {hostname}: {body}");
                    assert_eq!(
                        request(address, "GET", &format!("/ipxe/{uuid}"), None, None).0,
                        200
                    );
                    let (status, body) = request(
                        address,
                        "POST",
                        &format!("/ipxe/{uuid}/installed"),
                        None,
                        None,
                    );
                    assert_eq!(status, 200, "installed {hostname}: {body}");
                }
                "maintenance" => {
                    let (status, body) = admin_call(
                        "POST",
                        &format!("/nodes/{uuid}/maintenance"),
                        Some(json!({"reason": "cabling <check> & \"quotes\""})),
                    );
                    assert_eq!(status, 200, "{body}");
                }
                _ => {}
            }
            let (_, shown) = admin_call("GET", &format!("/nodes/{uuid}"), None);
            assert_eq!(shown["state"], *state, "{hostname}");
            *counts.entry(state.to_string()).or_default() += 1;
            nodes.push((uuid, hostname, rack.to_string(), state.to_string()));
        }
    }

    // The API's own summary agrees with the plan (so the browser checks the page, not
    // the plan against itself).
    let (_, summary) = admin_call("GET", "/summary", None);
    for (state, count) in &counts {
        assert_eq!(summary["by_state"][state], *count, "{state}: {summary}");
    }

    let filter_rack = "r02";
    let filtered: Vec<&str> = nodes
        .iter()
        .filter(|n| n.2 == filter_rack && n.3 == "maintenance")
        .map(|n| n.1.as_str())
        .collect();
    let target = nodes
        .iter()
        .find(|n| n.2 == "r03" && n.3 == "ready")
        .unwrap();
    let viewer_target = &nodes[0];
    let screenshots = Path::new(env!("CARGO_TARGET_TMPDIR")).join("dashboard-screenshots");
    let _ = std::fs::remove_dir_all(&screenshots);
    std::fs::create_dir_all(&screenshots).unwrap();
    let all_states = [
        "discovered",
        "registered",
        "provisioning",
        "ready",
        "suspect",
        "fencing",
        "fenced",
        "rebuilding",
        "maintenance",
        "retired",
    ];
    let config = json!({
        "url": format!("http://{address}"),
        "operator": operator,
        "viewer": viewer,
        "total": nodes.len(),
        "counts": all_states.iter().map(|s| (s.to_string(), counts.get(*s).copied().unwrap_or(0))).collect::<BTreeMap<_, _>>(),
        "racks": {"r01": 4, "r02": 4, "r03": 4},
        "filter": {"rack": filter_rack, "hostnames": filtered},
        "target": {"uuid": target.0, "hostname": target.1},
        "viewer_target": {"uuid": viewer_target.0, "state": viewer_target.3},
        // Rebuilt through the dialog (it starts a remediation the list must show).
        "rebuild_target": {"uuid": nodes[1].0, "hostname": nodes[1].1},
        "screenshots": screenshots,
    });
    let config_file = dir.path().join("browser.json");
    std::fs::write(&config_file, config.to_string()).unwrap();

    let mut child = Command::new(&python)
        .arg(repo().join("tests/browser/dashboard.py"))
        .arg(&config_file)
        .current_dir(dir.path())
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("run the browser script");
    let deadline = Instant::now() + BROWSER_BOUND;
    while child.try_wait().unwrap().is_none() {
        if Instant::now() > deadline {
            let _ = child.kill();
            break;
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    let output = child.wait_with_output().unwrap();
    let stdout = serve::text(&output.stdout);
    println!("{stdout}");
    assert!(
        output.status.success(),
        "the browser script failed ({}):\nstdout:\n{stdout}\nstderr:\n{}\ndaemon log:\n{}",
        output.status,
        serve::text(&output.stderr),
        daemon.log_text()
    );
    assert!(stdout.contains("all checks passed"), "{stdout}");
    for page in [
        "login",
        "overview",
        "nodes",
        "node",
        "confirm",
        "events",
        "remediations",
        "viewer-node",
    ] {
        let png = std::fs::read(screenshots.join(format!("{page}.png")))
            .unwrap_or_else(|e| panic!("screenshot {page}: {e}"));
        assert!(png.starts_with(b"\x89PNG"), "{page}.png is a PNG");
    }
    // What the browser did went through the API, audited as the operator's token.
    let (_, events) = admin_call("GET", &format!("/nodes/{}/events?limit=5", target.0), None);
    let maintenance = events
        .as_array()
        .unwrap()
        .iter()
        .find(|e| e["action"] == "maintenance_on")
        .unwrap_or_else(|| panic!("no maintenance_on event: {events}"));
    assert_eq!(maintenance["actor"], "token:operator");
    assert_eq!(maintenance["reason"], "browser test: <b>disk</b> swap");
    let (_, viewer_node) = admin_call("GET", &format!("/nodes/{}", viewer_target.0), None);
    assert_eq!(
        viewer_node["state"], viewer_target.3,
        "the viewer changed nothing"
    );
}
