//! Reads and a slow replica: a chunk server held to a small share of a CPU
//! (an overloaded node) must not hold back the reads its peers can answer.

mod common;

use std::process::Command;

use ballast_cli::dev::DevCluster;
use ballast_testkit::cpu_limit::{self, CpuLimit};
use ballast_testkit::metrics::{scrape, sum};
use common::*;

const SERVERS: [&str; 3] = ["storage1", "storage2", "storage3"];
const SLOW: &str = "storage2";

/// Bytes each chunk server has read for clients so far.
fn bytes_read(cluster: &DevCluster) -> Vec<f64> {
    SERVERS
        .iter()
        .map(|name| {
            let address = cluster.metrics_address(name).expect("chunk servers export metrics");
            sum(&scrape(&address).unwrap(), "ballast_storage_read_bytes_total")
        })
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reads_go_around_a_replica_on_an_overloaded_node() {
    if !ballast_testkit::machine_has(&[ballast_testkit::ROOT, "fio", cpu_limit::control_file()]) {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let cluster = DevCluster::start(&dir.path().join("cluster"), 1, 3).await.unwrap();
    create_volume(&cluster, "reads", 32 * MIB, 3).await;
    let served = Served::start(&cluster, "reads", dir.path());
    let fio = |args: &[&str]| {
        ok(
            Command::new("fio")
                .args(["--name=job", "--ioengine=nbd", &format!("--uri={}", served.uri()), "--size=32M"])
                .args(args)
                .output()
                .unwrap(),
            "fio",
        )
    };
    // Every chunk written, so that every read reaches a server.
    fio(&["--rw=write", "--bs=1M", "--iodepth=4"]);

    let _slow = CpuLimit::apply(cluster.process(SLOW).pid, 2).unwrap();
    let before = bytes_read(&cluster);
    fio(&["--rw=randread", "--bs=4k", "--iodepth=16", "--io_size=16M"]);
    let after = bytes_read(&cluster);

    let served_by: Vec<f64> = after.iter().zip(&before).map(|(a, b)| a - b).collect();
    let total: f64 = served_by.iter().sum();
    println!("bytes read by {SERVERS:?}: {served_by:?}");
    assert!(total >= (16 * MIB) as f64, "the servers read {total} bytes for 16 MiB of reads: {served_by:?}");
    let slow = served_by[SERVERS.iter().position(|s| *s == SLOW).unwrap()];
    // Its peers answer in well under a millisecond; it answers in tens.
    assert!(
        slow < total / 20.0,
        "the replica held to 2% of a CPU served {slow} of {total} bytes read (by server: {served_by:?})"
    );
}
