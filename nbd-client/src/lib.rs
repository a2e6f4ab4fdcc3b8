//! The node data path.
//!
//! The volume itself (the engine, the block-device interface it
//! implements, snapshots) is the `volume-engine` crate; the records of
//! mapped volumes and the mount table are `nbd-records`.
//!
//! - [`nbd`]: the NBD protocol server.
//! - [`attach`]: kernel NBD (netlink, ioctl) and the FUSE + loop fallback.
//! - [`handover`]: a live kernel device moving to a new serving process.
//! - [`standby`]: a second process per kernel device, ready to take it over.
//! - [`cgroup`]: a serving process leaves the node plugin's container.

pub mod attach;
pub mod cgroup;
pub mod handover;
pub mod nbd;
pub mod standby;
