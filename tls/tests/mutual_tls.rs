//! Mutual TLS between real sockets on loopback, attacked the ways an
//! intruder on the network would: no TLS, a certificate of another
//! authority, a certificate that names nobody, the wrong role.

use std::net::SocketAddr;
use std::path::Path;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use ballast_tls::accept::RefusedConnection;
use ballast_tls::pki::{Authority, DEFAULT_VALIDITY};
use ballast_tls::{client_config, connect, server_config, Acceptor, Identity, Role, TlsConnection, TlsDir};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

struct Cluster {
    _root: tempfile::TempDir,
    root: std::path::PathBuf,
    ca: Authority,
}

impl Cluster {
    fn new() -> Self {
        let root = tempfile::tempdir().unwrap();
        let ca = Authority::create(&root.path().join("ca"), "test").unwrap();
        Self { root: root.path().to_path_buf(), _root: root, ca }
    }

    fn issue(&self, role: Role, name: &str) -> TlsDir {
        let out = self.root.join(format!("{role}-{name}"));
        self.ca.issue(&Identity::new(role, name).unwrap(), &["127.0.0.1".into()], DEFAULT_VALIDITY, &out).unwrap()
    }
}

/// A server that says back the identity of each client it accepted; the
/// refusals it logged are in `refused`.
struct Server {
    addr: SocketAddr,
    refused: Arc<Mutex<Vec<String>>>,
}

async fn serve(dir: &TlsDir) -> Server {
    serve_handshaking(dir, ballast_tls::accept::HANDSHAKES_IN_FLIGHT).await
}

/// Like [`serve`], running at most `handshakes` handshakes at once.
async fn serve_handshaking(dir: &TlsDir, handshakes: usize) -> Server {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let refused = Arc::new(Mutex::new(Vec::new()));
    let log = refused.clone();
    let mut incoming = Acceptor::new(server_config(dir).unwrap()).incoming(
        listener,
        handshakes,
        move |_: &SocketAddr, why: &RefusedConnection| log.lock().unwrap().push(why.to_string()),
    );
    tokio::spawn(async move {
        while let Some(Ok(mut connection)) = incoming.recv().await {
            tokio::spawn(async move {
                let said = connection.peer().identity.to_string();
                let _ = connection.write_all(format!("{said}\n").as_bytes()).await;
                let _ = connection.shutdown().await;
                drop::<TlsConnection>(connection);
            });
        }
    });
    Server { addr, refused }
}

async fn ask(dir: &TlsDir, roles: &[Role], addr: SocketAddr) -> std::io::Result<String> {
    let mut stream = connect::connect(client_config(dir, roles).unwrap(), &addr.to_string()).await?;
    let mut answer = String::new();
    stream.read_to_string(&mut answer).await?;
    Ok(answer)
}

async fn refusals(server: &Server, at_least: usize) -> Vec<String> {
    for _ in 0..100 {
        if server.refused.lock().unwrap().len() >= at_least {
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    server.refused.lock().unwrap().clone()
}

#[tokio::test]
async fn each_side_learns_the_other_identity() {
    let cluster = Cluster::new();
    let server = serve(&cluster.issue(Role::Meta, "1")).await;
    let node = cluster.issue(Role::Node, "worker-1");
    assert_eq!(ask(&node, &[Role::Meta], server.addr).await.unwrap(), "node/worker-1\n");
    // A client that expects a chunk server does not talk to a member.
    let err = ask(&node, &[Role::Storage], server.addr).await.unwrap_err();
    assert!(err.to_string().contains("the server is meta/1, not a storage"), "{err}");
}

#[tokio::test]
async fn plaintext_is_refused() {
    let cluster = Cluster::new();
    let server = serve(&cluster.issue(Role::Meta, "1")).await;
    let mut plain = TcpStream::connect(server.addr).await.unwrap();
    plain.write_all(b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n").await.unwrap();
    let mut answer = Vec::new();
    let _ = plain.read_to_end(&mut answer).await;
    assert!(!String::from_utf8_lossy(&answer).contains("meta"), "a plaintext client got an answer");
    let refused = refusals(&server, 1).await;
    assert!(refused.iter().any(|r| r.contains("TLS handshake failed")), "{refused:?}");
}

/// Connections that never start a handshake hold a descriptor each until
/// the handshake limit: past the bound on handshakes in flight, one more is
/// closed at once, and a client whose handshake finished is served.
#[tokio::test]
async fn connections_that_never_handshake_cannot_pile_up() {
    let cluster = Cluster::new();
    let node = cluster.issue(Role::Node, "a");
    let server = serve_handshaking(&cluster.issue(Role::Meta, "1"), 4).await;
    assert_eq!(ask(&node, &[Role::Meta], server.addr).await.unwrap(), "node/a\n");
    let mut silent = Vec::new();
    for _ in 0..4 {
        silent.push(TcpStream::connect(server.addr).await.unwrap());
    }
    let mut one_more = TcpStream::connect(server.addr).await.unwrap();
    let mut answer = Vec::new();
    let closed = tokio::time::timeout(Duration::from_secs(5), one_more.read_to_end(&mut answer)).await;
    assert!(matches!(closed, Ok(Ok(0)) | Ok(Err(_))), "a connection past the bound was kept open: {closed:?}");
    let refused = refusals(&server, 1).await;
    assert!(refused.iter().any(|r| r.contains("handshakes already in flight")), "{refused:?}");
    // The silent ones are let go; then handshakes are served again.
    drop(silent);
    let mut answered = None;
    for _ in 0..50 {
        if let Ok(said) = ask(&node, &[Role::Meta], server.addr).await {
            answered = Some(said);
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert_eq!(answered.as_deref(), Some("node/a\n"));
}

#[tokio::test]
async fn a_certificate_of_another_authority_is_refused_both_ways() {
    let cluster = Cluster::new();
    let intruder = Cluster::new();
    let server = serve(&cluster.issue(Role::Meta, "1")).await;
    let forged_admin = intruder.issue(Role::Admin, "root");
    let answer = ask(&forged_admin, &[Role::Meta], server.addr).await;
    assert!(answer.as_ref().map_or(true, String::is_empty), "a forged admin was answered: {answer:?}");
    let refused = refusals(&server, 1).await;
    assert!(refused.iter().any(|r| r.contains("TLS handshake failed")), "{refused:?}");

    // And a client does not trust a server of another authority.
    let impostor = serve(&intruder.issue(Role::Meta, "1")).await;
    let node = cluster.issue(Role::Node, "worker-1");
    let err = ask(&node, &[Role::Meta], impostor.addr).await.unwrap_err();
    // Same authority name, another key: the signature does not verify.
    assert!(err.to_string().contains("invalid peer certificate: BadSignature"), "{err}");
}

#[tokio::test]
async fn a_certificate_that_names_nobody_is_refused() {
    let cluster = Cluster::new();
    let server = serve(&cluster.issue(Role::Meta, "1")).await;
    // Signed by the cluster's authority, but without a Ballast identity.
    let anonymous = cluster.root.join("anonymous");
    write_certificate_without_identity(&cluster.root.join("ca"), &anonymous);
    let dir = TlsDir::open(&anonymous);
    assert!(dir.is_err(), "a directory whose certificate names nobody is not usable");
    let refused_before = server.refused.lock().unwrap().len();
    let roots = rustls_client_without_identity(&anonymous);
    let tcp = TcpStream::connect(server.addr).await.unwrap();
    let mut stream = tokio_rustls::TlsConnector::from(roots)
        .connect(rustls::pki_types::ServerName::try_from("127.0.0.1").unwrap(), tcp)
        .await
        .unwrap();
    let mut answer = String::new();
    let _ = stream.read_to_string(&mut answer).await;
    assert_eq!(answer, "");
    let refused = refusals(&server, refused_before + 1).await;
    assert!(refused.iter().any(|r| r.contains("names no Ballast identity")), "{refused:?}");
}

#[tokio::test]
async fn a_renewed_certificate_is_served_without_a_restart() {
    let cluster = Cluster::new();
    let dir = cluster.issue(Role::Meta, "1");
    let server = serve(&dir).await;
    let node = cluster.issue(Role::Node, "worker-1");
    let before = server_certificate(&node, server.addr).await;
    tokio::time::sleep(Duration::from_millis(1100)).await;
    cluster.ca.issue(&Identity::new(Role::Meta, "1").unwrap(), &[], DEFAULT_VALIDITY, dir.path()).unwrap();
    tokio::time::sleep(Duration::from_millis(1100)).await;
    let after = server_certificate(&node, server.addr).await;
    assert_ne!(before, after, "the server still presents the old certificate");
}

async fn server_certificate(client: &TlsDir, addr: SocketAddr) -> Vec<u8> {
    let stream = connect::connect(client_config(client, &[Role::Meta]).unwrap(), &addr.to_string()).await.unwrap();
    stream.get_ref().1.peer_certificates().unwrap()[0].to_vec()
}

fn write_certificate_without_identity(ca_dir: &Path, out: &Path) {
    let ca_key = rcgen::KeyPair::from_pem(&std::fs::read_to_string(ca_dir.join("ca.key")).unwrap()).unwrap();
    let issuer =
        rcgen::Issuer::from_ca_cert_pem(&std::fs::read_to_string(ca_dir.join("ca.crt")).unwrap(), ca_key).unwrap();
    let key = rcgen::KeyPair::generate().unwrap();
    let mut params = rcgen::CertificateParams::new(vec!["127.0.0.1".to_string()]).unwrap();
    params.extended_key_usages =
        vec![rcgen::ExtendedKeyUsagePurpose::ServerAuth, rcgen::ExtendedKeyUsagePurpose::ClientAuth];
    let cert = params.signed_by(&key, &issuer).unwrap();
    std::fs::create_dir_all(out).unwrap();
    std::fs::write(out.join("tls.crt"), cert.pem()).unwrap();
    std::fs::write(out.join("tls.key"), key.serialize_pem()).unwrap();
    std::fs::copy(ca_dir.join("ca.crt"), out.join("ca.crt")).unwrap();
}

/// A rustls client presenting the anonymous certificate and trusting any
/// server: only the server's refusal is under test.
fn rustls_client_without_identity(dir: &Path) -> Arc<rustls::ClientConfig> {
    use rustls::pki_types::pem::PemObject;
    use rustls::pki_types::{CertificateDer, PrivateKeyDer};
    let chain: Vec<CertificateDer<'static>> =
        CertificateDer::pem_file_iter(dir.join("tls.crt")).unwrap().map(Result::unwrap).collect();
    let key = PrivateKeyDer::from_pem_file(dir.join("tls.key")).unwrap();
    let provider = ballast_tls::config::provider();
    let mut roots = rustls::RootCertStore::empty();
    for cert in CertificateDer::pem_file_iter(dir.join("ca.crt")).unwrap() {
        roots.add(cert.unwrap()).unwrap();
    }
    let config = rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .unwrap()
        .with_root_certificates(roots)
        .with_client_auth_cert(chain, key)
        .unwrap();
    Arc::new(config)
}
