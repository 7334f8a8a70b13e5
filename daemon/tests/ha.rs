//! Two replicas on one real PostgreSQL database (a schema of this test's own): one
//! leads and runs the controller, the other stands by; when the leader stops renewing,
//! the other takes the lease under a new epoch and finishes the in-flight remediation
//! from its persisted step, and the old leader's saga writes are refused (fenced) and
//! make no BMC call.

#[allow(dead_code)]
#[path = "support/postgres.rs"]
mod postgres;

use std::sync::{Arc, Mutex};
use std::time::Duration;

use async_trait::async_trait;
use bearman::app::cluster::Acting;
use bearman::app::{App, Settings};
use bearman::bmc::{Bmc, BmcError, BmcProvider, PowerState};
use bearman::controller::{Controller, ControllerConfig};
use bearman::core::cluster::{ClusterConfig, Replica};
use bearman::core::lifecycle::LifecycleState;
use bearman::core::model::{Node, NodeRole};
use bearman::core::registration::RegistrationDefaults;
use bearman::core::remediation::{RemediationKind, Status};
use bearman::runtime::system::SystemClock;
use bearman::store::sql::SqlStore;
use bearman::store::{Store, StoreError};
use bearman_proto::uuid::NodeUuid;

/// One machine, its power state, and which replica sent each command.
#[derive(Default)]
struct Machine {
    on: Mutex<bool>,
    calls: Mutex<Vec<(String, &'static str)>>,
}

/// A replica's view of the machine's BMC: every call is tagged with the replica.
struct ReplicaBmc {
    replica: String,
    machine: Arc<Machine>,
}

impl ReplicaBmc {
    fn record(&self, call: &'static str) {
        self.machine
            .calls
            .lock()
            .unwrap()
            .push((self.replica.clone(), call));
    }
}

#[async_trait]
impl Bmc for ReplicaBmc {
    async fn power_state(&self) -> Result<PowerState, BmcError> {
        self.record("status");
        Ok(if *self.machine.on.lock().unwrap() {
            PowerState::On
        } else {
            PowerState::Off
        })
    }
    async fn power_on(&self) -> Result<(), BmcError> {
        self.record("on");
        *self.machine.on.lock().unwrap() = true;
        Ok(())
    }
    async fn power_off(&self) -> Result<(), BmcError> {
        self.record("off");
        *self.machine.on.lock().unwrap() = false;
        Ok(())
    }
    async fn set_next_boot_pxe(&self) -> Result<(), BmcError> {
        self.record("pxe");
        Ok(())
    }
}

struct Bmcs(Arc<ReplicaBmc>);

impl BmcProvider for Bmcs {
    fn bmc_for(&self, _node: &Node) -> Result<Arc<dyn Bmc>, BmcError> {
        Ok(self.0.clone())
    }
}

struct TestReplica {
    app: App,
    controller: Arc<Controller>,
    replica: Replica,
}

const LEASE: ClusterConfig = ClusterConfig {
    enabled: true,
    replica_name: None,
    lease_ttl_ms: 1_500,
    renew_every_ms: 200,
    renew_deadline_ms: 1_000,
    cache_max_age_ms: 1_000,
};

async fn replica(url: &str, name: &str, machine: &Arc<Machine>) -> TestReplica {
    let store: Arc<dyn Store> = Arc::new(SqlStore::connect(url).await.expect("open postgres"));
    let app = App::new(
        store,
        Arc::new(SystemClock),
        Settings {
            defaults: RegistrationDefaults {
                role: NodeRole::Compute,
                flavor: None,
            },
            enrollment: bearman::core::enrollment::EnrollmentPolicy::accept_all(),
            heartbeat_fresh_ms: 30_000,
            firmware: Default::default(),
        },
    );
    app.leader.join(name, &LEASE);
    let mut config = ControllerConfig {
        startup_quiet_ms: 0,
        ..Default::default()
    };
    config.limits.soft_off_grace_ms = 0;
    config.limits.backoff_initial_ms = 10;
    config.limits.backoff_max_ms = 20;
    // Nothing here heartbeats: no power polls, no automatic judgement of the node.
    config.health.power_poll_interval_ms = 0;
    config.automatic = false;
    let bmc = Arc::new(ReplicaBmc {
        replica: name.to_string(),
        machine: machine.clone(),
    });
    let controller = Controller::new(app.clone(), Arc::new(Bmcs(bmc)), None, config);
    TestReplica {
        replica: Replica {
            name: name.into(),
            address: format!("http://{name}:8080"),
            version: "test".into(),
            started_at_ms: 0,
            last_seen_at_ms: 0,
        },
        app,
        controller,
    }
}

impl TestReplica {
    async fn elect(&self) -> Acting {
        self.app.cluster_elect(&self.replica).await;
        self.app.leader.acting(self.app.now_ms())
    }

    async fn tick(&self) {
        self.controller.clone().tick_and_wait().await.unwrap();
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_standby_takes_over_a_silent_leader_and_finishes_its_fence_and_the_old_leader_is_fenced()
{
    postgres::with_schema("ha", takeover).await;
}

async fn takeover(url: String) {
    let machine = Arc::new(Machine::default());
    *machine.on.lock().unwrap() = true;
    let a = replica(&url, "replica-a", &machine).await;
    let b = replica(&url, "replica-b", &machine).await;
    // A's last renewal (it goes silent later): no one may lead before this plus the TTL.
    let last_renewal = std::time::Instant::now();
    assert_eq!(a.elect().await, Acting::Leader { epoch: 1 });
    assert_eq!(b.elect().await, Acting::Standby, "one leader at a time");

    // A node stuck mid-boot; an operator fences it.
    let uuid = NodeUuid::from_index(91, 1);
    let mut node = Node::new(uuid.clone(), "cn1".into(), NodeRole::Compute, 0);
    node.state = LifecycleState::Provisioning;
    a.app.store.node_create(&node, &[]).await.unwrap();
    let remediation = b
        .app
        .remediation_start("token:ops", &uuid, RemediationKind::Fence, "stuck")
        .await
        .expect("any replica takes operator requests");

    // The standby acts on nothing; the leader runs the first steps (soft-off skipped,
    // the hard power-off).
    b.tick().await;
    assert!(
        machine.calls.lock().unwrap().is_empty(),
        "the standby made a BMC call"
    );
    a.tick().await;
    a.tick().await;
    let after_a = machine.calls.lock().unwrap().clone();
    assert!(
        after_a.iter().all(|(who, _)| who == "replica-a")
            && after_a.iter().any(|(_, c)| *c == "off"),
        "{after_a:?}"
    );
    let mid = a
        .app
        .store
        .remediation_get(remediation.id)
        .await
        .unwrap()
        .unwrap();
    assert_eq!(mid.status, Status::Active, "still in flight: {mid:?}");

    // The leader goes silent (stops renewing). Past its TTL the standby takes over,
    // under a larger epoch.
    let silent_since = std::time::Instant::now();
    let epoch = loop {
        if let Acting::Leader { epoch } = b.elect().await {
            break epoch;
        }
        assert!(
            silent_since.elapsed() < Duration::from_millis(LEASE.lease_ttl_ms as u64 * 3),
            "no takeover"
        );
        tokio::time::sleep(Duration::from_millis(LEASE.renew_every_ms as u64)).await;
    };
    let failover = silent_since.elapsed();
    assert_eq!(epoch, 2);
    let since_renewal = last_renewal.elapsed();
    assert!(
        since_renewal >= Duration::from_millis(LEASE.lease_ttl_ms as u64),
        "taken over {since_renewal:?} after the old leader's last renewal, before its lease could expire"
    );
    eprintln!("taken over {since_renewal:?} after the old leader's last renewal ({failover:?} after it went silent)");
    // The old leader's own deadline passed long before: it acts on nothing ...
    assert_eq!(a.app.leader.acting(a.app.now_ms()), Acting::Standby);
    let calls_before = machine.calls.lock().unwrap().len();
    a.tick().await;
    assert_eq!(machine.calls.lock().unwrap().len(), calls_before);
    // ... and even one that still believed it leads cannot write under its old epoch.
    let stale = a.app.saga_begin_step(remediation.id, Some(1)).await;
    assert!(
        matches!(
            stale,
            Err(bearman::app::saga::SagaError::Store(StoreError::Fenced {
                written: 1,
                current: Some(2)
            }))
        ),
        "{stale:?}"
    );

    // The new leader resumes the saga from its persisted step and finishes the fence.
    for _ in 0..50 {
        b.tick().await;
        let now = b
            .app
            .store
            .remediation_get(remediation.id)
            .await
            .unwrap()
            .unwrap();
        if now.status != Status::Active {
            break;
        }
        tokio::time::sleep(Duration::from_millis(30)).await;
        b.elect().await;
    }
    let done = b
        .app
        .store
        .remediation_get(remediation.id)
        .await
        .unwrap()
        .unwrap();
    assert_eq!(done.status, Status::Done, "{done:?}");
    assert_eq!(done.epoch, Some(2), "its last write was the new leader's");
    let node = b.app.store.node_get(&uuid).await.unwrap().unwrap();
    assert_eq!(node.state, LifecycleState::Fenced);
    let calls = machine.calls.lock().unwrap().clone();
    assert!(
        calls[after_a.len()..]
            .iter()
            .all(|(who, _)| who == "replica-b"),
        "after the takeover only the new leader calls the BMC: {calls:?}"
    );

    // Both replicas are listed; the lease names the new holder.
    let status = a.app.cluster_status().await.unwrap();
    assert!(status.enabled);
    let lease = status.lease.unwrap();
    assert_eq!((lease.holder.as_str(), lease.epoch), ("replica-b", 2));
    let names: Vec<&str> = status.replicas.iter().map(|r| r.name.as_str()).collect();
    assert!(
        names.contains(&"replica-a") && names.contains(&"replica-b"),
        "{names:?}"
    );

    // A clean shutdown hands the lease over at once.
    b.app.cluster_resign().await.unwrap();
    assert_eq!(a.elect().await, Acting::Leader { epoch: 3 });
}
