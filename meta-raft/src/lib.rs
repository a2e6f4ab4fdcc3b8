//! The Ballast metadata service: a Raft-replicated (openraft) state machine
//! persisted in sled, served over gRPC, and the client library every other
//! component uses.
//!
//! - [`state`]: the metadata and the rules that change it; [`placement`]
//!   picks the servers of a chunk; [`repair`] rebuilds missing replicas;
//!   [`liveness`] says which servers it may give up; [`fence`] pushes a
//!   published volume's epoch to the chunk servers.
//! - [`store`]: the sled-backed Raft log and state machine.
//! - [`network`]: Raft RPCs between members.
//! - [`service`] and [`cluster`]: the client and membership APIs.
//! - [`node`]: runs a member. [`client`]: talks to the cluster.
//!   [`recovery`]: a survivor of a lost majority becomes a cluster again.

pub mod client;
pub mod cluster;
mod convert;
pub mod error;
pub mod fence;
pub mod liveness;
pub mod metrics;
pub mod network;
pub mod node;
pub mod placement;
pub mod recovery;
pub mod repair;
pub mod service;
pub mod state;
pub mod store;
pub mod testing;
pub mod types;

pub use client::MetaClient;
pub use error::MetaError;
pub use node::{run, MemberConfig};
