//! `GET /metrics` over real HTTP: who may read it, its format, and that a boot
//! conversation shows in it with bounded labels (no uuid anywhere).

use bearman_agent::net::TcpConnector;
use bearman_agent::BootClient;
use bearman_e2e::{bmc_pool_json, flavor_json, node_pool_json, register_body, Options, TestDaemon};
use bearman_proto::uuid::NodeUuid;
use bearman_proto::{Heartbeat, InstalledReport};

fn header<'a>(response: &'a bearman_proto::http::Response, name: &str) -> Option<&'a str> {
    response.header(name)
}

fn text(response: &bearman_proto::http::Response) -> String {
    String::from_utf8(response.body.clone()).expect("metrics are UTF-8")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn metrics_need_a_viewer_token_and_speak_openmetrics() {
    let daemon = TestDaemon::sqlite(Options::default()).await;
    let anonymous = daemon.request("GET", "/metrics", None, None).await;
    assert_eq!(anonymous.status, 401, "{}", text(&anonymous));
    let wrong = daemon
        .request("GET", "/metrics", Some("not-a-token"), None)
        .await;
    assert_eq!(wrong.status, 401);
    let viewer = daemon
        .request("GET", "/metrics", Some(&daemon.viewer_token), None)
        .await;
    assert_eq!(viewer.status, 200, "{}", text(&viewer));
    assert_eq!(
        header(&viewer, "content-type"),
        Some(bearman::telemetry::CONTENT_TYPE)
    );
    let body = text(&viewer);
    assert!(body.ends_with("# EOF\n"), "{body}");
    assert!(
        body.contains("# TYPE bearman_http_requests counter"),
        "{body}"
    );
    assert!(body.contains("bearman_build_info{version=\""), "{body}");
    // The daemon in this harness runs no controller: it says so.
    assert!(body.contains("bearman_controller_up 0"), "{body}");
    // Read from the database's drill board: no drill, no kill switch.
    assert!(body.contains("bearman_drill_running 0"), "{body}");
    assert!(body.contains("bearman_drills_blocked 0"), "{body}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn public_metrics_need_no_token() {
    let daemon = TestDaemon::sqlite(Options {
        metrics_public: true,
        ..Options::default()
    })
    .await;
    let anonymous = daemon.request("GET", "/metrics", None, None).await;
    assert_eq!(anonymous.status, 200, "{}", text(&anonymous));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_boot_conversation_shows_in_the_metrics_without_uuids() {
    let daemon = TestDaemon::sqlite(Options {
        default_flavor: Some("hv".into()),
        ..Default::default()
    })
    .await;
    for (path, body) in [
        ("/flavors", flavor_json("hv")),
        ("/pools", node_pool_json()),
        ("/pools", bmc_pool_json()),
    ] {
        assert_eq!(daemon.admin("POST", path, Some(body)).await.0, 201);
    }
    let uuid = NodeUuid::parse("4C4C4544-0042-3510-8052-B4C04F4E4A32").unwrap();
    let client = BootClient::new(TcpConnector, &daemon.url(), uuid.clone()).unwrap();
    client.stage1_script().await.unwrap();
    client.prepare_boot(&register_body(1)).await.unwrap();
    let installed = InstalledReport {
        os_release: Some("Ubuntu 24.04".into()),
    };
    assert_eq!(client.installed(&installed).await.unwrap(), "ready");
    for _ in 0..3 {
        assert_eq!(
            client.heartbeat(&Heartbeat::default()).await.unwrap(),
            "ready"
        );
    }
    // A path no route has: counted, under a label of its own, not its text.
    let stray = daemon
        .request("GET", "/ipxe/not/a/route/at/all", None, None)
        .await;
    assert_eq!(stray.status, 404);

    let response = daemon
        .request("GET", "/metrics", Some(&daemon.viewer_token), None)
        .await;
    assert_eq!(response.status, 200);
    let body = text(&response);
    for line in [
        "bearman_registrations_total{outcome=\"registered\"} 1",
        "bearman_boot_scripts_served_total{script=\"stage1\"} 1",
        "bearman_boot_scripts_served_total{script=\"target\"} 1",
        "bearman_installed_reports_total 1",
        "bearman_heartbeats_total 3",
        "bearman_nodes{state=\"ready\",rack=\"tor-a01\",role=\"compute\"} 1",
        "bearman_http_requests_total{route=\"/ipxe/{uuid}/heartbeat\",method=\"POST\",status=\"200\"} 3",
        "bearman_http_requests_total{route=\"/ipxe/{uuid}/register\",method=\"POST\",status=\"200\"} 1",
        "bearman_http_requests_total{route=\"/api/v1/pools\",method=\"POST\",status=\"201\"} 2",
        "bearman_http_requests_total{route=\"other\",method=\"GET\",status=\"404\"} 1",
        "bearman_http_request_duration_seconds_count{route=\"/ipxe/{uuid}/heartbeat\"} 3",
    ] {
        assert!(body.contains(line), "missing {line:?} in\n{body}");
    }
    if std::env::var_os("SHOW_METRICS").is_some() {
        eprintln!("{body}");
    }
    let lowercase = uuid.as_str().to_ascii_lowercase();
    assert!(
        !body.to_ascii_lowercase().contains(&lowercase),
        "a uuid leaked into a label:\n{body}"
    );
}

#[test]
fn route_labels_are_templates_from_a_fixed_set() {
    use bearman::api::route_label;
    for (path, label) in [
        ("/ipxe", "/ipxe"),
        ("/ipxe/4c4c4544-0042-3510-8052-b4c04f4e4a32", "/ipxe/{uuid}"),
        (
            "/ipxe/4c4c4544-0042-3510-8052-b4c04f4e4a32/heartbeat",
            "/ipxe/{uuid}/heartbeat",
        ),
        ("/images/hv/vmlinuz", "/images/{path}"),
        ("/api/v1/nodes", "/api/v1/nodes"),
        (
            "/api/v1/nodes/anything/maintenance",
            "/api/v1/nodes/{uuid}/maintenance",
        ),
        (
            "/api/v1/remediations/17/cancel",
            "/api/v1/remediations/{id}/cancel",
        ),
        ("/metrics", "/metrics"),
        ("/healthz", "/healthz"),
        ("/ipxe//heartbeat", "other"),
        ("/ipxe/", "other"),
        ("/ipxex", "other"),
        ("/ipxe/u/heartbeat/more", "other"),
        ("/ipxe/u/register", "/ipxe/{uuid}/register"),
        ("/ipxe/u/profile", "/ipxe/{uuid}/profile"),
        ("/ipxe/u/detail", "/ipxe/{uuid}/detail"),
        ("/ipxe/u/installed", "/ipxe/{uuid}/installed"),
        ("/ipxe/u/progress", "/ipxe/{uuid}/progress"),
        ("/api/v1/nodes/x/y/z", "other"),
        ("/wp-login.php", "other"),
    ] {
        assert_eq!(route_label(path), label, "{path}");
    }
}
