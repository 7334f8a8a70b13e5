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
use crate::core::cluster::{ClusterConfig, Replica};
use crate::images::ImageStore;
use crate::runtime::Clock;
use crate::store::cached::CachedStore;
use crate::store::sql::{Backend, SqlStore};
use crate::store::{Store, StoreError};

/// Opens the SQL store at `url` (running migrations) behind the read cache.
pub async fn open_sql_store(url: &str) -> Result<Arc<dyn Store>, StoreError> {
    let sql: Arc<dyn Store> = Arc::new(SqlStore::connect(url).await?);
    Ok(Arc::new(CachedStore::new(sql)))
}

/// Opens the SQL store for one replica of several, or leaves the read cache out at
/// `cache_max_age_ms` 0. On PostgreSQL the cache listens for other replicas' writes
/// (`store::sql::notify`) and forgets what they changed once their notification
/// arrives; it also empties itself every `cache_max_age_ms`, so what another replica
/// wrote is served at most that late even when notifications are lost. The listener
/// connects in the background: a database that refuses it delays nothing here.
pub async fn open_sql_store_for_replica(
    url: &str,
    cache_max_age_ms: i64,
    clock: Arc<dyn Clock>,
) -> Result<Arc<dyn Store>, StoreError> {
    let sql = SqlStore::connect(url).await?;
    let backend = sql.backend();
    let sql: Arc<dyn Store> = Arc::new(sql);
    if cache_max_age_ms == 0 {
        return Ok(sql);
    }
    let cache = Arc::new(CachedStore::with_max_age(
        sql,
        cache_max_age_ms,
        Arc::new(move || clock.now_ms()),
    ));
    if backend == Backend::Postgres {
        crate::store::sql::notify::spawn_cache_listener(url, &cache);
    }
    Ok(cache)
}

/// Takes the lock that makes a daemon the only one serving an SQLite database (the file
/// `<database>.serve-lock` beside it), held for as long as the returned file lives.
/// `None` for other databases. A second `bearman serve` on the same file is refused with
/// the reason: SQLite is one daemon's embedded store (its read cache and its controller
/// assume no other writer); several daemons need PostgreSQL and `[cluster]`.
pub fn lock_sqlite_for_serving(url: &str) -> Result<Option<std::fs::File>, String> {
    let Some(rest) = url.strip_prefix("sqlite://") else {
        return Ok(None);
    };
    let path = rest.split('?').next().unwrap_or(rest);
    if path.is_empty() || path == ":memory:" {
        return Ok(None);
    }
    let lock_path = format!("{path}.serve-lock");
    let file = std::fs::OpenOptions::new()
        .create(true)
        .truncate(false)
        .write(true)
        .open(&lock_path)
        .map_err(|error| format!("cannot open {lock_path}: {error}"))?;
    match file.try_lock() {
        Ok(()) => Ok(Some(file)),
        Err(std::fs::TryLockError::WouldBlock) => Err(format!(
            "another bearman serve already serves the SQLite database {path} (it holds {lock_path}): \
             SQLite is one daemon's embedded store; run several daemons on PostgreSQL with [cluster] enabled = true"
        )),
        Err(std::fs::TryLockError::Error(error)) => {
            Err(format!("cannot lock {lock_path}: {error}"))
        }
    }
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
    /// One replica of several on one PostgreSQL database: this one runs the controller
    /// only while it holds the lease. `None`: the database's only daemon.
    pub cluster: Option<ClusterMembership>,
    /// What `GET /metrics` reports; the BMC provider records its calls in the same one
    /// (`DriverBmcs::with_metrics`).
    pub metrics: Arc<crate::telemetry::Metrics>,
    /// Shown the assembled application once, before serving: how a watcher outside the
    /// daemon (the simulator's `--serve` window) gets at its guard board, leader board and
    /// metrics. It must only keep what it is given; `None` in production.
    pub observer: Option<DaemonObserver>,
}

/// See [`DaemonParts::observer`].
pub type DaemonObserver = Arc<dyn Fn(&crate::app::App) + Send + Sync>;

/// Who this replica is in the cluster, and the lease settings.
#[derive(Clone, Debug)]
pub struct ClusterMembership {
    pub replica: Replica,
    pub config: ClusterConfig,
}

/// Where a daemon serves: `main` carries everything (the admin API, the boot protocol,
/// the probes), over TLS when `main_tls` is given; `boot` (used with TLS) serves the
/// boot protocol and the probes over plain HTTP for firmware and agents.
pub struct Listeners<L> {
    pub main: L,
    pub main_tls: Option<crate::edge::TlsAcceptorSource>,
    pub boot: Option<L>,
}

impl<L> Listeners<L> {
    /// One plain-HTTP listener for everything (the default, and the simulator's).
    pub fn plain(main: L) -> Self {
        Listeners {
            main,
            main_tls: None,
            boot: None,
        }
    }
}

/// Runs the daemon — its controller (supervised: a panic is logged, shown as down, and
/// the task restarted) and its HTTP service on `listener` — until `shutdown` resolves.
pub async fn run_daemon<L>(
    listener: L,
    parts: DaemonParts,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> std::io::Result<()>
where
    L: axum::serve::Listener<Addr = std::net::SocketAddr>,
{
    run_daemon_on(Listeners::plain(listener), parts, shutdown).await
}

/// [`run_daemon`] on [`Listeners`].
pub async fn run_daemon_on<L>(
    listeners: Listeners<L>,
    parts: DaemonParts,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> std::io::Result<()>
where
    L: axum::serve::Listener<Addr = std::net::SocketAddr>,
{
    let mut state = AppState::new(parts.store, parts.clock, parts.images, parts.service);
    state.app = state.app.clone().with_metrics(parts.metrics);
    // Operator power actions go through the controller's own BMC provider, so the
    // per-BMC guard serialises them with fencing and power polls. Verified within the
    // remediation's readback bounds.
    let limits = &parts.remediation.limits;
    let readback = crate::bmc::ops::Readback {
        readbacks_max: limits.readbacks_max.max(1),
        backoff: std::time::Duration::from_millis(limits.backoff_initial_ms.max(10) as u64),
    };
    state.app = state.app.clone().with_power_switch(Arc::new(
        crate::controller::operator_power::OperatorPower::new(parts.bmcs.clone(), readback),
    ));
    state.app = state
        .app
        .clone()
        .with_twin_sources(crate::app::drill::TwinSources {
            remediation: parts.remediation.clone(),
            vms: parts.cloud.clone().map(|cloud| {
                Arc::new(crate::controller::drill_faults::CloudVms(cloud))
                    as Arc<dyn crate::app::drill::HostVms>
            }),
        });
    // Chaos drills inject through the same provider and guards.
    state.app = state.app.clone().with_fault_injector(Arc::new(
        crate::controller::drill_faults::BmcFaults::new(parts.bmcs.clone(), readback),
    ));
    if let Some(observer) = &parts.observer {
        observer(&state.app);
    }
    // Reported, never fatal: the daemon serves with them, an operator decides.
    if let Err(error) = state.app.report_orphan_addresses().await {
        tracing::warn!(%error, "start-up check for orphan address allocations failed");
    }
    // A replica joins before its controller's first tick, so that tick already waits
    // for the lease instead of acting alone.
    let elector = parts.cluster.map(|membership| {
        crate::controller::elector::spawn_elector(
            state.app.clone(),
            membership.replica,
            membership.config,
        )
    });
    let controller = Controller::new(
        state.app.clone(),
        parts.bmcs,
        parts.cloud,
        parts.remediation,
    );
    let supervisor = crate::controller::spawn_supervised(controller);
    let app = state.app.clone();
    let served = serve_on(listeners, state, shutdown).await;
    supervisor.abort();
    if let Some(elector) = elector {
        elector.abort();
        // Hand the lease over now rather than after its TTL.
        if let Err(error) = app.cluster_resign().await {
            tracing::warn!(%error, "could not release the controller lease on shutdown");
        }
    }
    served
}

/// Serves the whole HTTP application on `listener` until `shutdown` resolves, within
/// the connection bounds of `state.config.edge` (see [`crate::edge`]).
pub async fn serve<L>(
    listener: L,
    state: AppState,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> std::io::Result<()>
where
    L: axum::serve::Listener<Addr = std::net::SocketAddr>,
{
    serve_on(Listeners::plain(listener), state, shutdown).await
}

/// [`serve`] on [`Listeners`]: each listener has its own connection cap.
pub async fn serve_on<L>(
    listeners: Listeners<L>,
    state: AppState,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> std::io::Result<()>
where
    L: axum::serve::Listener<Addr = std::net::SocketAddr>,
{
    let limits = state.config.edge.connections;
    let (stop, stopped) = tokio::sync::watch::channel(false);
    tokio::spawn(async move {
        shutdown.await;
        let _ = stop.send(true);
    });
    let boot = listeners.boot.map(|listener| {
        tokio::spawn(crate::edge::serve_listener(
            listener,
            api::boot_service(state.clone()),
            limits,
            None,
            stopped.clone(),
        ))
    });
    let served = crate::edge::serve_listener(
        listeners.main,
        api::service(state),
        limits,
        listeners.main_tls,
        stopped,
    )
    .await;
    if let Some(boot) = boot {
        match boot.await {
            Ok(result) => result?,
            Err(error) => return Err(std::io::Error::other(error)),
        }
    }
    served
}
