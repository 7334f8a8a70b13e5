//! sqlx store over SQLite (the embedded default) or PostgreSQL (production).
//!
//! Both backends go through sqlx's `Any` driver with one set of queries: placeholders are
//! `$N`, which PostgreSQL and SQLite both accept, and only integer and text columns are
//! used. The schema differs only in its DDL (`migrations/sqlite`, `migrations/postgres`).
//!
//! SQLite runs with a single connection: writers are serialized by SQLite anyway, and one
//! connection avoids `SQLITE_BUSY` on write upgrades. Reads on the boot hot path are served
//! by [`super::cached::CachedStore`] in front of this store.
//!
//! One file per resource (`nodes`, `addresses`, `pools`, `flavors`, `events`,
//! `remediations`, `tokens`, `power`), each naming its read column list once; `notify`
//! tells other replicas' caches of node and flavor writes (PostgreSQL); this file holds
//! the connection, the shared error helpers and the `Store` impl that delegates.

use std::time::Duration;

use async_trait::async_trait;
use bearman_proto::uuid::NodeUuid;
use sqlx::any::AnyPoolOptions;
use sqlx::AnyPool;

use super::{OrphanAllocation, Registered, RegistrationWrite, Store, StoreError};
use crate::core::cluster::{ClusterStatus, Lease, Replica};
use crate::core::model::{
    ApiToken, Event, EventFilter, Flavor, IpAllocation, IpPool, NewEvent, Node, NodeFilter,
    PoolPurpose, StateCounts, TimestampMs, TokenRole,
};
use crate::core::power_sync::PowerReading;
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

mod addresses;
mod cluster;
mod events;
mod flavors;
mod named_docs;
mod nodes;
pub mod notify;
mod pools;
mod power;
mod remediations;
mod tokens;

#[async_trait]
impl Store for SqlStore {
    fn backend_name(&self) -> &'static str {
        match self.backend {
            Backend::Sqlite => "sqlite",
            Backend::Postgres => "postgres",
        }
    }

    async fn node_get(&self, uuid: &NodeUuid) -> Result<Option<Node>, StoreError> {
        nodes::get(self, uuid).await
    }

    async fn node_list(&self, filter: &NodeFilter) -> Result<Vec<Node>, StoreError> {
        nodes::list(self, filter).await
    }

    async fn node_count_by_state(&self) -> Result<StateCounts, StoreError> {
        nodes::count_by_state(self).await
    }

    async fn node_create(&self, node: &Node, events: &[NewEvent]) -> Result<Node, StoreError> {
        nodes::create(self, node, events).await
    }

    async fn node_update(&self, node: &Node, events: &[NewEvent]) -> Result<Node, StoreError> {
        nodes::update(self, node, events).await
    }

    async fn node_register(&self, write: &RegistrationWrite) -> Result<Registered, StoreError> {
        nodes::register(self, write).await
    }

    async fn node_record_heartbeat(
        &self,
        uuid: &NodeUuid,
        at_ms: TimestampMs,
    ) -> Result<(), StoreError> {
        nodes::record_heartbeat(self, uuid, at_ms).await
    }

    async fn node_health_list(&self) -> Result<Vec<crate::core::health::NodeHealth>, StoreError> {
        power::health_list(self).await
    }

    async fn node_power_record(
        &self,
        uuid: &NodeUuid,
        reading: &PowerReading,
        events: &[NewEvent],
    ) -> Result<bool, StoreError> {
        power::record(self, uuid, reading, events).await
    }

    async fn node_power_get(&self, uuid: &NodeUuid) -> Result<Option<PowerReading>, StoreError> {
        power::get(self, uuid).await
    }

    async fn flavor_create(
        &self,
        flavor: &Flavor,
        at_ms: TimestampMs,
        events: &[NewEvent],
    ) -> Result<(), StoreError> {
        flavors::create(self, flavor, at_ms, events).await
    }

    async fn flavor_put(
        &self,
        flavor: &Flavor,
        at_ms: TimestampMs,
        events: &[NewEvent],
    ) -> Result<(), StoreError> {
        flavors::put(self, flavor, at_ms, events).await
    }

    async fn flavor_get(&self, name: &str) -> Result<Option<Flavor>, StoreError> {
        flavors::get(self, name).await
    }

    async fn flavor_list(&self) -> Result<Vec<Flavor>, StoreError> {
        flavors::list(self).await
    }

    async fn flavor_delete(&self, name: &str, events: &[NewEvent]) -> Result<(), StoreError> {
        flavors::delete(self, name, events).await
    }

    async fn pool_create(&self, pool: &IpPool, events: &[NewEvent]) -> Result<(), StoreError> {
        pools::create(self, pool, events).await
    }

    async fn pool_get(&self, name: &str) -> Result<Option<IpPool>, StoreError> {
        pools::get(self, name).await
    }

    async fn pool_list(&self) -> Result<Vec<IpPool>, StoreError> {
        pools::list(self).await
    }

    async fn pool_delete(&self, name: &str, events: &[NewEvent]) -> Result<(), StoreError> {
        pools::delete(self, name, events).await
    }

    async fn ip_allocate(
        &self,
        pool_name: &str,
        node_uuid: &NodeUuid,
        purpose: PoolPurpose,
        at_ms: TimestampMs,
    ) -> Result<IpAllocation, StoreError> {
        addresses::allocate(self, pool_name, node_uuid, purpose, at_ms).await
    }

    async fn ip_list(
        &self,
        pool: Option<&str>,
        node_uuid: Option<&NodeUuid>,
    ) -> Result<Vec<IpAllocation>, StoreError> {
        addresses::list(self, pool, node_uuid).await
    }

    async fn ip_release_node(&self, node_uuid: &NodeUuid) -> Result<usize, StoreError> {
        addresses::release_node(self, node_uuid).await
    }

    async fn ip_orphans(&self) -> Result<Vec<OrphanAllocation>, StoreError> {
        addresses::orphans(self).await
    }

    async fn event_append(&self, events: &[NewEvent]) -> Result<(), StoreError> {
        events::append(self, events).await
    }

    async fn event_list(&self, filter: &EventFilter) -> Result<Vec<Event>, StoreError> {
        events::list(self, filter).await
    }

    async fn remediation_create(
        &self,
        remediation: &Remediation,
        events: &[NewEvent],
        fence: Option<i64>,
    ) -> Result<Remediation, StoreError> {
        remediations::create(self, remediation, events, fence).await
    }

    async fn remediation_update(
        &self,
        remediation: &Remediation,
        node: Option<&Node>,
        events: &[NewEvent],
        fence: Option<i64>,
    ) -> Result<(Remediation, Option<Node>), StoreError> {
        remediations::update(self, remediation, node, events, fence).await
    }

    async fn lease_acquire(
        &self,
        holder: &str,
        ttl_ms: i64,
        _now_ms: TimestampMs,
        memory: Option<&str>,
    ) -> Result<Lease, StoreError> {
        cluster::acquire(self, holder, ttl_ms, memory).await
    }

    async fn lease_release(
        &self,
        holder: &str,
        epoch: i64,
        _now_ms: TimestampMs,
    ) -> Result<(), StoreError> {
        cluster::release(self, holder, epoch).await
    }

    async fn replica_report(
        &self,
        replica: &Replica,
        _now_ms: TimestampMs,
    ) -> Result<(), StoreError> {
        cluster::replica_report(self, replica).await
    }

    async fn cluster_read(&self, _now_ms: TimestampMs) -> Result<ClusterStatus, StoreError> {
        cluster::read(self).await
    }

    async fn remediation_get(&self, id: i64) -> Result<Option<Remediation>, StoreError> {
        remediations::get(self, id).await
    }

    async fn remediation_list(
        &self,
        active_only: bool,
        node_uuid: Option<&NodeUuid>,
        limit: usize,
    ) -> Result<Vec<Remediation>, StoreError> {
        remediations::list(self, active_only, node_uuid, limit).await
    }

    async fn token_create(
        &self,
        name: &str,
        role: TokenRole,
        secret_sha256: &str,
        at_ms: TimestampMs,
        events: &[NewEvent],
    ) -> Result<ApiToken, StoreError> {
        tokens::create(self, name, role, secret_sha256, at_ms, events).await
    }

    async fn token_find(&self, secret_sha256: &str) -> Result<Option<ApiToken>, StoreError> {
        tokens::find(self, secret_sha256).await
    }

    async fn token_list(&self) -> Result<Vec<ApiToken>, StoreError> {
        tokens::list(self).await
    }

    async fn token_delete(&self, name: &str, events: &[NewEvent]) -> Result<(), StoreError> {
        tokens::delete(self, name, events).await
    }
}
