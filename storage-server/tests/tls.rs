//! A chunk server joining a metadata service that serves mutual TLS: it
//! registers as the server its certificate names and no other, and a data
//! directory of another server is not taken over by a certificate.

use std::path::{Path, PathBuf};
use std::time::Duration;

use ballast_proto::meta as pb;
use ballast_tls::pki::{Authority, DEFAULT_VALIDITY};
use ballast_tls::{Identity, Role, TlsDir};
use meta_raft::testing::LocalMetaCluster;
use storage_server::config::Config;
use storage_server::server::{start, ServerError};

fn meta_raft_binary() -> PathBuf {
    let binary = Path::new(env!("CARGO_BIN_EXE_storage-server")).with_file_name("meta-raft");
    assert!(binary.exists(), "{} is missing: build it first with `cargo build -p meta-raft`", binary.display());
    binary
}

fn issue(ca: &Authority, root: &Path, role: Role, name: &str) -> TlsDir {
    let out = root.join(format!("{role}-{name}"));
    ca.issue(&Identity::new(role, name).unwrap(), &[], DEFAULT_VALIDITY, &out).unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_chunk_server_registers_over_tls_as_its_certificate_names() {
    let dir = tempfile::tempdir().unwrap();
    let ca = Authority::create(&dir.path().join("ca"), "test").unwrap();
    let members = issue(&ca, dir.path(), Role::Meta, "members");
    let admin = issue(&ca, dir.path(), Role::Admin, "ops");
    let cluster = LocalMetaCluster::start_with_tls(&meta_raft_binary(), dir.path(), 1, members.path(), admin).await;

    let mut config = Config::new(dir.path().join("data"));
    config.meta = cluster.endpoints();
    config.capacity = Some(1 << 30);
    config.tls_dir = Some(issue(&ca, dir.path(), Role::Storage, "ss-1").path().to_path_buf());
    let server = start(config).await.unwrap();
    assert_eq!(server.server_id(), "ss-1");

    let admin = cluster.client();
    let mut registered = Vec::new();
    for _ in 0..100 {
        registered = admin.list_chunk_servers(pb::ListChunkServersRequest::default()).await.unwrap().servers;
        if !registered.is_empty() {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let ids: Vec<&str> = registered.iter().map(|s| s.id.as_str()).collect();
    assert_eq!(ids, ["ss-1"]);
    server.shutdown().await.unwrap();

    // The same data directory with another server's certificate: refused,
    // the chunks stay ss-1's.
    let mut config = Config::new(dir.path().join("data"));
    config.tls_dir = Some(issue(&ca, dir.path(), Role::Storage, "ss-2").path().to_path_buf());
    let err = start(config).await.err().expect("another server's certificate was accepted");
    assert!(matches!(err, ServerError::Io { .. }), "{err}");
    assert!(err.to_string().contains("belongs to chunk server \"ss-1\" but the certificate names \"ss-2\""), "{err}");

    // A node's certificate does not make a chunk server.
    let mut config = Config::new(dir.path().join("other"));
    config.tls_dir = Some(issue(&ca, dir.path(), Role::Node, "worker-1").path().to_path_buf());
    let err = start(config).await.err().expect("a node certificate started a chunk server");
    assert!(err.to_string().contains("names node/worker-1, not a chunk server"), "{err}");
}
