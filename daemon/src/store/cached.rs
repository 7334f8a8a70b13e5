//! A read-through cache of nodes and flavors in front of another store.
//!
//! The boot endpoints read a node and its flavor on every request; during a boot storm
//! that is thousands of reads a second for records that rarely change. Writes go through
//! this wrapper, which refreshes its copy from what the store returns.
//!
//! Architecture invariant: without a maximum age this is correct only while this daemon
//! is the sole writer of its database (one daemon per database, as documented in
//! ARCHITECTURE.md). A replica of several uses [`CachedStore::with_max_age`] and, on
//! PostgreSQL, a listener (`store::sql::notify`) that calls [`CachedStore::evict_node`],
//! [`CachedStore::evict_flavor`] or [`CachedStore::clear`] when another replica's write
//! commits: what another replica wrote is then served once its notification arrives
//! (milliseconds), and at most `max_age` late when notifications are lost (the stated
//! staleness bound: everything cached is dropped once it is that old); this replica's
//! own writes at once. A read that raced an eviction does not cache what it read, so a
//! notification can never be undone by a read that started before it. A cached entry is
//! replaced only by a copy of a higher generation, so a slow reader can never reinstall
//! a stale record over a fresh one; a write refused as stale evicts the entry, so the
//! next read fetches the record another replica wrote.

use std::collections::BTreeMap;

use indexmap::IndexMap;
use std::sync::{Arc, Mutex};

use async_trait::async_trait;
use bearman_proto::uuid::NodeUuid;

use super::{OrphanAllocation, Registered, RegistrationWrite, Store, StoreError};
use crate::core::cluster::{ClusterStatus, Lease, Replica};
use crate::core::firmware::{FirmwareBundle, FirmwareRollout};
use crate::core::model::{
    ApiToken, Event, EventFilter, Flavor, IpAllocation, IpPool, NewEvent, Node, NodeFilter,
    PoolPurpose, StateCounts, TimestampMs, TokenRole,
};
use crate::core::remediation::Remediation;

/// Entries kept before the cache starts over; bounds memory on huge fleets.
pub const CACHED_NODES_MAX: usize = 200_000;

/// Shards of [`CachedStore`]'s eviction count.
const EVICTION_SHARDS: usize = 64;

/// The shard of `key` (FNV-1a: deterministic, no per-process seed).
fn eviction_shard(key: &str) -> usize {
    let hash = key.bytes().fold(0xcbf2_9ce4_8422_2325_u64, |hash, byte| {
        (hash ^ u64::from(byte)).wrapping_mul(0x0100_0000_01b3)
    });
    (hash % EVICTION_SHARDS as u64) as usize
}

/// The clock a cache with a maximum age reads (the store layer names no clock of its own).
pub type CacheClock = Arc<dyn Fn() -> TimestampMs + Send + Sync>;

/// How old a cached copy may get: one of several writers of the database.
struct MaxAge {
    max_age_ms: i64,
    now: CacheClock,
    /// When the cache was last emptied.
    emptied_at_ms: std::sync::atomic::AtomicI64,
}

pub struct CachedStore {
    inner: Arc<dyn Store>,
    /// Bumped after every node or flavor write (see `Store::content_epoch`), and when
    /// the cache is emptied for its age.
    epoch: std::sync::atomic::AtomicU64,
    /// Looked up on every boot request and heartbeat: hashed, where ordered lookups
    /// compared a dozen and more uuids each. An `IndexMap` iterates in insertion order
    /// whatever its hasher (nothing walks this one, but simulated code keeps to maps whose
    /// order is the same in every run).
    nodes: Mutex<IndexMap<NodeUuid, Arc<Node>>>,
    flavors: Mutex<BTreeMap<String, Arc<Flavor>>>,
    max_age: Option<MaxAge>,
    /// Evictions from outside (a notification, the age), counted per shard of keys and
    /// bumped under the lock of the map evicted from: a copy read or written is cached
    /// only if its shard's count did not move meanwhile, so it cannot reinstall what an
    /// eviction just dropped. Sharded so that other nodes' notifications during a boot
    /// storm rarely keep a read from being cached.
    evictions: [std::sync::atomic::AtomicU64; EVICTION_SHARDS],
    /// The task that feeds the evictions, stopped with the cache.
    listener: Mutex<Option<tokio::task::AbortHandle>>,
}

impl Drop for CachedStore {
    fn drop(&mut self) {
        if let Some(listener) = self.listener.get_mut().ok().and_then(|l| l.take()) {
            listener.abort();
        }
    }
}

impl CachedStore {
    pub fn new(inner: Arc<dyn Store>) -> Self {
        CachedStore {
            inner,
            epoch: std::sync::atomic::AtomicU64::new(1),
            nodes: Mutex::new(IndexMap::new()),
            flavors: Mutex::new(BTreeMap::new()),
            max_age: None,
            evictions: std::array::from_fn(|_| std::sync::atomic::AtomicU64::new(0)),
            listener: Mutex::new(None),
        }
    }

    /// Forgets node `uuid` (another replica changed it); the next read fetches it.
    pub fn evict_node(&self, uuid: &NodeUuid) {
        {
            let mut nodes = self.nodes();
            nodes.swap_remove(uuid);
            self.evicted(uuid.as_str());
        }
        self.bump();
    }

    /// Forgets flavor `name` (another replica changed or deleted it).
    pub fn evict_flavor(&self, name: &str) {
        {
            let mut flavors = self.flavors();
            flavors.remove(name);
            self.evicted(name);
        }
        self.bump();
    }

    /// Forgets everything (notifications may have been missed).
    pub fn clear(&self) {
        {
            let mut nodes = self.nodes();
            nodes.clear();
            self.evicted_all();
        }
        {
            let mut flavors = self.flavors();
            flavors.clear();
            self.evicted_all();
        }
        self.bump();
    }

    /// Moves the cached copy's last heartbeat forward to `at_ms` in place (a heartbeat
    /// bumps no generation).
    fn note_heartbeat(&self, uuid: &NodeUuid, at_ms: TimestampMs) {
        if let Some(node) = self.nodes().get_mut(uuid) {
            let newer = node.last_heartbeat_at_ms.unwrap_or(at_ms).max(at_ms);
            if node.last_heartbeat_at_ms != Some(newer) {
                Arc::make_mut(node).last_heartbeat_at_ms = Some(newer);
            }
        }
    }

    /// Stops `listener` (the task feeding this cache its evictions) when the cache is dropped.
    pub fn stop_on_drop(&self, listener: tokio::task::AbortHandle) {
        let mut slot = self.listener.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(previous) = slot.replace(listener) {
            previous.abort();
        }
    }

    /// As [`CachedStore::remember`], for a flavor.
    fn remember_flavor(&self, flavor: &Flavor, before: u64) {
        let mut flavors = self.flavors();
        if before != self.evictions(&flavor.name) {
            flavors.remove(&flavor.name);
            return;
        }
        flavors.insert(flavor.name.clone(), Arc::new(flavor.clone()));
    }

    fn evictions(&self, key: &str) -> u64 {
        self.evictions[eviction_shard(key)].load(std::sync::atomic::Ordering::SeqCst)
    }

    fn evicted(&self, key: &str) {
        self.evictions[eviction_shard(key)].fetch_add(1, std::sync::atomic::Ordering::SeqCst);
    }

    fn evicted_all(&self) {
        for shard in &self.evictions {
            shard.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
        }
    }

    /// A cache for one of several writers: nothing it serves is older than
    /// `max_age_ms` by `now`.
    pub fn with_max_age(inner: Arc<dyn Store>, max_age_ms: i64, now: CacheClock) -> Self {
        let emptied_at_ms = std::sync::atomic::AtomicI64::new(now());
        let mut cache = CachedStore::new(inner);
        cache.max_age = Some(MaxAge {
            max_age_ms: max_age_ms.max(1),
            now,
            emptied_at_ms,
        });
        cache
    }

    /// Empties the cache when it is `max_age_ms` old (other replicas may have written).
    fn expire(&self) {
        let Some(max_age) = &self.max_age else {
            return;
        };
        let now = (max_age.now)();
        let emptied = max_age
            .emptied_at_ms
            .load(std::sync::atomic::Ordering::SeqCst);
        if now - emptied < max_age.max_age_ms {
            return;
        }
        // One reader empties it; the others see the new time and go on.
        if max_age
            .emptied_at_ms
            .compare_exchange(
                emptied,
                now,
                std::sync::atomic::Ordering::SeqCst,
                std::sync::atomic::Ordering::SeqCst,
            )
            .is_ok()
        {
            self.clear();
        }
    }

    fn nodes(&self) -> std::sync::MutexGuard<'_, IndexMap<NodeUuid, Arc<Node>>> {
        self.nodes.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn flavors(&self) -> std::sync::MutexGuard<'_, BTreeMap<String, Arc<Flavor>>> {
        self.flavors.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Marks that content changed; called after the write and the cache refresh, so a
    /// reader who sees the new epoch also sees the new record.
    fn bump(&self) {
        self.epoch.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
    }

    /// After a write of `node` (begun when the eviction count was `before`): caches what
    /// was stored, or forgets the node when the write failed (it may have committed
    /// anyway, or the record changed under it).
    fn after_node_write(
        &self,
        node: &Node,
        before: u64,
        written: Result<Node, StoreError>,
    ) -> Result<Node, StoreError> {
        match &written {
            Ok(updated) => self.remember(updated, before),
            Err(_) => {
                self.nodes().swap_remove(&node.uuid);
            }
        }
        self.bump();
        written
    }

    /// Caches `node` as read or written when the eviction count was `before`, unless
    /// something was evicted since: that eviction may be for a write newer than `node`
    /// (a notification that overtook this read or write), and the next read refetches.
    fn remember(&self, node: &Node, before: u64) {
        let mut nodes = self.nodes();
        if before != self.evictions(node.uuid.as_str()) {
            nodes.swap_remove(&node.uuid);
            return;
        }
        if nodes.len() >= CACHED_NODES_MAX && !nodes.contains_key(&node.uuid) {
            nodes.clear();
        }
        match nodes.get_mut(&node.uuid) {
            Some(cached) if cached.generation > node.generation => {}
            Some(cached) => {
                let heartbeat = cached.last_heartbeat_at_ms.max(node.last_heartbeat_at_ms);
                let mut fresh = node.clone();
                fresh.last_heartbeat_at_ms = heartbeat;
                *cached = Arc::new(fresh);
            }
            None => {
                nodes.insert(node.uuid.clone(), Arc::new(node.clone()));
            }
        }
    }
}

#[async_trait]
impl Store for CachedStore {
    fn backend_name(&self) -> &'static str {
        self.inner.backend_name()
    }

    async fn ping(&self) -> Result<(), StoreError> {
        self.inner.ping().await
    }

    fn content_epoch(&self) -> Option<u64> {
        self.expire();
        Some(self.epoch.load(std::sync::atomic::Ordering::SeqCst))
    }

    async fn node_get(&self, uuid: &NodeUuid) -> Result<Option<Node>, StoreError> {
        Ok(self
            .node_get_shared(uuid)
            .await?
            .map(|node| (*node).clone()))
    }

    async fn node_get_shared(&self, uuid: &NodeUuid) -> Result<Option<Arc<Node>>, StoreError> {
        self.expire();
        if let Some(node) = self.nodes().get(uuid) {
            return Ok(Some(node.clone()));
        }
        let before = self.evictions(uuid.as_str());
        let node = self.inner.node_get(uuid).await?;
        if let Some(node) = &node {
            self.remember(node, before);
        }
        Ok(self.nodes().get(uuid).cloned().or(node.map(Arc::new)))
    }

    async fn node_list(&self, filter: &NodeFilter) -> Result<Vec<Node>, StoreError> {
        self.inner.node_list(filter).await
    }

    async fn node_health_list(&self) -> Result<Vec<crate::core::health::NodeHealth>, StoreError> {
        self.inner.node_health_list().await
    }

    // The booting list is not cached either: it needs every booting node, and the cache
    // holds only those read lately.
    async fn node_booting_list(
        &self,
    ) -> Result<Vec<crate::core::controller::BootingNode>, StoreError> {
        self.inner.node_booting_list().await
    }

    // Power readings are not cached: only the controller reads them, once per tick, and
    // they are not part of the node record the boot path serves.
    async fn node_power_record(
        &self,
        uuid: &NodeUuid,
        reading: &crate::core::power_sync::PowerReading,
        events: &[NewEvent],
    ) -> Result<bool, StoreError> {
        self.inner.node_power_record(uuid, reading, events).await
    }

    async fn node_power_get(
        &self,
        uuid: &NodeUuid,
    ) -> Result<Option<crate::core::power_sync::PowerReading>, StoreError> {
        self.inner.node_power_get(uuid).await
    }

    async fn node_count_by_state(&self) -> Result<StateCounts, StoreError> {
        self.inner.node_count_by_state().await
    }

    async fn node_tally(&self) -> Result<Vec<crate::store::NodeTally>, StoreError> {
        self.inner.node_tally().await
    }

    async fn node_create(&self, node: &Node, events: &[NewEvent]) -> Result<Node, StoreError> {
        let before = self.evictions(node.uuid.as_str());
        let created = self.inner.node_create(node, events).await?;
        self.remember(&created, before);
        self.bump();
        Ok(created)
    }

    async fn node_update(&self, node: &Node, events: &[NewEvent]) -> Result<Node, StoreError> {
        let before = self.evictions(node.uuid.as_str());
        let written = self.inner.node_update(node, events).await;
        self.after_node_write(node, before, written)
    }

    async fn node_register(&self, write: &RegistrationWrite) -> Result<Registered, StoreError> {
        let before = self.evictions(write.node.uuid.as_str());
        match self.inner.node_register(write).await {
            Ok(registered) => {
                self.remember(&registered.node, before);
                self.bump();
                Ok(registered)
            }
            Err(error) => {
                // As for a failed update: the cached copy may be the stale one that lost.
                self.nodes().swap_remove(&write.node.uuid);
                self.bump();
                Err(error)
            }
        }
    }

    async fn node_record_heartbeat(
        &self,
        uuid: &NodeUuid,
        at_ms: TimestampMs,
    ) -> Result<(), StoreError> {
        self.inner.node_record_heartbeat(uuid, at_ms).await?;
        self.note_heartbeat(uuid, at_ms);
        Ok(())
    }

    async fn firmware_bundle_create(
        &self,
        bundle: &FirmwareBundle,
        events: &[NewEvent],
    ) -> Result<(), StoreError> {
        self.inner.firmware_bundle_create(bundle, events).await
    }

    async fn firmware_bundle_list(&self) -> Result<Vec<FirmwareBundle>, StoreError> {
        self.inner.firmware_bundle_list().await
    }

    async fn firmware_bundle_delete(
        &self,
        name: &str,
        events: &[NewEvent],
    ) -> Result<(), StoreError> {
        self.inner.firmware_bundle_delete(name, events).await
    }

    async fn drill_board_get(&self) -> Result<crate::core::drill::DrillBoard, StoreError> {
        self.inner.drill_board_get().await
    }

    async fn drill_board_put(
        &self,
        board: &crate::core::drill::DrillBoard,
        finished: Option<&crate::core::drill::Drill>,
        events: &[NewEvent],
    ) -> Result<crate::core::drill::DrillBoard, StoreError> {
        self.inner.drill_board_put(board, finished, events).await
    }

    async fn drill_list(&self, limit: usize) -> Result<Vec<crate::core::drill::Drill>, StoreError> {
        self.inner.drill_list(limit).await
    }

    async fn drill_get(&self, id: i64) -> Result<Option<crate::core::drill::Drill>, StoreError> {
        self.inner.drill_get(id).await
    }

    async fn firmware_rollout_get(&self) -> Result<FirmwareRollout, StoreError> {
        self.inner.firmware_rollout_get().await
    }

    async fn firmware_rollout_put(
        &self,
        rollout: &FirmwareRollout,
        events: &[NewEvent],
    ) -> Result<FirmwareRollout, StoreError> {
        self.inner.firmware_rollout_put(rollout, events).await
    }

    async fn node_update_with_rollout(
        &self,
        node: &Node,
        rollout: &FirmwareRollout,
        events: &[NewEvent],
    ) -> Result<Node, StoreError> {
        let before = self.evictions(node.uuid.as_str());
        let written = self
            .inner
            .node_update_with_rollout(node, rollout, events)
            .await;
        self.after_node_write(node, before, written)
    }

    async fn flavor_create(
        &self,
        flavor: &Flavor,
        at_ms: TimestampMs,
        events: &[NewEvent],
    ) -> Result<(), StoreError> {
        let before = self.evictions(&flavor.name);
        let written = self.inner.flavor_create(flavor, at_ms, events).await;
        if written.is_ok() {
            self.remember_flavor(flavor, before);
            self.bump();
        }
        written
    }

    async fn flavor_put(
        &self,
        flavor: &Flavor,
        at_ms: TimestampMs,
        events: &[NewEvent],
    ) -> Result<(), StoreError> {
        self.flavors().remove(&flavor.name);
        let before = self.evictions(&flavor.name);
        let written = self.inner.flavor_put(flavor, at_ms, events).await;
        if written.is_ok() {
            self.remember_flavor(flavor, before);
        }
        self.bump();
        written
    }

    async fn flavor_get(&self, name: &str) -> Result<Option<Flavor>, StoreError> {
        Ok(self
            .flavor_get_shared(name)
            .await?
            .map(|flavor| (*flavor).clone()))
    }

    async fn flavor_get_shared(&self, name: &str) -> Result<Option<Arc<Flavor>>, StoreError> {
        self.expire();
        if let Some(flavor) = self.flavors().get(name) {
            return Ok(Some(flavor.clone()));
        }
        let before = self.evictions(name);
        let flavor = self.inner.flavor_get(name).await?.map(Arc::new);
        if let Some(flavor) = &flavor {
            self.remember_flavor(flavor, before);
        }
        Ok(flavor)
    }

    async fn flavor_list(&self) -> Result<Vec<Flavor>, StoreError> {
        self.inner.flavor_list().await
    }

    async fn flavor_delete(&self, name: &str, events: &[NewEvent]) -> Result<(), StoreError> {
        self.flavors().remove(name);
        let deleted = self.inner.flavor_delete(name, events).await;
        self.bump();
        deleted
    }

    async fn pool_create(&self, pool: &IpPool, events: &[NewEvent]) -> Result<(), StoreError> {
        self.inner.pool_create(pool, events).await
    }

    async fn pool_get(&self, name: &str) -> Result<Option<IpPool>, StoreError> {
        self.inner.pool_get(name).await
    }

    async fn pool_list(&self) -> Result<Vec<IpPool>, StoreError> {
        self.inner.pool_list().await
    }

    async fn pool_delete(&self, name: &str, events: &[NewEvent]) -> Result<(), StoreError> {
        self.inner.pool_delete(name, events).await
    }

    async fn ip_allocate(
        &self,
        pool: &str,
        node_uuid: &NodeUuid,
        purpose: PoolPurpose,
        at_ms: TimestampMs,
    ) -> Result<IpAllocation, StoreError> {
        self.inner
            .ip_allocate(pool, node_uuid, purpose, at_ms)
            .await
    }

    async fn ip_list(
        &self,
        pool: Option<&str>,
        node_uuid: Option<&NodeUuid>,
    ) -> Result<Vec<IpAllocation>, StoreError> {
        self.inner.ip_list(pool, node_uuid).await
    }

    async fn ip_release_node(&self, node_uuid: &NodeUuid) -> Result<usize, StoreError> {
        self.inner.ip_release_node(node_uuid).await
    }

    async fn ip_orphans(&self) -> Result<Vec<OrphanAllocation>, StoreError> {
        self.inner.ip_orphans().await
    }

    async fn event_append(&self, events: &[NewEvent]) -> Result<(), StoreError> {
        self.inner.event_append(events).await
    }

    async fn event_list(&self, filter: &EventFilter) -> Result<Vec<Event>, StoreError> {
        self.inner.event_list(filter).await
    }

    async fn remediation_create(
        &self,
        remediation: &Remediation,
        events: &[NewEvent],
        fence: Option<i64>,
    ) -> Result<Remediation, StoreError> {
        self.inner
            .remediation_create(remediation, events, fence)
            .await
    }

    async fn remediation_update(
        &self,
        remediation: &Remediation,
        node: Option<&Node>,
        events: &[NewEvent],
        fence: Option<i64>,
    ) -> Result<(Remediation, Option<Node>), StoreError> {
        let before = node.map(|node| self.evictions(node.uuid.as_str()));
        match self
            .inner
            .remediation_update(remediation, node, events, fence)
            .await
        {
            Ok((remediation, node)) => {
                if let (Some(node), Some(before)) = (&node, before) {
                    self.remember(node, before);
                    self.bump();
                }
                Ok((remediation, node))
            }
            Err(error) => {
                if let Some(node) = node {
                    self.nodes().swap_remove(&node.uuid);
                    self.bump();
                }
                Err(error)
            }
        }
    }

    async fn remediation_get(&self, id: i64) -> Result<Option<Remediation>, StoreError> {
        self.inner.remediation_get(id).await
    }

    async fn lease_acquire(
        &self,
        holder: &str,
        ttl_ms: i64,
        now_ms: TimestampMs,
        memory: Option<&str>,
    ) -> Result<Lease, StoreError> {
        self.inner
            .lease_acquire(holder, ttl_ms, now_ms, memory)
            .await
    }

    async fn lease_release(
        &self,
        holder: &str,
        epoch: i64,
        now_ms: TimestampMs,
    ) -> Result<(), StoreError> {
        self.inner.lease_release(holder, epoch, now_ms).await
    }

    async fn replica_report(
        &self,
        replica: &Replica,
        now_ms: TimestampMs,
    ) -> Result<(), StoreError> {
        self.inner.replica_report(replica, now_ms).await
    }

    async fn cluster_read(&self, now_ms: TimestampMs) -> Result<ClusterStatus, StoreError> {
        self.inner.cluster_read(now_ms).await
    }

    async fn remediation_list(
        &self,
        active_only: bool,
        node_uuid: Option<&NodeUuid>,
        limit: usize,
    ) -> Result<Vec<Remediation>, StoreError> {
        self.inner
            .remediation_list(active_only, node_uuid, limit)
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
        self.inner
            .token_create(name, role, secret_sha256, at_ms, expires_at_ms, events)
            .await
    }

    async fn token_find(&self, secret_sha256: &str) -> Result<Option<ApiToken>, StoreError> {
        self.inner.token_find(secret_sha256).await
    }

    async fn token_record_use(
        &self,
        id: i64,
        at_ms: TimestampMs,
        interval_ms: TimestampMs,
    ) -> Result<bool, StoreError> {
        self.inner.token_record_use(id, at_ms, interval_ms).await
    }

    async fn token_list(&self) -> Result<Vec<ApiToken>, StoreError> {
        self.inner.token_list().await
    }

    async fn token_delete(&self, name: &str, events: &[NewEvent]) -> Result<(), StoreError> {
        self.inner.token_delete(name, events).await
    }
}

#[cfg(test)]
mod tests {
    use std::sync::atomic::{AtomicI64, Ordering};

    use super::*;
    use crate::core::model::NodeRole;
    use crate::store::memory::MemoryStore;

    /// Two replicas' caches over one database, on a clock the test moves.
    fn replicas(max_age_ms: i64) -> (CachedStore, CachedStore, Arc<AtomicI64>) {
        let database: Arc<dyn Store> = Arc::new(MemoryStore::new());
        let clock = Arc::new(AtomicI64::new(1_000));
        let now: CacheClock = {
            let clock = clock.clone();
            Arc::new(move || clock.load(Ordering::SeqCst))
        };
        (
            CachedStore::with_max_age(database.clone(), max_age_ms, now.clone()),
            CachedStore::with_max_age(database, max_age_ms, now),
            clock,
        )
    }

    #[tokio::test]
    async fn another_replicas_write_is_served_at_most_max_age_late() {
        let (a, b, clock) = replicas(1_000);
        let uuid = NodeUuid::from_index(3, 1);
        let node = Node::new(uuid.clone(), "cn1".into(), NodeRole::Compute, 0);
        a.node_create(&node, &[]).await.unwrap();
        let epoch_before = a.content_epoch();
        // B changes the node; A still serves its copy, within the bound ...
        let mut changed = b.node_get(&uuid).await.unwrap().unwrap();
        changed.flavor = Some("hv".into());
        b.node_update(&changed, &[]).await.unwrap();
        clock.fetch_add(999, Ordering::SeqCst);
        assert_eq!(a.node_get(&uuid).await.unwrap().unwrap().flavor, None);
        assert_eq!(a.content_epoch(), epoch_before);
        // ... and B's write once the bound has passed; the content epoch moves with it
        // (the boot path's script cache follows it).
        clock.fetch_add(1, Ordering::SeqCst);
        assert_eq!(
            a.node_get(&uuid).await.unwrap().unwrap().flavor.as_deref(),
            Some("hv")
        );
        assert_ne!(a.content_epoch(), epoch_before);
    }

    #[tokio::test]
    async fn an_evicted_entry_is_read_afresh_at_once_and_moves_the_epoch() {
        let (a, b, _clock) = replicas(60_000);
        let uuid = NodeUuid::from_index(3, 3);
        let node = Node::new(uuid.clone(), "cn3".into(), NodeRole::Compute, 0);
        a.node_create(&node, &[]).await.unwrap();
        a.flavor_put(&flavor("hv", "v1"), 0, &[]).await.unwrap();
        let mut changed = b.node_get(&uuid).await.unwrap().unwrap();
        changed.rack = Some("r2".into());
        b.node_update(&changed, &[]).await.unwrap();
        b.flavor_put(&flavor("hv", "v2"), 1, &[]).await.unwrap();
        assert_eq!(a.node_get(&uuid).await.unwrap().unwrap().rack, None);
        let epoch = a.content_epoch();
        a.evict_node(&uuid);
        assert_ne!(
            a.content_epoch(),
            epoch,
            "the boot scripts cached on it are stale"
        );
        assert_eq!(
            a.node_get(&uuid).await.unwrap().unwrap().rack.as_deref(),
            Some("r2")
        );
        assert_eq!(
            a.flavor_get("hv").await.unwrap().unwrap().cmdline_template,
            "v1"
        );
        a.evict_flavor("hv");
        assert_eq!(
            a.flavor_get("hv").await.unwrap().unwrap().cmdline_template,
            "v2"
        );
        // Evicting what is not cached, twice, is harmless.
        a.evict_node(&NodeUuid::from_index(3, 99));
        a.evict_flavor("none");
        a.evict_flavor("none");
    }

    #[tokio::test]
    async fn clear_forgets_everything_and_a_heartbeat_only_moves_forward() {
        let (a, b, _clock) = replicas(60_000);
        let uuid = NodeUuid::from_index(3, 4);
        let node = Node::new(uuid.clone(), "cn4".into(), NodeRole::Compute, 0);
        a.node_create(&node, &[]).await.unwrap();
        a.flavor_put(&flavor("hv", "v1"), 0, &[]).await.unwrap();
        a.note_heartbeat(&uuid, 5_000);
        a.note_heartbeat(&uuid, 4_000);
        let cached = a.node_get(&uuid).await.unwrap().unwrap();
        assert_eq!(cached.last_heartbeat_at_ms, Some(5_000));
        assert_eq!(
            cached.generation, node.generation,
            "no write, no generation"
        );
        let mut changed = b.node_get(&uuid).await.unwrap().unwrap();
        changed.rack = Some("r3".into());
        b.node_update(&changed, &[]).await.unwrap();
        b.flavor_put(&flavor("hv", "v2"), 1, &[]).await.unwrap();
        a.clear();
        assert_eq!(
            a.node_get(&uuid).await.unwrap().unwrap().rack.as_deref(),
            Some("r3")
        );
        assert_eq!(
            a.flavor_get("hv").await.unwrap().unwrap().cmdline_template,
            "v2"
        );
    }

    #[tokio::test]
    async fn a_read_that_raced_an_eviction_does_not_cache_what_it_read() {
        let (a, b, _clock) = replicas(60_000);
        let uuid = NodeUuid::from_index(3, 5);
        let node = Node::new(uuid.clone(), "cn5".into(), NodeRole::Compute, 0);
        b.node_create(&node, &[]).await.unwrap();
        // A misses and reads the record through ...
        let before = a.evictions(uuid.as_str());
        let read = a.inner.node_get(&uuid).await.unwrap().unwrap();
        // ... B's write commits and its notification is applied before A caches ...
        let mut changed = read.clone();
        changed.rack = Some("r5".into());
        b.node_update(&changed, &[]).await.unwrap();
        a.evict_node(&uuid);
        // ... so the copy A read is not kept, and the next read is B's.
        a.remember(&read, before);
        assert_eq!(
            a.node_get(&uuid).await.unwrap().unwrap().rack.as_deref(),
            Some("r5")
        );
        // Without an eviction in between, what was read is kept.
        let before = a.evictions(uuid.as_str());
        let stale = a.inner.node_get(&uuid).await.unwrap().unwrap();
        a.remember(&stale, before);
        changed.generation += 1;
        changed.rack = Some("r6".into());
        b.node_update(&changed, &[]).await.unwrap();
        assert_eq!(
            a.node_get(&uuid).await.unwrap().unwrap().rack.as_deref(),
            Some("r5"),
            "cached, so only a notification or the age refreshes it"
        );
    }

    fn flavor(name: &str, cmdline: &str) -> Flavor {
        Flavor {
            name: name.into(),
            kernel: bearman_proto::Artifact {
                url: "http://images/vmlinuz".into(),
                sha256: "a".repeat(64),
            },
            initrds: vec![],
            cmdline_template: cmdline.into(),
            firmware_expected: Default::default(),
        }
    }

    #[tokio::test]
    async fn a_write_from_a_stale_copy_is_refused_and_the_next_read_is_fresh() {
        let (a, b, _clock) = replicas(60_000);
        let uuid = NodeUuid::from_index(3, 2);
        let node = Node::new(uuid.clone(), "cn2".into(), NodeRole::Compute, 0);
        a.node_create(&node, &[]).await.unwrap();
        let stale = a.node_get(&uuid).await.unwrap().unwrap();
        let mut fresh = b.node_get(&uuid).await.unwrap().unwrap();
        fresh.rack = Some("r9".into());
        b.node_update(&fresh, &[]).await.unwrap();
        let refused = a.node_update(&stale, &[]).await;
        assert!(
            matches!(refused, Err(StoreError::GenerationMismatch { .. })),
            "{refused:?}"
        );
        assert_eq!(
            a.node_get(&uuid).await.unwrap().unwrap().rack.as_deref(),
            Some("r9"),
            "the refused write evicted the stale copy"
        );
    }
}
