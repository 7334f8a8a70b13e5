//! The tokio edge of the PXE services: binds the sockets (errors name the config key),
//! runs one task per DHCP port, one for TFTP requests and one per transfer (each on its
//! own socket, RFC 1350's TID), reads boot files safely, and counts what it served. Every
//! decision is made by the pure modules; this file only moves bytes and applies limits.

use std::net::{Ipv4Addr, SocketAddr};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::io::AsyncReadExt;
use tokio::net::UdpSocket;
use tokio::sync::Semaphore;
use tokio::task::JoinHandle;
use tokio::time::Instant;

use crate::config::PxeConfig;
use crate::dhcp::{self, Destination, Port, ProxyDhcp};
use crate::limit::{LogDecision, LogLimiter, RateLimiter};
use crate::tftp::{self, ErrorCode, Step, Transfer};

/// Bad-packet warnings let through per window, per service.
const WARNINGS_PER_WINDOW: u32 = 10;
const WARNING_WINDOW: Duration = Duration::from_secs(60);
/// Receive buffer: one byte over the largest datagram accepted, so a larger one is seen
/// as too large rather than silently truncated into something that parses.
const DHCP_BUFFER_BYTES: usize = dhcp::PACKET_BYTES_MAX + 1;
const TFTP_BUFFER_BYTES: usize = tftp::REQUEST_BYTES_MAX + 1;
/// After a socket error, wait this long before reading again (no busy loop on a broken
/// socket).
const SOCKET_ERROR_PAUSE: Duration = Duration::from_millis(50);

#[derive(Debug, thiserror::Error)]
pub enum PxeError {
    #[error("pxe.{key} {addr}: cannot bind: {source}")]
    Bind {
        key: &'static str,
        addr: SocketAddr,
        source: std::io::Error,
    },
    #[error("pxe.interface {interface:?}: cannot bind the DHCP socket to it: {source}")]
    Interface {
        interface: String,
        source: std::io::Error,
    },
    #[error("pxe.tftp_root {path}: {source}")]
    Root {
        path: PathBuf,
        source: std::io::Error,
    },
}

/// Counters for what the services did, for logs, tests and the boot-storm table.
#[derive(Debug, Default)]
pub struct PxeStats {
    pub dhcp_replies: AtomicU64,
    pub dhcp_dropped: AtomicU64,
    pub dhcp_rate_limited: AtomicU64,
    pub tftp_requests: AtomicU64,
    pub tftp_refused: AtomicU64,
    pub tftp_transfers_done: AtomicU64,
    pub tftp_transfers_failed: AtomicU64,
    pub tftp_bytes_sent: AtomicU64,
}

impl PxeStats {
    pub fn get(counter: &AtomicU64) -> u64 {
        counter.load(Ordering::Relaxed)
    }
    fn add(counter: &AtomicU64, value: u64) {
        counter.fetch_add(value, Ordering::Relaxed);
    }
}

/// The running services. Dropping it stops them.
pub struct PxeServices {
    pub dhcp_addr: SocketAddr,
    pub pxe_addr: SocketAddr,
    pub tftp_addr: SocketAddr,
    pub stats: Arc<PxeStats>,
    tasks: Vec<JoinHandle<()>>,
}

impl Drop for PxeServices {
    fn drop(&mut self) {
        for task in &self.tasks {
            task.abort();
        }
    }
}

fn udp_socket(
    key: &'static str,
    addr: SocketAddr,
    interface: Option<&str>,
) -> Result<UdpSocket, PxeError> {
    use socket2::{Domain, Protocol, Socket, Type};
    let bind_error = |source| PxeError::Bind { key, addr, source };
    let socket = Socket::new(Domain::IPV4, Type::DGRAM, Some(Protocol::UDP)).map_err(bind_error)?;
    // Port 67 is shared with any DHCP server on this host; broadcasts reach both.
    socket.set_reuse_address(true).map_err(bind_error)?;
    socket.set_broadcast(true).map_err(bind_error)?;
    if let Some(interface) = interface {
        socket
            .bind_device(Some(interface.as_bytes()))
            .map_err(|source| PxeError::Interface {
                interface: interface.to_string(),
                source,
            })?;
    }
    socket.set_nonblocking(true).map_err(bind_error)?;
    socket.bind(&addr.into()).map_err(bind_error)?;
    UdpSocket::from_std(socket.into()).map_err(bind_error)
}

/// Binds every socket (so a bad address fails start-up, not the first boot) and spawns
/// the services.
pub async fn start(config: PxeConfig) -> Result<PxeServices, PxeError> {
    let root = std::fs::canonicalize(&config.tftp_root).map_err(|source| PxeError::Root {
        path: config.tftp_root.clone(),
        source,
    })?;
    let interface = config.interface.as_deref();
    let dhcp_socket = Arc::new(udp_socket("dhcp_listen", config.dhcp_listen, interface)?);
    let pxe_socket = Arc::new(udp_socket("pxe_listen", config.pxe_listen, interface)?);
    let tftp_socket = udp_socket("tftp_listen", config.tftp_listen, None)?;
    let local = |socket: &UdpSocket, key, addr| {
        socket
            .local_addr()
            .map_err(|source| PxeError::Bind { key, addr, source })
    };
    let dhcp_addr = local(&dhcp_socket, "dhcp_listen", config.dhcp_listen)?;
    let pxe_addr = local(&pxe_socket, "pxe_listen", config.pxe_listen)?;
    let tftp_addr = local(&tftp_socket, "tftp_listen", config.tftp_listen)?;
    if !config.dhcp_listen.ip().is_unspecified() {
        // Bound to a unicast address, the socket never sees a broadcast DISCOVER: only
        // relayed (unicast) requests and tests reach it.
        tracing::warn!(
            dhcp = %config.dhcp_listen,
            "pxe.dhcp_listen is not 0.0.0.0: broadcast DHCPDISCOVERs from this L2 will not be heard"
        );
    }
    let stats = Arc::new(PxeStats::default());
    let proxy = Arc::new(ProxyDhcp {
        targets: config.targets.clone(),
        server: config.server_address,
    });
    let origin = Instant::now();
    // One limiter for both DHCP ports: a client is the same client on either.
    let dhcp_limiter = Arc::new(Mutex::new(RateLimiter::new(
        config.client_requests_per_s,
        config.client_burst,
        config.clients_tracked_max,
    )));
    let mut tasks = Vec::new();
    for (socket, port) in [(dhcp_socket, Port::Dhcp), (pxe_socket, Port::PxeBoot)] {
        tasks.push(tokio::spawn(dhcp_loop(
            socket,
            port,
            proxy.clone(),
            dhcp_limiter.clone(),
            stats.clone(),
            origin,
        )));
    }
    tracing::info!(
        dhcp = %dhcp_addr, pxe = %pxe_addr, tftp = %tftp_addr, root = %root.display(),
        server = %config.server_address, interface = ?config.interface,
        bios = %config.targets.bios_file, uefi = %config.targets.uefi_file,
        ipxe = %config.targets.ipxe_url, http_boot = %config.targets.http_boot_url,
        "PXE services: proxyDHCP and TFTP serving"
    );
    tasks.push(tokio::spawn(tftp_loop(
        tftp_socket,
        Arc::new(TftpShared {
            root,
            config,
            stats: stats.clone(),
            origin,
            cache: Mutex::new(FileCache::default()),
        }),
    )));
    Ok(PxeServices {
        dhcp_addr,
        pxe_addr,
        tftp_addr,
        stats,
        tasks,
    })
}

fn warn_limited(
    logs: &mut LogLimiter,
    origin: Instant,
    service: &str,
    from: SocketAddr,
    what: &dyn std::fmt::Display,
) {
    if let LogDecision::Log { suppressed_before } = logs.check(origin.elapsed()) {
        tracing::warn!(%from, suppressed_before, "{service}: dropped a packet: {what}");
    }
}

/// The DHCP key of a datagram: its chaddr when it has one (clients without an address all
/// send from 0.0.0.0:68), else its source address.
fn dhcp_client_key(packet: &[u8], from: SocketAddr) -> Vec<u8> {
    match packet.get(28..44) {
        Some(chaddr) => chaddr.to_vec(),
        None => from.to_string().into_bytes(),
    }
}

async fn dhcp_loop(
    socket: Arc<UdpSocket>,
    port: Port,
    proxy: Arc<ProxyDhcp>,
    limiter: Arc<Mutex<RateLimiter<Vec<u8>>>>,
    stats: Arc<PxeStats>,
    origin: Instant,
) {
    let service = match port {
        Port::Dhcp => "proxyDHCP",
        Port::PxeBoot => "proxyDHCP (4011)",
    };
    let mut logs = LogLimiter::new(WARNING_WINDOW, WARNINGS_PER_WINDOW);
    let mut buffer = vec![0u8; DHCP_BUFFER_BYTES];
    loop {
        let (len, from) = match socket.recv_from(&mut buffer).await {
            Ok(received) => received,
            Err(error) => {
                warn_limited(
                    &mut logs,
                    origin,
                    service,
                    SocketAddr::from(([0, 0, 0, 0], 0)),
                    &error,
                );
                tokio::time::sleep(SOCKET_ERROR_PAUSE).await;
                continue;
            }
        };
        let packet = &buffer[..len];
        let SocketAddr::V4(from_v4) = from else {
            continue;
        };
        let allowed = limiter
            .lock()
            .map(|mut limiter| limiter.allow(&dhcp_client_key(packet, from), origin.elapsed()))
            .unwrap_or(true);
        if !allowed {
            PxeStats::add(&stats.dhcp_rate_limited, 1);
            warn_limited(
                &mut logs,
                origin,
                service,
                from,
                &"over pxe.client_requests_per_s / client_burst",
            );
            continue;
        }
        // The parsers are not ours: a panic inside one must cost one packet, not the
        // service (the task would end and every later client go unanswered).
        let handled = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
            proxy.handle(packet, from_v4, port)
        }))
        .unwrap_or_else(|_| Err(dhcp::Dropped::Malformed("the decoder panicked".into())));
        match handled {
            Ok(reply) => {
                let to = match reply.to {
                    Destination::Broadcast => SocketAddr::from((Ipv4Addr::BROADCAST, 68)),
                    Destination::Unicast(addr) => SocketAddr::V4(addr),
                };
                match socket.send_to(&reply.bytes, to).await {
                    Ok(_) => {
                        PxeStats::add(&stats.dhcp_replies, 1);
                        tracing::info!(
                            client = %reply.client, %to, answer = ?reply.answer,
                            "{service}: {:?} sent", reply.message_type
                        );
                    }
                    Err(error) => warn_limited(
                        &mut logs,
                        origin,
                        service,
                        to,
                        &format!("sending the reply: {error}"),
                    ),
                }
            }
            Err(dropped) => {
                PxeStats::add(&stats.dhcp_dropped, 1);
                if dropped.is_bad_packet() {
                    warn_limited(&mut logs, origin, service, from, &dropped);
                } else {
                    tracing::debug!(%from, "{service}: not answered: {dropped}");
                }
            }
        }
    }
}

struct TftpShared {
    root: PathBuf,
    config: PxeConfig,
    stats: Arc<PxeStats>,
    origin: Instant,
    cache: Mutex<FileCache>,
}

/// Files cached at once; a boot network serves two or three.
const FILE_CACHE_ENTRIES_MAX: usize = 16;

/// Boot files read once and shared by every transfer of them: a boot storm fetches the
/// same few files thousands of times, and `tftp_transfers_max` copies of a large file
/// would otherwise each sit in memory. An entry is used only while the file's size and
/// modification time are unchanged, so a replaced binary is read again.
#[derive(Default)]
struct FileCache {
    entries: std::collections::BTreeMap<PathBuf, CachedFile>,
}

struct CachedFile {
    len: u64,
    modified: Option<std::time::SystemTime>,
    data: Arc<[u8]>,
}

async fn tftp_loop(socket: UdpSocket, shared: Arc<TftpShared>) {
    let transfers = Arc::new(Semaphore::new(shared.config.tftp_transfers_max));
    let mut limiter = RateLimiter::new(
        shared.config.client_requests_per_s,
        shared.config.client_burst,
        shared.config.clients_tracked_max,
    );
    let mut logs = LogLimiter::new(WARNING_WINDOW, WARNINGS_PER_WINDOW);
    let mut buffer = vec![0u8; TFTP_BUFFER_BYTES];
    loop {
        let (len, from) = match socket.recv_from(&mut buffer).await {
            Ok(received) => received,
            Err(error) => {
                warn_limited(
                    &mut logs,
                    shared.origin,
                    "tftp",
                    SocketAddr::from(([0, 0, 0, 0], 0)),
                    &error,
                );
                tokio::time::sleep(SOCKET_ERROR_PAUSE).await;
                continue;
            }
        };
        let packet = &buffer[..len];
        if !limiter.allow(&from.ip(), shared.origin.elapsed()) {
            PxeStats::add(&shared.stats.tftp_refused, 1);
            warn_limited(
                &mut logs,
                shared.origin,
                "tftp",
                from,
                &"over pxe.client_requests_per_s / client_burst",
            );
            continue;
        }
        PxeStats::add(&shared.stats.tftp_requests, 1);
        let request = match tftp::parse_request(packet) {
            Ok(request) => request,
            Err(error) => {
                PxeStats::add(&shared.stats.tftp_refused, 1);
                warn_limited(&mut logs, shared.origin, "tftp", from, &error);
                // Answer only what looks like a request: garbage gets nothing, so this
                // port cannot be used to reflect traffic at somebody else.
                if matches!(tftp::opcode(packet), Some(tftp::OP_RRQ | tftp::OP_WRQ)) {
                    let _ = socket.send_to(&error.packet(), from).await;
                }
                continue;
            }
        };
        let Ok(permit) = transfers.clone().try_acquire_owned() else {
            PxeStats::add(&shared.stats.tftp_refused, 1);
            warn_limited(
                &mut logs,
                shared.origin,
                "tftp",
                from,
                &format!(
                    "{} transfers already running (pxe.tftp_transfers_max)",
                    shared.config.tftp_transfers_max
                ),
            );
            let _ = socket
                .send_to(
                    &tftp::error_packet(ErrorCode::NotDefined, "server busy, retry"),
                    from,
                )
                .await;
            continue;
        };
        let shared = shared.clone();
        tokio::spawn(async move {
            let _permit = permit;
            let started = Instant::now();
            let file = request.filename.clone();
            match transfer(&shared, &request, from).await {
                Ok(bytes) => {
                    PxeStats::add(&shared.stats.tftp_transfers_done, 1);
                    PxeStats::add(&shared.stats.tftp_bytes_sent, bytes as u64);
                    tracing::info!(%from, file, bytes, ms = started.elapsed().as_millis() as u64, "tftp: sent");
                }
                Err(reason) => {
                    PxeStats::add(&shared.stats.tftp_transfers_failed, 1);
                    tracing::info!(%from, file, "tftp: transfer ended: {reason}");
                }
            }
        });
    }
}

/// Reads `path` if it is a regular file under `root` (after resolving links) no larger
/// than `bytes_max`, from the cache when it has not changed.
async fn read_boot_file(
    root: &Path,
    cache: &Mutex<FileCache>,
    path: &Path,
    bytes_max: u64,
) -> Result<Arc<[u8]>, String> {
    let real = tokio::fs::canonicalize(path)
        .await
        .map_err(|error| format!("{}: {error}", path.display()))?;
    if !real.starts_with(root) {
        return Err(format!("{} resolves outside the TFTP root", path.display()));
    }
    let file = tokio::fs::File::open(&real)
        .await
        .map_err(|error| format!("{}: {error}", real.display()))?;
    let metadata = file
        .metadata()
        .await
        .map_err(|error| format!("{}: {error}", real.display()))?;
    if !metadata.is_file() {
        return Err(format!("{} is not a regular file", real.display()));
    }
    if metadata.len() > bytes_max {
        return Err(format!(
            "{} is {} bytes, over pxe.tftp_file_bytes_max {bytes_max}",
            real.display(),
            metadata.len()
        ));
    }
    let modified = metadata.modified().ok();
    if let Ok(cache) = cache.lock() {
        if let Some(hit) = cache.entries.get(&real) {
            if hit.len == metadata.len() && hit.modified == modified {
                return Ok(hit.data.clone());
            }
        }
    }
    let mut data = Vec::with_capacity(metadata.len() as usize);
    // take(): a file that grows after the size check is still bounded.
    file.take(bytes_max + 1)
        .read_to_end(&mut data)
        .await
        .map_err(|error| format!("{}: {error}", real.display()))?;
    if data.len() as u64 > bytes_max {
        return Err(format!(
            "{} grew over pxe.tftp_file_bytes_max",
            real.display()
        ));
    }
    let data: Arc<[u8]> = data.into();
    if let Ok(mut cache) = cache.lock() {
        if cache.entries.len() >= FILE_CACHE_ENTRIES_MAX && !cache.entries.contains_key(&real) {
            cache.entries.pop_first();
        }
        cache.entries.insert(
            real,
            CachedFile {
                len: data.len() as u64,
                modified,
                data: data.clone(),
            },
        );
    }
    Ok(data)
}

/// One transfer on its own socket. Returns the bytes sent, or why it ended early.
async fn transfer(
    shared: &TftpShared,
    request: &tftp::ReadRequest,
    client: SocketAddr,
) -> Result<usize, String> {
    let local_ip = match shared.config.tftp_listen.ip() {
        ip if ip.is_unspecified() => std::net::IpAddr::V4(shared.config.server_address),
        ip => ip,
    };
    let socket = UdpSocket::bind(SocketAddr::new(local_ip, 0))
        .await
        .map_err(|error| format!("binding a transfer socket on {local_ip}: {error}"))?;
    let data = match tftp::resolve_path(&shared.root, &request.filename) {
        Ok(path) => {
            read_boot_file(
                &shared.root,
                &shared.cache,
                &path,
                shared.config.tftp_file_bytes_max,
            )
            .await
        }
        Err(error) => Err(error.to_string()),
    };
    let data = match data {
        Ok(data) => data,
        Err(reason) => {
            let _ = socket
                .send_to(
                    &tftp::error_packet(ErrorCode::FileNotFound, "file not found"),
                    client,
                )
                .await;
            return Err(reason);
        }
    };
    let now = || shared.origin.elapsed();
    let (mut transfer, first) = Transfer::start(data, request, &shared.config.tftp, now());
    socket
        .send_to(&first, client)
        .await
        .map_err(|error| format!("sending: {error}"))?;
    let mut buffer = vec![0u8; 1024];
    loop {
        let deadline = shared.origin + transfer.next_deadline();
        let step = tokio::select! {
            biased;
            received = socket.recv_from(&mut buffer) => {
                let (len, from) = received.map_err(|error| format!("receiving: {error}"))?;
                if from != client {
                    // RFC 1350: a packet from another TID gets an error, the transfer goes on.
                    let _ = socket
                        .send_to(&tftp::error_packet(ErrorCode::UnknownTid, "unknown transfer ID"), from)
                        .await;
                    continue;
                }
                transfer.on_datagram(&buffer[..len], now())
            }
            _ = tokio::time::sleep_until(deadline) => transfer.on_timer(now()),
        };
        match step {
            Step::Send(packet) => {
                socket
                    .send_to(&packet, client)
                    .await
                    .map_err(|error| format!("sending: {error}"))?;
            }
            Step::Wait => {}
            Step::Finished => return Ok(transfer.bytes()),
            Step::Abort(reason, packet) => {
                if let Some(packet) = packet {
                    let _ = socket.send_to(&packet, client).await;
                }
                return Err(reason);
            }
        }
    }
}
