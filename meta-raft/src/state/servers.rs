//! Chunk servers: registration, heartbeats, and the orphaned chunks a heartbeat names.

use std::collections::BTreeMap;

use crate::error::MetaError;
use crate::model::{snapshot_id, volume_id, ChunkServer, HeldChunk};
use crate::types::Outcome;

use super::MetaState;

impl MetaState {
    pub(super) fn register_server(
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
    pub(super) fn check_cluster(&self, server_id: &str, claimed: &str) -> Result<(), MetaError> {
        if claimed.is_empty() || claimed == self.cluster_id {
            return Ok(());
        }
        Err(MetaError::FailedPrecondition(format!(
            "chunk server {server_id} belongs to metadata cluster {claimed}, and this is metadata cluster {:?}: \
             it would see every chunk of that server as an orphan",
            self.cluster_id
        )))
    }

    pub(super) fn heartbeat(
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
    pub(super) fn is_orphan(&self, index: u64, server_id: &str, chunk: &HeldChunk) -> bool {
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
    pub(super) fn references(&self, server_id: &str, data_id: u64, chunk_index: u64) -> bool {
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
}
