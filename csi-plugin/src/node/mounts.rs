//! Mounts: what `/proc/self/mountinfo` says is mounted, and the mount and
//! umount syscalls (through `nix`, on the blocking pool).
//!
//! Every node call checks the mount table before acting instead of
//! trusting its own notes, so a call repeated after a crash between its
//! steps picks up where the first one stopped.

use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};

use nix::errno::Errno;
use nix::mount::{MntFlags, MsFlags};

use crate::error::{CsiError, Result};

pub use nbd_records::mountinfo::MountEntry;

pub fn mount_table() -> Result<Vec<MountEntry>> {
    nbd_records::mountinfo::read().map_err(|e| CsiError::io("reading", "/proc/self/mountinfo", e))
}

/// The path as the mount table spells it: symlinks resolved when it exists.
fn canonical(path: &Path) -> PathBuf {
    std::fs::canonicalize(path).unwrap_or_else(|_| path.to_path_buf())
}

/// The mounts stacked on `path`, bottom first.
pub fn mounts_at(path: &Path) -> Result<Vec<MountEntry>> {
    let wanted = canonical(path);
    Ok(mount_table()?.into_iter().filter(|m| m.mount_point == wanted || m.mount_point == path).collect())
}

/// The topmost mount on `path`, if any.
pub fn mounted_at(path: &Path) -> Result<Option<MountEntry>> {
    Ok(mounts_at(path)?.pop())
}

/// `(major, minor)` of a device number.
pub fn split_dev(dev: u64) -> (u64, u64) {
    (nix::sys::stat::major(dev), nix::sys::stat::minor(dev))
}

/// The device number a block device node stands for.
pub fn device_number(device: &Path) -> Result<u64> {
    let meta = std::fs::metadata(device).map_err(|e| CsiError::io("inspecting", device, e))?;
    if meta.rdev() == 0 {
        return Err(CsiError::Internal(format!("{} is not a device node", device.display())));
    }
    Ok(meta.rdev())
}

/// Whether the filesystem mounted at `path` lives on `device`.
pub fn is_filesystem_of(path: &Path, device: &Path) -> Result<bool> {
    let rdev = device_number(device)?;
    let meta = std::fs::metadata(path).map_err(|e| CsiError::io("inspecting", path, e))?;
    Ok(meta.dev() == rdev)
}

/// Whether `path` is `device` itself (bind-mounted onto a file).
pub fn is_device_node_of(path: &Path, device: &Path) -> Result<bool> {
    let rdev = device_number(device)?;
    let meta = std::fs::metadata(path).map_err(|e| CsiError::io("inspecting", path, e))?;
    Ok(meta.rdev() == rdev)
}

/// Mount points where `device` is in use: its filesystem, or the device
/// node itself bind-mounted onto a file.
pub fn users_of(device: &Path) -> Result<Vec<PathBuf>> {
    let rdev = device_number(device)?;
    let node_fs = std::fs::metadata(device).map_err(|e| CsiError::io("inspecting", device, e))?.dev();
    let name = device.file_name().map(|n| format!("/{}", n.to_string_lossy())).unwrap_or_default();
    let (major, minor) = split_dev(rdev);
    let (node_major, node_minor) = split_dev(node_fs);
    Ok(mount_table()?
        .into_iter()
        .filter(|m| {
            (m.major == major && m.minor == minor)
                || (m.major == node_major && m.minor == node_minor && !name.is_empty() && m.root.ends_with(&name))
        })
        .map(|m| m.mount_point)
        .collect())
}

/// Mount options split into syscall flags and the filesystem's own data.
pub fn split_options(options: &[String]) -> Result<(MsFlags, String)> {
    let mut flags = MsFlags::empty();
    let mut data = Vec::new();
    for option in options.iter().flat_map(|o| o.split(',')).map(str::trim).filter(|o| !o.is_empty()) {
        match option {
            "defaults" | "rw" => {}
            "ro" => flags |= MsFlags::MS_RDONLY,
            "noatime" => flags |= MsFlags::MS_NOATIME,
            "nodiratime" => flags |= MsFlags::MS_NODIRATIME,
            "relatime" => flags |= MsFlags::MS_RELATIME,
            "strictatime" => flags |= MsFlags::MS_STRICTATIME,
            "lazytime" => flags |= MsFlags::MS_LAZYTIME,
            "nosuid" => flags |= MsFlags::MS_NOSUID,
            "nodev" => flags |= MsFlags::MS_NODEV,
            "noexec" => flags |= MsFlags::MS_NOEXEC,
            "sync" => flags |= MsFlags::MS_SYNCHRONOUS,
            "dirsync" => flags |= MsFlags::MS_DIRSYNC,
            "bind" | "rbind" | "remount" | "move" | "loop" | "shared" | "private" | "slave" | "unbindable" => {
                return Err(CsiError::invalid(format!("mount flag {option:?} is not allowed")))
            }
            other => data.push(other.to_string()),
        }
    }
    Ok((flags, data.join(",")))
}

async fn blocking<T: Send + 'static>(f: impl FnOnce() -> Result<T> + Send + 'static) -> Result<T> {
    tokio::task::spawn_blocking(f).await.map_err(|e| CsiError::Internal(format!("mount task failed: {e}")))?
}

/// Mounts the filesystem on `device` at `target`.
pub async fn mount_filesystem(device: &Path, target: &Path, fs_type: &str, options: &[String]) -> Result<()> {
    let (flags, data) = split_options(options)?;
    let (device, target, fs_type) = (device.to_path_buf(), target.to_path_buf(), fs_type.to_string());
    blocking(move || {
        let data = (!data.is_empty()).then_some(data.as_str());
        nix::mount::mount(Some(&device), &target, Some(fs_type.as_str()), flags, data)
            .map_err(|e| CsiError::sys("mounting", &target, e))
    })
    .await
}

/// Bind-mounts `source` (a directory or a device node) onto `target`,
/// read-only if asked.
pub async fn bind(source: &Path, target: &Path, read_only: bool) -> Result<()> {
    let (source, target) = (source.to_path_buf(), target.to_path_buf());
    blocking(move || {
        nix::mount::mount(Some(&source), &target, None::<&str>, MsFlags::MS_BIND, None::<&str>)
            .map_err(|e| CsiError::sys("bind-mounting onto", &target, e))?;
        if read_only {
            let flags = MsFlags::MS_BIND | MsFlags::MS_REMOUNT | MsFlags::MS_RDONLY;
            if let Err(e) = nix::mount::mount(None::<&str>, &target, None::<&str>, flags, None::<&str>) {
                let _ = nix::mount::umount2(&target, MntFlags::empty());
                return Err(CsiError::sys("remounting read-only", &target, e));
            }
        }
        Ok(())
    })
    .await
}

/// Unmounts everything stacked on `target`; nothing mounted is success.
pub async fn unmount_all(target: &Path) -> Result<()> {
    for _ in 0..16 {
        if mounted_at(target)?.is_none() {
            return Ok(());
        }
        let path = target.to_path_buf();
        blocking(move || match nix::mount::umount2(&path, MntFlags::empty()) {
            Ok(()) | Err(Errno::EINVAL) | Err(Errno::ENOENT) => Ok(()),
            Err(Errno::EBUSY) => {
                Err(CsiError::precondition(format!("{} is busy: something still uses it", path.display())))
            }
            Err(e) => Err(CsiError::sys("unmounting", &path, e)),
        })
        .await?;
    }
    Err(CsiError::Internal(format!("{} is still mounted after 16 unmounts", target.display())))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn options_split_into_flags_and_data() {
        let (flags, data) = split_options(&["noatime".into(), "discard,nosuid".into(), "data=ordered".into()]).unwrap();
        assert_eq!(flags, MsFlags::MS_NOATIME | MsFlags::MS_NOSUID);
        assert_eq!(data, "discard,data=ordered");
        assert!(split_options(&["bind".into()]).is_err());
        assert_eq!(split_options(&[]).unwrap(), (MsFlags::empty(), String::new()));
    }

    #[test]
    fn this_process_sees_its_root_mount() {
        let table = mount_table().unwrap();
        assert!(table.iter().any(|m| m.mount_point == Path::new("/")));
        assert!(mounted_at(Path::new("/nonexistent/path")).unwrap().is_none());
    }
}
