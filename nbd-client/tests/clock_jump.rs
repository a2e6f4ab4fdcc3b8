//! The wall clock steps forward by two minutes on every machine of the
//! cluster (an NTP step, a VM restored from a snapshot) while a writer is
//! busy: every chunk server's last heartbeat now looks two minutes old, and
//! none of them may lose a replica for it. The daemons run under
//! libfaketime, which moves only the wall clock (never the monotonic one).
//!
//! Its own test binary: the preload reaches every process the test starts.

mod common;

use std::path::Path;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use ballast_cli::dev::DevCluster;
use common::writes::{assert_three_replicas, volume_under_writes};

const LIBFAKETIME: &str = "/usr/lib/x86_64-linux-gnu/faketime/libfaketimeMT.so.1";

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_wall_clock_step_drops_no_replica() {
    if !ballast_testkit::machine_has(&[LIBFAKETIME]) {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let offset_file = dir.path().join("faketime");
    std::fs::write(&offset_file, "+0\n").unwrap();
    // Repair passes every second; a server silent for 3 s counts as dead.
    std::env::set_var("BALLAST_META_REPAIR_INTERVAL", "1");
    std::env::set_var("BALLAST_META_REPAIR_AFTER", "3");
    std::env::set_var("LD_PRELOAD", LIBFAKETIME);
    std::env::set_var("FAKETIME_TIMESTAMP_FILE", &offset_file);
    std::env::set_var("FAKETIME_DONT_FAKE_MONOTONIC", "1");
    std::env::set_var("FAKETIME_NO_CACHE", "1");
    let cluster = DevCluster::start(&dir.path().join("cluster"), 3, 4).await.unwrap();
    for name in ["LD_PRELOAD", "FAKETIME_TIMESTAMP_FILE", "FAKETIME_DONT_FAKE_MONOTONIC", "FAKETIME_NO_CACHE"] {
        std::env::remove_var(name);
    }
    assert_preloaded(cluster.process("meta1").pid);

    let meta = cluster.meta();
    let stop = Arc::new(AtomicBool::new(false));
    let (info, writer) = volume_under_writes(&meta, "stepped", stop.clone()).await;
    tokio::time::sleep(Duration::from_secs(1)).await;
    std::fs::write(&offset_file, "+120s\n").unwrap();
    let watch = Instant::now() + Duration::from_secs(12);
    while Instant::now() < watch {
        assert_three_replicas(&meta, &info.id, "after the clock step").await;
        tokio::time::sleep(Duration::from_millis(300)).await;
    }
    stop.store(true, Ordering::SeqCst);
    let (writes, _) = writer.await.unwrap();
    assert!(writes > 100, "the writer kept writing ({writes} writes)");
}

/// The test means nothing unless the daemons really run under libfaketime.
fn assert_preloaded(pid: u32) {
    let maps = std::fs::read_to_string(Path::new("/proc").join(pid.to_string()).join("maps")).unwrap();
    assert!(maps.contains("libfaketime"), "meta1 (pid {pid}) does not run under libfaketime");
}
