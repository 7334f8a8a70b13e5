//! IP pools: created once, deleted when no address is allocated from them.

use serde::{Deserialize, Serialize};

use super::{App, AppError};
use crate::core::ipam::validate_pool;
use crate::core::model::{Action, IpAllocation, IpPool, NewEvent};
use crate::store::StoreError;

/// A pool with its size and what is allocated from it.
#[derive(Serialize, Deserialize, Debug)]
pub struct PoolDetail {
    pub pool: IpPool,
    pub size: u32,
    pub allocations: Vec<IpAllocation>,
}

impl App {
    pub async fn pool_create(&self, actor: &str, pool: IpPool) -> Result<IpPool, AppError> {
        validate_pool(&pool)?;
        let event = NewEvent::global(
            self.now_ms(),
            actor,
            Action::PoolCreate,
            format!(
                "pool {} {} {}-{}",
                pool.name, pool.cidr, pool.range_start, pool.range_end
            ),
        );
        self.store.pool_create(&pool, &[event]).await?;
        Ok(pool)
    }

    /// Deletes a pool nothing is allocated from.
    pub async fn pool_delete(&self, actor: &str, name: &str) -> Result<(), AppError> {
        let event = NewEvent::global(
            self.now_ms(),
            actor,
            Action::PoolDelete,
            format!("pool {name}"),
        );
        Ok(self.store.pool_delete(name, &[event]).await?)
    }

    /// The pool, how many addresses it hands out, and who holds which.
    pub async fn pool_detail(&self, name: &str) -> Result<Option<PoolDetail>, AppError> {
        let Some(pool) = self.store.pool_get(name).await? else {
            return Ok(None);
        };
        let range = validate_pool(&pool)
            .map_err(|error| StoreError::Corrupt(format!("stored pool {name}: {error}")))?;
        let allocations = self.store.ip_list(Some(name), None).await?;
        Ok(Some(PoolDetail {
            size: range.size(),
            pool,
            allocations,
        }))
    }
}
