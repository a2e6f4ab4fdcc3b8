//! The replicated volume engine: a volume's bytes spread over chunks, each
//! chunk written to every replica of its set and read from one.
//!
//! - [`layout`]: byte ranges → chunk pieces and whole blocks.
//! - [`chunk_map`]: where each allocated chunk lives.
//! - [`pool`]: pipelined connections to chunk servers.
//! - [`capability`]: a node's capability for the volume, kept renewed.
//! - [`replication`]: fan-out of changes, failure handling, read failover.
//! - [`read_choice`]: which replica a read tries first.
//! - [`limits`]: the volume's I/O limits, followed while it is served.

mod capability;
mod chunk_map;
mod error;
mod layout;
pub mod limits;
mod metrics;
mod pool;
mod read_choice;
mod replication;

use std::sync::atomic::{AtomicU32, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Weak};
use std::time::{Duration, Instant};

use ballast_proto::frame::{ChunkAt, BLOCK_SIZE};
use ballast_proto::meta as pb;
use ballast_proto::range_lock::{RangeGuard, RangeLock};
use bytes::{Bytes, BytesMut};
use futures::future::try_join_all;
use meta_client::MetaClient;
use tokio::sync::Mutex;

pub use chunk_map::{ChunkView, Replica};
pub use error::EngineError;
use layout::{pieces, Piece};

use crate::export::{BlockExport, ExportError};

const BLOCK: u64 = BLOCK_SIZE as u64;

/// How a volume is opened.
#[derive(Clone, Debug)]
pub struct EngineOptions {
    /// Fencing epoch of this node's attachment; carried by every change.
    pub epoch: u64,
    /// Fewest replicas a chunk may keep and still acknowledge writes
    /// (capped at the volume's replica count).
    pub min_replicas: usize,
    /// How long one replica may take for one request before it is
    /// considered failed.
    pub replica_timeout: Duration,
    pub readonly: bool,
}

impl Default for EngineOptions {
    fn default() -> Self {
        EngineOptions { epoch: 0, min_replicas: 2, replica_timeout: Duration::from_secs(5), readonly: false }
    }
}

/// How often a served volume re-reads its record, to follow changes of
/// its replica count and I/O limits.
pub const FOLLOW_INTERVAL: Duration = Duration::from_secs(2);

/// An open volume. Implements [`BlockExport`] for the NBD server.
pub struct Volume {
    info: pb::Volume,
    /// Current size in bytes: `info.size_bytes` when opened, raised by
    /// [`Volume::refresh`] after the volume was expanded.
    size: AtomicU64,
    /// Current replica count, followed by [`Volume::refresh`].
    replicas: AtomicU32,
    /// The block device's requests wait here for the volume's I/O limits.
    throttle: limits::Throttle,
    options: EngineOptions,
    meta: MetaClient,
    map: chunk_map::ChunkMap,
    pool: pool::ConnectionPool,
    /// A node's capability for the volume, renewed while it is open.
    _lease: Option<capability::Lease>,
    /// Overlapping changes run one at a time: a request the kernel resent
    /// after a timeout waits for its first copy to finish, so neither lands
    /// after a newer write to the same blocks, and a read-modify-write sees
    /// no change between its read and its write. Byte ranges of the volume,
    /// whole blocks, one lock per request.
    changes: RangeLock,
    allocation: Mutex<()>,
    read_rotation: AtomicUsize,
    read_choice: read_choice::ReadChoice,
}

impl Volume {
    /// Opens `volume` (id or name) and loads its chunk map.
    pub async fn open(meta: MetaClient, volume: &str, options: EngineOptions) -> Result<Volume, EngineError> {
        let info = meta.find_volume(volume).await?;
        let map = meta.get_chunk_map(pb::GetChunkMapRequest { volume_id: info.id.clone() }).await?;
        let lease = capability::Lease::obtain(&meta, &info, options.epoch).await?;
        let volume = Volume {
            replicas: AtomicU32::new(info.replicas),
            throttle: limits::Throttle::default(),
            map: chunk_map::ChunkMap::from_meta(&map),
            pool: pool::ConnectionPool::new(meta.chunk_servers().clone(), lease.as_ref().map(|l| l.watch())),
            _lease: lease,
            changes: RangeLock::default(),
            allocation: Mutex::new(()),
            read_rotation: AtomicUsize::new(0),
            read_choice: read_choice::ReadChoice::default(),
            size: AtomicU64::new(info.size_bytes),
            info,
            options,
            meta,
        };
        volume.follow(&volume.info);
        volume.update_degraded_gauge();
        Ok(volume)
    }

    /// The volume as it was when opened; [`Volume::size_bytes`] has the current size.
    pub fn info(&self) -> &pb::Volume {
        &self.info
    }

    /// The metadata client the volume was opened with.
    pub fn meta(&self) -> &MetaClient {
        &self.meta
    }

    /// The size in bytes, including any growth picked up since opening.
    pub fn size_bytes(&self) -> u64 {
        self.size.load(Ordering::Acquire)
    }

    /// Re-reads the volume's record and follows it: an expansion, a new
    /// replica count, new I/O limits. Returns the size now served. Volumes
    /// only grow: a smaller size in metadata changes nothing.
    pub async fn refresh(&self) -> Result<u64, EngineError> {
        use pb::get_volume_request::Key;
        let current = self.meta.get_volume(pb::GetVolumeRequest { key: Some(Key::Id(self.info.id.clone())) }).await?;
        self.follow(&current);
        let previous = self.size.fetch_max(current.size_bytes, Ordering::AcqRel);
        let size = previous.max(current.size_bytes);
        if size != previous {
            tracing::info!(volume = %self.info.id, from = previous, to = size, "volume grew");
        }
        Ok(size)
    }

    /// Learns the chunks another process allocated since this volume was
    /// opened. A successor that opened the volume while its predecessor
    /// still served it calls this before serving: a chunk missing from the
    /// map reads as zeros without asking anyone.
    pub async fn reload_chunk_map(&self) -> Result<(), EngineError> {
        let map = self.meta.get_chunk_map(pb::GetChunkMapRequest { volume_id: self.info.id.clone() }).await?;
        for set in &map.chunks {
            self.map.update(set.chunk_index, ChunkView::from(set));
        }
        self.update_degraded_gauge();
        Ok(())
    }

    fn follow(&self, record: &pb::Volume) {
        let limits = record.limits.unwrap_or_default();
        self.throttle.set(limits::Limits { iops: limits.max_iops, bytes: limits.max_bandwidth_bytes });
        let previous = self.replicas.swap(record.replicas, Ordering::AcqRel);
        if previous != record.replicas {
            tracing::info!(volume = %self.info.id, from = previous, to = record.replicas, "replica count changed");
            self.update_degraded_gauge();
        }
    }

    /// Keeps `volume` following its record every [`FOLLOW_INTERVAL`] for
    /// as long as it is open.
    pub fn keep_following(volume: &Arc<Volume>) -> tokio::task::JoinHandle<()> {
        let volume: Weak<Volume> = Arc::downgrade(volume);
        tokio::spawn(async move {
            loop {
                tokio::time::sleep(FOLLOW_INTERVAL).await;
                let Some(volume) = volume.upgrade() else { return };
                if let Err(err) = volume.refresh().await {
                    tracing::debug!(volume = %volume.info.id, error = %err, "cannot re-read the volume's record");
                }
            }
        })
    }

    /// The I/O limits now enforced.
    pub fn limits(&self) -> limits::Limits {
        self.throttle.limits()
    }

    /// Replicas a chunk may keep and still acknowledge writes: what the
    /// node asked for, capped at the volume's replica count.
    fn min_replicas(&self) -> usize {
        self.options.min_replicas.clamp(1, self.replicas.load(Ordering::Acquire).max(1) as usize)
    }

    /// The fencing epoch every change carries.
    pub fn epoch(&self) -> u64 {
        self.options.epoch
    }

    fn check_range(&self, offset: u64, len: u64) -> Result<(), EngineError> {
        match offset.checked_add(len) {
            Some(end) if end <= self.size_bytes() => Ok(()),
            _ => Err(EngineError::OutOfRange { offset, len }),
        }
    }

    fn check_writable(&self) -> Result<(), EngineError> {
        if self.options.readonly {
            return Err(EngineError::ReadOnly);
        }
        Ok(())
    }

    /// Locks the whole blocks a change of `len` bytes at `offset` touches.
    /// One lock per request, taken before it is split into pieces: two
    /// requests that each held some of their pieces could wait for each
    /// other for ever.
    async fn lock_blocks(&self, offset: u64, len: u64) -> RangeGuard<'_> {
        let start = offset / BLOCK * BLOCK;
        let end = (offset + len).div_ceil(BLOCK) * BLOCK;
        self.changes.lock(start, end, true).await
    }

    /// Reads `len` bytes at `offset`.
    pub async fn read_at(&self, offset: u64, len: u64) -> Result<Bytes, EngineError> {
        self.check_range(offset, len)?;
        let parts = pieces(offset, len, self.info.chunk_size_bytes);
        if let [piece] = parts.as_slice() {
            return self.read_piece(piece).await;
        }
        let datas = try_join_all(parts.iter().map(|p| self.read_piece(p))).await?;
        let mut out = BytesMut::with_capacity(len as usize);
        for data in datas {
            out.extend_from_slice(&data);
        }
        Ok(out.freeze())
    }

    async fn read_piece(&self, piece: &Piece) -> Result<Bytes, EngineError> {
        let (start, aligned_len) = piece.aligned();
        let data = self.read_blocks(piece.chunk, start, aligned_len).await?;
        let skip = (piece.offset - start) as usize;
        Ok(data.slice(skip..skip + piece.len as usize))
    }

    /// Reads whole blocks of a chunk; a chunk never written reads as zeros.
    async fn read_blocks(&self, chunk: u64, offset: u64, len: u64) -> Result<Bytes, EngineError> {
        match self.map.get(chunk) {
            None => Ok(Bytes::from(vec![0u8; len as usize])),
            Some(view) => self.read_from_replicas(chunk, view, offset, len as u32).await,
        }
    }

    /// Writes `data` at `offset`; with `fua` it is durable on every replica
    /// before this returns.
    pub async fn write_at(&self, offset: u64, data: Bytes, fua: bool) -> Result<(), EngineError> {
        self.check_writable()?;
        self.check_range(offset, data.len() as u64)?;
        let _blocks = self.lock_blocks(offset, data.len() as u64).await;
        let parts = pieces(offset, data.len() as u64, self.info.chunk_size_bytes);
        try_join_all(parts.iter().map(|p| {
            let slice = data.slice(p.buf_offset..p.buf_offset + p.len as usize);
            self.write_piece(p, slice, fua)
        }))
        .await?;
        Ok(())
    }

    /// Writes one piece; the caller holds the lock on its blocks.
    async fn write_piece(&self, piece: &Piece, data: Bytes, fua: bool) -> Result<(), EngineError> {
        if piece.is_aligned() {
            return self.write_blocks(piece.chunk, piece.offset, data, fua).await;
        }
        // Read-modify-write of the partial blocks at either end.
        let (start, len) = piece.aligned();
        let mut merged = BytesMut::with_capacity(len as usize);
        let head_partial = piece.offset != start;
        let tail_partial = !(piece.offset + piece.len).is_multiple_of(BLOCK);
        if head_partial {
            merged.extend_from_slice(&self.read_blocks(piece.chunk, start, BLOCK).await?);
            merged.truncate((piece.offset - start) as usize);
        }
        merged.extend_from_slice(&data);
        if tail_partial {
            let end = piece.offset + piece.len;
            let tail_block = end / BLOCK * BLOCK;
            let tail = self.read_blocks(piece.chunk, tail_block, BLOCK).await?;
            merged.extend_from_slice(&tail[(end - tail_block) as usize..]);
        }
        debug_assert_eq!(merged.len() as u64, len);
        self.write_blocks(piece.chunk, start, merged.freeze(), fua).await
    }

    /// Writes whole blocks of a chunk to every replica, allocating the
    /// chunk on first write. The checksums are computed once, here.
    async fn write_blocks(&self, chunk: u64, offset: u64, data: Bytes, fua: bool) -> Result<(), EngineError> {
        let checksums = ballast_proto::frame::block_checksums(&data);
        let data_id = self.info.data_id;
        let epoch = self.options.epoch;
        self.replicate(chunk, |client, generation| {
            let data = data.clone();
            let checksums = &checksums;
            async move {
                client.write(ChunkAt { volume: data_id, chunk, offset, epoch, generation }, data, checksums, fua).await
            }
        })
        .await
    }

    /// Zeroes (`trim` = also releases space) a range.
    async fn zero_range(&self, offset: u64, len: u64, fua: bool, trim: bool) -> Result<(), EngineError> {
        self.check_writable()?;
        self.check_range(offset, len)?;
        let _blocks = self.lock_blocks(offset, len).await;
        let parts = pieces(offset, len, self.info.chunk_size_bytes);
        try_join_all(parts.iter().map(|p| async move {
            if self.map.get(p.chunk).is_none() {
                return Ok(()); // never written: already zeros
            }
            if !p.is_aligned() {
                return self.write_piece(p, Bytes::from(vec![0u8; p.len as usize]), fua).await;
            }
            let (data_id, epoch, chunk, off, n) =
                (self.info.data_id, self.options.epoch, p.chunk, p.offset, p.len as u32);
            self.replicate(p.chunk, |client, generation| async move {
                if trim {
                    client.trim(ChunkAt { volume: data_id, chunk, offset: off, epoch, generation }, n, fua).await
                } else {
                    client
                        .write_zeroes(ChunkAt { volume: data_id, chunk, offset: off, epoch, generation }, n, fua, true)
                        .await
                }
            })
            .await
        }))
        .await?;
        Ok(())
    }

    /// Writes zeros over a range, keeping its space allocated.
    pub async fn write_zeroes_at(&self, offset: u64, len: u64, fua: bool) -> Result<(), EngineError> {
        self.zero_range(offset, len, fua, false).await
    }

    /// Discards a range: it reads as zeros and its space is released.
    pub async fn trim_at(&self, offset: u64, len: u64, fua: bool) -> Result<(), EngineError> {
        self.zero_range(offset, len, fua, true).await
    }

    /// Makes every acknowledged write durable on every replica.
    pub async fn flush(&self) -> Result<(), EngineError> {
        self.flush_all_replicas().await
    }

    fn next_rotation(&self) -> usize {
        self.read_rotation.fetch_add(1, Ordering::Relaxed)
    }

    fn update_degraded_gauge(&self) {
        let wanted = self.replicas.load(Ordering::Acquire) as usize;
        let degraded = self.map.all().iter().filter(|(_, v)| v.replicas.len() < wanted).count();
        metrics::DEGRADED_CHUNKS.with_label_values(&[&self.info.id]).set(degraded as i64);
    }

    /// Chunks whose replica set is smaller than the volume asks for.
    pub fn degraded_chunks(&self) -> Vec<u64> {
        let wanted = self.replicas.load(Ordering::Acquire) as usize;
        let mut chunks: Vec<u64> =
            self.map.all().into_iter().filter(|(_, v)| v.replicas.len() < wanted).map(|(i, _)| i).collect();
        chunks.sort_unstable();
        chunks
    }
}

/// Records an operation's outcome, size and latency.
async fn observed<T>(
    volume: &str,
    op: &str,
    bytes: u64,
    call: impl std::future::Future<Output = Result<T, EngineError>>,
) -> Result<T, ExportError> {
    let started = Instant::now();
    let result = call.await;
    let outcome = if result.is_ok() { "ok" } else { "error" };
    metrics::OPERATIONS.with_label_values(&[volume, op, outcome]).inc();
    metrics::LATENCY.with_label_values(&[volume, op]).observe(started.elapsed().as_secs_f64());
    if result.is_ok() && bytes > 0 {
        metrics::BYTES.with_label_values(&[volume, op]).inc_by(bytes);
    }
    if let Err(e) = &result {
        tracing::warn!(volume, op, error = %e, "volume operation failed");
    }
    result.map_err(ExportError::from)
}

impl BlockExport for Volume {
    fn size(&self) -> u64 {
        self.size_bytes()
    }

    async fn read(&self, offset: u64, len: u32) -> Result<Bytes, ExportError> {
        self.throttle.admit(len as u64).await;
        observed(&self.info.id, "read", len as u64, self.read_at(offset, len as u64)).await
    }

    async fn write(&self, offset: u64, data: Bytes, fua: bool) -> Result<(), ExportError> {
        let len = data.len() as u64;
        self.throttle.admit(len).await;
        observed(&self.info.id, "write", len, self.write_at(offset, data, fua)).await
    }

    async fn flush(&self) -> Result<(), ExportError> {
        observed(&self.info.id, "flush", 0, self.flush_all_replicas()).await
    }

    // Trims and zeroings count as operations; they move no bytes.
    async fn trim(&self, offset: u64, len: u32, fua: bool) -> Result<(), ExportError> {
        self.throttle.admit(0).await;
        observed(&self.info.id, "trim", 0, self.zero_range(offset, len as u64, fua, true)).await
    }

    async fn write_zeroes(&self, offset: u64, len: u32, fua: bool) -> Result<(), ExportError> {
        self.throttle.admit(0).await;
        observed(&self.info.id, "write_zeroes", 0, self.zero_range(offset, len as u64, fua, false)).await
    }
}
