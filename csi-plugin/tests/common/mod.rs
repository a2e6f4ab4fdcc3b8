//! Test harness: a real metadata cluster (meta-raft processes) and the real
//! `csi-plugin` binary, driven over its unix socket the way the sidecars
//! and the kubelet drive it. Everything is stopped and removed when the
//! harness drops, also when a test fails half-way. [`cluster`] adds chunk
//! servers and the real `nbd-client`, for the tests that attach volumes.

#![allow(dead_code)]

pub mod cluster;

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use ballast_proto::csi;
use ballast_proto::csi::controller_client::ControllerClient;
use ballast_proto::csi::group_controller_client::GroupControllerClient;
use ballast_proto::csi::identity_client::IdentityClient;
use ballast_proto::csi::node_client::NodeClient;
use ballast_proto::csi::volume_capability::access_mode::Mode;
use ballast_proto::meta as pb;
use ballast_testkit::meta_cluster::LocalMetaCluster;
use meta_client::MetaClient;
use tokio::net::UnixStream;
use tonic::transport::Channel;

pub const PLUGIN: &str = env!("CARGO_BIN_EXE_csi-plugin");
/// The value of the operation secret the tests send: it must never appear
/// in the plugin's log.
pub const SECRET_VALUE: &str = "hunter2-7f1c9e-never-logged";
pub const MIB: i64 = 1 << 20;
pub const GIB: i64 = 1 << 30;

/// The meta-raft binary of this build (`target/<profile>/meta-raft`), built
/// by `cargo build -p meta-raft`.
pub fn meta_raft_binary() -> PathBuf {
    let binary = Path::new(PLUGIN).with_file_name("meta-raft");
    assert!(
        binary.exists(),
        "{} is missing: build it first with `cargo build -p meta-raft` (the tests run real metadata members)",
        binary.display()
    );
    binary
}

/// A channel to a unix socket.
pub async fn connect(path: &Path) -> Channel {
    csi_plugin::server::dial(path).await.expect("connecting to the plugin socket")
}

/// A running plugin process.
pub struct Plugin {
    pub socket: PathBuf,
    pub log: PathBuf,
    /// `--meta` and the rest of the command line, for restarts.
    meta: String,
    args: Vec<String>,
    env: Vec<(String, String)>,
    child: Option<Child>,
}

impl Plugin {
    /// Starts `csi-plugin` with `args` (plus `--endpoint` and `--meta`) and
    /// waits until it answers on its socket.
    pub async fn start(dir: &Path, name: &str, meta: &str, args: &[&str], env: &[(&str, &str)]) -> Self {
        let log = dir.join(format!("{name}.log"));
        std::fs::File::create(&log).expect("creating the plugin log");
        let mut plugin = Self {
            socket: dir.join(format!("{name}.sock")),
            log,
            meta: meta.to_string(),
            args: args.iter().map(|a| a.to_string()).collect(),
            env: env.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect(),
            child: None,
        };
        plugin.spawn().await;
        plugin
    }

    /// Starts the process (its log appended to) and waits until it answers.
    async fn spawn(&mut self) {
        let log = std::fs::OpenOptions::new().append(true).open(&self.log).expect("opening the plugin log");
        let child = Command::new(PLUGIN)
            .arg("--endpoint")
            .arg(format!("unix://{}", self.socket.display()))
            .args(["--meta", &self.meta])
            .args(&self.args)
            .envs(self.env.iter().map(|(k, v)| (k, v)))
            .env("RUST_LOG", "info,csi_plugin=debug")
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .expect("spawning csi-plugin");
        self.child = Some(child);
        self.wait_ready().await;
    }

    /// SIGKILLs the plugin, as a crash or an OOM kill would, and starts it
    /// again with the same command line (its old socket file left behind).
    pub async fn crash_and_restart(&mut self) {
        let mut child = self.child.take().expect("plugin is running");
        child.kill().expect("killing the plugin");
        child.wait().expect("waiting for the plugin");
        self.spawn().await;
    }

    async fn wait_ready(&mut self) {
        for _ in 0..200 {
            if let Some(status) = self.child.as_mut().and_then(|c| c.try_wait().expect("polling the plugin")) {
                panic!("csi-plugin exited with {status}:\n{}", self.log_text());
            }
            if UnixStream::connect(&self.socket).await.is_ok() {
                return;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        panic!("csi-plugin did not listen on {} within 10 s:\n{}", self.socket.display(), self.log_text());
    }

    pub fn log_text(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// The log (at debug level) names `volume_id`, and no secret anywhere.
    #[track_caller]
    pub fn assert_logged_without_secrets(&self, volume_id: &str) {
        let log = self.log_text();
        assert!(log.contains(volume_id), "the log does not mention {volume_id}:\n{log}");
        assert!(!log.contains(SECRET_VALUE), "a secret was logged:\n{log}");
    }

    pub async fn channel(&self) -> Channel {
        connect(&self.socket).await
    }

    pub async fn identity(&self) -> IdentityClient<Channel> {
        IdentityClient::new(self.channel().await)
    }

    pub async fn controller(&self) -> ControllerClient<Channel> {
        ControllerClient::new(self.channel().await)
    }

    pub async fn group_controller(&self) -> GroupControllerClient<Channel> {
        GroupControllerClient::new(self.channel().await)
    }

    pub async fn node(&self) -> NodeClient<Channel> {
        NodeClient::new(self.channel().await)
    }

    /// SIGTERMs the plugin and waits for it.
    pub fn stop(&mut self) -> std::process::ExitStatus {
        let mut child = self.child.take().expect("plugin is running");
        let pid = nix::unistd::Pid::from_raw(child.id() as i32);
        let _ = nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGTERM);
        child.wait().expect("waiting for the plugin")
    }

    pub fn try_wait(&mut self) -> Option<std::process::ExitStatus> {
        self.child.as_mut().and_then(|c| c.try_wait().expect("polling the plugin"))
    }
}

impl Drop for Plugin {
    fn drop(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
        if std::thread::panicking() {
            eprintln!("--- csi-plugin log ({}) ---\n{}", self.log.display(), self.log_text());
        }
    }
}

/// A metadata cluster and a plugin in front of it. Field order matters:
/// the plugin stops before the cluster, the directory goes last.
pub struct Harness {
    pub plugin: Plugin,
    pub cluster: LocalMetaCluster,
    pub meta: MetaClient,
    pub dir: tempfile::TempDir,
}

impl Harness {
    pub async fn start(args: &[&str]) -> Self {
        Self::start_with(args, &[]).await
    }

    /// `{dir}` in `args` and `env` values stands for the harness directory.
    pub async fn start_with(args: &[&str], env: &[(&str, &str)]) -> Self {
        let dir = tempfile::tempdir().expect("temp dir");
        let cluster = LocalMetaCluster::start(&meta_raft_binary(), dir.path(), 3, &[]).await;
        let meta = cluster.client();
        let endpoints = cluster.endpoints().join(",");
        let here = dir.path().to_str().expect("utf-8 temp dir");
        let args: Vec<String> = args.iter().map(|a| a.replace("{dir}", here)).collect();
        let args: Vec<&str> = args.iter().map(String::as_str).collect();
        let env: Vec<(&str, String)> = env.iter().map(|(k, v)| (*k, v.replace("{dir}", here))).collect();
        let env: Vec<(&str, &str)> = env.iter().map(|(k, v)| (*k, v.as_str())).collect();
        let plugin = Plugin::start(dir.path(), "csi", &endpoints, &args, &env).await;
        Self { plugin, cluster, meta, dir }
    }

    pub fn meta_list(&self) -> String {
        self.cluster.endpoints().join(",")
    }

    /// Registers a CSI node, as its node plugin does at startup.
    pub async fn register_node(&self, node_id: &str, max_volumes: u64) {
        self.meta
            .register_node(pb::RegisterNodeRequest { node_id: node_id.into(), max_volumes, topology: HashMap::new() })
            .await
            .expect("RegisterNode");
    }

    /// Registers `count` chunk servers of `capacity` bytes each.
    pub async fn add_servers(&self, count: usize, capacity: u64) {
        for i in 0..count {
            self.meta
                .register_chunk_server(pb::RegisterChunkServerRequest {
                    id: format!("cs{i}"),
                    address: format!("127.0.0.1:{}", 7400 + i),
                    capacity_bytes: capacity,
                    labels: HashMap::new(),
                    ..Default::default()
                })
                .await
                .expect("registering a chunk server");
        }
    }
}

impl Drop for Harness {
    fn drop(&mut self) {
        release_mounts_and_loops(self.dir.path());
    }
}

/// Unmounts everything under `dir` (deepest first) and detaches the loop
/// devices backed by files under it, so that a failed node test leaves
/// nothing behind.
pub fn release_mounts_and_loops(dir: &Path) {
    let root = std::fs::canonicalize(dir).unwrap_or_else(|_| dir.to_path_buf());
    if let Ok(table) = csi_plugin::node::mounts::mount_table() {
        for entry in table.iter().rev().filter(|m| m.mount_point.starts_with(&root)) {
            let _ = nix::mount::umount2(&entry.mount_point, nix::mount::MntFlags::MNT_DETACH);
        }
    }
    let Ok(listing) = Command::new("losetup").args(["-n", "-O", "NAME,BACK-FILE", "-l"]).output() else { return };
    for line in String::from_utf8_lossy(&listing.stdout).lines() {
        let mut fields = line.split_whitespace();
        if let (Some(device), Some(file)) = (fields.next(), fields.next()) {
            if Path::new(file).starts_with(&root) {
                let _ = Command::new("losetup").args(["-d", device]).status();
            }
        }
    }
}

pub fn mount_cap(fs: &str, mode: Mode) -> csi::VolumeCapability {
    csi_plugin::capability::mount(fs, mode)
}

pub fn block_cap(mode: Mode) -> csi::VolumeCapability {
    csi_plugin::capability::block(mode)
}

pub fn range(required: i64, limit: i64) -> Option<csi::CapacityRange> {
    Some(csi::CapacityRange { required_bytes: required, limit_bytes: limit })
}

pub fn create_request(name: &str, size: i64) -> csi::CreateVolumeRequest {
    csi::CreateVolumeRequest {
        name: name.to_string(),
        capacity_range: range(size, 0),
        volume_capabilities: vec![mount_cap("ext4", Mode::SingleNodeWriter)],
        ..Default::default()
    }
}

/// Operation secrets, as the sidecars and the kubelet pass them from the
/// StorageClass's secret references.
pub fn secrets() -> HashMap<String, String> {
    params(&[("username", "ballast"), ("password", SECRET_VALUE)])
}

pub fn params(pairs: &[(&str, &str)]) -> HashMap<String, String> {
    pairs.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect()
}

/// The gRPC code of a failed call; panics if it succeeded.
#[track_caller]
pub fn code<T: std::fmt::Debug>(result: Result<tonic::Response<T>, tonic::Status>) -> tonic::Code {
    match result {
        Ok(reply) => panic!("expected an error, got {:?}", reply.into_inner()),
        Err(status) => status.code(),
    }
}
