//! A window onto a running simulation for an operator watching a rehearsal
//! (`bearman-sim run --serve ADDR`): the simulated daemons' `/metrics`, read from outside
//! the simulation while it runs.
//!
//! Why it keeps the run deterministic: nothing goes *into* the simulation. The window
//! never sends a request over turmoil's network (which would draw from its random
//! latencies and reach the daemon's rate limiter and caches); it reads what the run
//! already keeps — the shared in-memory store (the checker reads it the same way), each
//! daemon's guard and leader boards and its metrics (atomics and mutexes) — and renders
//! them with the daemon's own `/metrics` code over a state whose clock is the run's
//! virtual time. A scrape can delay a step by holding a lock for a moment; steps are
//! virtual time, so that changes nothing the run decides. `sim/tests/watch.rs` checks a
//! watched run's trace hash against an unwatched one's.

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicI64, Ordering};
use std::sync::{Arc, Mutex};

use bearman::app::cluster::LeaderBoard;
use bearman::app::guards::GuardBoard;
use bearman::store::Store;
use bearman::telemetry::Metrics;

/// What the window keeps of one simulated daemon.
#[derive(Clone)]
struct Boards {
    guards: Arc<GuardBoard>,
    leader: Arc<LeaderBoard>,
    metrics: Arc<Metrics>,
}

/// Shared between the run (which fills it) and the window (which reads it).
#[derive(Clone, Default)]
pub struct Watch {
    inner: Arc<Inner>,
}

#[derive(Default)]
struct Inner {
    /// The run's virtual time, ms since the epoch, published after every step.
    now_ms: AtomicI64,
    store: Mutex<Option<Arc<dyn Store>>>,
    daemons: Mutex<BTreeMap<String, Boards>>,
    /// "scenario seed N", for the window's index page.
    title: Mutex<String>,
}

fn lock<T>(mutex: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    mutex
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner)
}

impl Watch {
    pub(crate) fn start(&self, title: String, store: Arc<dyn Store>) {
        *lock(&self.inner.title) = title;
        *lock(&self.inner.store) = Some(store);
        lock(&self.inner.daemons).clear();
    }

    pub(crate) fn set_now_ms(&self, now_ms: i64) {
        self.inner.now_ms.store(now_ms, Ordering::Relaxed);
    }

    /// The observer a simulated daemon is assembled with: it keeps the boards, nothing
    /// more. A daemon restarted after a crash replaces what its first life left.
    pub(crate) fn observer(&self, daemon: &str) -> bearman::server::DaemonObserver {
        let watch = self.clone();
        let daemon = daemon.to_string();
        Arc::new(move |app: &bearman::app::App| {
            lock(&watch.inner.daemons).insert(
                daemon.clone(),
                Boards {
                    guards: app.guards.clone(),
                    leader: app.leader.clone(),
                    metrics: app.metrics.clone(),
                },
            );
        })
    }

    pub fn now_ms(&self) -> i64 {
        self.inner.now_ms.load(Ordering::Relaxed)
    }

    pub fn title(&self) -> String {
        lock(&self.inner.title).clone()
    }

    /// The simulated daemons seen so far.
    pub fn daemons(&self) -> Vec<String> {
        lock(&self.inner.daemons).keys().cloned().collect()
    }

    /// A state over the run for `daemon` (`None`: the one acting for the fleet now, the
    /// leader of a clustered run, else the first): the shared store, that daemon's
    /// boards and metrics, the run's virtual time. Reads only.
    fn state(&self, daemon: Option<&str>) -> Result<bearman::api::AppState, (u16, String)> {
        let Some(store) = lock(&self.inner.store).clone() else {
            return Err((503, "the simulation has not started\n".into()));
        };
        let now_ms = self.now_ms();
        let chosen = {
            let daemons = lock(&self.inner.daemons);
            match daemon {
                Some(name) => daemons.get(name).cloned(),
                None => daemons
                    .values()
                    .find(|boards| {
                        !matches!(
                            boards.leader.acting(now_ms),
                            bearman::app::cluster::Acting::Standby
                        )
                    })
                    .or_else(|| daemons.values().next())
                    .cloned(),
            }
        };
        let Some(boards) = chosen else {
            return Err((
                404,
                format!("no simulated daemon {}\n", daemon.unwrap_or("yet")),
            ));
        };
        let clock: Arc<dyn bearman::runtime::Clock> = Arc::new(WatchClock(self.clone()));
        let mut state = bearman::api::AppState::new(
            store,
            clock,
            Arc::new(bearman::images::MemoryImages::default()),
            crate::run::service_config(),
        );
        state.app.guards = boards.guards;
        state.app.leader = boards.leader;
        state.app.metrics = boards.metrics;
        Ok(state)
    }

    /// `daemon`'s `/metrics` answer (status, body); `None` names the one acting for the
    /// fleet now (the leader of a clustered run), else the first.
    pub async fn metrics(&self, daemon: Option<&str>) -> (u16, String) {
        let state = match self.state(daemon) {
            Ok(state) => state,
            Err(refusal) => return refusal,
        };
        let response = bearman::api::metrics::render(&state).await;
        let status = response.status().as_u16();
        let body = axum::body::to_bytes(response.into_body(), 64 * 1024 * 1024)
            .await
            .map(|bytes| String::from_utf8_lossy(&bytes).into_owned())
            .unwrap_or_default();
        (status, body)
    }
}

/// The run's virtual time, as the window's state reads it.
struct WatchClock(Watch);

impl bearman::runtime::Clock for WatchClock {
    fn now_ms(&self) -> i64 {
        self.0.now_ms()
    }
}

impl Watch {
    /// The dashboard's pages and the admin API's viewer `GET` routes over the run (the
    /// acting daemon's view), with no login: the window is read-only, the page shows no
    /// action, and anything but a `GET` is answered 405.
    pub async fn dashboard(&self, request: axum::extract::Request) -> axum::response::Response {
        use axum::response::IntoResponse;
        if request.method() != axum::http::Method::GET {
            return (
                axum::http::StatusCode::METHOD_NOT_ALLOWED,
                "the simulation window is read-only\n",
            )
                .into_response();
        }
        let state = match self.state(None) {
            Ok(state) => state,
            Err((status, text)) => {
                let status = axum::http::StatusCode::from_u16(status)
                    .unwrap_or(axum::http::StatusCode::SERVICE_UNAVAILABLE);
                return (status, text).into_response();
            }
        };
        let router = bearman::api::dashboard::read_only_window_router()
            .nest("/api/v1", bearman::api::admin::read_only_window_router())
            .with_state(state);
        let Ok(response) = tower::ServiceExt::oneshot(router, request).await;
        response
    }
}
