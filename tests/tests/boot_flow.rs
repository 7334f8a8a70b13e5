//! The whole network-boot conversation over real HTTP against a daemon on SQLite, driven by
//! the agent's own boot-protocol client: register → /ipxe/{uuid} → profile → detail →
//! installed → Ready, then heartbeats.

use bearman_agent::net::TcpConnector;
use bearman_agent::BootClient;
use bearman_e2e::{bmc_pool_json, flavor_json, node_pool_json, register_body, Options, TestDaemon};
use bearman_proto::uuid::NodeUuid;
use bearman_proto::{Heartbeat, InstalledReport};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn node_goes_from_register_to_ready_over_http() {
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
    assert_eq!(
        daemon
            .admin("POST", "/pools", Some(bmc_pool_json()))
            .await
            .0,
        201
    );

    let uuid = NodeUuid::parse("4C4C4544-0042-3510-8052-B4C04F4E4A32").unwrap();
    let client = BootClient::new(TcpConnector, &daemon.url(), uuid.clone()).unwrap();

    // Stage 1's first call: the generic script carries iPXE's ${uuid}.
    let stage1 = client.stage1_script().await.unwrap();
    let kernel = stage1.kernel.unwrap();
    assert!(
        kernel.args.contains("bearman.uuid=${uuid}"),
        "{}",
        kernel.args
    );
    assert!(kernel.args.contains("bearman.url=http://bearman.test:8080"));

    // The stage-1 agent announces itself first; a machine not known yet changes nothing.
    assert_eq!(client.progress("stage1").await.unwrap(), "unknown");
    assert_eq!(
        daemon.admin("GET", &format!("/nodes/{uuid}"), None).await.0,
        404
    );

    let plan = client
        .prepare_boot(&register_body(1))
        .await
        .expect("stage 1 conversation");
    assert_eq!(plan.registration.state, "registered");
    assert_eq!(
        plan.registration.hostname,
        "node-4c4c4544-0042-3510-8052-b4c04f4e4a32"
    );
    let bmc = plan
        .registration
        .bmc
        .clone()
        .expect("bmc settings from the bmc pool");
    assert_eq!((bmc.address.as_str(), bmc.prefix_len), ("10.20.0.10", 24));
    assert_eq!(plan.profile.flavor, "hv");
    assert_eq!(
        plan.profile.kernel.url,
        "http://bearman.test:8080/images/hv/vmlinuz"
    );
    assert_eq!(plan.profile.initrds.len(), 1);
    assert_eq!(
        plan.script.initrds,
        vec!["http://bearman.test:8080/images/hv/initrd.img".to_string()]
    );
    assert!(
        plan.profile
            .cmdline
            .contains("hostname=node-4c4c4544-0042-3510-8052-b4c04f4e4a32 ip=10.10.0.10"),
        "{}",
        plan.profile.cmdline
    );
    assert_eq!(
        plan.script.kernel.as_ref().unwrap().args,
        plan.profile.cmdline
    );
    assert_eq!(
        plan.detail.bond0_addresses,
        vec!["10.10.0.10/24".to_string()]
    );
    assert_eq!(plan.detail.vlan, Some(100));
    assert_eq!(plan.detail.gateway.as_deref(), Some("10.10.0.1"));
    assert_eq!(plan.detail.mtu, 9000);
    assert_eq!(plan.detail.bond0_slaves.len(), 2);

    let (_, node) = daemon.admin("GET", &format!("/nodes/{uuid}"), None).await;
    assert_eq!(node["state"], "provisioning");
    assert_eq!(node["rack"], "tor-a01", "rack comes from LLDP");
    // Each milestone the daemon witnessed is on the record, for the boot watchdog.
    assert_eq!(node["boot"]["phase"], "os_fetched", "{node}");
    assert_eq!(client.progress("stage1").await.unwrap(), "provisioning");
    let (_, node) = daemon.admin("GET", &format!("/nodes/{uuid}"), None).await;
    assert_eq!(node["boot"]["phase"], "stage1");
    // Only stage 1 is the node's to report; the rest the daemon sees for itself.
    let refused = client.progress("installed").await.unwrap_err().to_string();
    assert!(
        refused.contains("422") || refused.contains("phase"),
        "{refused}"
    );
    let refused = client.progress("warp-drive").await.unwrap_err().to_string();
    assert!(refused.contains("unknown boot phase"), "{refused}");

    let state = client
        .installed(&InstalledReport {
            os_release: Some("Ubuntu 24.04".into()),
        })
        .await
        .unwrap();
    assert_eq!(state, "ready");
    assert_eq!(
        client.heartbeat(&Heartbeat::default()).await.unwrap(),
        "ready"
    );

    let (_, node) = daemon.admin("GET", &format!("/nodes/{uuid}"), None).await;
    assert_eq!(node["state"], "ready");
    assert!(node["last_heartbeat_at_ms"].as_i64().is_some());
    assert_eq!(node["boot"]["phase"], "installed");

    // The audit trail tells the story in order.
    let (_, events) = daemon
        .admin("GET", &format!("/nodes/{uuid}/events"), None)
        .await;
    let transitions: Vec<String> = events
        .as_array()
        .unwrap()
        .iter()
        .rev()
        .filter(|e| e["to_state"].is_string())
        .map(|e| {
            format!(
                "{}->{}",
                e["from_state"].as_str().unwrap(),
                e["to_state"].as_str().unwrap()
            )
        })
        .collect();
    assert_eq!(
        transitions,
        vec![
            "discovered->registered",
            "registered->provisioning",
            "provisioning->ready"
        ]
    );

    // A reboot goes around again with the same identity and the same address.
    let again = client.prepare_boot(&register_body(1)).await.unwrap();
    assert_eq!(again.detail.bond0_addresses, plan.detail.bond0_addresses);
    assert_eq!(
        client.installed(&InstalledReport::default()).await.unwrap(),
        "ready"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn many_nodes_registering_at_once_get_distinct_addresses() {
    let daemon = TestDaemon::sqlite(Options {
        default_flavor: Some("hv".into()),
        ..Default::default()
    })
    .await;
    daemon
        .admin("POST", "/flavors", Some(flavor_json("hv")))
        .await;
    daemon.admin("POST", "/pools", Some(node_pool_json())).await;
    let url = daemon.url();
    let mut tasks = Vec::new();
    for index in 0..40u32 {
        let url = url.clone();
        tasks.push(tokio::spawn(async move {
            let uuid = NodeUuid::from_index(0xabc, index as u64);
            let client = BootClient::new(TcpConnector, &url, uuid).unwrap();
            let plan = client
                .prepare_boot(&register_body(index))
                .await
                .expect("boot");
            client
                .installed(&InstalledReport::default())
                .await
                .expect("installed");
            plan.detail.bond0_addresses[0].clone()
        }));
    }
    let mut addresses = std::collections::BTreeSet::new();
    for task in tasks {
        let address = task.await.unwrap();
        assert!(
            addresses.insert(address.clone()),
            "{address} handed out twice"
        );
    }
    let (_, summary) = daemon.admin("GET", "/summary", None).await;
    assert_eq!(summary["by_state"]["ready"], 40);
}

/// A daemon with flavor `hv` as the default and one node registered from the fixture
/// (`register_body(index)`); returns the node's uuid.
async fn registered_node(index: u32) -> (TestDaemon, &'static str) {
    let daemon = TestDaemon::sqlite(Options {
        default_flavor: Some("hv".into()),
        ..Default::default()
    })
    .await;
    daemon
        .admin("POST", "/flavors", Some(flavor_json("hv")))
        .await;
    let uuid = "4c4c4544-0042-3510-8052-b4c04f4e4a32";
    let body = serde_json::to_vec(&register_body(index)).unwrap();
    let registered = daemon
        .request("POST", &format!("/ipxe/{uuid}/register"), None, Some(&body))
        .await;
    assert_eq!(registered.status, 200);
    (daemon, uuid)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn target_script_follows_flavor_and_node_changes() {
    let (daemon, uuid) = registered_node(3).await;
    let path = format!("/ipxe/{uuid}");
    let first = daemon.request("GET", &path, None, None).await.text();
    // Served again (from the rendered-script cache) it is the same script.
    assert_eq!(daemon.request("GET", &path, None, None).await.text(), first);

    let mut changed = flavor_json("hv");
    changed["cmdline_template"] = serde_json::json!("quiet hostname={hostname}");
    let (status, _) = daemon.admin("PUT", "/flavors/hv", Some(changed)).await;
    assert_eq!(status, 200);
    let after_flavor = daemon.request("GET", &path, None, None).await.text();
    assert!(
        after_flavor.contains("quiet hostname=node-4c4c4544-0042-3510-8052-b4c04f4e4a32"),
        "{after_flavor}"
    );

    let (status, _) = daemon
        .admin(
            "PATCH",
            &format!("/nodes/{uuid}"),
            Some(serde_json::json!({"hostname": "cn0001"})),
        )
        .await;
    assert_eq!(status, 200);
    let after_rename = daemon.request("GET", &path, None, None).await.text();
    assert!(
        after_rename.contains("quiet hostname=cn0001"),
        "{after_rename}"
    );
}

/// A node whose BMC is a VM's QMP socket reports an in-band BMC (QEMU's emulated one, say):
/// it gets no OOB address, and the socket the daemon fences it through is kept. A node
/// fenced over IPMI gets the pool address as before.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_bmc_reached_over_qmp_keeps_its_address_at_registration() {
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
    let vm = NodeUuid::from_index(9, 1);
    let server = NodeUuid::from_index(9, 2);
    for (uuid, bmc) in [
        (
            &vm,
            serde_json::json!({"driver": "qmp", "address": "vm1.qmp"}),
        ),
        (&server, serde_json::json!({"driver": "ipmi"})),
    ] {
        let enroll = serde_json::json!({"uuid": uuid.to_string(), "bmc": bmc});
        assert_eq!(daemon.admin("POST", "/nodes", Some(enroll)).await.0, 201);
    }

    let client = BootClient::new(TcpConnector, &daemon.url(), vm.clone()).unwrap();
    let body = register_body(21);
    assert!(body.bmc.is_some(), "the fixture reports a BMC");
    let registration = client.register(&body).await.unwrap();
    assert_eq!(
        registration.bmc, None,
        "no OOB settings for a QMP-driven BMC"
    );
    let (_, node) = daemon.admin("GET", &format!("/nodes/{vm}"), None).await;
    assert_eq!(node["bmc"]["address"], "vm1.qmp");
    assert_eq!(node["bmc"]["driver"], "qmp");

    let client = BootClient::new(TcpConnector, &daemon.url(), server.clone()).unwrap();
    let registration = client.register(&register_body(22)).await.unwrap();
    let settings = registration.bmc.expect("an IPMI BMC gets its OOB address");
    let (_, node) = daemon.admin("GET", &format!("/nodes/{server}"), None).await;
    assert_eq!(node["bmc"]["address"], settings.address.as_str());

    let (_, pool) = daemon.admin("GET", "/pools/oob", None).await;
    let allocated: Vec<&str> = pool["allocations"]
        .as_array()
        .expect("allocations listed")
        .iter()
        .filter_map(|allocation| allocation["node_uuid"].as_str())
        .collect();
    assert_eq!(allocated, vec![server.to_string().as_str()]);
}

/// `GET /ipxe/{uuid}` answered before routing (a cached script at the current content
/// epoch) is byte for byte, header for header, what the router's handler sent; and what
/// the fast path must leave to the router (a longer path, a malformed uuid) or may take
/// either way (upper case, a query string) still gets the router's answer.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_pre_routing_answer_is_the_routers_answer() {
    let (daemon, uuid) = registered_node(4).await;
    let path = format!("/ipxe/{uuid}");
    // The first GET writes (registered → provisioning) and renders through the router;
    // the second stores the script at the epoch; the third is answered before routing.
    let routed = daemon.request("GET", &path, None, None).await;
    let _ = daemon.request("GET", &path, None, None).await;
    let fast = daemon.request("GET", &path, None, None).await;
    assert_eq!(routed.status, 200);
    assert_eq!(fast.status, routed.status);
    assert_eq!(fast.body, routed.body);
    assert_eq!(fast.header("content-type"), routed.header("content-type"));

    let upper = daemon
        .request(
            "GET",
            &path.to_uppercase().replace("/IPXE/", "/ipxe/"),
            None,
            None,
        )
        .await;
    assert_eq!((upper.status, &upper.body), (200, &routed.body));
    let query = daemon
        .request("GET", &format!("{path}?from=ipxe"), None, None)
        .await;
    assert_eq!((query.status, &query.body), (200, &routed.body));
    let malformed = daemon
        .request(
            "GET",
            "/ipxe/4c4c4544-0042-3510-8052-b4c04f4e4a3z",
            None,
            None,
        )
        .await;
    assert_eq!(malformed.status, 400);
    let profile = daemon
        .request("GET", &format!("{path}/profile"), None, None)
        .await;
    assert_eq!(profile.status, 200);
    assert!(profile.text().starts_with('{'), "{}", profile.text());
}
