//! sqlx store over SQLite (the embedded default) or PostgreSQL (production).
//!
//! Both backends go through sqlx's `Any` driver with one set of queries: placeholders are
//! `$N`, which PostgreSQL and SQLite both accept, and only integer and text columns are
//! used. The schema differs only in its DDL (`migrations/sqlite`, `migrations/postgres`).
//!
//! SQLite runs with a single connection: writers are serialized by SQLite anyway, and one
//! connection avoids `SQLITE_BUSY` on write upgrades. Reads on the boot hot path are served
//! by [`super::cached::CachedStore`] in front of this store.

use std::collections::BTreeSet;
use std::time::Duration;

use async_trait::async_trait;
use bearman_proto::uuid::NodeUuid;
use sqlx::any::{AnyPoolOptions, AnyRow};
use sqlx::{AnyPool, Row};

use super::{
    apply_held, check_pool_purpose, clamp_limit, orphans_of, AddressRequest, HeldAddress,
    OrphanAllocation, Registered, RegistrationWrite, Store, StoreError,
};
use crate::core::ipam::{self, validate_pool};
use crate::core::lifecycle::LifecycleState;
use crate::core::model::{
    ApiToken, Event, EventFilter, Flavor, IpAllocation, IpPool, NewEvent, Node, NodeFilter,
    PoolPurpose, StateCounts, TimestampMs, TokenRole,
};
use crate::core::power_sync::{PowerReading, PowerReadingState};
use crate::core::remediation::Remediation;

static SQLITE_MIGRATIONS: sqlx::migrate::Migrator = sqlx::migrate!("./migrations/sqlite");
static POSTGRES_MIGRATIONS: sqlx::migrate::Migrator = sqlx::migrate!("./migrations/postgres");

/// Attempts at a transaction that lost a race on a unique constraint.
const CONFLICT_RETRIES_MAX: usize = 8;

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Backend {
    Sqlite,
    Postgres,
}

impl Backend {
    pub fn from_url(url: &str) -> Option<Backend> {
        if url.starts_with("sqlite:") {
            Some(Backend::Sqlite)
        } else if url.starts_with("postgres://") || url.starts_with("postgresql://") {
            Some(Backend::Postgres)
        } else {
            None
        }
    }
}

pub struct SqlStore {
    pool: AnyPool,
    backend: Backend,
}

fn backend_error(error: sqlx::Error) -> StoreError {
    StoreError::Backend(error.to_string())
}

fn is_unique_violation(error: &sqlx::Error) -> bool {
    match error {
        sqlx::Error::Database(db) => db.is_unique_violation(),
        _ => false,
    }
}

fn corrupt(what: &str, error: impl std::fmt::Display) -> StoreError {
    StoreError::Corrupt(format!("{what}: {error}"))
}

impl SqlStore {
    /// Connects and runs migrations. `url` is `sqlite://PATH?mode=rwc` or `postgres://…`.
    pub async fn connect(url: &str) -> Result<SqlStore, StoreError> {
        sqlx::any::install_default_drivers();
        let backend = Backend::from_url(url).ok_or_else(|| {
            StoreError::Backend(format!(
                "unsupported database url {:?}: expected sqlite://… or postgres://…",
                redact_url(url)
            ))
        })?;
        let options = AnyPoolOptions::new().acquire_timeout(Duration::from_secs(30));
        let pool = match backend {
            Backend::Sqlite => {
                options
                    .max_connections(1)
                    .after_connect(|connection, _| {
                        Box::pin(async move {
                            use sqlx::Executor;
                            connection.execute("PRAGMA foreign_keys = ON").await?;
                            connection.execute("PRAGMA synchronous = NORMAL").await?;
                            connection.execute("PRAGMA busy_timeout = 10000").await?;
                            Ok(())
                        })
                    })
                    .connect(url)
                    .await
            }
            Backend::Postgres => options.max_connections(16).connect(url).await,
        }
        .map_err(|error| {
            StoreError::Backend(format!("cannot connect to {}: {error}", redact_url(url)))
        })?;
        if backend == Backend::Sqlite {
            // WAL survives in the file; readers then never block the writer.
            sqlx::query("PRAGMA journal_mode = WAL")
                .execute(&pool)
                .await
                .map_err(backend_error)?;
        }
        let migrator = match backend {
            Backend::Sqlite => &SQLITE_MIGRATIONS,
            Backend::Postgres => &POSTGRES_MIGRATIONS,
        };
        migrator
            .run(&pool)
            .await
            .map_err(|error| StoreError::Backend(format!("migration failed: {error}")))?;
        Ok(SqlStore { pool, backend })
    }

    pub fn backend(&self) -> Backend {
        self.backend
    }

    pub async fn close(&self) {
        self.pool.close().await;
    }
}

/// Hides a password in a database URL before it reaches an error message or a log.
pub fn redact_url(url: &str) -> String {
    match (url.find("://"), url.rfind('@')) {
        (Some(scheme_end), Some(at)) if at > scheme_end => {
            let userinfo = &url[scheme_end + 3..at];
            match userinfo.split_once(':') {
                Some((user, _)) => format!("{}{}:***{}", &url[..scheme_end + 3], user, &url[at..]),
                None => url.to_string(),
            }
        }
        _ => url.to_string(),
    }
}

fn node_from_row(row: &AnyRow) -> Result<Node, StoreError> {
    let doc: String = row.try_get("doc").map_err(backend_error)?;
    let mut node: Node = serde_json::from_str(&doc).map_err(|e| corrupt("node document", e))?;
    node.generation = row.try_get("generation").map_err(backend_error)?;
    node.last_heartbeat_at_ms = row.try_get("last_heartbeat_at_ms").map_err(backend_error)?;
    Ok(node)
}

fn allocation_from_row(row: &AnyRow) -> Result<IpAllocation, StoreError> {
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

fn token_from_row(row: &AnyRow) -> Result<ApiToken, StoreError> {
    let role: String = row.try_get("role").map_err(backend_error)?;
    Ok(ApiToken {
        id: row.try_get("id").map_err(backend_error)?,
        name: row.try_get("name").map_err(backend_error)?,
        role: TokenRole::parse(&role).ok_or_else(|| corrupt("token role", &role))?,
        secret_sha256: row.try_get("secret_sha256").map_err(backend_error)?,
        created_at_ms: row.try_get("created_at_ms").map_err(backend_error)?,
    })
}

fn event_from_row(row: &AnyRow) -> Result<Event, StoreError> {
    let uuid: Option<String> = row.try_get("node_uuid").map_err(backend_error)?;
    Ok(Event {
        id: row.try_get("id").map_err(backend_error)?,
        at_ms: row.try_get("at_ms").map_err(backend_error)?,
        node_uuid: uuid
            .map(|u| NodeUuid::parse(&u).map_err(|e| corrupt("event uuid", e)))
            .transpose()?,
        actor: row.try_get("actor").map_err(backend_error)?,
        action: row.try_get("action").map_err(backend_error)?,
        from_state: row.try_get("from_state").map_err(backend_error)?,
        to_state: row.try_get("to_state").map_err(backend_error)?,
        reason: row.try_get("reason").map_err(backend_error)?,
    })
}

fn remediation_doc(remediation: &Remediation) -> Result<String, StoreError> {
    serde_json::to_string(remediation).map_err(|e| corrupt("remediation document", e))
}

fn remediation_from_row(row: &AnyRow) -> Result<Remediation, StoreError> {
    let doc: String = row.try_get("doc").map_err(backend_error)?;
    let mut remediation: Remediation =
        serde_json::from_str(&doc).map_err(|e| corrupt("remediation document", e))?;
    remediation.id = row.try_get("id").map_err(backend_error)?;
    remediation.generation = row.try_get("generation").map_err(backend_error)?;
    Ok(remediation)
}

fn node_doc(node: &Node) -> Result<String, StoreError> {
    serde_json::to_string(node).map_err(|e| corrupt("node document", e))
}

/// Writes `node` at its generation + 1 inside `tx` (optimistic concurrency), releasing its
/// addresses when it is retired, and returns it as stored.
async fn write_node(tx: &mut sqlx::AnyConnection, node: &Node) -> Result<Node, StoreError> {
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
    Ok(updated)
}

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

async fn insert_events(
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
        .bind(&event.action)
        .bind(event.from_state.map(|s| s.as_str().to_string()))
        .bind(event.to_state.map(|s| s.as_str().to_string()))
        .bind(&event.reason)
        .execute(&mut *connection)
        .await
        .map_err(backend_error)?;
    }
    Ok(())
}

#[async_trait]
impl Store for SqlStore {
    fn backend_name(&self) -> &'static str {
        match self.backend {
            Backend::Sqlite => "sqlite",
            Backend::Postgres => "postgres",
        }
    }

    async fn node_get(&self, uuid: &NodeUuid) -> Result<Option<Node>, StoreError> {
        let row =
            sqlx::query("SELECT doc, generation, last_heartbeat_at_ms FROM nodes WHERE uuid = $1")
                .bind(uuid.as_str())
                .fetch_optional(&self.pool)
                .await
                .map_err(backend_error)?;
        row.as_ref().map(node_from_row).transpose()
    }

    async fn node_list(&self, filter: &NodeFilter) -> Result<Vec<Node>, StoreError> {
        let mut sql =
            String::from("SELECT doc, generation, last_heartbeat_at_ms FROM nodes WHERE 1 = 1");
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
        let rows = query.fetch_all(&self.pool).await.map_err(backend_error)?;
        rows.iter().map(node_from_row).collect()
    }

    async fn node_health_list(&self) -> Result<Vec<crate::core::health::NodeHealth>, StoreError> {
        // Columns only: no document decoding on the controller's every-second path.
        let rows = sqlx::query(
            "SELECT n.uuid AS uuid, n.rack AS rack, n.state AS state, \
             COALESCE(n.last_heartbeat_at_ms, n.updated_at_ms) AS heard, \
             p.state AS power_state, p.read_at_ms AS power_read_at_ms, p.error AS power_error \
             FROM nodes n LEFT JOIN node_power p ON p.node_uuid = n.uuid \
             WHERE n.state = 'ready' OR n.state = 'suspect' ORDER BY n.uuid",
        )
        .fetch_all(&self.pool)
        .await
        .map_err(backend_error)?;
        rows.iter()
            .map(|row| {
                let uuid: String = row.try_get("uuid").map_err(backend_error)?;
                let state: String = row.try_get("state").map_err(backend_error)?;
                Ok(crate::core::health::NodeHealth {
                    uuid: NodeUuid::parse(&uuid).map_err(|e| corrupt("node uuid", e))?,
                    rack: row.try_get("rack").map_err(backend_error)?,
                    state: LifecycleState::parse(&state)
                        .ok_or_else(|| corrupt("node state", &state))?,
                    last_heard_at_ms: row.try_get("heard").map_err(backend_error)?,
                    power: power_from_row(row, "power_")?,
                })
            })
            .collect()
    }

    async fn node_power_record(
        &self,
        uuid: &NodeUuid,
        reading: &PowerReading,
        events: &[NewEvent],
    ) -> Result<bool, StoreError> {
        let mut tx = self.pool.begin().await.map_err(backend_error)?;
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

    async fn node_power_get(&self, uuid: &NodeUuid) -> Result<Option<PowerReading>, StoreError> {
        let row =
            sqlx::query("SELECT state, read_at_ms, error FROM node_power WHERE node_uuid = $1")
                .bind(uuid.as_str())
                .fetch_optional(&self.pool)
                .await
                .map_err(backend_error)?;
        match row {
            Some(row) => power_from_row(&row, ""),
            None => Ok(None),
        }
    }

    async fn node_count_by_state(&self) -> Result<StateCounts, StoreError> {
        let rows = sqlx::query("SELECT state, COUNT(*) AS n FROM nodes GROUP BY state")
            .fetch_all(&self.pool)
            .await
            .map_err(backend_error)?;
        let mut counts = StateCounts::new();
        for row in rows {
            let state: String = row.try_get("state").map_err(backend_error)?;
            let count: i64 = row.try_get("n").map_err(backend_error)?;
            let state =
                LifecycleState::parse(&state).ok_or_else(|| corrupt("node state", &state))?;
            counts.insert(state, count as usize);
        }
        Ok(counts)
    }

    async fn node_create(&self, node: &Node, events: &[NewEvent]) -> Result<Node, StoreError> {
        let mut tx = self.pool.begin().await.map_err(backend_error)?;
        check_create(&mut tx, node).await?;
        insert_node(&mut tx, node).await?;
        insert_events(&mut tx, events).await?;
        tx.commit().await.map_err(backend_error)?;
        Ok(node.clone())
    }

    async fn node_update(&self, node: &Node, events: &[NewEvent]) -> Result<Node, StoreError> {
        let mut tx = self.pool.begin().await.map_err(backend_error)?;
        let updated = write_node(&mut tx, node).await?;
        insert_events(&mut tx, events).await?;
        tx.commit().await.map_err(backend_error)?;
        Ok(updated)
    }

    async fn node_register(&self, write: &RegistrationWrite) -> Result<Registered, StoreError> {
        write.check_requests()?;
        for attempt in 0..CONFLICT_RETRIES_MAX {
            // After a lost race, scan for gaps: the fast path's candidate may be held by
            // an overlapping pool for good.
            let gap_scan = attempt > 0;
            if let Some(registered) = self.try_register(write, gap_scan).await? {
                return Ok(registered);
            }
        }
        Err(StoreError::Backend(format!(
            "could not register node {}: {CONFLICT_RETRIES_MAX} attempts lost races for an address",
            write.node.uuid
        )))
    }

    async fn node_record_heartbeat(
        &self,
        uuid: &NodeUuid,
        at_ms: TimestampMs,
    ) -> Result<(), StoreError> {
        let result = sqlx::query(
            "UPDATE nodes SET last_heartbeat_at_ms = $1 WHERE uuid = $2 \
             AND (last_heartbeat_at_ms IS NULL OR last_heartbeat_at_ms < $1)",
        )
        .bind(at_ms)
        .bind(uuid.as_str())
        .execute(&self.pool)
        .await
        .map_err(backend_error)?;
        if result.rows_affected() == 0 && self.node_get(uuid).await?.is_none() {
            return Err(StoreError::not_found(format!("node {uuid}")));
        }
        Ok(())
    }

    async fn flavor_create(
        &self,
        flavor: &Flavor,
        at_ms: TimestampMs,
        events: &[NewEvent],
    ) -> Result<(), StoreError> {
        let doc = serde_json::to_string(flavor).map_err(|e| corrupt("flavor document", e))?;
        let mut tx = self.pool.begin().await.map_err(backend_error)?;
        // No upsert: the primary key decides which of two concurrent creates wins.
        let inserted =
            sqlx::query("INSERT INTO flavors (name, doc, updated_at_ms) VALUES ($1, $2, $3)")
                .bind(&flavor.name)
                .bind(doc)
                .bind(at_ms)
                .execute(&mut *tx)
                .await;
        match inserted {
            Err(error) if is_unique_violation(&error) => {
                return Err(StoreError::AlreadyExists {
                    what: format!("flavor {}", flavor.name),
                })
            }
            other => other.map_err(backend_error)?,
        };
        insert_events(&mut tx, events).await?;
        tx.commit().await.map_err(backend_error)
    }

    async fn flavor_put(
        &self,
        flavor: &Flavor,
        at_ms: TimestampMs,
        events: &[NewEvent],
    ) -> Result<(), StoreError> {
        let doc = serde_json::to_string(flavor).map_err(|e| corrupt("flavor document", e))?;
        let mut tx = self.pool.begin().await.map_err(backend_error)?;
        sqlx::query(
            "INSERT INTO flavors (name, doc, updated_at_ms) VALUES ($1, $2, $3) \
             ON CONFLICT (name) DO UPDATE SET doc = excluded.doc, updated_at_ms = excluded.updated_at_ms",
        )
        .bind(&flavor.name)
        .bind(doc)
        .bind(at_ms)
        .execute(&mut *tx)
        .await
        .map_err(backend_error)?;
        insert_events(&mut tx, events).await?;
        tx.commit().await.map_err(backend_error)
    }

    async fn flavor_get(&self, name: &str) -> Result<Option<Flavor>, StoreError> {
        let row = sqlx::query("SELECT doc FROM flavors WHERE name = $1")
            .bind(name)
            .fetch_optional(&self.pool)
            .await
            .map_err(backend_error)?;
        row.map(|row| {
            let doc: String = row.try_get("doc").map_err(backend_error)?;
            serde_json::from_str(&doc).map_err(|e| corrupt("flavor document", e))
        })
        .transpose()
    }

    async fn flavor_list(&self) -> Result<Vec<Flavor>, StoreError> {
        let rows = sqlx::query("SELECT doc FROM flavors ORDER BY name")
            .fetch_all(&self.pool)
            .await
            .map_err(backend_error)?;
        rows.iter()
            .map(|row| {
                let doc: String = row.try_get("doc").map_err(backend_error)?;
                serde_json::from_str(&doc).map_err(|e| corrupt("flavor document", e))
            })
            .collect()
    }

    async fn flavor_delete(&self, name: &str, events: &[NewEvent]) -> Result<(), StoreError> {
        let mut tx = self.pool.begin().await.map_err(backend_error)?;
        let users: i64 = sqlx::query("SELECT COUNT(*) AS n FROM nodes WHERE flavor = $1")
            .bind(name)
            .fetch_one(&mut *tx)
            .await
            .and_then(|row| row.try_get("n"))
            .map_err(backend_error)?;
        if users > 0 {
            return Err(StoreError::InUse {
                what: format!("flavor {name}"),
                detail: format!("{users} node(s) use it"),
            });
        }
        let deleted = sqlx::query("DELETE FROM flavors WHERE name = $1")
            .bind(name)
            .execute(&mut *tx)
            .await
            .map_err(backend_error)?
            .rows_affected();
        if deleted == 0 {
            return Err(StoreError::not_found(format!("flavor {name}")));
        }
        insert_events(&mut tx, events).await?;
        tx.commit().await.map_err(backend_error)?;
        Ok(())
    }

    async fn pool_create(&self, pool: &IpPool, events: &[NewEvent]) -> Result<(), StoreError> {
        let doc = serde_json::to_string(pool).map_err(|e| corrupt("pool document", e))?;
        let mut tx = self.pool.begin().await.map_err(backend_error)?;
        let result = sqlx::query("INSERT INTO ip_pools (name, purpose, doc) VALUES ($1, $2, $3)")
            .bind(&pool.name)
            .bind(pool.purpose.as_str())
            .bind(doc)
            .execute(&mut *tx)
            .await;
        match result {
            Err(error) if is_unique_violation(&error) => {
                return Err(StoreError::AlreadyExists {
                    what: format!("ip pool {}", pool.name),
                })
            }
            other => other.map_err(backend_error)?,
        };
        insert_events(&mut tx, events).await?;
        tx.commit().await.map_err(backend_error)
    }

    async fn pool_get(&self, name: &str) -> Result<Option<IpPool>, StoreError> {
        let row = sqlx::query("SELECT doc FROM ip_pools WHERE name = $1")
            .bind(name)
            .fetch_optional(&self.pool)
            .await
            .map_err(backend_error)?;
        row.map(|row| {
            let doc: String = row.try_get("doc").map_err(backend_error)?;
            serde_json::from_str(&doc).map_err(|e| corrupt("pool document", e))
        })
        .transpose()
    }

    async fn pool_list(&self) -> Result<Vec<IpPool>, StoreError> {
        let rows = sqlx::query("SELECT doc FROM ip_pools ORDER BY name")
            .fetch_all(&self.pool)
            .await
            .map_err(backend_error)?;
        rows.iter()
            .map(|row| {
                let doc: String = row.try_get("doc").map_err(backend_error)?;
                serde_json::from_str(&doc).map_err(|e| corrupt("pool document", e))
            })
            .collect()
    }

    async fn pool_delete(&self, name: &str, events: &[NewEvent]) -> Result<(), StoreError> {
        let mut tx = self.pool.begin().await.map_err(backend_error)?;
        let used: i64 = sqlx::query("SELECT COUNT(*) AS n FROM ip_allocations WHERE pool = $1")
            .bind(name)
            .fetch_one(&mut *tx)
            .await
            .and_then(|row| row.try_get("n"))
            .map_err(backend_error)?;
        if used > 0 {
            return Err(StoreError::InUse {
                what: format!("ip pool {name}"),
                detail: format!("{used} address(es) allocated"),
            });
        }
        let deleted = sqlx::query("DELETE FROM ip_pools WHERE name = $1")
            .bind(name)
            .execute(&mut *tx)
            .await
            .map_err(backend_error)?
            .rows_affected();
        if deleted == 0 {
            return Err(StoreError::not_found(format!("ip pool {name}")));
        }
        insert_events(&mut tx, events).await?;
        tx.commit().await.map_err(backend_error)?;
        Ok(())
    }

    async fn ip_allocate(
        &self,
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
            let mut tx = self.pool.begin().await.map_err(backend_error)?;
            let gap_scan = attempt > 0;
            match self
                .allocate_in(&mut tx, &request, node_uuid, at_ms, gap_scan)
                .await?
            {
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

    async fn ip_list(
        &self,
        pool: Option<&str>,
        node_uuid: Option<&NodeUuid>,
    ) -> Result<Vec<IpAllocation>, StoreError> {
        let rows = sqlx::query(
            "SELECT pool, address, node_uuid, purpose, allocated_at_ms FROM ip_allocations \
             WHERE ($1 = '' OR pool = $1) AND ($2 = '' OR node_uuid = $2) \
             ORDER BY address_num, pool",
        )
        .bind(pool.unwrap_or(""))
        .bind(node_uuid.map(|u| u.to_string()).unwrap_or_default())
        .fetch_all(&self.pool)
        .await
        .map_err(backend_error)?;
        rows.iter().map(allocation_from_row).collect()
    }

    async fn ip_release_node(&self, node_uuid: &NodeUuid) -> Result<usize, StoreError> {
        let released = sqlx::query("DELETE FROM ip_allocations WHERE node_uuid = $1")
            .bind(node_uuid.as_str())
            .execute(&self.pool)
            .await
            .map_err(backend_error)?
            .rows_affected();
        Ok(released as usize)
    }

    async fn ip_orphans(&self) -> Result<Vec<OrphanAllocation>, StoreError> {
        // One statement, so the allocations and the records are read at one moment.
        let rows = sqlx::query(
            "SELECT a.pool AS pool, a.address AS address, a.node_uuid AS node_uuid, \
             a.purpose AS purpose, a.allocated_at_ms AS allocated_at_ms, \
             n.doc AS doc, n.generation AS generation, \
             n.last_heartbeat_at_ms AS last_heartbeat_at_ms \
             FROM ip_allocations a LEFT JOIN nodes n ON n.uuid = a.node_uuid \
             ORDER BY a.address_num, a.pool",
        )
        .fetch_all(&self.pool)
        .await
        .map_err(backend_error)?;
        let mut pairs = Vec::with_capacity(rows.len());
        for row in &rows {
            let allocation = allocation_from_row(row)?;
            let doc: Option<String> = row.try_get("doc").map_err(backend_error)?;
            let node = match doc {
                Some(_) => Some(node_from_row(row)?),
                None => None,
            };
            pairs.push((allocation, node));
        }
        Ok(orphans_of(pairs.iter().map(|(allocation, node)| {
            (allocation.clone(), node.as_ref())
        })))
    }

    async fn event_append(&self, events: &[NewEvent]) -> Result<(), StoreError> {
        let mut tx = self.pool.begin().await.map_err(backend_error)?;
        insert_events(&mut tx, events).await?;
        tx.commit().await.map_err(backend_error)
    }

    async fn event_list(&self, filter: &EventFilter) -> Result<Vec<Event>, StoreError> {
        let rows = sqlx::query(&format!(
            "SELECT id, at_ms, node_uuid, actor, action, from_state, to_state, reason FROM events \
             WHERE ($1 = '' OR node_uuid = $1) AND id < $2 ORDER BY id DESC LIMIT {}",
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
        .fetch_all(&self.pool)
        .await
        .map_err(backend_error)?;
        rows.iter().map(event_from_row).collect()
    }

    async fn remediation_create(
        &self,
        remediation: &Remediation,
        events: &[NewEvent],
    ) -> Result<Remediation, StoreError> {
        let mut tx = self.pool.begin().await.map_err(backend_error)?;
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

    async fn remediation_update(
        &self,
        remediation: &Remediation,
        node: Option<&Node>,
        events: &[NewEvent],
    ) -> Result<(Remediation, Option<Node>), StoreError> {
        let mut updated = remediation.clone();
        updated.generation += 1;
        let mut tx = self.pool.begin().await.map_err(backend_error)?;
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
            Some(node) => Some(write_node(&mut tx, node).await?),
            None => None,
        };
        insert_events(&mut tx, events).await?;
        tx.commit().await.map_err(backend_error)?;
        Ok((updated, node))
    }

    async fn remediation_get(&self, id: i64) -> Result<Option<Remediation>, StoreError> {
        let row = sqlx::query("SELECT id, generation, doc FROM remediations WHERE id = $1")
            .bind(id)
            .fetch_optional(&self.pool)
            .await
            .map_err(backend_error)?;
        row.as_ref().map(remediation_from_row).transpose()
    }

    async fn remediation_list(
        &self,
        active_only: bool,
        node_uuid: Option<&NodeUuid>,
        limit: usize,
    ) -> Result<Vec<Remediation>, StoreError> {
        let rows = sqlx::query(&format!(
            "SELECT id, generation, doc FROM remediations \
             WHERE ($1 = '' OR status = $1) AND ($2 = '' OR node_uuid = $2) \
             ORDER BY id DESC LIMIT {}",
            clamp_limit(limit)
        ))
        .bind(if active_only { "active" } else { "" })
        .bind(node_uuid.map(|u| u.to_string()).unwrap_or_default())
        .fetch_all(&self.pool)
        .await
        .map_err(backend_error)?;
        rows.iter().map(remediation_from_row).collect()
    }

    async fn token_create(
        &self,
        name: &str,
        role: TokenRole,
        secret_sha256: &str,
        at_ms: TimestampMs,
        events: &[NewEvent],
    ) -> Result<ApiToken, StoreError> {
        let mut tx = self.pool.begin().await.map_err(backend_error)?;
        let result = sqlx::query(
            "INSERT INTO api_tokens (name, role, secret_sha256, created_at_ms) VALUES ($1, $2, $3, $4)",
        )
        .bind(name)
        .bind(role.as_str())
        .bind(secret_sha256)
        .bind(at_ms)
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
        let row = sqlx::query(
            "SELECT id, name, role, secret_sha256, created_at_ms FROM api_tokens WHERE name = $1",
        )
        .bind(name)
        .fetch_one(&mut *tx)
        .await
        .map_err(backend_error)?;
        let token = token_from_row(&row)?;
        insert_events(&mut tx, events).await?;
        tx.commit().await.map_err(backend_error)?;
        Ok(token)
    }

    async fn token_find(&self, secret_sha256: &str) -> Result<Option<ApiToken>, StoreError> {
        let row = sqlx::query(
            "SELECT id, name, role, secret_sha256, created_at_ms FROM api_tokens WHERE secret_sha256 = $1",
        )
        .bind(secret_sha256)
        .fetch_optional(&self.pool)
        .await
        .map_err(backend_error)?;
        row.as_ref().map(token_from_row).transpose()
    }

    async fn token_list(&self) -> Result<Vec<ApiToken>, StoreError> {
        let rows = sqlx::query(
            "SELECT id, name, role, secret_sha256, created_at_ms FROM api_tokens ORDER BY name",
        )
        .fetch_all(&self.pool)
        .await
        .map_err(backend_error)?;
        rows.iter().map(token_from_row).collect()
    }

    async fn token_delete(&self, name: &str, events: &[NewEvent]) -> Result<(), StoreError> {
        let mut tx = self.pool.begin().await.map_err(backend_error)?;
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
}

impl SqlStore {
    /// One attempt at [`Store::node_register`] in one transaction; `None` when a unique
    /// constraint said someone else won a race for an address and the caller should try
    /// again. Every other outcome is final, and a refusal has written nothing.
    async fn try_register(
        &self,
        write: &RegistrationWrite,
        gap_scan: bool,
    ) -> Result<Option<Registered>, StoreError> {
        let mut tx = self.pool.begin().await.map_err(backend_error)?;
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
        // Pool rows are locked in name order, so two registrations never wait for each
        // other's pools crosswise (a deadlock on PostgreSQL).
        let mut order: Vec<usize> = (0..write.addresses.len()).collect();
        order.sort_by(|&a, &b| write.addresses[a].pool.cmp(&write.addresses[b].pool));
        let mut held: Vec<Option<HeldAddress>> = vec![None; write.addresses.len()];
        for index in order {
            match self
                .allocate_in(
                    &mut tx,
                    &write.addresses[index],
                    &node.uuid,
                    write.at_ms,
                    gap_scan,
                )
                .await?
            {
                Some(address) => held[index] = Some(address),
                // The transaction is aborted (PostgreSQL); dropping it rolls back.
                None => return Ok(None),
            }
        }
        let held: Vec<HeldAddress> = held.into_iter().flatten().collect();
        for address in &held {
            apply_held(&mut node, address)?;
        }
        let stored = match write.expected_generation {
            None => {
                insert_node(&mut tx, &node).await?;
                node
            }
            Some(_) => write_node(&mut tx, &node).await?,
        };
        insert_events(&mut tx, &write.events).await?;
        tx.commit().await.map_err(backend_error)?;
        Ok(Some(Registered {
            node: stored,
            addresses: held,
        }))
    }

    /// Gives `node_uuid` its `request.purpose` address inside `tx`, or the one it already
    /// holds for that purpose. `None` when a unique constraint said someone else won a
    /// race (the transaction is then aborted on PostgreSQL and must be dropped).
    async fn allocate_in(
        &self,
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
        let lock_clause = match self.backend {
            Backend::Postgres => " FOR UPDATE",
            Backend::Sqlite => "",
        };
        let pool = read_pool(tx, &request.pool, lock_clause).await?;
        let existing = sqlx::query(
            "SELECT pool, address, node_uuid, purpose, allocated_at_ms FROM ip_allocations \
             WHERE node_uuid = $1 AND purpose = $2",
        )
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
                read_pool(tx, &allocation.pool, "").await?
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
}

/// The pool named `name` as stored, read inside `tx` (`lock_clause` may lock its row).
async fn read_pool(
    tx: &mut sqlx::AnyConnection,
    name: &str,
    lock_clause: &str,
) -> Result<IpPool, StoreError> {
    let doc: Option<String> = sqlx::query(&format!(
        "SELECT doc FROM ip_pools WHERE name = $1{lock_clause}"
    ))
    .bind(name)
    .fetch_optional(&mut *tx)
    .await
    .map_err(backend_error)?
    .map(|row| row.try_get("doc"))
    .transpose()
    .map_err(backend_error)?;
    let doc = doc.ok_or_else(|| StoreError::not_found(format!("ip pool {name}")))?;
    serde_json::from_str(&doc).map_err(|e| corrupt("pool document", e))
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
/// a create race (`AlreadyExists` for the loser).
async fn insert_node(tx: &mut sqlx::AnyConnection, node: &Node) -> Result<(), StoreError> {
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
    }
}
