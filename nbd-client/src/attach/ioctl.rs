//! The ioctl interface of `/dev/nbdN` (`include/uapi/linux/nbd.h`): the
//! fallback for kernels whose nbd driver has no netlink family. One thread
//! per device sits in `NBD_DO_IT` for as long as the device is connected.
//!
//! Unlike netlink, a device configured this way dies with its sockets: it
//! cannot be handed to a new server process.

use std::fs::{File, OpenOptions};
use std::os::fd::{AsRawFd, BorrowedFd};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use nix::sys::ioctl::ioctl_num_type;
use nix::{ioctl_none_bad, ioctl_write_int_bad, request_code_none};
use tracing::{debug, warn};

use crate::attach::request_timeout::connect_timeout_seconds;
use crate::attach::{sysfs, AttachError};

const NBD_IOCTL_TYPE: u8 = 0xab;
pub const NBD_SET_SOCK: ioctl_num_type = request_code_none!(NBD_IOCTL_TYPE, 0) as ioctl_num_type;
pub const NBD_SET_BLKSIZE: ioctl_num_type = request_code_none!(NBD_IOCTL_TYPE, 1) as ioctl_num_type;
pub const NBD_DO_IT: ioctl_num_type = request_code_none!(NBD_IOCTL_TYPE, 3) as ioctl_num_type;
pub const NBD_CLEAR_SOCK: ioctl_num_type = request_code_none!(NBD_IOCTL_TYPE, 4) as ioctl_num_type;
pub const NBD_SET_SIZE_BLOCKS: ioctl_num_type = request_code_none!(NBD_IOCTL_TYPE, 7) as ioctl_num_type;
pub const NBD_DISCONNECT: ioctl_num_type = request_code_none!(NBD_IOCTL_TYPE, 8) as ioctl_num_type;
pub const NBD_SET_TIMEOUT: ioctl_num_type = request_code_none!(NBD_IOCTL_TYPE, 9) as ioctl_num_type;
pub const NBD_SET_FLAGS: ioctl_num_type = request_code_none!(NBD_IOCTL_TYPE, 10) as ioctl_num_type;

// The nbd ioctls are `_IO` numbers that nonetheless take an argument, hence
// the `_bad` variants. Every argument here fits a C int except the block
// count, which the kernel reads as an unsigned long (see `set_size_blocks`).
ioctl_write_int_bad!(nbd_set_sock, NBD_SET_SOCK);
ioctl_write_int_bad!(nbd_set_blksize, NBD_SET_BLKSIZE);
ioctl_none_bad!(nbd_do_it, NBD_DO_IT);
ioctl_none_bad!(nbd_clear_sock, NBD_CLEAR_SOCK);
ioctl_none_bad!(nbd_disconnect, NBD_DISCONNECT);
ioctl_write_int_bad!(nbd_set_timeout, NBD_SET_TIMEOUT);
ioctl_write_int_bad!(nbd_set_flags, NBD_SET_FLAGS);

/// `NBD_SET_SIZE_BLOCKS` with its full unsigned long argument: a C int
/// would cap devices at 2^31 blocks.
fn set_size_blocks(fd: BorrowedFd<'_>, blocks: u64) -> nix::Result<()> {
    // SAFETY: the request takes its argument by value; no memory is shared.
    let rc = unsafe { libc::ioctl(fd.as_raw_fd(), NBD_SET_SIZE_BLOCKS, blocks as libc::c_ulong) };
    nix::errno::Errno::result(rc).map(drop)
}

/// What the kernel needs to know about the export, which it would otherwise
/// learn in a handshake.
#[derive(Debug, Clone)]
pub struct IoctlConfig {
    pub size_bytes: u64,
    pub block_size: u32,
    pub transmission_flags: u16,
    /// Per-request timeout; `None` sets the kernel's default (30 s), as
    /// netlink's [`ConnectParams::timeout`](super::netlink::ConnectParams).
    pub timeout: Option<Duration>,
}

/// How long `NBD_DO_IT` may take to start the device.
const START_TIMEOUT: Duration = Duration::from_secs(5);

/// Serialises device selection within this process; across processes the
/// `pid` file check below is the same heuristic Debian's nbd-client uses.
static SELECT: Mutex<()> = Mutex::new(());

/// A connected `/dev/nbdN` driven through ioctls.
pub struct IoctlDevice {
    index: u32,
    path: PathBuf,
    file: Arc<File>,
    do_it: Option<JoinHandle<nix::Result<()>>>,
}

impl IoctlDevice {
    /// Configures a device (the given index, or the first free one) on
    /// `sockets` and starts `NBD_DO_IT` on a dedicated thread. The kernel
    /// holds its own references to the sockets afterwards.
    pub fn connect(index: Option<u32>, config: &IoctlConfig, sockets: &[BorrowedFd<'_>]) -> Result<Self, AttachError> {
        let _guard = SELECT.lock().unwrap_or_else(|e| e.into_inner());
        let index = match index {
            Some(index) => index,
            None => sysfs::first_free_nbd(Path::new(sysfs::SYS_BLOCK)).ok_or(AttachError::NoFreeNbdDevice)?,
        };
        let path = PathBuf::from(format!("/dev/nbd{index}"));
        let file = OpenOptions::new()
            .read(true)
            .write(true)
            .open(&path)
            .map_err(|e| AttachError::io(format!("opening {}", path.display()), e))?;
        let fd = file.as_raw_fd();
        let ioctl_err = |op| {
            let path = path.clone();
            move |source| AttachError::Ioctl { op, device: path, source }
        };

        let blocks = config.size_bytes / u64::from(config.block_size);
        // SAFETY (all ioctls below): `fd` is an open nbd device and every
        // argument is passed by value.
        unsafe {
            nbd_set_blksize(fd, config.block_size as libc::c_int).map_err(ioctl_err("NBD_SET_BLKSIZE"))?;
        }
        set_size_blocks(file_fd(&file), blocks).map_err(ioctl_err("NBD_SET_SIZE_BLOCKS"))?;
        unsafe {
            nbd_set_flags(fd, libc::c_int::from(config.transmission_flags)).map_err(ioctl_err("NBD_SET_FLAGS"))?;
            let timeout = connect_timeout_seconds(config.timeout);
            nbd_set_timeout(fd, timeout.min(i32::MAX as u64) as libc::c_int).map_err(ioctl_err("NBD_SET_TIMEOUT"))?;
            for socket in sockets {
                if let Err(e) = nbd_set_sock(fd, socket.as_raw_fd()) {
                    let _ = nbd_clear_sock(fd);
                    return Err(ioctl_err("NBD_SET_SOCK")(e));
                }
            }
        }

        let file = Arc::new(file);
        let do_it = std::thread::Builder::new()
            .name(format!("nbd{index}-do-it"))
            .spawn({
                let file = file.clone();
                move || {
                    // SAFETY: see above. Blocks until the device disconnects.
                    let result = unsafe { nbd_do_it(file.as_raw_fd()) }.map(drop);
                    // Drop the kernel's socket references whatever ended it.
                    let _ = unsafe { nbd_clear_sock(file.as_raw_fd()) };
                    debug!(index, ?result, "NBD_DO_IT returned");
                    result
                }
            })
            .map_err(|e| AttachError::io("spawning the NBD_DO_IT thread", e))?;
        // The driver applies the size only once NBD_DO_IT has started the
        // device: do not hand out a device that still reads as empty.
        let started = Path::new(sysfs::SYS_BLOCK).join(format!("nbd{index}/pid"));
        let deadline = Instant::now() + START_TIMEOUT;
        while !started.exists() {
            if do_it.is_finished() {
                let source = match do_it.join() {
                    Ok(Err(e)) => e,
                    _ => nix::errno::Errno::EIO,
                };
                return Err(AttachError::Ioctl { op: "NBD_DO_IT", device: path, source });
            }
            if Instant::now() >= deadline {
                warn!(index, "nbd device did not report started; continuing");
                break;
            }
            std::thread::sleep(Duration::from_millis(5));
        }
        Ok(Self { index, path, file, do_it: Some(do_it) })
    }

    pub fn index(&self) -> u32 {
        self.index
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Sets a new size on the connected device (`NBD_SET_SIZE_BLOCKS`); the
    /// driver applies it at once and tells the block layer.
    pub fn resize(&self, size_bytes: u64, block_size: u32) -> Result<(), AttachError> {
        set_size_blocks(file_fd(&self.file), size_bytes / u64::from(block_size)).map_err(|source| AttachError::Ioctl {
            op: "NBD_SET_SIZE_BLOCKS",
            device: self.path.clone(),
            source,
        })
    }

    /// Disconnects the device and waits for `NBD_DO_IT` to return. Blocking;
    /// a second call does nothing.
    pub fn disconnect(&mut self) -> Result<(), AttachError> {
        if self.do_it.is_none() {
            return Ok(());
        }
        // SAFETY: see `connect`.
        unsafe { nbd_disconnect(self.file.as_raw_fd()) }.map_err(|source| AttachError::Ioctl {
            op: "NBD_DISCONNECT",
            device: self.path.clone(),
            source,
        })?;
        if let Some(thread) = self.do_it.take() {
            match thread.join() {
                Ok(Ok(())) => {}
                // The kernel reports a disconnect we asked for as an error on some versions.
                Ok(Err(e)) => debug!(index = self.index, error = %e, "NBD_DO_IT ended with an error after disconnect"),
                Err(_) => warn!(index = self.index, "NBD_DO_IT thread panicked"),
            }
        }
        Ok(())
    }
}

fn file_fd(file: &File) -> BorrowedFd<'_> {
    std::os::fd::AsFd::as_fd(file)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn request_numbers_match_linux_nbd_h() {
        // _IO(0xab, n) = 0xab << 8 | n
        assert_eq!(NBD_SET_SOCK, 0xab00);
        assert_eq!(NBD_SET_BLKSIZE, 0xab01);
        assert_eq!(NBD_DO_IT, 0xab03);
        assert_eq!(NBD_CLEAR_SOCK, 0xab04);
        assert_eq!(NBD_SET_SIZE_BLOCKS, 0xab07);
        assert_eq!(NBD_DISCONNECT, 0xab08);
        assert_eq!(NBD_SET_TIMEOUT, 0xab09);
        assert_eq!(NBD_SET_FLAGS, 0xab0a);
    }
}
