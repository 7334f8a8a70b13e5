//! The database as its own turmoil host ("db") for clustered runs: every replica's store
//! calls cross the simulated network to it, so a partition, a paused replica or a database
//! restart fails them the way a PostgreSQL connection fails — while a single daemon's run
//! keeps calling its in-memory store directly.
//!
//! What crosses the wire is the call's number; what the call does travels beside it in
//! shared memory (a queued closure over the one `MemoryStore`), because both ends live in
//! one process and encoding forty store methods would model nothing more. The network
//! alone decides whether a call reaches the database and runs there, and whether its
//! answer gets back: a call whose answer is cut after it ran has committed without its
//! caller knowing, as with any database. The data outlives the host (a restart loses no
//! committed write), and calls run on the database's clock where PostgreSQL's `now()`
//! would (the lease and the replicas' last-seen times).

use std::any::Any;
use std::collections::BTreeMap;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use async_trait::async_trait;
use bearman::core::cluster::{ClusterStatus, Lease, Replica};
use bearman::core::firmware::{FirmwareBundle, FirmwareRollout};
use bearman::core::model::{
    ApiToken, Event, EventFilter, Flavor, IpAllocation, IpPool, NewEvent, Node, NodeFilter,
    PoolPurpose, StateCounts, TimestampMs, TokenRole,
};
use bearman::core::remediation::Remediation;
use bearman::store::memory::MemoryStore;
use bearman::store::{OrphanAllocation, Registered, RegistrationWrite, Store, StoreError};
use bearman_proto::uuid::NodeUuid;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

pub const DB_HOST: &str = "db";
pub const DB_PORT: u16 = 5432;
/// A call with no answer by then fails, as a statement timeout would end it.
pub const CALL_TIMEOUT: Duration = Duration::from_secs(5);

type Answer = Box<dyn Any + Send>;
type Job = Box<dyn FnOnce(&MemoryStore, TimestampMs) -> Answer + Send>;

/// One lease term as the database granted it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Grant {
    pub epoch: i64,
    pub holder: String,
    pub at: Duration,
}

#[derive(Default)]
struct Calls {
    next_id: u64,
    queued: BTreeMap<u64, Job>,
    answered: BTreeMap<u64, Answer>,
}

/// The database: its data, the calls on their way, and every lease term it granted (for
/// the checker: at most one holder per epoch).
pub struct Database {
    pub store: Arc<MemoryStore>,
    calls: Mutex<Calls>,
    grants: Mutex<Vec<Grant>>,
}

fn lock<T>(mutex: &Mutex<T>) -> MutexGuard<'_, T> {
    mutex.lock().unwrap_or_else(|p| p.into_inner())
}

fn now() -> Duration {
    turmoil::sim_elapsed().unwrap_or_default()
}

impl Database {
    pub fn new(store: Arc<MemoryStore>) -> Arc<Database> {
        Arc::new(Database {
            store,
            calls: Mutex::default(),
            grants: Mutex::default(),
        })
    }

    /// Every lease term granted, in order.
    pub fn grants(&self) -> Vec<Grant> {
        lock(&self.grants).clone()
    }

    /// The lease as the database has it at `at` (virtual time).
    pub fn lease_at(&self, at: Duration) -> Option<Lease> {
        let now_ms = crate::run::EPOCH_MS + at.as_millis() as i64;
        MemoryStore::now_or_never(self.store.cluster_read(now_ms))
            .ok()
            .and_then(|status| status.lease)
    }

    fn queue(&self, job: Job) -> u64 {
        let mut calls = lock(&self.calls);
        calls.next_id += 1;
        let id = calls.next_id;
        calls.queued.insert(id, job);
        id
    }

    /// Runs call `id` if it is still wanted; whether it ran.
    fn run(&self, id: u64) -> bool {
        let job = lock(&self.calls).queued.remove(&id);
        let Some(job) = job else {
            return false;
        };
        let answer = job(&self.store, crate::run::EPOCH_MS + now().as_millis() as i64);
        lock(&self.calls).answered.insert(id, answer);
        true
    }

    /// The caller gave up on `id`: whatever it would have done or answered is dropped.
    fn forget(&self, id: u64) {
        let mut calls = lock(&self.calls);
        calls.queued.remove(&id);
        calls.answered.remove(&id);
    }

    fn record_grant(&self, lease: &Lease) {
        let mut grants = lock(&self.grants);
        if grants.last().is_none_or(|last| lease.epoch > last.epoch) {
            grants.push(Grant {
                epoch: lease.epoch,
                holder: lease.holder.clone(),
                at: now(),
            });
        }
    }
}

/// Serves the database. Runs as the "db" turmoil host's software: one call per
/// connection, its number in, one byte out (1: ran, 0: nothing to run).
pub async fn serve(db: Arc<Database>) -> turmoil::Result {
    let listener = turmoil::net::TcpListener::bind(("0.0.0.0", DB_PORT)).await?;
    loop {
        let Ok((mut stream, _)) = listener.accept().await else {
            continue;
        };
        let db = db.clone();
        tokio::task::spawn_local(async move {
            let mut id = [0u8; 8];
            if stream.read_exact(&mut id).await.is_err() {
                return;
            }
            let ran = db.run(u64::from_be_bytes(id));
            let _ = stream.write_all(&[u8::from(ran)]).await;
        });
    }
}

/// A replica's connection to the database: the production `Store` trait over the
/// simulated network.
pub struct RemoteStore {
    pub db: Arc<Database>,
}

fn unreachable(detail: impl std::fmt::Display) -> StoreError {
    StoreError::Unavailable(format!("database {DB_HOST}: {detail}"))
}

async fn exchange(id: u64) -> std::io::Result<bool> {
    let mut stream = turmoil::net::TcpStream::connect((DB_HOST, DB_PORT)).await?;
    stream.write_all(&id.to_be_bytes()).await?;
    let mut ran = [0u8; 1];
    stream.read_exact(&mut ran).await?;
    Ok(ran[0] == 1)
}

impl RemoteStore {
    /// Runs `job` on the database host, on its clock; fails when the database cannot be
    /// reached or does not answer within [`CALL_TIMEOUT`] (having run it or not).
    async fn call<T: Send + 'static>(
        &self,
        job: impl FnOnce(&MemoryStore, TimestampMs) -> T + Send + 'static,
    ) -> Result<T, StoreError> {
        let id = self
            .db
            .queue(Box::new(move |store, now_ms| Box::new(job(store, now_ms))));
        let outcome = tokio::time::timeout(CALL_TIMEOUT, exchange(id)).await;
        let answer = lock(&self.db.calls).answered.remove(&id);
        match (outcome, answer) {
            (Ok(Ok(true)), Some(answer)) => Ok(*answer
                .downcast::<T>()
                .expect("a call's answer has the type its job returns")),
            (Ok(Ok(_)), _) => {
                self.db.forget(id);
                Err(unreachable("the call was lost"))
            }
            (Ok(Err(error)), _) => {
                self.db.forget(id);
                Err(unreachable(error))
            }
            (Err(_), _) => {
                self.db.forget(id);
                Err(unreachable(format!(
                    "no answer within {} s",
                    CALL_TIMEOUT.as_secs()
                )))
            }
        }
    }
}

/// A store method's call on the database host: `$call` runs there with `store` bound.
macro_rules! remote {
    ($self:ident, |$store:ident| $call:expr) => {
        $self
            .call(move |$store: &MemoryStore, _now| MemoryStore::now_or_never($call))
            .await?
    };
}

#[async_trait]
impl Store for RemoteStore {
    fn backend_name(&self) -> &'static str {
        "remote-memory"
    }

    async fn ping(&self) -> Result<(), StoreError> {
        remote!(self, |store| store.ping())
    }

    async fn node_get(&self, uuid: &NodeUuid) -> Result<Option<Node>, StoreError> {
        let uuid = uuid.clone();
        remote!(self, |store| store.node_get(&uuid))
    }

    async fn node_list(&self, filter: &NodeFilter) -> Result<Vec<Node>, StoreError> {
        let filter = filter.clone();
        remote!(self, |store| store.node_list(&filter))
    }

    async fn node_count_by_state(&self) -> Result<StateCounts, StoreError> {
        remote!(self, |store| store.node_count_by_state())
    }

    async fn node_health_list(&self) -> Result<Vec<bearman::core::health::NodeHealth>, StoreError> {
        remote!(self, |store| store.node_health_list())
    }

    async fn node_booting_list(
        &self,
    ) -> Result<Vec<bearman::core::controller::BootingNode>, StoreError> {
        remote!(self, |store| store.node_booting_list())
    }

    async fn node_power_record(
        &self,
        uuid: &NodeUuid,
        reading: &bearman::core::power_sync::PowerReading,
        events: &[NewEvent],
    ) -> Result<bool, StoreError> {
        let (uuid, reading, events) = (uuid.clone(), reading.clone(), events.to_vec());
        remote!(self, |store| store
            .node_power_record(&uuid, &reading, &events))
    }

    async fn node_power_get(
        &self,
        uuid: &NodeUuid,
    ) -> Result<Option<bearman::core::power_sync::PowerReading>, StoreError> {
        let uuid = uuid.clone();
        remote!(self, |store| store.node_power_get(&uuid))
    }

    async fn node_create(&self, node: &Node, events: &[NewEvent]) -> Result<Node, StoreError> {
        let (node, events) = (node.clone(), events.to_vec());
        remote!(self, |store| store.node_create(&node, &events))
    }

    async fn node_update(&self, node: &Node, events: &[NewEvent]) -> Result<Node, StoreError> {
        let (node, events) = (node.clone(), events.to_vec());
        remote!(self, |store| store.node_update(&node, &events))
    }

    async fn node_register(&self, write: &RegistrationWrite) -> Result<Registered, StoreError> {
        let write = write.clone();
        remote!(self, |store| store.node_register(&write))
    }

    async fn node_record_heartbeat(
        &self,
        uuid: &NodeUuid,
        at_ms: TimestampMs,
    ) -> Result<(), StoreError> {
        let uuid = uuid.clone();
        remote!(self, |store| store.node_record_heartbeat(&uuid, at_ms))
    }

    async fn flavor_create(
        &self,
        flavor: &Flavor,
        at_ms: TimestampMs,
        events: &[NewEvent],
    ) -> Result<(), StoreError> {
        let (flavor, events) = (flavor.clone(), events.to_vec());
        remote!(self, |store| store.flavor_create(&flavor, at_ms, &events))
    }

    async fn flavor_put(
        &self,
        flavor: &Flavor,
        at_ms: TimestampMs,
        events: &[NewEvent],
    ) -> Result<(), StoreError> {
        let (flavor, events) = (flavor.clone(), events.to_vec());
        remote!(self, |store| store.flavor_put(&flavor, at_ms, &events))
    }

    async fn flavor_get(&self, name: &str) -> Result<Option<Flavor>, StoreError> {
        let name = name.to_string();
        remote!(self, |store| store.flavor_get(&name))
    }

    async fn flavor_list(&self) -> Result<Vec<Flavor>, StoreError> {
        remote!(self, |store| store.flavor_list())
    }

    async fn flavor_delete(&self, name: &str, events: &[NewEvent]) -> Result<(), StoreError> {
        let (name, events) = (name.to_string(), events.to_vec());
        remote!(self, |store| store.flavor_delete(&name, &events))
    }

    async fn firmware_bundle_create(
        &self,
        bundle: &FirmwareBundle,
        events: &[NewEvent],
    ) -> Result<(), StoreError> {
        let (bundle, events) = (bundle.clone(), events.to_vec());
        remote!(self, |store| store.firmware_bundle_create(&bundle, &events))
    }

    async fn firmware_bundle_list(&self) -> Result<Vec<FirmwareBundle>, StoreError> {
        remote!(self, |store| store.firmware_bundle_list())
    }

    async fn firmware_bundle_delete(
        &self,
        name: &str,
        events: &[NewEvent],
    ) -> Result<(), StoreError> {
        let (name, events) = (name.to_string(), events.to_vec());
        remote!(self, |store| store.firmware_bundle_delete(&name, &events))
    }

    async fn drill_board_get(&self) -> Result<bearman::core::drill::DrillBoard, StoreError> {
        remote!(self, |store| store.drill_board_get())
    }

    async fn drill_board_put(
        &self,
        board: &bearman::core::drill::DrillBoard,
        finished: Option<&bearman::core::drill::Drill>,
        events: &[NewEvent],
    ) -> Result<bearman::core::drill::DrillBoard, StoreError> {
        let (board, finished, events) = (board.clone(), finished.cloned(), events.to_vec());
        remote!(self, |store| store.drill_board_put(
            &board,
            finished.as_ref(),
            &events
        ))
    }

    async fn drill_list(
        &self,
        limit: usize,
    ) -> Result<Vec<bearman::core::drill::Drill>, StoreError> {
        remote!(self, |store| store.drill_list(limit))
    }

    async fn drill_get(&self, id: i64) -> Result<Option<bearman::core::drill::Drill>, StoreError> {
        remote!(self, |store| store.drill_get(id))
    }

    async fn firmware_rollout_get(&self) -> Result<FirmwareRollout, StoreError> {
        remote!(self, |store| store.firmware_rollout_get())
    }

    async fn firmware_rollout_put(
        &self,
        rollout: &FirmwareRollout,
        events: &[NewEvent],
    ) -> Result<FirmwareRollout, StoreError> {
        let (rollout, events) = (rollout.clone(), events.to_vec());
        remote!(self, |store| store.firmware_rollout_put(&rollout, &events))
    }

    async fn node_update_with_rollout(
        &self,
        node: &Node,
        rollout: &FirmwareRollout,
        events: &[NewEvent],
    ) -> Result<Node, StoreError> {
        let (node, rollout, events) = (node.clone(), rollout.clone(), events.to_vec());
        remote!(self, |store| store
            .node_update_with_rollout(&node, &rollout, &events))
    }

    async fn pool_create(&self, pool: &IpPool, events: &[NewEvent]) -> Result<(), StoreError> {
        let (pool, events) = (pool.clone(), events.to_vec());
        remote!(self, |store| store.pool_create(&pool, &events))
    }

    async fn pool_get(&self, name: &str) -> Result<Option<IpPool>, StoreError> {
        let name = name.to_string();
        remote!(self, |store| store.pool_get(&name))
    }

    async fn pool_list(&self) -> Result<Vec<IpPool>, StoreError> {
        remote!(self, |store| store.pool_list())
    }

    async fn pool_delete(&self, name: &str, events: &[NewEvent]) -> Result<(), StoreError> {
        let (name, events) = (name.to_string(), events.to_vec());
        remote!(self, |store| store.pool_delete(&name, &events))
    }

    async fn ip_allocate(
        &self,
        pool: &str,
        node_uuid: &NodeUuid,
        purpose: PoolPurpose,
        at_ms: TimestampMs,
    ) -> Result<IpAllocation, StoreError> {
        let (pool, node_uuid) = (pool.to_string(), node_uuid.clone());
        remote!(self, |store| store
            .ip_allocate(&pool, &node_uuid, purpose, at_ms))
    }

    async fn ip_list(
        &self,
        pool: Option<&str>,
        node_uuid: Option<&NodeUuid>,
    ) -> Result<Vec<IpAllocation>, StoreError> {
        let (pool, node_uuid) = (pool.map(str::to_string), node_uuid.cloned());
        remote!(self, |store| store
            .ip_list(pool.as_deref(), node_uuid.as_ref()))
    }

    async fn ip_release_node(&self, node_uuid: &NodeUuid) -> Result<usize, StoreError> {
        let node_uuid = node_uuid.clone();
        remote!(self, |store| store.ip_release_node(&node_uuid))
    }

    async fn ip_orphans(&self) -> Result<Vec<OrphanAllocation>, StoreError> {
        remote!(self, |store| store.ip_orphans())
    }

    async fn event_append(&self, events: &[NewEvent]) -> Result<(), StoreError> {
        let events = events.to_vec();
        remote!(self, |store| store.event_append(&events))
    }

    async fn event_list(&self, filter: &EventFilter) -> Result<Vec<Event>, StoreError> {
        let filter = filter.clone();
        remote!(self, |store| store.event_list(&filter))
    }

    async fn remediation_create(
        &self,
        remediation: &Remediation,
        events: &[NewEvent],
        fence: Option<i64>,
    ) -> Result<Remediation, StoreError> {
        let (remediation, events) = (remediation.clone(), events.to_vec());
        remote!(self, |store| store.remediation_create(
            &remediation,
            &events,
            fence
        ))
    }

    async fn remediation_update(
        &self,
        remediation: &Remediation,
        node: Option<&Node>,
        events: &[NewEvent],
        fence: Option<i64>,
    ) -> Result<(Remediation, Option<Node>), StoreError> {
        let (remediation, node, events) = (remediation.clone(), node.cloned(), events.to_vec());
        remote!(self, |store| store.remediation_update(
            &remediation,
            node.as_ref(),
            &events,
            fence
        ))
    }

    async fn lease_acquire(
        &self,
        holder: &str,
        ttl_ms: i64,
        _caller_now_ms: TimestampMs,
        memory: Option<&str>,
    ) -> Result<Lease, StoreError> {
        let (holder, memory) = (holder.to_string(), memory.map(str::to_string));
        let db = self.db.clone();
        self.call(move |store, db_now_ms| {
            let lease = MemoryStore::now_or_never(store.lease_acquire(
                &holder,
                ttl_ms,
                db_now_ms,
                memory.as_deref(),
            ));
            if let Ok(lease) = &lease {
                db.record_grant(lease);
            }
            lease
        })
        .await?
    }

    async fn lease_release(
        &self,
        holder: &str,
        epoch: i64,
        _caller_now_ms: TimestampMs,
    ) -> Result<(), StoreError> {
        let holder = holder.to_string();
        self.call(move |store, db_now_ms| {
            MemoryStore::now_or_never(store.lease_release(&holder, epoch, db_now_ms))
        })
        .await?
    }

    async fn replica_report(
        &self,
        replica: &Replica,
        _caller_now_ms: TimestampMs,
    ) -> Result<(), StoreError> {
        let replica = replica.clone();
        self.call(move |store, db_now_ms| {
            MemoryStore::now_or_never(store.replica_report(&replica, db_now_ms))
        })
        .await?
    }

    async fn cluster_read(&self, _caller_now_ms: TimestampMs) -> Result<ClusterStatus, StoreError> {
        self.call(move |store, db_now_ms| MemoryStore::now_or_never(store.cluster_read(db_now_ms)))
            .await?
    }

    async fn remediation_get(&self, id: i64) -> Result<Option<Remediation>, StoreError> {
        remote!(self, |store| store.remediation_get(id))
    }

    async fn remediation_list(
        &self,
        active_only: bool,
        node_uuid: Option<&NodeUuid>,
        limit: usize,
    ) -> Result<Vec<Remediation>, StoreError> {
        let node_uuid = node_uuid.cloned();
        remote!(self, |store| store.remediation_list(
            active_only,
            node_uuid.as_ref(),
            limit
        ))
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
        let (name, secret, events) = (name.to_string(), secret_sha256.to_string(), events.to_vec());
        remote!(self, |store| store.token_create(
            &name,
            role,
            &secret,
            at_ms,
            expires_at_ms,
            &events
        ))
    }

    async fn token_find(&self, secret_sha256: &str) -> Result<Option<ApiToken>, StoreError> {
        let secret = secret_sha256.to_string();
        remote!(self, |store| store.token_find(&secret))
    }

    async fn token_record_use(
        &self,
        id: i64,
        at_ms: TimestampMs,
        interval_ms: TimestampMs,
    ) -> Result<bool, StoreError> {
        remote!(self, |store| store.token_record_use(id, at_ms, interval_ms))
    }

    async fn token_list(&self) -> Result<Vec<ApiToken>, StoreError> {
        remote!(self, |store| store.token_list())
    }

    async fn token_delete(&self, name: &str, events: &[NewEvent]) -> Result<(), StoreError> {
        let (name, events) = (name.to_string(), events.to_vec());
        remote!(self, |store| store.token_delete(&name, &events))
    }
}
