//! The attacks the hardening issue found, replayed against a daemon with the production
//! defaults (enrollment closed), each asserting the fixed behaviour: someone on the
//! provisioning network who can reach `/ipxe` and claim any uuid. Secrets on argv are
//! replayed in `daemon/tests/secrets_argv.rs`, a viewer's power-off in
//! `daemon/tests/power_api.rs`, the database outage in `daemon/tests/readiness.rs`.
//! Idle, slow and partial connections and a boot-protocol flood are replayed in
//! `tests/tests/connection_limits.rs`; TLS on the admin listener in `daemon/tests/tls_serve.rs`.

use bearman_e2e::{flavor_json, json_of, node_pool_json, register_body, Options, TestDaemon};
use serde_json::{json, Value};

async fn closed_daemon() -> TestDaemon {
    let daemon = TestDaemon::sqlite(Options {
        default_flavor: Some("hv".into()),
        enrollment: bearman::core::enrollment::EnrollmentPolicy::default(),
        ..Options::default()
    })
    .await;
    assert_eq!(
        daemon
            .admin("POST", "/flavors", Some(flavor_json("hv")))
            .await
            .0,
        201
    );
    let mut pool = node_pool_json();
    // Twenty addresses: the pool the original attack drained.
    pool["range_end"] = json!("10.10.0.29");
    assert_eq!(daemon.admin("POST", "/pools", Some(pool)).await.0, 201);
    daemon
}

async fn register(daemon: &TestDaemon, uuid: &str, body: &Value) -> (u16, Value) {
    let bytes = serde_json::to_vec(body).unwrap();
    let response = daemon
        .request(
            "POST",
            &format!("/ipxe/{uuid}/register"),
            None,
            Some(&bytes),
        )
        .await;
    (response.status, json_of(&response))
}

fn uuid(index: u32) -> String {
    format!("4c4c4544-0042-3510-8052-{index:012x}")
}

async fn events(daemon: &TestDaemon) -> Vec<Value> {
    let (status, events) = daemon.admin("GET", "/events?limit=10000", None).await;
    assert_eq!(status, 200);
    events.as_array().unwrap().clone()
}

/// Random uuids used to drain a 20-address pool so the next 30 real machines got 503.
/// Now they wait unaccepted, holding nothing, and a real machine accepted by an operator
/// still gets an address.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn made_up_uuids_cannot_drain_the_pool() {
    let daemon = closed_daemon().await;
    for index in 0..40 {
        let (status, body) = register(
            &daemon,
            &uuid(0xbad000 + index),
            &json!(register_body(index)),
        )
        .await;
        assert_eq!(status, 202, "{body}");
        assert_eq!(body["awaiting_acceptance"], true, "{body}");
        assert_eq!(body["bmc"], Value::Null);
    }
    let (_, pool) = daemon.admin("GET", "/pools/rack-a", None).await;
    assert_eq!(pool["allocations"], json!([]), "{pool}");
    // A waiting machine is served no boot files either.
    let detail = daemon
        .request(
            "GET",
            &format!("/ipxe/{}/detail", uuid(0xbad000)),
            None,
            None,
        )
        .await;
    assert_eq!(detail.status, 409);
    assert_eq!(json_of(&detail)["error"], "awaiting_acceptance");
    let profile = daemon
        .request(
            "GET",
            &format!("/ipxe/{}/profile", uuid(0xbad000)),
            None,
            None,
        )
        .await;
    assert_eq!(profile.status, 409);

    let real = uuid(0x00c0ffee);
    let body = json!(register_body(900));
    assert_eq!(register(&daemon, &real, &body).await.0, 202);
    let (status, accepted) = daemon
        .admin(
            "POST",
            &format!("/nodes/{real}/accept"),
            Some(json!({"reason": "delivery 42"})),
        )
        .await;
    assert_eq!(status, 200, "{accepted}");
    let (status, registered) = register(&daemon, &real, &body).await;
    assert_eq!(status, 200, "{registered}");
    assert_eq!(registered["state"], "registered");
    let (_, pool) = daemon.admin("GET", "/pools/rack-a", None).await;
    let holders: Vec<&Value> = pool["allocations"]
        .as_array()
        .unwrap()
        .iter()
        .map(|a| &a["node_uuid"])
        .collect();
    assert_eq!(holders, [&json!(real)], "{pool}");
    let all = events(&daemon).await;
    let accepted_events: Vec<&Value> = all
        .iter()
        .filter(|e| e["action"] == "accepted" && e["node_uuid"] == real.as_str())
        .collect();
    assert_eq!(accepted_events.len(), 1);
    assert_eq!(accepted_events[0]["actor"], "token:admin");
}

/// Past `enrollment.pending_max` waiting machines, new uuids are refused with 503 and
/// the refusals are summarised, not written one per request.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn waiting_machines_are_bounded_and_their_refusals_summarised() {
    let policy = bearman::core::enrollment::EnrollmentPolicy {
        pending_max: 5,
        ..Default::default()
    };
    let daemon = TestDaemon::sqlite(Options {
        default_flavor: Some("hv".into()),
        enrollment: policy,
        ..Options::default()
    })
    .await;
    for index in 0..5 {
        assert_eq!(
            register(&daemon, &uuid(index), &json!(register_body(index)))
                .await
                .0,
            202
        );
    }
    let before = events(&daemon).await.len();
    for index in 5..205 {
        let (status, body) = register(&daemon, &uuid(index), &json!(register_body(index))).await;
        assert_eq!(status, 503, "{body}");
        assert_eq!(body["error"], "enlistment_full", "{body}");
    }
    let (_, nodes) = daemon.admin("GET", "/nodes?limit=1000", None).await;
    assert_eq!(
        nodes.as_array().unwrap().len(),
        5,
        "refused uuids leave no record"
    );
    let written = events(&daemon).await.len() - before;
    assert_eq!(
        written, 1,
        "200 refusals, one event (the rest counted for the summary)"
    );
}

/// One registration of a uuid sharing the last 12 hex digits of a real machine's used to
/// take that machine's default hostname and make its registration fail with 409 forever.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_crafted_uuid_cannot_take_another_machines_hostname() {
    let daemon = TestDaemon::sqlite(Options {
        default_flavor: Some("hv".into()),
        ..Options::default()
    })
    .await;
    let real = "4c4c4544-0042-3510-8052-b4c04f4e4a32";
    let crafted = "ffffffff-ffff-ffff-ffff-b4c04f4e4a32";
    let (status, body) = register(&daemon, crafted, &json!(register_body(1))).await;
    assert_eq!(status, 200, "{body}");
    let (status, body) = register(&daemon, real, &json!(register_body(2))).await;
    assert_eq!(status, 200, "the real machine still registers: {body}");
    assert_eq!(body["hostname"], format!("node-{real}"));
}

/// Escape sequences, control characters and 100 KB strings from a machine used to reach
/// operators' terminals (and a 70,000-character LLDP name made `node list` panic).
/// Each is refused with 422 naming the field, and nothing is recorded.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hostile_strings_from_a_machine_are_refused_naming_the_field() {
    let daemon = TestDaemon::sqlite(Options::default()).await;
    let long = "x".repeat(100_000);
    let mut cases: Vec<(&str, Value)> = Vec::new();
    let mut body = json!(register_body(1));
    body["nics"][0]["lldp"]["system_name"] = json!("tor\u{1b}[2J\u{1b}[31mOWNED");
    cases.push(("nics[0].lldp.system_name", body));
    let mut body = json!(register_body(1));
    body["nics"][0]["lldp"]["system_name"] = json!("y".repeat(70_000));
    cases.push(("nics[0].lldp.system_name", body));
    let mut body = json!(register_body(1));
    body["firmware"]["bios"] = json!(long);
    cases.push(("firmware.bios", body));
    let mut body = json!(register_body(1));
    body["firmware"]["bmc"] = json!("1.0\u{7}\u{8}");
    cases.push(("firmware.bmc", body));
    let mut body = json!(register_body(1));
    body["vendor"] = json!("Dell\u{202e}lleD");
    cases.push(("vendor", body));
    let mut body = json!(register_body(1));
    let nics: serde_json::Map<String, Value> = (0..5000)
        .map(|i| (format!("eth{i}"), json!("1.0")))
        .collect();
    body["firmware"]["nics"] = Value::Object(nics);
    cases.push(("firmware.nics", body));
    let mut body = json!(register_body(1));
    body["bmc"] = json!({"mac": "52:54:00:00:00:99", "address": "10.0.0.1\u{1b}]0;x\u{7}"});
    cases.push(("bmc.address", body));
    for (field, body) in cases {
        let (status, error) = register(&daemon, &uuid(1), &body).await;
        assert_eq!(status, 422, "{field}: {error}");
        assert!(
            error["message"].as_str().unwrap().contains(field),
            "{field}: {error}"
        );
    }
    let (_, nodes) = daemon.admin("GET", "/nodes", None).await;
    assert_eq!(nodes, json!([]), "a refused registration records nothing");
    assert!(
        events(&daemon)
            .await
            .iter()
            .all(|e| e["node_uuid"] != uuid(1).as_str()),
        "nor audits anything"
    );
}

/// 200 heartbeats from a node that should be silent used to write 200 audit events.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_heartbeat_flood_writes_one_event() {
    let daemon = TestDaemon::sqlite(Options {
        default_flavor: Some("hv".into()),
        ..Options::default()
    })
    .await;
    let node = uuid(7);
    assert_eq!(
        register(&daemon, &node, &json!(register_body(7))).await.0,
        200
    );
    let before = events(&daemon).await.len();
    for _ in 0..200 {
        let response = daemon
            .request("POST", &format!("/ipxe/{node}/heartbeat"), None, None)
            .await;
        assert_eq!(
            response.status, 409,
            "a registered node never installed is silent"
        );
    }
    let after = events(&daemon).await;
    let new: Vec<&Value> = after[..after.len() - before].iter().collect();
    assert_eq!(new.len(), 1, "{new:?}");
    assert_eq!(new[0]["action"], "unexpected_heartbeat");
}
