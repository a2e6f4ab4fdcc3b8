//! The fallback for hosts without the nbd driver: the volume becomes a file
//! on a private FUSE mount ([`fuse_fs`](super::fuse_fs)) and a loop device
//! with direct I/O turns that file into a real block device.
//!
//! Deadlock safety: the FUSE session runs on its own threads, which only
//! parse requests and hand them to the tokio runtime; nothing the loop
//! device waits for ever runs on a thread that waits for the loop device.

use std::fs::{File, OpenOptions};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use fuser::{BackgroundSession, MountOption, Session, SessionACL};
use tokio::runtime::Handle;
use tracing::{debug, info, warn};

use crate::attach::fuse_fs::{VolumeFs, VOLUME_FILE};
use crate::attach::loop_dev::{set_capacity, LoopDevice, LoopOptions};
use crate::attach::AttachError;
use volume_engine::export::BlockExport;

/// How long detach waits for the loop device to let go of the file.
const RELEASE_TIMEOUT: Duration = Duration::from_secs(30);
/// How long growing waits for the FUSE file to report the new size.
const GROW_TIMEOUT: Duration = Duration::from_secs(10);

static MOUNT_SEQ: AtomicU64 = AtomicU64::new(0);

#[derive(Debug, Clone)]
pub(crate) struct FuseLoopOptions {
    /// Directory holding one mount point per attachment.
    pub fuse_root: PathBuf,
    /// Names the mount point and the loop device (the volume id).
    pub name: String,
    pub block_size: u32,
    pub read_only: bool,
}

/// A mounted volume file with a loop device on it.
pub(crate) struct FuseLoop {
    mountpoint: PathBuf,
    session: Option<BackgroundSession>,
    loop_dev: Option<LoopDevice>,
    loop_path: PathBuf,
    loop_index: u32,
    direct_io: bool,
}

impl FuseLoop {
    /// Mounts the file system, then attaches a loop device to the file.
    /// Blocking: call it off the async runtime (it waits for FUSE requests
    /// that the runtime serves).
    pub fn attach<E: BlockExport>(
        export: Arc<E>,
        runtime: Handle,
        options: &FuseLoopOptions,
    ) -> Result<Self, AttachError> {
        remove_stale_mounts(&options.fuse_root);
        let mountpoint = options.fuse_root.join(format!(
            "{}-{}-{}",
            sanitize(&options.name),
            std::process::id(),
            MOUNT_SEQ.fetch_add(1, Ordering::Relaxed)
        ));
        std::fs::create_dir_all(&mountpoint)
            .map_err(|e| AttachError::io(format!("creating {}", mountpoint.display()), e))?;

        let mut config = fuser::Config::default();
        config.mount_options = vec![
            MountOption::FSName(format!("ballast:{}", options.name)),
            MountOption::Subtype("ballast".into()),
            MountOption::NoDev,
            MountOption::NoSuid,
            MountOption::NoExec,
            MountOption::NoAtime,
            MountOption::DefaultPermissions,
            if options.read_only { MountOption::RO } else { MountOption::RW },
        ];
        config.acl = SessionACL::Owner;
        config.n_threads = Some(1);
        let fs = VolumeFs::new(export, runtime, options.read_only);
        let session = match Session::new(fs, &mountpoint, &config) {
            Ok(session) => session,
            Err(source) => {
                let _ = std::fs::remove_dir(&mountpoint);
                return Err(AttachError::FuseMount { path: mountpoint, source });
            }
        };
        let session = session.spawn().map_err(|source| AttachError::FuseMount { path: mountpoint.clone(), source })?;
        // From here on, Drop undoes whatever was set up.
        let mut attached = Self {
            mountpoint,
            session: Some(session),
            loop_dev: None,
            loop_path: PathBuf::new(),
            loop_index: 0,
            direct_io: false,
        };

        let file_path = attached.mountpoint.join(VOLUME_FILE);
        let file = OpenOptions::new()
            .read(true)
            .write(!options.read_only)
            .open(&file_path)
            .map_err(|e| AttachError::io(format!("opening {}", file_path.display()), e))?;
        let loop_dev = LoopDevice::attach(
            &file,
            &LoopOptions {
                block_size: options.block_size,
                read_only: options.read_only,
                direct_io: true,
                name: format!("ballast:{}", options.name),
            },
        )?;
        // The loop device holds its own reference to the file.
        drop(file);
        attached.loop_path = loop_dev.path().to_path_buf();
        attached.loop_index = loop_dev.index();
        attached.direct_io = loop_dev.direct_io();
        attached.loop_dev = Some(loop_dev);
        info!(
            device = %attached.loop_path.display(),
            mountpoint = %attached.mountpoint.display(),
            direct_io = attached.direct_io,
            "volume attached through FUSE and a loop device"
        );
        Ok(attached)
    }

    pub fn path(&self) -> &Path {
        &self.loop_path
    }

    pub fn loop_index(&self) -> u32 {
        self.loop_index
    }

    pub fn direct_io(&self) -> bool {
        self.direct_io
    }

    pub fn mountpoint(&self) -> &Path {
        &self.mountpoint
    }

    /// What [`grow`] needs, owned so that it can run on a blocking thread.
    pub fn grow_handles(&self) -> Result<(PathBuf, File, PathBuf), AttachError> {
        let loop_dev = self.loop_dev.as_ref().ok_or(AttachError::Unsupported("the loop device is detached"))?;
        Ok((self.mountpoint.join(VOLUME_FILE), loop_dev.handle()?, self.loop_path.clone()))
    }

    /// Removes the loop device, then unmounts the file system. On
    /// [`AttachError::Busy`] nothing changed and detach may be retried.
    /// Blocking.
    pub fn detach(&mut self) -> Result<(), AttachError> {
        if let Some(loop_dev) = self.loop_dev.take() {
            if let Err(e) = loop_dev.check_not_busy() {
                self.loop_dev = Some(loop_dev);
                return Err(e);
            }
            loop_dev.detach(RELEASE_TIMEOUT)?;
        }
        if let Some(session) = self.session.take() {
            if let Err(failed) = unmount(session, &self.mountpoint) {
                let (session, e) = *failed;
                self.session = Some(session);
                return Err(e);
            }
        }
        match std::fs::remove_dir(&self.mountpoint) {
            Ok(()) => {}
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
            Err(e) => warn!(path = %self.mountpoint.display(), error = %e, "cannot remove FUSE mount point"),
        }
        debug!(device = %self.loop_path.display(), "FUSE+loop attachment removed");
        Ok(())
    }
}

impl Drop for FuseLoop {
    fn drop(&mut self) {
        if self.loop_dev.is_none() && self.session.is_none() {
            return;
        }
        let Err(e) = self.detach() else {
            return;
        };
        warn!(device = %self.loop_path.display(), error = %e, "cannot detach on drop; leaving it to autoclear");
        // The loop device is still in use. Closing our descriptor (below)
        // lets autoclear remove it once its user lets go; meanwhile the FUSE
        // threads keep serving it, and a lazy unmount keeps the file system
        // from lingering as a stale mount after they are gone.
        let _ = nix::mount::umount2(&self.mountpoint, nix::mount::MntFlags::MNT_DETACH);
        if let Some(session) = self.session.take() {
            // Joining would wait for the loop device's user; the session
            // threads exit by themselves when the last reference goes.
            std::mem::forget(session);
        }
        let _ = std::fs::remove_dir(&self.mountpoint);
    }
}

/// Makes the loop device on `volume_file` as large as the export now is
/// (`size` bytes). The kernel caches the FUSE file's attributes for
/// [`ATTR_TTL`](super::fuse_fs::ATTR_TTL), and discards a fresh size that
/// races a write, so this asks again until the file reports `size`, then
/// has the loop device re-read it. Blocking.
pub(crate) fn grow(volume_file: &Path, loop_file: &File, loop_path: &Path, size: u64) -> Result<(), AttachError> {
    let deadline = Instant::now() + GROW_TIMEOUT;
    loop {
        let seen = std::fs::metadata(volume_file)
            .map_err(|e| AttachError::io(format!("stat {}", volume_file.display()), e))?
            .len();
        if seen >= size {
            break;
        }
        if Instant::now() >= deadline {
            return Err(AttachError::io(
                format!("growing {}", loop_path.display()),
                std::io::Error::new(
                    std::io::ErrorKind::TimedOut,
                    format!("the FUSE file still reports {seen} bytes, not {size}"),
                ),
            ));
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    set_capacity(loop_file, loop_path)
}

/// Unmounts, retrying briefly while the kernel still holds the file, then
/// waits for the FUSE threads to exit. On failure the session comes back so
/// that the mount keeps working and detach can be retried.
fn unmount(session: BackgroundSession, mountpoint: &Path) -> Result<(), Box<(BackgroundSession, AttachError)>> {
    let mut last = None;
    for _ in 0..50 {
        match nix::mount::umount2(mountpoint, nix::mount::MntFlags::empty()) {
            Ok(()) | Err(nix::errno::Errno::EINVAL) | Err(nix::errno::Errno::ENOENT) => {
                last = None;
                break;
            }
            Err(e) => {
                last = Some(e);
                std::thread::sleep(Duration::from_millis(100));
            }
        }
    }
    if let Some(e) = last {
        return Err(Box::new((session, AttachError::FuseUnmount { path: mountpoint.to_path_buf(), source: e.into() })));
    }
    // Unmounted: the session threads see the device go away and exit.
    if let Err(e) = session.join() {
        warn!(path = %mountpoint.display(), error = %e, "FUSE session ended with an error");
    }
    Ok(())
}

/// Mount point names keep to a safe alphabet.
fn sanitize(name: &str) -> String {
    let cleaned: String =
        name.chars().map(|c| if c.is_ascii_alphanumeric() || "._-".contains(c) { c } else { '_' }).take(64).collect();
    if cleaned.is_empty() {
        "volume".into()
    } else {
        cleaned
    }
}

/// Cleans up after crashed processes: a FUSE mount whose server died
/// answers `ENOTCONN`; an empty mount point whose process is gone is junk.
fn remove_stale_mounts(root: &Path) {
    let Ok(entries) = std::fs::read_dir(root) else {
        return;
    };
    for entry in entries.flatten() {
        let path = entry.path();
        let owner_alive = path
            .file_name()
            .and_then(|n| n.to_str())
            .and_then(|n| n.rsplit('-').nth(1))
            .and_then(|pid| pid.parse::<u32>().ok())
            .is_some_and(|pid| Path::new(&format!("/proc/{pid}")).exists());
        if owner_alive {
            continue;
        }
        match std::fs::metadata(&path) {
            Err(e) if e.raw_os_error() == Some(libc::ENOTCONN) => {
                warn!(path = %path.display(), "removing stale FUSE mount of a dead process");
                let _ = nix::mount::umount2(&path, nix::mount::MntFlags::MNT_DETACH);
                let _ = std::fs::remove_dir(&path);
            }
            Ok(meta) if meta.is_dir() => {
                let _ = std::fs::remove_dir(&path);
            }
            _ => {}
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn mount_point_names_are_sanitized() {
        assert_eq!(sanitize("vol-0001"), "vol-0001");
        assert_eq!(sanitize("a/b c"), "a_b_c");
        assert_eq!(sanitize(""), "volume");
        assert_eq!(sanitize(&"x".repeat(100)).len(), 64);
    }

    #[test]
    fn stale_directories_of_dead_processes_are_removed() {
        let root = tempfile::tempdir().unwrap();
        let live = root.path().join(format!("vol-{}-0", std::process::id()));
        // pid_max is at most 2^22: this pid cannot exist.
        let dead = root.path().join("vol-4294967-0");
        std::fs::create_dir(&live).unwrap();
        std::fs::create_dir(&dead).unwrap();
        remove_stale_mounts(root.path());
        assert!(live.exists());
        assert!(!dead.exists());
    }
}
