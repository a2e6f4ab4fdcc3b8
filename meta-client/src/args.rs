//! The command-line options of every command that talks to the metadata
//! service: where it is, and the certificate to present.

use std::ffi::OsString;
use std::path::PathBuf;

use crate::client::{ClientError, MetaClient, META_ENV};

#[derive(clap::Args, Clone, Debug)]
pub struct ClientArgs {
    /// Metadata endpoints, comma-separated host:port.
    #[arg(long, env = META_ENV)]
    pub meta: String,
    /// Certificate directory (tls.crt, tls.key, ca.crt from `ballast pki
    /// issue`) for a cluster that serves mutual TLS. Without it, plaintext.
    #[arg(long, env = "BALLAST_TLS_DIR")]
    pub tls_dir: Option<PathBuf>,
}

impl ClientArgs {
    pub fn client(&self) -> Result<MetaClient, ClientError> {
        MetaClient::from_list(&self.meta)?.with_tls_dir(self.tls_dir.as_deref())
    }

    /// The same options on a command line, for a process started with them.
    pub fn to_args(&self) -> Vec<OsString> {
        let mut args = vec!["--meta".into(), self.meta.clone().into()];
        if let Some(dir) = &self.tls_dir {
            args.extend(["--tls-dir".into(), dir.clone().into_os_string()]);
        }
        args
    }
}
