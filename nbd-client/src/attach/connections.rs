//! The userspace side of kernel nbd connections: socketpairs whose one end
//! goes to the nbd driver and whose other end our NBD server serves, already
//! in the transmission phase (the kernel does no handshake).
//!
//! The kernel drops a connection when a request on it outlives the request
//! timeout, and requeues the request on another one. With a [`Replacer`]
//! (netlink), a dropped connection is replaced at once, so a short timeout
//! costs a reconnect, not a connection: the device keeps all of them.

use std::os::fd::OwnedFd;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use tokio::net::UnixStream;
use tokio::task::JoinHandle;
use tracing::{debug, info, warn};

use crate::attach::AttachError;
use crate::export::BlockExport;
use crate::nbd::{ExportInfo, ExportOptions, NbdServer};

/// Hands the kernel end of a new connection to the driver in place of a
/// dropped one (netlink `NBD_CMD_RECONFIGURE`). Blocking.
pub(crate) type Replacer = Arc<dyn Fn(OwnedFd) -> Result<(), AttachError> + Send + Sync>;

/// The driver marks a connection dead just after shutting it down: a
/// replacement offered in between finds no dead slot and is retried, after
/// this long at first and up to [`RETRY_MAX`] later.
const RETRY_FIRST: Duration = Duration::from_millis(200);
const RETRY_MAX: Duration = Duration::from_secs(5);
/// A replacement that ends sooner than this was most likely not taken (the
/// driver closes a socket it had no slot for): the next waits.
const SHORT_LIVED: Duration = Duration::from_secs(1);

pub(crate) struct KernelConnections<E: BlockExport> {
    server: NbdServer<E>,
    tasks: Vec<JoinHandle<()>>,
    /// Set before the device is disconnected or handed over: connections
    /// that end then are not replaced.
    closing: Arc<AtomicBool>,
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
        let options = if read_only { ExportOptions::read_only() } else { ExportOptions::read_write() };
        let server = NbdServer::single(export, options);
        let closing = Arc::new(AtomicBool::new(false));
        let mut tasks = Vec::with_capacity(count);
        let mut kernel_ends = Vec::with_capacity(count);
        for slot in 0..count.max(1) {
            let (ours, kernel) = socket_pair()?;
            let connection =
                Connection { slot, server: server.clone(), closing: closing.clone(), replacer: replacer.clone() };
            tasks.push(tokio::spawn(connection.serve(ours)));
            kernel_ends.push(kernel);
        }
        Ok((Self { server, tasks, closing }, kernel_ends))
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
    ours.set_nonblocking(true).map_err(|e| AttachError::io("socketpair", e))?;
    let ours = UnixStream::from_std(ours).map_err(|e| AttachError::io("socketpair", e))?;
    Ok((ours, OwnedFd::from(kernel)))
}

/// One connection slot of the device: served, and replaced when the kernel
/// drops it.
struct Connection<E: BlockExport> {
    slot: usize,
    server: NbdServer<E>,
    closing: Arc<AtomicBool>,
    replacer: Option<Replacer>,
}

impl<E: BlockExport> Connection<E> {
    async fn serve(self, mut ours: UnixStream) {
        let mut pause = Duration::ZERO;
        loop {
            let started = Instant::now();
            match self.server.serve_transmission(ours, "").await {
                Ok(()) => debug!(connection = self.slot, "kernel nbd connection closed"),
                Err(e) => warn!(connection = self.slot, error = %e, "kernel nbd connection failed"),
            }
            if self.closing.load(Ordering::SeqCst) || self.server.is_shutting_down() {
                return;
            }
            let Some(replacer) = &self.replacer else {
                return;
            };
            pause = if started.elapsed() < SHORT_LIVED {
                (pause * 2).clamp(RETRY_FIRST, RETRY_MAX)
            } else {
                Duration::ZERO
            };
            tokio::time::sleep(pause).await;
            match self.replace(replacer).await {
                Some(replacement) => ours = replacement,
                None => return,
            }
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
