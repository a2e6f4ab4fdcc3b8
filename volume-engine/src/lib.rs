//! A replicated Ballast volume, as a block device would use it.
//!
//! - [`export`]: the block-device interface a transport (the NBD server)
//!   serves.
//! - [`engine`]: the replicated volume engine, which implements it.
//! - [`volume_service`]: opening a volume with its fencing epoch.
//! - [`snapshot`]: crash-consistent snapshots and volumes populated from them.
//!
//! Nothing here knows about NBD, the kernel or FUSE: the CSI controller
//! and the CLI take snapshots with this crate and link no NBD code.

pub mod engine;
pub mod export;
pub mod snapshot;
pub mod volume_service;

pub use export::{BlockExport, ExportError};
