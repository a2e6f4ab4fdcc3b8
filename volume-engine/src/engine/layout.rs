//! Mapping byte ranges of a volume onto chunks and whole 4 KiB blocks.

use ballast_proto::frame::{BLOCK_SIZE, MAX_DATA};

const BLOCK: u64 = BLOCK_SIZE as u64;

/// A piece of a request that lies within one chunk and fits one frame.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Piece {
    pub chunk: u64,
    /// Byte offset within the chunk.
    pub offset: u64,
    pub len: u64,
    /// Byte offset of this piece within the request's buffer.
    pub buf_offset: usize,
}

impl Piece {
    pub fn is_aligned(&self) -> bool {
        self.offset.is_multiple_of(BLOCK) && self.len.is_multiple_of(BLOCK)
    }

    /// The smallest block-aligned range covering this piece.
    pub fn aligned(&self) -> (u64, u64) {
        let start = self.offset / BLOCK * BLOCK;
        let end = (self.offset + self.len).div_ceil(BLOCK) * BLOCK;
        (start, end - start)
    }
}

/// Splits `offset..offset + len` of a volume into pieces, each inside one
/// chunk and, once aligned outward to whole blocks, at most one frame long.
/// Pieces split only at block boundaries: no two share a block, so their
/// read-modify-writes never overwrite each other.
pub fn pieces(offset: u64, len: u64, chunk_size: u64) -> Vec<Piece> {
    // Leave room for the alignment of both ends within one frame.
    let max_piece = MAX_DATA as u64 - 2 * BLOCK;
    let mut out = Vec::new();
    let mut pos = offset;
    let end = offset + len;
    while pos < end {
        let chunk = pos / chunk_size;
        let chunk_offset = pos % chunk_size;
        let frame_end = pos / BLOCK * BLOCK + max_piece;
        let in_chunk = (chunk_size - chunk_offset).min(end - pos).min(frame_end - pos);
        out.push(Piece { chunk, offset: chunk_offset, len: in_chunk, buf_offset: (pos - offset) as usize });
        pos += in_chunk;
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn splits_at_chunk_boundaries_and_frame_size() {
        let chunk = 16 << 20;
        let parts = pieces(chunk - 4096, 8192, chunk);
        assert_eq!(
            parts,
            vec![
                Piece { chunk: 0, offset: chunk - 4096, len: 4096, buf_offset: 0 },
                Piece { chunk: 1, offset: 0, len: 4096, buf_offset: 4096 },
            ]
        );
        let big = pieces(0, 32 << 20, 64 << 20);
        assert!(big.iter().all(|p| p.len <= MAX_DATA as u64 - 8192));
        assert_eq!(big.iter().map(|p| p.len).sum::<u64>(), 32 << 20);
        assert_eq!(big.last().unwrap().buf_offset as u64 + big.last().unwrap().len, 32 << 20);

        // Unaligned and long: pieces meet at block boundaries only.
        let odd = pieces(1000, 20 << 20, 64 << 20);
        assert_eq!(odd.iter().map(|p| p.len).sum::<u64>(), 20 << 20);
        for pair in odd.windows(2) {
            let (a, b) = (pair[0], pair[1]);
            assert!((b.offset % BLOCK == 0) && (a.offset + a.len) % BLOCK == 0, "{a:?} {b:?}");
        }
        assert!(odd.iter().all(|p| p.aligned().1 <= MAX_DATA as u64), "{odd:?}");
    }

    #[test]
    fn aligns_outward_to_whole_blocks() {
        let piece = Piece { chunk: 0, offset: 4100, len: 10, buf_offset: 0 };
        assert!(!piece.is_aligned());
        assert_eq!(piece.aligned(), (4096, 4096));
        let piece = Piece { chunk: 0, offset: 4000, len: 200, buf_offset: 0 };
        assert_eq!(piece.aligned(), (0, 8192));
    }
}
