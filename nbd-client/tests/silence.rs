//! A silent server is not a dead server. When the metadata service is the
//! one that stopped hearing, the chunk servers are fine, and dropping their
//! replicas for silence would cut every chunk down towards one copy. Here
//! the whole metadata service is frozen (SIGSTOP) well past the repair
//! delay while a writer keeps going, and its leader is killed right after
//! the thaw: no replica may be dropped, no write may fail.

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
    let writes = writer.await.unwrap();
    assert!(writes > 100, "the writer kept writing ({writes} writes)");
}
