//! Golden-file tests for the iPXE scripts the daemon serves. Run with `BEARMAN_BLESS=1` to
//! rewrite the files after an intended change, then review the diff.

use bearman_e2e::{flavor_json, node_pool_json, register_body, Options, TestDaemon};

fn check_golden(name: &str, actual: &str) {
    let path = std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../fixtures/golden")
        .join(name);
    if std::env::var_os("BEARMAN_BLESS").is_some() {
        std::fs::write(&path, actual).unwrap();
        return;
    }
    let expected = std::fs::read_to_string(&path).unwrap_or_else(|_| {
        panic!(
            "missing golden file {}; run with BEARMAN_BLESS=1",
            path.display()
        )
    });
    assert_eq!(actual, expected, "{name} differs from its golden file");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ipxe_scripts_match_golden_files() {
    let daemon = TestDaemon::sqlite(Options {
        default_flavor: Some("hv".into()),
        ..Default::default()
    })
    .await;
    daemon
        .admin("POST", "/flavors", Some(flavor_json("hv")))
        .await;
    daemon.admin("POST", "/pools", Some(node_pool_json())).await;

    let stage1 = daemon.request("GET", "/ipxe", None, None).await;
    assert_eq!(stage1.status, 200);
    assert_eq!(
        stage1.header("content-type"),
        Some("text/plain; charset=utf-8")
    );
    check_golden("stage1.ipxe", &stage1.text());

    let unknown = daemon
        .request(
            "GET",
            "/ipxe/00000000-0000-0000-0000-00000000beef",
            None,
            None,
        )
        .await;
    check_golden("discovery.ipxe", &unknown.text());

    let uuid = "4c4c4544-0042-3510-8052-b4c04f4e4a32";
    let body = serde_json::to_vec(&register_body(7)).unwrap();
    let registered = daemon
        .request("POST", &format!("/ipxe/{uuid}/register"), None, Some(&body))
        .await;
    assert_eq!(registered.status, 200, "{}", registered.text());
    let target = daemon
        .request("GET", &format!("/ipxe/{uuid}"), None, None)
        .await;
    check_golden("target.ipxe", &target.text());

    let (status, _) = daemon
        .admin("POST", &format!("/nodes/{uuid}/retire"), None)
        .await;
    assert_eq!(status, 200);
    let retired = daemon
        .request("GET", &format!("/ipxe/{uuid}"), None, None)
        .await;
    check_golden("retired.ipxe", &retired.text());
}
