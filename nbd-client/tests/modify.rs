//! Changing a live volume on a real local cluster: its replica count grows
//! and shrinks under a steady writer without losing a write, and its I/O
//! limits, measured with fio through the real `nbd-client serve`, change
//! while it is served.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

mod common;

use ballast_cli::dev::DevCluster;
use ballast_proto::frame::ChunkAt;
use ballast_proto::meta as pb;
use bytes::Bytes;
use meta_client::MetaClient;
use volume_engine::engine::FOLLOW_INTERVAL;
use volume_engine::volume_service::{self, OpenOptions};

use common::{Served, MIB};

const VOLUME: u64 = 8 * MIB;

async fn chunk_map(meta: &MetaClient, volume_id: &str) -> Vec<pb::ChunkReplicaSet> {
    meta.get_chunk_map(pb::GetChunkMapRequest { volume_id: volume_id.into() }).await.unwrap().chunks
}

async fn modify(meta: &MetaClient, id: &str, change: pb::ModifyVolumeRequest) -> pb::Volume {
    meta.modify_volume(pb::ModifyVolumeRequest { id: id.into(), ..change }).await.expect("ModifyVolume")
}

/// Polls until every chunk of the volume has `replicas` members.
async fn wait_for_replicas(meta: &MetaClient, volume_id: &str, replicas: usize, limit: Duration) {
    let started = Instant::now();
    loop {
        let map = chunk_map(meta, volume_id).await;
        if map.iter().all(|set| set.replicas.len() == replicas) {
            eprintln!("every chunk has {replicas} replicas after {:?}", started.elapsed());
            return;
        }
        assert!(started.elapsed() < limit, "not {replicas} replicas within {limit:?}: {map:?}");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

/// Every replica of every chunk, read from its server, holds `image`.
async fn assert_replicas_hold(cluster: &DevCluster, info: &pb::Volume, epoch: u64, image: &[u8]) {
    for set in chunk_map(&cluster.meta(), &info.id).await {
        let base = (set.chunk_index * MIB) as usize;
        for replica in &set.replicas {
            let client = cluster.chunk_servers().connect(&replica.address).await.unwrap();
            let (data, _) = client
                .read(
                    ChunkAt { volume: info.data_id, chunk: set.chunk_index, offset: 0, epoch, generation: 0 },
                    MIB as u32,
                )
                .await
                .unwrap();
            assert!(
                data[..] == image[base..base + MIB as usize],
                "chunk {} on {} differs from what was written",
                set.chunk_index,
                replica.server_id
            );
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn replicas_grow_and_shrink_on_a_live_volume_without_losing_a_write() {
    std::env::set_var("BALLAST_META_REPAIR_INTERVAL", "1");
    let dir = tempfile::tempdir().unwrap();
    let cluster = DevCluster::start(dir.path(), 3, 4).await.unwrap();
    let meta = cluster.meta();
    let request = pb::CreateVolumeRequest {
        name: "modified".into(),
        size_bytes: VOLUME,
        replicas: 2,
        chunk_size_bytes: MIB,
        ..Default::default()
    };
    let info = meta.create_volume(request).await.unwrap();
    let options = OpenOptions {
        epoch: None,
        node_id: "n1".into(),
        readonly: false,
        min_replicas: 2,
        replica_timeout: Duration::from_secs(5),
    };
    let opened = volume_service::open(&meta, &info.id, &options).await.unwrap();
    let (volume, epoch) = (opened.volume.clone(), opened.volume.epoch());
    let initial: Vec<u8> = (0..VOLUME).map(|i| (i * 31 % 251) as u8).collect();
    volume.write_at(0, Bytes::from(initial.clone()), true).await.unwrap();
    let image = Arc::new(Mutex::new(initial));
    let stop = Arc::new(AtomicBool::new(false));
    let writer = {
        let (volume, image, stop) = (volume.clone(), image.clone(), stop.clone());
        tokio::spawn(async move {
            let mut n = 0u64;
            while !stop.load(Ordering::SeqCst) {
                n += 1;
                let offset = (n * 7 % (VOLUME / 4096)) * 4096;
                let data = vec![n as u8; 4096];
                volume.write_at(offset, Bytes::from(data.clone()), false).await.expect("write while modified");
                image.lock().unwrap()[offset as usize..offset as usize + 4096].copy_from_slice(&data);
                tokio::time::sleep(Duration::from_millis(5)).await;
            }
            n
        })
    };

    // 2 → 3: the repair loop builds a third copy of every chunk while the
    // writer goes on; the serving engine follows the new count.
    let grown = modify(&meta, &info.id, pb::ModifyVolumeRequest { replicas: Some(3), ..Default::default() }).await;
    assert_eq!(grown.replicas, 3);
    wait_for_replicas(&meta, &info.id, 3, Duration::from_secs(60)).await;
    tokio::time::sleep(Duration::from_secs(1)).await;

    // 3 → 2: one copy of each chunk goes at once; the writer, still
    // holding the 3-member sets, carries on.
    let before = chunk_map(&meta, &info.id).await;
    modify(&meta, &info.id, pb::ModifyVolumeRequest { replicas: Some(2), ..Default::default() }).await;
    let after = chunk_map(&meta, &info.id).await;
    for (old, new) in before.iter().zip(&after) {
        assert_eq!(new.replicas.len(), 2, "{new:?}");
        assert!(new.generation > old.generation);
    }
    tokio::time::sleep(Duration::from_secs(2)).await;
    stop.store(true, Ordering::SeqCst);
    let writes = writer.await.unwrap();
    assert!(writes > 100, "the writer kept writing ({writes} writes)");
    volume.flush().await.unwrap();

    let image = image.lock().unwrap().clone();
    assert_replicas_hold(&cluster, &info, epoch, &image).await;
    let read = volume.read_at(0, VOLUME).await.unwrap();
    assert_eq!(read.iter().zip(&image).position(|(a, b)| a != b), None, "the volume reads back what was written");

    // The dropped copies are orphans their servers delete: two per chunk
    // remain in the whole cluster.
    let started = Instant::now();
    loop {
        let held: usize = common::held(&cluster).await.iter().map(|(_, n)| n).sum();
        if held == 2 * after.len() {
            break;
        }
        assert!(started.elapsed() < Duration::from_secs(60), "{held} chunk copies left, not {}", 2 * after.len());
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
    opened.unpublish(&meta).await;
}

/// fio through the served volume for two seconds: (IOPS, bytes per second).
fn fio(served: &Served, rw: &str, block_size: &str) -> (f64, f64) {
    let output = std::process::Command::new("fio")
        .args(["--name=limits", "--ioengine=nbd", "--direct=1", "--iodepth=8", "--time_based", "--runtime=2"])
        .arg(format!("--uri={}", served.uri()))
        .arg(format!("--rw={rw}"))
        .arg(format!("--bs={block_size}"))
        .arg("--output-format=json")
        .output()
        .expect("running fio");
    let report = common::ok(output, "fio");
    let json: serde_json::Value = serde_json::from_str(&report[report.find('{').unwrap()..]).unwrap();
    let job = &json["jobs"][0][if rw.contains("read") { "read" } else { "write" }];
    (job["iops"].as_f64().unwrap(), job["bw_bytes"].as_f64().unwrap())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn io_limits_hold_and_change_while_the_volume_is_served() {
    if !ballast_testkit::machine_has(&["fio"]) {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let cluster = DevCluster::start(dir.path(), 3, 3).await.unwrap();
    let meta = cluster.meta();
    let request = pb::CreateVolumeRequest {
        name: "limited".into(),
        size_bytes: 64 * MIB,
        limits: Some(pb::IoLimits { max_iops: 100, max_bandwidth_bytes: 0 }),
        ..Default::default()
    };
    let info = meta.create_volume(request).await.unwrap();
    let served = Served::start(&cluster, &info.id, dir.path());
    // Never-written chunks read as zeros without a network round trip:
    // only the limits slow these reads.
    let (limited, _) = fio(&served, "randread", "4k");
    eprintln!("100 IOPS allowed: {limited:.0} measured");
    assert!(limited <= 115.0, "{limited} IOPS over a limit of 100");

    modify(&meta, &info.id, pb::ModifyVolumeRequest { max_iops: Some(500), ..Default::default() }).await;
    tokio::time::sleep(FOLLOW_INTERVAL + Duration::from_secs(1)).await;
    let (raised, _) = fio(&served, "randread", "4k");
    eprintln!("500 IOPS allowed: {raised:.0} measured");
    assert!((300.0..=575.0).contains(&raised), "{raised} IOPS under a limit of 500");

    let bandwidth = 2 * MIB;
    let change =
        pb::ModifyVolumeRequest { max_iops: Some(0), max_bandwidth_bytes: Some(bandwidth), ..Default::default() };
    modify(&meta, &info.id, change).await;
    tokio::time::sleep(FOLLOW_INTERVAL + Duration::from_secs(1)).await;
    let (_, bytes) = fio(&served, "randread", "64k");
    eprintln!("{bandwidth} bytes/s allowed: {bytes:.0} measured");
    assert!(bytes <= 1.15 * bandwidth as f64, "{bytes} bytes/s over a limit of {bandwidth}");

    modify(&meta, &info.id, pb::ModifyVolumeRequest { max_bandwidth_bytes: Some(0), ..Default::default() }).await;
    tokio::time::sleep(FOLLOW_INTERVAL + Duration::from_secs(1)).await;
    let (free, _) = fio(&served, "randread", "4k");
    eprintln!("no limit: {free:.0} IOPS");
    assert!(free > 1000.0, "only {free} IOPS with the limits lifted");
}
