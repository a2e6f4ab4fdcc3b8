//! How a server is told to serve: with its certificate (`--tls-dir`), or
//! explicitly in plaintext (`--insecure`). Neither is an error: a server
//! never falls back to plaintext by omission.

use std::path::PathBuf;

use crate::files::TlsDir;
use crate::TlsError;

#[derive(clap::Args, Clone, Debug, Default)]
pub struct ServeTls {
    /// This server's certificate directory (tls.crt, tls.key, ca.crt from
    /// `ballast pki issue`): mutual TLS with everything it talks to, and
    /// requests authorised by the caller's role.
    #[arg(long, env = "BALLAST_TLS_DIR")]
    pub tls_dir: Option<PathBuf>,
    /// Serve plaintext, without certificates: anyone who reaches the port
    /// can read and change everything. For trusted test networks only.
    #[arg(long, env = "BALLAST_INSECURE", conflicts_with = "tls_dir")]
    pub insecure: bool,
}

impl ServeTls {
    /// The certificate directory, opened; `None` when told `--insecure`
    /// (and said loudly, at every start).
    pub fn resolve(&self) -> Result<Option<TlsDir>, TlsError> {
        match (&self.tls_dir, self.insecure) {
            (Some(dir), _) => Ok(Some(TlsDir::open(dir)?)),
            (None, true) => {
                tracing::warn!(
                    "serving WITHOUT TLS (--insecure): anyone who reaches this server's ports can read and \
                     change what it holds"
                );
                Ok(None)
            }
            (None, false) => Err(TlsError::Certificate(
                "no certificate: give --tls-dir DIR (from `ballast pki issue`), or --insecure to serve \
                 plaintext to anyone who can reach the port"
                    .into(),
            )),
        }
    }
}
