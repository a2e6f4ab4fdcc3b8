//! `ballast dev up|down`: a whole cluster as processes on loopback, with all
//! state under one directory. (Tests may put the metadata members and the
//! chunk servers in network namespaces of their own: [`Layout`].)
//!
//! Layout of DIR: `cluster.json` (what runs: name, pid, address),
//! `cluster.env` (`BALLAST_META=...`, `BALLAST_TLS_DIR=...`,
//! `BALLAST_CSI_SOCKET=...`), `logs/`, `tls/` (the cluster's certificate
//! authority and a certificate for each process, plus `tls/admin` for
//! clients) and one data directory per process. `up` on a directory that
//! holds a cluster starts what is not running with the same command lines
//! (ports, data), so `up` twice or after `down` gives back the same cluster.
//! Every connection is mutual TLS unless the cluster is started insecure.

use std::collections::BTreeSet;
use std::fs;
use std::net::{IpAddr, Ipv4Addr, SocketAddr, TcpListener};
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::Mutex;
use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use ballast_proto::frame::Connector;
use ballast_proto::meta as pb;
use ballast_tls::pki::{Authority, DEFAULT_VALIDITY};
use ballast_tls::{Identity, Role, TlsDir};
use meta_client::MetaClient;
use nix::sys::signal::{kill, Signal};
use nix::unistd::Pid;
use serde::{Deserialize, Serialize};

const STATE_FILE: &str = "cluster.json";
const ENV_FILE: &str = "cluster.env";
const READY_TIMEOUT: Duration = Duration::from_secs(60);
const STOP_TIMEOUT: Duration = Duration::from_secs(15);
/// The node id of the CSI plugin of a development cluster.
pub const DEV_NODE_ID: &str = "dev-node";

#[derive(Debug, Serialize, Deserialize)]
pub struct Process {
    pub name: String,
    pub binary: String,
    pub pid: u32,
    pub address: String,
    /// Its command line, to start it again.
    #[serde(default)]
    pub args: Vec<String>,
    /// The network namespace it runs in (`ip netns` name); none: this one.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub netns: Option<String>,
}

#[derive(Debug, Default, Serialize, Deserialize)]
pub struct ClusterState {
    pub processes: Vec<Process>,
    pub meta: Vec<String>,
    pub csi_socket: Option<String>,
    /// The certificate directory clients use (role admin); none: the
    /// cluster runs without TLS.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tls_dir: Option<PathBuf>,
}

impl ClusterState {
    /// A metadata client, over TLS with the admin certificate if the
    /// cluster has one.
    pub fn meta_client(&self) -> anyhow::Result<MetaClient> {
        self.meta_client_of(self.meta.clone())
    }

    /// A metadata client of some of the members.
    pub fn meta_client_of(&self, endpoints: Vec<String>) -> anyhow::Result<MetaClient> {
        Ok(MetaClient::new(endpoints)?.with_tls_dir(self.tls_dir.as_deref())?)
    }
}

pub struct UpOptions {
    pub dir: PathBuf,
    pub meta: usize,
    pub storage: usize,
    /// Where the daemons' binaries are; defaults to this executable's directory.
    pub bin_dir: PathBuf,
    pub layout: Layout,
    /// Plaintext everywhere, no certificates.
    pub insecure: bool,
}

/// The certificates of a development cluster, under `DIR/tls`.
struct DevCertificates {
    dir: PathBuf,
    authority: Authority,
}

impl DevCertificates {
    fn create(cluster_dir: &Path) -> anyhow::Result<DevCertificates> {
        let dir = cluster_dir.join("tls");
        let authority = Authority::create(&dir.join("ca"), "dev").context("creating the cluster's authority")?;
        Ok(DevCertificates { dir, authority })
    }

    /// The authority of the cluster in `cluster_dir`, made by `create`.
    fn open(cluster_dir: &Path) -> anyhow::Result<DevCertificates> {
        let dir = cluster_dir.join("tls");
        let authority = Authority::load(&dir.join("ca")).context("loading the cluster's authority")?;
        Ok(DevCertificates { dir, authority })
    }

    /// Issues `role`/`name` a certificate in `DIR/tls/NAME`.
    fn issue_into(&self, role: Role, name: &str) -> anyhow::Result<PathBuf> {
        let out = self.dir.join(name);
        self.authority.issue(&Identity::new(role, name)?, &[], DEFAULT_VALIDITY, &out)?;
        Ok(out)
    }

    /// Issues `role`/`name` a certificate; returns `--tls-dir DIR`.
    fn issue(&self, role: Role, name: &str) -> anyhow::Result<Vec<String>> {
        Ok(vec!["--tls-dir".into(), self.issue_into(role, name)?.display().to_string()])
    }
}

/// Where a kind of daemon runs: a network namespace (none: this one) and
/// the address it listens on there.
#[derive(Clone, Debug)]
pub struct Host {
    pub netns: Option<String>,
    pub ip: IpAddr,
}

impl Default for Host {
    fn default() -> Self {
        Host { netns: None, ip: IpAddr::V4(Ipv4Addr::LOCALHOST) }
    }
}

/// Where the metadata members and the chunk servers run: everything on
/// loopback by default; tests put them in network namespaces to cut the
/// network between them.
#[derive(Clone, Debug, Default)]
pub struct Layout {
    pub meta: Host,
    /// Chunk server `i` runs on `storage[i]`, or on the last entry when
    /// the list is shorter (empty: loopback).
    pub storage: Vec<Host>,
}

impl Layout {
    fn storage(&self, i: usize) -> Host {
        self.storage.get(i).or(self.storage.last()).cloned().unwrap_or_default()
    }
}

fn is_running(process: &Process) -> bool {
    if process.pid == 0 {
        return false;
    }
    // Gone, a zombie or dead: not running. A killed process's leader turns
    // zombie before its other threads have exited and released its files
    // (and the locks on them): every thread must be.
    let Ok(threads) = fs::read_dir(format!("/proc/{}/task", process.pid)) else {
        return false;
    };
    let exited =
        |stat: String| stat.rsplit_once(')').is_some_and(|(_, rest)| rest.trim_start().starts_with(['Z', 'X']));
    let live_threads =
        threads.flatten().filter(|t| fs::read_to_string(t.path().join("stat")).is_ok_and(|stat| !exited(stat))).count();
    if live_threads == 0 {
        return false;
    }
    let cmdline = fs::read(format!("/proc/{}/cmdline", process.pid)).unwrap_or_default();
    let argv0 = cmdline.split(|b| *b == 0).next().unwrap_or_default();
    // Right after spawn the program is not loaded yet and the command line
    // is empty; a recycled pid runs some other program.
    argv0.is_empty()
        || Path::new(std::str::from_utf8(argv0).unwrap_or_default()).file_name()
            == Path::new(&process.binary).file_name()
}

fn read_state(dir: &Path) -> anyhow::Result<Option<ClusterState>> {
    match fs::read(dir.join(STATE_FILE)) {
        Ok(bytes) => Ok(Some(serde_json::from_slice(&bytes).context("reading cluster.json")?)),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
        Err(e) => Err(e).context("reading cluster.json"),
    }
}

fn write_state(dir: &Path, state: &ClusterState) -> anyhow::Result<()> {
    fs::write(dir.join(STATE_FILE), serde_json::to_vec_pretty(state)?).context("writing cluster.json")
}

impl Process {
    fn new(name: String, binary: &str, address: &str, args: Vec<String>, host: &Host) -> Process {
        Process { name, binary: binary.into(), pid: 0, address: address.into(), args, netns: host.netns.clone() }
    }
}

/// Starts `process` and records it in the cluster's state file.
fn start(dir: &Path, bin_dir: &Path, state: &mut ClusterState, mut process: Process) -> anyhow::Result<()> {
    process.pid = spawn(dir, bin_dir, &process)?;
    state.processes.push(process);
    write_state(dir, state)
}

/// Starts `process` (its binary, arguments and namespace); returns its pid.
fn spawn(dir: &Path, bin_dir: &Path, process: &Process) -> anyhow::Result<u32> {
    let path = bin_dir.join(&process.binary);
    if !path.exists() {
        bail!("{} not found; build the workspace first (cargo build --release)", path.display());
    }
    // Appended to: a restarted process keeps its predecessor's log.
    let log = fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(dir.join("logs").join(format!("{}.log", process.name)))?;
    let mut command = Command::new(&path);
    if let Some(netns) = &process.netns {
        let namespace = fs::File::open(Path::new("/run/netns").join(netns))
            .with_context(|| format!("opening network namespace {netns}"))?;
        // SAFETY: between fork and exec the child only calls setns, which
        // is async-signal-safe, on a descriptor it inherited.
        unsafe {
            command.pre_exec(move || {
                nix::sched::setns(&namespace, nix::sched::CloneFlags::CLONE_NEWNET).map_err(std::io::Error::from)
            });
        }
    }
    let child = command
        .args(&process.args)
        .stdin(Stdio::null())
        .stdout(log.try_clone()?)
        .stderr(log)
        // Its own process group: the cluster outlives this command and the
        // terminal's Ctrl-C.
        .process_group(0)
        .spawn()
        .with_context(|| format!("starting {}", path.display()))?;
    Ok(child.id())
}

pub async fn up(options: UpOptions) -> anyhow::Result<ClusterState> {
    let dir = &options.dir;
    if options.meta == 0 {
        bail!("a cluster needs at least one metadata member");
    }
    if let Some(state) = read_state(dir)? {
        return resume(dir, state, &options).await;
    }
    fs::create_dir_all(dir.join("logs"))?;
    let dir = fs::canonicalize(dir)?;
    let mut state = ClusterState::default();
    let certificates = if options.insecure {
        eprintln!(
            "warning: starting the cluster without TLS: anyone who reaches its ports can read and change every volume"
        );
        None
    } else {
        Some(DevCertificates::create(&dir)?)
    };
    // `--tls-dir` for a process, or `--insecure` for a server of an
    // insecure cluster (clients need no flag).
    let tls_args = |role: Role, name: &str| -> anyhow::Result<Vec<String>> {
        match &certificates {
            Some(c) => c.issue(role, name),
            None if matches!(role, Role::Meta | Role::Storage) => Ok(vec!["--insecure".into()]),
            None => Ok(Vec::new()),
        }
    };
    if certificates.is_some() {
        tls_args(Role::Admin, "admin")?;
        state.tls_dir = Some(dir.join("tls").join("admin"));
    }

    // Metadata members' gRPC, each chunk server's data and metrics, then
    // the members' metrics.
    let ports = free_ports(2 * options.meta + 2 * options.storage);
    let meta_host = &options.layout.meta;
    let meta_addrs: Vec<String> =
        ports[..options.meta].iter().map(|p| SocketAddr::new(meta_host.ip, *p).to_string()).collect();
    let bootstrap: Vec<String> = meta_addrs.iter().enumerate().map(|(i, a)| format!("{}={a}", i + 1)).collect();
    let bootstrap = bootstrap.join(",");
    state.meta = meta_addrs.clone();
    for (i, addr) in meta_addrs.iter().enumerate() {
        let name = format!("meta{}", i + 1);
        let metrics = SocketAddr::new(meta_host.ip, ports[options.meta + 2 * options.storage + i]).to_string();
        let mut args = vec![
            "serve".into(),
            "--id".into(),
            (i + 1).to_string(),
            "--listen".into(),
            addr.clone(),
            "--data-dir".into(),
            dir.join(&name).display().to_string(),
            "--bootstrap".into(),
            bootstrap.clone(),
            "--metrics-addr".into(),
            metrics,
        ];
        args.extend(tls_args(Role::Meta, &name)?);
        let process = Process::new(name, "meta-raft", addr, args, meta_host);
        start(&dir, &options.bin_dir, &mut state, process)?;
    }
    let meta_list = meta_addrs.join(",");
    for i in 0..options.storage {
        let name = format!("storage{}", i + 1);
        let host = options.layout.storage(i);
        let addr = SocketAddr::new(host.ip, ports[options.meta + 2 * i]).to_string();
        let metrics = SocketAddr::new(host.ip, ports[options.meta + 2 * i + 1]).to_string();
        let mut args = vec![
            "serve".into(),
            "--listen".into(),
            addr.clone(),
            "--data-dir".into(),
            dir.join(&name).display().to_string(),
            "--meta".into(),
            meta_list.clone(),
            "--metrics-addr".into(),
            metrics,
            "--labels".into(),
            format!("host={name}"),
        ];
        args.extend(tls_args(Role::Storage, &name)?);
        let process = Process::new(name, "storage-server", &addr, args, &host);
        start(&dir, &options.bin_dir, &mut state, process)?;
    }

    let csi_dir = dir.join("csi");
    fs::create_dir_all(&csi_dir)?;
    let socket = csi_dir.join("csi.sock");
    let csi_metrics = format!("127.0.0.1:{}", free_ports(1)[0]);
    let mut args = vec![
        "--mode".into(),
        "all".into(),
        "--endpoint".into(),
        format!("unix://{}", socket.display()),
        "--node-id".into(),
        DEV_NODE_ID.into(),
        "--meta".into(),
        meta_list.clone(),
        "--nbd-client-bin".into(),
        options.bin_dir.join("nbd-client").display().to_string(),
        "--nbd-state-dir".into(),
        dir.join("nbd").display().to_string(),
        "--state-dir".into(),
        csi_dir.join("state").display().to_string(),
        "--metrics-addr".into(),
        csi_metrics,
    ];
    // Controller and node in one process: a certificate names one role,
    // and only the admin role covers both.
    args.extend(tls_args(Role::Admin, "csi")?);
    let process =
        Process::new("csi".into(), "csi-plugin", &format!("unix://{}", socket.display()), args, &Host::default());
    start(&dir, &options.bin_dir, &mut state, process)?;
    state.csi_socket = Some(socket.display().to_string());
    write_state(&dir, &state)?;

    wait_ready(&state, options.storage).await?;
    write_env(&dir, &state)?;
    Ok(state)
}

/// `cluster.env`: what a shell needs to talk to the running cluster.
fn write_env(dir: &Path, state: &ClusterState) -> anyhow::Result<()> {
    let mut env = format!("BALLAST_META={}\n", state.meta.join(","));
    if let Some(tls) = &state.tls_dir {
        env.push_str(&format!("BALLAST_TLS_DIR={}\n", tls.display()));
    }
    if let Some(socket) = &state.csi_socket {
        env.push_str(&format!("BALLAST_CSI_SOCKET={socket}\n"));
    }
    fs::write(dir.join(ENV_FILE), env).context("writing cluster.env")
}

/// `up` on a directory that already holds a cluster: the processes that
/// are not running start again with their command lines (same ports, same
/// data), so running `up` twice, or after `down`, gives the same cluster.
async fn resume(dir: &Path, mut state: ClusterState, options: &UpOptions) -> anyhow::Result<ClusterState> {
    let storage = state.processes.iter().filter(|p| p.binary == "storage-server").count();
    if state.meta.len() != options.meta || storage != options.storage {
        bail!(
            "{} holds a cluster of {} metadata members and {storage} chunk servers, not {} and {}; \
             stop it (`ballast dev down --dir {0}`) and remove the directory to start another",
            dir.display(),
            state.meta.len(),
            options.meta,
            options.storage
        );
    }
    let dir = fs::canonicalize(dir)?;
    // A cluster made before servers had to be told: it was plaintext.
    for process in &mut state.processes {
        let server = matches!(process.binary.as_str(), "meta-raft" | "storage-server");
        if server && !process.args.iter().any(|a| a == "--tls-dir" || a == "--insecure") {
            process.args.push("--insecure".into());
        }
    }
    for i in 0..state.processes.len() {
        let process = &state.processes[i];
        if !is_running(process) {
            let pid = spawn(&dir, &options.bin_dir, process)?;
            state.processes[i].pid = pid;
            write_state(&dir, &state)?;
        }
    }
    wait_ready(&state, options.storage).await?;
    write_env(&dir, &state)?;
    Ok(state)
}

async fn wait_ready(state: &ClusterState, storage: usize) -> anyhow::Result<()> {
    let client = state.meta_client()?.with_deadline(Duration::from_secs(2));
    let started = Instant::now();
    let mut last_problem = String::from("not checked yet");
    while started.elapsed() < READY_TIMEOUT {
        if let Some(dead) = state.processes.iter().find(|p| !is_running(p)) {
            bail!("{} (pid {}) exited during startup; see its log under logs/", dead.name, dead.pid);
        }
        match client.list_chunk_servers(pb::ListChunkServersRequest {}).await {
            Ok(reply) => {
                let alive = reply.servers.iter().filter(|s| s.alive).count();
                let csi_ready = state.csi_socket.as_ref().is_none_or(|s| Path::new(s).exists());
                if alive >= storage && csi_ready {
                    return Ok(());
                }
                last_problem = format!("{alive} of {storage} chunk servers registered");
            }
            Err(status) => last_problem = status.message().to_string(),
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    bail!("cluster not ready after {READY_TIMEOUT:?}: {last_problem}")
}

/// Stops everything `up` started in `dir`: SIGTERM, then SIGKILL for
/// whatever has not exited in time. Returns the names stopped.
pub fn down(dir: &Path) -> anyhow::Result<Vec<String>> {
    let Some(state) = read_state(dir)? else {
        return Ok(Vec::new());
    };
    release_devices(dir, &state);
    let running: Vec<&Process> = state.processes.iter().filter(|p| is_running(p)).collect();
    for process in &running {
        let _ = kill(Pid::from_raw(process.pid as i32), Signal::SIGTERM);
    }
    let deadline = Instant::now() + STOP_TIMEOUT;
    while running.iter().any(|p| is_running(p)) && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(100));
    }
    for process in running.iter().filter(|p| is_running(p)) {
        let _ = kill(Pid::from_raw(process.pid as i32), Signal::SIGKILL);
    }
    let stopped = running.iter().map(|p| p.name.clone()).collect();
    // The command lines stay for the next `up`; pid 0 is "not running", so
    // a recycled pid is never taken for one of ours.
    let mut state = state;
    state.processes.iter_mut().for_each(|p| p.pid = 0);
    write_state(dir, &state)?;
    let _ = fs::remove_file(dir.join(ENV_FILE));
    Ok(stopped)
}

/// Unmounts and unmaps every device the cluster's CSI plugin (or anyone
/// using its state directory) mapped, so no mount, loop device or FUSE
/// mount outlives the cluster.
fn release_devices(dir: &Path, state: &ClusterState) {
    let nbd_state = dir.join("nbd");
    let Ok(mappings) = nbd_records::mapping::StateDir::new(&nbd_state).and_then(|s| s.all()) else {
        return;
    };
    let bin = state
        .processes
        .iter()
        .find(|p| p.binary == "csi-plugin")
        .and_then(|p| fs::read_link(format!("/proc/{}/exe", p.pid)).ok())
        .and_then(|exe| exe.parent().map(|d| d.join("nbd-client")));
    for mapping in mappings {
        // Bind mounts first (newest first), then the device's own mount.
        let mut mounts = nbd_records::mapping::mount_points(&mapping.device);
        mounts.reverse();
        for mount in mounts {
            let _ = nix::mount::umount2(mount.as_str(), nix::mount::MntFlags::MNT_DETACH);
        }
        if let Some(bin) = &bin {
            let _ = Command::new(bin).arg("unmap").arg(&mapping.volume_id).arg("--state-dir").arg(&nbd_state).output();
        }
    }
}

/// A development cluster that is stopped when dropped: for tests of every
/// crate that needs real metadata members and chunk servers.
pub struct DevCluster {
    pub dir: PathBuf,
    pub state: ClusterState,
    bin_dir: PathBuf,
}

/// Where cargo put the workspace binaries, seen from a test executable
/// (`target/<profile>/deps/<test>`).
pub fn workspace_bin_dir() -> PathBuf {
    let exe = std::env::current_exe().expect("current executable");
    let dir = exe.parent().expect("executable directory");
    if dir.ends_with("deps") {
        dir.parent().expect("profile directory").to_path_buf()
    } else {
        dir.to_path_buf()
    }
}

impl DevCluster {
    pub async fn start(dir: &Path, meta: usize, storage: usize) -> anyhow::Result<DevCluster> {
        DevCluster::start_in(dir, meta, storage, Layout::default()).await
    }

    /// Like [`DevCluster::start`], with the daemons where `layout` puts them.
    pub async fn start_in(dir: &Path, meta: usize, storage: usize, layout: Layout) -> anyhow::Result<DevCluster> {
        let bin_dir = workspace_bin_dir();
        let options =
            UpOptions { dir: dir.to_path_buf(), meta, storage, bin_dir: bin_dir.clone(), layout, insecure: false };
        match up(options).await {
            Ok(state) => Ok(DevCluster { dir: dir.to_path_buf(), state, bin_dir }),
            Err(e) => {
                let _ = down(dir);
                Err(e)
            }
        }
    }

    pub fn meta_endpoints(&self) -> String {
        self.state.meta.join(",")
    }

    /// A metadata client with the admin certificate.
    pub fn meta(&self) -> MetaClient {
        self.state.meta_client().expect("valid endpoints and certificate")
    }

    /// A metadata client of one member, with the admin certificate.
    pub fn meta_at(&self, endpoint: &str) -> MetaClient {
        self.state.meta_client_of(vec![endpoint.to_string()]).expect("valid endpoint and certificate")
    }

    /// `--meta ENDPOINTS --tls-dir ADMIN`: how a `ballast` or `nbd-client`
    /// command reaches this cluster.
    pub fn client_args(&self) -> Vec<String> {
        let mut args = vec!["--meta".to_string(), self.meta_endpoints()];
        args.extend(self.tls_args());
        args
    }

    /// `--tls-dir ADMIN`, if the cluster has certificates.
    pub fn tls_args(&self) -> Vec<String> {
        match &self.state.tls_dir {
            Some(dir) => vec!["--tls-dir".to_string(), dir.display().to_string()],
            None => Vec::new(),
        }
    }

    /// A certificate of this cluster's authority for `role`/`name` (a
    /// node's, say), issued into `DIR/tls/NAME`.
    pub fn certificate(&self, role: Role, name: &str) -> anyhow::Result<TlsDir> {
        let dir = DevCertificates::open(&self.dir)?.issue_into(role, name)?;
        Ok(TlsDir::open(dir)?)
    }

    /// Connects to chunk servers with the admin certificate.
    pub fn chunk_servers(&self) -> Connector {
        match &self.state.tls_dir {
            Some(dir) => Connector::tls(&TlsDir::open(dir).expect("the admin certificate")).expect("TLS set-up"),
            None => Connector::plaintext(),
        }
    }

    /// Where `name` serves its Prometheus metrics, if it does.
    pub fn metrics_address(&self, name: &str) -> Option<String> {
        let args = &self.process(name).args;
        args.iter().position(|a| a == "--metrics-addr").and_then(|at| args.get(at + 1)).cloned()
    }

    pub fn process(&self, name: &str) -> &Process {
        self.state.processes.iter().find(|p| p.name == name).unwrap_or_else(|| panic!("no process {name}"))
    }

    /// SIGKILLs one process (e.g. `storage2`) and waits until it is gone.
    pub fn kill(&self, name: &str) {
        let process = self.process(name);
        let _ = kill(Pid::from_raw(process.pid as i32), Signal::SIGKILL);
        while is_running(process) {
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// Starts a stopped process (e.g. after [`DevCluster::kill`]) again
    /// with the same command line and data.
    pub fn restart(&mut self, name: &str) -> anyhow::Result<()> {
        let process = self.process(name);
        // A process killed elsewhere may still be tearing its threads down.
        let deadline = Instant::now() + Duration::from_secs(10);
        while is_running(process) {
            if Instant::now() > deadline {
                bail!("{name} is still running (pid {})", process.pid);
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        let pid = spawn(&self.dir, &self.bin_dir, process)?;
        if let Some(process) = self.state.processes.iter_mut().find(|p| p.name == name) {
            process.pid = pid;
        }
        write_state(&self.dir, &self.state)
    }
}

impl Drop for DevCluster {
    fn drop(&mut self) {
        if let Err(e) = down(&self.dir) {
            eprintln!("stopping the cluster in {}: {e:#}", self.dir.display());
        }
    }
}

/// Ports that were free a moment ago. They come from below the kernel's
/// ephemeral range, so outgoing connections (which take their source port
/// from that range) cannot grab one before its server binds it, and this
/// process never hands out the same port twice: clusters started side by
/// side (tests) would otherwise race for a port that is free between the
/// pick and the bind.
pub fn free_ports(count: usize) -> Vec<u16> {
    static HANDED_OUT: Mutex<BTreeSet<u16>> = Mutex::new(BTreeSet::new());
    let mut handed_out = HANDED_OUT.lock().expect("port registry poisoned");
    assert!(handed_out.len() + count < 20_000, "this process has used up the ports below 32000");
    let mut listeners: Vec<TcpListener> = Vec::with_capacity(count);
    while listeners.len() < count {
        let port = rand::random_range(10_000..32_000);
        if handed_out.contains(&port) {
            continue;
        }
        if let Ok(listener) = TcpListener::bind(("127.0.0.1", port)) {
            handed_out.insert(port);
            listeners.push(listener);
        }
    }
    listeners.iter().map(|l| l.local_addr().expect("local addr").port()).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn no_port_is_handed_out_twice() {
        // 2000 random picks among 22000 ports would repeat dozens of times.
        let mut seen = BTreeSet::new();
        for _ in 0..100 {
            for port in free_ports(20) {
                assert!(seen.insert(port), "port {port} handed out twice");
            }
        }
    }
}
