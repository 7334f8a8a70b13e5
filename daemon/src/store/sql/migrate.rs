//! The schema's migrations: the ones built into this binary, the ones a database has
//! applied (sqlx's `_sqlx_migrations` table), and applying the pending ones.
//!
//! Kept apart from [`SqlStore::connect`]'s implicit run so that `bearman migrate status`
//! can look without changing anything, and so that every path that migrates (serve,
//! `migrate run`) refuses a database a newer release migrated with one readable reason.

use sqlx::migrate::{MigrateError, Migrator};
use sqlx::{AnyPool, Row};

use super::{backend_error, redact_url, Backend, SqlStore, StoreError};

static SQLITE_MIGRATIONS: Migrator = sqlx::migrate!("./migrations/sqlite");
static POSTGRES_MIGRATIONS: Migrator = sqlx::migrate!("./migrations/postgres");

/// sqlx's bookkeeping table, in the database's default schema (the search path on
/// PostgreSQL).
pub const MIGRATIONS_TABLE: &str = "_sqlx_migrations";

/// One migration, as this binary knows it or as a database recorded it.
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize)]
pub struct MigrationInfo {
    pub version: i64,
    pub description: String,
}

/// What a database has applied against what this binary carries.
#[derive(Clone, Debug, serde::Serialize)]
pub struct MigrationStatus {
    /// Built into this binary, oldest first.
    pub known: Vec<MigrationInfo>,
    /// Recorded in the database, oldest first (empty for a database never migrated).
    pub applied: Vec<AppliedMigration>,
}

#[derive(Clone, Debug, serde::Serialize)]
pub struct AppliedMigration {
    pub version: i64,
    pub description: String,
    /// False when the migration failed half-way (sqlx calls the database dirty).
    pub success: bool,
    /// Whether its recorded checksum is the one this binary's migration of that version
    /// has (`None` for a version this binary does not know). A difference means the
    /// database was not migrated by Bearman's files (or a released file was edited).
    pub checksum_matches: Option<bool>,
}

impl MigrationStatus {
    /// Known migrations the database has not applied.
    pub fn pending(&self) -> Vec<MigrationInfo> {
        self.known
            .iter()
            .filter(|known| !self.applied.iter().any(|a| a.version == known.version))
            .cloned()
            .collect()
    }

    /// Applied migrations whose checksum differs from this binary's.
    pub fn mismatched(&self) -> Vec<AppliedMigration> {
        self.applied
            .iter()
            .filter(|applied| applied.checksum_matches == Some(false))
            .cloned()
            .collect()
    }

    /// Applied migrations this binary does not know: a newer release migrated the
    /// database, and this binary's queries may not fit its schema.
    pub fn unknown(&self) -> Vec<AppliedMigration> {
        self.applied
            .iter()
            .filter(|applied| !self.known.iter().any(|k| k.version == applied.version))
            .cloned()
            .collect()
    }
}

/// The migrations built in for `backend`, oldest first.
pub fn known(backend: Backend) -> Vec<MigrationInfo> {
    migrator(backend)
        .iter()
        .filter(|m| !m.migration_type.is_down_migration())
        .map(|m| MigrationInfo {
            version: m.version,
            description: m.description.to_string(),
        })
        .collect()
}

fn migrator(backend: Backend) -> &'static Migrator {
    match backend {
        Backend::Sqlite => &SQLITE_MIGRATIONS,
        Backend::Postgres => &POSTGRES_MIGRATIONS,
    }
}

/// Reads what `pool` has applied, changing nothing (no bookkeeping table is created).
pub async fn status_of(pool: &AnyPool, backend: Backend) -> Result<MigrationStatus, StoreError> {
    let exists_query = match backend {
        Backend::Sqlite => {
            "SELECT COUNT(*) FROM sqlite_master WHERE type = 'table' AND name = '_sqlx_migrations'"
        }
        Backend::Postgres => {
            "SELECT COUNT(*) FROM information_schema.tables \
             WHERE table_name = '_sqlx_migrations' AND table_schema = current_schema()"
        }
    };
    let exists: i64 = sqlx::query_scalar(exists_query)
        .fetch_one(pool)
        .await
        .map_err(backend_error)?;
    let mut applied = Vec::new();
    if exists > 0 {
        // The casts make both backends answer the Any driver with BIGINT.
        let rows = sqlx::query(
            "SELECT version, description, checksum, \
             CAST(CASE WHEN success THEN 1 ELSE 0 END AS BIGINT) AS ok \
             FROM _sqlx_migrations ORDER BY version",
        )
        .fetch_all(pool)
        .await
        .map_err(backend_error)?;
        for row in rows {
            let version: i64 = row.try_get("version").map_err(backend_error)?;
            let checksum: Vec<u8> = row.try_get("checksum").map_err(backend_error)?;
            let checksum_matches = migrator(backend)
                .iter()
                .find(|m| m.version == version && !m.migration_type.is_down_migration())
                .map(|m| *m.checksum == *checksum);
            applied.push(AppliedMigration {
                version,
                description: row.try_get("description").map_err(backend_error)?,
                success: row.try_get::<i64, _>("ok").map_err(backend_error)? != 0,
                checksum_matches,
            });
        }
    }
    Ok(MigrationStatus {
        known: known(backend),
        applied,
    })
}

impl SqlStore {
    /// What this store's database has applied against what this binary carries.
    pub async fn migration_status(&self) -> Result<MigrationStatus, StoreError> {
        status_of(&self.pool, self.backend).await
    }

    /// Applies the pending migrations and returns them (empty when up to date). `url`
    /// names the database in errors. A database with a version this binary does not
    /// know is refused before anything is applied.
    pub async fn migrate(&self, url: &str) -> Result<Vec<MigrationInfo>, StoreError> {
        let before = self.migration_status().await?;
        let pending = before.pending();
        if let Some(newest) = before.unknown().last() {
            return Err(newer_schema(url, newest.version, &newest.description));
        }
        migrator(self.backend)
            .run(&self.pool)
            .await
            .map_err(|error| migrate_error(url, error))?;
        Ok(pending)
    }
}

/// The refusal of a database a newer release migrated.
fn newer_schema(url: &str, version: i64, description: &str) -> StoreError {
    StoreError::Backend(format!(
        "the database {} has migration {version} ({description}) applied, which this bearman {} \
         does not know: a newer release migrated it. This binary refuses to run against a newer \
         schema; run that release (or newer), or restore the backup taken before the upgrade \
         (`bearman migrate status` lists what differs)",
        redact_url(url),
        env!("CARGO_PKG_VERSION"),
    ))
}

/// sqlx's migration errors with the database named and what to do.
fn migrate_error(url: &str, error: MigrateError) -> StoreError {
    let database = redact_url(url);
    StoreError::Backend(match error {
        MigrateError::VersionMissing(version) => {
            return newer_schema(url, version, "unknown to this binary")
        }
        MigrateError::VersionMismatch(version) => format!(
            "migration {version} applied to {database} differs from this binary's (checksum \
             mismatch): the migration file was edited after release; never edit a released \
             migration, add a new one"
        ),
        MigrateError::Dirty(version) => format!(
            "migration {version} on {database} failed part-way earlier and is marked dirty: \
             repair the schema by hand (or restore a backup), then delete its row from \
             {MIGRATIONS_TABLE}"
        ),
        other => format!("migrating {database} failed: {other}"),
    })
}
