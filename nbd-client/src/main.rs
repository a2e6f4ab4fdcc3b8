//! `nbd-client`: serve a Ballast volume over NBD, or map it as a block
//! device on this node.

use std::path::PathBuf;
use std::process::Stdio;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use ballast_telemetry::LogFormat;
use clap::{Args, Parser, Subcommand, ValueEnum};
use meta_client::ClientArgs;
use meta_client::MetaClient;
use nbd_client::attach::{self, AttachMethod, AttachOptions, AttachedDevice};
use nbd_client::engine::Volume;
use nbd_client::mapping::{self, Mapping, StateDir, DEFAULT_STATE_DIR};
use nbd_client::nbd::{ExportOptions, NbdServer};
use nbd_client::volume_service::{self, OpenOptions, Opened};
use nbd_client::{handover, standby};
use tokio::net::UnixListener;
use tokio::signal::unix::{signal, SignalKind};

#[derive(Parser)]
#[command(name = "nbd-client", version, about = "Ballast node data path: serve or map replicated volumes")]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Args, Clone)]
struct VolumeArgs {
    /// Volume id or name.
    volume: String,
    #[command(flatten)]
    meta: ClientArgs,
    /// Fencing epoch of this node's attachment (from ControllerPublish); without it the
    /// volume is published to --node-id and unpublished again on exit.
    #[arg(long)]
    epoch: Option<u64>,
    #[arg(long, env = "BALLAST_NODE_ID", default_value_t = default_node_id())]
    node_id: String,
    #[arg(long)]
    readonly: bool,
    /// Fewest replicas a chunk may keep and still acknowledge writes.
    #[arg(long, default_value_t = 2)]
    min_replicas: usize,
    /// Seconds one replica may take for one request before it is dropped from the set.
    #[arg(long, default_value_t = 5)]
    replica_timeout: u64,
    /// Prometheus metrics address.
    #[arg(long, env = "BALLAST_NBD_METRICS_ADDR")]
    metrics_addr: Option<std::net::SocketAddr>,
    #[arg(long, env = "BALLAST_LOG_FORMAT", value_enum, default_value_t = LogFormat::Human)]
    log_format: LogFormat,
}

/// Whose device a serving process serves.
#[derive(Args, Clone, Copy, Default)]
struct Role {
    /// Stand by for serving process PID: take its device over when it dies,
    /// or when it asks (SIGUSR2).
    #[arg(long, value_name = "PID")]
    standby_for: Option<u32>,
    /// The attachment was published by a predecessor: unpublish it on unmap.
    #[arg(long)]
    inherits_attachment: bool,
}

/// How a mapped device is attached.
#[derive(Args, Clone, Copy)]
struct DeviceArgs {
    #[arg(long, value_enum, default_value_t = Method::Auto)]
    method: Method,
    /// How long the kernel gives one request before resending it on another
    /// connection (netlink devices): seconds, or with a unit (`1500ms`,
    /// `2s`); 0 keeps the kernel's 30 s. Bounds the I/O pause when the
    /// serving process is replaced.
    #[arg(long, default_value_t = IoTimeout(attach::DEFAULT_IO_TIMEOUT))]
    io_timeout: IoTimeout,
    /// When the volume's device is served by a live process: start a new
    /// one that takes the device over from it with its connections, so no
    /// request waits (an upgrade, a restart). Netlink devices only.
    #[arg(long)]
    take_over: bool,
    /// Run no standby process beside the serving one. A standby takes the
    /// device over the moment the serving process dies, and with no pause
    /// when it is stopped (SIGTERM). Netlink devices only.
    #[arg(long)]
    no_standby: bool,
}

#[derive(Clone, Copy, ValueEnum)]
enum Method {
    Auto,
    Netlink,
    Ioctl,
    FuseLoop,
}

#[derive(Subcommand)]
enum Command {
    /// Export a volume over NBD for fio, qemu and libnbd tools.
    ///
    /// Example: nbd-client serve db --listen unix:/run/db.sock --meta 10.0.0.1:7101
    Serve {
        #[command(flatten)]
        volume: VolumeArgs,
        /// unix:PATH or tcp:HOST:PORT
        #[arg(long)]
        listen: String,
    },
    /// Attach a volume as a block device on this node; prints the device path.
    ///
    /// A background process serves the device; it outlives this command.
    Map {
        #[command(flatten)]
        volume: VolumeArgs,
        #[command(flatten)]
        device: DeviceArgs,
        #[arg(long, env = "BALLAST_NBD_STATE_DIR", default_value = DEFAULT_STATE_DIR)]
        state_dir: PathBuf,
    },
    /// Detach a mapped volume (by volume id, name or device path).
    Unmap {
        target: String,
        #[arg(long, env = "BALLAST_NBD_STATE_DIR", default_value = DEFAULT_STATE_DIR)]
        state_dir: PathBuf,
    },
    /// Grow a mapped volume's device to the volume's size in metadata (after
    /// `ballast volume expand`); prints the device's new size in bytes.
    Resize {
        /// Volume id, name or device path.
        target: String,
        #[command(flatten)]
        meta: ClientArgs,
        #[arg(long, env = "BALLAST_NBD_STATE_DIR", default_value = DEFAULT_STATE_DIR)]
        state_dir: PathBuf,
    },
    /// List mapped volumes.
    List {
        #[arg(long, env = "BALLAST_NBD_STATE_DIR", default_value = DEFAULT_STATE_DIR)]
        state_dir: PathBuf,
        #[arg(short = 'o', long = "output", default_value = "table")]
        output: String,
    },
    /// Say how `map` would attach a device on this host, and why.
    ///
    /// Exits non-zero when no way works.
    Probe {
        /// Run `modprobe nbd` first when the kernel's nbd driver is missing.
        #[arg(long)]
        load_module: bool,
        #[arg(short = 'o', long = "output", default_value = "text")]
        output: String,
    },
    /// The serving process `map` starts (not for direct use).
    #[command(hide = true)]
    ServeDevice {
        #[command(flatten)]
        volume: VolumeArgs,
        #[command(flatten)]
        device: DeviceArgs,
        #[arg(long)]
        state_dir: PathBuf,
        #[command(flatten)]
        role: Role,
    },
}

/// The logical block size of mapped devices.
const DEVICE_BLOCK_SIZE: u32 = ballast_proto::volume::BLOCK_SIZE as u32;

/// `--io-timeout`: `8` (seconds), `8s` or `1500ms`.
#[derive(Clone, Copy)]
struct IoTimeout(Duration);

impl std::str::FromStr for IoTimeout {
    type Err = String;

    fn from_str(text: &str) -> Result<Self, String> {
        let (number, unit) = match text.find(|c: char| !c.is_ascii_digit()) {
            Some(at) => text.split_at(at),
            None => (text, "s"),
        };
        let value: u64 = number.parse().map_err(|_| format!("{text:?} is not a duration such as 8, 8s or 1500ms"))?;
        match unit {
            "s" => Ok(IoTimeout(Duration::from_secs(value))),
            "ms" => Ok(IoTimeout(Duration::from_millis(value))),
            _ => Err(format!("unknown unit {unit:?} in {text:?}: use s or ms")),
        }
    }
}

impl std::fmt::Display for IoTimeout {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}ms", self.0.as_millis())
    }
}

fn default_node_id() -> String {
    nix::unistd::gethostname().ok().and_then(|h| h.into_string().ok()).unwrap_or_else(|| "localhost".into())
}

fn open_options(args: &VolumeArgs) -> OpenOptions {
    OpenOptions {
        epoch: args.epoch,
        node_id: args.node_id.clone(),
        readonly: args.readonly,
        min_replicas: args.min_replicas,
        replica_timeout: Duration::from_secs(args.replica_timeout),
    }
}

/// Logging and the metadata client: first in every daemon.
fn start_daemon(args: &VolumeArgs) -> anyhow::Result<MetaClient> {
    ballast_telemetry::init_tracing(args.log_format);
    Ok(args.meta.client()?)
}

/// Metrics, and the volume open for serving.
async fn open_for_serving(args: &VolumeArgs, meta: &MetaClient) -> anyhow::Result<Opened> {
    if let Some(addr) = args.metrics_addr {
        serve_metrics(addr).await;
    }
    let opened = volume_service::open(meta, &args.volume, &open_options(args)).await?;
    let info = opened.volume.info();
    tracing::info!(volume = %info.id, name = %info.name, size = info.size_bytes, replicas = info.replicas,
        epoch = opened.volume.epoch(), "volume open");
    Ok(opened)
}

/// Serves metrics on `addr`; while a predecessor still holds it (a
/// hand-over), keeps trying in the background.
async fn serve_metrics(addr: std::net::SocketAddr) {
    if ballast_telemetry::serve_metrics(addr).await.is_ok() {
        return;
    }
    tokio::spawn(async move {
        for _ in 0..60 {
            tokio::time::sleep(Duration::from_secs(1)).await;
            match ballast_telemetry::serve_metrics(addr).await {
                Ok(_) => return,
                Err(e) if e.kind() == std::io::ErrorKind::AddrInUse => {}
                Err(e) => return tracing::error!(%addr, error = %e, "cannot serve metrics"),
            }
        }
        tracing::error!(%addr, "cannot serve metrics: the address stayed in use");
    });
}

async fn serve(args: VolumeArgs, listen: String) -> anyhow::Result<()> {
    let meta = start_daemon(&args)?;
    let opened = open_for_serving(&args, &meta).await?;
    let options = if args.readonly { ExportOptions::read_only() } else { ExportOptions::read_write() };
    let server = Arc::new(NbdServer::single(opened.volume.clone(), options));
    let serving = {
        let server = server.clone();
        tokio::spawn(async move {
            match listen.split_once(':') {
                Some(("unix", path)) => server.serve_unix(path).await,
                Some(("tcp", addr)) => server.serve_tcp(addr).await,
                _ => Err(nbd_client::nbd::NbdError::Io(std::io::Error::other(format!(
                    "--listen must be unix:PATH or tcp:HOST:PORT, not {listen:?}"
                )))),
            }
        })
    };
    let mut serving = serving;
    let mut grow = signal(SignalKind::hangup())?;
    let shutdown = ballast_telemetry::shutdown_signal();
    tokio::pin!(shutdown);
    loop {
        tokio::select! {
            result = &mut serving => break result??,
            _ = &mut shutdown => {
                server.shutdown();
                break serving.await??;
            }
            // New connections learn the new size in their handshake.
            _ = grow.recv() => match opened.volume.refresh().await {
                Ok(size) => tracing::info!(size, "serving the volume's current size"),
                Err(e) => tracing::error!(error = %e, "cannot refresh the volume's size"),
            },
        }
    }
    opened.volume.flush().await?;
    opened.unpublish(&meta).await;
    Ok(())
}

fn attach_method(method: Method) -> AttachMethod {
    match method {
        Method::Auto => AttachMethod::Auto,
        Method::Netlink => AttachMethod::Netlink,
        Method::Ioctl => AttachMethod::Ioctl,
        Method::FuseLoop => AttachMethod::FuseLoop,
    }
}

/// The process behind a mapped device. SIGTERM hands a kernel nbd device
/// over: to the standby with its live connections if one is ready, else
/// the device stays configured for a successor to re-attach (`map` again,
/// or a restarted process); SIGUSR1 (sent by `unmap`) detaches it. A FUSE +
/// loop device cannot outlive its server, so SIGTERM detaches it too.
///
/// With `role.standby_for`, the process first stands by (see
/// [`nbd_client::standby`]) and serves only once it takes the device over.
async fn serve_device(
    mut args: VolumeArgs,
    device_args: DeviceArgs,
    state_dir: PathBuf,
    role: Role,
) -> anyhow::Result<()> {
    let state = StateDir::new(&state_dir)?;
    let meta = start_daemon(&args)?;
    let mut take_over = device_args.take_over;
    // A standby opens the volume before it is needed: connections made and
    // the capability in hand when every moment counts.
    let mut warm = None;
    if let Some(active) = role.standby_for {
        let opened = volume_service::open(&meta, &args.volume, &open_options(&args)).await?;
        match stand_by(&state, &args.volume, active).await? {
            Standing::Leave => return Ok(()),
            Standing::Crashed => {}
            Standing::Asked => take_over = true,
        }
        warm = Some(opened);
    }
    let predecessor = if take_over { Some(contact_predecessor(&state, &mut args).await?) } else { None };
    let mut opened = match warm {
        Some(opened) => {
            if let Some(addr) = args.metrics_addr {
                serve_metrics(addr).await;
            }
            opened
        }
        None => open_for_serving(&args, &meta).await?,
    };
    match nbd_client::cgroup::leave_pod() {
        Ok(Some(cgroup)) => {
            tracing::info!(%cgroup, "left the pod's cgroup: the volume outlives the node plugin's container")
        }
        Ok(None) => {}
        Err(e) => tracing::warn!(
            "cannot leave the pod's cgroup ({e}): stopping the node plugin's container will stop this volume"
        ),
    }
    if role.inherits_attachment || predecessor.as_ref().is_some_and(|(_, offer)| offer.published) {
        opened.inherit_publication(&args.node_id, opened.volume.epoch(), args.readonly);
    }
    let info = opened.volume.info().clone();
    let mut options = AttachOptions::new(info.id.clone());
    options.block_size = DEVICE_BLOCK_SIZE;
    options.method = attach_method(device_args.method);
    let configured_timeout = Some(device_args.io_timeout.0).filter(|t| !t.is_zero());
    let mut limited = opened.volume.limits().any();
    options.io_timeout = attach::io_timeout_for(configured_timeout, limited);
    options.read_only = args.readonly;
    options.fuse_root = state_dir.join("fuse");
    let mut device: AttachedDevice<Volume> = match predecessor {
        Some((successor, offer)) => {
            let (handed, receipt) = tokio::task::spawn_blocking(move || successor.take()).await??;
            // The predecessor served until now: learn what it allocated.
            opened.volume.reload_chunk_map().await?;
            // Named as the server before the predecessor exits, so that its
            // standby leaves the device to this process.
            state.save(&Mapping {
                volume_id: info.id.clone(),
                volume_name: info.name.clone(),
                device: format!("/dev/nbd{}", offer.index),
                method: attach::AttachKind::Netlink.to_string(),
                pid: std::process::id(),
                epoch: opened.volume.epoch(),
                resizable: true,
            })?;
            if let Err(e) = tokio::task::spawn_blocking(move || receipt.confirm()).await? {
                tracing::warn!(error = %e, "the predecessor did not hear that the device was taken over");
            }
            tracing::info!(index = offer.index, connections = handed.len(), "took the live device over");
            attach::adopt(opened.volume.clone(), offer.index, handed, options.clone()).await?
        }
        // A predecessor left the device configured: take it over.
        None => match attach::find_nbd_by_backend(&info.id) {
            Some(index) => {
                tracing::info!(index, "re-attaching to the live nbd device of this volume");
                // A standby opened the volume while the predecessor served.
                opened.volume.reload_chunk_map().await?;
                attach::reconnect(opened.volume.clone(), index, options.clone()).await?
            }
            None => attach::attach(opened.volume.clone(), options.clone()).await?,
        },
    };
    let handover = bind_handover(&state.handover_path(&info.id), device.kind())?;
    // Handlers first: the record tells `unmap` and `resize` they may signal.
    let mut term = signal(SignalKind::terminate())?;
    let mut unmap = signal(SignalKind::user_defined1())?;
    let mut grow = signal(SignalKind::hangup())?;
    let mapping = Mapping {
        volume_id: info.id.clone(),
        volume_name: info.name.clone(),
        device: device.path().display().to_string(),
        method: device.kind().to_string(),
        pid: std::process::id(),
        epoch: opened.volume.epoch(),
        resizable: true,
    };
    state.save(&mapping)?;
    tracing::info!(device = %mapping.device, method = %mapping.method, "volume mapped");
    let standby = (handover.is_some() && !device_args.no_standby).then(|| {
        let command =
            standby_command(&args, device_args, &state_dir, opened.volume.epoch(), opened.published.is_some());
        Standby::keep(command, state.log_path(&info.id))
    });
    // Set once SIGTERM asked the standby to take the device over: if it has
    // not come by then, the device is released instead.
    let mut handing_to_standby: Option<tokio::time::Instant> = None;
    let mut follow_limits = tokio::time::interval(nbd_client::engine::FOLLOW_INTERVAL);
    loop {
        let detach = tokio::select! {
            // The volume's limits change while it is served.
            _ = follow_limits.tick() => {
                if opened.volume.limits().any() != limited {
                    limited = !limited;
                    if let Some(timeout) = attach::io_timeout_for(configured_timeout, limited) {
                        device.set_io_timeout(timeout);
                    }
                }
                continue;
            }
            _ = term.recv() => {
                match standby.as_ref().and_then(Standby::ready) {
                    Some(pid) if handing_to_standby.is_none() => {
                        tracing::info!(standby = pid, "asking the standby to take the device over");
                        let _ = nix::sys::signal::kill(nix::unistd::Pid::from_raw(pid as i32), nix::sys::signal::Signal::SIGUSR2);
                        handing_to_standby = Some(tokio::time::Instant::now() + STANDBY_HANDOVER_TIMEOUT);
                        continue;
                    }
                    _ => device.kind() == attach::AttachKind::FuseLoop,
                }
            }
            _ = tokio::time::sleep_until(handing_to_standby.unwrap_or_else(far_future)), if handing_to_standby.is_some() => {
                tracing::warn!("the standby did not take the device over; releasing it for a successor");
                false
            }
            _ = unmap.recv() => true,
            _ = grow.recv() => {
                grow_device(&opened.volume, &device, &state.resize_error_path(&info.id)).await;
                continue;
            }
            Ok((socket, _)) = accept(&handover) => {
                if hand_over_device(socket, &mut device, &opened, &options).await {
                    // The successor serves the device and owns the record now.
                    return Ok(());
                }
                // A successor that failed may have named itself already.
                state.save(&mapping)?;
                continue;
            }
        };
        if !detach {
            let index = device.release().await?;
            let _ = std::fs::remove_file(state.handover_path(&info.id));
            opened.volume.flush().await?;
            tracing::info!(index, "released the device for a successor");
            return Ok(());
        }
        match device.detach().await {
            Ok(()) => break,
            Err(e) => tracing::error!(error = %e, "cannot detach; still serving"),
        }
    }
    opened.volume.flush().await?;
    let _ = std::fs::remove_file(state.handover_path(&info.id));
    state.remove(&info.id)?;
    opened.unpublish(&meta).await;
    tracing::info!(device = %mapping.device, "volume unmapped");
    Ok(())
}

/// How long SIGTERM waits for the standby to take the device over.
const STANDBY_HANDOVER_TIMEOUT: Duration = Duration::from_secs(10);

fn far_future() -> tokio::time::Instant {
    tokio::time::Instant::now() + Duration::from_secs(86400 * 365)
}

/// How standing by ended.
enum Standing {
    /// The serving process died serving the device.
    Crashed,
    /// The serving process asked for its device to be taken over.
    Asked,
    /// The serving process ended and the device needs no successor.
    Leave,
}

/// Waits for serving process `active` to die or to ask (SIGUSR2) for its
/// device to be taken over.
async fn stand_by(state: &StateDir, volume_id: &str, active: u32) -> anyhow::Result<Standing> {
    let mut asked = signal(SignalKind::user_defined2())?;
    tracing::info!(active, "standing by");
    tokio::select! {
        exited = standby::exited(active) => {
            exited?;
            match standby::after_exit(state, volume_id, active)? {
                standby::AfterExit::TakeOver(mapping) => {
                    tracing::warn!(active, device = %mapping.device, "the serving process died: taking its device over");
                    Ok(Standing::Crashed)
                }
                standby::AfterExit::Leave(why) => {
                    tracing::info!(active, why, "the serving process ended; the standby is not needed");
                    Ok(Standing::Leave)
                }
            }
        }
        _ = asked.recv() => {
            tracing::info!(active, "asked to take the device over");
            Ok(Standing::Asked)
        }
    }
}

/// The standby's command line: this process's, standing by for it at its
/// epoch.
fn standby_command(
    args: &VolumeArgs,
    device: DeviceArgs,
    state_dir: &std::path::Path,
    epoch: u64,
    published: bool,
) -> std::process::Command {
    let mut command = serve_device_command(args, device, state_dir, &args.volume, Some(epoch));
    command.args(["--standby-for", &std::process::id().to_string()]);
    if published {
        command.arg("--inherits-attachment");
    }
    command
}

/// The running standby, started again if it dies.
struct Standby {
    pid: Arc<std::sync::atomic::AtomicU32>,
    _keeper: tokio::task::JoinHandle<()>,
}

impl Standby {
    /// How long a standby that died waits before it is started again.
    const RESTART_DELAY: Duration = Duration::from_secs(5);

    fn keep(command: std::process::Command, log: PathBuf) -> Self {
        let pid = Arc::new(std::sync::atomic::AtomicU32::new(0));
        let keeper = {
            let pid = pid.clone();
            let mut command = tokio::process::Command::from(command);
            tokio::spawn(async move {
                loop {
                    let log = std::fs::OpenOptions::new().create(true).append(true).open(&log);
                    let stderr = log.map(Stdio::from).unwrap_or_else(|_| Stdio::null());
                    let spawned =
                        command.stdin(Stdio::null()).stdout(Stdio::null()).stderr(stderr).process_group(0).spawn();
                    match spawned {
                        Ok(mut child) => {
                            pid.store(child.id().unwrap_or(0), std::sync::atomic::Ordering::SeqCst);
                            let status = child.wait().await;
                            pid.store(0, std::sync::atomic::Ordering::SeqCst);
                            tracing::warn!(?status, "the standby exited; starting another");
                        }
                        Err(e) => tracing::error!(error = %e, "cannot start a standby"),
                    }
                    tokio::time::sleep(Self::RESTART_DELAY).await;
                }
            })
        };
        Self { pid, _keeper: keeper }
    }

    /// The standby's pid once it listens for SIGUSR2.
    fn ready(&self) -> Option<u32> {
        let pid = self.pid.load(std::sync::atomic::Ordering::SeqCst);
        (pid != 0 && catches_signal(pid, libc::SIGUSR2)).then_some(pid)
    }
}

/// Whether process `pid` has a handler for `signal` (`SigCgt` in its status).
fn catches_signal(pid: u32, signal: i32) -> bool {
    let Ok(status) = std::fs::read_to_string(format!("/proc/{pid}/status")) else { return false };
    status
        .lines()
        .find_map(|line| line.strip_prefix("SigCgt:"))
        .and_then(|mask| u64::from_str_radix(mask.trim(), 16).ok())
        .is_some_and(|mask| mask & (1 << (signal - 1)) != 0)
}

/// Reaches the process serving the volume's device and learns what the
/// successor must match: the device, and the epoch its writes carry.
async fn contact_predecessor(
    state: &StateDir,
    args: &mut VolumeArgs,
) -> anyhow::Result<(handover::Successor, handover::Offer)> {
    let path = state.handover_path(&args.volume);
    let volume_id = args.volume.clone();
    let (successor, offer) = match tokio::task::spawn_blocking(move || handover::Successor::connect(&path, &volume_id))
        .await?
    {
        Ok(contacted) => contacted,
        Err(e) if matches!(e.kind(), std::io::ErrorKind::NotFound | std::io::ErrorKind::ConnectionRefused) => {
            bail!("the volume's serving process takes no successor: only kernel nbd devices attached over netlink can be taken over ({e})")
        }
        Err(e) => return Err(anyhow::Error::new(e).context("reaching the serving process to take its device over")),
    };
    match args.epoch {
        Some(epoch) if epoch != offer.epoch => {
            bail!("the device is served at epoch {}, not {epoch}: a successor writes at the same epoch", offer.epoch)
        }
        _ => args.epoch = Some(offer.epoch),
    }
    Ok((successor, offer))
}

/// Where successors reach this process: only netlink devices can move.
/// Readable by this user alone: whoever connects may take the device.
fn bind_handover(path: &std::path::Path, kind: attach::AttachKind) -> anyhow::Result<Option<UnixListener>> {
    if kind != attach::AttachKind::Netlink {
        return Ok(None);
    }
    // A predecessor that crashed left its socket file.
    let _ = std::fs::remove_file(path);
    let listener = UnixListener::bind(path).with_context(|| format!("binding {}", path.display()))?;
    std::fs::set_permissions(path, std::os::unix::fs::PermissionsExt::from_mode(0o600))?;
    Ok(Some(listener))
}

async fn accept(
    listener: &Option<UnixListener>,
) -> std::io::Result<(tokio::net::UnixStream, tokio::net::unix::SocketAddr)> {
    match listener {
        Some(listener) => listener.accept().await,
        None => std::future::pending().await,
    }
}

/// Hands the device to the successor on `socket`; true when it took it and
/// this process is done. If the successor goes away before taking the
/// connections, this process serves them again.
async fn hand_over_device(
    socket: tokio::net::UnixStream,
    device: &mut AttachedDevice<Volume>,
    opened: &Opened,
    options: &AttachOptions,
) -> bool {
    let offer =
        handover::Offer { index: device.index(), epoch: opened.volume.epoch(), published: opened.published.is_some() };
    let volume_id = opened.volume.info().id.clone();
    let greeted = match socket.into_std() {
        Ok(socket) => {
            tokio::task::spawn_blocking(move || handover::Predecessor::greet(socket, &volume_id, offer)).await
        }
        Err(e) => Ok(Err(e)),
    };
    let predecessor = match greeted {
        Ok(Ok(predecessor)) => predecessor,
        Ok(Err(e)) => {
            tracing::warn!(error = %e, "a successor did not get ready to take the device over");
            return false;
        }
        Err(e) => {
            tracing::warn!(error = %e, "the hand-over failed");
            return false;
        }
    };
    let (index, handed) = match device.hand_over().await {
        Ok(handed) => handed,
        Err(e) => {
            tracing::warn!(error = %e, "cannot hand the device over");
            return false;
        }
    };
    let delivered = tokio::task::spawn_blocking(move || {
        let result = predecessor.deliver(&handed);
        (result, handed)
    })
    .await;
    match delivered {
        Ok((Ok(()), _)) => {
            tracing::info!(index, "the device was handed over to a successor");
            true
        }
        Ok((Err(e), handed)) => {
            tracing::warn!(error = %e, "the successor did not take the connections; serving them again");
            match attach::adopt(opened.volume.clone(), index, handed, options.clone()).await {
                Ok(again) => *device = again,
                Err(e) => tracing::error!(error = %e, "cannot serve the device again; a successor must re-attach"),
            }
            false
        }
        Err(e) => {
            tracing::error!(error = %e, "the hand-over failed; a successor must re-attach");
            false
        }
    }
}

/// SIGHUP (sent by `resize`): serve the volume's size in metadata and make
/// the device that large. A failure is logged and written to `error_file`
/// for `resize` to report; the device keeps serving.
async fn grow_device(volume: &Volume, device: &AttachedDevice<Volume>, error_file: &std::path::Path) {
    let grown = async {
        let size = volume.refresh().await?;
        let device_size = device.resize().await?;
        anyhow::Ok((size, device_size))
    };
    match grown.await {
        Ok((size, device_size)) => tracing::info!(size, device_size, "device resized to the volume's size"),
        Err(e) => {
            tracing::error!(error = %e, "cannot grow the device");
            // Written aside and renamed: `resize` never reads half of it.
            let partial = error_file.with_extension("partial");
            let written =
                std::fs::write(&partial, format!("{e:#}")).and_then(|()| std::fs::rename(&partial, error_file));
            if let Err(write) = written {
                tracing::warn!(error = %write, "cannot report the failure to `resize`");
            }
        }
    }
}

/// Starts the serving process and waits until it reports the device.
async fn map(args: VolumeArgs, device: DeviceArgs, state_dir: PathBuf) -> anyhow::Result<()> {
    let state = StateDir::new(&state_dir)?;
    let meta = args.meta.client()?;
    let info = meta.find_volume(&args.volume).await?;
    // A live serving process keeps the device, unless a successor is to
    // take it over from it.
    let mut take_over = false;
    if let Some(existing) = state.load(&info.id)?.filter(Mapping::is_served) {
        if !device.take_over {
            println!("{}", existing.device);
            return Ok(());
        }
        take_over = true;
    }
    // Appended to: after a crash, the predecessor's log explains it.
    let log = std::fs::OpenOptions::new().create(true).append(true).open(state.log_path(&info.id))?;
    let mut command = serve_device_command(&args, device, &state_dir, &info.id, args.epoch);
    if take_over {
        command.arg("--take-over");
    }
    use std::os::unix::process::CommandExt;
    let mut child = command
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(log)
        // Its own session: it outlives this command and whoever called it.
        .process_group(0)
        .spawn()
        .context("starting the serving process")?;
    let pid = child.id();
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        if let Some(mapping) = state.load(&info.id)?.filter(|m| m.pid == pid) {
            println!("{}", mapping.device);
            return Ok(());
        }
        if let Some(status) = child.try_wait()? {
            let log = std::fs::read_to_string(state.log_path(&info.id)).unwrap_or_default();
            bail!("the serving process exited ({status}):\n{}", why_it_exited(&log));
        }
        if Instant::now() > deadline {
            let _ = child.kill();
            bail!("the device was not attached within 60 s; see {}", state.log_path(&info.id).display());
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// `nbd-client serve-device` for `volume_id` with `args` and `device`.
fn serve_device_command(
    args: &VolumeArgs,
    device: DeviceArgs,
    state_dir: &std::path::Path,
    volume_id: &str,
    epoch: Option<u64>,
) -> std::process::Command {
    let exe = std::env::current_exe().unwrap_or_else(|_| PathBuf::from("nbd-client"));
    let mut command = std::process::Command::new(exe);
    command
        .args(["serve-device", volume_id])
        .args(args.meta.to_args())
        .args(["--node-id", &args.node_id])
        .args(["--min-replicas", &args.min_replicas.to_string()])
        .args(["--replica-timeout", &args.replica_timeout.to_string()])
        .arg("--state-dir")
        .arg(state_dir)
        .args(["--method", device.method.to_possible_value().expect("named").get_name()])
        .args(["--io-timeout", &device.io_timeout.to_string()])
        .args(["--log-format", args.log_format.to_possible_value().expect("named").get_name()]);
    if let Some(epoch) = epoch {
        command.args(["--epoch", &epoch.to_string()]);
    }
    if args.readonly {
        command.arg("--readonly");
    }
    if device.no_standby {
        command.arg("--no-standby");
    }
    if let Some(addr) = args.metrics_addr {
        command.args(["--metrics-addr", &addr.to_string()]);
    }
    command
}

/// The error a serving process died of, from its log: from its last
/// `Error:` up to any backtrace; else the log's last lines.
fn why_it_exited(log: &str) -> String {
    match log.rfind("Error: ") {
        Some(at) => log[at..].split("\nStack backtrace:").next().unwrap_or_default().trim_end().to_owned(),
        None => log.lines().rev().take(5).collect::<Vec<_>>().into_iter().rev().collect::<Vec<_>>().join("\n"),
    }
}

async fn unmap(target: String, state_dir: PathBuf) -> anyhow::Result<()> {
    let state = StateDir::new(&state_dir)?;
    let Some(mapping) = state.find(&target)? else {
        eprintln!("{target} is not mapped");
        return Ok(());
    };
    let mounts = mapping::mount_points(&mapping.device);
    if !mounts.is_empty() {
        bail!("{} is mounted at {}; unmount it first", mapping.device, mounts.join(", "));
    }
    if mapping.is_served() {
        let pid = nix::unistd::Pid::from_raw(mapping.pid as i32);
        nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGUSR1)?;
        let deadline = Instant::now() + Duration::from_secs(60);
        while mapping.is_served() {
            if Instant::now() > deadline {
                bail!("the serving process {} did not detach {} within 60 s", mapping.pid, mapping.device);
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }
    state.remove(&mapping.volume_id)?;
    eprintln!("unmapped {} ({})", mapping.device, mapping.volume_id);
    Ok(())
}

/// Signals the serving process to grow the device and waits until the
/// kernel reports the volume's size (rounded down to whole blocks).
async fn resize(target: String, meta: ClientArgs, state_dir: PathBuf) -> anyhow::Result<()> {
    let state = StateDir::new(&state_dir)?;
    let Some(mapping) = state.find(&target)? else {
        bail!("{target} is not mapped on this node");
    };
    if !mapping.is_served() {
        bail!("{} is mapped but its serving process {} is gone; map it again", mapping.device, mapping.pid);
    }
    if !mapping.resizable {
        bail!(
            "the serving process {} of {} predates online resizing; unmap and map the volume to get its new size",
            mapping.pid,
            mapping.device
        );
    }
    let meta = meta.client()?;
    let volume = meta.find_volume(&mapping.volume_id).await?;
    let wanted = volume.size_bytes / u64::from(DEVICE_BLOCK_SIZE) * u64::from(DEVICE_BLOCK_SIZE);
    let name = mapping.device.trim_start_matches("/dev/").to_owned();
    let device_size = || attach::sysfs::block_device_size(std::path::Path::new(attach::sysfs::SYS_BLOCK), &name);
    if device_size().is_some_and(|size| size >= wanted) {
        println!("{}", device_size().unwrap_or_default());
        return Ok(());
    }
    let error_file = state.resize_error_path(&mapping.volume_id);
    let _ = std::fs::remove_file(&error_file);
    let pid = nix::unistd::Pid::from_raw(mapping.pid as i32);
    nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGHUP)?;
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let now = device_size().unwrap_or(0);
        if now >= wanted {
            println!("{now}");
            return Ok(());
        }
        if let Ok(error) = std::fs::read_to_string(&error_file) {
            bail!("the serving process {} could not grow {}: {error}", mapping.pid, mapping.device);
        }
        if !mapping.is_served() {
            bail!("the serving process {} exited while growing {}", mapping.pid, mapping.device);
        }
        if Instant::now() > deadline {
            let log = std::fs::read_to_string(state.log_path(&mapping.volume_id)).unwrap_or_default();
            let tail: Vec<&str> = log.lines().rev().take(3).collect();
            bail!(
                "{} is still {now} bytes, not {wanted}, after 30 s:\n{}",
                mapping.device,
                tail.into_iter().rev().collect::<Vec<_>>().join("\n")
            );
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

fn list(state_dir: PathBuf, output: &str) -> anyhow::Result<()> {
    let mappings = StateDir::new(&state_dir)?.all()?;
    if output == "json" {
        let rows: Vec<serde_json::Value> = mappings
            .iter()
            .map(|m| {
                serde_json::json!({"volume": m.volume_id, "name": m.volume_name, "device": m.device,
                    "method": m.method, "pid": m.pid, "epoch": m.epoch, "served": m.is_served()})
            })
            .collect();
        println!("{}", serde_json::Value::Array(rows));
    } else {
        println!("{:<20} {:<20} {:<14} {:<10} {:>8}  SERVED", "VOLUME", "NAME", "DEVICE", "METHOD", "PID");
        for m in mappings {
            println!(
                "{:<20} {:<20} {:<14} {:<10} {:>8}  {}",
                m.volume_id,
                m.volume_name,
                m.device,
                m.method,
                m.pid,
                m.is_served()
            );
        }
    }
    Ok(())
}

fn probe(load_module: bool, output: &str) -> anyhow::Result<()> {
    let mut found = attach::Probe::run();
    let module = if load_module && found.netlink.is_err() {
        let loaded = attach::load_nbd_module();
        found = attach::Probe::run();
        Some(loaded.err().unwrap_or_else(|| "loaded".into()))
    } else {
        None
    };
    let chosen = found.choose(AttachMethod::Auto);
    // Each kernel feature: null when it works, else why not.
    let features = [("nbd", &found.netlink), ("fuse", &found.fuse), ("io_uring", &found.io_uring)];
    if output == "json" {
        let (method, reason) = match &chosen {
            Ok((kind, why)) => (Some(kind.to_string()), why.clone()),
            Err(e) => (None, e.to_string()),
        };
        let missing: serde_json::Map<String, serde_json::Value> =
            features.iter().map(|(name, found)| (name.to_string(), found.as_ref().err().cloned().into())).collect();
        println!("{}", serde_json::json!({"method": method, "reason": reason, "module": module, "missing": missing}));
    } else {
        if let Some(module) = &module {
            println!("modprobe nbd: {module}");
        }
        for (name, found) in features {
            println!("{name}: {}", found.as_ref().err().map_or("works", String::as_str));
        }
        match &chosen {
            Ok((kind, why)) => println!("{kind}: {why}"),
            Err(e) => println!("no way to attach: {e}"),
        }
    }
    if chosen.is_err() {
        std::process::exit(1);
    }
    Ok(())
}

fn main() -> anyhow::Result<()> {
    let cli = Cli::parse();
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        // Threads that serve a block device must not wait on reclaim of that device.
        .on_thread_start(|| {
            let _ = attach::set_io_flusher();
        })
        .build()?;
    runtime.block_on(async {
        match cli.command {
            Command::Serve { volume, listen } => serve(volume, listen).await,
            Command::Map { volume, device, state_dir } => map(volume, device, state_dir).await,
            Command::Unmap { target, state_dir } => unmap(target, state_dir).await,
            Command::Resize { target, meta, state_dir } => resize(target, meta, state_dir).await,
            Command::List { state_dir, output } => list(state_dir, &output),
            Command::Probe { load_module, output } => probe(load_module, &output),
            Command::ServeDevice { volume, device, state_dir, role } => {
                serve_device(volume, device, state_dir, role).await
            }
        }
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn io_timeouts_take_seconds_or_milliseconds() {
        let parse = |text: &str| text.parse::<IoTimeout>().map(|t| t.0);
        assert_eq!(parse("8"), Ok(Duration::from_secs(8)));
        assert_eq!(parse("2s"), Ok(Duration::from_secs(2)));
        assert_eq!(parse("1500ms"), Ok(Duration::from_millis(1500)));
        assert!(parse("1.5s").is_err());
        assert!(parse("5m").unwrap_err().contains("unknown unit"));
        assert_eq!(IoTimeout(Duration::from_millis(1500)).to_string(), "1500ms");
    }

    #[test]
    fn the_reason_a_serving_process_exited_skips_its_backtrace() {
        let log = "INFO starting\nError: no device\n\nCaused by:\n    gone\n\nStack backtrace:\n   0: main\n";
        assert_eq!(why_it_exited(log), "Error: no device\n\nCaused by:\n    gone");
        assert_eq!(why_it_exited("a\nb\nc\nd\ne\nf\n"), "b\nc\nd\ne\nf");
    }
}
