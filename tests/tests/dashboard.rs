//! The web dashboard's server side: login and its cookie, the cookie as an API
//! credential under the route table's roles, CSRF and Origin checks on cookie-made
//! changes, a session's end (token deleted, time up, on the daemon's clock seam), the
//! security headers on the assets, and the fleet grid.

use std::sync::Arc;

use bearman::core::model::{Node, NodeRole};
use bearman::core::session::{COOKIE_NAME, CSRF_HEADER};
use bearman_e2e::{json_of, OffsetClock, Options, TestDaemon};
use bearman_proto::http::{self, Response};
use bearman_proto::uuid::NodeUuid;
use serde_json::{json, Value};

const UUID: &str = "4c4c4544-0042-3510-8052-b4c04f4e4a32";
const EIGHT_HOURS_MS: i64 = 8 * 3600 * 1000;

/// One request with exactly these headers (a browser's, not the harness's Bearer).
async fn send(
    daemon: &TestDaemon,
    method: &str,
    path: &str,
    headers: &[(&str, &str)],
    body: Option<Value>,
) -> Response {
    let mut stream = tokio::net::TcpStream::connect(daemon.address)
        .await
        .expect("connect");
    let mut all = vec![("Content-Type", "application/json")];
    all.extend_from_slice(headers);
    let host = daemon.address.to_string();
    let bytes = body.map(|b| serde_json::to_vec(&b).unwrap());
    let exchange = http::send(&mut stream, method, &host, path, &all, bytes.as_deref());
    tokio::time::timeout(std::time::Duration::from_secs(30), exchange)
        .await
        .expect("response within 30 s")
        .expect("http exchange")
}

/// A logged-in browser: the cookie header it sends and the CSRF token the page got.
struct Browser {
    cookie: String,
    csrf: String,
}

impl Browser {
    async fn get(&self, daemon: &TestDaemon, path: &str) -> Response {
        send(daemon, "GET", path, &[("Cookie", &self.cookie)], None).await
    }

    /// A change with the session's CSRF token, as the page sends it.
    async fn change(&self, daemon: &TestDaemon, method: &str, path: &str, body: Value) -> Response {
        send(
            daemon,
            method,
            path,
            &[("Cookie", &self.cookie), (CSRF_HEADER, &self.csrf)],
            Some(body),
        )
        .await
    }
}

async fn login(daemon: &TestDaemon, secret: &str) -> (Response, Option<Browser>) {
    let response = send(
        daemon,
        "POST",
        "/ui/login",
        &[],
        Some(json!({ "token": secret })),
    )
    .await;
    let browser = response.header("set-cookie").map(|set| {
        let pair = set.split(';').next().unwrap().to_string();
        Browser {
            cookie: pair,
            csrf: json_of(&response)["csrf"]
                .as_str()
                .unwrap_or_default()
                .to_string(),
        }
    });
    (response, browser)
}

async fn logged_in(daemon: &TestDaemon, secret: &str) -> Browser {
    let (response, browser) = login(daemon, secret).await;
    assert_eq!(response.status, 200, "{}", response.text());
    browser.expect("a session cookie")
}

async fn enroll(daemon: &TestDaemon, uuid: &str, hostname: &str, rack: &str) {
    let (status, body) = daemon
        .admin(
            "POST",
            "/nodes",
            Some(json!({"uuid": uuid, "hostname": hostname, "rack": rack})),
        )
        .await;
    assert_eq!(status, 201, "{body}");
}

async fn node(daemon: &TestDaemon) -> Value {
    daemon.admin("GET", &format!("/nodes/{UUID}"), None).await.1
}

async fn new_token(daemon: &TestDaemon, name: &str, role: &str) -> String {
    let (status, token) = daemon
        .admin("POST", "/tokens", Some(json!({"name": name, "role": role})))
        .await;
    assert_eq!(status, 201, "{token}");
    token["secret"].as_str().unwrap().to_string()
}

fn assert_refused(response: &Response, status: u16, code: &str, what: &str) {
    assert_eq!(response.status, status, "{what}: {}", response.text());
    assert_eq!(
        json_of(response)["error"],
        code,
        "{what}: {}",
        response.text()
    );
    assert!(response.header("set-cookie").is_none(), "{what}: no cookie");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn login_sets_a_strict_http_only_cookie_that_carries_no_secret() {
    let daemon = TestDaemon::sqlite(Options::default()).await;
    let (response, browser) = login(&daemon, &daemon.operator_token).await;
    assert_eq!(response.status, 200, "{}", response.text());
    let set = response
        .header("set-cookie")
        .expect("Set-Cookie")
        .to_string();
    let attributes: Vec<&str> = set.split("; ").collect();
    assert!(
        attributes[0].starts_with(&format!("{COOKIE_NAME}=v1.operator.")),
        "{set}"
    );
    for attribute in ["HttpOnly", "SameSite=Strict", "Path=/"] {
        assert!(attributes.contains(&attribute), "{attribute} in {set}");
    }
    assert!(
        !attributes.contains(&"Secure"),
        "plain HTTP: no Secure (the TLS listener's cookie is checked in daemon/tests/tls_serve.rs)"
    );
    let max_age: i64 = attributes
        .iter()
        .find_map(|a| a.strip_prefix("Max-Age="))
        .expect("Max-Age")
        .parse()
        .unwrap();
    assert!((28_790..=28_800).contains(&max_age), "8 h: {max_age}");
    let body = json_of(&response);
    assert_eq!(body["role"], "operator");
    assert_eq!(body["token"], "operator");
    assert_eq!(body["csrf"].as_str().unwrap().len(), 64);
    let secret_hex = daemon.operator_token.trim_start_matches("bm_");
    assert!(!set.contains(secret_hex) && !response.text().contains(secret_hex));

    // The page learns its session (and CSRF token) again after a reload.
    let browser = browser.unwrap();
    let session = browser.get(&daemon, "/ui/session").await;
    assert_eq!(session.status, 200, "{}", session.text());
    assert_eq!(json_of(&session)["csrf"], body["csrf"]);
    // Audited, with the token's name and never its secret.
    let (_, events) = daemon.admin("GET", "/events?limit=5", None).await;
    let opened = events
        .as_array()
        .unwrap()
        .iter()
        .find(|e| e["action"] == "session_opened")
        .expect("a session_opened event");
    assert_eq!(opened["actor"], "token:operator");
    assert!(!events.to_string().contains(secret_hex));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn login_with_a_bad_or_expired_token_is_refused_and_sets_no_cookie() {
    let clock = Arc::new(OffsetClock::default());
    let daemon = TestDaemon::sqlite(Options {
        clock: clock.clone(),
        ..Default::default()
    })
    .await;
    let (bad, _) = login(
        &daemon,
        "bm_0000000000000000000000000000000000000000000000000000000000000000",
    )
    .await;
    assert_refused(&bad, 401, "unauthorized", "unknown token");
    let (status, token) = daemon
        .admin(
            "POST",
            "/tokens",
            Some(json!({"name": "brief", "role": "viewer",
                "expires_at_ms": bearman::runtime::Clock::now_ms(&*clock) + 60_000})),
        )
        .await;
    assert_eq!(status, 201, "{token}");
    clock.advance(61_000);
    let (expired, _) = login(&daemon, token["secret"].as_str().unwrap()).await;
    assert_refused(&expired, 401, "unauthorized", "expired token");
    assert!(expired.text().contains("expired"), "{}", expired.text());
    // A malformed body is a client mistake: a 4xx naming the problem, no cookie.
    for body in [
        json!({}),
        json!({"token": 5}),
        json!({"token": "x", "extra": 1}),
    ] {
        let response = send(&daemon, "POST", "/ui/login", &[], Some(body.clone())).await;
        assert!(
            (400..500).contains(&response.status),
            "{body}: {}",
            response.text()
        );
        assert!(response.header("set-cookie").is_none());
    }
    let no_session = send(&daemon, "GET", "/ui/session", &[], None).await;
    assert_refused(&no_session, 401, "unauthorized", "no cookie");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_session_gives_the_api_with_its_tokens_role_exactly() {
    let daemon = TestDaemon::sqlite(Options::default()).await;
    enroll(&daemon, UUID, "web-01", "r1").await;
    let viewer = logged_in(&daemon, &daemon.viewer_token).await;
    let operator = logged_in(&daemon, &daemon.operator_token).await;

    let me = viewer.get(&daemon, "/api/v1/whoami").await;
    assert_eq!(json_of(&me)["role"], "viewer", "{}", me.text());
    assert_eq!(viewer.get(&daemon, "/api/v1/nodes").await.status, 200);
    // A viewer's session with a valid CSRF token still gets the route table's 403.
    let before = node(&daemon).await;
    let refused = viewer
        .change(
            &daemon,
            "POST",
            &format!("/api/v1/nodes/{UUID}/maintenance"),
            json!({"reason": "x"}),
        )
        .await;
    assert_refused(&refused, 403, "forbidden", "viewer on an operator route");
    assert!(json_of(&refused)["message"]
        .as_str()
        .unwrap()
        .contains("operator"));
    let refused = operator
        .change(
            &daemon,
            "POST",
            "/api/v1/tokens",
            json!({"name": "evil", "role": "admin"}),
        )
        .await;
    assert_refused(&refused, 403, "forbidden", "operator on an admin route");
    assert_eq!(node(&daemon).await, before, "nothing changed");

    let done = operator
        .change(
            &daemon,
            "POST",
            &format!("/api/v1/nodes/{UUID}/maintenance"),
            json!({"reason": "disk swap"}),
        )
        .await;
    assert_eq!(done.status, 200, "{}", done.text());
    assert_eq!(node(&daemon).await["state"], "maintenance");
    let (_, events) = daemon
        .admin("GET", &format!("/nodes/{UUID}/events?limit=1"), None)
        .await;
    assert_eq!(events[0]["actor"], "token:operator", "audited as the token");
    assert_eq!(events[0]["reason"], "disk swap");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_cookie_mutation_without_the_right_csrf_token_is_refused_and_changes_nothing() {
    let daemon = TestDaemon::sqlite(Options::default()).await;
    enroll(&daemon, UUID, "web-01", "r1").await;
    let operator = logged_in(&daemon, &daemon.operator_token).await;
    let other = logged_in(&daemon, &daemon.admin_token).await;
    let before = node(&daemon).await;
    let path = format!("/api/v1/nodes/{UUID}/maintenance");
    let body = json!({"reason": "forged"});
    for (what, csrf) in [
        ("no CSRF header", None),
        ("an empty one", Some(String::new())),
        ("a made-up one", Some("0".repeat(64))),
        ("another session's", Some(other.csrf.clone())),
    ] {
        let mut headers = vec![("Cookie", operator.cookie.as_str())];
        if let Some(csrf) = &csrf {
            headers.push((CSRF_HEADER, csrf.as_str()));
        }
        let response = send(&daemon, "POST", &path, &headers, Some(body.clone())).await;
        assert_refused(&response, 403, "csrf", what);
        assert!(
            json_of(&response)["message"]
                .as_str()
                .unwrap()
                .contains(CSRF_HEADER),
            "{what}: the error names the header: {}",
            response.text()
        );
    }
    assert_eq!(node(&daemon).await, before, "nothing changed");
    // Reads need no CSRF token; Bearer callers never did.
    assert_eq!(
        operator
            .get(&daemon, &format!("/api/v1/nodes/{UUID}"))
            .await
            .status,
        200
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_cross_origin_cookie_mutation_is_refused() {
    let daemon = TestDaemon::sqlite(Options::default()).await;
    enroll(&daemon, UUID, "web-01", "r1").await;
    let operator = logged_in(&daemon, &daemon.operator_token).await;
    let before = node(&daemon).await;
    let path = format!("/api/v1/nodes/{UUID}/maintenance");
    for origin in ["http://evil.example", "null", "http://127.0.0.1:1"] {
        let response = send(
            &daemon,
            "POST",
            &path,
            &[
                ("Cookie", &operator.cookie),
                (CSRF_HEADER, &operator.csrf),
                ("Origin", origin),
            ],
            Some(json!({"reason": "from elsewhere"})),
        )
        .await;
        assert_refused(&response, 403, "cross_origin", origin);
        let (elsewhere, _) = {
            let response = send(
                &daemon,
                "POST",
                "/ui/login",
                &[("Origin", origin)],
                Some(json!({"token": daemon.operator_token})),
            )
            .await;
            (response, ())
        };
        assert_refused(&elsewhere, 403, "cross_origin", "login from elsewhere");
    }
    assert_eq!(node(&daemon).await, before, "nothing changed");
    // The page's own origin is this host.
    let own = format!("http://{}", daemon.address);
    let response = send(
        &daemon,
        "POST",
        &path,
        &[
            ("Cookie", &operator.cookie),
            (CSRF_HEADER, &operator.csrf),
            ("Origin", &own),
        ],
        Some(json!({"reason": "same origin"})),
    )
    .await;
    assert_eq!(response.status, 200, "{}", response.text());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn deleting_the_token_ends_its_sessions() {
    let daemon = TestDaemon::sqlite(Options::default()).await;
    let secret = new_token(&daemon, "ops.night", "operator").await;
    let browser = logged_in(&daemon, &secret).await;
    assert_eq!(browser.get(&daemon, "/api/v1/whoami").await.status, 200);
    assert_eq!(
        daemon.admin("DELETE", "/tokens/ops.night", None).await.0,
        204
    );
    let gone = browser.get(&daemon, "/api/v1/whoami").await;
    assert_refused(&gone, 401, "unauthorized", "deleted token");
    let gone = browser.get(&daemon, "/ui/session").await;
    assert_refused(&gone, 401, "unauthorized", "deleted token's session");
    // A new token of the same name does not revive the old cookie (another key).
    new_token(&daemon, "ops.night", "admin").await;
    let revived = browser.get(&daemon, "/api/v1/whoami").await;
    assert_refused(&revived, 401, "unauthorized", "same name, new token");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_session_is_refused_after_eight_hours() {
    let clock = Arc::new(OffsetClock::default());
    let daemon = TestDaemon::sqlite(Options {
        clock: clock.clone(),
        ..Default::default()
    })
    .await;
    let browser = logged_in(&daemon, &daemon.viewer_token).await;
    clock.advance(EIGHT_HOURS_MS - 60_000);
    assert_eq!(browser.get(&daemon, "/api/v1/whoami").await.status, 200);
    clock.advance(60_000);
    let late = browser.get(&daemon, "/api/v1/whoami").await;
    assert_refused(&late, 401, "unauthorized", "after 8 h");
    assert!(late.text().contains("session expired"), "{}", late.text());
    // The token itself still works; only the session ended.
    let bearer = daemon
        .request("GET", "/api/v1/whoami", Some(&daemon.viewer_token), None)
        .await;
    assert_eq!(bearer.status, 200);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_forged_or_altered_cookie_is_refused() {
    let daemon = TestDaemon::sqlite(Options::default()).await;
    let viewer = logged_in(&daemon, &daemon.viewer_token).await;
    let value = viewer.cookie.split_once('=').unwrap().1.to_string();
    let mac = value.rsplit_once('.').unwrap().1;
    for forged in [
        value.replacen("v1.viewer.", "v1.admin.", 1),
        format!("v1.viewer.99999999999999.{mac}"),
        "v1.viewer.1.zz".to_string(),
        "garbage".to_string(),
        "x".repeat(5000),
    ] {
        let cookie = format!("{COOKIE_NAME}={forged}");
        let response = send(
            &daemon,
            "GET",
            "/api/v1/whoami",
            &[("Cookie", &cookie)],
            None,
        )
        .await;
        assert_refused(&response, 401, "unauthorized", &forged);
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn logout_clears_the_cookie() {
    let daemon = TestDaemon::sqlite(Options::default()).await;
    let browser = logged_in(&daemon, &daemon.operator_token).await;
    let response = send(
        &daemon,
        "POST",
        "/ui/logout",
        &[("Cookie", &browser.cookie)],
        None,
    )
    .await;
    assert_eq!(response.status, 204, "{}", response.text());
    let set = response.header("set-cookie").expect("Set-Cookie");
    assert!(set.starts_with(&format!("{COOKIE_NAME}=;")), "{set}");
    assert!(
        set.contains("Max-Age=0") && set.contains("HttpOnly"),
        "{set}"
    );
    let (_, events) = daemon.admin("GET", "/events?limit=3", None).await;
    assert!(
        events
            .as_array()
            .unwrap()
            .iter()
            .any(|e| e["action"] == "session_closed"),
        "{events}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dashboard_assets_are_served_with_the_security_headers() {
    let daemon = TestDaemon::sqlite(Options::default()).await;
    for (path, content_type) in [
        ("/ui/", "text/html"),
        ("/ui/app.js", "text/javascript"),
        ("/ui/app.css", "text/css"),
        ("/ui/session", "application/json"),
    ] {
        let response = send(&daemon, "GET", path, &[], None).await;
        let csp = response
            .header("content-security-policy")
            .unwrap_or_default();
        assert!(csp.contains("script-src 'self'"), "{path}: {csp}");
        assert!(csp.contains("frame-ancestors 'none'"), "{path}: {csp}");
        assert!(
            !csp.contains("unsafe-inline") && !csp.contains("unsafe-eval"),
            "{path}: {csp}"
        );
        assert_eq!(
            response.header("x-content-type-options"),
            Some("nosniff"),
            "{path}"
        );
        assert_eq!(response.header("x-frame-options"), Some("DENY"), "{path}");
        assert_eq!(
            response.header("referrer-policy"),
            Some("same-origin"),
            "{path}"
        );
        assert!(
            response
                .header("content-type")
                .unwrap_or_default()
                .starts_with(content_type),
            "{path}: {:?}",
            response.header("content-type")
        );
    }
    // The CSP forbids inline script and style, so the page must have none to work.
    let index = send(&daemon, "GET", "/ui/", &[], None).await.text();
    for script in index.split("<script").skip(1) {
        assert!(
            script.trim_start().starts_with("src="),
            "inline script: {script}"
        );
    }
    assert!(
        !index.contains("<style") && !index.contains(" style="),
        "inline style"
    );
    let inline_handler = index.match_indices(" on").any(|(at, _)| {
        let rest = &index[at + 3..];
        let name_end = rest.find(|c: char| !c.is_ascii_alphabetic()).unwrap_or(0);
        name_end > 0 && rest[name_end..].starts_with('=')
    });
    assert!(!inline_handler, "no inline event handlers");
    // Store text (hostnames, reasons, events) goes in as text, never as markup.
    let script = send(&daemon, "GET", "/ui/app.js", &[], None).await.text();
    for sink in [
        "innerHTML",
        "outerHTML",
        "insertAdjacentHTML",
        "document.write",
        "eval(",
    ] {
        assert!(!script.contains(sink), "app.js uses {sink}");
    }
    let root = send(&daemon, "GET", "/", &[], None).await;
    assert!((300..400).contains(&root.status), "{}", root.status);
    assert_eq!(root.header("location"), Some("/ui/"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fleet_grid_lists_every_node_by_rack_compactly() {
    let daemon = TestDaemon::sqlite(Options::default()).await;
    enroll(&daemon, "00000000-0000-4000-8000-000000000002", "b", "r2").await;
    enroll(&daemon, "00000000-0000-4000-8000-000000000001", "a", "r1").await;
    enroll(&daemon, "00000000-0000-4000-8000-000000000003", "c", "r1").await;
    let response = daemon
        .request(
            "GET",
            "/api/v1/fleet/grid",
            Some(&daemon.viewer_token),
            None,
        )
        .await;
    assert_eq!(response.status, 200, "{}", response.text());
    assert_eq!(
        json_of(&response),
        json!({"total": 3, "racks": [
            {"rack": "r1", "nodes": [
                ["00000000-0000-4000-8000-000000000001", "a", "discovered"],
                ["00000000-0000-4000-8000-000000000003", "c", "discovered"]]},
            {"rack": "r2", "nodes": [
                ["00000000-0000-4000-8000-000000000002", "b", "discovered"]]}]})
    );
    let bad = daemon
        .request(
            "GET",
            "/api/v1/fleet/grid?all=1",
            Some(&daemon.viewer_token),
            None,
        )
        .await;
    assert_eq!(bad.status, 400, "{}", bad.text());
}

/// The grid at 10,000 nodes (40 racks of 250, in the in-memory store so the fill is
/// quick): its size, printed for the README, and a budget that keeps the overview cheap.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fleet_grid_at_ten_thousand_nodes_stays_under_a_megabyte() {
    let store: Arc<dyn bearman::store::Store> =
        Arc::new(bearman::store::memory::MemoryStore::new());
    let states = [
        bearman::core::lifecycle::LifecycleState::Ready,
        bearman::core::lifecycle::LifecycleState::Maintenance,
        bearman::core::lifecycle::LifecycleState::Provisioning,
    ];
    for i in 0..10_000u32 {
        let uuid = NodeUuid::parse(&format!("00000000-0000-4000-8000-{i:012x}")).unwrap();
        let mut node = Node::new(
            uuid,
            format!("hv-{:02}-{:03}", i / 250, i % 250),
            NodeRole::Compute,
            0,
        );
        node.rack = Some(format!("r{:02}", i / 250));
        node.state = states[(i % 3) as usize];
        store.node_create(&node, &[]).await.unwrap();
    }
    let daemon = TestDaemon::start(store, None, Options::default()).await;
    let response = daemon
        .request(
            "GET",
            "/api/v1/fleet/grid",
            Some(&daemon.viewer_token),
            None,
        )
        .await;
    assert_eq!(response.status, 200);
    let grid = json_of(&response);
    assert_eq!(grid["total"], 10_000);
    assert_eq!(grid["racks"].as_array().unwrap().len(), 40);
    let bytes = response.body.len();
    println!("fleet grid at 10,000 nodes: {bytes} bytes");
    assert!(bytes < 1024 * 1024, "{bytes} bytes");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn events_after_an_id_follow_the_trail_forward_without_gaps() {
    let daemon = TestDaemon::sqlite(Options::default()).await;
    let (_, newest) = daemon.admin("GET", "/events?limit=1", None).await;
    let mark = newest[0]["id"].as_i64().unwrap();
    for i in 0..5 {
        let uuid = format!("00000000-0000-4000-8000-00000000000{i}");
        enroll(&daemon, &uuid, &format!("n{i}"), "r1").await;
    }
    let (status, page) = daemon
        .admin("GET", &format!("/events?after={mark}&limit=2"), None)
        .await;
    assert_eq!(status, 200, "{page}");
    let ids: Vec<i64> = page
        .as_array()
        .unwrap()
        .iter()
        .map(|e| e["id"].as_i64().unwrap())
        .collect();
    assert_eq!(
        ids,
        vec![mark + 2, mark + 1],
        "the oldest two above, newest first"
    );
    let (_, rest) = daemon
        .admin("GET", &format!("/events?after={}&limit=10", ids[0]), None)
        .await;
    assert_eq!(rest.as_array().unwrap().len(), 3, "{rest}");
    assert_eq!(rest[0]["reason"], "enrolled by operator");
    let (status, bad) = daemon.admin("GET", "/events?after=soon", None).await;
    assert_eq!(status, 400, "{bad}");
    assert!(bad["message"].as_str().unwrap().contains("after"), "{bad}");
}
