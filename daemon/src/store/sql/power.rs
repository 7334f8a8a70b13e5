//! Last BMC power readings (`node_power`), and the controller's health list that joins them.

use bearman_proto::uuid::NodeUuid;
use sqlx::any::AnyRow;
use sqlx::Row;

use super::events::insert_events;
use super::{backend_error, corrupt, SqlStore};
use crate::core::model::NewEvent;
use crate::core::power_sync::{PowerReading, PowerReadingState};
use crate::store::StoreError;

/// A power reading from the columns `{prefix}state`, `{prefix}read_at_ms`,
/// `{prefix}error`; `None` when the state is NULL (no reading, or no joined row).
fn power_from_row(row: &AnyRow, prefix: &str) -> Result<Option<PowerReading>, StoreError> {
    let state: Option<String> = row
        .try_get(format!("{prefix}state").as_str())
        .map_err(backend_error)?;
    let Some(state) = state else {
        return Ok(None);
    };
    Ok(Some(PowerReading {
        state: PowerReadingState::parse(&state).ok_or_else(|| corrupt("power state", &state))?,
        read_at_ms: row
            .try_get(format!("{prefix}read_at_ms").as_str())
            .map_err(backend_error)?,
        error: row
            .try_get(format!("{prefix}error").as_str())
            .map_err(backend_error)?,
    }))
}

pub(super) async fn health_list(
    store: &SqlStore,
) -> Result<Vec<crate::core::health::NodeHealth>, StoreError> {
    // Columns only: no document decoding on the controller's every-second path.
    let rows = sqlx::query(
        "SELECT n.uuid AS uuid, n.rack AS rack, n.state AS state, \
         COALESCE(n.last_heartbeat_at_ms, n.updated_at_ms) AS heard, \
         p.state AS power_state, p.read_at_ms AS power_read_at_ms, p.error AS power_error \
         FROM nodes n LEFT JOIN node_power p ON p.node_uuid = n.uuid \
         WHERE n.state = 'ready' OR n.state = 'suspect' ORDER BY n.uuid",
    )
    .fetch_all(&store.pool)
    .await
    .map_err(backend_error)?;
    rows.iter()
        .map(|row| {
            let (uuid, rack, state) = super::nodes::identity_columns(row)?;
            Ok(crate::core::health::NodeHealth {
                uuid,
                rack,
                state,
                last_heard_at_ms: row.try_get("heard").map_err(backend_error)?,
                power: power_from_row(row, "power_")?,
            })
        })
        .collect()
}

pub(super) async fn record(
    store: &SqlStore,
    uuid: &NodeUuid,
    reading: &PowerReading,
    events: &[NewEvent],
) -> Result<bool, StoreError> {
    let mut tx = store.pool.begin().await.map_err(backend_error)?;
    let exists = sqlx::query("SELECT uuid FROM nodes WHERE uuid = $1")
        .bind(uuid.as_str())
        .fetch_optional(&mut *tx)
        .await
        .map_err(backend_error)?;
    if exists.is_none() {
        return Err(StoreError::not_found(format!("node {uuid}")));
    }
    // An older reading never replaces a newer one (a slow poll answering late).
    let written = sqlx::query(
        "INSERT INTO node_power (node_uuid, state, read_at_ms, error) VALUES ($1, $2, $3, $4) \
         ON CONFLICT (node_uuid) DO UPDATE SET state = excluded.state, \
         read_at_ms = excluded.read_at_ms, error = excluded.error \
         WHERE node_power.read_at_ms <= excluded.read_at_ms",
    )
    .bind(uuid.as_str())
    .bind(reading.state.as_str())
    .bind(reading.read_at_ms)
    .bind(reading.error.clone())
    .execute(&mut *tx)
    .await
    .map_err(backend_error)?
    .rows_affected()
        > 0;
    if written {
        insert_events(&mut tx, events).await?;
    }
    tx.commit().await.map_err(backend_error)?;
    Ok(written)
}

pub(super) async fn get(
    store: &SqlStore,
    uuid: &NodeUuid,
) -> Result<Option<PowerReading>, StoreError> {
    let row = sqlx::query("SELECT state, read_at_ms, error FROM node_power WHERE node_uuid = $1")
        .bind(uuid.as_str())
        .fetch_optional(&store.pool)
        .await
        .map_err(backend_error)?;
    match row {
        Some(row) => power_from_row(&row, ""),
        None => Ok(None),
    }
}
