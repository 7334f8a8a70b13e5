//! Persistence: the [`Store`] trait and its implementations.
//!
//! - [`sql::SqlStore`]: sqlx over SQLite (the embedded default) or PostgreSQL (production),
//!   with migrations in `daemon/migrations/{sqlite,postgres}`.
//! - [`memory::MemoryStore`]: for the simulator, where sqlx's SQLite driver (one OS thread
//!   per connection) would break determinism.
//! - [`cached::CachedStore`]: a read-through cache for the boot hot path.
//!
//! One conformance suite ([`conformance`]) runs against every implementation.
//!
//! Architecture invariant: the store enforces the data invariants itself (unique addresses,
//! unique hostnames, node generations, addresses released on retire, a registration's
//! addresses and node record written in one transaction) so no caller can break them,
//! however it interleaves.

pub mod cached;
pub mod conformance;
pub mod memory;
pub mod sql;

use std::sync::Arc;

use async_trait::async_trait;
use bearman_proto::uuid::NodeUuid;

use crate::core::cluster::{ClusterStatus, Lease, Replica};
use crate::core::firmware::{FirmwareBundle, FirmwareRollout};
use crate::core::model::{
    ApiToken, Event, EventFilter, Flavor, IpAllocation, IpPool, NewEvent, Node, NodeFilter,
    PoolPurpose, StateCounts, TimestampMs, TokenRole,
};
use crate::core::power_sync::PowerReading;
use crate::core::remediation::Remediation;

pub use crate::core::ipam::{AddressRequest, AddressWant};

/// Everything one registration writes, for [`Store::node_register`]: one transaction, so
/// a registration that fails at any point (pool exhausted, lost race, stale generation,
/// hostname taken) leaves nothing behind and takes nothing from anyone.
#[derive(Clone, Debug)]
pub struct RegistrationWrite {
    /// The node as planned by `core::registration::plan_registration`, before addresses;
    /// the store writes the allocated ones into it (`core::ipam::apply_allocation`).
    pub node: Node,
    /// `Some(generation)` when planned from an existing record: written only if the
    /// stored node is still at that generation (`GenerationMismatch` otherwise, `NotFound`
    /// if it vanished), and stored one higher. `None` to create: `AlreadyExists` if the
    /// uuid (or the hostname) appeared meanwhile; stored at `node.generation`.
    pub expected_generation: Option<i64>,
    /// The slots the node needs (`core::ipam::address_requests`). A node keeps an address
    /// it already holds for a purpose, whichever pool it came from.
    pub addresses: Vec<AddressWant>,
    pub events: Vec<NewEvent>,
    pub at_ms: TimestampMs,
    /// The firmware rollout as the registration changed it (a slot taken or freed), written
    /// in the same transaction only if the stored one is still at `rollout.generation`
    /// (`Conflict` otherwise), and stored one higher.
    pub rollout: Option<FirmwareRollout>,
}

impl RegistrationWrite {
    /// Refuses a write that asks twice for one purpose: a node has one slot per purpose,
    /// so the second request could only be a caller's bug.
    pub(crate) fn check_requests(&self) -> Result<(), StoreError> {
        for (index, request) in self.addresses.iter().enumerate() {
            if request.pools.is_empty() {
                return Err(StoreError::Conflict {
                    what: format!("registration of node {}", self.node.uuid),
                    detail: format!(
                        "{} address requested from no pool",
                        request.purpose.as_str()
                    ),
                });
            }
            if self.addresses[..index]
                .iter()
                .any(|earlier| earlier.purpose == request.purpose)
            {
                return Err(StoreError::Conflict {
                    what: format!("registration of node {}", self.node.uuid),
                    detail: format!(
                        "{} addresses requested twice; a node holds one per purpose",
                        request.purpose.as_str()
                    ),
                });
            }
        }
        Ok(())
    }
}

/// Refuses to allocate a `purpose` address from a pool meant for the other purpose.
pub(crate) fn check_pool_purpose(pool: &IpPool, purpose: PoolPurpose) -> Result<(), StoreError> {
    if pool.purpose == purpose {
        Ok(())
    } else {
        Err(StoreError::InvalidPool {
            pool: pool.name.clone(),
            detail: format!(
                "it holds {} addresses, not {} addresses",
                pool.purpose.as_str(),
                purpose.as_str()
            ),
        })
    }
}

/// Writes a held address into the node record (`core::ipam::apply_allocation`).
pub(crate) fn apply_held(node: &mut Node, held: &HeldAddress) -> Result<(), StoreError> {
    crate::core::ipam::apply_allocation(node, &held.pool, &held.allocation).map_err(|error| {
        StoreError::InvalidPool {
            pool: held.pool.name.clone(),
            detail: error.to_string(),
        }
    })
}

/// One address a node holds, with the pool it came from (for its prefix and gateway).
#[derive(Clone, Debug, PartialEq)]
pub struct HeldAddress {
    pub pool: IpPool,
    pub allocation: IpAllocation,
}

/// What [`Store::node_register`] wrote.
#[derive(Clone, Debug, PartialEq)]
pub struct Registered {
    /// The node as stored, its addresses included.
    pub node: Node,
    /// The allocations it holds for the requested purposes, in request order.
    pub addresses: Vec<HeldAddress>,
    /// Optional addresses it did not get because every pool listed was full.
    pub unfilled: Vec<AddressWant>,
}

impl Registered {
    /// The held address of `purpose`, if one was requested.
    pub fn address(&self, purpose: PoolPurpose) -> Option<&HeldAddress> {
        self.addresses
            .iter()
            .find(|held| held.allocation.purpose == purpose)
    }
}

/// Why [`Store::ip_orphans`] reports an allocation.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum OrphanReason {
    /// No node with the allocation's uuid exists.
    NodeMissing,
    /// The node exists but its record does not name the address where an address of that
    /// purpose goes (bond0 for node addresses, the BMC for BMC ones).
    NotInRecord,
}

impl OrphanReason {
    pub fn as_str(self) -> &'static str {
        match self {
            OrphanReason::NodeMissing => "node_missing",
            OrphanReason::NotInRecord => "not_in_record",
        }
    }
}

/// An allocation nothing accounts for (see [`Store::ip_orphans`]).
#[derive(Clone, Debug, PartialEq)]
pub struct OrphanAllocation {
    pub allocation: IpAllocation,
    pub reason: OrphanReason,
}

/// The orphans among `allocations`, given a lookup of nodes by uuid: the one rule every
/// store's [`Store::ip_orphans`] applies.
pub(crate) fn orphans_of<'a>(
    allocations: impl IntoIterator<Item = (IpAllocation, Option<&'a Node>)>,
) -> Vec<OrphanAllocation> {
    allocations
        .into_iter()
        .filter_map(|(allocation, node)| {
            let reason = match node {
                None => OrphanReason::NodeMissing,
                Some(node) if !crate::core::ipam::node_records_allocation(node, &allocation) => {
                    OrphanReason::NotInRecord
                }
                Some(_) => return None,
            };
            Some(OrphanAllocation { allocation, reason })
        })
        .collect()
}

#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("{what} not found")]
    NotFound { what: String },
    #[error("{what} already exists")]
    AlreadyExists { what: String },
    #[error("{what} is in use: {detail}")]
    InUse { what: String, detail: String },
    #[error(
        "node {uuid} was modified concurrently (expected generation {expected}, found {found})"
    )]
    GenerationMismatch {
        uuid: NodeUuid,
        expected: i64,
        found: i64,
    },
    #[error("{what} conflict: {detail}")]
    Conflict { what: String, detail: String },
    #[error("ip pool {pool} has no free address")]
    PoolExhausted { pool: String },
    #[error("invalid ip pool {pool}: {detail}")]
    InvalidPool { pool: String, detail: String },
    #[error("stored data is corrupt: {0}")]
    Corrupt(String),
    #[error("database error: {0}")]
    Backend(String),
    /// The database could not be reached or did not answer in time (connection refused
    /// or lost, pool acquire or operation timeout): nothing is wrong with the request,
    /// and retrying later may succeed. A write that timed out may still have committed.
    #[error("database unavailable: {0}")]
    Unavailable(String),
    /// A saga write carried a leader epoch that is no longer the lease's: another replica
    /// leads now (or the lease lapsed), and this one must not act.
    #[error("fenced: written under leader epoch {written}, the lease is at {}", current.map_or("none".to_string(), |e| e.to_string()))]
    Fenced { written: i64, current: Option<i64> },
}

impl StoreError {
    pub fn not_found(what: impl Into<String>) -> Self {
        StoreError::NotFound { what: what.into() }
    }
}

impl StoreError {
    /// For a fault of the database itself (unreachable, failing, corrupt data), how
    /// metrics name it; `None` for refusals that are answers (not found, conflicts, …).
    pub fn fault_kind(&self) -> Option<&'static str> {
        match self {
            StoreError::Unavailable(_) => Some("unavailable"),
            StoreError::Backend(_) => Some("backend"),
            StoreError::Corrupt(_) => Some("corrupt"),
            _ => None,
        }
    }
}

#[async_trait]
pub trait Store: Send + Sync + 'static {
    /// Which implementation this is, for logs (`sqlite`, `postgres`, `memory`).
    fn backend_name(&self) -> &'static str;

    /// A trivial round trip to the database (readiness: `GET /readyz`), never answered
    /// from a cache; `Unavailable` when it does not answer.
    async fn ping(&self) -> Result<(), StoreError> {
        Ok(())
    }

    /// A number that changes whenever any node or flavor is written through this store,
    /// for caches of derived data; `None` when the store does not keep one.
    fn content_epoch(&self) -> Option<u64> {
        None
    }

    async fn node_get(&self, uuid: &NodeUuid) -> Result<Option<Node>, StoreError>;
    /// A read-only copy for hot read paths; caching stores hand out their copy without
    /// cloning the record.
    async fn node_get_shared(&self, uuid: &NodeUuid) -> Result<Option<Arc<Node>>, StoreError> {
        Ok(self.node_get(uuid).await?.map(Arc::new))
    }
    /// Nodes in uuid order matching `filter`, at most `filter.limit`.
    async fn node_list(&self, filter: &NodeFilter) -> Result<Vec<Node>, StoreError>;
    async fn node_count_by_state(&self) -> Result<StateCounts, StoreError>;
    /// How many nodes are in each (state, rack, role), in that order, for metrics. The
    /// default pages through [`Store::node_list`]; SQL stores count with one query.
    async fn node_tally(&self) -> Result<Vec<NodeTally>, StoreError> {
        let mut tally = std::collections::BTreeMap::<_, u64>::new();
        let mut filter = NodeFilter {
            limit: LIST_LIMIT_MAX,
            ..Default::default()
        };
        // Bounded: a hundred pages are a million nodes.
        for _ in 0..100 {
            let page = self.node_list(&filter).await?;
            let full = page.len() == LIST_LIMIT_MAX;
            filter.after = page.last().map(|n| n.uuid.clone());
            for node in &page {
                *tally
                    .entry((node.state, node.rack.clone(), node.role))
                    .or_default() += 1;
            }
            if !full {
                break;
            }
        }
        Ok(tally
            .into_iter()
            .map(|((state, rack, role), count)| NodeTally {
                state,
                rack,
                role,
                count,
            })
            .collect())
    }
    /// Light health records of every node expected to heartbeat (Ready or Suspect), with
    /// their last power reading, for the controller's every-second judgement.
    async fn node_health_list(&self) -> Result<Vec<crate::core::health::NodeHealth>, StoreError> {
        use crate::core::lifecycle::LifecycleState as S;
        let mut out = nodes_in_states(
            self,
            &[S::Ready, S::Suspect],
            crate::core::health::NodeHealth::of,
        )
        .await?;
        for health in &mut out {
            health.power = self.node_power_get(&health.uuid).await?;
        }
        Ok(out)
    }
    /// What the boot watchdog needs of every node that is booting (Registered or
    /// Provisioning), read every `boot_scan_ms`.
    async fn node_booting_list(
        &self,
    ) -> Result<Vec<crate::core::controller::BootingNode>, StoreError> {
        use crate::core::lifecycle::LifecycleState as S;
        nodes_in_states(
            self,
            &[S::Registered, S::Provisioning],
            crate::core::controller::BootingNode::of,
        )
        .await
    }
    /// Records `reading` as the last BMC power reading of `uuid` (power sync), with its
    /// audit events, in one transaction — unless a newer reading is already stored, in
    /// which case nothing is written and `false` returned. The node record itself is not
    /// touched (no generation bump). `NotFound` for an unknown node.
    async fn node_power_record(
        &self,
        uuid: &NodeUuid,
        reading: &PowerReading,
        events: &[NewEvent],
    ) -> Result<bool, StoreError>;
    /// The last BMC power reading of `uuid`, if one was ever recorded.
    async fn node_power_get(&self, uuid: &NodeUuid) -> Result<Option<PowerReading>, StoreError>;
    /// Inserts a new node (its generation is stored as given) with its audit events.
    async fn node_create(&self, node: &Node, events: &[NewEvent]) -> Result<Node, StoreError>;
    /// Writes `node` if the stored generation still equals `node.generation`; the stored
    /// and returned generation is one higher. Events are written in the same transaction.
    /// A node whose new state is `retired` has its addresses released in that transaction.
    async fn node_update(&self, node: &Node, events: &[NewEvent]) -> Result<Node, StoreError>;
    /// Registers a node in one transaction: checks the create or the generation, allocates
    /// each requested address (idempotently: a slot the node already holds is kept),
    /// writes the addresses into the node record, writes the node and the events. Any
    /// failure rolls everything back.
    async fn node_register(&self, write: &RegistrationWrite) -> Result<Registered, StoreError>;
    /// Records liveness without bumping the generation (the hot path: every node, every
    /// few seconds, must not conflict with operator edits).
    async fn node_record_heartbeat(
        &self,
        uuid: &NodeUuid,
        at_ms: TimestampMs,
    ) -> Result<(), StoreError>;

    /// Creates a flavor with its audit events; `AlreadyExists` when one of that name exists
    /// (decided by the database's key, so of two concurrent creates exactly one wins).
    async fn flavor_create(
        &self,
        flavor: &Flavor,
        at_ms: TimestampMs,
        events: &[NewEvent],
    ) -> Result<(), StoreError>;
    /// Creates or replaces a flavor, with its audit events.
    async fn flavor_put(
        &self,
        flavor: &Flavor,
        at_ms: TimestampMs,
        events: &[NewEvent],
    ) -> Result<(), StoreError>;
    async fn flavor_get(&self, name: &str) -> Result<Option<Flavor>, StoreError>;
    /// Like [`Store::node_get_shared`], for flavors.
    async fn flavor_get_shared(&self, name: &str) -> Result<Option<Arc<Flavor>>, StoreError> {
        Ok(self.flavor_get(name).await?.map(Arc::new))
    }
    async fn flavor_list(&self) -> Result<Vec<Flavor>, StoreError>;
    /// Deletes a flavor no node uses, with its audit events; `InUse` otherwise.
    async fn flavor_delete(&self, name: &str, events: &[NewEvent]) -> Result<(), StoreError>;

    /// Adds a firmware bundle with its audit events; `AlreadyExists` when the name is taken.
    async fn firmware_bundle_create(
        &self,
        bundle: &FirmwareBundle,
        events: &[NewEvent],
    ) -> Result<(), StoreError>;
    /// Every bundle, by name.
    async fn firmware_bundle_list(&self) -> Result<Vec<FirmwareBundle>, StoreError>;
    /// Deletes a bundle with its audit events; `NotFound` when there is none of that name.
    async fn firmware_bundle_delete(
        &self,
        name: &str,
        events: &[NewEvent],
    ) -> Result<(), StoreError>;
    /// The fleet's firmware rollout; generation 0 (and empty) before the first write.
    async fn firmware_rollout_get(&self) -> Result<FirmwareRollout, StoreError>;
    /// Writes the rollout if the stored one is still at `rollout.generation` (`Conflict`
    /// otherwise), with its audit events; returns it at its new generation.
    async fn firmware_rollout_put(
        &self,
        rollout: &FirmwareRollout,
        events: &[NewEvent],
    ) -> Result<FirmwareRollout, StoreError>;
    /// Writes `node` (at its generation, as [`Store::node_update`]) and `rollout` (at its
    /// generation, as [`Store::firmware_rollout_put`]) in one transaction, with events.
    async fn node_update_with_rollout(
        &self,
        node: &Node,
        rollout: &FirmwareRollout,
        events: &[NewEvent],
    ) -> Result<Node, StoreError>;

    /// The drill board: the drill running now and the kill switch; generation 0 (empty)
    /// before the first write.
    async fn drill_board_get(&self) -> Result<crate::core::drill::DrillBoard, StoreError>;
    /// Writes the board if the stored one is still at `board.generation` (`Conflict`
    /// otherwise) with its audit events; `finished` (a drill the write ends) is filed in
    /// the history in the same transaction. Returns the board at its new generation.
    async fn drill_board_put(
        &self,
        board: &crate::core::drill::DrillBoard,
        finished: Option<&crate::core::drill::Drill>,
        events: &[NewEvent],
    ) -> Result<crate::core::drill::DrillBoard, StoreError>;
    /// Finished drills, newest first.
    async fn drill_list(&self, limit: usize) -> Result<Vec<crate::core::drill::Drill>, StoreError>;
    async fn drill_get(&self, id: i64) -> Result<Option<crate::core::drill::Drill>, StoreError>;

    /// Creates a pool with its audit events; `AlreadyExists` when the name is taken.
    async fn pool_create(&self, pool: &IpPool, events: &[NewEvent]) -> Result<(), StoreError>;
    async fn pool_get(&self, name: &str) -> Result<Option<IpPool>, StoreError>;
    async fn pool_list(&self) -> Result<Vec<IpPool>, StoreError>;
    /// Deletes a pool with no allocations, with its audit events; `InUse` otherwise.
    async fn pool_delete(&self, name: &str, events: &[NewEvent]) -> Result<(), StoreError>;

    /// Gives `node_uuid` an address of `purpose` from `pool`, or returns the one it already
    /// has for that purpose (idempotent: a retried registration gets the same address).
    async fn ip_allocate(
        &self,
        pool: &str,
        node_uuid: &NodeUuid,
        purpose: PoolPurpose,
        at_ms: TimestampMs,
    ) -> Result<IpAllocation, StoreError>;
    /// Allocations, optionally only one pool's or one node's, in address order.
    async fn ip_list(
        &self,
        pool: Option<&str>,
        node_uuid: Option<&NodeUuid>,
    ) -> Result<Vec<IpAllocation>, StoreError>;

    /// Releases every address held by `node_uuid`; returns how many were released.
    async fn ip_release_node(&self, node_uuid: &NodeUuid) -> Result<usize, StoreError>;

    /// Allocations nothing accounts for, in address order: those whose node does not
    /// exist, and those whose node's record does not name the address (leftovers of an
    /// older version that allocated and wrote the node in separate transactions). A
    /// consistent store has none; this only reads.
    async fn ip_orphans(&self) -> Result<Vec<OrphanAllocation>, StoreError>;

    async fn event_append(&self, events: &[NewEvent]) -> Result<(), StoreError>;
    /// Newest first.
    async fn event_list(&self, filter: &EventFilter) -> Result<Vec<Event>, StoreError>;

    /// Inserts a new remediation (the store assigns its id) with its audit events.
    /// `AlreadyExists` when the node already has an active one. With `fence` (a leader's
    /// epoch), only while the controller's lease is still at that epoch, checked in the
    /// same transaction (`Fenced` otherwise).
    async fn remediation_create(
        &self,
        remediation: &Remediation,
        events: &[NewEvent],
        fence: Option<i64>,
    ) -> Result<Remediation, StoreError>;
    /// Writes `remediation` (and `node`, when given) if their stored generations still
    /// equal the given ones, with the events, in one transaction. Returns both as stored.
    /// `fence` as for [`Store::remediation_create`].
    async fn remediation_update(
        &self,
        remediation: &Remediation,
        node: Option<&Node>,
        events: &[NewEvent],
        fence: Option<i64>,
    ) -> Result<(Remediation, Option<Node>), StoreError>;

    /// Takes the controller's lease for `holder` when it is free or lapsed (the epoch
    /// grows by one), or renews it when `holder` holds it, for `ttl_ms` on the store's
    /// own clock, saving `memory` (its controller's) on a renewal; returns the lease as it
    /// stands after (another's, when another holds it), with the memory it carries.
    /// `now_ms` is the caller's clock, for a store without one of its own (in memory).
    async fn lease_acquire(
        &self,
        holder: &str,
        ttl_ms: i64,
        now_ms: TimestampMs,
        memory: Option<&str>,
    ) -> Result<Lease, StoreError>;
    /// Ends `holder`'s lease of `epoch` now (a clean shutdown: the next replica need not
    /// wait out the TTL). Nothing when it is not theirs any more.
    async fn lease_release(
        &self,
        holder: &str,
        epoch: i64,
        now_ms: TimestampMs,
    ) -> Result<(), StoreError>;
    /// Records that `replica` is alive (its last-seen time is the store's clock).
    async fn replica_report(
        &self,
        replica: &Replica,
        now_ms: TimestampMs,
    ) -> Result<(), StoreError>;
    /// The lease and every replica that ever reported, with the store's clock
    /// (`enabled` is the caller's to set).
    async fn cluster_read(&self, now_ms: TimestampMs) -> Result<ClusterStatus, StoreError>;
    async fn remediation_get(&self, id: i64) -> Result<Option<Remediation>, StoreError>;
    /// Newest first; only active ones when `active_only`; only one node's when given.
    async fn remediation_list(
        &self,
        active_only: bool,
        node_uuid: Option<&NodeUuid>,
        limit: usize,
    ) -> Result<Vec<Remediation>, StoreError>;

    /// Creates a token with its audit events; `AlreadyExists` when the name is taken.
    /// `expires_at_ms`: when it stops being accepted (`None`: never).
    async fn token_create(
        &self,
        name: &str,
        role: TokenRole,
        secret_sha256: &str,
        at_ms: TimestampMs,
        expires_at_ms: Option<TimestampMs>,
        events: &[NewEvent],
    ) -> Result<ApiToken, StoreError>;
    async fn token_find(&self, secret_sha256: &str) -> Result<Option<ApiToken>, StoreError>;
    /// Records that token `id` was used at `at_ms`, unless a use at or after
    /// `at_ms - interval_ms` is already recorded (so replicas and concurrent requests
    /// write it at most once per interval); `true` when written. No audit event (it
    /// would be one per interval per token) and no error for a token deleted meanwhile.
    async fn token_record_use(
        &self,
        id: i64,
        at_ms: TimestampMs,
        interval_ms: TimestampMs,
    ) -> Result<bool, StoreError>;
    async fn token_list(&self) -> Result<Vec<ApiToken>, StoreError>;
    /// Deletes a token with its audit events; `NotFound` when there is none of that name.
    async fn token_delete(&self, name: &str, events: &[NewEvent]) -> Result<(), StoreError>;
}

/// Nodes in one (state, rack, role), for metrics.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct NodeTally {
    pub state: crate::core::lifecycle::LifecycleState,
    pub rack: Option<String>,
    pub role: crate::core::model::NodeRole,
    pub count: u64,
}

/// Upper bound on any listing, whatever the caller asks for.
pub const LIST_LIMIT_MAX: usize = 10_000;

/// Every node in `states` (page by page, in uuid order within each state), as `view`
/// makes of it. Bounded: a million nodes per state is a hundred pages.
async fn nodes_in_states<S, T, F>(
    store: &S,
    states: &[crate::core::lifecycle::LifecycleState],
    view: F,
) -> Result<Vec<T>, StoreError>
where
    S: Store + ?Sized,
    T: Send,
    F: Fn(&Node) -> T + Send + Sync,
{
    let mut out = Vec::new();
    for state in states {
        let mut filter = NodeFilter {
            state: Some(*state),
            limit: LIST_LIMIT_MAX,
            ..Default::default()
        };
        for _ in 0..100 {
            let page = store.node_list(&filter).await?;
            let full = page.len() == LIST_LIMIT_MAX;
            filter.after = page.last().map(|n| n.uuid.clone());
            out.extend(page.iter().map(&view));
            if !full {
                break;
            }
        }
    }
    Ok(out)
}

pub(crate) fn clamp_limit(limit: usize) -> usize {
    if limit == 0 {
        LIST_LIMIT_MAX
    } else {
        limit.min(LIST_LIMIT_MAX)
    }
}
