//! The store conformance suite against every implementation: memory, the cached wrapper,
//! SQLite in a temporary directory, and the real PostgreSQL server.

use std::sync::Arc;

use bearman::store::cached::CachedStore;
use bearman::store::conformance;
use bearman::store::memory::MemoryStore;
use bearman::store::sql::SqlStore;
use bearman::store::Store;

/// PostgreSQL to test against: `DATABASE_URL`, or this machine's local server.
fn postgres_url() -> String {
    std::env::var("DATABASE_URL")
        .unwrap_or_else(|_| "postgres://postgres@127.0.0.1:5432/test".to_string())
}

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
    let base = postgres_url();
    // A schema of our own keeps parallel runs and earlier runs out of each other's way.
    let schema = format!(
        "bearman_test_{}_{}",
        std::process::id(),
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap()
            .as_nanos()
    );
    sqlx::any::install_default_drivers();
    let admin = sqlx::AnyPool::connect(&base).await.unwrap_or_else(|error| {
        panic!(
            "PostgreSQL is required for this test and was not reachable at {base}: {error}. \
             Start it, or point DATABASE_URL at one."
        )
    });
    sqlx::query(&format!("CREATE SCHEMA {schema}"))
        .execute(&admin)
        .await
        .unwrap();
    let separator = if base.contains('?') { '&' } else { '?' };
    let url = format!("{base}{separator}options=-c%20search_path%3D{schema}");
    let result = async move {
        let store = Arc::new(SqlStore::connect(&url).await.expect("open postgres"));
        assert_eq!(store.backend_name(), "postgres");
        conformance::run_all(store.clone(), wall_ms).await;
        store.close().await;
    };
    // Always drop the schema, even when a check panics.
    let outcome = tokio::spawn(result).await;
    sqlx::query(&format!("DROP SCHEMA {schema} CASCADE"))
        .execute(&admin)
        .await
        .unwrap();
    if let Err(panic) = outcome {
        std::panic::resume_unwind(panic.into_panic());
    }
}
