//! `bearman backup` and `bearman restore` on SQLite: a backup taken while `bearman serve`
//! runs on the database holds every row of every table; a destroyed database comes back
//! row for row; and each refusal (restore under a running daemon, a file that is not a
//! Bearman database, a backup over an existing file, PostgreSQL) is explained.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use bearman::core::model::TokenRole;
use bearman::store::conformance;
use bearman::store::sql::SqlStore;
use bearman::store::Store;
use sqlx::Row;

#[allow(dead_code)]
#[path = "support/serve.rs"]
mod support;
use support::*;

fn wall_ms() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_millis() as i64
}

fn sqlite_url(path: &Path) -> String {
    format!("sqlite://{}?mode=rwc", path.display())
}

/// A database in `data_dir` holding rows in every table: the store conformance suite
/// writes nodes, addresses, pools, flavors, events, tokens, remediations, power
/// readings, leases and replicas.
async fn populated(data_dir: &Path) -> PathBuf {
    std::fs::create_dir_all(data_dir).unwrap();
    let database = data_dir.join("bearman.db");
    let store = SqlStore::connect(&sqlite_url(&database)).await.unwrap();
    let store: Arc<dyn Store> = Arc::new(store);
    conformance::run_all(store.clone(), wall_ms).await;
    // The suite deletes the tokens it makes; two that stay, one expiring and used.
    let admin = store
        .token_create("admin", TokenRole::Admin, &"a".repeat(64), 1_000, None, &[])
        .await
        .unwrap();
    store
        .token_create(
            "ci",
            TokenRole::Viewer,
            &"b".repeat(64),
            2_000,
            Some(9_000_000),
            &[],
        )
        .await
        .unwrap();
    store
        .token_record_use(admin.id, 5_000, 60_000)
        .await
        .unwrap();
    database
}

/// Every table of the SQLite database at `path` (sqlx's bookkeeping and SQLite's
/// AUTOINCREMENT counters included), each row as its SQL literal text, in rowid order.
async fn dump(path: &Path) -> Vec<(String, Vec<String>)> {
    sqlx::any::install_default_drivers();
    let pool = sqlx::AnyPool::connect(&format!("sqlite://{}?mode=ro", path.display()))
        .await
        .unwrap();
    let tables: Vec<String> =
        sqlx::query_scalar("SELECT name FROM sqlite_master WHERE type = 'table' ORDER BY name")
            .fetch_all(&pool)
            .await
            .unwrap();
    let mut out = Vec::new();
    for table in tables {
        let columns: Vec<String> =
            sqlx::query_scalar(&format!("SELECT name FROM pragma_table_info('{table}')"))
                .fetch_all(&pool)
                .await
                .unwrap();
        let row_text = columns
            .iter()
            .map(|c| format!("quote(\"{c}\")"))
            .collect::<Vec<_>>()
            .join(" || ',' || ");
        let rows = sqlx::query(&format!(
            "SELECT {row_text} AS r FROM \"{table}\" ORDER BY rowid"
        ))
        .fetch_all(&pool)
        .await
        .unwrap()
        .iter()
        .map(|row| row.get::<String, _>("r"))
        .collect();
        out.push((table, rows));
    }
    pool.close().await;
    out
}

fn total_rows(dump: &[(String, Vec<String>)]) -> usize {
    dump.iter().map(|(_, rows)| rows.len()).sum()
}

fn rows_of(dump: &[(String, Vec<String>)], table: &str) -> usize {
    dump.iter()
        .find(|(name, _)| name == table)
        .map_or(0, |(_, rows)| rows.len())
}

/// The same tables with the same rows, or the first difference (dumps are long).
fn assert_same(got: &[(String, Vec<String>)], want: &[(String, Vec<String>)], when: &str) {
    let names = |d: &[(String, Vec<String>)]| d.iter().map(|(n, _)| n.clone()).collect::<Vec<_>>();
    assert_eq!(names(got), names(want), "tables {when}");
    for ((table, rows), (_, expected)) in got.iter().zip(want) {
        assert_eq!(rows.len(), expected.len(), "{table}: row count {when}");
        for (index, (row, wanted)) in rows.iter().zip(expected).enumerate() {
            assert_eq!(row, wanted, "{table} row {index} {when}");
        }
    }
}

fn backup_command(dir: &Path, to: &Path, data_dir: &Path) -> std::process::Command {
    let mut command = bearman(dir);
    command
        .arg("backup")
        .arg("--to")
        .arg(to)
        .args(store_args(data_dir));
    command
}

fn restore_command(dir: &Path, from: &Path, data_dir: &Path) -> std::process::Command {
    let mut command = bearman(dir);
    command
        .arg("restore")
        .arg("--from")
        .arg(from)
        .args(store_args(data_dir));
    command
}

/// Sends `kill SIGNAL` to the daemon, by its pid.
fn signal(serve: &Serve, signal: &str) {
    let status = std::process::Command::new("kill")
        .args([signal, &serve.child.id().to_string()])
        .status()
        .unwrap();
    assert!(status.success());
}

fn store_args(data_dir: &Path) -> [&std::ffi::OsStr; 2] {
    ["--data-dir".as_ref(), data_dir.as_os_str()]
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_backup_taken_while_serving_restores_a_destroyed_database_row_for_row() {
    let dir = tempfile::tempdir().unwrap();
    let data_dir = dir.path().join("data");
    let database = populated(&data_dir).await;
    let before = dump(&database).await;
    for table in [
        "nodes",
        "ip_allocations",
        "ip_pools",
        "flavors",
        "events",
        "api_tokens",
        "remediations",
        "node_power",
        "leader_lease",
        "replicas",
    ] {
        let rows = &before.iter().find(|(name, _)| name == table).unwrap().1;
        assert!(
            !rows.is_empty(),
            "the populated database has no {table} rows"
        );
    }

    let serve = Serve::start(dir.path(), &store_args(&data_dir), &[]);
    // The daemon acts on this data at once (orphan report, power polls, remediation
    // steps): wait until some of its writes are in the database, uncheckpointed in its WAL.
    let deadline = std::time::Instant::now() + BOUND;
    while rows_of(&dump(&database).await, "events") <= rows_of(&before, "events") {
        assert!(
            std::time::Instant::now() < deadline,
            "the daemon wrote no event"
        );
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
    }
    // A backup of the running daemon's database, busy as it is, is sound.
    let busy_backup = dir.path().join("busy.db");
    assert_success(
        "backup while serving",
        &run(backup_command(dir.path(), &busy_backup, &data_dir)),
    );
    assert_success(
        "the busy backup passes restore's checks (into another data dir)",
        &run(restore_command(
            dir.path(),
            &busy_backup,
            &dir.path().join("x"),
        )),
    );

    // For an exact comparison, the daemon is frozen (SIGSTOP: still running, holding the
    // database, its connection and WAL open, just not writing) while the live database
    // is read and backed up.
    signal(&serve, "-STOP");
    let live = dump(&database).await;
    let backup_file = dir.path().join("backup.db");
    let backed_up = run(backup_command(dir.path(), &backup_file, &data_dir));
    signal(&serve, "-CONT");
    assert_success("backup while serving", &backed_up);
    assert!(text(&backed_up.stderr).contains("backed up"));
    assert!(rows_of(&live, "events") > rows_of(&before, "events"));

    // No restore under a running daemon: it would swap the file beneath it.
    let refused = run(restore_command(dir.path(), &backup_file, &data_dir));
    assert_refused("restore while serving", &refused, 1, "stop the daemon");
    assert!(!data_dir.join("bearman.db.before-restore").exists());

    let status = serve.stop();
    assert!(status.success(), "{status}");
    let before = live;

    // Destroyed: the file and its WAL gone.
    for suffix in ["", "-wal", "-shm"] {
        let _ = std::fs::remove_file(format!("{}{suffix}", database.display()));
    }
    assert_success(
        "restore",
        &run(restore_command(dir.path(), &backup_file, &data_dir)),
    );
    let restored = dump(&database).await;
    assert_same(&restored, &before, "after restore");
    assert!(total_rows(&restored) > 50, "{} rows", total_rows(&restored));

    // The restored database serves, and the daemon reads it: the tokens are listed.
    let mut command = bearman(dir.path());
    command
        .args(["token", "list", "-o", "json"])
        .args(store_args(&data_dir));
    let listed = run(command);
    assert_success("token list on the restored database", &listed);
    let tokens: serde_json::Value = serde_json::from_slice(&listed.stdout).unwrap();
    assert!(!tokens.as_array().unwrap().is_empty());
    drop(Serve::start(dir.path(), &store_args(&data_dir), &[]));

    // Restoring over a database keeps the one replaced.
    let again = run(restore_command(dir.path(), &backup_file, &data_dir));
    assert_success("restore over a database", &again);
    assert!(
        text(&again.stderr).contains("before-restore"),
        "{}",
        text(&again.stderr)
    );
    let kept = data_dir.join("bearman.db.before-restore");
    assert_eq!(dump(&kept).await.len(), before.len());
    assert_same(&dump(&database).await, &before, "after the second restore");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn restore_refuses_files_that_are_not_a_sound_bearman_database() {
    let dir = tempfile::tempdir().unwrap();
    let data_dir = dir.path().join("data");
    let database = populated(&data_dir).await;
    let before = dump(&database).await;

    let junk = dir.path().join("junk.txt");
    std::fs::write(&junk, "not a database at all\n").unwrap();
    // An SQLite database, but someone else's: no migrations table.
    let foreign = dir.path().join("foreign.db");
    let pool = sqlx::AnyPool::connect(&sqlite_url(&foreign)).await.unwrap();
    sqlx::query("CREATE TABLE t (x INTEGER)")
        .execute(&pool)
        .await
        .unwrap();
    pool.close().await;
    // A Bearman backup cut short: the header is right, the pages are not there.
    let backup = dir.path().join("whole.db");
    let mut command = bearman(dir.path());
    command
        .arg("backup")
        .arg("--to")
        .arg(&backup)
        .args(store_args(&data_dir));
    assert_success("backup", &run(command));
    let bytes = std::fs::read(&backup).unwrap();
    let truncated = dir.path().join("truncated.db");
    std::fs::write(&truncated, &bytes[..bytes.len() / 3]).unwrap();

    // Another program's sqlx database (or a doctored one): the migrations differ.
    let doctored = dir.path().join("doctored.db");
    std::fs::copy(&backup, &doctored).unwrap();
    let pool = sqlx::AnyPool::connect(&sqlite_url(&doctored))
        .await
        .unwrap();
    sqlx::query("UPDATE _sqlx_migrations SET checksum = x'00' WHERE version = 1")
        .execute(&pool)
        .await
        .unwrap();
    pool.close().await;

    for (file, mentions) in [
        (&doctored, "checksum differs"),
        (&junk, "not an SQLite database"),
        (&foreign, "not Bearman's"),
        (&truncated, "truncated.db"),
        (&dir.path().join("absent.db"), "absent.db"),
    ] {
        let mut command = bearman(dir.path());
        command
            .arg("restore")
            .arg("--from")
            .arg(file)
            .args(store_args(&data_dir));
        assert_refused(
            &format!("restore {}", file.display()),
            &run(command),
            1,
            mentions,
        );
    }
    assert_same(&dump(&database).await, &before, "after refused restores");
    assert!(!data_dir.join("bearman.db.before-restore").exists());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn backup_refuses_an_existing_file_a_missing_database_and_postgresql() {
    let dir = tempfile::tempdir().unwrap();
    let data_dir = dir.path().join("data");
    let database = populated(&data_dir).await;
    let target = dir.path().join("backup.db");
    std::fs::write(&target, "precious").unwrap();
    let backup = |args: &[&std::ffi::OsStr]| {
        let mut command = bearman(dir.path());
        command.arg("backup").arg("--to").arg(&target).args(args);
        run(command)
    };
    assert_refused(
        "backup over an existing file",
        &backup(&store_args(&data_dir)),
        1,
        "--force",
    );
    assert_eq!(std::fs::read_to_string(&target).unwrap(), "precious");
    let mut forced = store_args(&data_dir).to_vec();
    forced.push("--force".as_ref());
    assert_success("backup --force", &backup(&forced));
    assert_same(
        &dump(&target).await,
        &dump(&database).await,
        "in the forced backup",
    );
    let leftovers: Vec<_> = std::fs::read_dir(dir.path())
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .filter(|name| name.contains("partial"))
        .collect();
    assert!(leftovers.is_empty(), "{leftovers:?}");

    let empty = dir.path().join("empty");
    std::fs::create_dir_all(&empty).unwrap();
    std::fs::remove_file(&target).unwrap();
    assert_refused(
        "backup of a data dir without a database",
        &backup(&store_args(&empty)),
        1,
        "nothing to back up",
    );
    assert_refused(
        "backup of PostgreSQL",
        &backup(&[
            "--database-url".as_ref(),
            "postgres://postgres@127.0.0.1:5432/test".as_ref(),
        ]),
        1,
        "pg_dump",
    );
    assert!(!target.exists());
}
