//! Files replaced whole or not at all, and durably: written under a
//! temporary name, synced, renamed over the old file, and the directory
//! synced, so a crash leaves the old file or the new one, never half of
//! either, and never loses a rename that was reported done.

use std::io::{self, Write};
use std::path::{Path, PathBuf};

/// Where a replacement of `path` is written before it is renamed into place.
pub fn temporary(path: &Path) -> PathBuf {
    let mut name = path.file_name().expect("a file path").to_os_string();
    name.push(".tmp");
    path.with_file_name(name)
}

/// Replaces `path` with `bytes`.
pub fn replace(path: &Path, bytes: &[u8]) -> io::Result<()> {
    let tmp = temporary(path);
    let mut file = std::fs::File::create(&tmp)?;
    file.write_all(bytes)?;
    file.sync_data()?;
    rename(&tmp, path)
}

/// Renames `tmp` (already synced) over `path`, and makes the rename durable.
pub fn rename(tmp: &Path, path: &Path) -> io::Result<()> {
    std::fs::rename(tmp, path)?;
    sync_dir(path.parent().expect("a file path has a parent"))
}

/// `fsync` a directory so entries created or removed in it are durable.
pub fn sync_dir(dir: &Path) -> io::Result<()> {
    std::fs::File::open(dir)?.sync_all()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_replacement_takes_the_place_of_the_old_file_and_leaves_nothing_beside_it() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("epochs.bin");
        replace(&path, b"old").unwrap();
        replace(&path, b"new").unwrap();
        assert_eq!(std::fs::read(&path).unwrap(), b"new");
        assert_eq!(temporary(&path), dir.path().join("epochs.bin.tmp"));
        let names: Vec<_> = std::fs::read_dir(dir.path()).unwrap().map(|e| e.unwrap().file_name()).collect();
        assert_eq!(names, vec![std::ffi::OsString::from("epochs.bin")]);
    }
}
