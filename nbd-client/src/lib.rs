//! The node data path.
//!
//! - [`export`]: the block-device interface the NBD server serves.
//! - [`engine`]: the replicated volume engine, which implements it.
//! - [`nbd`]: the NBD protocol server.
//! - [`attach`]: kernel NBD (netlink, ioctl) and the FUSE + loop fallback.
//! - [`volume_service`]: opening a volume with its fencing epoch.
//! - [`mapping`]: records of mapped volumes for `map`/`unmap`/`list`.
//! - [`mountinfo`]: what is mounted where.
//! - [`handover`]: a live kernel device moving to a new serving process.
//! - [`standby`]: a second process per kernel device, ready to take it over.
//! - [`cgroup`]: a serving process leaves the node plugin's container.
//! - [`snapshot`]: crash-consistent snapshots and volumes populated from them.

pub mod attach;
pub mod cgroup;
pub mod engine;
pub mod export;
pub mod handover;
pub mod mapping;
pub mod mountinfo;
pub mod nbd;
pub mod snapshot;
pub mod standby;
pub mod volume_service;

pub use export::{BlockExport, ExportError};
