//! Payloads of replies beyond plain data: fixed-size little-endian records.

use bytes::{Buf, BufMut, Bytes, BytesMut};

use super::{Checksums, BLOCK_SIZE};

/// A fixed-size record of a reply payload.
pub trait Entry: Sized {
    /// Encoded size in bytes.
    const SIZE: usize;
    fn encode(&self, dst: &mut BytesMut);
    /// Decodes from exactly [`Self::SIZE`] bytes.
    fn decode(src: &mut Bytes) -> Self;
}

/// Encodes records back to back.
pub fn encode_entries<E: Entry>(entries: &[E]) -> Bytes {
    let mut buf = BytesMut::with_capacity(entries.len() * E::SIZE);
    for e in entries {
        e.encode(&mut buf);
    }
    buf.freeze()
}

/// Decodes a payload of back-to-back records; `None` if its length is not a
/// whole number of records.
pub fn decode_entries<E: Entry>(mut payload: Bytes) -> Option<Vec<E>> {
    if !payload.len().is_multiple_of(E::SIZE) {
        return None;
    }
    let mut out = Vec::with_capacity(payload.len() / E::SIZE);
    while payload.has_remaining() {
        let mut one = payload.split_to(E::SIZE);
        out.push(E::decode(&mut one));
    }
    Some(out)
}

/// Splits a data payload (data followed by one CRC32 per block) into its
/// parts without copying; `None` if its length is not that of a whole number
/// of blocks with their checksums.
pub fn decode_data_payload(payload: Bytes) -> Option<(Bytes, Checksums)> {
    const PER_BLOCK: usize = BLOCK_SIZE + 4;
    if !payload.len().is_multiple_of(PER_BLOCK) {
        return None;
    }
    let data_len = payload.len() / PER_BLOCK * BLOCK_SIZE;
    let data = payload.slice(..data_len);
    Some((data, Checksums::from_bytes(payload.slice(data_len..))))
}

/// Reply payload of `CHUNK_INFO`.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct ChunkInfo {
    /// Chunk size in bytes.
    pub size: u64,
    pub generation: u64,
    /// Blocks whose data matched their checksum when last read, scrubbed or written.
    pub blocks_ok: u32,
    /// Blocks that failed their checksum and were not rewritten since.
    pub blocks_bad: u32,
    /// Blocks not verified since the server started.
    pub blocks_unknown: u32,
    /// Regions of the chunk in the activity log.
    pub dirty_regions: u32,
}

impl Entry for ChunkInfo {
    const SIZE: usize = 32;

    fn encode(&self, dst: &mut BytesMut) {
        dst.put_u64_le(self.size);
        dst.put_u64_le(self.generation);
        dst.put_u32_le(self.blocks_ok);
        dst.put_u32_le(self.blocks_bad);
        dst.put_u32_le(self.blocks_unknown);
        dst.put_u32_le(self.dirty_regions);
    }

    fn decode(src: &mut Bytes) -> Self {
        ChunkInfo {
            size: src.get_u64_le(),
            generation: src.get_u64_le(),
            blocks_ok: src.get_u32_le(),
            blocks_bad: src.get_u32_le(),
            blocks_unknown: src.get_u32_le(),
            dirty_regions: src.get_u32_le(),
        }
    }
}

/// One chunk in a `LIST_CHUNKS` reply.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, PartialOrd, Ord)]
pub struct ChunkEntry {
    pub volume: u64,
    pub chunk: u64,
    pub size: u64,
    pub generation: u64,
}

impl Entry for ChunkEntry {
    const SIZE: usize = 32;

    fn encode(&self, dst: &mut BytesMut) {
        dst.put_u64_le(self.volume);
        dst.put_u64_le(self.chunk);
        dst.put_u64_le(self.size);
        dst.put_u64_le(self.generation);
    }

    fn decode(src: &mut Bytes) -> Self {
        ChunkEntry {
            volume: src.get_u64_le(),
            chunk: src.get_u64_le(),
            size: src.get_u64_le(),
            generation: src.get_u64_le(),
        }
    }
}

/// A run of blocks of one chunk that failed their checksum (`SCRUB` reply).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, PartialOrd, Ord)]
pub struct BadBlocks {
    pub volume: u64,
    pub chunk: u64,
    /// Index of the first bad block (byte offset / 4096).
    pub first_block: u32,
    pub count: u32,
}

impl Entry for BadBlocks {
    const SIZE: usize = 24;

    fn encode(&self, dst: &mut BytesMut) {
        dst.put_u64_le(self.volume);
        dst.put_u64_le(self.chunk);
        dst.put_u32_le(self.first_block);
        dst.put_u32_le(self.count);
    }

    fn decode(src: &mut Bytes) -> Self {
        BadBlocks {
            volume: src.get_u64_le(),
            chunk: src.get_u64_le(),
            first_block: src.get_u32_le(),
            count: src.get_u32_le(),
        }
    }
}

/// [`DirtyRegion::flags`]: the region was dirty when the server last stopped
/// without a clean flush; it must be resynced from a peer and then cleared
/// with `DIRTY_REGIONS` + `FLAG_CLEAR`.
pub const DIRTY_RECOVERED: u32 = 1 << 0;

/// A region of a chunk in the activity log (`DIRTY_REGIONS` reply).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, PartialOrd, Ord)]
pub struct DirtyRegion {
    pub volume: u64,
    pub chunk: u64,
    /// Byte offset within the chunk.
    pub offset: u64,
    pub length: u32,
    /// `DIRTY_*` bits.
    pub flags: u32,
}

impl DirtyRegion {
    pub fn is_recovered(&self) -> bool {
        self.flags & DIRTY_RECOVERED != 0
    }
}

impl Entry for DirtyRegion {
    const SIZE: usize = 32;

    fn encode(&self, dst: &mut BytesMut) {
        dst.put_u64_le(self.volume);
        dst.put_u64_le(self.chunk);
        dst.put_u64_le(self.offset);
        dst.put_u32_le(self.length);
        dst.put_u32_le(self.flags);
    }

    fn decode(src: &mut Bytes) -> Self {
        DirtyRegion {
            volume: src.get_u64_le(),
            chunk: src.get_u64_le(),
            offset: src.get_u64_le(),
            length: src.get_u32_le(),
            flags: src.get_u32_le(),
        }
    }
}

/// Request payload of `CHUNK_CLONE`: the chunk to create as a copy of the
/// source (`volume`, `chunk` of the header).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, PartialOrd, Ord)]
pub struct CloneTarget {
    pub volume: u64,
    pub chunk: u64,
    /// Generation of the new chunk.
    pub generation: u64,
}

impl Entry for CloneTarget {
    const SIZE: usize = 24;

    fn encode(&self, dst: &mut BytesMut) {
        dst.put_u64_le(self.volume);
        dst.put_u64_le(self.chunk);
        dst.put_u64_le(self.generation);
    }

    fn decode(src: &mut Bytes) -> Self {
        CloneTarget { volume: src.get_u64_le(), chunk: src.get_u64_le(), generation: src.get_u64_le() }
    }
}
