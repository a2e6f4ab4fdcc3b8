//! A chunk server joining a metadata service that serves mutual TLS: it
//! registers as the server its certificate names and no other, and a data
//! directory of another server is not taken over by a certificate. Its
//! data plane refuses clients without a certificate of its authority, and
//! requests the caller's role may not send.

mod common;

use common::{issue, meta_raft_binary};

use std::path::PathBuf;
use std::time::Duration;

use ballast_proto::frame::{ChunkAt, ClientError, Connector, DataClient, ErrorCode};
use ballast_proto::meta as pb;
use ballast_testkit::meta_cluster::LocalMetaCluster;
use ballast_tls::pki::Authority;
use ballast_tls::{Role, TlsDir};
use storage_server::config::Config;
use storage_server::server::{start, ServerError};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_chunk_server_registers_over_tls_as_its_certificate_names() {
    let dir = tempfile::tempdir().unwrap();
    let ca = Authority::create(&dir.path().join("ca"), "test").unwrap();
    let members = issue(&ca, dir.path(), Role::Meta, "members");
    let admin = issue(&ca, dir.path(), Role::Admin, "ops");
    let cluster =
        LocalMetaCluster::start_with_tls(&meta_raft_binary(), dir.path(), 1, members.path(), admin, &[]).await;

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

/// Connects as `dir`'s certificate to `server`; `None` if the server
/// refused the connection or closed it at the first request (an answer,
/// even a refusal, means the connection was accepted).
async fn connect_as(dir: &TlsDir, server: &common::Binary) -> Option<DataClient> {
    let client = Connector::tls(dir).unwrap().connect(&server.tcp.to_string()).await.ok()?;
    match client.ping().await {
        Ok(()) | Err(ClientError::Remote { .. }) => Some(client),
        Err(_) => None,
    }
}

fn denied<T: std::fmt::Debug>(result: Result<T, ClientError>) {
    assert_eq!(common::code(result), ErrorCode::PermissionDenied);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_data_plane_refuses_strangers_and_roles_that_may_not() {
    let dir = tempfile::tempdir().unwrap();
    let ca = Authority::create(&dir.path().join("ca"), "test").unwrap();
    let server_tls = issue(&ca, dir.path(), Role::Storage, "ss-1");
    let server = common::Binary::start(&dir.path().join("data"), &["--tls-dir", server_tls.path().to_str().unwrap()]);
    let (volume, chunk, epoch) = (7, 0, 1);

    // An operator writes a chunk over TLS (a node needs a capability from
    // the metadata service: see tests/capability.rs).
    let admin = connect_as(&issue(&ca, dir.path(), Role::Admin, "ops"), &server).await.expect("admin refused");
    admin.create_chunk(volume, chunk, 1 << 20, 1).await.unwrap();
    let written = common::pattern(1, 0, 4);
    common::write(&admin, volume, chunk, 0, written.clone(), epoch, true).await.unwrap();

    // No TLS at all: the handshake fails and no request is answered.
    let plaintext = DataClient::connect_tcp(server.tcp).await.unwrap();
    assert!(plaintext.ping().await.is_err(), "a plaintext client was answered");
    assert!(common::write(&plaintext, volume, chunk, 0, common::pattern(2, 0, 4), epoch + 1, true).await.is_err());

    // A certificate of another authority, even with the node role.
    let stranger_ca = Authority::create(&dir.path().join("stranger-ca"), "stranger").unwrap();
    let stranger = issue(&stranger_ca, dir.path(), Role::Node, "worker-1");
    assert!(connect_as(&stranger, &server).await.is_none(), "another authority's certificate was accepted");

    // A chunk server's certificate reads, writes and deletes nothing.
    let peer = connect_as(&issue(&ca, dir.path(), Role::Storage, "ss-2"), &server).await.expect("peer refused");
    denied(peer.read(ChunkAt { volume, chunk, offset: 0, epoch, generation: 1 }, written.len() as u32).await);
    denied(common::write(&peer, volume, chunk, 0, common::pattern(3, 0, 4), epoch + 1, true).await);
    denied(peer.delete_chunk(volume, chunk, 1).await);
    denied(peer.fence_volume(volume, epoch + 10).await);

    // A node neither fences a volume nor lists what the server holds.
    let node = connect_as(&issue(&ca, dir.path(), Role::Node, "worker-1"), &server).await.expect("node refused");
    denied(node.fence_volume(volume, epoch + 10).await);
    denied(node.list_chunks(None).await);

    // The data and the epoch are as the operator left them: the metadata
    // service (which may do everything) reads the same bytes at epoch 1.
    let meta = connect_as(&issue(&ca, dir.path(), Role::Meta, "m1"), &server).await.expect("meta refused");
    let listed = meta.list_chunks(Some(volume)).await.unwrap();
    assert_eq!(listed.len(), 1);
    let (read, _) =
        meta.read(ChunkAt { volume, chunk, offset: 0, epoch, generation: 1 }, written.len() as u32).await.unwrap();
    assert_eq!(read, written, "a refused request changed the chunk");
    // No epoch was raised: the operator still writes at epoch 1.
    common::write(&admin, volume, chunk, 0, written, epoch, true).await.unwrap();
}

/// A chunk server or a metadata member told neither its certificate nor
/// `--insecure` does not start, and says what it needs: plaintext is never
/// what an omission gets.
#[test]
fn servers_without_certificate_or_insecure_refuse_to_start() {
    let dir = tempfile::tempdir().unwrap();
    let storage = (PathBuf::from(env!("CARGO_BIN_EXE_storage-server")), vec!["serve", "--listen", "127.0.0.1:0"]);
    let meta = (meta_raft_binary(), vec!["serve", "--id", "1", "--listen", "127.0.0.1:0"]);
    for (binary, args) in [storage, meta] {
        let mut child = std::process::Command::new(&binary)
            .args(args)
            .arg("--data-dir")
            .arg(dir.path().join("data"))
            .env_remove("BALLAST_TLS_DIR")
            .env_remove("BALLAST_INSECURE")
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::piped())
            .spawn()
            .unwrap();
        // One that serves would run until killed.
        let exited = (0..100).find_map(|_| {
            std::thread::sleep(Duration::from_millis(100));
            child.try_wait().unwrap()
        });
        if exited.is_none() {
            let _ = child.kill();
        }
        let output = child.wait_with_output().unwrap();
        assert!(exited.is_some_and(|status| !status.success()), "{} served without TLS", binary.display());
        let stderr = String::from_utf8_lossy(&output.stderr);
        assert!(stderr.contains("no certificate: give --tls-dir DIR"), "{stderr}");
        assert!(stderr.contains("--insecure"), "{stderr}");
    }
}
