//! Snapshots hold the volume's data as it was, held by the chunk servers;
//! volumes created from them (or cloned from a volume) start with that data
//! and diverge independently.

use ballast_cli::dev::DevCluster;
use ballast_proto::meta as pb;
use bytes::Bytes;
use meta_client::MetaClient;
use volume_engine::engine::{EngineOptions, Volume};
use volume_engine::snapshot;

const MIB: u64 = 1 << 20;

fn pattern(seed: u8, len: usize) -> Bytes {
    (0..len).map(|i| (i as u8).wrapping_mul(13).wrapping_add(seed)).collect::<Vec<u8>>().into()
}

async fn open(meta: &MetaClient, id: &str, epoch: u64) -> Volume {
    Volume::open(meta.clone(), id, EngineOptions { epoch, ..Default::default() }).await.unwrap()
}

async fn create(meta: &MetaClient, name: &str, source: Option<pb::content_source::Source>) -> pb::Volume {
    let request = pb::CreateVolumeRequest {
        name: name.into(),
        size_bytes: 6 * MIB,
        replicas: 3,
        chunk_size_bytes: 2 * MIB,
        content_source: source.map(|s| pb::ContentSource { source: Some(s) }),
        ..Default::default()
    };
    let volume = meta.create_volume(request).await.unwrap();
    snapshot::populate(meta, &volume).await.unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn snapshots_and_clones_hold_point_in_time_data() {
    let dir = tempfile::tempdir().unwrap();
    let cluster = DevCluster::start(dir.path(), 3, 3).await.unwrap();
    let meta = cluster.meta();
    let source = create(&meta, "source", None).await;
    assert_eq!(source.state, pb::VolumeState::Ready as i32);
    let epoch = meta
        .publish_volume(pb::PublishVolumeRequest {
            volume_id: source.id.clone(),
            node_id: "n1".into(),
            readonly: false,
        })
        .await
        .unwrap()
        .epoch;
    let writer = open(&meta, &source.id, epoch).await;
    // Data in chunks 0 and 2; chunk 1 never written.
    writer.write_at(0, pattern(1, MIB as usize), false).await.unwrap();
    writer.write_at(4 * MIB + 4096, pattern(2, 8192), true).await.unwrap();

    let snap = meta
        .create_snapshot(pb::CreateSnapshotRequest {
            name: "snap".into(),
            source_volume_id: source.id.clone(),
            ..Default::default()
        })
        .await
        .unwrap();
    assert!(!snap.ready_to_use, "not ready before its data is copied");
    let snap = snapshot::take(&meta, &snap).await.unwrap();
    assert!(snap.ready_to_use);
    assert_eq!(snap.chunks.iter().map(|c| c.chunk_index).collect::<Vec<_>>(), vec![0, 2]);
    assert!(snap.chunks.iter().all(|c| c.replicas.len() == 3), "every chunk copied to the replica set: {snap:?}");

    // Later writes to the source never show in the snapshot.
    writer.write_at(0, pattern(3, 4096), false).await.unwrap();
    writer.write_at(2 * MIB, pattern(4, 4096), false).await.unwrap();

    let restored = create(&meta, "restored", Some(pb::content_source::Source::SnapshotId(snap.id.clone()))).await;
    assert_eq!(restored.state, pb::VolumeState::Ready as i32);
    let reader = open(&meta, &restored.id, 0).await;
    let mut expected = vec![0u8; 6 * MIB as usize];
    expected[..MIB as usize].copy_from_slice(&pattern(1, MIB as usize));
    expected[(4 * MIB + 4096) as usize..(4 * MIB + 4096 + 8192) as usize].copy_from_slice(&pattern(2, 8192));
    assert!(reader.read_at(0, 6 * MIB).await.unwrap() == expected, "restored volume holds the snapshot's data");

    // Writes to the restored volume never show in the snapshot or the source.
    reader.write_at(0, pattern(5, 4096), false).await.unwrap();
    let again = create(&meta, "restored-again", Some(pb::content_source::Source::SnapshotId(snap.id.clone()))).await;
    assert_eq!(open(&meta, &again.id, 0).await.read_at(0, 4096).await.unwrap(), pattern(1, 4096));
    assert_eq!(writer.read_at(0, 4096).await.unwrap(), pattern(3, 4096));

    // A clone of a live volume holds its data at clone time.
    let clone = create(&meta, "clone", Some(pb::content_source::Source::VolumeId(source.id.clone()))).await;
    let cloned = open(&meta, &clone.id, 0).await;
    assert_eq!(cloned.read_at(0, 4096).await.unwrap(), pattern(3, 4096));
    assert_eq!(cloned.read_at(2 * MIB, 4096).await.unwrap(), pattern(4, 4096));
    writer.write_at(2 * MIB, pattern(6, 4096), false).await.unwrap();
    assert_eq!(cloned.read_at(2 * MIB, 4096).await.unwrap(), pattern(4, 4096));
    let temporary = meta.list_snapshots(pb::ListSnapshotsRequest::default()).await.unwrap().snapshots;
    assert_eq!(temporary.len(), 1, "the clone's temporary snapshot is gone: {temporary:?}");

    // A deleted snapshot's chunks leave the servers (heartbeat reconciliation).
    meta.delete_snapshot(pb::DeleteSnapshotRequest { id: snap.id.clone() }).await.unwrap();
    let snap_dir = |server: &str| dir.path().join(server).join("chunks").join(format!("{:016x}", snap.data_id));
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(40);
    while ["storage1", "storage2", "storage3"]
        .iter()
        .any(|s| std::fs::read_dir(snap_dir(s)).map(|d| d.count() > 0).unwrap_or(false))
    {
        assert!(std::time::Instant::now() < deadline, "snapshot chunks still on the servers");
        tokio::time::sleep(std::time::Duration::from_millis(500)).await;
    }
}
