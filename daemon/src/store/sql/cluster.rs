//! Several daemons on one database: the controller's lease (`leader_lease`, one row, on
//! the database's clock), the fencing check saga writes make against it, and the replicas
//! that reported in.

use sqlx::any::AnyRow;
use sqlx::{Any, Row, Transaction};

use super::{backend_error, is_unique_violation, Backend, SqlStore};
use crate::core::cluster::{claim, ClusterStatus, Lease, Replica};
use crate::core::model::TimestampMs;
use crate::store::StoreError;

/// The lease row's key: one lease, the controller's.
const LEASE: &str = "controller";

/// The database's clock in milliseconds since the epoch, as SQL: leases expire on it, so
/// replicas whose clocks disagree still agree on who holds the lease.
fn db_now_sql(backend: Backend) -> &'static str {
    match backend {
        Backend::Postgres => "CAST(EXTRACT(EPOCH FROM clock_timestamp()) * 1000 AS BIGINT)",
        Backend::Sqlite => "CAST((julianday('now') - 2440587.5) * 86400000.0 AS INTEGER)",
    }
}

/// A row lock (`FOR UPDATE`, `FOR SHARE`) where the backend has them; SQLite serializes
/// writers anyway.
fn lock_clause(backend: Backend, mode: Option<&str>) -> String {
    match (backend, mode) {
        (Backend::Postgres, Some(mode)) => format!(" FOR {mode}"),
        _ => String::new(),
    }
}

async fn db_now(
    backend: Backend,
    tx: &mut Transaction<'_, Any>,
) -> Result<TimestampMs, StoreError> {
    sqlx::query(&format!("SELECT {} AS now_ms", db_now_sql(backend)))
        .fetch_one(&mut **tx)
        .await
        .map_err(backend_error)?
        .try_get("now_ms")
        .map_err(backend_error)
}

struct LeaseRow {
    holder: String,
    epoch: i64,
    acquired_at_ms: i64,
    expires_at_ms: i64,
    controller_memory: Option<String>,
}

impl LeaseRow {
    fn at(self, db_now_ms: TimestampMs) -> Lease {
        Lease {
            holder: self.holder,
            epoch: self.epoch,
            acquired_at_ms: self.acquired_at_ms,
            expires_at_ms: self.expires_at_ms,
            db_now_ms,
            controller_memory: self.controller_memory,
        }
    }
}

fn lease_row(row: &AnyRow) -> Result<LeaseRow, StoreError> {
    Ok(LeaseRow {
        holder: row.try_get("holder").map_err(backend_error)?,
        epoch: row.try_get("epoch").map_err(backend_error)?,
        acquired_at_ms: row.try_get("acquired_at_ms").map_err(backend_error)?,
        expires_at_ms: row.try_get("expires_at_ms").map_err(backend_error)?,
        controller_memory: row.try_get("controller_memory").map_err(backend_error)?,
    })
}

async fn read_lease(
    backend: Backend,
    tx: &mut Transaction<'_, Any>,
    lock: Option<&str>,
) -> Result<Option<LeaseRow>, StoreError> {
    sqlx::query(&format!(
        "SELECT holder, epoch, acquired_at_ms, expires_at_ms, controller_memory \
         FROM leader_lease WHERE name = $1{}",
        lock_clause(backend, lock)
    ))
    .bind(LEASE)
    .fetch_optional(&mut **tx)
    .await
    .map_err(backend_error)?
    .as_ref()
    .map(lease_row)
    .transpose()
}

pub(super) async fn acquire(
    store: &SqlStore,
    holder: &str,
    ttl_ms: i64,
    memory: Option<&str>,
) -> Result<Lease, StoreError> {
    // Two replicas inserting the first row at once: the loser reads the winner's.
    for _ in 0..2 {
        let mut tx = store.pool.begin().await.map_err(backend_error)?;
        let now = db_now(store.backend, &mut tx).await?;
        let current = read_lease(store.backend, &mut tx, Some("UPDATE"))
            .await?
            .map(|row| row.at(now));
        let Some(next) = claim(current.as_ref(), holder, ttl_ms, now, memory) else {
            tx.commit().await.map_err(backend_error)?;
            return Ok(current.expect("claim refuses only a held lease"));
        };
        let written = if current.is_none() {
            sqlx::query(
                "INSERT INTO leader_lease (holder, epoch, acquired_at_ms, expires_at_ms, \
                 controller_memory, name) VALUES ($1, $2, $3, $4, $5, $6)",
            )
        } else {
            sqlx::query(
                "UPDATE leader_lease SET holder = $1, epoch = $2, acquired_at_ms = $3, \
                 expires_at_ms = $4, controller_memory = $5 WHERE name = $6",
            )
        }
        .bind(&next.holder)
        .bind(next.epoch)
        .bind(next.acquired_at_ms)
        .bind(next.expires_at_ms)
        .bind(next.controller_memory.clone())
        .bind(LEASE)
        .execute(&mut *tx)
        .await;
        match written {
            Err(error) if is_unique_violation(&error) => continue,
            other => other.map_err(backend_error)?,
        };
        tx.commit().await.map_err(backend_error)?;
        return Ok(next);
    }
    Err(StoreError::Conflict {
        what: "controller lease".into(),
        detail: "its first row was inserted concurrently and could not be read back".into(),
    })
}

pub(super) async fn release(store: &SqlStore, holder: &str, epoch: i64) -> Result<(), StoreError> {
    sqlx::query(&format!(
        "UPDATE leader_lease SET expires_at_ms = {} WHERE name = $1 AND holder = $2 AND epoch = $3",
        db_now_sql(store.backend)
    ))
    .bind(LEASE)
    .bind(holder)
    .bind(epoch)
    .execute(&store.pool)
    .await
    .map_err(backend_error)?;
    Ok(())
}

/// The fencing check, inside a saga write's transaction: the lease must still be at
/// `epoch`. On PostgreSQL the row is share-locked until the write commits, so a takeover
/// (which updates the row) is ordered entirely before or after this write.
pub(super) async fn check_fence(
    backend: Backend,
    tx: &mut Transaction<'_, Any>,
    epoch: i64,
) -> Result<(), StoreError> {
    let current = read_lease(backend, tx, Some("SHARE"))
        .await?
        .map(|row| row.epoch);
    if current == Some(epoch) {
        Ok(())
    } else {
        Err(StoreError::Fenced {
            written: epoch,
            current,
        })
    }
}

pub(super) async fn replica_report(store: &SqlStore, replica: &Replica) -> Result<(), StoreError> {
    sqlx::query(&format!(
        "INSERT INTO replicas (name, address, version, started_at_ms, last_seen_at_ms) \
         VALUES ($1, $2, $3, $4, {now}) \
         ON CONFLICT (name) DO UPDATE SET address = $2, version = $3, started_at_ms = $4, \
         last_seen_at_ms = {now}",
        now = db_now_sql(store.backend)
    ))
    .bind(&replica.name)
    .bind(&replica.address)
    .bind(&replica.version)
    .bind(replica.started_at_ms)
    .execute(&store.pool)
    .await
    .map_err(backend_error)?;
    Ok(())
}

/// Replicas shown, at most (the most recently seen).
const REPLICAS_SHOWN_MAX: usize = 100;

pub(super) async fn read(store: &SqlStore) -> Result<ClusterStatus, StoreError> {
    let mut tx = store.pool.begin().await.map_err(backend_error)?;
    let now = db_now(store.backend, &mut tx).await?;
    let lease = read_lease(store.backend, &mut tx, None).await?;
    let rows = sqlx::query(&format!(
        "SELECT name, address, version, started_at_ms, last_seen_at_ms FROM replicas \
         ORDER BY last_seen_at_ms DESC, name LIMIT {REPLICAS_SHOWN_MAX}"
    ))
    .fetch_all(&mut *tx)
    .await
    .map_err(backend_error)?;
    tx.commit().await.map_err(backend_error)?;
    let replicas = rows
        .iter()
        .map(|row| {
            Ok(Replica {
                name: row.try_get("name").map_err(backend_error)?,
                address: row.try_get("address").map_err(backend_error)?,
                version: row.try_get("version").map_err(backend_error)?,
                started_at_ms: row.try_get("started_at_ms").map_err(backend_error)?,
                last_seen_at_ms: row.try_get("last_seen_at_ms").map_err(backend_error)?,
            })
        })
        .collect::<Result<Vec<_>, StoreError>>()?;
    Ok(ClusterStatus {
        enabled: false,
        db_now_ms: now,
        lease: lease.map(|row| row.at(now)),
        replicas,
    })
}
