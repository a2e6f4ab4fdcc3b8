//! The records `nbd-client` keeps of the volumes it mapped, and what is
//! mounted where: shared by `nbd-client`, which writes them, and the CSI
//! node and the CLI, which read them without linking the NBD server.
//!
//! - [`mapping`]: records of mapped volumes in the state directory, and the
//!   entry `nbd-client list -o json` prints.
//! - [`mountinfo`]: `/proc/self/mountinfo`, parsed.

pub mod mapping;
pub mod mountinfo;
