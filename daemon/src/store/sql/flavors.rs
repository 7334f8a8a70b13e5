//! Flavors (boot profiles): create once, create or replace, read, list, delete while unused.

use super::events::insert_events;
use super::named_docs::NamedDocs;
use super::notify::{self, CacheChange};
use super::{backend_error, corrupt, is_unique_violation, SqlStore};
use crate::core::model::{Flavor, NewEvent, TimestampMs};
use crate::store::StoreError;

const FLAVORS: NamedDocs = NamedDocs {
    table: "flavors",
    what: "flavor",
    uses_query: Some("SELECT COUNT(*) AS n FROM nodes WHERE flavor = $1"),
    uses_are: "node(s) use it",
};

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
    notify::send(
        store.backend,
        &mut tx,
        &CacheChange::Flavor(flavor.name.clone()),
    )
    .await?;
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
    notify::send(
        store.backend,
        &mut tx,
        &CacheChange::Flavor(flavor.name.clone()),
    )
    .await?;
    tx.commit().await.map_err(backend_error)
}

pub(super) async fn get(store: &SqlStore, name: &str) -> Result<Option<Flavor>, StoreError> {
    FLAVORS.get(store, name).await
}

pub(super) async fn list(store: &SqlStore) -> Result<Vec<Flavor>, StoreError> {
    FLAVORS.list(store).await
}

pub(super) async fn delete(
    store: &SqlStore,
    name: &str,
    events: &[NewEvent],
) -> Result<(), StoreError> {
    FLAVORS
        .delete_unused(store, name, events, Some(&CacheChange::Flavor(name.into())))
        .await
}
