//! Stored block checksums and their verification.
//!
//! Each 4 KiB block of a chunk has a CRC32 (as `crc32fast` computes it),
//! supplied by the client on write and kept beside the data. The stored value
//! [`UNWRITTEN`] (0) marks a block that was never written or was trimmed: it
//! must read as zeros. A written block whose CRC32 happens to be 0 is stored
//! as 0 too and still verifies, since its data then hashes to 0.

use ballast_proto::frame::BLOCK_SIZE;

/// Stored checksum of a block that reads as zeros because it holds no data.
pub const UNWRITTEN: u32 = 0;

/// Checks one block against its stored checksum. Returns the block's CRC32
/// (what a reader is sent) when it is intact.
pub fn verify_block(data: &[u8], stored: u32) -> Option<u32> {
    let actual = crc32fast::hash(data);
    if actual == stored || (stored == UNWRITTEN && is_zero(data)) {
        Some(actual)
    } else {
        None
    }
}

fn is_zero(data: &[u8]) -> bool {
    // Compiles to a vectorised scan; only reached when the checksum differs.
    data.iter().fold(0u8, |acc, &b| acc | b) == 0
}

/// Number of blocks in `len` bytes (`len` a multiple of the block size).
pub fn blocks(len: u64) -> usize {
    (len / BLOCK_SIZE as u64) as usize
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn unwritten_blocks_verify_as_zeros_only() {
        let zeros = vec![0u8; BLOCK_SIZE];
        assert_eq!(verify_block(&zeros, UNWRITTEN), Some(crc32fast::hash(&zeros)));
        let mut data = zeros.clone();
        data[100] = 1;
        assert_eq!(verify_block(&data, UNWRITTEN), None);
        let crc = crc32fast::hash(&data);
        assert_eq!(verify_block(&data, crc), Some(crc));
        assert_eq!(verify_block(&zeros, crc), None);
    }
}
