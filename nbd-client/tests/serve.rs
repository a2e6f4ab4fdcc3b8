//! `nbd-client serve` driven by real NBD clients: qemu-io, qemu-img,
//! nbdinfo, nbdcopy and fio, over a 3-replica volume on a local cluster.

mod common;

use std::process::Command;

use ballast_cli::dev::DevCluster;
use common::*;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn real_nbd_clients_round_trip_through_a_replicated_volume() {
    if !ballast_testkit::machine_has(&["qemu-io", "qemu-img", "nbdinfo", "nbdcopy"]) {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let cluster = DevCluster::start(&dir.path().join("cluster"), 3, 3).await.unwrap();
    create_volume(&cluster, "clients", 64 * MIB, 3).await;
    let served = Served::start(&cluster, "clients", dir.path());
    let uri = served.uri();

    // qemu-io: patterns written and read back, unaligned too.
    ok(
        Command::new("qemu-io")
            .args(["-f", "raw", &uri, "-c", "write -P 0xab 0 1M", "-c", "write -P 0xcd 4000000 12345"])
            .output()
            .unwrap(),
        "qemu-io write",
    );
    let read = ok(
        Command::new("qemu-io")
            .args([
                "-f",
                "raw",
                &uri,
                "-c",
                "read -P 0xab 0 1M",
                "-c",
                "read -P 0xcd 4000000 12345",
                "-c",
                "read -P 0 8M 4k",
            ])
            .output()
            .unwrap(),
        "qemu-io read",
    );
    assert!(!read.contains("Pattern verification failed"), "{read}");

    // nbdinfo: size and flags.
    let info: serde_json::Value =
        serde_json::from_str(&ok(Command::new("nbdinfo").args(["--json", &uri]).output().unwrap(), "nbdinfo")).unwrap();
    let export = &info["exports"][0];
    assert_eq!(export["export-size"], 64 * MIB);
    for flag in ["can_flush", "can_fua", "can_trim", "can_zero", "can_multi_conn"] {
        assert_eq!(export[flag], true, "{flag} in {export}");
    }

    // qemu-img convert into the volume and back: bit-identical.
    let image = dir.path().join("image.raw");
    let back = dir.path().join("back.raw");
    let data: Vec<u8> = (0..(24 * MIB) as usize).map(|i| (i * 7 % 251) as u8).collect();
    std::fs::write(&image, &data).unwrap();
    ok(
        Command::new("qemu-img")
            .args(["convert", "-n", "-f", "raw", "-O", "raw"])
            .arg(&image)
            .arg(&uri)
            .output()
            .unwrap(),
        "qemu-img convert in",
    );
    ok(
        Command::new("qemu-img").args(["convert", "-f", "raw", "-O", "raw", &uri]).arg(&back).output().unwrap(),
        "qemu-img convert out",
    );
    let copied = std::fs::read(&back).unwrap();
    assert_eq!(copied.len() as u64, 64 * MIB);
    assert!(copied[..data.len()] == data[..], "first 24 MiB round-trip bit-identical");

    // nbdcopy out and in again over several connections.
    let copy = dir.path().join("nbdcopy.raw");
    ok(Command::new("nbdcopy").arg(&uri).arg(&copy).output().unwrap(), "nbdcopy out");
    assert!(std::fs::read(&copy).unwrap() == copied);
    ok(Command::new("nbdcopy").arg(&copy).arg(&uri).output().unwrap(), "nbdcopy in");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fio_verify_passes_while_a_chunk_server_is_killed() {
    if !ballast_testkit::machine_has(&["fio"]) {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let cluster = DevCluster::start(&dir.path().join("cluster"), 3, 3).await.unwrap();
    let volume = create_volume(&cluster, "fio", 48 * MIB, 3).await;
    let served = Served::start(&cluster, "fio", dir.path());

    let fio = |extra: &[&str]| {
        Command::new("fio")
            .args(["--name=verify", "--ioengine=nbd", &format!("--uri={}", served.uri()), "--rw=randwrite", "--bs=4k"])
            .args([
                "--iodepth=16",
                "--size=48M",
                "--verify=crc32c",
                "--verify_fatal=1",
                "--do_verify=1",
                "--verify_state_save=0",
            ])
            .args(["--output-format=json"])
            .args(extra)
            .spawn_and_wait()
    };
    // Clean run first.
    let first = fio(&[]);
    assert_eq!(first["jobs"][0]["error"], 0, "{first}");

    // Again, killing a chunk server a moment after fio starts.
    let killer = {
        let name = "storage2".to_string();
        let pid = cluster.process(&name).pid;
        std::thread::spawn(move || {
            std::thread::sleep(std::time::Duration::from_millis(700));
            let _ = nix::sys::signal::kill(nix::unistd::Pid::from_raw(pid as i32), nix::sys::signal::Signal::SIGKILL);
        })
    };
    let second = fio(&["--randseed=7"]);
    killer.join().unwrap();
    assert_eq!(second["jobs"][0]["error"], 0, "{second}");

    let dead_id = std::fs::read_to_string(dir.path().join("cluster/storage2/server-id")).unwrap();
    let map = cluster
        .meta()
        .get_chunk_map(ballast_proto::meta::GetChunkMapRequest { volume_id: volume.id.clone() })
        .await
        .unwrap();
    assert!(!map.chunks.is_empty());
    for chunk in &map.chunks {
        assert!(chunk.replicas.iter().all(|r| r.server_id != dead_id.trim()), "dead server left chunk {chunk:?}");
        assert_eq!(chunk.replicas.len(), 2);
    }
}

trait SpawnAndWait {
    fn spawn_and_wait(&mut self) -> serde_json::Value;
}

impl SpawnAndWait for Command {
    fn spawn_and_wait(&mut self) -> serde_json::Value {
        let output = self.output().unwrap();
        let text = String::from_utf8_lossy(&output.stdout).into_owned();
        assert!(output.status.success(), "fio failed: {text}\n{}", String::from_utf8_lossy(&output.stderr));
        serde_json::from_str(&text[text.find('{').expect("fio JSON")..]).unwrap()
    }
}
