//! Replica sets: a chunk's servers chosen on its first write, a failed member dropped
//! (bumping the generation), a rebuilt one added.

use crate::error::MetaError;
use crate::model::ReplicaSet;
use crate::placement;
use crate::types::Outcome;

use super::MetaState;

impl MetaState {
    pub(super) fn allocate_chunk(
        &mut self,
        at_ms: u64,
        volume_id: &str,
        chunk_index: u64,
    ) -> Result<Outcome, MetaError> {
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

    pub(super) fn replica_outcome(&self, volume_id: &str, chunk_index: u64, set: ReplicaSet) -> Outcome {
        Outcome::ReplicaSet { volume_id: volume_id.to_string(), chunk_index, set }
    }

    /// A writer whose attachment epoch is behind the volume's was fenced by
    /// a newer publish: it may no longer change the volume's chunk map.
    pub(super) fn check_writer_epoch(&self, volume_id: &str, writer_epoch: Option<u64>) -> Result<(), MetaError> {
        let (Some(writer), Some(volume)) = (writer_epoch, self.volumes.get(volume_id)) else { return Ok(()) };
        if writer < volume.epoch {
            return Err(MetaError::Fenced(format!(
                "volume {volume_id} was published again (epoch {}); this writer's epoch {writer} is fenced",
                volume.epoch
            )));
        }
        Ok(())
    }

    pub(super) fn report_failed_replica(
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
    pub(super) fn add_replica(
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
}
