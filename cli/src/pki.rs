//! `ballast pki`: the cluster's certificate authority and the certificates
//! it issues each component.

use std::path::{Path, PathBuf};
use std::time::Duration;

use ballast_tls::pki::{Authority, CERT};
use ballast_tls::{Identity, Role};

/// What `ballast pki issue` is asked for.
pub struct IssueRequest {
    pub ca: PathBuf,
    pub role: Role,
    pub name: String,
    /// DNS names and IP addresses the certificate also serves as.
    pub hosts: Vec<String>,
    pub days: u64,
    pub out: PathBuf,
}

/// Creates the authority in `dir`.
pub fn init(dir: &Path, cluster: &str) -> anyhow::Result<()> {
    Authority::create(dir, cluster)?;
    Ok(())
}

/// Issues a certificate and returns the identity it names, as read back
/// from the directory a component will load.
pub fn issue(request: &IssueRequest) -> anyhow::Result<Identity> {
    if request.days == 0 {
        anyhow::bail!("--days must be at least 1");
    }
    let identity = Identity::new(request.role, request.name.clone())?;
    let authority = Authority::load(&request.ca)?;
    let lifetime = Duration::from_secs(request.days * 24 * 3600);
    let issued = authority.issue(&identity, &request.hosts, lifetime, &request.out)?.identity()?;
    anyhow::ensure!(issued == identity, "{} names {issued}, not {identity}", request.out.join(CERT).display());
    Ok(issued)
}
