//! Ballast chunk server: stores chunks of replicated volumes on local disk
//! and serves them over the data-plane frame protocol
//! (`ballast_proto::frame`).
//!
//! - [`config`]: configuration and the `serve` command line.
//! - [`runtime`]: the whole server on one io_uring thread.
//! - [`server`]: listeners, connections, request handling, lifecycle.
//! - [`store`]: chunk files behind a small I/O [`store::backend`] trait
//!   (io_uring or a pread/pwrite thread pool).
//! - [`checksum`]: per-block CRC32 verification rules.
//! - [`activity_log`]: dirty regions to resync after a crash.
//! - [`fencing`]: newest attachment epoch per volume.
//! - [`scrub`]: background and on-demand verification of every block.
//! - [`trash`]: orphaned chunks wait there before they are deleted, or
//!   until their space is needed ([`disk_space`] measures it).
//! - [`durable`]: files replaced whole or not at all.
//! - [`metrics`], [`identity`], [`registration`].

pub mod activity_log;
pub mod checksum;
pub mod config;
pub mod disk_space;
pub mod durable;
pub mod error;
pub mod fencing;
pub mod identity;
pub mod metrics;
pub mod registration;
pub mod runtime;
pub mod scrub;
pub mod server;
pub mod store;
pub mod trash;

pub use config::Config;
pub use error::StoreError;
pub use server::{start, RunningServer, ServerError};
pub use store::backend::{BackendChoice, BackendKind};
pub use store::Store;
