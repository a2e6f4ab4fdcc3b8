//! Errors of the chunk store, each mapping to one wire [`ErrorCode`].

use std::io;

use ballast_proto::frame::ErrorCode;

#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("chunk {volume:#x}/{chunk} does not exist")]
    NoSuchChunk { volume: u64, chunk: u64 },
    #[error("chunk {volume:#x}/{chunk} already exists")]
    ChunkExists { volume: u64, chunk: u64 },
    #[error("offset {offset} or length {len} is not a multiple of 4 KiB")]
    Misaligned { offset: u64, len: u64 },
    #[error("range {offset}+{len} exceeds the chunk size {size}")]
    OutOfRange { offset: u64, len: u64, size: u64 },
    #[error("invalid request: {0}")]
    Invalid(String),
    #[error("payload block at offset {offset} does not match its checksum")]
    ChecksumMismatch { offset: u64 },
    #[error("stored block at offset {offset} fails its checksum")]
    CorruptBlock { offset: u64 },
    #[error("epoch {got} is older than the volume's epoch {current}")]
    StaleEpoch { got: u64, current: u64 },
    #[error("generation {got} does not match the chunk's generation {current}")]
    StaleGeneration { got: u64, current: u64 },
    #[error("not enough space: {needed} bytes needed, {available} available")]
    NoSpace { needed: u64, available: u64 },
    #[error("{context}: {source}")]
    Io {
        context: String,
        #[source]
        source: io::Error,
    },
    #[error("server is shutting down")]
    ShuttingDown,
    #[error("{0}")]
    Interrupted(String),
}

impl StoreError {
    pub fn io(context: impl Into<String>, source: io::Error) -> StoreError {
        let context = context.into();
        if source.raw_os_error() == Some(libc::ENOSPC) {
            return StoreError::NoSpace { needed: 0, available: 0 };
        }
        StoreError::Io { context, source }
    }

    /// The wire error code.
    pub fn code(&self) -> ErrorCode {
        match self {
            StoreError::NoSuchChunk { .. } => ErrorCode::NoSuchChunk,
            StoreError::ChunkExists { .. } => ErrorCode::ChunkExists,
            StoreError::Misaligned { .. } => ErrorCode::Misaligned,
            StoreError::OutOfRange { .. } => ErrorCode::OutOfRange,
            StoreError::Invalid(_) => ErrorCode::BadFrame,
            StoreError::ChecksumMismatch { .. } => ErrorCode::ChecksumMismatch,
            StoreError::CorruptBlock { .. } => ErrorCode::CorruptBlock,
            StoreError::StaleEpoch { .. } => ErrorCode::StaleEpoch,
            StoreError::StaleGeneration { .. } => ErrorCode::StaleGeneration,
            StoreError::NoSpace { .. } => ErrorCode::NoSpace,
            StoreError::Io { .. } => ErrorCode::Io,
            StoreError::ShuttingDown => ErrorCode::ShuttingDown,
            StoreError::Interrupted(_) => ErrorCode::Interrupted,
        }
    }

    /// The reply's `aux` value (see the frame protocol documentation).
    pub fn aux(&self) -> u64 {
        match self {
            StoreError::StaleEpoch { current, .. } | StoreError::StaleGeneration { current, .. } => *current,
            StoreError::ChecksumMismatch { offset } | StoreError::CorruptBlock { offset } => *offset,
            _ => 0,
        }
    }
}
