//! The frame server: TCP and unix listeners, one task per connection, and
//! the lifecycle of a running chunk server (start, graceful shutdown).

pub mod access;
mod connection;
mod handler;

use std::future::Future;
use std::io;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use access::{Caller, ClusterKey};
use ballast_tls::accept::HANDSHAKES_IN_FLIGHT;
use ballast_tls::{Acceptor, Role, TlsConnection, TlsDir};
use tokio::io::{AsyncRead, AsyncWrite, ReadHalf, WriteHalf};
use tokio::net::{TcpListener, UnixListener};
use tokio::sync::{mpsc, watch, Mutex, Semaphore};
use tokio::task::JoinHandle;

use crate::config::Config;
use crate::error::StoreError;
use crate::metrics::metrics;
use crate::registration::{register_and_heartbeat, Registration};
use crate::store::backend::{self, BackendError, BackendKind};
use crate::store::Store;
use handler::Handler;

#[derive(Debug, thiserror::Error)]
pub enum ServerError {
    #[error(transparent)]
    Backend(#[from] BackendError),
    #[error(transparent)]
    Store(#[from] StoreError),
    #[error("{context}: {source}")]
    Io {
        context: String,
        #[source]
        source: io::Error,
    },
    #[error("TLS: {0}")]
    Tls(#[from] ballast_tls::TlsError),
    #[error("{0}")]
    Certificate(String),
}

/// Longest a graceful shutdown waits for connections to finish their requests.
const DRAIN_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(30);

fn io_error(context: impl Into<String>) -> impl FnOnce(io::Error) -> ServerError {
    let context = context.into();
    move |source| ServerError::Io { context, source }
}

/// A chunk server serving until [`RunningServer::shutdown`].
pub struct RunningServer {
    server_id: String,
    tcp_addr: Option<SocketAddr>,
    unix_path: Option<PathBuf>,
    metrics_addr: Option<SocketAddr>,
    store: Arc<Store>,
    stop: watch::Sender<bool>,
    tasks: Vec<JoinHandle<()>>,
    metrics_task: Option<JoinHandle<()>>,
    /// Closes when every connection task has finished.
    drained: mpsc::Receiver<()>,
}

/// Opens the store in `config.data_dir`, binds the listeners and starts
/// serving (plus background scrub, metrics and registration).
pub async fn start(config: Config) -> Result<RunningServer, ServerError> {
    std::fs::create_dir_all(&config.data_dir).map_err(io_error("creating the data directory"))?;
    let tls = match &config.tls_dir {
        Some(dir) => Some(TlsDir::open(dir)?),
        None => None,
    };
    let server_id = match &tls {
        Some(dir) => {
            let identity = dir.identity()?;
            if identity.role != Role::Storage {
                return Err(ServerError::Certificate(format!("the certificate names {identity}, not a chunk server")));
            }
            crate::identity::for_certificate(&config.data_dir, config.server_id.as_deref(), &identity.name)
        }
        None => crate::identity::load_or_create(&config.data_dir, config.server_id.as_deref()),
    }
    .map_err(io_error("the server id"))?;
    let backend = backend::select(config.io_backend, &config.data_dir).await?;
    let kind = backend.kind();
    for k in [BackendKind::Uring, BackendKind::ThreadPool] {
        metrics().io_backend.with_label_values(&[k.name()]).set(i64::from(k == kind));
    }
    let store = Arc::new(Store::open(&config.data_dir, config.capacity, backend).await?);
    tracing::info!(%server_id, io_backend = %kind, labels = ?config.labels, "storage server starting");

    let (stop, stop_rx) = watch::channel(false);
    let (alive, drained) = mpsc::channel(1);
    let slots = Arc::new(Semaphore::new(config.max_connections));
    let key = Arc::new(ClusterKey::open(config.data_dir.clone()).map_err(io_error("the capability key"))?);
    let handler = Arc::new(Handler::new(store.clone(), key.clone(), stop_rx.clone()));
    let mut tasks = Vec::new();
    let mut tcp_addr = None;
    if let Some(addr) = config.listen {
        let listener = TcpListener::bind(addr).await.map_err(io_error(format!("binding {addr}")))?;
        tcp_addr = Some(listener.local_addr().map_err(io_error("reading the bound address"))?);
        let (handler, stop_rx, alive) = (handler.clone(), stop_rx.clone(), alive.clone());
        tasks.push(match &tls {
            Some(dir) => tokio::spawn(accept(TlsListener::new(listener, dir)?, handler, slots.clone(), stop_rx, alive)),
            None => tokio::spawn(accept(listener, handler, slots.clone(), stop_rx, alive)),
        });
    }
    if let Some(path) = &config.unix {
        let listener = bind_unix(path)?;
        tasks.push(tokio::spawn(accept(listener, handler.clone(), slots, stop_rx.clone(), alive.clone())));
    }
    drop(alive);
    if config.scrub_rate > 0 {
        tasks.push(crate::scrub::spawn_background(store.clone(), config.scrub_rate, stop_rx.clone()));
    }
    let (metrics_addr, metrics_task) = match config.metrics_addr {
        Some(addr) => {
            let (bound, task) = ballast_telemetry::serve_metrics(addr)
                .await
                .map_err(io_error(format!("binding the metrics endpoint {addr}")))?;
            (Some(bound), Some(task))
        }
        None => (None, None),
    };
    let registration = Registration {
        server_id: server_id.clone(),
        tcp_addr,
        unix_path: config.unix.clone(),
        labels: config.labels.clone(),
        capacity: store.capacity(),
        data_dir: config.data_dir.clone(),
        orphan_grace: config.orphan_grace,
    };
    let registered = register_and_heartbeat(config.meta.clone(), tls, registration, store.clone(), key, stop_rx);
    tasks.push(tokio::spawn(registered));
    tracing::info!(tcp = ?tcp_addr, unix = ?config.unix, metrics = ?metrics_addr, "serving");
    Ok(RunningServer {
        server_id,
        tcp_addr,
        unix_path: config.unix,
        metrics_addr,
        store,
        stop,
        tasks,
        metrics_task,
        drained,
    })
}

fn bind_unix(path: &Path) -> Result<UnixListener, ServerError> {
    // A socket file left by a previous run would make bind fail.
    match std::fs::remove_file(path) {
        Ok(()) => {}
        Err(e) if e.kind() == io::ErrorKind::NotFound => {}
        Err(e) => return Err(io_error(format!("removing the stale socket {}", path.display()))(e)),
    }
    UnixListener::bind(path).map_err(io_error(format!("binding {}", path.display())))
}

/// A listening socket whose connections split into read and write halves.
trait Listener: Send + Sync + 'static {
    type Read: AsyncRead + Unpin + Send + 'static;
    type Write: AsyncWrite + Unpin + Send + 'static;
    fn accept_split(&self) -> impl Future<Output = io::Result<(Self::Read, Self::Write, Caller)>> + Send;
}

impl Listener for TcpListener {
    type Read = tokio::net::tcp::OwnedReadHalf;
    type Write = tokio::net::tcp::OwnedWriteHalf;

    async fn accept_split(&self) -> io::Result<(Self::Read, Self::Write, Caller)> {
        let (stream, peer) = self.accept().await?;
        tracing::debug!(%peer, "connection");
        let _ = stream.set_nodelay(true);
        let (read, write) = stream.into_split();
        Ok((read, write, Caller::Unauthenticated))
    }
}

impl Listener for UnixListener {
    type Read = tokio::net::unix::OwnedReadHalf;
    type Write = tokio::net::unix::OwnedWriteHalf;

    async fn accept_split(&self) -> io::Result<(Self::Read, Self::Write, Caller)> {
        let (read, write) = self.accept().await?.0.into_split();
        Ok((read, write, Caller::Unauthenticated))
    }
}

/// TCP with mutual TLS: connections that proved an identity, handshaken
/// off the accept loop.
struct TlsListener {
    incoming: Mutex<mpsc::Receiver<io::Result<TlsConnection>>>,
}

impl TlsListener {
    fn new(listener: TcpListener, dir: &TlsDir) -> Result<TlsListener, ServerError> {
        let acceptor = Acceptor::new(ballast_tls::server_config(dir)?);
        let incoming = acceptor.incoming(listener, HANDSHAKES_IN_FLIGHT, |_, _| metrics().refused_connections.inc());
        Ok(TlsListener { incoming: Mutex::new(incoming) })
    }
}

impl Listener for TlsListener {
    type Read = ReadHalf<TlsConnection>;
    type Write = WriteHalf<TlsConnection>;

    async fn accept_split(&self) -> io::Result<(Self::Read, Self::Write, Caller)> {
        let connection = self
            .incoming
            .lock()
            .await
            .recv()
            .await
            .unwrap_or_else(|| Err(io::Error::new(io::ErrorKind::BrokenPipe, "the TLS accept loop stopped")))?;
        let peer = connection.peer().clone();
        tracing::debug!(peer = %peer.addr, identity = %peer.identity, "connection");
        let (read, write) = tokio::io::split(connection);
        Ok((read, write, Caller::Certified(peer.identity)))
    }
}

/// Accepts connections until `stop`, one task each, while a slot is free:
/// a connection over the limit is closed at once.
async fn accept<L: Listener>(
    listener: L,
    handler: Arc<Handler>,
    slots: Arc<Semaphore>,
    mut stop: watch::Receiver<bool>,
    alive: mpsc::Sender<()>,
) {
    loop {
        tokio::select! {
            accepted = listener.accept_split() => match accepted {
                Ok((r, w, caller)) => {
                    let Ok(slot) = slots.clone().try_acquire_owned() else {
                        metrics().connections_over_limit.inc();
                        tracing::warn!(?caller, "too many connections: closing a new one");
                        continue;
                    };
                    let serve = connection::serve(r, w, caller, handler.clone(), stop.clone(), alive.clone());
                    tokio::spawn(async move {
                        serve.await;
                        drop(slot);
                    });
                }
                Err(e) => accept_failed(e).await,
            },
            _ = stop.changed() => return,
        }
    }
}

/// Out of descriptors or a similar transient failure: back off briefly.
async fn accept_failed(e: io::Error) {
    tracing::warn!(error = %e, "accept failed");
    tokio::time::sleep(std::time::Duration::from_millis(100)).await;
}

impl RunningServer {
    pub fn server_id(&self) -> &str {
        &self.server_id
    }

    pub fn tcp_addr(&self) -> Option<SocketAddr> {
        self.tcp_addr
    }

    pub fn unix_path(&self) -> Option<&Path> {
        self.unix_path.as_deref()
    }

    pub fn metrics_addr(&self) -> Option<SocketAddr> {
        self.metrics_addr
    }

    pub fn backend(&self) -> BackendKind {
        self.store.backend().kind()
    }

    pub fn store(&self) -> &Arc<Store> {
        &self.store
    }

    /// Graceful stop: stops accepting and reading requests, lets running
    /// requests finish and reply, flushes everything and closes the store.
    pub async fn shutdown(mut self) -> Result<(), ServerError> {
        tracing::info!("shutting down");
        let _ = self.stop.send(true);
        self.store.begin_shutdown();
        for task in self.tasks.drain(..) {
            let _ = task.await;
        }
        // A client that stopped reading its replies must not hold the
        // shutdown forever: give connections a bounded time to drain.
        let drained = tokio::time::timeout(DRAIN_TIMEOUT, async { while self.drained.recv().await.is_some() {} });
        if drained.await.is_err() {
            tracing::warn!(?DRAIN_TIMEOUT, "connections still busy; flushing without them");
        }
        let closed = self.store.close().await;
        if let Some(path) = &self.unix_path {
            let _ = std::fs::remove_file(path);
        }
        if let Some(task) = self.metrics_task.take() {
            task.abort();
        }
        closed?;
        tracing::info!("shut down cleanly");
        Ok(())
    }
}
