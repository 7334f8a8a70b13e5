//! HTTP surface: the unauthenticated network-boot endpoints (`/ipxe…`, `/images/…`), the
//! token-authenticated admin API (`/api/v1/…`), and the shared state and middleware.
//!
//! Architecture invariant: handlers are HTTP only. They parse and validate the request's
//! shape, call the application layer (`crate::app`) for every state change and the store
//! for reads, and map `AppError` to a status in `error.rs`. No business rule lives here.

pub mod admin;
pub mod auth;
pub mod boot;
pub mod dashboard;
pub mod error;
pub mod extract;
pub mod metrics;

use std::sync::Arc;

use axum::extract::{DefaultBodyLimit, Request};
use axum::http::StatusCode;
use axum::response::Response;
use axum::Router;

use crate::core::boot::Stage1Config;
use crate::core::model::TimestampMs;
use crate::core::registration::RegistrationDefaults;
use crate::images::ImageStore;
use crate::runtime::Clock;
use crate::store::Store;
use error::ApiError;

/// Default request body limit: a registration with 64 NICs and 256 disks is ~60 KiB.
pub const BODY_LIMIT_BYTES_DEFAULT: usize = 256 * 1024;

/// Settings the daemon's HTTP side and its operations need, fixed at start-up.
#[derive(Clone, Debug)]
pub struct ServiceConfig {
    /// Base URL nodes use to reach this daemon, e.g. `http://10.0.0.1:8080`.
    pub public_url: String,
    pub stage1: Stage1Config,
    pub defaults: RegistrationDefaults,
    /// Which self-registering machines are accepted (`[enrollment]`).
    pub enrollment: crate::core::enrollment::EnrollmentPolicy,
    pub body_limit_bytes: usize,
    /// Connection bounds and the unauthenticated endpoints' per-source rate limit.
    pub edge: crate::edge::EdgeLimits,
    /// A heartbeat younger than this counts as "the node is up" (leaving maintenance).
    pub heartbeat_fresh_ms: TimestampMs,
    /// Session length and the cookie's `Secure` flag (the admin listener is TLS).
    pub dashboard: crate::core::session::DashboardSettings,
    /// `GET /metrics` without a token (`[metrics] public`); otherwise role viewer.
    pub metrics_public: bool,
    /// The firmware rollout's rules (`[firmware]`).
    pub firmware: crate::core::firmware::RolloutPolicy,
}

/// What every handler is given. Handlers and the router clone it for every request,
/// so it is one shared allocation: a clone is one reference count, not one per part
/// (the parts are about twenty `Arc`s). Set-up code changes parts through `DerefMut`
/// before anything shares it.
#[derive(Clone)]
pub struct AppState(Arc<AppStateParts>);

impl std::ops::Deref for AppState {
    type Target = AppStateParts;

    fn deref(&self) -> &AppStateParts {
        &self.0
    }
}

impl std::ops::DerefMut for AppState {
    /// Copies the parts first if the state is already shared (it is not, while the
    /// daemon is assembled).
    fn deref_mut(&mut self) -> &mut AppStateParts {
        Arc::make_mut(&mut self.0)
    }
}

#[derive(Clone)]
pub struct AppStateParts {
    /// Every state change goes through here.
    pub app: crate::app::App,
    /// For reads (the same store the application writes to).
    pub store: Arc<dyn Store>,
    pub clock: Arc<dyn Clock>,
    pub images: Arc<dyn ImageStore>,
    pub config: Arc<ServiceConfig>,
    /// Rendered target scripts, so a boot storm's repeated fetches cost a lookup.
    pub scripts: Arc<boot::ScriptCache>,
    /// `GET /ipxe`'s script, which depends on configuration only.
    pub stage1_script: axum::body::Bytes,
    /// Per-source request budget of the unauthenticated endpoints.
    pub rate_limiter: Arc<std::sync::Mutex<crate::core::rate_limit::SourceRateLimiter>>,
}

impl AppState {
    pub fn new(
        store: Arc<dyn Store>,
        clock: Arc<dyn Clock>,
        images: Arc<dyn ImageStore>,
        config: ServiceConfig,
    ) -> Self {
        let stage1_script = axum::body::Bytes::from(crate::core::boot::render_stage1(
            &config.stage1,
            &config.public_url,
            None,
        ));
        let app = crate::app::App::new(
            store.clone(),
            clock.clone(),
            crate::app::Settings {
                defaults: config.defaults.clone(),
                enrollment: config.enrollment.clone(),
                heartbeat_fresh_ms: config.heartbeat_fresh_ms,
                firmware: config.firmware.clone(),
            },
        );
        let rate_limiter = Arc::new(std::sync::Mutex::new(
            crate::core::rate_limit::SourceRateLimiter::new(config.edge.rate),
        ));
        AppState(Arc::new(AppStateParts {
            app,
            store,
            clock,
            images,
            stage1_script,
            rate_limiter,
            config: Arc::new(config),
            scripts: Arc::default(),
        }))
    }
}

/// The whole HTTP application as one service: the request span, the boot fast path and
/// the router.
pub fn service(state: AppState) -> HttpService<Router> {
    HttpService {
        body_limit: DefaultBodyLimit::max(state.config.body_limit_bytes),
        state: Arc::new(state.clone()),
        router: routes(state, true),
    }
}

/// Every route. The request span is not a router layer: `Router::layer` wraps each route
/// in another boxed service, cloned on every request, and `middleware::from_fn` boxes
/// both the inner service and the future; [`HttpService`] around the whole does neither.
pub fn router(state: AppState) -> Router {
    let body_limit = state.config.body_limit_bytes;
    routes(state, true).layer(DefaultBodyLimit::max(body_limit))
}

/// The boot protocol and the probes only, for the plain-HTTP listener beside a TLS
/// admin listener: the admin API is not there (404), so no token is ever sent to it
/// in clear text by mistake and answered.
pub fn boot_service(state: AppState) -> HttpService<Router> {
    HttpService {
        body_limit: DefaultBodyLimit::max(state.config.body_limit_bytes),
        state: Arc::new(state.clone()),
        router: routes(state, false),
    }
}

/// The routes without the body limit: [`HttpService`] sets it on each request, where a
/// router layer would wrap every route in another boxed service, cloned per request.
fn routes(state: AppState, with_admin: bool) -> Router {
    let mut router = Router::new().merge(boot::router());
    if with_admin {
        router = router
            .nest("/api/v1", admin::router(state.clone()))
            .merge(dashboard::router())
            .merge(metrics::router(&state));
    }
    router
        .route("/healthz", axum::routing::get(healthz))
        .route("/readyz", axum::routing::get(readyz))
        .fallback(|| async { ApiError::new(StatusCode::NOT_FOUND, "no_route", "no such endpoint") })
        .with_state(state)
}

/// `ok` while the daemon can do its job; 503 naming why when its controller is down
/// (panicked), so a load balancer or an operator's probe sees it.
async fn healthz(axum::extract::State(state): axum::extract::State<AppState>) -> Response {
    use axum::response::IntoResponse;
    match state.app.guards.liveness() {
        crate::app::guards::ControllerLiveness::Down {
            reason, restarting, ..
        } => (
            StatusCode::SERVICE_UNAVAILABLE,
            format!(
                "controller down: {reason}{}\n",
                if restarting {
                    "; restarting"
                } else {
                    "; not restarting"
                }
            ),
        )
            .into_response(),
        _ => match state.app.leader.acting(state.app.now_ms()) {
            crate::app::cluster::Acting::Alone => "ok\n".into_response(),
            crate::app::cluster::Acting::Leader { epoch } => {
                format!("ok: leading (epoch {epoch})\n").into_response()
            }
            crate::app::cluster::Acting::Standby => {
                "ok: standby (another replica runs the controller)\n".into_response()
            }
        },
    }
}

/// How long `/readyz` waits for the store's trivial query before answering 503.
pub const READY_STORE_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(2);

/// Readiness, unlike liveness (`/healthz`): whether this replica can serve requests now —
/// its controller runs and the store answers a trivial query within
/// [`READY_STORE_TIMEOUT`]. A standby replica is ready (it serves the APIs); the body says
/// whether this one leads. 503 with `Retry-After` otherwise, never a hang.
async fn readyz(axum::extract::State(state): axum::extract::State<AppState>) -> Response {
    use axum::response::IntoResponse;
    let not_ready = |why: String| {
        (
            StatusCode::SERVICE_UNAVAILABLE,
            [(
                axum::http::header::RETRY_AFTER,
                error::UNAVAILABLE_RETRY_AFTER_S.to_string(),
            )],
            format!("not ready: {why}\n"),
        )
            .into_response()
    };
    if let crate::app::guards::ControllerLiveness::Down { reason, .. } = state.app.guards.liveness()
    {
        return not_ready(format!("controller down: {reason}"));
    }
    match tokio::time::timeout(READY_STORE_TIMEOUT, state.store.ping()).await {
        Ok(Ok(())) => {}
        Ok(Err(error)) => {
            tracing::warn!(error = %error, "readiness: the store did not answer");
            return not_ready("database unavailable; see the daemon log".to_string());
        }
        Err(_) => {
            tracing::warn!("readiness: the store did not answer in time");
            return not_ready(format!(
                "database: no answer within {} ms",
                READY_STORE_TIMEOUT.as_millis()
            ));
        }
    }
    match state.app.leader.acting(state.app.now_ms()) {
        crate::app::cluster::Acting::Alone => "ready\n".into_response(),
        crate::app::cluster::Acting::Leader { epoch } => {
            format!("ready: leading (epoch {epoch})\n").into_response()
        }
        crate::app::cluster::Acting::Standby => {
            "ready: standby (another replica runs the controller)\n".into_response()
        }
    }
}

/// The application around `router` (the [`router`] in production): one span per request
/// and one log line when it completes (a warning for a 5xx, debug otherwise).
///
/// `GET /ipxe/{uuid}` during a boot storm is answered before routing when its script is
/// cached and current (see [`boot::cached_target_script`]), without the router's
/// per-request work. A routed request always gets its span (handlers log); an answer
/// ready before routing (a cached script, a rate-limit refusal) gets one only when its
/// debug completion line is enabled, since nothing else is logged in it.
#[derive(Clone)]
pub struct HttpService<S> {
    state: Arc<AppState>,
    /// `body_limit_bytes`, set on every request before routing (see [`routes`]).
    body_limit: DefaultBodyLimit,
    router: S,
}

/// Answers before routing when it can (a rate-limit refusal, a cached script);
/// otherwise hands `request` to `route` inside the request's span. `peer` is the source
/// the rate limit counts (`None` only for in-process callers).
fn answer<F>(
    state: &AppState,
    peer: Option<std::net::SocketAddr>,
    request: Request,
    route: impl FnOnce(Request) -> F,
) -> ResponseFuture<F> {
    let started = tokio::time::Instant::now();
    let route_name = route_label(request.uri().path());
    let method = method_label(request.method());
    // The lookup logs nothing, so it may run before the span exists.
    let ready =
        rate_limited(state, peer, &request).or_else(|| boot::cached_target_script(state, &request));
    let (answer, span) = match ready {
        Some(response) => {
            // A ready answer (a cached script, a 429) logs nothing but the debug
            // completion line, so the span exists only when that line is enabled:
            // creating and closing one was about 1,400 instructions a request.
            let span = if tracing::enabled!(tracing::Level::DEBUG) {
                tracing::info_span!(
                    "request",
                    method = %request.method(),
                    path = %request.uri().path(),
                )
            } else {
                tracing::Span::none()
            };
            let response = Some(response);
            (Answer::Cached { response }, span)
        }
        None => {
            let span = tracing::info_span!(
                "request",
                method = %request.method(),
                path = %request.uri().path(),
            );
            let inner = span.in_scope(|| route(request));
            (Answer::Routed { inner }, span)
        }
    };
    ResponseFuture {
        answer,
        span,
        started,
        route: route_name,
        method,
        metrics: state.app.metrics.clone(),
    }
}

/// In-process callers (tests, `oneshot`): the peer, if any, is the request's
/// `ConnectInfo` extension.
impl<S> tower::Service<Request> for HttpService<S>
where
    S: tower::Service<Request, Response = Response, Error = std::convert::Infallible>,
{
    type Response = Response;
    type Error = std::convert::Infallible;
    type Future = ResponseFuture<S::Future>;

    fn poll_ready(
        &mut self,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Result<(), Self::Error>> {
        self.router.poll_ready(cx)
    }

    fn call(&mut self, request: Request) -> Self::Future {
        let peer = request
            .extensions()
            .get::<axum::extract::ConnectInfo<std::net::SocketAddr>>()
            .map(|info| info.0);
        let router = &mut self.router;
        let body_limit = self.body_limit;
        answer(&self.state, peer, request, |mut request| {
            body_limit.apply(&mut request);
            router.call(request)
        })
    }
}

/// At the edge the peer comes with each request: an answer ready before routing needs
/// no extension map; a routed request gets `ConnectInfo` for its handlers.
impl<S> crate::edge::EdgeService for HttpService<S>
where
    S: tower::Service<Request, Response = Response, Error = std::convert::Infallible>
        + Clone
        + Send
        + 'static,
    S::Future: Send + 'static,
{
    type Future = ResponseFuture<tower::util::Oneshot<S, Request>>;

    fn serve(&self, peer: std::net::SocketAddr, request: Request) -> Self::Future {
        answer(&self.state, Some(peer), request, |mut request| {
            self.body_limit.apply(&mut request);
            request
                .extensions_mut()
                .insert(axum::extract::ConnectInfo(peer));
            tower::ServiceExt::oneshot(self.router.clone(), request)
        })
    }
}

/// The route template a request path matches, as metrics label it: one of a fixed set
/// (the boot routes, `/api/v1` + the admin route table, the probes), `other` for anything
/// else, so no label ever carries a uuid or a client's invention.
pub fn route_label(path: &str) -> &'static str {
    static TEMPLATES: std::sync::OnceLock<Vec<(Vec<&'static str>, &'static str)>> =
        std::sync::OnceLock::new();
    let templates = TEMPLATES.get_or_init(|| {
        let mut all: Vec<&'static str> = vec![
            "/ipxe",
            "/ipxe/{uuid}",
            "/ipxe/{uuid}/register",
            "/ipxe/{uuid}/profile",
            "/ipxe/{uuid}/detail",
            "/ipxe/{uuid}/installed",
            "/ipxe/{uuid}/progress",
            "/ipxe/{uuid}/heartbeat",
            "/healthz",
            "/readyz",
            "/metrics",
        ];
        let mut admin: Vec<&'static str> = admin::route_table()
            .into_iter()
            .map(|spec| format!("/api/v1{}", spec.path))
            .collect::<std::collections::BTreeSet<_>>()
            .into_iter()
            // Built once per process from the route table: a bounded set of strings.
            .map(|template| &*Box::leak(template.into_boxed_str()))
            .collect();
        all.append(&mut admin);
        all.into_iter()
            .map(|template| (template.split('/').skip(1).collect(), template))
            .collect()
    });
    if path.starts_with("/images/") {
        return "/images/{path}";
    }
    // The boot protocol is most of the traffic: matched by hand, without the walk below.
    if let Some(rest) = path.strip_prefix("/ipxe") {
        return boot_route_label(rest);
    }
    let segments = path.split('/').skip(1);
    'templates: for (pattern, template) in templates {
        let mut segments = segments.clone();
        for want in pattern {
            match segments.next() {
                Some(segment) if want.starts_with('{') && !segment.is_empty() => {}
                Some(segment) if segment == *want => {}
                _ => continue 'templates,
            }
        }
        if segments.next().is_none() {
            return template;
        }
    }
    if path.starts_with("/ui") || path == "/" {
        return "/ui";
    }
    "other"
}

/// [`route_label`] of `/ipxe` + `rest`.
fn boot_route_label(rest: &str) -> &'static str {
    if rest.is_empty() {
        return "/ipxe";
    }
    let Some(rest) = rest.strip_prefix('/') else {
        return "other";
    };
    match rest.split_once('/') {
        None if !rest.is_empty() => "/ipxe/{uuid}",
        Some((uuid, action)) if !uuid.is_empty() => match action {
            "register" => "/ipxe/{uuid}/register",
            "profile" => "/ipxe/{uuid}/profile",
            "detail" => "/ipxe/{uuid}/detail",
            "installed" => "/ipxe/{uuid}/installed",
            "progress" => "/ipxe/{uuid}/progress",
            "heartbeat" => "/ipxe/{uuid}/heartbeat",
            "firmware" => "/ipxe/{uuid}/firmware",
            _ => "other",
        },
        _ => "other",
    }
}

/// The request method as metrics label it, from a fixed set.
fn method_label(method: &axum::http::Method) -> &'static str {
    use axum::http::Method;
    match *method {
        Method::GET => "GET",
        Method::HEAD => "HEAD",
        Method::POST => "POST",
        Method::PUT => "PUT",
        Method::PATCH => "PATCH",
        Method::DELETE => "DELETE",
        _ => "other",
    }
}

/// The unauthenticated endpoints: anyone on the provisioning network may call them.
fn is_unauthenticated_path(path: &str) -> bool {
    path.starts_with("/ipxe") || path.starts_with("/images/")
}

/// 429 with `Retry-After` when the request is to an unauthenticated endpoint and its
/// source has used its budget ([`crate::core::rate_limit`]); `None` to go on. Requests
/// without a peer address (only in-process tests call the router that way) pass.
fn rate_limited(
    state: &AppState,
    peer: Option<std::net::SocketAddr>,
    request: &Request,
) -> Option<Response> {
    use crate::core::rate_limit::RateVerdict;
    use axum::response::IntoResponse;
    if !is_unauthenticated_path(request.uri().path()) {
        return None;
    }
    let peer = peer?;
    let verdict = state
        .rate_limiter
        .lock()
        .unwrap_or_else(|poisoned| poisoned.into_inner())
        .check(peer.ip(), state.clock.now_ms());
    match verdict {
        RateVerdict::Allow => None,
        RateVerdict::Refuse {
            retry_after_s,
            first_in_window,
        } => {
            if first_in_window {
                let limit = state.config.edge.rate;
                tracing::warn!(
                    source = %peer.ip(),
                    per_s = limit.per_s,
                    burst = limit.burst,
                    "rate limit: refusing this source's boot-protocol requests (429) until it slows down; logged once per flood"
                );
            }
            let mut error = ApiError::new(
                StatusCode::TOO_MANY_REQUESTS,
                "rate_limited",
                format!(
                    "too many requests from {}; retry in {retry_after_s} s",
                    peer.ip()
                ),
            );
            error.retry_after_s = Some(retry_after_s.min(u64::from(u32::MAX)) as u32);
            Some(error.into_response())
        }
    }
}

pin_project_lite::pin_project! {
    /// The answer, polled inside the request's span, then the completion line.
    pub struct ResponseFuture<F> {
        #[pin]
        answer: Answer<F>,
        span: tracing::Span,
        started: tokio::time::Instant,
        route: &'static str,
        method: &'static str,
        metrics: std::sync::Arc<crate::telemetry::Metrics>,
    }
}

pin_project_lite::pin_project! {
    /// Either the cached script, ready at once, or the router's future.
    #[project = AnswerProjection]
    enum Answer<F> {
        Cached { response: Option<Response> },
        Routed { #[pin] inner: F },
    }
}

impl<F> std::future::Future for ResponseFuture<F>
where
    F: std::future::Future<Output = Result<Response, std::convert::Infallible>>,
{
    type Output = F::Output;

    fn poll(
        self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Self::Output> {
        let this = self.project();
        let _entered = this.span.enter();
        let response = match this.answer.project() {
            AnswerProjection::Cached { response } => response
                .take()
                .expect("an ResponseFuture is not polled after it completed"),
            AnswerProjection::Routed { inner } => {
                let Ok(response) = std::task::ready!(inner.poll(cx));
                response
            }
        };
        let status = response.status().as_u16();
        let elapsed = this.started.elapsed();
        this.metrics
            .http_request(this.route, this.method, status, elapsed);
        if let Some(error::StoreFault(kind)) = response.extensions().get() {
            this.metrics.store_error(kind);
        }
        let elapsed_us = elapsed.as_micros() as u64;
        if status >= 500 {
            tracing::warn!(status, elapsed_us, "request failed");
        } else {
            tracing::debug!(status, elapsed_us, "request done");
        }
        std::task::Poll::Ready(Ok(response))
    }
}
