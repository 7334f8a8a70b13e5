//! turmoil's sockets behind the seams the real code is written against: the daemon's
//! listener (axum's `Listener`) and the agent's `Connector`.

use bearman_agent::Connector;

/// Connects through turmoil's simulated network.
#[derive(Clone, Copy, Debug, Default)]
pub struct TurmoilConnector;

impl Connector for TurmoilConnector {
    type Stream = turmoil::net::TcpStream;

    async fn connect(&self, authority: &str) -> std::io::Result<Self::Stream> {
        turmoil::net::TcpStream::connect(authority).await
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
