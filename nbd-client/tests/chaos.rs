//! Chaos: fio writes and verifies (crc32c) a 3-replica volume, round after
//! round, while faults follow one another: a chunk server killed -9 and
//! restarted, the metadata leader killed -9 and restarted, the whole
//! metadata service frozen past the repair delay, and one chunk server cut
//! off from metadata and healed. At the end every fault is healed and the
//! test waits for the replica sets to be whole again, then prints one table
//! and fails unless nothing was lost: no verify error, no I/O error, no
//! chunk left degraded.
//!
//! Long (`BALLAST_CHAOS_SECONDS`, default 300): ignored by the default run;
//! `make chaos` runs it.

mod common;

use std::collections::BTreeMap;
use std::process::Command;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use ballast_cli::dev::{DevCluster, Host, Layout};
use ballast_proto::meta as pb;
use ballast_testkit::metrics;
use ballast_testkit::netns::Network;
use common::{create_volume, Served, MIB};
use nix::sys::signal::{kill, Signal};
use nix::unistd::Pid;

const VOLUME: u64 = 64 * MIB;
/// Repair passes every second and gives a server up after 5 s of silence.
const REPAIR_AFTER: Duration = Duration::from_secs(5);
const META: [&str; 3] = ["meta1", "meta2", "meta3"];
/// Chunk servers killed in turn (storage1 is the one cut off).
const KILLED: [&str; 3] = ["storage2", "storage3", "storage4"];

/// What fio saw over all its rounds.
#[derive(Default)]
struct FioTotals {
    rounds: u32,
    verify_errors: u64,
    io_errors: u64,
    longest_io: Duration,
}

/// One fio pass over the whole volume: random 4 KiB writes, then every
/// block read back and checked. Errors are counted, not fatal.
fn fio_round(uri: &str, totals: &mut FioTotals) {
    let output = Command::new("fio")
        .args(["--name=chaos", "--ioengine=nbd", &format!("--uri={uri}"), "--rw=randwrite", "--bs=4k"])
        .args(["--iodepth=16", &format!("--size={VOLUME}"), "--verify=crc32c", "--do_verify=1"])
        .args(["--verify_state_save=0", "--continue_on_error=all", "--output-format=json"])
        .output()
        .expect("running fio");
    let stdout = String::from_utf8_lossy(&output.stdout);
    let stderr = String::from_utf8_lossy(&output.stderr);
    let verify_errors =
        stderr.lines().filter(|l| l.starts_with("verify:") || l.contains("verify failed")).count() as u64;
    let Some(report) = stdout.find('{').and_then(|at| serde_json::from_str::<serde_json::Value>(&stdout[at..]).ok())
    else {
        panic!("fio gave no report: {stderr}");
    };
    let job = &report["jobs"][0];
    let errors = job["total_err"].as_u64().unwrap_or(0).max(u64::from(job["error"].as_u64().unwrap_or(0) != 0));
    totals.rounds += 1;
    totals.verify_errors += verify_errors;
    totals.io_errors += errors.saturating_sub(verify_errors);
    for direction in ["write", "read"] {
        let longest = Duration::from_nanos(job[direction]["clat_ns"]["max"].as_u64().unwrap_or(0));
        totals.longest_io = totals.longest_io.max(longest);
    }
    if verify_errors > 0 || errors > 0 {
        eprintln!("fio round {}: {verify_errors} verify errors, {errors} errors\n{stderr}", totals.rounds);
    }
}

/// Bytes the metadata members copied to repair replicas, summed over
/// samples: a restarted member's counter starts again from zero.
#[derive(Default)]
struct CopiedBytes {
    last: BTreeMap<&'static str, f64>,
    total: f64,
}

impl CopiedBytes {
    fn sample(&mut self, cluster: &DevCluster) {
        for member in META {
            let Some(address) = cluster.metrics_address(member) else { continue };
            let Ok(text) = tokio::task::block_in_place(|| metrics::scrape(&address)) else { continue };
            let now = metrics::sum(&text, "ballast_meta_copied_bytes_total");
            let last = self.last.insert(member, now).unwrap_or(0.0);
            self.total += if now >= last { now - last } else { now };
        }
    }
}

fn signal(cluster: &DevCluster, name: &str, signal: Signal) {
    kill(Pid::from_raw(cluster.process(name).pid as i32), signal).unwrap();
}

async fn leader(cluster: &DevCluster) -> String {
    let meta = cluster.meta();
    loop {
        for endpoint in &cluster.state.meta {
            if let Ok(status) = meta.member_status(endpoint).await {
                if status.leader_id != 0 {
                    return format!("meta{}", status.leader_id);
                }
            }
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// Chunk sets of the volume with fewer than 3 replicas (none if metadata
/// does not answer).
async fn degraded(cluster: &DevCluster, volume_id: &str) -> usize {
    let request = pb::GetChunkMapRequest { volume_id: volume_id.into() };
    match tokio::time::timeout(Duration::from_secs(3), cluster.meta().get_chunk_map(request)).await {
        Ok(Ok(map)) => map.chunks.iter().filter(|s| s.replicas.len() < 3).count(),
        _ => usize::MAX,
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
#[ignore = "takes minutes: make chaos"]
async fn fio_verifies_through_kills_freezes_and_partitions() {
    if !ballast_testkit::machine_has(&[ballast_testkit::ROOT, "ip", "fio"]) {
        return;
    }
    let seconds = std::env::var("BALLAST_CHAOS_SECONDS").ok().and_then(|s| s.parse().ok()).unwrap_or(300);
    std::env::set_var("BALLAST_META_REPAIR_INTERVAL", "1");
    std::env::set_var("BALLAST_META_REPAIR_AFTER", REPAIR_AFTER.as_secs().to_string());
    let network = Network::create(&["meta", "lone", "storage"]);
    let host = |group: &str| Host { netns: Some(network.namespace(group)), ip: network.address(group).into() };
    let layout = Layout { meta: host("meta"), storage: vec![host("lone"), host("storage")] };
    let dir = tempfile::tempdir().unwrap();
    let mut cluster = DevCluster::start_in(&dir.path().join("cluster"), 3, 4, layout).await.unwrap();
    let volume = create_volume(&cluster, "chaos", VOLUME, 3).await;
    let served = Served::start(&cluster, "chaos", dir.path());

    let deadline = Instant::now() + Duration::from_secs(seconds);
    let stop = Arc::new(AtomicBool::new(false));
    let fio = {
        let (uri, stop) = (served.uri(), stop.clone());
        std::thread::spawn(move || {
            let mut totals = FioTotals::default();
            while !stop.load(Ordering::SeqCst) {
                fio_round(&uri, &mut totals);
            }
            totals
        })
    };

    let mut faults: BTreeMap<&str, u32> = BTreeMap::new();
    let mut copied = CopiedBytes::default();
    let mut turn = 0usize;
    while Instant::now() < deadline {
        let fault = match turn % 4 {
            0 => {
                let name = KILLED[turn / 4 % KILLED.len()];
                cluster.kill(name);
                tokio::time::sleep(Duration::from_secs(3)).await;
                cluster.restart(name).unwrap();
                "chunk server killed -9, restarted after 3 s"
            }
            1 => {
                let name = leader(&cluster).await;
                cluster.kill(&name);
                tokio::time::sleep(Duration::from_secs(2)).await;
                cluster.restart(&name).unwrap();
                "metadata leader killed -9, restarted after 2 s"
            }
            2 => {
                META.iter().for_each(|m| signal(&cluster, m, Signal::SIGSTOP));
                tokio::time::sleep(REPAIR_AFTER * 2).await;
                META.iter().for_each(|m| signal(&cluster, m, Signal::SIGCONT));
                "metadata frozen (SIGSTOP) for twice the repair delay"
            }
            _ => {
                network.cut("meta", "lone");
                tokio::time::sleep(REPAIR_AFTER * 2).await;
                network.heal("meta", "lone");
                "chunk server cut off from metadata for twice the repair delay"
            }
        };
        *faults.entry(fault).or_default() += 1;
        turn += 1;
        // Let the cluster notice and repair before the next fault.
        for _ in 0..8 {
            tokio::time::sleep(Duration::from_secs(1)).await;
            copied.sample(&cluster);
        }
    }
    stop.store(true, Ordering::SeqCst);
    let fio = fio.join().expect("fio rounds");

    let healing = Instant::now() + Duration::from_secs(120);
    let mut left = degraded(&cluster, &volume.id).await;
    while left > 0 && Instant::now() < healing {
        tokio::time::sleep(Duration::from_secs(1)).await;
        left = degraded(&cluster, &volume.id).await;
    }
    copied.sample(&cluster);

    println!("\nchaos: {seconds} s, {} fio rounds over a {} MiB 3-replica volume", fio.rounds, VOLUME / MIB);
    println!("{:<66} {:>8}", "faults injected", "count");
    for (fault, count) in &faults {
        println!("  {fault:<64} {count:>8}");
    }
    let rows = [
        ("verify errors (goal 0)", fio.verify_errors.to_string()),
        ("I/O errors (goal 0)", fio.io_errors.to_string()),
        ("longest I/O", format!("{:.1} s", fio.longest_io.as_secs_f64())),
        ("degraded chunks left after healing (goal 0)", left.to_string()),
        ("MiB copied to repair replicas (rebuilds, resyncs)", format!("{:.1}", copied.total / MIB as f64)),
    ];
    for (what, value) in rows {
        println!("{what:<66} {value:>8}");
    }
    assert!(fio.rounds > 0, "fio never finished a round");
    assert_eq!((fio.verify_errors, fio.io_errors), (0, 0), "fio saw errors (verify, I/O)");
    assert_eq!(left, 0, "chunks still degraded 120 s after the last fault");
}
