//! `nbd-client map` on a host without the nbd module: the FUSE + loop
//! fallback gives a real block device that holds a filesystem across
//! unmap and map.

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

fn map(meta: &str, volume: &str, state_dir: &Path) -> String {
    let out =
        Command::new(NBD_CLIENT).args(["map", volume, "--meta", meta, "--state-dir"]).arg(state_dir).output().unwrap();
    ok(out, "nbd-client map").trim().to_string()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn map_mkfs_mount_unmap_and_map_again_keeps_the_files() {
    if !is_root() || !have("mkfs.ext4") || !have("fusermount3") {
        assert!(std::env::var("CI").as_deref() != Ok("true") || is_root(), "CI runs as root");
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let cluster = DevCluster::start(&dir.path().join("cluster"), 3, 3).await.unwrap();
    create_volume(&cluster, "fs", 128 * MIB, 3).await;
    let state_dir = dir.path().join("nbd-state");
    let meta = cluster.meta_endpoints();
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
}
