//! `nbd-client map` on a host without the nbd module: the FUSE + loop
//! fallback gives a real block device that holds a filesystem across
//! unmap and map, and grows under the mounted filesystem.

mod common;

use std::path::Path;
use std::process::Command;

use ballast_cli::dev::DevCluster;
use common::*;

struct Unmount<'a>(&'a Path);
impl Drop for Unmount<'_> {
    fn drop(&mut self) {
        let _ = Command::new("umount").arg(self.0).output();
    }
}

struct Unmap<'a> {
    volume: &'a str,
    state_dir: &'a Path,
}
impl Drop for Unmap<'_> {
    fn drop(&mut self) {
        let _ = Command::new(NBD_CLIENT).arg("unmap").arg(self.volume).arg("--state-dir").arg(self.state_dir).output();
    }
}

/// `nbd-client map VOLUME` with `meta`: `--meta ... --tls-dir ...`.
fn map(meta: &[String], volume: &str, state_dir: &Path) -> String {
    let out =
        Command::new(NBD_CLIENT).args(["map", volume]).args(meta).arg("--state-dir").arg(state_dir).output().unwrap();
    ok(out, "nbd-client map").trim().to_string()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn map_mkfs_mount_unmap_map_again_and_grow_online_keeps_the_files() {
    if !ballast_testkit::machine_has(&[
        ballast_testkit::ROOT,
        "/dev/fuse",
        "/dev/loop-control",
        "mkfs.ext4",
        "fusermount3",
    ]) {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let cluster = DevCluster::start(&dir.path().join("cluster"), 3, 3).await.unwrap();
    let volume = create_volume(&cluster, "fs", 128 * MIB, 3).await;
    let state_dir = dir.path().join("nbd-state");
    let meta = cluster.client_args();
    let _unmap = Unmap { volume: "fs", state_dir: &state_dir };

    let device = map(&meta, "fs", &state_dir);
    assert!(device.starts_with("/dev/"), "{device}");
    assert_eq!(map(&meta, "fs", &state_dir), device, "map is idempotent");
    let listed: serde_json::Value = serde_json::from_str(&ok(
        Command::new(NBD_CLIENT).args(["list", "-o", "json", "--state-dir"]).arg(&state_dir).output().unwrap(),
        "list",
    ))
    .unwrap();
    assert_eq!(listed[0]["device"], device.as_str());
    assert_eq!(listed[0]["method"], "fuse-loop");

    ok(Command::new("mkfs.ext4").args(["-q", "-F", &device]).output().unwrap(), "mkfs.ext4");
    let mnt = dir.path().join("mnt");
    std::fs::create_dir(&mnt).unwrap();
    {
        ok(Command::new("mount").arg(&device).arg(&mnt).output().unwrap(), "mount");
        let _unmount = Unmount(&mnt);
        let payload: Vec<u8> = (0..3 * MIB as usize).map(|i| (i % 253) as u8).collect();
        std::fs::write(mnt.join("data.bin"), &payload).unwrap();
        std::fs::write(mnt.join("hello.txt"), b"hello ballast\n").unwrap();
        // Unmap refuses while mounted.
        let busy = Command::new(NBD_CLIENT).args(["unmap", "fs", "--state-dir"]).arg(&state_dir).output().unwrap();
        assert!(!busy.status.success(), "unmap of a mounted device must fail");
    }
    ok(Command::new(NBD_CLIENT).args(["unmap", &device, "--state-dir"]).arg(&state_dir).output().unwrap(), "unmap");
    assert!(Command::new(NBD_CLIENT)
        .args(["list", "-o", "json", "--state-dir"])
        .arg(&state_dir)
        .output()
        .unwrap()
        .stdout
        .starts_with(b"[]"));

    let device = map(&meta, "fs", &state_dir);
    ok(Command::new("mount").arg(&device).arg(&mnt).output().unwrap(), "mount again");
    let _unmount = Unmount(&mnt);
    let payload: Vec<u8> = (0..3 * MIB as usize).map(|i| (i % 253) as u8).collect();
    assert!(std::fs::read(mnt.join("data.bin")).unwrap() == payload);
    assert_eq!(std::fs::read(mnt.join("hello.txt")).unwrap(), b"hello ballast\n");

    // Only a kernel nbd device can move to a new serving process: taking a
    // FUSE + loop one over is refused, and it keeps serving.
    let mut take_over = Command::new(NBD_CLIENT);
    take_over.args(["map", "fs", "--take-over"]).args(&meta).arg("--state-dir").arg(&state_dir);
    let take_over = take_over.output().unwrap();
    assert!(!take_over.status.success());
    assert!(String::from_utf8_lossy(&take_over.stderr).contains("takes no successor"), "{take_over:?}");
    assert!(std::fs::read(mnt.join("data.bin")).unwrap() == payload);

    // Online growth: expand the volume, grow the mapped device under the
    // mounted filesystem, then the filesystem; the files stay intact.
    let resize =
        || Command::new(NBD_CLIENT).args(["resize", "fs"]).args(&meta).arg("--state-dir").arg(&state_dir).output();
    assert_eq!(ok(resize().unwrap(), "resize without growth").trim(), (128 * MIB).to_string());
    let request = ballast_proto::meta::ExpandVolumeRequest { id: volume.id.clone(), size_bytes: 200 * MIB };
    cluster.meta().expand_volume(request).await.unwrap();
    assert_eq!(ok(resize().unwrap(), "nbd-client resize").trim(), (200 * MIB).to_string());
    let size = ok(Command::new("blockdev").args(["--getsize64", &device]).output().unwrap(), "blockdev");
    assert_eq!(size.trim(), (200 * MIB).to_string());
    // The new tail is usable through the device while the filesystem stays
    // mounted (growing the filesystem is the CSI node's job).
    let tail: Vec<u8> = (0..MIB as usize).map(|i| (i % 241) as u8).collect();
    let tail_file = dir.path().join("tail.bin");
    std::fs::write(&tail_file, &tail).unwrap();
    let of = format!("of={device}");
    let dd_out = ["bs=1M", "seek=180", "count=1", "oflag=direct,sync", "conv=notrunc", "status=none"];
    ok(Command::new("dd").arg(format!("if={}", tail_file.display())).arg(&of).args(dd_out).output().unwrap(), "dd");
    let dd_in = ["bs=1M", "skip=180", "count=1", "iflag=direct", "status=none"];
    let back = Command::new("dd").arg(format!("if={device}")).args(dd_in).output().unwrap();
    assert!(back.status.success() && back.stdout == tail, "the grown tail reads back what was written");
    std::fs::write(mnt.join("after-growth.txt"), b"grown\n").unwrap();
    assert!(std::fs::read(mnt.join("data.bin")).unwrap() == payload);

    // A volume that is not mapped here cannot be resized here.
    let absent = Command::new(NBD_CLIENT)
        .args(["resize", "no-such-volume"])
        .args(&meta)
        .arg("--state-dir")
        .arg(&state_dir)
        .output()
        .unwrap();
    assert!(!absent.status.success());
    assert!(String::from_utf8_lossy(&absent.stderr).contains("not mapped"), "{absent:?}");
}
