//! Operator remediation over HTTP: starting, listing, refusing a second one, refusing to
//! cancel mid-fence, refusing maintenance nodes, the guards endpoint and the node power
//! reading.

use bearman::core::power_sync::PowerReading;
use bearman_e2e::{flavor_json, register_body, Options, TestDaemon};
use bearman_proto::uuid::NodeUuid;
use serde_json::json;

const UUID: &str = "4c4c4544-0042-3510-8052-b4c04f4e4a32";

async fn ready_node(daemon: &TestDaemon) {
    daemon
        .admin("POST", "/flavors", Some(flavor_json("hv")))
        .await;
    let body = serde_json::to_vec(&register_body(1)).unwrap();
    assert_eq!(
        daemon
            .request("POST", &format!("/ipxe/{UUID}/register"), None, Some(&body))
            .await
            .status,
        200
    );
    assert_eq!(
        daemon
            .request("GET", &format!("/ipxe/{UUID}"), None, None)
            .await
            .status,
        200
    );
    assert_eq!(
        daemon
            .request("POST", &format!("/ipxe/{UUID}/installed"), None, None)
            .await
            .status,
        200
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn operator_remediation_is_recorded_and_guarded() {
    let daemon = TestDaemon::sqlite(Options {
        default_flavor: Some("hv".into()),
        ..Default::default()
    })
    .await;
    ready_node(&daemon).await;

    let (status, created) = daemon
        .admin(
            "POST",
            &format!("/nodes/{UUID}/evacuate"),
            Some(json!({"reason": "disk alarms"})),
        )
        .await;
    assert_eq!(status, 202, "{created}");
    assert_eq!(created["kind"], "evacuate");
    assert_eq!(created["status"], "active");
    assert_eq!(
        created["plan"],
        json!([
            "soft_off",
            "power_off",
            "verify_off",
            "force_down",
            "evacuate",
            "verify_evacuated"
        ])
    );
    let id = created["id"].as_i64().unwrap();

    let (status, second) = daemon
        .admin("POST", &format!("/nodes/{UUID}/fence"), None)
        .await;
    assert_eq!(status, 409);
    assert_eq!(second["error"], "remediation_active");

    let (status, listed) = daemon.admin("GET", "/remediations?active=true", None).await;
    assert_eq!(status, 200);
    assert_eq!(listed.as_array().unwrap().len(), 1);
    let (status, shown) = daemon
        .admin("GET", &format!("/remediations/{id}"), None)
        .await;
    assert_eq!((status, shown["id"].as_i64()), (200, Some(id)));

    // A power-off in flight cannot be cancelled.
    let (status, refused) = daemon
        .admin("POST", &format!("/remediations/{id}/cancel"), None)
        .await;
    assert_eq!(status, 409);
    assert_eq!(refused["error"], "not_cancellable");

    let (status, _) = daemon.admin("GET", "/remediations/0", None).await;
    assert_eq!(status, 400);
    let (status, _) = daemon.admin("GET", "/remediations/999", None).await;
    assert_eq!(status, 404);
    let (status, _) = daemon.admin("GET", "/remediations?bogus=1", None).await;
    assert_eq!(status, 400);

    let (status, events) = daemon
        .admin("GET", &format!("/nodes/{UUID}/events"), None)
        .await;
    assert_eq!(status, 200);
    assert!(events
        .as_array()
        .unwrap()
        .iter()
        .any(|e| e["action"] == "remediation_started"
            && e["actor"] == "token:admin"
            && e["reason"].as_str().unwrap().contains("disk alarms")));

    // No controller runs in this test daemon: the guards say so.
    let (status, guards) = daemon.admin("GET", "/remediation/guards", None).await;
    assert_eq!(status, 200);
    assert_eq!(guards["controller_running"], false);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn node_power_shows_the_last_bmc_reading() {
    let daemon = TestDaemon::sqlite(Options {
        default_flavor: Some("hv".into()),
        ..Default::default()
    })
    .await;
    ready_node(&daemon).await;
    let path = format!("/nodes/{UUID}/power");
    let (status, body) = daemon.admin("GET", &path, None).await;
    assert_eq!(status, 200);
    assert_eq!(body["uuid"], UUID);
    assert!(body["power"].is_null(), "never polled: {body}");

    // What the controller's power sync records is what the API shows.
    let uuid = NodeUuid::parse(UUID).unwrap();
    let reading = PowerReading::unknown("bmc 10.0.0.5:623: power_state timed out", 1_234);
    daemon
        .store
        .node_power_record(&uuid, &reading, &[])
        .await
        .unwrap();
    let (status, body) = daemon.admin("GET", &path, None).await;
    assert_eq!(status, 200);
    assert_eq!(body["power"]["state"], "unknown");
    assert_eq!(body["power"]["read_at_ms"], 1_234);
    assert_eq!(
        body["power"]["error"],
        "bmc 10.0.0.5:623: power_state timed out"
    );

    let (status, body) = daemon
        .admin(
            "GET",
            "/nodes/00000000-0000-0000-0000-0000000000ff/power",
            None,
        )
        .await;
    assert_eq!(status, 404, "{body}");
    let (status, _) = daemon.admin("GET", "/nodes/not-a-uuid/power", None).await;
    assert_eq!(status, 400);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn maintenance_nodes_and_unknown_nodes_are_refused() {
    let daemon = TestDaemon::sqlite(Options {
        default_flavor: Some("hv".into()),
        ..Default::default()
    })
    .await;
    ready_node(&daemon).await;
    let (status, _) = daemon
        .admin("POST", &format!("/nodes/{UUID}/maintenance"), None)
        .await;
    assert_eq!(status, 200);
    for action in ["fence", "evacuate", "rebuild", "drain"] {
        let (status, body) = daemon
            .admin("POST", &format!("/nodes/{UUID}/{action}"), None)
            .await;
        assert_eq!(status, 409, "{action}: {body}");
        assert_eq!(body["error"], "illegal_state");
    }
    let (status, _) = daemon
        .admin(
            "POST",
            "/nodes/00000000-0000-0000-0000-000000000001/fence",
            None,
        )
        .await;
    assert_eq!(status, 404);
    let (_, listed) = daemon.admin("GET", "/remediations", None).await;
    assert!(
        listed.as_array().unwrap().is_empty(),
        "refused requests created nothing"
    );
}
