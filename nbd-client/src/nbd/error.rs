//! Errors of the NBD server.

use std::io;

#[derive(Debug, thiserror::Error)]
pub enum NbdError {
    /// The connection failed (reset, closed mid-message, ...).
    #[error("NBD connection I/O: {0}")]
    Io(#[from] io::Error),
    /// The peer broke a rule the protocol makes mandatory; the connection is
    /// closed because the byte stream can no longer be trusted.
    #[error("NBD protocol violation: {0}")]
    Protocol(&'static str),
    /// The client did not finish the handshake in time.
    #[error("NBD handshake timed out")]
    HandshakeTimeout,
    /// The client asked for (or the caller named) an export that does not exist.
    #[error("no NBD export named {0:?}")]
    UnknownExport(String),
    /// Export names are UTF-8 of at most 4096 bytes.
    #[error("invalid NBD export name: {0}")]
    InvalidExportName(&'static str),
    /// An export with this name is already registered.
    #[error("NBD export {0:?} already exists")]
    DuplicateExport(String),
    /// The listening socket could not be set up.
    #[error("cannot listen on {addr}: {source}")]
    Listen { addr: String, source: io::Error },
}
