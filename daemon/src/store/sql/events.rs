//! The audit trail: appended inside other writes' transactions, listed newest first.

use bearman_proto::uuid::NodeUuid;
use sqlx::any::AnyRow;
use sqlx::Row;

use super::{backend_error, corrupt, SqlStore};
use crate::core::model::{Action, Event, EventFilter, NewEvent};
use crate::store::{clamp_limit, StoreError};

/// What [`event_from_row`] reads.
const EVENT_COLUMNS: &str = "id, at_ms, node_uuid, actor, action, from_state, to_state, reason";

fn event_from_row(row: &AnyRow) -> Result<Event, StoreError> {
    let uuid: Option<String> = row.try_get("node_uuid").map_err(backend_error)?;
    Ok(Event {
        id: row.try_get("id").map_err(backend_error)?,
        at_ms: row.try_get("at_ms").map_err(backend_error)?,
        node_uuid: uuid
            .map(|u| NodeUuid::parse(&u).map_err(|e| corrupt("event uuid", e)))
            .transpose()?,
        actor: row.try_get("actor").map_err(backend_error)?,
        action: {
            let action: String = row.try_get("action").map_err(backend_error)?;
            Action::parse(&action).ok_or_else(|| {
                StoreError::Corrupt(format!("event with unknown action {action:?}"))
            })?
        },
        from_state: row.try_get("from_state").map_err(backend_error)?,
        to_state: row.try_get("to_state").map_err(backend_error)?,
        reason: row.try_get("reason").map_err(backend_error)?,
    })
}

pub(super) async fn insert_events(
    connection: &mut sqlx::AnyConnection,
    events: &[NewEvent],
) -> Result<(), StoreError> {
    for event in events {
        sqlx::query(
            "INSERT INTO events (at_ms, node_uuid, actor, action, from_state, to_state, reason) \
             VALUES ($1, $2, $3, $4, $5, $6, $7)",
        )
        .bind(event.at_ms)
        .bind(event.node_uuid.as_ref().map(|u| u.to_string()))
        .bind(&event.actor)
        .bind(event.action.as_str())
        .bind(event.from_state.map(|s| s.as_str().to_string()))
        .bind(event.to_state.map(|s| s.as_str().to_string()))
        .bind(&event.reason)
        .execute(&mut *connection)
        .await
        .map_err(backend_error)?;
    }
    Ok(())
}

pub(super) async fn append(store: &SqlStore, events: &[NewEvent]) -> Result<(), StoreError> {
    let mut tx = store.pool.begin().await.map_err(backend_error)?;
    insert_events(&mut tx, events).await?;
    tx.commit().await.map_err(backend_error)
}

pub(super) async fn list(store: &SqlStore, filter: &EventFilter) -> Result<Vec<Event>, StoreError> {
    // With `after_id`, the oldest events above it (then reversed to newest first).
    let order = if filter.after_id.is_some() {
        "ASC"
    } else {
        "DESC"
    };
    let rows = sqlx::query(&format!(
        "SELECT {EVENT_COLUMNS} FROM events WHERE ($1 = '' OR node_uuid = $1) AND id < $2 AND id > $3 ORDER BY id {order} LIMIT {}",
        clamp_limit(filter.limit)
    ))
    .bind(
        filter
            .node_uuid
            .as_ref()
            .map(|u| u.to_string())
            .unwrap_or_default(),
    )
    .bind(filter.before_id.unwrap_or(i64::MAX))
    .bind(filter.after_id.unwrap_or(i64::MIN))
    .fetch_all(&store.pool)
    .await
    .map_err(backend_error)?;
    let mut events = rows
        .iter()
        .map(event_from_row)
        .collect::<Result<Vec<_>, _>>()?;
    if filter.after_id.is_some() {
        events.reverse();
    }
    Ok(events)
}
