//! Why a volume operation failed.

use ballast_proto::frame::ClientError;

use crate::export::ExportError;

#[derive(Debug, thiserror::Error)]
pub enum EngineError {
    #[error("metadata service: {0}")]
    Meta(#[from] tonic::Status),
    /// A newer attachment exists: this node may no longer write.
    #[error("fenced: the volume was attached elsewhere with a newer epoch than {0}")]
    Fenced(u64),
    /// A chunk server or the metadata service refused this node's access:
    /// the volume is not (or no longer) published to it.
    #[error("access refused: {0}")]
    Denied(String),
    /// Too few replicas of a chunk are left to acknowledge a change.
    #[error("chunk {chunk} has {have} healthy replicas, at least {need} are required")]
    Degraded { chunk: u64, have: usize, need: usize },
    #[error("no replica of chunk {chunk} could serve the read: {last}")]
    Unreadable { chunk: u64, last: String },
    #[error("chunk server {address}: {source}")]
    Replica { address: String, source: ClientError },
    #[error("range {offset}+{len} is beyond the end of the volume")]
    OutOfRange { offset: u64, len: u64 },
    #[error("the volume is attached read-only")]
    ReadOnly,
}

impl From<EngineError> for ExportError {
    fn from(err: EngineError) -> Self {
        match err {
            EngineError::OutOfRange { offset, len } => ExportError::OutOfRange { offset, len },
            EngineError::ReadOnly | EngineError::Fenced(_) => ExportError::ReadOnly(err.to_string()),
            EngineError::Meta(status) if status.code() == tonic::Code::ResourceExhausted => {
                ExportError::NoSpace(status.message().to_string())
            }
            other => ExportError::Io(other.to_string()),
        }
    }
}
