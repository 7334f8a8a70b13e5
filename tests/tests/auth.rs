//! Authentication and authorization of the admin API, driven by the daemon's own route
//! table so a route added without thought for its role is caught here, and the
//! unauthenticated network-boot endpoints and `/healthz`.

use bearman::api::admin::{route_table, RouteSpec};
use bearman::core::model::TokenRole;
use bearman_e2e::{flavor_json, json_of, node_pool_json, register_body, Options, TestDaemon};
use bearman_proto::http::{self, Response};
use serde_json::json;

const UUID: &str = "4c4c4544-0042-3510-8052-b4c04f4e4a32";

/// The concrete path of an admin route, with its placeholders filled in.
fn concrete_path(route: &RouteSpec) -> String {
    format!(
        "/api/v1{}",
        route.path.replace("{uuid}", UUID).replace("{name}", "x")
    )
}

/// Sends a request with exactly the `Authorization` header given (or none).
async fn send(
    daemon: &TestDaemon,
    method: &str,
    path: &str,
    authorization: Option<&str>,
    body: Option<&[u8]>,
) -> Response {
    let headers: Vec<(&str, &str)> = authorization
        .map(|value| ("Authorization", value))
        .into_iter()
        .collect();
    send_with(daemon, method, path, &headers, body).await
}

/// Sends a request with these headers (and a JSON content type).
async fn send_with(
    daemon: &TestDaemon,
    method: &str,
    path: &str,
    extra: &[(&str, &str)],
    body: Option<&[u8]>,
) -> Response {
    let mut stream = tokio::net::TcpStream::connect(daemon.address)
        .await
        .expect("connect");
    let mut headers = vec![("Content-Type", "application/json")];
    headers.extend_from_slice(extra);
    let host = daemon.address.to_string();
    let exchange = http::send(&mut stream, method, &host, path, &headers, body);
    tokio::time::timeout(std::time::Duration::from_secs(30), exchange)
        .await
        .expect("response within 30 s")
        .expect("http exchange")
}

fn token_for(daemon: &TestDaemon, role: TokenRole) -> &str {
    match role {
        TokenRole::Admin => &daemon.admin_token,
        TokenRole::Operator => &daemon.operator_token,
        TokenRole::Viewer => &daemon.viewer_token,
    }
}

/// What a request with a given credential must get.
#[derive(Clone, Copy, Debug)]
enum Expect {
    /// 401 with a JSON body and `WWW-Authenticate: Bearer`.
    Unauthorized,
    /// 403 with a JSON body naming the role needed.
    Forbidden,
    /// Through the guard: anything but 401/403, and never a 5xx.
    Admitted,
}

/// Sends `route` with `authorization` and checks the outcome is `expect`.
async fn check(
    daemon: &TestDaemon,
    route: &RouteSpec,
    authorization: Option<&str>,
    expect: Expect,
) {
    let headers: Vec<(&str, &str)> = authorization
        .map(|value| ("Authorization", value))
        .into_iter()
        .collect();
    let shown = authorization.map(|a| a.chars().take(12).collect::<String>());
    check_with(daemon, route, &headers, &format!("{shown:?}"), expect).await
}

/// [`check`] with any credential headers (a session cookie and its CSRF token).
async fn check_with(
    daemon: &TestDaemon,
    route: &RouteSpec,
    headers: &[(&str, &str)],
    shown: &str,
    expect: Expect,
) {
    let path = concrete_path(route);
    let method = route.method.as_str();
    let response = send_with(daemon, method, &path, headers, None).await;
    let what = format!(
        "{method} {path} with {shown} (needs {})",
        route.role.as_str()
    );
    let body = json_of(&response);
    match expect {
        Expect::Unauthorized => {
            assert_eq!(response.status, 401, "{what}: {}", response.text());
            assert_eq!(body["error"], "unauthorized", "{what}: {}", response.text());
            assert!(body["message"].is_string(), "{what}: {}", response.text());
            assert_eq!(
                response.header("www-authenticate"),
                Some("Bearer"),
                "{what}"
            );
            assert_eq!(
                response.header("content-type"),
                Some("application/json"),
                "{what}"
            );
        }
        Expect::Forbidden => {
            assert_eq!(response.status, 403, "{what}: {}", response.text());
            assert_eq!(body["error"], "forbidden", "{what}: {}", response.text());
            let message = body["message"].as_str().unwrap_or_default();
            assert!(
                message.contains(route.role.as_str()),
                "{what}: {message:?} should name the role needed"
            );
        }
        Expect::Admitted => {
            assert!(
                !matches!(response.status, 401 | 403),
                "{what}: the right token was refused: {} {}",
                response.status,
                response.text()
            );
            assert!(
                response.status < 500,
                "{what}: {} {}",
                response.status,
                response.text()
            );
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_admin_route_demands_a_valid_bearer_token() {
    let daemon = TestDaemon::sqlite(Options::default()).await;
    let revoked = {
        let (status, token) = daemon
            .admin(
                "POST",
                "/tokens",
                Some(json!({"name": "gone", "role": "admin"})),
            )
            .await;
        assert_eq!(status, 201, "{token}");
        assert_eq!(daemon.admin("DELETE", "/tokens/gone", None).await.0, 204);
        format!("Bearer {}", token["secret"].as_str().unwrap())
    };
    let wrong_credentials = [
        None,
        Some("Bearer nonsense".to_string()),
        Some("Basic abc".to_string()),
        Some("Bearer ".to_string()),
        Some(
            "Bearer bm_0000000000000000000000000000000000000000000000000000000000000000"
                .to_string(),
        ),
        Some(daemon.admin_token.clone()),
        Some(format!("Basic {}", daemon.admin_token)),
        Some(revoked),
    ];
    for route in route_table() {
        for credential in &wrong_credentials {
            check(&daemon, &route, credential.as_deref(), Expect::Unauthorized).await;
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn each_route_admits_exactly_the_roles_at_or_above_its_least_role() {
    let daemon = TestDaemon::sqlite(Options::default()).await;
    for route in route_table() {
        for role in [TokenRole::Viewer, TokenRole::Operator, TokenRole::Admin] {
            let authorization = format!("Bearer {}", token_for(&daemon, role));
            let expect = if role < route.role {
                Expect::Forbidden
            } else {
                Expect::Admitted
            };
            check(&daemon, &route, Some(&authorization), expect).await;
        }
    }
}

/// A dashboard login: the `Cookie` header value and the session's CSRF token.
async fn session_of(daemon: &TestDaemon, secret: &str) -> (String, String) {
    let body = serde_json::to_vec(&json!({ "token": secret })).unwrap();
    let response = send_with(daemon, "POST", "/ui/login", &[], Some(&body)).await;
    assert_eq!(response.status, 200, "{}", response.text());
    let cookie = response
        .header("set-cookie")
        .and_then(|set| set.split(';').next())
        .expect("a session cookie")
        .to_string();
    let csrf = json_of(&response)["csrf"].as_str().unwrap().to_string();
    (cookie, csrf)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn each_route_admits_a_dashboard_session_exactly_as_its_tokens_role() {
    let daemon = TestDaemon::sqlite(Options::default()).await;
    for role in [TokenRole::Viewer, TokenRole::Operator, TokenRole::Admin] {
        let (cookie, csrf) = session_of(&daemon, token_for(&daemon, role)).await;
        for route in route_table() {
            let expect = if role < route.role {
                Expect::Forbidden
            } else {
                Expect::Admitted
            };
            let headers = [
                ("Cookie", cookie.as_str()),
                ("X-Bearman-Csrf", csrf.as_str()),
            ];
            let shown = format!("a {} session", role.as_str());
            check_with(&daemon, &route, &headers, &shown, expect).await;
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_state_changing_route_refuses_a_session_without_its_csrf_token() {
    let daemon = TestDaemon::sqlite(Options::default()).await;
    let (cookie, _) = session_of(&daemon, &daemon.admin_token).await;
    let (_, other_csrf) = session_of(&daemon, &daemon.operator_token).await;
    for route in route_table() {
        let path = concrete_path(&route);
        let method = route.method.as_str();
        for headers in [
            vec![("Cookie", cookie.as_str())],
            vec![
                ("Cookie", cookie.as_str()),
                ("X-Bearman-Csrf", other_csrf.as_str()),
            ],
        ] {
            let response = send_with(&daemon, method, &path, &headers, None).await;
            if method == "GET" {
                // Reads need no CSRF token: through the guard (a 404 for the made-up uuid).
                assert!(
                    !matches!(response.status, 401 | 403) && response.status < 500,
                    "{method} {path}: {}",
                    response.text()
                );
                continue;
            }
            assert_eq!(response.status, 403, "{method} {path}: {}", response.text());
            assert_eq!(json_of(&response)["error"], "csrf", "{method} {path}");
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn forbidden_requests_change_nothing() {
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
    let body = serde_json::to_vec(&register_body(1)).unwrap();
    assert_eq!(
        send(
            &daemon,
            "POST",
            &format!("/ipxe/{UUID}/register"),
            None,
            Some(&body)
        )
        .await
        .status,
        200
    );
    let (_, node_before) = daemon.admin("GET", &format!("/nodes/{UUID}"), None).await;
    let (_, tokens_before) = daemon.admin("GET", "/tokens", None).await;

    let attempts = [
        (
            &daemon.viewer_token,
            "POST",
            "/api/v1/tokens".to_string(),
            json!({"name": "evil", "role": "admin"}),
        ),
        (
            &daemon.operator_token,
            "POST",
            "/api/v1/tokens".to_string(),
            json!({"name": "evil", "role": "admin"}),
        ),
        (
            &daemon.operator_token,
            "DELETE",
            "/api/v1/tokens/admin".to_string(),
            json!(null),
        ),
        (
            &daemon.operator_token,
            "POST",
            format!("/api/v1/nodes/{UUID}/retire"),
            json!({}),
        ),
        (
            &daemon.operator_token,
            "PATCH",
            format!("/api/v1/nodes/{UUID}"),
            json!({"hostname": "owned"}),
        ),
        (
            &daemon.viewer_token,
            "POST",
            format!("/api/v1/nodes/{UUID}/maintenance"),
            json!({}),
        ),
        (
            &daemon.viewer_token,
            "DELETE",
            "/api/v1/flavors/hv".to_string(),
            json!(null),
        ),
    ];
    for (token, method, path, body) in attempts {
        let bytes = (!body.is_null()).then(|| serde_json::to_vec(&body).unwrap());
        let response = daemon
            .request(method, &path, Some(token), bytes.as_deref())
            .await;
        assert_eq!(response.status, 403, "{method} {path}: {}", response.text());
    }
    assert_eq!(
        daemon.admin("GET", &format!("/nodes/{UUID}"), None).await.1,
        node_before
    );
    assert_eq!(daemon.admin("GET", "/tokens", None).await.1, tokens_before);
    assert_eq!(daemon.admin("GET", "/flavors/hv", None).await.0, 200);
    let (status, me) = daemon.admin("GET", "/whoami", None).await;
    assert_eq!(
        (status, me["role"].as_str()),
        (200, Some("admin")),
        "the admin token survived"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn whoami_reports_each_tokens_role() {
    let daemon = TestDaemon::sqlite(Options::default()).await;
    for role in [TokenRole::Viewer, TokenRole::Operator, TokenRole::Admin] {
        let response = daemon
            .request(
                "GET",
                "/api/v1/whoami",
                Some(token_for(&daemon, role)),
                None,
            )
            .await;
        assert_eq!(response.status, 200, "{}", response.text());
        let me = json_of(&response);
        assert_eq!(me["role"], role.as_str());
        assert_eq!(
            me["token"],
            role.as_str(),
            "the harness names tokens after their role"
        );
    }
}

#[test]
fn route_table_is_complete_and_covers_every_role() {
    let table = route_table();
    assert!(!table.is_empty());
    for role in [TokenRole::Viewer, TokenRole::Operator, TokenRole::Admin] {
        assert!(
            table.iter().any(|route| route.role == role),
            "no route needs {}",
            role.as_str()
        );
    }
    let mut seen = std::collections::BTreeSet::new();
    for route in &table {
        assert!(route.path.starts_with('/'), "{route:?}");
        assert!(
            seen.insert((route.method.to_string(), route.path)),
            "{route:?} is declared twice"
        );
    }
    // Everything that changes the fleet's inventory or who may do so is admin-only.
    for (method, path) in [
        ("POST", "/tokens"),
        ("DELETE", "/tokens/{name}"),
        ("POST", "/nodes/{uuid}/retire"),
    ] {
        let route = table
            .iter()
            .find(|r| r.method.as_str() == method && r.path == path)
            .unwrap_or_else(|| panic!("{method} {path} is missing from the route table"));
        assert_eq!(route.role, TokenRole::Admin, "{method} {path}");
    }
    let listing = table
        .iter()
        .find(|r| r.method.as_str() == "GET" && r.path == "/nodes")
        .expect("GET /nodes");
    assert_eq!(listing.role, TokenRole::Viewer);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn boot_endpoints_and_healthz_need_no_token() {
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
    let registration = serde_json::to_vec(&register_body(1)).unwrap();
    // In boot order, so each step is legal; none carries a token, and a junk header is
    // ignored rather than refused (firmware may send anything).
    let steps: [(&str, String, Option<&[u8]>); 8] = [
        ("GET", "/healthz".into(), None),
        ("GET", "/ipxe".into(), None),
        (
            "POST",
            format!("/ipxe/{UUID}/register"),
            Some(&registration),
        ),
        ("GET", format!("/ipxe/{UUID}"), None),
        ("GET", format!("/ipxe/{UUID}/profile"), None),
        ("GET", format!("/ipxe/{UUID}/detail"), None),
        ("POST", format!("/ipxe/{UUID}/installed"), None),
        ("POST", format!("/ipxe/{UUID}/heartbeat"), None),
    ];
    for (method, path, body) in steps {
        for authorization in [None, Some("Basic abc")] {
            let response = send(&daemon, method, &path, authorization, body).await;
            assert_eq!(
                response.status,
                200,
                "{method} {path} with {authorization:?}: {}",
                response.text()
            );
            assert!(
                response.header("www-authenticate").is_none(),
                "{method} {path}"
            );
        }
    }
    let health = send(&daemon, "GET", "/healthz", None, None).await;
    assert_eq!(health.text(), "ok\n");
    let (_, node) = daemon.admin("GET", &format!("/nodes/{UUID}"), None).await;
    assert_eq!(node["state"], "ready");
}
