//! The chunk store: every chunk of this server, the rules each operation
//! follows (alignment, checksums, fencing, generations, activity log), and
//! durability through flushes.
//!
//! Files under the data directory:
//!
//! ```text
//! chunks/<volume:016x>/<chunk:016x>.chunk   one file per chunk (see `chunk`)
//! activity.log                              dirty regions (see `activity_log`)
//! epochs                                    newest epoch per volume (see `fencing`)
//! ```

pub mod backend;
pub mod bitmap;
pub mod buf;
pub mod chunk;
pub mod pause;

use std::collections::HashMap;
use std::io;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, RwLock};
use std::time::Duration;

use ballast_proto::frame::{
    first_bad_block, Checksums, ChunkEntry, ChunkInfo, DirtyRegion, BAD_BLOCK_HASH, BLOCK_SIZE, DIRTY_RECOVERED,
    MAX_DATA,
};
use bytes::Bytes;

use crate::activity_log::ActivityLog;
use crate::error::StoreError;
use crate::fencing::Fencing;
use crate::metrics::metrics;
use backend::{IoBackend, PUNCH_HOLE, ZERO_RANGE};
use ballast_proto::range_lock::RangeGuard;
use buf::BufPool;
use chunk::{Chunk, ChunkKey, MAX_CHUNK_SIZE, REGION_SIZE};

use crate::durable::sync_dir;
use crate::{disk_space, trash};
use pause::Pauses;

/// The pause holder a fence drains with (holders of snapshots and rebuilds
/// are chosen by their coordinators and are never this).
const FENCE_HOLDER: u64 = u64::MAX;
/// How long a fence waits for the changes in flight to finish.
const FENCE_DRAIN: Duration = Duration::from_secs(30);
/// Free space kept beyond a new chunk file, for the filesystem's own
/// bookkeeping of it (extent blocks, directory entries).
const ROOM_SLACK: u64 = 1 << 20;

/// What a change must prove: the attachment epoch and the chunk generation.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Fence {
    pub epoch: u64,
    pub generation: u64,
    /// Sent by the holder of the volume's pause (`FLAG_PAUSE_HOLDER`): the
    /// change passes the pause.
    pub holds_pause: bool,
}

/// How a range is zeroed.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ZeroMode {
    /// Release the space (`TRIM`, `WRITE_ZEROES`).
    Deallocate,
    /// Keep the space allocated (`WRITE_ZEROES` with `FLAG_NO_HOLE`).
    KeepAllocated,
}

pub struct Store {
    chunks_dir: PathBuf,
    backend: Arc<dyn IoBackend>,
    pool: BufPool,
    chunks: RwLock<HashMap<ChunkKey, Arc<Chunk>>>,
    /// Serialises chunk creation and deletion.
    admin: tokio::sync::Mutex<()>,
    capacity: u64,
    used: AtomicU64,
    log: ActivityLog,
    fencing: Fencing,
    /// Volumes whose changes are held (snapshots).
    pauses: Pauses,
    /// Exclusive lock on the data directory, held while the store is open.
    _lock: std::fs::File,
}

/// Locks `data_dir` against a second server using it at the same time.
pub fn lock_data_dir(data_dir: &Path) -> io::Result<std::fs::File> {
    use std::os::fd::AsRawFd;
    let file = std::fs::OpenOptions::new().create(true).truncate(false).write(true).open(data_dir.join("lock"))?;
    // SAFETY: plain syscall on a descriptor we own.
    if unsafe { libc::flock(file.as_raw_fd(), libc::LOCK_EX | libc::LOCK_NB) } != 0 {
        let err = io::Error::last_os_error();
        return Err(if err.raw_os_error() == Some(libc::EWOULDBLOCK) {
            io::Error::other(format!("{} is in use by another server", data_dir.display()))
        } else {
            err
        });
    }
    Ok(file)
}

/// Where the store of `data_dir` keeps chunk `key`.
pub fn chunk_file(data_dir: &Path, key: ChunkKey) -> PathBuf {
    chunk_path(&data_dir.join("chunks"), key)
}

fn chunk_path(chunks_dir: &Path, key: ChunkKey) -> PathBuf {
    chunks_dir.join(format!("{:016x}", key.volume)).join(format!("{:016x}.chunk", key.chunk))
}

/// Loads every chunk file under `chunks_dir` (blocking). Leftover temporary
/// files of interrupted creations are removed; unreadable chunks are logged
/// and left out (their replicas elsewhere take over).
fn load_chunks(chunks_dir: &Path, backend: &dyn IoBackend, pool: &BufPool) -> io::Result<Vec<Chunk>> {
    let mut out = Vec::new();
    for vol in std::fs::read_dir(chunks_dir)? {
        let vol = vol?.path();
        if !vol.is_dir() {
            continue;
        }
        for entry in std::fs::read_dir(&vol)? {
            let path = entry?.path();
            match path.extension().and_then(|e| e.to_str()) {
                Some("tmp") => std::fs::remove_file(&path)?,
                Some("chunk") => match Chunk::load(&path, backend, pool) {
                    Ok(chunk) if chunk_path(chunks_dir, chunk.key) == path => out.push(chunk),
                    Ok(chunk) => {
                        tracing::error!(path = %path.display(), key = %chunk.key, "chunk file is misnamed; ignored")
                    }
                    Err(e) => tracing::error!(path = %path.display(), error = %e, "cannot load chunk; ignored"),
                },
                _ => {}
            }
        }
    }
    Ok(out)
}

impl Store {
    /// Opens (or initialises) the store in `data_dir`. `capacity` defaults
    /// to the free space of its filesystem plus what chunks already use,
    /// and what the trash holds (which makes way when chunks need it).
    pub async fn open(
        data_dir: &Path,
        capacity: Option<u64>,
        backend: Arc<dyn IoBackend>,
    ) -> Result<Store, StoreError> {
        let chunks_dir = data_dir.join("chunks");
        std::fs::create_dir_all(&chunks_dir).map_err(|e| StoreError::io("creating the data directory", e))?;
        let lock = lock_data_dir(data_dir).map_err(|e| StoreError::io("locking the data directory", e))?;
        let pool = BufPool::default();
        let loaded = {
            let (dir, backend, pool) = (chunks_dir.clone(), backend.clone(), pool.clone());
            tokio::task::spawn_blocking(move || load_chunks(&dir, &*backend, &pool))
                .await
                .map_err(|e| StoreError::io("loading chunks", io::Error::other(e)))?
                .map_err(|e| StoreError::io("loading chunks", e))?
        };
        let used: u64 = loaded.iter().map(|c| c.file_len()).sum();
        let capacity = match capacity {
            Some(c) => c,
            None => {
                let measure = || Ok::<_, io::Error>(disk_space::of(data_dir)?.free + trash::bytes(data_dir)?);
                measure().map_err(|e| StoreError::io("measuring free space", e))? + used
            }
        };
        let chunks: HashMap<ChunkKey, Arc<Chunk>> = loaded.into_iter().map(|c| (c.key, Arc::new(c))).collect();
        let log = ActivityLog::open(&data_dir.join("activity.log"))
            .map_err(|e| StoreError::io("opening the activity log", e))?;
        log.retain_chunks(|k| chunks.contains_key(&k));
        let fencing = Fencing::open(&data_dir.join("epochs")).map_err(|e| StoreError::io("loading epochs", e))?;
        let m = metrics();
        m.chunks.set(chunks.len() as i64);
        m.used_bytes.set(used as i64);
        m.capacity_bytes.set(capacity as i64);
        tracing::info!(
            chunks = chunks.len(),
            used,
            capacity,
            recovered_regions = log.regions(None).len(),
            "chunk store open"
        );
        Ok(Store {
            chunks_dir,
            backend,
            pool,
            chunks: RwLock::new(chunks),
            admin: tokio::sync::Mutex::new(()),
            capacity,
            used: AtomicU64::new(used),
            log,
            fencing,
            pauses: Pauses::default(),
            _lock: lock,
        })
    }

    pub fn backend(&self) -> &dyn IoBackend {
        &*self.backend
    }

    /// The aligned buffer pool of the data path.
    pub fn pool(&self) -> &BufPool {
        &self.pool
    }

    /// Bytes taken by chunk files.
    pub fn used(&self) -> u64 {
        self.used.load(Ordering::Acquire)
    }

    pub fn capacity(&self) -> u64 {
        self.capacity
    }

    pub fn get(&self, key: ChunkKey) -> Result<Arc<Chunk>, StoreError> {
        self.chunks
            .read()
            .expect("chunk map poisoned")
            .get(&key)
            .cloned()
            .ok_or(StoreError::NoSuchChunk { volume: key.volume, chunk: key.chunk })
    }

    /// Chunks of `volume` (or all), sorted by key.
    pub fn chunks(&self, volume: Option<u64>) -> Vec<Arc<Chunk>> {
        let mut out: Vec<Arc<Chunk>> = self
            .chunks
            .read()
            .expect("chunk map poisoned")
            .values()
            .filter(|c| volume.is_none_or(|v| v == c.key.volume))
            .cloned()
            .collect();
        out.sort_unstable_by_key(|c| c.key);
        out
    }

    /// Writes whole blocks after verifying the payload against its checksums.
    pub async fn write(
        &self,
        key: ChunkKey,
        offset: u64,
        data: Bytes,
        checksums: Checksums,
        fence: Fence,
        fua: bool,
    ) -> Result<(), StoreError> {
        let chunk = self.get(key)?;
        let len = data.len() as u64;
        chunk.check_range(offset, len)?;
        if let Some(block) = first_bad_block(&data, &checksums) {
            metrics().checksum_errors.with_label_values(&["payload"]).inc();
            return Err(StoreError::ChecksumMismatch { offset: offset + (block * BLOCK_SIZE) as u64 });
        }
        self.change(&chunk, offset, len, fence, fua, |locked| chunk.write_blocks(locked, offset, &data, &checksums))
            .await?;
        metrics().bytes_written.inc_by(len);
        Ok(())
    }

    /// Makes a range read as zeros.
    pub async fn zero(
        &self,
        key: ChunkKey,
        offset: u64,
        len: u64,
        fence: Fence,
        mode: ZeroMode,
        fua: bool,
    ) -> Result<(), StoreError> {
        let chunk = self.get(key)?;
        chunk.check_range(offset, len)?;
        let mode = match mode {
            ZeroMode::Deallocate => PUNCH_HOLE,
            ZeroMode::KeepAllocated => ZERO_RANGE,
        };
        self.change(&chunk, offset, len, fence, fua, |locked| chunk.zero_blocks(locked, offset, len, mode)).await
    }

    /// The steps every change takes: admission (waiting while the volume is
    /// paused; the change counts as in flight until it returns), generation
    /// and epoch checks (a newer epoch persisted first), the activity log
    /// marked, the range locked and the fence checked again under the lock
    /// (so a change admitted under an older epoch cannot land after one of a
    /// newer epoch), then `apply`, which releases the lock when done.
    async fn change<'c, F, Fut>(
        &self,
        chunk: &'c Chunk,
        offset: u64,
        len: u64,
        fence: Fence,
        fua: bool,
        apply: F,
    ) -> Result<(), StoreError>
    where
        F: FnOnce(RangeGuard<'c>) -> Fut,
        Fut: std::future::Future<Output = Result<(), StoreError>>,
    {
        let _admitted = if fence.holds_pause { None } else { Some(self.pauses.admit(chunk.key.volume).await?) };
        chunk.check_generation(fence.generation, false)?;
        self.fencing.admit(chunk.key.volume, fence.epoch).await?;
        let _busy = self.log.begin_write(chunk.key, offset, len).await?;
        let locked = chunk.lock_for_write(offset, len).await;
        self.fencing.check(chunk.key.volume, fence.epoch)?;
        chunk.check_generation(fence.generation, false)?;
        apply(locked).await?;
        if fua {
            chunk.flush().await?;
        }
        Ok(())
    }

    /// Reads whole blocks, verified; a block failing its stored checksum
    /// fails the read with `CorruptBlock` (its bytes are never returned).
    /// A reader's `epoch` is checked before and again after the read: a
    /// read that ends with the epoch still current cannot hold a newer
    /// owner's writes, which this server admits only under a newer epoch.
    /// Copies between servers read without one.
    pub async fn read(
        &self,
        key: ChunkKey,
        offset: u64,
        len: u64,
        generation: u64,
        epoch: Option<u64>,
    ) -> Result<(Bytes, Checksums), StoreError> {
        let chunk = self.get(key)?;
        chunk.check_range(offset, len)?;
        chunk.check_generation(generation, true)?;
        let check_epoch = || epoch.map_or(Ok(()), |epoch| self.fencing.check(key.volume, epoch));
        check_epoch()?;
        let out = chunk.read_blocks(offset, len).await?;
        check_epoch()?;
        if let Some(&block) = out.bad.first() {
            metrics().checksum_errors.with_label_values(&["stored"]).inc_by(out.bad.len() as u64);
            tracing::warn!(%key, block, bad = out.bad.len(), "read found blocks failing their checksum");
            self.suspect(key, out.bad.iter().map(|&b| (b * BLOCK_SIZE) as u64));
            return Err(StoreError::CorruptBlock { offset: (block * BLOCK_SIZE) as u64 });
        }
        metrics().bytes_read.inc_by(len);
        Ok((out.data.into_bytes(), out.checksums))
    }

    /// XXH3-64 of each block of a range, read from disk and verified; a
    /// block failing its checksum gets [`BAD_BLOCK_HASH`] (and is suspect,
    /// as after a read). Lets a copy that is behind fetch only the blocks
    /// where it differs.
    pub async fn block_hashes(
        &self,
        key: ChunkKey,
        offset: u64,
        len: u64,
        generation: u64,
    ) -> Result<Vec<u64>, StoreError> {
        let chunk = self.get(key)?;
        chunk.check_range(offset, len)?;
        chunk.check_generation(generation, true)?;
        let mut hashes = Vec::with_capacity(len as usize / BLOCK_SIZE);
        let mut at = offset;
        while at < offset + len {
            let piece = (offset + len - at).min(MAX_DATA as u64);
            let out = chunk.read_blocks(at, piece).await?;
            let first = (at / BLOCK_SIZE as u64) as usize;
            hashes.extend(out.data.chunks(BLOCK_SIZE).enumerate().map(|(i, block)| {
                if out.bad.contains(&(first + i)) {
                    BAD_BLOCK_HASH
                } else {
                    xxhash_rust::xxh3::xxh3_64(block)
                }
            }));
            if !out.bad.is_empty() {
                self.suspect(key, out.bad.iter().map(|&b| (b * BLOCK_SIZE) as u64));
            }
            at += piece;
        }
        Ok(hashes)
    }

    /// Makes every change completed so far (to `volume`, or all) durable,
    /// then marks the regions it covered clean in the activity log.
    pub async fn flush(&self, volume: Option<u64>) -> Result<(), StoreError> {
        let snapshot = self.log.flush_snapshot(volume);
        let mut flushes = tokio::task::JoinSet::new();
        for chunk in self.chunks(volume).into_iter().filter(|c| c.needs_flush()) {
            flushes.spawn(async move { chunk.flush().await });
        }
        while let Some(done) = flushes.join_next().await {
            done.map_err(|e| StoreError::io("flushing", io::Error::other(e)))??;
        }
        self.log.complete_flush(snapshot);
        Ok(())
    }

    /// Creates an empty chunk of `size` bytes at `generation`.
    pub async fn create_chunk(&self, key: ChunkKey, size: u64, generation: u64) -> Result<(), StoreError> {
        if size == 0 || size > MAX_CHUNK_SIZE {
            return Err(StoreError::Invalid(format!("chunk size {size} out of range")));
        }
        if !size.is_multiple_of(BLOCK_SIZE as u64) {
            return Err(StoreError::Misaligned { offset: 0, len: size });
        }
        let _admin = self.admin.lock().await;
        if self.get(key).is_ok() {
            return Err(StoreError::ChunkExists { volume: key.volume, chunk: key.chunk });
        }
        let needed = chunk::file_len(size);
        self.make_room(needed).await?;
        let path = chunk_path(&self.chunks_dir, key);
        let (backend, pool, chunks_dir) = (self.backend.clone(), self.pool.clone(), self.chunks_dir.clone());
        let chunk = tokio::task::spawn_blocking(move || {
            let dir = path.parent().expect("chunk path has a parent");
            if !dir.exists() {
                std::fs::create_dir_all(dir)?;
                sync_dir(&chunks_dir)?;
            }
            Chunk::create(&path, key, size, generation, &*backend, &pool)
        })
        .await
        .map_err(|e| StoreError::io("creating a chunk", io::Error::other(e)))?
        .map_err(|e| StoreError::io(format!("creating chunk {key}"), e))?;
        let mut chunks = self.chunks.write().expect("chunk map poisoned");
        chunks.insert(key, Arc::new(chunk));
        let used = self.used.fetch_add(needed, Ordering::AcqRel) + needed;
        metrics().chunks.set(chunks.len() as i64);
        metrics().used_bytes.set(used as i64);
        Ok(())
    }

    /// Makes sure a new chunk file of `needed` bytes fits: within the
    /// capacity, where the trash counts as free, and on the disk, where the
    /// oldest trash makes way for it.
    async fn make_room(&self, needed: u64) -> Result<(), StoreError> {
        let available = self.capacity.saturating_sub(self.used.load(Ordering::Acquire));
        if needed > available {
            return Err(StoreError::NoSpace { needed, available });
        }
        let data_dir = self.data_dir().to_owned();
        let deleted = tokio::task::spawn_blocking(move || trash::make_room(&data_dir, needed + ROOM_SLACK))
            .await
            .map_err(|e| StoreError::io("emptying the trash", io::Error::other(e)))?
            .map_err(|e| StoreError::io("emptying the trash", e))?;
        trash::log_early_deletions(&deleted, "a new chunk needed the space");
        Ok(())
    }

    /// The data directory this store keeps its chunks, trash and logs in.
    fn data_dir(&self) -> &Path {
        self.chunks_dir.parent().expect("chunks directory has a parent")
    }

    /// Deletes a chunk; `generation` 0 deletes any generation.
    pub async fn delete_chunk(&self, key: ChunkKey, generation: u64) -> Result<(), StoreError> {
        self.remove_chunk(key, generation, None).await
    }

    /// Moves chunk `key` into the trash of the data directory (see
    /// [`crate::trash`]) instead of deleting it.
    pub async fn trash_chunk(&self, key: ChunkKey) -> Result<(), StoreError> {
        self.remove_chunk(key, 0, Some(trash::path_for(self.data_dir(), key))).await
    }

    /// Takes chunk `key` out of the store: its file is deleted, or renamed
    /// to `trash_path`.
    async fn remove_chunk(
        &self,
        key: ChunkKey,
        generation: u64,
        trash_path: Option<PathBuf>,
    ) -> Result<(), StoreError> {
        let _admin = self.admin.lock().await;
        let chunk = self.get(key)?;
        chunk.check_generation(generation, true)?;
        let path = chunk.path().to_owned();
        tokio::task::spawn_blocking(move || {
            if let Some(to) = trash_path {
                let trash = to.parent().expect("trash path has a parent");
                std::fs::create_dir_all(trash)?;
                std::fs::rename(&path, &to)?;
                sync_dir(trash)?;
            } else {
                std::fs::remove_file(&path)?;
            }
            sync_dir(path.parent().expect("chunk path has a parent"))
        })
        .await
        .map_err(|e| StoreError::io("removing a chunk", io::Error::other(e)))?
        .map_err(|e| StoreError::io(format!("removing chunk {key}"), e))?;
        let count = {
            let mut chunks = self.chunks.write().expect("chunk map poisoned");
            chunks.remove(&key);
            chunks.len()
        };
        let used = self.used.fetch_sub(chunk.file_len(), Ordering::AcqRel) - chunk.file_len();
        self.log.retain_chunks(|k| k != key);
        metrics().chunks.set(count as i64);
        metrics().used_bytes.set(used as i64);
        Ok(())
    }

    /// Creates chunk `target` at `generation` as a durable copy of the
    /// current data and checksums of `source` (whose generation must match
    /// `source_generation`, 0 = any). Changes to the source wait while it is
    /// copied; a pause of its volume does not hold the clone up.
    pub async fn clone_chunk(
        &self,
        source: ChunkKey,
        source_generation: u64,
        target: ChunkKey,
        generation: u64,
    ) -> Result<(), StoreError> {
        let _admin = self.admin.lock().await;
        let chunk = self.get(source)?;
        chunk.check_generation(source_generation, true)?;
        if self.get(target).is_ok() {
            return Err(StoreError::ChunkExists { volume: target.volume, chunk: target.chunk });
        }
        let needed = chunk.file_len();
        self.make_room(needed).await?;
        // No change lands in the source from here until the copy is done,
        // and its checksum table on disk matches its data.
        let locked = chunk.lock_for_copy().await;
        chunk.flush().await?;
        let path = chunk_path(&self.chunks_dir, target);
        let (backend, pool, chunks_dir) = (self.backend.clone(), self.pool.clone(), self.chunks_dir.clone());
        let (source_path, size) = (chunk.path().to_owned(), chunk.size);
        let copied = tokio::task::spawn_blocking(move || {
            let dir = path.parent().expect("chunk path has a parent");
            if !dir.exists() {
                std::fs::create_dir_all(dir)?;
                sync_dir(&chunks_dir)?;
            }
            Chunk::create_copy(&source_path, &path, target, size, generation, &*backend, &pool)
        })
        .await;
        drop(locked);
        let copy = copied
            .map_err(|e| StoreError::io("cloning a chunk", io::Error::other(e)))?
            .map_err(|e| StoreError::io(format!("cloning chunk {source} to {target}"), e))?;
        let mut chunks = self.chunks.write().expect("chunk map poisoned");
        chunks.insert(target, Arc::new(copy));
        let used = self.used.fetch_add(needed, Ordering::AcqRel) + needed;
        let m = metrics();
        m.chunks.set(chunks.len() as i64);
        m.used_bytes.set(used as i64);
        m.chunk_clones.inc();
        drop(chunks);
        tracing::info!(%source, %target, generation, "chunk cloned");
        Ok(())
    }

    /// Pauses changes to `volume` (see [`pause`]) and waits for those in
    /// flight; returns the timeout granted.
    pub async fn pause_volume(&self, volume: u64, holder: u64, timeout: Duration) -> Result<Duration, StoreError> {
        self.pauses.pause(volume, holder, timeout).await
    }

    /// This server's copy of `key` holds bad blocks at `offsets`: their
    /// regions are listed as recovered (`DIRTY_REGIONS`), so the metadata
    /// leader's repair loop rebuilds the chunk here from a good peer.
    pub fn suspect(&self, key: ChunkKey, offsets: impl Iterator<Item = u64>) {
        let mut regions = 0;
        for offset in offsets {
            self.log.mark_suspect(key, offset);
            regions += 1;
        }
        if regions > 0 {
            metrics().suspect_blocks.inc_by(regions);
        }
    }

    /// The newest epoch seen for `volume`.
    pub fn volume_epoch(&self, volume: u64) -> u64 {
        self.fencing.current(volume)
    }

    /// Raises `volume`'s epoch to `epoch` (persisted first; an older one
    /// changes nothing) and returns once every change admitted under an
    /// older epoch has finished, so none lands afterwards. Returns the
    /// volume's epoch here.
    pub async fn fence_volume(&self, volume: u64, epoch: u64) -> Result<u64, StoreError> {
        if epoch > self.fencing.current(volume) {
            self.fencing.admit(volume, epoch).await?;
        }
        // Changes past the pause gate are drained by a pause; those still
        // before it (or waiting at it) check their epoch after it.
        self.pauses.pause(volume, FENCE_HOLDER, FENCE_DRAIN).await?;
        self.pauses.resume(volume, FENCE_HOLDER);
        Ok(self.fencing.current(volume))
    }

    /// Ends `holder`'s hold on `volume`; true if the volume is no longer paused.
    pub fn resume_volume(&self, volume: u64, holder: u64) -> bool {
        self.pauses.resume(volume, holder)
    }

    pub fn is_paused(&self, volume: u64) -> bool {
        self.pauses.is_paused(volume)
    }

    /// At the start of a shutdown: changes waiting on a paused volume fail
    /// with `ShuttingDown` instead of holding their connections open.
    pub fn begin_shutdown(&self) {
        self.pauses.close();
    }

    pub async fn set_generation(&self, key: ChunkKey, generation: u64) -> Result<(), StoreError> {
        self.get(key)?.set_generation(generation).await
    }

    pub fn chunk_info(&self, key: ChunkKey, generation: u64) -> Result<ChunkInfo, StoreError> {
        let chunk = self.get(key)?;
        chunk.check_generation(generation, true)?;
        let counts = chunk.block_counts();
        Ok(ChunkInfo {
            size: chunk.size,
            generation: chunk.generation(),
            blocks_ok: counts.ok as u32,
            blocks_bad: counts.bad as u32,
            blocks_unknown: counts.unknown as u32,
            dirty_regions: self.log.count_for(key) as u32,
        })
    }

    pub fn list_chunks(&self, volume: Option<u64>) -> Vec<ChunkEntry> {
        self.chunks(volume)
            .iter()
            .map(|c| ChunkEntry { volume: c.key.volume, chunk: c.key.chunk, size: c.size, generation: c.generation() })
            .collect()
    }

    /// Regions in the activity log for `volume` (or all), sorted.
    pub fn dirty_regions(&self, volume: Option<u64>) -> Vec<DirtyRegion> {
        self.log
            .regions(volume)
            .into_iter()
            .map(|(region, recovered)| {
                let size = self.get(region.chunk).map_or(u64::MAX, |c| c.size);
                let offset = region.offset();
                DirtyRegion {
                    volume: region.chunk.volume,
                    chunk: region.chunk.chunk,
                    offset,
                    length: REGION_SIZE.min(size.saturating_sub(offset)) as u32,
                    flags: if recovered { DIRTY_RECOVERED } else { 0 },
                }
            })
            .collect()
    }

    /// Forgets the recovered regions of a chunk in `offset..offset + len`
    /// (`len` 0 = to the end of the chunk) once they have been resynced.
    pub fn clear_recovered(&self, key: ChunkKey, offset: u64, len: u64) {
        let len = if len == 0 { u64::MAX - offset } else { len };
        self.log.clear_recovered(key, offset, len);
    }

    /// Keeps what the disk holds in a chunk's recovered regions as its
    /// content, durably, and forgets the regions: for the copy kept when
    /// every replica of the chunk crashed with unflushed writes (none then
    /// knows more than another). A block written but not flushed holds the
    /// old data or the new, and gets the checksum of whichever it holds.
    pub async fn accept_recovered(&self, key: ChunkKey) -> Result<(), StoreError> {
        let chunk = self.get(key)?;
        let offsets: Vec<u64> = self
            .log
            .regions(Some(key.volume))
            .into_iter()
            .filter(|(region, recovered)| *recovered && region.chunk == key)
            .map(|(region, _)| region.offset())
            .collect();
        let mut resealed = 0;
        for offset in offsets {
            resealed += chunk.reseal_blocks(offset, REGION_SIZE.min(chunk.size - offset)).await?;
        }
        chunk.flush().await?;
        self.log.clear_recovered(key, 0, u64::MAX);
        tracing::warn!(%key, resealed, "kept this copy of a chunk every replica of which crashed with unflushed writes");
        Ok(())
    }

    /// Flushes everything and closes the activity log cleanly.
    pub async fn close(&self) -> Result<(), StoreError> {
        let flushed = self.flush(None).await;
        self.log.close().await;
        flushed
    }
}
