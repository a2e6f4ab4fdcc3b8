//! A chunk server away for less than the repair delay (a restart, a short
//! outage) left the replica sets its writers found it missing from. When it
//! is back it rejoins them and catches up with only the blocks written
//! while it was away; nothing is copied whole and no other server takes its
//! place. In a file of its own: it needs a repair delay longer than the
//! other repair tests use.

mod common;

use std::collections::BTreeSet;
use std::time::{Duration, Instant};

use ballast_cli::dev::DevCluster;
use ballast_proto::meta as pb;
use ballast_testkit::metrics;
use bytes::Bytes;
use common::writes::{assert_replicas_identical, replicas};
use common::MIB;

const CHUNK: u64 = 4 * MIB;
const CHUNKS: u64 = 4;
const BLOCK: u64 = 4096;

async fn chunk_map(cluster: &DevCluster, volume_id: &str) -> Vec<pb::ChunkReplicaSet> {
    let request = pb::GetChunkMapRequest { volume_id: volume_id.into() };
    cluster.meta().get_chunk_map(request).await.unwrap().chunks
}

/// Bytes the metadata service copied between chunk servers to repair.
fn copied_bytes(cluster: &DevCluster) -> f64 {
    let address = cluster.metrics_address("meta1").expect("meta1 serves metrics");
    metrics::sum(&metrics::scrape(&address).unwrap(), "ballast_meta_copied_bytes_total")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_server_back_within_the_repair_delay_catches_up_only_what_it_missed() {
    // A whole rebuild elsewhere would have to wait 30 s; the server is back in 2.
    std::env::set_var("BALLAST_META_REPAIR_INTERVAL", "1");
    std::env::set_var("BALLAST_META_REPAIR_AFTER", "30");
    let dir = tempfile::tempdir().unwrap();
    let mut cluster = DevCluster::start(dir.path(), 1, 4).await.unwrap();
    let meta = cluster.meta();
    let request = pb::CreateVolumeRequest {
        name: "away".into(),
        size_bytes: CHUNKS * CHUNK,
        replicas: 3,
        chunk_size_bytes: CHUNK,
        ..Default::default()
    };
    let info = meta.create_volume(request).await.unwrap();
    let volume = common::publish_and_open(&meta, &info).await;
    let mut image = vec![0x11u8; (CHUNKS * CHUNK) as usize];
    volume.write_at(0, Bytes::from(image.clone()), false).await.unwrap();
    volume.flush().await.unwrap();
    let before = chunk_map(&cluster, &info.id).await;
    let victim = before[0].replicas[0].clone();
    let left: BTreeSet<u64> = before.iter().filter(|s| s.replicas.contains(&victim)).map(|s| s.chunk_index).collect();
    let name = cluster.state.processes.iter().find(|p| p.address == victim.address).unwrap().name.clone();
    let copied_before = copied_bytes(&cluster);

    // Away: 4 blocks written into every chunk, so each set with the victim
    // in it drops it.
    cluster.kill(&name);
    for chunk in 0..CHUNKS {
        for block in [0, 7, 300, 1023] {
            let offset = chunk * CHUNK + block * BLOCK;
            let data = vec![(chunk * 16 + block % 16) as u8 + 0x20; BLOCK as usize];
            image[offset as usize..(offset + BLOCK) as usize].copy_from_slice(&data);
            volume.write_at(offset, Bytes::from(data), false).await.unwrap();
        }
    }
    volume.flush().await.unwrap();
    let during = chunk_map(&cluster, &info.id).await;
    assert!(during.iter().all(|s| !s.replicas.contains(&victim)), "the victim left every set it was in: {during:?}");
    cluster.restart(&name).unwrap();

    // Back in every set it left, well within the repair delay.
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let sets = chunk_map(&cluster, &info.id).await;
        let back: BTreeSet<u64> = sets
            .iter()
            .filter(|s| s.replicas.iter().any(|r| r.server_id == victim.server_id))
            .map(|s| s.chunk_index)
            .collect();
        if back == left && sets.iter().all(|s| s.replicas.len() == 3) {
            break;
        }
        assert!(Instant::now() < deadline, "the victim did not rejoin {left:?} within 20 s: {sets:?}");
        tokio::time::sleep(Duration::from_millis(250)).await;
    }

    // Only what it missed was copied: 4 blocks per chunk it left.
    let copied = copied_bytes(&cluster) - copied_before;
    let missed = (left.len() as u64 * 4 * BLOCK) as f64;
    assert!(copied > 0.0 && copied <= missed, "copied {copied} bytes to catch up {missed} bytes missed");
    let copies = replicas(&meta, &info, volume.epoch()).await;
    assert_replicas_identical(&copies);
    for (chunk, server, data) in &copies {
        let start = (chunk * CHUNK) as usize;
        assert!(
            data[..] == image[start..start + CHUNK as usize],
            "chunk {chunk} on {server} differs from what was written"
        );
    }
}
