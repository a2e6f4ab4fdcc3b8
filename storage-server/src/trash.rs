//! Where chunks that metadata no longer references wait before they are
//! deleted: `DATA_DIR/trash/<volume:016x>-<chunk:016x>.<unix secs>.chunk`.
//!
//! Metadata can be wrong about what it references (restored from an old
//! backup, re-initialised, misconfigured), and a deleted chunk cannot come
//! back, so an orphan is moved here and deleted only after a grace period
//! (`--orphan-grace`, 24 h by default). `storage-server trash list` shows
//! what waits; `storage-server trash restore` (server stopped) puts chunks
//! back where the server loads them.
//!
//! The trash keeps only what space allows: a chunk that needs room, and the
//! filesystem's last tenth ([`FREE_FLOOR_DIVISOR`]), take it back from the
//! oldest trash first ([`make_room`]). Live data never fails for lack of
//! space that deleted data holds, and a disk shared with other services is
//! never filled by it.

use std::io;
use std::path::{Path, PathBuf};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use crate::disk_space;
use crate::durable::sync_dir;
use crate::store::chunk::ChunkKey;

pub const DIR: &str = "trash";

/// The trash never holds the last `1 / FREE_FLOOR_DIVISOR` of its filesystem.
pub const FREE_FLOOR_DIVISOR: u64 = 10;

/// One chunk in the trash.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct TrashedChunk {
    pub key: ChunkKey,
    /// When it was moved here, seconds since the epoch.
    pub trashed_at: u64,
    pub path: PathBuf,
    pub bytes: u64,
}

fn now_secs() -> u64 {
    SystemTime::now().duration_since(UNIX_EPOCH).map_or(0, |d| d.as_secs())
}

/// The path `key` takes in the trash of `data_dir`, trashed now.
pub fn path_for(data_dir: &Path, key: ChunkKey) -> PathBuf {
    data_dir.join(DIR).join(format!("{:016x}-{:016x}.{}.chunk", key.volume, key.chunk, now_secs()))
}

fn parse_name(name: &str) -> Option<(ChunkKey, u64)> {
    let stem = name.strip_suffix(".chunk")?;
    let (key, secs) = stem.split_once('.')?;
    let (volume, chunk) = key.split_once('-')?;
    let key = ChunkKey { volume: u64::from_str_radix(volume, 16).ok()?, chunk: u64::from_str_radix(chunk, 16).ok()? };
    Some((key, secs.parse().ok()?))
}

/// Every chunk in the trash of `data_dir`, oldest first.
pub fn list(data_dir: &Path) -> io::Result<Vec<TrashedChunk>> {
    let dir = data_dir.join(DIR);
    let entries = match std::fs::read_dir(&dir) {
        Ok(entries) => entries,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(Vec::new()),
        Err(e) => return Err(e),
    };
    let mut out = Vec::new();
    for entry in entries {
        let entry = entry?;
        let Some((key, trashed_at)) = entry.file_name().to_str().and_then(parse_name) else { continue };
        out.push(TrashedChunk { key, trashed_at, path: entry.path(), bytes: entry.metadata()?.len() });
    }
    out.sort_by_key(|c| (c.trashed_at, c.key.volume, c.key.chunk));
    Ok(out)
}

/// Deletes the chunks trashed longer than `grace` ago; returns them.
pub fn purge(data_dir: &Path, grace: Duration) -> io::Result<Vec<TrashedChunk>> {
    let cutoff = now_secs().saturating_sub(grace.as_secs());
    let expired: Vec<TrashedChunk> = list(data_dir)?.into_iter().filter(|c| c.trashed_at < cutoff).collect();
    for chunk in &expired {
        remove_if_present(&chunk.path)?;
    }
    if !expired.is_empty() {
        sync_dir(&data_dir.join(DIR))?;
    }
    Ok(expired)
}

/// Deletes `path`; false if it was gone already (the grace period and
/// [`make_room`] may both be deleting).
fn remove_if_present(path: &Path) -> io::Result<bool> {
    match std::fs::remove_file(path) {
        Ok(()) => Ok(true),
        Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(false),
        Err(e) => Err(e),
    }
}

/// Deletes the oldest chunks of the trash, grace period or not, until the
/// filesystem of `data_dir` has `wanted` bytes free or the trash is empty;
/// returns those deleted.
pub fn make_room(data_dir: &Path, wanted: u64) -> io::Result<Vec<TrashedChunk>> {
    let mut deleted = Vec::new();
    if disk_space::of(data_dir)?.free >= wanted {
        return Ok(deleted);
    }
    let mut trashed = list(data_dir)?.into_iter();
    while disk_space::of(data_dir)?.free < wanted {
        let Some(chunk) = trashed.next() else { break };
        if remove_if_present(&chunk.path)? {
            deleted.push(chunk);
        }
    }
    if !deleted.is_empty() {
        sync_dir(&data_dir.join(DIR))?;
    }
    Ok(deleted)
}

/// [`make_room`] for the filesystem's last tenth.
pub fn keep_free_floor(data_dir: &Path) -> io::Result<Vec<TrashedChunk>> {
    make_room(data_dir, disk_space::of(data_dir)?.size / FREE_FLOOR_DIVISOR)
}

/// Logs chunks [`make_room`] deleted, and why their space was needed.
pub fn log_early_deletions(deleted: &[TrashedChunk], reason: &str) {
    for chunk in deleted {
        tracing::warn!(chunk = %chunk.key, bytes = chunk.bytes, reason,
            "deleted a chunk from the trash before its grace period ended");
    }
}

/// Bytes the trash of `data_dir` holds.
pub fn bytes(data_dir: &Path) -> io::Result<u64> {
    Ok(list(data_dir)?.iter().map(|c| c.bytes).sum())
}

/// Moves trashed chunks that pass `keep` back to where the server loads
/// them (the server must be stopped). A chunk whose key exists again is
/// left in the trash and reported as an error. Returns those restored.
pub fn restore(
    data_dir: &Path,
    chunks_path: impl Fn(ChunkKey) -> PathBuf,
    keep: impl Fn(&TrashedChunk) -> bool,
) -> io::Result<Vec<TrashedChunk>> {
    let mut restored = Vec::new();
    // Newest last: if a chunk was trashed twice, the newest copy wins.
    for chunk in list(data_dir)?.into_iter().filter(|c| keep(c)) {
        let target = chunks_path(chunk.key);
        if target.exists() {
            return Err(io::Error::other(format!(
                "chunk {} exists in the store; {} stays in the trash",
                chunk.key,
                chunk.path.display()
            )));
        }
        let parent = target.parent().expect("chunk path has a parent");
        std::fs::create_dir_all(parent)?;
        std::fs::rename(&chunk.path, &target)?;
        sync_dir(parent)?;
        restored.push(chunk);
    }
    if !restored.is_empty() {
        sync_dir(&data_dir.join(DIR))?;
    }
    Ok(restored)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_round_trip_and_purge_keeps_recent_chunks() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::create_dir_all(dir.path().join(DIR)).unwrap();
        let key = ChunkKey { volume: 0x2a, chunk: 7 };
        let fresh = path_for(dir.path(), key);
        std::fs::write(&fresh, b"fresh").unwrap();
        let old = dir.path().join(DIR).join(format!("{:016x}-{:016x}.{}.chunk", 0x2a, 8, now_secs() - 3600));
        std::fs::write(&old, b"old").unwrap();
        std::fs::write(dir.path().join(DIR).join("stray-file"), b"").unwrap();

        let listed = list(dir.path()).unwrap();
        assert_eq!(listed.iter().map(|c| c.key.chunk).collect::<Vec<_>>(), vec![8, 7]);
        let purged = purge(dir.path(), Duration::from_secs(60)).unwrap();
        assert_eq!(purged.len(), 1);
        assert!(!old.exists() && fresh.exists());

        let chunks = dir.path().join("chunks");
        let at = |k: ChunkKey| chunks.join(format!("{:016x}", k.volume)).join(format!("{:016x}.chunk", k.chunk));
        let restored = restore(dir.path(), at, |_| true).unwrap();
        assert_eq!(restored.len(), 1);
        assert_eq!(std::fs::read(at(key)).unwrap(), b"fresh");
        assert!(list(dir.path()).unwrap().is_empty());
    }

    #[test]
    fn making_room_deletes_the_oldest_trash_first() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::create_dir_all(dir.path().join(DIR)).unwrap();
        for (chunk, age) in [(1, 30), (2, 20), (3, 10)] {
            let name = format!("{:016x}-{:016x}.{}.chunk", 0x2a, chunk, now_secs() - age);
            std::fs::write(dir.path().join(DIR).join(name), b"trashed").unwrap();
        }
        assert_eq!(bytes(dir.path()).unwrap(), 21);
        // Room already there: nothing goes.
        assert!(make_room(dir.path(), 0).unwrap().is_empty());
        // Room the disk cannot have: everything goes, oldest first.
        let deleted = make_room(dir.path(), u64::MAX).unwrap();
        assert_eq!(deleted.iter().map(|c| c.key.chunk).collect::<Vec<_>>(), vec![1, 2, 3]);
        assert!(list(dir.path()).unwrap().is_empty());
    }
}
