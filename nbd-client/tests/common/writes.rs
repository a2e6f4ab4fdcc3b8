//! A volume under a steady writer, and checks on its replica sets: for the
//! tests that disturb the cluster while data keeps flowing.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use ballast_proto::frame::ChunkAt;
use ballast_proto::meta as pb;
use bytes::Bytes;
use meta_client::MetaClient;
use volume_engine::engine::Volume;

use super::MIB;

pub const VOLUME: u64 = 8 * MIB;

/// A 3-replica volume of 8 one-MiB chunks, written once, and a writer that
/// keeps writing 4 KiB blocks until `stop`. The writer fails the test on
/// the first failed write and returns how many it made, and the volume.
pub async fn volume_under_writes(
    meta: &MetaClient,
    name: &str,
    stop: Arc<AtomicBool>,
) -> (pb::Volume, tokio::task::JoinHandle<(u64, Volume)>) {
    let (info, volume) = super::published_volume(meta, name, VOLUME).await;
    volume.write_at(0, Bytes::from(vec![7u8; VOLUME as usize]), false).await.unwrap();
    let writer = tokio::spawn(async move {
        let mut n = 0u64;
        while !stop.load(Ordering::SeqCst) {
            let offset = (n * 13 % (VOLUME / 4096)) * 4096;
            volume.write_at(offset, Bytes::from(vec![n as u8; 4096]), false).await.expect("write");
            n += 1;
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        (n, volume)
    });
    (info, writer)
}

/// Fails the test if a chunk of the volume has fewer than 3 replicas (a
/// metadata call that does not answer in 2 s checks nothing).
pub async fn assert_three_replicas(meta: &MetaClient, volume_id: &str, when: &str) {
    let request = pb::GetChunkMapRequest { volume_id: volume_id.into() };
    let Ok(Ok(map)) = tokio::time::timeout(Duration::from_secs(2), meta.get_chunk_map(request)).await else {
        return;
    };
    for set in map.chunks {
        assert_eq!(set.replicas.len(), 3, "{when}: chunk {} lost a replica to silence: {set:?}", set.chunk_index);
    }
}

/// Every replica of every chunk of `volume`, read from its server under
/// the volume's current `epoch`: (chunk, server, data).
pub async fn replicas(meta: &MetaClient, volume: &pb::Volume, epoch: u64) -> Vec<(u64, String, Bytes)> {
    let map = meta.get_chunk_map(pb::GetChunkMapRequest { volume_id: volume.id.clone() }).await.unwrap();
    let size = volume.chunk_size_bytes as u32;
    let mut out = Vec::new();
    for set in map.chunks {
        for replica in set.replicas {
            let client = meta.chunk_servers().connect(&replica.address).await.unwrap();
            let (data, _) = client
                .read(ChunkAt { volume: volume.data_id, chunk: set.chunk_index, offset: 0, epoch, generation: 0 }, size)
                .await
                .unwrap();
            out.push((set.chunk_index, replica.server_id, data));
        }
    }
    out
}

/// Fails the test unless every replica of each chunk holds the same bytes.
pub fn assert_replicas_identical(replicas: &[(u64, String, Bytes)]) {
    for (chunk, server, data) in replicas {
        let (_, first_server, first) = replicas.iter().find(|(c, _, _)| c == chunk).expect("the chunk itself");
        assert!(data == first, "chunk {chunk}: {server} differs from {first_server}");
    }
}
