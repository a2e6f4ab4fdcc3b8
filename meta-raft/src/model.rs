//! The entities the metadata service keeps: volumes, snapshots, chunk
//! servers, replica sets, attachments and CSI nodes, with their ids and
//! name rules. [`crate::state::MetaState`] holds them and changes them;
//! [`crate::types`] names them in commands and outcomes.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

use crate::error::MetaError;
use crate::modify::IoLimits;
use crate::placement::LIVENESS_TIMEOUT_MS;

pub const MAX_NAME_LEN: usize = 253;

/// A content source of a new volume.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum Source {
    Snapshot(String),
    Volume(String),
}

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
