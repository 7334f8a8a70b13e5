//! Flavors (boot profiles): create once, create or replace, read, list, delete while unused.

use sqlx::Row;

use super::events::insert_events;
use super::{backend_error, corrupt, is_unique_violation, SqlStore};
use crate::core::model::{Flavor, NewEvent, TimestampMs};
use crate::store::StoreError;

pub(super) async fn create(
    store: &SqlStore,
    flavor: &Flavor,
    at_ms: TimestampMs,
    events: &[NewEvent],
) -> Result<(), StoreError> {
    let doc = serde_json::to_string(flavor).map_err(|e| corrupt("flavor document", e))?;
    let mut tx = store.pool.begin().await.map_err(backend_error)?;
    // No upsert: the primary key decides which of two concurrent creates wins.
    let inserted =
        sqlx::query("INSERT INTO flavors (name, doc, updated_at_ms) VALUES ($1, $2, $3)")
            .bind(&flavor.name)
            .bind(doc)
            .bind(at_ms)
            .execute(&mut *tx)
            .await;
    match inserted {
        Err(error) if is_unique_violation(&error) => {
            return Err(StoreError::AlreadyExists {
                what: format!("flavor {}", flavor.name),
            })
        }
        other => other.map_err(backend_error)?,
    };
    insert_events(&mut tx, events).await?;
    tx.commit().await.map_err(backend_error)
}

pub(super) async fn put(
    store: &SqlStore,
    flavor: &Flavor,
    at_ms: TimestampMs,
    events: &[NewEvent],
) -> Result<(), StoreError> {
    let doc = serde_json::to_string(flavor).map_err(|e| corrupt("flavor document", e))?;
    let mut tx = store.pool.begin().await.map_err(backend_error)?;
    sqlx::query(
        "INSERT INTO flavors (name, doc, updated_at_ms) VALUES ($1, $2, $3) \
         ON CONFLICT (name) DO UPDATE SET doc = excluded.doc, updated_at_ms = excluded.updated_at_ms",
    )
    .bind(&flavor.name)
    .bind(doc)
    .bind(at_ms)
    .execute(&mut *tx)
    .await
    .map_err(backend_error)?;
    insert_events(&mut tx, events).await?;
    tx.commit().await.map_err(backend_error)
}

pub(super) async fn get(store: &SqlStore, name: &str) -> Result<Option<Flavor>, StoreError> {
    let row = sqlx::query("SELECT doc FROM flavors WHERE name = $1")
        .bind(name)
        .fetch_optional(&store.pool)
        .await
        .map_err(backend_error)?;
    row.map(|row| {
        let doc: String = row.try_get("doc").map_err(backend_error)?;
        serde_json::from_str(&doc).map_err(|e| corrupt("flavor document", e))
    })
    .transpose()
}

pub(super) async fn list(store: &SqlStore) -> Result<Vec<Flavor>, StoreError> {
    let rows = sqlx::query("SELECT doc FROM flavors ORDER BY name")
        .fetch_all(&store.pool)
        .await
        .map_err(backend_error)?;
    rows.iter()
        .map(|row| {
            let doc: String = row.try_get("doc").map_err(backend_error)?;
            serde_json::from_str(&doc).map_err(|e| corrupt("flavor document", e))
        })
        .collect()
}

pub(super) async fn delete(
    store: &SqlStore,
    name: &str,
    events: &[NewEvent],
) -> Result<(), StoreError> {
    let mut tx = store.pool.begin().await.map_err(backend_error)?;
    let users: i64 = sqlx::query("SELECT COUNT(*) AS n FROM nodes WHERE flavor = $1")
        .bind(name)
        .fetch_one(&mut *tx)
        .await
        .and_then(|row| row.try_get("n"))
        .map_err(backend_error)?;
    if users > 0 {
        return Err(StoreError::InUse {
            what: format!("flavor {name}"),
            detail: format!("{users} node(s) use it"),
        });
    }
    let deleted = sqlx::query("DELETE FROM flavors WHERE name = $1")
        .bind(name)
        .execute(&mut *tx)
        .await
        .map_err(backend_error)?
        .rows_affected();
    if deleted == 0 {
        return Err(StoreError::not_found(format!("flavor {name}")));
    }
    insert_events(&mut tx, events).await?;
    tx.commit().await.map_err(backend_error)?;
    Ok(())
}
