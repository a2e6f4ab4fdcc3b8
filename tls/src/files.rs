//! A component's certificate directory (`tls.crt`, `tls.key`, `ca.crt`),
//! read at start and read again whenever `tls.crt` changes, so that a
//! renewed certificate takes effect without a restart.

use std::fmt;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime};

use rustls::crypto::CryptoProvider;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use rustls::sign::CertifiedKey;
use rustls::RootCertStore;

use crate::identity::Identity;
use crate::pki::{CA_CERT, CERT, KEY};
use crate::TlsError;

/// How often a handshake may look at the disk for a renewed certificate.
const RELOAD_CHECK: Duration = Duration::from_secs(1);

#[derive(Clone, Debug)]
pub struct TlsDir {
    dir: PathBuf,
}

impl TlsDir {
    /// Checks that the directory holds a usable certificate, key and CA.
    pub fn open(dir: impl Into<PathBuf>) -> Result<Self, TlsError> {
        let dir = Self { dir: dir.into() };
        dir.roots()?;
        dir.identity()?;
        Ok(dir)
    }

    pub fn path(&self) -> &Path {
        &self.dir
    }

    /// The authority's certificates, which peers must chain to.
    pub fn roots(&self) -> Result<RootCertStore, TlsError> {
        let path = self.dir.join(CA_CERT);
        let mut roots = RootCertStore::empty();
        for cert in CertificateDer::pem_file_iter(&path).map_err(|e| bad(&path, e))? {
            roots.add(cert.map_err(|e| bad(&path, e))?).map_err(|e| bad(&path, e))?;
        }
        if roots.is_empty() {
            return Err(bad(&path, "no certificate in it"));
        }
        Ok(roots)
    }

    fn chain(&self) -> Result<Vec<CertificateDer<'static>>, TlsError> {
        let path = self.dir.join(CERT);
        let chain = CertificateDer::pem_file_iter(&path)
            .map_err(|e| bad(&path, e))?
            .collect::<Result<Vec<_>, _>>()
            .map_err(|e| bad(&path, e))?;
        if chain.is_empty() {
            return Err(bad(&path, "no certificate in it"));
        }
        Ok(chain)
    }

    /// Who this directory's certificate says we are.
    pub fn identity(&self) -> Result<Identity, TlsError> {
        Identity::of_certificate(&self.chain()?[0])
    }

    fn certified_key(&self, provider: &CryptoProvider) -> Result<CertifiedKey, TlsError> {
        let path = self.dir.join(KEY);
        let key = PrivateKeyDer::from_pem_file(&path).map_err(|e| bad(&path, e))?;
        let key = provider.key_provider.load_private_key(key).map_err(|e| bad(&path, e))?;
        let certified = CertifiedKey::new(self.chain()?, key);
        certified.keys_match().map_err(|e| bad(&self.dir.join(CERT), format!("does not match {KEY}: {e}")))?;
        Ok(certified)
    }

    fn modified(&self) -> Option<SystemTime> {
        std::fs::metadata(self.dir.join(CERT)).and_then(|m| m.modified()).ok()
    }
}

/// The certificate and key a component presents, following the files.
pub struct ReloadingKey {
    dir: TlsDir,
    provider: Arc<CryptoProvider>,
    current: Mutex<Current>,
}

struct Current {
    key: Arc<CertifiedKey>,
    modified: Option<SystemTime>,
    checked: Instant,
}

impl ReloadingKey {
    pub fn new(dir: TlsDir, provider: Arc<CryptoProvider>) -> Result<Self, TlsError> {
        let key = Arc::new(dir.certified_key(&provider)?);
        let current = Current { key, modified: dir.modified(), checked: Instant::now() };
        Ok(Self { dir, provider, current: Mutex::new(current) })
    }

    /// The key to present now: the files' if they changed and are whole,
    /// else the one already loaded.
    pub fn current(&self) -> Arc<CertifiedKey> {
        let mut current = self.current.lock().expect("lock");
        if current.checked.elapsed() >= RELOAD_CHECK {
            current.checked = Instant::now();
            let modified = self.dir.modified();
            if modified != current.modified {
                match self.dir.certified_key(&self.provider) {
                    Ok(key) => {
                        tracing::info!(dir = %self.dir.path().display(), "loaded the renewed certificate");
                        current.key = Arc::new(key);
                        current.modified = modified;
                    }
                    // Half renewed (certificate without its key yet): the
                    // next check sees the rest.
                    Err(err) => tracing::warn!("keeping the loaded certificate: {err}"),
                }
            }
        }
        current.key.clone()
    }
}

impl fmt::Debug for ReloadingKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ReloadingKey").field("dir", &self.dir.path()).finish()
    }
}

impl rustls::server::ResolvesServerCert for ReloadingKey {
    fn resolve(&self, _hello: rustls::server::ClientHello<'_>) -> Option<Arc<CertifiedKey>> {
        Some(self.current())
    }
}

impl rustls::client::ResolvesClientCert for ReloadingKey {
    fn resolve(&self, _hints: &[&[u8]], _schemes: &[rustls::SignatureScheme]) -> Option<Arc<CertifiedKey>> {
        Some(self.current())
    }

    fn has_certs(&self) -> bool {
        true
    }
}

fn bad(path: &Path, error: impl fmt::Display) -> TlsError {
    TlsError::BadFile { path: path.to_path_buf(), reason: error.to_string() }
}
