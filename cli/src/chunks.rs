//! What the chunk servers hold, asked of the servers themselves, and
//! whether metadata knows each chunk: before an admin recovers or replaces
//! metadata, this shows what would become an orphan (and go to the trash).

use std::collections::{BTreeMap, BTreeSet};

use ballast_proto::frame::Connector;
use ballast_proto::meta as pb;
use meta_client::MetaClient;
use serde::Serialize;

/// One chunk on one server.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct HeldChunk {
    pub server: String,
    pub data_id: u64,
    pub chunk_index: u64,
    pub generation: u64,
    pub size_bytes: u64,
    /// The volume or snapshot the data id belongs to ("" when unknown).
    pub owner: String,
    pub state: ChunkState,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum ChunkState {
    /// A member of its chunk's replica set (or a snapshot's copy).
    Replica,
    /// Its volume is known, but this server is not in the chunk's set.
    NotInSet,
    /// No volume or snapshot has this data id: an orphan to metadata.
    Unknown,
    /// Metadata was not asked.
    Unchecked,
}

impl ChunkState {
    pub fn describe(self) -> &'static str {
        match self {
            ChunkState::Replica => "replica",
            ChunkState::NotInSet => "not in the chunk's set",
            ChunkState::Unknown => "unknown to metadata",
            ChunkState::Unchecked => "-",
        }
    }
}

/// Where each data id's chunks belong according to metadata: the owner's
/// name and the holders of each chunk, by server address.
#[derive(Default)]
pub struct Placement {
    owners: BTreeMap<u64, (String, BTreeMap<u64, BTreeSet<String>>)>,
}

impl Placement {
    /// Reads every volume's chunk map and every snapshot's copies.
    pub async fn from_meta(meta: &MetaClient) -> Result<Placement, tonic::Status> {
        let mut placement = Placement::default();
        for volume in meta.all_volumes().await? {
            let map = meta.get_chunk_map(pb::GetChunkMapRequest { volume_id: volume.id.clone() }).await?;
            placement.insert(volume.data_id, format!("volume {}", volume.name), &map.chunks);
        }
        for snapshot in meta.all_snapshots("").await? {
            placement.insert(snapshot.data_id, format!("snapshot {}", snapshot.name), &snapshot.chunks);
        }
        Ok(placement)
    }

    fn insert(&mut self, data_id: u64, owner: String, sets: &[pb::ChunkReplicaSet]) {
        let holders = sets
            .iter()
            .map(|set| (set.chunk_index, set.replicas.iter().map(|r| r.address.clone()).collect()))
            .collect();
        self.owners.insert(data_id, (owner, holders));
    }

    fn classify(&self, server: &str, data_id: u64, chunk: u64) -> (String, ChunkState) {
        match self.owners.get(&data_id) {
            None => (String::new(), ChunkState::Unknown),
            Some((owner, holders)) if holders.get(&chunk).is_some_and(|h| h.contains(server)) => {
                (owner.clone(), ChunkState::Replica)
            }
            Some((owner, _)) => (owner.clone(), ChunkState::NotInSet),
        }
    }
}

/// Lists the chunks on each server at `addresses`, classified against
/// `placement` when given.
pub async fn held(
    connector: &Connector,
    addresses: &[String],
    placement: Option<&Placement>,
) -> anyhow::Result<Vec<HeldChunk>> {
    let mut out = Vec::new();
    for address in addresses {
        let client = connector.connect(address).await.map_err(|e| anyhow::anyhow!("{address}: {e}"))?;
        let chunks = client.list_chunks(None).await.map_err(|e| anyhow::anyhow!("{address}: {e}"))?;
        for c in chunks {
            let (owner, state) = match placement {
                Some(p) => p.classify(address, c.volume, c.chunk),
                None => (String::new(), ChunkState::Unchecked),
            };
            out.push(HeldChunk {
                server: address.clone(),
                data_id: c.volume,
                chunk_index: c.chunk,
                generation: c.generation,
                size_bytes: c.size,
                owner,
                state,
            });
        }
    }
    Ok(out)
}
