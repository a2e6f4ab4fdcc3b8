//! The data-plane frame protocol between volume engines and chunk servers.
//!
//! A connection (TCP or unix socket) carries request frames from the client
//! and reply frames from the server. Requests are pipelined: a client may send
//! many before the first reply, and the server answers in completion order.
//! Replies are matched to requests by `request_id`. A request is complete when
//! a reply carrying [`REPLY_END`] arrives; most operations answer with exactly
//! one such frame, streaming ones (chunk streams and listings) with several.
//!
//! All integers are little-endian.
//!
//! # Request frame: 64-byte header, then `payload_len` bytes of payload
//!
//! | offset | size | field         | meaning                                          |
//! |-------:|-----:|---------------|--------------------------------------------------|
//! |      0 |    4 | `magic`       | [`REQUEST_MAGIC`] (`"BLRQ"`)                       |
//! |      4 |    1 | `version`     | [`VERSION`]                                        |
//! |      5 |    1 | `opcode`      | [`Opcode`]                                         |
//! |      6 |    2 | `flags`       | `FLAG_*` bits; unknown bits are refused            |
//! |      8 |    8 | `request_id`  | chosen by the client, echoed in the reply          |
//! |     16 |    8 | `volume`      | volume or snapshot id                              |
//! |     24 |    8 | `chunk`       | chunk index within the volume                      |
//! |     32 |    8 | `offset`      | byte offset within the chunk                       |
//! |     40 |    4 | `length`      | bytes addressed (chunk size for `CHUNK_CREATE`)    |
//! |     44 |    4 | `payload_len` | bytes of payload after the header                  |
//! |     48 |    8 | `epoch`       | fencing epoch of the volume attachment             |
//! |     56 |    8 | `generation`  | replica-set generation of the chunk                |
//!
//! # Reply frame: 32-byte header, then `payload_len` bytes of payload
//!
//! | offset | size | field         | meaning                                          |
//! |-------:|-----:|---------------|--------------------------------------------------|
//! |      0 |    4 | `magic`       | [`REPLY_MAGIC`] (`"BLRP"`)                         |
//! |      4 |    1 | `version`     | [`VERSION`]                                        |
//! |      5 |    1 | `opcode`      | opcode of the request                              |
//! |      6 |    2 | `flags`       | [`REPLY_END`] on the last frame of a request       |
//! |      8 |    8 | `request_id`  | of the request answered                            |
//! |     16 |    2 | `status`      | 0 = ok, otherwise an [`ErrorCode`]                 |
//! |     18 |    2 | reserved      | zero                                               |
//! |     20 |    4 | `payload_len` | bytes of payload after the header                  |
//! |     24 |    8 | `aux`         | per-operation value, see below                     |
//!
//! # Operations
//!
//! Data is addressed in 4 KiB blocks ([`BLOCK_SIZE`]); `offset` and `length`
//! of data operations must be multiples of it. Every block travels with its
//! CRC32 (IEEE, as computed by `crc32fast`): a "data payload" is the data
//! followed by one little-endian `u32` checksum per block
//! ([`data_payload_len`]).
//!
//! | opcode                  | request                                  | reply payload / `aux`                           |
//! |-------------------------|------------------------------------------|-------------------------------------------------|
//! | `PING`                  | -                                        | -                                               |
//! | `WRITE`                 | data payload; `FLAG_FUA`, `FLAG_PAUSE_HOLDER` | -                                          |
//! | `READ`                  | `offset`, `length`                       | data payload                                    |
//! | `FLUSH`                 | `volume` or `FLAG_ALL_VOLUMES`           | -                                               |
//! | `TRIM`                  | range; data reads as zeros afterwards    | -                                               |
//! | `WRITE_ZEROES`          | range; `FLAG_NO_HOLE` keeps it allocated | -                                               |
//! | `CHUNK_CREATE`          | `length` = chunk size, `generation`      | -                                               |
//! | `CHUNK_DELETE`          | `generation` (0 = any)                   | -                                               |
//! | `CHUNK_INFO`            | `generation` (0 = any)                   | [`ChunkInfo`]                                   |
//! | `CHUNK_SET_GENERATION`  | `generation` = new generation (>= old)   | -                                               |
//! | `CHUNK_READ_STREAM`     | `offset`, `length` (0 = to chunk end)    | several frames: data payload, `aux` = offset    |
//! | `LIST_CHUNKS`           | `volume` or `FLAG_ALL_VOLUMES`           | frames of [`ChunkEntry`]                        |
//! | `SCRUB`                 | `volume` or `FLAG_ALL_VOLUMES`           | frames of [`BadBlocks`]; last `aux` = blocks checked |
//! | `DIRTY_REGIONS`         | `volume` or `FLAG_ALL_VOLUMES`; `FLAG_CLEAR`, `FLAG_ACCEPT` | frames of [`DirtyRegion`]    |
//! | `VOLUME_PAUSE`          | `volume`; `length` = auto-resume timeout, ms (0 = 10 s, at most 60 s) | `aux` = timeout granted, ms |
//! | `VOLUME_RESUME`         | `volume`                                 | -                                               |
//! | `CHUNK_CLONE`           | source `volume`, `chunk`, `generation` (0 = any); payload: [`CloneTarget`] | -          |
//! | `VOLUME_FENCE`          | `volume`, `epoch`                        | `aux` = the volume's epoch here afterwards      |
//! | `CHUNK_HASHES`          | `offset`, `length`, `generation` (0 = any) | one `u64` LE per block: XXH3-64 of its data ([`BAD_BLOCK_HASH`] if it fails its checksum) |
//! | `AUTHORIZE`             | payload: a capability token (at most [`MAX_CAPABILITY`] bytes) | -                  |
//!
//! `WRITE`, `TRIM` and `WRITE_ZEROES` carry the attachment `epoch` and the
//! chunk's `generation`, both checked. `FLAG_FUA` on them makes the change
//! durable before the reply. `VOLUME_FENCE` raises the volume's epoch to `epoch` (persisted;
//! an older one changes nothing) and answers once every change admitted
//! under an older epoch has finished: afterwards no change of an older epoch
//! lands on this server. The metadata service sends it to every chunk
//! server when a volume is published. `DIRTY_REGIONS` with `FLAG_CLEAR` forgets the
//! regions of one chunk (`volume`, `chunk`, range `offset`/`length`, length 0 =
//! whole chunk) that were recovered after a restart, once they are resynced;
//! with `FLAG_ACCEPT` too, the server first keeps what its disk holds in
//! those regions (blocks failing their stored checksum get their data's,
//! durably): the copy chosen when every replica of the chunk crashed.
//!
//! `AUTHORIZE` presents a capability signed by the metadata service
//! (`ballast_tls::capability`) for the rest of the connection: a node's
//! certificate reaches only the volumes it holds a capability for, changes
//! only at the capability's epoch, and only until it expires. A newer one
//! for the same volume replaces the older. It takes effect for every
//! request sent after it on the connection.
//!
//! An error reply carries a UTF-8 message as payload and in `aux`: the current
//! epoch for `StaleEpoch`, the chunk's generation for `StaleGeneration`, the
//! byte offset (within the chunk) of the first bad block for `CorruptBlock`
//! and `ChecksumMismatch`.
//!
//! # Pauses and clones (crash-consistent snapshots)
//!
//! A snapshot coordinator pauses the volume on every server holding one of
//! its chunks, clones each chunk once into a chunk of the snapshot (another
//! `volume` id, same chunk index), resumes the volume everywhere, then
//! copies the snapshot chunks to more servers (`CHUNK_READ_STREAM`,
//! `CHUNK_CREATE`, `WRITE`).
//!
//! - `VOLUME_PAUSE` stops the server admitting changes (`WRITE`, `TRIM`,
//!   `WRITE_ZEROES`) to `volume`: new ones wait (they do not fail), and the
//!   reply comes once the changes admitted before it have all finished.
//!   Reads, `FLUSH` and admin requests go on. The pause lasts until
//!   `VOLUME_RESUME` or until its timeout elapses (so a coordinator that dies
//!   cannot hold a volume for ever); pausing a paused volume renews it (the
//!   timeout counts from the latest `VOLUME_PAUSE`). If the pause ends before
//!   the in-flight changes have finished, the reply is `Interrupted`. Waiting
//!   changes count against the connection's requests in flight (256): send
//!   pauses and resumes on a connection of their own.
//! - `VOLUME_RESUME` lets the waiting changes proceed. Resuming a volume that
//!   is not paused succeeds.
//! - `CHUNK_CLONE` creates the target chunk (payload [`CloneTarget`]: volume,
//!   chunk, generation) as a durable copy of the source's current data and
//!   checksums, reflinked where the filesystem can. Changes to the source
//!   wait while it is copied (reads do not); it does not wait for a pause.
//!   Blocks are copied as they are: a block failing its checksum fails it in
//!   the clone too, and regions the source still has to resync after a crash
//!   (`DIRTY_RECOVERED`) are not resynced in the clone, so clone a replica
//!   without them. Errors: `NoSuchChunk`, `ChunkExists` (the target),
//!   `StaleGeneration` (the source), `NoSpace`.
//!
//! These three and `VOLUME_FENCE` address one volume: `FLAG_ALL_VOLUMES` is
//! refused (`BadFrame`).
//!
//! # Framing errors
//!
//! The decoders never panic on any input. A bad magic or version, or a
//! payload larger than [`MAX_PAYLOAD`], desynchronises the stream
//! ([`DecodeError::is_fatal`]): the server answers with an error when the
//! request id is readable and closes the connection. Other errors (unknown
//! opcode, inconsistent lengths) consume the frame; the server replies with
//! the error and carries on.
//!
//! # Reading and writing
//!
//! [`decode_request`] and [`decode_reply`] work on a `BytesMut` read buffer
//! and split payloads off it without copying. A reader that wants a large
//! payload in a buffer of its own (the chunk server receives write data
//! straight into 4 KiB-aligned buffers for O_DIRECT) parses the header with
//! [`peek_request`] and completes it with [`RequestPrefix::finish`].
//! [`WireFrame`] and [`write_frames`] send a header and its payload `Bytes`
//! with vectored writes. [`DataClient`] is the client side.

mod client;
mod connector;
mod copy;
mod held_pause;
mod payload;
mod wire;

pub use client::{ChunkAt, ChunkStream, ClientError, DataClient, ScrubReport, Segment};
pub use connector::Connector;
pub use copy::{copy_chunk, holds_clean_copy, sync_chunk, CopyTarget};
pub use held_pause::HeldPause;
pub use payload::{
    decode_data_payload, decode_entries, encode_entries, BadBlocks, ChunkEntry, ChunkInfo, CloneTarget, DirtyRegion,
    Entry, DIRTY_RECOVERED,
};
pub use wire::{write_frames, write_loop, WireFrame};

use bytes::{Buf, BufMut, Bytes, BytesMut};

/// Size of a checksummed block, and the alignment of data offsets and lengths.
pub const BLOCK_SIZE: usize = 4096;
/// Magic of a request header: `"BLRQ"`.
pub const REQUEST_MAGIC: u32 = u32::from_le_bytes(*b"BLRQ");
/// Magic of a reply header: `"BLRP"`.
pub const REPLY_MAGIC: u32 = u32::from_le_bytes(*b"BLRP");
/// Protocol version spoken by this crate.
pub const VERSION: u8 = 1;
/// Encoded size of a request header.
pub const REQUEST_HEADER_LEN: usize = 64;
/// Encoded size of a reply header.
pub const REPLY_HEADER_LEN: usize = 32;
/// Largest data range of one `READ` or `WRITE`.
pub const MAX_DATA: usize = 8 << 20;
/// Largest range one `CHUNK_HASHES` covers.
pub const MAX_HASHED: usize = 64 << 20;
/// The hash `CHUNK_HASHES` gives a block that fails its stored checksum:
/// never taken for equal to a good copy's (XXH3 of a block hitting it
/// is as likely as guessing a 64-bit number).
pub const BAD_BLOCK_HASH: u64 = u64::MAX;
/// Largest capability token `AUTHORIZE` carries.
pub const MAX_CAPABILITY: usize = 2048;

/// Largest payload of any frame: [`MAX_DATA`] plus its checksums.
pub const MAX_PAYLOAD: usize = MAX_DATA + MAX_DATA / BLOCK_SIZE * 4;

/// Request flag: the change is durable before the reply.
pub const FLAG_FUA: u16 = 1 << 0;
/// Request flag: the operation covers every volume (`volume` is ignored).
pub const FLAG_ALL_VOLUMES: u16 = 1 << 1;
/// Request flag on `WRITE_ZEROES`: keep the range allocated.
pub const FLAG_NO_HOLE: u16 = 1 << 2;
/// Request flag on `DIRTY_REGIONS`: forget the chunk's recovered regions.
pub const FLAG_CLEAR: u16 = 1 << 3;
/// With `FLAG_CLEAR` on `DIRTY_REGIONS`: accept the data on disk in the
/// chunk's recovered regions before forgetting them.
pub const FLAG_ACCEPT: u16 = 1 << 5;
/// `WRITE` by the holder of the volume's pause (a resync after a fence):
/// it passes the pause that holds every other change back.
pub const FLAG_PAUSE_HOLDER: u16 = 1 << 4;
const KNOWN_REQUEST_FLAGS: u16 =
    FLAG_FUA | FLAG_ALL_VOLUMES | FLAG_NO_HOLE | FLAG_CLEAR | FLAG_PAUSE_HOLDER | FLAG_ACCEPT;

/// Reply flag: the last frame for this request.
pub const REPLY_END: u16 = 1 << 0;

/// Operation codes.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
#[repr(u8)]
pub enum Opcode {
    Ping = 1,
    Write = 2,
    Read = 3,
    Flush = 4,
    Trim = 5,
    WriteZeroes = 6,
    ChunkCreate = 7,
    ChunkDelete = 8,
    ChunkInfo = 9,
    ChunkReadStream = 10,
    ListChunks = 11,
    Scrub = 12,
    DirtyRegions = 13,
    ChunkSetGeneration = 14,
    VolumePause = 15,
    VolumeResume = 16,
    ChunkClone = 17,
    VolumeFence = 18,
    ChunkHashes = 19,
    Authorize = 20,
}

impl Opcode {
    pub const ALL: [Opcode; 20] = [
        Opcode::Ping,
        Opcode::Write,
        Opcode::Read,
        Opcode::Flush,
        Opcode::Trim,
        Opcode::WriteZeroes,
        Opcode::ChunkCreate,
        Opcode::ChunkDelete,
        Opcode::ChunkInfo,
        Opcode::ChunkReadStream,
        Opcode::ListChunks,
        Opcode::Scrub,
        Opcode::DirtyRegions,
        Opcode::ChunkSetGeneration,
        Opcode::VolumePause,
        Opcode::VolumeResume,
        Opcode::ChunkClone,
        Opcode::VolumeFence,
        Opcode::ChunkHashes,
        Opcode::Authorize,
    ];

    pub fn from_u8(value: u8) -> Option<Opcode> {
        Opcode::ALL.into_iter().find(|op| *op as u8 == value)
    }

    /// Lower-case name, used as a metrics label.
    pub fn name(self) -> &'static str {
        match self {
            Opcode::Ping => "ping",
            Opcode::Write => "write",
            Opcode::Read => "read",
            Opcode::Flush => "flush",
            Opcode::Trim => "trim",
            Opcode::WriteZeroes => "write_zeroes",
            Opcode::ChunkCreate => "chunk_create",
            Opcode::ChunkDelete => "chunk_delete",
            Opcode::ChunkInfo => "chunk_info",
            Opcode::ChunkReadStream => "chunk_read_stream",
            Opcode::ListChunks => "list_chunks",
            Opcode::Scrub => "scrub",
            Opcode::DirtyRegions => "dirty_regions",
            Opcode::ChunkSetGeneration => "chunk_set_generation",
            Opcode::VolumePause => "volume_pause",
            Opcode::VolumeResume => "volume_resume",
            Opcode::ChunkClone => "chunk_clone",
            Opcode::VolumeFence => "volume_fence",
            Opcode::ChunkHashes => "chunk_hashes",
            Opcode::Authorize => "authorize",
        }
    }
}

/// Error codes of a reply's `status` field (0 is success).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, thiserror::Error)]
#[repr(u16)]
pub enum ErrorCode {
    #[error("malformed frame")]
    BadFrame = 1,
    #[error("unknown opcode")]
    UnknownOpcode = 2,
    #[error("request too large")]
    TooLarge = 3,
    #[error("range outside the chunk")]
    OutOfRange = 4,
    #[error("offset or length not aligned to 4 KiB")]
    Misaligned = 5,
    #[error("payload does not match its checksums")]
    ChecksumMismatch = 6,
    #[error("stored block fails its checksum")]
    CorruptBlock = 7,
    #[error("stale attachment epoch")]
    StaleEpoch = 8,
    #[error("stale replica-set generation")]
    StaleGeneration = 9,
    #[error("no such chunk")]
    NoSuchChunk = 10,
    #[error("chunk already exists")]
    ChunkExists = 11,
    #[error("no space left")]
    NoSpace = 12,
    #[error("I/O error")]
    Io = 13,
    #[error("server shutting down")]
    ShuttingDown = 14,
    /// `VOLUME_PAUSE`: the pause ended (timeout or `VOLUME_RESUME`) before
    /// the volume's in-flight changes had finished.
    #[error("interrupted")]
    Interrupted = 15,
    /// The caller's certificate does not allow this request.
    #[error("permission denied")]
    PermissionDenied = 16,
}

impl ErrorCode {
    pub const ALL: [ErrorCode; 16] = [
        ErrorCode::BadFrame,
        ErrorCode::UnknownOpcode,
        ErrorCode::TooLarge,
        ErrorCode::OutOfRange,
        ErrorCode::Misaligned,
        ErrorCode::ChecksumMismatch,
        ErrorCode::CorruptBlock,
        ErrorCode::StaleEpoch,
        ErrorCode::StaleGeneration,
        ErrorCode::NoSuchChunk,
        ErrorCode::ChunkExists,
        ErrorCode::NoSpace,
        ErrorCode::Io,
        ErrorCode::ShuttingDown,
        ErrorCode::Interrupted,
        ErrorCode::PermissionDenied,
    ];

    pub fn from_u16(value: u16) -> Option<ErrorCode> {
        ErrorCode::ALL.into_iter().find(|c| *c as u16 == value)
    }
}

/// Result carried by a reply's `status` field.
pub type Status = Result<(), ErrorCode>;

fn status_to_u16(status: Status) -> u16 {
    match status {
        Ok(()) => 0,
        Err(code) => code as u16,
    }
}

/// Why a byte stream is not a valid frame.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum DecodeError {
    #[error("bad frame magic {0:#010x}")]
    BadMagic(u32),
    #[error("unsupported protocol version {version}")]
    BadVersion { version: u8, request_id: u64 },
    #[error("payload of {len} bytes exceeds the limit of {MAX_PAYLOAD}")]
    TooLarge { len: u32, request_id: u64 },
    #[error("unknown opcode {opcode}")]
    UnknownOpcode { opcode: u8, request_id: u64 },
    #[error("unknown reply status {status}")]
    UnknownStatus { status: u16, request_id: u64 },
    #[error("invalid {opcode:?} frame: {reason}")]
    Invalid { opcode: Opcode, request_id: u64, code: ErrorCode, reason: &'static str },
}

impl DecodeError {
    /// The request id, when the header was readable enough to trust it.
    pub fn request_id(&self) -> Option<u64> {
        match self {
            DecodeError::BadMagic(_) => None,
            DecodeError::BadVersion { request_id, .. }
            | DecodeError::TooLarge { request_id, .. }
            | DecodeError::UnknownOpcode { request_id, .. }
            | DecodeError::UnknownStatus { request_id, .. }
            | DecodeError::Invalid { request_id, .. } => Some(*request_id),
        }
    }

    /// The error code to answer with.
    pub fn code(&self) -> ErrorCode {
        match self {
            DecodeError::BadMagic(_) | DecodeError::BadVersion { .. } | DecodeError::UnknownStatus { .. } => {
                ErrorCode::BadFrame
            }
            DecodeError::TooLarge { .. } => ErrorCode::TooLarge,
            DecodeError::UnknownOpcode { .. } => ErrorCode::UnknownOpcode,
            DecodeError::Invalid { code, .. } => *code,
        }
    }

    /// True when the frame boundary is lost and the connection must close.
    pub fn is_fatal(&self) -> bool {
        matches!(self, DecodeError::BadMagic(_) | DecodeError::BadVersion { .. } | DecodeError::TooLarge { .. })
    }

    /// The opcode byte of the offending frame, for the error reply (0 when unknown).
    pub fn opcode_byte(&self) -> u8 {
        match self {
            DecodeError::UnknownOpcode { opcode, .. } => *opcode,
            DecodeError::Invalid { opcode, .. } => *opcode as u8,
            _ => 0,
        }
    }
}

/// Bytes of a data payload carrying `data_len` bytes of data.
pub fn data_payload_len(data_len: usize) -> usize {
    data_len + data_len / BLOCK_SIZE * 4
}

/// CRC32 of every 4 KiB block of `data` (a trailing partial block gets one too).
pub fn block_checksums(data: &[u8]) -> Vec<u32> {
    data.chunks(BLOCK_SIZE).map(crc32fast::hash).collect()
}

/// Index of the first block of `data` whose CRC32 differs from `checksums`
/// (a missing or extra checksum counts as a difference).
pub fn first_bad_block(data: &[u8], checksums: &Checksums) -> Option<usize> {
    let blocks = data.len().div_ceil(BLOCK_SIZE);
    let bad = data.chunks(BLOCK_SIZE).zip(checksums.iter()).position(|(block, crc)| crc32fast::hash(block) != crc);
    bad.or_else(|| (blocks != checksums.len()).then_some(blocks.min(checksums.len())))
}

/// Per-block CRC32s as they travel: a little-endian `u32` array, shared
/// without copying with the frame it came in.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Checksums(Bytes);

impl Checksums {
    /// Wraps little-endian encoded checksums. `bytes.len()` must be a multiple of 4.
    pub fn from_bytes(bytes: Bytes) -> Checksums {
        debug_assert_eq!(bytes.len() % 4, 0);
        Checksums(bytes)
    }

    pub fn from_slice(values: &[u32]) -> Checksums {
        let mut buf = BytesMut::with_capacity(values.len() * 4);
        for v in values {
            buf.put_u32_le(*v);
        }
        Checksums(buf.freeze())
    }

    /// Checksums of every block of `data`.
    pub fn compute(data: &[u8]) -> Checksums {
        Checksums::from_slice(&block_checksums(data))
    }

    pub fn len(&self) -> usize {
        self.0.len() / 4
    }

    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }

    /// Checksum of block `i`. Panics when out of range.
    pub fn get(&self, i: usize) -> u32 {
        let b = &self.0[i * 4..i * 4 + 4];
        u32::from_le_bytes([b[0], b[1], b[2], b[3]])
    }

    pub fn iter(&self) -> impl ExactSizeIterator<Item = u32> + '_ {
        self.0.chunks_exact(4).map(|b| u32::from_le_bytes([b[0], b[1], b[2], b[3]]))
    }

    pub fn to_vec(&self) -> Vec<u32> {
        self.iter().collect()
    }

    /// The encoded form (as stored on disk and sent on the wire).
    pub fn as_bytes(&self) -> &Bytes {
        &self.0
    }

    pub fn into_bytes(self) -> Bytes {
        self.0
    }
}

/// Fixed fields of a request.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct RequestHeader {
    pub opcode: Opcode,
    pub flags: u16,
    pub request_id: u64,
    pub volume: u64,
    pub chunk: u64,
    pub offset: u64,
    pub length: u32,
    pub epoch: u64,
    pub generation: u64,
}

impl RequestHeader {
    /// A header for `opcode` with every other field zero.
    pub fn new(opcode: Opcode, request_id: u64) -> RequestHeader {
        RequestHeader {
            opcode,
            flags: 0,
            request_id,
            volume: 0,
            chunk: 0,
            offset: 0,
            length: 0,
            epoch: 0,
            generation: 0,
        }
    }

    pub fn has_flag(&self, flag: u16) -> bool {
        self.flags & flag != 0
    }

    /// Encodes the header announcing `payload_len` bytes of payload.
    pub fn encode(&self, payload_len: usize) -> [u8; REQUEST_HEADER_LEN] {
        let mut out = [0u8; REQUEST_HEADER_LEN];
        let mut b = &mut out[..];
        b.put_u32_le(REQUEST_MAGIC);
        b.put_u8(VERSION);
        b.put_u8(self.opcode as u8);
        b.put_u16_le(self.flags);
        b.put_u64_le(self.request_id);
        b.put_u64_le(self.volume);
        b.put_u64_le(self.chunk);
        b.put_u64_le(self.offset);
        b.put_u32_le(self.length);
        b.put_u32_le(u32::try_from(payload_len).expect("payload length fits u32"));
        b.put_u64_le(self.epoch);
        b.put_u64_le(self.generation);
        out
    }
}

/// A decoded request: header and payload (a slice of the read buffer).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Request {
    pub header: RequestHeader,
    pub payload: Bytes,
}

impl Request {
    /// Appends the encoded frame to `dst` (copies the payload; the client
    /// sends headers and payloads separately with [`write_frames`]).
    pub fn encode(&self, dst: &mut BytesMut) {
        dst.put_slice(&self.header.encode(self.payload.len()));
        dst.put_slice(&self.payload);
    }

    /// Splits a `WRITE` payload into data and checksums, without copying.
    pub fn write_parts(&self) -> (Bytes, Checksums) {
        let len = self.header.length as usize;
        (self.payload.slice(..len), Checksums::from_bytes(self.payload.slice(len..)))
    }

    /// The target of a `CHUNK_CLONE` (`None` if the payload is not one [`CloneTarget`]).
    pub fn clone_target(&self) -> Option<CloneTarget> {
        (self.payload.len() == CloneTarget::SIZE).then(|| CloneTarget::decode(&mut self.payload.clone()))
    }
}

/// Fixed fields of a reply.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ReplyHeader {
    /// Opcode byte of the request answered, echoed as received (it may be
    /// one this side does not know, for an `UnknownOpcode` error).
    pub opcode: u8,
    pub flags: u16,
    pub request_id: u64,
    pub status: Status,
    pub aux: u64,
}

impl ReplyHeader {
    /// A final (`REPLY_END`) reply header.
    pub fn new(opcode: Opcode, request_id: u64, status: Status) -> ReplyHeader {
        ReplyHeader { opcode: opcode as u8, flags: REPLY_END, request_id, status, aux: 0 }
    }

    pub fn is_end(&self) -> bool {
        self.flags & REPLY_END != 0
    }

    pub fn encode(&self, payload_len: usize) -> [u8; REPLY_HEADER_LEN] {
        let mut out = [0u8; REPLY_HEADER_LEN];
        let mut b = &mut out[..];
        b.put_u32_le(REPLY_MAGIC);
        b.put_u8(VERSION);
        b.put_u8(self.opcode);
        b.put_u16_le(self.flags);
        b.put_u64_le(self.request_id);
        b.put_u16_le(status_to_u16(self.status));
        b.put_u16_le(0);
        b.put_u32_le(u32::try_from(payload_len).expect("payload length fits u32"));
        b.put_u64_le(self.aux);
        out
    }
}

/// A decoded reply frame.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Reply {
    pub header: ReplyHeader,
    pub payload: Bytes,
}

impl Reply {
    pub fn encode(&self, dst: &mut BytesMut) {
        dst.put_slice(&self.header.encode(self.payload.len()));
        dst.put_slice(&self.payload);
    }

    /// The error message of an error reply (empty when none was sent).
    pub fn message(&self) -> String {
        String::from_utf8_lossy(&self.payload).into_owned()
    }
}

fn invalid(opcode: Opcode, request_id: u64, code: ErrorCode, reason: &'static str) -> DecodeError {
    DecodeError::Invalid { opcode, request_id, code, reason }
}

/// Checks the payload of a request against what its opcode expects.
fn validate_request(h: &RequestHeader, payload_len: usize) -> Result<(), DecodeError> {
    let bad = |code, reason| Err(invalid(h.opcode, h.request_id, code, reason));
    if h.flags & !KNOWN_REQUEST_FLAGS != 0 {
        return bad(ErrorCode::BadFrame, "unknown flag bits");
    }
    let single_volume =
        matches!(h.opcode, Opcode::VolumePause | Opcode::VolumeResume | Opcode::ChunkClone | Opcode::VolumeFence);
    if single_volume && h.has_flag(FLAG_ALL_VOLUMES) {
        return bad(ErrorCode::BadFrame, "FLAG_ALL_VOLUMES is not accepted by this opcode");
    }
    match h.opcode {
        Opcode::Write => {
            let len = h.length as usize;
            if len > MAX_DATA {
                return bad(ErrorCode::TooLarge, "write larger than MAX_DATA");
            }
            if !len.is_multiple_of(BLOCK_SIZE) {
                return bad(ErrorCode::Misaligned, "write length not a multiple of 4 KiB");
            }
            if payload_len != data_payload_len(len) {
                return bad(ErrorCode::BadFrame, "payload is not data plus one checksum per block");
            }
        }
        Opcode::ChunkClone if payload_len != CloneTarget::SIZE => {
            return bad(ErrorCode::BadFrame, "payload is not one clone target");
        }
        Opcode::ChunkClone => {}
        Opcode::Authorize if payload_len == 0 || payload_len > MAX_CAPABILITY => {
            return bad(ErrorCode::BadFrame, "payload is not one capability")
        }
        Opcode::Authorize => {}
        _ if payload_len != 0 => return bad(ErrorCode::BadFrame, "unexpected payload"),
        Opcode::Read if h.length as usize > MAX_DATA => return bad(ErrorCode::TooLarge, "read larger than MAX_DATA"),
        Opcode::ChunkHashes if h.length as usize > MAX_HASHED => {
            return bad(ErrorCode::TooLarge, "hash range larger than MAX_HASHED")
        }
        _ => {}
    }
    Ok(())
}

/// A request header whose payload may not have arrived yet: lets a reader
/// receive a large payload straight into a buffer of its choosing, then
/// [`RequestPrefix::finish`] the request.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct RequestPrefix {
    /// Opcode byte as received (checked by `finish`).
    pub opcode: u8,
    pub flags: u16,
    pub request_id: u64,
    pub volume: u64,
    pub chunk: u64,
    pub offset: u64,
    pub length: u32,
    pub payload_len: usize,
    pub epoch: u64,
    pub generation: u64,
}

impl RequestPrefix {
    /// Header plus payload length.
    pub fn frame_len(&self) -> usize {
        REQUEST_HEADER_LEN + self.payload_len
    }

    /// Completes the request with its payload (`payload_len` bytes),
    /// checking the opcode and that the payload suits it.
    pub fn finish(&self, payload: Bytes) -> Result<Request, DecodeError> {
        let request_id = self.request_id;
        let opcode =
            Opcode::from_u8(self.opcode).ok_or(DecodeError::UnknownOpcode { opcode: self.opcode, request_id })?;
        let header = RequestHeader {
            opcode,
            flags: self.flags,
            request_id,
            volume: self.volume,
            chunk: self.chunk,
            offset: self.offset,
            length: self.length,
            epoch: self.epoch,
            generation: self.generation,
        };
        if payload.len() != self.payload_len {
            return Err(invalid(opcode, request_id, ErrorCode::BadFrame, "payload length differs from the header"));
        }
        validate_request(&header, payload.len())?;
        Ok(Request { header, payload })
    }
}

/// Parses the request header at the front of `buf` without consuming
/// anything: `Ok(None)` until the whole header is there; an error for a bad
/// magic, version or payload length (all fatal).
pub fn peek_request(buf: &[u8]) -> Result<Option<RequestPrefix>, DecodeError> {
    if buf.len() < 4 {
        return Ok(None);
    }
    let magic = u32::from_le_bytes([buf[0], buf[1], buf[2], buf[3]]);
    if magic != REQUEST_MAGIC {
        return Err(DecodeError::BadMagic(magic));
    }
    if buf.len() < REQUEST_HEADER_LEN {
        return Ok(None);
    }
    let mut h = &buf[4..REQUEST_HEADER_LEN];
    let version = h.get_u8();
    let prefix = RequestPrefix {
        opcode: h.get_u8(),
        flags: h.get_u16_le(),
        request_id: h.get_u64_le(),
        volume: h.get_u64_le(),
        chunk: h.get_u64_le(),
        offset: h.get_u64_le(),
        length: h.get_u32_le(),
        payload_len: h.get_u32_le() as usize,
        epoch: h.get_u64_le(),
        generation: h.get_u64_le(),
    };
    let request_id = prefix.request_id;
    if version != VERSION {
        return Err(DecodeError::BadVersion { version, request_id });
    }
    if prefix.payload_len > MAX_PAYLOAD {
        return Err(DecodeError::TooLarge { len: prefix.payload_len as u32, request_id });
    }
    Ok(Some(prefix))
}

/// Decodes one request from the front of `buf`.
///
/// Returns `Ok(None)` when more bytes are needed (and reserves room for the
/// rest of the frame), `Ok(Some)` with the payload split off `buf` without
/// copying, or an error (see [`DecodeError::is_fatal`]); a non-fatal error
/// has consumed the frame.
pub fn decode_request(buf: &mut BytesMut) -> Result<Option<Request>, DecodeError> {
    let Some(prefix) = peek_request(buf)? else {
        buf.reserve(REQUEST_HEADER_LEN.saturating_sub(buf.len()));
        return Ok(None);
    };
    let total = prefix.frame_len();
    if buf.len() < total {
        buf.reserve(total - buf.len());
        return Ok(None);
    }
    let mut frame = buf.split_to(total);
    let payload = frame.split_off(REQUEST_HEADER_LEN).freeze();
    prefix.finish(payload).map(Some)
}

/// Decodes one reply from the front of `buf`; same contract as [`decode_request`].
pub fn decode_reply(buf: &mut BytesMut) -> Result<Option<Reply>, DecodeError> {
    if buf.len() < 4 {
        return Ok(None);
    }
    let magic = u32::from_le_bytes([buf[0], buf[1], buf[2], buf[3]]);
    if magic != REPLY_MAGIC {
        return Err(DecodeError::BadMagic(magic));
    }
    if buf.len() < REPLY_HEADER_LEN {
        buf.reserve(REPLY_HEADER_LEN - buf.len());
        return Ok(None);
    }
    let mut h = &buf[4..REPLY_HEADER_LEN];
    let version = h.get_u8();
    let opcode = h.get_u8();
    let flags = h.get_u16_le();
    let request_id = h.get_u64_le();
    let status = h.get_u16_le();
    let _reserved = h.get_u16_le();
    let payload_len = h.get_u32_le();
    let aux = h.get_u64_le();
    if version != VERSION {
        return Err(DecodeError::BadVersion { version, request_id });
    }
    if payload_len as usize > MAX_PAYLOAD {
        return Err(DecodeError::TooLarge { len: payload_len, request_id });
    }
    let total = REPLY_HEADER_LEN + payload_len as usize;
    if buf.len() < total {
        buf.reserve(total - buf.len());
        return Ok(None);
    }
    let mut frame = buf.split_to(total);
    let status = match status {
        0 => Ok(()),
        code => Err(ErrorCode::from_u16(code).ok_or(DecodeError::UnknownStatus { status: code, request_id })?),
    };
    let header = ReplyHeader { opcode, flags, request_id, status, aux };
    let payload = frame.split_off(REPLY_HEADER_LEN).freeze();
    Ok(Some(Reply { header, payload }))
}

#[cfg(test)]
mod tests;
