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
use crate::core::firmware::{FirmwareBundle, FirmwareRollout};
use crate::core::model::{
    ApiToken, Event, EventFilter, Flavor, IpAllocation, IpPool, NewEvent, Node, NodeFilter,
    PoolPurpose, StateCounts, TimestampMs, TokenRole,
};
use crate::core::power_sync::PowerReading;
use crate::core::remediation::Remediation;

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
    /// Bound on one store operation (PostgreSQL only).
    operation_timeout: Option<Duration>,
}

/// Waiting for a PostgreSQL connection longer than this answers `Unavailable` (a 503
/// with `Retry-After`), instead of holding the request for sqlx's default 30 s.
pub const POSTGRES_ACQUIRE_TIMEOUT: Duration = Duration::from_secs(3);
/// A whole PostgreSQL store operation (acquire, queries, commit) longer than this is
/// abandoned as `Unavailable`: a database host cut off by the network leaves established
/// connections hanging for minutes, which the acquire timeout alone does not bound. As
/// with any lost answer, an abandoned write may have committed.
pub const POSTGRES_OPERATION_TIMEOUT: Duration = Duration::from_secs(5);
/// SQLite is a local file: one connection that requests queue for, so a short acquire
/// timeout would only shed load under a boot storm.
const SQLITE_ACQUIRE_TIMEOUT: Duration = Duration::from_secs(30);
/// Attempts at the first connection at start-up, each bounded by the acquire timeout (the
/// database may still be starting).
const CONNECT_ATTEMPTS_MAX: usize = 10;

fn backend_error(error: sqlx::Error) -> StoreError {
    if is_unavailable(&error) {
        StoreError::Unavailable(error.to_string())
    } else {
        StoreError::Backend(error.to_string())
    }
}

/// Whether `error` says the database could not be reached rather than that the query
/// failed: connection errors, pool timeouts, PostgreSQL's connection-exception class
/// (08…), shutdown and start-up (57P01-57P03) and too many connections (53300).
fn is_unavailable(error: &sqlx::Error) -> bool {
    match error {
        sqlx::Error::Io(_)
        | sqlx::Error::Tls(_)
        | sqlx::Error::PoolTimedOut
        | sqlx::Error::PoolClosed
        | sqlx::Error::WorkerCrashed => true,
        sqlx::Error::Database(db) => db.code().is_some_and(|code| {
            code.starts_with("08") || matches!(code.as_ref(), "57P01" | "57P02" | "57P03" | "53300")
        }),
        _ => false,
    }
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
    /// A database migrated by a newer release (a version this binary does not know) is
    /// refused with the reason rather than served with a schema this code never saw.
    pub async fn connect(url: &str) -> Result<SqlStore, StoreError> {
        let store = SqlStore::connect_without_migrating(url).await?;
        store.migrate(url).await?;
        Ok(store)
    }

    /// Connects without touching the schema: for `bearman migrate status` and backups,
    /// which must see the database as it is.
    pub async fn connect_without_migrating(url: &str) -> Result<SqlStore, StoreError> {
        sqlx::any::install_default_drivers();
        let backend = Backend::from_url(url).ok_or_else(|| {
            StoreError::Backend(format!(
                "unsupported database url {:?}: expected sqlite://… or postgres://…",
                redact_url(url)
            ))
        })?;
        let options = AnyPoolOptions::new();
        let mut attempt = 0;
        let pool = loop {
            attempt += 1;
            let connected = match backend {
                Backend::Sqlite => {
                    options
                        .clone()
                        .acquire_timeout(SQLITE_ACQUIRE_TIMEOUT)
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
                Backend::Postgres => {
                    options
                        .clone()
                        .acquire_timeout(POSTGRES_ACQUIRE_TIMEOUT)
                        .max_connections(16)
                        .connect(url)
                        .await
                }
            };
            match connected {
                Ok(pool) => break pool,
                Err(error) if is_unavailable(&error) && attempt < CONNECT_ATTEMPTS_MAX => {
                    tracing::warn!(
                        database = %redact_url(url),
                        attempt,
                        error = %error,
                        "database not reachable yet; retrying"
                    );
                }
                Err(error) => {
                    return Err(StoreError::Backend(format!(
                        "cannot connect to {}: {error}",
                        redact_url(url)
                    )))
                }
            }
        };
        if backend == Backend::Sqlite {
            // WAL survives in the file; readers then never block the writer.
            sqlx::query("PRAGMA journal_mode = WAL")
                .execute(&pool)
                .await
                .map_err(backend_error)?;
        }
        Ok(SqlStore {
            pool,
            backend,
            operation_timeout: (backend == Backend::Postgres).then_some(POSTGRES_OPERATION_TIMEOUT),
        })
    }

    /// Runs one store operation within the operation timeout (`Unavailable` past it).
    async fn bounded<T>(
        &self,
        operation: impl std::future::Future<Output = Result<T, StoreError>>,
    ) -> Result<T, StoreError> {
        match self.operation_timeout {
            None => operation.await,
            Some(timeout) => tokio::time::timeout(timeout, operation)
                .await
                .unwrap_or_else(|_| {
                    Err(StoreError::Unavailable(format!(
                        "no answer within {} ms",
                        timeout.as_millis()
                    )))
                }),
        }
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
pub mod backup;
mod cluster;
mod drills;
mod events;
mod firmware;
mod flavors;
pub mod migrate;
mod named_docs;
mod nodes;
pub mod notify;
mod pools;
mod power;
mod remediations;
mod singleton_doc;
mod tokens;

#[async_trait]
impl Store for SqlStore {
    fn backend_name(&self) -> &'static str {
        match self.backend {
            Backend::Sqlite => "sqlite",
            Backend::Postgres => "postgres",
        }
    }

    async fn ping(&self) -> Result<(), StoreError> {
        self.bounded(async {
            sqlx::query("SELECT 1")
                .execute(&self.pool)
                .await
                .map(|_| ())
                .map_err(backend_error)
        })
        .await
    }

    async fn node_get(&self, uuid: &NodeUuid) -> Result<Option<Node>, StoreError> {
        self.bounded(nodes::get(self, uuid)).await
    }

    async fn node_list(&self, filter: &NodeFilter) -> Result<Vec<Node>, StoreError> {
        self.bounded(nodes::list(self, filter)).await
    }

    async fn node_count_by_state(&self) -> Result<StateCounts, StoreError> {
        self.bounded(nodes::count_by_state(self)).await
    }

    async fn node_tally(&self) -> Result<Vec<crate::store::NodeTally>, StoreError> {
        self.bounded(nodes::tally(self)).await
    }

    async fn node_create(&self, node: &Node, events: &[NewEvent]) -> Result<Node, StoreError> {
        self.bounded(nodes::create(self, node, events)).await
    }

    async fn node_update(&self, node: &Node, events: &[NewEvent]) -> Result<Node, StoreError> {
        self.bounded(nodes::update(self, node, events)).await
    }

    async fn node_register(&self, write: &RegistrationWrite) -> Result<Registered, StoreError> {
        self.bounded(nodes::register(self, write)).await
    }

    async fn node_record_heartbeat(
        &self,
        uuid: &NodeUuid,
        at_ms: TimestampMs,
    ) -> Result<(), StoreError> {
        self.bounded(nodes::record_heartbeat(self, uuid, at_ms))
            .await
    }

    async fn node_health_list(&self) -> Result<Vec<crate::core::health::NodeHealth>, StoreError> {
        self.bounded(power::health_list(self)).await
    }

    async fn node_booting_list(
        &self,
    ) -> Result<Vec<crate::core::controller::BootingNode>, StoreError> {
        self.bounded(nodes::booting_list(self)).await
    }

    async fn node_power_record(
        &self,
        uuid: &NodeUuid,
        reading: &PowerReading,
        events: &[NewEvent],
    ) -> Result<bool, StoreError> {
        self.bounded(power::record(self, uuid, reading, events))
            .await
    }

    async fn node_power_get(&self, uuid: &NodeUuid) -> Result<Option<PowerReading>, StoreError> {
        self.bounded(power::get(self, uuid)).await
    }

    async fn firmware_bundle_create(
        &self,
        bundle: &FirmwareBundle,
        events: &[NewEvent],
    ) -> Result<(), StoreError> {
        self.bounded(firmware::bundle_create(self, bundle, events))
            .await
    }

    async fn firmware_bundle_list(&self) -> Result<Vec<FirmwareBundle>, StoreError> {
        self.bounded(firmware::bundle_list(self)).await
    }

    async fn firmware_bundle_delete(
        &self,
        name: &str,
        events: &[NewEvent],
    ) -> Result<(), StoreError> {
        self.bounded(firmware::bundle_delete(self, name, events))
            .await
    }

    async fn drill_board_get(&self) -> Result<crate::core::drill::DrillBoard, StoreError> {
        self.bounded(drills::board_get(self)).await
    }

    async fn drill_board_put(
        &self,
        board: &crate::core::drill::DrillBoard,
        finished: Option<&crate::core::drill::Drill>,
        events: &[NewEvent],
    ) -> Result<crate::core::drill::DrillBoard, StoreError> {
        self.bounded(drills::board_put(self, board, finished, events))
            .await
    }

    async fn drill_list(&self, limit: usize) -> Result<Vec<crate::core::drill::Drill>, StoreError> {
        self.bounded(drills::list(self, limit)).await
    }

    async fn drill_get(&self, id: i64) -> Result<Option<crate::core::drill::Drill>, StoreError> {
        self.bounded(drills::get(self, id)).await
    }

    async fn firmware_rollout_get(&self) -> Result<FirmwareRollout, StoreError> {
        self.bounded(firmware::rollout_get(self)).await
    }

    async fn firmware_rollout_put(
        &self,
        rollout: &FirmwareRollout,
        events: &[NewEvent],
    ) -> Result<FirmwareRollout, StoreError> {
        self.bounded(firmware::rollout_put(self, rollout, events))
            .await
    }

    async fn node_update_with_rollout(
        &self,
        node: &Node,
        rollout: &FirmwareRollout,
        events: &[NewEvent],
    ) -> Result<Node, StoreError> {
        self.bounded(firmware::node_update_with_rollout(
            self, node, rollout, events,
        ))
        .await
    }

    async fn flavor_create(
        &self,
        flavor: &Flavor,
        at_ms: TimestampMs,
        events: &[NewEvent],
    ) -> Result<(), StoreError> {
        self.bounded(flavors::create(self, flavor, at_ms, events))
            .await
    }

    async fn flavor_put(
        &self,
        flavor: &Flavor,
        at_ms: TimestampMs,
        events: &[NewEvent],
    ) -> Result<(), StoreError> {
        self.bounded(flavors::put(self, flavor, at_ms, events))
            .await
    }

    async fn flavor_get(&self, name: &str) -> Result<Option<Flavor>, StoreError> {
        self.bounded(flavors::get(self, name)).await
    }

    async fn flavor_list(&self) -> Result<Vec<Flavor>, StoreError> {
        self.bounded(flavors::list(self)).await
    }

    async fn flavor_delete(&self, name: &str, events: &[NewEvent]) -> Result<(), StoreError> {
        self.bounded(flavors::delete(self, name, events)).await
    }

    async fn pool_create(&self, pool: &IpPool, events: &[NewEvent]) -> Result<(), StoreError> {
        self.bounded(pools::create(self, pool, events)).await
    }

    async fn pool_get(&self, name: &str) -> Result<Option<IpPool>, StoreError> {
        self.bounded(pools::get(self, name)).await
    }

    async fn pool_list(&self) -> Result<Vec<IpPool>, StoreError> {
        self.bounded(pools::list(self)).await
    }

    async fn pool_delete(&self, name: &str, events: &[NewEvent]) -> Result<(), StoreError> {
        self.bounded(pools::delete(self, name, events)).await
    }

    async fn ip_allocate(
        &self,
        pool_name: &str,
        node_uuid: &NodeUuid,
        purpose: PoolPurpose,
        at_ms: TimestampMs,
    ) -> Result<IpAllocation, StoreError> {
        self.bounded(addresses::allocate(
            self, pool_name, node_uuid, purpose, at_ms,
        ))
        .await
    }

    async fn ip_list(
        &self,
        pool: Option<&str>,
        node_uuid: Option<&NodeUuid>,
    ) -> Result<Vec<IpAllocation>, StoreError> {
        self.bounded(addresses::list(self, pool, node_uuid)).await
    }

    async fn ip_release_node(&self, node_uuid: &NodeUuid) -> Result<usize, StoreError> {
        self.bounded(addresses::release_node(self, node_uuid)).await
    }

    async fn ip_orphans(&self) -> Result<Vec<OrphanAllocation>, StoreError> {
        self.bounded(addresses::orphans(self)).await
    }

    async fn event_append(&self, events: &[NewEvent]) -> Result<(), StoreError> {
        self.bounded(events::append(self, events)).await
    }

    async fn event_list(&self, filter: &EventFilter) -> Result<Vec<Event>, StoreError> {
        self.bounded(events::list(self, filter)).await
    }

    async fn remediation_create(
        &self,
        remediation: &Remediation,
        events: &[NewEvent],
        fence: Option<i64>,
    ) -> Result<Remediation, StoreError> {
        self.bounded(remediations::create(self, remediation, events, fence))
            .await
    }

    async fn remediation_update(
        &self,
        remediation: &Remediation,
        node: Option<&Node>,
        events: &[NewEvent],
        fence: Option<i64>,
    ) -> Result<(Remediation, Option<Node>), StoreError> {
        self.bounded(remediations::update(self, remediation, node, events, fence))
            .await
    }

    async fn lease_acquire(
        &self,
        holder: &str,
        ttl_ms: i64,
        _now_ms: TimestampMs,
        memory: Option<&str>,
    ) -> Result<Lease, StoreError> {
        self.bounded(cluster::acquire(self, holder, ttl_ms, memory))
            .await
    }

    async fn lease_release(
        &self,
        holder: &str,
        epoch: i64,
        _now_ms: TimestampMs,
    ) -> Result<(), StoreError> {
        self.bounded(cluster::release(self, holder, epoch)).await
    }

    async fn replica_report(
        &self,
        replica: &Replica,
        _now_ms: TimestampMs,
    ) -> Result<(), StoreError> {
        self.bounded(cluster::replica_report(self, replica)).await
    }

    async fn cluster_read(&self, _now_ms: TimestampMs) -> Result<ClusterStatus, StoreError> {
        self.bounded(cluster::read(self)).await
    }

    async fn remediation_get(&self, id: i64) -> Result<Option<Remediation>, StoreError> {
        self.bounded(remediations::get(self, id)).await
    }

    async fn remediation_list(
        &self,
        active_only: bool,
        node_uuid: Option<&NodeUuid>,
        limit: usize,
    ) -> Result<Vec<Remediation>, StoreError> {
        self.bounded(remediations::list(self, active_only, node_uuid, limit))
            .await
    }

    async fn token_create(
        &self,
        name: &str,
        role: TokenRole,
        secret_sha256: &str,
        at_ms: TimestampMs,
        expires_at_ms: Option<TimestampMs>,
        events: &[NewEvent],
    ) -> Result<ApiToken, StoreError> {
        self.bounded(tokens::create(
            self,
            name,
            role,
            secret_sha256,
            at_ms,
            expires_at_ms,
            events,
        ))
        .await
    }

    async fn token_record_use(
        &self,
        id: i64,
        at_ms: TimestampMs,
        interval_ms: TimestampMs,
    ) -> Result<bool, StoreError> {
        self.bounded(tokens::record_use(self, id, at_ms, interval_ms))
            .await
    }

    async fn token_find(&self, secret_sha256: &str) -> Result<Option<ApiToken>, StoreError> {
        self.bounded(tokens::find(self, secret_sha256)).await
    }

    async fn token_list(&self) -> Result<Vec<ApiToken>, StoreError> {
        self.bounded(tokens::list(self)).await
    }

    async fn token_delete(&self, name: &str, events: &[NewEvent]) -> Result<(), StoreError> {
        self.bounded(tokens::delete(self, name, events)).await
    }
}
