//! IP pools: create, read, list, delete while unused.

use sqlx::Row;

use super::events::insert_events;
use super::{backend_error, corrupt, is_unique_violation, SqlStore};
use crate::core::model::{IpPool, NewEvent};
use crate::store::StoreError;

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
    let row = sqlx::query("SELECT doc FROM ip_pools WHERE name = $1")
        .bind(name)
        .fetch_optional(&store.pool)
        .await
        .map_err(backend_error)?;
    row.map(|row| {
        let doc: String = row.try_get("doc").map_err(backend_error)?;
        serde_json::from_str(&doc).map_err(|e| corrupt("pool document", e))
    })
    .transpose()
}

pub(super) async fn list(store: &SqlStore) -> Result<Vec<IpPool>, StoreError> {
    let rows = sqlx::query("SELECT doc FROM ip_pools ORDER BY name")
        .fetch_all(&store.pool)
        .await
        .map_err(backend_error)?;
    rows.iter()
        .map(|row| {
            let doc: String = row.try_get("doc").map_err(backend_error)?;
            serde_json::from_str(&doc).map_err(|e| corrupt("pool document", e))
        })
        .collect()
}

pub(super) async fn delete(
    store: &SqlStore,
    name: &str,
    events: &[NewEvent],
) -> Result<(), StoreError> {
    let mut tx = store.pool.begin().await.map_err(backend_error)?;
    let used: i64 = sqlx::query("SELECT COUNT(*) AS n FROM ip_allocations WHERE pool = $1")
        .bind(name)
        .fetch_one(&mut *tx)
        .await
        .and_then(|row| row.try_get("n"))
        .map_err(backend_error)?;
    if used > 0 {
        return Err(StoreError::InUse {
            what: format!("ip pool {name}"),
            detail: format!("{used} address(es) allocated"),
        });
    }
    let deleted = sqlx::query("DELETE FROM ip_pools WHERE name = $1")
        .bind(name)
        .execute(&mut *tx)
        .await
        .map_err(backend_error)?
        .rows_affected();
    if deleted == 0 {
        return Err(StoreError::not_found(format!("ip pool {name}")));
    }
    insert_events(&mut tx, events).await?;
    tx.commit().await.map_err(backend_error)?;
    Ok(())
}
