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
