//! Crash safety of the real binary: SIGKILL in the middle of a write load,
//! restart on the same data directory, and check what reads back.
//!
//! Each connection writes its own chunk (in its own volume) sequentially,
//! with occasional FUA writes and periodic flushes, and keeps the history
//! of every block. After the restart, for every block:
//! - data that reads back is one of the versions written to it, never older
//!   than the last durable one (acknowledged with FUA or before an
//!   acknowledged flush);
//! - a block may fail with `CorruptBlock` only if it was written after its
//!   last durable version, and then its region is listed as recovered;
//! - every region written after the connection's last acknowledged flush is
//!   listed by `DIRTY_REGIONS`.

mod common;

use std::collections::BTreeSet;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use ballast_proto::frame::{ChunkAt, DataClient, ErrorCode};
use bytes::Bytes;
use common::{pattern, write, Binary, BLOCK};
use rand::{Rng, SeedableRng};

const CONNECTIONS: u64 = 4;
const CHUNK_BLOCKS: u64 = 2048;
const REGION_BLOCKS: u64 = 1024;

/// What one connection did before the server died.
#[derive(Default)]
struct History {
    /// Per block: tags written, in order (tag 0 = the initial zeros).
    versions: Vec<Vec<u64>>,
    /// Per block: index of the latest acknowledged version.
    acked: Vec<usize>,
    /// Per block: index of the latest durable version.
    durable: Vec<usize>,
    /// Regions with acknowledged writes since the last acknowledged flush.
    unflushed_regions: BTreeSet<u64>,
    /// A flush was outstanding when the connection died.
    flush_in_flight: bool,
    acked_writes: u64,
}

impl History {
    fn new() -> History {
        History {
            versions: vec![vec![0]; CHUNK_BLOCKS as usize],
            acked: vec![0; CHUNK_BLOCKS as usize],
            durable: vec![0; CHUNK_BLOCKS as usize],
            ..History::default()
        }
    }
}

fn block_content(tag: u64, block: u64) -> Bytes {
    if tag == 0 {
        Bytes::from(vec![0u8; BLOCK as usize])
    } else {
        pattern(tag, block, 1)
    }
}

/// Writes and flushes until the connection fails.
async fn load(client: DataClient, volume: u64, seed: u64, acked_total: Arc<AtomicU64>) -> History {
    let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
    let mut h = History::new();
    let mut next_tag = (volume << 32) + 1;
    let mut since_flush = 0;
    loop {
        if since_flush >= rng.random_range(8..30) {
            h.flush_in_flight = true;
            if client.flush(Some(volume)).await.is_err() {
                return h;
            }
            h.flush_in_flight = false;
            since_flush = 0;
            h.durable.clone_from(&h.acked);
            h.unflushed_regions.clear();
            continue;
        }
        let len = if rng.random_bool(0.1) { 64 } else { rng.random_range(1..=8) };
        let first = rng.random_range(0..=CHUNK_BLOCKS - len);
        let fua = rng.random_bool(0.1);
        let tag = next_tag;
        next_tag += 1;
        let data = pattern(tag, first, len as usize);
        for b in first..first + len {
            h.versions[b as usize].push(tag);
        }
        if write(&client, volume, 0, first * BLOCK, data, 1, fua).await.is_err() {
            return h;
        }
        for b in first..first + len {
            let latest = h.versions[b as usize].len() - 1;
            h.acked[b as usize] = latest;
            if fua {
                h.durable[b as usize] = latest;
            }
            h.unflushed_regions.insert(b / REGION_BLOCKS);
        }
        h.acked_writes += 1;
        since_flush += 1;
        acked_total.fetch_add(1, Ordering::Relaxed);
    }
}

/// Reads every block of a chunk: `Ok(data)` or the error code.
async fn read_all(client: &DataClient, volume: u64) -> Vec<Result<Bytes, ErrorCode>> {
    const STEP: u64 = 64;
    let mut out = Vec::with_capacity(CHUNK_BLOCKS as usize);
    for first in (0..CHUNK_BLOCKS).step_by(STEP as usize) {
        match client
            .read(ChunkAt { volume, chunk: 0, offset: first * BLOCK, epoch: 1, generation: 0 }, (STEP * BLOCK) as u32)
            .await
        {
            Ok((data, _)) => {
                out.extend((0..STEP as usize).map(|i| Ok(data.slice(i * BLOCK as usize..(i + 1) * BLOCK as usize))))
            }
            Err(e) if e.code() == Some(ErrorCode::CorruptBlock) => {
                for b in first..first + STEP {
                    out.push(
                        client
                            .read(
                                ChunkAt { volume, chunk: 0, offset: b * BLOCK, epoch: 1, generation: 0 },
                                BLOCK as u32,
                            )
                            .await
                            .map(|(d, _)| d)
                            .map_err(|e| e.code().unwrap_or_else(|| panic!("{e}"))),
                    );
                }
            }
            Err(e) => panic!("reading volume {volume} block {first}: {e}"),
        }
    }
    out
}

async fn crash_mid_load(backend: &str) {
    let dir = tempfile::tempdir().unwrap();
    let mut server = Binary::start(dir.path(), &["--io-backend", backend]);
    let setup = DataClient::connect_tcp(server.tcp).await.unwrap();
    for volume in 1..=CONNECTIONS {
        setup.create_chunk(volume, 0, (CHUNK_BLOCKS * BLOCK) as u32, 1).await.unwrap();
    }
    let acked = Arc::new(AtomicU64::new(0));
    let mut loads = Vec::new();
    for volume in 1..=CONNECTIONS {
        let client = DataClient::connect_tcp(server.tcp).await.unwrap();
        loads.push(tokio::spawn(load(client, volume, 0x5eed + volume, acked.clone())));
    }
    let started = Instant::now();
    while acked.load(Ordering::Relaxed) < 600 && started.elapsed() < Duration::from_secs(20) {
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    server.kill();
    let mut histories = Vec::new();
    for l in loads {
        histories.push(l.await.unwrap());
    }
    assert!(acked.load(Ordering::Relaxed) >= 600, "the load ran");

    let server = Binary::start(dir.path(), &["--io-backend", backend]);
    let client = DataClient::connect_tcp(server.tcp).await.unwrap();
    let regions = client.dirty_regions(None).await.unwrap();
    assert!(regions.iter().all(|r| r.is_recovered()), "{regions:?}");
    let listed: BTreeSet<(u64, u64)> = regions.iter().map(|r| (r.volume, r.offset / BLOCK / REGION_BLOCKS)).collect();

    let (mut corrupt, mut newer, mut exact) = (0, 0, 0);
    for (i, h) in histories.iter().enumerate() {
        let volume = i as u64 + 1;
        let got = read_all(&client, volume).await;
        for (b, result) in got.into_iter().enumerate() {
            let versions = &h.versions[b];
            let durable = h.durable[b];
            let region = (volume, b as u64 / REGION_BLOCKS);
            match result {
                Ok(data) => {
                    let found = versions
                        .iter()
                        .rposition(|&tag| block_content(tag, b as u64) == data)
                        .unwrap_or_else(|| panic!("volume {volume} block {b}: data matches no version written"));
                    assert!(
                        found >= durable,
                        "volume {volume} block {b}: durable version {durable} lost, read version {found}"
                    );
                    if found > durable {
                        newer += 1;
                    } else {
                        exact += 1;
                    }
                }
                Err(ErrorCode::CorruptBlock) => {
                    corrupt += 1;
                    assert!(versions.len() - 1 > durable, "volume {volume} block {b}: durable data reported corrupt");
                    assert!(listed.contains(&region), "volume {volume} block {b}: corrupt but region not listed");
                }
                Err(code) => panic!("volume {volume} block {b}: {code}"),
            }
        }
        if !h.flush_in_flight {
            for r in &h.unflushed_regions {
                assert!(
                    listed.contains(&(volume, *r)),
                    "volume {volume} region {r} written since the last flush but not listed"
                );
            }
        }
    }
    eprintln!(
        "{backend}: {} writes acknowledged; after restart {exact} blocks at their durable version, \
         {newer} newer, {corrupt} reported corrupt; {} regions listed",
        acked.load(Ordering::Relaxed),
        listed.len()
    );

    // Once resynced, recovered regions are cleared by the client.
    for volume in 1..=CONNECTIONS {
        let left = client.clear_dirty_regions(volume, 0, 0, 0).await.unwrap();
        assert!(left.is_empty(), "{left:?}");
    }
    assert!(client.dirty_regions(None).await.unwrap().is_empty());
    drop(server);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn crash_mid_load_uring() {
    crash_mid_load("uring").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn crash_mid_load_threadpool() {
    crash_mid_load("threadpool").await;
}

/// SIGTERM: in-flight writes finish, everything is flushed, the log is
/// clean, and the restarted server has every acknowledged write.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_flushes_and_exits_cleanly() {
    let dir = tempfile::tempdir().unwrap();
    let mut server = Binary::start(dir.path(), &[]);
    let client = DataClient::connect_tcp(server.tcp).await.unwrap();
    client.create_chunk(1, 0, 1 << 20, 1).await.unwrap();
    for b in 0..32 {
        write(&client, 1, 0, b * 8 * BLOCK, pattern(b + 1, b * 8, 8), 1, false).await.unwrap();
    }
    assert!(!client.dirty_regions(None).await.unwrap().is_empty());
    let status = tokio::task::spawn_blocking(move || {
        let status = server.terminate();
        drop(server);
        status
    })
    .await
    .unwrap();
    assert!(status.success(), "{status}");

    let server = Binary::start(dir.path(), &[]);
    let client = DataClient::connect_tcp(server.tcp).await.unwrap();
    assert!(client.dirty_regions(None).await.unwrap().is_empty(), "clean shutdown leaves no dirty regions");
    for b in 0..32 {
        let (data, _) = client
            .read(ChunkAt { volume: 1, chunk: 0, offset: b * 8 * BLOCK, epoch: 1, generation: 1 }, (8 * BLOCK) as u32)
            .await
            .unwrap();
        assert_eq!(data, pattern(b + 1, b * 8, 8));
    }
}
