//! Upgrading a database made by the previous release: the schema at migrations
//! 0001..0004 (what the release before token expiry shipped, applied from the migration
//! files themselves), one or more rows in every table those migrations created, written
//! with plain SQL as that release wrote them. The current binary then migrates it
//! (`bearman migrate run` on SQLite, `SqlStore::connect` as `bearman serve` does on
//! PostgreSQL) and every row reads back through the `Store` trait, the new columns at
//! their defaults.

#[allow(dead_code)]
#[path = "support/postgres.rs"]
mod postgres;
#[allow(dead_code)]
#[path = "support/serve.rs"]
mod support;

use std::path::Path;

use bearman::core::controller::BootingNode;
use bearman::core::lifecycle::LifecycleState;
use bearman::core::model::{
    BootPhase, BootProgress, EventFilter, NodeFilter, PoolPurpose, TokenRole,
};
use bearman::core::power_sync::PowerReadingState;
use bearman::store::sql::migrate::MigrationInfo;
use bearman::store::sql::{Backend, SqlStore};
use bearman::store::Store;
use bearman_proto::uuid::NodeUuid;
use support::*;

/// The migrations of the previous release: everything before 0005 (token expiry); this
/// one adds 0005, 0006 (firmware bundles and rollout), 0007 (chaos drills) and 0008 (the
/// boot watchdog's columns, filled from the documents).
const PREVIOUS_RELEASE_LAST: i64 = 4;

const NODE_A: &str = "00000500-0000-0000-0000-000000000001";
const NODE_B: &str = "00000500-0000-0000-0000-000000000002";

/// A node document exactly as the previous release stored it.
fn node_doc(uuid: &str, hostname: &str, state: &str, address: &str, boot: &str) -> String {
    format!(
        r#"{{"uuid":"{uuid}","hostname":"{hostname}","serial":"SER-{hostname}","vendor":"Dell","model":"R650","role":"compute","flavor":"hv-2025","rack":"r12","state":"{state}","generation":3,"hardware":{{"cpu":{{"model":"EPYC","sockets":2,"cores":64,"threads":128}},"memory_bytes":549755813888,"disks":[],"nics":[{{"name":"eth0","mac":"02:00:00:05:00:01","speed_mbps":25000,"lldp":null}}]}},"firmware":{{"bios":"2.1.0","bmc":null,"nics":{{}}}},"bmc":{{"address":"10.50.1.10","mac":null,"driver":null,"credentials_ref":null}},"network":{{"vlan":null,"bond0_addresses":["{address}/24"],"gateway":"10.50.0.1","dns":["10.50.0.2"],"mtu":9000}},"created_at_ms":1000,"updated_at_ms":3000,"registered_at_ms":2000,"installed_at_ms":null,"last_heartbeat_at_ms":null,"boot":{boot},"maintenance":null,"pending_acceptance":null}}"#
    )
}

const FLAVOR_DOC: &str = r#"{"name":"hv-2025","kernel":{"url":"http://images/vmlinuz","sha256":"aaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaa"},"initrds":[],"cmdline_template":"console=ttyS0 hostname={hostname}","firmware_expected":{"bios":null,"bmc":null,"nics":{}}}"#;
const POOL_DOC: &str = r#"{"name":"rack12","purpose":"node","vlan":null,"cidr":"10.50.0.0/24","range_start":"10.50.0.10","range_end":"10.50.0.200","gateway":"10.50.0.1","dns":["10.50.0.2"],"mtu":9000}"#;
const REMEDIATION_DOC: &str = r#"{"id":1,"node_uuid":"00000500-0000-0000-0000-000000000002","kind":"automatic","status":"done","plan":["soft_off","power_off","verify_off","force_down","evacuate","verify_evacuated","rebuild","await_ready"],"step_index":8,"attempts":0,"rebuilds":1,"next_attempt_at_ms":9000,"step_started_at_ms":9000,"created_at_ms":8000,"updated_at_ms":9500,"requested_by":"system","reason":"silent for 120 s","last_error":null,"vms_evacuated":["vm-1"],"fenced_at_ms":8500,"evacuated_at_ms":8800,"finished_at_ms":9500,"fence_unverified_at_ms":null,"fence_retries":0,"vms_unverified":[],"epoch":null,"generation":5}"#;

/// Rows in every table migrations 0001..0004 created, in the previous release's columns.
fn previous_release_rows() -> Vec<String> {
    let quote = |text: &str| text.replace('\'', "''");
    vec![
        format!("INSERT INTO flavors (name, doc, updated_at_ms) VALUES ('hv-2025', '{}', 500)", quote(FLAVOR_DOC)),
        format!("INSERT INTO ip_pools (name, purpose, doc) VALUES ('rack12', 'node', '{}')", quote(POOL_DOC)),
        format!(
            "INSERT INTO nodes (uuid, hostname, serial, rack, role, state, flavor, generation, created_at_ms, updated_at_ms, last_heartbeat_at_ms, doc) \
             VALUES ('{NODE_A}', 'cn-a', 'SER-cn-a', 'r12', 'compute', 'ready', 'hv-2025', 3, 1000, 3000, 4000, '{}')",
            quote(&node_doc(NODE_A, "cn-a", "ready", "10.50.0.10", "null"))
        ),
        format!(
            "INSERT INTO nodes (uuid, hostname, serial, rack, role, state, flavor, generation, created_at_ms, updated_at_ms, last_heartbeat_at_ms, doc) \
             VALUES ('{NODE_B}', 'cn-b', 'SER-cn-b', 'r12', 'compute', 'registered', 'hv-2025', 3, 1000, 3000, NULL, '{}')",
            quote(&node_doc(
                NODE_B,
                "cn-b",
                "registered",
                "10.50.0.11",
                r#"{"phase":"registered","at_ms":2000}"#
            ))
        ),
        format!("INSERT INTO ip_allocations (pool, address, address_num, node_uuid, purpose, allocated_at_ms) VALUES ('rack12', '10.50.0.10', 171048970, '{NODE_A}', 'node', 2000)"),
        format!("INSERT INTO ip_allocations (pool, address, address_num, node_uuid, purpose, allocated_at_ms) VALUES ('rack12', '10.50.0.11', 171048971, '{NODE_B}', 'node', 2001)"),
        format!("INSERT INTO events (at_ms, node_uuid, actor, action, from_state, to_state, reason) VALUES (2000, '{NODE_A}', 'node', 'register', 'discovered', 'registered', 'first boot')"),
        "INSERT INTO events (at_ms, node_uuid, actor, action, from_state, to_state, reason) VALUES (2500, NULL, 'token:admin', 'flavor_create', NULL, NULL, 'hv-2025')".to_string(),
        "INSERT INTO api_tokens (name, role, secret_sha256, created_at_ms) VALUES ('admin', 'admin', 'aaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaa', 100)".to_string(),
        "INSERT INTO api_tokens (name, role, secret_sha256, created_at_ms) VALUES ('dashboard', 'viewer', 'bbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbb', 200)".to_string(),
        format!(
            "INSERT INTO remediations (node_uuid, status, generation, created_at_ms, doc) VALUES ('{NODE_B}', 'done', 5, 8000, '{}')",
            quote(REMEDIATION_DOC)
        ),
        format!("INSERT INTO node_power (node_uuid, state, read_at_ms, error) VALUES ('{NODE_A}', 'on', 7000, NULL)"),
        format!("INSERT INTO node_power (node_uuid, state, read_at_ms, error) VALUES ('{NODE_B}', 'unknown', 7100, 'BMC timed out')"),
        "INSERT INTO leader_lease (name, holder, epoch, acquired_at_ms, expires_at_ms, controller_memory) VALUES ('controller', 'replica-1', 7, 1000, 2000, '{}')".to_string(),
        "INSERT INTO replicas (name, address, version, started_at_ms, last_seen_at_ms) VALUES ('replica-1', 'http://10.0.0.1:8080', '0.0.9', 1000, 2000)".to_string(),
    ]
}

/// The previous release's schema and data at `url`: migrations 0001..0004 applied from
/// copies of this tree's files (so their checksums are the released ones).
async fn previous_release_database(url: &str, backend: Backend) {
    let source = Path::new(env!("CARGO_MANIFEST_DIR")).join(match backend {
        Backend::Sqlite => "migrations/sqlite",
        Backend::Postgres => "migrations/postgres",
    });
    let previous = tempfile::tempdir().unwrap();
    for entry in std::fs::read_dir(&source).unwrap() {
        let entry = entry.unwrap();
        let name = entry.file_name().to_string_lossy().into_owned();
        let version: i64 = name[..4].parse().unwrap();
        if version <= PREVIOUS_RELEASE_LAST {
            std::fs::copy(entry.path(), previous.path().join(&name)).unwrap();
        }
    }
    let migrator = sqlx::migrate::Migrator::new(previous.path()).await.unwrap();
    assert_eq!(migrator.iter().count(), PREVIOUS_RELEASE_LAST as usize);
    sqlx::any::install_default_drivers();
    let pool = sqlx::AnyPool::connect(url).await.unwrap();
    migrator.run(&pool).await.unwrap();
    for statement in previous_release_rows() {
        sqlx::query(&statement)
            .execute(&pool)
            .await
            .unwrap_or_else(|e| panic!("{statement}: {e}"));
    }
    pool.close().await;
}

/// Every row of the previous release, read through the `Store` trait after the upgrade.
async fn every_row_reads_back(store: &dyn Store) {
    let a = NodeUuid::parse(NODE_A).unwrap();
    let b = NodeUuid::parse(NODE_B).unwrap();
    let node = store.node_get(&a).await.unwrap().expect("node A survives");
    assert_eq!(node.hostname, "cn-a");
    assert_eq!(node.state, LifecycleState::Ready);
    assert_eq!(node.flavor.as_deref(), Some("hv-2025"));
    assert_eq!(node.rack.as_deref(), Some("r12"));
    assert_eq!(node.generation, 3);
    assert_eq!(node.last_heartbeat_at_ms, Some(4000));
    assert_eq!(node.hardware.memory_bytes, 549_755_813_888);
    // Records from before firmware compliance read with an empty inventory, no update.
    assert!(node.firmware_components.is_empty());
    assert_eq!(node.firmware_update, None);
    assert_eq!(node.firmware.bios.as_deref(), Some("2.1.0"));
    let rollout = store.firmware_rollout_get().await.unwrap();
    assert_eq!((rollout.generation, rollout.slots.len()), (0, 0));
    assert!(store.firmware_bundle_list().await.unwrap().is_empty());
    // No drill before drills existed; a record without the silence field is not silenced.
    let board = store.drill_board_get().await.unwrap();
    assert_eq!((board.generation, board.active.is_none()), (0, true));
    assert!(store.drill_list(10).await.unwrap().is_empty());
    assert_eq!(node.drill_silenced_until_ms, None);
    assert_eq!(
        node.network.bond0_addresses,
        vec!["10.50.0.10/24".to_string()]
    );
    let node_b = store.node_get(&b).await.unwrap().expect("node B survives");
    assert_eq!(node_b.state, LifecycleState::Registered);
    assert_eq!(node_b.last_heartbeat_at_ms, None);
    // Migration 0008 filled the boot watchdog's columns from the documents.
    let boot = Some(BootProgress {
        phase: BootPhase::Registered,
        at_ms: 2000,
        until_ms: None,
    });
    assert_eq!(node_b.boot, boot);
    assert_eq!(
        store.node_booting_list().await.unwrap(),
        vec![BootingNode {
            uuid: b.clone(),
            rack: Some("r12".to_string()),
            state: LifecycleState::Registered,
            boot,
            bmc_configured: true,
        }]
    );
    assert_eq!(
        store.node_list(&NodeFilter::default()).await.unwrap().len(),
        2
    );

    let flavor = store.flavor_get("hv-2025").await.unwrap().expect("flavor");
    assert_eq!(flavor.cmdline_template, "console=ttyS0 hostname={hostname}");
    let pool = store.pool_get("rack12").await.unwrap().expect("pool");
    assert_eq!(pool.purpose, PoolPurpose::Node);
    assert_eq!(pool.mtu, 9000);
    let addresses = store.ip_list(Some("rack12"), None).await.unwrap();
    let listed: Vec<_> = addresses
        .iter()
        .map(|a| (a.address.as_str(), a.node_uuid.as_str()))
        .collect();
    assert_eq!(listed, vec![("10.50.0.10", NODE_A), ("10.50.0.11", NODE_B)]);

    let events = store
        .event_list(&EventFilter {
            node_uuid: None,
            before_id: None,
            after_id: None,
            limit: 100,
        })
        .await
        .unwrap();
    assert_eq!(events.len(), 2, "{events:?}");
    assert_eq!(events[0].reason, "hv-2025", "newest first");
    assert_eq!(events[1].node_uuid.as_ref(), Some(&a));
    assert_eq!(events[1].from_state.as_deref(), Some("discovered"));

    // Migration 0005's columns, at their defaults for rows that predate it.
    let tokens = store.token_list().await.unwrap();
    let names: Vec<_> = tokens.iter().map(|t| t.name.as_str()).collect();
    assert_eq!(names, vec!["admin", "dashboard"]);
    for token in &tokens {
        assert_eq!(token.expires_at_ms, None, "{}: never expires", token.name);
        assert_eq!(token.last_used_at_ms, None, "{}: never used", token.name);
    }
    let admin = store
        .token_find(&"a".repeat(64))
        .await
        .unwrap()
        .expect("admin token authenticates");
    assert_eq!(admin.role, TokenRole::Admin);
    // And the new columns work on the old rows.
    assert!(store
        .token_record_use(admin.id, 10_000, 60_000)
        .await
        .unwrap());
    let used = store.token_find(&"a".repeat(64)).await.unwrap().unwrap();
    assert_eq!(used.last_used_at_ms, Some(10_000));

    let remediations = store.remediation_list(false, None, 10).await.unwrap();
    assert_eq!(remediations.len(), 1);
    assert_eq!(remediations[0].node_uuid, b);
    assert_eq!(remediations[0].vms_evacuated, vec!["vm-1".to_string()]);
    let power = store
        .node_power_get(&b)
        .await
        .unwrap()
        .expect("power reading");
    assert_eq!(power.state, PowerReadingState::Unknown);
    assert_eq!(power.error.as_deref(), Some("BMC timed out"));

    let cluster = store.cluster_read(3_000).await.unwrap();
    assert_eq!(cluster.replicas.len(), 1);
    assert_eq!(cluster.replicas[0].version, "0.0.9");
    let lease = cluster.lease.expect("the lease row");
    assert_eq!((lease.holder.as_str(), lease.epoch), ("replica-1", 7));
}

/// The previous release, still running during a rolling upgrade, writes a node as it
/// always did (the document and the columns it knows): the boot watchdog's columns
/// follow, since the database derives them from the document.
async fn an_older_writer_keeps_the_boot_columns_true(url: &str, store: &dyn Store) {
    let b = NodeUuid::parse(NODE_B).unwrap();
    let doc = node_doc(
        NODE_B,
        "cn-b",
        "provisioning",
        "10.50.0.11",
        r#"{"phase":"os_fetched","at_ms":5000}"#,
    )
    .replace(r#""address":"10.50.1.10""#, r#""address":null"#);
    let pool = sqlx::AnyPool::connect(url).await.unwrap();
    sqlx::query(
        "UPDATE nodes SET state = 'provisioning', generation = 4, updated_at_ms = 5000, \
         doc = $1 WHERE uuid = $2",
    )
    .bind(doc)
    .bind(NODE_B)
    .execute(&pool)
    .await
    .unwrap();
    pool.close().await;
    assert_eq!(
        store.node_booting_list().await.unwrap(),
        vec![BootingNode {
            uuid: b,
            rack: Some("r12".to_string()),
            state: LifecycleState::Provisioning,
            boot: Some(BootProgress {
                phase: BootPhase::OsFetched,
                at_ms: 5000,
                until_ms: None,
            }),
            bmc_configured: false,
        }]
    );
}

fn versions(migrations: &[MigrationInfo]) -> Vec<i64> {
    migrations.iter().map(|m| m.version).collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sqlite_from_the_previous_release_upgrades_with_migrate_run_and_keeps_every_row() {
    let dir = tempfile::tempdir().unwrap();
    let data_dir = dir.path().join("data");
    std::fs::create_dir_all(&data_dir).unwrap();
    let url = format!(
        "sqlite://{}?mode=rwc",
        data_dir.join("bearman.db").display()
    );
    previous_release_database(&url, Backend::Sqlite).await;

    let migrate = |args: &[&str]| {
        let mut command = bearman(dir.path());
        command
            .arg("migrate")
            .args(args)
            .arg("--data-dir")
            .arg(&data_dir);
        run(command)
    };
    let status = migrate(&["status"]);
    assert_success("migrate status", &status);
    let table = text(&status.stdout);
    assert!(
        table.contains("0004     cluster            applied"),
        "{table}"
    );
    assert!(
        table.contains("0005     token expiry       pending"),
        "{table}"
    );
    assert!(
        table.contains("0006     firmware           pending"),
        "{table}"
    );
    assert!(
        table.contains("0007     drills             pending"),
        "{table}"
    );
    assert!(
        table.contains("0008     node boot columns  pending"),
        "{table}"
    );

    let applied = migrate(&["run"]);
    assert_success("migrate run", &applied);
    assert_eq!(
        text(&applied.stdout),
        "applied 0005 token expiry\napplied 0006 firmware\napplied 0007 drills\n\
         applied 0008 node boot columns\n"
    );
    let again = migrate(&["run"]);
    assert_success("migrate run again", &again);
    assert_eq!(text(&again.stdout), "", "nothing left to apply");
    assert!(text(&again.stderr).contains("up to date"));

    let store = SqlStore::connect(&url).await.unwrap();
    assert!(store.migration_status().await.unwrap().pending().is_empty());
    every_row_reads_back(&store).await;
    an_older_writer_keeps_the_boot_columns_true(&url, &store).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn postgres_from_the_previous_release_upgrades_at_connect_and_keeps_every_row() {
    postgres::with_schema("upgrade", |url| async move {
        previous_release_database(&url, Backend::Postgres).await;
        let before = SqlStore::connect_without_migrating(&url).await.unwrap();
        let status = before.migration_status().await.unwrap();
        assert_eq!(versions(&status.pending()), vec![5, 6, 7, 8]);
        assert!(status.unknown().is_empty());
        before.close().await;
        // The operator's view, through the binary, changing nothing.
        let dir = tempfile::tempdir().unwrap();
        let mut command = bearman(dir.path());
        command.args(["migrate", "status", "--database-url", &url]);
        let listed = run(command);
        assert_success("migrate status on PostgreSQL", &listed);
        assert!(
            text(&listed.stdout).contains("0005     token expiry       pending"),
            "{}",
            text(&listed.stdout)
        );
        // What `bearman serve` does at start.
        let store = SqlStore::connect(&url).await.unwrap();
        assert!(store.migration_status().await.unwrap().pending().is_empty());
        every_row_reads_back(&store).await;
        an_older_writer_keeps_the_boot_columns_true(&url, &store).await;
        store.close().await;
    })
    .await;
}

/// A database a newer release migrated is refused by this one, at `serve` and at
/// `migrate run`, with the version named; `migrate status` exits 2.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_newer_schema_is_refused_by_this_binary() {
    let dir = tempfile::tempdir().unwrap();
    let data_dir = dir.path().join("data");
    std::fs::create_dir_all(&data_dir).unwrap();
    let url = format!(
        "sqlite://{}?mode=rwc",
        data_dir.join("bearman.db").display()
    );
    let store = SqlStore::connect(&url).await.unwrap();
    store.close().await;
    let pool = sqlx::AnyPool::connect(&url).await.unwrap();
    sqlx::query(
        "INSERT INTO _sqlx_migrations (version, description, success, checksum, execution_time) \
         VALUES (9999, 'from the future', 1, x'00', 1)",
    )
    .execute(&pool)
    .await
    .unwrap();
    pool.close().await;

    let bearman_in = |args: &[&str]| {
        let mut command = bearman(dir.path());
        command.args(args).arg("--data-dir").arg(&data_dir);
        run(command)
    };
    let status = bearman_in(&["migrate", "status"]);
    assert_refused("migrate status", &status, 2, "newer than this binary");
    assert!(
        text(&status.stdout).contains("9999     from the future    NEWER THAN THIS BINARY"),
        "{}",
        text(&status.stdout)
    );
    assert_refused(
        "migrate run",
        &bearman_in(&["migrate", "run"]),
        2,
        "migration 9999 (from the future)",
    );
    let port = free_port().to_string();
    let serve = bearman_in(&["serve", "--listen", &format!("127.0.0.1:{port}")]);
    assert_refused("serve", &serve, 1, "a newer release migrated it");
    let error = SqlStore::connect(&url)
        .await
        .err()
        .expect("refused")
        .to_string();
    assert!(error.contains("migration 9999"), "{error}");
}

/// `migrate status` only looks: on a data directory without a database it lists every
/// migration as pending and creates no database file.
#[test]
fn migrate_status_creates_no_database() {
    let dir = tempfile::tempdir().unwrap();
    let data_dir = dir.path().join("data");
    let mut command = bearman(dir.path());
    command
        .args(["migrate", "status", "--data-dir"])
        .arg(&data_dir);
    let status = run(command);
    assert_success("migrate status", &status);
    assert!(text(&status.stdout).contains("0001     initial            pending"));
    assert!(text(&status.stderr).contains("no database at"));
    assert!(!data_dir.join("bearman.db").exists());
}
