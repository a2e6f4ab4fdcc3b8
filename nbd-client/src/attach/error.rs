//! Errors of attaching, reconnecting and detaching block devices.

use std::io;
use std::path::PathBuf;

use crate::attach::netlink::NetlinkError;
use crate::nbd::NbdError;

#[derive(Debug, thiserror::Error)]
pub enum AttachError {
    #[error(transparent)]
    Netlink(#[from] NetlinkError),
    /// An ioctl on an nbd or loop device failed.
    #[error("{op} on {device}: {source}")]
    Ioctl { op: &'static str, device: PathBuf, source: nix::Error },
    #[error("no free nbd device (all /dev/nbd* are connected)")]
    NoFreeNbdDevice,
    #[error("no free loop device: {0}")]
    NoFreeLoopDevice(String),
    #[error("cannot mount the FUSE file system at {path}: {source}")]
    FuseMount { path: PathBuf, source: io::Error },
    #[error("cannot unmount the FUSE file system at {path}: {source}")]
    FuseUnmount { path: PathBuf, source: io::Error },
    /// None of netlink, ioctl or FUSE+loop can work on this host.
    #[error("no way to attach a block device on this host: {0}")]
    NoMethod(String),
    /// The chosen method cannot work here (e.g. forced netlink without the module).
    #[error("{method} attach is unavailable: {reason}")]
    Unavailable { method: &'static str, reason: String },
    /// The device is mounted or held open exclusively.
    #[error("{0} is in use (mounted or held open); unmount it before detaching")]
    Busy(PathBuf),
    /// The device did not let go of its backing store in time.
    #[error("{device} did not release its backing store within {seconds} s")]
    ReleaseTimeout { device: PathBuf, seconds: u64 },
    /// Reconnect found the device attached to something else.
    #[error("nbd{index} serves backend {found:?}, not {expected:?}")]
    BackendMismatch { index: u32, expected: String, found: String },
    #[error("the export ({size} bytes) is smaller than one {block_size}-byte block")]
    ExportTooSmall { size: u64, block_size: u32 },
    #[error("block size {0} is not a power of two between 512 and 4096")]
    InvalidBlockSize(u32),
    /// The kernel kept a smaller size than the device was resized to.
    #[error("{device} is {now} bytes after resizing to {wanted}: the kernel did not apply the new size")]
    ResizeRefused { device: PathBuf, wanted: u64, now: u64 },
    /// An operation this kind of attachment cannot do.
    #[error("{0}")]
    Unsupported(&'static str),
    #[error(transparent)]
    Nbd(#[from] NbdError),
    #[error("{context}: {source}")]
    Io { context: String, source: io::Error },
}

impl AttachError {
    pub(crate) fn io(context: impl Into<String>, source: io::Error) -> Self {
        Self::Io { context: context.into(), source }
    }
}
