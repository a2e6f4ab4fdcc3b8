//! An async client for the data-plane protocol, used by volume engines.
//!
//! One [`DataClient`] owns one connection. Requests are pipelined: any number
//! of tasks may call it concurrently (it is cheap to clone); a writer task
//! batches their frames into vectored writes and a reader task hands each
//! reply to its caller by request id. Read data is verified against the
//! checksums the server returned before it is handed out.

use std::collections::HashMap;
use std::io;
use std::path::Path;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::{Bytes, BytesMut};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite};
use tokio::net::{TcpStream, ToSocketAddrs, UnixStream};
use tokio::sync::{mpsc, oneshot};

use super::payload::{
    decode_data_payload, decode_entries, encode_entries, BadBlocks, ChunkEntry, ChunkInfo, CloneTarget, DirtyRegion,
    Entry,
};
use super::{
    decode_reply, first_bad_block, write_loop, Checksums, ErrorCode, Opcode, Reply, RequestHeader, WireFrame,
    FLAG_ACCEPT, FLAG_ALL_VOLUMES, FLAG_CLEAR, FLAG_FUA, FLAG_NO_HOLE, FLAG_PAUSE_HOLDER,
};

/// Frames queued for the writer task before callers wait.
const SEND_QUEUE: usize = 1024;
/// Frames of one streaming reply buffered before the connection waits for
/// the consumer. Use a dedicated connection for long streams.
const STREAM_QUEUE: usize = 8;
const READ_CHUNK: usize = 256 << 10;

/// Why a request failed.
#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    /// The server answered with an error.
    #[error("{code} (aux {aux}): {message}")]
    Remote { code: ErrorCode, aux: u64, message: String },
    /// Received data did not match the checksums that came with it.
    #[error("received block {block} does not match its checksum")]
    Corrupt { block: usize },
    #[error("connecting: {0}")]
    Connect(#[source] io::Error),
    /// The connection failed or was closed; the request may or may not have
    /// been executed.
    #[error("connection closed: {0}")]
    Closed(String),
    /// The server sent something this client does not understand.
    #[error("protocol violation: {0}")]
    Protocol(String),
}

impl ClientError {
    /// The server's error code, for [`ClientError::Remote`].
    pub fn code(&self) -> Option<ErrorCode> {
        match self {
            ClientError::Remote { code, .. } => Some(*code),
            _ => None,
        }
    }
}

/// Where a data request (read, write, trim, write zeroes) applies: a byte
/// offset in one chunk of one volume, sent at the writer's fencing epoch and
/// the chunk's replica-set generation (0 skips the generation check on reads).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ChunkAt {
    pub volume: u64,
    pub chunk: u64,
    pub offset: u64,
    pub epoch: u64,
    pub generation: u64,
}

impl ChunkAt {
    fn header(self, opcode: Opcode, flags: u16, length: u32) -> RequestHeader {
        let ChunkAt { volume, chunk, offset, epoch, generation } = self;
        RequestHeader { flags, volume, chunk, offset, length, epoch, generation, ..RequestHeader::new(opcode, 0) }
    }
}

type ReplyResult = Result<Reply, ClientError>;

enum Waiter {
    One(oneshot::Sender<ReplyResult>),
    Stream(mpsc::Sender<ReplyResult>),
}

#[derive(Default)]
struct Shared {
    next_id: AtomicU64,
    state: Mutex<State>,
}

#[derive(Default)]
struct State {
    pending: HashMap<u64, Waiter>,
    closed: Option<String>,
}

impl Shared {
    fn register(&self, waiter: Waiter) -> Result<u64, ClientError> {
        let id = self.next_id.fetch_add(1, Ordering::Relaxed);
        let mut state = self.state.lock().expect("client state poisoned");
        if let Some(reason) = &state.closed {
            return Err(ClientError::Closed(reason.clone()));
        }
        state.pending.insert(id, waiter);
        Ok(id)
    }

    fn forget(&self, id: u64) {
        self.state.lock().expect("client state poisoned").pending.remove(&id);
    }

    /// Fails every outstanding request and refuses new ones.
    fn close(&self, reason: String) {
        let pending = {
            let mut state = self.state.lock().expect("client state poisoned");
            state.closed.get_or_insert(reason.clone());
            std::mem::take(&mut state.pending)
        };
        for waiter in pending.into_values() {
            let err = Err(ClientError::Closed(reason.clone()));
            match waiter {
                Waiter::One(tx) => drop(tx.send(err)),
                Waiter::Stream(tx) => drop(tx.try_send(err)),
            }
        }
    }

    async fn dispatch(&self, reply: Reply) {
        let id = reply.header.request_id;
        let stream = {
            let mut state = self.state.lock().expect("client state poisoned");
            match state.pending.get(&id) {
                Some(Waiter::Stream(tx)) => {
                    let tx = tx.clone();
                    if reply.header.is_end() {
                        state.pending.remove(&id);
                    }
                    Some(tx)
                }
                Some(Waiter::One(_)) => {
                    if let Some(Waiter::One(tx)) = state.pending.remove(&id) {
                        let _ = tx.send(Ok(reply));
                    }
                    return;
                }
                // The caller gave up waiting.
                None => return,
            }
        };
        if let Some(tx) = stream {
            let _ = tx.send(Ok(reply)).await;
        }
    }
}

/// A pipelined connection to one chunk server.
#[derive(Clone)]
pub struct DataClient {
    shared: Arc<Shared>,
    tx: mpsc::Sender<WireFrame>,
    /// Longest wait for an answer (see [`DataClient::connect_within`]).
    answer_within: Option<Duration>,
}

/// One segment of a `CHUNK_READ_STREAM`.
#[derive(Clone, Debug)]
pub struct Segment {
    /// Byte offset of the segment within the chunk.
    pub offset: u64,
    pub data: Bytes,
    pub checksums: Vec<u32>,
}

/// Result of an admin scrub.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct ScrubReport {
    pub blocks_checked: u64,
    pub bad: Vec<BadBlocks>,
}

/// Segments of a chunk stream, in order. Ends after the last segment or
/// the first error.
pub struct ChunkStream {
    rx: mpsc::Receiver<ReplyResult>,
    done: bool,
    client: DataClient,
}

impl ChunkStream {
    pub async fn next(&mut self) -> Option<Result<Segment, ClientError>> {
        if self.done {
            return None;
        }
        let next = match self.client.answer(self.rx.recv()).await {
            Ok(next) => next,
            Err(e) => {
                self.done = true;
                return Some(Err(e));
            }
        };
        let reply = match next {
            Some(Ok(reply)) => reply,
            Some(Err(e)) => {
                self.done = true;
                return Some(Err(e));
            }
            None => {
                self.done = true;
                return Some(Err(ClientError::Closed("stream ended without END".into())));
            }
        };
        self.done = reply.header.is_end();
        Some(into_result(reply).and_then(|reply| {
            let offset = reply.header.aux;
            let (data, checksums) = verified_data(reply)?;
            Ok(Segment { offset, data, checksums })
        }))
    }
}

fn into_result(reply: Reply) -> Result<Reply, ClientError> {
    match reply.header.status {
        Ok(()) => Ok(reply),
        Err(code) => Err(ClientError::Remote { code, aux: reply.header.aux, message: reply.message() }),
    }
}

fn verified_data(reply: Reply) -> Result<(Bytes, Vec<u32>), ClientError> {
    let (data, checksums) = decode_data_payload(reply.payload)
        .ok_or_else(|| ClientError::Protocol("data payload of invalid length".into()))?;
    if let Some(block) = first_bad_block(&data, &checksums) {
        return Err(ClientError::Corrupt { block });
    }
    Ok((data, checksums.to_vec()))
}

fn entries<E: Entry>(payload: Bytes) -> Result<Vec<E>, ClientError> {
    decode_entries(payload).ok_or_else(|| ClientError::Protocol("record payload of invalid length".into()))
}

/// The `length` of a `VOLUME_PAUSE`: whole milliseconds, rounded up (a
/// timeout below 1 ms must not become 0, which asks for the server default).
fn pause_timeout_ms(timeout: Duration) -> u32 {
    u32::try_from(timeout.as_nanos().div_ceil(1_000_000)).unwrap_or(u32::MAX)
}

fn volume_scope(header: &mut RequestHeader, volume: Option<u64>) {
    match volume {
        Some(v) => header.volume = v,
        None => header.flags |= FLAG_ALL_VOLUMES,
    }
}

impl DataClient {
    /// Connects to `endpoint` (`unix:/path` or `host:port`) in plaintext;
    /// [`Connector`](super::Connector) connects over TLS as well.
    pub async fn connect(endpoint: &str) -> Result<DataClient, ClientError> {
        super::Connector::plaintext().connect(endpoint).await
    }

    /// From now on, fails any request that gets no answer within `limit`.
    pub(super) fn answering_within(self, limit: Duration) -> DataClient {
        DataClient { answer_within: Some(limit), ..self }
    }

    /// Waits for `answer`, within the connection's answer limit if it has one.
    async fn answer<T>(&self, answer: impl std::future::Future<Output = T>) -> Result<T, ClientError> {
        let Some(limit) = self.answer_within else { return Ok(answer.await) };
        match tokio::time::timeout(limit, answer).await {
            Ok(answered) => Ok(answered),
            Err(_) => {
                let reason = format!("no answer within {limit:?}");
                self.shared.close(reason.clone());
                Err(ClientError::Closed(reason))
            }
        }
    }

    pub async fn connect_tcp(addr: impl ToSocketAddrs) -> Result<DataClient, ClientError> {
        let stream = TcpStream::connect(addr).await.map_err(ClientError::Connect)?;
        stream.set_nodelay(true).map_err(ClientError::Connect)?;
        let (r, w) = stream.into_split();
        Ok(DataClient::spawn(r, w))
    }

    pub async fn connect_unix(path: impl AsRef<Path>) -> Result<DataClient, ClientError> {
        let stream = UnixStream::connect(path).await.map_err(ClientError::Connect)?;
        let (r, w) = stream.into_split();
        Ok(DataClient::spawn(r, w))
    }

    /// Runs the protocol over an already connected stream.
    pub fn from_stream<S>(stream: S) -> DataClient
    where
        S: AsyncRead + AsyncWrite + Send + 'static,
    {
        let (r, w) = tokio::io::split(stream);
        DataClient::spawn(r, w)
    }

    fn spawn<R, W>(reader: R, writer: W) -> DataClient
    where
        R: AsyncRead + Unpin + Send + 'static,
        W: AsyncWrite + Unpin + Send + 'static,
    {
        let shared = Arc::new(Shared::default());
        let (tx, rx) = mpsc::channel(SEND_QUEUE);
        let on_error = shared.clone();
        tokio::spawn(async move {
            if let Err(e) = write_loop(writer, rx).await {
                on_error.close(format!("write failed: {e}"));
            }
        });
        tokio::spawn(read_loop(reader, shared.clone()));
        DataClient { shared, tx, answer_within: None }
    }

    async fn send(&self, header: RequestHeader, data: Bytes, tail: Bytes) -> Result<(), ClientError> {
        let id = header.request_id;
        let frame = WireFrame::request(&header, data, tail);
        if self.tx.send(frame).await.is_err() {
            self.shared.forget(id);
            return Err(ClientError::Closed("writer stopped".into()));
        }
        Ok(())
    }

    /// Sends one request and waits for its single reply.
    async fn call(&self, mut header: RequestHeader, data: Bytes, tail: Bytes) -> Result<Reply, ClientError> {
        let (tx, rx) = oneshot::channel();
        header.request_id = self.shared.register(Waiter::One(tx))?;
        self.send(header, data, tail).await?;
        let reply = self.answer(rx).await?.map_err(|_| ClientError::Closed("reply channel dropped".into()))??;
        into_result(reply)
    }

    /// Sends one request whose reply spans several frames.
    async fn call_stream(&self, mut header: RequestHeader) -> Result<mpsc::Receiver<ReplyResult>, ClientError> {
        let (tx, rx) = mpsc::channel(STREAM_QUEUE);
        header.request_id = self.shared.register(Waiter::Stream(tx))?;
        self.send(header, Bytes::new(), Bytes::new()).await?;
        Ok(rx)
    }

    /// Collects the records of a multi-frame listing, and the last frame's `aux`.
    async fn collect<E: Entry>(&self, header: RequestHeader) -> Result<(Vec<E>, u64), ClientError> {
        let mut rx = self.call_stream(header).await?;
        let mut out = Vec::new();
        loop {
            let reply = match self.answer(rx.recv()).await? {
                Some(reply) => into_result(reply?)?,
                None => return Err(ClientError::Closed("listing ended without END".into())),
            };
            let end = reply.header.is_end();
            let aux = reply.header.aux;
            out.extend(entries::<E>(reply.payload)?);
            if end {
                return Ok((out, aux));
            }
        }
    }

    /// True once the connection has failed or closed; every call fails from
    /// then on and the caller should connect again.
    pub fn is_closed(&self) -> bool {
        self.shared.state.lock().expect("client state poisoned").closed.is_some()
    }

    /// Whether `other` is a handle of this very connection.
    pub fn same_connection(&self, other: &DataClient) -> bool {
        Arc::ptr_eq(&self.shared, &other.shared)
    }

    pub async fn ping(&self) -> Result<(), ClientError> {
        self.call(RequestHeader::new(Opcode::Ping, 0), Bytes::new(), Bytes::new()).await.map(drop)
    }

    /// Writes `data` (a multiple of 4 KiB) at `at`.
    /// `checksums` holds the CRC32 of each 4 KiB block ([`super::block_checksums`]).
    /// With `fua` the data is durable when this returns.
    pub async fn write(&self, at: ChunkAt, data: Bytes, checksums: &[u32], fua: bool) -> Result<(), ClientError> {
        self.write_with_flags(at, data, checksums, if fua { FLAG_FUA } else { 0 }).await
    }

    /// [`DataClient::write`] by the holder of the volume's pause: it passes
    /// the pause (a resync that must land while the writers wait).
    pub async fn write_holding_pause(&self, at: ChunkAt, data: Bytes, checksums: &[u32]) -> Result<(), ClientError> {
        self.write_with_flags(at, data, checksums, FLAG_PAUSE_HOLDER).await
    }

    async fn write_with_flags(
        &self,
        at: ChunkAt,
        data: Bytes,
        checksums: &[u32],
        flags: u16,
    ) -> Result<(), ClientError> {
        let length = u32::try_from(data.len()).map_err(|_| ClientError::Protocol("write too large".into()))?;
        let header = at.header(Opcode::Write, flags, length);
        let tail = Checksums::from_slice(checksums).into_bytes();
        self.call(header, data, tail).await.map(drop)
    }

    /// Reads `length` bytes at `at`; returns the data and its per-block
    /// CRC32s, already verified. The server refuses an epoch older than
    /// the volume's newest, so a fenced node never reads the new owner's data.
    pub async fn read(&self, at: ChunkAt, length: u32) -> Result<(Bytes, Vec<u32>), ClientError> {
        let reply = self.call(at.header(Opcode::Read, 0, length), Bytes::new(), Bytes::new()).await?;
        let (data, checksums) = verified_data(reply)?;
        if data.len() != length as usize {
            return Err(ClientError::Protocol(format!("asked for {length} bytes, got {}", data.len())));
        }
        Ok((data, checksums))
    }

    /// Makes every write acknowledged so far durable, for one volume or all.
    pub async fn flush(&self, volume: Option<u64>) -> Result<(), ClientError> {
        let mut header = RequestHeader::new(Opcode::Flush, 0);
        volume_scope(&mut header, volume);
        self.call(header, Bytes::new(), Bytes::new()).await.map(drop)
    }

    /// Discards `length` bytes at `at`; they read as zeros afterwards and
    /// their space is released.
    pub async fn trim(&self, at: ChunkAt, length: u32, fua: bool) -> Result<(), ClientError> {
        let flags = if fua { FLAG_FUA } else { 0 };
        self.call(at.header(Opcode::Trim, flags, length), Bytes::new(), Bytes::new()).await.map(drop)
    }

    /// Zeroes `length` bytes at `at`; with `no_hole` their space stays allocated.
    pub async fn write_zeroes(&self, at: ChunkAt, length: u32, fua: bool, no_hole: bool) -> Result<(), ClientError> {
        let flags = if fua { FLAG_FUA } else { 0 } | if no_hole { FLAG_NO_HOLE } else { 0 };
        self.call(at.header(Opcode::WriteZeroes, flags, length), Bytes::new(), Bytes::new()).await.map(drop)
    }

    /// Creates an empty (all zeros) chunk of `size` bytes (a multiple of 4 KiB).
    pub async fn create_chunk(&self, volume: u64, chunk: u64, size: u32, generation: u64) -> Result<(), ClientError> {
        let header =
            RequestHeader { volume, chunk, length: size, generation, ..RequestHeader::new(Opcode::ChunkCreate, 0) };
        self.call(header, Bytes::new(), Bytes::new()).await.map(drop)
    }

    /// Deletes a chunk; `generation` 0 deletes whatever generation it has.
    pub async fn delete_chunk(&self, volume: u64, chunk: u64, generation: u64) -> Result<(), ClientError> {
        let header = RequestHeader { volume, chunk, generation, ..RequestHeader::new(Opcode::ChunkDelete, 0) };
        self.call(header, Bytes::new(), Bytes::new()).await.map(drop)
    }

    /// Moves a chunk to a newer replica-set generation (durably).
    pub async fn set_generation(&self, volume: u64, chunk: u64, generation: u64) -> Result<(), ClientError> {
        let header = RequestHeader { volume, chunk, generation, ..RequestHeader::new(Opcode::ChunkSetGeneration, 0) };
        self.call(header, Bytes::new(), Bytes::new()).await.map(drop)
    }

    pub async fn chunk_info(&self, volume: u64, chunk: u64) -> Result<ChunkInfo, ClientError> {
        let header = RequestHeader { volume, chunk, ..RequestHeader::new(Opcode::ChunkInfo, 0) };
        let reply = self.call(header, Bytes::new(), Bytes::new()).await?;
        entries::<ChunkInfo>(reply.payload)?.pop().ok_or_else(|| ClientError::Protocol("empty chunk info".into()))
    }

    /// XXH3-64 of each block of a chunk range as the server holds it
    /// ([`super::BAD_BLOCK_HASH`] for a block failing its checksum): two
    /// copies agree on a block when its hashes are equal. `generation` 0
    /// skips the generation check.
    pub async fn block_hashes(
        &self,
        volume: u64,
        chunk: u64,
        offset: u64,
        length: u32,
        generation: u64,
    ) -> Result<Vec<u64>, ClientError> {
        let header =
            RequestHeader { volume, chunk, offset, length, generation, ..RequestHeader::new(Opcode::ChunkHashes, 0) };
        let reply = self.call(header, Bytes::new(), Bytes::new()).await?;
        let blocks = length as usize / super::BLOCK_SIZE;
        if reply.payload.len() != blocks * 8 {
            return Err(ClientError::Protocol(format!(
                "asked for {blocks} block hashes, got {} bytes",
                reply.payload.len()
            )));
        }
        Ok(reply.payload.chunks_exact(8).map(|h| u64::from_le_bytes(h.try_into().expect("8 bytes"))).collect())
    }

    /// Chunks stored on the server, for one volume or all, sorted.
    pub async fn list_chunks(&self, volume: Option<u64>) -> Result<Vec<ChunkEntry>, ClientError> {
        let mut header = RequestHeader::new(Opcode::ListChunks, 0);
        volume_scope(&mut header, volume);
        Ok(self.collect(header).await?.0)
    }

    /// Verifies every block now (one volume or all) and reports the bad ones.
    pub async fn scrub(&self, volume: Option<u64>) -> Result<ScrubReport, ClientError> {
        let mut header = RequestHeader::new(Opcode::Scrub, 0);
        volume_scope(&mut header, volume);
        let (bad, blocks_checked) = self.collect(header).await?;
        Ok(ScrubReport { blocks_checked, bad })
    }

    /// Regions in the activity log: written since their last flush, or
    /// recovered after an unclean stop ([`super::DIRTY_RECOVERED`]).
    pub async fn dirty_regions(&self, volume: Option<u64>) -> Result<Vec<DirtyRegion>, ClientError> {
        let mut header = RequestHeader::new(Opcode::DirtyRegions, 0);
        volume_scope(&mut header, volume);
        Ok(self.collect(header).await?.0)
    }

    /// Forgets the recovered dirty regions of a chunk overlapping
    /// `offset..offset + length` (`length` 0 = to the chunk end), once
    /// they have been resynced. Returns the regions still listed for the chunk.
    pub async fn clear_dirty_regions(
        &self,
        volume: u64,
        chunk: u64,
        offset: u64,
        length: u32,
    ) -> Result<Vec<DirtyRegion>, ClientError> {
        let header = RequestHeader {
            flags: FLAG_CLEAR,
            volume,
            chunk,
            offset,
            length,
            ..RequestHeader::new(Opcode::DirtyRegions, 0)
        };
        Ok(self.collect(header).await?.0)
    }

    /// Keeps what this server's disk holds in a chunk's recovered regions
    /// as the chunk's content (blocks failing their stored checksum get
    /// their data's, durably), then forgets the regions: for the one copy
    /// kept when every replica of the chunk crashed with unflushed writes.
    pub async fn accept_dirty_regions(&self, volume: u64, chunk: u64) -> Result<(), ClientError> {
        let header = RequestHeader {
            flags: FLAG_CLEAR | FLAG_ACCEPT,
            volume,
            chunk,
            ..RequestHeader::new(Opcode::DirtyRegions, 0)
        };
        self.collect::<DirtyRegion>(header).await.map(drop)
    }

    /// Pauses changes (writes, trims, zeroing) to `volume` on this server:
    /// from now on they wait, and this returns once the changes already in
    /// flight have finished. Reads and flushes go on. The pause ends with
    /// [`DataClient::resume_volume`] or after `timeout` (zero: the server's
    /// default, 10 s; the server grants at most 60 s); pausing again renews
    /// it. Fails with `Interrupted` if the pause ended before the in-flight
    /// changes finished.
    ///
    /// Waiting changes occupy the connection's request slots: pause and
    /// resume over a connection that carries no writes.
    pub async fn pause_volume(&self, volume: u64, timeout: Duration) -> Result<(), ClientError> {
        self.pause_volume_for(volume, 0, timeout).await
    }

    /// [`DataClient::pause_volume`] as `holder`: the volume stays paused
    /// while any holder holds it, and each holder ends only its own hold
    /// ([`DataClient::resume_volume_for`]), so concurrent coordinators (a
    /// snapshot, a replica rebuild) never end each other's pause.
    pub async fn pause_volume_for(&self, volume: u64, holder: u64, timeout: Duration) -> Result<(), ClientError> {
        let header = RequestHeader {
            volume,
            offset: holder,
            length: pause_timeout_ms(timeout),
            ..RequestHeader::new(Opcode::VolumePause, 0)
        };
        self.call(header, Bytes::new(), Bytes::new()).await.map(drop)
    }

    /// Raises `volume`'s epoch on the server to `epoch` and waits until no
    /// change of an older epoch is in flight there. Returns the volume's
    /// epoch on the server afterwards (newer, if it had seen a newer one).
    pub async fn fence_volume(&self, volume: u64, epoch: u64) -> Result<u64, ClientError> {
        let header = RequestHeader { volume, epoch, ..RequestHeader::new(Opcode::VolumeFence, 0) };
        self.call(header, Bytes::new(), Bytes::new()).await.map(|reply| reply.header.aux)
    }

    /// Presents a capability token for the rest of the connection: every
    /// request sent after this call is checked against it.
    pub async fn authorize(&self, token: Bytes) -> Result<(), ClientError> {
        self.call(RequestHeader::new(Opcode::Authorize, 0), token, Bytes::new()).await.map(drop)
    }

    /// Ends a pause of `volume`; its waiting changes proceed. Succeeds when
    /// the volume is not paused.
    pub async fn resume_volume(&self, volume: u64) -> Result<(), ClientError> {
        self.resume_volume_for(volume, 0).await
    }

    /// Ends `holder`'s hold on `volume`; the volume resumes when no other
    /// holder remains.
    pub async fn resume_volume_for(&self, volume: u64, holder: u64) -> Result<(), ClientError> {
        let header = RequestHeader { volume, offset: holder, ..RequestHeader::new(Opcode::VolumeResume, 0) };
        self.call(header, Bytes::new(), Bytes::new()).await.map(drop)
    }

    /// Creates chunk `target_chunk` of `target_volume` (at `target_generation`)
    /// on this server as a durable copy of the current data and checksums of
    /// chunk `chunk` of `volume`. Works while the source volume is paused.
    pub async fn clone_chunk(
        &self,
        volume: u64,
        chunk: u64,
        target_volume: u64,
        target_chunk: u64,
        target_generation: u64,
    ) -> Result<(), ClientError> {
        let header = RequestHeader { volume, chunk, ..RequestHeader::new(Opcode::ChunkClone, 0) };
        let target = CloneTarget { volume: target_volume, chunk: target_chunk, generation: target_generation };
        self.call(header, encode_entries(&[target]), Bytes::new()).await.map(drop)
    }

    /// Streams a chunk range (`length` 0 = to the chunk end) in segments,
    /// for rebuilds. `generation` 0 skips the generation check.
    pub async fn read_chunk_stream(
        &self,
        volume: u64,
        chunk: u64,
        offset: u64,
        length: u32,
        generation: u64,
    ) -> Result<ChunkStream, ClientError> {
        let header = RequestHeader {
            volume,
            chunk,
            offset,
            length,
            generation,
            ..RequestHeader::new(Opcode::ChunkReadStream, 0)
        };
        let rx = self.call_stream(header).await?;
        Ok(ChunkStream { rx, done: false, client: self.clone() })
    }
}

async fn read_loop<R>(mut reader: R, shared: Arc<Shared>)
where
    R: AsyncRead + Unpin,
{
    let mut buf = BytesMut::with_capacity(READ_CHUNK);
    let reason = loop {
        match decode_reply(&mut buf) {
            Ok(Some(reply)) => {
                shared.dispatch(reply).await;
                continue;
            }
            Ok(None) => {}
            Err(e) => break format!("undecodable reply: {e}"),
        }
        if buf.capacity() - buf.len() < READ_CHUNK / 4 {
            buf.reserve(READ_CHUNK);
        }
        match reader.read_buf(&mut buf).await {
            Ok(0) => break "server closed the connection".to_string(),
            Ok(_) => {}
            Err(e) => break format!("read failed: {e}"),
        }
    };
    shared.close(reason);
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pause_timeouts_round_up_to_milliseconds() {
        assert_eq!(pause_timeout_ms(Duration::ZERO), 0);
        assert_eq!(pause_timeout_ms(Duration::from_micros(1)), 1);
        assert_eq!(pause_timeout_ms(Duration::from_millis(1500)), 1500);
        assert_eq!(pause_timeout_ms(Duration::from_micros(1500)), 2);
        assert_eq!(pause_timeout_ms(Duration::from_secs(u64::MAX)), u32::MAX);
    }
}
