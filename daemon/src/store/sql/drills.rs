//! Chaos drills: the board (the drill running now and the kill switch, one
//! generation-checked row) and the history of finished drills, each filed in the same
//! transaction as the board write that ends it.

use sqlx::Row;

use super::events::insert_events;
use super::singleton_doc::SingletonDoc;
use super::{backend_error, corrupt, SqlStore};
use crate::core::drill::{Drill, DrillBoard};
use crate::core::model::NewEvent;
use crate::store::StoreError;

const BOARD: SingletonDoc = SingletonDoc {
    table: "drill_board",
    what: "drill board",
};

pub(super) async fn board_get(store: &SqlStore) -> Result<DrillBoard, StoreError> {
    let mut connection = store.pool.acquire().await.map_err(backend_error)?;
    BOARD.read(&mut connection).await
}

pub(super) async fn board_put(
    store: &SqlStore,
    board: &DrillBoard,
    finished: Option<&Drill>,
    events: &[NewEvent],
) -> Result<DrillBoard, StoreError> {
    let at_ms = events.first().map_or(0, |event| event.at_ms);
    let mut tx = store.pool.begin().await.map_err(backend_error)?;
    let stored = BOARD.write(&mut tx, board, at_ms).await?;
    if let Some(drill) = finished {
        let doc = serde_json::to_string(drill).map_err(|e| corrupt("drill document", e))?;
        sqlx::query("INSERT INTO drills (id, name, started_at_ms, doc) VALUES ($1, $2, $3, $4)")
            .bind(drill.id)
            .bind(&drill.spec.name)
            .bind(drill.started_at_ms)
            .bind(doc)
            .execute(&mut *tx)
            .await
            .map_err(backend_error)?;
    }
    insert_events(&mut tx, events).await?;
    tx.commit().await.map_err(backend_error)?;
    Ok(stored)
}

fn decode(row: &sqlx::any::AnyRow) -> Result<Drill, StoreError> {
    let doc: String = row.try_get("doc").map_err(backend_error)?;
    serde_json::from_str(&doc).map_err(|e| corrupt("drill document", e))
}

pub(super) async fn list(store: &SqlStore, limit: usize) -> Result<Vec<Drill>, StoreError> {
    let rows = sqlx::query("SELECT doc FROM drills ORDER BY id DESC LIMIT $1")
        .bind(crate::store::clamp_limit(limit) as i64)
        .fetch_all(&store.pool)
        .await
        .map_err(backend_error)?;
    rows.iter().map(decode).collect()
}

pub(super) async fn get(store: &SqlStore, id: i64) -> Result<Option<Drill>, StoreError> {
    let row = sqlx::query("SELECT doc FROM drills WHERE id = $1")
        .bind(id)
        .fetch_optional(&store.pool)
        .await
        .map_err(backend_error)?;
    row.as_ref().map(decode).transpose()
}
