//! Production connector: plain TCP from the operating system.

use crate::client::Connector;

#[derive(Clone, Copy, Debug, Default)]
pub struct TcpConnector;

impl Connector for TcpConnector {
    type Stream = tokio::net::TcpStream;

    async fn connect(&self, authority: &str) -> std::io::Result<Self::Stream> {
        let stream = tokio::net::TcpStream::connect(authority).await?;
        stream.set_nodelay(true)?;
        Ok(stream)
    }
}
