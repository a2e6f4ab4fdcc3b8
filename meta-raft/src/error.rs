//! Errors of the metadata service and how each becomes a gRPC status.

use serde::{Deserialize, Serialize};
use tonic::{Code, Status};

/// A refused metadata operation. Produced by the state machine, so it is
/// serialisable and identical on every member.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize, thiserror::Error)]
pub enum MetaError {
    #[error("invalid argument: {0}")]
    InvalidArgument(String),
    #[error("not found: {0}")]
    NotFound(String),
    #[error("already exists: {0}")]
    AlreadyExists(String),
    #[error("out of range: {0}")]
    OutOfRange(String),
    #[error("failed precondition: {0}")]
    FailedPrecondition(String),
    #[error("resource exhausted: {0}")]
    ResourceExhausted(String),
    /// A writer whose attachment epoch is behind the volume's.
    #[error("fenced: {0}")]
    Fenced(String),
}

impl MetaError {
    pub fn invalid(msg: impl Into<String>) -> Self {
        Self::InvalidArgument(msg.into())
    }
    pub fn not_found(msg: impl Into<String>) -> Self {
        Self::NotFound(msg.into())
    }
}

impl From<MetaError> for Status {
    fn from(err: MetaError) -> Self {
        let code = match &err {
            MetaError::InvalidArgument(_) => Code::InvalidArgument,
            MetaError::NotFound(_) => Code::NotFound,
            MetaError::AlreadyExists(_) => Code::AlreadyExists,
            MetaError::OutOfRange(_) => Code::OutOfRange,
            MetaError::FailedPrecondition(_) => Code::FailedPrecondition,
            MetaError::ResourceExhausted(_) => Code::ResourceExhausted,
            MetaError::Fenced(_) => Code::Aborted,
        };
        Status::new(code, err.to_string())
    }
}

use meta_client::LEADER_HEADER;

/// The answer of a member that cannot serve a call because it is not the
/// leader: UNAVAILABLE, with the leader's address when known.
pub fn not_leader(leader_address: Option<&str>) -> Status {
    let mut status = Status::unavailable(match leader_address {
        Some(addr) => format!("not the leader; the leader is {addr}"),
        None => "not the leader and no leader is known yet".to_string(),
    });
    if let Some(addr) = leader_address {
        if let Ok(value) = addr.parse() {
            status.metadata_mut().insert(LEADER_HEADER, value);
        }
    }
    status
}
