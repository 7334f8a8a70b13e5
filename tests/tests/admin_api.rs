//! Behaviour of the admin API under `/api/v1` over real HTTP against a daemon on SQLite:
//! enrolment, listing, updates under optimistic concurrency, lifecycle actions, flavors,
//! pools, tokens and the audit trail.

use bearman_e2e::{flavor_json, json_of, node_pool_json, register_body, Options, TestDaemon};
use serde_json::{json, Value};

const NODE_A: &str = "4c4c4544-0042-3510-8052-b4c04f4e4a32";
const NODE_B: &str = "4c4c4544-0042-3510-8052-b4c04f4e4a33";
const NODE_C: &str = "4c4c4544-0042-3510-8052-b4c04f4e4a34";

/// A daemon with flavor `hv` (the default) and node pool `rack-a`.
async fn daemon() -> TestDaemon {
    let daemon = TestDaemon::sqlite(Options {
        default_flavor: Some("hv".into()),
        ..Default::default()
    })
    .await;
    assert_eq!(
        daemon
            .admin("POST", "/flavors", Some(flavor_json("hv")))
            .await
            .0,
        201
    );
    assert_eq!(
        daemon
            .admin("POST", "/pools", Some(node_pool_json()))
            .await
            .0,
        201
    );
    daemon
}

/// A boot-protocol request from the node itself (no token); must succeed.
async fn boot(
    daemon: &TestDaemon,
    method: &str,
    uuid: &str,
    suffix: &str,
    body: Option<Value>,
) -> Value {
    let bytes = body.map(|b| serde_json::to_vec(&b).unwrap());
    let path = format!("/ipxe/{uuid}{suffix}");
    let response = daemon.request(method, &path, None, bytes.as_deref()).await;
    assert_eq!(response.status, 200, "{method} {path}: {}", response.text());
    json_of(&response)
}

async fn register(daemon: &TestDaemon, uuid: &str, index: u32) -> Value {
    let body = serde_json::to_value(register_body(index)).unwrap();
    boot(daemon, "POST", uuid, "/register", Some(body)).await
}

/// Takes a node from nothing to `ready` with a heartbeat on record.
async fn bring_up(daemon: &TestDaemon, uuid: &str, index: u32) {
    register(daemon, uuid, index).await;
    let response = daemon
        .request("GET", &format!("/ipxe/{uuid}"), None, None)
        .await;
    assert_eq!(response.status, 200, "{}", response.text());
    assert_eq!(
        boot(daemon, "POST", uuid, "/installed", None).await["state"],
        "ready"
    );
    assert_eq!(
        boot(
            daemon,
            "POST",
            uuid,
            "/heartbeat",
            Some(json!({"uptime_s": 5}))
        )
        .await["state"],
        "ready"
    );
}

/// `GET /api/v1{path}` that must succeed.
async fn get(daemon: &TestDaemon, path: &str) -> Value {
    let (status, body) = daemon.admin("GET", path, None).await;
    assert_eq!(status, 200, "GET {path}: {body}");
    body
}

async fn node(daemon: &TestDaemon, uuid: &str) -> Value {
    get(daemon, &format!("/nodes/{uuid}")).await
}

/// An admin request that must fail with `status` and `code`, mentioning `mentions`, and
/// leave the node list, the pools and the audit trail exactly as they were.
async fn check(
    daemon: &TestDaemon,
    method: &str,
    path: &str,
    body: Option<Value>,
    status: u16,
    code: &str,
    mentions: &str,
) {
    let before = (
        get(daemon, "/nodes").await,
        get(daemon, "/pools").await,
        get(daemon, "/events?limit=10000").await,
    );
    let (got, error) = daemon.admin(method, path, body.clone()).await;
    let what = format!("{method} {path} {}", body.unwrap_or(Value::Null));
    assert_eq!(got, status, "{what}: {error}");
    assert_eq!(error["error"], code, "{what}: {error}");
    let message = error["message"].as_str().unwrap_or_default();
    assert!(
        message.contains(mentions),
        "{what}: {message:?} does not mention {mentions:?}"
    );
    let after = (
        get(daemon, "/nodes").await,
        get(daemon, "/pools").await,
        get(daemon, "/events?limit=10000").await,
    );
    assert_eq!(before, after, "{what} was refused but changed something");
}

fn uuids_of(nodes: &Value) -> Vec<String> {
    nodes
        .as_array()
        .unwrap_or_else(|| panic!("not a list: {nodes}"))
        .iter()
        .map(|n| n["uuid"].as_str().unwrap().to_string())
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn enrolled_node_is_discovered_until_it_registers() {
    let daemon = daemon().await;
    let (status, enrolled) = daemon
        .admin(
            "POST",
            "/nodes",
            Some(json!({"uuid": NODE_A.to_uppercase(), "role": "storage", "rack": "r07"})),
        )
        .await;
    assert_eq!(status, 201, "{enrolled}");
    assert_eq!(enrolled["uuid"], NODE_A, "stored in canonical lowercase");
    assert_eq!(enrolled["state"], "discovered");
    assert_eq!(enrolled["hostname"], format!("node-{NODE_A}"));
    assert_eq!(
        enrolled["flavor"], "hv",
        "the default flavor applies to enrolled nodes too"
    );

    // A discovered node is sent to stage 1 to register itself.
    let script = daemon
        .request("GET", &format!("/ipxe/{NODE_A}"), None, None)
        .await;
    assert!(
        script.text().contains(&format!("bearman.uuid={NODE_A}")),
        "{}",
        script.text()
    );
    assert_eq!(node(&daemon, NODE_A).await["state"], "discovered");

    let registered = register(&daemon, NODE_A, 1).await;
    assert_eq!(registered["state"], "registered");
    let bound = node(&daemon, NODE_A).await;
    assert_eq!(bound["state"], "registered");
    assert_eq!(
        bound["serial"], "R640SN0001",
        "the enrolled record binds to the first hardware"
    );
    assert_eq!(bound["role"], "storage", "what the operator set is kept");
    assert_eq!(bound["rack"], "r07", "an operator's rack beats LLDP");
    assert_eq!(
        bound["network"]["bond0_addresses"],
        json!(["10.10.0.10/24"])
    );
    assert_eq!(
        get(&daemon, "/summary").await["total"],
        1,
        "no second record"
    );

    let events = get(&daemon, &format!("/nodes/{NODE_A}/events")).await;
    let actions: Vec<&str> = events
        .as_array()
        .unwrap()
        .iter()
        .rev()
        .map(|e| e["action"].as_str().unwrap())
        .collect();
    // The first registration also records the firmware versions it reported, in one event.
    assert_eq!(actions, vec!["enroll", "register", "firmware_changed"]);

    check(
        &daemon,
        "POST",
        "/nodes",
        Some(json!({"uuid": NODE_A})),
        409,
        "already_exists",
        NODE_A,
    )
    .await;
    check(
        &daemon,
        "POST",
        "/nodes",
        Some(json!({"uuid": "nope"})),
        422,
        "invalid_field",
        "field uuid",
    )
    .await;
    let unknown_flavor = json!({"uuid": NODE_B, "flavor": "nope"});
    check(
        &daemon,
        "POST",
        "/nodes",
        Some(unknown_flavor),
        422,
        "invalid_field",
        "field flavor",
    )
    .await;
    let bad_hostname = json!({"uuid": NODE_B, "hostname": "Not_A_Host"});
    check(
        &daemon,
        "POST",
        "/nodes",
        Some(bad_hostname),
        422,
        "invalid_field",
        "field hostname",
    )
    .await;
    // Another node's default hostname is reserved for it, taken or not.
    let reserved_hostname = json!({"uuid": NODE_B, "hostname": format!("node-{NODE_A}")});
    check(
        &daemon,
        "POST",
        "/nodes",
        Some(reserved_hostname),
        422,
        "invalid_field",
        "default hostname of another node",
    )
    .await;
    let unknown_field = json!({"uuid": NODE_B, "colour": "red"});
    check(
        &daemon,
        "POST",
        "/nodes",
        Some(unknown_field),
        422,
        "invalid_field",
        "colour",
    )
    .await;
    let bad_secret = json!({"uuid": NODE_B, "bmc": {"credentials_ref": "hunter2"}});
    check(
        &daemon,
        "POST",
        "/nodes",
        Some(bad_secret),
        422,
        "invalid_field",
        "bmc.credentials_ref",
    )
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn node_list_filters_by_state_rack_and_role() {
    let daemon = daemon().await;
    register(&daemon, NODE_A, 1).await; // rack tor-a01 from LLDP, compute
    register(&daemon, NODE_B, 2).await;
    let generation = node(&daemon, NODE_B).await["generation"].clone();
    let (status, _) = daemon
        .admin(
            "PATCH",
            &format!("/nodes/{NODE_B}"),
            Some(json!({"role": "control_plane", "generation": generation})),
        )
        .await;
    assert_eq!(status, 200);
    let (status, _) = daemon
        .admin(
            "POST",
            "/nodes",
            Some(json!({"uuid": NODE_C, "rack": "r9", "role": "storage"})),
        )
        .await;
    assert_eq!(status, 201);

    let cases: [(&str, Vec<&str>); 11] = [
        ("", vec![NODE_A, NODE_B, NODE_C]),
        ("?state=registered", vec![NODE_A, NODE_B]),
        ("?state=discovered", vec![NODE_C]),
        ("?state=ready", vec![]),
        ("?rack=tor-a01", vec![NODE_A, NODE_B]),
        ("?rack=r9", vec![NODE_C]),
        ("?role=storage", vec![NODE_C]),
        ("?role=control_plane", vec![NODE_B]),
        ("?state=registered&role=compute", vec![NODE_A]),
        ("?limit=2", vec![NODE_A, NODE_B]),
        (&format!("?after={NODE_A}&limit=1"), vec![NODE_B]),
    ];
    for (query, expected) in cases {
        let nodes = get(&daemon, &format!("/nodes{query}")).await;
        assert_eq!(uuids_of(&nodes), expected, "GET /nodes{query}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn node_list_rejects_unknown_query_parameters_and_values() {
    let daemon = daemon().await;
    register(&daemon, NODE_A, 1).await;
    let cases = [
        ("?colour=red", "colour"),
        ("?stat=ready", "stat"),
        ("?state=bogus", "bogus"),
        ("?state=Ready", "Ready"),
        ("?role=chef", "chef"),
        ("?limit=many", "limit"),
        ("?limit=-1", "limit"),
        ("?after=not-a-uuid", "after"),
        ("?rack=%zz", "escape"),
    ];
    for (query, mentions) in cases {
        check(
            &daemon,
            "GET",
            &format!("/nodes{query}"),
            None,
            400,
            "invalid_query",
            mentions,
        )
        .await;
    }
    check(
        &daemon,
        "GET",
        "/events?colour=red",
        None,
        400,
        "invalid_query",
        "colour",
    )
    .await;
    check(
        &daemon,
        "GET",
        "/events?node=nope",
        None,
        400,
        "invalid_query",
        "node",
    )
    .await;
    check(
        &daemon,
        "GET",
        &format!("/nodes/{NODE_A}/events?node={NODE_A}"),
        None,
        400,
        "invalid_query",
        "node",
    )
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn patch_with_stale_generation_is_refused_and_changes_nothing() {
    let daemon = daemon().await;
    register(&daemon, NODE_A, 1).await;
    let original = node(&daemon, NODE_A).await;
    let generation = original["generation"].as_i64().unwrap();

    let (status, updated) = daemon
        .admin(
            "PATCH",
            &format!("/nodes/{NODE_A}"),
            Some(json!({"hostname": "web-1", "generation": generation})),
        )
        .await;
    assert_eq!(status, 200, "{updated}");
    assert_eq!(updated["hostname"], "web-1");
    assert_eq!(updated["generation"], generation + 1);
    assert_eq!(
        node(&daemon, NODE_A).await,
        updated,
        "the answer is what is stored"
    );

    let stale = json!({"hostname": "web-2", "rack": "r2", "generation": generation});
    check(
        &daemon,
        "PATCH",
        &format!("/nodes/{NODE_A}"),
        Some(stale),
        409,
        "generation_mismatch",
        "generation",
    )
    .await;
    assert_eq!(node(&daemon, NODE_A).await["hostname"], "web-1");

    // Without a generation the update applies to whatever is current.
    let (status, blind) = daemon
        .admin(
            "PATCH",
            &format!("/nodes/{NODE_A}"),
            Some(json!({"rack": "r2"})),
        )
        .await;
    assert_eq!(status, 200, "{blind}");
    assert_eq!(
        (blind["rack"].as_str(), blind["hostname"].as_str()),
        (Some("r2"), Some("web-1"))
    );
    let events = get(&daemon, &format!("/nodes/{NODE_A}/events")).await;
    assert_eq!(events[0]["action"], "update");
    assert!(
        events[0]["actor"].as_str().unwrap().starts_with("token:"),
        "{}",
        events[0]
    );

    // Nothing to change is not a change.
    let (status, same) = daemon
        .admin(
            "PATCH",
            &format!("/nodes/{NODE_A}"),
            Some(json!({"rack": "r2"})),
        )
        .await;
    assert_eq!((status, &same["generation"]), (200, &blind["generation"]));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn patch_hostname_clash_is_refused() {
    let daemon = daemon().await;
    register(&daemon, NODE_A, 1).await;
    register(&daemon, NODE_B, 2).await;
    let taken = "hv-a01-01".to_string();
    let (status, body) = daemon
        .admin(
            "PATCH",
            &format!("/nodes/{NODE_A}"),
            Some(json!({"hostname": taken})),
        )
        .await;
    assert_eq!(status, 200, "{body}");
    let clash = json!({"hostname": taken});
    check(
        &daemon,
        "PATCH",
        &format!("/nodes/{NODE_B}"),
        Some(clash),
        409,
        "already_exists",
        &taken,
    )
    .await;
    // Nor may a node take another's default hostname, even one no node uses now.
    check(
        &daemon,
        "PATCH",
        &format!("/nodes/{NODE_B}"),
        Some(json!({"hostname": format!("node-{NODE_A}")})),
        422,
        "invalid_field",
        "default hostname of another node",
    )
    .await;
    // The node that holds the name still boots with it.
    assert_eq!(
        boot(&daemon, "GET", NODE_A, "/detail", None).await["hostname"],
        taken.as_str()
    );
    assert_eq!(
        boot(&daemon, "GET", NODE_B, "/detail", None).await["hostname"],
        format!("node-{NODE_B}")
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn patch_with_invalid_fields_is_refused_naming_the_field() {
    let daemon = daemon().await;
    register(&daemon, NODE_A, 1).await;
    let path = format!("/nodes/{NODE_A}");
    let cases = [
        (json!({"hostname": "Web_1"}), "field hostname"),
        (json!({"hostname": ""}), "field hostname"),
        (json!({"hostname": "-web"}), "field hostname"),
        (json!({"hostname": "a".repeat(64)}), "field hostname"),
        (json!({"rack": "rack 7"}), "field rack"),
        (json!({"flavor": "nope"}), "field flavor"),
        (json!({"role": "chef"}), "chef"),
        (json!({"colour": "red"}), "colour"),
        (
            json!({"bmc": {"credentials_ref": "hunter2"}}),
            "field bmc.credentials_ref",
        ),
        (
            json!({"bmc": {"credentials_ref": "password:hunter2"}}),
            "field bmc.credentials_ref",
        ),
        (
            json!({"bmc": {"credentials_ref": "env:IPMI PASSWORD"}}),
            "field bmc.credentials_ref",
        ),
        (json!({"bmc": {"mac": "nope"}}), "field bmc.mac"),
        (
            json!({"bmc": {"address": "has space"}}),
            "field bmc.address",
        ),
        (json!({"bmc": {"driver": "telnet"}}), "telnet"),
    ];
    for (body, mentions) in cases {
        check(
            &daemon,
            "PATCH",
            &path,
            Some(body),
            422,
            "invalid_field",
            mentions,
        )
        .await;
    }
    check(
        &daemon,
        "PATCH",
        &path,
        Some(json!("rack")),
        422,
        "invalid_field",
        "invalid type",
    )
    .await;
    // References to where a secret lives are accepted.
    for reference in ["env:IPMI_PASSWORD", "file:oob/r640-1"] {
        let body = json!({"bmc": {"address": "10.20.0.5", "driver": "ipmi", "credentials_ref": reference}});
        let (status, updated) = daemon.admin("PATCH", &path, Some(body)).await;
        assert_eq!(status, 200, "{updated}");
        assert_eq!(updated["bmc"]["credentials_ref"], reference);
    }
    let missing = format!("/nodes/{NODE_C}");
    check(
        &daemon,
        "PATCH",
        &missing,
        Some(json!({"rack": "r1"})),
        404,
        "not_found",
        NODE_C,
    )
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn maintenance_on_then_off_with_fresh_heartbeat_is_ready() {
    let daemon = daemon().await;
    bring_up(&daemon, NODE_A, 1).await;
    let maintenance = format!("/api/v1/nodes/{NODE_A}/maintenance");
    let reason = serde_json::to_vec(&json!({"reason": "swap DIMM"})).unwrap();
    let on = daemon
        .request(
            "POST",
            &maintenance,
            Some(&daemon.operator_token),
            Some(&reason),
        )
        .await;
    assert_eq!(on.status, 200, "{}", on.text());
    assert_eq!(json_of(&on)["state"], "maintenance");
    // Heartbeats keep coming and do not pull the node out of maintenance.
    assert_eq!(
        boot(&daemon, "POST", NODE_A, "/heartbeat", None).await["state"],
        "maintenance"
    );

    let off = daemon
        .request("DELETE", &maintenance, Some(&daemon.operator_token), None)
        .await;
    assert_eq!(off.status, 200, "{}", off.text());
    assert_eq!(json_of(&off)["state"], "ready");

    let events = get(&daemon, &format!("/nodes/{NODE_A}/events")).await;
    let transitions: Vec<(String, String, String)> = events
        .as_array()
        .unwrap()
        .iter()
        .filter(|e| e["action"].as_str().unwrap().starts_with("maintenance"))
        .map(|e| {
            let text = |key: &str| e[key].as_str().unwrap_or_default().to_string();
            (text("action"), text("to_state"), text("actor"))
        })
        .collect();
    assert_eq!(
        transitions,
        vec![
            (
                "maintenance_off".into(),
                "ready".into(),
                "token:operator".into()
            ),
            (
                "maintenance_on".into(),
                "maintenance".into(),
                "token:operator".into()
            ),
        ]
    );
    assert_eq!(events[1]["reason"], "swap DIMM");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn maintenance_off_without_heartbeat_goes_back_to_registered() {
    let daemon = daemon().await;
    register(&daemon, NODE_A, 1).await;
    let (status, on) = daemon
        .admin("POST", &format!("/nodes/{NODE_A}/maintenance"), None)
        .await;
    assert_eq!(
        (status, on["state"].as_str()),
        (200, Some("maintenance")),
        "{on}"
    );
    let (status, off) = daemon
        .admin("DELETE", &format!("/nodes/{NODE_A}/maintenance"), None)
        .await;
    assert_eq!(
        (status, off["state"].as_str()),
        (200, Some("registered")),
        "{off}"
    );
    let path = format!("/nodes/{NODE_A}/maintenance");
    check(
        &daemon,
        "DELETE",
        &path,
        None,
        409,
        "illegal_transition",
        "maintenance_off",
    )
    .await;
    let long = json!({"reason": "x".repeat(2000)});
    check(
        &daemon,
        "POST",
        &path,
        Some(long),
        422,
        "invalid_field",
        "field reason",
    )
    .await;
}

/// The node record shows which address the node's heartbeats arrive from (here the
/// loopback address the test connects from), written by the first heartbeat with one
/// audit event; heartbeats from the same address after it change neither the record's
/// generation nor the audit trail (the hot path stays a timestamp write).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_heartbeat_source_is_shown_and_recorded_once() {
    let daemon = daemon().await;
    bring_up(&daemon, NODE_A, 1).await;
    let first = node(&daemon, NODE_A).await;
    assert_eq!(first["heartbeat_source"]["address"], "127.0.0.1", "{first}");
    assert_eq!(
        first["heartbeat_source"]["since_ms"], first["last_heartbeat_at_ms"],
        "{first}"
    );
    for _ in 0..3 {
        assert_eq!(
            boot(&daemon, "POST", NODE_A, "/heartbeat", None).await["state"],
            "ready"
        );
    }
    let later = node(&daemon, NODE_A).await;
    assert_eq!(later["heartbeat_source"], first["heartbeat_source"]);
    assert_eq!(later["generation"], first["generation"]);
    let events = get(&daemon, &format!("/nodes/{NODE_A}/events")).await;
    let changes: Vec<&str> = events
        .as_array()
        .unwrap()
        .iter()
        .filter(|event| event["action"] == "heartbeat_source_changed")
        .map(|event| event["reason"].as_str().unwrap())
        .collect();
    assert_eq!(changes, ["heartbeats from 127.0.0.1"]);
}

/// Stage 2's `installed` report is the first sign of life from the installed OS; the
/// daemon records it as a heartbeat, and that must survive the trip through the store.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn installed_report_counts_as_a_fresh_heartbeat() {
    let daemon = daemon().await;
    register(&daemon, NODE_A, 1).await;
    assert_eq!(
        daemon
            .request("GET", &format!("/ipxe/{NODE_A}"), None, None)
            .await
            .status,
        200
    );
    assert_eq!(
        boot(&daemon, "POST", NODE_A, "/installed", None).await["state"],
        "ready"
    );
    let installed = node(&daemon, NODE_A).await;
    assert!(installed["installed_at_ms"].is_i64(), "{installed}");
    assert_eq!(
        installed["last_heartbeat_at_ms"], installed["installed_at_ms"],
        "installed sets the heartbeat time"
    );
    let (status, _) = daemon
        .admin("POST", &format!("/nodes/{NODE_A}/maintenance"), None)
        .await;
    assert_eq!(status, 200);
    let (status, off) = daemon
        .admin("DELETE", &format!("/nodes/{NODE_A}/maintenance"), None)
        .await;
    assert_eq!(
        (status, off["state"].as_str()),
        (200, Some("ready")),
        "{off}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn retire_releases_the_address_and_cannot_be_repeated() {
    let daemon = daemon().await;
    bring_up(&daemon, NODE_A, 1).await;
    register(&daemon, NODE_B, 2).await;
    let holders = |detail: &Value| -> Vec<(String, String)> {
        detail["allocations"]
            .as_array()
            .unwrap()
            .iter()
            .map(|a| {
                (
                    a["address"].as_str().unwrap().to_string(),
                    a["node_uuid"].as_str().unwrap().to_string(),
                )
            })
            .collect()
    };
    let pool = get(&daemon, "/pools/rack-a").await;
    assert_eq!(pool["size"], 191);
    assert_eq!(
        holders(&pool),
        vec![
            ("10.10.0.10".to_string(), NODE_A.to_string()),
            ("10.10.0.11".to_string(), NODE_B.to_string())
        ]
    );

    let (status, retired) = daemon
        .admin(
            "POST",
            &format!("/nodes/{NODE_A}/retire"),
            Some(json!({"reason": "decommissioned"})),
        )
        .await;
    assert_eq!(
        (status, retired["state"].as_str()),
        (200, Some("retired")),
        "{retired}"
    );
    let pool = get(&daemon, "/pools/rack-a").await;
    assert_eq!(
        holders(&pool),
        vec![("10.10.0.11".to_string(), NODE_B.to_string())]
    );

    let path = format!("/nodes/{NODE_A}/retire");
    check(
        &daemon,
        "POST",
        &path,
        None,
        409,
        "illegal_transition",
        "retired",
    )
    .await;
    let path = format!("/nodes/{NODE_A}/maintenance");
    check(
        &daemon,
        "POST",
        &path,
        None,
        409,
        "illegal_transition",
        "retired",
    )
    .await;

    // The retired node no longer boots, and the audit trail says who retired it and why.
    let (status, _) = daemon.admin("GET", &format!("/nodes/{NODE_A}"), None).await;
    assert_eq!(status, 200, "a retired node stays on record");
    let events = get(&daemon, &format!("/nodes/{NODE_A}/events")).await;
    assert_eq!(events[0]["action"], "retire");
    assert_eq!(events[0]["reason"], "decommissioned");
    assert_eq!(events[0]["actor"], "token:admin");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn flavor_create_replace_and_delete_follow_the_rules() {
    let daemon = daemon().await;
    let with = |edit: fn(&mut Value)| {
        let mut flavor = flavor_json("lab");
        edit(&mut flavor);
        flavor
    };
    let invalid = [
        (
            with(|f| f["kernel"]["sha256"] = json!("abc")),
            "field kernel.sha256",
        ),
        (
            with(|f| f["kernel"]["sha256"] = json!("A".repeat(64))),
            "field kernel.sha256",
        ),
        (
            with(|f| f["initrds"][0]["sha256"] = json!("g".repeat(64))),
            "field initrds[0].sha256",
        ),
        (
            with(|f| f["kernel"]["url"] = json!("ftp://x/vmlinuz")),
            "field kernel.url",
        ),
        (with(|f| f["name"] = json!("Lab Flavor")), "field name"),
        (
            with(|f| f["cmdline_template"] = json!("root={rootfs}")),
            "field cmdline_template",
        ),
        (
            with(|f| f["cmdline_template"] = json!("a\nb")),
            "field cmdline_template",
        ),
        (with(|f| f["colour"] = json!("red")), "colour"),
        (
            with(|f| drop(f.as_object_mut().unwrap().remove("kernel"))),
            "kernel",
        ),
    ];
    for (flavor, mentions) in invalid {
        check(
            &daemon,
            "POST",
            "/flavors",
            Some(flavor),
            422,
            "invalid_field",
            mentions,
        )
        .await;
    }
    let (status, created) = daemon
        .admin("POST", "/flavors", Some(flavor_json("lab")))
        .await;
    assert_eq!(status, 201, "{created}");
    assert_eq!(created["name"], "lab");
    assert_eq!(created["kernel"], flavor_json("lab")["kernel"]);
    assert_eq!(
        get(&daemon, "/flavors/lab").await,
        created,
        "the answer is what is stored"
    );
    check(
        &daemon,
        "POST",
        "/flavors",
        Some(flavor_json("lab")),
        409,
        "already_exists",
        "lab",
    )
    .await;

    check(
        &daemon,
        "PUT",
        "/flavors/lab",
        Some(flavor_json("other")),
        422,
        "invalid_field",
        "field name",
    )
    .await;
    let mut replacement = flavor_json("lab");
    replacement["cmdline_template"] = json!("console=ttyS1");
    let (status, replaced) = daemon.admin("PUT", "/flavors/lab", Some(replacement)).await;
    assert_eq!(status, 200, "{replaced}");
    assert_eq!(
        get(&daemon, "/flavors/lab").await["cmdline_template"],
        "console=ttyS1"
    );

    // hv is every registered node's default: it cannot go while a node uses it.
    register(&daemon, NODE_A, 1).await;
    check(&daemon, "DELETE", "/flavors/hv", None, 409, "in_use", "hv").await;
    check(
        &daemon,
        "DELETE",
        "/flavors/nope",
        None,
        404,
        "not_found",
        "nope",
    )
    .await;
    assert_eq!(daemon.admin("DELETE", "/flavors/lab", None).await.0, 204);
    assert_eq!(daemon.admin("GET", "/flavors/lab", None).await.0, 404);
    let (status, _) = daemon
        .admin(
            "PATCH",
            &format!("/nodes/{NODE_A}"),
            Some(json!({"flavor": ""})),
        )
        .await;
    assert_eq!(status, 200);
    assert_eq!(
        daemon.admin("DELETE", "/flavors/hv", None).await.0,
        204,
        "no user left"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pool_create_and_delete_follow_the_rules() {
    let daemon = daemon().await;
    let with = |edit: fn(&mut Value)| {
        let mut pool = node_pool_json();
        pool["name"] = json!("rack-b");
        edit(&mut pool);
        pool
    };
    let invalid = [
        (
            with(|p| p["range_end"] = json!("10.10.0.5")),
            "field range_end",
        ),
        (
            with(|p| p["range_start"] = json!("10.11.0.10")),
            "field range_start",
        ),
        (
            with(|p| p["range_end"] = json!("10.10.0.300")),
            "field range_end",
        ),
        (with(|p| p["cidr"] = json!("10.10.0.5/24")), "field cidr"),
        (with(|p| p["cidr"] = json!("10.10.0.0/33")), "field cidr"),
        (
            with(|p| p["gateway"] = json!("192.168.0.1")),
            "field gateway",
        ),
        (with(|p| p["vlan"] = json!(5000)), "field vlan"),
        (with(|p| p["mtu"] = json!(100)), "field mtu"),
        (with(|p| p["dns"] = json!(["resolver"])), "field dns"),
        (with(|p| p["name"] = json!("Rack B")), "field name"),
        (with(|p| p["purpose"] = json!("storage")), "storage"),
    ];
    for (pool, mentions) in invalid {
        check(
            &daemon,
            "POST",
            "/pools",
            Some(pool),
            422,
            "invalid_field",
            mentions,
        )
        .await;
    }
    check(
        &daemon,
        "POST",
        "/pools",
        Some(node_pool_json()),
        409,
        "already_exists",
        "rack-a",
    )
    .await;
    check(
        &daemon,
        "GET",
        "/pools/nope",
        None,
        404,
        "not_found",
        "nope",
    )
    .await;

    register(&daemon, NODE_A, 1).await;
    check(
        &daemon,
        "DELETE",
        "/pools/rack-a",
        None,
        409,
        "in_use",
        "rack-a",
    )
    .await;
    check(
        &daemon,
        "DELETE",
        "/pools/nope",
        None,
        404,
        "not_found",
        "nope",
    )
    .await;

    let (status, _) = daemon.admin("POST", "/pools", Some(with(|_| {}))).await;
    assert_eq!(status, 201);
    assert_eq!(
        daemon.admin("DELETE", "/pools/rack-b", None).await.0,
        204,
        "an unused pool can go"
    );
    let (status, _) = daemon
        .admin("POST", &format!("/nodes/{NODE_A}/retire"), None)
        .await;
    assert_eq!(status, 200);
    assert_eq!(
        daemon.admin("DELETE", "/pools/rack-a", None).await.0,
        204,
        "retiring freed the pool"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tokens_created_over_the_api_work_until_deleted() {
    let daemon = daemon().await;
    let (status, created) = daemon
        .admin(
            "POST",
            "/tokens",
            Some(json!({"name": "ci", "role": "operator"})),
        )
        .await;
    assert_eq!(status, 201, "{created}");
    assert_eq!(
        (created["name"].as_str(), created["role"].as_str()),
        (Some("ci"), Some("operator"))
    );
    let secret = created["secret"].as_str().unwrap().to_string();
    assert!(secret.starts_with("bm_"), "{secret}");
    assert_eq!(secret.len(), 3 + 64, "32 random bytes in hex");

    let me = daemon
        .request("GET", "/api/v1/whoami", Some(&secret), None)
        .await;
    assert_eq!(me.status, 200, "{}", me.text());
    assert_eq!(json_of(&me), json!({"token": "ci", "role": "operator"}));

    let listing = daemon
        .request("GET", "/api/v1/tokens", Some(&daemon.admin_token), None)
        .await;
    assert_eq!(listing.status, 200);
    let text = listing.text();
    assert!(
        !text.contains(&secret),
        "the secret is shown once only: {text}"
    );
    assert!(
        !text.contains(&bearman::app::tokens::hash_secret(&secret)),
        "nor its hash: {text}"
    );
    assert!(
        !text.contains("secret"),
        "no secret-like field at all: {text}"
    );
    let listed = json_of(&listing);
    let names: Vec<&str> = listed
        .as_array()
        .unwrap()
        .iter()
        .map(|t| t["name"].as_str().unwrap())
        .collect();
    assert_eq!(names, vec!["admin", "ci", "operator", "viewer"]);

    check(
        &daemon,
        "POST",
        "/tokens",
        Some(json!({"name": "ci", "role": "viewer"})),
        409,
        "already_exists",
        "ci",
    )
    .await;
    check(
        &daemon,
        "POST",
        "/tokens",
        Some(json!({"name": "Bad Name", "role": "viewer"})),
        422,
        "invalid_field",
        "field name",
    )
    .await;
    check(
        &daemon,
        "POST",
        "/tokens",
        Some(json!({"name": "x", "role": "root"})),
        422,
        "invalid_field",
        "root",
    )
    .await;
    check(
        &daemon,
        "DELETE",
        "/tokens/nope",
        None,
        404,
        "not_found",
        "nope",
    )
    .await;

    assert_eq!(daemon.admin("DELETE", "/tokens/ci", None).await.0, 204);
    let revoked = daemon
        .request("GET", "/api/v1/whoami", Some(&secret), None)
        .await;
    assert_eq!(revoked.status, 401, "{}", revoked.text());
    assert_eq!(json_of(&revoked)["error"], "unauthorized");

    let events = get(&daemon, "/events").await;
    let audit: Vec<(&str, &str)> = events
        .as_array()
        .unwrap()
        .iter()
        .take(2)
        .map(|e| (e["action"].as_str().unwrap(), e["actor"].as_str().unwrap()))
        .collect();
    assert_eq!(
        audit,
        vec![
            ("token_delete", "token:admin"),
            ("token_create", "token:admin")
        ]
    );
    assert!(
        !events.to_string().contains(&secret),
        "the audit trail never holds the secret"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn events_paginate_with_before() {
    let daemon = daemon().await;
    register(&daemon, NODE_A, 1).await;
    for name in ["f1", "f2", "f3", "f4", "f5"] {
        assert_eq!(
            daemon
                .admin("POST", "/flavors", Some(flavor_json(name)))
                .await
                .0,
            201
        );
    }
    let all = get(&daemon, "/events?limit=1000").await;
    let all_ids: Vec<i64> = all
        .as_array()
        .unwrap()
        .iter()
        .map(|e| e["id"].as_i64().unwrap())
        .collect();
    assert!(all_ids.len() >= 10, "{all}");
    assert!(
        all_ids.windows(2).all(|w| w[0] > w[1]),
        "newest first: {all_ids:?}"
    );

    let mut paged = Vec::new();
    let mut path = "/events?limit=3".to_string();
    for _ in 0..all_ids.len() {
        let page = get(&daemon, &path).await;
        let ids: Vec<i64> = page
            .as_array()
            .unwrap()
            .iter()
            .map(|e| e["id"].as_i64().unwrap())
            .collect();
        assert!(ids.len() <= 3, "{path}: {ids:?}");
        let Some(last) = ids.last().copied() else {
            break;
        };
        paged.extend(ids);
        path = format!("/events?limit=3&before={last}");
    }
    assert_eq!(
        paged, all_ids,
        "pages of 3 add up to the whole trail, in order, without overlap"
    );

    let node_events = get(&daemon, &format!("/events?node={NODE_A}")).await;
    assert_eq!(
        node_events,
        get(&daemon, &format!("/nodes/{NODE_A}/events")).await
    );
    assert!(
        node_events
            .as_array()
            .unwrap()
            .iter()
            .all(|e| e["node_uuid"] == NODE_A),
        "{node_events}"
    );
    let newest = node_events[0]["id"].as_i64().unwrap();
    let older = get(&daemon, &format!("/nodes/{NODE_A}/events?before={newest}")).await;
    assert!(
        older
            .as_array()
            .unwrap()
            .iter()
            .all(|e| e["id"].as_i64().unwrap() < newest),
        "{older}"
    );
    check(
        &daemon,
        "GET",
        "/events?before=yesterday",
        None,
        400,
        "invalid_query",
        "before",
    )
    .await;
}
