//! The Raft type configuration and the commands the log carries.

use std::collections::BTreeMap;
use std::io::Cursor;

use serde::{Deserialize, Serialize};

use crate::error::MetaError;
use crate::group::GroupSnapshot;
use crate::model::{Attachment, ChunkServer, CsiNode, HeldChunk, ReplicaSet, Snapshot, Source, Volume};
use crate::modify::{IoLimits, VolumeChange};

/// Identifies a member of the metadata cluster.
pub type NodeId = u64;

openraft::declare_raft_types!(
    /// Openraft type configuration of the metadata service.
    pub TypeConfig:
        D = Request,
        R = Response,
        NodeId = NodeId,
        Node = openraft::BasicNode,
        Entry = openraft::Entry<TypeConfig>,
        SnapshotData = Cursor<Vec<u8>>,
        AsyncRuntime = openraft::TokioRuntime,
);

pub type Raft = openraft::Raft<TypeConfig>;

/// A log entry's application payload: a command stamped with the proposer's
/// wall clock, so that applying it is deterministic on every member.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct Request {
    pub at_ms: u64,
    pub command: Command,
}

/// Every state change of the metadata service.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub enum Command {
    CreateVolume {
        name: String,
        size_bytes: u64,
        replicas: u32,
        chunk_size_bytes: u64,
        parameters: BTreeMap<String, String>,
        source: Option<Source>,
        #[serde(default)]
        limits: IoLimits,
    },
    DeleteVolume {
        id: String,
    },
    ExpandVolume {
        id: String,
        size_bytes: u64,
    },
    ModifyVolume {
        id: String,
        change: VolumeChange,
    },
    CreateSnapshot {
        name: String,
        source_volume_id: String,
        /// A member of this group snapshot.
        #[serde(default)]
        group_id: Option<String>,
    },
    CreateGroupSnapshot {
        name: String,
        source_volume_ids: Vec<String>,
    },
    /// Deletes the group and its member snapshots.
    DeleteGroupSnapshot {
        id: String,
    },
    DeleteSnapshot {
        id: String,
    },
    /// The snapshot's chunks were copied: chunk index → servers holding a copy.
    CompleteSnapshot {
        id: String,
        chunks: BTreeMap<u64, Vec<String>>,
    },
    /// A volume created from a source finished copying its content.
    MarkVolumeReady {
        id: String,
    },
    /// Names the cluster, once: a later id changes nothing (see
    /// `MetaState::cluster_id`).
    SetClusterId {
        id: String,
    },
    /// The key capabilities are signed with (PKCS#8 Ed25519), set once: a
    /// later key changes nothing (see `MetaState::capability_key`).
    SetCapabilityKey {
        pkcs8: Vec<u8>,
    },
    RegisterChunkServer {
        id: String,
        address: String,
        capacity_bytes: u64,
        labels: BTreeMap<String, String>,
        /// The cluster the server's data belongs to ("" before it first registered).
        #[serde(default)]
        cluster_id: String,
    },
    Heartbeat {
        server_id: String,
        used_bytes: u64,
        capacity_bytes: u64,
        /// Chunks the server reports holding.
        held: Option<Vec<HeldChunk>>,
        #[serde(default)]
        cluster_id: String,
    },
    SetDraining {
        server_id: String,
        draining: bool,
    },
    AllocateChunk {
        volume_id: String,
        chunk_index: u64,
        /// The asking writer's attachment epoch (None: the metadata
        /// service's own request).
        #[serde(default)]
        writer_epoch: Option<u64>,
    },
    ReportFailedReplica {
        volume_id: String,
        chunk_index: u64,
        server_id: String,
        generation: u64,
        /// As for `AllocateChunk`.
        #[serde(default)]
        writer_epoch: Option<u64>,
    },
    /// The repair loop rebuilt a replica of the chunk on `server_id` while
    /// the set was at `generation`: the server joins the set.
    AddReplica {
        volume_id: String,
        chunk_index: u64,
        server_id: String,
        generation: u64,
    },
    Publish {
        volume_id: String,
        node_id: String,
        readonly: bool,
    },
    Unpublish {
        volume_id: String,
        node_id: String,
    },
    /// A CSI node plugin announces itself (again: registering is idempotent
    /// and replaces the previous record).
    RegisterNode {
        node_id: String,
        max_volumes: u64,
        topology: BTreeMap<String, String>,
    },
}

/// What applying a command produced.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub enum Outcome {
    None,
    Volume(Volume),
    Snapshot(Snapshot),
    GroupSnapshot(GroupSnapshot),
    ChunkServer(ChunkServer),
    ReplicaSet {
        volume_id: String,
        chunk_index: u64,
        set: ReplicaSet,
    },
    Attachment(Attachment),
    Node(CsiNode),
    Existed(bool),
    Orphaned(Vec<HeldChunk>),
    ClusterId(String),
    CapabilityKey(Vec<u8>),
    /// Entries that carry no command (blank and membership entries).
    Empty,
}

/// `Outcome::volume(self)` and the like: the value of the variant a command
/// must produce, or what it produced instead.
macro_rules! expected_outcomes {
    ($($name:ident: $variant:ident($ty:ty)),* $(,)?) => {
        impl Outcome {
            $(pub fn $name(self) -> Result<$ty, String> {
                match self {
                    Outcome::$variant(value) => Ok(value),
                    other => Err(format!("{other:?}")),
                }
            })*
        }
    };
}

expected_outcomes! {
    volume: Volume(Volume),
    snapshot: Snapshot(Snapshot),
    group_snapshot: GroupSnapshot(GroupSnapshot),
    chunk_server: ChunkServer(ChunkServer),
    attachment: Attachment(Attachment),
    node: Node(CsiNode),
    existed: Existed(bool),
    orphaned: Orphaned(Vec<HeldChunk>),
    cluster_id: ClusterId(String),
    capability_key: CapabilityKey(Vec<u8>),
}

/// The state machine's answer to one log entry.
pub type Response = Result<Outcome, MetaError>;
