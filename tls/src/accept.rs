//! The server side: TLS handshakes off the accept loop, each connection
//! handed on with the identity its certificate proved.

use std::io;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use rustls::ServerConfig;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::mpsc;
use tokio_rustls::server::TlsStream;

use crate::identity::Identity;
use crate::socket::{socket, Socket};

/// A peer that does not finish its handshake in this time is dropped.
const HANDSHAKE_LIMIT: Duration = Duration::from_secs(10);
/// Handshaken connections waiting for the server to take them.
const BACKLOG: usize = 64;

/// Who is on the other end of a connection.
#[derive(Clone, Debug)]
pub struct Peer {
    pub identity: Identity,
    pub addr: SocketAddr,
}

/// A mutual-TLS connection and the identity of its peer.
pub struct TlsConnection {
    stream: TlsStream<Socket>,
    peer: Peer,
}

impl TlsConnection {
    pub fn peer(&self) -> &Peer {
        &self.peer
    }
}

#[derive(Clone)]
pub struct Acceptor {
    inner: tokio_rustls::TlsAcceptor,
}

/// Why a connection was refused.
#[derive(Debug, thiserror::Error)]
pub enum RefusedConnection {
    #[error("no TLS handshake within {HANDSHAKE_LIMIT:?}")]
    Timeout,
    #[error("TLS handshake failed: {0}")]
    Handshake(io::Error),
    #[error("{0}")]
    Identity(crate::TlsError),
    #[error("{HANDSHAKES_IN_FLIGHT} handshakes already in flight")]
    Busy,
}

/// Handshakes a server runs at once. Each holds a descriptor for up to
/// [`HANDSHAKE_LIMIT`]: without a bound, connections that never handshake
/// would take every descriptor the process has.
pub const HANDSHAKES_IN_FLIGHT: usize = 1024;

impl Acceptor {
    pub fn new(config: Arc<ServerConfig>) -> Self {
        Self { inner: tokio_rustls::TlsAcceptor::from(config) }
    }

    /// Runs the handshake on `tcp`; the client must present a certificate
    /// of the authority that names an identity.
    pub async fn accept(&self, tcp: TcpStream, addr: SocketAddr) -> Result<TlsConnection, RefusedConnection> {
        let stream = tokio::time::timeout(HANDSHAKE_LIMIT, self.inner.accept(socket(tcp)))
            .await
            .map_err(|_| RefusedConnection::Timeout)?
            .map_err(RefusedConnection::Handshake)?;
        let (_, session) = stream.get_ref();
        let first = session.peer_certificates().and_then(|certs| certs.first()).ok_or_else(|| {
            RefusedConnection::Identity(crate::TlsError::Certificate("the client presented no certificate".into()))
        })?;
        let identity = Identity::of_certificate(first).map_err(RefusedConnection::Identity)?;
        Ok(TlsConnection { stream, peer: Peer { identity, addr } })
    }

    /// Accepts on `listener` for ever, handshaking each connection on a
    /// task of its own (a slow or hostile peer holds up nobody), at most
    /// `handshakes` at once (one more is closed at once), and yields the
    /// connections that proved an identity. Refusals are logged and passed
    /// to `refused`.
    pub fn incoming(
        self,
        listener: TcpListener,
        handshakes: usize,
        refused: impl Fn(&SocketAddr, &RefusedConnection) + Send + Sync + 'static,
    ) -> mpsc::Receiver<io::Result<TlsConnection>> {
        let (tx, rx) = mpsc::channel(BACKLOG);
        let refused = Arc::new(refused);
        let slots = Arc::new(tokio::sync::Semaphore::new(handshakes));
        tokio::spawn(async move {
            loop {
                let (tcp, addr) = match listener.accept().await {
                    Ok(accepted) => accepted,
                    Err(err) => {
                        // Out of descriptors and the like: pause, not stop.
                        tracing::warn!("accepting a connection: {err}");
                        tokio::time::sleep(Duration::from_millis(100)).await;
                        continue;
                    }
                };
                let Ok(slot) = slots.clone().try_acquire_owned() else {
                    drop(tcp);
                    tracing::warn!(peer = %addr, "refused a connection: {}", RefusedConnection::Busy);
                    refused(&addr, &RefusedConnection::Busy);
                    continue;
                };
                let (acceptor, handed_on, refused) = (self.clone(), tx.clone(), refused.clone());
                tokio::spawn(async move {
                    let handshake = acceptor.accept(tcp, addr).await;
                    drop(slot);
                    match handshake {
                        Ok(connection) => {
                            let _ = handed_on.send(Ok(connection)).await;
                        }
                        Err(err) => {
                            tracing::warn!(peer = %addr, "refused a connection: {err}");
                            refused(&addr, &err);
                        }
                    }
                });
                if tx.is_closed() {
                    return;
                }
            }
        });
        rx
    }
}

impl AsyncRead for TlsConnection {
    fn poll_read(mut self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &mut ReadBuf<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.stream).poll_read(cx, buf)
    }
}

impl AsyncWrite for TlsConnection {
    fn poll_write(mut self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &[u8]) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.stream).poll_write(cx, buf)
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.stream).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.stream.is_write_vectored()
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.stream).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.stream).poll_shutdown(cx)
    }
}

/// gRPC handlers find the peer in the request's extensions
/// (`request.extensions().get::<Peer>()`).
impl tonic::transport::server::Connected for TlsConnection {
    type ConnectInfo = Peer;

    fn connect_info(&self) -> Peer {
        self.peer.clone()
    }
}
