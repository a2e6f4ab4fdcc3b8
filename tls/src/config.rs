//! rustls configurations for mutual TLS inside the cluster.
//!
//! Both sides present a certificate of the cluster's authority. A server
//! accepts any client the authority vouches for (what it may do is the
//! server's decision, from the client's identity). A client checks that
//! the server's certificate chains to the authority and names one of the
//! roles it expects to reach, not a host name: components find each other
//! by addresses that change (pods, DHCP), their identity does not.

use std::sync::Arc;

use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::client::verify_server_cert_signed_by_trust_anchor;
use rustls::crypto::{verify_tls12_signature, verify_tls13_signature, CryptoProvider};
use rustls::pki_types::{CertificateDer, ServerName, UnixTime};
use rustls::server::{ParsedCertificate, WebPkiClientVerifier};
use rustls::{ClientConfig, DigitallySignedStruct, RootCertStore, ServerConfig, SignatureScheme};

use crate::files::{ReloadingKey, TlsDir};
use crate::identity::{Identity, Role};
use crate::TlsError;

/// gRPC (HTTP/2) and the frame protocol both run over these connections.
const ALPN: &[&[u8]] = &[b"h2", b"ballast-frames"];

/// ring: it builds with a C compiler alone (aws-lc needs cmake). Its
/// provider lacks post-quantum key exchange, which rustls now flags; the
/// cluster's traffic is classical-secure with it.
#[allow(deprecated)]
pub fn provider() -> Arc<CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

/// Serves any client with a certificate of the authority.
pub fn server_config(dir: &TlsDir) -> Result<Arc<ServerConfig>, TlsError> {
    let provider = provider();
    let verifier = WebPkiClientVerifier::builder_with_provider(Arc::new(dir.roots()?), provider.clone())
        .build()
        .map_err(|e| TlsError::Certificate(e.to_string()))?;
    let mut config = ServerConfig::builder_with_provider(provider.clone())
        .with_safe_default_protocol_versions()?
        .with_client_cert_verifier(verifier)
        .with_cert_resolver(Arc::new(ReloadingKey::new(dir.clone(), provider)?));
    config.alpn_protocols = ALPN.iter().map(|p| p.to_vec()).collect();
    Ok(Arc::new(config))
}

/// Connects to servers whose certificate names one of `roles`.
pub fn client_config(dir: &TlsDir, roles: &[Role]) -> Result<Arc<ClientConfig>, TlsError> {
    let provider = provider();
    let verifier = RoleVerifier { roots: Arc::new(dir.roots()?), roles: roles.to_vec(), provider: provider.clone() };
    let mut config = ClientConfig::builder_with_provider(provider.clone())
        .with_safe_default_protocol_versions()?
        .dangerous()
        .with_custom_certificate_verifier(Arc::new(verifier))
        .with_client_cert_resolver(Arc::new(ReloadingKey::new(dir.clone(), provider)?));
    config.alpn_protocols = ALPN.iter().map(|p| p.to_vec()).collect();
    Ok(Arc::new(config))
}

/// The authority's chain and the role, instead of a host name.
#[derive(Debug)]
struct RoleVerifier {
    roots: Arc<RootCertStore>,
    roles: Vec<Role>,
    provider: Arc<CryptoProvider>,
}

impl ServerCertVerifier for RoleVerifier {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        _server_name: &ServerName<'_>,
        _ocsp_response: &[u8],
        now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        let parsed = ParsedCertificate::try_from(end_entity)?;
        verify_server_cert_signed_by_trust_anchor(
            &parsed,
            &self.roots,
            intermediates,
            now,
            self.provider.signature_verification_algorithms.all,
        )?;
        let identity = Identity::of_certificate(end_entity).map_err(|e| rustls::Error::General(e.to_string()))?;
        if !self.roles.contains(&identity.role) {
            return Err(rustls::Error::General(format!("the server is {identity}, not a {}", role_list(&self.roles))));
        }
        Ok(ServerCertVerified::assertion())
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        verify_tls12_signature(message, cert, dss, &self.provider.signature_verification_algorithms)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        verify_tls13_signature(message, cert, dss, &self.provider.signature_verification_algorithms)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.provider.signature_verification_algorithms.supported_schemes()
    }
}

fn role_list(roles: &[Role]) -> String {
    roles.iter().map(|r| r.name()).collect::<Vec<_>>().join(" or ")
}
