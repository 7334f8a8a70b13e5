//! Tables of named JSON documents (`name` primary key, `doc`): flavors, IP pools and
//! firmware bundles. They
//! are read, listed and deleted-while-unused the same way; only the table, the words in
//! errors and what counts as a use differ.

use serde::de::DeserializeOwned;
use sqlx::any::AnyRow;
use sqlx::Row;

use super::events::insert_events;
use super::notify::{self, CacheChange};
use super::{backend_error, corrupt, SqlStore};
use crate::core::model::NewEvent;
use crate::store::StoreError;

pub(super) struct NamedDocs {
    /// The table (a constant, never input).
    pub table: &'static str,
    /// What one row is, in errors: "flavor", "ip pool".
    pub what: &'static str,
    /// Counts the rows that use the named one (`$1`), as `n`; a delete is refused above 0.
    /// `None`: nothing the database holds uses one (a delete only needs it to exist).
    pub uses_query: Option<&'static str>,
    /// What those uses are, after their count: "node(s) use it".
    pub uses_are: &'static str,
}

impl NamedDocs {
    fn decode<T: DeserializeOwned>(&self, row: &AnyRow) -> Result<T, StoreError> {
        let doc: String = row.try_get("doc").map_err(backend_error)?;
        serde_json::from_str(&doc).map_err(|e| corrupt(&format!("{} document", self.what), e))
    }

    pub async fn get<T: DeserializeOwned>(
        &self,
        store: &SqlStore,
        name: &str,
    ) -> Result<Option<T>, StoreError> {
        let row = sqlx::query(&format!("SELECT doc FROM {} WHERE name = $1", self.table))
            .bind(name)
            .fetch_optional(&store.pool)
            .await
            .map_err(backend_error)?;
        row.as_ref().map(|row| self.decode(row)).transpose()
    }

    pub async fn list<T: DeserializeOwned>(&self, store: &SqlStore) -> Result<Vec<T>, StoreError> {
        let rows = sqlx::query(&format!("SELECT doc FROM {} ORDER BY name", self.table))
            .fetch_all(&store.pool)
            .await
            .map_err(backend_error)?;
        rows.iter().map(|row| self.decode(row)).collect()
    }

    /// Deletes `name` with `events`, in one transaction, unless something uses it (or
    /// `NotFound`);
    /// announces `change` to other replicas' caches (for what they cache).
    pub async fn delete_unused(
        &self,
        store: &SqlStore,
        name: &str,
        events: &[NewEvent],
        change: Option<&CacheChange>,
    ) -> Result<(), StoreError> {
        let mut tx = store.pool.begin().await.map_err(backend_error)?;
        if let Some(uses_query) = self.uses_query {
            let uses: i64 = sqlx::query(uses_query)
                .bind(name)
                .fetch_one(&mut *tx)
                .await
                .and_then(|row| row.try_get("n"))
                .map_err(backend_error)?;
            if uses > 0 {
                return Err(StoreError::InUse {
                    what: format!("{} {name}", self.what),
                    detail: format!("{uses} {}", self.uses_are),
                });
            }
        }
        let deleted = sqlx::query(&format!("DELETE FROM {} WHERE name = $1", self.table))
            .bind(name)
            .execute(&mut *tx)
            .await
            .map_err(backend_error)?
            .rows_affected();
        if deleted == 0 {
            return Err(StoreError::not_found(format!("{} {name}", self.what)));
        }
        insert_events(&mut tx, events).await?;
        if let Some(change) = change {
            notify::send(store.backend, &mut tx, change).await?;
        }
        tx.commit().await.map_err(backend_error)?;
        Ok(())
    }
}
