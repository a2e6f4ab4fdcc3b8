//! CreateVolume load against a fresh 3-member cluster on loopback: prints
//! throughput and latency percentiles per concurrency level.
//!
//! `cargo run --release -p meta-raft --example create_volumes -- [COUNT]`
//! (run `cargo build --release -p meta-raft` first: it starts that binary).

use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant};

use ballast_proto::meta as pb;
use ballast_testkit::meta_cluster::LocalMetaCluster;

fn percentile(sorted: &[Duration], p: f64) -> Duration {
    sorted[((sorted.len() as f64 - 1.0) * p).round() as usize]
}

#[tokio::main]
async fn main() {
    let count: usize = std::env::args().nth(1).and_then(|s| s.parse().ok()).unwrap_or(2000);
    let binary = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../target/release/meta-raft");
    assert!(binary.exists(), "build it first: cargo build --release -p meta-raft");
    let dir = tempfile::tempdir().expect("temp dir");
    let cluster = LocalMetaCluster::start(&binary, dir.path(), 3, &[]).await;
    let client = cluster.client();

    println!("| concurrency | creates | creates/s | p50 ms | p99 ms |");
    println!("|---:|---:|---:|---:|---:|");
    for (round, concurrency) in [1usize, 8, 32, 128].into_iter().enumerate() {
        let latencies = Arc::new(std::sync::Mutex::new(Vec::with_capacity(count)));
        let started = Instant::now();
        let workers: Vec<_> = (0..concurrency)
            .map(|w| {
                let client = client.clone();
                let latencies = latencies.clone();
                tokio::spawn(async move {
                    for i in (w..count).step_by(concurrency) {
                        let request = pb::CreateVolumeRequest {
                            name: format!("bench-{round}-{i}"),
                            size_bytes: 1 << 30,
                            ..Default::default()
                        };
                        let t = Instant::now();
                        client.create_volume(request).await.expect("create");
                        latencies.lock().unwrap().push(t.elapsed());
                    }
                })
            })
            .collect();
        for w in workers {
            w.await.unwrap();
        }
        let elapsed = started.elapsed();
        let mut l = latencies.lock().unwrap().clone();
        l.sort();
        println!(
            "| {concurrency} | {} | {:.0} | {:.2} | {:.2} |",
            l.len(),
            l.len() as f64 / elapsed.as_secs_f64(),
            percentile(&l, 0.5).as_secs_f64() * 1e3,
            percentile(&l, 0.99).as_secs_f64() * 1e3
        );
    }
}
