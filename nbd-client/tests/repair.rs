//! The metadata leader's repair loop on a real local cluster: a chunk
//! server dies, its replicas are rebuilt on the spare server while a writer
//! keeps writing, and afterwards every replica of every chunk holds exactly
//! what was written; a chunk server that crashed with unflushed writes gets
//! the chunks it found dirty rebuilt from a peer when it restarts, and is
//! never the source of a rebuild meanwhile.

use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

mod common;

use ballast_cli::dev::DevCluster;
use ballast_proto::frame::ChunkAt;
use ballast_proto::meta as pb;
use bytes::Bytes;
use meta_client::MetaClient;
use volume_engine::engine::{EngineOptions, Volume};

use common::MIB;
const VOLUME: u64 = 8 * MIB;

fn pattern(seed: u64, len: usize) -> Vec<u8> {
    (0..len).map(|i| (i as u64).wrapping_mul(2654435761).wrapping_add(seed.wrapping_mul(97)) as u8).collect()
}

async fn chunk_map(meta: &MetaClient, volume_id: &str) -> Vec<pb::ChunkReplicaSet> {
    meta.get_chunk_map(pb::GetChunkMapRequest { volume_id: volume_id.into() }).await.unwrap().chunks
}

/// Where chunk server `name` of `cluster` keeps a chunk.
fn chunk_file(cluster: &DevCluster, name: &str, data_id: u64, chunk: u64) -> PathBuf {
    cluster.dir.join(name).join("chunks").join(format!("{data_id:016x}")).join(format!("{chunk:016x}.chunk"))
}

/// A volume of one 1 MiB chunk, never published, and its engine.
async fn one_chunk_volume(meta: &MetaClient, name: &str, replicas: u32) -> (pb::Volume, Volume) {
    let request = pb::CreateVolumeRequest {
        name: name.into(),
        size_bytes: MIB,
        replicas,
        chunk_size_bytes: MIB,
        ..Default::default()
    };
    let info = meta.create_volume(request).await.unwrap();
    let volume = Volume::open(meta.clone(), &info.id, EngineOptions { epoch: 0, ..Default::default() }).await.unwrap();
    (info, volume)
}

fn process_name(cluster: &DevCluster, address: &str) -> String {
    cluster.state.processes.iter().find(|p| p.address == address).unwrap().name.clone()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn lost_replicas_are_rebuilt_on_a_spare_server_while_writes_go_on() {
    // Repair passes every second; a server silent for 3 s is given up.
    std::env::set_var("BALLAST_META_REPAIR_INTERVAL", "1");
    std::env::set_var("BALLAST_META_REPAIR_AFTER", "3");
    let dir = tempfile::tempdir().unwrap();
    let cluster = DevCluster::start(dir.path(), 3, 4).await.unwrap();
    let meta = cluster.meta();
    let (info, volume) = common::published_volume(&meta, "repaired", VOLUME).await;
    let volume = Arc::new(volume);

    // Every chunk written; what the volume must hold is kept alongside.
    let initial = pattern(1, VOLUME as usize);
    volume.write_at(0, Bytes::from(initial.clone()), true).await.unwrap();
    let image = Arc::new(Mutex::new(initial));
    let before = chunk_map(&meta, &info.id).await;
    assert_eq!(before.len(), 8);

    // A server holding replicas dies; a writer keeps going meanwhile.
    let victim_address = before[0].replicas[0].address.clone();
    let victim = process_name(&cluster, &victim_address);
    cluster.kill(&victim);
    let killed = Instant::now();
    let stop = Arc::new(AtomicBool::new(false));
    let writer = {
        let (volume, image, stop) = (volume.clone(), image.clone(), stop.clone());
        tokio::spawn(async move {
            let mut n = 0u64;
            while !stop.load(Ordering::SeqCst) {
                n += 1;
                let offset = (n * 7 % (VOLUME / 4096)) * 4096;
                let data = pattern(n + 1000, 8192.min((VOLUME - offset) as usize));
                volume.write_at(offset, Bytes::from(data.clone()), false).await.expect("write during repair");
                image.lock().unwrap()[offset as usize..offset as usize + data.len()].copy_from_slice(&data);
                tokio::time::sleep(Duration::from_millis(5)).await;
            }
            n
        })
    };

    // Every chunk gets back to three replicas, none on the dead server.
    let deadline = Instant::now() + Duration::from_secs(60);
    let after = loop {
        let map = chunk_map(&meta, &info.id).await;
        let healed =
            map.iter().all(|set| set.replicas.len() == 3 && set.replicas.iter().all(|r| r.address != victim_address));
        if healed {
            eprintln!("all chunks back to 3 replicas {:?} after the kill", killed.elapsed());
            break map;
        }
        assert!(Instant::now() < deadline, "not repaired within 60 s: {map:?}");
        tokio::time::sleep(Duration::from_millis(200)).await;
    };
    // Let the writer run past the last rebuild, then stop it.
    tokio::time::sleep(Duration::from_secs(1)).await;
    stop.store(true, Ordering::SeqCst);
    let writes = writer.await.unwrap();
    assert!(writes > 50, "the writer kept writing during the repair ({writes} writes)");
    eprintln!("{writes} writes during the repair, none failed");
    volume.flush().await.unwrap();
    for (old, new) in before.iter().zip(&after) {
        if old.replicas.iter().any(|r| r.address == victim_address) {
            assert!(new.generation > old.generation, "chunk {}: {old:?} -> {new:?}", new.chunk_index);
        }
    }

    // Each replica of each chunk, read directly from its server, holds
    // exactly the bytes written, rebuilt ones included.
    let image = image.lock().unwrap().clone();
    let final_map = chunk_map(&meta, &info.id).await;
    for set in &final_map {
        let base = (set.chunk_index * MIB) as usize;
        for replica in &set.replicas {
            let client = cluster.chunk_servers().connect(&replica.address).await.unwrap();
            let (data, _checksums) = client
                .read(
                    ChunkAt {
                        volume: info.data_id,
                        chunk: set.chunk_index,
                        offset: 0,
                        epoch: volume.epoch(),
                        generation: 0,
                    },
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
    let read = volume.read_at(0, VOLUME).await.unwrap();
    let first_difference = read.iter().zip(&image).position(|(a, b)| a != b);
    assert_eq!(first_difference, None, "the volume reads back what was written");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_restarted_servers_dirty_chunks_are_rebuilt_from_a_peer() {
    std::env::set_var("BALLAST_META_REPAIR_INTERVAL", "1");
    // Long enough that storage1 is never given up as dead here.
    std::env::set_var("BALLAST_META_REPAIR_AFTER", "600");
    let dir = tempfile::tempdir().unwrap();
    let mut cluster = DevCluster::start(dir.path(), 3, 3).await.unwrap();
    let meta = cluster.meta();
    let request = pb::CreateVolumeRequest {
        name: "resynced".into(),
        size_bytes: 2 * MIB,
        replicas: 3,
        chunk_size_bytes: MIB,
        ..Default::default()
    };
    let info = meta.create_volume(request).await.unwrap();
    let options = EngineOptions { epoch: 0, ..Default::default() };
    let volume = Volume::open(meta.clone(), &info.id, options).await.unwrap();
    volume.write_at(0, Bytes::from(pattern(1, 2 * MIB as usize)), false).await.unwrap();
    volume.flush().await.unwrap();
    // Written but not flushed when storage1 dies: dirty on every member.
    let unflushed = pattern(2, MIB as usize);
    volume.write_at(0, Bytes::from(unflushed.clone()), false).await.unwrap();

    let victim = cluster.process("storage1").address.clone();
    cluster.kill("storage1");
    // The crash tore block 3 of chunk 0.
    {
        use std::os::unix::fs::FileExt;
        let path = chunk_file(&cluster, "storage1", info.data_id, 0);
        let file = std::fs::OpenOptions::new().write(true).open(path).unwrap();
        file.write_all_at(&[0xee; 4096], 4096 + 3 * 4096).unwrap();
    }
    cluster.restart("storage1").unwrap();
    let restarted = Instant::now();

    // The repair loop takes the suspect replica out of the chunk's set and
    // rebuilds it from a peer (onto storage1 again: no other server is free).
    let clean_chunk = chunk_map(&meta, &info.id).await[1].clone();
    let generation = chunk_map(&meta, &info.id).await[0].generation;
    let deadline = Instant::now() + Duration::from_secs(60);
    let client = loop {
        let set = chunk_map(&meta, &info.id).await.remove(0);
        let rebuilt = set.generation >= generation + 2 && set.replicas.len() == 3;
        if rebuilt && set.replicas.iter().any(|r| r.address == victim) {
            let client = cluster.chunk_servers().connect(&victim).await.unwrap();
            let regions = client.dirty_regions(Some(info.data_id)).await.unwrap();
            assert!(!regions.iter().any(|r| r.is_recovered()), "{regions:?}");
            break client;
        }
        assert!(Instant::now() < deadline, "chunk 0 not rebuilt within 60 s: {set:?}");
        tokio::time::sleep(Duration::from_millis(200)).await;
    };
    eprintln!("suspect replica rebuilt {:?} after the restart", restarted.elapsed());
    assert_eq!(chunk_map(&meta, &info.id).await[1], clean_chunk, "a chunk flushed before the crash is left alone");
    let (data, _) = client
        .read(ChunkAt { volume: info.data_id, chunk: 0, offset: 0, epoch: 0, generation: 0 }, MIB as u32)
        .await
        .expect("every block verifies");
    assert!(data[..] == unflushed[..], "the restarted replica holds what its peers hold");
    assert_eq!(volume.read_at(0, MIB).await.unwrap(), Bytes::from(unflushed));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_bit_flip_found_by_scrub_is_rewritten_from_a_good_replica() {
    std::env::set_var("BALLAST_META_REPAIR_INTERVAL", "1");
    std::env::set_var("BALLAST_META_REPAIR_AFTER", "600");
    let dir = tempfile::tempdir().unwrap();
    let cluster = DevCluster::start(dir.path(), 1, 3).await.unwrap();
    let meta = cluster.meta();
    let (info, volume) = common::published_volume(&meta, "scrubbed", 2 * MIB).await;
    let written = pattern(3, 2 * MIB as usize);
    volume.write_at(0, Bytes::from(written.clone()), false).await.unwrap();
    volume.flush().await.unwrap();
    let before = chunk_map(&meta, &info.id).await[0].clone();

    // Bit rot: one bit of block 5 of chunk 0 flips on one replica's disk
    // (past the chunk file's 4 KiB header).
    let victim = &before.replicas[0];
    let path = chunk_file(&cluster, &process_name(&cluster, &victim.address), info.data_id, 0);
    let at = 4096 + 5 * 4096 + 100;
    let file = std::fs::OpenOptions::new().read(true).write(true).open(&path).unwrap();
    let mut byte = [0u8; 1];
    std::os::unix::fs::FileExt::read_exact_at(&file, &mut byte, at).unwrap();
    std::os::unix::fs::FileExt::write_all_at(&file, &[byte[0] ^ 0x01], at).unwrap();
    file.sync_all().unwrap();

    let client = cluster.chunk_servers().connect(&victim.address).await.unwrap();
    let found = client.scrub(Some(info.data_id)).await.unwrap();
    assert_eq!(found.bad.len(), 1, "scrub finds the flipped block: {:?}", found.bad);

    // The repair loop rebuilds the chunk there from a good replica.
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let report = client.scrub(Some(info.data_id)).await.unwrap();
        let map = chunk_map(&meta, &info.id).await;
        let healed = report.bad.is_empty()
            && map[0].replicas.len() == 3
            && map[0].replicas.iter().any(|r| r.address == victim.address);
        if healed {
            assert!(map[0].generation > before.generation, "the replica was rebuilt: {before:?} -> {:?}", map[0]);
            break;
        }
        assert!(Instant::now() < deadline, "the flipped block was not repaired within 30 s: {report:?} {map:?}");
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
    let (data, _) = client
        .read(ChunkAt { volume: info.data_id, chunk: 0, offset: 0, epoch: volume.epoch(), generation: 0 }, MIB as u32)
        .await
        .unwrap();
    assert!(data[..] == written[..MIB as usize], "the repaired replica holds what was written");
}

/// A crash on power loss: one member loses what it had not flushed (its
/// chunk file goes back to the last flush) while its peers, which crash
/// too, keep it; it comes back alone. Its copy must not be the source of a
/// rebuild while a peer that may hold newer data is away. When they are
/// all back, all dirty, one copy wins (unflushed writes may be lost when a
/// whole set crashes) and every replica ends up holding it.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_copy_left_behind_by_a_crash_is_never_a_rebuild_source() {
    std::env::set_var("BALLAST_META_REPAIR_INTERVAL", "1");
    std::env::set_var("BALLAST_META_REPAIR_AFTER", "3");
    let dir = tempfile::tempdir().unwrap();
    // Five servers: two silent ones are fewer than half, so one is given up.
    let mut cluster = DevCluster::start(dir.path(), 1, 5).await.unwrap();
    let meta = cluster.meta();
    let (info, volume) = one_chunk_volume(&meta, "torn", 3).await;
    let older = pattern(1, MIB as usize);
    volume.write_at(0, Bytes::from(older.clone()), false).await.unwrap();
    volume.flush().await.unwrap();
    let set = chunk_map(&meta, &info.id).await.remove(0);
    let names: Vec<String> = set.replicas.iter().map(|r| process_name(&cluster, &r.address)).collect();
    let (crashed, peers) = (&names[0], &names[1..]);
    let flushed = std::fs::read(chunk_file(&cluster, crashed, info.data_id, 0)).unwrap();

    // Acknowledged, not flushed: on every member's page cache, and in every
    // member's activity log.
    let newer = pattern(2, MIB as usize);
    volume.write_at(0, Bytes::from(newer.clone()), false).await.unwrap();
    cluster.kill(crashed);
    std::fs::write(chunk_file(&cluster, crashed, info.data_id, 0), &flushed).unwrap();
    for peer in peers {
        cluster.kill(peer);
    }
    cluster.restart(crashed).unwrap();

    // The peers are silent past the repair delay: one of them is given up
    // (a write quorum of two stays), and a rebuild would have only the
    // crashed server's copy to copy from.
    let deadline = Instant::now() + Duration::from_secs(12);
    while Instant::now() < deadline {
        let current = chunk_map(&meta, &info.id).await.remove(0);
        let addresses: Vec<&str> = current.replicas.iter().map(|r| r.address.as_str()).collect();
        assert!(
            addresses.iter().all(|a| set.replicas.iter().any(|r| r.address == *a)),
            "a replica was rebuilt from the copy the crash left behind: {set:?} -> {current:?}"
        );
        tokio::time::sleep(Duration::from_millis(500)).await;
    }

    // The peers return: every replica ends up holding one same copy.
    for peer in peers {
        cluster.restart(peer).unwrap();
    }
    let deadline = Instant::now() + Duration::from_secs(60);
    let healed = loop {
        let current = chunk_map(&meta, &info.id).await.remove(0);
        let mut clean = current.replicas.len() == 3;
        for replica in &current.replicas {
            let regions = match cluster.chunk_servers().connect(&replica.address).await {
                Ok(client) => client.dirty_regions(Some(info.data_id)).await.ok(),
                Err(_) => None,
            };
            clean &= regions.is_some_and(|regions| !regions.iter().any(|r| r.is_recovered()));
        }
        if clean {
            break current;
        }
        assert!(Instant::now() < deadline, "not healed within 60 s: {current:?}");
        tokio::time::sleep(Duration::from_millis(500)).await;
    };
    let mut contents = Vec::new();
    for replica in &healed.replicas {
        let client = cluster.chunk_servers().connect(&replica.address).await.unwrap();
        let (data, _) = client
            .read(ChunkAt { volume: info.data_id, chunk: 0, offset: 0, epoch: 0, generation: 0 }, MIB as u32)
            .await
            .expect("every block verifies");
        assert!(data == newer || data == older, "{} holds neither write", replica.server_id);
        contents.push(data);
    }
    assert!(contents.windows(2).all(|w| w[0] == w[1]), "the replicas of {healed:?} differ");
    assert_eq!(volume.read_at(0, MIB).await.expect("the volume reads"), contents[0]);
}

/// A volume with one replica whose server crashes with unflushed writes:
/// their data is on disk, their checksums were not yet. The blocks read
/// back once the server is up again (as they would from a plain disk),
/// instead of failing their checksums for ever.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_lone_replica_that_crashed_with_unflushed_writes_reads_back() {
    std::env::set_var("BALLAST_META_REPAIR_INTERVAL", "1");
    std::env::set_var("BALLAST_META_REPAIR_AFTER", "600");
    let dir = tempfile::tempdir().unwrap();
    let mut cluster = DevCluster::start(dir.path(), 1, 1).await.unwrap();
    let meta = cluster.meta();
    let (_, volume) = one_chunk_volume(&meta, "lone", 1).await;
    volume.write_at(0, Bytes::from(pattern(1, MIB as usize)), false).await.unwrap();
    volume.flush().await.unwrap();
    let newer = pattern(2, MIB as usize);
    volume.write_at(0, Bytes::from(newer.clone()), false).await.unwrap();
    cluster.kill("storage1");
    cluster.restart("storage1").unwrap();

    let deadline = Instant::now() + Duration::from_secs(30);
    let data = loop {
        match volume.read_at(0, MIB).await {
            Ok(data) => break data,
            Err(e) => assert!(Instant::now() < deadline, "still unreadable after 30 s: {e}"),
        }
        tokio::time::sleep(Duration::from_millis(500)).await;
    };
    assert_eq!(data, Bytes::from(newer), "the blocks hold the last write");
}
