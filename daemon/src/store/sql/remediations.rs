//! Remediation sagas: one active per node, optimistic on their generation.

use bearman_proto::uuid::NodeUuid;
use sqlx::any::AnyRow;
use sqlx::Row;

use super::cluster::check_fence;
use super::{backend_error, corrupt, is_unique_violation, SqlStore};
use super::{events::insert_events, nodes};
use crate::core::model::{NewEvent, Node};
use crate::core::remediation::Remediation;
use crate::store::{clamp_limit, StoreError};

fn remediation_doc(remediation: &Remediation) -> Result<String, StoreError> {
    serde_json::to_string(remediation).map_err(|e| corrupt("remediation document", e))
}

/// What [`remediation_from_row`] reads.
const REMEDIATION_COLUMNS: &str = "id, generation, doc";

fn remediation_from_row(row: &AnyRow) -> Result<Remediation, StoreError> {
    let doc: String = row.try_get("doc").map_err(backend_error)?;
    let mut remediation: Remediation =
        serde_json::from_str(&doc).map_err(|e| corrupt("remediation document", e))?;
    remediation.id = row.try_get("id").map_err(backend_error)?;
    remediation.generation = row.try_get("generation").map_err(backend_error)?;
    Ok(remediation)
}

pub(super) async fn create(
    store: &SqlStore,
    remediation: &Remediation,
    events: &[NewEvent],
    fence: Option<i64>,
) -> Result<Remediation, StoreError> {
    let mut tx = store.pool.begin().await.map_err(backend_error)?;
    if let Some(epoch) = fence {
        check_fence(store.backend, &mut tx, epoch).await?;
    }
    let inserted = sqlx::query(
        "INSERT INTO remediations (node_uuid, status, generation, created_at_ms, doc) \
         VALUES ($1, $2, $3, $4, $5) RETURNING id",
    )
    .bind(remediation.node_uuid.as_str())
    .bind(remediation.status.as_str())
    .bind(remediation.generation)
    .bind(remediation.created_at_ms)
    .bind(remediation_doc(remediation)?)
    .fetch_one(&mut *tx)
    .await;
    let row = match inserted {
        Err(error) if is_unique_violation(&error) => {
            return Err(StoreError::AlreadyExists {
                what: format!("active remediation of node {}", remediation.node_uuid),
            })
        }
        other => other.map_err(backend_error)?,
    };
    let mut created = remediation.clone();
    created.id = row.try_get("id").map_err(backend_error)?;
    insert_events(&mut tx, events).await?;
    tx.commit().await.map_err(backend_error)?;
    Ok(created)
}

pub(super) async fn update(
    store: &SqlStore,
    remediation: &Remediation,
    node: Option<&Node>,
    events: &[NewEvent],
    fence: Option<i64>,
) -> Result<(Remediation, Option<Node>), StoreError> {
    let mut updated = remediation.clone();
    updated.generation += 1;
    let mut tx = store.pool.begin().await.map_err(backend_error)?;
    if let Some(epoch) = fence {
        check_fence(store.backend, &mut tx, epoch).await?;
    }
    let rows = sqlx::query(
        "UPDATE remediations SET status = $1, generation = $2, doc = $3 \
         WHERE id = $4 AND generation = $5",
    )
    .bind(updated.status.as_str())
    .bind(updated.generation)
    .bind(remediation_doc(&updated)?)
    .bind(remediation.id)
    .bind(remediation.generation)
    .execute(&mut *tx)
    .await
    .map_err(backend_error)?
    .rows_affected();
    if rows == 0 {
        let found = sqlx::query("SELECT generation FROM remediations WHERE id = $1")
            .bind(remediation.id)
            .fetch_optional(&mut *tx)
            .await
            .map_err(backend_error)?;
        return Err(match found {
            None => StoreError::not_found(format!("remediation {}", remediation.id)),
            Some(row) => StoreError::Conflict {
                what: format!("remediation {}", remediation.id),
                detail: format!(
                    "modified concurrently (expected generation {}, found {})",
                    remediation.generation,
                    row.try_get::<i64, _>("generation").map_err(backend_error)?
                ),
            },
        });
    }
    let node = match node {
        Some(node) => Some(nodes::write_node(store.backend, &mut tx, node).await?),
        None => None,
    };
    insert_events(&mut tx, events).await?;
    tx.commit().await.map_err(backend_error)?;
    Ok((updated, node))
}

pub(super) async fn get(store: &SqlStore, id: i64) -> Result<Option<Remediation>, StoreError> {
    let row = sqlx::query(&format!(
        "SELECT {REMEDIATION_COLUMNS} FROM remediations WHERE id = $1"
    ))
    .bind(id)
    .fetch_optional(&store.pool)
    .await
    .map_err(backend_error)?;
    row.as_ref().map(remediation_from_row).transpose()
}

pub(super) async fn list(
    store: &SqlStore,
    active_only: bool,
    node_uuid: Option<&NodeUuid>,
    limit: usize,
) -> Result<Vec<Remediation>, StoreError> {
    let rows = sqlx::query(&format!(
        "SELECT {REMEDIATION_COLUMNS} FROM remediations \
         WHERE ($1 = '' OR status = $1) AND ($2 = '' OR node_uuid = $2) \
         ORDER BY id DESC LIMIT {}",
        clamp_limit(limit)
    ))
    .bind(if active_only { "active" } else { "" })
    .bind(node_uuid.map(|u| u.to_string()).unwrap_or_default())
    .fetch_all(&store.pool)
    .await
    .map_err(backend_error)?;
    rows.iter().map(remediation_from_row).collect()
}
