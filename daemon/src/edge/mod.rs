//! The daemon's network edge: how connections are accepted and held, and, for the admin
//! listener, TLS ([`tls`]).
//!
//! axum's own `serve` holds a connection for as long as its peer likes: a thousand
//! sockets that send nothing used every file descriptor and stopped `/healthz`. This
//! accept loop bounds every phase of a connection instead (see [`ConnectionLimits`]):
//!
//! - **New connection**: the first request head (and the TLS handshake, when there is
//!   one) must arrive within `header_read_timeout`.
//! - **Between requests** on a kept-alive connection: closed after `idle_timeout`; once
//!   the next request's first byte arrives, its head has `header_read_timeout`.
//! - **During a request**: no overall bound (a power action takes as long as the BMC
//!   does; an image download as long as the link needs), but the request body must
//!   arrive within `body_read_timeout` of the handler starting to read it, and a
//!   response the peer stops reading is dropped after `send_stall_timeout` without
//!   progress.
//! - **At the cap** (`connections_max`): the oldest connection with no request in
//!   flight is closed to make room; when every connection is busy the loop stops
//!   accepting (the kernel's backlog queues the newcomers) until one ends. Busy
//!   connections end by themselves within the bounds above, so the boot path and
//!   `/healthz` keep answering under a flood of idle or slow connections.
//!
//! The loop runs in the simulator too, on turmoil's sockets and clock: its timers are
//! tokio's (virtual there), never the wall clock's.

pub mod tls;

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};
use std::time::Duration;

use axum::body::{Body, Bytes, HttpBody};
use axum::extract::ConnectInfo;
use axum::extract::Request;
use axum::response::Response;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::sync::{watch, Notify};
use tokio::time::Instant;

use crate::core::rate_limit::RateLimitConfig;

/// How long each phase of a connection may take, and how many connections are held.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ConnectionLimits {
    /// From accept (or from the first byte of a later request) to a complete request
    /// head, TLS handshake included.
    pub header_read_timeout: Duration,
    /// A kept-alive connection with no request is closed after this long.
    pub idle_timeout: Duration,
    /// A request body must arrive within this long once its handler reads it.
    pub body_read_timeout: Duration,
    /// A response the peer does not read for this long is dropped.
    pub send_stall_timeout: Duration,
    /// Connections held at most (lowered at start-up to what the open-file limit allows).
    pub connections_max: usize,
}

pub const HEADER_READ_TIMEOUT_DEFAULT: Duration = Duration::from_secs(10);
pub const IDLE_TIMEOUT_DEFAULT: Duration = Duration::from_secs(60);
pub const BODY_READ_TIMEOUT_DEFAULT: Duration = Duration::from_secs(30);
pub const SEND_STALL_TIMEOUT_DEFAULT: Duration = Duration::from_secs(60);
pub const CONNECTIONS_MAX_DEFAULT: usize = 4096;
/// A request head larger than this is refused (431) before it is buffered further.
pub const HEAD_BYTES_MAX: usize = 64 * 1024;

impl Default for ConnectionLimits {
    fn default() -> Self {
        ConnectionLimits {
            header_read_timeout: HEADER_READ_TIMEOUT_DEFAULT,
            idle_timeout: IDLE_TIMEOUT_DEFAULT,
            body_read_timeout: BODY_READ_TIMEOUT_DEFAULT,
            send_stall_timeout: SEND_STALL_TIMEOUT_DEFAULT,
            connections_max: CONNECTIONS_MAX_DEFAULT,
        }
    }
}

/// The edge's settings (`[http]`): connection bounds and the per-source rate limit of
/// the unauthenticated endpoints.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct EdgeLimits {
    pub connections: ConnectionLimits,
    pub rate: RateLimitConfig,
}

/// Produces the TLS acceptor for each new connection (so a reloaded certificate is used
/// from the next handshake on).
pub type TlsAcceptorSource = Arc<dyn Fn() -> tokio_rustls::TlsAcceptor + Send + Sync>;

/// What a connection is doing, as its watchdog sees it.
#[derive(Debug)]
struct ActivityState {
    /// Requests whose response has not been sent (or dropped) yet.
    in_flight: u32,
    /// Requests completed on this connection.
    served: u64,
    /// When the connection last had nothing to do (accepted, or a response finished).
    idle_since: Instant,
    /// When the first byte of the next request head arrived, if it has.
    head_started: Option<Instant>,
    /// When a write of a response last found the peer not reading.
    send_stalled_since: Option<Instant>,
    /// The accept loop wants this connection's slot: close once nothing is in flight.
    evict: bool,
}

/// Shared between a connection's I/O, its service and its watchdog.
///
/// Why the I/O and the requests never wake the watchdog: it re-arms its one timer at
/// most [`watchdog_horizon`] ahead, and every deadline that an event creates (a head
/// starting, a request ending, a write finding the peer not reading) lies at least that
/// far after the event. So a deadline never lands before the timer and is seen when it
/// fires; a request costs a few field writes under an uncontended lock, not a task
/// wake and a new timer. Only eviction, which must act now, wakes it.
struct Activity {
    state: Mutex<ActivityState>,
    /// The accept loop asked this connection to close (eviction).
    wake: Notify,
}

/// Why a connection was closed by its watchdog.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Expiry {
    HeadTimeout,
    IdleTimeout,
    SendStalled,
    Evicted,
}

impl Activity {
    fn new(now: Instant) -> Arc<Self> {
        Arc::new(Activity {
            state: Mutex::new(ActivityState {
                in_flight: 0,
                served: 0,
                idle_since: now,
                head_started: None,
                send_stalled_since: None,
                evict: false,
            }),
            wake: Notify::new(),
        })
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, ActivityState> {
        // The state is plain data, consistent after any panic: keep going.
        self.state
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    /// The next moment the connection may have to close, and why; `None` while a
    /// request is in flight and its response is moving (the wake says when that ends).
    fn deadline(&self, limits: &ConnectionLimits) -> Option<(Instant, Expiry)> {
        let state = self.lock();
        if state.in_flight > 0 {
            return state
                .send_stalled_since
                .map(|since| (since + limits.send_stall_timeout, Expiry::SendStalled));
        }
        if state.evict {
            return Some((state.idle_since, Expiry::Evicted));
        }
        Some(match state.head_started {
            Some(started) => (started + limits.header_read_timeout, Expiry::HeadTimeout),
            // A new connection owes its first head within the header timeout; a
            // kept-alive one may wait for the next request for the idle timeout.
            None if state.served == 0 => (
                state.idle_since + limits.header_read_timeout,
                Expiry::HeadTimeout,
            ),
            None => (state.idle_since + limits.idle_timeout, Expiry::IdleTimeout),
        })
    }

    fn is_idle(&self) -> bool {
        let state = self.lock();
        state.in_flight == 0 && !state.evict
    }

    fn evict(&self) {
        self.lock().evict = true;
        self.wake.notify_one();
    }

    fn read_some(&self) {
        let mut state = self.lock();
        if state.in_flight == 0 && state.head_started.is_none() {
            state.head_started = Some(tokio::time::Instant::now());
        }
    }

    fn write_blocked(&self) {
        let mut state = self.lock();
        if state.in_flight > 0 && state.send_stalled_since.is_none() {
            state.send_stalled_since = Some(tokio::time::Instant::now());
        }
    }

    fn wrote_some(&self) {
        let mut state = self.lock();
        state.send_stalled_since = None;
    }

    fn request_started(self: &Arc<Self>) -> InFlight {
        let mut state = self.lock();
        state.in_flight += 1;
        state.head_started = None;
        InFlight(self.clone())
    }
}

/// Held from a request's head to the end of its response (it travels inside the
/// response body, which hyper drops once sent or abandoned).
struct InFlight(Arc<Activity>);

impl Drop for InFlight {
    fn drop(&mut self) {
        let mut state = self.0.lock();
        state.in_flight = state.in_flight.saturating_sub(1);
        state.served += 1;
        state.idle_since = tokio::time::Instant::now();
        state.send_stalled_since = None;
        // An eviction that found this connection busy closes it now that it is idle.
        let evicted = state.evict && state.in_flight == 0;
        drop(state);
        if evicted {
            self.0.wake.notify_one();
        }
    }
}

pin_project_lite::pin_project! {
    /// A connection's socket, telling its [`Activity`] when bytes arrive and when the
    /// peer stops reading.
    struct WatchedIo<I> {
        #[pin]
        inner: I,
        activity: Arc<Activity>,
    }
}

impl<I: AsyncRead> AsyncRead for WatchedIo<I> {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<std::io::Result<()>> {
        let this = self.project();
        let before = buf.filled().len();
        let polled = this.inner.poll_read(cx, buf);
        if matches!(polled, Poll::Ready(Ok(()))) && buf.filled().len() > before {
            this.activity.read_some();
        }
        polled
    }
}

impl<I: AsyncWrite> AsyncWrite for WatchedIo<I> {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<std::io::Result<usize>> {
        let this = self.project();
        let polled = this.inner.poll_write(cx, buf);
        match &polled {
            Poll::Pending => this.activity.write_blocked(),
            Poll::Ready(Ok(written)) if *written > 0 => this.activity.wrote_some(),
            _ => {}
        }
        polled
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[std::io::IoSlice<'_>],
    ) -> Poll<std::io::Result<usize>> {
        let this = self.project();
        let polled = this.inner.poll_write_vectored(cx, bufs);
        match &polled {
            Poll::Pending => this.activity.write_blocked(),
            Poll::Ready(Ok(written)) if *written > 0 => this.activity.wrote_some(),
            _ => {}
        }
        polled
    }

    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        self.project().inner.poll_flush(cx)
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        self.project().inner.poll_shutdown(cx)
    }
}

pin_project_lite::pin_project! {
    /// A response body carrying its request's [`InFlight`] mark until it is dropped.
    struct InFlightBody {
        #[pin]
        inner: Body,
        _in_flight: InFlight,
    }
}

impl HttpBody for InFlightBody {
    type Data = Bytes;
    type Error = axum::Error;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<http_body::Frame<Bytes>, Self::Error>>> {
        self.project().inner.poll_frame(cx)
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> http_body::SizeHint {
        self.inner.size_hint()
    }
}

/// The request body arrived too slowly (see [`ConnectionLimits::body_read_timeout`]).
#[derive(Debug, thiserror::Error)]
#[error("the request body did not arrive within {0:?}")]
pub struct BodyTimeout(Duration);

pin_project_lite::pin_project! {
    /// A request body that fails once it has been read for longer than its bound.
    struct TimedBody {
        #[pin]
        inner: hyper::body::Incoming,
        timeout: Duration,
        deadline: Option<Pin<Box<tokio::time::Sleep>>>,
    }
}

impl HttpBody for TimedBody {
    type Data = Bytes;
    type Error = Box<dyn std::error::Error + Send + Sync>;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<http_body::Frame<Bytes>, Self::Error>>> {
        let this = self.project();
        if let Poll::Ready(frame) = this.inner.poll_frame(cx) {
            return Poll::Ready(frame.map(|frame| frame.map_err(Into::into)));
        }
        let timeout = *this.timeout;
        let deadline = this
            .deadline
            .get_or_insert_with(|| Box::pin(tokio::time::sleep(timeout)));
        match deadline.as_mut().poll(cx) {
            Poll::Ready(()) => Poll::Ready(Some(Err(Box::new(BodyTimeout(timeout))))),
            Poll::Pending => Poll::Pending,
        }
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> http_body::SizeHint {
        self.inner.size_hint()
    }
}

use std::future::Future;

/// The HTTP application the edge serves, told each request's peer directly.
///
/// A plain `tower` service learns the peer from a `ConnectInfo` extension instead
/// ([`WithConnectInfo`]); inserting one allocates the request's extension map and the
/// entry (three allocations a request), which an application that answers most requests
/// before routing (the boot path's cached scripts) needs only on the routed ones.
pub trait EdgeService: Clone + Send + 'static {
    type Future: Future<Output = Result<Response, std::convert::Infallible>> + Send + 'static;

    fn serve(&self, peer: SocketAddr, request: Request) -> Self::Future;
}

/// Any `tower` service at the edge: the peer goes into the request's extensions as
/// axum's `ConnectInfo`, where its handlers look for it.
#[derive(Clone)]
pub struct WithConnectInfo<S>(pub S);

impl<S> EdgeService for WithConnectInfo<S>
where
    S: tower::Service<Request, Response = Response, Error = std::convert::Infallible>
        + Clone
        + Send
        + 'static,
    S::Future: Send + 'static,
{
    type Future = tower::util::Oneshot<S, Request>;

    fn serve(&self, peer: SocketAddr, mut request: Request) -> Self::Future {
        request.extensions_mut().insert(ConnectInfo(peer));
        tower::ServiceExt::oneshot(self.0.clone(), request)
    }
}

/// One connection's view of the HTTP application: marks requests in flight, bounds
/// their bodies, and tells the application the peer's address.
struct ConnectionService<S> {
    inner: S,
    activity: Arc<Activity>,
    peer: SocketAddr,
    body_read_timeout: Duration,
}

impl<S: EdgeService> hyper::service::Service<hyper::Request<hyper::body::Incoming>>
    for ConnectionService<S>
{
    type Response = hyper::Response<InFlightBody>;
    type Error = std::convert::Infallible;
    type Future = ConnectionFuture<S::Future>;

    fn call(&self, request: hyper::Request<hyper::body::Incoming>) -> Self::Future {
        let in_flight = self.activity.request_started();
        let timeout = self.body_read_timeout;
        let request = request.map(|inner| {
            if inner.is_end_stream() {
                // Nothing to read (a GET, `Content-Length: 0`), so nothing to time:
                // an empty body is not even allocated.
                Body::empty()
            } else {
                Body::new(TimedBody {
                    inner,
                    timeout,
                    deadline: None,
                })
            }
        });
        ConnectionFuture {
            answer: self.inner.serve(self.peer, request),
            in_flight: Some(in_flight),
        }
    }
}

pin_project_lite::pin_project! {
    /// The application's answer, its body then carrying the request's [`InFlight`] mark
    /// (a named future: hyper holds it in place, no box per request).
    struct ConnectionFuture<F> {
        #[pin]
        answer: F,
        in_flight: Option<InFlight>,
    }
}

impl<F> Future for ConnectionFuture<F>
where
    F: Future<Output = Result<Response, std::convert::Infallible>>,
{
    type Output = Result<hyper::Response<InFlightBody>, std::convert::Infallible>;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        let this = self.project();
        let Ok(response) = std::task::ready!(this.answer.poll(cx));
        let in_flight = this
            .in_flight
            .take()
            .expect("a ConnectionFuture is not polled after it completed");
        Poll::Ready(Ok(response.map(|inner| InFlightBody {
            inner,
            _in_flight: in_flight,
        })))
    }
}

/// The connections one listener holds, oldest first.
#[derive(Default)]
struct Registry {
    live: Mutex<RegistryInner>,
    /// A connection ended.
    closed: Notify,
}

#[derive(Default)]
struct RegistryInner {
    next_id: u64,
    connections: BTreeMap<u64, Arc<Activity>>,
}

impl Registry {
    fn lock(&self) -> std::sync::MutexGuard<'_, RegistryInner> {
        self.live
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    fn len(&self) -> usize {
        self.lock().connections.len()
    }

    fn add(self: &Arc<Self>, activity: Arc<Activity>) -> Registered {
        let mut inner = self.lock();
        let id = inner.next_id;
        inner.next_id += 1;
        inner.connections.insert(id, activity);
        Registered {
            registry: self.clone(),
            id,
        }
    }

    /// Asks the oldest connection with nothing in flight to close; false if all are busy.
    fn evict_oldest_idle(&self) -> bool {
        let inner = self.lock();
        match inner
            .connections
            .values()
            .find(|activity| activity.is_idle())
        {
            Some(victim) => {
                victim.evict();
                true
            }
            None => false,
        }
    }
}

/// A connection's place in the [`Registry`], given up when its task ends.
struct Registered {
    registry: Arc<Registry>,
    id: u64,
}

impl Drop for Registered {
    fn drop(&mut self) {
        self.registry.lock().connections.remove(&self.id);
        self.registry.closed.notify_waiters();
    }
}

/// How often a saturated accept loop looks again for a connection to close.
const SATURATED_RECHECK: Duration = Duration::from_millis(100);
/// A saturated listener logs at most once per this long.
const SATURATED_LOG_EVERY: Duration = Duration::from_secs(60);

/// Accepts connections on `listener` and serves `service` on each within `limits`
/// (and TLS from `tls` when given), until `shutdown` turns true; then stops accepting,
/// lets in-flight requests finish, and returns once every connection has closed.
pub async fn serve_listener<L, S>(
    mut listener: L,
    service: S,
    limits: ConnectionLimits,
    tls: Option<TlsAcceptorSource>,
    mut shutdown: watch::Receiver<bool>,
) -> std::io::Result<()>
where
    L: axum::serve::Listener<Addr = SocketAddr>,
    S: EdgeService,
{
    let registry = Arc::new(Registry::default());
    let mut last_saturated_log: Option<Instant> = None;
    let connections_max = limits.connections_max.max(1);
    'accepting: loop {
        while registry.len() >= connections_max {
            let evicted = registry.evict_oldest_idle();
            let now = tokio::time::Instant::now();
            if last_saturated_log.is_none_or(|at| now.duration_since(at) >= SATURATED_LOG_EVERY) {
                last_saturated_log = Some(now);
                tracing::warn!(
                    connections_max,
                    "connection limit reached: {}",
                    if evicted {
                        "closing the oldest idle connections to make room"
                    } else {
                        "every connection is busy; new ones wait in the listen backlog"
                    }
                );
            }
            let closed = registry.closed.notified();
            tokio::select! {
                biased;
                _ = shutdown.wait_for(|stop| *stop) => break 'accepting,
                _ = closed => {}
                _ = tokio::time::sleep(SATURATED_RECHECK) => {}
            }
        }
        let (io, peer) = tokio::select! {
            biased;
            _ = shutdown.wait_for(|stop| *stop) => break,
            accepted = listener.accept() => accepted,
        };
        let activity = Activity::new(tokio::time::Instant::now());
        let registered = registry.add(activity.clone());
        let io = WatchedIo {
            inner: io,
            activity: activity.clone(),
        };
        let service = ConnectionService {
            inner: service.clone(),
            activity: activity.clone(),
            peer,
            body_read_timeout: limits.body_read_timeout,
        };
        let shutdown = shutdown.clone();
        // A task per kind of connection: one future for both would be the size of the
        // TLS one (the handshake's state), and a task's future is copied in whole when
        // it is spawned and again when it ends.
        match tls.as_ref().map(|source| source()) {
            None => {
                tokio::spawn(async move {
                    let _registered = registered;
                    drive(io, service, activity, limits, shutdown, peer).await
                });
            }
            Some(acceptor) => {
                tokio::spawn(async move {
                    let _registered = registered;
                    // The handshake is part of the first head's time.
                    match tokio::time::timeout(limits.header_read_timeout, acceptor.accept(io))
                        .await
                    {
                        Ok(Ok(stream)) => {
                            drive(stream, service, activity, limits, shutdown, peer).await
                        }
                        Ok(Err(error)) => {
                            tracing::debug!(%peer, %error, "TLS handshake failed");
                        }
                        Err(_) => tracing::debug!(%peer, "TLS handshake timed out"),
                    }
                });
            }
        }
    }
    // Stop accepting, let what is in flight finish.
    drop(listener);
    loop {
        let closed = registry.closed.notified();
        if registry.len() == 0 {
            return Ok(());
        }
        tokio::select! {
            biased;
            _ = closed => {}
            _ = tokio::time::sleep(SATURATED_RECHECK) => {}
        }
    }
}

/// Serves HTTP/1.1 on one connection until it ends, its watchdog closes it, or the
/// daemon shuts down (then gracefully: the request in flight is answered first).
async fn drive<I, S>(
    io: I,
    service: ConnectionService<S>,
    activity: Arc<Activity>,
    limits: ConnectionLimits,
    mut shutdown: watch::Receiver<bool>,
    peer: SocketAddr,
) where
    I: AsyncRead + AsyncWrite + Unpin + Send + 'static,
    S: EdgeService,
{
    // On the heap: the connection is the bulk of this future, which would otherwise be
    // copied whole into its task and out again.
    let mut connection = Box::pin(
        hyper::server::conn::http1::Builder::new()
            .keep_alive(true)
            .max_buf_size(HEAD_BYTES_MAX)
            .serve_connection(hyper_util::rt::TokioIo::new(io), service),
    );
    let horizon = watchdog_horizon(&limits);
    let check = tokio::time::sleep_until(next_check(&activity, &limits, horizon));
    tokio::pin!(check);
    let mut stopping = false;
    loop {
        let evicted = activity.wake.notified();
        tokio::select! {
            biased;
            served = connection.as_mut() => {
                if let Err(error) = served {
                    tracing::debug!(%peer, %error, "connection ended with an error");
                }
                return;
            }
            _ = shutdown.wait_for(|stop| *stop), if !stopping => {
                stopping = true;
                connection.as_mut().graceful_shutdown();
            }
            _ = evicted => {
                if expired(&activity, &limits, peer) {
                    return;
                }
            }
            _ = check.as_mut() => {
                if expired(&activity, &limits, peer) {
                    return;
                }
                check.as_mut().reset(next_check(&activity, &limits, horizon));
            }
        }
    }
}

/// How far ahead the watchdog's timer is ever set: the shortest of the phase bounds, so
/// no deadline an event creates can fall before it (see [`Activity`]).
fn watchdog_horizon(limits: &ConnectionLimits) -> Duration {
    limits
        .header_read_timeout
        .min(limits.idle_timeout)
        .min(limits.send_stall_timeout)
        .max(Duration::from_millis(1))
}

/// When the watchdog looks next: the connection's deadline, or sooner (`horizon` from
/// now) so that a deadline created meanwhile is never missed.
fn next_check(activity: &Activity, limits: &ConnectionLimits, horizon: Duration) -> Instant {
    let latest = tokio::time::Instant::now() + horizon;
    match activity.deadline(limits) {
        Some((at, _)) => at.min(latest),
        None => latest,
    }
}

/// Whether the connection's deadline has passed (logged once, when it has).
fn expired(activity: &Activity, limits: &ConnectionLimits, peer: SocketAddr) -> bool {
    match activity.deadline(limits) {
        Some((at, why)) if at <= tokio::time::Instant::now() => {
            tracing::debug!(%peer, reason = ?why, "closing connection");
            true
        }
        _ => false,
    }
}
