//! The operations behind crash-consistent snapshots, over real sockets on
//! both I/O backends: `CHUNK_CLONE`, `VOLUME_PAUSE` and `VOLUME_RESUME`.
//!
//! Timing checks here ("still pending after 300 ms") are protocol checks: a
//! change to a paused volume must not complete at all until the pause ends.

mod common;

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use ballast_proto::frame::{block_checksums, ChunkAt, ChunkEntry, ClientError, DataClient, ErrorCode};
use bytes::Bytes;
use common::{code, pattern, read_data, write, Binary, TestServer, BLOCK};
use storage_server::BackendChoice;
use tokio::task::JoinHandle;
use tokio::time::{sleep, timeout, Instant};

const MIB: u64 = 1 << 20;
const VOL: u64 = 0xabc;
const OTHER: u64 = 0xdef;
const SNAP: u64 = 0x5_0000;
/// Bound on anything that should happen promptly (a hang fails the test).
const PROMPT: Duration = Duration::from_secs(20);

async fn prompt<T>(what: &str, fut: impl std::future::Future<Output = T>) -> T {
    timeout(PROMPT, fut).await.unwrap_or_else(|_| panic!("{what} did not complete within {PROMPT:?}"))
}

/// The whole chunk, read in 1 MiB pieces; the client verifies every block
/// against the checksums the server sent, and those are checked against the
/// data again here.
async fn read_all(c: &DataClient, volume: u64, chunk: u64, size: u64) -> (Vec<u8>, Vec<u32>) {
    let (mut data, mut crcs) = (Vec::new(), Vec::new());
    let mut at = 0;
    while at < size {
        let len = MIB.min(size - at);
        let (d, k) = c.read(ChunkAt { volume, chunk, offset: at, epoch: 1, generation: 0 }, len as u32).await.unwrap();
        assert_eq!(k, block_checksums(&d));
        data.extend_from_slice(&d);
        crcs.extend(k);
        at += len;
    }
    (data, crcs)
}

fn spawn_write(
    c: &DataClient,
    volume: u64,
    chunk: u64,
    offset: u64,
    data: Bytes,
) -> JoinHandle<Result<(), ClientError>> {
    let c = c.clone();
    tokio::spawn(async move { write(&c, volume, chunk, offset, data, 0, false).await })
}

/// Lets a task run for `wait` and checks it has not finished.
async fn still_pending<T>(task: &JoinHandle<T>, wait: Duration, what: &str) {
    sleep(wait).await;
    assert!(!task.is_finished(), "{what} completed while the volume was paused");
}

async fn clone_round_trip(backend: BackendChoice) {
    let mut t = TestServer::start(backend).await;
    let c = t.client.clone();
    let size = 4 * MIB;
    c.create_chunk(VOL, 0, size as u32, 1).await.unwrap();
    write(&c, VOL, 0, 0, pattern(1, 0, 64), 0, false).await.unwrap();
    write(&c, VOL, 0, MIB, pattern(2, 256, 256), 0, false).await.unwrap();
    c.trim(ChunkAt { volume: VOL, chunk: 0, offset: 8 * BLOCK, epoch: 0, generation: 1 }, 8 * BLOCK as u32, false)
        .await
        .unwrap();
    // Nothing flushed: the clone must flush the source's checksum table itself.
    let (source, source_crcs) = read_all(&c, VOL, 0, size).await;

    c.clone_chunk(VOL, 0, SNAP, 0, 7).await.unwrap();
    let (copy, copy_crcs) = read_all(&c, SNAP, 0, size).await;
    assert!(copy == source, "the clone holds the source's data");
    assert_eq!(copy_crcs, source_crcs);
    let info = c.chunk_info(SNAP, 0).await.unwrap();
    assert_eq!((info.size, info.generation, info.blocks_bad, info.dirty_regions), (size, 7, 0, 0));
    assert_eq!(
        c.list_chunks(Some(SNAP)).await.unwrap(),
        vec![ChunkEntry { volume: SNAP, chunk: 0, size, generation: 7 }]
    );
    assert_eq!(c.list_chunks(Some(VOL)).await.unwrap().len(), 1);
    assert!(t.chunk_file(SNAP, 0).exists());
    assert!(!t.chunk_file(SNAP, 0).with_extension("tmp").exists());

    // From here on the two are independent.
    write(&c, VOL, 0, 0, pattern(3, 0, 4), 0, false).await.unwrap();
    let crcs = block_checksums(&pattern(4, 512, 4));
    c.write(
        ChunkAt { volume: SNAP, chunk: 0, offset: 2 * MIB, epoch: 0, generation: 7 },
        pattern(4, 512, 4),
        &crcs,
        false,
    )
    .await
    .unwrap();
    assert_eq!(
        read_data(&c, ChunkAt { volume: SNAP, chunk: 0, offset: 0, epoch: 1, generation: 0 }, 4 * BLOCK as u32).await,
        pattern(1, 0, 4)
    );
    assert!(read_data(
        &c,
        ChunkAt { volume: VOL, chunk: 0, offset: 2 * MIB, epoch: 1, generation: 0 },
        4 * BLOCK as u32
    )
    .await
    .iter()
    .all(|&b| b == 0));
    let mut expected = source.clone();
    expected[2 * MIB as usize..2 * MIB as usize + 4 * BLOCK as usize].copy_from_slice(&pattern(4, 512, 4));
    // Changes to the clone carry its own generation.
    let crcs1 = block_checksums(&pattern(4, 0, 1));
    assert_eq!(
        code(
            c.write(
                ChunkAt { volume: SNAP, chunk: 0, offset: 0, epoch: 0, generation: 1 },
                pattern(4, 0, 1),
                &crcs1,
                false
            )
            .await
        ),
        ErrorCode::StaleGeneration
    );

    // Errors: a missing source, an existing target (also the source itself).
    assert_eq!(code(c.clone_chunk(VOL, 9, SNAP, 9, 1).await), ErrorCode::NoSuchChunk);
    assert_eq!(code(c.clone_chunk(VOL, 0, SNAP, 0, 1).await), ErrorCode::ChunkExists);
    assert_eq!(code(c.clone_chunk(VOL, 0, VOL, 0, 1).await), ErrorCode::ChunkExists);
    assert_eq!(code(c.chunk_info(SNAP, 9).await), ErrorCode::NoSuchChunk);

    // The clone survives a restart, with its generation, and scrubs clean.
    t.restart().await;
    let c = t.client.clone();
    let (again, _) = read_all(&c, SNAP, 0, size).await;
    assert!(again == expected, "the clone reads back the same after a restart");
    assert_eq!(c.chunk_info(SNAP, 0).await.unwrap().generation, 7);
    assert!(c.scrub(Some(SNAP)).await.unwrap().bad.is_empty());
    assert_eq!(
        read_data(&c, ChunkAt { volume: VOL, chunk: 0, offset: 0, epoch: 1, generation: 0 }, 4 * BLOCK as u32).await,
        pattern(3, 0, 4)
    );
    // A clone of a clone, after the restart.
    c.clone_chunk(SNAP, 0, SNAP + 1, 0, 1).await.unwrap();
    assert!(read_all(&c, SNAP + 1, 0, size).await.0 == expected);
    t.stop().await;
}

async fn clone_is_durable_without_a_clean_stop(backend: BackendChoice) {
    let backend = match backend {
        BackendChoice::Threadpool => "threadpool",
        _ => "uring",
    };
    let dir = tempfile::tempdir().unwrap();
    let mut server = Binary::start(dir.path(), &["--io-backend", backend]);
    let c = DataClient::connect_tcp(server.tcp).await.unwrap();
    c.create_chunk(VOL, 3, (2 * MIB) as u32, 1).await.unwrap();
    let data = pattern(5, 0, 512);
    write(&c, VOL, 3, 0, data.clone(), 0, false).await.unwrap();
    c.clone_chunk(VOL, 3, SNAP, 3, 2).await.unwrap();
    server.kill();

    let server = Binary::start(dir.path(), &["--io-backend", backend]);
    let c = DataClient::connect_tcp(server.tcp).await.unwrap();
    let (got, _) = read_all(&c, SNAP, 3, 2 * MIB).await;
    assert!(got == data[..], "an acknowledged clone is durable");
    assert_eq!(c.chunk_info(SNAP, 3).await.unwrap().generation, 2);
    assert!(c.scrub(Some(SNAP)).await.unwrap().bad.is_empty());
}

async fn clone_respects_capacity(backend: BackendChoice) {
    let dir = tempfile::tempdir().unwrap();
    let mut config = common::config(dir.path(), backend);
    config.capacity = Some(3 * MIB);
    let server = storage_server::start(config).await.unwrap();
    let c = DataClient::connect_tcp(server.tcp_addr().unwrap()).await.unwrap();
    c.create_chunk(VOL, 0, MIB as u32, 1).await.unwrap();
    c.clone_chunk(VOL, 0, SNAP, 0, 1).await.unwrap();
    // Two 1 MiB chunks with headers and tables leave less than a third.
    assert_eq!(code(c.clone_chunk(VOL, 0, SNAP + 1, 0, 1).await), ErrorCode::NoSpace);
    assert_eq!(code(c.chunk_info(SNAP + 1, 0).await), ErrorCode::NoSuchChunk);
    assert!(!common::chunk_file(dir.path(), SNAP + 1, 0).exists());
    c.delete_chunk(SNAP, 0, 0).await.unwrap();
    c.clone_chunk(VOL, 0, SNAP + 1, 0, 1).await.unwrap();
    server.shutdown().await.unwrap();
}

async fn paused_changes_wait_until_resume(backend: BackendChoice) {
    let t = TestServer::start(backend).await;
    let coordinator = &t.client;
    let engine = t.connect().await;
    coordinator.create_chunk(VOL, 0, MIB as u32, 1).await.unwrap();
    coordinator.create_chunk(OTHER, 0, MIB as u32, 1).await.unwrap();
    write(&engine, VOL, 0, 0, pattern(1, 0, 4), 0, false).await.unwrap();

    coordinator.pause_volume(VOL, Duration::from_secs(30)).await.unwrap();
    let w = spawn_write(&engine, VOL, 0, 0, pattern(2, 0, 4));
    let trim = {
        let e = engine.clone();
        tokio::spawn(async move {
            e.trim(
                ChunkAt { volume: VOL, chunk: 0, offset: 16 * BLOCK, epoch: 0, generation: 1 },
                4 * BLOCK as u32,
                false,
            )
            .await
        })
    };
    let zeroes = {
        let e = engine.clone();
        tokio::spawn(async move {
            e.write_zeroes(
                ChunkAt { volume: VOL, chunk: 0, offset: 32 * BLOCK, epoch: 0, generation: 1 },
                4 * BLOCK as u32,
                true,
                true,
            )
            .await
        })
    };
    still_pending(&w, Duration::from_millis(300), "a write").await;
    assert!(!trim.is_finished(), "a trim completed while the volume was paused");
    assert!(!zeroes.is_finished(), "a write-zeroes completed while the volume was paused");

    // Reads (on the writers' connection too), flushes, other volumes and
    // clones of the paused volume go on.
    let (old, _) = prompt(
        "a read",
        engine.read(ChunkAt { volume: VOL, chunk: 0, offset: 0, epoch: 1, generation: 0 }, 4 * BLOCK as u32),
    )
    .await
    .unwrap();
    assert_eq!(old, pattern(1, 0, 4));
    prompt("a flush", engine.flush(Some(VOL))).await.unwrap();
    prompt("a flush of all volumes", coordinator.flush(None)).await.unwrap();
    prompt("a write to another volume", write(&engine, OTHER, 0, 0, pattern(3, 0, 4), 0, true)).await.unwrap();
    prompt("a clone", coordinator.clone_chunk(VOL, 0, SNAP, 0, 1)).await.unwrap();
    assert_eq!(
        read_data(
            coordinator,
            ChunkAt { volume: SNAP, chunk: 0, offset: 0, epoch: 1, generation: 0 },
            4 * BLOCK as u32
        )
        .await,
        pattern(1, 0, 4)
    );
    // Pausing again renews the pause and does not release anything.
    coordinator.pause_volume(VOL, Duration::from_secs(30)).await.unwrap();
    still_pending(&w, Duration::from_millis(100), "a write").await;

    coordinator.resume_volume(VOL).await.unwrap();
    prompt("the paused write", w).await.unwrap().unwrap();
    prompt("the paused trim", trim).await.unwrap().unwrap();
    prompt("the paused write-zeroes", zeroes).await.unwrap().unwrap();
    assert_eq!(
        read_data(&engine, ChunkAt { volume: VOL, chunk: 0, offset: 0, epoch: 1, generation: 0 }, 4 * BLOCK as u32)
            .await,
        pattern(2, 0, 4)
    );
    // The clone taken while paused kept the old data.
    assert_eq!(
        read_data(
            coordinator,
            ChunkAt { volume: SNAP, chunk: 0, offset: 0, epoch: 1, generation: 0 },
            4 * BLOCK as u32
        )
        .await,
        pattern(1, 0, 4)
    );

    // Resuming is idempotent, also for a volume never paused.
    coordinator.resume_volume(VOL).await.unwrap();
    coordinator.resume_volume(0x7777).await.unwrap();
    prompt("a write after the resume", write(&engine, VOL, 0, 0, pattern(4, 0, 1), 0, false)).await.unwrap();

    // Two holders (a snapshot and a rebuild, say): each resume ends only
    // its own hold, and the volume resumes with the last.
    coordinator.pause_volume_for(VOL, 11, Duration::from_secs(30)).await.unwrap();
    coordinator.pause_volume_for(VOL, 22, Duration::from_secs(30)).await.unwrap();
    let w = spawn_write(&engine, VOL, 0, 0, pattern(5, 0, 1));
    coordinator.resume_volume_for(VOL, 11).await.unwrap();
    coordinator.resume_volume(VOL).await.unwrap();
    still_pending(&w, Duration::from_millis(300), "a write held by a second holder").await;
    coordinator.resume_volume_for(VOL, 22).await.unwrap();
    prompt("the write after the last hold ended", w).await.unwrap().unwrap();
    t.stop().await;
}

async fn pause_times_out_by_itself(backend: BackendChoice) {
    let t = TestServer::start(backend).await;
    let coordinator = &t.client;
    let engine = t.connect().await;
    coordinator.create_chunk(VOL, 0, MIB as u32, 1).await.unwrap();

    // Nobody resumes: the waiting write proceeds when the timeout elapses.
    let timeout = Duration::from_millis(700);
    let paused_at = Instant::now();
    coordinator.pause_volume(VOL, timeout).await.unwrap();
    let w = spawn_write(&engine, VOL, 0, 0, pattern(1, 0, 1));
    prompt("the write after the pause timed out", w).await.unwrap().unwrap();
    assert!(paused_at.elapsed() >= timeout, "the write waited for the timeout: {:?}", paused_at.elapsed());
    prompt("a write after the timeout", write(&engine, VOL, 0, 0, pattern(2, 0, 1), 0, false)).await.unwrap();
    coordinator.resume_volume(VOL).await.unwrap();

    // A renewal counts from itself, not from the first pause.
    let first = Instant::now();
    coordinator.pause_volume(VOL, timeout).await.unwrap();
    sleep(Duration::from_millis(300)).await;
    coordinator.pause_volume(VOL, Duration::from_secs(30)).await.unwrap();
    let w = spawn_write(&engine, VOL, 0, 0, pattern(3, 0, 1));
    let past_first_deadline = (first + timeout + Duration::from_millis(300)).saturating_duration_since(Instant::now());
    still_pending(&w, past_first_deadline, "a write past the first pause's deadline").await;
    coordinator.resume_volume(VOL).await.unwrap();
    prompt("the write after the resume", w).await.unwrap().unwrap();

    // A zero timeout asks for the server's default (seconds, not zero).
    coordinator.pause_volume(VOL, Duration::ZERO).await.unwrap();
    let w = spawn_write(&engine, VOL, 0, 0, pattern(4, 0, 1));
    still_pending(&w, Duration::from_millis(300), "a write").await;
    coordinator.resume_volume(VOL).await.unwrap();
    prompt("the write after the resume", w).await.unwrap().unwrap();
    assert_eq!(
        read_data(&engine, ChunkAt { volume: VOL, chunk: 0, offset: 0, epoch: 1, generation: 0 }, BLOCK as u32).await,
        pattern(4, 0, 1)
    );
    t.stop().await;
}

const WRITERS: u64 = 4;
/// Blocks of each writer's stripe; a writer rewrites its stripe in order,
/// one block per write, round after round.
const STRIPE: u64 = 128;
/// Each stripe starts a 4 MiB activity-log region of its own.
const REGION_BLOCKS: u64 = 1024;

fn tag(writer: u64, round: u64) -> u64 {
    (writer << 32) | (round + 1)
}

fn stripe_block(writer: u64, i: u64) -> u64 {
    writer * REGION_BLOCKS + i
}

/// The writers' stripes of a chunk, one after the other.
async fn stripes(c: &DataClient, volume: u64) -> Vec<u8> {
    let mut out = Vec::new();
    for w in 0..WRITERS {
        let (data, crcs) = c
            .read(
                ChunkAt { volume, chunk: 0, offset: stripe_block(w, 0) * BLOCK, epoch: 1, generation: 0 },
                (STRIPE * BLOCK) as u32,
            )
            .await
            .unwrap();
        assert_eq!(crcs, block_checksums(&data));
        out.extend_from_slice(&data);
    }
    out
}

/// For each writer's stripe (as [`stripes`] returns them): the number of
/// its writes it holds, checking that they are a prefix of the writer's
/// sequence (the stripe holds round r up to some block and round r - 1
/// after it, and never-written blocks read as zeros).
fn writes_held(image: &[u8]) -> Vec<u64> {
    (0..WRITERS)
        .map(|w| {
            let rounds: Vec<Option<u64>> = (0..STRIPE)
                .map(|i| {
                    let block = stripe_block(w, i);
                    let at = ((w * STRIPE + i) * BLOCK) as usize;
                    let data = &image[at..at + BLOCK as usize];
                    if data.iter().all(|&b| b == 0) {
                        return None;
                    }
                    let t = u64::from_le_bytes(data[..8].try_into().unwrap());
                    assert_eq!(t >> 32, w, "block {block} holds another writer's data");
                    assert_eq!(data, &pattern(t, block, 1)[..], "block {block} is not one whole write");
                    Some((t & 0xffff_ffff) - 1)
                })
                .collect();
            let top = match rounds[0] {
                None => {
                    assert!(rounds.iter().all(Option::is_none), "writer {w}: later block written before the first");
                    return 0;
                }
                Some(r) => r,
            };
            let boundary = rounds.iter().position(|r| *r != Some(top)).unwrap_or(STRIPE as usize);
            let below = top.checked_sub(1);
            for (i, r) in rounds.iter().enumerate().skip(boundary) {
                assert_eq!(*r, below, "writer {w}: block {i} breaks the order of writes");
            }
            top * STRIPE + boundary as u64
        })
        .collect()
}

/// Each writer rewrites its stripe in order until told to stop; returns
/// the number of writes it had acknowledged (every one must succeed).
/// Frequent flushes clean the writer's region, so its next write has to
/// mark it dirty again: that keeps writes in flight (waiting for the
/// activity log) for a while after they were admitted, and a pause must
/// wait for them.
async fn writer(c: DataClient, w: u64, stop: Arc<AtomicBool>) -> u64 {
    let mut n = 0;
    while !stop.load(Ordering::Relaxed) {
        let (round, i) = (n / STRIPE, n % STRIPE);
        let block = stripe_block(w, i);
        write(&c, VOL, 0, block * BLOCK, pattern(tag(w, round), block, 1), 0, false)
            .await
            .unwrap_or_else(|e| panic!("writer {w}, write {n}: {e}"));
        n += 1;
        c.flush(Some(VOL)).await.unwrap_or_else(|e| panic!("writer {w}, flush: {e}"));
    }
    n
}

async fn pauses_under_concurrent_writers_lose_nothing(backend: BackendChoice) {
    let t = TestServer::start(backend).await;
    let coordinator = &t.client;
    coordinator.create_chunk(VOL, 0, (WRITERS * REGION_BLOCKS * BLOCK) as u32, 1).await.unwrap();
    let stop = Arc::new(AtomicBool::new(false));
    let engine = t.connect().await;
    let second = t.connect().await;
    let writers: Vec<_> = (0..WRITERS)
        .map(|w| {
            let c = if w % 2 == 0 { engine.clone() } else { second.clone() };
            tokio::spawn(writer(c, w, stop.clone()))
        })
        .collect();

    let mut snap = SNAP;
    let mut previous = vec![0; WRITERS as usize];
    for cycle in 0..8 {
        sleep(Duration::from_millis(30)).await;
        if cycle % 4 == 3 {
            // A clone without a pause still takes whole writes, in order.
            coordinator.clone_chunk(VOL, 0, snap, 0, 1).await.unwrap();
            writes_held(&stripes(coordinator, snap).await);
            snap += 1;
            continue;
        }
        prompt("a pause", coordinator.pause_volume(VOL, Duration::from_secs(30))).await.unwrap();
        coordinator.clone_chunk(VOL, 0, snap, 0, 1).await.unwrap();
        sleep(Duration::from_millis(50)).await;
        coordinator.clone_chunk(VOL, 0, snap + 1, 0, 1).await.unwrap();
        coordinator.resume_volume(VOL).await.unwrap();
        let a = stripes(coordinator, snap).await;
        let b = stripes(coordinator, snap + 1).await;
        // Writes in flight when the pause was asked for finished before it
        // answered, and none landed while it lasted.
        assert!(a == b, "cycle {cycle}: the volume changed while it was paused");
        let held = writes_held(&a);
        for w in 0..WRITERS as usize {
            assert!(held[w] >= previous[w], "cycle {cycle}: writer {w} went backwards");
        }
        previous = held;
        snap += 2;
    }
    stop.store(true, Ordering::Relaxed);
    let mut acked = Vec::new();
    for w in writers {
        acked.push(prompt("a writer", w).await.unwrap());
    }
    assert!(acked.iter().all(|&n| n > 0), "writers made progress: {acked:?}");

    // Nothing was lost: every writer's acknowledged writes are all there.
    assert_eq!(writes_held(&stripes(coordinator, VOL).await), acked);
    for w in 0..WRITERS as usize {
        assert!(acked[w] >= previous[w]);
    }
    t.stop().await;
}

async fn shutdown_fails_paused_changes(backend: BackendChoice) {
    let t = TestServer::start(backend).await;
    t.client.create_chunk(VOL, 0, MIB as u32, 1).await.unwrap();
    let engine = t.connect().await;
    t.client.pause_volume(VOL, Duration::from_secs(60)).await.unwrap();
    let w = spawn_write(&engine, VOL, 0, 0, pattern(1, 0, 1));
    still_pending(&w, Duration::from_millis(200), "a write").await;
    // The shutdown does not wait for the pause (nor for its drain timeout).
    prompt("a shutdown with a paused volume", t.stop()).await;
    let result = prompt("the paused write", w).await.unwrap();
    match result {
        Err(ClientError::Remote { code: ErrorCode::ShuttingDown, .. }) | Err(ClientError::Closed(_)) => {}
        other => panic!("the paused write should fail with the shutdown, got {other:?}"),
    }
}

both_backends!(
    clone_round_trip,
    clone_is_durable_without_a_clean_stop,
    clone_respects_capacity,
    paused_changes_wait_until_resume,
    pause_times_out_by_itself,
    pauses_under_concurrent_writers_lose_nothing,
    shutdown_fails_paused_changes,
);
