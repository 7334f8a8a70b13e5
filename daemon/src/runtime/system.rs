//! Production adapters: the operating system's clock and TCP sockets.

use std::time::{SystemTime, UNIX_EPOCH};

use super::Clock;
use crate::core::model::TimestampMs;

pub struct SystemClock;

impl Clock for SystemClock {
    fn now_ms(&self) -> TimestampMs {
        SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map(|d| d.as_millis() as TimestampMs)
            .unwrap_or(0)
    }
}

/// Binds the daemon's TCP listener.
pub async fn bind_tcp(address: &str) -> std::io::Result<tokio::net::TcpListener> {
    tokio::net::TcpListener::bind(address).await
}

/// Raises this process's soft open-file limit (RLIMIT_NOFILE) to its hard limit, so the
/// connection cap, not the default 1,024, decides how many clients are held. Returns
/// the soft limit in force afterwards.
pub fn raise_open_files_limit() -> std::io::Result<u64> {
    let mut limit = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: getrlimit writes one rlimit through a valid pointer.
    if unsafe { libc::getrlimit(libc::RLIMIT_NOFILE, &mut limit) } != 0 {
        return Err(std::io::Error::last_os_error());
    }
    if limit.rlim_cur < limit.rlim_max {
        let raised = libc::rlimit {
            rlim_cur: limit.rlim_max,
            rlim_max: limit.rlim_max,
        };
        // SAFETY: setrlimit reads one rlimit through a valid pointer.
        if unsafe { libc::setrlimit(libc::RLIMIT_NOFILE, &raised) } == 0 {
            limit = raised;
        }
    }
    Ok(limit.rlim_cur)
}

/// Opens a TCP connection (the CLI's client side).
pub async fn connect_tcp(authority: &str) -> std::io::Result<tokio::net::TcpStream> {
    let stream = tokio::net::TcpStream::connect(authority).await?;
    stream.set_nodelay(true)?;
    Ok(stream)
}

/// Opens a unix-domain stream (the QMP BMC driver's socket to QEMU).
pub async fn connect_unix(path: &std::path::Path) -> std::io::Result<tokio::net::UnixStream> {
    tokio::net::UnixStream::connect(path).await
}

/// Tells systemd the service's state (`READY=1`, `STOPPING=1`) when it runs the daemon as
/// `Type=notify`: a datagram to the socket in `NOTIFY_SOCKET`. Returns whether a message
/// was sent; `Ok(false)` when not started by systemd (no `NOTIFY_SOCKET`). The protocol
/// is one datagram, so no crate is needed for it.
pub fn notify_systemd(state: &str) -> std::io::Result<bool> {
    match std::env::var_os("NOTIFY_SOCKET") {
        Some(path) if !path.is_empty() => {
            notify_socket(&path, state)?;
            Ok(true)
        }
        _ => {
            tracing::debug!(
                state,
                "NOTIFY_SOCKET not set: not started by systemd as Type=notify"
            );
            Ok(false)
        }
    }
}

/// Sends `state` to the sd_notify socket at `path`: a file system path, or an abstract
/// socket name when it starts with `@` (systemd's notation for a leading NUL byte).
pub fn notify_socket(path: &std::ffi::OsStr, state: &str) -> std::io::Result<()> {
    use std::os::unix::ffi::OsStrExt as _;
    use std::os::unix::net::{SocketAddr, UnixDatagram};
    let bytes = path.as_bytes();
    let address = match bytes.strip_prefix(b"@") {
        Some(name) => {
            use std::os::linux::net::SocketAddrExt as _;
            SocketAddr::from_abstract_name(name)?
        }
        None => SocketAddr::from_pathname(std::path::Path::new(path))?,
    };
    let socket = UnixDatagram::unbound()?;
    let sent = socket.send_to_addr(state.as_bytes(), &address)?;
    if sent != state.len() {
        return Err(std::io::Error::other(format!(
            "sd_notify: sent {sent} of {} bytes",
            state.len()
        )));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use std::os::unix::net::UnixDatagram;

    use super::notify_socket;

    #[test]
    fn notify_reaches_a_path_socket() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("notify");
        let receiver = UnixDatagram::bind(&path).unwrap();
        notify_socket(path.as_os_str(), "READY=1").unwrap();
        let mut buffer = [0u8; 64];
        let n = receiver.recv(&mut buffer).unwrap();
        assert_eq!(&buffer[..n], b"READY=1");
    }

    #[test]
    fn notify_reaches_an_abstract_socket() {
        use std::os::linux::net::SocketAddrExt as _;
        let name = format!("bearman-notify-test-{}", std::process::id());
        let address = std::os::unix::net::SocketAddr::from_abstract_name(name.as_bytes()).unwrap();
        let receiver = UnixDatagram::bind_addr(&address).unwrap();
        notify_socket(std::ffi::OsStr::new(&format!("@{name}")), "STOPPING=1").unwrap();
        let mut buffer = [0u8; 64];
        let n = receiver.recv(&mut buffer).unwrap();
        assert_eq!(&buffer[..n], b"STOPPING=1");
    }

    #[test]
    fn notify_to_a_missing_socket_is_an_error() {
        let dir = tempfile::tempdir().unwrap();
        assert!(notify_socket(dir.path().join("absent").as_os_str(), "READY=1").is_err());
    }
}
