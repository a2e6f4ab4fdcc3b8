//! Per-volume capabilities, attacked through the real processes: a
//! metadata member and a chunk server, both serving mutual TLS. A node's
//! certificate reaches a volume's chunks only under a capability the
//! metadata service signed for a volume published to that node. It cannot
//! reach another volume, another node's capability is no use to it, a
//! changed capability is void, it cannot raise the volume's epoch, after a
//! publish to another node it changes nothing, and an expired capability
//! reads nothing.

mod common;

use common::{issue, meta_raft_binary};

use std::time::{Duration, Instant};

use ballast_proto::frame::{ChunkAt, ClientError, Connector, DataClient, ErrorCode};
use ballast_proto::meta as pb;
use ballast_testkit::meta_cluster::LocalMetaCluster;
use ballast_tls::pki::Authority;
use ballast_tls::{Role, TlsDir};
use bytes::Bytes;
use meta_client::now_ms;
use meta_client::MetaClient;

/// Seconds a capability lives in this test: long enough for the steps
/// before the expiry check, short enough to wait out.
const LIFETIME_SECS: u64 = 6;

fn denied<T: std::fmt::Debug>(result: Result<T, ClientError>, what: &str) {
    match result {
        Err(ClientError::Remote { code: ErrorCode::PermissionDenied, .. }) => {}
        other => panic!("{what}: expected PermissionDenied, got {other:?}"),
    }
}

struct Node {
    meta: MetaClient,
    data: DataClient,
}

impl Node {
    async fn connect(cluster: &LocalMetaCluster, tls: &TlsDir, server: &common::Binary) -> Node {
        let meta = MetaClient::new(cluster.endpoints()).unwrap().with_tls(tls).unwrap();
        let data = Connector::tls(tls).unwrap().connect(&server.tcp.to_string()).await.unwrap();
        Node { meta, data }
    }

    async fn capability(&self, volume: &pb::Volume, node: &str) -> pb::VolumeCapability {
        let request = pb::IssueCapabilityRequest { volume_id: volume.id.clone(), node_id: node.into() };
        self.meta.issue_capability(request).await.unwrap()
    }
}

async fn create(admin: &MetaClient, name: &str) -> pb::Volume {
    let request = pb::CreateVolumeRequest { name: name.into(), size_bytes: 1 << 30, replicas: 1, ..Default::default() };
    admin.create_volume(request).await.unwrap()
}

async fn publish(admin: &MetaClient, volume: &pb::Volume, node: &str) -> pb::Attachment {
    let request = pb::PublishVolumeRequest { volume_id: volume.id.clone(), node_id: node.into(), readonly: false };
    admin.publish_volume(request).await.unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_node_reaches_only_the_volumes_published_to_it_at_their_epoch() {
    let dir = tempfile::tempdir().unwrap();
    let ca = Authority::create(&dir.path().join("ca"), "test").unwrap();
    let members = issue(&ca, dir.path(), Role::Meta, "members");
    let admin_tls = issue(&ca, dir.path(), Role::Admin, "ops");
    let lifetime = LIFETIME_SECS.to_string();
    let cluster = LocalMetaCluster::start_with_tls(
        &meta_raft_binary(),
        dir.path(),
        1,
        members.path(),
        admin_tls.clone(),
        &["--capability-lifetime", &lifetime],
    )
    .await;
    let storage_tls = issue(&ca, dir.path(), Role::Storage, "ss-1");
    let endpoints = cluster.endpoints().join(",");
    let server = common::Binary::start(
        &dir.path().join("data"),
        &["--tls-dir", storage_tls.path().to_str().unwrap(), "--meta", &endpoints],
    );
    let admin = cluster.client();
    let (a, b) = (create(&admin, "a").await, create(&admin, "b").await);
    let attachment = publish(&admin, &a, "worker-1").await;
    let epoch = attachment.epoch;
    let worker1 = Node::connect(&cluster, &issue(&ca, dir.path(), Role::Node, "worker-1"), &server).await;
    let worker2 = Node::connect(&cluster, &issue(&ca, dir.path(), Role::Node, "worker-2"), &server).await;

    // Without a capability a node reaches nothing, not even its own volume.
    denied(worker1.data.create_chunk(a.data_id, 0, 1 << 20, 1).await, "no capability");
    denied(common::write(&worker1.data, a.data_id, 0, 0, common::pattern(1, 0, 4), epoch, true).await, "no capability");

    // Its capability for the volume published to it: once the chunk server
    // has learnt the cluster's key (at its first heartbeat), it works.
    let capability = worker1.capability(&a, "worker-1").await;
    assert_eq!((capability.data_id, capability.epoch, capability.readonly), (a.data_id, epoch, false));
    let token = Bytes::from(capability.token.clone());
    let deadline = Instant::now() + Duration::from_secs(20);
    while let Err(e) = worker1.data.authorize(token.clone()).await {
        assert!(Instant::now() < deadline, "the chunk server never accepted the capability: {e}");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    worker1.data.create_chunk(a.data_id, 0, 1 << 20, 1).await.unwrap();
    let written = common::pattern(1, 0, 4);
    common::write(&worker1.data, a.data_id, 0, 0, written.clone(), epoch, true).await.unwrap();
    assert_eq!(
        worker1
            .data
            .read(ChunkAt { volume: a.data_id, chunk: 0, offset: 0, epoch, generation: 1 }, written.len() as u32)
            .await
            .unwrap()
            .0,
        written
    );

    // Not another volume: volume b's chunk, written by an operator, stays
    // out of reach, and no capability for it is issued to worker-1.
    let operator = Connector::tls(&admin_tls).unwrap().connect(&server.tcp.to_string()).await.unwrap();
    operator.create_chunk(b.data_id, 0, 1 << 20, 1).await.unwrap();
    let secret = common::pattern(9, 0, 4);
    common::write(&operator, b.data_id, 0, 0, secret.clone(), 0, true).await.unwrap();
    denied(
        worker1
            .data
            .read(ChunkAt { volume: b.data_id, chunk: 0, offset: 0, epoch: 0, generation: 1 }, secret.len() as u32)
            .await,
        "another volume",
    );
    denied(common::write(&worker1.data, b.data_id, 0, 0, written.clone(), 0, true).await, "another volume");
    let request = pb::IssueCapabilityRequest { volume_id: b.id.clone(), node_id: "worker-1".into() };
    assert_eq!(worker1.meta.issue_capability(request).await.unwrap_err().code(), tonic::Code::FailedPrecondition);

    // Not another node's capability, and no changed one: worker-2 holding
    // worker-1's token, or worker-1's token made read-write for volume b,
    // gets nothing.
    denied(worker2.data.authorize(token.clone()).await, "another node's capability");
    denied(
        worker2
            .data
            .read(ChunkAt { volume: a.data_id, chunk: 0, offset: 0, epoch, generation: 1 }, written.len() as u32)
            .await,
        "another node's capability",
    );
    let mut forged = capability.token.clone();
    forged[6..14].copy_from_slice(&b.data_id.to_le_bytes());
    denied(worker1.data.authorize(Bytes::from(forged)).await, "a forged capability");
    denied(
        worker1
            .data
            .read(ChunkAt { volume: b.data_id, chunk: 0, offset: 0, epoch: 0, generation: 1 }, secret.len() as u32)
            .await,
        "a forged capability",
    );

    // No raising the epoch to lock the owner out: a change must carry the
    // capability's epoch, and the server's epoch stays where it was.
    denied(
        common::write(&worker1.data, a.data_id, 0, 0, common::pattern(2, 0, 4), u64::MAX, true).await,
        "raising the epoch",
    );
    common::write(&worker1.data, a.data_id, 0, 0, written.clone(), epoch, true).await.unwrap();

    // Published to worker-2 (after worker-1 let go): worker-1's capability,
    // still unexpired, changes nothing any more, by any request.
    let request = pb::UnpublishVolumeRequest { volume_id: a.id.clone(), node_id: "worker-1".into() };
    worker1.meta.unpublish_volume(request).await.unwrap();
    let moved = publish(&admin, &a, "worker-2").await;
    assert!(moved.epoch > epoch);
    let stale = common::write(&worker1.data, a.data_id, 0, 0, common::pattern(3, 0, 4), epoch, true).await;
    assert!(stale.is_err(), "a capability of epoch {epoch} wrote after a publish at epoch {}", moved.epoch);
    denied(worker1.data.create_chunk(a.data_id, 1, 1 << 20, 1).await, "an old epoch's capability");
    denied(worker1.data.set_generation(a.data_id, 0, 2).await, "an old epoch's capability");
    let request = pb::IssueCapabilityRequest { volume_id: a.id.clone(), node_id: "worker-1".into() };
    assert_eq!(worker1.meta.issue_capability(request).await.unwrap_err().code(), tonic::Code::FailedPrecondition);

    // worker-2 writes at the new epoch; its writes are what the chunk holds.
    let fresh = worker2.capability(&a, "worker-2").await;
    worker2.data.authorize(Bytes::from(fresh.token)).await.unwrap();
    let newer = common::pattern(4, 0, 4);
    common::write(&worker2.data, a.data_id, 0, 0, newer.clone(), moved.epoch, true).await.unwrap();
    let (read, _) = operator
        .read(ChunkAt { volume: a.data_id, chunk: 0, offset: 0, epoch: moved.epoch, generation: 1 }, newer.len() as u32)
        .await
        .unwrap();
    assert_eq!(read, newer);
    let (read, _) = operator
        .read(ChunkAt { volume: b.data_id, chunk: 0, offset: 0, epoch: 0, generation: 1 }, secret.len() as u32)
        .await
        .unwrap();
    assert_eq!(read, secret, "volume b changed");

    // Once worker-1's capability expires it reads nothing either.
    let left = Duration::from_millis(capability.expires_at_ms.saturating_sub(now_ms()));
    tokio::time::sleep(left + Duration::from_millis(500)).await;
    denied(
        worker1
            .data
            .read(ChunkAt { volume: a.data_id, chunk: 0, offset: 0, epoch, generation: 1 }, newer.len() as u32)
            .await,
        "an expired capability",
    );
    denied(worker1.data.authorize(token).await, "an expired capability");
}
