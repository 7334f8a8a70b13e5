//! SQLite backups: an online, consistent copy of the live database (`VACUUM INTO`), and
//! the checks a file must pass before `bearman restore` puts it in the database's place.
//! PostgreSQL is backed up with its own tools (`pg_dump`), not here.

use std::path::Path;

use sqlx::any::AnyPoolOptions;

use super::migrate::{status_of, MigrationStatus, MIGRATIONS_TABLE};
use super::{Backend, SqlStore, StoreError};

impl SqlStore {
    /// Folds the WAL into the database file and empties it (SQLite; nothing on PostgreSQL).
    pub async fn checkpoint(&self) -> Result<(), StoreError> {
        if self.backend == Backend::Sqlite {
            sqlx::query("PRAGMA wal_checkpoint(TRUNCATE)")
                .execute(&self.pool)
                .await
                .map_err(|error| StoreError::Backend(format!("wal_checkpoint: {error}")))?;
        }
        Ok(())
    }

    /// Writes a consistent copy of this SQLite database to `target`, which must not exist.
    /// `VACUUM INTO` reads inside one transaction, so a daemon may keep writing meanwhile:
    /// the copy is the database as of one instant, compacted, without its WAL.
    pub async fn vacuum_into(&self, target: &Path) -> Result<(), StoreError> {
        if self.backend != Backend::Sqlite {
            return Err(StoreError::Backend(
                "VACUUM INTO is SQLite's; back PostgreSQL up with pg_dump".to_string(),
            ));
        }
        let text = target.to_str().ok_or_else(|| {
            StoreError::Backend(format!("{} is not valid UTF-8", target.display()))
        })?;
        // The file name is an SQL string literal: single quotes doubled.
        sqlx::query(&format!("VACUUM INTO '{}'", text.replace('\'', "''")))
            .execute(&self.pool)
            .await
            .map_err(|error| {
                StoreError::Backend(format!("VACUUM INTO {}: {error}", target.display()))
            })?;
        Ok(())
    }
}

/// Checks that `file` is a sound SQLite database holding Bearman's schema: the SQLite
/// header, `PRAGMA integrity_check`, and a migrations table. Opened read-only, so a
/// wrong file is never changed. Returns its migration status.
pub async fn check_sqlite_backup(file: &Path) -> Result<MigrationStatus, String> {
    use std::io::Read as _;
    let mut header = Vec::with_capacity(16);
    std::fs::File::open(file)
        .and_then(|f| f.take(16).read_to_end(&mut header))
        .map_err(|error| format!("cannot read {}: {error}", file.display()))?;
    if header != b"SQLite format 3\0" {
        return Err(format!(
            "{} is not an SQLite database (no SQLite header); give a file made by `bearman backup`",
            file.display()
        ));
    }
    let text = file
        .to_str()
        .ok_or_else(|| format!("{} is not valid UTF-8", file.display()))?;
    sqlx::any::install_default_drivers();
    let pool = AnyPoolOptions::new()
        .max_connections(1)
        .connect(&format!("sqlite://{text}?mode=ro"))
        .await
        .map_err(|error| format!("cannot open {}: {error}", file.display()))?;
    let checked = async {
        let integrity: String = sqlx::query_scalar("PRAGMA integrity_check")
            .fetch_one(&pool)
            .await
            .map_err(|error| format!("integrity check of {}: {error}", file.display()))?;
        if integrity != "ok" {
            return Err(format!(
                "{} fails SQLite's integrity check ({integrity}): it is damaged; use another backup",
                file.display()
            ));
        }
        let status = status_of(&pool, Backend::Sqlite)
            .await
            .map_err(|error| format!("reading {}: {error}", file.display()))?;
        if status.applied.is_empty() {
            return Err(format!(
                "{} is an SQLite database but not Bearman's (it records no migrations in {MIGRATIONS_TABLE})",
                file.display()
            ));
        }
        if let Some(foreign) = status.mismatched().first() {
            return Err(format!(
                "{} is not Bearman's database: its migration {} ({}) is not this binary's \
                 (checksum differs)",
                file.display(),
                foreign.version,
                foreign.description
            ));
        }
        Ok(status)
    }
    .await;
    pool.close().await;
    checked
}
