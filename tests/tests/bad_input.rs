//! Hostile and malformed input on the unauthenticated network-boot endpoints, over real
//! HTTP against a daemon on SQLite.
//!
//! Every refusal is checked three ways: the status and error code, a message that names
//! the problem, and that the inventory, the node records and the audit trail are exactly
//! what they were before (except where a refusal must itself be audited). No input may
//! ever make the daemon answer with a 5xx.

use bearman_e2e::{
    bmc_pool_json, flavor_json, json_of, node_pool_json, register_body, Options, TestDaemon,
};
use bearman_proto::http::Response;
use serde_json::{json, Value};

/// A node registered in every test that needs a known node.
const KNOWN: &str = "4c4c4544-0042-3510-8052-b4c04f4e4a32";
/// A well-formed uuid no test ever registers.
const UNKNOWN: &str = "00000000-0000-0000-0000-00000000beef";
/// The small body limit the test daemons are built with.
const BODY_LIMIT_BYTES: usize = 4096;

/// Every `/ipxe/{uuid}…` endpoint: method and the suffix after the uuid.
const BOOT_ENDPOINTS: [(&str, &str); 6] = [
    ("GET", ""),
    ("POST", "/register"),
    ("GET", "/profile"),
    ("GET", "/detail"),
    ("POST", "/installed"),
    ("POST", "/heartbeat"),
];

fn options(default_flavor: Option<&str>) -> Options {
    Options {
        default_flavor: default_flavor.map(str::to_string),
        body_limit_bytes: BODY_LIMIT_BYTES,
        ..Options::default()
    }
}

fn register_json(index: u32) -> Value {
    serde_json::to_value(register_body(index)).expect("registration serializes")
}

fn to_bytes(value: &Value) -> Vec<u8> {
    serde_json::to_vec(value).expect("json serializes")
}

/// Sends one unauthenticated request; whatever it carries, the daemon must not fail. The
/// only 5xx a boot endpoint may give is one the test expects (`503 pool_unavailable`).
async fn send_expecting(
    daemon: &TestDaemon,
    method: &str,
    path: &str,
    body: Option<&[u8]>,
    expected: u16,
) -> Response {
    let response = daemon.request(method, path, None, body).await;
    assert!(
        response.status < 500 || response.status == expected,
        "{method} {path} made the daemon fail: {} {}",
        response.status,
        response.text()
    );
    response
}

async fn send(daemon: &TestDaemon, method: &str, path: &str, body: Option<&[u8]>) -> Response {
    send_expecting(daemon, method, path, body, 200).await
}

/// Registers `uuid` with `body` and insists it is accepted.
async fn register(daemon: &TestDaemon, uuid: &str, body: &Value) -> Value {
    let response = send(
        daemon,
        "POST",
        &format!("/ipxe/{uuid}/register"),
        Some(&to_bytes(body)),
    )
    .await;
    assert_eq!(
        response.status,
        200,
        "registering {uuid}: {}",
        response.text()
    );
    json_of(&response)
}

/// A daemon that serves flavor `hv` from pool `rack-a`, with node [`KNOWN`] registered.
async fn daemon_with_known_node() -> TestDaemon {
    let daemon = TestDaemon::sqlite(options(Some("hv"))).await;
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
    let registered = register(&daemon, KNOWN, &register_json(1)).await;
    assert_eq!(registered["state"], "registered");
    daemon
}

async fn admin_get(daemon: &TestDaemon, path: &str) -> Value {
    let (status, body) = daemon.admin("GET", path, None).await;
    assert_eq!(status, 200, "GET /api/v1{path}: {body}");
    body
}

/// Everything a refused request must leave alone.
#[derive(Debug, PartialEq)]
struct Snapshot {
    summary: Value,
    nodes: Value,
    events: Value,
}

async fn snapshot(daemon: &TestDaemon) -> Snapshot {
    Snapshot {
        summary: admin_get(daemon, "/summary").await,
        nodes: admin_get(daemon, "/nodes").await,
        events: admin_get(daemon, "/events?limit=10000").await,
    }
}

/// One request that must be refused.
struct Refusal {
    method: &'static str,
    path: String,
    body: Option<Vec<u8>>,
    status: u16,
    code: &'static str,
    /// Text the error message must contain (the field, the uuid, the state…).
    mentions: String,
}

impl Refusal {
    fn new(
        method: &'static str,
        path: String,
        body: Option<Vec<u8>>,
        status: u16,
        code: &'static str,
        mentions: &str,
    ) -> Self {
        Refusal {
            method,
            path,
            body,
            status,
            code,
            mentions: mentions.to_string(),
        }
    }
}

/// Sends `case` and checks it is refused as described, with a JSON error body, and that
/// the node count, every node record and the event list are unchanged.
async fn check(daemon: &TestDaemon, case: Refusal) {
    let before = snapshot(daemon).await;
    let response = send_expecting(
        daemon,
        case.method,
        &case.path,
        case.body.as_deref(),
        case.status,
    )
    .await;
    let what = format!("{} {}", case.method, case.path);
    assert_eq!(response.status, case.status, "{what}: {}", response.text());
    let body = json_of(&response);
    assert_eq!(body["error"], case.code, "{what}: {}", response.text());
    let message = body["message"]
        .as_str()
        .unwrap_or_else(|| panic!("{what}: error body has no message: {}", response.text()));
    assert!(
        message.contains(&case.mentions),
        "{what}: message {message:?} does not mention {:?}",
        case.mentions
    );
    let after = snapshot(daemon).await;
    assert_eq!(
        before, after,
        "{what} was refused but changed the inventory or the audit trail"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn malformed_uuid_is_refused_on_every_boot_endpoint() {
    let daemon = daemon_with_known_node().await;
    let malformed = [
        "not-a-uuid",
        "4c4c4544-0042-3510-8052-b4c04f4e4a3",
        "4c4c4544-0042-3510-8052-b4c04f4e4a321",
        "4c4c45440-042-3510-8052-b4c04f4e4a32",
        "gggggggg-0042-3510-8052-b4c04f4e4a32",
        "4c4c4544-0042-3510-8052-b4c04f4e4a3%21",
        "4c4c4544004235108052b4c04f4e4a32",
    ];
    for (method, suffix) in BOOT_ENDPOINTS {
        for uuid in malformed {
            let body = (suffix == "/register").then(|| to_bytes(&register_json(2)));
            let case = Refusal::new(
                method,
                format!("/ipxe/{uuid}{suffix}"),
                body,
                400,
                "invalid_uuid",
                "invalid uuid",
            );
            check(&daemon, case).await;
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unknown_node_is_not_found_on_profile_detail_installed_and_heartbeat() {
    let daemon = daemon_with_known_node().await;
    for (method, suffix) in [
        ("GET", "/profile"),
        ("GET", "/detail"),
        ("POST", "/installed"),
        ("POST", "/heartbeat"),
    ] {
        check(
            &daemon,
            Refusal::new(
                method,
                format!("/ipxe/{UNKNOWN}{suffix}"),
                None,
                404,
                "not_found",
                UNKNOWN,
            ),
        )
        .await;
    }
    // A body does not make an unknown node known.
    let report = to_bytes(&json!({"os_release": "Ubuntu 24.04"}));
    check(
        &daemon,
        Refusal::new(
            "POST",
            format!("/ipxe/{UNKNOWN}/installed"),
            Some(report),
            404,
            "not_found",
            UNKNOWN,
        ),
    )
    .await;
    let beat = to_bytes(&json!({"uptime_s": 12}));
    check(
        &daemon,
        Refusal::new(
            "POST",
            format!("/ipxe/{UNKNOWN}/heartbeat"),
            Some(beat),
            404,
            "not_found",
            UNKNOWN,
        ),
    )
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unknown_uuid_on_ipxe_gets_discovery_script_and_creates_nothing() {
    let daemon = daemon_with_known_node().await;
    for asked in [UNKNOWN, "00000000-0000-0000-0000-00000000BEEF"] {
        let before = snapshot(&daemon).await;
        let response = send(&daemon, "GET", &format!("/ipxe/{asked}"), None).await;
        assert_eq!(response.status, 200, "{}", response.text());
        assert_eq!(
            response.header("content-type"),
            Some("text/plain; charset=utf-8")
        );
        let text = response.text();
        let script = bearman_proto::ipxe::parse(&text).expect("a script stage 1 can read");
        assert!(
            !script.exit,
            "an unknown machine is sent to stage 1, not away: {text}"
        );
        let kernel = script.kernel.expect("discovery boots stage 1");
        assert!(
            kernel.args.contains(&format!("bearman.uuid={UNKNOWN}")),
            "discovery script must carry the (normalised) uuid: {text}"
        );
        assert_eq!(
            before,
            snapshot(&daemon).await,
            "a discovery script must not enrol the machine"
        );
    }
    let (status, _) = daemon
        .admin("GET", &format!("/nodes/{UNKNOWN}"), None)
        .await;
    assert_eq!(status, 404);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn oversized_body_is_refused_with_413() {
    let daemon = daemon_with_known_node().await;
    let mut registration = register_json(1);
    registration["vendor"] = json!("x".repeat(BODY_LIMIT_BYTES * 2));
    let big_registration = to_bytes(&registration);
    assert!(big_registration.len() > BODY_LIMIT_BYTES);
    let big_report = to_bytes(&json!({"os_release": "y".repeat(BODY_LIMIT_BYTES + 1)}));
    let cases = [
        (
            "POST",
            format!("/ipxe/{KNOWN}/register"),
            big_registration.clone(),
        ),
        (
            "POST",
            format!("/ipxe/{UNKNOWN}/register"),
            big_registration,
        ),
        (
            "POST",
            format!("/ipxe/{KNOWN}/installed"),
            big_report.clone(),
        ),
        ("POST", format!("/ipxe/{KNOWN}/heartbeat"), big_report),
    ];
    for (method, path, body) in cases {
        check(
            &daemon,
            Refusal::new(method, path, Some(body), 413, "body_too_large", "exceeds"),
        )
        .await;
    }
    // Just under the limit is fine: the limit is the configured one, not something smaller.
    let mut fits = register_json(1);
    let disk = json!({"name": "sdx", "size_bytes": 1, "model": "m"});
    while to_bytes(&fits).len() + to_bytes(&disk).len() + 1 < BODY_LIMIT_BYTES {
        fits["disks"].as_array_mut().unwrap().push(disk.clone());
    }
    assert!(to_bytes(&fits).len() > BODY_LIMIT_BYTES - 64);
    register(&daemon, KNOWN, &fits).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn invalid_json_is_refused_with_400() {
    let daemon = daemon_with_known_node().await;
    let garbage: [&[u8]; 5] = [
        b"{\"serial\":",
        b"not json",
        b"{\"serial\": \"x\",}",
        b"{",
        b"\xff\xfe{}",
    ];
    for uuid in [KNOWN, UNKNOWN] {
        for body in garbage {
            let path = format!("/ipxe/{uuid}/register");
            check(
                &daemon,
                Refusal::new(
                    "POST",
                    path,
                    Some(body.to_vec()),
                    400,
                    "invalid_json",
                    "not valid JSON",
                ),
            )
            .await;
        }
    }
    let garbage: [&[u8]; 5] = [b"{", b"not json", b"{,}", b"}", b"\xff\xfe{}"];
    for suffix in ["/installed", "/heartbeat"] {
        for body in garbage {
            let path = format!("/ipxe/{KNOWN}{suffix}");
            check(
                &daemon,
                Refusal::new(
                    "POST",
                    path,
                    Some(body.to_vec()),
                    400,
                    "invalid_json",
                    "not valid JSON",
                ),
            )
            .await;
        }
    }
}

/// Turns a valid registration body into an invalid one.
type Edit = fn(&mut Value);

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn invalid_registration_fields_are_refused_naming_the_field() {
    let daemon = daemon_with_known_node().await;
    let cases: Vec<(&str, Edit, &str)> = vec![
        (
            "missing serial",
            |b| drop(b.as_object_mut().unwrap().remove("serial")),
            "missing field `serial`",
        ),
        (
            "missing nics",
            |b| drop(b.as_object_mut().unwrap().remove("nics")),
            "missing field `nics`",
        ),
        (
            "missing nic mac",
            |b| drop(b["nics"][0].as_object_mut().unwrap().remove("mac")),
            "missing field `mac`",
        ),
        (
            "unknown top-level field",
            |b| b["colour"] = json!("red"),
            "unknown field `colour`",
        ),
        (
            "unknown nic field",
            |b| b["nics"][0]["duplex"] = json!("full"),
            "unknown field `duplex`",
        ),
        (
            "unknown lldp field",
            |b| b["nics"][1]["lldp"]["ttl"] = json!(120),
            "unknown field `ttl`",
        ),
        (
            "invalid mac",
            |b| b["nics"][0]["mac"] = json!("52:54:00:zz:00:01"),
            "field nics[0].mac",
        ),
        (
            "short mac",
            |b| b["nics"][1]["mac"] = json!("52:54:00:00:01"),
            "field nics[1].mac",
        ),
        (
            "mac with dashes",
            |b| b["nics"][0]["mac"] = json!("52-54-00-00-01-00"),
            "field nics[0].mac",
        ),
        ("empty nic list", |b| b["nics"] = json!([]), "field nics"),
        (
            "vlan 5000",
            |b| b["nics"][0]["lldp"]["vlan"] = json!(5000),
            "field nics[0].lldp.vlan",
        ),
        (
            "vlan 0",
            |b| b["nics"][1]["lldp"]["vlan"] = json!(0),
            "field nics[1].lldp.vlan",
        ),
        (
            "blank serial",
            |b| b["serial"] = json!("   "),
            "field serial",
        ),
        (
            "control characters",
            |b| b["model"] = json!("R640\u{7}"),
            "field model",
        ),
        (
            "empty nic name",
            |b| b["nics"][0]["name"] = json!(""),
            "field nics[0].name",
        ),
        (
            "invalid bmc mac",
            |b| b["bmc"]["mac"] = json!("bmc"),
            "field bmc.mac",
        ),
        (
            "too many nics",
            |b| {
                // Small entries, so the body stays under the size limit.
                let nic = json!({"name": "e", "mac": "52:54:00:00:01:00"});
                b["nics"] = Value::Array(vec![nic; 65]);
            },
            "field nics",
        ),
    ];
    for uuid in [KNOWN, UNKNOWN] {
        for (name, edit, mentions) in &cases {
            let mut body = register_json(1);
            edit(&mut body);
            let path = format!("/ipxe/{uuid}/register");
            let case = Refusal::new(
                "POST",
                path,
                Some(to_bytes(&body)),
                422,
                "invalid_field",
                mentions,
            );
            eprintln!("case: {name} on {uuid}");
            check(&daemon, case).await;
        }
    }
    let unknown_report = to_bytes(&json!({"os_release": "x", "kernel": "6.8"}));
    check(
        &daemon,
        Refusal::new(
            "POST",
            format!("/ipxe/{KNOWN}/installed"),
            Some(unknown_report),
            422,
            "invalid_field",
            "unknown field `kernel`",
        ),
    )
    .await;
    let unknown_beat = to_bytes(&json!({"load": 1}));
    check(
        &daemon,
        Refusal::new(
            "POST",
            format!("/ipxe/{KNOWN}/heartbeat"),
            Some(unknown_beat),
            422,
            "invalid_field",
            "unknown field `load`",
        ),
    )
    .await;
}

/// serde's own "invalid type" messages say what was expected but not where; the daemon
/// must still name the field so an agent author knows what to fix.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn wrong_type_is_refused_naming_the_field() {
    let daemon = daemon_with_known_node().await;
    let cases: Vec<(Edit, &str)> = vec![
        (|b| b["memory_bytes"] = json!("lots"), "memory_bytes"),
        (|b| b["serial"] = json!(42), "serial"),
        (|b| b["nics"] = json!("eth0"), "nics"),
        (|b| b["nics"][0]["speed_mbps"] = json!(-1), "speed_mbps"),
        (|b| b["nics"][0]["lldp"]["vlan"] = json!(70000), "vlan"),
    ];
    for (edit, field) in cases {
        let mut body = register_json(1);
        edit(&mut body);
        let path = format!("/ipxe/{KNOWN}/register");
        check(
            &daemon,
            Refusal::new(
                "POST",
                path,
                Some(to_bytes(&body)),
                422,
                "invalid_field",
                field,
            ),
        )
        .await;
    }
    let report = to_bytes(&json!({"os_release": 5}));
    check(
        &daemon,
        Refusal::new(
            "POST",
            format!("/ipxe/{KNOWN}/installed"),
            Some(report),
            422,
            "invalid_field",
            "os_release",
        ),
    )
    .await;
}

/// Sends a registration that must be refused as a spoof: 409 `identity_mismatch`, the
/// record and the node count untouched, and exactly one `identity_refused` event added
/// when `audited` — the first refusal of this node within a minute; repeats within it
/// are counted, not written one by one (`core::event_throttle`), so `audited` false
/// expects no event at all.
async fn check_spoof(
    daemon: &TestDaemon,
    path_uuid: &str,
    body: &Value,
    mentions: &str,
    audited: bool,
) {
    let before = snapshot(daemon).await;
    let response = send(
        daemon,
        "POST",
        &format!("/ipxe/{path_uuid}/register"),
        Some(&to_bytes(body)),
    )
    .await;
    assert_eq!(response.status, 409, "{}", response.text());
    let error = json_of(&response);
    assert_eq!(error["error"], "identity_mismatch", "{error}");
    let message = error["message"].as_str().unwrap();
    assert!(
        message.contains(mentions),
        "{message:?} does not mention {mentions:?}"
    );
    assert!(
        message.contains("accept-identity"),
        "the message tells the operator the way out: {message:?}"
    );
    let after = snapshot(daemon).await;
    assert_eq!(before.summary, after.summary);
    assert_eq!(
        before.nodes, after.nodes,
        "a refused registration must not touch the record"
    );
    let events = after.events.as_array().unwrap();
    let earlier = before.events.as_array().unwrap();
    if !audited {
        assert_eq!(events, earlier, "a repeat within the window writes nothing");
        return;
    }
    assert_eq!(
        events.len(),
        earlier.len() + 1,
        "exactly one audit event: {}",
        after.events
    );
    assert_eq!(&events[1..], &earlier[..]);
    let refusal = &events[0];
    assert_eq!(refusal["action"], "identity_refused");
    assert_eq!(refusal["node_uuid"], KNOWN);
    assert_eq!(refusal["actor"], "node");
    assert!(
        refusal["reason"].as_str().unwrap().contains(mentions),
        "{refusal}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn registration_with_changed_serial_is_refused_and_audited() {
    let daemon = daemon_with_known_node().await;
    let mut body = register_json(1);
    body["serial"] = json!("IMPOSTOR1");
    check_spoof(&daemon, KNOWN, &body, "serial", true).await;
    // The uuid's case does not open a side door.
    check_spoof(&daemon, &KNOWN.to_ascii_uppercase(), &body, "serial", false).await;
    // The genuine machine still registers.
    let again = register(&daemon, KNOWN, &register_json(1)).await;
    assert_eq!(again["state"], "registered");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn registration_with_changed_macs_is_refused_and_audited() {
    let daemon = daemon_with_known_node().await;
    let genuine = register_json(1);

    let mut swapped_nic = genuine.clone();
    swapped_nic["nics"][1]["mac"] = json!("52:54:00:ff:ff:01");
    check_spoof(&daemon, KNOWN, &swapped_nic, "MAC", true).await;

    let mut extra_nic = genuine.clone();
    let mut nic = genuine["nics"][0].clone();
    nic["name"] = json!("ens2f0");
    nic["mac"] = json!("52:54:00:ff:ff:02");
    extra_nic["nics"].as_array_mut().unwrap().push(nic);
    check_spoof(&daemon, KNOWN, &extra_nic, "MAC", false).await;

    let mut one_nic = genuine.clone();
    one_nic["nics"].as_array_mut().unwrap().truncate(1);
    check_spoof(&daemon, KNOWN, &one_nic, "MAC", false).await;

    // The same MACs written in capitals are the same hardware.
    let mut shouting = genuine.clone();
    for nic in shouting["nics"].as_array_mut().unwrap() {
        let mac = nic["mac"].as_str().unwrap().to_ascii_uppercase();
        nic["mac"] = json!(mac);
    }
    assert_eq!(
        register(&daemon, KNOWN, &shouting).await["state"],
        "registered"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn accepting_a_new_identity_lets_new_hardware_register() {
    let daemon = daemon_with_known_node().await;
    let replacement = register_json(2);
    check_spoof(&daemon, KNOWN, &replacement, "serial", true).await;

    let (status, node) = daemon
        .admin(
            "POST",
            &format!("/nodes/{KNOWN}/accept-identity"),
            Some(json!({"reason": "board swap"})),
        )
        .await;
    assert_eq!(status, 200, "{node}");
    let registered = register(&daemon, KNOWN, &replacement).await;
    assert_eq!(registered["state"], "registered");

    let (_, node) = daemon.admin("GET", &format!("/nodes/{KNOWN}"), None).await;
    assert_eq!(node["serial"], replacement["serial"]);
    let macs: Vec<&str> = node["hardware"]["nics"]
        .as_array()
        .unwrap()
        .iter()
        .map(|n| n["mac"].as_str().unwrap())
        .collect();
    assert_eq!(macs, vec!["52:54:00:00:02:00", "52:54:00:00:02:01"]);
    // The new hardware is now the identity on record: the old board is the impostor.
    check_spoof(&daemon, KNOWN, &register_json(1), "serial", false).await;

    let events = admin_get(&daemon, &format!("/nodes/{KNOWN}/events")).await;
    let accepted = events
        .as_array()
        .unwrap()
        .iter()
        .find(|e| e["action"] == "accept_identity")
        .expect("audited");
    assert_eq!(accepted["reason"], "board swap");
    assert!(
        accepted["actor"].as_str().unwrap().starts_with("token:"),
        "{accepted}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn installed_before_boot_started_is_an_illegal_transition() {
    let daemon = daemon_with_known_node().await;
    let report = to_bytes(&json!({"os_release": "Ubuntu 24.04"}));
    for body in [None, Some(report)] {
        let case = Refusal::new(
            "POST",
            format!("/ipxe/{KNOWN}/installed"),
            body,
            409,
            "illegal_transition",
            "installed is not allowed while the node is registered",
        );
        check(&daemon, case).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn heartbeat_from_registered_node_is_refused_and_audited() {
    let daemon = daemon_with_known_node().await;
    let before = snapshot(&daemon).await;
    let response = send(&daemon, "POST", &format!("/ipxe/{KNOWN}/heartbeat"), None).await;
    assert_eq!(response.status, 409, "{}", response.text());
    let error = json_of(&response);
    assert_eq!(error["error"], "illegal_transition");
    assert!(
        error["message"]
            .as_str()
            .unwrap()
            .contains("heartbeat is not allowed while the node is registered"),
        "{error}"
    );

    let after = snapshot(&daemon).await;
    assert_eq!(before.summary, after.summary);
    assert_eq!(
        before.nodes, after.nodes,
        "the refused heartbeat must not be recorded on the node"
    );
    let events = after.events.as_array().unwrap();
    assert_eq!(events.len(), before.events.as_array().unwrap().len() + 1);
    assert_eq!(events[0]["action"], "unexpected_heartbeat");
    assert_eq!(events[0]["node_uuid"], KNOWN);
    assert_eq!(events[0]["actor"], "node");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn retired_node_is_refused_everywhere() {
    let daemon = daemon_with_known_node().await;
    let (status, node) = daemon
        .admin("POST", &format!("/nodes/{KNOWN}/retire"), None)
        .await;
    assert_eq!(
        (status, node["state"].as_str()),
        (200, Some("retired")),
        "{node}"
    );

    let before = snapshot(&daemon).await;
    let response = send(&daemon, "GET", &format!("/ipxe/{KNOWN}"), None).await;
    assert_eq!(response.status, 200);
    let script = bearman_proto::ipxe::parse(&response.text()).expect("parsable script");
    assert!(
        script.exit,
        "a retired node is told to stop: {}",
        response.text()
    );
    assert!(script.kernel.is_none());
    assert!(response.text().contains("retired"), "{}", response.text());
    assert_eq!(before, snapshot(&daemon).await);

    for suffix in ["/profile", "/detail"] {
        check(
            &daemon,
            Refusal::new(
                "GET",
                format!("/ipxe/{KNOWN}{suffix}"),
                None,
                410,
                "retired",
                "retired",
            ),
        )
        .await;
    }
    let body = to_bytes(&register_json(1));
    let case = Refusal::new(
        "POST",
        format!("/ipxe/{KNOWN}/register"),
        Some(body),
        409,
        "illegal_transition",
        "retired",
    );
    check(&daemon, case).await;
    check(
        &daemon,
        Refusal::new(
            "POST",
            format!("/ipxe/{KNOWN}/installed"),
            None,
            409,
            "illegal_transition",
            "retired",
        ),
    )
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn node_without_flavor_cannot_fetch_a_target_script() {
    let daemon = TestDaemon::sqlite(options(None)).await;
    assert_eq!(
        daemon
            .admin("POST", "/pools", Some(node_pool_json()))
            .await
            .0,
        201
    );
    let registered = register(&daemon, KNOWN, &register_json(1)).await;
    assert_eq!(registered["state"], "registered");

    check(
        &daemon,
        Refusal::new(
            "GET",
            format!("/ipxe/{KNOWN}"),
            None,
            409,
            "no_flavor",
            "no flavor",
        ),
    )
    .await;
    check(
        &daemon,
        Refusal::new(
            "GET",
            format!("/ipxe/{KNOWN}/profile"),
            None,
            409,
            "no_flavor",
            "no flavor",
        ),
    )
    .await;
    // The network detail does not depend on a flavor.
    assert_eq!(
        send(&daemon, "GET", &format!("/ipxe/{KNOWN}/detail"), None)
            .await
            .status,
        200
    );

    let (_, node) = daemon.admin("GET", &format!("/nodes/{KNOWN}"), None).await;
    assert_eq!(
        node["state"], "registered",
        "a refused boot does not start provisioning"
    );

    // A default flavor that was never created is a different refusal, with its own code.
    let daemon = TestDaemon::sqlite(options(Some("missing"))).await;
    register(&daemon, KNOWN, &register_json(1)).await;
    check(
        &daemon,
        Refusal::new(
            "GET",
            format!("/ipxe/{KNOWN}"),
            None,
            409,
            "flavor_missing",
            "missing",
        ),
    )
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn exhausted_node_pool_refuses_registration_without_leaving_a_node() {
    let daemon = TestDaemon::sqlite(options(Some("hv"))).await;
    assert_eq!(
        daemon
            .admin("POST", "/flavors", Some(flavor_json("hv")))
            .await
            .0,
        201
    );
    let mut pool = node_pool_json();
    pool["range_start"] = json!("10.10.0.10");
    pool["range_end"] = json!("10.10.0.11");
    assert_eq!(daemon.admin("POST", "/pools", Some(pool)).await.0, 201);

    let uuids: Vec<String> = (1..=3)
        .map(|i| format!("00000000-0000-0000-0000-0000000000{i:02}"))
        .collect();
    register(&daemon, &uuids[0], &register_json(1)).await;
    register(&daemon, &uuids[1], &register_json(2)).await;

    let body = to_bytes(&register_json(3));
    let case = Refusal::new(
        "POST",
        format!("/ipxe/{}/register", uuids[2]),
        Some(body),
        503,
        "pool_unavailable",
        "rack-a",
    );
    check(&daemon, case).await;

    let (status, _) = daemon
        .admin("GET", &format!("/nodes/{}", uuids[2]), None)
        .await;
    assert_eq!(status, 404, "the refused node must not exist");
    let summary = admin_get(&daemon, "/summary").await;
    assert_eq!(summary["total"], 2);
    let detail = admin_get(&daemon, "/pools/rack-a").await;
    let mut holders: Vec<(String, String)> = detail["allocations"]
        .as_array()
        .unwrap()
        .iter()
        .map(|a| {
            (
                a["address"].as_str().unwrap().to_string(),
                a["node_uuid"].as_str().unwrap().to_string(),
            )
        })
        .collect();
    holders.sort();
    assert_eq!(
        holders,
        vec![
            ("10.10.0.10".to_string(), uuids[0].clone()),
            ("10.10.0.11".to_string(), uuids[1].clone())
        ]
    );
    // The nodes that got in keep working: a known node re-registering needs no new address.
    register(&daemon, &uuids[0], &register_json(1)).await;
}

/// Full BMC pools used to refuse the whole registration, so a full out-of-band range
/// kept machines from booting with node addresses free. The BMC address is optional:
/// the node registers with its node address and without BMC settings, audited.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_full_bmc_pool_does_not_keep_a_node_from_its_address() {
    let daemon = TestDaemon::sqlite(options(Some("hv"))).await;
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
    let mut oob = bmc_pool_json();
    oob["range_start"] = json!("10.20.0.10");
    oob["range_end"] = json!("10.20.0.11");
    assert_eq!(daemon.admin("POST", "/pools", Some(oob)).await.0, 201);

    let uuids: Vec<String> = (1..=3)
        .map(|i| format!("00000000-0000-0000-0000-0000000000{i:02}"))
        .collect();
    register(&daemon, &uuids[0], &register_json(1)).await;
    register(&daemon, &uuids[1], &register_json(2)).await;

    // The BMC pool is full: the third machine still gets its node address and boots;
    // its BMC keeps the address it has, and the audit trail says why.
    let third = register(&daemon, &uuids[2], &register_json(3)).await;
    assert_eq!(third["state"], "registered", "{third}");
    assert_eq!(third["bmc"], Value::Null, "{third}");
    let node = admin_get(&daemon, &format!("/nodes/{}", uuids[2])).await;
    assert_eq!(
        node["network"]["bond0_addresses"].as_array().map(Vec::len),
        Some(1),
        "{node}"
    );
    let events = admin_get(&daemon, &format!("/nodes/{}/events", uuids[2])).await;
    let exhausted: Vec<&Value> = events
        .as_array()
        .unwrap()
        .iter()
        .filter(|e| e["action"] == "bmc_pool_exhausted")
        .collect();
    assert_eq!(exhausted.len(), 1, "{events}");
    assert!(
        exhausted[0]["reason"].as_str().unwrap().contains("oob"),
        "{events}"
    );
    let oob = admin_get(&daemon, "/pools/oob").await;
    assert!(
        oob["allocations"]
            .as_array()
            .unwrap()
            .iter()
            .all(|a| a["node_uuid"] != uuids[2].as_str()),
        "{oob}"
    );
}
