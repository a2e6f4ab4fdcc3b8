//! The process behind a mapped device (`serve-device`): it attaches and
//! serves the device, or stands by beside the process that does, and hands
//! the device to a successor (a standby, or `map --take-over`).

use std::path::PathBuf;
use std::process::Stdio;
use std::sync::Arc;
use std::time::Duration;

use anyhow::{bail, Context};
use nbd_client::attach::{self, AttachOptions, AttachedDevice};
use nbd_client::{handover, standby};
use nbd_records::mapping::{Mapping, StateDir};
use tokio::net::UnixListener;
use tokio::signal::unix::{signal, SignalKind};
use volume_engine::engine::Volume;
use volume_engine::volume_service::{self, Opened};

use crate::{
    attach_method, open_for_serving, open_options, serve_device_command, serve_metrics, start_daemon, DeviceArgs, Role,
    VolumeArgs, DEVICE_BLOCK_SIZE,
};

/// The process behind a mapped device. SIGTERM hands a kernel nbd device
/// over: to the standby with its live connections if one is ready, else
/// the device stays configured for a successor to re-attach (`map` again,
/// or a restarted process); SIGUSR1 (sent by `unmap`) detaches it. A FUSE +
/// loop device cannot outlive its server, so SIGTERM detaches it too.
///
/// With `role.standby_for`, the process first stands by (see
/// [`nbd_client::standby`]) and serves only once it takes the device over.
pub(crate) async fn serve_device(
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
            serve_metrics(args.metrics_addr).await;
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
    // 0 leaves the kernel's own timeout, unmanaged.
    let mut request_timeout = Some(device_args.io_timeout.0)
        .filter(|t| !t.is_zero())
        .map(|t| attach::RequestTimeout::new(t, opened.volume.limits().any(), std::time::Instant::now()));
    options.io_timeout = request_timeout.as_ref().map(attach::RequestTimeout::current);
    options.read_only = args.readonly;
    options.fuse_root = state_dir.join("fuse");
    let mut device: AttachedDevice<Volume> = match predecessor {
        Some((successor, offer)) => {
            let (handed, receipt) = tokio::task::spawn_blocking(move || successor.take()).await??;
            // The predecessor served until now: learn what it allocated.
            opened.volume.reload_chunk_map().await?;
            // Named as the server before the predecessor exits, so that its
            // standby leaves the device to this process.
            let device = format!("/dev/nbd{}", offer.index);
            state.save(&this_process_serves(&opened, device, attach::AttachKind::Netlink))?;
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
    let mapping = this_process_serves(&opened, device.path().display().to_string(), device.kind());
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
    let mut follow = tokio::time::interval(volume_engine::engine::FOLLOW_INTERVAL);
    loop {
        let detach = tokio::select! {
            // The volume's limits, and the kernel's resending, change the
            // request timeout while the device is served.
            _ = follow.tick() => {
                if let Some(timeout) = request_timeout.as_mut() {
                    let (limited, dropped) = (opened.volume.limits().any(), device.dropped_connections());
                    if let Some(now) = timeout.update(limited, dropped, std::time::Instant::now()) {
                        device.set_io_timeout(now);
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

/// The record naming this process as the server of `device`.
fn this_process_serves(opened: &Opened, device: String, kind: attach::AttachKind) -> Mapping {
    let info = opened.volume.info();
    Mapping {
        volume_id: info.id.clone(),
        volume_name: info.name.clone(),
        device,
        method: kind.to_string(),
        pid: std::process::id(),
        epoch: opened.volume.epoch(),
        resizable: true,
    }
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
