//! Snapshots: recorded at once, complete when every chunk has its copies.

use std::collections::BTreeMap;

use crate::error::MetaError;
use crate::model::{snapshot_id, validate_name, ReplicaSet, Snapshot};
use crate::types::Outcome;

use super::MetaState;

impl MetaState {
    pub(super) fn create_snapshot(
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

    pub(super) fn complete_snapshot(
        &mut self,
        id: &str,
        chunks: BTreeMap<u64, Vec<String>>,
    ) -> Result<Outcome, MetaError> {
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
}
