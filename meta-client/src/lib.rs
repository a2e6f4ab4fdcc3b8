//! The client every Ballast component talks to the metadata service with
//! (chunk servers, the volume engine, the CSI plugin, the `ballast`
//! command), apart from the service itself, so that none of them links
//! openraft, sled or the repair loop.
//!
//! - [`MetaClient`]: any member's endpoint will do; a member that is not
//!   the leader answers with [`LEADER_HEADER`], and the call is retried
//!   there, with backoff and an overall deadline.
//! - [`ClientArgs`]: the `--meta` and `--tls-dir` options of every command.

mod args;
mod client;

pub use args::ClientArgs;
pub use client::{parse_endpoints, ClientError, MetaClient, META_ENV};

/// gRPC metadata key carrying the leader's address on a redirect.
pub const LEADER_HEADER: &str = "x-ballast-leader";

/// The volume parameter naming the node an inline ephemeral volume belongs
/// to: the only volumes a node certificate creates, publishes and deletes.
pub const EPHEMERAL_NODE: &str = "ephemeralNode";

/// Milliseconds since the Unix epoch: the clock commands, heartbeats and
/// capability expiries are stamped with.
pub fn now_ms() -> u64 {
    std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map(|d| d.as_millis() as u64).unwrap_or(0)
}
