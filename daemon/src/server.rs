//! Assembling and running the daemon: open the store, build the application, the HTTP
//! service and the controller, and serve on whatever listener the caller provides (a TCP
//! socket in production, a turmoil socket in the simulator). `bearman serve` and the
//! simulator both run [`run_daemon`], so the simulator runs the daemon that ships.

use std::future::Future;
use std::sync::Arc;

use crate::api::{self, AppState};
pub use crate::api::{ServiceConfig, BODY_LIMIT_BYTES_DEFAULT};
use crate::bmc::BmcProvider;
use crate::cloud::Cloud;
use crate::controller::{Controller, ControllerConfig};
use crate::images::ImageStore;
use crate::runtime::Clock;
use crate::store::cached::CachedStore;
use crate::store::sql::SqlStore;
use crate::store::{Store, StoreError};

/// Opens the SQL store at `url` (running migrations) behind the read cache.
pub async fn open_sql_store(url: &str) -> Result<Arc<dyn Store>, StoreError> {
    let sql: Arc<dyn Store> = Arc::new(SqlStore::connect(url).await?);
    Ok(Arc::new(CachedStore::new(sql)))
}

/// Everything one daemon is made of: its seams and its settings.
pub struct DaemonParts {
    pub store: Arc<dyn Store>,
    pub clock: Arc<dyn Clock>,
    pub images: Arc<dyn ImageStore>,
    pub service: ServiceConfig,
    pub bmcs: Arc<dyn BmcProvider>,
    /// The hypervisor control plane VMs are evacuated through; none means fenced nodes
    /// are rebuilt but no VM is moved.
    pub cloud: Option<Arc<dyn Cloud>>,
    pub remediation: ControllerConfig,
}

/// Runs the daemon — its controller (supervised: a panic is logged, shown as down, and
/// the task restarted) and its HTTP service on `listener` — until `shutdown` resolves.
pub async fn run_daemon<L>(
    listener: L,
    parts: DaemonParts,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> std::io::Result<()>
where
    L: axum::serve::Listener,
    L::Addr: std::fmt::Debug,
{
    let state = AppState::new(parts.store, parts.clock, parts.images, parts.service);
    // Reported, never fatal: the daemon serves with them, an operator decides.
    if let Err(error) = state.app.report_orphan_addresses().await {
        tracing::warn!(%error, "start-up check for orphan address allocations failed");
    }
    let controller = Controller::new(
        state.app.clone(),
        parts.bmcs,
        parts.cloud,
        parts.remediation,
    );
    let supervisor = crate::controller::spawn_supervised(controller);
    let served = serve(listener, state, shutdown).await;
    supervisor.abort();
    served
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
    let app = axum::ServiceExt::<axum::extract::Request>::into_make_service(api::service(state));
    axum::serve(listener, app)
        .with_graceful_shutdown(shutdown)
        .await
}
