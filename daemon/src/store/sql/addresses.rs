//! IP allocations: allocate (inside a caller's transaction or its own), list, release, and
//! the orphan report.

use std::collections::BTreeSet;

use bearman_proto::uuid::NodeUuid;
use sqlx::any::AnyRow;
use sqlx::Row;

use super::{backend_error, corrupt, is_unique_violation, Backend, SqlStore, CONFLICT_RETRIES_MAX};
use super::{nodes, pools};
use crate::core::ipam::{self, validate_pool};
use crate::core::model::{IpAllocation, PoolPurpose, TimestampMs};
use crate::store::{
    check_pool_purpose, orphans_of, AddressRequest, HeldAddress, OrphanAllocation, StoreError,
};

/// What [`allocation_from_row`] reads.
pub(super) const ALLOCATION_COLUMNS: &str = "pool, address, node_uuid, purpose, allocated_at_ms";

pub(super) fn allocation_from_row(row: &AnyRow) -> Result<IpAllocation, StoreError> {
    let uuid: String = row.try_get("node_uuid").map_err(backend_error)?;
    let purpose: String = row.try_get("purpose").map_err(backend_error)?;
    Ok(IpAllocation {
        pool: row.try_get("pool").map_err(backend_error)?,
        address: row.try_get("address").map_err(backend_error)?,
        node_uuid: NodeUuid::parse(&uuid).map_err(|e| corrupt("allocation uuid", e))?,
        purpose: PoolPurpose::parse(&purpose)
            .ok_or_else(|| corrupt("allocation purpose", &purpose))?,
        allocated_at_ms: row.try_get("allocated_at_ms").map_err(backend_error)?,
    })
}

pub(super) async fn allocate(
    store: &SqlStore,
    pool_name: &str,
    node_uuid: &NodeUuid,
    purpose: PoolPurpose,
    at_ms: TimestampMs,
) -> Result<IpAllocation, StoreError> {
    let request = AddressRequest {
        pool: pool_name.to_string(),
        purpose,
    };
    for attempt in 0..CONFLICT_RETRIES_MAX {
        let mut tx = store.pool.begin().await.map_err(backend_error)?;
        let gap_scan = attempt > 0;
        match allocate_in(store, &mut tx, &request, node_uuid, at_ms, gap_scan).await? {
            Some(held) => {
                tx.commit().await.map_err(backend_error)?;
                return Ok(held.allocation);
            }
            // Lost a race for the address (or for this node's slot): the transaction
            // is aborted (PostgreSQL); dropping it rolls back. Look again.
            None => continue,
        }
    }
    Err(StoreError::Backend(format!(
        "could not allocate from ip pool {pool_name}: {CONFLICT_RETRIES_MAX} attempts lost races"
    )))
}

pub(super) async fn list(
    store: &SqlStore,
    pool: Option<&str>,
    node_uuid: Option<&NodeUuid>,
) -> Result<Vec<IpAllocation>, StoreError> {
    let rows = sqlx::query(&format!(
        "SELECT {ALLOCATION_COLUMNS} FROM ip_allocations \
         WHERE ($1 = '' OR pool = $1) AND ($2 = '' OR node_uuid = $2) \
         ORDER BY address_num, pool",
    ))
    .bind(pool.unwrap_or(""))
    .bind(node_uuid.map(|u| u.to_string()).unwrap_or_default())
    .fetch_all(&store.pool)
    .await
    .map_err(backend_error)?;
    rows.iter().map(allocation_from_row).collect()
}

pub(super) async fn release_node(
    store: &SqlStore,
    node_uuid: &NodeUuid,
) -> Result<usize, StoreError> {
    let released = sqlx::query("DELETE FROM ip_allocations WHERE node_uuid = $1")
        .bind(node_uuid.as_str())
        .execute(&store.pool)
        .await
        .map_err(backend_error)?
        .rows_affected();
    Ok(released as usize)
}

pub(super) async fn orphans(store: &SqlStore) -> Result<Vec<OrphanAllocation>, StoreError> {
    // One statement, so the allocations and the records are read at one moment.
    let rows = sqlx::query(
        "SELECT a.pool AS pool, a.address AS address, a.node_uuid AS node_uuid, \
         a.purpose AS purpose, a.allocated_at_ms AS allocated_at_ms, \
         n.doc AS doc, n.generation AS generation, \
         n.last_heartbeat_at_ms AS last_heartbeat_at_ms \
         FROM ip_allocations a LEFT JOIN nodes n ON n.uuid = a.node_uuid \
         ORDER BY a.address_num, a.pool",
    )
    .fetch_all(&store.pool)
    .await
    .map_err(backend_error)?;
    let mut pairs = Vec::with_capacity(rows.len());
    for row in &rows {
        let allocation = allocation_from_row(row)?;
        let doc: Option<String> = row.try_get("doc").map_err(backend_error)?;
        let node = match doc {
            Some(_) => Some(nodes::node_from_row(row)?),
            None => None,
        };
        pairs.push((allocation, node));
    }
    Ok(orphans_of(pairs.iter().map(|(allocation, node)| {
        (allocation.clone(), node.as_ref())
    })))
}

/// Gives `node_uuid` its `request.purpose` address inside `tx`, or the one it already
/// holds for that purpose. `None` when a unique constraint said someone else won a
/// race (the transaction is then aborted on PostgreSQL and must be dropped).
pub(super) async fn allocate_in(
    store: &SqlStore,
    tx: &mut sqlx::AnyConnection,
    request: &AddressRequest,
    node_uuid: &NodeUuid,
    at_ms: TimestampMs,
    gap_scan: bool,
) -> Result<Option<HeldAddress>, StoreError> {
    // PostgreSQL: lock the pool row first, so allocations from one pool queue up
    // instead of racing for the same address, and so the slot check below sees what
    // the previous holder of the lock committed (SQLite's single connection
    // serializes them anyway).
    let lock_clause = match store.backend {
        Backend::Postgres => " FOR UPDATE",
        Backend::Sqlite => "",
    };
    let pool = pools::read_pool(tx, &request.pool, lock_clause).await?;
    let existing = sqlx::query(&format!(
        "SELECT {ALLOCATION_COLUMNS} FROM ip_allocations WHERE node_uuid = $1 AND purpose = $2",
    ))
    .bind(node_uuid.as_str())
    .bind(request.purpose.as_str())
    .fetch_optional(&mut *tx)
    .await
    .map_err(backend_error)?;
    if let Some(row) = existing {
        let allocation = allocation_from_row(&row)?;
        // The node keeps what it holds, even from another pool than today's choice.
        let pool = if allocation.pool == pool.name {
            pool
        } else {
            pools::read_pool(tx, &allocation.pool, "").await?
        };
        return Ok(Some(HeldAddress { pool, allocation }));
    }
    check_pool_purpose(&pool, request.purpose)?;
    let range = validate_pool(&pool).map_err(|error| StoreError::InvalidPool {
        pool: pool.name.clone(),
        detail: error.to_string(),
    })?;
    let highest: Option<i64> =
        sqlx::query("SELECT MAX(address_num) AS highest FROM ip_allocations WHERE pool = $1")
            .bind(&pool.name)
            .fetch_one(&mut *tx)
            .await
            .and_then(|row| row.try_get("highest"))
            .map_err(backend_error)?;
    let mut candidate = if gap_scan {
        None
    } else {
        range.next_after_highest(highest.map(|h| h as u32))
    };
    if candidate.is_none() {
        // The top of the range is used up: reuse an address a retired node released.
        let rows = sqlx::query(
            "SELECT address_num FROM ip_allocations WHERE address_num >= $1 AND address_num <= $2",
        )
        .bind(range.start as i64)
        .bind(range.end as i64)
        .fetch_all(&mut *tx)
        .await
        .map_err(backend_error)?;
        let used: BTreeSet<u32> = rows
            .iter()
            .map(|row| row.try_get::<i64, _>("address_num").map(|a| a as u32))
            .collect::<Result<_, _>>()
            .map_err(backend_error)?;
        candidate = range.first_gap(&used);
    }
    let address = candidate.ok_or_else(|| StoreError::PoolExhausted {
        pool: pool.name.clone(),
    })?;
    let allocation = IpAllocation {
        pool: pool.name.clone(),
        address: ipam::address_to_string(address),
        node_uuid: node_uuid.clone(),
        purpose: request.purpose,
        allocated_at_ms: at_ms,
    };
    let inserted = sqlx::query(
        "INSERT INTO ip_allocations (pool, address, address_num, node_uuid, purpose, allocated_at_ms) \
         VALUES ($1, $2, $3, $4, $5, $6)",
    )
    .bind(&pool.name)
    .bind(&allocation.address)
    .bind(address as i64)
    .bind(node_uuid.as_str())
    .bind(request.purpose.as_str())
    .bind(at_ms)
    .execute(&mut *tx)
    .await;
    match inserted {
        Err(error) if is_unique_violation(&error) => Ok(None),
        Err(error) => Err(backend_error(error)),
        Ok(_) => Ok(Some(HeldAddress { pool, allocation })),
    }
}
