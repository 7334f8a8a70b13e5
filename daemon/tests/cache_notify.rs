//! Two replicas' read caches on one real PostgreSQL database (a schema of this test's
//! own), opened as `bearman serve` opens them, with a maximum age of a minute: only the
//! LISTEN/NOTIFY path can explain a replica serving another's write within seconds.
//! Covers node edits, flavor changes and deletes, a listener that loses
//! its connection (the cache is emptied on reconnect, so a write whose notification was
//! missed is served after it), and one that cannot connect at first (it retries).

#[allow(dead_code)]
#[path = "support/postgres.rs"]
mod postgres;

use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use bearman::core::model::{Flavor, Node, NodeRole};
use bearman::runtime::system::SystemClock;
use bearman::store::cached::CachedStore;
use bearman::store::sql::{notify, SqlStore};
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

        // A small measurement: from B's write being acknowledged (committed) to A's
        // listener evicting the entry (A's content epoch moves), many times over, and A
        // then serving B's copy. Often A has evicted before B even has its answer.
        let mut after_ack = Vec::new();
        let mut whole_write = Vec::new();
        let mut before_ack = 0;
        for round in 0..100 {
            let rack = format!("m{round}");
            let epoch = c.a.store.content_epoch();
            let started = Instant::now();
            set_rack(&*c.b.store, &uuid, &rack).await;
            let acked = Instant::now();
            if c.a.store.content_epoch() != epoch {
                before_ack += 1;
            }
            while c.a.store.content_epoch() == epoch {
                assert!(
                    acked.elapsed() < DELIVERY_DEADLINE,
                    "round {round}: not delivered"
                );
                tokio::task::yield_now().await;
            }
            after_ack.push(acked.elapsed());
            whole_write.push(started.elapsed());
            assert_eq!(rack_on(&*c.a.store, &uuid).await, Some(rack));
        }
        for series in [&mut after_ack, &mut whole_write] {
            series.sort();
        }
        let at = |series: &[Duration], quantile: usize| series[series.len() * quantile / 100];
        println!(
            "notify→evict over {n} writes: evicted before B's ack in {before_ack}; \
             after B's ack median {:?} p90 {:?} max {:?}; \
             from the start of B's read-modify-write median {:?} p90 {:?} max {:?}",
            at(&after_ack, 50),
            at(&after_ack, 90),
            after_ack[after_ack.len() - 1],
            at(&whole_write, 50),
            at(&whole_write, 90),
            whole_write[whole_write.len() - 1],
            n = after_ack.len(),
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

/// Forwards connections accepted on `listener` to `upstream` (PostgreSQL) while `open`;
/// before that, hangs up on each at once (as a database that is down or refusing would,
/// after the TCP handshake), counting them in `refused`.
async fn forward(
    listener: tokio::net::TcpListener,
    upstream: String,
    open: Arc<AtomicBool>,
    refused: Arc<AtomicUsize>,
) {
    loop {
        let (mut client, _) = listener.accept().await.unwrap();
        if !open.load(Ordering::SeqCst) {
            refused.fetch_add(1, Ordering::SeqCst);
            drop(client);
            continue;
        }
        let upstream = upstream.clone();
        tokio::spawn(async move {
            if let Ok(mut server) = tokio::net::TcpStream::connect(&upstream).await {
                let _ = tokio::io::copy_bidirectional(&mut client, &mut server).await;
            }
        });
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_listener_that_cannot_connect_at_first_retries_and_then_hears() {
    postgres::with_schema("cc", |url| async move {
        let c = cluster(&url).await;
        // A third replica whose listener reaches PostgreSQL only through a proxy that
        // hangs up for now (its reads and writes go straight to the database).
        let (authority_start, authority_end) = {
            let start = url.find('@').unwrap() + 1;
            (start, start + url[start..].find('/').unwrap())
        };
        let proxy = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let listener_url = format!(
            "{}{}{}",
            &url[..authority_start],
            proxy.local_addr().unwrap(),
            &url[authority_end..]
        );
        let open = Arc::new(AtomicBool::new(false));
        let refused = Arc::new(AtomicUsize::new(0));
        let proxy = tokio::spawn(forward(
            proxy,
            url[authority_start..authority_end].to_string(),
            open.clone(),
            refused.clone(),
        ));
        let sql: Arc<dyn Store> = Arc::new(SqlStore::connect(&url).await.unwrap());
        let clock = SystemClock;
        let late = Arc::new(CachedStore::with_max_age(
            sql,
            CACHE_MAX_AGE_MS,
            Arc::new(move || bearman::runtime::Clock::now_ms(&clock)),
        ));
        notify::spawn_cache_listener(&listener_url, &late);
        let late_replica = Replica {
            store: late.clone(),
            listener_name: "bearman cache-listener".into(),
        };

        let uuid = NodeUuid::from_index(4, 4);
        let node = Node::new(uuid.clone(), "cn4".into(), NodeRole::Compute, 0);
        c.b.store.node_create(&node, &[]).await.unwrap();
        assert_eq!(rack_on(&*late_replica.store, &uuid).await, None);
        set_rack(&*c.b.store, &uuid, "unheard").await;
        assert!(
            until(Duration::from_secs(10), || async {
                refused.load(Ordering::SeqCst) >= 3
            })
            .await,
            "the listener gave up after {} attempts",
            refused.load(Ordering::SeqCst)
        );
        assert_eq!(
            rack_on(&*late_replica.store, &uuid).await,
            None,
            "without its listener the replica serves its cached copy (the premise)"
        );

        // PostgreSQL becomes reachable: the listener gets through on a retry, empties
        // the cache (it missed the edit above) and hears what follows.
        open.store(true, Ordering::SeqCst);
        c.caught_up(&late_replica).await;
        assert_eq!(
            rack_on(&*late_replica.store, &uuid).await.as_deref(),
            Some("unheard")
        );
        set_rack(&*c.b.store, &uuid, "heard").await;
        assert!(
            until(DELIVERY_DEADLINE, || async {
                rack_on(&*late_replica.store, &uuid).await.as_deref() == Some("heard")
            })
            .await,
            "the late listener does not deliver"
        );
        proxy.abort();
    })
    .await;
}
