//! Volumes: creation (empty, or from a snapshot or another volume), deletion, growth.

use std::collections::BTreeMap;

use ballast_proto::volume::{
    BLOCK_SIZE, DEFAULT_CHUNK_SIZE, DEFAULT_REPLICAS, MAX_CHUNK_SIZE, MAX_VOLUME_SIZE, MIN_CHUNK_SIZE,
};

use crate::error::MetaError;
use crate::model::{validate_name, volume_id, Source, Volume};
use crate::modify::{validate_replicas, IoLimits};
use crate::types::Outcome;

use super::MetaState;

/// What a new volume is, beside its name, parameters and source (0 picks
/// the default replica count and chunk size).
pub(super) struct VolumeShape {
    pub(super) size_bytes: u64,
    pub(super) replicas: u32,
    pub(super) chunk_size_bytes: u64,
    pub(super) limits: IoLimits,
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
    pub(super) fn create_volume(
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

    pub(super) fn delete_volume(&mut self, id: &str) -> Result<Outcome, MetaError> {
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

    pub(super) fn release(&mut self, servers: &[String], chunk_size: u64) {
        for server_id in servers {
            if let Some(server) = self.servers.get_mut(server_id) {
                server.allocated_bytes = server.allocated_bytes.saturating_sub(chunk_size);
            }
        }
    }

    pub(super) fn expand_volume(&mut self, id: &str, size_bytes: u64) -> Result<Outcome, MetaError> {
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
}
