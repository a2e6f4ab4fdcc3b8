//! A whole local cluster (metadata members and chunk servers, as real
//! processes: `ballast_cli::dev::DevCluster`) with the plugin in front of
//! it attaching volumes through the real `nbd-client`.
//!
//! Teardown, also when a test fails half-way: filesystems and bind mounts
//! under the test directory are unmounted, every volume still mapped in the
//! test's own nbd-client state directory is unmapped with `nbd-client
//! unmap` (a serving process that does not go is killed by its pid), loop
//! devices over files under the directory are detached, then the plugin and
//! the cluster are stopped and the directory removed.

use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::process::{Command, ExitStatus, Stdio};
use std::time::{Duration, Instant};

use ballast_cli::dev::DevCluster;
use ballast_proto::csi;
use ballast_proto::meta as pb;
use meta_client::MetaClient;
use nix::mount::MntFlags;
use nix::sys::signal::{kill, Signal};
use nix::unistd::Pid;

use super::{create_request, params, Plugin, MIB, PLUGIN};

pub const NODE: &str = "n1";
pub const TOPOLOGY: &str = "topology.ballast.io/cluster=test";

/// How long teardown waits for one `nbd-client unmap`.
const UNMAP_LIMIT: Duration = Duration::from_secs(90);

/// A binary of another workspace package, next to `csi-plugin` in
/// `target/<profile>/`. `cargo nextest run --workspace` builds them all;
/// `-p csi-plugin` alone does not.
pub fn workspace_binary(name: &str) -> PathBuf {
    let binary = Path::new(PLUGIN).with_file_name(name);
    assert!(
        binary.exists(),
        "{} is missing: build it with `cargo build -p {name}` (or run the tests with `cargo nextest run \
         --workspace`, which builds every binary); these tests run the real {name}",
        binary.display()
    );
    binary
}

/// Whether this machine can run the tests that attach volumes: root, FUSE,
/// loop devices, mkfs.ext4, blkid, resize2fs, losetup and the tools in
/// `needs` (see `ballast_testkit::machine_has` for what a lack does).
pub fn attach_possible(needs: &[&str]) -> bool {
    let always =
        [ballast_testkit::ROOT, "/dev/fuse", "/dev/loop-control", "mkfs.ext4", "blkid", "resize2fs", "losetup"];
    let all: Vec<&str> = always.iter().chain(needs).copied().collect();
    ballast_testkit::machine_has(&all)
}

/// A mapping as `nbd-client list -o json` prints it.
pub use nbd_records::mapping::Listed as Mapped;

/// Field order matters: the plugin stops before the cluster, the directory
/// goes last (and `Drop` releases what the volumes hold before all that).
pub struct ClusterHarness {
    pub plugin: Plugin,
    pub meta: MetaClient,
    pub cluster: DevCluster,
    /// The real nbd-client the plugin runs.
    pub nbd_client: PathBuf,
    /// This test's own nbd-client state directory (`--nbd-state-dir`).
    pub nbd_state: PathBuf,
    pub dir: tempfile::TempDir,
}

impl ClusterHarness {
    /// A cluster of 3 metadata members and 3 chunk servers, and the plugin
    /// in `all` mode serving node [`NODE`]. (The cluster runs a plugin of
    /// its own for node `dev-node`; the tests drive theirs, whose flags,
    /// state directories and log they control.)
    pub async fn start() -> Self {
        for binary in ["meta-raft", "storage-server"] {
            workspace_binary(binary);
        }
        let nbd_client = workspace_binary("nbd-client");
        let dir = tempfile::tempdir().expect("temp dir");
        let cluster = start_cluster(dir.path()).await;
        let meta = cluster.meta();
        let nbd_state = dir.path().join("nbd");
        let state = dir.path().join("state");
        let mut harness_args: Vec<String> =
            ["--mode", "all", "--node-id", NODE, "--topology", TOPOLOGY, "--max-volumes", "16", "--nbd-client-bin"]
                .map(String::from)
                .to_vec();
        harness_args.push(nbd_client.display().to_string());
        harness_args.push("--nbd-state-dir".into());
        harness_args.push(nbd_state.display().to_string());
        harness_args.push("--state-dir".into());
        harness_args.push(state.display().to_string());
        harness_args.extend(cluster.tls_args());
        let args: Vec<&str> = harness_args.iter().map(String::as_str).collect();
        let plugin = Plugin::start(dir.path(), "csi", &cluster.meta_endpoints(), &args, &[]).await;
        Self { plugin, meta, cluster, nbd_client, nbd_state, dir }
    }

    pub fn path(&self, name: &str) -> PathBuf {
        self.dir.path().join(name)
    }

    /// What `nbd-client list` reports in this test's state directory.
    pub fn mapped(&self) -> Vec<Mapped> {
        let output = Command::new(&self.nbd_client)
            .args(["list", "-o", "json", "--state-dir"])
            .arg(&self.nbd_state)
            .output()
            .expect("running nbd-client list");
        assert!(output.status.success(), "nbd-client list: {}", String::from_utf8_lossy(&output.stderr));
        serde_json::from_slice(&output.stdout).expect("nbd-client list prints JSON")
    }

    /// The mapping of a metadata volume id, if mapped.
    pub fn mapping(&self, volume_id: &str) -> Option<Mapped> {
        self.mapped().into_iter().find(|m| m.volume == volume_id)
    }

    /// CreateVolume through the plugin's controller (512 MiB unless `size`).
    pub async fn create(
        &self,
        name: &str,
        cap: csi::VolumeCapability,
        size: Option<i64>,
        parameters: &[(&str, &str)],
    ) -> csi::Volume {
        let mut req = create_request(name, size.unwrap_or(512 * MIB));
        req.volume_capabilities = vec![cap];
        req.parameters = params(parameters);
        req.secrets = super::secrets();
        self.plugin.controller().await.create_volume(req).await.expect("CreateVolume").into_inner().volume.unwrap()
    }

    /// ControllerPublishVolume to [`NODE`]; returns the publish context.
    pub async fn publish(
        &self,
        volume: &csi::Volume,
        cap: &csi::VolumeCapability,
    ) -> std::collections::HashMap<String, String> {
        let req = csi::ControllerPublishVolumeRequest {
            volume_id: volume.volume_id.clone(),
            node_id: NODE.into(),
            volume_capability: Some(cap.clone()),
            volume_context: volume.volume_context.clone(),
            secrets: super::secrets(),
            ..Default::default()
        };
        self.plugin
            .controller()
            .await
            .controller_publish_volume(req)
            .await
            .expect("ControllerPublishVolume")
            .into_inner()
            .publish_context
    }

    /// The metadata record of a volume.
    pub async fn meta_volume(&self, id: &str) -> pb::Volume {
        self.meta
            .get_volume(pb::GetVolumeRequest { key: Some(pb::get_volume_request::Key::Id(id.into())) })
            .await
            .expect("GetVolume")
    }

    /// What each storage server holds of a volume: the entries of its
    /// `storageN/chunks/<data_id:016x>/` (`<chunk:016x>.chunk` files), by
    /// server name.
    pub fn chunk_files(&self, data_id: u64) -> Vec<(String, Vec<PathBuf>)> {
        self.cluster
            .state
            .processes
            .iter()
            .filter(|p| p.binary == "storage-server")
            .map(|p| {
                let dir = self.cluster.dir.join(&p.name).join("chunks").join(format!("{data_id:016x}"));
                let files = match std::fs::read_dir(&dir) {
                    Ok(entries) => entries.map(|e| e.expect("reading a chunk directory").path()).collect(),
                    Err(e) if e.kind() == std::io::ErrorKind::NotFound => Vec::new(),
                    Err(e) => panic!("reading {}: {e}", dir.display()),
                };
                (p.name.clone(), files)
            })
            .collect()
    }
}

/// How many times a cluster start is tried.
const CLUSTER_ATTEMPTS: usize = 3;

/// Starts a local cluster under `dir`. The ports of its processes are
/// picked free and bound a moment later, so a test running in parallel
/// may take one first: a failed start is reported (with its logs) and
/// tried again in a fresh directory.
async fn start_cluster(dir: &Path) -> DevCluster {
    let mut failures = Vec::new();
    for attempt in 1..=CLUSTER_ATTEMPTS {
        let cluster_dir = dir.join(if attempt == 1 { "cluster".into() } else { format!("cluster-{attempt}") });
        match DevCluster::start(&cluster_dir, 3, 3).await {
            Ok(cluster) => return cluster,
            Err(e) => {
                eprintln!("starting a local cluster in {} failed: {e:#}", cluster_dir.display());
                print_logs(&cluster_dir.join("logs"), 20);
                failures.push(format!("{e:#}"));
            }
        }
    }
    panic!("starting a local cluster failed {CLUSTER_ATTEMPTS} times: {}", failures.join("; "));
}

/// Prints the last `lines` lines of every `*.log` in `dir` (they live in
/// the temporary directory, which is about to go).
fn print_logs(dir: &Path, lines: usize) {
    let Ok(entries) = std::fs::read_dir(dir) else { return };
    for entry in entries.flatten() {
        let path = entry.path();
        if path.extension().is_some_and(|e| e == "log") {
            let text = std::fs::read_to_string(&path).unwrap_or_default();
            let tail: Vec<&str> = text.lines().rev().take(lines).collect();
            let tail: Vec<&str> = tail.into_iter().rev().collect();
            eprintln!("--- {} (last {lines} lines) ---\n{}", path.display(), tail.join("\n"));
        }
    }
}

impl Drop for ClusterHarness {
    fn drop(&mut self) {
        if std::thread::panicking() {
            // The serving processes' logs.
            print_logs(&self.nbd_state, 40);
        }
        release(self.dir.path(), &self.nbd_client, &self.nbd_state);
    }
}

/// Runs `command` (its output captured) for at most `limit`; kills it after.
fn run_limited(command: &mut Command, limit: Duration) -> Option<(ExitStatus, String)> {
    let mut child = command.stdin(Stdio::null()).stdout(Stdio::piped()).stderr(Stdio::piped()).spawn().ok()?;
    let started = Instant::now();
    loop {
        match child.try_wait() {
            Ok(Some(_)) => break,
            Ok(None) if started.elapsed() < limit => std::thread::sleep(Duration::from_millis(50)),
            _ => {
                let _ = child.kill();
                let _ = child.wait();
                return None;
            }
        }
    }
    let output = child.wait_with_output().ok()?;
    let text = format!("{}{}", String::from_utf8_lossy(&output.stdout), String::from_utf8_lossy(&output.stderr));
    Some((output.status, text))
}

/// Pids of `nbd-client serve-device` processes working for `state_dir`:
/// the serving processes this test's maps started.
fn serving_processes(state_dir: &Path) -> Vec<i32> {
    let wanted = state_dir.as_os_str().as_encoded_bytes();
    let Ok(entries) = std::fs::read_dir("/proc") else { return Vec::new() };
    entries
        .flatten()
        .filter_map(|e| e.file_name().to_str().and_then(|n| n.parse::<i32>().ok()))
        .filter(|pid| {
            let Ok(cmdline) = std::fs::read(format!("/proc/{pid}/cmdline")) else { return false };
            let args: Vec<&[u8]> = cmdline.split(|b| *b == 0).collect();
            args.first().is_some_and(|a0| a0.ends_with(b"nbd-client"))
                && args.contains(&b"serve-device".as_slice())
                && args.windows(2).any(|w| w[0] == b"--state-dir" && w[1] == wanted)
        })
        .collect()
}

/// Unmounts what is mounted under `root`, deepest first; FUSE mounts (the
/// serving processes' own) only when `fuse` is set.
fn unmount_under(root: &Path, fuse: bool) {
    let Ok(table) = csi_plugin::node::mounts::mount_table() else { return };
    for entry in table.iter().rev().filter(|m| m.mount_point.starts_with(root)) {
        if entry.fs_type.starts_with("fuse") && !fuse {
            continue;
        }
        if nix::mount::umount2(&entry.mount_point, MntFlags::empty()).is_err() {
            let _ = nix::mount::umount2(&entry.mount_point, MntFlags::MNT_DETACH);
        }
    }
}

/// Releases everything a test may have left attached under `dir`.
pub fn release(dir: &Path, nbd_client: &Path, state_dir: &Path) {
    let root = std::fs::canonicalize(dir).unwrap_or_else(|_| dir.to_path_buf());
    // 1. What the plugin mounted: staging paths, pods' targets.
    unmount_under(&root, false);
    // 2. Every mapped volume, the way an operator would.
    let listed = run_limited(
        Command::new(nbd_client).args(["list", "-o", "json", "--state-dir"]).arg(state_dir),
        Duration::from_secs(30),
    );
    let mapped: Vec<Mapped> = listed
        .and_then(|(status, out)| status.success().then_some(out))
        .and_then(|out| out.lines().find(|l| l.starts_with('[')).and_then(|l| serde_json::from_str(l).ok()))
        .unwrap_or_default();
    for mapping in &mapped {
        let unmapped = run_limited(
            Command::new(nbd_client).args(["unmap", &mapping.volume, "--state-dir"]).arg(state_dir),
            UNMAP_LIMIT,
        );
        match unmapped {
            Some((status, _)) if status.success() => {}
            Some((_, out)) => eprintln!("teardown: nbd-client unmap {} failed: {}", mapping.volume, out.trim()),
            None => eprintln!("teardown: nbd-client unmap {} did not finish in {UNMAP_LIMIT:?}", mapping.volume),
        }
    }
    // 3. Serving processes that did not go (or were never recorded).
    let leftovers = serving_processes(state_dir);
    for pid in &leftovers {
        eprintln!("teardown: killing nbd-client serving process {pid}");
        let _ = kill(Pid::from_raw(*pid), Signal::SIGKILL);
    }
    let deadline = Instant::now() + Duration::from_secs(10);
    while leftovers.iter().any(|pid| Path::new(&format!("/proc/{pid}")).exists()) && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(50));
    }
    // 4. Loop devices over files under the directory, then the FUSE mounts.
    if let Ok(listing) = Command::new("losetup").args(["-n", "-O", "NAME,BACK-FILE", "-l"]).output() {
        for line in String::from_utf8_lossy(&listing.stdout).lines() {
            let mut fields = line.split_whitespace();
            if let (Some(device), Some(file)) = (fields.next(), fields.next()) {
                if Path::new(file).starts_with(&root) {
                    eprintln!("teardown: detaching {device} ({file})");
                    let _ = Command::new("losetup").args(["-d", device]).status();
                }
            }
        }
    }
    unmount_under(&root, true);
}

/// Whether `path` is the device node `device` (same device number).
pub fn same_device(path: &Path, device: impl AsRef<Path>) -> bool {
    let rdev = |p: &Path| std::fs::metadata(p).map(|m| m.rdev()).unwrap_or(0);
    let a = rdev(path);
    a != 0 && a == rdev(device.as_ref())
}

pub fn stage_request(
    volume: &csi::Volume,
    staging: &Path,
    cap: &csi::VolumeCapability,
    ctx: &std::collections::HashMap<String, String>,
) -> csi::NodeStageVolumeRequest {
    csi::NodeStageVolumeRequest {
        volume_id: volume.volume_id.clone(),
        publish_context: ctx.clone(),
        staging_target_path: staging.to_str().unwrap().into(),
        volume_capability: Some(cap.clone()),
        volume_context: volume.volume_context.clone(),
        secrets: super::secrets(),
    }
}

pub fn publish_request(
    volume: &csi::Volume,
    staging: &Path,
    target: &Path,
    cap: &csi::VolumeCapability,
    readonly: bool,
) -> csi::NodePublishVolumeRequest {
    csi::NodePublishVolumeRequest {
        volume_id: volume.volume_id.clone(),
        staging_target_path: staging.to_str().unwrap().into(),
        target_path: target.to_str().unwrap().into(),
        volume_capability: Some(cap.clone()),
        readonly,
        volume_context: volume.volume_context.clone(),
        secrets: super::secrets(),
        ..Default::default()
    }
}

pub fn unpublish_request(volume_id: &str, target: &Path) -> csi::NodeUnpublishVolumeRequest {
    csi::NodeUnpublishVolumeRequest { volume_id: volume_id.into(), target_path: target.to_str().unwrap().into() }
}

pub fn unstage_request(volume_id: &str, staging: &Path) -> csi::NodeUnstageVolumeRequest {
    csi::NodeUnstageVolumeRequest { volume_id: volume_id.into(), staging_target_path: staging.to_str().unwrap().into() }
}

pub fn expand_request(
    volume: &csi::Volume,
    path: &Path,
    bytes: i64,
    cap: &csi::VolumeCapability,
) -> csi::NodeExpandVolumeRequest {
    csi::NodeExpandVolumeRequest {
        volume_id: volume.volume_id.clone(),
        volume_path: path.to_str().unwrap().into(),
        capacity_range: super::range(bytes, 0),
        volume_capability: Some(cap.clone()),
        secrets: super::secrets(),
        ..Default::default()
    }
}

/// Online ext4 growth (the EXT4_IOC_RESIZE_FS ioctl behind resize2fs)
/// needs CAP_SYS_RESOURCE, which some containers drop; a node plugin runs
/// privileged and has it.
pub const CAP_SYS_RESOURCE: u32 = 24;

/// Whether this process has a capability in its effective set.
pub fn has_capability(bit: u32) -> bool {
    let status = std::fs::read_to_string("/proc/self/status").unwrap_or_default();
    status
        .lines()
        .find_map(|l| l.strip_prefix("CapEff:"))
        .and_then(|hex| u64::from_str_radix(hex.trim(), 16).ok())
        .is_some_and(|caps| caps & (1 << bit) != 0)
}

/// The filesystem type `blkid -p` finds on a device ("" for none).
pub fn blkid_type(device: impl AsRef<Path>) -> String {
    let out = Command::new("blkid").args(["-p", "-s", "TYPE", "-o", "value"]).arg(device.as_ref()).output().unwrap();
    String::from_utf8(out.stdout).unwrap().trim().to_string()
}

/// The size in bytes of the filesystem mounted at `path`, as `df` shows it.
pub fn df_size(path: &Path) -> i64 {
    let out = Command::new("df").args(["-B1", "--output=size"]).arg(path).output().expect("running df");
    assert!(out.status.success(), "df {}: {}", path.display(), String::from_utf8_lossy(&out.stderr));
    let text = String::from_utf8(out.stdout).unwrap();
    text.lines().nth(1).and_then(|l| l.trim().parse().ok()).unwrap_or_else(|| panic!("df printed {text:?}"))
}

/// The size in bytes of a block device.
pub fn device_bytes(device: impl AsRef<Path>) -> i64 {
    use std::io::Seek;
    let device = device.as_ref();
    let mut file = std::fs::File::open(device).unwrap_or_else(|e| panic!("opening {}: {e}", device.display()));
    file.seek(std::io::SeekFrom::End(0)).unwrap() as i64
}
