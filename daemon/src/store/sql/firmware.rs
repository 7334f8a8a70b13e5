//! Firmware bundles (named documents) and the fleet's firmware rollout (one row, written
//! with a generation check, alone or in the transaction of the node write it goes with).

use sqlx::Row;

use super::events::insert_events;
use super::named_docs::NamedDocs;
use super::nodes::write_node;
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

/// The rollout's one row.
const ROLLOUT_ID: i64 = 1;

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
    read_rollout(&mut connection).await
}

async fn read_rollout(tx: &mut sqlx::AnyConnection) -> Result<FirmwareRollout, StoreError> {
    let row = sqlx::query("SELECT generation, doc FROM firmware_rollout WHERE id = $1")
        .bind(ROLLOUT_ID)
        .fetch_optional(&mut *tx)
        .await
        .map_err(backend_error)?;
    let Some(row) = row else {
        return Ok(FirmwareRollout::default());
    };
    let doc: String = row.try_get("doc").map_err(backend_error)?;
    let mut rollout: FirmwareRollout =
        serde_json::from_str(&doc).map_err(|e| corrupt("firmware rollout document", e))?;
    rollout.generation = row.try_get("generation").map_err(backend_error)?;
    Ok(rollout)
}

/// Writes `rollout` inside `tx` if the stored one is still at its generation; returns it
/// at the new generation.
pub(super) async fn write_rollout(
    tx: &mut sqlx::AnyConnection,
    rollout: &FirmwareRollout,
    at_ms: i64,
) -> Result<FirmwareRollout, StoreError> {
    let mut stored = rollout.clone();
    stored.generation = rollout.generation + 1;
    let doc =
        serde_json::to_string(&stored).map_err(|e| corrupt("firmware rollout document", e))?;
    let conflict = |found: i64| StoreError::Conflict {
        what: "firmware rollout".into(),
        detail: format!(
            "changed concurrently (expected generation {}, found {found})",
            rollout.generation
        ),
    };
    if rollout.generation == 0 {
        // The first write: the primary key decides between two first writers.
        let inserted = sqlx::query(
            "INSERT INTO firmware_rollout (id, generation, doc, updated_at_ms) VALUES ($1, $2, $3, $4)",
        )
        .bind(ROLLOUT_ID)
        .bind(stored.generation)
        .bind(doc)
        .bind(at_ms)
        .execute(&mut *tx)
        .await;
        return match inserted {
            Err(error) if is_unique_violation(&error) => Err(conflict(-1)),
            Err(error) => Err(backend_error(error)),
            Ok(_) => Ok(stored),
        };
    }
    let rows = sqlx::query(
        "UPDATE firmware_rollout SET generation = $1, doc = $2, updated_at_ms = $3 \
         WHERE id = $4 AND generation = $5",
    )
    .bind(stored.generation)
    .bind(doc)
    .bind(at_ms)
    .bind(ROLLOUT_ID)
    .bind(rollout.generation)
    .execute(&mut *tx)
    .await
    .map_err(backend_error)?
    .rows_affected();
    if rows == 0 {
        let found = read_rollout(tx).await?.generation;
        return Err(conflict(found));
    }
    Ok(stored)
}

pub(super) async fn rollout_put(
    store: &SqlStore,
    rollout: &FirmwareRollout,
    events: &[NewEvent],
) -> Result<FirmwareRollout, StoreError> {
    let at_ms = events.first().map_or(0, |event| event.at_ms);
    let mut tx = store.pool.begin().await.map_err(backend_error)?;
    let stored = write_rollout(&mut tx, rollout, at_ms).await?;
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
    write_rollout(&mut tx, rollout, node.updated_at_ms).await?;
    insert_events(&mut tx, events).await?;
    tx.commit().await.map_err(backend_error)?;
    Ok(updated)
}
