//! The activity log: which regions of which chunks may hold changes that are
//! not durable, so a restarted server knows what to resync from its peers
//! (DRBD's activity log, at 4 MiB region granularity).
//!
//! A region is marked dirty durably before the first write into it, and
//! marked clean after a flush that covered all its writes. The log is a file
//! of 32-byte checksummed records (dirty / clean) replayed at startup: the
//! regions still dirty then are *recovered* regions, listed by
//! `DIRTY_REGIONS` and kept (across further restarts too) until a client
//! clears them after resyncing. Concurrent writers share one append + fsync
//! (group commit); clean records ride along without a sync of their own,
//! since losing one only causes an unneeded resync.

use std::collections::HashMap;
use std::io::{self, Read, Write};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

use tokio::sync::{watch, Notify};
use tokio::task::JoinHandle;

use crate::durable;
use crate::error::StoreError;
use crate::metrics::metrics;
use crate::store::chunk::{ChunkKey, REGION_SIZE};

const RECORD_LEN: usize = 32;
const DIRTY: u8 = 1;
const CLEAN: u8 = 2;
/// Rewrite the log from the in-memory set once it holds this many records.
const COMPACT_AT: u64 = 64 * 1024;

/// One region of one chunk.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct RegionKey {
    pub chunk: ChunkKey,
    pub region: u32,
}

impl RegionKey {
    pub fn offset(&self) -> u64 {
        u64::from(self.region) * REGION_SIZE
    }
}

#[derive(Clone, Copy, Debug)]
struct Region {
    /// Log batch carrying this region's dirty record.
    durable_batch: u64,
    inflight: u32,
    /// Change counter value of the latest write that began here.
    last_write: u64,
    /// Written since the last flush that covered it.
    unflushed: bool,
    /// Dirty when the server started: needs a resync.
    recovered: bool,
}

#[derive(Clone, Debug, Default)]
struct Synced {
    batch: u64,
    failed: Option<String>,
}

struct State {
    regions: HashMap<RegionKey, Region>,
    pending: Vec<u8>,
    pending_needs_sync: bool,
    /// Batch the current `pending` records will be written in.
    batch: u64,
    records_in_file: u64,
    changes: u64,
    closed: bool,
}

struct Inner {
    path: PathBuf,
    state: Mutex<State>,
    wake: Notify,
    synced: watch::Sender<Synced>,
}

pub struct ActivityLog {
    inner: Arc<Inner>,
    syncer: Mutex<Option<JoinHandle<()>>>,
}

/// Regions a flush may mark clean once it completes.
pub struct FlushSnapshot(Vec<(RegionKey, u64)>);

/// Keeps the regions of one in-flight change marked busy.
pub struct WriteGuard {
    inner: Arc<Inner>,
    chunk: ChunkKey,
    regions: std::ops::Range<u32>,
}

impl Drop for WriteGuard {
    fn drop(&mut self) {
        let mut state = self.inner.lock();
        for region in self.regions.clone() {
            if let Some(r) = state.regions.get_mut(&RegionKey { chunk: self.chunk, region }) {
                r.inflight = r.inflight.saturating_sub(1);
            }
        }
    }
}

fn encode(kind: u8, key: RegionKey, out: &mut Vec<u8>) {
    let start = out.len();
    out.push(kind);
    out.extend_from_slice(&[0; 3]);
    out.extend_from_slice(&key.region.to_le_bytes());
    out.extend_from_slice(&key.chunk.volume.to_le_bytes());
    out.extend_from_slice(&key.chunk.chunk.to_le_bytes());
    out.extend_from_slice(&[0; 4]);
    let crc = crc32fast::hash(&out[start..]);
    out.extend_from_slice(&crc.to_le_bytes());
}

fn decode(rec: &[u8]) -> Option<(u8, RegionKey)> {
    let crc = u32::from_le_bytes(rec[28..32].try_into().ok()?);
    if crc != crc32fast::hash(&rec[..28]) {
        return None;
    }
    let key = RegionKey {
        region: u32::from_le_bytes(rec[4..8].try_into().ok()?),
        chunk: ChunkKey {
            volume: u64::from_le_bytes(rec[8..16].try_into().ok()?),
            chunk: u64::from_le_bytes(rec[16..24].try_into().ok()?),
        },
    };
    matches!(rec[0], DIRTY | CLEAN).then_some((rec[0], key))
}

/// Rewrites the log to hold exactly `regions`, atomically; returns the
/// append handle of the new file.
fn rewrite(path: &Path, regions: &[RegionKey]) -> io::Result<std::fs::File> {
    let mut image = Vec::with_capacity(regions.len() * RECORD_LEN);
    for key in regions {
        encode(DIRTY, *key, &mut image);
    }
    durable::replace(path, &image)?;
    std::fs::OpenOptions::new().append(true).open(path)
}

impl Inner {
    fn lock(&self) -> std::sync::MutexGuard<'_, State> {
        self.state.lock().expect("activity log poisoned")
    }
}

impl ActivityLog {
    /// Replays the log at `path` (regions found dirty become recovered),
    /// compacts it and starts the sync task.
    pub fn open(path: &Path) -> io::Result<ActivityLog> {
        let mut bytes = Vec::new();
        match std::fs::File::open(path) {
            Ok(mut f) => {
                f.read_to_end(&mut bytes)?;
            }
            Err(e) if e.kind() == io::ErrorKind::NotFound => {}
            Err(e) => return Err(e),
        }
        let mut dirty = std::collections::BTreeSet::new();
        // A torn or garbled record ends the log: it was never acknowledged.
        for rec in bytes.chunks_exact(RECORD_LEN) {
            match decode(rec) {
                Some((DIRTY, key)) => dirty.insert(key),
                Some((_, key)) => dirty.remove(&key),
                None => break,
            };
        }
        let keys: Vec<RegionKey> = dirty.into_iter().collect();
        let file = rewrite(path, &keys)?;
        let regions: HashMap<RegionKey, Region> = keys
            .iter()
            .map(|k| {
                let region = Region { durable_batch: 0, inflight: 0, last_write: 0, unflushed: false, recovered: true };
                (*k, region)
            })
            .collect();
        metrics().dirty_regions.set(regions.len() as i64);
        let inner = Arc::new(Inner {
            path: path.to_owned(),
            state: Mutex::new(State {
                records_in_file: keys.len() as u64,
                regions,
                pending: Vec::new(),
                pending_needs_sync: false,
                batch: 1,
                changes: 0,
                closed: false,
            }),
            wake: Notify::new(),
            synced: watch::Sender::new(Synced::default()),
        });
        let syncer = tokio::spawn(sync_task(inner.clone(), file));
        Ok(ActivityLog { inner, syncer: Mutex::new(Some(syncer)) })
    }

    /// Marks the regions of `offset..offset + len` dirty, durably, before a
    /// change to them; the guard marks the change finished when dropped.
    pub async fn begin_write(&self, chunk: ChunkKey, offset: u64, len: u64) -> Result<WriteGuard, StoreError> {
        let regions =
            if len == 0 { 0..0 } else { (offset / REGION_SIZE) as u32..((offset + len - 1) / REGION_SIZE) as u32 + 1 };
        if let Some(reason) = &self.inner.synced.borrow().failed {
            return Err(StoreError::io("activity log", io::Error::other(reason.clone())));
        }
        let needed = {
            let mut state = self.inner.lock();
            if state.closed {
                return Err(StoreError::ShuttingDown);
            }
            let mut needed = 0;
            for region in regions.clone() {
                let key = RegionKey { chunk, region };
                state.changes += 1;
                let (changes, batch) = (state.changes, state.batch);
                let State { regions: map, pending, .. } = &mut *state;
                let r = map.entry(key).or_insert_with(|| {
                    encode(DIRTY, key, pending);
                    Region { durable_batch: batch, inflight: 0, last_write: 0, unflushed: false, recovered: false }
                });
                r.inflight += 1;
                r.last_write = changes;
                r.unflushed = true;
                needed = needed.max(r.durable_batch);
                if r.durable_batch == batch {
                    state.pending_needs_sync = true;
                }
            }
            metrics().dirty_regions.set(state.regions.len() as i64);
            needed
        };
        let guard = WriteGuard { inner: self.inner.clone(), chunk, regions };
        if self.inner.synced.borrow().batch < needed {
            self.inner.wake.notify_one();
            let mut rx = self.inner.synced.subscribe();
            let synced =
                rx.wait_for(|s| s.batch >= needed || s.failed.is_some()).await.map_err(|_| StoreError::ShuttingDown)?;
            if let Some(reason) = &synced.failed {
                return Err(StoreError::io("activity log", io::Error::other(reason.clone())));
            }
        }
        Ok(guard)
    }

    /// Regions whose writes have all completed: a flush that starts after
    /// this call covers them.
    pub fn flush_snapshot(&self, volume: Option<u64>) -> FlushSnapshot {
        let state = self.inner.lock();
        FlushSnapshot(
            state
                .regions
                .iter()
                .filter(|(k, r)| r.unflushed && r.inflight == 0 && volume.is_none_or(|v| v == k.chunk.volume))
                .map(|(k, r)| (*k, r.last_write))
                .collect(),
        )
    }

    /// After a flush: regions not written since the snapshot are clean
    /// (recovered ones stay listed until cleared).
    pub fn complete_flush(&self, snapshot: FlushSnapshot) {
        let mut state = self.inner.lock();
        let mut cleaned = false;
        for (key, last_write) in snapshot.0 {
            let Some(r) = state.regions.get_mut(&key) else { continue };
            if r.last_write != last_write || r.inflight != 0 {
                continue;
            }
            if r.recovered {
                r.unflushed = false;
            } else {
                state.regions.remove(&key);
                encode(CLEAN, key, &mut state.pending);
                cleaned = true;
            }
        }
        metrics().dirty_regions.set(state.regions.len() as i64);
        drop(state);
        if cleaned {
            self.inner.wake.notify_one();
        }
    }

    /// Every listed region of `volume` (or all), sorted, with whether it is recovered.
    pub fn regions(&self, volume: Option<u64>) -> Vec<(RegionKey, bool)> {
        let state = self.inner.lock();
        let mut out: Vec<(RegionKey, bool)> = state
            .regions
            .iter()
            .filter(|(k, _)| volume.is_none_or(|v| v == k.chunk.volume))
            .map(|(k, r)| (*k, r.recovered))
            .collect();
        out.sort_unstable();
        out
    }

    /// Number of listed regions of one chunk.
    pub fn count_for(&self, chunk: ChunkKey) -> usize {
        self.inner.lock().regions.keys().filter(|k| k.chunk == chunk).count()
    }

    /// Marks the region holding `offset` of `chunk` as recovered: its copy
    /// here is suspect (a block failed its checksum) and is rebuilt from a
    /// peer by the repair loop, as after a crash. Kept in memory only: a
    /// restarted server finds the bad block again on its next read or scrub.
    pub fn mark_suspect(&self, chunk: ChunkKey, offset: u64) {
        let key = RegionKey { chunk, region: (offset / REGION_SIZE) as u32 };
        let mut state = self.inner.lock();
        // As a region replayed at startup: nothing of it waits for a sync.
        let region = state.regions.entry(key).or_insert_with(|| Region {
            durable_batch: 0,
            inflight: 0,
            last_write: 0,
            unflushed: false,
            recovered: true,
        });
        region.recovered = true;
    }

    /// Forgets that the chunk's recovered regions in `offset..offset + len`
    /// need a resync (they have been rewritten from a peer and flushed).
    pub fn clear_recovered(&self, chunk: ChunkKey, offset: u64, len: u64) {
        let first = offset / REGION_SIZE;
        let end = (offset + len).div_ceil(REGION_SIZE);
        self.remove_where(|k, r| {
            if k.chunk != chunk || u64::from(k.region) < first || u64::from(k.region) >= end {
                return false;
            }
            r.recovered = false;
            !r.unflushed && r.inflight == 0
        });
    }

    /// Forgets every region of chunks `keep` rejects (deleted chunks).
    pub fn retain_chunks(&self, keep: impl Fn(ChunkKey) -> bool) {
        self.remove_where(|k, _| !keep(k.chunk));
    }

    fn remove_where(&self, mut remove: impl FnMut(&RegionKey, &mut Region) -> bool) {
        let mut state = self.inner.lock();
        let mut gone = Vec::new();
        for (k, r) in state.regions.iter_mut() {
            if remove(k, r) {
                gone.push(*k);
            }
        }
        for key in &gone {
            state.regions.remove(key);
            encode(CLEAN, *key, &mut state.pending);
        }
        metrics().dirty_regions.set(state.regions.len() as i64);
        drop(state);
        if !gone.is_empty() {
            self.inner.wake.notify_one();
        }
    }

    /// Writes and syncs the remaining records, then stops the sync task.
    pub async fn close(&self) {
        self.inner.lock().closed = true;
        self.inner.wake.notify_one();
        let syncer = self.syncer.lock().expect("activity log poisoned").take();
        if let Some(syncer) = syncer {
            let _ = syncer.await;
        }
    }
}

impl Drop for ActivityLog {
    /// Without `close`, the sync task still writes what is pending, then ends.
    fn drop(&mut self) {
        self.inner.lock().closed = true;
        self.inner.wake.notify_one();
    }
}

enum Job {
    Append(Vec<u8>, bool),
    Rewrite(Vec<RegionKey>),
}

async fn sync_task(inner: Arc<Inner>, file: std::fs::File) {
    let mut file = Some(file);
    loop {
        let next = {
            let mut state = inner.lock();
            if state.pending.is_empty() {
                if state.closed {
                    return;
                }
                None
            } else {
                let batch = state.batch;
                state.batch += 1;
                let records = (state.pending.len() / RECORD_LEN) as u64;
                let bytes = std::mem::take(&mut state.pending);
                let sync = std::mem::take(&mut state.pending_needs_sync) || state.closed;
                let job = if state.records_in_file + records > COMPACT_AT {
                    let keys: Vec<RegionKey> = state.regions.keys().copied().collect();
                    state.records_in_file = keys.len() as u64;
                    Job::Rewrite(keys)
                } else {
                    state.records_in_file += records;
                    Job::Append(bytes, sync)
                };
                Some((batch, job))
            }
        };
        let Some((batch, job)) = next else {
            inner.wake.notified().await;
            continue;
        };
        let mut f = file.take().expect("log file present");
        let path = inner.path.clone();
        let result = tokio::task::spawn_blocking(move || {
            let outcome = match job {
                Job::Append(bytes, sync) => {
                    f.write_all(&bytes).and_then(|()| if sync { f.sync_data() } else { Ok(()) })
                }
                Job::Rewrite(keys) => rewrite(&path, &keys).map(|new| f = new),
            };
            (f, outcome)
        })
        .await;
        match result {
            Ok((f, Ok(()))) => {
                file = Some(f);
                inner.synced.send_modify(|s| s.batch = batch);
            }
            Ok((_, Err(e))) => return fail(&inner, format!("writing the activity log failed: {e}")),
            Err(e) => return fail(&inner, format!("activity log task failed: {e}")),
        }
    }
}

/// A log that cannot be written fails every write from now on.
fn fail(inner: &Inner, reason: String) {
    tracing::error!(%reason, "activity log disabled; writes will fail");
    inner.lock().closed = true;
    inner.synced.send_modify(|s| s.failed = Some(reason));
}

#[cfg(test)]
mod tests {
    use super::*;

    fn key(volume: u64, chunk: u64) -> ChunkKey {
        ChunkKey { volume, chunk }
    }

    #[tokio::test]
    async fn dirty_regions_survive_restart_and_clear_after_flush() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("activity.log");
        let log = ActivityLog::open(&path).unwrap();
        let g = log.begin_write(key(1, 2), REGION_SIZE - 4096, 8192).await.unwrap();
        assert_eq!(log.regions(None).len(), 2, "a write across a boundary dirties two regions");
        let snap = log.flush_snapshot(None);
        assert!(snap.0.is_empty(), "regions with writes in flight are not cleaned");
        drop(g);
        let g2 = log.begin_write(key(1, 3), 0, 4096).await.unwrap();
        drop(g2);
        let snap = log.flush_snapshot(Some(1));
        let _late = log.begin_write(key(1, 3), 0, 4096).await.unwrap();
        log.complete_flush(snap);
        let left: Vec<_> = log.regions(None).into_iter().map(|(k, _)| k.chunk).collect();
        assert_eq!(left, vec![key(1, 3)], "a region written after the snapshot stays dirty");
        drop(_late);
        log.close().await;

        let log = ActivityLog::open(&path).unwrap();
        let regions = log.regions(None);
        assert_eq!(regions.len(), 1);
        assert!(regions[0].1, "dirty at restart means recovered");
        let snap = log.flush_snapshot(None);
        log.complete_flush(snap);
        assert_eq!(log.regions(None).len(), 1, "recovered regions stay until cleared");
        log.clear_recovered(key(1, 3), 0, 0);
        assert_eq!(log.regions(None).len(), 1, "zero length clears nothing");
        log.clear_recovered(key(1, 3), 0, REGION_SIZE);
        assert!(log.regions(None).is_empty());
        log.close().await;
        let log = ActivityLog::open(&path).unwrap();
        assert!(log.regions(None).is_empty());
        log.close().await;
    }

    #[tokio::test]
    async fn torn_tail_is_ignored() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("activity.log");
        let mut bytes = Vec::new();
        encode(DIRTY, RegionKey { chunk: key(5, 6), region: 1 }, &mut bytes);
        encode(DIRTY, RegionKey { chunk: key(5, 6), region: 2 }, &mut bytes);
        bytes.truncate(bytes.len() - 5);
        std::fs::write(&path, &bytes).unwrap();
        let log = ActivityLog::open(&path).unwrap();
        assert_eq!(log.regions(None).len(), 1);
        log.close().await;
    }
}
