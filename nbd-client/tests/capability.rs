//! A node's volume engine under per-volume capabilities, on a secured
//! local cluster: with a node certificate it opens only a volume published
//! to it, keeps serving across several capability lifetimes (renewal), and
//! once the volume is unpublished from it its I/O is refused when the
//! capability lapses, without a replica being dropped for it.

mod common;

use std::time::{Duration, Instant};

use ballast_cli::dev::DevCluster;
use ballast_proto::meta as pb;
use ballast_tls::Role;
use bytes::Bytes;
use meta_client::MetaClient;
use volume_engine::engine::{EngineError, EngineOptions, Volume};

use common::MIB;

/// Seconds a capability lives here: the engine renews every half of it.
const LIFETIME_SECS: u64 = 3;

async fn replica_count(meta: &MetaClient, volume_id: &str) -> Vec<usize> {
    let map = meta.get_chunk_map(pb::GetChunkMapRequest { volume_id: volume_id.into() }).await.unwrap();
    map.chunks.iter().map(|set| set.replicas.len()).collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_node_engine_serves_its_volume_only_while_it_is_published_there() {
    std::env::set_var("BALLAST_META_CAPABILITY_LIFETIME", LIFETIME_SECS.to_string());
    let dir = tempfile::tempdir().unwrap();
    let cluster = DevCluster::start(dir.path(), 1, 2).await.unwrap();
    let admin = cluster.meta();
    let node_tls = cluster.certificate(Role::Node, "worker-1").unwrap();
    let node = MetaClient::new(cluster.state.meta.clone()).unwrap().with_tls(&node_tls).unwrap();
    let create = |name: &str| pb::CreateVolumeRequest {
        name: name.into(),
        size_bytes: 4 * MIB,
        replicas: 2,
        chunk_size_bytes: MIB,
        ..Default::default()
    };
    let mine = admin.create_volume(create("mine")).await.unwrap();
    let theirs = admin.create_volume(create("theirs")).await.unwrap();
    let publish = pb::PublishVolumeRequest { volume_id: mine.id.clone(), node_id: "worker-1".into(), readonly: false };
    let epoch = admin.publish_volume(publish).await.unwrap().epoch;

    // A volume not published to the node does not open.
    let refused = Volume::open(node.clone(), &theirs.id, EngineOptions { epoch: 1, ..Default::default() }).await;
    match refused {
        Err(EngineError::Meta(status)) => assert_eq!(status.code(), tonic::Code::FailedPrecondition, "{status}"),
        other => panic!("opened a volume not published to the node: {:?}", other.err()),
    }

    // Its own serves writes and reads for three lifetimes of its first
    // capability: renewed as it goes.
    let volume = Volume::open(node.clone(), &mine.id, EngineOptions { epoch, ..Default::default() }).await.unwrap();
    let until = Instant::now() + Duration::from_secs(3 * LIFETIME_SECS);
    let mut round = 0u8;
    while Instant::now() < until {
        round = round.wrapping_add(1);
        let data = Bytes::from(vec![round; 64 << 10]);
        let offset = u64::from(round % 4) * MIB;
        volume.write_at(offset, data.clone(), true).await.unwrap();
        assert_eq!(volume.read_at(offset, data.len() as u64).await.unwrap(), data);
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
    assert_eq!(replica_count(&admin, &mine.id).await, vec![2; 4]);

    // Unpublished: once the capability lapses, nothing is admitted, and
    // no replica is blamed for the refusal.
    let unpublish = pb::UnpublishVolumeRequest { volume_id: mine.id.clone(), node_id: "worker-1".into() };
    admin.unpublish_volume(unpublish).await.unwrap();
    let deadline = Instant::now() + Duration::from_secs(2 * LIFETIME_SECS + 5);
    let refusal = loop {
        match volume.read_at(0, 4096).await {
            Err(e) => break e,
            Ok(_) => {
                assert!(Instant::now() < deadline, "the node still reads a volume unpublished from it");
                tokio::time::sleep(Duration::from_millis(250)).await;
            }
        }
    };
    assert!(matches!(refusal, EngineError::Denied(_)), "{refusal}");
    assert!(volume.write_at(0, Bytes::from(vec![1; 4096]), true).await.is_err());
    assert_eq!(replica_count(&admin, &mine.id).await, vec![2; 4]);
}
