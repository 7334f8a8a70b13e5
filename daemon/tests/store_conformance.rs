//! The store conformance suite against every implementation: memory, the cached wrapper,
//! SQLite in a temporary directory, and the real PostgreSQL server.

#[allow(dead_code)]
#[path = "support/postgres.rs"]
mod postgres;

use std::sync::Arc;

use bearman::store::cached::CachedStore;
use bearman::store::conformance;
use bearman::store::memory::MemoryStore;
use bearman::store::sql::SqlStore;
use bearman::store::Store;

/// The wall clock: the SQL stores' leases expire on the database's clock, which follows it.
fn wall_ms() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_millis() as i64
}

#[tokio::test]
async fn memory_store_conforms() {
    conformance::run_all(Arc::new(MemoryStore::new()), wall_ms).await;
}

#[tokio::test]
async fn cached_store_conforms() {
    let inner: Arc<dyn Store> = Arc::new(MemoryStore::new());
    conformance::run_all(Arc::new(CachedStore::new(inner)), wall_ms).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sqlite_store_conforms_and_survives_reopen() {
    let dir = tempfile::tempdir().unwrap();
    let url = format!(
        "sqlite://{}?mode=rwc",
        dir.path().join("bearman.db").display()
    );
    let store = Arc::new(SqlStore::connect(&url).await.expect("open sqlite"));
    conformance::run_all(store.clone(), wall_ms).await;
    let before = store.node_count_by_state().await.unwrap();
    store.close().await;
    drop(store);
    // Reopening runs migrations again (a no-op) and finds everything written before.
    let reopened = SqlStore::connect(&url).await.expect("reopen sqlite");
    assert_eq!(reopened.node_count_by_state().await.unwrap(), before);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn postgres_store_conforms() {
    postgres::with_schema("test", |url| async move {
        let store = Arc::new(SqlStore::connect(&url).await.expect("open postgres"));
        assert_eq!(store.backend_name(), "postgres");
        conformance::run_all(store.clone(), wall_ms).await;
        store.close().await;
    })
    .await;
}
