//! Assembling and running the daemon: open the store, build the router, serve on
//! whatever listener the caller provides (a TCP socket in production, a turmoil socket in
//! the simulator).

use std::future::Future;
use std::sync::Arc;

use crate::api::{self, AppState};
use crate::store::cached::CachedStore;
use crate::store::sql::SqlStore;
use crate::store::{Store, StoreError};

/// Opens the SQL store at `url` (running migrations) behind the read cache.
pub async fn open_sql_store(url: &str) -> Result<Arc<dyn Store>, StoreError> {
    let sql: Arc<dyn Store> = Arc::new(SqlStore::connect(url).await?);
    Ok(Arc::new(CachedStore::new(sql)))
}

/// Serves the whole HTTP application on `listener` until `shutdown` resolves.
pub async fn serve<L>(
    listener: L,
    state: AppState,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> std::io::Result<()>
where
    L: axum::serve::Listener,
    L::Addr: std::fmt::Debug,
{
    let app = axum::ServiceExt::<axum::extract::Request>::into_make_service(api::app(state));
    axum::serve(listener, app)
        .with_graceful_shutdown(shutdown)
        .await
}
