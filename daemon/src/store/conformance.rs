//! The store conformance suite: one set of checks every [`Store`] must pass, run against
//! memory, cached, SQLite and PostgreSQL stores. Each check panics with a message saying
//! which guarantee broke. Checks use disjoint uuids, racks and names so they can share one
//! (possibly non-empty) database.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::Arc;

use bearman_proto::uuid::NodeUuid;
use bearman_proto::{Artifact, NicFacts};

use super::{AddressWant, OrphanReason, RegistrationWrite, Store, StoreError};
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

/// The wall clock in milliseconds, from the caller: the SQL stores' leases expire on the
/// database's clock, which follows it (this suite is built into the daemon, which reads
/// no wall clock of its own).
pub type WallClock = fn() -> i64;

/// Runs every check against `store`. The store may already hold data from earlier runs
/// of other checks, but not from an earlier run of this suite.
pub async fn run_all(store: Arc<dyn Store>, wall_ms: WallClock) {
    nodes_round_trip_and_filter(&*store).await;
    node_updates_are_optimistic(&*store).await;
    heartbeats_do_not_bump_generation(&*store).await;
    retiring_releases_addresses(&*store).await;
    flavors_cannot_be_deleted_while_used(&*store).await;
    addresses_are_unique_sequential_and_reused(&*store).await;
    concurrent_allocations_never_collide(store.clone()).await;
    events_page_newest_first(&*store).await;
    tokens_are_found_by_hash_only(&*store).await;
    token_expiry_and_last_use_are_kept(&*store).await;
    remediations_are_one_active_per_node_and_optimistic(&*store).await;
    power_readings_are_kept_per_node_without_touching_it(&*store).await;
    the_health_list_pairs_each_node_with_its_own_reading(&*store).await;
    the_booting_list_is_every_booting_node_in_state_then_uuid_order(&*store).await;
    registration_writes_addresses_and_node_together(&*store).await;
    failed_registrations_write_nothing(&*store).await;
    concurrent_registrations_of_one_uuid_have_one_winner(store.clone()).await;
    orphaned_allocations_are_reported(&*store).await;
    admin_writes_carry_their_events(&*store).await;
    concurrent_flavor_creates_have_one_winner(store.clone()).await;
    leases_pass_on_only_when_lapsed_and_fence_stale_writers(&*store, wall_ms).await;
    firmware_bundles_and_the_rollout_are_kept_with_generation_checks(&*store).await;
    the_drill_board_is_generation_checked_and_files_finished_drills(&*store).await;
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

    // The metrics' tally: three Ready and two Discovered nodes in this rack, one row each.
    let mut tally: Vec<_> = store
        .node_tally()
        .await
        .unwrap()
        .into_iter()
        .filter(|t| t.rack.as_deref() == Some(rack))
        .map(|t| (t.state, t.role, t.count))
        .collect();
    tally.sort_by_key(|(state, _, _)| state.as_str());
    let role = node(101, 0, rack).role;
    assert_eq!(
        tally,
        vec![
            (LifecycleState::Discovered, role, 2),
            (LifecycleState::Ready, role, 3)
        ],
        "node_tally for {rack}"
    );
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

    // The heartbeat source is part of the record a full write stores, and the hot path's
    // timestamp write leaves it as it was.
    let mut moved = store.node_get(&n.uuid).await.unwrap().unwrap();
    let source = crate::core::model::HeartbeatSource {
        address: "10.77.0.10".parse().unwrap(),
        since_ms: 9_500,
    };
    moved.heartbeat_source = Some(source);
    store.node_update(&moved, &[]).await.unwrap();
    store.node_record_heartbeat(&n.uuid, 10_000).await.unwrap();
    let stored = store.node_get(&n.uuid).await.unwrap().unwrap();
    assert_eq!(stored.heartbeat_source, Some(source));
    assert_eq!(stored.last_heartbeat_at_ms, Some(10_000));
}

async fn retiring_releases_addresses(store: &dyn Store) {
    store
        .pool_create(
            &pool(
                "conf-retire",
                PoolPurpose::Node,
                "10.104.0.0/24",
                "10.104.0.10",
                "10.104.0.20",
            ),
            &[],
        )
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
    let deleted = store.pool_delete("conf-retire", &[]).await;
    assert!(deleted.is_ok(), "pool is free again: {deleted:?}");
}

async fn flavors_cannot_be_deleted_while_used(store: &dyn Store) {
    store.flavor_put(&flavor("conf-hv"), 1, &[]).await.unwrap();
    let mut replaced = flavor("conf-hv");
    replaced.cmdline_template = "quiet".into();
    store.flavor_put(&replaced, 2, &[]).await.unwrap();
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
    let in_use = store.flavor_delete("conf-hv", &[]).await;
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
    store.flavor_delete("conf-hv", &[]).await.unwrap();
    assert!(store.flavor_get("conf-hv").await.unwrap().is_none());
    let missing = store.flavor_delete("conf-hv", &[]).await;
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
    store.pool_create(&p, &[]).await.unwrap();
    let duplicate = store.pool_create(&p, &[]).await;
    assert!(matches!(duplicate, Err(StoreError::AlreadyExists { .. })));
    // An overlapping pool must never hand out an address the first one holds.
    store
        .pool_create(
            &pool(
                "conf-seq-overlap",
                PoolPurpose::Bmc,
                "10.106.0.0/24",
                "10.106.0.1",
                "10.106.0.8",
            ),
            &[],
        )
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
    let in_use = store.pool_delete("conf-seq", &[]).await;
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
        .pool_create(
            &pool(
                "conf-race",
                PoolPurpose::Node,
                "10.107.0.0/24",
                "10.107.0.1",
                "10.107.0.250",
            ),
            &[],
        )
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
            ..filter.clone()
        })
        .await
        .unwrap();
    let reasons: Vec<&str> = second.iter().map(|e| e.reason.as_str()).collect();
    assert_eq!(reasons, vec!["event 1", "event 0"]);
    // Following the trail forward: the oldest above `after_id`, newest first.
    let newer = |after_id, limit| EventFilter {
        after_id: Some(after_id),
        limit,
        ..filter.clone()
    };
    let next = store.event_list(&newer(second[1].id, 2)).await.unwrap();
    let reasons: Vec<&str> = next.iter().map(|e| e.reason.as_str()).collect();
    assert_eq!(reasons, vec!["event 2", "event 1"]);
    let rest = store.event_list(&newer(next[0].id, 10)).await.unwrap();
    let reasons: Vec<&str> = rest.iter().map(|e| e.reason.as_str()).collect();
    assert_eq!(
        reasons,
        vec!["event 4", "event 3"],
        "nothing skipped, nothing twice"
    );
    assert!(store
        .event_list(&newer(rest[0].id, 10))
        .await
        .unwrap()
        .is_empty());
    assert_eq!(second[0].actor, "test");
    assert_eq!(second[0].node_uuid.as_ref(), Some(&uuid));
}

async fn token_expiry_and_last_use_are_kept(store: &dyn Store) {
    let created = store
        .token_create(
            "conf-expiring",
            TokenRole::Viewer,
            &"9".repeat(64),
            1_000,
            Some(5_000),
            &[],
        )
        .await
        .unwrap();
    assert_eq!(created.expires_at_ms, Some(5_000));
    assert_eq!(created.last_used_at_ms, None, "never used yet");
    let found = store.token_find(&"9".repeat(64)).await.unwrap().unwrap();
    assert_eq!(found.expires_at_ms, Some(5_000));
    let interval = crate::core::model::TOKEN_USE_RECORD_INTERVAL_MS;
    assert!(store
        .token_record_use(created.id, 10_000, interval)
        .await
        .unwrap());
    assert!(
        !store
            .token_record_use(created.id, 10_000 + interval - 1, interval)
            .await
            .unwrap(),
        "a second use within the interval writes nothing"
    );
    let found = store.token_find(&"9".repeat(64)).await.unwrap().unwrap();
    assert_eq!(found.last_used_at_ms, Some(10_000));
    assert!(store
        .token_record_use(created.id, 10_000 + interval, interval)
        .await
        .unwrap());
    let listed = store.token_list().await.unwrap();
    let listed = listed.iter().find(|t| t.name == "conf-expiring").unwrap();
    assert_eq!(listed.last_used_at_ms, Some(10_000 + interval));
    assert_eq!(listed.expires_at_ms, Some(5_000));
    store.token_delete("conf-expiring", &[]).await.unwrap();
    assert!(
        !store
            .token_record_use(created.id, 1_000_000, interval)
            .await
            .unwrap(),
        "a deleted token's use is not an error"
    );
    store.ping().await.unwrap();
}

async fn tokens_are_found_by_hash_only(store: &dyn Store) {
    let created = store
        .token_create(
            "conf-ops",
            TokenRole::Operator,
            &"b".repeat(64),
            7,
            None,
            &[],
        )
        .await
        .unwrap();
    assert_eq!(
        (created.name.as_str(), created.role),
        ("conf-ops", TokenRole::Operator)
    );
    let duplicate = store
        .token_create("conf-ops", TokenRole::Admin, &"c".repeat(64), 7, None, &[])
        .await;
    assert!(matches!(duplicate, Err(StoreError::AlreadyExists { .. })));
    assert_eq!(
        store.token_find(&"b".repeat(64)).await.unwrap(),
        Some(created.clone())
    );
    assert!(store.token_find(&"d".repeat(64)).await.unwrap().is_none());
    assert!(store.token_list().await.unwrap().contains(&created));
    store.token_delete("conf-ops", &[]).await.unwrap();
    assert!(store.token_find(&"b".repeat(64)).await.unwrap().is_none());
    assert!(matches!(
        store.token_delete("conf-ops", &[]).await,
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
        .remediation_create(&fresh, &[event], None)
        .await
        .expect("create remediation");
    assert!(created.id > 0, "the store assigns an id");
    assert_eq!(
        store.remediation_get(created.id).await.unwrap(),
        Some(created.clone())
    );
    let second = store.remediation_create(&fresh, &[], None).await;
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
        .remediation_update(&advanced, Some(&fencing), &[], None)
        .await
        .expect("update at current generations");
    assert_eq!(stored.generation, created.generation + 1);
    assert_eq!(node_written.unwrap().state, LifecycleState::Fencing);
    assert_eq!(
        store.node_get(&n.uuid).await.unwrap().unwrap().state,
        LifecycleState::Fencing
    );

    // A stale writer loses and changes nothing, node included.
    let stale = store.remediation_update(&advanced, None, &[], None).await;
    assert!(
        matches!(stale, Err(StoreError::Conflict { .. })),
        "{stale:?}"
    );
    let mut stale_node = stored.clone();
    stale_node.step_index = 2;
    let node_conflict = store
        .remediation_update(&stale_node, Some(&fencing), &[], None)
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
        .remediation_update(&finished, None, &[], None)
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
        .remediation_create(&fresh, &[], None)
        .await
        .expect("new remediation after the first ended");
    assert!(next.id > created.id);
    let listed = store.remediation_list(false, None, 10).await.unwrap();
    assert_eq!(listed.first().map(|r| r.id), Some(next.id), "newest first");
}

async fn the_health_list_pairs_each_node_with_its_own_reading(store: &dyn Store) {
    // Readings for nodes in and out of the list, in and out of uuid order: each listed
    // node gets exactly its own reading (the memory store walks both in uuid order).
    let rack = "conf-rack-health-power";
    let mut expected = BTreeMap::new();
    for index in 0..12u64 {
        let mut n = node(137, index, rack);
        // Every third node is not monitored (still booting) and so not listed.
        if index % 3 != 2 {
            n.state = LifecycleState::Ready;
        }
        store.node_create(&n, &[]).await.unwrap();
        // Readings on some monitored and some unmonitored nodes, none on the rest.
        let reading = (index % 4 != 1)
            .then(|| PowerReading::known(PowerReadingState::On, 10_000 + index as i64));
        if let Some(reading) = &reading {
            assert!(store
                .node_power_record(&n.uuid, reading, &[])
                .await
                .unwrap());
        }
        if n.state == LifecycleState::Ready {
            expected.insert(n.uuid.clone(), reading);
        }
    }
    let listed: BTreeMap<_, _> = store
        .node_health_list()
        .await
        .unwrap()
        .into_iter()
        .filter(|h| h.rack.as_deref() == Some(rack))
        .map(|h| (h.uuid, h.power))
        .collect();
    assert_eq!(listed, expected);
}

async fn the_booting_list_is_every_booting_node_in_state_then_uuid_order(store: &dyn Store) {
    use crate::core::controller::BootingNode;
    use crate::core::model::{BootPhase, BootProgress};
    let rack = "conf-rack-booting";
    let states = [
        LifecycleState::Provisioning,
        LifecycleState::Registered,
        LifecycleState::Ready,
        LifecycleState::Maintenance,
    ];
    let mut created = Vec::new();
    for index in 0..12u64 {
        let mut n = node(139, index, rack);
        n.state = states[index as usize % states.len()];
        n.boot = (index % 3 != 0).then_some(BootProgress {
            phase: BootPhase::Registered,
            at_ms: 2_000 + index as i64,
            until_ms: (index % 5 == 0).then_some(9_000),
        });
        // Some with a BMC address, one with only blanks (not configured), some without.
        n.bmc.address = match index % 4 {
            0 => Some(format!("10.9.0.{index}")),
            1 => Some("  ".into()),
            _ => None,
        };
        created.push(store.node_create(&n, &[]).await.unwrap());
    }
    let mut expected: Vec<BootingNode> = Vec::new();
    for state in [LifecycleState::Registered, LifecycleState::Provisioning] {
        let mut of_state: Vec<BootingNode> = created
            .iter()
            .filter(|n| n.state == state)
            .map(BootingNode::of)
            .collect();
        of_state.sort_by(|a, b| a.uuid.cmp(&b.uuid));
        expected.extend(of_state);
    }
    assert!(expected.iter().any(|b| b.bmc_configured));
    assert!(expected.iter().any(|b| !b.bmc_configured));
    let listed: Vec<BootingNode> = store
        .node_booting_list()
        .await
        .unwrap()
        .into_iter()
        .filter(|b| b.rack.as_deref() == Some(rack))
        .collect();
    assert_eq!(listed, expected);

    // An update moves what the list shows: a new milestone, a BMC address taken away,
    // and a node that finished booting leaves it.
    let mut moved = created
        .iter()
        .find(|n| n.state == LifecycleState::Registered && n.bmc.address.is_some())
        .unwrap()
        .clone();
    moved.boot = Some(BootProgress {
        phase: BootPhase::OsFetched,
        at_ms: 7_000,
        until_ms: None,
    });
    moved.bmc.address = None;
    let moved = store.node_update(&moved, &[]).await.unwrap();
    let mut done = created
        .iter()
        .find(|n| n.state == LifecycleState::Provisioning)
        .unwrap()
        .clone();
    done.state = LifecycleState::Ready;
    done.boot = None;
    let done = store.node_update(&done, &[]).await.unwrap();
    let expected: Vec<BootingNode> = expected
        .into_iter()
        .filter(|b| b.uuid != done.uuid)
        .map(|b| {
            if b.uuid == moved.uuid {
                BootingNode::of(&moved)
            } else {
                b
            }
        })
        .collect();
    assert!(expected
        .iter()
        .any(|b| b.uuid == moved.uuid && !b.bmc_configured));
    let listed: Vec<BootingNode> = store
        .node_booting_list()
        .await
        .unwrap()
        .into_iter()
        .filter(|b| b.rack.as_deref() == Some(rack))
        .collect();
    assert_eq!(listed, expected);
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

/// A registration of `node` asking for a node address from `node_pool` and, when given,
/// a BMC address from `bmc_pool`.
fn registration(
    node: &Node,
    expected_generation: Option<i64>,
    node_pool: &str,
    bmc_pool: Option<&str>,
    reason: &str,
) -> RegistrationWrite {
    let mut addresses = vec![AddressWant {
        pools: vec![node_pool.into()],
        purpose: PoolPurpose::Node,
        optional: false,
    }];
    if let Some(bmc_pool) = bmc_pool {
        addresses.push(AddressWant {
            pools: vec![bmc_pool.into()],
            purpose: PoolPurpose::Bmc,
            optional: false,
        });
    }
    RegistrationWrite {
        node: node.clone(),
        expected_generation,
        addresses,
        events: vec![NewEvent::for_node(
            &node.uuid,
            5_000,
            "node",
            Action::Register,
            reason,
        )],
        at_ms: 5_000,
        rollout: None,
    }
}

async fn node_events(store: &dyn Store, uuid: &NodeUuid) -> Vec<String> {
    store
        .event_list(&EventFilter {
            node_uuid: Some(uuid.clone()),
            limit: 100,
            ..Default::default()
        })
        .await
        .unwrap()
        .into_iter()
        .map(|e| e.reason)
        .collect()
}

/// Addresses held by `uuid`, as (purpose, address).
async fn held(store: &dyn Store, uuid: &NodeUuid) -> Vec<(PoolPurpose, String)> {
    store
        .ip_list(None, Some(uuid))
        .await
        .unwrap()
        .into_iter()
        .map(|a| (a.purpose, a.address))
        .collect()
}

async fn registration_writes_addresses_and_node_together(store: &dyn Store) {
    let mut node_pool = pool(
        "conf-reg-node",
        PoolPurpose::Node,
        "10.140.0.0/24",
        "10.140.0.10",
        "10.140.0.20",
    );
    node_pool.gateway = Some("10.140.0.1".into());
    node_pool.dns = vec!["10.140.0.2".into()];
    node_pool.mtu = 9000;
    node_pool.vlan = Some(140);
    store.pool_create(&node_pool, &[]).await.unwrap();
    let mut bmc_pool = pool(
        "conf-reg-bmc",
        PoolPurpose::Bmc,
        "10.141.0.0/24",
        "10.141.0.10",
        "10.141.0.20",
    );
    bmc_pool.gateway = Some("10.141.0.1".into());
    store.pool_create(&bmc_pool, &[]).await.unwrap();

    let n = node(140, 1, "conf-rack-reg");
    let registered = store
        .node_register(&registration(
            &n,
            None,
            "conf-reg-node",
            Some("conf-reg-bmc"),
            "first",
        ))
        .await
        .expect("register a new node");
    assert_eq!(
        registered.node.network.bond0_addresses,
        vec!["10.140.0.10/24"]
    );
    assert_eq!(
        registered.node.network.gateway.as_deref(),
        Some("10.140.0.1")
    );
    assert_eq!(registered.node.network.dns, vec!["10.140.0.2"]);
    assert_eq!(registered.node.network.mtu, 9000);
    assert_eq!(registered.node.network.vlan, Some(140));
    assert_eq!(registered.node.bmc.address.as_deref(), Some("10.141.0.10"));
    assert_eq!(registered.node.generation, n.generation, "created as given");
    assert_eq!(
        store.node_get(&n.uuid).await.unwrap().as_ref(),
        Some(&registered.node),
        "the node is stored with its addresses"
    );
    let bmc = registered.address(PoolPurpose::Bmc).expect("bmc address");
    assert_eq!(
        bmc.pool, bmc_pool,
        "the pool comes back with the allocation"
    );
    assert_eq!(bmc.allocation.address, "10.141.0.10");
    assert_eq!(
        held(store, &n.uuid).await,
        vec![
            (PoolPurpose::Node, "10.140.0.10".to_string()),
            (PoolPurpose::Bmc, "10.141.0.10".to_string()),
        ]
    );
    assert_eq!(node_events(store, &n.uuid).await, vec!["first"]);

    // Registering again, from the stored record, keeps both addresses.
    let mut again = registered.node.clone();
    again.network = Default::default();
    again.bmc.address = None;
    let second = store
        .node_register(&registration(
            &again,
            Some(registered.node.generation),
            "conf-reg-node",
            Some("conf-reg-bmc"),
            "second",
        ))
        .await
        .expect("re-register at the current generation");
    assert_eq!(second.node.generation, registered.node.generation + 1);
    assert_eq!(second.node.network, registered.node.network);
    assert_eq!(second.node.bmc.address, registered.node.bmc.address);
    assert_eq!(second.addresses, registered.addresses, "same allocations");
    assert_eq!(held(store, &n.uuid).await.len(), 2, "nothing new allocated");
    assert_eq!(node_events(store, &n.uuid).await, vec!["second", "first"]);
    assert!(store
        .ip_orphans()
        .await
        .unwrap()
        .iter()
        .all(|o| o.allocation.node_uuid != n.uuid));
}

async fn failed_registrations_write_nothing(store: &dyn Store) {
    store
        .pool_create(
            &pool(
                "conf-fail-node",
                PoolPurpose::Node,
                "10.142.0.0/24",
                "10.142.0.10",
                "10.142.0.20",
            ),
            &[],
        )
        .await
        .unwrap();
    // One BMC address only.
    store
        .pool_create(
            &pool(
                "conf-fail-bmc",
                PoolPurpose::Bmc,
                "10.143.0.0/24",
                "10.143.0.10",
                "10.143.0.10",
            ),
            &[],
        )
        .await
        .unwrap();
    let first = node(142, 1, "conf-rack-fail");
    let winner = store
        .node_register(&registration(
            &first,
            None,
            "conf-fail-node",
            Some("conf-fail-bmc"),
            "winner",
        ))
        .await
        .expect("first registration");

    // The BMC pool is exhausted after the node address was chosen: neither stays.
    let second = node(142, 2, "conf-rack-fail");
    let exhausted = store
        .node_register(&registration(
            &second,
            None,
            "conf-fail-node",
            Some("conf-fail-bmc"),
            "exhausted",
        ))
        .await;
    assert!(
        matches!(exhausted, Err(StoreError::PoolExhausted { .. })),
        "{exhausted:?}"
    );
    assert!(
        store.node_get(&second.uuid).await.unwrap().is_none(),
        "no node"
    );
    assert!(held(store, &second.uuid).await.is_empty(), "no allocation");
    assert!(
        node_events(store, &second.uuid).await.is_empty(),
        "no event"
    );
    // The node address it would have had is still free.
    let next = store
        .node_register(&registration(
            &second,
            None,
            "conf-fail-node",
            None,
            "no bmc",
        ))
        .await
        .expect("registration without a BMC address");
    assert_eq!(next.node.network.bond0_addresses, vec!["10.142.0.11/24"]);

    // A lost create race (the uuid appeared meanwhile) takes nothing from the winner.
    let lost = store
        .node_register(&registration(
            &first,
            None,
            "conf-fail-node",
            Some("conf-fail-bmc"),
            "loser",
        ))
        .await;
    assert!(
        matches!(lost, Err(StoreError::AlreadyExists { .. })),
        "{lost:?}"
    );
    assert_eq!(
        store.node_get(&first.uuid).await.unwrap().as_ref(),
        Some(&winner.node)
    );
    assert_eq!(
        held(store, &first.uuid).await,
        vec![
            (PoolPurpose::Node, "10.142.0.10".to_string()),
            (PoolPurpose::Bmc, "10.143.0.10".to_string()),
        ],
        "the winner keeps its allocations"
    );
    assert_eq!(node_events(store, &first.uuid).await, vec!["winner"]);

    // A stale generation writes nothing: no allocation, no node change, no event.
    let mut plain = node(142, 3, "conf-rack-fail");
    plain.hostname = "cn-142-3".into();
    let plain = store.node_create(&plain, &[]).await.unwrap();
    let stale = store
        .node_register(&registration(
            &plain,
            Some(plain.generation - 1),
            "conf-fail-node",
            None,
            "stale",
        ))
        .await;
    assert!(
        matches!(stale, Err(StoreError::GenerationMismatch { .. })),
        "{stale:?}"
    );
    assert_eq!(
        store.node_get(&plain.uuid).await.unwrap(),
        Some(plain.clone())
    );
    assert!(held(store, &plain.uuid).await.is_empty());
    assert!(node_events(store, &plain.uuid).await.is_empty());

    // A hostname taken by another node: refused, nothing allocated.
    let mut clash = node(142, 4, "conf-rack-fail");
    clash.hostname = first.hostname.clone();
    let taken = store
        .node_register(&registration(&clash, None, "conf-fail-node", None, "clash"))
        .await;
    assert!(
        matches!(taken, Err(StoreError::AlreadyExists { .. })),
        "{taken:?}"
    );
    assert!(held(store, &clash.uuid).await.is_empty());

    // Bad requests are refused whole: an unknown pool, a pool of the other purpose, one
    // purpose asked twice.
    let fifth = node(142, 5, "conf-rack-fail");
    let unknown = store
        .node_register(&registration(
            &fifth,
            None,
            "conf-fail-none",
            None,
            "unknown",
        ))
        .await;
    assert!(
        matches!(unknown, Err(StoreError::NotFound { .. })),
        "{unknown:?}"
    );
    let wrong = store
        .node_register(&registration(&fifth, None, "conf-fail-bmc", None, "wrong"))
        .await;
    assert!(
        matches!(wrong, Err(StoreError::InvalidPool { .. })),
        "{wrong:?}"
    );
    let mut twice = registration(&fifth, None, "conf-fail-node", None, "twice");
    twice.addresses.push(twice.addresses[0].clone());
    let twice = store.node_register(&twice).await;
    assert!(
        matches!(twice, Err(StoreError::Conflict { .. })),
        "{twice:?}"
    );
    assert!(store.node_get(&fifth.uuid).await.unwrap().is_none());
    assert!(held(store, &fifth.uuid).await.is_empty());
    assert!(node_events(store, &fifth.uuid).await.is_empty());
}

async fn concurrent_registrations_of_one_uuid_have_one_winner(store: Arc<dyn Store>) {
    store
        .pool_create(
            &pool(
                "conf-crowd-node",
                PoolPurpose::Node,
                "10.144.0.0/24",
                "10.144.0.10",
                "10.144.0.200",
            ),
            &[],
        )
        .await
        .unwrap();
    store
        .pool_create(
            &pool(
                "conf-crowd-bmc",
                PoolPurpose::Bmc,
                "10.145.0.0/24",
                "10.145.0.10",
                "10.145.0.200",
            ),
            &[],
        )
        .await
        .unwrap();
    let shared = node(144, 0, "conf-rack-crowd");
    let mut tasks = Vec::new();
    for index in 0..32u64 {
        let store = store.clone();
        // Every other one is a different node, competing for the same pools.
        let n = if index % 2 == 0 {
            shared.clone()
        } else {
            node(144, index, "conf-rack-crowd")
        };
        tasks.push(tokio::spawn(async move {
            let write = registration(
                &n,
                None,
                "conf-crowd-node",
                Some("conf-crowd-bmc"),
                &format!("attempt {index}"),
            );
            (n.uuid.clone(), store.node_register(&write).await)
        }));
    }
    let mut shared_wins = Vec::new();
    for task in tasks {
        let (uuid, result) = task.await.expect("task");
        match result {
            Ok(registered) if uuid == shared.uuid => shared_wins.push(registered),
            Ok(_) => {}
            Err(StoreError::AlreadyExists { .. }) if uuid == shared.uuid => {}
            Err(error) => panic!("registration of {uuid} under contention: {error}"),
        }
    }
    assert_eq!(shared_wins.len(), 1, "exactly one create of one uuid wins");
    let winner = &shared_wins[0];
    let allocations = store.ip_list(None, Some(&shared.uuid)).await.unwrap();
    assert_eq!(
        allocations,
        winner
            .addresses
            .iter()
            .map(|h| h.allocation.clone())
            .collect::<Vec<_>>(),
        "the node holds exactly the winner's addresses"
    );
    assert_eq!(
        store.node_get(&shared.uuid).await.unwrap().as_ref(),
        Some(&winner.node)
    );
    let mut seen = BTreeSet::new();
    for pool_name in ["conf-crowd-node", "conf-crowd-bmc"] {
        for allocation in store.ip_list(Some(pool_name), None).await.unwrap() {
            assert!(
                seen.insert(allocation.address.clone()),
                "{allocation:?} twice"
            );
        }
    }
    assert_eq!(seen.len(), 2 * 17, "17 nodes, two addresses each");
    let orphans = store.ip_orphans().await.unwrap();
    assert!(
        orphans
            .iter()
            .all(|o| !o.allocation.pool.starts_with("conf-crowd")),
        "{orphans:?}"
    );
}

async fn orphaned_allocations_are_reported(store: &dyn Store) {
    store
        .pool_create(
            &pool(
                "conf-orphan",
                PoolPurpose::Node,
                "10.146.0.0/24",
                "10.146.0.10",
                "10.146.0.20",
            ),
            &[],
        )
        .await
        .unwrap();
    // No node at all (what a registration killed between its old two transactions left).
    let ghost = NodeUuid::from_index(146, 1);
    store
        .ip_allocate("conf-orphan", &ghost, PoolPurpose::Node, 1)
        .await
        .unwrap();
    // A node whose record does not name its address.
    let forgetful = store
        .node_create(&node(146, 2, "conf-rack-orphan"), &[])
        .await
        .unwrap();
    store
        .ip_allocate("conf-orphan", &forgetful.uuid, PoolPurpose::Node, 1)
        .await
        .unwrap();
    // A registered node accounts for its address.
    let registered = node(146, 3, "conf-rack-orphan");
    store
        .node_register(&registration(&registered, None, "conf-orphan", None, "ok"))
        .await
        .unwrap();
    let orphans: Vec<_> = store
        .ip_orphans()
        .await
        .unwrap()
        .into_iter()
        .filter(|o| o.allocation.pool == "conf-orphan")
        .map(|o| (o.allocation.address, o.allocation.node_uuid, o.reason))
        .collect();
    assert_eq!(
        orphans,
        vec![
            (
                "10.146.0.10".to_string(),
                ghost.clone(),
                OrphanReason::NodeMissing
            ),
            (
                "10.146.0.11".to_string(),
                forgetful.uuid.clone(),
                OrphanReason::NotInRecord
            ),
        ]
    );
    // Retiring releases, so nothing is left to report for that node.
    let mut retired = forgetful.clone();
    retired.state = LifecycleState::Retired;
    store.node_update(&retired, &[]).await.unwrap();
    store.ip_release_node(&ghost).await.unwrap();
    assert!(store
        .ip_orphans()
        .await
        .unwrap()
        .iter()
        .all(|o| o.allocation.pool != "conf-orphan"));
}

/// Reasons of the node-less events among the newest `limit`.
async fn admin_event_reasons(store: &dyn Store) -> Vec<String> {
    store
        .event_list(&EventFilter {
            limit: 200,
            ..Default::default()
        })
        .await
        .unwrap()
        .into_iter()
        .filter(|e| e.node_uuid.is_none())
        .map(|e| format!("{} {}", e.action, e.reason))
        .collect()
}

fn admin_event(action: &str, reason: &str) -> NewEvent {
    NewEvent {
        at_ms: 7_000,
        node_uuid: None,
        actor: "token:conf".into(),
        action: Action::parse(action).expect("a known audit action"),
        from_state: None,
        to_state: None,
        reason: reason.into(),
    }
}

async fn admin_writes_carry_their_events(store: &dyn Store) {
    let audited = |action: &str, reason: &str| vec![admin_event(action, reason)];
    store
        .flavor_create(
            &flavor("conf-audit"),
            1,
            &audited("flavor_create", "conf-audit a"),
        )
        .await
        .unwrap();
    let duplicate = store
        .flavor_create(
            &flavor("conf-audit"),
            1,
            &audited("flavor_create", "conf-audit dup"),
        )
        .await;
    assert!(
        matches!(duplicate, Err(StoreError::AlreadyExists { .. })),
        "{duplicate:?}"
    );
    store
        .flavor_put(
            &flavor("conf-audit"),
            2,
            &audited("flavor_replace", "conf-audit b"),
        )
        .await
        .unwrap();
    store
        .flavor_delete("conf-audit", &audited("flavor_delete", "conf-audit c"))
        .await
        .unwrap();
    let missing = store
        .flavor_delete(
            "conf-audit",
            &audited("flavor_delete", "conf-audit missing"),
        )
        .await;
    assert!(matches!(missing, Err(StoreError::NotFound { .. })));
    let p = pool(
        "conf-audit-pool",
        PoolPurpose::Node,
        "10.147.0.0/24",
        "10.147.0.10",
        "10.147.0.20",
    );
    store
        .pool_create(&p, &audited("pool_create", "conf-audit d"))
        .await
        .unwrap();
    let duplicate = store
        .pool_create(&p, &audited("pool_create", "conf-audit dup pool"))
        .await;
    assert!(matches!(duplicate, Err(StoreError::AlreadyExists { .. })));
    store
        .pool_delete("conf-audit-pool", &audited("pool_delete", "conf-audit e"))
        .await
        .unwrap();
    store
        .token_create(
            "conf-audit",
            TokenRole::Viewer,
            &"e".repeat(64),
            7,
            None,
            &audited("token_create", "conf-audit f"),
        )
        .await
        .unwrap();
    let duplicate = store
        .token_create(
            "conf-audit",
            TokenRole::Viewer,
            &"f".repeat(64),
            7,
            None,
            &audited("token_create", "conf-audit dup token"),
        )
        .await;
    assert!(matches!(duplicate, Err(StoreError::AlreadyExists { .. })));
    store
        .token_delete("conf-audit", &audited("token_delete", "conf-audit g"))
        .await
        .unwrap();
    let reasons: Vec<String> = admin_event_reasons(store)
        .await
        .into_iter()
        .filter(|r| r.contains("conf-audit"))
        .collect();
    assert_eq!(
        reasons,
        vec![
            "token_delete conf-audit g",
            "token_create conf-audit f",
            "pool_delete conf-audit e",
            "pool_create conf-audit d",
            "flavor_delete conf-audit c",
            "flavor_replace conf-audit b",
            "flavor_create conf-audit a",
        ],
        "each write's event, and none of a refused write"
    );
}

async fn concurrent_flavor_creates_have_one_winner(store: Arc<dyn Store>) {
    let mut tasks = Vec::new();
    for index in 0..16 {
        let store = store.clone();
        tasks.push(tokio::spawn(async move {
            let mut f = flavor("conf-crowd-flavor");
            f.cmdline_template = format!("console=ttyS0 attempt={index}");
            let event = admin_event("flavor_create", &format!("conf-crowd-flavor {index}"));
            let result = store.flavor_create(&f, 1, &[event]).await;
            (f, result)
        }));
    }
    let mut winners = Vec::new();
    for task in tasks {
        let (f, result) = task.await.expect("task");
        match result {
            Ok(()) => winners.push(f),
            Err(StoreError::AlreadyExists { .. }) => {}
            Err(error) => panic!("concurrent flavor create: {error}"),
        }
    }
    assert_eq!(winners.len(), 1, "exactly one create of one name wins");
    assert_eq!(
        store
            .flavor_get("conf-crowd-flavor")
            .await
            .unwrap()
            .as_ref(),
        Some(&winners[0]),
        "the stored flavor is the winner's"
    );
    let events: Vec<String> = admin_event_reasons(&*store)
        .await
        .into_iter()
        .filter(|r| r.contains("conf-crowd-flavor"))
        .collect();
    assert_eq!(events.len(), 1, "only the winner's event: {events:?}");
}

async fn leases_pass_on_only_when_lapsed_and_fence_stale_writers(
    store: &dyn Store,
    wall_ms: WallClock,
) {
    use crate::core::cluster::Replica;
    let ttl = 400;
    let first = store
        .lease_acquire("conf-a", ttl, wall_ms(), None)
        .await
        .unwrap();
    assert_eq!(first.holder, "conf-a", "a free lease is taken: {first:?}");
    let epoch = first.epoch;
    assert!(first.expires_at_ms > first.db_now_ms);
    let other = store
        .lease_acquire("conf-b", ttl, wall_ms(), None)
        .await
        .unwrap();
    assert_eq!(
        (other.holder.as_str(), other.epoch),
        ("conf-a", epoch),
        "a held lease is not stolen"
    );
    let renewed = store
        .lease_acquire("conf-a", ttl, wall_ms(), Some("memory of a"))
        .await
        .unwrap();
    assert_eq!((renewed.holder.as_str(), renewed.epoch), ("conf-a", epoch));
    assert!(
        renewed.expires_at_ms >= first.expires_at_ms,
        "renewing extends it"
    );

    // Saga writes under the current epoch pass.
    let mut n = node(121, 1, "conf-rack-l");
    n.state = LifecycleState::Suspect;
    let n = store.node_create(&n, &[]).await.unwrap();
    let fresh = Remediation::new(
        n.uuid.clone(),
        RemediationKind::Automatic,
        "system",
        "t",
        10,
    );
    let created = store
        .remediation_create(&fresh, &[], Some(epoch))
        .await
        .expect("a write under the current epoch");
    let mut advanced = created.clone();
    advanced.step_index = 1;
    let (advanced, _) = store
        .remediation_update(&advanced, None, &[], Some(epoch))
        .await
        .expect("an update under the current epoch");

    // The lease lapses and another takes it: a new epoch; the old one's writes are
    // refused in their transaction and change nothing.
    tokio::time::sleep(std::time::Duration::from_millis(ttl as u64 + 200)).await;
    let taken = store
        .lease_acquire("conf-b", ttl, wall_ms(), None)
        .await
        .unwrap();
    assert_eq!(
        (taken.holder.as_str(), taken.epoch),
        ("conf-b", epoch + 1),
        "a lapsed lease passes on under a new epoch"
    );
    assert_eq!(
        taken.controller_memory.as_deref(),
        Some("memory of a"),
        "the new holder gets the old one's controller memory"
    );
    let mut stale = advanced.clone();
    stale.step_index = 2;
    let event = NewEvent::for_node(&n.uuid, 20, "system", Action::RemediationStep, "stale");
    let refused = store
        .remediation_update(&stale, None, &[event], Some(epoch))
        .await;
    assert!(
        matches!(
            refused,
            Err(StoreError::Fenced { written, current: Some(current) })
                if written == epoch && current == epoch + 1
        ),
        "a stale leader's saga write is fenced: {refused:?}"
    );
    assert_eq!(
        store.remediation_get(created.id).await.unwrap(),
        Some(advanced.clone()),
        "the fenced write changed nothing"
    );
    assert!(
        !node_events(store, &n.uuid)
            .await
            .iter()
            .any(|e| e.contains("stale")),
        "nor wrote its events"
    );
    let other_node = store
        .node_create(&node(121, 2, "conf-rack-l"), &[])
        .await
        .unwrap();
    let refused = store
        .remediation_create(
            &Remediation::new(
                other_node.uuid.clone(),
                RemediationKind::Fence,
                "system",
                "t",
                10,
            ),
            &[],
            Some(epoch),
        )
        .await;
    assert!(
        matches!(refused, Err(StoreError::Fenced { .. })),
        "{refused:?}"
    );
    // Unfenced writes (an operator's) are not the lease's business.
    store
        .remediation_update(&advanced, None, &[], None)
        .await
        .expect("an unfenced write");

    // Releasing ends the term at once; only the holder can.
    store
        .lease_release("conf-a", epoch + 1, wall_ms())
        .await
        .unwrap();
    assert_eq!(
        store
            .lease_acquire("conf-a", ttl, wall_ms(), None)
            .await
            .unwrap()
            .holder,
        "conf-b",
        "only the holder releases"
    );
    store
        .lease_release("conf-b", epoch + 1, wall_ms())
        .await
        .unwrap();
    let after = store
        .lease_acquire("conf-a", ttl, wall_ms(), None)
        .await
        .unwrap();
    assert_eq!((after.holder.as_str(), after.epoch), ("conf-a", epoch + 2));

    // Replicas report in and are listed with the store's clock.
    for name in ["conf-r1", "conf-r2"] {
        let replica = Replica {
            name: name.into(),
            address: "127.0.0.1:8080".into(),
            version: "test".into(),
            started_at_ms: 5,
            last_seen_at_ms: 0,
        };
        store.replica_report(&replica, wall_ms()).await.unwrap();
        store.replica_report(&replica, wall_ms()).await.unwrap();
    }
    let status = store.cluster_read(wall_ms()).await.unwrap();
    let names: BTreeSet<&str> = status.replicas.iter().map(|r| r.name.as_str()).collect();
    assert!(
        names.contains("conf-r1") && names.contains("conf-r2"),
        "{status:?}"
    );
    assert!(status
        .replicas
        .iter()
        .all(|r| r.last_seen_at_ms > 0 && r.last_seen_at_ms <= status.db_now_ms + 1_000));
    assert_eq!(status.lease.map(|l| l.holder), Some("conf-a".to_string()));
}

async fn firmware_bundles_and_the_rollout_are_kept_with_generation_checks(store: &dyn Store) {
    use crate::core::firmware::{AppliesTo, FirmwareBundle, RolloutPause, RolloutSlot};
    let bundle = FirmwareBundle {
        name: "conf-bios-2".into(),
        component: "bios".into(),
        version: "2.0".into(),
        artifact: Artifact {
            url: "/images/bios.bin".into(),
            sha256: "b".repeat(64),
        },
        size_bytes: 4096,
        applies_to: AppliesTo {
            vendor: Some("Dell Inc.".into()),
            ..AppliesTo::default()
        },
        command: vec!["/bin/flash".into(), "{file}".into()],
        timeout_s: 60,
        success_exit_codes: vec![0, 2],
        restart: bearman_proto::FirmwareRestart::PowerCycle,
        created_at_ms: 7_000,
    };
    let added = NewEvent::global(
        7_000,
        "test",
        Action::FirmwareBundleCreate,
        "conf-bios-2 added",
    );
    store
        .firmware_bundle_create(&bundle, &[added])
        .await
        .unwrap();
    let again = store.firmware_bundle_create(&bundle, &[]).await;
    assert!(
        matches!(again, Err(StoreError::AlreadyExists { .. })),
        "a second bundle of one name: {again:?}"
    );
    let listed = store.firmware_bundle_list().await.unwrap();
    assert_eq!(
        listed.iter().find(|b| b.name == bundle.name),
        Some(&bundle),
        "the bundle reads back as written"
    );

    // The rollout: one record, written only at the generation it was read at.
    let before = store.firmware_rollout_get().await.unwrap();
    let mut paused = before.clone();
    paused.paused = Some(RolloutPause {
        by: "test".into(),
        at_ms: 7_100,
        reason: "conformance".into(),
    });
    let pause_event = NewEvent::global(7_100, "test", Action::FirmwareRolloutPaused, "conformance");
    let stored = store
        .firmware_rollout_put(&paused, &[pause_event])
        .await
        .unwrap();
    assert_eq!(stored.generation, before.generation + 1);
    assert_eq!(store.firmware_rollout_get().await.unwrap(), stored);
    let stale = store.firmware_rollout_put(&paused, &[]).await;
    assert!(
        matches!(stale, Err(StoreError::Conflict { .. })),
        "a rollout written from a stale read: {stale:?}"
    );

    // A node and the rollout go together or not at all.
    let n = node(160, 1, "conf-rack-fw");
    let created = store.node_create(&n, &[]).await.unwrap();
    let mut flashing = created.clone();
    flashing.state = LifecycleState::Registered;
    let mut with_slot = stored.clone();
    with_slot.slots.push(RolloutSlot {
        uuid: n.uuid.clone(),
        rack: n.rack.clone(),
        bundle: bundle.name.clone(),
        started_at_ms: 7_200,
        deadline_ms: 9_000,
    });
    let stale_rollout = store
        .node_update_with_rollout(&flashing, &paused, &[])
        .await;
    assert!(
        matches!(stale_rollout, Err(StoreError::Conflict { .. })),
        "{stale_rollout:?}"
    );
    assert_eq!(
        store.node_get(&n.uuid).await.unwrap().unwrap().generation,
        created.generation,
        "a refused rollout leaves the node unwritten"
    );
    let mut stale_node = flashing.clone();
    stale_node.generation -= 1;
    let refused = store
        .node_update_with_rollout(&stale_node, &with_slot, &[])
        .await;
    assert!(
        matches!(refused, Err(StoreError::GenerationMismatch { .. })),
        "{refused:?}"
    );
    assert_eq!(
        store.firmware_rollout_get().await.unwrap(),
        stored,
        "a refused node leaves the rollout unwritten"
    );
    let written = store
        .node_update_with_rollout(&flashing, &with_slot, &[])
        .await
        .unwrap();
    assert_eq!(written.generation, created.generation + 1);
    let now = store.firmware_rollout_get().await.unwrap();
    assert_eq!(now.generation, stored.generation + 1);
    assert_eq!(now.slots.len(), stored.slots.len() + 1);

    // A registration carrying a stale rollout writes nothing at all.
    store
        .pool_create(
            &pool(
                "conf-fw-node",
                PoolPurpose::Node,
                "10.160.0.0/24",
                "10.160.0.10",
                "10.160.0.20",
            ),
            &[],
        )
        .await
        .unwrap();
    let fresh = node(160, 2, "conf-rack-fw");
    let mut write = registration(&fresh, None, "conf-fw-node", None, "fw");
    write.rollout = Some(with_slot.clone());
    let lost = store.node_register(&write).await;
    assert!(matches!(lost, Err(StoreError::Conflict { .. })), "{lost:?}");
    assert!(store.node_get(&fresh.uuid).await.unwrap().is_none());
    assert!(held(store, &fresh.uuid).await.is_empty());
    write.rollout = Some(now.clone());
    store.node_register(&write).await.unwrap();
    assert_eq!(
        store.firmware_rollout_get().await.unwrap().generation,
        now.generation + 1
    );

    let removed = NewEvent::global(
        7_300,
        "test",
        Action::FirmwareBundleDelete,
        "conf-bios-2 gone",
    );
    store
        .firmware_bundle_delete(&bundle.name, &[removed])
        .await
        .unwrap();
    let missing = store.firmware_bundle_delete(&bundle.name, &[]).await;
    assert!(
        matches!(missing, Err(StoreError::NotFound { .. })),
        "{missing:?}"
    );
    let reasons = admin_event_reasons(store).await;
    for reason in [
        "firmware_bundle_create conf-bios-2 added",
        "firmware_rollout_paused conformance",
        "firmware_bundle_delete conf-bios-2 gone",
    ] {
        assert!(
            reasons.iter().any(|r| r == reason),
            "event {reason} in {reasons:?}"
        );
    }
}

async fn the_drill_board_is_generation_checked_and_files_finished_drills(store: &dyn Store) {
    use crate::core::drill::{Drill, DrillBoard, DrillPhase, DrillSpec, Observation};
    let spec = DrillSpec::parse(
        "name = \"conf-drill\"\nfault = \"power_loss\"\n[targets]\ncount = 1\n[budget]\nnodes_max = 1\n",
    )
    .unwrap();
    let board = store.drill_board_get().await.unwrap();
    let id = board.last_id + 1;
    let observation = Observation {
        nodes: &[],
        remediations: &[],
        guards: &[],
    };
    let drill = Drill::new(id, spec, &[], "test", 8_000, &observation);
    let started = DrillBoard {
        last_id: id,
        active: Some(drill.clone()),
        ..board.clone()
    };
    let event = NewEvent::global(8_000, "test", Action::DrillStarted, "conformance");
    let stored = store
        .drill_board_put(&started, None, &[event])
        .await
        .unwrap();
    assert_eq!(stored.generation, board.generation + 1);
    assert_eq!(store.drill_board_get().await.unwrap(), stored);
    // A second start from the same stale read loses: two replicas never run two drills.
    let stale = store.drill_board_put(&started, None, &[]).await;
    assert!(
        matches!(stale, Err(StoreError::Conflict { .. })),
        "a board written from a stale read: {stale:?}"
    );
    // A stale write that would also file a drill files nothing.
    let mut finished = drill.clone();
    finished.phase = DrillPhase::Finished;
    finished.finished_at_ms = Some(9_000);
    let ended = DrillBoard {
        active: None,
        ..stored.clone()
    };
    let stale_end = DrillBoard {
        generation: board.generation,
        ..ended.clone()
    };
    assert!(store
        .drill_board_put(&stale_end, Some(&finished), &[])
        .await
        .is_err());
    assert_eq!(store.drill_get(id).await.unwrap(), None, "nothing filed");
    let event = NewEvent::global(9_000, "test", Action::DrillFinished, "conformance done");
    let after = store
        .drill_board_put(&ended, Some(&finished), &[event])
        .await
        .unwrap();
    assert!(after.active.is_none());
    assert_eq!(after.last_id, id);
    assert_eq!(store.drill_get(id).await.unwrap(), Some(finished.clone()));
    let listed = store.drill_list(10).await.unwrap();
    assert_eq!(listed.first(), Some(&finished), "newest first");
    let reasons = admin_event_reasons(store).await;
    for reason in [
        "drill_started conformance",
        "drill_finished conformance done",
    ] {
        assert!(
            reasons.iter().any(|r| r == reason),
            "event {reason} in {reasons:?}"
        );
    }
}
