//! Executes one decoded request against the store and queues its reply
//! frames.

use std::sync::Arc;
use std::time::{Duration, Instant};

use ballast_proto::frame::{
    encode_entries, DecodeError, Entry, ErrorCode, Opcode, ReplyHeader, Request, WireFrame, FLAG_ACCEPT,
    FLAG_ALL_VOLUMES, FLAG_CLEAR, FLAG_FUA, FLAG_NO_HOLE, FLAG_PAUSE_HOLDER, MAX_DATA, MAX_PAYLOAD, REPLY_END,
};
use bytes::Bytes;
use tokio::sync::{mpsc, watch};

use super::access::{Access, Circumstances, ClusterKey, Denied};
use crate::error::StoreError;
use crate::metrics::metrics;
use crate::scrub::scrub;
use crate::store::chunk::ChunkKey;
use crate::store::{Fence, Store, ZeroMode};

/// Segment size of `CHUNK_READ_STREAM` replies.
const STREAM_SEGMENT: u64 = 1 << 20;

pub struct Handler {
    store: Arc<Store>,
    key: Arc<ClusterKey>,
    stop: watch::Receiver<bool>,
}

/// Where a request's reply frames go: the connection's writer.
type Out = mpsc::Sender<WireFrame>;

fn status_label(status: Result<(), ErrorCode>) -> &'static str {
    match status {
        Ok(()) => "ok",
        Err(ErrorCode::BadFrame) => "bad_frame",
        Err(ErrorCode::UnknownOpcode) => "unknown_opcode",
        Err(ErrorCode::TooLarge) => "too_large",
        Err(ErrorCode::OutOfRange) => "out_of_range",
        Err(ErrorCode::Misaligned) => "misaligned",
        Err(ErrorCode::ChecksumMismatch) => "checksum_mismatch",
        Err(ErrorCode::CorruptBlock) => "corrupt_block",
        Err(ErrorCode::StaleEpoch) => "stale_epoch",
        Err(ErrorCode::StaleGeneration) => "stale_generation",
        Err(ErrorCode::NoSuchChunk) => "no_such_chunk",
        Err(ErrorCode::ChunkExists) => "chunk_exists",
        Err(ErrorCode::NoSpace) => "no_space",
        Err(ErrorCode::Io) => "io",
        Err(ErrorCode::ShuttingDown) => "shutting_down",
        Err(ErrorCode::Interrupted) => "interrupted",
        Err(ErrorCode::PermissionDenied) => "permission_denied",
    }
}

fn error_frame(opcode: u8, request_id: u64, code: ErrorCode, aux: u64, message: String) -> WireFrame {
    let header = ReplyHeader { opcode, flags: REPLY_END, request_id, status: Err(code), aux };
    WireFrame::reply(&header, Bytes::from(message), Bytes::new())
}

/// The reply to a frame that could not be decoded but whose id is known.
pub fn decode_error_frame(err: &DecodeError, request_id: u64) -> WireFrame {
    error_frame(err.opcode_byte(), request_id, err.code(), 0, err.to_string())
}

impl Handler {
    pub fn new(store: Arc<Store>, key: Arc<ClusterKey>, stop: watch::Receiver<bool>) -> Handler {
        Handler { store, key, stop }
    }

    /// Decides whether the connection of `access` may send `req`, in the
    /// order its requests arrived.
    pub fn admit(&self, access: &mut Access, req: &Request) -> Result<(), Denied> {
        let now_ms = meta_client::now_ms();
        let volume_epoch = |volume| self.store.volume_epoch(volume);
        access.admit(req, &Circumstances { key: &self.key, now_ms, volume_epoch: &volume_epoch })
    }

    pub fn store(&self) -> &Arc<Store> {
        &self.store
    }

    /// Runs `req`, if it was `admitted`, and sends its reply frames (the
    /// last flagged END) to `out`.
    pub async fn handle(&self, req: Request, admitted: Result<(), Denied>, out: &Out) {
        let started = Instant::now();
        let opcode = req.header.opcode;
        let request_id = req.header.request_id;
        if let Err(denied) = admitted {
            tracing::warn!(op = opcode.name(), role = denied.role, reason = %denied.message, "request denied");
            metrics().denied_requests.with_label_values(&[denied.role, opcode.name()]).inc();
            let _ =
                out.send(error_frame(opcode as u8, request_id, ErrorCode::PermissionDenied, 0, denied.message)).await;
            return;
        }
        let status = match self.execute(req, out).await {
            Ok(()) => Ok(()),
            Err(e) => {
                let code = e.code();
                // Corrupt blocks are logged where they are found.
                match code {
                    ErrorCode::Io => tracing::warn!(op = opcode.name(), error = %e, "request failed"),
                    _ => tracing::debug!(op = opcode.name(), error = %e, "request refused"),
                }
                let _ = out.send(error_frame(opcode as u8, request_id, code, e.aux(), e.to_string())).await;
                Err(code)
            }
        };
        let m = metrics();
        m.ops.with_label_values(&[opcode.name(), status_label(status)]).inc();
        m.latency.with_label_values(&[opcode.name()]).observe(started.elapsed().as_secs_f64());
    }

    async fn execute(&self, req: Request, out: &Out) -> Result<(), StoreError> {
        let h = req.header;
        let key = ChunkKey { volume: h.volume, chunk: h.chunk };
        let scope = (!h.has_flag(FLAG_ALL_VOLUMES)).then_some(h.volume);
        let fence = Fence { epoch: h.epoch, generation: h.generation, holds_pause: h.has_flag(FLAG_PAUSE_HOLDER) };
        let fua = h.has_flag(FLAG_FUA);
        let reply = |data: Bytes, tail: Bytes| {
            let header = ReplyHeader::new(h.opcode, h.request_id, Ok(()));
            WireFrame::reply(&header, data, tail)
        };
        let frame = match h.opcode {
            // An AUTHORIZE took effect when it was admitted.
            Opcode::Ping | Opcode::Authorize => reply(Bytes::new(), Bytes::new()),
            Opcode::Write => {
                let (data, checksums) = req.write_parts();
                self.store.write(key, h.offset, data, checksums, fence, fua).await?;
                reply(Bytes::new(), Bytes::new())
            }
            Opcode::Read => {
                let (data, checksums) =
                    self.store.read(key, h.offset, u64::from(h.length), h.generation, Some(h.epoch)).await?;
                reply(data, checksums.into_bytes())
            }
            Opcode::Flush => {
                self.store.flush(scope).await?;
                reply(Bytes::new(), Bytes::new())
            }
            Opcode::Trim | Opcode::WriteZeroes => {
                let mode = if h.opcode == Opcode::WriteZeroes && h.has_flag(FLAG_NO_HOLE) {
                    ZeroMode::KeepAllocated
                } else {
                    ZeroMode::Deallocate
                };
                self.store.zero(key, h.offset, u64::from(h.length), fence, mode, fua).await?;
                reply(Bytes::new(), Bytes::new())
            }
            Opcode::ChunkCreate => {
                self.store.create_chunk(key, u64::from(h.length), h.generation).await?;
                reply(Bytes::new(), Bytes::new())
            }
            Opcode::ChunkDelete => {
                self.store.delete_chunk(key, h.generation).await?;
                reply(Bytes::new(), Bytes::new())
            }
            Opcode::ChunkSetGeneration => {
                self.store.set_generation(key, h.generation).await?;
                reply(Bytes::new(), Bytes::new())
            }
            Opcode::ChunkClone => {
                let target = req.clone_target().ok_or_else(|| StoreError::Invalid("no clone target".into()))?;
                let target_key = ChunkKey { volume: target.volume, chunk: target.chunk };
                self.store.clone_chunk(key, h.generation, target_key, target.generation).await?;
                reply(Bytes::new(), Bytes::new())
            }
            Opcode::VolumePause => {
                // The holder rides in the otherwise unused offset field.
                let timeout = Duration::from_millis(u64::from(h.length));
                let granted = self.store.pause_volume(h.volume, h.offset, timeout).await?;
                let header =
                    ReplyHeader { aux: granted.as_millis() as u64, ..ReplyHeader::new(h.opcode, h.request_id, Ok(())) };
                WireFrame::reply(&header, Bytes::new(), Bytes::new())
            }
            Opcode::VolumeFence => {
                let epoch = self.store.fence_volume(h.volume, h.epoch).await?;
                let header = ReplyHeader { aux: epoch, ..ReplyHeader::new(h.opcode, h.request_id, Ok(())) };
                WireFrame::reply(&header, Bytes::new(), Bytes::new())
            }
            Opcode::VolumeResume => {
                self.store.resume_volume(h.volume, h.offset);
                reply(Bytes::new(), Bytes::new())
            }
            Opcode::ChunkHashes => {
                let hashes = self.store.block_hashes(key, h.offset, u64::from(h.length), h.generation).await?;
                let payload: Vec<u8> = hashes.iter().flat_map(|hash| hash.to_le_bytes()).collect();
                reply(Bytes::from(payload), Bytes::new())
            }
            Opcode::ChunkInfo => {
                let info = self.store.chunk_info(key, h.generation)?;
                reply(encode_entries(&[info]), Bytes::new())
            }
            Opcode::ChunkReadStream => return self.stream_chunk(&req, out).await,
            Opcode::ListChunks => {
                return send_entries(out, &req, &self.store.list_chunks(scope), 0).await;
            }
            Opcode::Scrub => {
                let mut stop = self.stop.clone();
                let outcome = scrub(&self.store, scope, None, &mut stop).await?;
                return send_entries(out, &req, &outcome.bad, outcome.blocks_checked).await;
            }
            Opcode::DirtyRegions => {
                let regions = if h.has_flag(FLAG_CLEAR) {
                    if h.has_flag(FLAG_ACCEPT) {
                        self.store.accept_recovered(key).await?;
                    }
                    self.store.clear_recovered(key, h.offset, u64::from(h.length));
                    let mut regions = self.store.dirty_regions(Some(h.volume));
                    regions.retain(|r| r.chunk == h.chunk);
                    regions
                } else {
                    self.store.dirty_regions(scope)
                };
                return send_entries(out, &req, &regions, 0).await;
            }
        };
        out.send(frame).await.map_err(|_| StoreError::ShuttingDown)
    }

    /// `CHUNK_READ_STREAM`: verified segments in order, the last flagged END.
    async fn stream_chunk(&self, req: &Request, out: &Out) -> Result<(), StoreError> {
        let h = req.header;
        let key = ChunkKey { volume: h.volume, chunk: h.chunk };
        let chunk = self.store.get(key)?;
        let end = match h.length {
            0 => chunk.size,
            n => h.offset.saturating_add(u64::from(n)),
        };
        chunk.check_range(h.offset, end.saturating_sub(h.offset))?;
        let mut at = h.offset;
        loop {
            let len = STREAM_SEGMENT.min(end - at);
            let (data, checksums) =
                if len == 0 { Default::default() } else { self.store.read(key, at, len, h.generation, None).await? };
            let last = at + len >= end;
            let header = ReplyHeader {
                flags: if last { REPLY_END } else { 0 },
                aux: at,
                ..ReplyHeader::new(h.opcode, h.request_id, Ok(()))
            };
            out.send(WireFrame::reply(&header, data, checksums.into_bytes()))
                .await
                .map_err(|_| StoreError::ShuttingDown)?;
            if last {
                return Ok(());
            }
            at += len;
        }
    }
}

/// Sends `entries` in as many frames as needed; the last (END) carries `aux`.
async fn send_entries<E: Entry>(out: &Out, req: &Request, entries: &[E], aux: u64) -> Result<(), StoreError> {
    let per_frame = (MAX_PAYLOAD.min(MAX_DATA) / E::SIZE).max(1);
    let mut frames = entries.chunks(per_frame).peekable();
    if frames.peek().is_none() {
        let header = ReplyHeader { aux, ..ReplyHeader::new(req.header.opcode, req.header.request_id, Ok(())) };
        return out
            .send(WireFrame::reply(&header, Bytes::new(), Bytes::new()))
            .await
            .map_err(|_| StoreError::ShuttingDown);
    }
    while let Some(batch) = frames.next() {
        let last = frames.peek().is_none();
        let header = ReplyHeader {
            flags: if last { REPLY_END } else { 0 },
            aux: if last { aux } else { 0 },
            ..ReplyHeader::new(req.header.opcode, req.header.request_id, Ok(()))
        };
        out.send(WireFrame::reply(&header, encode_entries(batch), Bytes::new()))
            .await
            .map_err(|_| StoreError::ShuttingDown)?;
    }
    Ok(())
}
