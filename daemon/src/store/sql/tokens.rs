//! API tokens, stored as the sha256 of their secret.

use sqlx::any::AnyRow;
use sqlx::Row;

use super::events::insert_events;
use super::{backend_error, corrupt, is_unique_violation, SqlStore};
use crate::core::model::{ApiToken, NewEvent, TimestampMs, TokenRole};
use crate::store::StoreError;

/// What [`token_from_row`] reads.
const TOKEN_COLUMNS: &str =
    "id, name, role, secret_sha256, created_at_ms, expires_at_ms, last_used_at_ms";

fn token_from_row(row: &AnyRow) -> Result<ApiToken, StoreError> {
    let role: String = row.try_get("role").map_err(backend_error)?;
    Ok(ApiToken {
        id: row.try_get("id").map_err(backend_error)?,
        name: row.try_get("name").map_err(backend_error)?,
        role: TokenRole::parse(&role).ok_or_else(|| corrupt("token role", &role))?,
        secret_sha256: row.try_get("secret_sha256").map_err(backend_error)?,
        created_at_ms: row.try_get("created_at_ms").map_err(backend_error)?,
        expires_at_ms: row.try_get("expires_at_ms").map_err(backend_error)?,
        last_used_at_ms: row.try_get("last_used_at_ms").map_err(backend_error)?,
    })
}

pub(super) async fn create(
    store: &SqlStore,
    name: &str,
    role: TokenRole,
    secret_sha256: &str,
    at_ms: TimestampMs,
    expires_at_ms: Option<TimestampMs>,
    events: &[NewEvent],
) -> Result<ApiToken, StoreError> {
    let mut tx = store.pool.begin().await.map_err(backend_error)?;
    let result = sqlx::query(
        "INSERT INTO api_tokens (name, role, secret_sha256, created_at_ms, expires_at_ms) \
         VALUES ($1, $2, $3, $4, $5)",
    )
    .bind(name)
    .bind(role.as_str())
    .bind(secret_sha256)
    .bind(at_ms)
    .bind(expires_at_ms)
    .execute(&mut *tx)
    .await;
    match result {
        Err(error) if is_unique_violation(&error) => {
            return Err(StoreError::AlreadyExists {
                what: format!("token {name}"),
            })
        }
        other => other.map_err(backend_error)?,
    };
    let row = sqlx::query(&format!(
        "SELECT {TOKEN_COLUMNS} FROM api_tokens WHERE name = $1"
    ))
    .bind(name)
    .fetch_one(&mut *tx)
    .await
    .map_err(backend_error)?;
    let token = token_from_row(&row)?;
    insert_events(&mut tx, events).await?;
    tx.commit().await.map_err(backend_error)?;
    Ok(token)
}

pub(super) async fn find(
    store: &SqlStore,
    secret_sha256: &str,
) -> Result<Option<ApiToken>, StoreError> {
    let row = sqlx::query(&format!(
        "SELECT {TOKEN_COLUMNS} FROM api_tokens WHERE secret_sha256 = $1"
    ))
    .bind(secret_sha256)
    .fetch_optional(&store.pool)
    .await
    .map_err(backend_error)?;
    row.as_ref().map(token_from_row).transpose()
}

/// One conditional UPDATE, so concurrent requests and replicas write it once per interval.
pub(super) async fn record_use(
    store: &SqlStore,
    id: i64,
    at_ms: TimestampMs,
    interval_ms: TimestampMs,
) -> Result<bool, StoreError> {
    let written = sqlx::query(
        "UPDATE api_tokens SET last_used_at_ms = $2 \
         WHERE id = $1 AND (last_used_at_ms IS NULL OR last_used_at_ms <= $3)",
    )
    .bind(id)
    .bind(at_ms)
    .bind(at_ms - interval_ms)
    .execute(&store.pool)
    .await
    .map_err(backend_error)?
    .rows_affected();
    Ok(written > 0)
}

pub(super) async fn list(store: &SqlStore) -> Result<Vec<ApiToken>, StoreError> {
    let rows = sqlx::query(&format!(
        "SELECT {TOKEN_COLUMNS} FROM api_tokens ORDER BY name"
    ))
    .fetch_all(&store.pool)
    .await
    .map_err(backend_error)?;
    rows.iter().map(token_from_row).collect()
}

pub(super) async fn delete(
    store: &SqlStore,
    name: &str,
    events: &[NewEvent],
) -> Result<(), StoreError> {
    let mut tx = store.pool.begin().await.map_err(backend_error)?;
    let deleted = sqlx::query("DELETE FROM api_tokens WHERE name = $1")
        .bind(name)
        .execute(&mut *tx)
        .await
        .map_err(backend_error)?
        .rows_affected();
    if deleted == 0 {
        return Err(StoreError::not_found(format!("token {name}")));
    }
    insert_events(&mut tx, events).await?;
    tx.commit().await.map_err(backend_error)
}
