//! The FUSE + loop fallback end to end: an in-memory export becomes
//! `/dev/loopN`, gets an ext4 file system, files are written, the device is
//! detached and attached again, and the files are still there.
//!
//! Needs root, /dev/fuse, /dev/loop-control and e2fsprogs
//! (`ballast_testkit::machine_has`).

use std::panic::AssertUnwindSafe;
use std::path::{Path, PathBuf};
use std::sync::atomic::Ordering;
use std::time::Duration;

use futures::FutureExt;
use nbd_client::attach::{self, AttachError, AttachKind, AttachMethod, AttachOptions, AttachedDevice, VOLUME_FILE};
use rand::RngCore;
use tempfile::TempDir;

mod common;

const MIB: u64 = 1024 * 1024;

use common::mem_export::TestMemExport;

// ---------------------------------------------------------------------------
// Harness
// ---------------------------------------------------------------------------

/// What the test set up, so that it is torn down whatever happens.
struct Env {
    dir: TempDir,
    mounts: Vec<PathBuf>,
    device: Option<AttachedDevice<TestMemExport>>,
}

impl Env {
    fn new() -> Self {
        Self { dir: tempfile::tempdir().unwrap(), mounts: Vec::new(), device: None }
    }

    fn options(&self) -> AttachOptions {
        let mut options = AttachOptions::new("fuse-loop-test");
        options.method = AttachMethod::FuseLoop;
        options.fuse_root = self.dir.path().join("fuse");
        options
    }

    async fn mount(&mut self, device: &Path, name: &str) -> PathBuf {
        let target = self.dir.path().join(name);
        std::fs::create_dir_all(&target).unwrap();
        let (device, at) = (device.to_path_buf(), target.clone());
        // Mounting reads through FUSE, which this runtime serves: not on a worker.
        tokio::task::spawn_blocking(move || {
            nix::mount::mount(Some(&device), &at, Some("ext4"), nix::mount::MsFlags::empty(), None::<&str>)
        })
        .await
        .unwrap()
        .unwrap_or_else(|e| panic!("mounting ext4 at {}: {e}", target.display()));
        self.mounts.push(target.clone());
        target
    }

    async fn unmount(&mut self, target: &Path) {
        let at = target.to_path_buf();
        tokio::task::spawn_blocking(move || nix::mount::umount2(&at, nix::mount::MntFlags::empty()))
            .await
            .unwrap()
            .unwrap_or_else(|e| panic!("unmounting {}: {e}", target.display()));
        self.mounts.retain(|m| m != target);
    }

    /// Orderly teardown while the runtime still serves FUSE.
    async fn cleanup(&mut self) {
        for target in std::mem::take(&mut self.mounts) {
            let _ = tokio::task::spawn_blocking(move || {
                nix::mount::umount2(&target, nix::mount::MntFlags::empty())
                    .or_else(|_| nix::mount::umount2(&target, nix::mount::MntFlags::MNT_DETACH))
            })
            .await;
        }
        if let Some(mut device) = self.device.take() {
            if let Err(e) = device.detach().await {
                eprintln!("cleanup: detach failed: {e}");
            }
        }
    }
}

impl Drop for Env {
    fn drop(&mut self) {
        // Last resort if `cleanup` never ran: lazy unmounts, and the
        // device's own Drop tears FUSE and loop down.
        for target in &self.mounts {
            let _ = nix::mount::umount2(target, nix::mount::MntFlags::MNT_DETACH);
        }
    }
}

async fn run(program: &str, args: &[&str]) -> String {
    let output = tokio::process::Command::new(program)
        .args(args)
        .kill_on_drop(true)
        .stdin(std::process::Stdio::null())
        .output()
        .await
        .unwrap_or_else(|e| panic!("cannot run {program}: {e}"));
    let text = format!("{}{}", String::from_utf8_lossy(&output.stdout), String::from_utf8_lossy(&output.stderr));
    assert!(output.status.success(), "{program} {args:?} failed ({}):\n{text}", output.status);
    text
}

fn random_bytes(len: usize) -> Vec<u8> {
    let mut data = vec![0u8; len];
    rand::rng().fill_bytes(&mut data);
    data
}

// ---------------------------------------------------------------------------
// Test
// ---------------------------------------------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ext4_on_fuse_loop_survives_detach_and_reattach() {
    if !ballast_testkit::machine_has(&[ballast_testkit::ROOT, "/dev/fuse", "/dev/loop-control", "mkfs.ext4", "e2fsck"])
    {
        return;
    }
    let mut env = Env::new();
    let outcome =
        AssertUnwindSafe(tokio::time::timeout(Duration::from_secs(240), scenario(&mut env))).catch_unwind().await;
    env.cleanup().await;
    match outcome {
        Ok(Ok(())) => {}
        Ok(Err(_)) => panic!("FUSE + loop scenario timed out"),
        Err(panic) => std::panic::resume_unwind(panic),
    }
}

async fn scenario(env: &mut Env) {
    let size = 64 * MIB;
    let export = TestMemExport::new(size);
    let big = random_bytes(4 * MIB as usize);
    let small = b"hello from ballast\n".to_vec();

    // Attach: a real block device of the export's size.
    let device = env.device.insert(attach::attach(export.clone(), env.options()).await.expect("attach"));
    assert_eq!(device.kind(), AttachKind::FuseLoop);
    let path = device.path().to_path_buf();
    assert!(path.to_str().unwrap().starts_with("/dev/loop"), "{}", path.display());
    let sectors: u64 =
        std::fs::read_to_string(format!("/sys/block/loop{}/size", device.index())).unwrap().trim().parse().unwrap();
    assert_eq!(sectors * 512, size);
    let fuse_dir = device.fuse_mountpoint().unwrap().to_path_buf();
    assert_eq!(std::fs::metadata(fuse_dir.join(VOLUME_FILE)).unwrap().len(), size);
    eprintln!("attached {} (direct I/O: {:?})", path.display(), device.loop_direct_io());

    // Format, mount, write, sync, unmount.
    run("mkfs.ext4", &["-q", "-F", "-b", "4096", path.to_str().unwrap()]).await;
    let mnt = env.mount(&path, "mnt").await;
    let (big_c, small_c, at) = (big.clone(), small.clone(), mnt.clone());
    tokio::task::spawn_blocking(move || {
        std::fs::create_dir(at.join("dir")).unwrap();
        std::fs::write(at.join("dir/big.bin"), &big_c).unwrap();
        std::fs::write(at.join("small.txt"), &small_c).unwrap();
        std::fs::File::open(at.join("dir/big.bin")).unwrap().sync_all().unwrap();
    })
    .await
    .unwrap();
    env.unmount(&mnt).await;
    assert!(export.flushes.load(Ordering::Relaxed) > 0, "fsync never reached the export");

    // Detach: loop device and FUSE mount are gone.
    let loop_index = env.device.as_ref().unwrap().index();
    env.device.as_mut().unwrap().detach().await.expect("detach");
    env.device = None;
    assert!(!Path::new(&format!("/sys/block/loop{loop_index}/loop/backing_file")).exists());
    assert!(!fuse_dir.exists(), "FUSE mount point left behind");
    // The export itself now holds an ext4 file system (magic 0xEF53 at 1080).
    assert_eq!(&export.snapshot()[1080..1082], &[0x53, 0xef]);

    // Attach the same export again: the files are intact.
    let device = env.device.insert(attach::attach(export.clone(), env.options()).await.expect("re-attach"));
    let path = device.path().to_path_buf();
    run("e2fsck", &["-f", "-n", path.to_str().unwrap()]).await;
    let mnt = env.mount(&path, "mnt2").await;
    let at = mnt.clone();
    let (big_back, small_back) = tokio::task::spawn_blocking(move || {
        (std::fs::read(at.join("dir/big.bin")).unwrap(), std::fs::read(at.join("small.txt")).unwrap())
    })
    .await
    .unwrap();
    assert!(big_back == big, "big.bin differs after re-attach");
    assert_eq!(small_back, small);

    // Detach refuses while mounted and leaves the device working.
    let busy = env.device.as_mut().unwrap().detach().await;
    assert!(matches!(busy, Err(AttachError::Busy(_))), "{busy:?}");
    let at = mnt.clone();
    let again = tokio::task::spawn_blocking(move || std::fs::read(at.join("small.txt")).unwrap()).await.unwrap();
    assert_eq!(again, small);

    env.unmount(&mnt).await;
    env.device.as_mut().unwrap().detach().await.expect("detach after unmount");
    env.device = None;
}
