//! Firmware compliance over real HTTP, on SQLite and PostgreSQL: a node behind its
//! flavor's expectation is ordered a bundle at registration, reports it applied, comes
//! back on the new version and is recorded flashed; the rollout holds nodes past its caps,
//! pauses and resumes with audit events; failed updates take a node out of service until
//! an operator retries; bad bundles and reports are refused and change nothing.

use bearman::core::firmware::RolloutPolicy;
use bearman_e2e::{json_of, node_pool_json, register_body, Options, TestDaemon, PUBLIC_URL};
use serde_json::{json, Value};

const NODE_A: &str = "4c4c4544-0042-3510-8052-b4c04f4f0a01";
const NODE_B: &str = "4c4c4544-0042-3510-8052-b4c04f4f0a02";
const NODE_C: &str = "4c4c4544-0042-3510-8052-b4c04f4f0a03";

fn policy() -> RolloutPolicy {
    RolloutPolicy {
        updates_max: 1,
        updates_per_rack_max: 1,
        canary_nodes: 0,
        failure_pause_percent: 50,
        failure_pause_min_finished: 10,
        attempts_max: 2,
        restart_grace_ms: 60_000,
    }
}

/// A daemon whose default flavor `hv` expects BIOS 2.0, with bundle `bios-2` for Dell.
async fn daemon(store: &str, policy: RolloutPolicy) -> TestDaemon {
    let options = Options {
        default_flavor: Some("hv".into()),
        firmware: policy,
        ..Default::default()
    };
    let daemon = match store {
        "postgres" => TestDaemon::postgres(options).await,
        _ => TestDaemon::sqlite(options).await,
    };
    let flavor = json!({
        "name": "hv",
        "kernel": {"url": "/images/hv/vmlinuz", "sha256": "1".repeat(64)},
        "cmdline_template": "console=ttyS0",
        "firmware_expected": {"bios": "2.0"},
    });
    assert_eq!(daemon.admin("POST", "/flavors", Some(flavor)).await.0, 201);
    assert_eq!(
        daemon
            .admin("POST", "/pools", Some(node_pool_json()))
            .await
            .0,
        201
    );
    let (status, body) = daemon
        .admin("POST", "/firmware/bundles", Some(bundle_json("bios-2")))
        .await;
    assert_eq!(status, 201, "{body}");
    daemon
}

fn bundle_json(name: &str) -> Value {
    json!({
        "name": name,
        "component": "bios",
        "version": "2.0",
        "artifact": {"url": "/images/fw/bios-2.0.bin", "sha256": "c".repeat(64)},
        "size_bytes": 4096,
        "applies_to": {"vendor": "Dell Inc.", "from_version_max": "1.9"},
        "command": ["/usr/sbin/flash-bios", "--image", "{file}"],
        "timeout_s": 120,
        "success_exit_codes": [0, 2],
    })
}

/// `POST /ipxe/{uuid}{suffix}` from the node itself; the status and the JSON answer.
async fn boot(daemon: &TestDaemon, uuid: &str, suffix: &str, body: Value) -> (u16, Value) {
    let bytes = serde_json::to_vec(&body).unwrap();
    let response = daemon
        .request("POST", &format!("/ipxe/{uuid}{suffix}"), None, Some(&bytes))
        .await;
    (response.status, json_of(&response))
}

/// Registers node `index` reporting BIOS `bios`.
async fn register(daemon: &TestDaemon, uuid: &str, index: u32, bios: &str) -> Value {
    let mut body = register_body(index);
    body.firmware.bios = Some(bios.into());
    let (status, answer) = boot(
        daemon,
        uuid,
        "/register",
        serde_json::to_value(body).unwrap(),
    )
    .await;
    assert_eq!(status, 200, "{answer}");
    answer
}

async fn report(daemon: &TestDaemon, uuid: &str, outcome: &str, exit: i32) -> (u16, Value) {
    boot(
        daemon,
        uuid,
        "/firmware",
        json!({"bundle": "bios-2", "outcome": outcome, "exit_code": exit, "detail": "flash-bios: done"}),
    )
    .await
}

async fn get(daemon: &TestDaemon, path: &str) -> Value {
    let (status, body) = daemon.admin("GET", path, None).await;
    assert_eq!(status, 200, "GET {path}: {body}");
    body
}

async fn actions(daemon: &TestDaemon, uuid: &str) -> Vec<String> {
    get(daemon, &format!("/nodes/{uuid}/events?limit=200"))
        .await
        .as_array()
        .unwrap()
        .iter()
        .map(|event| event["action"].as_str().unwrap().to_string())
        .collect()
}

async fn a_node_behind_is_flashed_and_recorded(store: &str) {
    let daemon = daemon(store, policy()).await;
    let first = register(&daemon, NODE_A, 1, "1.4").await;
    let order = &first["firmware_update"];
    assert_eq!(order["bundle"], "bios-2", "{first}");
    assert_eq!(order["from_version"], "1.4");
    assert_eq!(order["to_version"], "2.0");
    assert_eq!(
        order["artifact"]["url"],
        format!("{PUBLIC_URL}/images/fw/bios-2.0.bin"),
        "an image-store path is resolved against the daemon's public URL"
    );
    assert_eq!(
        order["command"],
        json!(["/usr/sbin/flash-bios", "--image", "{file}"])
    );
    assert_eq!(order["success_exit_codes"], json!([0, 2]));
    assert_eq!(order["restart"], "reboot");
    assert_eq!(first["firmware_hold"], Value::Null);

    let status = get(&daemon, "/firmware/status").await;
    assert_eq!(status["drift"]["updating_nodes"], 1, "{status}");
    assert_eq!(status["rollout"]["slots"][0]["uuid"], NODE_A);
    let line = &status["drift"]["lines"][0];
    assert_eq!(
        (
            &line["component"],
            &line["expected"],
            &line["actual"],
            &line["nodes"],
            &line["bundle"]
        ),
        (
            &json!("bios"),
            &json!("2.0"),
            &json!("1.4"),
            &json!(1),
            &json!("bios-2")
        ),
        "{status}"
    );

    let (code, answer) = report(&daemon, NODE_A, "applied", 2).await;
    assert_eq!(code, 200, "{answer}");
    assert_eq!(answer["next"], "reboot");
    // The machine restarts on its new BIOS and registers again.
    let back = register(&daemon, NODE_A, 1, "2.0").await;
    assert_eq!(back["firmware_update"], Value::Null, "{back}");
    assert_eq!(back["firmware_hold"], Value::Null);

    let view = get(&daemon, &format!("/nodes/{NODE_A}/firmware")).await;
    let bios = view["components"]
        .as_array()
        .unwrap()
        .iter()
        .find(|c| c["component"] == "bios")
        .unwrap()
        .clone();
    assert_eq!(bios["current"], "2.0", "{view}");
    assert_eq!(bios["first_seen"], "1.4");
    assert_eq!(bios["last_flashed"], "2.0");
    assert_eq!(bios["compliant"], true);
    assert!(bios["last_flashed_at_ms"].as_i64().is_some());
    assert_eq!(view["update"], Value::Null);

    let status = get(&daemon, "/firmware/status").await;
    assert_eq!(status["drift"]["compliant_nodes"], 1, "{status}");
    assert_eq!(status["rollout"]["tallies"]["bios-2"]["succeeded"], 1);
    assert_eq!(status["rollout"]["slots"], json!([]));
    let trail = actions(&daemon, NODE_A).await;
    for action in [
        "firmware_changed",
        "firmware_update_started",
        "firmware_applied",
        "firmware_flashed",
    ] {
        assert!(trail.iter().any(|a| a == action), "{action} in {trail:?}");
    }
    // The node then boots as any other.
    let script = daemon
        .request("GET", &format!("/ipxe/{NODE_A}"), None, None)
        .await;
    assert!(script.text().contains("kernel"), "{}", script.text());
}

#[tokio::test]
async fn a_node_behind_is_ordered_its_bundle_and_recorded_flashed_on_sqlite() {
    a_node_behind_is_flashed_and_recorded("sqlite").await;
}

#[tokio::test]
async fn a_node_behind_is_ordered_its_bundle_and_recorded_flashed_on_postgres() {
    a_node_behind_is_flashed_and_recorded("postgres").await;
}

#[tokio::test]
async fn the_rollout_holds_nodes_past_its_cap_and_pause_and_resume_are_audited() {
    let daemon = daemon("sqlite", policy()).await;
    assert!(register(&daemon, NODE_A, 1, "1.0").await["firmware_update"].is_object());
    let held = register(&daemon, NODE_B, 2, "1.0").await;
    assert_eq!(held["firmware_update"], Value::Null, "{held}");
    let why = held["firmware_hold"].as_str().unwrap();
    assert!(why.contains("firmware.updates_max"), "{why}");
    // A held machine gets no target OS: the boot script is not what it asks for, and the
    // boot watchdog gives it the hold's own deadline.
    let node = get(&daemon, &format!("/nodes/{NODE_B}")).await;
    assert_eq!(node["boot"]["phase"], "firmware", "{node}");

    // Pause: a viewer may not, an operator may, a second pause says who paused.
    let viewer = daemon
        .request(
            "POST",
            "/api/v1/firmware/rollout/pause",
            Some(&daemon.viewer_token),
            Some(b"{}"),
        )
        .await;
    assert_eq!(viewer.status, 403, "{}", viewer.text());
    let paused = daemon
        .request(
            "POST",
            "/api/v1/firmware/rollout/pause",
            Some(&daemon.operator_token),
            Some(br#"{"reason":"vendor advisory"}"#),
        )
        .await;
    assert_eq!(paused.status, 200, "{}", paused.text());
    assert_eq!(json_of(&paused)["paused"]["reason"], "vendor advisory");
    let again = daemon
        .admin(
            "POST",
            "/firmware/rollout/pause",
            Some(json!({"reason": "twice"})),
        )
        .await;
    assert_eq!(again.0, 409, "{}", again.1);
    assert_eq!(again.1["error"], "already_paused");

    // Node A comes back flashed; B still waits, now for the pause.
    register(&daemon, NODE_A, 1, "2.0").await;
    let still = register(&daemon, NODE_B, 2, "1.0").await;
    assert!(
        still["firmware_hold"]
            .as_str()
            .unwrap()
            .contains("paused by token:operator (vendor advisory)"),
        "{still}"
    );
    let resumed = daemon
        .admin("POST", "/firmware/rollout/resume", Some(json!({})))
        .await;
    assert_eq!(resumed.0, 200, "{}", resumed.1);
    assert_eq!(resumed.1["paused"], Value::Null);
    let not_paused = daemon
        .admin("POST", "/firmware/rollout/resume", Some(json!({})))
        .await;
    assert_eq!(not_paused.1["error"], "not_paused");
    assert!(register(&daemon, NODE_B, 2, "1.0").await["firmware_update"].is_object());

    let events = get(&daemon, "/events?limit=100").await;
    let fleet: Vec<&str> = events
        .as_array()
        .unwrap()
        .iter()
        .map(|e| e["action"].as_str().unwrap())
        .collect();
    for action in [
        "firmware_bundle_create",
        "firmware_rollout_paused",
        "firmware_rollout_resumed",
    ] {
        assert!(fleet.contains(&action), "{action} in {fleet:?}");
    }
}

#[tokio::test]
async fn failed_updates_take_the_node_out_of_service_until_an_operator_retries() {
    let daemon = daemon("sqlite", policy()).await;
    assert!(register(&daemon, NODE_C, 3, "1.0").await["firmware_update"].is_object());
    let (code, answer) = report(&daemon, NODE_C, "failed", 7).await;
    assert_eq!(code, 200, "{answer}");
    assert_eq!(answer["next"], "register_again");
    // Retried once more (attempts_max = 2), failed again: out of service.
    assert!(register(&daemon, NODE_C, 3, "1.0").await["firmware_update"].is_object());
    report(&daemon, NODE_C, "failed", 7).await;
    let node = get(&daemon, &format!("/nodes/{NODE_C}")).await;
    assert_eq!(node["state"], "maintenance", "{node}");
    let reason = node["maintenance"]["reason"].as_str().unwrap();
    assert!(reason.contains("failed 2 time(s)"), "{reason}");
    assert!(
        reason.contains("flash-bios: done"),
        "the last failure's detail: {reason}"
    );
    let held = register(&daemon, NODE_C, 3, "1.0").await;
    assert_eq!(held["firmware_update"], Value::Null, "{held}");
    assert!(held["firmware_hold"]
        .as_str()
        .unwrap()
        .contains("bearman firmware retry"));
    let status = get(&daemon, "/firmware/status").await;
    assert_eq!(status["drift"]["failed_nodes"], 1, "{status}");
    assert_eq!(status["rollout"]["tallies"]["bios-2"]["failed"], 2);

    let retried = daemon
        .request(
            "POST",
            &format!("/api/v1/nodes/{NODE_C}/firmware/retry"),
            Some(&daemon.operator_token),
            Some(br#"{"reason":"replaced the flash chip"}"#),
        )
        .await;
    assert_eq!(retried.status, 200, "{}", retried.text());
    let node = json_of(&retried);
    assert_ne!(node["state"], "maintenance", "{node}");
    assert_eq!(node["firmware_update"]["failures"], 0);
    let nothing = daemon
        .admin(
            "POST",
            &format!("/nodes/{NODE_C}/firmware/retry"),
            Some(json!({})),
        )
        .await;
    assert_eq!(nothing.1["error"], "nothing_to_retry", "{}", nothing.1);
    assert!(register(&daemon, NODE_C, 3, "1.0").await["firmware_update"].is_object());
    let trail = actions(&daemon, NODE_C).await;
    assert!(trail.iter().any(|a| a == "firmware_update_failed"));
    assert!(trail.iter().any(|a| a == "firmware_retry"));
}

#[tokio::test]
async fn bad_bundles_and_reports_are_refused_and_change_nothing() {
    let daemon = daemon("sqlite", policy()).await;
    for (field, bad) in [
        (
            "artifact.sha256",
            json!({"artifact": {"url": "/images/x", "sha256": "zz"}}),
        ),
        ("component", json!({"component": "gpu"})),
        ("command", json!({"command": []})),
        ("size_bytes", json!({"size_bytes": 0})),
        ("timeout_s", json!({"timeout_s": 999_999})),
    ] {
        let mut body = bundle_json("bad");
        for (key, value) in bad.as_object().unwrap() {
            body[key] = value.clone();
        }
        let (status, answer) = daemon.admin("POST", "/firmware/bundles", Some(body)).await;
        assert_eq!(status, 422, "{field}: {answer}");
        assert!(
            answer["message"].as_str().unwrap().contains(field),
            "{field}: {answer}"
        );
    }
    let unknown = daemon
        .admin(
            "POST",
            "/firmware/bundles",
            Some(json!({"name": "x", "surprise": 1})),
        )
        .await;
    assert_eq!(unknown.0, 422, "{}", unknown.1);
    let duplicate = daemon
        .admin("POST", "/firmware/bundles", Some(bundle_json("bios-2")))
        .await;
    assert_eq!(duplicate.0, 409);
    let operator = daemon
        .request(
            "POST",
            "/api/v1/firmware/bundles",
            Some(&daemon.operator_token),
            Some(&serde_json::to_vec(&bundle_json("op")).unwrap()),
        )
        .await;
    assert_eq!(operator.status, 403, "adding bundles is an admin's");
    let bundles = get(&daemon, "/firmware/bundles").await;
    assert_eq!(bundles.as_array().unwrap().len(), 1, "{bundles}");

    // A report with nothing in flight, or too long, is refused.
    register(&daemon, NODE_A, 1, "2.0").await;
    let (code, answer) = report(&daemon, NODE_A, "applied", 0).await;
    assert_eq!(code, 409, "{answer}");
    assert_eq!(answer["error"], "no_update_in_flight");
    let long = json!({"bundle": "bios-2", "outcome": "failed", "detail": "x".repeat(5000)});
    assert_eq!(boot(&daemon, NODE_A, "/firmware", long).await.0, 422);
    let bogus = json!({"bundle": "bios-2", "outcome": "exploded"});
    assert_eq!(boot(&daemon, NODE_A, "/firmware", bogus).await.0, 422);
    let missing = daemon
        .admin("DELETE", "/firmware/bundles/nope", Some(json!({})))
        .await;
    assert_eq!(missing.0, 404, "{}", missing.1);
    let rollout = get(&daemon, "/firmware/rollout").await;
    assert_eq!(
        rollout["generation"], 0,
        "nothing wrote the rollout: {rollout}"
    );
}
