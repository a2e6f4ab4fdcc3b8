//! The userspace side of kernel nbd connections: socketpairs whose one end
//! goes to the nbd driver and whose other end our NBD server serves, already
//! in the transmission phase (the kernel does no handshake).
//!
//! The kernel drops a connection when a request on it outlives the request
//! timeout, and requeues the request on another one. With a [`Replacer`]
//! (netlink), a dropped connection is replaced at once, so a short timeout
//! costs a reconnect, not a connection: the device keeps all of them.
//!
//! Live connections can also move to another serving process
//! ([`KernelConnections::hand_over`], [`KernelConnections::adopt`]): the
//! kernel never notices, so nothing waits for a timeout.

use std::os::fd::OwnedFd;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use tokio::net::UnixStream;
use tokio::task::JoinHandle;
use tracing::{debug, info, warn};

use crate::attach::AttachError;
use crate::nbd::{ExportInfo, ExportOptions, NbdServer, Served};
use volume_engine::export::BlockExport;

/// Hands the kernel end of a new connection to the driver in place of a
/// dropped one (netlink `NBD_CMD_RECONFIGURE`). Blocking.
pub(crate) type Replacer = Arc<dyn Fn(OwnedFd) -> Result<(), AttachError> + Send + Sync>;

/// The driver marks a connection dead just after shutting it down: a
/// replacement offered in between finds no dead slot and is retried, after
/// this long at first and up to [`RETRY_MAX`] later.
const RETRY_FIRST: Duration = Duration::from_millis(200);
const RETRY_MAX: Duration = Duration::from_secs(5);
/// A replacement that ends sooner than this was most likely not taken (the
/// driver closes a socket it had no slot for): the next waits. Shorter than
/// any request timeout, so a connection dropped for a slow request is
/// replaced at once.
const SHORT_LIVED: Duration = Duration::from_millis(250);

/// A live kernel connection between two serving processes: our end of it,
/// and what was read from it but not parsed yet.
#[derive(Debug)]
pub struct HandedConnection {
    pub socket: OwnedFd,
    pub unread: Bytes,
}

pub(crate) struct KernelConnections<E: BlockExport> {
    server: NbdServer<E>,
    tasks: Vec<JoinHandle<Option<HandedConnection>>>,
    /// Set before the device is disconnected or handed over: connections
    /// that end then are not replaced.
    closing: Arc<AtomicBool>,
    /// Live connections the kernel dropped: each is a request that outlived
    /// the request timeout.
    dropped: Arc<AtomicU64>,
}

impl<E: BlockExport> KernelConnections<E> {
    /// Creates `count` socketpairs and starts serving our ends; returns the
    /// kernel ends, to be handed to the driver and then closed. Must run
    /// inside the tokio runtime.
    pub fn start(
        export: Arc<E>,
        read_only: bool,
        count: usize,
        replacer: Option<Replacer>,
    ) -> Result<(Self, Vec<OwnedFd>), AttachError> {
        let mut ours = Vec::with_capacity(count);
        let mut kernel_ends = Vec::with_capacity(count);
        for _ in 0..count.max(1) {
            let (our_end, kernel) = socket_pair()?;
            ours.push(Some((our_end, Bytes::new())));
            kernel_ends.push(kernel);
        }
        Ok((Self::serve_all(export, read_only, ours, replacer), kernel_ends))
    }

    /// Goes on serving connections another process handed over, and
    /// replaces (through `replacer`) those it did not hand over, up to
    /// `count`. Must run inside the tokio runtime.
    pub fn adopt(
        export: Arc<E>,
        read_only: bool,
        handed: Vec<HandedConnection>,
        count: usize,
        replacer: Replacer,
    ) -> Result<Self, AttachError> {
        let mut ours = Vec::with_capacity(count.max(handed.len()));
        for connection in handed {
            let socket = std::os::unix::net::UnixStream::from(connection.socket);
            ours.push(Some((into_tokio(socket)?, connection.unread)));
        }
        ours.resize_with(count.max(ours.len()), || None);
        Ok(Self::serve_all(export, read_only, ours, Some(replacer)))
    }

    fn serve_all(
        export: Arc<E>,
        read_only: bool,
        ours: Vec<Option<(UnixStream, Bytes)>>,
        replacer: Option<Replacer>,
    ) -> Self {
        let options = if read_only { ExportOptions::read_only() } else { ExportOptions::read_write() };
        let server = NbdServer::single(export, options);
        let closing = Arc::new(AtomicBool::new(false));
        let dropped = Arc::new(AtomicU64::new(0));
        let tasks = ours
            .into_iter()
            .enumerate()
            .map(|(slot, first)| {
                let connection = Connection {
                    slot,
                    server: server.clone(),
                    closing: closing.clone(),
                    dropped: dropped.clone(),
                    replacer: replacer.clone(),
                };
                tokio::spawn(connection.serve(first))
            })
            .collect();
        Self { server, tasks, closing, dropped }
    }

    /// How many live connections the kernel has dropped so far.
    pub fn dropped(&self) -> u64 {
        self.dropped.load(Ordering::Relaxed)
    }

    /// Stops every connection between two requests, once those in flight
    /// are answered, and returns the live ones for another process to
    /// [`adopt`](Self::adopt). The kernel sees nothing.
    pub async fn hand_over(self) -> Vec<HandedConnection> {
        self.set_closing(true);
        self.server.hand_over();
        let mut handed = Vec::with_capacity(self.tasks.len());
        for task in self.tasks {
            match task.await {
                Ok(Some(connection)) => handed.push(connection),
                Ok(None) => {}
                Err(e) => warn!(error = %e, "an nbd connection task failed during a hand-over"),
            }
        }
        handed
    }

    /// Size and flags to tell the driver.
    pub fn info(&self) -> ExportInfo {
        self.server.export_info("").expect("the single export is registered under \"\"")
    }

    /// Whether connections that end now are replaced: not while the device
    /// is being disconnected (set before telling the kernel; cleared again
    /// if the disconnect was refused).
    pub fn set_closing(&self, closing: bool) {
        self.closing.store(closing, Ordering::SeqCst);
    }

    /// After the kernel was told to disconnect: waits for it to close the
    /// connections, then stops whatever is left.
    pub async fn wait_closed(self, timeout: Duration) {
        self.set_closing(true);
        let Self { server, tasks, .. } = self;
        let aborts: Vec<_> = tasks.iter().map(|t| t.abort_handle()).collect();
        let all = futures::future::join_all(tasks);
        tokio::pin!(all);
        if tokio::time::timeout(timeout, &mut all).await.is_err() {
            warn!("the kernel kept nbd connections open after disconnect; closing them");
            server.shutdown();
            if tokio::time::timeout(timeout, all).await.is_err() {
                warn!("nbd connections did not finish after shutdown; aborting them");
                aborts.iter().for_each(|a| a.abort());
            }
        }
    }

    /// Stops serving gracefully: requests in flight are answered, then the
    /// connections close and the kernel considers them dead.
    pub async fn stop(self, timeout: Duration) {
        self.set_closing(true);
        self.server.shutdown();
        let aborts: Vec<_> = self.tasks.iter().map(|t| t.abort_handle()).collect();
        // A connection handed back now is closed with it.
        if tokio::time::timeout(timeout, futures::future::join_all(self.tasks)).await.is_err() {
            warn!("nbd connections did not finish in time; aborting them");
            aborts.iter().for_each(|a| a.abort());
        }
    }

    /// Stops serving at once, as a crash would.
    pub fn abort(&self) {
        self.set_closing(true);
        self.server.shutdown();
        for task in &self.tasks {
            task.abort();
        }
    }
}

fn socket_pair() -> Result<(UnixStream, OwnedFd), AttachError> {
    let (ours, kernel) = std::os::unix::net::UnixStream::pair()
        .map_err(|e| AttachError::io("creating a socketpair for the nbd driver", e))?;
    Ok((into_tokio(ours)?, OwnedFd::from(kernel)))
}

fn into_tokio(socket: std::os::unix::net::UnixStream) -> Result<UnixStream, AttachError> {
    socket.set_nonblocking(true).map_err(|e| AttachError::io("socketpair", e))?;
    UnixStream::from_std(socket).map_err(|e| AttachError::io("socketpair", e))
}

/// One connection slot of the device: served, and replaced when the kernel
/// drops it.
struct Connection<E: BlockExport> {
    slot: usize,
    server: NbdServer<E>,
    closing: Arc<AtomicBool>,
    dropped: Arc<AtomicU64>,
    replacer: Option<Replacer>,
}

impl<E: BlockExport> Connection<E> {
    /// Serves `first` (a new connection, or one handed over with the bytes
    /// read from it), or without one starts by replacing the dead slot.
    /// Returns the connection if it is handed over.
    async fn serve(self, first: Option<(UnixStream, Bytes)>) -> Option<HandedConnection> {
        let (mut ours, mut unread) = match first {
            Some(first) => first,
            None => (self.replace(self.replacer.as_ref()?).await?, Bytes::new()),
        };
        let mut pause = Duration::ZERO;
        loop {
            let started = Instant::now();
            match self.server.serve_transmission(ours, std::mem::take(&mut unread), "").await {
                Ok(Served::HandedOver { stream, unread }) => return handed(self.slot, stream, unread),
                Ok(Served::Closed) => debug!(connection = self.slot, "kernel nbd connection closed"),
                Err(e) => warn!(connection = self.slot, error = %e, "kernel nbd connection failed"),
            }
            if self.closing.load(Ordering::SeqCst) || self.server.is_shutting_down() {
                return None;
            }
            self.dropped.fetch_add(1, Ordering::Relaxed);
            let replacer = self.replacer.as_ref()?;
            pause = if started.elapsed() < SHORT_LIVED {
                (pause * 2).clamp(RETRY_FIRST, RETRY_MAX)
            } else {
                Duration::ZERO
            };
            tokio::time::sleep(pause).await;
            ours = self.replace(replacer).await?;
        }
    }

    /// Offers the driver a new connection until it takes one, the device
    /// goes away, or it is being disconnected.
    async fn replace(&self, replacer: &Replacer) -> Option<UnixStream> {
        let mut delay = RETRY_FIRST;
        for attempt in 1.. {
            if self.closing.load(Ordering::SeqCst) {
                return None;
            }
            let (ours, kernel) = match socket_pair() {
                Ok(pair) => pair,
                Err(e) => {
                    warn!(connection = self.slot, error = %e, "cannot replace a dropped nbd connection");
                    return None;
                }
            };
            let replacer = replacer.clone();
            match tokio::task::spawn_blocking(move || replacer(kernel)).await {
                Ok(Ok(())) => {
                    info!(connection = self.slot, attempt, "replaced a connection the kernel dropped");
                    return Some(ours);
                }
                Ok(Err(e @ (AttachError::BackendMismatch { .. } | AttachError::Unsupported(_)))) => {
                    warn!(connection = self.slot, error = %e, "not replacing a dropped nbd connection");
                    return None;
                }
                Ok(Err(e)) => debug!(connection = self.slot, attempt, error = %e, "replacement refused; retrying"),
                Err(e) => {
                    warn!(connection = self.slot, error = %e, "replacing a connection panicked");
                    return None;
                }
            }
            tokio::time::sleep(delay).await;
            delay = (delay * 2).min(RETRY_MAX);
        }
        None
    }
}

fn handed(slot: usize, stream: UnixStream, unread: Bytes) -> Option<HandedConnection> {
    match stream.into_std() {
        Ok(socket) => Some(HandedConnection { socket: socket.into(), unread }),
        Err(e) => {
            warn!(connection = slot, error = %e, "cannot hand over an nbd connection");
            None
        }
    }
}
