//! The Ballast metadata service: a Raft-replicated (openraft) state machine
//! persisted in sled, served over gRPC. Its clients use the `meta-client`
//! crate.
//!
//! - [`model`]: the entities (volumes, snapshots, chunk servers, replica
//!   sets, attachments, nodes); [`types`]: the commands that change them
//!   and their outcomes; [`page`]: listings in pages.
//! - [`state`]: the metadata and the rules that change it ([`modify`]:
//!   replica count and I/O limits of a live volume; [`group`]: snapshots
//!   of several volumes at one instant); [`placement`]
//!   picks the servers of a chunk; [`repair`] rebuilds missing replicas;
//!   [`liveness`] says which servers it may give up; [`fence`] pushes a
//!   published volume's epoch to the chunk servers.
//! - [`store`]: the sled-backed Raft log and state machine.
//! - [`network`]: Raft RPCs between members.
//! - [`service`] and [`cluster`]: the client and membership APIs;
//!   [`access`]: which roles may call them, over mutual TLS;
//!   [`capability`]: what a node may do to a volume's chunks.
//! - [`node`]: runs a member. [`recovery`]: a survivor of a lost majority
//!   becomes a cluster again.

pub mod access;
pub mod capability;
pub mod cluster;
mod convert;
pub mod error;
pub mod fence;
pub mod group;
pub mod liveness;
pub mod metrics;
pub mod model;
pub mod modify;
pub mod network;
pub mod node;
pub mod page;
pub mod placement;
pub mod recovery;
pub mod repair;
pub mod service;
pub mod state;
pub mod store;
pub mod types;

/// How long the metadata service waits for a chunk server to connect or
/// to answer a call before it counts the server as failed for that call:
/// a hung server (stopped process, stuck disk) never answers. Shorter than
/// the volume engine's replica timeout (5 s), so that a rebuild pausing a
/// volume gives up on a hung participant before writers waiting in the
/// pause give up on the healthy members; and than a client's attempt at a
/// call (3 s), so that a publish fencing every server returns in time. A
/// healthy server answers in milliseconds; one slower than this only
/// costs a retried repair, or its place in the volume's sets on a publish.
pub(crate) const CHUNK_SERVER_ANSWER: std::time::Duration = std::time::Duration::from_secs(2);
pub use error::MetaError;
pub use node::{run, MemberConfig};
