//! The replicated metadata: volumes, chunk maps, snapshots, chunk servers and
//! attachments, and the deterministic rules that change them.
//!
//! [`MetaState::apply`] is the only writer. It runs on every member for
//! every committed command, so it must depend on nothing but its inputs.

use std::collections::BTreeMap;
use std::ops::Bound;

use ballast_proto::volume::{
    BLOCK_SIZE, DEFAULT_CHUNK_SIZE, DEFAULT_PAGE_SIZE, DEFAULT_REPLICAS, MAX_CHUNK_SIZE, MAX_PAGE_SIZE,
    MAX_VOLUME_SIZE, MIN_CHUNK_SIZE, PAGE_TOKEN_PREFIX,
};
use serde::{Deserialize, Serialize};

use crate::error::MetaError;
use crate::group::GroupSnapshot;
use crate::modify::{validate_replicas, IoLimits};
use crate::placement::{self, LIVENESS_TIMEOUT_MS};
use crate::types::{Command, Outcome, Source};

pub const MAX_NAME_LEN: usize = 253;

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Volume {
    pub id: String,
    /// Numeric id carried by data-plane frames.
    pub data_id: u64,
    pub name: String,
    pub size_bytes: u64,
    pub replicas: u32,
    pub chunk_size_bytes: u64,
    pub parameters: BTreeMap<String, String>,
    pub source: Option<Source>,
    pub created_at_ms: u64,
    /// The newest fencing epoch handed out for this volume.
    pub epoch: u64,
    /// Created from a source whose content is still being copied in.
    #[serde(default)]
    pub populating: bool,
    #[serde(default)]
    pub limits: IoLimits,
}

impl Volume {
    pub fn chunk_count(&self) -> u64 {
        self.size_bytes.div_ceil(self.chunk_size_bytes)
    }
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Snapshot {
    pub id: String,
    pub data_id: u64,
    pub name: String,
    pub source_volume_id: String,
    pub size_bytes: u64,
    pub created_at_ms: u64,
    pub ready_to_use: bool,
    pub chunk_size_bytes: u64,
    /// Where the copies of each chunk live; filled in when the snapshot
    /// is complete.
    #[serde(default)]
    pub chunks: BTreeMap<u64, ReplicaSet>,
    /// The group snapshot this one belongs to, if any.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub group_id: Option<String>,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ChunkServer {
    pub id: String,
    pub address: String,
    pub capacity_bytes: u64,
    pub used_bytes: u64,
    pub allocated_bytes: u64,
    pub labels: BTreeMap<String, String>,
    pub draining: bool,
    pub last_heartbeat_ms: u64,
}

impl ChunkServer {
    /// A server known by its id only, before its first registration applies.
    pub fn new(id: String) -> Self {
        ChunkServer {
            id,
            address: String::new(),
            capacity_bytes: 0,
            used_bytes: 0,
            allocated_bytes: 0,
            labels: BTreeMap::new(),
            draining: false,
            last_heartbeat_ms: 0,
        }
    }

    /// Space not yet promised to replicas nor used on disk.
    pub fn free_bytes(&self) -> u64 {
        self.capacity_bytes.saturating_sub(self.used_bytes.max(self.allocated_bytes))
    }

    pub fn is_alive(&self, now_ms: u64) -> bool {
        now_ms.saturating_sub(self.last_heartbeat_ms) <= LIVENESS_TIMEOUT_MS
    }

    /// Servers with identical labels share a failure domain; a server
    /// without labels is a domain of its own.
    pub fn failure_domain(&self) -> String {
        if self.labels.is_empty() {
            return format!("server={}", self.id);
        }
        let parts: Vec<String> = self.labels.iter().map(|(k, v)| format!("{k}={v}")).collect();
        parts.join(",")
    }
}

/// The servers holding one chunk. The generation grows whenever a member
/// leaves, so a stale view of the set can be recognised.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct ReplicaSet {
    pub generation: u64,
    pub servers: Vec<String>,
    /// Members that left since the set was last whole. Their copies are
    /// kept (not orphans): one that comes back catches up with what it
    /// missed instead of being copied whole.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub former: Vec<String>,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Attachment {
    pub volume_id: String,
    pub node_id: String,
    pub epoch: u64,
    pub readonly: bool,
}

/// A CSI node plugin, as it registered itself.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct CsiNode {
    pub node_id: String,
    /// Most volumes published to the node at once; 0 = no limit.
    pub max_volumes: u64,
    pub topology: BTreeMap<String, String>,
    pub registered_at_ms: u64,
}

/// A chunk a server reports holding, with its replica-set generation there.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(from = "LoggedHeldChunk")]
pub struct HeldChunk {
    pub data_id: u64,
    pub chunk_index: u64,
    pub generation: u64,
}

/// How logs written before held chunks carried a generation name them:
/// `[data_id, chunk_index]` (generation 0, which is older than any).
#[derive(Deserialize)]
#[serde(untagged)]
enum LoggedHeldChunk {
    Current { data_id: u64, chunk_index: u64, generation: u64 },
    Pair(u64, u64),
}

impl From<LoggedHeldChunk> for HeldChunk {
    fn from(logged: LoggedHeldChunk) -> Self {
        match logged {
            LoggedHeldChunk::Current { data_id, chunk_index, generation } => {
                HeldChunk { data_id, chunk_index, generation }
            }
            LoggedHeldChunk::Pair(data_id, chunk_index) => HeldChunk { data_id, chunk_index, generation: 0 },
        }
    }
}

/// All replicated metadata.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct MetaState {
    /// Random, set once when the first chunk server registers. Servers keep
    /// it and refuse any other cluster: a metadata cluster bootstrapped
    /// afresh (lost data directories) knows none of their chunks, and must
    /// not have them deleted as orphans.
    #[serde(default)]
    pub cluster_id: String,
    /// Signs the capabilities nodes present to chunk servers (PKCS#8
    /// Ed25519); created once, with the first capability or heartbeat that
    /// needs it, and never replaced: chunk servers keep its public half.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub capability_key: Vec<u8>,
    pub volumes: BTreeMap<String, Volume>,
    pub volume_names: BTreeMap<String, String>,
    pub chunk_maps: BTreeMap<String, BTreeMap<u64, ReplicaSet>>,
    pub snapshots: BTreeMap<String, Snapshot>,
    pub snapshot_names: BTreeMap<String, String>,
    pub servers: BTreeMap<String, ChunkServer>,
    /// volume id → node id → attachment.
    pub attachments: BTreeMap<String, BTreeMap<String, Attachment>>,
    /// CSI node id → node.
    #[serde(default)]
    pub nodes: BTreeMap<String, CsiNode>,
    #[serde(default)]
    pub groups: BTreeMap<String, GroupSnapshot>,
    #[serde(default)]
    pub group_names: BTreeMap<String, String>,
}

/// What a new volume is, beside its name, parameters and source (0 picks
/// the default replica count and chunk size).
struct VolumeShape {
    size_bytes: u64,
    replicas: u32,
    chunk_size_bytes: u64,
    limits: IoLimits,
}

pub fn volume_id(data_id: u64) -> String {
    format!("vol-{data_id:x}")
}

pub fn snapshot_id(data_id: u64) -> String {
    format!("snap-{data_id:x}")
}

pub(crate) fn validate_name(what: &str, name: &str) -> Result<(), MetaError> {
    if name.is_empty() {
        return Err(MetaError::invalid(format!("{what} name must not be empty")));
    }
    if name.len() > MAX_NAME_LEN {
        return Err(MetaError::invalid(format!("{what} name is longer than {MAX_NAME_LEN} bytes")));
    }
    Ok(())
}

fn validate_size(size_bytes: u64) -> Result<(), MetaError> {
    if size_bytes == 0 {
        return Err(MetaError::invalid("volume size must be greater than zero"));
    }
    if !size_bytes.is_multiple_of(BLOCK_SIZE) {
        return Err(MetaError::invalid(format!("volume size {size_bytes} is not a multiple of {BLOCK_SIZE} bytes")));
    }
    if size_bytes > MAX_VOLUME_SIZE {
        return Err(MetaError::OutOfRange(format!(
            "volume size {size_bytes} exceeds the maximum of {MAX_VOLUME_SIZE} bytes"
        )));
    }
    Ok(())
}

impl MetaState {
    /// Applies one committed command. `index` is the command's log index,
    /// unique for the cluster's lifetime, and names whatever it creates.
    pub fn apply(&mut self, index: u64, at_ms: u64, command: Command) -> Result<Outcome, MetaError> {
        match command {
            Command::CreateVolume { name, size_bytes, replicas, chunk_size_bytes, parameters, source, limits } => {
                let shape = VolumeShape { size_bytes, replicas, chunk_size_bytes, limits };
                self.create_volume(index, at_ms, name, shape, parameters, source)
            }
            Command::DeleteVolume { id } => self.delete_volume(&id),
            Command::ExpandVolume { id, size_bytes } => self.expand_volume(&id, size_bytes),
            Command::ModifyVolume { id, change } => self.modify_volume(at_ms, &id, change),
            Command::CreateSnapshot { name, source_volume_id, group_id } => {
                self.create_snapshot(index, at_ms, name, source_volume_id, group_id)
            }
            Command::DeleteSnapshot { id } => {
                if let Some(group) = self.snapshots.get(&id).and_then(|s| s.group_id.as_ref()) {
                    return Err(MetaError::FailedPrecondition(format!(
                        "snapshot {id} belongs to group snapshot {group}: delete the group"
                    )));
                }
                Ok(Outcome::Existed(self.remove_snapshot(&id)))
            }
            Command::CreateGroupSnapshot { name, source_volume_ids } => {
                self.create_group_snapshot(index, at_ms, name, source_volume_ids)
            }
            Command::DeleteGroupSnapshot { id } => Ok(self.delete_group_snapshot(&id)),
            Command::CompleteSnapshot { id, chunks } => self.complete_snapshot(&id, chunks),
            Command::MarkVolumeReady { id } => {
                let volume = self.volumes.get_mut(&id).ok_or_else(|| MetaError::not_found(format!("volume {id}")))?;
                volume.populating = false;
                Ok(Outcome::Volume(volume.clone()))
            }
            Command::SetClusterId { id } => {
                if self.cluster_id.is_empty() {
                    self.cluster_id = id;
                }
                Ok(Outcome::ClusterId(self.cluster_id.clone()))
            }
            Command::SetCapabilityKey { pkcs8 } => {
                if self.capability_key.is_empty() {
                    self.capability_key = pkcs8;
                }
                Ok(Outcome::CapabilityKey(self.capability_key.clone()))
            }
            Command::RegisterChunkServer { id, address, capacity_bytes, labels, cluster_id } => {
                self.check_cluster(&id, &cluster_id)?;
                self.register_server(at_ms, id, address, capacity_bytes, labels)
            }
            Command::Heartbeat { server_id, used_bytes, capacity_bytes, held, cluster_id } => {
                self.check_cluster(&server_id, &cluster_id)?;
                self.heartbeat(index, at_ms, &server_id, used_bytes, capacity_bytes, held)
            }
            Command::SetDraining { server_id, draining } => {
                let server = self
                    .servers
                    .get_mut(&server_id)
                    .ok_or_else(|| MetaError::not_found(format!("chunk server {server_id}")))?;
                server.draining = draining;
                Ok(Outcome::ChunkServer(server.clone()))
            }
            Command::AllocateChunk { volume_id, chunk_index, writer_epoch } => {
                self.check_writer_epoch(&volume_id, writer_epoch)?;
                self.allocate_chunk(at_ms, &volume_id, chunk_index)
            }
            Command::RegisterNode { node_id, max_volumes, topology } => {
                if node_id.is_empty() {
                    return Err(MetaError::invalid("node id is required"));
                }
                let node = CsiNode { node_id: node_id.clone(), max_volumes, topology, registered_at_ms: at_ms };
                self.nodes.insert(node_id, node.clone());
                Ok(Outcome::Node(node))
            }
            Command::ReportFailedReplica { volume_id, chunk_index, server_id, generation, writer_epoch } => {
                self.check_writer_epoch(&volume_id, writer_epoch)?;
                self.report_failed_replica(&volume_id, chunk_index, &server_id, generation)
            }
            Command::AddReplica { volume_id, chunk_index, server_id, generation } => {
                self.add_replica(&volume_id, chunk_index, &server_id, generation)
            }
            Command::Publish { volume_id, node_id, readonly } => self.publish(&volume_id, &node_id, readonly),
            Command::Unpublish { volume_id, node_id } => {
                if volume_id.is_empty() || node_id.is_empty() {
                    return Err(MetaError::invalid("volume id and node id are required"));
                }
                let existed = match self.attachments.get_mut(&volume_id) {
                    Some(nodes) => {
                        let existed = nodes.remove(&node_id).is_some();
                        if nodes.is_empty() {
                            self.attachments.remove(&volume_id);
                        }
                        existed
                    }
                    None => false,
                };
                Ok(Outcome::Existed(existed))
            }
        }
    }

    fn create_volume(
        &mut self,
        index: u64,
        at_ms: u64,
        name: String,
        shape: VolumeShape,
        parameters: BTreeMap<String, String>,
        source: Option<Source>,
    ) -> Result<Outcome, MetaError> {
        let VolumeShape { size_bytes, replicas, chunk_size_bytes, limits } = shape;
        validate_name("volume", &name)?;
        validate_size(size_bytes)?;
        let replicas = if replicas == 0 { DEFAULT_REPLICAS } else { replicas };
        validate_replicas(replicas)?;
        limits.validate()?;
        let chunk_size_bytes = if chunk_size_bytes == 0 { DEFAULT_CHUNK_SIZE } else { chunk_size_bytes };
        if !chunk_size_bytes.is_power_of_two() || !(MIN_CHUNK_SIZE..=MAX_CHUNK_SIZE).contains(&chunk_size_bytes) {
            return Err(MetaError::invalid(format!(
                "chunk size must be a power of two between {MIN_CHUNK_SIZE} and {MAX_CHUNK_SIZE} bytes, not {chunk_size_bytes}"
            )));
        }
        if let Some(existing_id) = self.volume_names.get(&name) {
            let existing = &self.volumes[existing_id];
            let compatible = existing.size_bytes == size_bytes
                && existing.replicas == replicas
                && existing.chunk_size_bytes == chunk_size_bytes
                && existing.parameters == parameters
                && existing.source == source
                && existing.limits == limits;
            return if compatible {
                Ok(Outcome::Volume(existing.clone()))
            } else {
                Err(MetaError::AlreadyExists(format!(
                    "volume {name:?} exists as {} with a different size, replica count, chunk size, parameters or source",
                    existing.id
                )))
            };
        }
        match &source {
            Some(Source::Snapshot(id)) => {
                let snap = self.snapshots.get(id).ok_or_else(|| MetaError::not_found(format!("snapshot {id}")))?;
                if size_bytes < snap.size_bytes {
                    return Err(MetaError::OutOfRange(format!(
                        "volume size {size_bytes} is smaller than snapshot {id} ({} bytes)",
                        snap.size_bytes
                    )));
                }
            }
            Some(Source::Volume(id)) => {
                let src = self.volumes.get(id).ok_or_else(|| MetaError::not_found(format!("volume {id}")))?;
                if size_bytes < src.size_bytes {
                    return Err(MetaError::OutOfRange(format!(
                        "volume size {size_bytes} is smaller than source volume {id} ({} bytes)",
                        src.size_bytes
                    )));
                }
            }
            None => {}
        }
        let volume = Volume {
            id: volume_id(index),
            data_id: index,
            name: name.clone(),
            size_bytes,
            replicas,
            chunk_size_bytes,
            parameters,
            populating: source.is_some(),
            source,
            created_at_ms: at_ms,
            epoch: 0,
            limits,
        };
        self.volume_names.insert(name, volume.id.clone());
        self.volumes.insert(volume.id.clone(), volume.clone());
        Ok(Outcome::Volume(volume))
    }

    fn delete_volume(&mut self, id: &str) -> Result<Outcome, MetaError> {
        if id.is_empty() {
            return Err(MetaError::invalid("volume id must not be empty"));
        }
        let Some(volume) = self.volumes.get(id) else {
            return Ok(Outcome::Existed(false));
        };
        if let Some(nodes) = self.attachments.get(id) {
            let names: Vec<&str> = nodes.keys().map(String::as_str).collect();
            return Err(MetaError::FailedPrecondition(format!(
                "volume {id} is published to {}; unpublish it first",
                names.join(", ")
            )));
        }
        let chunk_size = volume.chunk_size_bytes;
        self.volume_names.remove(&volume.name);
        self.volumes.remove(id);
        for set in self.chunk_maps.remove(id).unwrap_or_default().into_values() {
            self.release(&set.servers, chunk_size);
        }
        Ok(Outcome::Existed(true))
    }

    fn release(&mut self, servers: &[String], chunk_size: u64) {
        for server_id in servers {
            if let Some(server) = self.servers.get_mut(server_id) {
                server.allocated_bytes = server.allocated_bytes.saturating_sub(chunk_size);
            }
        }
    }

    fn expand_volume(&mut self, id: &str, size_bytes: u64) -> Result<Outcome, MetaError> {
        validate_size(size_bytes)?;
        let volume = self.volumes.get_mut(id).ok_or_else(|| MetaError::not_found(format!("volume {id}")))?;
        if size_bytes < volume.size_bytes {
            return Err(MetaError::OutOfRange(format!(
                "volume {id} is {} bytes; it can grow but not shrink to {size_bytes}",
                volume.size_bytes
            )));
        }
        volume.size_bytes = size_bytes;
        Ok(Outcome::Volume(volume.clone()))
    }

    fn create_snapshot(
        &mut self,
        index: u64,
        at_ms: u64,
        name: String,
        source: String,
        group_id: Option<String>,
    ) -> Result<Outcome, MetaError> {
        validate_name("snapshot", &name)?;
        if source.is_empty() {
            return Err(MetaError::invalid("snapshot source volume id must not be empty"));
        }
        if let Some(existing_id) = self.snapshot_names.get(&name) {
            let existing = &self.snapshots[existing_id];
            return if existing.source_volume_id == source && existing.group_id == group_id {
                Ok(Outcome::Snapshot(existing.clone()))
            } else {
                Err(MetaError::AlreadyExists(format!(
                    "snapshot {name:?} exists as {} of volume {}",
                    existing.id, existing.source_volume_id
                )))
            };
        }
        let volume = self.volumes.get(&source).ok_or_else(|| MetaError::not_found(format!("volume {source}")))?;
        if let Some(group_id) = &group_id {
            self.check_new_member(group_id, &source)?;
        }
        let snapshot = Snapshot {
            id: snapshot_id(index),
            data_id: index,
            name: name.clone(),
            source_volume_id: source,
            size_bytes: volume.size_bytes,
            created_at_ms: at_ms,
            ready_to_use: false,
            chunk_size_bytes: volume.chunk_size_bytes,
            chunks: BTreeMap::new(),
            group_id,
        };
        if let Some(group_id) = &snapshot.group_id {
            self.add_member(group_id, &snapshot.id);
        }
        self.snapshot_names.insert(name, snapshot.id.clone());
        self.snapshots.insert(snapshot.id.clone(), snapshot.clone());
        Ok(Outcome::Snapshot(snapshot))
    }

    /// Forgets a snapshot and the space its copies took; whether it existed.
    pub(crate) fn remove_snapshot(&mut self, id: &str) -> bool {
        let Some(snap) = self.snapshots.remove(id) else { return false };
        self.snapshot_names.remove(&snap.name);
        for set in snap.chunks.values() {
            self.release(&set.servers, snap.chunk_size_bytes);
        }
        true
    }

    fn complete_snapshot(&mut self, id: &str, chunks: BTreeMap<u64, Vec<String>>) -> Result<Outcome, MetaError> {
        let snap = self.snapshots.get(id).ok_or_else(|| MetaError::not_found(format!("snapshot {id}")))?;
        if snap.ready_to_use {
            return Ok(Outcome::Snapshot(snap.clone()));
        }
        if let Some(unknown) = chunks.values().flatten().find(|s| !self.servers.contains_key(*s)) {
            return Err(MetaError::invalid(format!("unknown chunk server {unknown}")));
        }
        let chunk_size = snap.chunk_size_bytes;
        let sets: BTreeMap<u64, ReplicaSet> = chunks
            .into_iter()
            .map(|(i, servers)| (i, ReplicaSet { generation: 1, servers, ..Default::default() }))
            .collect();
        for set in sets.values() {
            for server in &set.servers {
                if let Some(s) = self.servers.get_mut(server) {
                    s.allocated_bytes += chunk_size;
                }
            }
        }
        let snap = self.snapshots.get_mut(id).expect("checked above");
        snap.chunks = sets;
        snap.ready_to_use = true;
        Ok(Outcome::Snapshot(snap.clone()))
    }

    fn register_server(
        &mut self,
        at_ms: u64,
        id: String,
        address: String,
        capacity_bytes: u64,
        labels: BTreeMap<String, String>,
    ) -> Result<Outcome, MetaError> {
        if id.is_empty() || address.is_empty() {
            return Err(MetaError::invalid("chunk server id and address are required"));
        }
        let server = self.servers.entry(id.clone()).or_insert_with(|| ChunkServer::new(id));
        server.address = address;
        server.capacity_bytes = capacity_bytes;
        server.labels = labels;
        server.last_heartbeat_ms = at_ms;
        Ok(Outcome::ChunkServer(server.clone()))
    }

    /// A server whose data belongs to another metadata cluster is refused.
    fn check_cluster(&self, server_id: &str, claimed: &str) -> Result<(), MetaError> {
        if claimed.is_empty() || claimed == self.cluster_id {
            return Ok(());
        }
        Err(MetaError::FailedPrecondition(format!(
            "chunk server {server_id} belongs to metadata cluster {claimed}, and this is metadata cluster {:?}: \
             it would see every chunk of that server as an orphan",
            self.cluster_id
        )))
    }

    fn heartbeat(
        &mut self,
        index: u64,
        at_ms: u64,
        server_id: &str,
        used_bytes: u64,
        capacity_bytes: u64,
        held: Option<Vec<HeldChunk>>,
    ) -> Result<Outcome, MetaError> {
        let server = self
            .servers
            .get_mut(server_id)
            .ok_or_else(|| MetaError::not_found(format!("chunk server {server_id} is not registered")))?;
        server.used_bytes = used_bytes;
        server.capacity_bytes = capacity_bytes;
        server.last_heartbeat_ms = at_ms;
        let orphaned = held.unwrap_or_default().into_iter().filter(|c| self.is_orphan(index, server_id, c)).collect();
        Ok(Outcome::Orphaned(orphaned))
    }

    /// Whether `server_id` may drop a chunk it holds: no volume or
    /// snapshot references its copy, and metadata is not behind the chunk.
    /// A chunk is newer than this metadata when its data id (a log index)
    /// is beyond `index`, or when its volume still exists and the chunk is
    /// either unallocated here or at an older generation than on the server
    /// (metadata restored from an old copy): such chunks are kept.
    fn is_orphan(&self, index: u64, server_id: &str, chunk: &HeldChunk) -> bool {
        if self.references(server_id, chunk.data_id, chunk.chunk_index) || chunk.data_id >= index {
            return false;
        }
        let volume_id = volume_id(chunk.data_id);
        if !self.volumes.contains_key(&volume_id) {
            return true;
        }
        self.chunk_maps
            .get(&volume_id)
            .and_then(|chunks| chunks.get(&chunk.chunk_index))
            .is_some_and(|set| set.generation >= chunk.generation)
    }

    /// Whether metadata still expects `server_id` to hold this chunk.
    fn references(&self, server_id: &str, data_id: u64, chunk_index: u64) -> bool {
        if let Some(snap) = self.snapshots.get(&snapshot_id(data_id)) {
            // Until it is complete, a snapshot's copies are still being made.
            return !snap.ready_to_use
                || snap.chunks.get(&chunk_index).is_some_and(|set| set.servers.iter().any(|s| s == server_id));
        }
        self.chunk_maps
            .get(&volume_id(data_id))
            .and_then(|chunks| chunks.get(&chunk_index))
            .is_some_and(|set| set.servers.iter().chain(&set.former).any(|s| s == server_id))
    }

    fn allocate_chunk(&mut self, at_ms: u64, volume_id: &str, chunk_index: u64) -> Result<Outcome, MetaError> {
        let volume = self.volumes.get(volume_id).ok_or_else(|| MetaError::not_found(format!("volume {volume_id}")))?;
        if chunk_index >= volume.chunk_count() {
            return Err(MetaError::OutOfRange(format!(
                "chunk {chunk_index} is beyond the end of volume {volume_id} ({} chunks)",
                volume.chunk_count()
            )));
        }
        if let Some(set) = self.chunk_maps.get(volume_id).and_then(|m| m.get(&chunk_index)) {
            return Ok(self.replica_outcome(volume_id, chunk_index, set.clone()));
        }
        let wanted = volume.replicas as usize;
        let chunk_size = volume.chunk_size_bytes;
        let servers = placement::choose_replicas(&self.servers, wanted, chunk_size, at_ms, &[]);
        // A new chunk may start degraded, but never without a majority of
        // its replicas: the repair loop can only rebuild from survivors.
        let needed = wanted / 2 + 1;
        if servers.len() < needed {
            return Err(MetaError::ResourceExhausted(format!(
                "only {} live chunk servers with {chunk_size} bytes free; chunk needs at least {needed} of {wanted} replicas",
                servers.len()
            )));
        }
        for id in &servers {
            if let Some(server) = self.servers.get_mut(id) {
                server.allocated_bytes += chunk_size;
            }
        }
        let set = ReplicaSet { generation: 1, servers, ..Default::default() };
        self.chunk_maps.entry(volume_id.to_string()).or_default().insert(chunk_index, set.clone());
        Ok(self.replica_outcome(volume_id, chunk_index, set))
    }

    fn replica_outcome(&self, volume_id: &str, chunk_index: u64, set: ReplicaSet) -> Outcome {
        Outcome::ReplicaSet { volume_id: volume_id.to_string(), chunk_index, set }
    }

    /// A writer whose attachment epoch is behind the volume's was fenced by
    /// a newer publish: it may no longer change the volume's chunk map.
    fn check_writer_epoch(&self, volume_id: &str, writer_epoch: Option<u64>) -> Result<(), MetaError> {
        let (Some(writer), Some(volume)) = (writer_epoch, self.volumes.get(volume_id)) else { return Ok(()) };
        if writer < volume.epoch {
            return Err(MetaError::Fenced(format!(
                "volume {volume_id} was published again (epoch {}); this writer's epoch {writer} is fenced",
                volume.epoch
            )));
        }
        Ok(())
    }

    fn report_failed_replica(
        &mut self,
        volume_id: &str,
        chunk_index: u64,
        server_id: &str,
        generation: u64,
    ) -> Result<Outcome, MetaError> {
        let chunk_size = self
            .volumes
            .get(volume_id)
            .ok_or_else(|| MetaError::not_found(format!("volume {volume_id}")))?
            .chunk_size_bytes;
        let set = self.chunk_maps.get_mut(volume_id).and_then(|m| m.get_mut(&chunk_index)).ok_or_else(|| {
            MetaError::not_found(format!("chunk {chunk_index} of volume {volume_id} is not allocated"))
        })?;
        // A report against an older generation, or about a server already
        // gone, changes nothing: the reporter re-reads the current set.
        if set.generation != generation || !set.servers.iter().any(|s| s == server_id) {
            let current = set.clone();
            return Ok(self.replica_outcome(volume_id, chunk_index, current));
        }
        if set.servers.len() == 1 {
            return Err(MetaError::FailedPrecondition(format!(
                "server {server_id} holds the last replica of chunk {chunk_index} of volume {volume_id}"
            )));
        }
        set.servers.retain(|s| s != server_id);
        if !set.former.iter().any(|s| s == server_id) {
            set.former.push(server_id.to_string());
        }
        set.generation += 1;
        let current = set.clone();
        self.release(&[server_id.to_string()], chunk_size);
        Ok(self.replica_outcome(volume_id, chunk_index, current))
    }

    /// Adds a rebuilt replica. Refused when the set moved on since the
    /// rebuild started (the copy may miss what changed), when the server is
    /// unknown or already a member, or when the set is full.
    fn add_replica(
        &mut self,
        volume_id: &str,
        chunk_index: u64,
        server_id: &str,
        generation: u64,
    ) -> Result<Outcome, MetaError> {
        let volume = self.volumes.get(volume_id).ok_or_else(|| MetaError::not_found(format!("volume {volume_id}")))?;
        let (wanted, chunk_size) = (volume.replicas as usize, volume.chunk_size_bytes);
        if !self.servers.contains_key(server_id) {
            return Err(MetaError::not_found(format!("chunk server {server_id}")));
        }
        let set = self.chunk_maps.get_mut(volume_id).and_then(|m| m.get_mut(&chunk_index)).ok_or_else(|| {
            MetaError::not_found(format!("chunk {chunk_index} of volume {volume_id} is not allocated"))
        })?;
        if set.generation != generation {
            return Err(MetaError::FailedPrecondition(format!(
                "chunk {chunk_index} of volume {volume_id} moved to generation {} during the rebuild from {generation}",
                set.generation
            )));
        }
        if set.servers.iter().any(|s| s == server_id) {
            return Err(MetaError::AlreadyExists(format!(
                "{server_id} already holds chunk {chunk_index} of {volume_id}"
            )));
        }
        if set.servers.len() >= wanted {
            return Err(MetaError::FailedPrecondition(format!(
                "chunk {chunk_index} of volume {volume_id} already has its {wanted} replicas"
            )));
        }
        set.servers.push(server_id.to_string());
        set.former.retain(|s| s != server_id);
        if set.servers.len() == wanted {
            // Whole again: the copies left elsewhere are orphans now.
            set.former.clear();
        }
        set.generation += 1;
        let current = set.clone();
        if let Some(server) = self.servers.get_mut(server_id) {
            server.allocated_bytes += chunk_size;
        }
        Ok(self.replica_outcome(volume_id, chunk_index, current))
    }

    fn publish(&mut self, volume_id: &str, node_id: &str, readonly: bool) -> Result<Outcome, MetaError> {
        if volume_id.is_empty() || node_id.is_empty() {
            return Err(MetaError::invalid("volume id and node id are required"));
        }
        let volume =
            self.volumes.get_mut(volume_id).ok_or_else(|| MetaError::not_found(format!("volume {volume_id}")))?;
        let already = self.attachments.get(volume_id).and_then(|nodes| nodes.get(node_id)).is_some();
        if let Some(limit) = self.nodes.get(node_id).map(|n| n.max_volumes).filter(|max| *max > 0) {
            let published = self.attachments.values().filter(|nodes| nodes.contains_key(node_id)).count() as u64;
            if !already && published >= limit {
                return Err(MetaError::ResourceExhausted(format!(
                    "node {node_id} already has {published} volumes published, its limit"
                )));
            }
        }
        let nodes = self.attachments.entry(volume_id.to_string()).or_default();
        if let Some(existing) = nodes.get(node_id) {
            return if existing.readonly == readonly {
                Ok(Outcome::Attachment(existing.clone()))
            } else {
                Err(MetaError::AlreadyExists(format!(
                    "volume {volume_id} is already published to node {node_id} with readonly={}",
                    existing.readonly
                )))
            };
        }
        // One writer, or any number of readers: never both.
        if let Some(other) = nodes.values().find(|a| !a.readonly || !readonly) {
            let other = other.node_id.clone();
            if nodes.is_empty() {
                self.attachments.remove(volume_id);
            }
            return Err(MetaError::FailedPrecondition(format!(
                "volume {volume_id} is published to node {other}; a writable volume is attached to one node at a time"
            )));
        }
        // Readers share one epoch, so a new reader fences none of those
        // already reading; the first attachment after a writer (or none)
        // raises it, which fences the writer.
        if nodes.is_empty() {
            volume.epoch += 1;
        }
        let attachment = Attachment {
            volume_id: volume_id.to_string(),
            node_id: node_id.to_string(),
            epoch: volume.epoch,
            readonly,
        };
        nodes.insert(node_id.to_string(), attachment.clone());
        Ok(Outcome::Attachment(attachment))
    }

    // ---- queries -------------------------------------------------------

    pub fn volume_by_name(&self, name: &str) -> Option<&Volume> {
        self.volume_names.get(name).and_then(|id| self.volumes.get(id))
    }

    pub fn chunk_map(&self, volume_id: &str) -> Option<&BTreeMap<u64, ReplicaSet>> {
        self.chunk_maps.get(volume_id)
    }

    pub fn attachments_of(&self, volume_id: &str) -> Vec<Attachment> {
        self.attachments.get(volume_id).map(|nodes| nodes.values().cloned().collect()).unwrap_or_default()
    }
}

/// One page of a listing in key order.
pub struct Page<T> {
    pub items: Vec<T>,
    /// Key to pass back to continue after this page; `None` at the end.
    pub next: Option<String>,
}

/// Checks a page size; 0 selects the default.
pub fn page_size(requested: u32) -> Result<usize, MetaError> {
    match requested {
        0 => Ok(DEFAULT_PAGE_SIZE as usize),
        n if n > MAX_PAGE_SIZE => {
            Err(MetaError::invalid(format!("page size {n} exceeds the maximum of {MAX_PAGE_SIZE}")))
        }
        n => Ok(n as usize),
    }
}

/// Returns the entries of `map` that pass `keep`, in key order, starting
/// after the key encoded in `token`.
pub fn paginate<T: Clone>(
    map: &BTreeMap<String, T>,
    keep: impl Fn(&T) -> bool,
    token: &str,
    size: usize,
) -> Result<Page<T>, MetaError> {
    let start = if token.is_empty() {
        Bound::Unbounded
    } else {
        let key = token
            .strip_prefix(PAGE_TOKEN_PREFIX)
            .ok_or_else(|| MetaError::invalid(format!("page token {token:?} was not issued by this service")))?;
        Bound::Excluded(key)
    };
    let mut page: Vec<(&String, &T)> =
        map.range::<str, _>((start, Bound::Unbounded)).filter(|(_, v)| keep(v)).take(size + 1).collect();
    let next = if page.len() > size {
        page.truncate(size);
        page.last().map(|(k, _)| format!("{PAGE_TOKEN_PREFIX}{k}"))
    } else {
        None
    };
    Ok(Page { items: page.into_iter().map(|(_, v)| v.clone()).collect(), next })
}

#[cfg(test)]
mod tests {
    use super::*;

    const NOW: u64 = 1_000_000;

    fn apply(state: &mut MetaState, index: u64, command: Command) -> Result<Outcome, MetaError> {
        state.apply(index, NOW, command)
    }

    fn with_servers(count: usize) -> MetaState {
        let mut state = MetaState::default();
        for i in 0..count {
            apply(
                &mut state,
                i as u64 + 1,
                Command::RegisterChunkServer {
                    id: format!("s{i}"),
                    address: format!("127.0.0.1:{}", 7400 + i),
                    capacity_bytes: 100 << 30,
                    labels: BTreeMap::new(),
                    cluster_id: String::new(),
                },
            )
            .unwrap();
        }
        state
    }

    fn volume(state: &mut MetaState, index: u64, name: &str, size_bytes: u64) -> Volume {
        let command = Command::CreateVolume {
            name: name.into(),
            size_bytes,
            replicas: 3,
            chunk_size_bytes: 0,
            parameters: BTreeMap::new(),
            source: None,
            limits: Default::default(),
        };
        match apply(state, index, command).unwrap() {
            Outcome::Volume(v) => v,
            other => panic!("{other:?}"),
        }
    }

    fn replica_set(outcome: Outcome) -> ReplicaSet {
        match outcome {
            Outcome::ReplicaSet { set, .. } => set,
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn chunk_allocation_is_idempotent_and_failure_reports_bump_the_generation() {
        let mut state = with_servers(4);
        let v = volume(&mut state, 10, "v", 256 << 20);
        let alloc = Command::AllocateChunk { volume_id: v.id.clone(), chunk_index: 2, writer_epoch: None };
        let first = replica_set(apply(&mut state, 11, alloc.clone()).unwrap());
        assert_eq!(first.servers.len(), 3);
        assert_eq!(replica_set(apply(&mut state, 12, alloc).unwrap()), first);

        let failed = first.servers[0].clone();
        let report = Command::ReportFailedReplica {
            volume_id: v.id.clone(),
            chunk_index: 2,
            server_id: failed.clone(),
            generation: first.generation,
            writer_epoch: None,
        };
        let second = replica_set(apply(&mut state, 13, report.clone()).unwrap());
        assert_eq!(second.generation, first.generation + 1);
        assert!(!second.servers.contains(&failed));
        // The same report again (a retry, or a second client) changes nothing.
        assert_eq!(replica_set(apply(&mut state, 14, report).unwrap()), second);
        assert_eq!(state.servers[&failed].allocated_bytes, 0);
    }

    #[test]
    fn the_last_replica_is_never_dropped() {
        let mut state = with_servers(1);
        let mut v = volume(&mut state, 10, "v", 64 << 20);
        v.replicas = 1;
        state.volumes.insert(v.id.clone(), v.clone());
        let set = replica_set(
            apply(
                &mut state,
                11,
                Command::AllocateChunk { volume_id: v.id.clone(), chunk_index: 0, writer_epoch: None },
            )
            .unwrap(),
        );
        let report = Command::ReportFailedReplica {
            volume_id: v.id,
            chunk_index: 0,
            server_id: set.servers[0].clone(),
            generation: set.generation,
            writer_epoch: None,
        };
        assert!(matches!(apply(&mut state, 12, report), Err(MetaError::FailedPrecondition(_))));
    }

    #[test]
    fn allocation_needs_a_majority_of_live_servers() {
        let mut state = with_servers(1);
        let v = volume(&mut state, 10, "v", 64 << 20);
        let result =
            apply(&mut state, 11, Command::AllocateChunk { volume_id: v.id, chunk_index: 0, writer_epoch: None });
        assert!(matches!(result, Err(MetaError::ResourceExhausted(_))), "{result:?}");
    }

    fn beat(server_id: &str, held: &[(u64, u64, u64)], cluster_id: &str) -> Command {
        Command::Heartbeat {
            server_id: server_id.into(),
            used_bytes: 1,
            capacity_bytes: 100 << 30,
            held: Some(
                held.iter()
                    .map(|&(data_id, chunk_index, generation)| HeldChunk { data_id, chunk_index, generation })
                    .collect(),
            ),
            cluster_id: cluster_id.into(),
        }
    }

    fn orphaned(outcome: Outcome) -> Vec<(u64, u64)> {
        match outcome {
            Outcome::Orphaned(list) => list.iter().map(|c| (c.data_id, c.chunk_index)).collect(),
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn a_member_that_left_keeps_its_copy_until_the_set_is_whole_again() {
        let mut state = with_servers(4);
        let v = volume(&mut state, 10, "v", 128 << 20);
        let allocate = Command::AllocateChunk { volume_id: v.id.clone(), chunk_index: 0, writer_epoch: None };
        let set = replica_set(apply(&mut state, 11, allocate).unwrap());
        let gone = set.servers[0].clone();
        let report = Command::ReportFailedReplica {
            volume_id: v.id.clone(),
            chunk_index: 0,
            server_id: gone.clone(),
            generation: set.generation,
            writer_epoch: None,
        };
        let set = replica_set(apply(&mut state, 12, report).unwrap());
        assert_eq!(set.former, vec![gone.clone()]);
        // It may come back and catch up: its copy is no orphan meanwhile.
        let held = [(v.data_id, 0, 1)];
        assert_eq!(orphaned(apply(&mut state, 13, beat(&gone, &held, "")).unwrap()), vec![]);
        // Another server takes its place: the set is whole, the copy an orphan.
        let spare = state.servers.keys().find(|s| !set.servers.contains(s) && **s != gone).unwrap().clone();
        let add = Command::AddReplica {
            volume_id: v.id.clone(),
            chunk_index: 0,
            server_id: spare,
            generation: set.generation,
        };
        assert!(replica_set(apply(&mut state, 14, add).unwrap()).former.is_empty());
        assert_eq!(orphaned(apply(&mut state, 15, beat(&gone, &held, "")).unwrap()), vec![(v.data_id, 0)]);
    }

    #[test]
    fn heartbeats_name_chunks_nobody_references_and_nothing_metadata_is_behind_on() {
        let mut state = with_servers(4);
        let v = volume(&mut state, 10, "v", 128 << 20);
        let set = replica_set(
            apply(
                &mut state,
                11,
                Command::AllocateChunk { volume_id: v.id.clone(), chunk_index: 0, writer_epoch: None },
            )
            .unwrap(),
        );
        let holder = set.servers[0].clone();
        // Referenced; an unallocated chunk of a live volume; a deleted
        // volume's; and one of a volume created after index 12.
        let held = [(v.data_id, 0, 1), (v.data_id, 1, 1), (5, 0, 1), (999, 0, 1)];
        assert_eq!(orphaned(apply(&mut state, 12, beat(&holder, &held, "")).unwrap()), vec![(5, 0)]);
        // A server outside the set: its copy is an orphan, unless it is at a
        // newer generation than the set (metadata restored from an old copy).
        let outsider = state.servers.keys().find(|s| !set.servers.contains(s)).unwrap().clone();
        assert_eq!(
            orphaned(apply(&mut state, 13, beat(&outsider, &[(v.data_id, 0, 1)], "")).unwrap()),
            vec![(v.data_id, 0)]
        );
        assert_eq!(orphaned(apply(&mut state, 14, beat(&outsider, &[(v.data_id, 0, 5)], "")).unwrap()), vec![]);
        apply(&mut state, 15, Command::DeleteVolume { id: v.id.clone() }).unwrap();
        assert_eq!(
            orphaned(apply(&mut state, 16, beat(&holder, &[(v.data_id, 0, 1)], "")).unwrap()),
            vec![(v.data_id, 0)]
        );
    }

    #[test]
    fn heartbeats_logged_before_generations_still_load() {
        let old = r#"{"Heartbeat":{"server_id":"s0","used_bytes":1,"capacity_bytes":2,"held":[[7,3]]}}"#;
        match serde_json::from_str::<Command>(old).unwrap() {
            Command::Heartbeat { held: Some(held), cluster_id, .. } => {
                assert_eq!(held, vec![HeldChunk { data_id: 7, chunk_index: 3, generation: 0 }]);
                assert!(cluster_id.is_empty());
            }
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn servers_of_another_cluster_are_refused() {
        let mut state = with_servers(1);
        let id = |outcome| match outcome {
            Ok(Outcome::ClusterId(id)) => id,
            other => panic!("{other:?}"),
        };
        assert_eq!(id(apply(&mut state, 2, Command::SetClusterId { id: "a".into() })), "a");
        assert_eq!(id(apply(&mut state, 3, Command::SetClusterId { id: "b".into() })), "a", "named once");
        let register = |cluster_id: &str| Command::RegisterChunkServer {
            id: "s0".into(),
            address: "127.0.0.1:7400".into(),
            capacity_bytes: 1 << 30,
            labels: BTreeMap::new(),
            cluster_id: cluster_id.into(),
        };
        assert!(apply(&mut state, 4, register("a")).is_ok());
        assert!(apply(&mut state, 5, register("")).is_ok(), "a server's first registration");
        assert!(
            matches!(apply(&mut state, 6, register("b")), Err(MetaError::FailedPrecondition(m)) if m.contains("belongs to metadata cluster b"))
        );
        assert!(matches!(apply(&mut state, 7, beat("s0", &[(1, 0, 1)], "b")), Err(MetaError::FailedPrecondition(_))));
        assert!(apply(&mut state, 8, beat("s0", &[], "a")).is_ok());
    }

    #[test]
    fn pagination_walks_every_entry_once() {
        let mut state = MetaState::default();
        for i in 0..25 {
            volume(&mut state, 100 + i, &format!("v{i}"), 1 << 20);
        }
        let mut seen = Vec::new();
        let mut token = String::new();
        loop {
            let page = paginate(&state.volumes, |_| true, &token, 10).unwrap();
            seen.extend(page.items.into_iter().map(|v| v.id));
            match page.next {
                Some(next) => token = next,
                None => break,
            }
        }
        let all: Vec<String> = state.volumes.keys().cloned().collect();
        assert_eq!(seen, all);
    }

    #[test]
    fn deleting_a_published_volume_is_refused() {
        let mut state = MetaState::default();
        let v = volume(&mut state, 10, "v", 1 << 20);
        apply(&mut state, 11, Command::Publish { volume_id: v.id.clone(), node_id: "n".into(), readonly: false })
            .unwrap();
        assert!(matches!(
            apply(&mut state, 12, Command::DeleteVolume { id: v.id.clone() }),
            Err(MetaError::FailedPrecondition(_))
        ));
        apply(&mut state, 13, Command::Unpublish { volume_id: v.id.clone(), node_id: "n".into() }).unwrap();
        assert!(matches!(apply(&mut state, 14, Command::DeleteVolume { id: v.id }), Ok(Outcome::Existed(true))));
    }

    #[test]
    fn a_node_holds_at_most_its_max_volumes() {
        let mut state = MetaState::default();
        let ids: Vec<String> = (0..3).map(|i| volume(&mut state, 10 + i, &format!("v{i}"), 1 << 20).id).collect();
        let node = |max_volumes| Command::RegisterNode { node_id: "n".into(), max_volumes, topology: BTreeMap::new() };
        assert!(matches!(apply(&mut state, 20, node(2)), Ok(Outcome::Node(CsiNode { max_volumes: 2, .. }))));
        let publish = |id: &String| Command::Publish { volume_id: id.clone(), node_id: "n".into(), readonly: false };
        apply(&mut state, 21, publish(&ids[0])).unwrap();
        apply(&mut state, 22, publish(&ids[1])).unwrap();
        assert!(matches!(apply(&mut state, 23, publish(&ids[2])), Err(MetaError::ResourceExhausted(_))));
        assert!(!state.attachments.get(&ids[2]).is_some_and(|n| n.contains_key("n")), "nothing recorded");
        // Publishing again what is already there is not a new volume.
        apply(&mut state, 24, publish(&ids[1])).unwrap();
        apply(&mut state, 25, Command::Unpublish { volume_id: ids[0].clone(), node_id: "n".into() }).unwrap();
        apply(&mut state, 26, publish(&ids[2])).unwrap();
        // Re-registering replaces the limit; 0 lifts it; unregistered nodes have none.
        apply(&mut state, 27, node(0)).unwrap();
        apply(&mut state, 28, publish(&ids[0])).unwrap();
        let other = Command::Publish { volume_id: ids[0].clone(), node_id: "elsewhere".into(), readonly: true };
        assert!(matches!(apply(&mut state, 29, other), Err(MetaError::FailedPrecondition(_))));
        assert!(matches!(
            apply(
                &mut state,
                30,
                Command::RegisterNode { node_id: String::new(), max_volumes: 1, topology: BTreeMap::new() }
            ),
            Err(MetaError::InvalidArgument(_))
        ));
    }

    #[test]
    fn state_written_before_the_node_registry_still_loads() {
        let mut old = serde_json::to_value(MetaState::default()).unwrap();
        old.as_object_mut().unwrap().remove("nodes");
        let loaded: MetaState = serde_json::from_value(old).unwrap();
        assert!(loaded.nodes.is_empty());
    }

    #[test]
    fn a_rebuilt_replica_joins_only_the_generation_it_was_copied_from() {
        let mut state = with_servers(4);
        let v = volume(&mut state, 10, "v", 4 << 20);
        let Outcome::ReplicaSet { set, .. } = apply(
            &mut state,
            11,
            Command::AllocateChunk { volume_id: v.id.clone(), chunk_index: 0, writer_epoch: None },
        )
        .unwrap() else {
            panic!("a replica set")
        };
        let (lost, spare) =
            (set.servers[0].clone(), state.servers.keys().find(|s| !set.servers.contains(s)).unwrap().clone());
        let report = Command::ReportFailedReplica {
            volume_id: v.id.clone(),
            chunk_index: 0,
            server_id: lost.clone(),
            generation: set.generation,
            writer_epoch: None,
        };
        apply(&mut state, 12, report).unwrap();
        let add = |server: &str, generation| Command::AddReplica {
            volume_id: v.id.clone(),
            chunk_index: 0,
            server_id: server.into(),
            generation,
        };
        // Copied from the set before the failure: refused.
        assert!(matches!(apply(&mut state, 13, add(&spare, set.generation)), Err(MetaError::FailedPrecondition(_))));
        let before = state.servers[&spare].allocated_bytes;
        let Outcome::ReplicaSet { set: grown, .. } = apply(&mut state, 14, add(&spare, set.generation + 1)).unwrap()
        else {
            panic!("a replica set")
        };
        assert_eq!(grown.generation, set.generation + 2);
        assert!(grown.servers.contains(&spare) && !grown.servers.contains(&lost));
        assert_eq!(state.servers[&spare].allocated_bytes, before + v.chunk_size_bytes);
        // Full, or already a member: refused.
        assert!(apply(&mut state, 15, add(&lost, grown.generation)).is_err());
        assert!(matches!(apply(&mut state, 16, add(&spare, grown.generation)), Err(MetaError::AlreadyExists(_))));
    }
}
