//! `NbdServer`: the exports, the listeners and the connections of one server.

use std::future::Future;
use std::io;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::net::{TcpListener, ToSocketAddrs, UnixListener};
use tokio::task::JoinSet;
use tracing::{debug, info, info_span, warn, Instrument};

use crate::nbd::exports::{ExportInfo, ExportOptions, ExportRegistry};
use crate::nbd::shutdown::ShutdownTrigger;
use crate::nbd::transmission::Served;
use crate::nbd::{handshake, transmission, NbdError};
use volume_engine::export::BlockExport;

/// Tunables of a server.
#[derive(Debug, Clone)]
pub struct ServerConfig {
    /// Requests one connection may have in flight; the kernel queues 128 per
    /// connection, so this never throttles it.
    pub max_in_flight: usize,
    /// How long a client may take to finish the handshake.
    pub handshake_timeout: Duration,
}

impl Default for ServerConfig {
    fn default() -> Self {
        Self { max_in_flight: 256, handshake_timeout: Duration::from_secs(30) }
    }
}

/// An NBD server for exports of type `E`. Cheap to clone: clones share the
/// exports and the shutdown signal.
pub struct NbdServer<E: BlockExport> {
    inner: Arc<Inner<E>>,
}

struct Inner<E> {
    exports: ExportRegistry<E>,
    shutdown: ShutdownTrigger,
    handover: ShutdownTrigger,
    config: ServerConfig,
}

impl<E: BlockExport> Clone for NbdServer<E> {
    fn clone(&self) -> Self {
        Self { inner: self.inner.clone() }
    }
}

impl<E: BlockExport> Default for NbdServer<E> {
    fn default() -> Self {
        Self::new()
    }
}

impl<E: BlockExport> NbdServer<E> {
    /// A server with no exports yet; see [`NbdServer::add_export`].
    pub fn new() -> Self {
        Self::with_config(ServerConfig::default())
    }

    pub fn with_config(config: ServerConfig) -> Self {
        let (shutdown, handover) = (ShutdownTrigger::new(), ShutdownTrigger::new());
        Self { inner: Arc::new(Inner { exports: ExportRegistry::new(), shutdown, handover, config }) }
    }

    /// A server with one export, named "" (the default export).
    pub fn single(export: Arc<E>, options: ExportOptions) -> Self {
        let server = Self::new();
        server.inner.exports.insert(String::new(), export, options);
        server
    }

    /// Adds an export. The first export added also answers to the default
    /// name "" unless an export is registered under "" itself.
    pub fn add_export(&self, name: impl Into<String>, export: Arc<E>, options: ExportOptions) -> Result<(), NbdError> {
        let name = name.into();
        if name.len() > 4096 {
            return Err(NbdError::InvalidExportName("longer than 4096 bytes"));
        }
        if !self.inner.exports.insert(name.clone(), export, options) {
            return Err(NbdError::DuplicateExport(name));
        }
        Ok(())
    }

    /// Stops offering an export; connections already using it continue.
    pub fn remove_export(&self, name: &str) -> bool {
        self.inner.exports.remove(name)
    }

    /// Size and transmission flags of an export, as the handshake reports them.
    pub fn export_info(&self, name: &str) -> Option<ExportInfo> {
        self.inner
            .exports
            .lookup(name)
            .map(|e| ExportInfo { size: e.size(), transmission_flags: e.transmission_flags() })
    }

    /// Stops the server gracefully: listeners stop accepting, every
    /// connection stops reading requests, answers those in flight and closes,
    /// and the `serve_*` futures return once that is done.
    pub fn shutdown(&self) {
        self.inner.shutdown.trigger();
    }

    /// Stops connections served by [`NbdServer::serve_transmission`]
    /// between two requests, once those in flight are answered, and makes
    /// them return [`Served::HandedOver`] for another server to go on with.
    pub fn hand_over(&self) {
        self.inner.handover.trigger();
    }

    pub fn is_shutting_down(&self) -> bool {
        self.inner.shutdown.is_triggered()
    }

    /// Listens on a unix socket at `path` until shutdown. A stale socket file
    /// left by a crashed server is replaced; a live one is an error. The file
    /// is removed on return.
    pub async fn serve_unix(&self, path: impl AsRef<Path>) -> Result<(), NbdError> {
        let path = path.as_ref();
        let listener = bind_unix(path).await?;
        let _remove = RemoveOnDrop(path.to_path_buf());
        info!(socket = %path.display(), "NBD server listening");
        self.serve_unix_listener(listener).await
    }

    /// Serves connections from an already bound unix listener until shutdown.
    pub async fn serve_unix_listener(&self, listener: UnixListener) -> Result<(), NbdError> {
        self.accept_loop(|| async {
            let (stream, _) = listener.accept().await?;
            Ok((stream, "unix".to_owned()))
        })
        .await
    }

    /// Listens on TCP until shutdown.
    pub async fn serve_tcp(&self, addr: impl ToSocketAddrs) -> Result<(), NbdError> {
        let listener =
            TcpListener::bind(addr).await.map_err(|source| NbdError::Listen { addr: "tcp".into(), source })?;
        if let Ok(addr) = listener.local_addr() {
            info!(%addr, "NBD server listening");
        }
        self.serve_tcp_listener(listener).await
    }

    /// Serves connections from an already bound TCP listener until shutdown.
    pub async fn serve_tcp_listener(&self, listener: TcpListener) -> Result<(), NbdError> {
        self.accept_loop(|| async {
            let (stream, peer) = listener.accept().await?;
            // Replies are small and latency-bound: never wait for Nagle.
            stream.set_nodelay(true)?;
            Ok((stream, peer.to_string()))
        })
        .await
    }

    /// Serves one connected stream: handshake, then requests until the client
    /// disconnects or the server shuts down.
    pub async fn serve_stream<S>(&self, mut stream: S) -> Result<(), NbdError>
    where
        S: AsyncRead + AsyncWrite + Send + Unpin + 'static,
    {
        let mut shutdown = self.inner.shutdown.signal();
        let negotiated = tokio::time::timeout(
            self.inner.config.handshake_timeout,
            handshake::negotiate(&mut stream, &self.inner.exports, &mut shutdown),
        )
        .await
        .map_err(|_| NbdError::HandshakeTimeout)??;
        let Some(entry) = negotiated else {
            return Ok(());
        };
        debug!(export = %entry.name, "NBD handshake done");
        let max_in_flight = self.inner.config.max_in_flight;
        transmission::serve(stream, Bytes::new(), entry, shutdown, None, max_in_flight).await.map(drop)
    }

    /// Serves one stream that is already in the transmission phase, with no
    /// handshake: the kernel end of a socket handed to the nbd driver, which
    /// was told size and flags directly (see [`NbdServer::export_info`]).
    /// `unread` is what a previous server read from it and did not parse.
    pub async fn serve_transmission<S>(
        &self,
        stream: S,
        unread: Bytes,
        export_name: &str,
    ) -> Result<Served<S>, NbdError>
    where
        S: AsyncRead + AsyncWrite + Send + Unpin + 'static,
    {
        let entry =
            self.inner.exports.lookup(export_name).ok_or_else(|| NbdError::UnknownExport(export_name.into()))?;
        let (shutdown, handover) = (self.inner.shutdown.signal(), self.inner.handover.signal());
        transmission::serve(stream, unread, entry, shutdown, Some(handover), self.inner.config.max_in_flight).await
    }

    async fn accept_loop<S, F, Fut>(&self, mut accept: F) -> Result<(), NbdError>
    where
        S: AsyncRead + AsyncWrite + Send + Unpin + 'static,
        F: FnMut() -> Fut,
        Fut: Future<Output = io::Result<(S, String)>>,
    {
        let mut shutdown = self.inner.shutdown.signal();
        let mut connections = JoinSet::new();
        loop {
            tokio::select! {
                biased;
                _ = shutdown.wait() => break,
                Some(_) = connections.join_next(), if !connections.is_empty() => {}
                accepted = accept() => match accepted {
                    Ok((stream, peer)) => {
                        let server = self.clone();
                        let span = info_span!("nbd_conn", %peer);
                        connections.spawn(async move { server.handle_connection(stream).await }.instrument(span));
                    }
                    Err(e) => {
                        // Typically EMFILE/ENFILE: back off instead of spinning.
                        warn!(error = %e, "NBD accept failed");
                        tokio::time::sleep(Duration::from_millis(100)).await;
                    }
                },
            }
        }
        debug!(connections = connections.len(), "NBD listener stopping; waiting for connections");
        while connections.join_next().await.is_some() {}
        Ok(())
    }

    async fn handle_connection<S>(&self, stream: S)
    where
        S: AsyncRead + AsyncWrite + Send + Unpin + 'static,
    {
        match self.serve_stream(stream).await {
            Ok(()) => debug!("NBD connection closed"),
            Err(NbdError::Io(e)) => debug!(error = %e, "NBD connection ended"),
            Err(e) => warn!(error = %e, "NBD connection closed"),
        }
    }
}

async fn bind_unix(path: &Path) -> Result<UnixListener, NbdError> {
    let listen_err = |source| NbdError::Listen { addr: path.display().to_string(), source };
    match UnixListener::bind(path) {
        Ok(listener) => Ok(listener),
        Err(e) if e.kind() == io::ErrorKind::AddrInUse => {
            // A file is there: replace it only if nobody answers on it.
            if tokio::net::UnixStream::connect(path).await.is_ok() {
                return Err(listen_err(e));
            }
            std::fs::remove_file(path).map_err(listen_err)?;
            UnixListener::bind(path).map_err(listen_err)
        }
        Err(e) => Err(listen_err(e)),
    }
}

struct RemoveOnDrop(PathBuf);

impl Drop for RemoveOnDrop {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.0);
    }
}
