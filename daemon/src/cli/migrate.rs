//! `bearman migrate status|run`, `bearman backup` and `bearman restore`: the database's
//! schema and copies of it, worked on directly (like `bearman token`), never over the API.

use std::fs::File;
use std::path::Path;

use bearman::store::sql::migrate::MigrationStatus;
use bearman::store::sql::{redact_url, Backend, SqlStore};

use super::*;

/// A failure that exits with code 2 rather than 1: the database was migrated by a newer
/// release, which scripts gating a rollout must tell apart from "could not connect".
#[derive(Debug)]
pub(super) struct NewerSchema(pub(super) String);

impl std::fmt::Display for NewerSchema {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.0)
    }
}

impl std::error::Error for NewerSchema {}

pub(super) async fn migrate(command: MigrateCommand) -> anyhow::Result<()> {
    match command {
        MigrateCommand::Status { store, output } => {
            let url = database_url_for_cli(&store)?;
            // Looking must not create: a missing SQLite file is reported, not made.
            if let Ok(file) = sqlite_file(&url, "migrate status") {
                if !file.exists() {
                    eprintln!(
                        "no database at {} yet: `bearman migrate run` or `bearman serve` creates it \
                         with every migration below",
                        file.display()
                    );
                    let status = MigrationStatus {
                        known: bearman::store::sql::migrate::known(Backend::Sqlite),
                        applied: Vec::new(),
                    };
                    return print_status(&status, output);
                }
            }
            let sql = connect_as_is(&url).await?;
            let status = sql
                .migration_status()
                .await
                .map_err(|e| anyhow!("reading the migrations of {}: {e}", redact_url(&url)))?;
            sql.close().await;
            print_status(&status, output)?;
            let unknown = status.unknown();
            if let Some(newest) = unknown.last() {
                return Err(NewerSchema(format!(
                    "{} has {} migration(s) newer than this binary (up to {}, {}): a newer \
                     release migrated it; `bearman serve` of this release refuses to run on it",
                    redact_url(&url),
                    unknown.len(),
                    newest.version,
                    newest.description
                ))
                .into());
            }
            Ok(())
        }
        MigrateCommand::Run { store } => {
            let url = database_url_for_cli(&store)?;
            let sql = connect_as_is(&url).await?;
            // Looked at first, so a newer schema exits 2 as `status` does.
            let newer = match sql.migration_status().await {
                Ok(status) => status.unknown().last().cloned(),
                Err(error) => {
                    sql.close().await;
                    bail!("reading the migrations of {}: {error}", redact_url(&url));
                }
            };
            let applied = match newer {
                Some(_) => sql
                    .migrate(&url)
                    .await
                    .map_err(|e| NewerSchema(e.to_string()).into()),
                None => sql.migrate(&url).await.map_err(|e| anyhow!("{e}")),
            };
            sql.close().await;
            let applied: Vec<_> = applied?;
            if applied.is_empty() {
                eprintln!("{} is up to date: nothing to apply", redact_url(&url));
            }
            for migration in &applied {
                table::out(&format!(
                    "applied {:04} {}",
                    migration.version, migration.description
                ))?;
            }
            Ok(())
        }
    }
}

/// Connects without migrating: status must not change what it reports on, and `run`
/// reports what it applies itself.
async fn connect_as_is(url: &str) -> anyhow::Result<SqlStore> {
    SqlStore::connect_without_migrating(url)
        .await
        .map_err(|e| anyhow!("opening the database: {e}"))
}

fn print_status(status: &MigrationStatus, output: Output) -> anyhow::Result<()> {
    if output == Output::Json {
        return print_json(&json!({
            "known": status.known,
            "applied": status.applied,
            "pending": status.pending(),
            "newer_than_this_binary": status.unknown(),
        }));
    }
    let mut rows: Vec<Vec<String>> = status
        .known
        .iter()
        .map(|known| {
            let state = match status.applied.iter().find(|a| a.version == known.version) {
                Some(applied) if !applied.success => "FAILED (dirty: repair by hand)",
                Some(applied) if applied.checksum_matches == Some(false) => {
                    "applied, CHECKSUM DIFFERS from this binary's"
                }
                Some(_) => "applied",
                None => "pending",
            };
            vec![
                format!("{:04}", known.version),
                known.description.clone(),
                state.to_string(),
            ]
        })
        .collect();
    for unknown in status.unknown() {
        rows.push(vec![
            format!("{:04}", unknown.version),
            unknown.description.clone(),
            "NEWER THAN THIS BINARY".to_string(),
        ]);
    }
    table::print(&["VERSION", "DESCRIPTION", "STATUS"], &rows)?;
    Ok(())
}

/// The file of an `sqlite://PATH?…` URL, or why the database is not one `backup` and
/// `restore` handle.
fn sqlite_file(url: &str, command: &str) -> anyhow::Result<PathBuf> {
    match Backend::from_url(url) {
        Some(Backend::Sqlite) => {}
        Some(Backend::Postgres) => bail!(
            "{} is PostgreSQL: `bearman {command}` handles the embedded SQLite database only; \
             use `pg_dump -Fc -f FILE` to back up and `pg_restore --clean --if-exists -d DATABASE FILE` \
             to restore (README, \"Backups\")",
            redact_url(url)
        ),
        None => bail!("unsupported database url {:?}", redact_url(url)),
    }
    let rest = url
        .strip_prefix("sqlite://")
        .or_else(|| url.strip_prefix("sqlite:"))
        .unwrap_or(url);
    let path = rest.split('?').next().unwrap_or(rest);
    if path.is_empty() || path == ":memory:" {
        bail!("{url} is an in-memory database: there is no file to {command}");
    }
    Ok(PathBuf::from(path))
}

/// `name` with `suffix` appended (`bearman.db` → `bearman.db.before-restore`).
fn beside(path: &Path, suffix: &str) -> PathBuf {
    let mut name = path.as_os_str().to_os_string();
    name.push(suffix);
    PathBuf::from(name)
}

/// Flushes a directory's entries (a rename in it) to disk.
fn sync_dir_of(path: &Path) -> anyhow::Result<()> {
    let dir = match path.parent() {
        Some(dir) if !dir.as_os_str().is_empty() => dir,
        _ => Path::new("."),
    };
    File::open(dir)
        .and_then(|d| d.sync_all())
        .with_context(|| format!("syncing directory {}", dir.display()))
}

pub(super) async fn backup(to: &Path, force: bool, store: &StoreArgs) -> anyhow::Result<()> {
    let url = database_url_for_cli(store)?;
    let database = sqlite_file(&url, "backup")?;
    if !database.exists() {
        bail!(
            "no database at {}: nothing to back up (check --data-dir, --database-url or the \
             configuration's data_dir)",
            database.display()
        );
    }
    if to.exists() && !force {
        bail!(
            "{} already exists: choose another file, or give --force to replace it",
            to.display()
        );
    }
    // Written beside the target and renamed into place, so a failed or interrupted backup
    // never leaves a truncated file under the name an operator would restore from.
    let partial = beside(to, &format!(".partial-{}", std::process::id()));
    let _ = std::fs::remove_file(&partial);
    let sql = connect_as_is(&url).await?;
    let copied = sql.vacuum_into(&partial).await;
    sql.close().await;
    copied.map_err(|e| anyhow!("backing up {}: {e}", database.display()))?;
    let finish = || -> anyhow::Result<()> {
        File::open(&partial)
            .and_then(|f| f.sync_all())
            .with_context(|| format!("syncing {}", partial.display()))?;
        if force {
            std::fs::rename(&partial, to)
                .with_context(|| format!("renaming {} to {}", partial.display(), to.display()))?;
        } else {
            // A link fails if the target appeared meanwhile: never replaced without --force.
            std::fs::hard_link(&partial, to).with_context(|| {
                format!("creating {} (give --force to replace it)", to.display())
            })?;
            std::fs::remove_file(&partial)
                .with_context(|| format!("removing {}", partial.display()))?;
        }
        sync_dir_of(to)
    };
    if let Err(error) = finish() {
        let _ = std::fs::remove_file(&partial);
        return Err(error);
    }
    let bytes = std::fs::metadata(to).map(|m| m.len()).unwrap_or(0);
    eprintln!(
        "backed up {} to {} ({bytes} bytes); restore with `bearman restore --from {}`",
        database.display(),
        to.display(),
        to.display()
    );
    Ok(())
}

pub(super) async fn restore(from: &Path, store: &StoreArgs) -> anyhow::Result<()> {
    let url = database_url_for_cli(store)?;
    let database = sqlite_file(&url, "restore")?;
    // Held until the restore is done: no `bearman serve` runs on the database now, and
    // none starts on it half-way.
    let _lock = bearman::server::lock_sqlite_for_serving(&url).map_err(|reason| {
        anyhow!(
            "refusing to restore over {} while it is served ({reason}); stop the daemon \
             first (systemctl stop bearman), then run restore again",
            database.display()
        )
    })?;
    let status = bearman::store::sql::backup::check_sqlite_backup(from)
        .await
        .map_err(|reason| anyhow!("refusing to restore: {reason}"))?;
    if let Some(newest) = status.unknown().last() {
        bail!(
            "refusing to restore {}: it has migration {} ({}) that this bearman does not \
             know (a newer release made it); restore it with that release",
            from.display(),
            newest.version,
            newest.description
        );
    }
    // Copied beside the database (same file system, so the rename below is atomic) and
    // synced before it takes the database's name.
    let incoming = beside(&database, ".restore-tmp");
    std::fs::copy(from, &incoming)
        .with_context(|| format!("copying {} to {}", from.display(), incoming.display()))?;
    File::open(&incoming)
        .and_then(|f| f.sync_all())
        .with_context(|| format!("syncing {}", incoming.display()))?;
    let kept = beside(&database, ".before-restore");
    if database.exists() {
        // Fold the old database's WAL into it (best effort: it may be the damaged thing
        // being replaced), so the copy kept is whole and no stale WAL is left beside
        // the restored file for SQLite to replay into it.
        checkpoint(&url).await;
        let _ = std::fs::remove_file(&kept);
        std::fs::hard_link(&database, &kept)
            .with_context(|| format!("keeping {} as {}", database.display(), kept.display()))?;
        for suffix in ["-wal", "-shm"] {
            let side = beside(&database, suffix);
            if side.exists() {
                let aside = beside(&kept, suffix);
                std::fs::rename(&side, &aside)
                    .with_context(|| format!("moving {} to {}", side.display(), aside.display()))?;
            }
        }
    }
    std::fs::rename(&incoming, &database)
        .with_context(|| format!("renaming {} to {}", incoming.display(), database.display()))?;
    sync_dir_of(&database)?;
    let applied = status.applied.len();
    eprintln!(
        "restored {} from {} ({applied} migrations applied in it; `bearman serve` applies any \
         newer ones at start){}",
        database.display(),
        from.display(),
        if kept.exists() {
            format!("; the database it replaced is kept as {}", kept.display())
        } else {
            String::new()
        }
    );
    Ok(())
}

/// `PRAGMA wal_checkpoint(TRUNCATE)` on the database at `url`, logging (not failing) when
/// it cannot be opened.
async fn checkpoint(url: &str) {
    match SqlStore::connect_without_migrating(url).await {
        Ok(sql) => {
            if let Err(error) = sql.checkpoint().await {
                eprintln!("warning: cannot checkpoint the database being replaced: {error}");
            }
            sql.close().await;
        }
        Err(error) => {
            eprintln!("warning: cannot open the database being replaced: {error}")
        }
    }
}
