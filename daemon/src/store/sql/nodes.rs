//! Node records: read, list, create, update (optimistic on the generation), heartbeats,
//! and registration (addresses, node and events in one transaction).

use bearman_proto::uuid::NodeUuid;
use sqlx::any::AnyRow;
use sqlx::Row;

use super::notify::{self, CacheChange};
use std::collections::BTreeSet;

use super::{addresses, events::insert_events, pools};
use super::{backend_error, corrupt, is_unique_violation, Backend, SqlStore, CONFLICT_RETRIES_MAX};
use crate::core::lifecycle::LifecycleState;
use crate::core::model::{NewEvent, Node, NodeFilter, StateCounts, TimestampMs};
use crate::store::{
    apply_held, clamp_limit, AddressRequest, HeldAddress, Registered, RegistrationWrite, StoreError,
};

/// What [`node_from_row`] reads: the document, and the columns written apart from it.
pub(super) const NODE_COLUMNS: &str = "doc, generation, last_heartbeat_at_ms";

pub(super) fn node_from_row(row: &AnyRow) -> Result<Node, StoreError> {
    let doc: String = row.try_get("doc").map_err(backend_error)?;
    let mut node: Node = serde_json::from_str(&doc).map_err(|e| corrupt("node document", e))?;
    node.generation = row.try_get("generation").map_err(backend_error)?;
    node.last_heartbeat_at_ms = row.try_get("last_heartbeat_at_ms").map_err(backend_error)?;
    Ok(node)
}

fn node_doc(node: &Node) -> Result<String, StoreError> {
    serde_json::to_string(node).map_err(|e| corrupt("node document", e))
}

/// Writes `node` at its generation + 1 inside `tx` (optimistic concurrency), releasing its
/// addresses when it is retired, and returns it as stored; other replicas' caches hear
/// of it when `tx` commits.
pub(super) async fn write_node(
    backend: Backend,
    tx: &mut sqlx::AnyConnection,
    node: &Node,
) -> Result<Node, StoreError> {
    let mut updated = node.clone();
    updated.generation = node.generation + 1;
    let result = sqlx::query(
        "UPDATE nodes SET hostname = $1, serial = $2, rack = $3, role = $4, state = $5, \
         flavor = $6, generation = $7, updated_at_ms = $8, doc = $9, \
         last_heartbeat_at_ms = CASE WHEN last_heartbeat_at_ms IS NULL OR last_heartbeat_at_ms < $12 \
         THEN $12 ELSE last_heartbeat_at_ms END \
         WHERE uuid = $10 AND generation = $11",
    )
    .bind(&updated.hostname)
    .bind(&updated.serial)
    .bind(updated.rack.clone())
    .bind(updated.role.as_str())
    .bind(updated.state.as_str())
    .bind(updated.flavor.clone())
    .bind(updated.generation)
    .bind(updated.updated_at_ms)
    .bind(node_doc(&updated)?)
    .bind(node.uuid.as_str())
    .bind(node.generation)
    .bind(updated.last_heartbeat_at_ms)
    .execute(&mut *tx)
    .await;
    let rows = match result {
        Err(error) if is_unique_violation(&error) => {
            return Err(StoreError::AlreadyExists {
                what: format!("hostname {}", node.hostname),
            })
        }
        other => other.map_err(backend_error)?.rows_affected(),
    };
    if rows == 0 {
        let found = sqlx::query("SELECT generation FROM nodes WHERE uuid = $1")
            .bind(node.uuid.as_str())
            .fetch_optional(&mut *tx)
            .await
            .map_err(backend_error)?;
        return Err(match found {
            None => StoreError::not_found(format!("node {}", node.uuid)),
            Some(row) => StoreError::GenerationMismatch {
                uuid: node.uuid.clone(),
                expected: node.generation,
                found: row.try_get("generation").map_err(backend_error)?,
            },
        });
    }
    if updated.state == LifecycleState::Retired {
        sqlx::query("DELETE FROM ip_allocations WHERE node_uuid = $1")
            .bind(node.uuid.as_str())
            .execute(&mut *tx)
            .await
            .map_err(backend_error)?;
    }
    let heartbeat = sqlx::query("SELECT last_heartbeat_at_ms FROM nodes WHERE uuid = $1")
        .bind(node.uuid.as_str())
        .fetch_one(&mut *tx)
        .await
        .map_err(backend_error)?;
    updated.last_heartbeat_at_ms = heartbeat
        .try_get("last_heartbeat_at_ms")
        .map_err(backend_error)?;
    notify::send(backend, tx, &CacheChange::Node(node.uuid.clone())).await?;
    Ok(updated)
}

pub(super) async fn get(store: &SqlStore, uuid: &NodeUuid) -> Result<Option<Node>, StoreError> {
    let row = sqlx::query(&format!("SELECT {NODE_COLUMNS} FROM nodes WHERE uuid = $1"))
        .bind(uuid.as_str())
        .fetch_optional(&store.pool)
        .await
        .map_err(backend_error)?;
    row.as_ref().map(node_from_row).transpose()
}

pub(super) async fn list(store: &SqlStore, filter: &NodeFilter) -> Result<Vec<Node>, StoreError> {
    let mut sql = format!("SELECT {NODE_COLUMNS} FROM nodes WHERE 1 = 1");
    let mut params: Vec<String> = Vec::new();
    let mut add = |sql: &mut String, column: &str, op: &str, value: String| {
        params.push(value);
        sql.push_str(&format!(" AND {column} {op} ${}", params.len()));
    };
    if let Some(after) = &filter.after {
        add(&mut sql, "uuid", ">", after.to_string());
    }
    if let Some(state) = filter.state {
        add(&mut sql, "state", "=", state.as_str().to_string());
    }
    if let Some(rack) = &filter.rack {
        add(&mut sql, "rack", "=", rack.clone());
    }
    if let Some(role) = filter.role {
        add(&mut sql, "role", "=", role.as_str().to_string());
    }
    sql.push_str(&format!(
        " ORDER BY uuid LIMIT {}",
        clamp_limit(filter.limit)
    ));
    let mut query = sqlx::query(&sql);
    for param in &params {
        query = query.bind(param.as_str());
    }
    let rows = query.fetch_all(&store.pool).await.map_err(backend_error)?;
    rows.iter().map(node_from_row).collect()
}

/// A `nodes` row's `uuid`, `rack` and `state` columns, decoded: what the controller's
/// lean lists (health, booting) read instead of the document.
pub(super) fn identity_columns(
    row: &AnyRow,
) -> Result<(NodeUuid, Option<String>, LifecycleState), StoreError> {
    let uuid: String = row.try_get("uuid").map_err(backend_error)?;
    let state: String = row.try_get("state").map_err(backend_error)?;
    Ok((
        NodeUuid::parse(&uuid).map_err(|e| corrupt("node uuid", e))?,
        row.try_get("rack").map_err(backend_error)?,
        LifecycleState::parse(&state).ok_or_else(|| corrupt("node state", &state))?,
    ))
}

/// Every booting node (Registered, then Provisioning, each in uuid order: the order of
/// the paged default) as the boot watchdog sees it. It runs every `boot_scan_ms` over
/// the whole boot storm, so it reads the index `nodes_booting` of columns the database
/// derives from each document (`boot`, `bmc_address`: migration 0008), never the
/// documents; and as one JSON array built by the database, not a row per node: sqlx's
/// `Any` driver converts every row's column list (names and all), about 20,000
/// instructions a node, several times what the array costs to build and parse.
/// The `boot` column inside the array: its JSON text as a string (read from the index),
/// or the object itself where the database still knows the value is JSON (SQLite's
/// `json_extract` result computed on the fly). One visitor for both: serde's untagged
/// enum buffered every value and built an error for the variant that did not match,
/// most of the scan's cost.
struct BootColumn(crate::core::model::BootProgress);

impl<'de> serde::Deserialize<'de> for BootColumn {
    fn deserialize<D: serde::Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        struct TextOrObject;
        impl<'de> serde::de::Visitor<'de> for TextOrObject {
            type Value = crate::core::model::BootProgress;

            fn expecting(&self, formatter: &mut std::fmt::Formatter) -> std::fmt::Result {
                formatter.write_str("a boot progress object or its JSON text")
            }

            fn visit_str<E: serde::de::Error>(self, text: &str) -> Result<Self::Value, E> {
                serde_json::from_str(text).map_err(E::custom)
            }

            fn visit_map<A: serde::de::MapAccess<'de>>(
                self,
                map: A,
            ) -> Result<Self::Value, A::Error> {
                serde::Deserialize::deserialize(serde::de::value::MapAccessDeserializer::new(map))
            }
        }
        deserializer.deserialize_any(TextOrObject).map(BootColumn)
    }
}

pub(super) async fn booting_list(
    store: &SqlStore,
) -> Result<Vec<crate::core::controller::BootingNode>, StoreError> {
    use crate::core::lifecycle::LifecycleState as S;
    let aggregate = match store.backend {
        // SQLite's planner would pick `nodes_state` and derive both columns from every
        // document again (three times slower): the index is named.
        Backend::Sqlite => {
            "SELECT json_group_array(json_array(uuid, rack, state, boot, bmc_address)) \
             AS booting FROM nodes INDEXED BY nodes_booting WHERE state = $1 OR state = $2"
        }
        Backend::Postgres => {
            "SELECT COALESCE(json_agg(json_build_array(uuid, rack, state, boot, \
             bmc_address)), '[]')::text AS booting FROM nodes WHERE state = $1 OR state = $2"
        }
    };
    let row = sqlx::query(aggregate)
        .bind(S::Registered.as_str())
        .bind(S::Provisioning.as_str())
        .fetch_one(&store.pool)
        .await
        .map_err(backend_error)?;
    let booting: String = row.try_get("booting").map_err(backend_error)?;
    type BootingRow = (
        String,
        Option<String>,
        String,
        Option<BootColumn>,
        Option<String>,
    );
    let rows: Vec<BootingRow> =
        serde_json::from_str(&booting).map_err(|e| corrupt("booting node list", e))?;
    let mut booting = rows
        .into_iter()
        .map(|(uuid, rack, state, boot, bmc_address)| {
            Ok(crate::core::controller::BootingNode {
                uuid: NodeUuid::parse(&uuid).map_err(|e| corrupt("node uuid", e))?,
                rack,
                state: LifecycleState::parse(&state)
                    .ok_or_else(|| corrupt("node state", &state))?,
                boot: boot.map(|BootColumn(boot)| boot),
                bmc_configured: crate::core::controller::bmc_address_configured(
                    bmc_address.as_deref(),
                ),
            })
        })
        .collect::<Result<Vec<_>, StoreError>>()?;
    booting.sort_unstable_by(|a, b| {
        (a.state != S::Registered, &a.uuid).cmp(&(b.state != S::Registered, &b.uuid))
    });
    Ok(booting)
}

pub(super) async fn count_by_state(store: &SqlStore) -> Result<StateCounts, StoreError> {
    let rows = sqlx::query("SELECT state, COUNT(*) AS n FROM nodes GROUP BY state")
        .fetch_all(&store.pool)
        .await
        .map_err(backend_error)?;
    let mut counts = StateCounts::new();
    for row in rows {
        let state: String = row.try_get("state").map_err(backend_error)?;
        let count: i64 = row.try_get("n").map_err(backend_error)?;
        let state = LifecycleState::parse(&state).ok_or_else(|| corrupt("node state", &state))?;
        counts.insert(state, count as usize);
    }
    Ok(counts)
}

/// Nodes per (state, rack, role): one grouped count, no document decoding.
pub(super) async fn tally(store: &SqlStore) -> Result<Vec<crate::store::NodeTally>, StoreError> {
    let rows = sqlx::query(
        "SELECT state, rack, role, COUNT(*) AS n FROM nodes GROUP BY state, rack, role \
         ORDER BY state, rack, role",
    )
    .fetch_all(&store.pool)
    .await
    .map_err(backend_error)?;
    rows.iter()
        .map(|row| {
            let state: String = row.try_get("state").map_err(backend_error)?;
            let role: String = row.try_get("role").map_err(backend_error)?;
            let count: i64 = row.try_get("n").map_err(backend_error)?;
            Ok(crate::store::NodeTally {
                state: LifecycleState::parse(&state)
                    .ok_or_else(|| corrupt("node state", &state))?,
                rack: row.try_get("rack").map_err(backend_error)?,
                role: crate::core::model::NodeRole::parse(&role)
                    .ok_or_else(|| corrupt("node role", &role))?,
                count: u64::try_from(count).unwrap_or(0),
            })
        })
        .collect()
}

pub(super) async fn create(
    store: &SqlStore,
    node: &Node,
    events: &[NewEvent],
) -> Result<Node, StoreError> {
    let mut tx = store.pool.begin().await.map_err(backend_error)?;
    check_create(&mut tx, node).await?;
    insert_node(store.backend, &mut tx, node).await?;
    insert_events(&mut tx, events).await?;
    tx.commit().await.map_err(backend_error)?;
    Ok(node.clone())
}

pub(super) async fn update(
    store: &SqlStore,
    node: &Node,
    events: &[NewEvent],
) -> Result<Node, StoreError> {
    let mut tx = store.pool.begin().await.map_err(backend_error)?;
    let updated = write_node(store.backend, &mut tx, node).await?;
    insert_events(&mut tx, events).await?;
    tx.commit().await.map_err(backend_error)?;
    Ok(updated)
}

pub(super) async fn register(
    store: &SqlStore,
    write: &RegistrationWrite,
) -> Result<Registered, StoreError> {
    write.check_requests()?;
    for attempt in 0..CONFLICT_RETRIES_MAX {
        // After a lost race, scan for gaps: the fast path's candidate may be held by
        // an overlapping pool for good.
        let gap_scan = attempt > 0;
        if let Some(registered) = try_register(store, write, gap_scan).await? {
            return Ok(registered);
        }
    }
    Err(StoreError::Backend(format!(
        "could not register node {}: {CONFLICT_RETRIES_MAX} attempts lost races for an address",
        write.node.uuid
    )))
}

pub(super) async fn record_heartbeat(
    store: &SqlStore,
    uuid: &NodeUuid,
    at_ms: TimestampMs,
) -> Result<(), StoreError> {
    // Not announced to other replicas' caches (see `notify`): a NOTIFY serialises
    // commits, and this is the write every node makes every few seconds.
    let result = sqlx::query(
        "UPDATE nodes SET last_heartbeat_at_ms = $1 WHERE uuid = $2 \
         AND (last_heartbeat_at_ms IS NULL OR last_heartbeat_at_ms < $1)",
    )
    .bind(at_ms)
    .bind(uuid.as_str())
    .execute(&store.pool)
    .await
    .map_err(backend_error)?;
    if result.rows_affected() == 0 && get(store, uuid).await?.is_none() {
        return Err(StoreError::not_found(format!("node {uuid}")));
    }
    Ok(())
}

/// One attempt at [`crate::store::Store::node_register`] in one transaction; `None` when a unique
/// constraint said someone else won a race for an address and the caller should try
/// again. Every other outcome is final, and a refusal has written nothing.
async fn try_register(
    store: &SqlStore,
    write: &RegistrationWrite,
    gap_scan: bool,
) -> Result<Option<Registered>, StoreError> {
    let mut tx = store.pool.begin().await.map_err(backend_error)?;
    let mut node = write.node.clone();
    // Refuse early what is already decided; the node's own INSERT or UPDATE below
    // decides again, atomically, for whatever changes meanwhile.
    match write.expected_generation {
        None => check_create(&mut tx, &node).await?,
        Some(generation) => {
            node.generation = generation;
            check_generation(&mut tx, &node).await?;
        }
    }
    // Every candidate pool row is locked first, in name order, so two registrations
    // never wait for each other's pools crosswise (a deadlock on PostgreSQL); a pool
    // that is not there refuses the registration before anything is taken.
    let lock_clause = match store.backend {
        Backend::Postgres => " FOR UPDATE",
        Backend::Sqlite => "",
    };
    let names: BTreeSet<&String> = write.addresses.iter().flat_map(|r| &r.pools).collect();
    for name in names {
        pools::read_pool(&mut tx, name, lock_clause).await?;
    }
    let mut held: Vec<Option<HeldAddress>> = vec![None; write.addresses.len()];
    let mut unfilled = Vec::new();
    for (index, request) in write.addresses.iter().enumerate() {
        let mut exhausted = None;
        for pool in &request.pools {
            let one = AddressRequest {
                pool: pool.clone(),
                purpose: request.purpose,
            };
            match addresses::allocate_in(store, &mut tx, &one, &node.uuid, write.at_ms, gap_scan)
                .await
            {
                Ok(Some(address)) => {
                    held[index] = Some(address);
                    break;
                }
                // Lost a race: the transaction is aborted (PostgreSQL); dropping it
                // rolls back, and the caller tries again.
                Ok(None) => return Ok(None),
                // Full: the next pool that fits may have room. Nothing was written.
                Err(error @ StoreError::PoolExhausted { .. }) => exhausted = Some(error),
                Err(error) => return Err(error),
            }
        }
        if held[index].is_none() {
            if request.optional {
                unfilled.push(request.clone());
            } else {
                return Err(exhausted.unwrap_or_else(|| StoreError::PoolExhausted {
                    pool: request.pools.join(", "),
                }));
            }
        }
    }
    let held: Vec<HeldAddress> = held.into_iter().flatten().collect();
    for address in &held {
        apply_held(&mut node, address)?;
    }
    let stored = match write.expected_generation {
        None => {
            insert_node(store.backend, &mut tx, &node).await?;
            node
        }
        Some(_) => write_node(store.backend, &mut tx, &node).await?,
    };
    if let Some(rollout) = &write.rollout {
        super::firmware::ROLLOUT
            .write(&mut tx, rollout, write.at_ms)
            .await?;
    }
    insert_events(&mut tx, &write.events).await?;
    tx.commit().await.map_err(backend_error)?;
    Ok(Some(Registered {
        node: stored,
        addresses: held,
        unfilled,
    }))
}

/// `AlreadyExists` when `node`'s uuid or hostname is taken.
async fn check_create(tx: &mut sqlx::AnyConnection, node: &Node) -> Result<(), StoreError> {
    let existing = sqlx::query("SELECT uuid FROM nodes WHERE uuid = $1 OR hostname = $2")
        .bind(node.uuid.as_str())
        .bind(&node.hostname)
        .fetch_optional(&mut *tx)
        .await
        .map_err(backend_error)?;
    match existing {
        None => Ok(()),
        Some(row) => {
            let uuid: String = row.try_get("uuid").map_err(backend_error)?;
            Err(StoreError::AlreadyExists {
                what: if uuid == node.uuid.as_str() {
                    format!("node {}", node.uuid)
                } else {
                    format!("hostname {}", node.hostname)
                },
            })
        }
    }
}

/// `NotFound` or `GenerationMismatch` unless the stored node is at `node.generation`.
async fn check_generation(tx: &mut sqlx::AnyConnection, node: &Node) -> Result<(), StoreError> {
    let found = sqlx::query("SELECT generation FROM nodes WHERE uuid = $1")
        .bind(node.uuid.as_str())
        .fetch_optional(&mut *tx)
        .await
        .map_err(backend_error)?;
    let found: i64 = match found {
        None => return Err(StoreError::not_found(format!("node {}", node.uuid))),
        Some(row) => row.try_get("generation").map_err(backend_error)?,
    };
    if found != node.generation {
        return Err(StoreError::GenerationMismatch {
            uuid: node.uuid.clone(),
            expected: node.generation,
            found,
        });
    }
    Ok(())
}

/// Inserts `node` as given; the primary key and the hostname's unique constraint decide
/// a create race (`AlreadyExists` for the loser). Announced like [`write_node`] (no
/// cache holds an absent node, but one rule for every node write is easier to keep).
async fn insert_node(
    backend: Backend,
    tx: &mut sqlx::AnyConnection,
    node: &Node,
) -> Result<(), StoreError> {
    let result = sqlx::query(
        "INSERT INTO nodes (uuid, hostname, serial, rack, role, state, flavor, generation, \
         created_at_ms, updated_at_ms, last_heartbeat_at_ms, doc) \
         VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11, $12)",
    )
    .bind(node.uuid.as_str())
    .bind(&node.hostname)
    .bind(&node.serial)
    .bind(node.rack.clone())
    .bind(node.role.as_str())
    .bind(node.state.as_str())
    .bind(node.flavor.clone())
    .bind(node.generation)
    .bind(node.created_at_ms)
    .bind(node.updated_at_ms)
    .bind(node.last_heartbeat_at_ms)
    .bind(node_doc(node)?)
    .execute(&mut *tx)
    .await;
    match result {
        Err(error) if is_unique_violation(&error) => Err(StoreError::AlreadyExists {
            what: format!("node {} or hostname {}", node.uuid, node.hostname),
        }),
        other => other.map(|_| ()).map_err(backend_error),
    }?;
    notify::send(backend, tx, &CacheChange::Node(node.uuid.clone())).await
}

#[cfg(test)]
mod tests {
    use super::BootColumn;
    use crate::core::model::{BootPhase, BootProgress};

    /// The scan's `boot` arrives as JSON text from an index, or as the object where the
    /// database computed it: both read the same; anything else is refused.
    #[test]
    fn a_boot_column_reads_as_text_or_object() {
        let expected = BootProgress {
            phase: BootPhase::Firmware,
            at_ms: 7,
            until_ms: Some(9),
        };
        for json in [
            r#"{"phase":"firmware","at_ms":7,"until_ms":9}"#,
            r#""{\"phase\":\"firmware\",\"at_ms\":7,\"until_ms\":9}""#,
        ] {
            let BootColumn(boot) = serde_json::from_str(json).unwrap();
            assert_eq!(boot, expected, "{json}");
        }
        let none: Option<BootColumn> = serde_json::from_str("null").unwrap();
        assert!(none.is_none());
        for bad in [r#""{not json""#, "7", r#"{"phase":"nowhere","at_ms":7}"#] {
            assert!(serde_json::from_str::<BootColumn>(bad).is_err(), "{bad}");
        }
    }
}
