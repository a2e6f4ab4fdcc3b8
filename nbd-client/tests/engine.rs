//! The replicated volume engine against a real local cluster: three
//! metadata members and three chunk servers as processes on loopback.

use std::path::{Path, PathBuf};

use ballast_cli::dev::DevCluster;
use ballast_proto::meta as pb;
use bytes::Bytes;
use meta_client::MetaClient;
use volume_engine::engine::{EngineError, EngineOptions, Volume};

const MIB: u64 = 1 << 20;

async fn create(meta: &MetaClient, name: &str, size: u64, replicas: u32) -> pb::Volume {
    let request = pb::CreateVolumeRequest {
        name: name.into(),
        size_bytes: size,
        replicas,
        chunk_size_bytes: MIB,
        ..Default::default()
    };
    meta.create_volume(request).await.unwrap()
}

async fn publish(meta: &MetaClient, volume: &pb::Volume, node: &str) -> u64 {
    let request = pb::PublishVolumeRequest { volume_id: volume.id.clone(), node_id: node.into(), readonly: false };
    meta.publish_volume(request).await.unwrap().epoch
}

async fn open(meta: &MetaClient, volume: &pb::Volume, epoch: u64) -> Volume {
    Volume::open(meta.clone(), &volume.id, EngineOptions { epoch, ..Default::default() }).await.unwrap()
}

fn pattern(seed: u8, len: usize) -> Bytes {
    (0..len).map(|i| (i as u8).wrapping_mul(31).wrapping_add(seed)).collect::<Vec<u8>>().into()
}

async fn chunk_map(meta: &MetaClient, volume: &pb::Volume) -> Vec<pb::ChunkReplicaSet> {
    meta.get_chunk_map(pb::GetChunkMapRequest { volume_id: volume.id.clone() }).await.unwrap().chunks
}

/// The chunk files of one volume on one storage server.
fn chunk_files(cluster_dir: &Path, server: &str, data_id: u64) -> Vec<PathBuf> {
    let dir = cluster_dir.join(server).join("chunks").join(format!("{data_id:016x}"));
    let mut files: Vec<PathBuf> =
        std::fs::read_dir(dir).map(|d| d.map(|e| e.unwrap().path()).collect()).unwrap_or_default();
    files.sort();
    files
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn writes_and_reads_round_trip_across_chunks_unaligned_and_thin() {
    let dir = tempfile::tempdir().unwrap();
    let cluster = DevCluster::start(dir.path(), 3, 3).await.unwrap();
    let meta = cluster.meta();
    let info = create(&meta, "roundtrip", 8 * MIB, 3).await;
    let epoch = publish(&meta, &info, "node-1").await;
    let volume = open(&meta, &info, epoch).await;

    // Thin: nothing allocated, zeros come back without a chunk.
    assert_eq!(volume.read_at(3 * MIB, 4096).await.unwrap(), Bytes::from(vec![0u8; 4096]));
    assert!(chunk_map(&meta, &info).await.is_empty());

    // Aligned, across a chunk boundary.
    let data = pattern(1, 64 << 10);
    volume.write_at(MIB - (32 << 10), data.clone(), false).await.unwrap();
    assert_eq!(volume.read_at(MIB - (32 << 10), 64 << 10).await.unwrap(), data);
    let map = chunk_map(&meta, &info).await;
    assert_eq!(map.iter().map(|c| c.chunk_index).collect::<Vec<_>>(), vec![0, 1]);
    assert!(map.iter().all(|c| c.replicas.len() == 3));

    // Unaligned writes keep their neighbours (read-modify-write).
    volume.write_at(MIB - 10, Bytes::from_static(b"0123456789abcdefghij"), true).await.unwrap();
    let around = volume.read_at(MIB - 4106, 8212).await.unwrap();
    let mut expected = data.slice((32 << 10) - 4106..(32 << 10) - 10).to_vec();
    expected.extend_from_slice(b"0123456789abcdefghij");
    expected.extend_from_slice(&data.slice((32 << 10) + 10..(32 << 10) + 4106));
    assert_eq!(around, Bytes::from(expected));

    // Trim and write-zeroes read back as zeros; flush succeeds everywhere.
    volume.write_zeroes_at(MIB, 8192, false).await.unwrap();
    assert_eq!(volume.read_at(MIB, 8192).await.unwrap(), Bytes::from(vec![0u8; 8192]));
    volume.flush().await.unwrap();

    // Every replica holds the same bytes: read each one directly.
    let reopened = open(&meta, &info, epoch).await;
    assert_eq!(reopened.read_at(0, 2 * MIB).await.unwrap(), volume.read_at(0, 2 * MIB).await.unwrap());

    // Past the end is refused and changes nothing.
    assert!(matches!(
        volume.write_at(8 * MIB - 4096, pattern(2, 8192), false).await,
        Err(EngineError::OutOfRange { .. })
    ));

    // An expansion recorded in metadata is served once refreshed: the new
    // tail becomes writable and the old bytes stay where they were.
    meta.expand_volume(pb::ExpandVolumeRequest { id: info.id.clone(), size_bytes: 12 * MIB }).await.unwrap();
    assert_eq!(volume.size_bytes(), 8 * MIB, "growth is not picked up before a refresh");
    assert_eq!(volume.refresh().await.unwrap(), 12 * MIB);
    assert_eq!(volume.size_bytes(), 12 * MIB);
    let across_old_end = pattern(3, 8192);
    volume.write_at(8 * MIB - 4096, across_old_end.clone(), false).await.unwrap();
    assert_eq!(volume.read_at(8 * MIB - 4096, 8192).await.unwrap(), across_old_end);
    assert_eq!(volume.read_at(MIB - (32 << 10), 4096).await.unwrap(), data.slice(..4096));
    assert_eq!(volume.refresh().await.unwrap(), 12 * MIB, "refreshing again changes nothing");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_dead_chunk_server_leaves_the_set_and_writes_go_on() {
    let dir = tempfile::tempdir().unwrap();
    let cluster = DevCluster::start(dir.path(), 3, 3).await.unwrap();
    let meta = cluster.meta();
    let info = create(&meta, "degraded", 4 * MIB, 3).await;
    let epoch = publish(&meta, &info, "node-1").await;
    let volume = open(&meta, &info, epoch).await;
    volume.write_at(0, pattern(3, 2 * MIB as usize), false).await.unwrap();
    let before = chunk_map(&meta, &info).await;

    cluster.kill("storage2");
    let storage2_id = std::fs::read_to_string(dir.path().join("storage2").join("server-id")).ok();
    volume.write_at(4096, pattern(4, 8192), true).await.unwrap();
    volume.write_at(MIB, pattern(5, 4096), false).await.unwrap();
    volume.flush().await.unwrap();

    let after = chunk_map(&meta, &info).await;
    for (old, new) in before.iter().zip(&after) {
        assert_eq!(new.replicas.len(), 2, "chunk {} lost the dead replica: {new:?}", new.chunk_index);
        assert!(new.generation > old.generation);
        if let Some(id) = &storage2_id {
            assert!(new.replicas.iter().all(|r| r.server_id != id.trim()));
        }
    }
    assert_eq!(volume.degraded_chunks(), vec![0, 1]);
    let mut expected = pattern(3, 2 * MIB as usize).to_vec();
    expected[4096..4096 + 8192].copy_from_slice(&pattern(4, 8192));
    expected[MIB as usize..MIB as usize + 4096].copy_from_slice(&pattern(5, 4096));
    assert_eq!(volume.read_at(0, 2 * MIB).await.unwrap(), Bytes::from(expected));

    // Below the minimum of two replicas, writes fail instead of being acknowledged.
    cluster.kill("storage3");
    let result = volume.write_at(0, pattern(6, 4096), false).await;
    assert!(matches!(result, Err(EngineError::Degraded { .. })), "{result:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn overlapping_writes_across_chunks_neither_deadlock_nor_interleave() {
    let dir = tempfile::tempdir().unwrap();
    let cluster = DevCluster::start(dir.path(), 3, 3).await.unwrap();
    let meta = cluster.meta();
    let info = create(&meta, "overlaps", 2 * MIB, 3).await;
    let epoch = publish(&meta, &info, "node-1").await;
    let volume = std::sync::Arc::new(open(&meta, &info, epoch).await);
    // Every write spans the chunk boundary; half of them are unaligned.
    let writers: Vec<_> = (0..16u8)
        .map(|w| {
            let volume = volume.clone();
            tokio::spawn(async move {
                for n in 0..10u8 {
                    let (offset, len) = if w % 2 == 0 { (MIB - 32768, 65536) } else { (MIB - 30000, 60000) };
                    volume.write_at(offset, pattern(w.wrapping_mul(16).wrapping_add(n), len), false).await.unwrap();
                }
            })
        })
        .collect();
    let all = futures::future::join_all(writers);
    let done = tokio::time::timeout(std::time::Duration::from_secs(120), all).await.expect("no deadlock");
    assert!(done.into_iter().all(|r| r.is_ok()));
    // The overlap of every write holds one write's bytes, not a mix.
    let (start, len) = (MIB - 30000, 60000usize);
    let got = volume.read_at(start, len as u64).await.unwrap();
    let whole = (0..=255u8).any(|seed| {
        let aligned = pattern(seed, 65536);
        let unaligned = pattern(seed, 60000);
        got[..] == aligned[2768..2768 + len] || got[..] == unaligned[..]
    });
    assert!(whole, "the overlapping range mixes two writes");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn members_behind_the_sets_generation_are_brought_up_by_writers() {
    let dir = tempfile::tempdir().unwrap();
    let cluster = DevCluster::start(dir.path(), 3, 3).await.unwrap();
    let meta = cluster.meta();
    let info = create(&meta, "laggards", 2 * MIB, 3).await;
    let epoch = publish(&meta, &info, "node-1").await;
    let first = open(&meta, &info, epoch).await;
    first.write_at(0, pattern(8, 4096), false).await.unwrap();

    // The set moves on in metadata, and whoever moved it never reached the
    // members: they stay at the old generation.
    let set = chunk_map(&meta, &info).await.remove(0);
    let report = pb::ReportFailedReplicaRequest {
        volume_id: info.id.clone(),
        chunk_index: 0,
        server_id: set.replicas[2].server_id.clone(),
        generation: set.generation,
        epoch,
    };
    let moved = meta.report_failed_replica(report).await.unwrap();
    assert_eq!(moved.generation, set.generation + 1);

    // A writer with the new view finds the members behind, moves them up
    // and writes; the old view is refused from then on.
    let second = open(&meta, &info, epoch).await;
    second.write_at(0, pattern(9, 4096), false).await.unwrap();
    assert_eq!(second.read_at(0, 4096).await.unwrap(), pattern(9, 4096));
    for replica in &moved.replicas {
        let client = cluster.chunk_servers().connect(&replica.address).await.unwrap();
        let chunk = client.chunk_info(info.data_id, 0).await.unwrap();
        assert_eq!(chunk.generation, moved.generation, "{} moved up", replica.server_id);
    }
    first.write_at(4096, pattern(10, 4096), false).await.unwrap();
    assert_eq!(second.read_at(4096, 4096).await.unwrap(), pattern(10, 4096), "the old view re-read the set");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_fenced_writer_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let cluster = DevCluster::start(dir.path(), 3, 3).await.unwrap();
    let meta = cluster.meta();
    let info = create(&meta, "fenced", 2 * MIB, 3).await;
    let old_epoch = publish(&meta, &info, "node-old").await;
    let old = open(&meta, &info, old_epoch).await;
    old.write_at(0, pattern(7, 4096), false).await.unwrap();

    meta.unpublish_volume(pb::UnpublishVolumeRequest { volume_id: info.id.clone(), node_id: "node-old".into() })
        .await
        .unwrap();
    let new_epoch = publish(&meta, &info, "node-new").await;
    assert!(new_epoch > old_epoch);
    let new = open(&meta, &info, new_epoch).await;
    new.write_at(0, pattern(8, 4096), false).await.unwrap();

    let refused = old.write_at(0, pattern(9, 4096), false).await;
    assert!(matches!(refused, Err(EngineError::Fenced(_))), "{refused:?}");
    assert_eq!(new.read_at(0, 4096).await.unwrap(), pattern(8, 4096));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_corrupted_replica_is_never_served_and_is_reported() {
    let dir = tempfile::tempdir().unwrap();
    let cluster = DevCluster::start(dir.path(), 3, 3).await.unwrap();
    let meta = cluster.meta();
    let info = create(&meta, "corrupt", 2 * MIB, 3).await;
    let epoch = publish(&meta, &info, "node-1").await;
    let volume = open(&meta, &info, epoch).await;
    volume.write_at(0, pattern(10, 64 << 10), false).await.unwrap();
    volume.flush().await.unwrap();

    // Flip a byte of block 1 in every server's copy but one... here: in one copy.
    let files = chunk_files(dir.path(), "storage1", info.data_id);
    assert_eq!(files.len(), 1, "storage1 holds chunk 0");
    let mut bytes = std::fs::read(&files[0]).unwrap();
    bytes[4096 + 4096 + 17] ^= 0xff;
    std::fs::write(&files[0], bytes).unwrap();

    // Reads rotate over the replicas, so some land on the corrupt copy;
    // every one of them still returns the right bytes.
    for _ in 0..6 {
        assert_eq!(volume.read_at(0, 64 << 10).await.unwrap(), pattern(10, 64 << 10));
    }
    let set = &chunk_map(&meta, &info).await[0];
    assert_eq!(set.replicas.len(), 2, "the corrupt replica was reported and dropped: {set:?}");
}

/// A successor opens the volume while its predecessor still serves it (a
/// hand-over, a standby): chunks the predecessor allocates meanwhile must
/// not read as zeros once the successor serves.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_successor_reads_what_its_predecessor_allocated_after_it_opened() {
    let dir = tempfile::tempdir().unwrap();
    let cluster = DevCluster::start(dir.path(), 3, 3).await.unwrap();
    let meta = cluster.meta();
    let volume = create(&meta, "handed", 8 * MIB, 3).await;
    let epoch = publish(&meta, &volume, "n1").await;
    let predecessor = open(&meta, &volume, epoch).await;
    predecessor.write_at(0, pattern(1, 4096), false).await.unwrap();
    let successor = open(&meta, &volume, epoch).await;
    // Chunk 5 is allocated by the predecessor after the successor opened.
    predecessor.write_at(5 * MIB, pattern(2, 4096), true).await.unwrap();

    successor.reload_chunk_map().await.unwrap();
    assert!(successor.read_at(0, 4096).await.unwrap() == pattern(1, 4096));
    assert!(
        successor.read_at(5 * MIB, 4096).await.unwrap() == pattern(2, 4096),
        "the chunk allocated later reads back"
    );
}

/// A flush after a chunk server died drops it from every chunk it held,
/// chunks the flush did not write included, all of them at once.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_flush_drops_a_dead_server_from_every_chunk() {
    let dir = tempfile::tempdir().unwrap();
    let cluster = DevCluster::start(dir.path(), 3, 3).await.unwrap();
    let meta = cluster.meta();
    let info = create(&meta, "flushed", 6 * MIB, 3).await;
    let epoch = publish(&meta, &info, "node-1").await;
    let volume = open(&meta, &info, epoch).await;
    for chunk in 0..6 {
        volume.write_at(chunk * MIB, pattern(chunk as u8, 4096), false).await.unwrap();
    }
    let before = chunk_map(&meta, &info).await;
    assert_eq!(before.len(), 6);

    cluster.kill("storage2");
    volume.flush().await.unwrap();

    let after = chunk_map(&meta, &info).await;
    for (old, new) in before.iter().zip(&after) {
        assert_eq!(new.replicas.len(), 2, "chunk {} still lists the dead server: {new:?}", new.chunk_index);
        assert!(new.generation > old.generation);
    }
    assert_eq!(volume.degraded_chunks(), (0..6).collect::<Vec<u64>>());
    for chunk in 0..6 {
        assert!(volume.read_at(chunk * MIB, 4096).await.unwrap() == pattern(chunk as u8, 4096));
    }
}
