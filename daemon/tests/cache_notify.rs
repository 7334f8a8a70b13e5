//! Two replicas' read caches on one real PostgreSQL database (a schema of this test's
//! own), opened as `bearman serve` opens them, with a maximum age of a minute: only the
//! LISTEN/NOTIFY path can explain a replica serving another's write within seconds.
//! Covers node edits, heartbeats, flavor changes and deletes, and a listener that loses
//! its connection (the cache is emptied on reconnect, so a write whose notification was
//! missed is served after it).

#[allow(dead_code)]
#[path = "support/postgres.rs"]
mod postgres;

use std::sync::Arc;
use std::time::Duration;

use bearman::core::model::{Flavor, Node, NodeRole};
use bearman::runtime::system::SystemClock;
use bearman::store::{Store, StoreError};
use bearman_proto::uuid::NodeUuid;
use bearman_proto::Artifact;
use tokio::time::Instant;

/// Far above every wait here: an entry can only be refreshed by a notification (or the
/// listener's reconnect), never by its age.
const CACHE_MAX_AGE_MS: i64 = 60_000;

/// How long a change may take to reach the other replica before the test fails.
const DELIVERY_DEADLINE: Duration = Duration::from_secs(5);

/// A replica's cache, and the `application_name` its listener connects with.
struct Replica {
    store: Arc<dyn Store>,
    listener_name: String,
}

struct Cluster {
    a: Replica,
    b: Replica,
    /// A plain connection to the schema, for what the test does behind the stores' back.
    admin: sqlx::AnyPool,
}

async fn cluster(url: &str) -> Cluster {
    sqlx::any::install_default_drivers();
    let admin = sqlx::AnyPool::connect(url).await.unwrap();
    let schema: String = sqlx::query_scalar("SELECT current_schema()::text")
        .fetch_one(&admin)
        .await
        .unwrap();
    let replica = |suffix: &'static str| {
        let url = format!("{url}&application_name={schema}_{suffix}");
        let listener_name = format!("{schema}_{suffix} cache-listener");
        async move {
            let store = bearman::server::open_sql_store_for_replica(
                &url,
                CACHE_MAX_AGE_MS,
                Arc::new(SystemClock),
            )
            .await
            .unwrap();
            Replica {
                store,
                listener_name,
            }
        }
    };
    let a = replica("a").await;
    let b = replica("b").await;
    assert!(
        a.listener_name.len() < 64,
        "PostgreSQL would truncate {}",
        a.listener_name
    );
    let cluster = Cluster { a, b, admin };
    cluster.caught_up(&cluster.a).await;
    cluster.caught_up(&cluster.b).await;
    cluster
}

impl Cluster {
    /// Waits until `replica`'s listener has applied a notification this test sent by
    /// hand, and so every one committed before it (they arrive in commit order): the
    /// listener is up, and nothing sent so far can still evict what is cached next. The
    /// listener empties its cache once right after LISTEN and before it reads any
    /// notification, so after this nothing but a notification empties it.
    async fn caught_up(&self, replica: &Replica) {
        let sentinel = NodeUuid::from_index(9, 9);
        let deadline = Instant::now() + Duration::from_secs(15);
        loop {
            let before = replica.store.content_epoch();
            sqlx::query(
                "SELECT pg_notify('bearman_cache', current_schema()::text || ' node:' || $1)",
            )
            .bind(sentinel.to_string())
            .execute(&self.admin)
            .await
            .unwrap();
            let moved = until(Duration::from_millis(300), || async {
                replica.store.content_epoch() != before
            })
            .await;
            if moved {
                return;
            }
            assert!(
                Instant::now() < deadline,
                "the cache listener of {} never heard a notification",
                replica.listener_name
            );
        }
    }
}

/// Polls `condition` until it holds (true) or `deadline` passes (false).
async fn until<F, Fut>(deadline: Duration, mut condition: F) -> bool
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = bool>,
{
    let end = Instant::now() + deadline;
    loop {
        if condition().await {
            return true;
        }
        if Instant::now() >= end {
            return false;
        }
        tokio::time::sleep(Duration::from_millis(1)).await;
    }
}

async fn rack_on(store: &dyn Store, uuid: &NodeUuid) -> Option<String> {
    store.node_get(uuid).await.unwrap().unwrap().rack
}

fn flavor(name: &str, cmdline: &str) -> Flavor {
    Flavor {
        name: name.into(),
        kernel: Artifact {
            url: "http://images/vmlinuz".into(),
            sha256: "a".repeat(64),
        },
        initrds: vec![],
        cmdline_template: cmdline.into(),
        firmware_expected: Default::default(),
    }
}

/// Edits the node as the application does: read, change, write; a write refused as
/// stale (the cache held an older copy) evicts it, and the second attempt reads afresh.
async fn set_rack(store: &dyn Store, uuid: &NodeUuid, rack: &str) {
    for _ in 0..2 {
        let mut node = store.node_get(uuid).await.unwrap().unwrap();
        node.rack = Some(rack.into());
        match store.node_update(&node, &[]).await {
            Ok(_) => return,
            Err(StoreError::GenerationMismatch { .. }) => continue,
            Err(error) => panic!("{error}"),
        }
    }
    panic!("node {uuid}: two writes refused as stale");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn another_replicas_node_edit_is_served_within_the_notification_bound() {
    postgres::with_schema("cn", |url| async move {
        let c = cluster(&url).await;
        let uuid = NodeUuid::from_index(4, 1);
        let node = Node::new(uuid.clone(), "cn1".into(), NodeRole::Compute, 0);
        c.b.store.node_create(&node, &[]).await.unwrap();
        c.caught_up(&c.a).await;
        assert_eq!(rack_on(&*c.a.store, &uuid).await, None, "A caches it");
        set_rack(&*c.b.store, &uuid, "r1").await;
        assert!(
            until(DELIVERY_DEADLINE, || async {
                rack_on(&*c.a.store, &uuid).await.as_deref() == Some("r1")
            })
            .await,
            "replica A still serves its cached copy {DELIVERY_DEADLINE:?} after B's edit"
        );

        // A small measurement: B's committed write to A serving it, many times over.
        let mut latencies = Vec::new();
        for round in 0..50 {
            let rack = format!("m{round}");
            set_rack(&*c.b.store, &uuid, &rack).await;
            let written = Instant::now();
            assert!(
                until(DELIVERY_DEADLINE, || async {
                    rack_on(&*c.a.store, &uuid).await.as_deref() == Some(rack.as_str())
                })
                .await,
                "round {round}: not delivered"
            );
            latencies.push(written.elapsed());
        }
        latencies.sort();
        println!(
            "notify→evict latency over {} writes: median {:?}, p90 {:?}, max {:?}",
            latencies.len(),
            latencies[latencies.len() / 2],
            latencies[latencies.len() * 9 / 10],
            latencies[latencies.len() - 1]
        );
        // A's own write is served by A at once, and by B after the notification.
        set_rack(&*c.a.store, &uuid, "own").await;
        assert_eq!(rack_on(&*c.a.store, &uuid).await.as_deref(), Some("own"));
        assert!(
            until(DELIVERY_DEADLINE, || async {
                rack_on(&*c.b.store, &uuid).await.as_deref() == Some("own")
            })
            .await
        );
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn another_replicas_heartbeat_moves_the_cached_copy() {
    postgres::with_schema("cb", |url| async move {
        let c = cluster(&url).await;
        let uuid = NodeUuid::from_index(4, 2);
        let node = Node::new(uuid.clone(), "cn2".into(), NodeRole::Compute, 0);
        c.b.store.node_create(&node, &[]).await.unwrap();
        c.caught_up(&c.a).await;
        let cached = c.a.store.node_get(&uuid).await.unwrap().unwrap();
        assert_eq!(cached.last_heartbeat_at_ms, None);
        c.b.store.node_record_heartbeat(&uuid, 7_000).await.unwrap();
        assert!(
            until(DELIVERY_DEADLINE, || async {
                c.a.store
                    .node_get(&uuid)
                    .await
                    .unwrap()
                    .unwrap()
                    .last_heartbeat_at_ms
                    == Some(7_000)
            })
            .await,
            "replica A never heard B's heartbeat"
        );
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn another_replicas_flavor_change_and_delete_are_served_within_the_notification_bound() {
    postgres::with_schema("cf", |url| async move {
        let c = cluster(&url).await;
        c.b.store
            .flavor_create(&flavor("hv", "v1"), 0, &[])
            .await
            .unwrap();
        c.caught_up(&c.a).await;
        let cached = c.a.store.flavor_get("hv").await.unwrap().unwrap();
        assert_eq!(cached.cmdline_template, "v1");
        c.b.store
            .flavor_put(&flavor("hv", "v2"), 1, &[])
            .await
            .unwrap();
        assert!(
            until(DELIVERY_DEADLINE, || async {
                c.a.store
                    .flavor_get("hv")
                    .await
                    .unwrap()
                    .unwrap()
                    .cmdline_template
                    == "v2"
            })
            .await,
            "replica A still serves flavor v1 after B replaced it"
        );
        c.b.store.flavor_delete("hv", &[]).await.unwrap();
        assert!(
            until(DELIVERY_DEADLINE, || async {
                c.a.store.flavor_get("hv").await.unwrap().is_none()
            })
            .await,
            "replica A still serves a flavor B deleted"
        );
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_listener_that_reconnects_empties_the_cache_so_a_missed_write_is_served() {
    postgres::with_schema("cr", |url| async move {
        let c = cluster(&url).await;
        let uuid = NodeUuid::from_index(4, 3);
        let node = Node::new(uuid.clone(), "cn3".into(), NodeRole::Compute, 0);
        c.b.store.node_create(&node, &[]).await.unwrap();
        c.caught_up(&c.a).await;
        let mut cached = c.a.store.node_get(&uuid).await.unwrap().unwrap();
        // A write whose notification is lost: made behind the stores' back, so nothing
        // is sent, as when it commits while A's listener is disconnected.
        cached.rack = Some("missed".into());
        cached.generation += 1;
        sqlx::query("UPDATE nodes SET doc = $1, generation = $2 WHERE uuid = $3")
            .bind(serde_json::to_string(&cached).unwrap())
            .bind(cached.generation)
            .bind(uuid.to_string())
            .execute(&c.admin)
            .await
            .unwrap();
        assert_eq!(
            rack_on(&*c.a.store, &uuid).await,
            None,
            "no notification: A serves its cached copy (the premise of this test)"
        );
        let terminated: Vec<bool> = sqlx::query_scalar(
            "SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE application_name = $1",
        )
        .bind(&c.a.listener_name)
        .fetch_all(&c.admin)
        .await
        .unwrap();
        assert_eq!(terminated, vec![true], "exactly A's listener is cut off");
        assert!(
            until(DELIVERY_DEADLINE, || async {
                rack_on(&*c.a.store, &uuid).await.as_deref() == Some("missed")
            })
            .await,
            "replica A kept its cache across a listener reconnect"
        );
        // And it listens again.
        set_rack(&*c.b.store, &uuid, "after").await;
        assert!(
            until(DELIVERY_DEADLINE, || async {
                rack_on(&*c.a.store, &uuid).await.as_deref() == Some("after")
            })
            .await,
            "replica A's listener did not come back"
        );
    })
    .await;
}
