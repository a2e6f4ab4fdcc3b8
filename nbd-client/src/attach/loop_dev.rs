//! Loop devices (`include/uapi/linux/loop.h`): a block device over a file.
//! The FUSE fallback points one at the file that carries the volume.

use std::fs::{File, OpenOptions};
use std::os::fd::AsRawFd;
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use nix::errno::Errno;
use nix::{ioctl_none_bad, ioctl_write_int_bad, ioctl_write_ptr_bad};
use tracing::{debug, info, warn};

use crate::attach::AttachError;

pub const LOOP_SET_FD: u32 = 0x4C00;
pub const LOOP_CLR_FD: u32 = 0x4C01;
pub const LOOP_SET_STATUS64: u32 = 0x4C04;
pub const LOOP_SET_CAPACITY: u32 = 0x4C07;
pub const LOOP_SET_DIRECT_IO: u32 = 0x4C08;
pub const LOOP_SET_BLOCK_SIZE: u32 = 0x4C09;
pub const LOOP_CONFIGURE: u32 = 0x4C0A;
pub const LOOP_CTL_GET_FREE: u32 = 0x4C82;

pub const LO_FLAGS_READ_ONLY: u32 = 1;
pub const LO_FLAGS_AUTOCLEAR: u32 = 4;
pub const LO_FLAGS_DIRECT_IO: u32 = 16;

const LO_NAME_SIZE: usize = 64;
const LO_KEY_SIZE: usize = 32;

/// `struct loop_info64`.
#[repr(C)]
#[derive(Clone, Copy)]
pub struct LoopInfo64 {
    pub lo_device: u64,
    pub lo_inode: u64,
    pub lo_rdevice: u64,
    pub lo_offset: u64,
    pub lo_sizelimit: u64,
    pub lo_number: u32,
    pub lo_encrypt_type: u32,
    pub lo_encrypt_key_size: u32,
    pub lo_flags: u32,
    pub lo_file_name: [u8; LO_NAME_SIZE],
    pub lo_crypt_name: [u8; LO_NAME_SIZE],
    pub lo_encrypt_key: [u8; LO_KEY_SIZE],
    pub lo_init: [u64; 2],
}

/// `struct loop_config` (kernel ≥ 5.8).
#[repr(C)]
#[derive(Clone, Copy)]
pub struct LoopConfig {
    pub fd: u32,
    pub block_size: u32,
    pub info: LoopInfo64,
    pub reserved: [u64; 8],
}

impl LoopInfo64 {
    fn new(flags: u32, name: &str) -> Self {
        let mut info = Self {
            lo_device: 0,
            lo_inode: 0,
            lo_rdevice: 0,
            lo_offset: 0,
            lo_sizelimit: 0,
            lo_number: 0,
            lo_encrypt_type: 0,
            lo_encrypt_key_size: 0,
            lo_flags: flags,
            lo_file_name: [0; LO_NAME_SIZE],
            lo_crypt_name: [0; LO_NAME_SIZE],
            lo_encrypt_key: [0; LO_KEY_SIZE],
            lo_init: [0; 2],
        };
        // Informational only; NUL-terminated and truncated like losetup does.
        let len = name.len().min(LO_NAME_SIZE - 1);
        info.lo_file_name[..len].copy_from_slice(&name.as_bytes()[..len]);
        info
    }
}

ioctl_write_int_bad!(loop_set_fd, LOOP_SET_FD);
ioctl_none_bad!(loop_clr_fd, LOOP_CLR_FD);
ioctl_write_ptr_bad!(loop_set_status64, LOOP_SET_STATUS64, LoopInfo64);
ioctl_write_int_bad!(loop_set_direct_io, LOOP_SET_DIRECT_IO);
ioctl_write_int_bad!(loop_set_block_size, LOOP_SET_BLOCK_SIZE);
ioctl_write_ptr_bad!(loop_configure, LOOP_CONFIGURE, LoopConfig);
ioctl_none_bad!(loop_ctl_get_free, LOOP_CTL_GET_FREE);
ioctl_none_bad!(loop_set_capacity, LOOP_SET_CAPACITY);

/// How to set up the loop device.
#[derive(Debug, Clone)]
pub struct LoopOptions {
    pub block_size: u32,
    pub read_only: bool,
    /// Ask for direct I/O on the backing file; the kernel may refuse, and
    /// [`LoopDevice::direct_io`] says what was obtained.
    pub direct_io: bool,
    /// Shown as the loop device's file name in `LOOP_GET_STATUS64`.
    pub name: String,
}

/// A configured loop device. Its descriptor stays open for the device's
/// lifetime: with autoclear the kernel tears the device down when the last
/// descriptor closes, so a crashed process leaves nothing behind.
pub struct LoopDevice {
    index: u32,
    path: PathBuf,
    file: File,
    direct_io: bool,
}

impl LoopDevice {
    /// Picks a free loop device and attaches `backing` to it. Blocking.
    pub fn attach(backing: &File, options: &LoopOptions) -> Result<Self, AttachError> {
        let control = OpenOptions::new()
            .read(true)
            .write(true)
            .open("/dev/loop-control")
            .map_err(|e| AttachError::NoFreeLoopDevice(format!("/dev/loop-control: {e}")))?;
        let mut flags = LO_FLAGS_AUTOCLEAR;
        if options.read_only {
            flags |= LO_FLAGS_READ_ONLY;
        }
        if options.direct_io {
            flags |= LO_FLAGS_DIRECT_IO;
        }
        // Another process may take the device we were offered: retry.
        for _ in 0..16 {
            // SAFETY: no argument.
            let index = unsafe { loop_ctl_get_free(control.as_raw_fd()) }
                .map_err(|e| AttachError::NoFreeLoopDevice(format!("LOOP_CTL_GET_FREE: {e}")))?
                as u32;
            let path = PathBuf::from(format!("/dev/loop{index}"));
            let file =
                match OpenOptions::new().read(true).write(!options.read_only).custom_flags(libc::O_CLOEXEC).open(&path)
                {
                    Ok(file) => file,
                    // udev may not have created the node yet.
                    Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                        std::thread::sleep(Duration::from_millis(20));
                        continue;
                    }
                    Err(e) => return Err(AttachError::io(format!("opening {}", path.display()), e)),
                };
            match configure(&file, backing, flags, options) {
                Ok(()) => {}
                Err(Errno::EBUSY) => {
                    debug!(device = %path.display(), "loop device taken by someone else; retrying");
                    continue;
                }
                Err(source) => return Err(AttachError::Ioctl { op: "LOOP_CONFIGURE", device: path, source }),
            }
            let direct_io = read_sysfs_flag(index, "dio");
            if options.direct_io && !direct_io {
                // SAFETY: argument by value.
                if let Err(e) = unsafe { loop_set_direct_io(file.as_raw_fd(), 1) } {
                    warn!(device = %path.display(), error = %e, "loop device runs without direct I/O");
                }
            }
            let direct_io = read_sysfs_flag(index, "dio");
            info!(device = %path.display(), direct_io, "loop device attached");
            return Ok(Self { index, path, file, direct_io });
        }
        Err(AttachError::NoFreeLoopDevice("every free loop device was taken concurrently".into()))
    }

    pub fn index(&self) -> u32 {
        self.index
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    pub fn direct_io(&self) -> bool {
        self.direct_io
    }

    /// A second descriptor of the device, for [`set_capacity`] off this thread.
    pub fn handle(&self) -> Result<File, AttachError> {
        self.file.try_clone().map_err(|e| AttachError::io(format!("duplicating {}", self.path.display()), e))
    }

    /// [`AttachError::Busy`] while a file system is mounted on the device
    /// (or someone else holds it exclusively).
    pub fn check_not_busy(&self) -> Result<(), AttachError> {
        crate::attach::ensure_not_busy(&self.path)
    }

    /// Detaches the device and waits until the kernel released the backing
    /// file. Fails with [`AttachError::Busy`] while the device is mounted or
    /// held open, leaving it attached. Blocking.
    pub fn detach(self, timeout: Duration) -> Result<(), AttachError> {
        self.check_not_busy()?;
        // SAFETY: no argument. With other openers the kernel defers the
        // teardown to the last close (autoclear); otherwise it starts now.
        if let Err(e) = unsafe { loop_clr_fd(self.file.as_raw_fd()) } {
            if e != Errno::ENXIO {
                return Err(AttachError::Ioctl { op: "LOOP_CLR_FD", device: self.path.clone(), source: e });
            }
        }
        let LoopDevice { index, path, file, .. } = self;
        drop(file);
        let deadline = Instant::now() + timeout;
        while backing_attached(index) {
            if Instant::now() >= deadline {
                return Err(AttachError::ReleaseTimeout { device: path, seconds: timeout.as_secs() });
            }
            std::thread::sleep(Duration::from_millis(10));
        }
        debug!(device = %path.display(), "loop device detached");
        Ok(())
    }
}

/// Makes the loop device on `device` take its backing file's current size
/// (`LOOP_SET_CAPACITY`). The kernel reads the size the backing inode has
/// now; for a FUSE file that is the last size the file system reported.
pub fn set_capacity(device: &File, path: &Path) -> Result<(), AttachError> {
    // SAFETY: no argument.
    unsafe { loop_set_capacity(device.as_raw_fd()) }.map(drop).map_err(|source| AttachError::Ioctl {
        op: "LOOP_SET_CAPACITY",
        device: path.to_path_buf(),
        source,
    })
}

/// `LOOP_CONFIGURE`, or the older three-step sequence where it is missing.
fn configure(file: &File, backing: &File, flags: u32, options: &LoopOptions) -> Result<(), Errno> {
    let config = LoopConfig {
        fd: backing.as_raw_fd() as u32,
        block_size: options.block_size,
        info: LoopInfo64::new(flags, &options.name),
        reserved: [0; 8],
    };
    // SAFETY: `config` outlives the call and has the kernel's layout.
    match unsafe { loop_configure(file.as_raw_fd(), &config) } {
        Ok(_) => return Ok(()),
        Err(Errno::ENOTTY) | Err(Errno::EINVAL) if !kernel_has_loop_configure() => {}
        Err(e) => return Err(e),
    }
    // Kernels before 5.8.
    unsafe {
        loop_set_fd(file.as_raw_fd(), backing.as_raw_fd())?;
        let info = LoopInfo64::new(flags & !LO_FLAGS_DIRECT_IO, &options.name);
        if let Err(e) = loop_set_status64(file.as_raw_fd(), &info)
            .and_then(|_| loop_set_block_size(file.as_raw_fd(), options.block_size as libc::c_int))
        {
            let _ = loop_clr_fd(file.as_raw_fd());
            return Err(e);
        }
    }
    Ok(())
}

/// `LOOP_CONFIGURE` arrived in 5.8.
fn kernel_has_loop_configure() -> bool {
    let Ok(release) = std::fs::read_to_string("/proc/sys/kernel/osrelease") else {
        return true;
    };
    let mut parts = release.trim().split(['.', '-']).map(|p| p.parse::<u32>().unwrap_or(0));
    let (major, minor) = (parts.next().unwrap_or(0), parts.next().unwrap_or(0));
    (major, minor) >= (5, 8)
}

fn read_sysfs_flag(index: u32, name: &str) -> bool {
    std::fs::read_to_string(format!("/sys/block/loop{index}/loop/{name}")).is_ok_and(|v| v.trim() == "1")
}

/// True while the loop device still has a backing file.
pub fn backing_attached(index: u32) -> bool {
    Path::new(&format!("/sys/block/loop{index}/loop/backing_file")).exists()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn structures_have_the_kernel_layout() {
        assert_eq!(std::mem::size_of::<LoopInfo64>(), 232);
        assert_eq!(std::mem::size_of::<LoopConfig>(), 304);
        assert_eq!(std::mem::offset_of!(LoopConfig, info), 8);
        assert_eq!(std::mem::offset_of!(LoopInfo64, lo_flags), 52);
        assert_eq!(std::mem::offset_of!(LoopInfo64, lo_file_name), 56);
        assert_eq!(std::mem::offset_of!(LoopInfo64, lo_init), 216);
    }

    #[test]
    fn file_name_is_truncated_and_terminated() {
        let info = LoopInfo64::new(LO_FLAGS_AUTOCLEAR, &"x".repeat(100));
        assert_eq!(info.lo_file_name[62], b'x');
        assert_eq!(info.lo_file_name[63], 0);
        assert_eq!(info.lo_flags, LO_FLAGS_AUTOCLEAR);
    }
}
