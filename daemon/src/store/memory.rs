//! In-memory store for the simulator and fast tests. Deterministic: ordered maps only, no
//! threads, no clocks. One mutex, never held across an await.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::Mutex;

use async_trait::async_trait;
use bearman_proto::uuid::NodeUuid;

use super::{
    clamp_limit, orphans_of, HeldAddress, OrphanAllocation, Registered, RegistrationWrite, Store,
    StoreError,
};
use crate::core::cluster::{claim, ClusterStatus, Lease, Replica};
use crate::core::firmware::{FirmwareBundle, FirmwareRollout};
use crate::core::ipam::{self, validate_pool};
use crate::core::lifecycle::LifecycleState;
use crate::core::model::{
    ApiToken, Event, EventFilter, Flavor, IpAllocation, IpPool, NewEvent, Node, NodeFilter,
    PoolPurpose, StateCounts, TimestampMs, TokenRole,
};
use crate::core::power_sync::PowerReading;
use crate::core::remediation::{Remediation, Status};

#[derive(Default)]
struct State {
    nodes: BTreeMap<NodeUuid, Node>,
    hostnames: BTreeMap<String, NodeUuid>,
    flavors: BTreeMap<String, Flavor>,
    pools: BTreeMap<String, IpPool>,
    /// (pool, address number) → allocation.
    allocations: BTreeMap<(String, u32), IpAllocation>,
    /// Every address in use in any pool (overlapping pools share the address space).
    used_addresses: BTreeSet<u32>,
    /// (node, purpose) → its allocation's key: one address per node and purpose.
    node_slots: BTreeMap<(NodeUuid, PoolPurpose), (String, u32)>,
    events: Vec<Event>,
    tokens: BTreeMap<String, ApiToken>,
    next_token_id: i64,
    remediations: BTreeMap<i64, Remediation>,
    power: BTreeMap<NodeUuid, PowerReading>,
    lease: Option<Lease>,
    replicas: BTreeMap<String, Replica>,
    firmware_bundles: BTreeMap<String, FirmwareBundle>,
    firmware_rollout: FirmwareRollout,
    drill_board: crate::core::drill::DrillBoard,
    drills: BTreeMap<i64, crate::core::drill::Drill>,
}

/// `Conflict` unless the stored rollout is at `rollout.generation`.
fn check_rollout(state: &State, rollout: &FirmwareRollout) -> Result<(), StoreError> {
    if state.firmware_rollout.generation == rollout.generation {
        return Ok(());
    }
    Err(StoreError::Conflict {
        what: "firmware rollout".into(),
        detail: format!(
            "changed concurrently (expected generation {}, found {})",
            rollout.generation, state.firmware_rollout.generation
        ),
    })
}

fn write_rollout(state: &mut State, rollout: &FirmwareRollout) -> FirmwareRollout {
    let mut stored = rollout.clone();
    stored.generation = rollout.generation + 1;
    state.firmware_rollout = stored.clone();
    stored
}

#[derive(Default)]
pub struct MemoryStore {
    state: Mutex<State>,
}

impl MemoryStore {
    pub fn new() -> Self {
        Self::default()
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, State> {
        // A panic while holding the lock is a bug elsewhere; the data is still consistent
        // because every method validates before mutating.
        self.state
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }
}

fn append_events(state: &mut State, events: &[NewEvent]) {
    for event in events {
        let id = state.events.len() as i64 + 1;
        state.events.push(Event {
            id,
            at_ms: event.at_ms,
            node_uuid: event.node_uuid.clone(),
            actor: event.actor.clone(),
            action: event.action,
            from_state: event.from_state.map(|s| s.as_str().to_string()),
            to_state: event.to_state.map(|s| s.as_str().to_string()),
            reason: event.reason.clone(),
        });
    }
}

fn release_node_addresses(state: &mut State, uuid: &NodeUuid) {
    for purpose in [PoolPurpose::Node, PoolPurpose::Bmc] {
        if let Some(key) = state.node_slots.remove(&(uuid.clone(), purpose)) {
            state.used_addresses.remove(&key.1);
            state.allocations.remove(&key);
        }
    }
}

/// Checks that `node` may be created: neither its uuid nor its hostname is taken.
fn check_create(state: &State, node: &Node) -> Result<(), StoreError> {
    if state.nodes.contains_key(&node.uuid) {
        return Err(StoreError::AlreadyExists {
            what: format!("node {}", node.uuid),
        });
    }
    if state.hostnames.contains_key(&node.hostname) {
        return Err(StoreError::AlreadyExists {
            what: format!("hostname {}", node.hostname),
        });
    }
    Ok(())
}

fn insert_created(state: &mut State, node: &Node) {
    state
        .hostnames
        .insert(node.hostname.clone(), node.uuid.clone());
    state.nodes.insert(node.uuid.clone(), node.clone());
}

/// Checks that `node` may be written over the stored record: it exists, is still at
/// `node.generation`, and a new hostname is free.
fn check_update(state: &State, node: &Node) -> Result<(), StoreError> {
    let stored = state
        .nodes
        .get(&node.uuid)
        .ok_or_else(|| StoreError::not_found(format!("node {}", node.uuid)))?;
    if stored.generation != node.generation {
        return Err(StoreError::GenerationMismatch {
            uuid: node.uuid.clone(),
            expected: node.generation,
            found: stored.generation,
        });
    }
    if stored.hostname != node.hostname && state.hostnames.contains_key(&node.hostname) {
        return Err(StoreError::AlreadyExists {
            what: format!("hostname {}", node.hostname),
        });
    }
    Ok(())
}

/// Writes `node` (already checked by [`check_update`]) at its generation + 1 and returns
/// it as stored.
fn write_updated(state: &mut State, node: &Node) -> Node {
    let stored = &state.nodes[&node.uuid];
    let old_hostname = stored.hostname.clone();
    let last_heartbeat = stored.last_heartbeat_at_ms;
    if old_hostname != node.hostname {
        state.hostnames.remove(&old_hostname);
        state
            .hostnames
            .insert(node.hostname.clone(), node.uuid.clone());
    }
    let mut updated = node.clone();
    updated.generation += 1;
    // Heartbeats are written out of band; a stale copy must not roll them back.
    updated.last_heartbeat_at_ms = updated.last_heartbeat_at_ms.max(last_heartbeat);
    if updated.state == LifecycleState::Retired {
        release_node_addresses(state, &node.uuid);
    }
    state.nodes.insert(node.uuid.clone(), updated.clone());
    updated
}

/// The address `pool` would hand out next, skipping `also_taken` (addresses the same
/// write already chose). Reads only, so a caller can plan several and write none.
fn choose_address(
    state: &State,
    pool: &IpPool,
    also_taken: &BTreeSet<u32>,
) -> Result<u32, StoreError> {
    let range = validate_pool(pool).map_err(|error| StoreError::InvalidPool {
        pool: pool.name.clone(),
        detail: error.to_string(),
    })?;
    let highest_in_pool = state
        .allocations
        .range((pool.name.clone(), 0)..=(pool.name.clone(), u32::MAX))
        .next_back()
        .map(|((_, address), _)| *address);
    let taken =
        |address: u32| state.used_addresses.contains(&address) || also_taken.contains(&address);
    // Overlapping pools must not hand out one address twice: skip addresses used by
    // any pool, as the SQL stores' UNIQUE(address) constraint does.
    let mut candidate = range.next_after_highest(highest_in_pool);
    if candidate.is_none_or(taken) {
        let used: BTreeSet<u32> = state.used_addresses.union(also_taken).copied().collect();
        candidate = range.first_gap(&used);
    }
    candidate.ok_or_else(|| StoreError::PoolExhausted {
        pool: pool.name.clone(),
    })
}

fn insert_allocation(state: &mut State, allocation: &IpAllocation, address: u32) {
    let key = (allocation.pool.clone(), address);
    state.allocations.insert(key.clone(), allocation.clone());
    state.used_addresses.insert(address);
    state
        .node_slots
        .insert((allocation.node_uuid.clone(), allocation.purpose), key);
}

/// A consistent copy of the store's contents, for the simulator's invariant checker
/// (which runs outside any async runtime).
#[derive(Clone, Debug, Default)]
pub struct MemorySnapshot {
    pub nodes: Vec<Node>,
    pub allocations: Vec<IpAllocation>,
}

impl MemoryStore {
    pub fn snapshot(&self) -> MemorySnapshot {
        let state = self.lock();
        MemorySnapshot {
            nodes: state.nodes.values().cloned().collect(),
            allocations: state.allocations.values().cloned().collect(),
        }
    }

    /// Every address allocation, without copying the nodes (the simulator's checker scans
    /// these every few virtual seconds).
    pub fn allocations(&self) -> Vec<IpAllocation> {
        self.lock().allocations.values().cloned().collect()
    }

    /// Events with id greater than `after_id`, oldest first.
    pub fn events_after(&self, after_id: i64) -> Vec<Event> {
        let state = self.lock();
        let start = after_id.max(0) as usize;
        state
            .events
            .get(start..)
            .map(<[Event]>::to_vec)
            .unwrap_or_default()
    }

    pub fn state_counts(&self) -> StateCounts {
        let state = self.lock();
        let mut counts = StateCounts::new();
        for node in state.nodes.values() {
            *counts.entry(node.state).or_default() += 1;
        }
        counts
    }

    /// Runs a store call to completion without an async runtime. Every method of this
    /// store finishes without waiting, so one poll always suffices.
    pub fn now_or_never<T>(future: impl std::future::Future<Output = T>) -> T {
        let mut future = std::pin::pin!(future);
        let waker = std::task::Waker::noop();
        match future
            .as_mut()
            .poll(&mut std::task::Context::from_waker(waker))
        {
            std::task::Poll::Ready(value) => value,
            std::task::Poll::Pending => unreachable!("MemoryStore futures never wait"),
        }
    }
}

#[async_trait]
impl Store for MemoryStore {
    fn backend_name(&self) -> &'static str {
        "memory"
    }

    async fn node_get(&self, uuid: &NodeUuid) -> Result<Option<Node>, StoreError> {
        Ok(self.lock().nodes.get(uuid).cloned())
    }

    async fn node_list(&self, filter: &NodeFilter) -> Result<Vec<Node>, StoreError> {
        let state = self.lock();
        let limit = clamp_limit(filter.limit);
        Ok(state
            .nodes
            .values()
            .filter(|node| filter.after.as_ref().is_none_or(|after| &node.uuid > after))
            .filter(|node| filter.state.is_none_or(|s| node.state == s))
            .filter(|node| {
                filter
                    .rack
                    .as_ref()
                    .is_none_or(|r| node.rack.as_ref() == Some(r))
            })
            .filter(|node| filter.role.is_none_or(|r| node.role == r))
            .take(limit)
            .cloned()
            .collect())
    }

    async fn node_booting_list(
        &self,
    ) -> Result<Vec<crate::core::controller::BootingNode>, StoreError> {
        use crate::core::lifecycle::LifecycleState as S;
        // What the paged default returns (Registered, then Provisioning, each in uuid
        // order) without copying every booting node whole first.
        let state = self.lock();
        let mut list = Vec::new();
        for wanted in [S::Registered, S::Provisioning] {
            list.extend(
                state
                    .nodes
                    .values()
                    .filter(|node| node.state == wanted)
                    .map(crate::core::controller::BootingNode::of),
            );
        }
        Ok(list)
    }

    async fn node_health_list(&self) -> Result<Vec<crate::core::health::NodeHealth>, StoreError> {
        let state = self.lock();
        // The controller asks every tick for every node. Nodes and power readings are
        // both ordered by uuid, so they are walked together rather than a reading
        // looked up (a dozen uuid comparisons) per node.
        let mut power = state.power.iter().peekable();
        let mut list = Vec::with_capacity(state.nodes.len());
        for node in state
            .nodes
            .values()
            .filter(|n| crate::core::health::is_monitored(n.state))
        {
            while power.next_if(|(uuid, _)| **uuid < node.uuid).is_some() {}
            let reading = power
                .next_if(|(uuid, _)| **uuid == node.uuid)
                .map(|(_, reading)| reading.clone());
            list.push(crate::core::health::NodeHealth {
                power: reading,
                ..crate::core::health::NodeHealth::of(node)
            });
        }
        Ok(list)
    }

    async fn node_power_record(
        &self,
        uuid: &NodeUuid,
        reading: &PowerReading,
        events: &[NewEvent],
    ) -> Result<bool, StoreError> {
        let mut state = self.lock();
        if !state.nodes.contains_key(uuid) {
            return Err(StoreError::not_found(format!("node {uuid}")));
        }
        if state
            .power
            .get(uuid)
            .is_some_and(|stored| stored.read_at_ms > reading.read_at_ms)
        {
            return Ok(false);
        }
        state.power.insert(uuid.clone(), reading.clone());
        append_events(&mut state, events);
        Ok(true)
    }

    async fn node_power_get(&self, uuid: &NodeUuid) -> Result<Option<PowerReading>, StoreError> {
        Ok(self.lock().power.get(uuid).cloned())
    }

    async fn node_count_by_state(&self) -> Result<StateCounts, StoreError> {
        let state = self.lock();
        let mut counts = StateCounts::new();
        for node in state.nodes.values() {
            *counts.entry(node.state).or_default() += 1;
        }
        Ok(counts)
    }

    async fn node_create(&self, node: &Node, events: &[NewEvent]) -> Result<Node, StoreError> {
        let mut state = self.lock();
        check_create(&state, node)?;
        insert_created(&mut state, node);
        append_events(&mut state, events);
        Ok(node.clone())
    }

    async fn node_update(&self, node: &Node, events: &[NewEvent]) -> Result<Node, StoreError> {
        let mut state = self.lock();
        check_update(&state, node)?;
        let updated = write_updated(&mut state, node);
        append_events(&mut state, events);
        Ok(updated)
    }

    async fn node_register(&self, write: &RegistrationWrite) -> Result<Registered, StoreError> {
        // One lock for the whole registration: every check and choice is made before the
        // first change, so a refusal leaves the state exactly as it was.
        let mut state = self.lock();
        write.check_requests()?;
        let mut node = write.node.clone();
        match write.expected_generation {
            None => check_create(&state, &node)?,
            Some(generation) => {
                node.generation = generation;
                check_update(&state, &node)?;
            }
        }
        if let Some(rollout) = &write.rollout {
            check_rollout(&state, rollout)?;
        }
        let mut held = Vec::new();
        let mut unfilled = Vec::new();
        let mut new_allocations = Vec::new();
        let mut chosen = BTreeSet::new();
        for request in &write.addresses {
            // Every requested pool must exist even when the node keeps an address from
            // another one, as on the SQL stores (which lock them first).
            let mut pools = Vec::with_capacity(request.pools.len());
            for name in &request.pools {
                let pool = state
                    .pools
                    .get(name)
                    .cloned()
                    .ok_or_else(|| StoreError::not_found(format!("ip pool {name}")))?;
                super::check_pool_purpose(&pool, request.purpose)?;
                pools.push(pool);
            }
            if let Some(key) = state.node_slots.get(&(node.uuid.clone(), request.purpose)) {
                let allocation = state.allocations[key].clone();
                let pool = state.pools.get(&key.0).cloned().ok_or_else(|| {
                    StoreError::Corrupt(format!(
                        "allocation {} names missing pool {}",
                        allocation.address, key.0
                    ))
                })?;
                held.push(HeldAddress { pool, allocation });
                continue;
            }
            let mut exhausted = None;
            let mut taken = None;
            for pool in pools {
                match choose_address(&state, &pool, &chosen) {
                    Ok(address) => {
                        taken = Some((pool, address));
                        break;
                    }
                    Err(error @ StoreError::PoolExhausted { .. }) => exhausted = Some(error),
                    Err(error) => return Err(error),
                }
            }
            let Some((pool, address)) = taken else {
                if request.optional {
                    unfilled.push(request.clone());
                    continue;
                }
                return Err(exhausted.unwrap_or_else(|| StoreError::PoolExhausted {
                    pool: request.pools.join(", "),
                }));
            };
            chosen.insert(address);
            let allocation = IpAllocation {
                pool: pool.name.clone(),
                address: ipam::address_to_string(address),
                node_uuid: node.uuid.clone(),
                purpose: request.purpose,
                allocated_at_ms: write.at_ms,
            };
            new_allocations.push((allocation.clone(), address));
            held.push(HeldAddress { pool, allocation });
        }
        for address in &held {
            super::apply_held(&mut node, address)?;
        }
        // Nothing has changed so far; from here on nothing can fail.
        let stored = match write.expected_generation {
            None => {
                insert_created(&mut state, &node);
                node
            }
            Some(_) => write_updated(&mut state, &node),
        };
        for (allocation, address) in &new_allocations {
            insert_allocation(&mut state, allocation, *address);
        }
        if let Some(rollout) = &write.rollout {
            write_rollout(&mut state, rollout);
        }
        append_events(&mut state, &write.events);
        Ok(Registered {
            node: stored,
            addresses: held,
            unfilled,
        })
    }

    async fn node_record_heartbeat(
        &self,
        uuid: &NodeUuid,
        at_ms: TimestampMs,
    ) -> Result<(), StoreError> {
        let mut state = self.lock();
        let node = state
            .nodes
            .get_mut(uuid)
            .ok_or_else(|| StoreError::not_found(format!("node {uuid}")))?;
        node.last_heartbeat_at_ms = Some(node.last_heartbeat_at_ms.unwrap_or(at_ms).max(at_ms));
        Ok(())
    }

    async fn firmware_bundle_create(
        &self,
        bundle: &FirmwareBundle,
        events: &[NewEvent],
    ) -> Result<(), StoreError> {
        let mut state = self.lock();
        if state.firmware_bundles.contains_key(&bundle.name) {
            return Err(StoreError::AlreadyExists {
                what: format!("firmware bundle {}", bundle.name),
            });
        }
        state
            .firmware_bundles
            .insert(bundle.name.clone(), bundle.clone());
        append_events(&mut state, events);
        Ok(())
    }

    async fn firmware_bundle_list(&self) -> Result<Vec<FirmwareBundle>, StoreError> {
        Ok(self.lock().firmware_bundles.values().cloned().collect())
    }

    async fn firmware_bundle_delete(
        &self,
        name: &str,
        events: &[NewEvent],
    ) -> Result<(), StoreError> {
        let mut state = self.lock();
        if state.firmware_bundles.remove(name).is_none() {
            return Err(StoreError::not_found(format!("firmware bundle {name}")));
        }
        append_events(&mut state, events);
        Ok(())
    }

    async fn drill_board_get(&self) -> Result<crate::core::drill::DrillBoard, StoreError> {
        Ok(self.lock().drill_board.clone())
    }

    async fn drill_board_put(
        &self,
        board: &crate::core::drill::DrillBoard,
        finished: Option<&crate::core::drill::Drill>,
        events: &[NewEvent],
    ) -> Result<crate::core::drill::DrillBoard, StoreError> {
        let mut state = self.lock();
        if state.drill_board.generation != board.generation {
            return Err(StoreError::Conflict {
                what: "drill board".into(),
                detail: format!(
                    "changed concurrently (expected generation {}, found {})",
                    board.generation, state.drill_board.generation
                ),
            });
        }
        if let Some(drill) = finished {
            if state.drills.contains_key(&drill.id) {
                return Err(StoreError::AlreadyExists {
                    what: format!("drill {}", drill.id),
                });
            }
            state.drills.insert(drill.id, drill.clone());
        }
        let mut stored = board.clone();
        stored.generation = board.generation + 1;
        state.drill_board = stored.clone();
        append_events(&mut state, events);
        Ok(stored)
    }

    async fn drill_list(&self, limit: usize) -> Result<Vec<crate::core::drill::Drill>, StoreError> {
        Ok(self
            .lock()
            .drills
            .values()
            .rev()
            .take(clamp_limit(limit))
            .cloned()
            .collect())
    }

    async fn drill_get(&self, id: i64) -> Result<Option<crate::core::drill::Drill>, StoreError> {
        Ok(self.lock().drills.get(&id).cloned())
    }

    async fn firmware_rollout_get(&self) -> Result<FirmwareRollout, StoreError> {
        Ok(self.lock().firmware_rollout.clone())
    }

    async fn firmware_rollout_put(
        &self,
        rollout: &FirmwareRollout,
        events: &[NewEvent],
    ) -> Result<FirmwareRollout, StoreError> {
        let mut state = self.lock();
        check_rollout(&state, rollout)?;
        let stored = write_rollout(&mut state, rollout);
        append_events(&mut state, events);
        Ok(stored)
    }

    async fn node_update_with_rollout(
        &self,
        node: &Node,
        rollout: &FirmwareRollout,
        events: &[NewEvent],
    ) -> Result<Node, StoreError> {
        let mut state = self.lock();
        check_update(&state, node)?;
        check_rollout(&state, rollout)?;
        let updated = write_updated(&mut state, node);
        write_rollout(&mut state, rollout);
        append_events(&mut state, events);
        Ok(updated)
    }

    async fn flavor_create(
        &self,
        flavor: &Flavor,
        _at_ms: TimestampMs,
        events: &[NewEvent],
    ) -> Result<(), StoreError> {
        let mut state = self.lock();
        if state.flavors.contains_key(&flavor.name) {
            return Err(StoreError::AlreadyExists {
                what: format!("flavor {}", flavor.name),
            });
        }
        state.flavors.insert(flavor.name.clone(), flavor.clone());
        append_events(&mut state, events);
        Ok(())
    }

    async fn flavor_put(
        &self,
        flavor: &Flavor,
        _at_ms: TimestampMs,
        events: &[NewEvent],
    ) -> Result<(), StoreError> {
        let mut state = self.lock();
        state.flavors.insert(flavor.name.clone(), flavor.clone());
        append_events(&mut state, events);
        Ok(())
    }

    async fn flavor_get(&self, name: &str) -> Result<Option<Flavor>, StoreError> {
        Ok(self.lock().flavors.get(name).cloned())
    }

    async fn flavor_list(&self) -> Result<Vec<Flavor>, StoreError> {
        Ok(self.lock().flavors.values().cloned().collect())
    }

    async fn flavor_delete(&self, name: &str, events: &[NewEvent]) -> Result<(), StoreError> {
        let mut state = self.lock();
        if !state.flavors.contains_key(name) {
            return Err(StoreError::not_found(format!("flavor {name}")));
        }
        let users = state
            .nodes
            .values()
            .filter(|node| node.flavor.as_deref() == Some(name))
            .count();
        if users > 0 {
            return Err(StoreError::InUse {
                what: format!("flavor {name}"),
                detail: format!("{users} node(s) use it"),
            });
        }
        state.flavors.remove(name);
        append_events(&mut state, events);
        Ok(())
    }

    async fn pool_create(&self, pool: &IpPool, events: &[NewEvent]) -> Result<(), StoreError> {
        let mut state = self.lock();
        if state.pools.contains_key(&pool.name) {
            return Err(StoreError::AlreadyExists {
                what: format!("ip pool {}", pool.name),
            });
        }
        state.pools.insert(pool.name.clone(), pool.clone());
        append_events(&mut state, events);
        Ok(())
    }

    async fn pool_get(&self, name: &str) -> Result<Option<IpPool>, StoreError> {
        Ok(self.lock().pools.get(name).cloned())
    }

    async fn pool_list(&self) -> Result<Vec<IpPool>, StoreError> {
        Ok(self.lock().pools.values().cloned().collect())
    }

    async fn pool_delete(&self, name: &str, events: &[NewEvent]) -> Result<(), StoreError> {
        let mut state = self.lock();
        if !state.pools.contains_key(name) {
            return Err(StoreError::not_found(format!("ip pool {name}")));
        }
        let used = state
            .allocations
            .range((name.to_string(), 0)..=(name.to_string(), u32::MAX))
            .count();
        if used > 0 {
            return Err(StoreError::InUse {
                what: format!("ip pool {name}"),
                detail: format!("{used} address(es) allocated"),
            });
        }
        state.pools.remove(name);
        append_events(&mut state, events);
        Ok(())
    }

    async fn ip_allocate(
        &self,
        pool_name: &str,
        node_uuid: &NodeUuid,
        purpose: PoolPurpose,
        at_ms: TimestampMs,
    ) -> Result<IpAllocation, StoreError> {
        let mut state = self.lock();
        if let Some(key) = state.node_slots.get(&(node_uuid.clone(), purpose)) {
            return Ok(state.allocations[key].clone());
        }
        let pool = state
            .pools
            .get(pool_name)
            .ok_or_else(|| StoreError::not_found(format!("ip pool {pool_name}")))?;
        let address = choose_address(&state, pool, &BTreeSet::new())?;
        let allocation = IpAllocation {
            pool: pool_name.to_string(),
            address: ipam::address_to_string(address),
            node_uuid: node_uuid.clone(),
            purpose,
            allocated_at_ms: at_ms,
        };
        insert_allocation(&mut state, &allocation, address);
        Ok(allocation)
    }

    async fn ip_list(
        &self,
        pool: Option<&str>,
        node_uuid: Option<&NodeUuid>,
    ) -> Result<Vec<IpAllocation>, StoreError> {
        let state = self.lock();
        let mut allocations: Vec<(u32, IpAllocation)> = state
            .allocations
            .iter()
            .filter(|((pool_name, _), _)| pool.is_none_or(|p| p == pool_name))
            .filter(|(_, a)| node_uuid.is_none_or(|u| &a.node_uuid == u))
            .map(|((_, address), a)| (*address, a.clone()))
            .collect();
        allocations.sort_by_key(|(address, a)| (*address, a.pool.clone()));
        Ok(allocations.into_iter().map(|(_, a)| a).collect())
    }

    async fn ip_release_node(&self, node_uuid: &NodeUuid) -> Result<usize, StoreError> {
        let mut state = self.lock();
        let before = state.allocations.len();
        release_node_addresses(&mut state, node_uuid);
        Ok(before - state.allocations.len())
    }

    async fn ip_orphans(&self) -> Result<Vec<OrphanAllocation>, StoreError> {
        let state = self.lock();
        let mut allocations: Vec<(u32, &IpAllocation)> = state
            .allocations
            .iter()
            .map(|((_, address), allocation)| (*address, allocation))
            .collect();
        allocations.sort_by(|(a, x), (b, y)| (a, &x.pool).cmp(&(b, &y.pool)));
        Ok(orphans_of(allocations.into_iter().map(
            |(_, allocation)| (allocation.clone(), state.nodes.get(&allocation.node_uuid)),
        )))
    }

    async fn event_append(&self, events: &[NewEvent]) -> Result<(), StoreError> {
        append_events(&mut self.lock(), events);
        Ok(())
    }

    async fn event_list(&self, filter: &EventFilter) -> Result<Vec<Event>, StoreError> {
        let state = self.lock();
        let matches = |e: &&Event| {
            filter.before_id.is_none_or(|before| e.id < before)
                && filter.after_id.is_none_or(|after| e.id > after)
                && filter
                    .node_uuid
                    .as_ref()
                    .is_none_or(|u| e.node_uuid.as_ref() == Some(u))
        };
        let limit = clamp_limit(filter.limit);
        if filter.after_id.is_some() {
            // The oldest above `after_id`, listed newest first like every page.
            let mut oldest: Vec<Event> = state
                .events
                .iter()
                .filter(matches)
                .take(limit)
                .cloned()
                .collect();
            oldest.reverse();
            return Ok(oldest);
        }
        Ok(state
            .events
            .iter()
            .rev()
            .filter(matches)
            .take(limit)
            .cloned()
            .collect())
    }

    async fn remediation_create(
        &self,
        remediation: &Remediation,
        events: &[NewEvent],
        fence: Option<i64>,
    ) -> Result<Remediation, StoreError> {
        let mut state = self.lock();
        check_fence(&state, fence)?;
        let active = state
            .remediations
            .values()
            .any(|r| r.node_uuid == remediation.node_uuid && r.status == Status::Active);
        if active && remediation.status == Status::Active {
            return Err(StoreError::AlreadyExists {
                what: format!("active remediation of node {}", remediation.node_uuid),
            });
        }
        let mut created = remediation.clone();
        created.id = state.remediations.keys().next_back().copied().unwrap_or(0) + 1;
        state.remediations.insert(created.id, created.clone());
        append_events(&mut state, events);
        Ok(created)
    }

    async fn remediation_update(
        &self,
        remediation: &Remediation,
        node: Option<&Node>,
        events: &[NewEvent],
        fence: Option<i64>,
    ) -> Result<(Remediation, Option<Node>), StoreError> {
        let mut state = self.lock();
        check_fence(&state, fence)?;
        let stored = state
            .remediations
            .get(&remediation.id)
            .ok_or_else(|| StoreError::not_found(format!("remediation {}", remediation.id)))?;
        if stored.generation != remediation.generation {
            return Err(StoreError::Conflict {
                what: format!("remediation {}", remediation.id),
                detail: format!(
                    "modified concurrently (expected generation {}, found {})",
                    remediation.generation, stored.generation
                ),
            });
        }
        if let Some(node) = node {
            let stored_node = state
                .nodes
                .get(&node.uuid)
                .ok_or_else(|| StoreError::not_found(format!("node {}", node.uuid)))?;
            if stored_node.generation != node.generation {
                return Err(StoreError::GenerationMismatch {
                    uuid: node.uuid.clone(),
                    expected: node.generation,
                    found: stored_node.generation,
                });
            }
        }
        let mut updated = remediation.clone();
        updated.generation += 1;
        state.remediations.insert(updated.id, updated.clone());
        let node = node.map(|node| {
            let last_heartbeat = state.nodes[&node.uuid].last_heartbeat_at_ms;
            let mut written = node.clone();
            written.generation += 1;
            written.last_heartbeat_at_ms = written.last_heartbeat_at_ms.max(last_heartbeat);
            state.nodes.insert(node.uuid.clone(), written.clone());
            written
        });
        append_events(&mut state, events);
        Ok((updated, node))
    }

    async fn remediation_get(&self, id: i64) -> Result<Option<Remediation>, StoreError> {
        Ok(self.lock().remediations.get(&id).cloned())
    }

    async fn lease_acquire(
        &self,
        holder: &str,
        ttl_ms: i64,
        now_ms: TimestampMs,
        memory: Option<&str>,
    ) -> Result<Lease, StoreError> {
        let mut state = self.lock();
        match claim(state.lease.as_ref(), holder, ttl_ms, now_ms, memory) {
            Some(next) => {
                state.lease = Some(next.clone());
                Ok(next)
            }
            None => Ok(Lease {
                db_now_ms: now_ms,
                ..state
                    .lease
                    .clone()
                    .expect("claim refuses only a held lease")
            }),
        }
    }

    async fn lease_release(
        &self,
        holder: &str,
        epoch: i64,
        now_ms: TimestampMs,
    ) -> Result<(), StoreError> {
        if let Some(lease) = self
            .lock()
            .lease
            .as_mut()
            .filter(|l| l.holder == holder && l.epoch == epoch)
        {
            lease.expires_at_ms = now_ms;
        }
        Ok(())
    }

    async fn replica_report(
        &self,
        replica: &Replica,
        now_ms: TimestampMs,
    ) -> Result<(), StoreError> {
        self.lock().replicas.insert(
            replica.name.clone(),
            Replica {
                last_seen_at_ms: now_ms,
                ..replica.clone()
            },
        );
        Ok(())
    }

    async fn cluster_read(&self, now_ms: TimestampMs) -> Result<ClusterStatus, StoreError> {
        let state = self.lock();
        let mut replicas: Vec<Replica> = state.replicas.values().cloned().collect();
        replicas.sort_by(|a, b| {
            b.last_seen_at_ms
                .cmp(&a.last_seen_at_ms)
                .then(a.name.cmp(&b.name))
        });
        Ok(ClusterStatus {
            enabled: false,
            db_now_ms: now_ms,
            lease: state.lease.clone().map(|lease| Lease {
                db_now_ms: now_ms,
                ..lease
            }),
            replicas,
        })
    }

    async fn remediation_list(
        &self,
        active_only: bool,
        node_uuid: Option<&NodeUuid>,
        limit: usize,
    ) -> Result<Vec<Remediation>, StoreError> {
        Ok(self
            .lock()
            .remediations
            .values()
            .rev()
            .filter(|r| !active_only || r.status == Status::Active)
            .filter(|r| node_uuid.is_none_or(|u| &r.node_uuid == u))
            .take(clamp_limit(limit))
            .cloned()
            .collect())
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
        let mut state = self.lock();
        if state.tokens.contains_key(name) {
            return Err(StoreError::AlreadyExists {
                what: format!("token {name}"),
            });
        }
        state.next_token_id += 1;
        let token = ApiToken {
            id: state.next_token_id,
            name: name.to_string(),
            role,
            secret_sha256: secret_sha256.to_string(),
            created_at_ms: at_ms,
            expires_at_ms,
            last_used_at_ms: None,
        };
        state.tokens.insert(name.to_string(), token.clone());
        append_events(&mut state, events);
        Ok(token)
    }

    async fn token_find(&self, secret_sha256: &str) -> Result<Option<ApiToken>, StoreError> {
        Ok(self
            .lock()
            .tokens
            .values()
            .find(|t| t.secret_sha256 == secret_sha256)
            .cloned())
    }

    async fn token_record_use(
        &self,
        id: i64,
        at_ms: TimestampMs,
        interval_ms: TimestampMs,
    ) -> Result<bool, StoreError> {
        let mut state = self.lock();
        let Some(token) = state.tokens.values_mut().find(|t| t.id == id) else {
            return Ok(false);
        };
        if token
            .last_used_at_ms
            .is_some_and(|last| last > at_ms - interval_ms)
        {
            return Ok(false);
        }
        token.last_used_at_ms = Some(at_ms);
        Ok(true)
    }

    async fn token_list(&self) -> Result<Vec<ApiToken>, StoreError> {
        Ok(self.lock().tokens.values().cloned().collect())
    }

    async fn token_delete(&self, name: &str, events: &[NewEvent]) -> Result<(), StoreError> {
        let mut state = self.lock();
        state
            .tokens
            .remove(name)
            .ok_or_else(|| StoreError::not_found(format!("token {name}")))?;
        append_events(&mut state, events);
        Ok(())
    }
}

/// A saga write's fencing check: with `fence`, the lease must still be at that epoch.
fn check_fence(state: &State, fence: Option<i64>) -> Result<(), StoreError> {
    let Some(written) = fence else {
        return Ok(());
    };
    let current = state.lease.as_ref().map(|lease| lease.epoch);
    if current == Some(written) {
        Ok(())
    } else {
        Err(StoreError::Fenced { written, current })
    }
}
