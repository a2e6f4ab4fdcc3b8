//! What a volume may be: the limits the metadata service enforces, in one
//! place for it and for the clients that check a request before sending it
//! (the CSI plugin), and the shape of its page tokens.

/// Volumes are block devices of whole blocks, the data plane's block.
pub const BLOCK_SIZE: u64 = crate::frame::BLOCK_SIZE as u64;
pub const MAX_VOLUME_SIZE: u64 = 1 << 50;

pub const DEFAULT_REPLICAS: u32 = 3;
pub const MAX_REPLICAS: u32 = 5;

/// Chunks, the extents placed on chunk servers: powers of two in this range.
pub const DEFAULT_CHUNK_SIZE: u64 = 64 << 20;
pub const MIN_CHUNK_SIZE: u64 = 1 << 20;
pub const MAX_CHUNK_SIZE: u64 = 1 << 30;

/// Listings: 0 asks for the default page size; more than the maximum is refused.
pub const DEFAULT_PAGE_SIZE: u32 = 100;
pub const MAX_PAGE_SIZE: u32 = 1000;
/// A page token is this prefix and the last id of the page before.
pub const PAGE_TOKEN_PREFIX: &str = "after:";
