//! One chunk: a preallocated file holding a header, the data and the
//! per-block CRC32 table.
//!
//! ```text
//! [0, 4096)                     header: magic, format, volume, chunk, size, generation, crc
//! [4096, 4096 + size)           data, block b at 4096 + b * 4096
//! [4096 + size, + table pages)  CRC32 table: u32 LE per block, 4 KiB pages,
//!                               page p covering blocks 1024p .. 1024p + 1023
//! ```
//!
//! The CRC table is cached in memory and written back by [`Chunk::flush`]
//! (only the pages changed since the last flush) before `fdatasync`, so a
//! write costs one data I/O. After a crash the table on disk may lag the data
//! of unflushed writes; those blocks then fail verification and are reported
//! as corrupt, never served, and the activity log names their regions.

use std::io;
use std::os::fd::AsRawFd;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use ballast_proto::frame::{Checksums, BLOCK_SIZE};
use bytes::{BufMut, Bytes, BytesMut};

use super::backend::{aligned, fallocate_fd, open_direct, IoBackend, IoFile};
use super::bitmap::Bitmap;
use super::buf::{AlignedBuf, BufPool, ALIGN};
use crate::checksum::{verify_block, UNWRITTEN};
use crate::durable;
use crate::error::StoreError;
use ballast_proto::range_lock::{RangeGuard, RangeLock};

/// Bytes before the data.
pub const HEADER_LEN: u64 = 4096;
/// Checksums per table page.
const CRCS_PER_PAGE: usize = ALIGN / 4;
/// Data covered by one table page; also the activity log's region size.
pub const REGION_SIZE: u64 = (CRCS_PER_PAGE * BLOCK_SIZE) as u64;
/// Largest chunk: the frame's `length` field is a `u32`.
pub const MAX_CHUNK_SIZE: u64 = u32::MAX as u64 + 1 - BLOCK_SIZE as u64;
const MAGIC: u64 = u64::from_le_bytes(*b"BLSTCHK1");
const FORMAT: u32 = 1;
const BLOCK: u64 = BLOCK_SIZE as u64;

/// Identity of a chunk: volume (or snapshot) and index within it.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct ChunkKey {
    pub volume: u64,
    pub chunk: u64,
}

impl std::fmt::Display for ChunkKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{:016x}/{:016x}", self.volume, self.chunk)
    }
}

/// Bytes of CRC table for a chunk of `size` bytes, rounded to whole pages.
fn table_len(size: u64) -> u64 {
    (size / BLOCK * 4).next_multiple_of(ALIGN as u64)
}

/// Total file length of a chunk of `size` bytes.
pub fn file_len(size: u64) -> u64 {
    HEADER_LEN + size + table_len(size)
}

struct Header {
    key: ChunkKey,
    size: u64,
    generation: u64,
}

impl Header {
    fn encode(&self, pool: &BufPool) -> AlignedBuf {
        let mut page = pool.zeroed(HEADER_LEN as usize);
        let mut fields = BytesMut::with_capacity(48);
        fields.put_u64_le(MAGIC);
        fields.put_u32_le(FORMAT);
        fields.put_u32_le(0);
        fields.put_u64_le(self.key.volume);
        fields.put_u64_le(self.key.chunk);
        fields.put_u64_le(self.size);
        fields.put_u64_le(self.generation);
        let crc = crc32fast::hash(&fields);
        fields.put_u32_le(crc);
        page[..fields.len()].copy_from_slice(&fields);
        page
    }

    fn decode(page: &[u8]) -> Option<Header> {
        let u64_at = |at: usize| u64::from_le_bytes(page[at..at + 8].try_into().expect("8 bytes"));
        let u32_at = |at: usize| u32::from_le_bytes(page[at..at + 4].try_into().expect("4 bytes"));
        if u64_at(0) != MAGIC || u32_at(8) != FORMAT || u32_at(48) != crc32fast::hash(&page[..48]) {
            return None;
        }
        Some(Header {
            key: ChunkKey { volume: u64_at(16), chunk: u64_at(24) },
            size: u64_at(32),
            generation: u64_at(40),
        })
    }
}

/// In-memory block state, guarded by one mutex (held only for memory work).
struct BlockMeta {
    /// Stored checksum of every block ([`UNWRITTEN`] = reads as zeros).
    crcs: Vec<u32>,
    /// Table pages changed since they were last written.
    dirty_pages: Bitmap,
    /// Blocks known good: written, or verified since the server started.
    verified: Bitmap,
    /// Blocks that failed verification and were not rewritten since.
    bad: Bitmap,
}

impl BlockMeta {
    fn mark_written(&mut self, first: usize, crcs: impl Iterator<Item = u32>) {
        for (i, crc) in crcs.enumerate() {
            let b = first + i;
            self.crcs[b] = crc;
            self.verified.set(b, true);
            self.bad.set(b, false);
            self.dirty_pages.set(b / CRCS_PER_PAGE, true);
        }
    }

    fn page_bytes(&self, page: usize, out: &mut [u8]) {
        let start = page * CRCS_PER_PAGE;
        let end = (start + CRCS_PER_PAGE).min(self.crcs.len());
        out.fill(0);
        for (dst, crc) in out.chunks_exact_mut(4).zip(&self.crcs[start..end]) {
            dst.copy_from_slice(&crc.to_le_bytes());
        }
    }
}

/// Data read back from a chunk, with the verification outcome.
pub struct ReadOutcome {
    pub data: AlignedBuf,
    /// CRC32 of each block, as sent to the reader.
    pub checksums: Checksums,
    /// Chunk block indices that failed their stored checksum.
    pub bad: Vec<usize>,
}

/// Block health counts for `CHUNK_INFO`.
pub struct BlockCounts {
    pub ok: usize,
    pub bad: usize,
    pub unknown: usize,
}

pub struct Chunk {
    pub key: ChunkKey,
    pub size: u64,
    path: PathBuf,
    file: Arc<dyn IoFile>,
    pool: BufPool,
    generation: AtomicU64,
    meta: Mutex<BlockMeta>,
    ranges: RangeLock,
    /// Serialises table write-back, fdatasync and header updates.
    flush_lock: tokio::sync::Mutex<()>,
    /// Count of completed changes; `durable_seq` is the count covered by the
    /// last completed flush.
    write_seq: AtomicU64,
    durable_seq: AtomicU64,
}

fn io_err(what: &str, key: ChunkKey) -> impl FnOnce(io::Error) -> StoreError + '_ {
    move |e| StoreError::io(format!("{what} chunk {key}"), e)
}

impl Chunk {
    fn new(path: PathBuf, header: Header, crcs: Vec<u32>, file: Arc<dyn IoFile>, pool: BufPool) -> Chunk {
        let blocks = crcs.len();
        Chunk {
            key: header.key,
            size: header.size,
            path,
            file,
            pool,
            generation: AtomicU64::new(header.generation),
            meta: Mutex::new(BlockMeta {
                crcs,
                dirty_pages: Bitmap::new(blocks.div_ceil(CRCS_PER_PAGE)),
                verified: Bitmap::new(blocks),
                bad: Bitmap::new(blocks),
            }),
            ranges: RangeLock::default(),
            flush_lock: tokio::sync::Mutex::new(()),
            write_seq: AtomicU64::new(0),
            durable_seq: AtomicU64::new(0),
        }
    }

    /// Creates the chunk file durably (blocking): preallocated, all blocks
    /// unwritten. Written to a temporary name and renamed into place.
    pub fn create(
        path: &Path,
        key: ChunkKey,
        size: u64,
        generation: u64,
        backend: &dyn IoBackend,
        pool: &BufPool,
    ) -> io::Result<Chunk> {
        let tmp = path.with_extension("tmp");
        let (file, _) = open_direct(&tmp, true)?;
        let len = file_len(size);
        if let Err(e) = fallocate_fd(file.as_raw_fd(), 0, 0, len) {
            if e.raw_os_error() != Some(libc::EOPNOTSUPP) {
                let _ = std::fs::remove_file(&tmp);
                return Err(e);
            }
            // No preallocation on this filesystem: a sparse file reads as zeros too.
            file.set_len(len)?;
        }
        let header = Header { key, size, generation };
        file.write_all_at(&header.encode(pool), 0)?;
        file.sync_data()?;
        durable::rename(&tmp, path)?;
        let blocks = (size / BLOCK) as usize;
        Ok(Chunk::new(path.to_owned(), header, vec![UNWRITTEN; blocks], backend.open(file), pool.clone()))
    }

    /// Creates the chunk file at `path` as a copy of the chunk file at
    /// `source` (blocking): data and CRC table as they are on disk, the
    /// header rewritten for `key` and `generation`. The caller keeps changes
    /// out of the source and has flushed its CRC table. The copy shares the
    /// source's extents where the filesystem can (reflink), is made durable
    /// under a temporary name and renamed into place.
    pub fn create_copy(
        source: &Path,
        path: &Path,
        key: ChunkKey,
        size: u64,
        generation: u64,
        backend: &dyn IoBackend,
        pool: &BufPool,
    ) -> io::Result<Chunk> {
        let tmp = path.with_extension("tmp");
        let header = Header { key, size, generation };
        if let Err(e) = write_copy(source, &tmp, &header, pool) {
            let _ = std::fs::remove_file(&tmp);
            return Err(e);
        }
        durable::rename(&tmp, path)?;
        match Chunk::load(path, backend, pool) {
            Ok(chunk) if chunk.key == key && chunk.size == size => Ok(chunk),
            loaded => {
                let _ = std::fs::remove_file(path);
                let _ = durable::sync_dir(path.parent().expect("chunk path has a parent"));
                Err(match loaded {
                    Err(e) => e,
                    Ok(_) => io::Error::other("the copied chunk reads back with another key or size"),
                })
            }
        }
    }

    /// Opens an existing chunk file (blocking) and loads its CRC table.
    pub fn load(path: &Path, backend: &dyn IoBackend, pool: &BufPool) -> io::Result<Chunk> {
        let (file, _) = open_direct(path, false)?;
        let mut page = pool.get(HEADER_LEN as usize);
        file.read_exact_at(&mut page, 0)?;
        let header = Header::decode(&page).ok_or_else(|| io::Error::other("bad chunk header"))?;
        if header.size == 0 || header.size % BLOCK != 0 || header.size > MAX_CHUNK_SIZE {
            return Err(io::Error::other(format!("bad chunk size {}", header.size)));
        }
        let actual = file.metadata()?.len();
        if actual < file_len(header.size) {
            return Err(io::Error::other(format!("chunk file is {actual} bytes, expected {}", file_len(header.size))));
        }
        let mut table = pool.get(table_len(header.size) as usize);
        file.read_exact_at(&mut table, HEADER_LEN + header.size)?;
        let blocks = (header.size / BLOCK) as usize;
        let crcs =
            table.chunks_exact(4).take(blocks).map(|b| u32::from_le_bytes(b.try_into().expect("4 bytes"))).collect();
        Ok(Chunk::new(path.to_owned(), header, crcs, backend.open(file), pool.clone()))
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    pub fn generation(&self) -> u64 {
        self.generation.load(Ordering::Acquire)
    }

    pub fn blocks(&self) -> usize {
        (self.size / BLOCK) as usize
    }

    /// Bytes the chunk occupies on disk (for capacity accounting).
    pub fn file_len(&self) -> u64 {
        file_len(self.size)
    }

    /// Rejects unaligned or out-of-chunk ranges.
    pub fn check_range(&self, offset: u64, len: u64) -> Result<(), StoreError> {
        if !offset.is_multiple_of(BLOCK) || !len.is_multiple_of(BLOCK) {
            return Err(StoreError::Misaligned { offset, len });
        }
        if offset.checked_add(len).is_none_or(|end| end > self.size) {
            return Err(StoreError::OutOfRange { offset, len, size: self.size });
        }
        Ok(())
    }

    /// Rejects a request whose generation differs from the chunk's; 0
    /// passes when `zero_is_any` (reads and admin requests).
    pub fn check_generation(&self, got: u64, zero_is_any: bool) -> Result<(), StoreError> {
        let current = self.generation();
        if got == current || (zero_is_any && got == 0) {
            Ok(())
        } else {
            Err(StoreError::StaleGeneration { got, current })
        }
    }

    /// Locks `offset..offset + len` for a change.
    pub async fn lock_for_write(&self, offset: u64, len: u64) -> RangeGuard<'_> {
        self.ranges.lock(offset, offset + len, true).await
    }

    /// Locks the whole chunk against changes, for copying it: waits for the
    /// changes holding ranges of it, and keeps new ones out until dropped.
    /// Shared with reads, which change nothing on disk.
    pub async fn lock_for_copy(&self) -> RangeGuard<'_> {
        self.ranges.lock(0, self.size, false).await
    }

    /// Writes whole blocks under a write lock from [`Chunk::lock_for_write`]
    /// (released when done) and records their checksums.
    pub async fn write_blocks(
        &self,
        _locked: RangeGuard<'_>,
        offset: u64,
        data: &Bytes,
        checksums: &Checksums,
    ) -> Result<(), StoreError> {
        // Data received straight into an aligned buffer goes to the disk as
        // it is; anything else is copied into one (O_DIRECT needs alignment).
        let data = if aligned(data) {
            data.clone()
        } else {
            let mut buf = self.pool.get(data.len());
            buf.copy_from_slice(data);
            buf.into_bytes()
        };
        self.file.write_at(data, HEADER_LEN + offset).await.map_err(io_err("writing", self.key))?;
        let first = (offset / BLOCK) as usize;
        self.meta.lock().expect("chunk meta poisoned").mark_written(first, checksums.iter());
        self.write_seq.fetch_add(1, Ordering::AcqRel);
        Ok(())
    }

    /// Makes a range read as zeros (under a write lock): `mode` is a
    /// `fallocate` mode; where the filesystem lacks it, zeros are written.
    pub async fn zero_blocks(
        &self,
        _locked: RangeGuard<'_>,
        offset: u64,
        len: u64,
        mode: i32,
    ) -> Result<(), StoreError> {
        if len == 0 {
            return Ok(());
        }
        match self.file.fallocate(mode, HEADER_LEN + offset, len).await {
            Ok(()) => {}
            Err(e) if e.raw_os_error() == Some(libc::EOPNOTSUPP) => {
                const STEP: u64 = 1 << 20;
                let mut at = offset;
                while at < offset + len {
                    let n = STEP.min(offset + len - at);
                    self.file
                        .write_at(self.pool.zeroed(n as usize).into_bytes(), HEADER_LEN + at)
                        .await
                        .map_err(io_err("zeroing", self.key))?;
                    at += n;
                }
            }
            Err(e) => return Err(io_err("deallocating in", self.key)(e)),
        }
        let first = (offset / BLOCK) as usize;
        let count = (len / BLOCK) as usize;
        self.meta.lock().expect("chunk meta poisoned").mark_written(first, std::iter::repeat_n(UNWRITTEN, count));
        self.write_seq.fetch_add(1, Ordering::AcqRel);
        Ok(())
    }

    /// Reads a range of data as the disk holds it, unverified.
    async fn read_raw(&self, offset: u64, len: u64) -> Result<AlignedBuf, StoreError> {
        self.file.read_at(self.pool.get(len as usize), HEADER_LEN + offset).await.map_err(io_err("reading", self.key))
    }

    /// Reads a range and verifies every block against its stored checksum,
    /// recording the outcome per block.
    pub async fn read_blocks(&self, offset: u64, len: u64) -> Result<ReadOutcome, StoreError> {
        let _locked = self.ranges.lock(offset, offset + len, false).await;
        let data = self.read_raw(offset, len).await?;
        let first = (offset / BLOCK) as usize;
        let count = (len / BLOCK) as usize;
        let stored: Vec<u32> = self.meta.lock().expect("chunk meta poisoned").crcs[first..first + count].to_vec();
        let mut wire = BytesMut::with_capacity(count * 4);
        let mut bad = Vec::new();
        for (i, (block, stored)) in data.chunks_exact(BLOCK_SIZE).zip(stored).enumerate() {
            match verify_block(block, stored) {
                Some(crc) => wire.put_u32_le(crc),
                None => {
                    bad.push(first + i);
                    wire.put_u32_le(stored);
                }
            }
        }
        {
            let mut meta = self.meta.lock().expect("chunk meta poisoned");
            meta.verified.set_range(first..first + count, true);
            meta.bad.set_range(first..first + count, false);
            for &b in &bad {
                meta.verified.set(b, false);
                meta.bad.set(b, true);
            }
        }
        Ok(ReadOutcome { data, checksums: Checksums::from_bytes(wire.freeze()), bad })
    }

    /// Gives each block of a range that fails its stored checksum the
    /// checksum of the data it holds, keeping what a crash left on disk as
    /// the chunk's content (made durable by the next flush). Returns how
    /// many blocks changed.
    pub async fn reseal_blocks(&self, offset: u64, len: u64) -> Result<usize, StoreError> {
        let _locked = self.lock_for_write(offset, len).await;
        let data = self.read_raw(offset, len).await?;
        let first = (offset / BLOCK) as usize;
        let mut resealed = 0;
        let mut meta = self.meta.lock().expect("chunk meta poisoned");
        for (i, block) in data.chunks_exact(BLOCK_SIZE).enumerate() {
            if verify_block(block, meta.crcs[first + i]).is_none() {
                meta.mark_written(first + i, std::iter::once(crc32fast::hash(block)));
                resealed += 1;
            }
        }
        drop(meta);
        if resealed > 0 {
            self.write_seq.fetch_add(1, Ordering::AcqRel);
        }
        Ok(resealed)
    }

    /// True when changes were made since the last completed flush.
    pub fn needs_flush(&self) -> bool {
        self.durable_seq.load(Ordering::Acquire) < self.write_seq.load(Ordering::Acquire)
    }

    /// Makes every change completed before this call durable: writes back
    /// changed CRC table pages, then `fdatasync`. Concurrent callers share
    /// one flush (group commit).
    pub async fn flush(&self) -> Result<(), StoreError> {
        let target = self.write_seq.load(Ordering::Acquire);
        if self.durable_seq.load(Ordering::Acquire) >= target {
            return Ok(());
        }
        let _flushing = self.flush_lock.lock().await;
        if self.durable_seq.load(Ordering::Acquire) >= target {
            return Ok(());
        }
        let covered = self.write_seq.load(Ordering::Acquire);
        let pages = self.take_dirty_pages();
        let runs: Vec<(usize, usize)> = pages.iter().map(|(start, buf)| (*start, buf.len() / ALIGN)).collect();
        if let Err(e) = self.write_back(pages).await {
            // Nothing is known to be on disk: write these pages again next time.
            let mut meta = self.meta.lock().expect("chunk meta poisoned");
            for (start, n) in runs {
                meta.dirty_pages.set_range(start..start + n, true);
            }
            return Err(e);
        }
        self.durable_seq.fetch_max(covered, Ordering::AcqRel);
        Ok(())
    }

    /// Snapshots the changed table pages as runs of consecutive pages.
    fn take_dirty_pages(&self) -> Vec<(usize, AlignedBuf)> {
        let mut meta = self.meta.lock().expect("chunk meta poisoned");
        let dirty = meta.dirty_pages.take_ones();
        let mut runs: Vec<(usize, usize)> = Vec::new();
        for p in dirty {
            match runs.last_mut() {
                Some((start, n)) if *start + *n == p => *n += 1,
                _ => runs.push((p, 1)),
            }
        }
        runs.into_iter()
            .map(|(start, n)| {
                let mut buf = self.pool.get(n * ALIGN);
                for (i, page) in buf.chunks_exact_mut(ALIGN).enumerate() {
                    meta.page_bytes(start + i, page);
                }
                (start, buf)
            })
            .collect()
    }

    async fn write_back(&self, pages: Vec<(usize, AlignedBuf)>) -> Result<(), StoreError> {
        let table = HEADER_LEN + self.size;
        for (start, buf) in pages {
            self.file
                .write_at(buf.into_bytes(), table + (start * ALIGN) as u64)
                .await
                .map_err(io_err("writing checksums of", self.key))?;
        }
        self.file.sync_data().await.map_err(io_err("syncing", self.key))
    }

    /// Moves the chunk to a newer generation, durably.
    pub async fn set_generation(&self, generation: u64) -> Result<(), StoreError> {
        let _flushing = self.flush_lock.lock().await;
        let current = self.generation();
        if generation < current {
            return Err(StoreError::StaleGeneration { got: generation, current });
        }
        let header = Header { key: self.key, size: self.size, generation };
        self.file
            .write_at(header.encode(&self.pool).into_bytes(), 0)
            .await
            .map_err(io_err("updating the header of", self.key))?;
        self.file.sync_data().await.map_err(io_err("syncing", self.key))?;
        self.generation.store(generation, Ordering::Release);
        Ok(())
    }

    pub fn block_counts(&self) -> BlockCounts {
        let meta = self.meta.lock().expect("chunk meta poisoned");
        let ok = meta.verified.count_ones();
        let bad = meta.bad.count_ones();
        BlockCounts { ok, bad, unknown: meta.crcs.len() - ok - bad }
    }
}

/// Writes `path` as a copy of the chunk file `source` with `header`, durably.
fn write_copy(source: &Path, path: &Path, header: &Header, pool: &BufPool) -> io::Result<()> {
    // Buffered descriptors: the kernel copies (or shares) the extents
    // itself, and no alignment rules apply.
    let src = std::fs::File::open(source)?;
    let dst = std::fs::OpenOptions::new().read(true).write(true).create(true).truncate(true).open(path)?;
    copy_file(&src, &dst, file_len(header.size))?;
    dst.write_all_at(&header.encode(pool), 0)?;
    dst.sync_all()
}

/// Copies the first `len` bytes of `src` into the empty file `dst`
/// (blocking): a reflink (`FICLONE`) where the filesystem shares extents,
/// else `copy_file_range` (copied inside the kernel), else read and write.
fn copy_file(src: &std::fs::File, dst: &std::fs::File, len: u64) -> io::Result<()> {
    let (src_fd, dst_fd) = (src.as_raw_fd(), dst.as_raw_fd());
    if src.metadata()?.len() < len {
        return Err(io::Error::other("the source chunk file is shorter than its header says"));
    }
    // SAFETY: plain ioctl on two descriptors we hold open.
    if unsafe { libc::ioctl(dst_fd, libc::FICLONE, src_fd) } == 0 {
        // The whole file is shared, however long it is.
        return Ok(());
    }
    let (mut off_in, mut off_out): (libc::loff_t, libc::loff_t) = (0, 0);
    while (off_in as u64) < len {
        let want = (len - off_in as u64).min(1 << 30) as usize;
        // SAFETY: plain syscall; the offsets are valid out-pointers.
        let n = unsafe { libc::copy_file_range(src_fd, &mut off_in, dst_fd, &mut off_out, want, 0) };
        if n > 0 {
            continue;
        }
        if n == 0 {
            return Err(io::Error::from(io::ErrorKind::UnexpectedEof));
        }
        let err = io::Error::last_os_error();
        match err.raw_os_error() {
            Some(libc::EINTR) => continue,
            // Not offered between these files: copy through user space.
            Some(libc::EXDEV | libc::ENOSYS | libc::EOPNOTSUPP | libc::EINVAL) if off_in == 0 => break,
            _ => return Err(err),
        }
    }
    let mut buf = vec![0u8; 1 << 20];
    let mut at = off_in as u64;
    while at < len {
        let n = (len - at).min(buf.len() as u64) as usize;
        src.read_exact_at(&mut buf[..n], at)?;
        dst.write_all_at(&buf[..n], at)?;
        at += n as u64;
    }
    Ok(())
}
