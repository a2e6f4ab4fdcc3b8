//! The client side: TCP, then TLS presenting our certificate and checking
//! the server's role; as a connector for tonic channels too.

use std::io;
use std::sync::Arc;

use hyper_util::rt::TokioIo;
use rustls::pki_types::ServerName;
use rustls::ClientConfig;
use tokio::net::TcpStream;
use tokio_rustls::client::TlsStream;

use crate::socket::{socket, Socket};

/// Connects to `addr` (`host:port`).
pub async fn connect(config: Arc<ClientConfig>, addr: &str) -> io::Result<TlsStream<Socket>> {
    let tcp = socket(TcpStream::connect(addr).await?);
    // The verifier checks the authority and the role, not this name; it
    // only has to be a valid one.
    let host = addr.rsplit_once(':').map_or(addr, |(host, _)| host).trim_start_matches('[').trim_end_matches(']');
    let name = ServerName::try_from(host.to_string())
        .map_err(|e| io::Error::new(io::ErrorKind::InvalidInput, format!("{host}: {e}")))?;
    tokio_rustls::TlsConnector::from(config).connect(name, tcp).await
}

/// A connector for `tonic::transport::Endpoint::connect_with_connector`:
/// the endpoint's URI is `http://host:port`, and TLS happens here.
pub fn grpc_connector(
    config: Arc<ClientConfig>,
) -> impl tower::Service<http::Uri, Response = TokioIo<TlsStream<Socket>>, Error = io::Error, Future = impl Send + 'static>
       + Clone
       + Send
       + 'static {
    tower::service_fn(move |uri: http::Uri| {
        let config = config.clone();
        async move {
            let authority = uri
                .authority()
                .ok_or_else(|| io::Error::new(io::ErrorKind::InvalidInput, format!("{uri} has no host:port")))?;
            Ok(TokioIo::new(connect(config, authority.as_str()).await?))
        }
    })
}
