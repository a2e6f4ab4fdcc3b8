//! The CSI Node service: attach a volume through `nbd-client`, format it
//! (only when blank), mount it at the staging path, bind-mount it into
//! pods, report its usage and condition, grow its filesystem.
//!
//! Every call is idempotent and safe to repeat after a crash between its
//! steps: the mount table and `nbd-client list` are consulted before each
//! step, and the little the node must remember (the device of a staged
//! volume, its epoch) is written to a state file before anything depends
//! on it.
//!
//! - [`attach`]: the `nbd-client` contract.
//! - [`host`]: how volumes attach on this node, reported at startup.
//! - [`volume_health`]: a staged volume's condition and health, and the storage's.
//! - [`mounts`]: the mount table and the mount syscalls.
//! - [`recovery`]: new serving processes for devices that lost theirs.
//! - [`registration`]: announcing the node to the metadata service.
//! - [`serving_logs`]: the serving processes' logs, relayed to the plugin's.
//! - [`state`]: the per-volume state files.
//! - [`tools`]: blkid, mkfs, resize2fs, xfs_growfs.

pub mod attach;
pub mod host;
pub mod luks;
pub mod mounts;
pub mod recovery;
pub mod registration;
pub mod serving_logs;
pub mod state;
pub mod tools;
mod volume_health;

use std::io::{Seek, SeekFrom};
use std::path::{Path, PathBuf};

use ballast_proto::csi;
use ballast_proto::csi::node_server::Node;
use ballast_proto::csi::node_service_capability::rpc::Type as RpcType;
use ballast_proto::csi::volume_capability::access_mode::Mode;
use ballast_proto::meta as pb;
use meta_client::MetaClient;
use tonic::{Request, Response, Status};

use crate::capability::{self, Access, Checked};
use crate::error::{found, CsiError, Result};

use crate::inflight::InFlight;
use crate::metrics::observe;
use crate::params::{self, FsType, Segments, VolumeParams};
use attach::NbdClient;
use state::{check_volume_id, Staged, StateDir};

/// The capabilities this node service implements.
pub const CAPABILITIES: [RpcType; 7] = [
    RpcType::StageUnstageVolume,
    RpcType::GetVolumeStats,
    RpcType::ExpandVolume,
    RpcType::VolumeCondition,
    RpcType::SingleNodeMultiWriter,
    RpcType::GetVolumeHealth,
    RpcType::GetStorageHealth,
];

/// The kubelet names an inline ephemeral volume `csi-<hash>`.
const KUBELET_INLINE_PREFIX: &str = "csi-";

pub struct NodeConfig {
    pub node_id: String,
    pub max_volumes: i64,
    pub topology: Segments,
    pub meta: MetaClient,
    pub nbd: NbdClient,
    pub state_dir: PathBuf,
}

pub struct NodeService {
    node_id: String,
    max_volumes: i64,
    topology: Segments,
    meta: MetaClient,
    nbd: NbdClient,
    state: StateDir,
    inflight: InFlight,
}

/// What a staging needs to know, from NodeStageVolume or from an ephemeral
/// NodePublishVolume.
struct StageSpec<'a> {
    volume_id: &'a str,
    meta_volume_id: &'a str,
    staging_path: &'a Path,
    /// `None` for a raw block volume.
    fs: Option<FsType>,
    mount_flags: &'a [String],
    epoch: u64,
    readonly: bool,
    ephemeral: bool,
    /// The volume context says it is encrypted.
    encrypted: bool,
    /// From the node-stage secret ([`luks::PASSPHRASE_KEY`]).
    passphrase: Option<&'a [u8]>,
}

fn required<'a>(field: &'static str, value: &'a str) -> Result<&'a str> {
    if value.is_empty() {
        return Err(CsiError::Missing(field));
    }
    Ok(value)
}

fn capability_of(cap: Option<&csi::VolumeCapability>) -> Result<Checked> {
    capability::check(cap.ok_or(CsiError::Missing("volume_capability"))?)
}

/// Size of a block device (or file).
fn device_size(device: &Path) -> Result<u64> {
    let mut file = std::fs::File::open(device).map_err(|e| CsiError::io("opening", device, e))?;
    file.seek(SeekFrom::End(0)).map_err(|e| CsiError::io("sizing", device, e))
}

/// An ext4 filesystem smaller than its device (the volume was expanded
/// while it could not grow online) is grown before it is mounted.
async fn grow_ext4_before_mounting(device: &Path) -> Result<()> {
    let (fs_size, device_size) = (tools::ext4_size(device)?, device_size(device)?);
    if fs_size < device_size {
        tracing::info!(fs_size, device_size, "growing the filesystem to its device before mounting it");
        tools::grow_unmounted_ext4(device).await?;
    }
    Ok(())
}

fn ephemeral_name(volume_id: &str) -> String {
    format!("ephemeral-{volume_id}")
}

fn same_path(a: &Path, b: &Path) -> bool {
    let canon = |p: &Path| std::fs::canonicalize(p).unwrap_or_else(|_| p.to_path_buf());
    a == b || canon(a) == canon(b)
}

impl NodeService {
    pub fn new(config: NodeConfig, inflight: InFlight) -> Self {
        Self {
            node_id: config.node_id,
            max_volumes: config.max_volumes,
            topology: config.topology,
            meta: config.meta,
            nbd: config.nbd,
            state: StateDir::new(config.state_dir),
            inflight,
        }
    }

    fn meta_list(&self) -> String {
        self.meta.endpoints().join(",")
    }

    /// At startup: kernel devices of volumes staged here whose serving
    /// process is gone (a restart of the plugin's container ends them) get
    /// a new one.
    pub async fn reattach_orphans(&self) {
        recovery::reattach_orphans(&self.state, &self.nbd, &self.meta_list(), &self.inflight).await
    }

    /// Attaches (unless attached with this epoch already), records, and
    /// for a filesystem volume formats if blank and mounts.
    async fn stage(&self, spec: StageSpec<'_>) -> Result<Staged> {
        let previous = self.state.load(spec.volume_id)?;
        if let Some(prev) = &previous {
            if prev.fs_type != spec.fs && same_path(&prev.staging_path, spec.staging_path) {
                return Err(CsiError::AlreadyExists(format!(
                    "volume is staged at {} as {}, not as {}",
                    prev.staging_path.display(),
                    prev.fs_type.map_or("block".into(), |f| f.to_string()),
                    spec.fs.map_or("block".into(), |f| f.to_string())
                )));
            }
            if !same_path(&prev.staging_path, spec.staging_path) && mounts::mounted_at(&prev.staging_path)?.is_some() {
                return Err(CsiError::precondition(format!(
                    "volume is already staged at {}",
                    prev.staging_path.display()
                )));
            }
        }

        let mapping = self.nbd.find(spec.meta_volume_id).await?;
        let device = match mapping {
            Some(m) if m.is_served() && previous.as_ref().is_some_and(|p| p.epoch == spec.epoch) => m.device,
            Some(m) => {
                // Attached with another epoch, by a call that crashed before
                // recording it, or its serving process is gone: attach anew,
                // unless a filesystem on it is still mounted.
                if mounts::mounted_at(spec.staging_path)?.is_some() && m.is_served() {
                    return Err(CsiError::precondition(format!(
                        "volume is attached as {} with another epoch and still mounted at {}",
                        m.device.display(),
                        spec.staging_path.display()
                    )));
                }
                tracing::info!(device = %m.device.display(), "detaching a stale attachment");
                self.nbd.unmap(spec.meta_volume_id).await?;
                self.nbd.map(spec.meta_volume_id, &self.meta_list(), spec.epoch, spec.readonly).await?
            }
            None => self.nbd.map(spec.meta_volume_id, &self.meta_list(), spec.epoch, spec.readonly).await?,
        };
        tracing::info!(device = %device.display(), epoch = spec.epoch, "attached");
        // A filesystem volume holding a LUKS header is encrypted whatever
        // its context says: a clone or restore of an encrypted volume. (A
        // raw block volume's content is the pod's own business.)
        let encrypted =
            spec.encrypted || (spec.fs.is_some() && luks::is_container(&tools::probe_content(&device).await?));
        let data_device = match (encrypted, spec.passphrase) {
            (false, _) => device.clone(),
            (true, Some(passphrase)) => luks::open(&device, spec.meta_volume_id, passphrase, spec.readonly).await?,
            (true, None) => {
                return Err(CsiError::precondition(format!(
                    "volume is encrypted: its StorageClass must name a node-stage secret with {}",
                    luks::PASSPHRASE_KEY
                )))
            }
        };
        let staged = Staged {
            volume_id: spec.volume_id.to_string(),
            meta_volume_id: spec.meta_volume_id.to_string(),
            device: device.clone(),
            epoch: spec.epoch,
            readonly: spec.readonly,
            staging_path: spec.staging_path.to_path_buf(),
            fs_type: spec.fs,
            ephemeral: spec.ephemeral,
            encrypted,
        };
        self.state.save(&staged)?;

        let Some(fs) = spec.fs else {
            // Raw block: the device itself is bind-mounted at publish time.
            return Ok(staged);
        };
        if let Some(entry) = mounts::mounted_at(spec.staging_path)? {
            if mounts::is_filesystem_of(spec.staging_path, &data_device)? {
                return Ok(staged);
            }
            return Err(CsiError::precondition(format!(
                "{} has {} mounted, not this volume",
                spec.staging_path.display(),
                entry.source
            )));
        }
        std::fs::create_dir_all(spec.staging_path).map_err(|e| CsiError::io("creating", spec.staging_path, e))?;
        match tools::probe_content(&data_device).await? {
            tools::Content::Blank if spec.readonly => {
                return Err(CsiError::precondition("volume is blank and attached read-only: nothing to mount"))
            }
            tools::Content::Blank => {
                tracing::info!(%fs, "formatting blank volume");
                tools::mkfs(&data_device, fs).await?;
            }
            tools::Content::Filesystem(found) if found == fs.as_str() => {
                if fs == FsType::Ext4 && !spec.readonly {
                    grow_ext4_before_mounting(&data_device).await?;
                }
            }
            tools::Content::Filesystem(found) => {
                return Err(CsiError::precondition(format!(
                    "volume holds {found}, but {fs} was requested; it is never reformatted"
                )))
            }
            tools::Content::Other(what) => {
                return Err(CsiError::precondition(format!("volume holds {what}; refusing to format it")))
            }
        }
        let mut options = spec.mount_flags.to_vec();
        if spec.readonly {
            options.push("ro".into());
        }
        if fs == FsType::Xfs {
            // Clones share their source's UUID; XFS refuses the second
            // mount of a UUID without this.
            options.push("nouuid".into());
        }
        mounts::mount_filesystem(&data_device, spec.staging_path, fs.as_str(), &options).await?;
        tracing::info!(path = %spec.staging_path.display(), "staged");
        Ok(staged)
    }

    /// Unmounts the staging path, detaches the device and forgets it.
    /// `meta_volume_id` is what was attached when nothing was recorded.
    async fn unstage(&self, volume_id: &str, meta_volume_id: &str, staging_path: &Path) -> Result<()> {
        let staged = self.state.load(volume_id)?;
        // Never detach a device a pod still uses.
        if let Some(s) = staged.as_ref().filter(|s| s.data_device().exists()) {
            let users: Vec<String> = mounts::users_of(&s.data_device())?
                .into_iter()
                .filter(|p| !same_path(p, staging_path) && !same_path(p, &s.staging_path))
                .map(|p| p.display().to_string())
                .collect();
            if !users.is_empty() {
                return Err(CsiError::precondition(format!(
                    "volume is still published at {}; unpublish it first",
                    users.join(", ")
                )));
            }
        }
        mounts::unmount_all(staging_path).await?;
        // Closed whether or not a record says it was opened: a crash may
        // have come between opening and recording.
        luks::close(staged.as_ref().map_or(meta_volume_id, |s| s.meta_volume_id.as_str())).await?;
        match &staged {
            Some(s) => self.nbd.unmap(&s.meta_volume_id).await?,
            // Nothing recorded: a crash may have come between attaching and
            // recording, so detach anyway, if there is anything to detach with.
            None if self.nbd.binary().is_ok() => self.nbd.unmap(meta_volume_id).await?,
            None => {}
        }
        self.state.remove(volume_id)?;
        tracing::info!("unstaged");
        Ok(())
    }

    async fn node_stage(&self, req: csi::NodeStageVolumeRequest) -> Result<csi::NodeStageVolumeResponse> {
        let volume_id = required("volume_id", &req.volume_id)?;
        let staging = required("staging_target_path", &req.staging_target_path)?;
        let cap = capability_of(req.volume_capability.as_ref())?;
        check_volume_id(volume_id)?;
        let epoch: u64 = req
            .publish_context
            .get(params::CTX_EPOCH)
            .ok_or_else(|| CsiError::invalid("publish_context has no epoch: was the volume published to this node?"))?
            .parse()
            .map_err(|_| CsiError::invalid("publish_context epoch is not a number"))?;
        let readonly =
            cap.read_only_mode() || req.publish_context.get(params::CTX_READONLY).is_some_and(|v| v == "true");
        let context_fs = req.volume_context.get(params::FS_TYPE).map(|f| f.parse()).transpose()?;
        let (fs, flags) = match &cap.access {
            Access::Block => (None, Vec::new()),
            Access::Mount { fs_type, mount_flags } => {
                (Some(fs_type.or(context_fs).unwrap_or_default()), mount_flags.clone())
            }
        };
        let encrypted = req.volume_context.get(params::ENCRYPTED).is_some_and(|v| v == "true");
        let passphrase = req.secrets.get(luks::PASSPHRASE_KEY).map(String::as_bytes);
        if encrypted && passphrase.is_none_or(<[u8]>::is_empty) {
            return Err(CsiError::invalid(format!(
                "volume is encrypted: the node-stage secret must hold {}",
                luks::PASSPHRASE_KEY
            )));
        }
        let _guard = self.inflight.claim(volume_id)?;
        self.stage(StageSpec {
            volume_id,
            meta_volume_id: volume_id,
            staging_path: Path::new(staging),
            fs,
            mount_flags: &flags,
            epoch,
            readonly,
            ephemeral: false,
            encrypted,
            passphrase,
        })
        .await?;
        Ok(csi::NodeStageVolumeResponse {})
    }

    async fn node_unstage(&self, req: csi::NodeUnstageVolumeRequest) -> Result<csi::NodeUnstageVolumeResponse> {
        let volume_id = required("volume_id", &req.volume_id)?;
        let staging = required("staging_target_path", &req.staging_target_path)?;
        check_volume_id(volume_id)?;
        let _guard = self.inflight.claim(volume_id)?;
        self.unstage(volume_id, volume_id, Path::new(staging)).await?;
        Ok(csi::NodeUnstageVolumeResponse {})
    }

    /// Bind-mounts a staged volume at `target`.
    async fn publish_staged(&self, staged: &Staged, cap: &Checked, target: &Path, readonly: bool) -> Result<()> {
        let block = staged.fs_type.is_none();
        if block != cap.is_block() {
            return Err(CsiError::invalid(format!(
                "volume is staged as {}, but published as {}",
                if block { "a raw block device" } else { "a filesystem" },
                if cap.is_block() { "a raw block device" } else { "a filesystem" },
            )));
        }
        let data_device = staged.data_device();
        let ours = |path: &Path| {
            if block {
                mounts::is_device_node_of(path, &data_device)
            } else {
                mounts::is_filesystem_of(path, &data_device)
            }
        };
        let staged_here = block || (mounts::mounted_at(&staged.staging_path)?.is_some() && ours(&staged.staging_path)?);
        if !staged_here {
            return Err(CsiError::precondition("volume is not staged on this node: call NodeStageVolume first"));
        }
        if let Some(entry) = mounts::mounted_at(target)? {
            if !ours(target)? {
                return Err(CsiError::AlreadyExists(format!(
                    "{} has another volume ({}) mounted",
                    target.display(),
                    entry.source
                )));
            }
            if entry.read_only() != readonly {
                return Err(CsiError::AlreadyExists(format!(
                    "volume is already published at {} with readonly={}",
                    target.display(),
                    entry.read_only()
                )));
            }
            return Ok(());
        }
        if cap.mode == Mode::SingleNodeSingleWriter {
            let others: Vec<PathBuf> = mounts::users_of(&data_device)?
                .into_iter()
                .filter(|p| !same_path(p, &staged.staging_path) && !same_path(p, target))
                .collect();
            if let Some(other) = others.first() {
                return Err(CsiError::precondition(format!(
                    "volume is SINGLE_NODE_SINGLE_WRITER and already published at {}",
                    other.display()
                )));
            }
        }
        if block {
            let parent = target.parent().unwrap_or(Path::new("/"));
            std::fs::create_dir_all(parent).map_err(|e| CsiError::io("creating", parent, e))?;
            std::fs::OpenOptions::new()
                .create(true)
                .truncate(false)
                .write(true)
                .open(target)
                .map_err(|e| CsiError::io("creating", target, e))?;
            mounts::bind(&data_device, target, readonly).await?;
        } else {
            std::fs::create_dir_all(target).map_err(|e| CsiError::io("creating", target, e))?;
            mounts::bind(&staged.staging_path, target, readonly).await?;
        }
        tracing::info!(target = %target.display(), readonly, "published");
        Ok(())
    }

    async fn node_publish(&self, req: csi::NodePublishVolumeRequest) -> Result<csi::NodePublishVolumeResponse> {
        let volume_id = required("volume_id", &req.volume_id)?;
        let target = Path::new(required("target_path", &req.target_path)?);
        let cap = capability_of(req.volume_capability.as_ref())?;
        check_volume_id(volume_id)?;
        let readonly = req.readonly || cap.read_only_mode();
        if req.volume_context.get(params::EPHEMERAL).is_some_and(|v| v == "true") {
            let _guard = self.inflight.claim(volume_id)?;
            return self.publish_ephemeral(volume_id, &req.volume_context, &cap, target, readonly).await;
        }
        required("staging_target_path", &req.staging_target_path)?;
        let _guard = self.inflight.claim(volume_id)?;
        let staged = self
            .state
            .load(volume_id)?
            .ok_or_else(|| CsiError::precondition("volume is not staged on this node: call NodeStageVolume first"))?;
        self.publish_staged(&staged, &cap, target, readonly).await?;
        Ok(csi::NodePublishVolumeResponse {})
    }

    /// An inline ephemeral volume: created, published to this node, staged
    /// privately and bind-mounted, all from NodePublishVolume.
    async fn publish_ephemeral(
        &self,
        volume_id: &str,
        context: &std::collections::HashMap<String, String>,
        cap: &Checked,
        target: &Path,
        readonly: bool,
    ) -> Result<csi::NodePublishVolumeResponse> {
        if cap.is_block() {
            return Err(CsiError::invalid("ephemeral volumes are filesystem volumes, not raw block"));
        }
        let volume_params = VolumeParams::parse(context, &[params::SIZE])?;
        if volume_params.encrypted {
            return Err(CsiError::invalid("inline ephemeral volumes are not encrypted: they get no node-stage secret"));
        }
        let size = match context.get(params::SIZE) {
            Some(quantity) => {
                let bytes = params::parse_quantity(quantity)?;
                let range = csi::CapacityRange { required_bytes: bytes.min(i64::MAX as u64) as i64, limit_bytes: 0 };
                params::size_for(Some(&range), None)?
            }
            None => params::size_for(None, None)?,
        };
        let fs = capability::filesystem(std::slice::from_ref(cap), volume_params.fs_type)?.unwrap_or_default();
        let flags = match &cap.access {
            Access::Mount { mount_flags, .. } => mount_flags.clone(),
            Access::Block => Vec::new(),
        };
        let volume = self
            .meta
            .create_volume(pb::CreateVolumeRequest {
                name: ephemeral_name(volume_id),
                size_bytes: size,
                replicas: volume_params.replicas,
                chunk_size_bytes: volume_params.chunk_size_bytes,
                // Owned by this node: a node certificate creates, publishes
                // and deletes only such volumes.
                parameters: [
                    (params::FS_TYPE.to_string(), fs.to_string()),
                    (meta_client::EPHEMERAL_NODE.to_string(), self.node_id.clone()),
                ]
                .into_iter()
                .collect(),
                content_source: None,
                limits: None,
            })
            .await?;
        let attachment = self
            .meta
            .publish_volume(pb::PublishVolumeRequest {
                volume_id: volume.id.clone(),
                node_id: self.node_id.clone(),
                readonly,
            })
            .await?;
        let staging = self.state.ephemeral_staging(volume_id);
        let staged = self
            .stage(StageSpec {
                volume_id,
                meta_volume_id: &volume.id,
                staging_path: &staging,
                fs: Some(fs),
                mount_flags: &flags,
                epoch: attachment.epoch,
                readonly,
                ephemeral: true,
                encrypted: false,
                passphrase: None,
            })
            .await?;
        self.publish_staged(&staged, cap, target, readonly).await?;
        tracing::info!(meta_volume = %volume.id, "ephemeral volume published");
        Ok(csi::NodePublishVolumeResponse {})
    }

    /// Tears an ephemeral volume down completely: unstage, unpublish in
    /// metadata, delete.
    async fn remove_ephemeral(&self, volume_id: &str, meta_volume_id: &str) -> Result<()> {
        let staging = self.state.ephemeral_staging(volume_id);
        self.unstage(volume_id, meta_volume_id, &staging).await?;
        let _ = std::fs::remove_dir(&staging);
        self.meta
            .unpublish_volume(pb::UnpublishVolumeRequest {
                volume_id: meta_volume_id.to_string(),
                node_id: self.node_id.clone(),
            })
            .await?;
        self.meta.delete_volume(pb::DeleteVolumeRequest { id: meta_volume_id.to_string() }).await?;
        tracing::info!(meta_volume = %meta_volume_id, "ephemeral volume deleted");
        Ok(())
    }

    async fn node_unpublish(&self, req: csi::NodeUnpublishVolumeRequest) -> Result<csi::NodeUnpublishVolumeResponse> {
        let volume_id = required("volume_id", &req.volume_id)?;
        let target = Path::new(required("target_path", &req.target_path)?);
        check_volume_id(volume_id)?;
        let _guard = self.inflight.claim(volume_id)?;
        mounts::unmount_all(target).await?;
        match std::fs::symlink_metadata(target) {
            Ok(meta) if meta.is_dir() => match std::fs::remove_dir(target) {
                Ok(()) => {}
                Err(e) if e.raw_os_error() == Some(nix::libc::ENOTEMPTY) => {
                    return Err(CsiError::precondition(format!(
                        "{} is not empty although nothing is mounted there; leaving it alone",
                        target.display()
                    )))
                }
                Err(e) => return Err(CsiError::io("removing", target, e)),
            },
            Ok(_) => std::fs::remove_file(target).map_err(|e| CsiError::io("removing", target, e))?,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
            Err(e) => return Err(CsiError::io("inspecting", target, e)),
        }
        tracing::info!(target = %target.display(), "unpublished");
        // An ephemeral volume lives exactly as long as its one publication.
        // Without a state file (a crash before staging recorded it) the
        // metadata service still knows it by name. Only the kubelet's ids
        // of inline volumes are looked up, so that unpublishing ordinary
        // volumes never waits for the metadata service.
        match self.state.load(volume_id)? {
            Some(staged) if staged.ephemeral => self.remove_ephemeral(volume_id, &staged.meta_volume_id).await?,
            Some(_) => {}
            None if volume_id.starts_with(KUBELET_INLINE_PREFIX) => {
                let by_name =
                    pb::GetVolumeRequest { key: Some(pb::get_volume_request::Key::Name(ephemeral_name(volume_id))) };
                if let Some(volume) = found(self.meta.get_volume(by_name).await)? {
                    self.remove_ephemeral(volume_id, &volume.id).await?;
                }
            }
            None => {}
        }
        Ok(csi::NodeUnpublishVolumeResponse {})
    }

    /// The staged volume behind `volume_path`, or NotFound.
    fn locate(&self, volume_id: &str, volume_path: &Path) -> Result<Staged> {
        let missing = || CsiError::not_found(format!("volume {volume_id} is not at {}", volume_path.display()));
        check_volume_id(volume_id).map_err(|_| missing())?;
        let staged = self.state.load(volume_id)?.ok_or_else(missing)?;
        if !volume_path.exists() || mounts::mounted_at(volume_path)?.is_none() {
            return Err(missing());
        }
        let ours = match staged.fs_type {
            None => mounts::is_device_node_of(volume_path, &staged.data_device())?,
            Some(_) => mounts::is_filesystem_of(volume_path, &staged.data_device())?,
        };
        if !ours {
            return Err(missing());
        }
        Ok(staged)
    }

    async fn node_stats(&self, req: csi::NodeGetVolumeStatsRequest) -> Result<csi::NodeGetVolumeStatsResponse> {
        let volume_id = required("volume_id", &req.volume_id)?;
        let path = Path::new(required("volume_path", &req.volume_path)?);
        let staged = self.locate(volume_id, path)?;
        let mut usage_error = None;
        let usage = match staged.fs_type {
            None => {
                let total = device_size(&staged.data_device())?;
                vec![csi::VolumeUsage {
                    total: total as i64,
                    unit: csi::volume_usage::Unit::Bytes as i32,
                    ..Default::default()
                }]
            }
            Some(_) => match nix::sys::statvfs::statvfs(path) {
                Ok(st) => {
                    let frsize = st.fragment_size();
                    let bytes = csi::VolumeUsage {
                        available: (st.blocks_available() * frsize) as i64,
                        total: (st.blocks() * frsize) as i64,
                        used: ((st.blocks() - st.blocks_free()) * frsize) as i64,
                        unit: csi::volume_usage::Unit::Bytes as i32,
                    };
                    let inodes = csi::VolumeUsage {
                        available: st.files_available() as i64,
                        total: st.files() as i64,
                        used: (st.files() - st.files_free()) as i64,
                        unit: csi::volume_usage::Unit::Inodes as i32,
                    };
                    vec![bytes, inodes]
                }
                Err(e) => {
                    usage_error = Some(format!("statvfs {}: {e}", path.display()));
                    Vec::new()
                }
            },
        };
        let condition = self.condition(&staged, usage_error).await;
        Ok(csi::NodeGetVolumeStatsResponse { usage, volume_condition: Some(condition) })
    }

    async fn node_expand(&self, req: csi::NodeExpandVolumeRequest) -> Result<csi::NodeExpandVolumeResponse> {
        let volume_id = required("volume_id", &req.volume_id)?;
        let path = Path::new(required("volume_path", &req.volume_path)?);
        let cap = req.volume_capability.as_ref().map(capability::check).transpose()?;
        let staged = self.locate(volume_id, path)?;
        let _guard = self.inflight.claim(volume_id)?;
        let wanted = req.capacity_range.as_ref().map_or(0, |r| r.required_bytes.max(0) as u64);
        // The device takes the volume's size in metadata, which
        // ControllerExpandVolume set; a device that has it already stays.
        self.nbd.resize(&staged.meta_volume_id, &self.meta_list()).await?;
        if staged.encrypted {
            luks::grow(&staged.meta_volume_id).await?;
        }
        let size = device_size(&staged.device)?;
        if size < wanted {
            return Err(CsiError::precondition(format!(
                "{} is {size} bytes after growing it to the volume's size, less than the {wanted} requested: \
                 expand the volume (ControllerExpandVolume) first",
                staged.device.display()
            )));
        }
        let block = cap.as_ref().map_or(staged.fs_type.is_none(), Checked::is_block);
        if let (false, Some(fs)) = (block, staged.fs_type) {
            if staged.readonly {
                return Err(CsiError::precondition("volume is attached read-only: its filesystem cannot grow"));
            }
            let data_device = staged.data_device();
            if fs == FsType::Ext4 && !host::can_grow_mounted_ext4() {
                if tools::ext4_size(&data_device)? < device_size(&data_device)? {
                    return Err(CsiError::precondition(format!(
                        "the device has grown to {size} bytes, but growing a mounted ext4 filesystem needs \
                         CAP_SYS_RESOURCE, which this node plugin lacks (run it privileged, with that capability \
                         kept): the filesystem grows when the volume is next staged"
                    )));
                }
            } else {
                tools::grow_filesystem(&data_device, &staged.staging_path, fs).await?;
                tracing::info!(size, %fs, "filesystem grown");
            }
        }
        Ok(csi::NodeExpandVolumeResponse { capacity_bytes: size as i64 })
    }

    fn info(&self) -> csi::NodeGetInfoResponse {
        csi::NodeGetInfoResponse {
            node_id: self.node_id.clone(),
            max_volumes_per_node: self.max_volumes,
            accessible_topology: (!self.topology.is_empty())
                .then(|| csi::Topology { segments: self.topology.clone().into_iter().collect() }),
        }
    }
}

#[tonic::async_trait]
impl Node for NodeService {
    async fn node_stage_volume(
        &self,
        request: Request<csi::NodeStageVolumeRequest>,
    ) -> Result<Response<csi::NodeStageVolumeResponse>, Status> {
        let req = request.into_inner();
        let id = req.volume_id.clone();
        observe("NodeStageVolume", &id, self.node_stage(req)).await
    }

    async fn node_unstage_volume(
        &self,
        request: Request<csi::NodeUnstageVolumeRequest>,
    ) -> Result<Response<csi::NodeUnstageVolumeResponse>, Status> {
        let req = request.into_inner();
        let id = req.volume_id.clone();
        observe("NodeUnstageVolume", &id, self.node_unstage(req)).await
    }

    async fn node_publish_volume(
        &self,
        request: Request<csi::NodePublishVolumeRequest>,
    ) -> Result<Response<csi::NodePublishVolumeResponse>, Status> {
        let req = request.into_inner();
        let id = req.volume_id.clone();
        observe("NodePublishVolume", &id, self.node_publish(req)).await
    }

    async fn node_unpublish_volume(
        &self,
        request: Request<csi::NodeUnpublishVolumeRequest>,
    ) -> Result<Response<csi::NodeUnpublishVolumeResponse>, Status> {
        let req = request.into_inner();
        let id = req.volume_id.clone();
        observe("NodeUnpublishVolume", &id, self.node_unpublish(req)).await
    }

    async fn node_get_volume_stats(
        &self,
        request: Request<csi::NodeGetVolumeStatsRequest>,
    ) -> Result<Response<csi::NodeGetVolumeStatsResponse>, Status> {
        let req = request.into_inner();
        let id = req.volume_id.clone();
        observe("NodeGetVolumeStats", &id, self.node_stats(req)).await
    }

    async fn node_get_volume_health(
        &self,
        request: Request<csi::NodeGetVolumeHealthRequest>,
    ) -> Result<Response<csi::NodeGetVolumeHealthResponse>, Status> {
        let req = request.into_inner();
        let id = req.volume_id.clone();
        observe("NodeGetVolumeHealth", &id, self.node_volume_health(req)).await
    }

    async fn node_get_storage_health(
        &self,
        _request: Request<csi::NodeGetStorageHealthRequest>,
    ) -> Result<Response<csi::NodeGetStorageHealthResponse>, Status> {
        observe("NodeGetStorageHealth", "", async { Ok(self.storage_health().await) }).await
    }

    async fn node_expand_volume(
        &self,
        request: Request<csi::NodeExpandVolumeRequest>,
    ) -> Result<Response<csi::NodeExpandVolumeResponse>, Status> {
        let req = request.into_inner();
        let id = req.volume_id.clone();
        observe("NodeExpandVolume", &id, self.node_expand(req)).await
    }

    async fn node_get_capabilities(
        &self,
        _request: Request<csi::NodeGetCapabilitiesRequest>,
    ) -> Result<Response<csi::NodeGetCapabilitiesResponse>, Status> {
        observe("NodeGetCapabilities", "", async {
            let capabilities = CAPABILITIES
                .iter()
                .map(|t| csi::NodeServiceCapability {
                    r#type: Some(csi::node_service_capability::Type::Rpc(csi::node_service_capability::Rpc {
                        r#type: *t as i32,
                    })),
                })
                .collect();
            Ok(csi::NodeGetCapabilitiesResponse { capabilities })
        })
        .await
    }

    async fn node_get_info(
        &self,
        _request: Request<csi::NodeGetInfoRequest>,
    ) -> Result<Response<csi::NodeGetInfoResponse>, Status> {
        observe("NodeGetInfo", "", async { Ok(self.info()) }).await
    }
}
