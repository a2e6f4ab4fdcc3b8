//! The cluster's certificate authority: created once (`ballast pki init`),
//! then issuing each component a certificate that names its identity
//! (`ballast pki issue`). A certificate directory holds what a component
//! needs, in the layout of a Kubernetes TLS Secret: `tls.crt`, `tls.key`
//! and the authority's `ca.crt`.

use std::fs;
use std::io::Write;
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};
use std::time::Duration;

use rcgen::{
    BasicConstraints, CertificateParams, DistinguishedName, DnType, ExtendedKeyUsagePurpose, IsCa, Issuer, KeyPair,
    KeyUsagePurpose, SanType,
};

use crate::files::TlsDir;
use crate::identity::Identity;
use crate::TlsError;

pub const CA_CERT: &str = "ca.crt";
pub const CA_KEY: &str = "ca.key";
pub const CERT: &str = "tls.crt";
pub const KEY: &str = "tls.key";

/// How long an issued certificate is valid unless told otherwise.
pub const DEFAULT_VALIDITY: Duration = Duration::from_secs(365 * 24 * 3600);
const CA_VALIDITY: Duration = Duration::from_secs(10 * 365 * 24 * 3600);
/// Issued certificates are valid from a little before now: clocks differ.
const CLOCK_SKEW: Duration = Duration::from_secs(3600);

/// The authority in a directory (`ca.crt`, `ca.key`).
pub struct Authority {
    dir: PathBuf,
    cert_pem: String,
    issuer: Issuer<'static, KeyPair>,
}

impl Authority {
    /// Creates a new authority in `dir`; refuses to replace one there.
    pub fn create(dir: &Path, cluster: &str) -> Result<Self, TlsError> {
        if dir.join(CA_KEY).exists() {
            return Err(TlsError::BadFile {
                path: dir.join(CA_KEY),
                reason: "an authority exists here already; every certificate it issued depends on it".into(),
            });
        }
        fs::create_dir_all(dir).map_err(io(dir))?;
        let key = KeyPair::generate().map_err(rcgen_error)?;
        let mut params = CertificateParams::default();
        params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        params.key_usages =
            vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign, KeyUsagePurpose::DigitalSignature];
        params.distinguished_name = name(&format!("Ballast cluster CA {cluster}"));
        validity(&mut params, CA_VALIDITY);
        let cert = params.self_signed(&key).map_err(rcgen_error)?;
        write_private(&dir.join(CA_KEY), &key.serialize_pem())?;
        write_public(&dir.join(CA_CERT), &cert.pem())?;
        Self::load(dir)
    }

    pub fn load(dir: &Path) -> Result<Self, TlsError> {
        let cert_pem = read(&dir.join(CA_CERT))?;
        let key = KeyPair::from_pem(&read(&dir.join(CA_KEY))?).map_err(|e| bad(&dir.join(CA_KEY), e))?;
        let issuer = Issuer::from_ca_cert_pem(&cert_pem, key).map_err(|e| bad(&dir.join(CA_CERT), e))?;
        Ok(Self { dir: dir.to_path_buf(), cert_pem, issuer })
    }

    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// Issues `identity` a certificate, also valid as a server for `hosts`
    /// (DNS names or IP addresses), into `out` (`tls.crt`, `tls.key`,
    /// `ca.crt`), and returns that directory as a component loads it.
    /// Replaces what `out` held: the component reloads it.
    pub fn issue(
        &self,
        identity: &Identity,
        hosts: &[String],
        lifetime: Duration,
        out: &Path,
    ) -> Result<TlsDir, TlsError> {
        let key = KeyPair::generate().map_err(rcgen_error)?;
        let mut params = CertificateParams::new(hosts.to_vec()).map_err(rcgen_error)?;
        let uri = identity.uri().try_into().map_err(rcgen_error)?;
        params.subject_alt_names.push(SanType::URI(uri));
        params.distinguished_name = name(&identity.to_string());
        params.key_usages = vec![KeyUsagePurpose::DigitalSignature, KeyUsagePurpose::KeyEncipherment];
        // Every component both serves and connects.
        params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ServerAuth, ExtendedKeyUsagePurpose::ClientAuth];
        params.use_authority_key_identifier_extension = true;
        validity(&mut params, lifetime);
        let cert = params.signed_by(&key, &self.issuer).map_err(rcgen_error)?;
        fs::create_dir_all(out).map_err(io(out))?;
        // The key first: a reload that sees the new certificate finds its key.
        write_private(&out.join(KEY), &key.serialize_pem())?;
        write_public(&out.join(CERT), &cert.pem())?;
        write_public(&out.join(CA_CERT), &self.cert_pem)?;
        TlsDir::open(out)
    }
}

fn name(common_name: &str) -> DistinguishedName {
    let mut name = DistinguishedName::new();
    name.push(DnType::OrganizationName, "Ballast");
    name.push(DnType::CommonName, common_name);
    name
}

fn validity(params: &mut CertificateParams, lifetime: Duration) {
    let now = time::OffsetDateTime::now_utc();
    params.not_before = now - CLOCK_SKEW;
    params.not_after = now + lifetime;
}

fn read(path: &Path) -> Result<String, TlsError> {
    fs::read_to_string(path).map_err(io(path))
}

/// Written aside and renamed into place: a reader never sees half a file.
fn write_atomically(path: &Path, text: &str, mode: u32) -> Result<(), TlsError> {
    let partial = path.with_extension("partial");
    let mut file = fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(mode)
        .open(&partial)
        .map_err(io(&partial))?;
    file.write_all(text.as_bytes()).and_then(|()| file.sync_all()).map_err(io(&partial))?;
    fs::rename(&partial, path).map_err(io(path))
}

fn write_private(path: &Path, text: &str) -> Result<(), TlsError> {
    write_atomically(path, text, 0o600)
}

fn write_public(path: &Path, text: &str) -> Result<(), TlsError> {
    write_atomically(path, text, 0o644)
}

fn io(path: &Path) -> impl FnOnce(std::io::Error) -> TlsError + '_ {
    move |source| TlsError::Io { path: path.to_path_buf(), source }
}

fn bad(path: &Path, error: impl std::fmt::Display) -> TlsError {
    TlsError::BadFile { path: path.to_path_buf(), reason: error.to_string() }
}

fn rcgen_error(error: rcgen::Error) -> TlsError {
    TlsError::Certificate(error.to_string())
}
