//! The NBD protocol server: fixed newstyle handshake, simple replies,
//! pipelined requests answered out of order, multi-conn.
//!
//! A reader follows a request in this order: [`server`] accepts a
//! connection, [`handshake`] picks the export, [`transmission`] parses each
//! request and hands it to the [`BlockExport`](volume_engine::export::BlockExport),
//! and [`proto`] holds the wire format both use.

mod error;
mod exports;
mod handshake;
pub mod proto;
mod server;
mod shutdown;
mod transmission;

pub use error::NbdError;
pub use exports::{ExportInfo, ExportOptions};
pub use server::{NbdServer, ServerConfig};
pub use transmission::Served;
