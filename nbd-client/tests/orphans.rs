//! Orphan deletion never destroys data. Losing the metadata service's data
//! must not cost the chunk servers theirs: a metadata cluster whose data
//! directories were emptied and that was bootstrapped again on the same
//! addresses (what a StatefulSet re-created without its volumes does) knows
//! no volume, and would once have had every chunk deleted as an orphan
//! within a minute. And what metadata does call an orphan waits in the
//! trash, from where an admin can restore it, for as long as live data does
//! not need its space. And losing most metadata members has a way back: a
//! survivor becomes a one-member cluster with everything it knew, and no
//! chunk is lost.

use std::process::Command;
use std::time::{Duration, Instant};

mod common;

use ballast_cli::dev::DevCluster;
use ballast_proto::frame::ChunkAt;
use ballast_proto::meta as pb;
use bytes::Bytes;

use common::{held, MIB};

const VOLUME: u64 = 8 * MIB;

fn pattern(len: usize) -> Vec<u8> {
    (0..len).map(|i| (i as u64).wrapping_mul(2654435761) as u8).collect()
}

fn storage_server_bin() -> std::path::PathBuf {
    ballast_cli::dev::workspace_bin_dir().join("storage-server")
}

fn meta_raft_bin() -> std::path::PathBuf {
    ballast_cli::dev::workspace_bin_dir().join("meta-raft")
}

/// `ballast chunks -o json` with `args`: the state of each chunk held.
fn chunk_states(cluster: &DevCluster, args: &[&str]) -> Vec<String> {
    let output = Command::new(ballast_cli::dev::workspace_bin_dir().join("ballast"))
        .args(["chunks", "-o", "json"])
        .args(args)
        .args(cluster.tls_args())
        .env_remove("BALLAST_META")
        .env_remove("BALLAST_TLS_DIR")
        .output()
        .unwrap();
    assert!(output.status.success(), "{output:?}");
    let held: Vec<serde_json::Value> = serde_json::from_slice(&output.stdout).unwrap();
    held.iter().map(|c| c["state"].as_str().unwrap().to_string()).collect()
}

fn storage_addresses(cluster: &DevCluster) -> String {
    let addresses: Vec<&str> =
        cluster.state.processes.iter().filter(|p| p.binary == "storage-server").map(|p| p.address.as_str()).collect();
    addresses.join(",")
}

/// A 3-replica volume of 8 chunks, every byte written and flushed; what
/// was written, and the epoch it was written under.
async fn written_volume(cluster: &DevCluster, name: &str) -> (pb::Volume, Vec<u8>, u64) {
    let (info, volume) = common::published_volume(&cluster.meta(), name, VOLUME).await;
    let written = pattern(VOLUME as usize);
    volume.write_at(0, Bytes::from(written.clone()), true).await.unwrap();
    volume.flush().await.unwrap();
    (info, written, volume.epoch())
}

fn volume_of_1_mib_chunks(name: &str, size: u64, replicas: u32) -> pb::CreateVolumeRequest {
    pb::CreateVolumeRequest {
        name: name.into(),
        size_bytes: size,
        replicas,
        chunk_size_bytes: MIB,
        ..Default::default()
    }
}

/// Detaches and deletes `info` (the only volume), and waits until two
/// reconciliations (10 s apart) agreed and its chunks left every store.
async fn delete_until_unserved(cluster: &DevCluster, info: &pb::Volume) {
    let meta = cluster.meta();
    meta.unpublish_volume(pb::UnpublishVolumeRequest { volume_id: info.id.clone(), node_id: "n1".into() })
        .await
        .unwrap();
    meta.delete_volume(pb::DeleteVolumeRequest { id: info.id.clone() }).await.unwrap();
    let deadline = Instant::now() + Duration::from_secs(60);
    while held(cluster).await.iter().any(|(_, n)| *n > 0) {
        assert!(Instant::now() < deadline, "the deleted volume's chunks are still served");
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_wiped_metadata_cluster_makes_no_chunk_server_delete_its_chunks() {
    let dir = tempfile::tempdir().unwrap();
    let mut cluster = DevCluster::start(dir.path(), 3, 3).await.unwrap();
    let (info, written, epoch) = written_volume(&cluster, "kept").await;
    let before = held(&cluster).await;
    assert!(before.iter().all(|(_, n)| *n == 8), "every server holds all 8 chunks: {before:?}");

    // Metadata lost: every member killed, its data directory emptied, and
    // started again with the same --bootstrap list.
    for name in ["meta1", "meta2", "meta3"] {
        cluster.kill(name);
        std::fs::remove_dir_all(cluster.dir.join(name)).unwrap();
    }
    for name in ["meta1", "meta2", "meta3"] {
        cluster.restart(name).unwrap();
    }
    let fresh = cluster.meta();
    let deadline = Instant::now() + Duration::from_secs(30);
    while fresh.list_volumes(pb::ListVolumesRequest::default()).await.is_err() {
        assert!(Instant::now() < deadline, "the new metadata cluster elected no leader");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }

    // Servers reconcile every 10 s and used to delete a chunk named orphaned
    // by two reconciliations in a row: give them three.
    let watch = Instant::now() + Duration::from_secs(35);
    while Instant::now() < watch {
        let now = held(&cluster).await;
        assert_eq!(now, before, "a chunk server deleted chunks the lost metadata referenced");
        tokio::time::sleep(Duration::from_secs(1)).await;
    }

    // The data is intact on every server.
    for (address, _) in &before {
        let client = cluster.chunk_servers().connect(address).await.unwrap();
        let (data, _) = client
            .read(ChunkAt { volume: info.data_id, chunk: 3, offset: 0, epoch, generation: 0 }, MIB as u32)
            .await
            .unwrap();
        assert!(data[..] == written[3 * MIB as usize..4 * MIB as usize], "chunk 3 on {address}");
    }
    // The servers refused to join the other cluster, and say why.
    let servers = fresh.list_chunk_servers(pb::ListChunkServersRequest {}).await.unwrap().servers;
    assert!(servers.is_empty(), "chunk servers registered with a cluster that is not theirs: {servers:?}");
    let log = std::fs::read_to_string(cluster.dir.join("logs/storage1.log")).unwrap();
    assert!(log.contains("belongs to metadata cluster"), "storage1 says why it refuses the new cluster");
    // An admin sees that the new cluster knows none of the 24 chunks.
    let states =
        chunk_states(&cluster, &["--meta", &cluster.meta_endpoints(), "--servers", &storage_addresses(&cluster)]);
    assert_eq!(states.len(), 24);
    assert!(states.iter().all(|s| s == "unknown"), "{states:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn orphans_wait_in_the_trash_and_an_admin_restores_them() {
    let dir = tempfile::tempdir().unwrap();
    let mut cluster = DevCluster::start(dir.path(), 1, 3).await.unwrap();
    let (info, written, epoch) = written_volume(&cluster, "deleted").await;
    delete_until_unserved(&cluster, &info).await;
    // The chunks went to the trash, where `trash list` shows them.
    let data_dir = cluster.dir.join("storage1");
    let list =
        Command::new(storage_server_bin()).args(["trash", "list", "--data-dir"]).arg(&data_dir).output().unwrap();
    assert!(list.status.success(), "{list:?}");
    let listed = String::from_utf8(list.stdout).unwrap();
    assert_eq!(listed.lines().filter(|l| l.contains(&format!("volume={} ", info.data_id))).count(), 8, "{listed}");

    // Restoring needs the server stopped: the data directory is locked.
    let restore =
        || Command::new(storage_server_bin()).args(["trash", "restore", "--data-dir"]).arg(&data_dir).output().unwrap();
    let refused = restore();
    assert!(!refused.status.success(), "restored under a running server: {refused:?}");
    cluster.kill("storage1");
    let restored = restore();
    assert!(String::from_utf8_lossy(&restored.stdout).contains("restored 8 chunks"), "{restored:?}");
    cluster.restart("storage1").unwrap();
    let address = cluster.process("storage1").address.clone();
    let deadline = Instant::now() + Duration::from_secs(20);
    let client = loop {
        match cluster.chunk_servers().connect(&address).await {
            Ok(client) => break client,
            Err(e) => assert!(Instant::now() < deadline, "storage1 did not come back: {e}"),
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    };
    let (data, _) = client
        .read(ChunkAt { volume: info.data_id, chunk: 5, offset: 0, epoch, generation: 0 }, MIB as u32)
        .await
        .unwrap();
    assert!(data[..] == written[5 * MIB as usize..6 * MIB as usize], "the restored chunk holds what was written");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_survivor_of_a_lost_metadata_majority_becomes_the_cluster_again() {
    let dir = tempfile::tempdir().unwrap();
    let mut cluster = DevCluster::start(dir.path(), 3, 3).await.unwrap();
    let (info, written, epoch) = written_volume(&cluster, "survives").await;
    let before = held(&cluster).await;

    // Two of three members lost with their disks: the survivor alone has
    // no majority and cannot serve.
    for name in ["meta2", "meta3"] {
        cluster.kill(name);
        std::fs::remove_dir_all(cluster.dir.join(name)).unwrap();
    }
    let survivor = cluster.process("meta1").address.clone();
    let alone = cluster.meta_at(&survivor);
    let create = |name: &str| volume_of_1_mib_chunks(name, MIB, 3);
    let stuck = tokio::time::timeout(Duration::from_secs(10), alone.create_volume(create("during"))).await;
    assert!(!matches!(stuck, Ok(Ok(_))), "a minority member accepted a change: {stuck:?}");

    // What the servers hold is listed without metadata.
    let states = chunk_states(&cluster, &["--servers", &storage_addresses(&cluster)]);
    assert_eq!(states.len(), 24);
    assert!(states.iter().all(|s| s == "unchecked"), "{states:?}");

    // Stopped, it is made the only member, and started again.
    cluster.kill("meta1");
    let output = Command::new(meta_raft_bin())
        .args(["force-single-member", "--id", "1", "--address", &survivor, "--data-dir"])
        .arg(cluster.dir.join("meta1"))
        .output()
        .unwrap();
    assert!(output.status.success(), "{output:?}");
    let report: serde_json::Value = serde_json::from_slice(&output.stdout).unwrap();
    assert_eq!(report["volumes"], 1, "{report}");
    assert_eq!(report["chunk_servers"], 3, "{report}");
    cluster.restart("meta1").unwrap();

    // It leads, knows the volume, and takes changes again.
    let deadline = Instant::now() + Duration::from_secs(30);
    let created = loop {
        match alone.create_volume(create("after")).await {
            Ok(volume) => break volume,
            Err(e) => assert!(Instant::now() < deadline, "the recovered member does not serve: {e}"),
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    };
    assert_eq!(created.name, "after");
    let options = volume_engine::engine::EngineOptions { epoch, ..Default::default() };
    let volume = volume_engine::engine::Volume::open(alone.clone(), &info.id, options).await.unwrap();
    assert!(volume.read_at(0, VOLUME).await.unwrap()[..] == written[..], "the volume reads back");

    // The chunk servers keep serving it and delete nothing (three
    // reconciliations, 10 s apart).
    let watch = Instant::now() + Duration::from_secs(25);
    while Instant::now() < watch {
        assert_eq!(held(&cluster).await, before, "a chunk server dropped chunks after the recovery");
        tokio::time::sleep(Duration::from_secs(1)).await;
    }
    let servers = alone.list_chunk_servers(pb::ListChunkServersRequest {}).await.unwrap().servers;
    assert_eq!(servers.len(), 3, "{servers:?}");
    let states = chunk_states(&cluster, &["--meta", &survivor]);
    assert_eq!(states.len(), 24);
    assert!(states.iter().all(|s| s == "replica"), "{states:?}");
}

/// A tmpfs of `size` mounted at `at` for as long as it lives.
struct Tmpfs(std::path::PathBuf);

impl Tmpfs {
    fn mount(at: &std::path::Path, size: &str) -> Tmpfs {
        std::fs::create_dir_all(at).unwrap();
        let status = Command::new("mount")
            .args(["-t", "tmpfs", "-o", &format!("size={size}"), "tmpfs"])
            .arg(at)
            .status()
            .unwrap();
        assert!(status.success(), "mounting a tmpfs at {}", at.display());
        Tmpfs(at.to_owned())
    }

    /// Bytes free and the filesystem's size.
    fn space(&self) -> (u64, u64) {
        let stat = nix::sys::statvfs::statvfs(&self.0).unwrap();
        let block = stat.fragment_size();
        (stat.blocks_available() * block, stat.blocks() * block)
    }
}

impl Drop for Tmpfs {
    fn drop(&mut self) {
        // Lazily: a process of a failed test may still hold a file open.
        let _ = Command::new("umount").arg("-l").arg(&self.0).status();
    }
}

/// A deleted volume's chunks wait in the trash, but the space they hold is
/// not taken from live data: on a full disk a new volume's chunks replace
/// the oldest trash, and the trash never keeps the filesystem's last tenth.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn the_trash_gives_its_space_back_when_live_chunks_need_it() {
    if !ballast_testkit::machine_has(&[ballast_testkit::ROOT, "mount", "umount"]) {
        return;
    }
    const SIZE: u64 = 32 * MIB;
    let dir = tempfile::tempdir().unwrap();
    // The chunk server's data directory on a 40 MiB filesystem. Declared
    // before the cluster, so it is unmounted after the cluster stopped.
    let disk = Tmpfs::mount(&dir.path().join("storage1"), "40m");
    let cluster = DevCluster::start(dir.path(), 1, 1).await.unwrap();
    let meta = cluster.meta();
    let create = |name: &str| volume_of_1_mib_chunks(name, SIZE, 1);

    // Volume `first` fills 32 of the 40 MiB, and is deleted: its chunks go
    // to the trash, where they still take their space.
    let first = meta.create_volume(create("first")).await.unwrap();
    let volume = common::publish_and_open(&meta, &first).await;
    volume.write_at(0, Bytes::from(pattern(SIZE as usize)), true).await.unwrap();
    volume.flush().await.unwrap();
    drop(volume);
    delete_until_unserved(&cluster, &first).await;
    let (free, _) = disk.space();
    assert!(free < SIZE, "the trash holds the deleted volume ({free} bytes free)");

    // Volume `second` needs that space: every byte of it is written.
    let second = meta.create_volume(create("second")).await.unwrap();
    let volume = common::publish_and_open(&meta, &second).await;
    let written: Vec<u8> = pattern(SIZE as usize).into_iter().rev().collect();
    volume
        .write_at(0, Bytes::from(written.clone()), true)
        .await
        .expect("writing a new volume while the trash holds a deleted one");
    volume.flush().await.unwrap();
    assert!(volume.read_at(0, SIZE).await.unwrap()[..] == written[..], "the new volume reads back");
    let log = std::fs::read_to_string(cluster.dir.join("logs/storage1.log")).unwrap();
    assert!(log.contains("before its grace period ended"), "the server says it emptied the trash early");

    // Between reconciliations the trash gives back the filesystem's last
    // tenth as well.
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let (free, size) = disk.space();
        if free >= size / 10 {
            break;
        }
        assert!(Instant::now() < deadline, "the trash keeps the last tenth of the disk: {free} of {size} bytes free");
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
}
