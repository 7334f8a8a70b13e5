//! The store conformance suite: one set of checks every [`Store`] must pass, run against
//! memory, cached, SQLite and PostgreSQL stores. Each check panics with a message saying
//! which guarantee broke. Checks use disjoint uuids, racks and names so they can share one
//! (possibly non-empty) database.

use std::collections::BTreeSet;
use std::sync::Arc;

use bearman_proto::uuid::NodeUuid;
use bearman_proto::{Artifact, NicFacts};

use super::{Store, StoreError};
use crate::core::lifecycle::LifecycleState;
use crate::core::model::{
    Action, EventFilter, Flavor, IpPool, NewEvent, Node, NodeFilter, NodeRole, PoolPurpose,
    TokenRole,
};
use crate::core::power_sync::{PowerReading, PowerReadingState};
use crate::core::remediation::{Remediation, RemediationKind, Status};

fn node(namespace: u32, index: u64, rack: &str) -> Node {
    let uuid = NodeUuid::from_index(namespace, index);
    let mut node = Node::new(
        uuid.clone(),
        format!("cn-{namespace}-{index}"),
        NodeRole::Compute,
        1_000,
    );
    node.rack = Some(rack.to_string());
    node.serial = format!("SER{namespace}{index}");
    node.hardware.nics.push(NicFacts {
        name: "eth0".into(),
        mac: format!("02:00:00:00:{:02x}:{:02x}", namespace % 256, index % 256),
        speed_mbps: Some(25_000),
        lldp: None,
    });
    node
}

fn pool(name: &str, purpose: PoolPurpose, cidr: &str, start: &str, end: &str) -> IpPool {
    IpPool {
        name: name.into(),
        purpose,
        vlan: None,
        cidr: cidr.into(),
        range_start: start.into(),
        range_end: end.into(),
        gateway: None,
        dns: vec![],
        mtu: 1500,
    }
}

fn flavor(name: &str) -> Flavor {
    Flavor {
        name: name.into(),
        kernel: Artifact {
            url: "http://images/vmlinuz".into(),
            sha256: "a".repeat(64),
        },
        initrds: vec![],
        cmdline_template: "console=ttyS0 hostname={hostname}".into(),
        firmware_expected: Default::default(),
    }
}

/// Runs every check against `store`. The store may already hold data from earlier runs
/// of other checks, but not from an earlier run of this suite.
pub async fn run_all(store: Arc<dyn Store>) {
    nodes_round_trip_and_filter(&*store).await;
    node_updates_are_optimistic(&*store).await;
    heartbeats_do_not_bump_generation(&*store).await;
    retiring_releases_addresses(&*store).await;
    flavors_cannot_be_deleted_while_used(&*store).await;
    addresses_are_unique_sequential_and_reused(&*store).await;
    concurrent_allocations_never_collide(store.clone()).await;
    events_page_newest_first(&*store).await;
    tokens_are_found_by_hash_only(&*store).await;
    remediations_are_one_active_per_node_and_optimistic(&*store).await;
    power_readings_are_kept_per_node_without_touching_it(&*store).await;
}

async fn nodes_round_trip_and_filter(store: &dyn Store) {
    let rack = "conf-rack-a";
    for index in 0..5 {
        let mut n = node(101, index, rack);
        if index % 2 == 0 {
            n.state = LifecycleState::Ready;
        }
        let created = store.node_create(&n, &[]).await.expect("create node");
        assert_eq!(created, n);
    }
    let got = store
        .node_get(&NodeUuid::from_index(101, 3))
        .await
        .unwrap()
        .expect("node 3 exists");
    assert_eq!(got, node(101, 3, rack), "node must round-trip unchanged");
    assert!(store
        .node_get(&NodeUuid::from_index(101, 99))
        .await
        .unwrap()
        .is_none());

    let duplicate = store.node_create(&node(101, 1, rack), &[]).await;
    assert!(
        matches!(duplicate, Err(StoreError::AlreadyExists { .. })),
        "duplicate uuid: {duplicate:?}"
    );
    let mut same_hostname = node(101, 50, rack);
    same_hostname.hostname = "cn-101-1".into();
    let duplicate = store.node_create(&same_hostname, &[]).await;
    assert!(
        matches!(duplicate, Err(StoreError::AlreadyExists { .. })),
        "duplicate hostname: {duplicate:?}"
    );

    let filter = NodeFilter {
        rack: Some(rack.into()),
        ..Default::default()
    };
    let all = store.node_list(&filter).await.unwrap();
    assert_eq!(all.len(), 5);
    assert!(
        all.windows(2).all(|w| w[0].uuid < w[1].uuid),
        "listing is in uuid order"
    );
    let ready = store
        .node_list(&NodeFilter {
            state: Some(LifecycleState::Ready),
            ..filter.clone()
        })
        .await
        .unwrap();
    assert_eq!(ready.len(), 3);
    let page = store
        .node_list(&NodeFilter {
            after: Some(all[1].uuid.clone()),
            limit: 2,
            ..filter.clone()
        })
        .await
        .unwrap();
    assert_eq!(
        page.iter().map(|n| n.uuid.clone()).collect::<Vec<_>>(),
        vec![all[2].uuid.clone(), all[3].uuid.clone()]
    );
    let storage = store
        .node_list(&NodeFilter {
            role: Some(NodeRole::Storage),
            ..filter
        })
        .await
        .unwrap();
    assert!(storage.is_empty());
    let health: Vec<_> = store
        .node_health_list()
        .await
        .unwrap()
        .into_iter()
        .filter(|h| h.rack.as_deref() == Some(rack))
        .collect();
    assert_eq!(
        health.len(),
        3,
        "only nodes expected to heartbeat: {health:?}"
    );
    assert!(health
        .iter()
        .all(|h| h.state == LifecycleState::Ready && h.last_heard_at_ms == 1_000));
    let counts = store.node_count_by_state().await.unwrap();
    assert!(counts.get(&LifecycleState::Ready).copied().unwrap_or(0) >= 3);
}

async fn node_updates_are_optimistic(store: &dyn Store) {
    let n = node(102, 1, "conf-rack-b");
    store.node_create(&n, &[]).await.unwrap();
    let mut changed = n.clone();
    changed.state = LifecycleState::Registered;
    let event = NewEvent::for_node(&n.uuid, 2_000, "test", Action::Update, "conformance")
        .with_states(LifecycleState::Discovered, LifecycleState::Registered);
    let updated = store
        .node_update(&changed, &[event])
        .await
        .expect("update at current generation");
    assert_eq!(updated.generation, n.generation + 1);
    assert_eq!(
        store.node_get(&n.uuid).await.unwrap().unwrap().generation,
        n.generation + 1
    );

    // A writer holding the old generation loses.
    let stale = store.node_update(&changed, &[]).await;
    assert!(
        matches!(stale, Err(StoreError::GenerationMismatch { expected, found, .. }) if expected == n.generation && found == n.generation + 1),
        "stale update must be refused: {stale:?}"
    );
    let stored = store.node_get(&n.uuid).await.unwrap().unwrap();
    assert_eq!(
        stored.state,
        LifecycleState::Registered,
        "refused update changed nothing"
    );

    let events = store
        .event_list(&EventFilter {
            node_uuid: Some(n.uuid.clone()),
            ..Default::default()
        })
        .await
        .unwrap();
    assert_eq!(events.len(), 1, "exactly the committed update's event");
    assert_eq!(events[0].to_state.as_deref(), Some("registered"));

    let missing = store.node_update(&node(102, 99, "x"), &[]).await;
    assert!(
        matches!(missing, Err(StoreError::NotFound { .. })),
        "{missing:?}"
    );

    let mut renamed = updated.clone();
    renamed.hostname = "cn-101-0".into();
    let clash = store.node_update(&renamed, &[]).await;
    assert!(
        matches!(clash, Err(StoreError::AlreadyExists { .. })),
        "hostname clash: {clash:?}"
    );
}

async fn heartbeats_do_not_bump_generation(store: &dyn Store) {
    let n = node(103, 1, "conf-rack-c");
    store.node_create(&n, &[]).await.unwrap();
    store.node_record_heartbeat(&n.uuid, 5_000).await.unwrap();
    store.node_record_heartbeat(&n.uuid, 4_000).await.unwrap();
    let stored = store.node_get(&n.uuid).await.unwrap().unwrap();
    assert_eq!(
        stored.last_heartbeat_at_ms,
        Some(5_000),
        "heartbeat time never goes backwards"
    );
    assert_eq!(
        stored.generation, n.generation,
        "heartbeats leave the generation alone"
    );
    // An update from a copy read before the heartbeat keeps the newer heartbeat.
    let updated = store.node_update(&n, &[]).await.unwrap();
    assert_eq!(updated.last_heartbeat_at_ms, Some(5_000));
    assert_eq!(
        store
            .node_get(&n.uuid)
            .await
            .unwrap()
            .unwrap()
            .last_heartbeat_at_ms,
        Some(5_000)
    );
    // A heartbeat time carried by an update (e.g. `installed`) is kept when newer.
    let mut installed = updated.clone();
    installed.last_heartbeat_at_ms = Some(9_000);
    let written = store.node_update(&installed, &[]).await.unwrap();
    assert_eq!(written.last_heartbeat_at_ms, Some(9_000));
    assert_eq!(
        store
            .node_get(&n.uuid)
            .await
            .unwrap()
            .unwrap()
            .last_heartbeat_at_ms,
        Some(9_000)
    );
    let unknown = store
        .node_record_heartbeat(&NodeUuid::from_index(103, 99), 1)
        .await;
    assert!(matches!(unknown, Err(StoreError::NotFound { .. })));
}

async fn retiring_releases_addresses(store: &dyn Store) {
    store
        .pool_create(&pool(
            "conf-retire",
            PoolPurpose::Node,
            "10.104.0.0/24",
            "10.104.0.10",
            "10.104.0.20",
        ))
        .await
        .unwrap();
    let n = node(104, 1, "conf-rack-d");
    store.node_create(&n, &[]).await.unwrap();
    let allocation = store
        .ip_allocate("conf-retire", &n.uuid, PoolPurpose::Node, 1)
        .await
        .unwrap();
    assert_eq!(allocation.address, "10.104.0.10");
    let mut retired = n.clone();
    retired.state = LifecycleState::Retired;
    store.node_update(&retired, &[]).await.unwrap();
    assert!(
        store.ip_list(None, Some(&n.uuid)).await.unwrap().is_empty(),
        "retired node keeps no address"
    );
    let deleted = store.pool_delete("conf-retire").await;
    assert!(deleted.is_ok(), "pool is free again: {deleted:?}");
}

async fn flavors_cannot_be_deleted_while_used(store: &dyn Store) {
    store.flavor_put(&flavor("conf-hv"), 1).await.unwrap();
    let mut replaced = flavor("conf-hv");
    replaced.cmdline_template = "quiet".into();
    store.flavor_put(&replaced, 2).await.unwrap();
    assert_eq!(store.flavor_get("conf-hv").await.unwrap(), Some(replaced));
    assert!(store
        .flavor_list()
        .await
        .unwrap()
        .iter()
        .any(|f| f.name == "conf-hv"));

    let mut n = node(105, 1, "conf-rack-e");
    n.flavor = Some("conf-hv".into());
    store.node_create(&n, &[]).await.unwrap();
    let in_use = store.flavor_delete("conf-hv").await;
    assert!(
        matches!(in_use, Err(StoreError::InUse { .. })),
        "{in_use:?}"
    );
    assert!(
        store.flavor_get("conf-hv").await.unwrap().is_some(),
        "refused delete changed nothing"
    );
    let mut unassigned = n.clone();
    unassigned.flavor = None;
    store.node_update(&unassigned, &[]).await.unwrap();
    store.flavor_delete("conf-hv").await.unwrap();
    assert!(store.flavor_get("conf-hv").await.unwrap().is_none());
    let missing = store.flavor_delete("conf-hv").await;
    assert!(matches!(missing, Err(StoreError::NotFound { .. })));
}

async fn addresses_are_unique_sequential_and_reused(store: &dyn Store) {
    let mut p = pool(
        "conf-seq",
        PoolPurpose::Node,
        "10.106.0.0/24",
        "10.106.0.1",
        "10.106.0.4",
    );
    p.gateway = Some("10.106.0.2".into());
    store.pool_create(&p).await.unwrap();
    let duplicate = store.pool_create(&p).await;
    assert!(matches!(duplicate, Err(StoreError::AlreadyExists { .. })));
    // An overlapping pool must never hand out an address the first one holds.
    store
        .pool_create(&pool(
            "conf-seq-overlap",
            PoolPurpose::Bmc,
            "10.106.0.0/24",
            "10.106.0.1",
            "10.106.0.8",
        ))
        .await
        .unwrap();
    assert_eq!(store.pool_get("conf-seq").await.unwrap(), Some(p.clone()));

    let uuids: Vec<NodeUuid> = (0..4).map(|i| NodeUuid::from_index(106, i)).collect();
    let a0 = store
        .ip_allocate("conf-seq", &uuids[0], PoolPurpose::Node, 1)
        .await
        .unwrap();
    let a1 = store
        .ip_allocate("conf-seq", &uuids[1], PoolPurpose::Node, 1)
        .await
        .unwrap();
    assert_eq!(
        (a0.address.as_str(), a1.address.as_str()),
        ("10.106.0.1", "10.106.0.3"),
        "gateway skipped"
    );
    let again = store
        .ip_allocate("conf-seq", &uuids[0], PoolPurpose::Node, 2)
        .await
        .unwrap();
    assert_eq!(again, a0, "allocation is idempotent per node and purpose");
    let a2 = store
        .ip_allocate("conf-seq", &uuids[2], PoolPurpose::Node, 1)
        .await
        .unwrap();
    assert_eq!(a2.address, "10.106.0.4");
    let exhausted = store
        .ip_allocate("conf-seq", &uuids[3], PoolPurpose::Node, 1)
        .await;
    assert!(
        matches!(exhausted, Err(StoreError::PoolExhausted { .. })),
        "{exhausted:?}"
    );

    let overlap = store
        .ip_allocate("conf-seq-overlap", &uuids[0], PoolPurpose::Bmc, 1)
        .await
        .unwrap();
    assert!(
        !["10.106.0.1", "10.106.0.3", "10.106.0.4"].contains(&overlap.address.as_str()),
        "overlapping pool reused {}",
        overlap.address
    );

    // Release through retirement, then the freed address is reused.
    let mut n = node(106, 1, "conf-rack-f");
    n.uuid = uuids[1].clone();
    store.node_create(&n, &[]).await.unwrap();
    n.state = LifecycleState::Retired;
    store.node_update(&n, &[]).await.unwrap();
    let reused = store
        .ip_allocate("conf-seq", &uuids[3], PoolPurpose::Node, 3)
        .await
        .unwrap();
    assert_eq!(
        reused.address, "10.106.0.3",
        "released address is handed out again"
    );

    let listed = store.ip_list(Some("conf-seq"), None).await.unwrap();
    let addresses: Vec<&str> = listed.iter().map(|a| a.address.as_str()).collect();
    assert_eq!(addresses, vec!["10.106.0.1", "10.106.0.3", "10.106.0.4"]);
    let in_use = store.pool_delete("conf-seq").await;
    assert!(
        matches!(in_use, Err(StoreError::InUse { .. })),
        "{in_use:?}"
    );
    let released = store.ip_release_node(&uuids[3]).await.unwrap();
    assert_eq!(released, 1, "explicit release frees the node's address");
    assert_eq!(
        store.ip_release_node(&uuids[3]).await.unwrap(),
        0,
        "releasing twice is harmless"
    );
    store
        .ip_allocate("conf-seq", &uuids[3], PoolPurpose::Node, 4)
        .await
        .unwrap();
    let missing = store
        .ip_allocate(
            "conf-none",
            &NodeUuid::from_index(106, 50),
            PoolPurpose::Node,
            1,
        )
        .await;
    assert!(
        matches!(missing, Err(StoreError::NotFound { .. })),
        "{missing:?}"
    );
}

async fn concurrent_allocations_never_collide(store: Arc<dyn Store>) {
    store
        .pool_create(&pool(
            "conf-race",
            PoolPurpose::Node,
            "10.107.0.0/24",
            "10.107.0.1",
            "10.107.0.250",
        ))
        .await
        .unwrap();
    let mut tasks = Vec::new();
    for index in 0..24u64 {
        let store = store.clone();
        tasks.push(tokio::spawn(async move {
            let uuid = NodeUuid::from_index(107, index);
            store
                .ip_allocate("conf-race", &uuid, PoolPurpose::Node, 1)
                .await
        }));
    }
    let mut addresses = BTreeSet::new();
    for task in tasks {
        let allocation = task
            .await
            .expect("task")
            .expect("allocation under contention");
        assert!(
            addresses.insert(allocation.address.clone()),
            "{} handed out twice",
            allocation.address
        );
    }
    assert_eq!(addresses.len(), 24);
}

async fn events_page_newest_first(store: &dyn Store) {
    let uuid = NodeUuid::from_index(108, 1);
    let events: Vec<NewEvent> = (0..5)
        .map(|i| NewEvent::for_node(&uuid, 10 + i, "test", Action::Update, format!("event {i}")))
        .collect();
    store.event_append(&events).await.unwrap();
    store
        .event_append(&[NewEvent::for_node(
            &NodeUuid::from_index(108, 2),
            99,
            "test",
            Action::Update,
            "other",
        )])
        .await
        .unwrap();
    let filter = EventFilter {
        node_uuid: Some(uuid.clone()),
        limit: 3,
        ..Default::default()
    };
    let first = store.event_list(&filter).await.unwrap();
    let reasons: Vec<&str> = first.iter().map(|e| e.reason.as_str()).collect();
    assert_eq!(reasons, vec!["event 4", "event 3", "event 2"]);
    let second = store
        .event_list(&EventFilter {
            before_id: Some(first[2].id),
            ..filter
        })
        .await
        .unwrap();
    let reasons: Vec<&str> = second.iter().map(|e| e.reason.as_str()).collect();
    assert_eq!(reasons, vec!["event 1", "event 0"]);
    assert_eq!(second[0].actor, "test");
    assert_eq!(second[0].node_uuid.as_ref(), Some(&uuid));
}

async fn tokens_are_found_by_hash_only(store: &dyn Store) {
    let created = store
        .token_create("conf-ops", TokenRole::Operator, &"b".repeat(64), 7)
        .await
        .unwrap();
    assert_eq!(
        (created.name.as_str(), created.role),
        ("conf-ops", TokenRole::Operator)
    );
    let duplicate = store
        .token_create("conf-ops", TokenRole::Admin, &"c".repeat(64), 7)
        .await;
    assert!(matches!(duplicate, Err(StoreError::AlreadyExists { .. })));
    assert_eq!(
        store.token_find(&"b".repeat(64)).await.unwrap(),
        Some(created.clone())
    );
    assert!(store.token_find(&"d".repeat(64)).await.unwrap().is_none());
    assert!(store.token_list().await.unwrap().contains(&created));
    store.token_delete("conf-ops").await.unwrap();
    assert!(store.token_find(&"b".repeat(64)).await.unwrap().is_none());
    assert!(matches!(
        store.token_delete("conf-ops").await,
        Err(StoreError::NotFound { .. })
    ));
}

async fn remediations_are_one_active_per_node_and_optimistic(store: &dyn Store) {
    let mut n = node(109, 1, "conf-rack-g");
    n.state = LifecycleState::Suspect;
    let n = store.node_create(&n, &[]).await.unwrap();
    let fresh = Remediation::new(
        n.uuid.clone(),
        RemediationKind::Automatic,
        "system",
        "silent",
        10,
    );
    let event = NewEvent::for_node(&n.uuid, 10, "system", Action::RemediationStarted, "silent");
    let created = store
        .remediation_create(&fresh, &[event])
        .await
        .expect("create remediation");
    assert!(created.id > 0, "the store assigns an id");
    assert_eq!(
        store.remediation_get(created.id).await.unwrap(),
        Some(created.clone())
    );
    let second = store.remediation_create(&fresh, &[]).await;
    assert!(
        matches!(second, Err(StoreError::AlreadyExists { .. })),
        "one active per node: {second:?}"
    );

    // Advance the saga and the node together.
    let mut advanced = created.clone();
    advanced.step_index = 1;
    let mut fencing = n.clone();
    fencing.state = LifecycleState::Fencing;
    let (stored, node_written) = store
        .remediation_update(&advanced, Some(&fencing), &[])
        .await
        .expect("update at current generations");
    assert_eq!(stored.generation, created.generation + 1);
    assert_eq!(node_written.unwrap().state, LifecycleState::Fencing);
    assert_eq!(
        store.node_get(&n.uuid).await.unwrap().unwrap().state,
        LifecycleState::Fencing
    );

    // A stale writer loses and changes nothing, node included.
    let stale = store.remediation_update(&advanced, None, &[]).await;
    assert!(
        matches!(stale, Err(StoreError::Conflict { .. })),
        "{stale:?}"
    );
    let mut stale_node = stored.clone();
    stale_node.step_index = 2;
    let node_conflict = store
        .remediation_update(&stale_node, Some(&fencing), &[])
        .await;
    assert!(
        matches!(node_conflict, Err(StoreError::GenerationMismatch { .. })),
        "{node_conflict:?}"
    );
    assert_eq!(
        store
            .remediation_get(created.id)
            .await
            .unwrap()
            .unwrap()
            .step_index,
        1,
        "nothing written"
    );

    let mut finished = stored.clone();
    finished.status = Status::Done;
    store
        .remediation_update(&finished, None, &[])
        .await
        .unwrap();
    let active = store
        .remediation_list(true, Some(&n.uuid), 10)
        .await
        .unwrap();
    assert!(active.is_empty());
    let all = store
        .remediation_list(false, Some(&n.uuid), 10)
        .await
        .unwrap();
    assert_eq!(all.len(), 1);
    // A finished one does not block the next.
    let next = store
        .remediation_create(&fresh, &[])
        .await
        .expect("new remediation after the first ended");
    assert!(next.id > created.id);
    let listed = store.remediation_list(false, None, 10).await.unwrap();
    assert_eq!(listed.first().map(|r| r.id), Some(next.id), "newest first");
}

async fn power_readings_are_kept_per_node_without_touching_it(store: &dyn Store) {
    let rack = "conf-rack-power";
    let mut n = node(131, 1, rack);
    n.state = LifecycleState::Ready;
    store.node_create(&n, &[]).await.unwrap();
    let mut quiet = node(131, 2, rack);
    quiet.state = LifecycleState::Ready;
    store.node_create(&quiet, &[]).await.unwrap();
    assert_eq!(store.node_power_get(&n.uuid).await.unwrap(), None);

    let on = PowerReading::known(PowerReadingState::On, 5_000);
    assert!(store.node_power_record(&n.uuid, &on, &[]).await.unwrap());
    let off = PowerReading::known(PowerReadingState::Off, 6_000);
    let event = NewEvent::for_node(
        &n.uuid,
        6_000,
        "system",
        Action::PowerStateChanged,
        "on -> off",
    );
    assert!(store
        .node_power_record(&n.uuid, &off, std::slice::from_ref(&event))
        .await
        .unwrap());
    assert_eq!(
        store.node_power_get(&n.uuid).await.unwrap(),
        Some(off.clone())
    );

    // An answer that comes back late never replaces a newer reading, nor writes its events.
    let late = PowerReading::unknown("bmc power_state timed out", 5_500);
    let late_event =
        NewEvent::for_node(&n.uuid, 5_500, "system", Action::PowerStateChanged, "late");
    assert!(!store
        .node_power_record(&n.uuid, &late, &[late_event])
        .await
        .unwrap());
    let failed = PowerReading::unknown("bmc power_state timed out", 7_000);
    assert!(store
        .node_power_record(&n.uuid, &failed, &[])
        .await
        .unwrap());
    assert_eq!(
        store.node_power_get(&n.uuid).await.unwrap(),
        Some(failed.clone())
    );

    // The node record is untouched: no generation bump, so no conflict with an operator.
    assert_eq!(store.node_get(&n.uuid).await.unwrap().unwrap(), n);
    // The health list carries the reading, and no reading for a node never polled.
    let health: Vec<_> = store
        .node_health_list()
        .await
        .unwrap()
        .into_iter()
        .filter(|h| h.rack.as_deref() == Some(rack))
        .collect();
    assert_eq!(health.len(), 2);
    assert_eq!(health[0].uuid, n.uuid);
    assert_eq!(health[0].power, Some(failed));
    assert_eq!(health[1].power, None);
    // Events went with the write that carried them, and only with it.
    let events = store
        .event_list(&EventFilter {
            node_uuid: Some(n.uuid.clone()),
            limit: 10,
            ..Default::default()
        })
        .await
        .unwrap();
    assert_eq!(
        events.iter().map(|e| e.reason.as_str()).collect::<Vec<_>>(),
        vec!["on -> off"]
    );

    let missing = store
        .node_power_record(&NodeUuid::from_index(131, 99), &on, &[])
        .await;
    assert!(
        matches!(missing, Err(StoreError::NotFound { .. })),
        "reading for an unknown node: {missing:?}"
    );
}
