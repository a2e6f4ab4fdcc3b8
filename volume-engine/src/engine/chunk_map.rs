//! The engine's view of where each chunk of the volume lives.

use std::collections::HashMap;
use std::sync::RwLock;

use ballast_proto::meta as pb;

/// One replica of a chunk.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Replica {
    pub server_id: String,
    pub address: String,
}

/// The current replica set of one allocated chunk.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ChunkView {
    pub generation: u64,
    pub replicas: Vec<Replica>,
}

impl From<&pb::ChunkReplicaSet> for ChunkView {
    fn from(set: &pb::ChunkReplicaSet) -> Self {
        ChunkView {
            generation: set.generation,
            replicas: set
                .replicas
                .iter()
                .map(|r| Replica { server_id: r.server_id.clone(), address: r.address.clone() })
                .collect(),
        }
    }
}

/// Chunk index → replica set, for chunks allocated so far. A chunk absent
/// here was never written: it reads as zeros without asking anyone.
#[derive(Default)]
pub struct ChunkMap {
    chunks: RwLock<HashMap<u64, ChunkView>>,
}

impl ChunkMap {
    pub fn from_meta(map: &pb::ChunkMap) -> Self {
        let chunks = map.chunks.iter().map(|set| (set.chunk_index, ChunkView::from(set))).collect();
        ChunkMap { chunks: RwLock::new(chunks) }
    }

    pub fn get(&self, chunk: u64) -> Option<ChunkView> {
        self.chunks.read().expect("chunk map lock").get(&chunk).cloned()
    }

    /// Records a replica set unless a newer generation is already known.
    pub fn update(&self, chunk: u64, view: ChunkView) -> ChunkView {
        let mut chunks = self.chunks.write().expect("chunk map lock");
        let entry = chunks.entry(chunk).or_insert_with(|| view.clone());
        if view.generation > entry.generation {
            *entry = view;
        }
        entry.clone()
    }

    /// Every allocated chunk with its view.
    pub fn all(&self) -> Vec<(u64, ChunkView)> {
        self.chunks.read().expect("chunk map lock").iter().map(|(i, v)| (*i, v.clone())).collect()
    }
}
