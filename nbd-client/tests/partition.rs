//! Chunk servers cut off from metadata by the network while the writer
//! still reaches both. The metadata service hears no heartbeat for well
//! past the repair delay, yet the servers are alive and serving: no
//! replica may be dropped, no chunk deleted, no write may fail, and after
//! healing every replica of every chunk holds the same bytes.
//!
//! Metadata members and chunk servers each run in a network namespace of
//! their own, joined by a bridge this process is on; the cut loses the
//! packets between the two namespaces (no error, no reset), as a failed
//! switch or a firewall would.

mod common;

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use ballast_cli::dev::{DevCluster, Host, Layout};
use ballast_proto::meta as pb;
use ballast_testkit::netns::Network;
use common::held;
use common::writes::{assert_replicas_identical, assert_three_replicas, replicas, volume_under_writes};

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn chunk_servers_cut_off_from_metadata_keep_every_replica() {
    if !ballast_testkit::machine_has(&[ballast_testkit::ROOT, "ip"]) {
        return;
    }
    // Repair passes every second; a server silent for 3 s counts as dead.
    std::env::set_var("BALLAST_META_REPAIR_INTERVAL", "1");
    std::env::set_var("BALLAST_META_REPAIR_AFTER", "3");
    let network = Network::create(&["meta", "storage"]);
    let host = |group: &str| Host { netns: Some(network.namespace(group)), ip: network.address(group).into() };
    let layout = Layout { meta: host("meta"), storage: vec![host("storage")] };
    let dir = tempfile::tempdir().unwrap();
    let cluster = DevCluster::start_in(dir.path(), 3, 4, layout).await.unwrap();
    let meta = cluster.meta();
    let stop = Arc::new(AtomicBool::new(false));
    let (info, writer) = volume_under_writes(&meta, "cut-off", stop.clone()).await;
    let before = held(&cluster).await;

    network.cut("meta", "storage");
    let servers = || async { meta.list_chunk_servers(pb::ListChunkServersRequest {}).await.unwrap().servers };
    let watch = Instant::now() + Duration::from_secs(12);
    let mut silent_seen = false;
    while Instant::now() < watch {
        assert_three_replicas(&meta, &info.id, "during the partition").await;
        let now_ms = SystemTime::now().duration_since(UNIX_EPOCH).unwrap().as_millis() as u64;
        silent_seen |= servers().await.iter().all(|s| now_ms.saturating_sub(s.last_heartbeat_ms) > 3_000);
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
    assert!(silent_seen, "metadata never stopped hearing the chunk servers: the cut did not cut");

    network.heal("meta", "storage");
    let deadline = Instant::now() + Duration::from_secs(30);
    let healed_at = SystemTime::now().duration_since(UNIX_EPOCH).unwrap().as_millis() as u64;
    while !servers().await.iter().all(|s| s.last_heartbeat_ms > healed_at) {
        assert!(Instant::now() < deadline, "the chunk servers were not heard again after healing");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    let watch = Instant::now() + Duration::from_secs(5);
    while Instant::now() < watch {
        assert_three_replicas(&meta, &info.id, "after healing").await;
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
    stop.store(true, Ordering::SeqCst);
    let (writes, volume) = writer.await.unwrap();
    assert!(writes > 100, "the writer kept writing through the partition ({writes} writes)");
    volume.flush().await.unwrap();

    assert_eq!(held(&cluster).await, before, "chunk servers deleted or gained chunks");
    assert_replicas_identical(&replicas(&meta, &info, volume.epoch()).await);
}

/// One chunk server cut off from metadata, while the writer still reaches
/// it: metadata gives it up and rebuilds its replicas elsewhere, and the
/// writer, told by the other members that the sets moved on, follows them.
/// No write fails, and once healed every replica of every chunk is the same.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_chunk_server_cut_off_from_metadata_alone_is_replaced_without_a_failed_write() {
    if !ballast_testkit::machine_has(&[ballast_testkit::ROOT, "ip"]) {
        return;
    }
    std::env::set_var("BALLAST_META_REPAIR_INTERVAL", "1");
    std::env::set_var("BALLAST_META_REPAIR_AFTER", "3");
    let network = Network::create(&["meta", "lone", "storage"]);
    let host = |group: &str| Host { netns: Some(network.namespace(group)), ip: network.address(group).into() };
    // storage1 alone; storage2..5 together.
    let layout = Layout { meta: host("meta"), storage: vec![host("lone"), host("storage")] };
    let dir = tempfile::tempdir().unwrap();
    let cluster = DevCluster::start_in(dir.path(), 3, 5, layout).await.unwrap();
    let meta = cluster.meta();
    let stop = Arc::new(AtomicBool::new(false));
    let (info, writer) = volume_under_writes(&meta, "lone", stop.clone()).await;
    let lone = cluster.process("storage1").address.clone();
    let chunk_map = || async {
        let request = pb::GetChunkMapRequest { volume_id: info.id.clone() };
        meta.get_chunk_map(request).await.unwrap().chunks
    };
    let on_lone =
        |sets: &[pb::ChunkReplicaSet]| sets.iter().filter(|s| s.replicas.iter().any(|r| r.address == lone)).count();
    assert!(on_lone(&chunk_map().await) > 0, "storage1 holds some of the volume");

    network.cut("meta", "lone");
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let sets = chunk_map().await;
        if on_lone(&sets) == 0 && sets.iter().all(|s| s.replicas.len() == 3) {
            break;
        }
        assert!(Instant::now() < deadline, "storage1's replicas were not rebuilt elsewhere: {sets:?}");
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
    network.heal("meta", "lone");
    tokio::time::sleep(Duration::from_secs(2)).await;
    stop.store(true, Ordering::SeqCst);
    let (writes, volume) = writer.await.unwrap();
    assert!(writes > 100, "the writer kept writing while the sets moved ({writes} writes)");
    volume.flush().await.unwrap();
    assert_replicas_identical(&replicas(&meta, &info, volume.epoch()).await);
}
