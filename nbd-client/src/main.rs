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
use nbd_client::attach::{self, AttachMethod};
use nbd_client::nbd::{ExportOptions, NbdServer};
use nbd_records::mapping::{self, Mapping, StateDir, DEFAULT_STATE_DIR};
use tokio::signal::unix::{signal, SignalKind};
use volume_engine::volume_service::{self, OpenOptions, Opened};

mod device_process;

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
    /// serving process dies; raised for a while when requests are slower.
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
    serve_metrics(args.metrics_addr).await;
    let opened = volume_service::open(meta, &args.volume, &open_options(args)).await?;
    let info = opened.volume.info();
    tracing::info!(volume = %info.id, name = %info.name, size = info.size_bytes, replicas = info.replicas,
        epoch = opened.volume.epoch(), "volume open");
    Ok(opened)
}

/// Serves metrics on `addr`, if given; while a predecessor still holds it
/// (a hand-over), keeps trying in the background.
async fn serve_metrics(addr: Option<std::net::SocketAddr>) {
    let Some(addr) = addr else { return };
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
        let rows: Vec<mapping::Listed> = mappings.iter().map(mapping::Listed::from).collect();
        println!("{}", serde_json::to_string(&rows)?);
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
                device_process::serve_device(volume, device, state_dir, role).await
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
