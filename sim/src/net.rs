//! turmoil's sockets behind the seams the real code is written against: the daemon's
//! listener (axum's `Listener`) and the agent's `Connector`, plus [`TapConnector`], which
//! counts a node's requests for the world's statistics the way a network tap would.

use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, OnceLock};
use std::task::{Context, Poll};

use bearman_agent::Connector;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};

use crate::fleet::{lock, SharedWorld};

/// Connects through turmoil's simulated network.
#[derive(Clone, Copy, Debug, Default)]
pub struct TurmoilConnector;

impl Connector for TurmoilConnector {
    type Stream = turmoil::net::TcpStream;

    async fn connect(&self, authority: &str) -> std::io::Result<Self::Stream> {
        turmoil::net::TcpStream::connect(authority).await
    }
}

/// A node's connections, counted into the world's statistics from what crosses the wire:
/// each connection carries one request (the agent's client sends `Connection: close`),
/// which failed unless a `2xx` status line came back (refused or partitioned connects,
/// timeouts, cut connections and 4xx/5xx answers all fail). Heartbeats are counted apart
/// (`heartbeats_sent`, `heartbeats_failed`); every other request that fails, the
/// firmware's and the downloads included, counts in `requests_failed`. A connection that
/// fails before its request line is written is a heartbeat once this connector has seen
/// a `POST …/installed` succeed (stage 2 sends nothing but heartbeats after that).
///
/// In a clustered run the daemon's name stands for every replica, as a Kubernetes Service
/// or a DNS name with several addresses does: each connection goes to the next replica in
/// turn, and a refused one (crashed, or cut from this rack) to the one after.
#[derive(Clone)]
pub struct TapConnector {
    world: SharedWorld,
    installed: Arc<AtomicBool>,
    /// The hosts behind the daemon's name, and which one the next connection tries first.
    daemons: Arc<[String]>,
    next: Arc<AtomicUsize>,
    /// The address the last connection to a single daemon reached, under the authority
    /// it was asked for: names never move in the simulated DNS, and parsing and looking
    /// up the name again cost as much as the rest of the connect.
    resolved: Arc<OnceLock<(Box<str>, SocketAddr)>>,
}

impl TapConnector {
    /// A tap for one boot of node `index`.
    pub fn new(world: SharedWorld, index: u32) -> Self {
        let daemons: Arc<[String]> = lock(&world).daemons.clone().into();
        let first = index as usize % daemons.len().max(1);
        TapConnector {
            world,
            installed: Arc::new(AtomicBool::new(false)),
            daemons,
            next: Arc::new(AtomicUsize::new(first)),
            resolved: Arc::default(),
        }
    }

    /// Connects to `authority`; the daemon's name to one of its replicas.
    async fn connect_any(&self, authority: &str) -> std::io::Result<turmoil::net::TcpStream> {
        let port = match authority.split_once(':') {
            Some((host, port)) if host == crate::node::DAEMON_HOST && self.daemons.len() > 1 => {
                port
            }
            _ => {
                if let Some((_, address)) = self
                    .resolved
                    .get()
                    .filter(|(resolved, _)| **resolved == *authority)
                {
                    return turmoil::net::TcpStream::connect(*address).await;
                }
                let stream = turmoil::net::TcpStream::connect(authority).await?;
                if let Ok(address) = stream.peer_addr() {
                    let _ = self.resolved.set((authority.into(), address));
                }
                return Ok(stream);
            }
        };
        // Every connection takes the next replica in turn, so one that hangs (paused)
        // costs this request its timeout and not the ones after it.
        let first = self.next.fetch_add(1, Ordering::Relaxed);
        let mut last_error = None;
        for offset in 0..self.daemons.len() {
            let replica = format!(
                "{}:{port}",
                self.daemons[(first + offset) % self.daemons.len()]
            );
            match turmoil::net::TcpStream::connect(replica.as_str()).await {
                Ok(stream) => return Ok(stream),
                Err(error) => last_error = Some(error),
            }
        }
        Err(last_error.expect("at least one replica"))
    }

    fn record(&self, kind: Request, answered: bool) {
        let heartbeat = match kind {
            Request::Heartbeat => true,
            Request::Unknown => self.installed.load(Ordering::Relaxed),
            Request::Installed => {
                if answered {
                    self.installed.store(true, Ordering::Relaxed);
                }
                false
            }
            Request::Other => false,
        };
        if heartbeat {
            let mut world = lock(&self.world);
            world.heartbeats_sent += 1;
            if !answered {
                world.heartbeats_failed += 1;
            }
        } else if !answered {
            lock(&self.world).requests_failed += 1;
        }
    }
}

impl Connector for TapConnector {
    type Stream = TapStream;

    async fn connect(&self, authority: &str) -> std::io::Result<TapStream> {
        match self.connect_any(authority).await {
            Ok(inner) => Ok(TapStream {
                inner,
                tap: self.clone(),
                kind: Request::Unknown,
                status: [0; STATUS_BYTES],
                status_len: 0,
            }),
            Err(error) => {
                self.record(Request::Unknown, false);
                Err(error)
            }
        }
    }
}

/// What a tapped connection's request was, from its request line.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Request {
    Unknown,
    Heartbeat,
    Installed,
    Other,
}

/// `HTTP/1.1 200`: enough of the status line to tell success.
const STATUS_BYTES: usize = 12;

/// One tapped connection; counted when dropped.
pub struct TapStream {
    inner: turmoil::net::TcpStream,
    tap: TapConnector,
    kind: Request,
    status: [u8; STATUS_BYTES],
    status_len: usize,
}

impl TapStream {
    fn answered(&self) -> bool {
        self.status_len == STATUS_BYTES
            && self.status.starts_with(b"HTTP/1.")
            && self.status[9] == b'2'
    }
}

impl Drop for TapStream {
    fn drop(&mut self) {
        self.tap.record(self.kind, self.answered());
    }
}

impl AsyncWrite for TapStream {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<std::io::Result<usize>> {
        let this = self.get_mut();
        if this.kind == Request::Unknown {
            let line_end = buf
                .iter()
                .position(|byte| *byte == b'\r')
                .unwrap_or(buf.len());
            let line = &buf[..line_end];
            this.kind = if line.ends_with(b"/heartbeat HTTP/1.1") {
                Request::Heartbeat
            } else if line.ends_with(b"/installed HTTP/1.1") {
                Request::Installed
            } else {
                Request::Other
            };
        }
        Pin::new(&mut this.inner).poll_write(cx, buf)
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.get_mut().inner).poll_flush(cx)
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.get_mut().inner).poll_shutdown(cx)
    }
}

impl AsyncRead for TapStream {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<std::io::Result<()>> {
        let this = self.get_mut();
        let before = buf.filled().len();
        let polled = Pin::new(&mut this.inner).poll_read(cx, buf);
        if this.status_len < STATUS_BYTES {
            let fresh = &buf.filled()[before..];
            let take = fresh.len().min(STATUS_BYTES - this.status_len);
            this.status[this.status_len..this.status_len + take].copy_from_slice(&fresh[..take]);
            this.status_len += take;
        }
        polled
    }
}

/// The daemon's listening socket inside the simulation.
pub struct TurmoilListener(pub turmoil::net::TcpListener);

impl axum::serve::Listener for TurmoilListener {
    type Io = turmoil::net::TcpStream;
    type Addr = std::net::SocketAddr;

    async fn accept(&mut self) -> (Self::Io, Self::Addr) {
        loop {
            match self.0.accept().await {
                Ok(accepted) => return accepted,
                // turmoil reports errors for connections torn down by partitions; the
                // next accept is unaffected.
                Err(_) => tokio::task::yield_now().await,
            }
        }
    }

    fn local_addr(&self) -> std::io::Result<Self::Addr> {
        self.0.local_addr()
    }
}

/// Longest answer line the simulated BMC fabric and cloud send.
pub const LINE_BYTES_MAX: usize = 256;

/// One request line to `host:port` and its one answer line: the wire protocol of the
/// simulated BMC fabric and cloud (one exchange per connection).
pub async fn line_exchange(host: &str, port: u16, request: &str) -> std::io::Result<String> {
    use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader};
    let stream = turmoil::net::TcpStream::connect((host, port)).await?;
    let (read, mut write) = tokio::io::split(stream);
    write.write_all(format!("{request}\n").as_bytes()).await?;
    let mut line = String::new();
    BufReader::new(read)
        .take(LINE_BYTES_MAX as u64)
        .read_line(&mut line)
        .await?;
    Ok(line)
}
