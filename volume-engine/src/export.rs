//! What the NBD server serves: a block device of fixed size with the
//! operations NBD can ask for. The replicated volume engine implements it.

use std::future::Future;

use bytes::Bytes;

/// An error an export reports for one request; it becomes the NBD error
/// code of the reply and never ends the connection.
#[derive(Debug, thiserror::Error)]
pub enum ExportError {
    /// The range lies (partly) beyond the end of the export.
    #[error("range {offset}+{len} is beyond the end of the export")]
    OutOfRange { offset: u64, len: u64 },
    /// The export refuses writes (read-only attachment, fenced, or too few replicas).
    #[error("read-only: {0}")]
    ReadOnly(String),
    /// No space left to allocate the range.
    #[error("no space: {0}")]
    NoSpace(String),
    /// The data could not be read or written (checksum failures on every replica, I/O errors, ...).
    #[error("I/O error: {0}")]
    Io(String),
}

/// A block device served over NBD. Offsets and lengths are in bytes and
/// need not be aligned: the export handles partial blocks.
pub trait BlockExport: Send + Sync + 'static {
    /// Size in bytes.
    fn size(&self) -> u64;

    /// Reads `len` bytes at `offset`.
    fn read(&self, offset: u64, len: u32) -> impl Future<Output = Result<Bytes, ExportError>> + Send;

    /// Writes `data` at `offset`; with `fua` it is durable before returning.
    fn write(&self, offset: u64, data: Bytes, fua: bool) -> impl Future<Output = Result<(), ExportError>> + Send;

    /// Makes every completed write durable.
    fn flush(&self) -> impl Future<Output = Result<(), ExportError>> + Send;

    /// Discards a range; it reads as zeros afterwards.
    fn trim(&self, offset: u64, len: u32, fua: bool) -> impl Future<Output = Result<(), ExportError>> + Send;

    /// Writes zeros over a range.
    fn write_zeroes(&self, offset: u64, len: u32, fua: bool) -> impl Future<Output = Result<(), ExportError>> + Send;
}
