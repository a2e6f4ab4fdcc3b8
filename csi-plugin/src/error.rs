//! Every way a CSI call can fail, and the gRPC status each one becomes.
//!
//! The CSI spec fixes the code for most failures (NotFound for an unknown
//! volume, AlreadyExists for an incompatible repeat, ...); the mapping lives
//! here and nowhere else.

use std::path::PathBuf;

use tonic::{Code, Status};

#[derive(Debug, thiserror::Error)]
pub enum CsiError {
    /// A required request field is empty.
    #[error("{0} is required")]
    Missing(&'static str),
    #[error("{0}")]
    InvalidArgument(String),
    #[error("{0}")]
    NotFound(String),
    #[error("{0}")]
    AlreadyExists(String),
    #[error("{0}")]
    OutOfRange(String),
    #[error("{0}")]
    FailedPrecondition(String),
    #[error("{0}")]
    ResourceExhausted(String),
    /// Another call on the same volume or name is running in this process.
    #[error("an operation on {0:?} is already in progress")]
    InProgress(String),
    /// A pagination token this plugin did not issue.
    #[error("starting_token {0:?} was not issued by this plugin")]
    BadToken(String),
    #[error("{0} is not implemented by this plugin")]
    Unimplemented(&'static str),
    /// A transient condition: the caller should retry.
    #[error("{0}")]
    Unavailable(String),
    /// The metadata service refused or failed a call; its code is kept.
    #[error("metadata service: {}", .0.message())]
    Meta(Status),
    /// An external tool (nbd-client, mkfs, blkid, resize2fs, ...) failed.
    #[error("{tool} failed: {detail}")]
    Tool { tool: String, detail: String },
    #[error("{op} {}: {source}", path.display())]
    Io {
        op: &'static str,
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("{op} {}: {source}", path.display())]
    Sys {
        op: &'static str,
        path: PathBuf,
        #[source]
        source: nix::Error,
    },
    #[error("{0}")]
    Internal(String),
}

pub type Result<T, E = CsiError> = std::result::Result<T, E>;

impl CsiError {
    pub fn invalid(msg: impl Into<String>) -> Self {
        Self::InvalidArgument(msg.into())
    }

    pub fn not_found(msg: impl Into<String>) -> Self {
        Self::NotFound(msg.into())
    }

    pub fn precondition(msg: impl Into<String>) -> Self {
        Self::FailedPrecondition(msg.into())
    }

    pub fn io(op: &'static str, path: impl Into<PathBuf>, source: std::io::Error) -> Self {
        Self::Io { op, path: path.into(), source }
    }

    pub fn sys(op: &'static str, path: impl Into<PathBuf>, source: nix::Error) -> Self {
        Self::Sys { op, path: path.into(), source }
    }

    pub fn code(&self) -> Code {
        match self {
            Self::Missing(_) | Self::InvalidArgument(_) => Code::InvalidArgument,
            Self::NotFound(_) => Code::NotFound,
            Self::AlreadyExists(_) => Code::AlreadyExists,
            Self::OutOfRange(_) => Code::OutOfRange,
            Self::FailedPrecondition(_) => Code::FailedPrecondition,
            Self::ResourceExhausted(_) => Code::ResourceExhausted,
            // The spec: ABORTED for an operation pending on the volume, and
            // for a starting_token that is not valid.
            Self::InProgress(_) | Self::BadToken(_) => Code::Aborted,
            Self::Unimplemented(_) => Code::Unimplemented,
            Self::Unavailable(_) => Code::Unavailable,
            Self::Meta(status) => meta_code(status.code()),
            Self::Tool { .. } | Self::Io { .. } | Self::Sys { .. } | Self::Internal(_) => Code::Internal,
        }
    }
}

/// The metadata service's codes mean what CSI's do (it was built for this),
/// except that its internal failures stay internal and an unknown failure
/// of the transport is worth a retry.
fn meta_code(code: Code) -> Code {
    match code {
        Code::Unknown | Code::Cancelled => Code::Unavailable,
        other => other,
    }
}

impl From<Status> for CsiError {
    fn from(status: Status) -> Self {
        Self::Meta(status)
    }
}

impl From<volume_engine::snapshot::SnapshotError> for CsiError {
    fn from(err: volume_engine::snapshot::SnapshotError) -> Self {
        match err {
            volume_engine::snapshot::SnapshotError::Meta(status) => CsiError::Meta(status),
            // Copying data failed part-way: a retry of the call copies again.
            other => CsiError::Unavailable(format!("copying volume data: {other}")),
        }
    }
}

impl From<CsiError> for Status {
    fn from(err: CsiError) -> Self {
        Status::new(err.code(), err.to_string())
    }
}

/// Turns a metadata NotFound into `None`, keeping every other failure.
pub fn found<T>(result: Result<T, Status>) -> Result<Option<T>> {
    match result {
        Ok(value) => Ok(Some(value)),
        Err(status) if status.code() == Code::NotFound => Ok(None),
        Err(status) => Err(CsiError::Meta(status)),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn codes_follow_the_spec() {
        assert_eq!(Status::from(CsiError::Missing("volume_id")).code(), Code::InvalidArgument);
        assert_eq!(Status::from(CsiError::InProgress("v".into())).code(), Code::Aborted);
        assert_eq!(Status::from(CsiError::BadToken("x".into())).code(), Code::Aborted);
        let meta = CsiError::from(Status::already_exists("exists"));
        assert_eq!(Status::from(meta).code(), Code::AlreadyExists);
        let meta = CsiError::from(Status::unknown("transport"));
        assert_eq!(Status::from(meta).code(), Code::Unavailable);
        let io = CsiError::io("mkdir", "/x", std::io::Error::other("boom"));
        let status = Status::from(io);
        assert_eq!(status.code(), Code::Internal);
        assert_eq!(status.message(), "mkdir /x: boom");
    }

    #[test]
    fn not_found_becomes_none() {
        assert!(found::<()>(Err(Status::not_found("x"))).unwrap().is_none());
        assert!(found(Ok(1)).unwrap().is_some());
        assert!(found::<()>(Err(Status::internal("x"))).is_err());
    }
}
