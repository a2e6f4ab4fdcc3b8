//! A silent server is not a dead server. When the metadata service is the
//! one that stopped hearing, the chunk servers are fine, and dropping their
//! replicas for silence would cut every chunk down towards one copy. Here
//! the whole metadata service is frozen (SIGSTOP) well past the repair
//! delay while a writer keeps going, and its leader is killed right after
//! the thaw: no replica may be dropped, no write may fail. A hung chunk
//! server, though, is given up and its replicas rebuilt.

mod common;

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use ballast_cli::dev::DevCluster;
use common::writes::{assert_three_replicas, volume_under_writes};
use nix::sys::signal::{kill, Signal};
use nix::unistd::Pid;

const META: [&str; 3] = ["meta1", "meta2", "meta3"];

fn signal_all(cluster: &DevCluster, signal: Signal) {
    for name in META {
        kill(Pid::from_raw(cluster.process(name).pid as i32), signal).unwrap();
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_frozen_metadata_service_drops_no_replica_when_it_thaws_and_changes_leader() {
    // Repair passes every second; a server silent for 3 s counts as dead.
    std::env::set_var("BALLAST_META_REPAIR_INTERVAL", "1");
    std::env::set_var("BALLAST_META_REPAIR_AFTER", "3");
    let dir = tempfile::tempdir().unwrap();
    let cluster = DevCluster::start(dir.path(), 3, 4).await.unwrap();
    let meta = cluster.meta();
    let stop = Arc::new(AtomicBool::new(false));
    let (info, writer) = volume_under_writes(&meta, "frozen", stop.clone()).await;

    signal_all(&cluster, Signal::SIGSTOP);
    tokio::time::sleep(Duration::from_secs(10)).await;
    signal_all(&cluster, Signal::SIGCONT);
    // The leader goes right after the thaw: its successor judges liveness
    // from heartbeats stamped before the freeze.
    let leader = 'found: loop {
        for endpoint in &cluster.state.meta {
            if let Ok(status) = meta.member_status(endpoint).await {
                if status.leader_id != 0 {
                    break 'found status.leader_id;
                }
            }
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    cluster.kill(&format!("meta{leader}"));

    let watch = Instant::now() + Duration::from_secs(12);
    while Instant::now() < watch {
        assert_three_replicas(&meta, &info.id, "after the thaw").await;
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
    stop.store(true, Ordering::SeqCst);
    let (writes, _) = writer.await.unwrap();
    assert!(writes > 100, "the writer kept writing ({writes} writes)");
}

/// A hung chunk server (its process stopped: from outside, what a disk
/// stuck in D state looks like) accepts connections and never answers.
/// Writers give it up after their replica timeout; the repair loop must
/// give it up too and rebuild its replicas elsewhere, not wait on it for
/// ever (nor hang a publish).
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_hung_chunk_server_is_given_up_and_its_replicas_rebuilt() {
    std::env::set_var("BALLAST_META_REPAIR_INTERVAL", "1");
    std::env::set_var("BALLAST_META_REPAIR_AFTER", "3");
    let dir = tempfile::tempdir().unwrap();
    // One of five silent: fewer than half, so it may be given up.
    let cluster = DevCluster::start(dir.path(), 1, 5).await.unwrap();
    let meta = cluster.meta();
    let stop = Arc::new(AtomicBool::new(false));
    let (info, writer) = volume_under_writes(&meta, "hung", stop.clone()).await;
    let request = ballast_proto::meta::GetChunkMapRequest { volume_id: info.id.clone() };
    let victim_address = meta.get_chunk_map(request.clone()).await.unwrap().chunks[0].replicas[0].address.clone();
    let victim = cluster.state.processes.iter().find(|p| p.address == victim_address).unwrap();
    kill(Pid::from_raw(victim.pid as i32), Signal::SIGSTOP).unwrap();
    let hung = Instant::now();

    let deadline = hung + Duration::from_secs(90);
    loop {
        let map = meta.get_chunk_map(request.clone()).await.unwrap();
        let healed = map
            .chunks
            .iter()
            .all(|set| set.replicas.len() == 3 && set.replicas.iter().all(|r| r.address != victim_address));
        if healed {
            eprintln!("the hung server's replicas were rebuilt elsewhere {:?} after it hung", hung.elapsed());
            break;
        }
        assert!(Instant::now() < deadline, "not rebuilt within 90 s of the hang: {map:?}");
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
    stop.store(true, Ordering::SeqCst);
    // Each write that met the hung server first waited out the writer's
    // replica timeout; none failed.
    let (writes, _) = writer.await.unwrap();
    eprintln!("{writes} writes while the server hung");
    assert!(writes > 10, "the writer kept writing ({writes} writes)");

    // A publish (which fences every server) returns despite the hung one.
    let unpublish = ballast_proto::meta::UnpublishVolumeRequest { volume_id: info.id.clone(), node_id: "n1".into() };
    meta.unpublish_volume(unpublish).await.unwrap();
    let publish = ballast_proto::meta::PublishVolumeRequest {
        volume_id: info.id.clone(),
        node_id: "node-2".into(),
        readonly: false,
    };
    let published = tokio::time::timeout(Duration::from_secs(60), meta.publish_volume(publish)).await;
    assert!(matches!(published, Ok(Ok(_))), "publishing with a hung server: {published:?}");
}
