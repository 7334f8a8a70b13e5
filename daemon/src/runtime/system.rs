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
