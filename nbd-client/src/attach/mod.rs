//! Kernel attach: turning a [`BlockExport`] into a block device on this node.
//!
//! Three ways, tried in this order by [`AttachMethod::Auto`]:
//! - [`netlink`]: the nbd driver's generic netlink family, over socketpairs
//!   whose other ends our NBD server serves. The device outlives the serving
//!   process: [`AttachedDevice::release`] stops serving without disconnecting
//!   and a successor takes over with [`reconnect`] within the dead-connection
//!   timeout, while the kernel holds and then resends what was in flight.
//! - [`ioctl`]: the driver's older ioctl interface, where netlink is missing.
//!   The device dies with the serving process.
//! - FUSE + loop ([`fuse_loop`]): no nbd driver at all. A FUSE file carries
//!   the volume and a loop device makes it a block device.

mod connections;
mod error;
mod fuse_fs;
mod fuse_loop;
mod io_flusher;
pub mod ioctl;
mod loop_dev;
pub mod netlink;
mod request_timeout;
pub mod sysfs;

use std::fmt;
use std::fs::OpenOptions;
use std::os::fd::{AsFd, BorrowedFd, OwnedFd};
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::Arc;
use std::time::Duration;

use tokio::runtime::Handle;
use tracing::{info, warn};

pub use connections::HandedConnection;
pub use error::AttachError;
pub use fuse_fs::VOLUME_FILE;
pub use io_flusher::set_io_flusher;
pub use netlink::{DeviceStatus, NetlinkError};
pub use request_timeout::{RequestTimeout, DEFAULT_IO_TIMEOUT, LIMITED_IO_TIMEOUT};

use crate::attach::connections::{KernelConnections, Replacer};
use crate::attach::fuse_loop::{FuseLoop, FuseLoopOptions};
use crate::attach::ioctl::{IoctlConfig, IoctlDevice};
use crate::attach::netlink::{ConnectParams, NbdNetlink, ReconfigureParams};
use volume_engine::export::BlockExport;

/// How long detach waits for the kernel to close its connections.
const DETACH_TIMEOUT: Duration = Duration::from_secs(30);
/// How a device was attached.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AttachKind {
    Netlink,
    Ioctl,
    FuseLoop,
}

impl fmt::Display for AttachKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            AttachKind::Netlink => "netlink",
            AttachKind::Ioctl => "ioctl",
            AttachKind::FuseLoop => "fuse-loop",
        })
    }
}

/// Which way to attach: automatic, or one forced (tests, operators).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum AttachMethod {
    #[default]
    Auto,
    Netlink,
    Ioctl,
    FuseLoop,
}

#[derive(Debug, Clone)]
pub struct AttachOptions {
    pub method: AttachMethod,
    /// Identity of what is attached (the volume id): the nbd device's
    /// backend identifier, checked again on reconnect, and the name of the
    /// FUSE mount and loop device.
    pub backend_id: String,
    pub read_only: bool,
    /// Logical block size of the device: 512, 1024, 2048 or 4096.
    pub block_size: u32,
    /// nbd device index; `None` takes a free one. Ignored by FUSE + loop.
    pub index: Option<u32>,
    /// Connections (and kernel queues) per nbd device.
    pub connections: usize,
    /// Kernel per-request timeout of netlink devices; `None` keeps the
    /// kernel's default (30 s). A timed-out request is requeued on another
    /// connection rather than failed, and the kernel drops the connection it
    /// was on, which the serving process replaces at once. It is also how
    /// long requests stranded on the connections of a crashed serving
    /// process wait before they reach its successor, so it bounds the I/O
    /// pause of a restart. Ioctl devices get the kernel's default: they
    /// cannot be given replacement connections.
    pub io_timeout: Option<Duration>,
    /// How long the kernel keeps requests while every connection is dead,
    /// waiting for [`reconnect`]. Netlink only.
    pub dead_conn_timeout: Duration,
    /// Where FUSE mount points are created.
    pub fuse_root: PathBuf,
}

impl AttachOptions {
    pub fn new(backend_id: impl Into<String>) -> Self {
        let cpus = std::thread::available_parallelism().map_or(1, |n| n.get());
        Self {
            method: AttachMethod::Auto,
            backend_id: backend_id.into(),
            read_only: false,
            block_size: 4096,
            index: None,
            connections: cpus.clamp(1, 4),
            io_timeout: Some(DEFAULT_IO_TIMEOUT),
            dead_conn_timeout: Duration::from_secs(120),
            fuse_root: PathBuf::from("/run/ballast/fuse"),
        }
    }
}

/// What this host offers, each `Err` saying why a method or a kernel
/// feature cannot work.
#[derive(Debug, Clone)]
pub struct Probe {
    pub netlink: Result<(), String>,
    pub ioctl: Result<(), String>,
    pub fuse_loop: Result<(), String>,
    /// Whether /dev/fuse opens (the FUSE + loop fallback needs it).
    pub fuse: Result<(), String>,
    /// Whether this process may create an io_uring (chunk servers need
    /// one; container runtimes' seccomp profiles and the
    /// kernel.io_uring_disabled sysctl forbid it).
    pub io_uring: Result<(), String>,
}

impl Probe {
    /// Looks at the host. Blocking (opens a netlink socket).
    pub fn run() -> Self {
        let netlink = NbdNetlink::open().map(drop).map_err(|e| e.to_string());
        let ioctl = if Path::new("/dev/nbd0").exists() { Ok(()) } else { Err("/dev/nbd0 does not exist".into()) };
        let fuse = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .open("/dev/fuse")
            .map(drop)
            .map_err(|e| format!("cannot open /dev/fuse: {e}"));
        let fuse_loop = if let Err(reason) = &fuse {
            Err(reason.clone())
        } else if !Path::new("/dev/loop-control").exists() {
            Err("/dev/loop-control does not exist".into())
        } else if !nix::unistd::geteuid().is_root() {
            Err("loop devices need root".into())
        } else {
            Ok(())
        };
        Self { netlink, ioctl, fuse_loop, fuse, io_uring: io_uring_works() }
    }

    /// Picks the method and says why.
    pub fn choose(&self, method: AttachMethod) -> Result<(AttachKind, String), AttachError> {
        let forced = |kind: AttachKind, name: &'static str, available: &Result<(), String>| match available {
            Ok(()) => Ok((kind, format!("{name} requested"))),
            Err(reason) => Err(AttachError::Unavailable { method: name, reason: reason.clone() }),
        };
        match method {
            AttachMethod::Netlink => forced(AttachKind::Netlink, "netlink", &self.netlink),
            AttachMethod::Ioctl => forced(AttachKind::Ioctl, "ioctl", &self.ioctl),
            AttachMethod::FuseLoop => forced(AttachKind::FuseLoop, "fuse-loop", &self.fuse_loop),
            AttachMethod::Auto => match (&self.netlink, &self.ioctl, &self.fuse_loop) {
                (Ok(()), _, _) => Ok((AttachKind::Netlink, "the kernel's nbd netlink family is present".into())),
                (Err(nl), Ok(()), _) => {
                    Ok((AttachKind::Ioctl, format!("netlink unavailable ({nl}) but /dev/nbd0 exists")))
                }
                (Err(nl), Err(io), Ok(())) => Ok((
                    AttachKind::FuseLoop,
                    format!("no nbd driver (netlink: {nl}; ioctl: {io}): falling back to FUSE + loop"),
                )),
                (Err(nl), Err(io), Err(fl)) => {
                    Err(AttachError::NoMethod(format!("netlink: {nl}; ioctl: {io}; fuse-loop: {fl}")))
                }
            },
        }
    }
}

/// Creates and closes a one-entry io_uring.
fn io_uring_works() -> Result<(), String> {
    // struct io_uring_params: 120 bytes the kernel fills in; zeroes ask
    // for nothing special.
    let mut params = [0u8; 120];
    // SAFETY: io_uring_setup reads and writes exactly one io_uring_params
    // at the pointer, which `params` is large enough for.
    let fd = unsafe { libc::syscall(libc::SYS_io_uring_setup, 1u32, params.as_mut_ptr()) };
    if fd < 0 {
        let err = std::io::Error::last_os_error();
        return Err(match err.raw_os_error() {
            Some(libc::ENOSYS) => "the kernel has no io_uring".into(),
            Some(libc::EPERM) => {
                "io_uring is forbidden here (kernel.io_uring_disabled, or the container's seccomp profile)".into()
            }
            _ => format!("io_uring_setup failed: {err}"),
        });
    }
    // SAFETY: `fd` was just returned to us and is closed once.
    unsafe { libc::close(fd as libc::c_int) };
    Ok(())
}

/// Runs `modprobe nbd`; the error says why the driver could not be loaded
/// (modprobe missing, no such module for this kernel, no permission).
pub fn load_nbd_module() -> Result<(), String> {
    let output = std::process::Command::new("modprobe")
        .arg("nbd")
        .stdin(std::process::Stdio::null())
        .output()
        .map_err(|e| format!("cannot run modprobe: {e}"))?;
    if output.status.success() {
        return Ok(());
    }
    let stderr = String::from_utf8_lossy(&output.stderr);
    Err(format!("modprobe nbd failed ({}): {}", output.status, stderr.trim()))
}

/// A block device backed by an export. Call [`detach`](Self::detach) (or,
/// for a netlink device handed to a successor, [`release`](Self::release));
/// dropping it stops serving as a crash would.
pub struct AttachedDevice<E: BlockExport> {
    path: PathBuf,
    kind: AttachKind,
    index: u32,
    export: Arc<E>,
    block_size: u32,
    state: Option<State<E>>,
}

enum State<E: BlockExport> {
    Netlink { index: u32, backend: Option<String>, connections: KernelConnections<E> },
    Ioctl { device: IoctlDevice, connections: KernelConnections<E> },
    FuseLoop(FuseLoop),
}

impl<E: BlockExport> AttachedDevice<E> {
    /// `/dev/nbdN` or `/dev/loopN`.
    pub fn path(&self) -> &Path {
        &self.path
    }

    pub fn kind(&self) -> AttachKind {
        self.kind
    }

    /// N of `/dev/nbdN` or `/dev/loopN`.
    pub fn index(&self) -> u32 {
        self.index
    }

    /// The FUSE mount point holding the volume file, for FUSE + loop.
    pub fn fuse_mountpoint(&self) -> Option<&Path> {
        match &self.state {
            Some(State::FuseLoop(fuse)) => Some(fuse.mountpoint()),
            _ => None,
        }
    }

    /// Whether the loop device got direct I/O (FUSE + loop only).
    pub fn loop_direct_io(&self) -> Option<bool> {
        match &self.state {
            Some(State::FuseLoop(fuse)) => Some(fuse.direct_io()),
            _ => None,
        }
    }

    /// Removes the device. Refuses with [`AttachError::Busy`] while it is
    /// mounted or held open, leaving everything as it was, so detach can be
    /// retried. Does nothing once detached or released.
    pub async fn detach(&mut self) -> Result<(), AttachError> {
        let Some(state) = self.state.take() else {
            return Ok(());
        };
        let path = self.path.clone();
        match state {
            State::Netlink { index, backend, connections } => {
                connections.set_closing(true);
                let result = blocking(move || {
                    ensure_not_busy(&path)?;
                    NbdNetlink::open()?.disconnect(index).map_err(AttachError::from)
                })
                .await;
                if let Err(e) = result {
                    connections.set_closing(false);
                    self.state = Some(State::Netlink { index, backend, connections });
                    return Err(e);
                }
                connections.wait_closed(DETACH_TIMEOUT).await;
            }
            State::Ioctl { mut device, connections } => {
                let (device, result) = blocking(move || {
                    let result = ensure_not_busy(&path).and_then(|()| device.disconnect());
                    (device, result)
                })
                .await;
                if let Err(e) = result {
                    self.state = Some(State::Ioctl { device, connections });
                    return Err(e);
                }
                connections.wait_closed(DETACH_TIMEOUT).await;
            }
            State::FuseLoop(mut fuse) => {
                let (fuse, result) = blocking(move || {
                    let result = fuse.detach();
                    (fuse, result)
                })
                .await;
                if let Err(e) = result {
                    self.state = Some(State::FuseLoop(fuse));
                    return Err(e);
                }
            }
        }
        info!(device = %self.path.display(), kind = %self.kind, "block device detached");
        Ok(())
    }

    /// Netlink only: stops serving but leaves the kernel device configured,
    /// for a successor process to [`reconnect`] within the dead-connection
    /// timeout. Requests in flight are answered first. Returns the device
    /// index. Other kinds refuse and stay attached.
    pub async fn release(&mut self) -> Result<u32, AttachError> {
        match self.state.take() {
            Some(State::Netlink { index, connections, .. }) => {
                connections.stop(DETACH_TIMEOUT).await;
                info!(device = %self.path.display(), "nbd device released for a successor");
                Ok(index)
            }
            other => {
                self.state = other;
                Err(AttachError::Unsupported("only netlink-attached devices can outlive their server"))
            }
        }
    }

    /// Netlink only: stops serving between two requests, once those in
    /// flight are answered, and returns the device index and its live
    /// connections for a successor to [`adopt`]. The device is then this
    /// process's no more; the kernel notices nothing. Other kinds refuse
    /// and stay attached.
    pub async fn hand_over(&mut self) -> Result<(u32, Vec<HandedConnection>), AttachError> {
        match self.state.take() {
            Some(State::Netlink { index, connections, .. }) => {
                let handed = connections.hand_over().await;
                info!(device = %self.path.display(), connections = handed.len(), "nbd connections handed over");
                Ok((index, handed))
            }
            other => {
                self.state = other;
                Err(AttachError::Unsupported("only netlink-attached devices can be handed over"))
            }
        }
    }

    /// How many live connections the kernel has dropped so far, each for a
    /// request that outlived the request timeout.
    pub fn dropped_connections(&self) -> u64 {
        match &self.state {
            Some(State::Netlink { connections, .. } | State::Ioctl { connections, .. }) => connections.dropped(),
            _ => 0,
        }
    }

    /// Gives the device's requests `timeout` from now on (netlink only;
    /// others keep theirs).
    pub fn set_io_timeout(&self, timeout: Duration) {
        if let Some(State::Netlink { index, .. }) = &self.state {
            apply_io_timeout(*index, Some(timeout));
            info!(device = %self.path.display(), timeout_ms = timeout.as_millis() as u64, "request timeout set");
        }
    }

    /// Tells the kernel the export's current size, after the export grew,
    /// and returns the device's size as the kernel now reports it. Netlink
    /// reconfigures the device with the new size, ioctl sets it, and FUSE +
    /// loop waits for the file to show it and has the loop device re-read it.
    pub async fn resize(&self) -> Result<u64, AttachError> {
        let size = device_size(self.export.size(), self.block_size)?;
        match &self.state {
            None => return Err(AttachError::Unsupported("the device is detached")),
            Some(State::Netlink { index, backend, .. }) => {
                let (index, params) = (
                    *index,
                    ReconfigureParams {
                        size_bytes: Some(size),
                        block_size: Some(self.block_size.into()),
                        backend: backend.clone(),
                        ..Default::default()
                    },
                );
                blocking(move || NbdNetlink::open()?.reconfigure(index, &params, &[])).await?;
            }
            Some(State::Ioctl { device, .. }) => device.resize(size, self.block_size)?,
            Some(State::FuseLoop(fuse)) => {
                let (file, loop_file, loop_path) = fuse.grow_handles()?;
                blocking(move || fuse_loop::grow(&file, &loop_file, &loop_path, size)).await?;
            }
        }
        let name = self.path.file_name().and_then(|n| n.to_str()).unwrap_or_default().to_owned();
        let now = sysfs::block_device_size(Path::new(sysfs::SYS_BLOCK), &name).unwrap_or(0);
        if now < size {
            return Err(AttachError::ResizeRefused { device: self.path.clone(), wanted: size, now });
        }
        info!(device = %self.path.display(), size = now, "block device resized");
        Ok(now)
    }
}

impl<E: BlockExport> Drop for AttachedDevice<E> {
    fn drop(&mut self) {
        match self.state.take() {
            None => {}
            Some(State::Netlink { connections, .. } | State::Ioctl { connections, .. }) => {
                warn!(device = %self.path.display(), "attached device dropped without detach: serving stops");
                connections.abort();
            }
            Some(State::FuseLoop(fuse)) => {
                warn!(device = %self.path.display(), "attached device dropped without detach: tearing down");
                // Teardown may wait for I/O that the runtime serves: on a
                // multi-thread runtime let the other workers serve it; a
                // current-thread runtime cannot, so hand it to a thread.
                match Handle::try_current().map(|h| h.runtime_flavor()) {
                    Ok(tokio::runtime::RuntimeFlavor::MultiThread) => tokio::task::block_in_place(|| drop(fuse)),
                    Ok(_) => {
                        let _ = std::thread::Builder::new().name("fuse-loop-teardown".into()).spawn(move || drop(fuse));
                    }
                    Err(_) => drop(fuse),
                }
            }
        }
    }
}

/// Attaches `export` as a block device, choosing the method as `options`
/// says and logging which one and why. Must run inside a tokio runtime that
/// keeps serving while this waits.
pub async fn attach<E: BlockExport>(export: Arc<E>, options: AttachOptions) -> Result<AttachedDevice<E>, AttachError> {
    if !options.block_size.is_power_of_two() || !(512..=4096).contains(&options.block_size) {
        return Err(AttachError::InvalidBlockSize(options.block_size));
    }
    let size = device_size(export.size(), options.block_size)?;
    let probe = blocking(Probe::run).await;
    let (kind, reason) = probe.choose(options.method)?;
    info!(method = %kind, reason = %reason, backend = %options.backend_id, size, "attaching block device");
    let device = match kind {
        AttachKind::Netlink => attach_netlink(export, &options, size).await?,
        AttachKind::Ioctl => attach_ioctl(export, &options, size).await?,
        AttachKind::FuseLoop => attach_fuse_loop(export, &options).await?,
    };
    info!(device = %device.path.display(), method = %kind, "block device attached");
    Ok(device)
}

/// Takes over a live netlink nbd device whose previous server stopped
/// (released or crashed): serves new connections and hands them to the
/// kernel, which resends what was waiting. Checks the device's backend
/// identifier against `options.backend_id` when both are known.
pub async fn reconnect<E: BlockExport>(
    export: Arc<E>,
    index: u32,
    options: AttachOptions,
) -> Result<AttachedDevice<E>, AttachError> {
    check_backend(index, &options.backend_id)?;
    let backend = Some(options.backend_id.clone()).filter(|b| !b.is_empty());
    let replacer = netlink_replacer(Arc::new(AtomicU32::new(index)), backend.clone());
    let (connections, kernel_ends) =
        KernelConnections::start(export.clone(), options.read_only, options.connections, Some(replacer))?;
    let params = ReconfigureParams {
        timeout: options.io_timeout,
        dead_conn_timeout: Some(options.dead_conn_timeout),
        backend: backend.clone(),
        ..Default::default()
    };
    let result = blocking(move || {
        let fds: Vec<BorrowedFd<'_>> = kernel_ends.iter().map(|fd| fd.as_fd()).collect();
        NbdNetlink::open()?.reconfigure(index, &params, &fds)
    })
    .await;
    if let Err(e) = result {
        connections.stop(Duration::from_secs(1)).await;
        return Err(e.into());
    }
    Ok(live_netlink_device(export, index, &options, backend, connections, "reconnected"))
}

/// Goes on serving live netlink nbd device `index` over the connections
/// its previous serving process handed over ([`AttachedDevice::hand_over`]),
/// with no call to the kernel: requests keep flowing. Connections missing
/// from `handed` are replaced. Checks the device's backend identifier
/// against `options.backend_id`.
pub async fn adopt<E: BlockExport>(
    export: Arc<E>,
    index: u32,
    handed: Vec<HandedConnection>,
    options: AttachOptions,
) -> Result<AttachedDevice<E>, AttachError> {
    check_backend(index, &options.backend_id)?;
    let backend = Some(options.backend_id.clone()).filter(|b| !b.is_empty());
    let replacer = netlink_replacer(Arc::new(AtomicU32::new(index)), backend.clone());
    let count = options.connections.max(handed.len());
    let connections = KernelConnections::adopt(export.clone(), options.read_only, handed, count, replacer)?;
    Ok(live_netlink_device(export, index, &options, backend, connections, "adopted"))
}

/// A live netlink device this process now serves through `connections`
/// (`how`: reconnected or adopted), with this process's request timeout.
fn live_netlink_device<E: BlockExport>(
    export: Arc<E>,
    index: u32,
    options: &AttachOptions,
    backend: Option<String>,
    connections: KernelConnections<E>,
    how: &str,
) -> AttachedDevice<E> {
    apply_io_timeout(index, options.io_timeout);
    let path = PathBuf::from(format!("/dev/nbd{index}"));
    info!(device = %path.display(), backend = %options.backend_id, "nbd device {how}");
    AttachedDevice {
        path,
        kind: AttachKind::Netlink,
        index,
        export,
        block_size: options.block_size,
        state: Some(State::Netlink { index, backend, connections }),
    }
}

/// Refuses device `index` if it serves another backend than `backend_id`
/// (when both are known).
fn check_backend(index: u32, backend_id: &str) -> Result<(), AttachError> {
    if backend_id.is_empty() {
        return Ok(());
    }
    match sysfs::nbd_backend(Path::new(sysfs::SYS_BLOCK), index) {
        Some(found) if found != backend_id => {
            Err(AttachError::BackendMismatch { index, expected: backend_id.to_owned(), found })
        }
        _ => Ok(()),
    }
}

/// Lists nbd devices through netlink.
pub async fn nbd_status(index: Option<u32>) -> Result<Vec<DeviceStatus>, AttachError> {
    blocking(move || NbdNetlink::open()?.status(index).map_err(AttachError::from)).await
}

/// The connected nbd device that serves `backend_id`, if any.
pub fn find_nbd_by_backend(backend_id: &str) -> Option<u32> {
    sysfs::find_nbd_by_backend(Path::new(sysfs::SYS_BLOCK), backend_id)
}

async fn attach_netlink<E: BlockExport>(
    export: Arc<E>,
    options: &AttachOptions,
    size: u64,
) -> Result<AttachedDevice<E>, AttachError> {
    let backend = Some(options.backend_id.clone()).filter(|b| !b.is_empty());
    // The index is known once connected; replacements wait for it.
    let connected_index = Arc::new(AtomicU32::new(NOT_CONNECTED));
    let replacer = netlink_replacer(connected_index.clone(), backend.clone());
    let (connections, kernel_ends) =
        KernelConnections::start(export.clone(), options.read_only, options.connections, Some(replacer))?;
    let params = ConnectParams {
        index: options.index,
        size_bytes: size,
        block_size: options.block_size.into(),
        server_flags: connections.info().transmission_flags.into(),
        client_flags: 0,
        timeout: options.io_timeout,
        dead_conn_timeout: Some(options.dead_conn_timeout),
        backend: backend.clone(),
    };
    // The kernel ends are closed when the closure returns: the driver holds
    // its own references by then.
    let result = blocking(move || {
        let fds: Vec<BorrowedFd<'_>> = kernel_ends.iter().map(|fd| fd.as_fd()).collect();
        NbdNetlink::open()?.connect(&params, &fds)
    })
    .await;
    match result {
        Ok(index) => {
            connected_index.store(index, Ordering::SeqCst);
            apply_io_timeout(index, options.io_timeout);
            Ok(AttachedDevice {
                path: PathBuf::from(format!("/dev/nbd{index}")),
                kind: AttachKind::Netlink,
                index,
                export,
                block_size: options.block_size,
                state: Some(State::Netlink { index, backend, connections }),
            })
        }
        Err(e) => {
            connections.stop(Duration::from_secs(1)).await;
            Err(e.into())
        }
    }
}

async fn attach_ioctl<E: BlockExport>(
    export: Arc<E>,
    options: &AttachOptions,
    size: u64,
) -> Result<AttachedDevice<E>, AttachError> {
    let (connections, kernel_ends) =
        KernelConnections::start(export.clone(), options.read_only, options.connections, None)?;
    let config = IoctlConfig {
        size_bytes: size,
        block_size: options.block_size,
        transmission_flags: connections.info().transmission_flags,
        // A connection the kernel drops on timeout cannot be replaced here:
        // the kernel's default, not what a netlink user left on the device.
        timeout: None,
    };
    let index = options.index;
    let result = blocking(move || {
        let fds: Vec<BorrowedFd<'_>> = kernel_ends.iter().map(|fd| fd.as_fd()).collect();
        IoctlDevice::connect(index, &config, &fds)
    })
    .await;
    match result {
        Ok(device) => Ok(AttachedDevice {
            path: device.path().to_path_buf(),
            kind: AttachKind::Ioctl,
            index: device.index(),
            export,
            block_size: options.block_size,
            state: Some(State::Ioctl { device, connections }),
        }),
        Err(e) => {
            connections.stop(Duration::from_secs(1)).await;
            Err(e)
        }
    }
}

async fn attach_fuse_loop<E: BlockExport>(
    export: Arc<E>,
    options: &AttachOptions,
) -> Result<AttachedDevice<E>, AttachError> {
    let fuse_options = FuseLoopOptions {
        fuse_root: options.fuse_root.clone(),
        name: options.backend_id.clone(),
        block_size: options.block_size,
        read_only: options.read_only,
    };
    let runtime = Handle::current();
    let fuse = {
        let export = export.clone();
        blocking(move || FuseLoop::attach(export, runtime, &fuse_options)).await?
    };
    Ok(AttachedDevice {
        path: fuse.path().to_path_buf(),
        kind: AttachKind::FuseLoop,
        index: fuse.loop_index(),
        export,
        block_size: options.block_size,
        state: Some(State::FuseLoop(fuse)),
    })
}

const NOT_CONNECTED: u32 = u32::MAX;

/// Replaces dropped connections of netlink device `index` (once it is
/// known) through `NBD_CMD_RECONFIGURE`, which fills a dead slot.
fn netlink_replacer(index: Arc<AtomicU32>, backend: Option<String>) -> Replacer {
    Arc::new(move |kernel_end: OwnedFd| {
        let index = index.load(Ordering::SeqCst);
        if index == NOT_CONNECTED {
            return Err(AttachError::io("replacing a connection", std::io::Error::other("not connected yet")));
        }
        // The device may have been disconnected and reused for another
        // volume meanwhile: never hand that one our socket.
        if let Some(expected) = &backend {
            match sysfs::nbd_backend(Path::new(sysfs::SYS_BLOCK), index) {
                Some(found) if found != *expected => {
                    return Err(AttachError::BackendMismatch { index, expected: expected.clone(), found })
                }
                Some(_) => {}
                // Unreadable or not set (yet): try again later.
                None => {
                    let why = std::io::Error::other(format!("nbd{index} reports no backend"));
                    return Err(AttachError::io("replacing a connection", why));
                }
            }
        }
        let params = ReconfigureParams { backend: backend.clone(), ..Default::default() };
        NbdNetlink::open()?.reconfigure(index, &params, &[kernel_end.as_fd()]).map_err(AttachError::from)
    })
}

/// Gives the device's requests exactly `timeout` (netlink configured it in
/// whole seconds, rounded up). Where sysfs refuses, the rounded-up timeout
/// stays, which is safe, only slower to requeue.
fn apply_io_timeout(index: u32, timeout: Option<Duration>) {
    let Some(timeout) = timeout else { return };
    if let Err(e) = sysfs::set_io_timeout(Path::new(sysfs::SYS_BLOCK), index, timeout) {
        warn!(device = index, timeout_ms = timeout.as_millis() as u64, error = %e,
            "cannot set the request timeout in milliseconds; it stays rounded up to whole seconds");
    }
}

/// The device size: the export's, rounded down to whole blocks.
fn device_size(export_size: u64, block_size: u32) -> Result<u64, AttachError> {
    let size = export_size / u64::from(block_size) * u64::from(block_size);
    if size == 0 {
        return Err(AttachError::ExportTooSmall { size: export_size, block_size });
    }
    if size != export_size {
        warn!(export_size, size, "export size is not a multiple of the block size; the tail is not exposed");
    }
    Ok(size)
}

/// [`AttachError::Busy`] while a file system is mounted on `device` (or it
/// is otherwise held exclusively): detaching then would fail its I/O.
pub(crate) fn ensure_not_busy(device: &Path) -> Result<(), AttachError> {
    match OpenOptions::new().read(true).custom_flags(libc::O_EXCL | libc::O_CLOEXEC).open(device) {
        Ok(_probe) => Ok(()),
        Err(e) if e.raw_os_error() == Some(libc::EBUSY) => Err(AttachError::Busy(device.to_path_buf())),
        Err(e) => Err(AttachError::io(format!("opening {}", device.display()), e)),
    }
}

/// Runs blocking work (syscalls that may wait on I/O this runtime serves)
/// off the runtime's worker threads.
async fn blocking<T, F>(work: F) -> T
where
    T: Send + 'static,
    F: FnOnce() -> T + Send + 'static,
{
    match tokio::task::spawn_blocking(work).await {
        Ok(value) => value,
        Err(e) => std::panic::resume_unwind(e.into_panic()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn probe(netlink: bool, ioctl: bool, fuse_loop: bool) -> Probe {
        let state = |ok: bool, why: &str| if ok { Ok(()) } else { Err(why.to_owned()) };
        Probe {
            netlink: state(netlink, "no family"),
            ioctl: state(ioctl, "no /dev/nbd0"),
            fuse_loop: state(fuse_loop, "no /dev/fuse"),
            fuse: state(fuse_loop, "no /dev/fuse"),
            io_uring: Ok(()),
        }
    }

    #[test]
    fn auto_prefers_netlink_then_ioctl_then_fuse_loop() {
        let kind = |p: Probe| p.choose(AttachMethod::Auto).map(|(kind, _)| kind);
        assert_eq!(kind(probe(true, true, true)).unwrap(), AttachKind::Netlink);
        assert_eq!(kind(probe(false, true, true)).unwrap(), AttachKind::Ioctl);
        assert_eq!(kind(probe(false, false, true)).unwrap(), AttachKind::FuseLoop);
        let err = kind(probe(false, false, false)).unwrap_err().to_string();
        assert!(err.contains("no family") && err.contains("no /dev/nbd0") && err.contains("no /dev/fuse"), "{err}");

        let (_, why) = probe(false, false, true).choose(AttachMethod::Auto).unwrap();
        assert!(why.contains("no family"), "{why}");
    }

    #[test]
    fn forced_methods_fail_clearly() {
        let p = probe(false, true, true);
        assert!(matches!(p.choose(AttachMethod::Netlink), Err(AttachError::Unavailable { method: "netlink", .. })));
        assert_eq!(p.choose(AttachMethod::FuseLoop).unwrap().0, AttachKind::FuseLoop);
        assert_eq!(p.choose(AttachMethod::Ioctl).unwrap().0, AttachKind::Ioctl);
    }

    #[test]
    fn device_size_rounds_down_to_blocks() {
        assert_eq!(device_size(8192, 4096).unwrap(), 8192);
        assert_eq!(device_size(8193, 4096).unwrap(), 8192);
        assert!(matches!(device_size(4095, 4096), Err(AttachError::ExportTooSmall { .. })));
    }

    #[test]
    fn probe_runs_on_this_host() {
        // Whatever the host has, the probe answers and auto picks something
        // or explains why not.
        let p = Probe::run();
        match p.choose(AttachMethod::Auto) {
            Ok((_, why)) => assert!(!why.is_empty()),
            Err(e) => assert!(matches!(e, AttachError::NoMethod(_))),
        }
    }
}
