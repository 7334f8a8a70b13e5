//! `kill -9` of a real `bearman serve` in the middle of a registration storm, several
//! times over, on SQLite and on PostgreSQL: whatever a killed daemon was doing, the
//! database it leaves behind has no allocation that no node accounts for, and every
//! address a node records is allocated to it.

#[allow(dead_code)]
#[path = "support/postgres.rs"]
mod postgres;
use postgres::PostgresSchema;

use std::fs::File;
use std::net::{SocketAddr, TcpListener};
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use bearman::core::model::{IpPool, NodeFilter, PoolPurpose};
use bearman::store::sql::SqlStore;
use bearman::store::Store;
use bearman_proto::http;
use bearman_proto::uuid::NodeUuid;

const BIN: &str = env!("CARGO_BIN_EXE_bearman");
/// How long start-up, a burst of registrations or a shutdown may take.
const BOUND: Duration = Duration::from_secs(60);
/// Kills per backend.
const KILLS: usize = 3;
/// Registrations that must have succeeded since the daemon started before it is killed,
/// so the kill lands while the storm is in full swing.
const SUCCESSES_BEFORE_KILL: usize = 25;
/// Concurrent registration clients.
const CLIENTS: usize = 12;
/// Uuids registered again and again by every client (the create races), on top of
/// each client's own fresh ones.
const SHARED_UUIDS: u64 = 4;
const UUID_NAMESPACE: u32 = 0x9111;

#[test]
fn killed_registrations_leave_no_orphan_allocation_on_sqlite() {
    let dir = tempfile::tempdir().unwrap();
    let data_dir = dir.path().join("data");
    std::fs::create_dir_all(&data_dir).unwrap();
    let url = format!(
        "sqlite://{}?mode=rwc",
        data_dir.join("bearman.db").display()
    );
    let database = Database {
        url,
        serve_args: vec!["--data-dir".into(), data_dir.display().to_string()],
    };
    kill_under_load(dir.path(), &database);
}

#[test]
fn killed_registrations_leave_no_orphan_allocation_on_postgres() {
    let dir = tempfile::tempdir().unwrap();
    let runtime = runtime();
    let schema = runtime.block_on(PostgresSchema::create("kill"));
    let database = Database {
        url: schema.url.clone(),
        serve_args: vec![
            "--data-dir".into(),
            dir.path().join("data").display().to_string(),
            "--database-url".into(),
            schema.url.clone(),
        ],
    };
    let outcome = std::panic::catch_unwind(|| kill_under_load(dir.path(), &database));
    runtime.block_on(schema.drop_it());
    if let Err(panic) = outcome {
        std::panic::resume_unwind(panic);
    }
}

/// Where the daemon keeps its data, and how `bearman serve` is told so.
struct Database {
    url: String,
    serve_args: Vec<String>,
}

fn runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap()
}

fn kill_under_load(dir: &Path, database: &Database) {
    let runtime = runtime();
    runtime.block_on(create_pools(&database.url));
    let mut total_successes = 0;
    for round in 0..KILLS {
        let mut serve = Serve::start(dir, database, round);
        let stop = Arc::new(AtomicBool::new(false));
        let successes = Arc::new(AtomicUsize::new(0));
        let clients: Vec<_> = (0..CLIENTS)
            .map(|client| {
                runtime.spawn(register_repeatedly(
                    serve.address,
                    (round * CLIENTS + client) as u64,
                    stop.clone(),
                    successes.clone(),
                ))
            })
            .collect();
        // Wait for the storm to be under way, then kill without warning.
        let deadline = Instant::now() + BOUND;
        while successes.load(Ordering::SeqCst) < SUCCESSES_BEFORE_KILL {
            if let Some(status) = serve.child.try_wait().unwrap() {
                panic!(
                    "bearman serve exited by itself ({status}):\n{}",
                    serve.log()
                );
            }
            assert!(
                Instant::now() < deadline,
                "only {} registrations succeeded within {BOUND:?}:\n{}",
                successes.load(Ordering::SeqCst),
                serve.log()
            );
            std::thread::sleep(Duration::from_millis(5));
        }
        serve.kill();
        stop.store(true, Ordering::SeqCst);
        runtime.block_on(async {
            for client in clients {
                tokio::time::timeout(BOUND, client)
                    .await
                    .expect("clients stop once the daemon is gone")
                    .expect("client task");
            }
        });
        total_successes += successes.load(Ordering::SeqCst);
    }
    // The daemon is dead; open the database it left, as the next start-up would.
    let violations = runtime.block_on(check_database(&database.url));
    eprintln!(
        "{KILLS} kills, {total_successes} successful registrations, {} violation(s)",
        violations.len()
    );
    assert!(
        violations.is_empty(),
        "after {KILLS} kills:\n{}",
        violations.join("\n")
    );
}

async fn create_pools(url: &str) {
    let store = SqlStore::connect(url).await.expect("open database");
    for (name, purpose, cidr, start, end) in [
        (
            "kill-node",
            PoolPurpose::Node,
            "10.60.0.0/16",
            "10.60.0.10",
            "10.60.250.250",
        ),
        (
            "kill-bmc",
            PoolPurpose::Bmc,
            "10.61.0.0/16",
            "10.61.0.10",
            "10.61.250.250",
        ),
    ] {
        let pool = IpPool {
            name: name.into(),
            purpose,
            vlan: None,
            cidr: cidr.into(),
            range_start: start.into(),
            range_end: end.into(),
            gateway: None,
            dns: vec![],
            mtu: 1500,
        };
        store.pool_create(&pool, &[]).await.expect("create pool");
    }
    store.close().await;
}

/// One client: registers its own fresh uuids, interleaved with the shared ones, until
/// told to stop. Failures are expected once the daemon is killed.
async fn register_repeatedly(
    address: SocketAddr,
    client: u64,
    stop: Arc<AtomicBool>,
    successes: Arc<AtomicUsize>,
) {
    // Bounded: far more than a round ever needs.
    for attempt in 0..100_000u64 {
        if stop.load(Ordering::SeqCst) {
            return;
        }
        let index = if attempt % 2 == 0 {
            attempt % SHARED_UUIDS
        } else {
            1_000 + client * 10_000 + attempt
        };
        let uuid = NodeUuid::from_index(UUID_NAMESPACE, index);
        let body = registration_body(index);
        let exchange = async {
            let mut stream = tokio::net::TcpStream::connect(address).await.ok()?;
            let headers = [("Content-Type", "application/json")];
            http::send(
                &mut stream,
                "POST",
                &address.to_string(),
                &format!("/ipxe/{uuid}/register"),
                &headers,
                Some(&body),
            )
            .await
            .ok()
        };
        match tokio::time::timeout(Duration::from_secs(10), exchange).await {
            Ok(Some(response)) if response.status == 200 => {
                successes.fetch_add(1, Ordering::SeqCst);
            }
            // A refusal or a dead daemon: both end the same way, next attempt.
            _ => tokio::task::yield_now().await,
        }
    }
}

fn registration_body(index: u64) -> Vec<u8> {
    let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("../fixtures/hardware/r640.json");
    let mut body: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(path).unwrap()).unwrap();
    body["serial"] = format!("KILL{index}").into();
    for nic in 0..2 {
        body["nics"][nic]["mac"] = format!(
            "52:54:{:02x}:{:02x}:{:02x}:{:02x}",
            (index >> 16) & 0xff,
            (index >> 8) & 0xff,
            index & 0xff,
            nic
        )
        .into();
    }
    serde_json::to_vec(&body).unwrap()
}

/// Every way the database could disagree with itself about addresses.
async fn check_database(url: &str) -> Vec<String> {
    let store = SqlStore::connect(url).await.expect("reopen database");
    let mut violations: Vec<String> = store
        .ip_orphans()
        .await
        .expect("orphan check")
        .into_iter()
        .map(|orphan| {
            format!(
                "orphan allocation {} of {} ({})",
                orphan.allocation.address,
                orphan.allocation.node_uuid,
                orphan.reason.as_str()
            )
        })
        .collect();
    // The same question asked without the store's help, and the other direction.
    let allocations = store.ip_list(None, None).await.unwrap();
    let mut after = None;
    for _ in 0..1_000 {
        let page = store
            .node_list(&NodeFilter {
                after: after.clone(),
                limit: 1_000,
                ..Default::default()
            })
            .await
            .unwrap();
        let Some(last) = page.last() else { break };
        after = Some(last.uuid.clone());
        for node in &page {
            let mut recorded: Vec<&str> = node
                .network
                .bond0_addresses
                .iter()
                .map(|a| a.split('/').next().unwrap_or(a))
                .collect();
            recorded.extend(node.bmc.address.as_deref());
            for address in recorded {
                let holder = allocations
                    .iter()
                    .find(|a| a.address == address)
                    .map(|a| &a.node_uuid);
                if holder != Some(&node.uuid) {
                    violations.push(format!(
                        "{} records {address}, allocated to {holder:?}",
                        node.uuid
                    ));
                }
            }
        }
    }
    for allocation in &allocations {
        if store
            .node_get(&allocation.node_uuid)
            .await
            .unwrap()
            .is_none()
        {
            violations.push(format!(
                "{} is allocated to {}, which does not exist",
                allocation.address, allocation.node_uuid
            ));
        }
    }
    store.close().await;
    violations
}

/// A port nothing listens on right now.
fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// A running `bearman serve`, killed (`SIGKILL`) when dropped.
struct Serve {
    child: Child,
    address: SocketAddr,
    log: std::path::PathBuf,
}

impl Serve {
    fn start(dir: &Path, database: &Database, round: usize) -> Serve {
        let address: SocketAddr = format!("127.0.0.1:{}", free_port()).parse().unwrap();
        let log = dir.join(format!("serve-{round}.log"));
        let mut command = Command::new(BIN);
        command.current_dir(dir).stdin(Stdio::null());
        for (key, _) in std::env::vars_os() {
            if key.to_string_lossy().starts_with("BEARMAN_") {
                command.env_remove(key);
            }
        }
        // The storm's machines are let in as they come: what is under test is the
        // registration transaction, not the enrollment policy.
        let config = dir.join("serve.toml");
        std::fs::write(&config, "[enrollment]\nauto_accept = true\n").unwrap();
        command
            .args(["serve", "--listen", &address.to_string()])
            .arg("--config")
            .arg(&config)
            .args(&database.serve_args)
            .stdout(Stdio::null())
            .stderr(File::create(&log).unwrap());
        let child = command.spawn().expect("spawn bearman serve");
        let mut serve = Serve {
            child,
            address,
            log,
        };
        serve.wait_until_healthy();
        serve
    }

    fn log(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    fn wait_until_healthy(&mut self) {
        let deadline = Instant::now() + BOUND;
        loop {
            if let Some(status) = self.child.try_wait().unwrap() {
                panic!("bearman serve exited early ({status}):\n{}", self.log());
            }
            if std::net::TcpStream::connect(self.address).is_ok() {
                return;
            }
            assert!(
                Instant::now() < deadline,
                "bearman serve did not listen within {BOUND:?}:\n{}",
                self.log()
            );
            std::thread::sleep(Duration::from_millis(25));
        }
    }

    /// `kill -9`: no shutdown handler runs, in-flight transactions die where they are.
    fn kill(&mut self) {
        // std's `Child::kill` sends SIGKILL on Unix.
        self.child.kill().expect("SIGKILL bearman serve");
        self.child.wait().expect("reap bearman serve");
    }
}

impl Drop for Serve {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}
