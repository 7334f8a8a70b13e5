//! `bearman serve`: configuration, logging, the daemon assembly, shutdown on a signal.

use super::*;

pub(super) async fn serve(args: ServeArgs) -> anyhow::Result<()> {
    let file = FileConfig::load(args.store.config.as_deref())?;
    let config = config::resolve(
        Overrides {
            listen: args.listen,
            public_url: args.public_url,
            data_dir: args.store.data_dir,
            database_url: args.store.database_url,
            log_format: args.log_format,
            default_flavor: args.default_flavor,
        },
        file,
    )?;
    init_logging(config.log_json);
    std::fs::create_dir_all(config.data_dir.join("images"))
        .with_context(|| format!("creating data directory {}", config.data_dir.display()))?;
    // Held until the process exits: the one daemon on this SQLite file.
    let _serving_lock =
        bearman::server::lock_sqlite_for_serving(&config.database_url).map_err(|e| anyhow!(e))?;
    let store = if config.cluster.enabled {
        bearman::server::open_sql_store_for_replica(
            &config.database_url,
            config.cluster.cache_max_age_ms,
            Arc::new(SystemClock),
        )
        .await
    } else {
        bearman::server::open_sql_store(&config.database_url).await
    }
    .map_err(|e| anyhow!("opening the database: {e}"))?;
    if store
        .token_list()
        .await
        .map_err(|e| anyhow!("{e}"))?
        .is_empty()
    {
        tracing::warn!(
            "no API tokens exist yet; create the first admin token with \
             `bearman token create --name admin --role admin` (same --data-dir / --database-url)"
        );
    }
    // Loaded before binding, so a wrong certificate fails start-up with the reason.
    let tls = match &config.tls {
        Some(tls) => {
            let loaded = bearman::edge::tls::ReloadableTls::load(bearman::edge::tls::TlsFiles {
                cert_file: tls.cert_file.clone(),
                key_file: tls.key_file.clone(),
            })
            .map_err(|error| anyhow!("[tls] {error}"))?;
            Some(Arc::new(loaded))
        }
        None => None,
    };
    let listener = bearman::runtime::system::bind_tcp(&config.listen.to_string())
        .await
        .with_context(|| format!("cannot listen on {}", config.listen))?;
    let bound = listener.local_addr()?;
    let boot_listener = match &config.tls {
        Some(tls) => Some(
            bearman::runtime::system::bind_tcp(&tls.boot_listen.to_string())
                .await
                .with_context(|| {
                    format!("[tls] cannot listen on boot_listen {}", tls.boot_listen)
                })?,
        ),
        None => None,
    };
    // Bound before serving, so a wrong address or a busy port fails start-up; dropped
    // (stopped) when the daemon stops.
    let _pxe = match config.pxe.clone() {
        Some(pxe) => Some(
            bearman_pxe::start(pxe)
                .await
                .map_err(|error| anyhow!("starting the PXE services: {error}"))?,
        ),
        None => None,
    };
    if config.enrollment.auto_accept {
        tracing::warn!(
            "[enrollment] auto_accept = true: any machine on the provisioning network that registers gets addresses and boot files"
        );
    }
    if let Some(tls) = &tls {
        tracing::info!(
            admin = %bound,
            boot = %boot_listener.as_ref().and_then(|l| l.local_addr().ok()).map_or_else(String::new, |a| a.to_string()),
            certificate = %tls.describe(),
            "TLS on the admin listener (reloaded on SIGHUP); the boot protocol is plain HTTP on the boot listener"
        );
    }
    tracing::info!(
        listen = %bound,
        public_url = %config.public_url,
        store = store.backend_name(),
        database = %bearman::store::sql::redact_url(&config.database_url),
        "bearman serving; DHCP should point iPXE at {}/ipxe",
        config.public_url
    );
    // Without BMC drivers remediation detects and guards but cannot fence: every fence
    // fails (reported) and nothing is ever evacuated on a guess. Without a cloud, fenced
    // nodes are rebuilt but no VM is moved.
    let cloud: Option<Arc<dyn bearman::cloud::Cloud>> = match config.nova.clone() {
        Some(nova) => {
            let cloud = bearman::cloud::nova::NovaCloud::new(nova)
                .map_err(|e| anyhow!("nova configuration: {e}"))?;
            tracing::info!("evacuation through OpenStack Nova enabled");
            Some(Arc::new(cloud))
        }
        None => {
            tracing::warn!("no [nova] section: remediation will not evacuate VMs");
            None
        }
    };
    let metrics = Arc::new(bearman::telemetry::Metrics::new());
    let bmcs = bearman::bmc::provider::DriverBmcs::new(config.bmc.clone())
        .map_err(|e| anyhow!("bmc configuration: {e}"))?
        .with_metrics(metrics.clone());
    let parts = bearman::server::DaemonParts {
        store,
        clock: Arc::new(SystemClock),
        images: Arc::new(DirImages::new(config.data_dir.join("images"))),
        service: ServiceConfig {
            public_url: config.public_url.clone(),
            stage1: config.stage1.clone(),
            defaults: RegistrationDefaults {
                role: config.default_role,
                flavor: config.default_flavor.clone(),
            },
            enrollment: config.enrollment.clone(),
            body_limit_bytes: config.body_limit_bytes,
            edge: bearman::edge::EdgeLimits {
                connections: bearman::edge::ConnectionLimits {
                    connections_max: connections_max_within_open_files(
                        config.edge.connections.connections_max,
                    ),
                    ..config.edge.connections
                },
                ..config.edge
            },
            heartbeat_fresh_ms: config.heartbeat_fresh_s as i64 * 1000,
            dashboard: bearman::core::session::DashboardSettings {
                session_max_s: config.dashboard.session_max_s,
                // The cookie crosses only the listener the dashboard is on: the admin
                // one, which is TLS exactly when [tls] is set.
                secure_cookie: config.tls.is_some(),
            },
            metrics_public: config.metrics_public,
            firmware: config.firmware.clone(),
        },
        bmcs: Arc::new(bmcs),
        cloud,
        remediation: config.remediation.clone(),
        cluster: config
            .cluster
            .enabled
            .then(|| bearman::server::ClusterMembership {
                replica: bearman::core::cluster::Replica {
                    name: config
                        .cluster
                        .replica_name
                        .clone()
                        .unwrap_or_else(|| format!("{}@{bound}", host_name())),
                    address: config.public_url.clone(),
                    version: env!("CARGO_PKG_VERSION").to_string(),
                    started_at_ms: bearman::runtime::Clock::now_ms(&SystemClock),
                    last_seen_at_ms: 0,
                },
                config: config.cluster.clone(),
            }),
        metrics,
        observer: None,
    };
    if let Some(membership) = &parts.cluster {
        tracing::info!(
            replica = %membership.replica.name,
            lease_ttl_ms = membership.config.lease_ttl_ms,
            "clustered: this replica serves, and runs the controller only while it holds the lease"
        );
    }
    let listeners = bearman::server::Listeners {
        main: listener,
        main_tls: tls.clone().map(|tls| {
            let source: bearman::edge::TlsAcceptorSource = Arc::new(move || tls.acceptor());
            source
        }),
        boot: boot_listener,
    };
    let _reloader = tls.map(bearman::edge::tls::spawn_reload_on_sighup);
    // Everything that can fail start-up is behind us (listeners bound, store open): a
    // `Type=notify` unit is started now, and units ordered after it may go.
    notify_systemd("READY=1");
    // STOPPING=1 as soon as shutdown begins (systemd then shows "deactivating" while
    // requests drain), and again after the daemon returns, for an exit without a signal.
    let shutdown = async {
        shutdown_signal().await;
        notify_systemd("STOPPING=1");
    };
    let served = bearman::server::run_daemon_on(listeners, parts, shutdown).await;
    notify_systemd("STOPPING=1");
    served?;
    tracing::info!("bearman stopped");
    Ok(())
}

/// Tells systemd `state`, logging (never failing on) a socket that refuses it.
fn notify_systemd(state: &str) {
    match bearman::runtime::system::notify_systemd(state) {
        Ok(true) => tracing::debug!(state, "told systemd"),
        Ok(false) => {}
        Err(error) => tracing::warn!(state, %error, "cannot notify systemd (NOTIFY_SOCKET)"),
    }
}

/// File descriptors the daemon keeps for itself beyond client connections: the database
/// pool, BMC and cloud connections, image files, the log.
const RESERVED_FILES: u64 = 256;

/// Raises the open-file limit to its hard maximum and returns the connection cap that
/// fits in it: `configured`, or lower (with a warning) when the limit is too small for
/// it, so the daemon never runs out of descriptors for its own work.
fn connections_max_within_open_files(configured: usize) -> usize {
    let limit = match bearman::runtime::system::raise_open_files_limit() {
        Ok(limit) => limit,
        Err(error) => {
            tracing::warn!(%error, "cannot read or raise the open-file limit (RLIMIT_NOFILE)");
            return configured;
        }
    };
    let fits = limit.saturating_sub(RESERVED_FILES).max(16) as usize;
    if fits < configured {
        tracing::warn!(
            open_files = limit,
            configured,
            connections_max = fits,
            "[http] connections_max lowered to fit the open-file limit; raise it (LimitNOFILE=, ulimit -n) for more"
        );
        fits
    } else {
        configured
    }
}

/// This machine's host name, for the default replica name.
fn host_name() -> String {
    std::fs::read_to_string("/proc/sys/kernel/hostname")
        .ok()
        .map(|name| name.trim().to_string())
        .filter(|name| !name.is_empty())
        .unwrap_or_else(|| "bearman".to_string())
}

pub(super) async fn shutdown_signal() {
    let interrupt = tokio::signal::ctrl_c();
    #[cfg(unix)]
    {
        let mut terminate =
            match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
                Ok(signal) => signal,
                Err(_) => {
                    let _ = interrupt.await;
                    return;
                }
            };
        tokio::select! {
            biased;
            _ = interrupt => {}
            _ = terminate.recv() => {}
        }
    }
    #[cfg(not(unix))]
    let _ = interrupt.await;
    tracing::info!("shutdown requested; finishing in-flight requests");
}
