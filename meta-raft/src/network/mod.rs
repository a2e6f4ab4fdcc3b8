//! Raft RPCs between members over gRPC: [`PeerNetwork`] sends them,
//! [`RaftService`] receives them. openraft's request and response types
//! travel as JSON inside a `RaftMessage`.

mod client;
mod server;

pub use client::PeerNetwork;
pub use server::RaftService;
