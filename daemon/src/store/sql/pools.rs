//! IP pools: create, read, list, delete while unused.

use sqlx::Row;

use super::events::insert_events;
use super::named_docs::NamedDocs;
use super::{backend_error, corrupt, is_unique_violation, SqlStore};
use crate::core::model::{IpPool, NewEvent};
use crate::store::StoreError;

const POOLS: NamedDocs = NamedDocs {
    table: "ip_pools",
    what: "ip pool",
    uses_query: Some("SELECT COUNT(*) AS n FROM ip_allocations WHERE pool = $1"),
    uses_are: "address(es) allocated",
};

/// The pool named `name` as stored, read inside `tx` (`lock_clause` may lock its row).
pub(super) async fn read_pool(
    tx: &mut sqlx::AnyConnection,
    name: &str,
    lock_clause: &str,
) -> Result<IpPool, StoreError> {
    let doc: Option<String> = sqlx::query(&format!(
        "SELECT doc FROM ip_pools WHERE name = $1{lock_clause}"
    ))
    .bind(name)
    .fetch_optional(&mut *tx)
    .await
    .map_err(backend_error)?
    .map(|row| row.try_get("doc"))
    .transpose()
    .map_err(backend_error)?;
    let doc = doc.ok_or_else(|| StoreError::not_found(format!("ip pool {name}")))?;
    serde_json::from_str(&doc).map_err(|e| corrupt("pool document", e))
}

pub(super) async fn create(
    store: &SqlStore,
    pool: &IpPool,
    events: &[NewEvent],
) -> Result<(), StoreError> {
    let doc = serde_json::to_string(pool).map_err(|e| corrupt("pool document", e))?;
    let mut tx = store.pool.begin().await.map_err(backend_error)?;
    let result = sqlx::query("INSERT INTO ip_pools (name, purpose, doc) VALUES ($1, $2, $3)")
        .bind(&pool.name)
        .bind(pool.purpose.as_str())
        .bind(doc)
        .execute(&mut *tx)
        .await;
    match result {
        Err(error) if is_unique_violation(&error) => {
            return Err(StoreError::AlreadyExists {
                what: format!("ip pool {}", pool.name),
            })
        }
        other => other.map_err(backend_error)?,
    };
    insert_events(&mut tx, events).await?;
    tx.commit().await.map_err(backend_error)
}

pub(super) async fn get(store: &SqlStore, name: &str) -> Result<Option<IpPool>, StoreError> {
    POOLS.get(store, name).await
}

pub(super) async fn list(store: &SqlStore) -> Result<Vec<IpPool>, StoreError> {
    POOLS.list(store).await
}

pub(super) async fn delete(
    store: &SqlStore,
    name: &str,
    events: &[NewEvent],
) -> Result<(), StoreError> {
    POOLS.delete_unused(store, name, events, None).await
}
