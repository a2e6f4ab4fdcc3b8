//! A node cut off from metadata keeps its serving process running after
//! the volume was unpublished from it and published to another node. Once
//! that publish returned, nothing the old writer sends may land on any
//! replica: with 6 chunk servers a volume's chunks are spread over more
//! servers than the new owner touches at first, and every one of them must
//! refuse the old epoch, not just those the new owner already wrote to.

mod common;

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;

use ballast_cli::dev::DevCluster;
use ballast_proto::meta as pb;
use bytes::Bytes;
use common::writes::{assert_replicas_identical, replicas};
use meta_client::MetaClient;
use volume_engine::engine::{EngineError, EngineOptions, Volume};

const MIB: u64 = 1 << 20;
const CHUNKS: u64 = 16;
const VOLUME: u64 = CHUNKS * MIB;
const BLOCK: usize = 4096;

/// A block that names its writer and a sequence number.
fn tagged_block(writer: u8, seq: u64) -> Vec<u8> {
    let mut block = vec![writer; BLOCK];
    block[..8].copy_from_slice(&seq.to_le_bytes());
    block
}

async fn open(meta: &MetaClient, volume_id: &str, node: &str) -> Volume {
    let attachment = meta
        .publish_volume(pb::PublishVolumeRequest { volume_id: volume_id.into(), node_id: node.into(), readonly: false })
        .await
        .unwrap();
    let options = EngineOptions { epoch: attachment.epoch, ..Default::default() };
    Volume::open(meta.clone(), volume_id, options).await.unwrap()
}

async fn unpublish(meta: &MetaClient, volume_id: &str, node: &str) {
    meta.unpublish_volume(pb::UnpublishVolumeRequest { volume_id: volume_id.into(), node_id: node.into() })
        .await
        .unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_stale_writer_lands_nothing_once_the_volume_is_published_elsewhere() {
    let dir = tempfile::tempdir().unwrap();
    let cluster = DevCluster::start(dir.path(), 1, 6).await.unwrap();
    let meta = cluster.meta();
    let request = pb::CreateVolumeRequest {
        name: "moved".into(),
        size_bytes: VOLUME,
        replicas: 3,
        chunk_size_bytes: MIB,
        ..Default::default()
    };
    let info = meta.create_volume(request).await.unwrap();

    // Node A writes every chunk, so its engine knows every replica set.
    let a = Arc::new(open(&meta, &info.id, "node-a").await);
    a.write_at(0, Bytes::from(vec![0u8; VOLUME as usize]), false).await.unwrap();
    a.flush().await.unwrap();
    let servers: std::collections::BTreeSet<String> =
        replicas(&meta, &info, a.epoch()).await.into_iter().map(|(_, server, _)| server).collect();
    assert!(servers.len() > 3, "the chunks are spread over more than one replica set: {servers:?}");

    // A keeps writing, one tagged block per chunk in turn, while the volume
    // is unpublished from A (A does not hear of it) and published to B.
    let stop = Arc::new(AtomicBool::new(false));
    let published_at_seq = Arc::new(AtomicU64::new(u64::MAX));
    let seq = Arc::new(AtomicU64::new(0));
    let writer = {
        let (a, stop, seq, published_at_seq) = (a.clone(), stop.clone(), seq.clone(), published_at_seq.clone());
        tokio::spawn(async move {
            let mut landed_after_publish = Vec::new();
            while !stop.load(Ordering::SeqCst) {
                let n = seq.fetch_add(1, Ordering::SeqCst);
                let offset = (n % CHUNKS) * MIB + (n / CHUNKS % 16) * BLOCK as u64;
                let issued_after_publish = n >= published_at_seq.load(Ordering::SeqCst);
                let result = a.write_at(offset, Bytes::from(tagged_block(0xAA, n)), false).await;
                if result.is_ok() && issued_after_publish {
                    landed_after_publish.push(n);
                }
            }
            landed_after_publish
        })
    };
    tokio::time::sleep(std::time::Duration::from_millis(300)).await;
    unpublish(&meta, &info.id, "node-a").await;
    let b = open(&meta, &info.id, "node-b").await;
    published_at_seq.store(seq.load(Ordering::SeqCst), Ordering::SeqCst);
    let first_after_publish = published_at_seq.load(Ordering::SeqCst);
    // B writes its first chunk; A goes on for a while.
    b.write_at(0, Bytes::from(vec![0xBB; MIB as usize]), false).await.unwrap();
    tokio::time::sleep(std::time::Duration::from_secs(2)).await;
    stop.store(true, Ordering::SeqCst);
    let landed = writer.await.unwrap();
    assert!(landed.is_empty(), "writes of the old owner acknowledged after the publish returned: {landed:?}");
    b.flush().await.unwrap();

    // No replica holds a block A wrote after the publish, and every replica
    // of a chunk is the same.
    let copies = replicas(&meta, &info, b.epoch()).await;
    for (chunk, server, data) in &copies {
        for block in data.chunks(BLOCK) {
            if block[BLOCK - 1] == 0xAA {
                let n = u64::from_le_bytes(block[..8].try_into().unwrap());
                assert!(
                    n < first_after_publish,
                    "chunk {chunk} on {server} holds A's write #{n}, issued after the publish"
                );
            }
        }
    }
    assert_replicas_identical(&copies);
}

/// A fenced writer that cannot reach some replicas must not take them out
/// of the sets the new owner writes to, nor allocate chunks: metadata
/// refuses both from an epoch behind the volume's.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_fenced_writer_can_neither_drop_replicas_nor_allocate_chunks() {
    let dir = tempfile::tempdir().unwrap();
    let cluster = DevCluster::start(dir.path(), 1, 3).await.unwrap();
    let meta = cluster.meta();
    let request = pb::CreateVolumeRequest {
        name: "contested".into(),
        size_bytes: 4 * MIB,
        replicas: 3,
        chunk_size_bytes: MIB,
        ..Default::default()
    };
    let info = meta.create_volume(request).await.unwrap();
    let a = open(&meta, &info.id, "node-a").await;
    a.write_at(0, Bytes::from(vec![1u8; MIB as usize]), false).await.unwrap();
    a.flush().await.unwrap();
    unpublish(&meta, &info.id, "node-a").await;
    let _b = open(&meta, &info.id, "node-b").await;
    let chunk_map =
        || async { meta.get_chunk_map(pb::GetChunkMapRequest { volume_id: info.id.clone() }).await.unwrap().chunks };
    let before = chunk_map().await;

    // A loses two of chunk 0's servers and reads on, failing over to the
    // third and reporting the other two as failed.
    cluster.kill("storage1");
    cluster.kill("storage2");
    for block in 0..8 {
        let _ = a.read_at(block * BLOCK as u64, BLOCK as u64).await;
    }
    assert_eq!(chunk_map().await, before, "a fenced reader's failure reports changed the replica sets");

    // A writes into a chunk nobody allocated yet.
    let written = a.write_at(2 * MIB, Bytes::from(vec![2u8; BLOCK]), false).await;
    assert!(matches!(written, Err(EngineError::Fenced(_))), "{written:?}");
    assert_eq!(chunk_map().await, before, "a fenced writer allocated a chunk");
}

/// A node cut off from metadata must not hand the new owner's data to its
/// application as if it were its own: reads under an old epoch are refused
/// by the chunk servers just as writes are.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_fenced_reader_is_refused_the_new_owners_data() {
    let dir = tempfile::tempdir().unwrap();
    let cluster = DevCluster::start(dir.path(), 1, 3).await.unwrap();
    let meta = cluster.meta();
    let request = pb::CreateVolumeRequest {
        name: "reread".into(),
        size_bytes: 2 * MIB,
        replicas: 3,
        chunk_size_bytes: MIB,
        ..Default::default()
    };
    let info = meta.create_volume(request).await.unwrap();
    let a = open(&meta, &info.id, "node-a").await;
    a.write_at(0, Bytes::from(vec![0xAA; BLOCK]), false).await.unwrap();
    assert_eq!(a.read_at(0, BLOCK as u64).await.unwrap()[0], 0xAA);

    unpublish(&meta, &info.id, "node-a").await;
    let b = open(&meta, &info.id, "node-b").await;
    b.write_at(0, Bytes::from(vec![0xBB; BLOCK]), false).await.unwrap();

    let read = a.read_at(0, BLOCK as u64).await;
    assert!(matches!(read, Err(EngineError::Fenced(_))), "the fenced node read {:?}", read.map(|d| d[0]));
    assert_eq!(b.read_at(0, BLOCK as u64).await.unwrap()[0], 0xBB);
}

/// Readers of a volume published read-only to several nodes share one
/// epoch: a second reader does not fence the first.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn readers_of_a_read_only_volume_do_not_fence_each_other() {
    let dir = tempfile::tempdir().unwrap();
    let cluster = DevCluster::start(dir.path(), 1, 3).await.unwrap();
    let meta = cluster.meta();
    let request = pb::CreateVolumeRequest {
        name: "shared".into(),
        size_bytes: 2 * MIB,
        replicas: 3,
        chunk_size_bytes: MIB,
        ..Default::default()
    };
    let info = meta.create_volume(request).await.unwrap();
    let writer = open(&meta, &info.id, "node-w").await;
    writer.write_at(0, Bytes::from(vec![0x5A; BLOCK]), false).await.unwrap();
    writer.flush().await.unwrap();
    unpublish(&meta, &info.id, "node-w").await;

    let open_readonly = |node: &'static str| {
        let (meta, id) = (meta.clone(), info.id.clone());
        async move {
            let request = pb::PublishVolumeRequest { volume_id: id.clone(), node_id: node.into(), readonly: true };
            let attachment = meta.publish_volume(request).await.unwrap();
            let options = EngineOptions { epoch: attachment.epoch, readonly: true, ..Default::default() };
            (attachment.epoch, Volume::open(meta, &id, options).await.unwrap())
        }
    };
    let (first_epoch, first) = open_readonly("node-r1").await;
    assert_eq!(first.read_at(0, BLOCK as u64).await.unwrap()[0], 0x5A);
    let (second_epoch, second) = open_readonly("node-r2").await;
    assert_eq!(second_epoch, first_epoch, "a second reader got an epoch of its own");
    assert_eq!(second.read_at(0, BLOCK as u64).await.unwrap()[0], 0x5A);
    assert_eq!(first.read_at(0, BLOCK as u64).await.unwrap()[0], 0x5A, "the first reader was fenced");
}
