//! Tables holding one JSON document in one row (`id` = 1) with a generation that grows
//! with every write: the firmware rollout and the drill board. A write presents the
//! generation it read and fails with `Conflict` if another writer came first, so two
//! replicas never both take the last rollout slot or start two drills.

use serde::de::DeserializeOwned;
use serde::Serialize;
use sqlx::Row;

use super::{backend_error, corrupt, is_unique_violation};
use crate::store::StoreError;

/// A document that carries its own generation (stored in its own column too).
pub(crate) trait Generational: Serialize + DeserializeOwned + Default + Clone {
    fn generation(&self) -> i64;
    fn set_generation(&mut self, generation: i64);
}

impl Generational for crate::core::firmware::FirmwareRollout {
    fn generation(&self) -> i64 {
        self.generation
    }
    fn set_generation(&mut self, generation: i64) {
        self.generation = generation;
    }
}

impl Generational for crate::core::drill::DrillBoard {
    fn generation(&self) -> i64 {
        self.generation
    }
    fn set_generation(&mut self, generation: i64) {
        self.generation = generation;
    }
}

pub(super) struct SingletonDoc {
    /// The table (a constant, never input).
    pub table: &'static str,
    /// What the document is, in errors.
    pub what: &'static str,
}

/// The one row's id.
const ROW_ID: i64 = 1;

impl SingletonDoc {
    /// The document; its `Default` at generation 0 before the first write.
    pub async fn read<T: Generational>(
        &self,
        tx: &mut sqlx::AnyConnection,
    ) -> Result<T, StoreError> {
        let row = sqlx::query(&format!(
            "SELECT generation, doc FROM {} WHERE id = $1",
            self.table
        ))
        .bind(ROW_ID)
        .fetch_optional(&mut *tx)
        .await
        .map_err(backend_error)?;
        let Some(row) = row else {
            return Ok(T::default());
        };
        let doc: String = row.try_get("doc").map_err(backend_error)?;
        let mut value: T = serde_json::from_str(&doc)
            .map_err(|e| corrupt(&format!("{} document", self.what), e))?;
        value.set_generation(row.try_get("generation").map_err(backend_error)?);
        Ok(value)
    }

    /// Writes `value` inside `tx` if the stored one is still at its generation; returns it
    /// at the new generation.
    pub async fn write<T: Generational>(
        &self,
        tx: &mut sqlx::AnyConnection,
        value: &T,
        at_ms: i64,
    ) -> Result<T, StoreError> {
        let mut stored = value.clone();
        stored.set_generation(value.generation() + 1);
        let doc = serde_json::to_string(&stored)
            .map_err(|e| corrupt(&format!("{} document", self.what), e))?;
        let conflict = |found: i64| StoreError::Conflict {
            what: self.what.into(),
            detail: format!(
                "changed concurrently (expected generation {}, found {found})",
                value.generation()
            ),
        };
        if value.generation() == 0 {
            // The first write: the primary key decides between two first writers.
            let inserted = sqlx::query(&format!(
                "INSERT INTO {} (id, generation, doc, updated_at_ms) VALUES ($1, $2, $3, $4)",
                self.table
            ))
            .bind(ROW_ID)
            .bind(stored.generation())
            .bind(doc)
            .bind(at_ms)
            .execute(&mut *tx)
            .await;
            return match inserted {
                Err(error) if is_unique_violation(&error) => Err(conflict(-1)),
                Err(error) => Err(backend_error(error)),
                Ok(_) => Ok(stored),
            };
        }
        let rows = sqlx::query(&format!(
            "UPDATE {} SET generation = $1, doc = $2, updated_at_ms = $3 \
             WHERE id = $4 AND generation = $5",
            self.table
        ))
        .bind(stored.generation())
        .bind(doc)
        .bind(at_ms)
        .bind(ROW_ID)
        .bind(value.generation())
        .execute(&mut *tx)
        .await
        .map_err(backend_error)?
        .rows_affected();
        if rows == 0 {
            let found = self.read::<T>(tx).await?.generation();
            return Err(conflict(found));
        }
        Ok(stored)
    }
}
