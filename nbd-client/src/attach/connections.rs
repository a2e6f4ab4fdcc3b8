//! The userspace side of kernel nbd connections: socketpairs whose one end
//! goes to the nbd driver and whose other end our NBD server serves, already
//! in the transmission phase (the kernel does no handshake).

use std::os::fd::OwnedFd;
use std::sync::Arc;
use std::time::Duration;

use tokio::task::JoinHandle;
use tracing::{debug, warn};

use crate::attach::AttachError;
use crate::export::BlockExport;
use crate::nbd::{ExportInfo, ExportOptions, NbdServer};

pub(crate) struct KernelConnections<E: BlockExport> {
    server: NbdServer<E>,
    tasks: Vec<JoinHandle<()>>,
}

impl<E: BlockExport> KernelConnections<E> {
    /// Creates `count` socketpairs and starts serving our ends; returns the
    /// kernel ends, to be handed to the driver and then closed. Must run
    /// inside the tokio runtime.
    pub fn start(export: Arc<E>, read_only: bool, count: usize) -> Result<(Self, Vec<OwnedFd>), AttachError> {
        let options = if read_only { ExportOptions::read_only() } else { ExportOptions::read_write() };
        let server = NbdServer::single(export, options);
        let mut tasks = Vec::with_capacity(count);
        let mut kernel_ends = Vec::with_capacity(count);
        for n in 0..count.max(1) {
            let (ours, kernel) = std::os::unix::net::UnixStream::pair()
                .map_err(|e| AttachError::io("creating a socketpair for the nbd driver", e))?;
            ours.set_nonblocking(true).map_err(|e| AttachError::io("socketpair", e))?;
            let ours = tokio::net::UnixStream::from_std(ours).map_err(|e| AttachError::io("socketpair", e))?;
            let server = server.clone();
            tasks.push(tokio::spawn(async move {
                match server.serve_transmission(ours, "").await {
                    Ok(()) => debug!(connection = n, "kernel nbd connection closed"),
                    Err(e) => warn!(connection = n, error = %e, "kernel nbd connection failed"),
                }
            }));
            kernel_ends.push(OwnedFd::from(kernel));
        }
        Ok((Self { server, tasks }, kernel_ends))
    }

    /// Size and flags to tell the driver.
    pub fn info(&self) -> ExportInfo {
        self.server.export_info("").expect("the single export is registered under \"\"")
    }

    /// After the kernel was told to disconnect: waits for it to close the
    /// connections, then stops whatever is left.
    pub async fn wait_closed(self, timeout: Duration) {
        let Self { server, tasks } = self;
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
        self.server.shutdown();
        let aborts: Vec<_> = self.tasks.iter().map(|t| t.abort_handle()).collect();
        if tokio::time::timeout(timeout, futures::future::join_all(self.tasks)).await.is_err() {
            warn!("nbd connections did not finish in time; aborting them");
            aborts.iter().for_each(|a| a.abort());
        }
    }

    /// Stops serving at once, as a crash would.
    pub fn abort(&self) {
        self.server.shutdown();
        for task in &self.tasks {
            task.abort();
        }
    }
}
