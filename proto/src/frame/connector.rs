//! How a process reaches chunk servers: in plaintext, or over mutual TLS
//! presenting its own certificate and accepting only chunk servers'.

use std::io;
use std::sync::Arc;
use std::time::Duration;

use ballast_tls::rustls::ClientConfig;
use ballast_tls::{Role, TlsDir, TlsError};

use super::client::{ClientError, DataClient};

/// A server that does not finish the TLS handshake in this time is taken
/// for unreachable (a stopped process still completes the TCP handshake).
const HANDSHAKE_LIMIT: Duration = Duration::from_secs(10);

/// Opens [`DataClient`] connections. Unix sockets are local and stay
/// plaintext; TCP connections use TLS when the connector has a certificate.
#[derive(Clone, Default)]
pub struct Connector {
    tls: Option<Arc<ClientConfig>>,
}

impl Connector {
    /// Plaintext TCP: for clusters run `--insecure`.
    pub fn plaintext() -> Connector {
        Connector { tls: None }
    }

    /// Mutual TLS with the certificate in `dir`; the server must prove it
    /// is a chunk server of the same authority.
    pub fn tls(dir: &TlsDir) -> Result<Connector, TlsError> {
        Ok(Connector { tls: Some(ballast_tls::client_config(dir, &[Role::Storage])?) })
    }

    pub fn is_tls(&self) -> bool {
        self.tls.is_some()
    }

    /// Connects to `endpoint`: `unix:/path/to/socket` or `host:port`.
    pub async fn connect(&self, endpoint: &str) -> Result<DataClient, ClientError> {
        match (endpoint.strip_prefix("unix:"), &self.tls) {
            (Some(path), _) => DataClient::connect_unix(path).await,
            (None, None) => DataClient::connect_tcp(endpoint).await,
            (None, Some(config)) => {
                let handshake = ballast_tls::connect::connect(config.clone(), endpoint);
                let stream = tokio::time::timeout(HANDSHAKE_LIMIT, handshake)
                    .await
                    .map_err(|_| {
                        let reason = format!("no TLS handshake with {endpoint} within {HANDSHAKE_LIMIT:?}");
                        ClientError::Connect(io::Error::new(io::ErrorKind::TimedOut, reason))
                    })?
                    .map_err(ClientError::Connect)?;
                Ok(DataClient::from_stream(stream))
            }
        }
    }

    /// Connects to `endpoint` within `limit`, and from then on fails any
    /// request that gets no answer (for a stream or listing: no next frame)
    /// within `limit`, closing the connection. A server that stops
    /// answering (its process stopped, its disk hung) accepts connections
    /// and never replies: this bounds how long it holds its caller up. For
    /// the metadata service's calls; the volume engine bounds its own.
    pub async fn connect_within(&self, endpoint: &str, limit: Duration) -> Result<DataClient, ClientError> {
        let connected = tokio::time::timeout(limit, self.connect(endpoint)).await.map_err(|_| {
            ClientError::Connect(io::Error::new(io::ErrorKind::TimedOut, format!("no connection within {limit:?}")))
        })?;
        Ok(connected?.answering_within(limit))
    }
}
