//! The shipped monitoring against real Prometheus tools (Debian's `prometheus` package):
//! `promtool` checks the alert rules and runs their unit tests, every metric the rules
//! and the Grafana dashboard name is one the daemon exports, and a real Prometheus
//! scrapes a real daemon (with a viewer token, as deployed) and answers a query.

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use bearman_e2e::{Options, TestDaemon};
use serde_json::{json, Value};

fn repo() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .unwrap()
        .to_path_buf()
}

fn alerts_file() -> PathBuf {
    repo().join("deploy/prometheus/bearman-alerts.yml")
}

fn dashboard_file() -> PathBuf {
    repo().join("deploy/grafana/bearman-fleet.json")
}

/// A Debian `prometheus` binary, or a failure that says how to get it.
fn tool(name: &str) -> PathBuf {
    let path = PathBuf::from("/usr/bin").join(name);
    assert!(
        path.exists(),
        "{} is missing: run scripts/install-deps.sh (Debian package prometheus)",
        path.display()
    );
    path
}

#[test]
fn alert_rules_pass_promtool_and_their_unit_tests() {
    let promtool = tool("promtool");
    let checked = Command::new(&promtool)
        .arg("check")
        .arg("rules")
        .arg(alerts_file())
        .output()
        .unwrap();
    let said = String::from_utf8_lossy(&checked.stdout).to_string()
        + &String::from_utf8_lossy(&checked.stderr);
    assert!(checked.status.success(), "promtool check rules: {said}");
    assert!(said.contains("SUCCESS: 11 rules found"), "{said}");
    // The unit tests name the rules file relative to themselves.
    let tested = Command::new(&promtool)
        .current_dir(repo().join("deploy/prometheus"))
        .args(["test", "rules", "bearman-alerts.test.yml"])
        .output()
        .unwrap();
    let said = String::from_utf8_lossy(&tested.stdout).to_string()
        + &String::from_utf8_lossy(&tested.stderr);
    assert!(tested.status.success(), "promtool test rules: {said}");
}

#[test]
fn promtool_refuses_a_broken_rule() {
    // The check above can fail: the same tool on a rule with a syntax error.
    let dir = tempfile::tempdir().unwrap();
    let broken = std::fs::read_to_string(alerts_file()).unwrap().replace(
        "max(bearman_fences_unverified) > 0",
        "max(bearman_fences_unverified > 0",
    );
    let path = dir.path().join("broken.yml");
    std::fs::write(&path, broken).unwrap();
    let checked = Command::new(tool("promtool"))
        .arg("check")
        .arg("rules")
        .arg(&path)
        .output()
        .unwrap();
    assert!(!checked.status.success());
}

/// Metric names a PromQL text uses (`bearman_…`), with the suffixes a histogram or a
/// counter adds to its family's name taken off when the family is among `declared`.
fn names_used(text: &str, declared: &BTreeSet<String>) -> BTreeSet<String> {
    let mut out = BTreeSet::new();
    let bytes = text.as_bytes();
    let mut at = 0;
    while let Some(found) = text[at..].find("bearman_") {
        let start = at + found;
        let before = start.checked_sub(1).map(|i| bytes[i] as char);
        let mut end = start;
        while end < bytes.len() && (bytes[end].is_ascii_alphanumeric() || bytes[end] == b'_') {
            end += 1;
        }
        at = end;
        // Part of another word (a file name like `bearman_alerts`) is not a metric.
        if before.is_some_and(|c| c.is_ascii_alphanumeric() || c == '_' || c == '-' || c == '/') {
            continue;
        }
        let name = &text[start..end];
        let family = ["_total", "_bucket", "_sum", "_count"]
            .iter()
            .find_map(|suffix| {
                name.strip_suffix(suffix)
                    .filter(|base| declared.contains(*base))
            })
            .unwrap_or(name);
        out.insert(family.to_string());
    }
    out
}

/// Families the daemon declares (`# TYPE name kind`) in a scrape.
fn declared_families(scrape: &str) -> BTreeSet<String> {
    scrape
        .lines()
        .filter_map(|line| line.strip_prefix("# TYPE "))
        .filter_map(|rest| rest.split_whitespace().next())
        .map(str::to_string)
        .collect()
}

fn undeclared(text: &str, declared: &BTreeSet<String>) -> Vec<String> {
    names_used(text, declared)
        .into_iter()
        .filter(|name| !declared.contains(name))
        .collect()
}

async fn scrape(daemon: &TestDaemon) -> String {
    let response = daemon
        .request("GET", "/metrics", Some(&daemon.viewer_token), None)
        .await;
    assert_eq!(response.status, 200);
    String::from_utf8(response.body).unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_metric_the_rules_and_the_dashboard_name_is_exported() {
    let daemon = TestDaemon::sqlite(Options::default()).await;
    let declared = declared_families(&scrape(&daemon).await);
    assert!(declared.len() > 20, "{declared:?}");

    let rules = std::fs::read_to_string(alerts_file()).unwrap();
    let missing = undeclared(&rules, &declared);
    assert!(
        missing.is_empty(),
        "alert rules name {missing:?}, not exported"
    );

    let dashboard: Value =
        serde_json::from_str(&std::fs::read_to_string(dashboard_file()).unwrap()).unwrap();
    let mut expressions = Vec::new();
    for panel in dashboard["panels"].as_array().unwrap() {
        for target in panel["targets"].as_array().unwrap() {
            expressions.push(target["expr"].as_str().unwrap().to_string());
        }
    }
    assert!(expressions.len() >= 20, "{expressions:?}");
    let missing = undeclared(&expressions.join("\n"), &declared);
    assert!(
        missing.is_empty(),
        "dashboard names {missing:?}, not exported"
    );

    // The check can fail: a name the daemon does not export is caught.
    assert_eq!(
        undeclared("rate(bearman_no_such_thing_total[5m])", &declared),
        vec!["bearman_no_such_thing_total".to_string()]
    );
}

/// One GET to `address` over plain HTTP; (status, body).
async fn get(address: std::net::SocketAddr, path: &str) -> Option<(u16, String)> {
    let mut stream = tokio::net::TcpStream::connect(address).await.ok()?;
    let host = address.to_string();
    let response = tokio::time::timeout(
        Duration::from_secs(10),
        bearman_proto::http::send(&mut stream, "GET", &host, path, &[], None),
    )
    .await
    .ok()?
    .ok()?;
    Some((
        response.status,
        String::from_utf8_lossy(&response.body).to_string(),
    ))
}

/// Kills the Prometheus child however the test ends.
struct Running(Child);

impl Drop for Running {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// A loopback port nobody listens on now (Prometheus cannot report a port 0 it bound).
fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// Asks Prometheus `query` until `accept` takes the result (bounded).
async fn query_until(
    prometheus: std::net::SocketAddr,
    query: &str,
    child: &mut Running,
    accept: impl Fn(&Value) -> bool,
) -> Value {
    let encoded: String = query
        .bytes()
        .map(|b| match b {
            b'a'..=b'z' | b'A'..=b'Z' | b'0'..=b'9' | b'_' | b'(' | b')' => (b as char).to_string(),
            other => format!("%{other:02X}"),
        })
        .collect();
    let path = format!("/api/v1/query?query={encoded}");
    let mut last = Value::Null;
    for _ in 0..120 {
        if let Some(status) = child.0.try_wait().unwrap() {
            panic!("prometheus exited ({status}) before answering {query}");
        }
        if let Some((200, body)) = get(prometheus, &path).await {
            last = serde_json::from_str(&body).unwrap_or(Value::Null);
            if accept(&last) {
                return last;
            }
        }
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
    panic!("prometheus never answered {query} as expected within 60 s; last answer: {last}");
}

fn first_value(answer: &Value) -> Option<f64> {
    answer["data"]["result"][0]["value"][1]
        .as_str()
        .and_then(|text| text.parse().ok())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_real_prometheus_scrapes_the_daemon_and_answers_a_query() {
    let prometheus_bin = tool("prometheus");
    let daemon = TestDaemon::sqlite(Options::default()).await;
    for index in 0..3 {
        let enroll = json!({
            "uuid": format!("00000000-0000-4000-8000-00000000000{index}"),
            "rack": "r01",
        });
        assert_eq!(daemon.admin("POST", "/nodes", Some(enroll)).await.0, 201);
    }

    let dir = tempfile::tempdir().unwrap();
    // As deployed: the viewer token in a file Prometheus reads, never in its config.
    let token_file = dir.path().join("bearman.token");
    std::fs::write(&token_file, &daemon.viewer_token).unwrap();
    let config = format!(
        "global:\n  scrape_interval: 1s\n  evaluation_interval: 1s\n\
         rule_files:\n  - {rules}\n\
         scrape_configs:\n  - job_name: bearman\n    authorization:\n      credentials_file: {token}\n    static_configs:\n      - targets: ['{target}']\n",
        rules = alerts_file().display(),
        token = token_file.display(),
        target = daemon.address,
    );
    let config_file = dir.path().join("prometheus.yml");
    std::fs::write(&config_file, config).unwrap();
    let port = free_port();
    let prometheus: std::net::SocketAddr = format!("127.0.0.1:{port}").parse().unwrap();
    let mut child = Running(
        Command::new(prometheus_bin)
            .arg(format!("--config.file={}", config_file.display()))
            .arg(format!(
                "--storage.tsdb.path={}",
                dir.path().join("data").display()
            ))
            .arg(format!("--web.listen-address={prometheus}"))
            .arg("--log.level=warn")
            .stdout(Stdio::null())
            .stderr(Stdio::inherit())
            .spawn()
            .expect("start prometheus"),
    );

    // The target is up: Prometheus got a 200 and parsed the OpenMetrics text.
    let up = query_until(prometheus, "up", &mut child, |answer| {
        first_value(answer) == Some(1.0)
    })
    .await;
    assert_eq!(up["data"]["result"][0]["metric"]["job"], "bearman", "{up}");
    // A fleet gauge comes back through Prometheus' query API.
    let nodes = query_until(prometheus, "sum(bearman_nodes)", &mut child, |answer| {
        first_value(answer).is_some()
    })
    .await;
    assert_eq!(first_value(&nodes), Some(3.0), "{nodes}");
    // Its own scrapes are counted by the daemon, under the route template.
    query_until(
        prometheus,
        "bearman_http_requests_total{route=\"/metrics\",status=\"200\"}",
        &mut child,
        |answer| first_value(answer).is_some_and(|n| n >= 1.0),
    )
    .await;
    // The shipped rules loaded and evaluate without errors.
    let mut rules = Value::Null;
    for _ in 0..60 {
        if let Some((200, body)) = get(prometheus, "/api/v1/rules").await {
            rules = serde_json::from_str(&body).unwrap();
            let evaluated = rules["data"]["groups"][0]["rules"]
                .as_array()
                .is_some_and(|all| {
                    all.len() == 10 && all.iter().all(|rule| rule["health"] == "ok")
                });
            if evaluated {
                break;
            }
        }
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
    let group = &rules["data"]["groups"][0];
    assert_eq!(group["name"], "bearman", "{rules}");
    let all = group["rules"].as_array().expect("rules");
    assert_eq!(all.len(), 11, "{rules}");
    for rule in all {
        assert_eq!(rule["health"], "ok", "{rule}");
    }
}
