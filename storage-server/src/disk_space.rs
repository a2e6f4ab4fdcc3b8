//! How much room the filesystem holding a data directory has.

use std::ffi::CString;
use std::io;
use std::os::unix::ffi::OsStrExt;
use std::path::Path;

/// Bytes of one filesystem, as an unprivileged writer may use them.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct DiskSpace {
    pub free: u64,
    pub size: u64,
}

/// The space of the filesystem holding `path`.
pub fn of(path: &Path) -> io::Result<DiskSpace> {
    let c = CString::new(path.as_os_str().as_bytes()).map_err(io::Error::other)?;
    let mut st: libc::statvfs = unsafe { std::mem::zeroed() };
    // SAFETY: `c` is a valid C string and `st` a valid out-pointer.
    if unsafe { libc::statvfs(c.as_ptr(), &mut st) } != 0 {
        return Err(io::Error::last_os_error());
    }
    let block = st.f_frsize as u64;
    Ok(DiskSpace { free: st.f_bavail as u64 * block, size: st.f_blocks as u64 * block })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn measures_the_filesystem_of_a_directory() {
        let dir = tempfile::tempdir().unwrap();
        let space = of(dir.path()).unwrap();
        assert!(space.size > 0 && space.free <= space.size, "{space:?}");
        assert!(of(&dir.path().join("absent")).is_err());
    }
}
