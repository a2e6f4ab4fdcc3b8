//! Raft RPCs between members over gRPC: [`PeerNetwork`] sends them,
//! [`RaftService`] receives them. openraft's request and response types
//! travel as JSON inside a `RaftMessage`.

mod client;
mod server;

pub use client::PeerNetwork;

/// The largest Raft message a member takes or expects in reply. Snapshot
/// chunks are 3 MiB (openraft's default), several times that as JSON;
/// anything larger is refused from its length prefix, before it is
/// buffered, instead of costing the member its memory.
pub const RAFT_MESSAGE_LIMIT: usize = 64 << 20;
pub use server::RaftService;
