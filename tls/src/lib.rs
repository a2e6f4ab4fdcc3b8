//! Who may talk to whom in a Ballast cluster.
//!
//! One certificate authority per cluster issues a certificate to every
//! component; the certificate names the component's role and name in a SAN
//! URI (`spiffe://ballast/<role>/<name>`). Every connection is mutual TLS:
//! each side proves it holds a certificate of this CA, and each learns the
//! other's [`Identity`], on which authorisation decides.
//!
//! - [`identity`]: roles, identities, and reading them from certificates.
//! - [`capability`]: signed per-volume capabilities for the data plane.
//! - [`pki`]: creating the authority and issuing certificates (`ballast pki`).
//! - [`files`]: a certificate directory, reloaded from disk when it changes.
//! - [`config`]: rustls server and client configurations for mutual TLS.
//! - [`accept`]: the server side of a connection, with the peer's identity.
//! - [`connect`]: the client side, also as a connector for tonic.
//! - [`socket`]: the TCP socket under a session, read through a buffer.
//! - [`serving`]: a server's `--tls-dir` or explicit `--insecure`.

pub mod accept;
pub mod capability;
pub mod config;
pub mod connect;
pub mod files;
pub mod identity;
pub mod pki;
pub mod serving;
pub mod socket;

pub use accept::{Acceptor, Peer, TlsConnection};
pub use capability::{Capability, CapabilityError, CapabilityIssuer, CapabilityVerifier};
pub use config::{client_config, server_config};
pub use files::TlsDir;
pub use identity::{Identity, Role};
pub use rustls;
pub use serving::ServeTls;

/// What can go wrong with certificates and TLS set-up.
#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    #[error("{path}: {source}")]
    Io { path: std::path::PathBuf, source: std::io::Error },
    #[error("{path}: {reason}")]
    BadFile { path: std::path::PathBuf, reason: String },
    #[error("certificate: {0}")]
    Certificate(String),
    #[error("{0}")]
    Rustls(#[from] rustls::Error),
}
