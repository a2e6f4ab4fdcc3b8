//! The metadata service attacked from the network: three `meta-raft`
//! processes serving mutual TLS, and callers without a certificate, with a
//! certificate of another authority, or with a role that may not make the
//! call. Against a member serving plaintext, the same calls succeed: that
//! is what `--tls-dir` closes.

use std::path::Path;

use ballast_proto::meta as pb;
use ballast_testkit::meta_cluster::LocalMetaCluster;
use ballast_tls::pki::{Authority, DEFAULT_VALIDITY};
use ballast_tls::{Identity, Role, TlsDir};
use meta_client::MetaClient;
use tonic::Code;

const BINARY: &str = env!("CARGO_BIN_EXE_meta-raft");

fn issue(ca: &Authority, root: &Path, role: Role, name: &str) -> TlsDir {
    let out = root.join(format!("{role}-{name}"));
    ca.issue(&Identity::new(role, name).unwrap(), &[], DEFAULT_VALIDITY, &out).unwrap()
}

fn volume(name: &str) -> pb::CreateVolumeRequest {
    pb::CreateVolumeRequest { name: name.into(), size_bytes: 1 << 30, replicas: 1, ..Default::default() }
}

fn get(id: &str) -> pb::GetVolumeRequest {
    pb::GetVolumeRequest { key: Some(pb::get_volume_request::Key::Id(id.into())) }
}

fn delete(id: &str) -> pb::DeleteVolumeRequest {
    pb::DeleteVolumeRequest { id: id.into() }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn without_tls_anyone_deletes_a_volume() {
    let dir = tempfile::tempdir().unwrap();
    let cluster = LocalMetaCluster::start(Path::new(BINARY), dir.path(), 1, &[]).await;
    let stranger = cluster.client();
    let created = stranger.create_volume(volume("db")).await.unwrap();
    stranger.delete_volume(delete(&created.id)).await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn over_tls_only_the_right_roles_change_metadata() {
    let dir = tempfile::tempdir().unwrap();
    let ca = Authority::create(&dir.path().join("ca"), "test").unwrap();
    let members = issue(&ca, dir.path(), Role::Meta, "members");
    let admin = issue(&ca, dir.path(), Role::Admin, "ops");
    // Three members: Raft itself runs over mutual TLS, or no leader is elected.
    let cluster = LocalMetaCluster::start_with_tls(Path::new(BINARY), dir.path(), 3, members.path(), admin, &[]).await;
    let admin = cluster.client();
    let created = admin.create_volume(volume("db")).await.unwrap();

    // No certificate at all: the connection is refused, the call never made.
    let plaintext = MetaClient::new(cluster.endpoints()).unwrap().with_deadline(std::time::Duration::from_secs(3));
    let err = plaintext.delete_volume(delete(&created.id)).await.unwrap_err();
    // The member answers a plaintext HTTP/2 preface with a TLS alert,
    // which the client reads as a broken HTTP/2 stream.
    assert!(matches!(err.code(), Code::Unavailable | Code::Internal), "{err}");

    // An admin certificate of another authority: refused the same way.
    let intruders = Authority::create(&dir.path().join("intruders"), "test").unwrap();
    let forged = issue(&intruders, &dir.path().join("forged"), Role::Admin, "ops");
    let forged = MetaClient::new(cluster.endpoints())
        .unwrap()
        .with_deadline(std::time::Duration::from_secs(3))
        .with_tls(&forged)
        .unwrap();
    let err = forged.delete_volume(delete(&created.id)).await.unwrap_err();
    assert_eq!(err.code(), Code::Unavailable, "{err}");

    // A node of this cluster may read, not delete, and may not vote.
    let node = MetaClient::new(cluster.endpoints())
        .unwrap()
        .with_tls(&issue(&ca, dir.path(), Role::Node, "worker-1"))
        .unwrap();
    assert_eq!(node.get_volume(get(&created.id)).await.unwrap().id, created.id);
    let err = node.delete_volume(delete(&created.id)).await.unwrap_err();
    assert_eq!(err.code(), Code::PermissionDenied, "{err}");
    assert!(err.message().contains("node/worker-1 acts only on the inline ephemeral volumes it owns"), "{err}");
    let err = node
        .change_membership(pb::ChangeMembershipRequest { voters: vec![1], retain_learners: false })
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::PermissionDenied, "{err}");

    // A chunk server may not register as anyone but a chunk server, and a
    // controller may not heartbeat.
    let controller = MetaClient::new(cluster.endpoints())
        .unwrap()
        .with_tls(&issue(&ca, dir.path(), Role::Controller, "csi"))
        .unwrap();
    let err = controller.heartbeat(pb::HeartbeatRequest::default()).await.unwrap_err();
    assert_eq!(err.code(), Code::PermissionDenied, "{err}");

    // A chunk server heartbeats and registers only as itself, a node
    // attaches volumes and registers only for itself.
    let storage =
        MetaClient::new(cluster.endpoints()).unwrap().with_tls(&issue(&ca, dir.path(), Role::Storage, "ss-1")).unwrap();
    let as_another = pb::HeartbeatRequest { server_id: "ss-2".into(), ..Default::default() };
    let err = storage.heartbeat(as_another).await.unwrap_err();
    assert_eq!(err.code(), Code::PermissionDenied, "{err}");
    assert!(err.message().contains("storage/ss-1 may act only as itself, not as \"ss-2\""), "{err}");
    let err = storage
        .register_chunk_server(pb::RegisterChunkServerRequest {
            id: "ss-2".into(),
            address: "127.0.0.1:1".into(),
            ..Default::default()
        })
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::PermissionDenied, "{err}");
    let registered = storage
        .register_chunk_server(pb::RegisterChunkServerRequest {
            id: "ss-1".into(),
            address: "127.0.0.1:1".into(),
            capacity_bytes: 1 << 30,
            ..Default::default()
        })
        .await
        .unwrap();
    assert_eq!(registered.id, "ss-1");
    let steal = pb::PublishVolumeRequest { volume_id: created.id.clone(), node_id: "worker-2".into(), readonly: false };
    let err = node.publish_volume(steal).await.unwrap_err();
    assert_eq!(err.code(), Code::PermissionDenied, "{err}");
    let err = node
        .register_node(pb::RegisterNodeRequest { node_id: "worker-2".into(), ..Default::default() })
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::PermissionDenied, "{err}");
    // Nor does a node publish a volume to itself: that would get it a
    // capability for any volume's data.
    let to_itself =
        pb::PublishVolumeRequest { volume_id: created.id.clone(), node_id: "worker-1".into(), readonly: false };
    assert_eq!(node.publish_volume(to_itself).await.unwrap_err().code(), Code::PermissionDenied);
    // A node gets capabilities for itself only, for volumes published to it
    // only; nobody else asks for one.
    let ask = |node_id: &str| pb::IssueCapabilityRequest { volume_id: created.id.clone(), node_id: node_id.into() };
    assert_eq!(node.issue_capability(ask("worker-2")).await.unwrap_err().code(), Code::PermissionDenied);
    let err = node.issue_capability(ask("worker-1")).await.unwrap_err();
    assert_eq!(err.code(), Code::FailedPrecondition, "{err}");
    assert!(err.message().contains("is not published to node worker-1"), "{err}");
    assert_eq!(admin.issue_capability(ask("worker-1")).await.unwrap_err().code(), Code::PermissionDenied);

    // An inline ephemeral volume is the node's own: it creates, publishes
    // and deletes it, and no other node's, and no ordinary volume.
    let ephemeral = |name: &str, owner: &str| pb::CreateVolumeRequest {
        parameters: [(meta_client::EPHEMERAL_NODE.to_string(), owner.to_string())].into_iter().collect(),
        ..volume(name)
    };
    assert_eq!(node.create_volume(volume("plain")).await.unwrap_err().code(), Code::PermissionDenied);
    let err = node.create_volume(ephemeral("theirs", "worker-2")).await.unwrap_err();
    assert_eq!(err.code(), Code::PermissionDenied, "{err}");
    let theirs = admin.create_volume(ephemeral("theirs", "worker-2")).await.unwrap();
    let mine = node.create_volume(ephemeral("mine", "worker-1")).await.unwrap();
    let to_me = |volume: &pb::Volume| pb::PublishVolumeRequest {
        volume_id: volume.id.clone(),
        node_id: "worker-1".into(),
        readonly: false,
    };
    assert_eq!(node.publish_volume(to_me(&theirs)).await.unwrap_err().code(), Code::PermissionDenied);
    let attached = node.publish_volume(to_me(&mine)).await.unwrap();
    let capability = pb::IssueCapabilityRequest { volume_id: mine.id.clone(), node_id: "worker-1".into() };
    assert_eq!(node.issue_capability(capability).await.unwrap().epoch, attached.epoch);
    assert_eq!(node.delete_volume(delete(&theirs.id)).await.unwrap_err().code(), Code::PermissionDenied);
    let unpublish = pb::UnpublishVolumeRequest { volume_id: mine.id.clone(), node_id: "worker-1".into() };
    node.unpublish_volume(unpublish).await.unwrap();
    assert!(node.delete_volume(delete(&mine.id)).await.unwrap().existed);
    admin.delete_volume(delete(&theirs.id)).await.unwrap();

    // The volume is still there; the admin deletes it.
    assert_eq!(admin.get_volume(get(&created.id)).await.unwrap().id, created.id);
    admin.delete_volume(delete(&created.id)).await.unwrap();
}

/// A Raft message larger than any a member sends is refused from its
/// length prefix (before the member buffers it), and the member keeps
/// serving.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_oversized_raft_message_is_refused_and_the_member_serves_on() {
    let dir = tempfile::tempdir().unwrap();
    let cluster = LocalMetaCluster::start(Path::new(BINARY), dir.path(), 1, &[]).await;
    let endpoint = format!("http://{}", cluster.endpoints()[0]);
    let mut raft = ballast_proto::meta::raft_client::RaftClient::connect(endpoint).await.unwrap();
    let huge = pb::RaftMessage { payload: vec![b' '; meta_raft::network::RAFT_MESSAGE_LIMIT + (1 << 20)] };
    let refused = raft.append_entries(huge).await.expect_err("an oversized message was taken");
    assert_eq!(refused.code(), Code::OutOfRange, "{refused:?}");
    let client = cluster.client();
    client.create_volume(volume("after")).await.expect("the member serves on");
}
