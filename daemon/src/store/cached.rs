//! A read-through cache of nodes and flavors in front of another store.
//!
//! The boot endpoints read a node and its flavor on every request; during a boot storm
//! that is thousands of reads a second for records that rarely change. Writes go through
//! this wrapper, which refreshes its copy from what the store returns.
//!
//! Architecture invariant: without a maximum age this is correct only while this daemon
//! is the sole writer of its database (one daemon per database, as documented in
//! ARCHITECTURE.md). A replica of several uses [`CachedStore::with_max_age`]: everything
//! cached is dropped once it is that old, so what another replica wrote is served at most
//! that late (the stated staleness bound), and this replica's own writes at once. A
//! cached entry is replaced only by a copy of a higher generation, so a slow reader can
//! never reinstall a stale record over a fresh one; a write refused as stale evicts the
//! entry, so the next read fetches the record another replica wrote.

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};

use async_trait::async_trait;
use bearman_proto::uuid::NodeUuid;

use super::{OrphanAllocation, Registered, RegistrationWrite, Store, StoreError};
use crate::core::cluster::{ClusterStatus, Lease, Replica};
use crate::core::model::{
    ApiToken, Event, EventFilter, Flavor, IpAllocation, IpPool, NewEvent, Node, NodeFilter,
    PoolPurpose, StateCounts, TimestampMs, TokenRole,
};
use crate::core::remediation::Remediation;

/// Entries kept before the cache starts over; bounds memory on huge fleets.
pub const CACHED_NODES_MAX: usize = 200_000;

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
    nodes: Mutex<BTreeMap<NodeUuid, Arc<Node>>>,
    flavors: Mutex<BTreeMap<String, Arc<Flavor>>>,
    max_age: Option<MaxAge>,
}

impl CachedStore {
    pub fn new(inner: Arc<dyn Store>) -> Self {
        CachedStore {
            inner,
            epoch: std::sync::atomic::AtomicU64::new(1),
            nodes: Mutex::new(BTreeMap::new()),
            flavors: Mutex::new(BTreeMap::new()),
            max_age: None,
        }
    }

    /// A cache for one of several writers: nothing it serves is older than
    /// `max_age_ms` by `now`.
    pub fn with_max_age(inner: Arc<dyn Store>, max_age_ms: i64, now: CacheClock) -> Self {
        let emptied_at_ms = std::sync::atomic::AtomicI64::new(now());
        CachedStore {
            max_age: Some(MaxAge {
                max_age_ms: max_age_ms.max(1),
                now,
                emptied_at_ms,
            }),
            ..CachedStore::new(inner)
        }
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
            self.nodes().clear();
            self.flavors().clear();
            self.bump();
        }
    }

    fn nodes(&self) -> std::sync::MutexGuard<'_, BTreeMap<NodeUuid, Arc<Node>>> {
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

    fn remember(&self, node: &Node) {
        let mut nodes = self.nodes();
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
        let node = self.inner.node_get(uuid).await?;
        if let Some(node) = &node {
            self.remember(node);
        }
        Ok(self.nodes().get(uuid).cloned().or(node.map(Arc::new)))
    }

    async fn node_list(&self, filter: &NodeFilter) -> Result<Vec<Node>, StoreError> {
        self.inner.node_list(filter).await
    }

    async fn node_health_list(&self) -> Result<Vec<crate::core::health::NodeHealth>, StoreError> {
        self.inner.node_health_list().await
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

    async fn node_create(&self, node: &Node, events: &[NewEvent]) -> Result<Node, StoreError> {
        let created = self.inner.node_create(node, events).await?;
        self.remember(&created);
        self.bump();
        Ok(created)
    }

    async fn node_update(&self, node: &Node, events: &[NewEvent]) -> Result<Node, StoreError> {
        match self.inner.node_update(node, events).await {
            Ok(updated) => {
                self.remember(&updated);
                self.bump();
                Ok(updated)
            }
            Err(error) => {
                self.nodes().remove(&node.uuid);
                self.bump();
                Err(error)
            }
        }
    }

    async fn node_register(&self, write: &RegistrationWrite) -> Result<Registered, StoreError> {
        match self.inner.node_register(write).await {
            Ok(registered) => {
                self.remember(&registered.node);
                self.bump();
                Ok(registered)
            }
            Err(error) => {
                // As for a failed update: the cached copy may be the stale one that lost.
                self.nodes().remove(&write.node.uuid);
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
        if let Some(node) = self.nodes().get_mut(uuid) {
            let newer = node.last_heartbeat_at_ms.unwrap_or(at_ms).max(at_ms);
            if node.last_heartbeat_at_ms != Some(newer) {
                Arc::make_mut(node).last_heartbeat_at_ms = Some(newer);
            }
        }
        Ok(())
    }

    async fn flavor_create(
        &self,
        flavor: &Flavor,
        at_ms: TimestampMs,
        events: &[NewEvent],
    ) -> Result<(), StoreError> {
        let written = self.inner.flavor_create(flavor, at_ms, events).await;
        if written.is_ok() {
            self.flavors()
                .insert(flavor.name.clone(), Arc::new(flavor.clone()));
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
        let written = self.inner.flavor_put(flavor, at_ms, events).await;
        if written.is_ok() {
            self.flavors()
                .insert(flavor.name.clone(), Arc::new(flavor.clone()));
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
        let flavor = self.inner.flavor_get(name).await?.map(Arc::new);
        if let Some(flavor) = &flavor {
            self.flavors().insert(flavor.name.clone(), flavor.clone());
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
        match self
            .inner
            .remediation_update(remediation, node, events, fence)
            .await
        {
            Ok((remediation, node)) => {
                if let Some(node) = &node {
                    self.remember(node);
                    self.bump();
                }
                Ok((remediation, node))
            }
            Err(error) => {
                if let Some(node) = node {
                    self.nodes().remove(&node.uuid);
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
        events: &[NewEvent],
    ) -> Result<ApiToken, StoreError> {
        self.inner
            .token_create(name, role, secret_sha256, at_ms, events)
            .await
    }

    async fn token_find(&self, secret_sha256: &str) -> Result<Option<ApiToken>, StoreError> {
        self.inner.token_find(secret_sha256).await
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
