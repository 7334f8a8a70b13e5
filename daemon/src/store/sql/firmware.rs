//! Firmware bundles (named documents) and the fleet's firmware rollout (one row, written
//! with a generation check, alone or in the transaction of the node write it goes with).

use super::events::insert_events;
use super::named_docs::NamedDocs;
use super::nodes::write_node;
use super::singleton_doc::SingletonDoc;
use super::{backend_error, corrupt, is_unique_violation, SqlStore};
use crate::core::firmware::{FirmwareBundle, FirmwareRollout};
use crate::core::model::{NewEvent, Node};
use crate::store::StoreError;

const BUNDLES: NamedDocs = NamedDocs {
    table: "firmware_bundles",
    what: "firmware bundle",
    // A bundle in flight on a node is not held by the database: the node's next
    // registration finds it gone.
    uses_query: None,
    uses_are: "",
};

pub(super) const ROLLOUT: SingletonDoc = SingletonDoc {
    table: "firmware_rollout",
    what: "firmware rollout",
};

pub(super) async fn bundle_create(
    store: &SqlStore,
    bundle: &FirmwareBundle,
    events: &[NewEvent],
) -> Result<(), StoreError> {
    let doc = serde_json::to_string(bundle).map_err(|e| corrupt("firmware bundle document", e))?;
    let mut tx = store.pool.begin().await.map_err(backend_error)?;
    let inserted =
        sqlx::query("INSERT INTO firmware_bundles (name, doc, created_at_ms) VALUES ($1, $2, $3)")
            .bind(&bundle.name)
            .bind(doc)
            .bind(bundle.created_at_ms)
            .execute(&mut *tx)
            .await;
    match inserted {
        Err(error) if is_unique_violation(&error) => {
            return Err(StoreError::AlreadyExists {
                what: format!("firmware bundle {}", bundle.name),
            })
        }
        other => other.map_err(backend_error)?,
    };
    insert_events(&mut tx, events).await?;
    tx.commit().await.map_err(backend_error)
}

pub(super) async fn bundle_list(store: &SqlStore) -> Result<Vec<FirmwareBundle>, StoreError> {
    BUNDLES.list(store).await
}

pub(super) async fn bundle_delete(
    store: &SqlStore,
    name: &str,
    events: &[NewEvent],
) -> Result<(), StoreError> {
    BUNDLES.delete_unused(store, name, events, None).await
}

pub(super) async fn rollout_get(store: &SqlStore) -> Result<FirmwareRollout, StoreError> {
    let mut connection = store.pool.acquire().await.map_err(backend_error)?;
    ROLLOUT.read(&mut connection).await
}

pub(super) async fn rollout_put(
    store: &SqlStore,
    rollout: &FirmwareRollout,
    events: &[NewEvent],
) -> Result<FirmwareRollout, StoreError> {
    let at_ms = events.first().map_or(0, |event| event.at_ms);
    let mut tx = store.pool.begin().await.map_err(backend_error)?;
    let stored = ROLLOUT.write(&mut tx, rollout, at_ms).await?;
    insert_events(&mut tx, events).await?;
    tx.commit().await.map_err(backend_error)?;
    Ok(stored)
}

pub(super) async fn node_update_with_rollout(
    store: &SqlStore,
    node: &Node,
    rollout: &FirmwareRollout,
    events: &[NewEvent],
) -> Result<Node, StoreError> {
    let mut tx = store.pool.begin().await.map_err(backend_error)?;
    let updated = write_node(store.backend, &mut tx, node).await?;
    ROLLOUT.write(&mut tx, rollout, node.updated_at_ms).await?;
    insert_events(&mut tx, events).await?;
    tx.commit().await.map_err(backend_error)?;
    Ok(updated)
}
