//! Group snapshots: snapshots of several volumes taken at one instant, so
//! that an application spread over them (a database and its log on two
//! volumes) restores to one crash-consistent moment.
//!
//! A group is recorded first, naming its source volumes; then one member
//! snapshot per volume, each an ordinary snapshot carrying the group's id
//! (each needs a log index of its own for its data id). The data is taken
//! for all members together (`volume_engine::snapshot::take_together`). A
//! member is deleted only with its group; the group is ready when every
//! member is.

use serde::{Deserialize, Serialize};

use crate::error::MetaError;
use crate::model::{validate_name, Snapshot};
use crate::state::MetaState;
use crate::types::Outcome;

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct GroupSnapshot {
    pub id: String,
    pub name: String,
    /// Sorted, without repeats.
    pub source_volume_ids: Vec<String>,
    /// The members recorded so far, in the order they were.
    pub snapshot_ids: Vec<String>,
    pub created_at_ms: u64,
}

pub fn group_snapshot_id(index: u64) -> String {
    format!("group-{index:x}")
}

impl MetaState {
    pub(crate) fn create_group_snapshot(
        &mut self,
        index: u64,
        at_ms: u64,
        name: String,
        mut source_volume_ids: Vec<String>,
    ) -> Result<Outcome, MetaError> {
        validate_name("group snapshot", &name)?;
        source_volume_ids.sort();
        source_volume_ids.dedup();
        if source_volume_ids.is_empty() {
            return Err(MetaError::invalid("a group snapshot needs at least one source volume"));
        }
        if let Some(existing) = self.group_names.get(&name).map(|id| &self.groups[id]) {
            return if existing.source_volume_ids == source_volume_ids {
                Ok(Outcome::GroupSnapshot(existing.clone()))
            } else {
                Err(MetaError::AlreadyExists(format!(
                    "group snapshot {name:?} exists as {} of other volumes: {:?}",
                    existing.id, existing.source_volume_ids
                )))
            };
        }
        if let Some(missing) = source_volume_ids.iter().find(|id| !self.volumes.contains_key(*id)) {
            return Err(MetaError::not_found(format!("volume {missing}")));
        }
        let group = GroupSnapshot {
            id: group_snapshot_id(index),
            name: name.clone(),
            source_volume_ids,
            snapshot_ids: Vec::new(),
            created_at_ms: at_ms,
        };
        self.group_names.insert(name, group.id.clone());
        self.groups.insert(group.id.clone(), group.clone());
        Ok(Outcome::GroupSnapshot(group))
    }

    /// Refuses a member snapshot of `source` in group `group_id` unless the
    /// group names the volume and has no member of it yet.
    pub(crate) fn check_new_member(&self, group_id: &str, source: &str) -> Result<(), MetaError> {
        let group =
            self.groups.get(group_id).ok_or_else(|| MetaError::not_found(format!("group snapshot {group_id}")))?;
        if !group.source_volume_ids.iter().any(|v| v == source) {
            return Err(MetaError::invalid(format!("group snapshot {group_id} is not of volume {source}")));
        }
        if self.group_members(group).iter().any(|s| s.source_volume_id == source) {
            return Err(MetaError::AlreadyExists(format!(
                "group snapshot {group_id} already has a snapshot of volume {source}"
            )));
        }
        Ok(())
    }

    pub(crate) fn add_member(&mut self, group_id: &str, snapshot_id: &str) {
        if let Some(group) = self.groups.get_mut(group_id) {
            group.snapshot_ids.push(snapshot_id.to_string());
        }
    }

    pub fn group_members(&self, group: &GroupSnapshot) -> Vec<&Snapshot> {
        group.snapshot_ids.iter().filter_map(|id| self.snapshots.get(id)).collect()
    }

    /// Whether every source volume has a member and every member is ready.
    pub fn group_ready(&self, group: &GroupSnapshot) -> bool {
        let members = self.group_members(group);
        members.len() == group.source_volume_ids.len() && members.iter().all(|s| s.ready_to_use)
    }

    /// Deletes the group and its members.
    pub(crate) fn delete_group_snapshot(&mut self, id: &str) -> Outcome {
        let Some(group) = self.groups.remove(id) else { return Outcome::Existed(false) };
        self.group_names.remove(&group.name);
        for member in &group.snapshot_ids {
            self.remove_snapshot(member);
        }
        Outcome::Existed(true)
    }
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeMap;

    use super::*;
    use crate::types::Command;

    fn state_with_volumes(names: &[&str]) -> (MetaState, Vec<String>) {
        let mut state = MetaState::default();
        let mut ids = Vec::new();
        for (i, name) in names.iter().enumerate() {
            let create = Command::CreateVolume {
                name: name.to_string(),
                size_bytes: 1 << 20,
                replicas: 1,
                chunk_size_bytes: 1 << 20,
                parameters: BTreeMap::new(),
                source: None,
                limits: Default::default(),
            };
            let Ok(Outcome::Volume(v)) = state.apply(i as u64 + 1, 0, create) else { panic!("volume") };
            ids.push(v.id);
        }
        (state, ids)
    }

    fn group(outcome: Result<Outcome, MetaError>) -> GroupSnapshot {
        match outcome {
            Ok(Outcome::GroupSnapshot(g)) => g,
            other => panic!("{other:?}"),
        }
    }

    fn member(state: &mut MetaState, index: u64, group_id: &str, source: &str) -> Result<Outcome, MetaError> {
        let command = Command::CreateSnapshot {
            name: format!("{group_id}-{source}"),
            source_volume_id: source.into(),
            group_id: Some(group_id.into()),
        };
        state.apply(index, 0, command)
    }

    #[test]
    fn a_group_gathers_one_member_per_volume_and_goes_with_them() {
        let (mut state, volumes) = state_with_volumes(&["db", "log", "other"]);
        let create = |names: Vec<String>| Command::CreateGroupSnapshot { name: "g".into(), source_volume_ids: names };
        let g = group(state.apply(10, 0, create(vec![volumes[1].clone(), volumes[0].clone()])));
        assert_eq!(group(state.apply(11, 0, create(vec![volumes[0].clone(), volumes[1].clone()]))), g, "idempotent");
        let other = state.apply(12, 0, create(vec![volumes[2].clone()])).unwrap_err();
        assert!(matches!(other, MetaError::AlreadyExists(_)), "{other:?}");
        assert!(!state.group_ready(&g));

        member(&mut state, 13, &g.id, &volumes[0]).unwrap();
        let twice = state.apply(
            14,
            0,
            Command::CreateSnapshot {
                name: "another".into(),
                source_volume_id: volumes[0].clone(),
                group_id: Some(g.id.clone()),
            },
        );
        assert!(matches!(twice, Err(MetaError::AlreadyExists(_))), "{twice:?}");
        let outsider = member(&mut state, 15, &g.id, &volumes[2]).unwrap_err();
        assert!(matches!(outsider, MetaError::InvalidArgument(_)), "{outsider:?}");
        member(&mut state, 16, &g.id, &volumes[1]).unwrap();
        let g = state.groups[&g.id].clone();
        assert_eq!(g.snapshot_ids.len(), 2);
        for id in &g.snapshot_ids {
            state.apply(17, 0, Command::CompleteSnapshot { id: id.clone(), chunks: BTreeMap::new() }).unwrap();
        }
        assert!(state.group_ready(&g));

        let alone = state.apply(18, 0, Command::DeleteSnapshot { id: g.snapshot_ids[0].clone() }).unwrap_err();
        assert!(matches!(alone, MetaError::FailedPrecondition(_)), "a member goes only with its group: {alone:?}");
        let deleted = state.apply(19, 0, Command::DeleteGroupSnapshot { id: g.id.clone() }).unwrap();
        assert!(matches!(deleted, Outcome::Existed(true)));
        assert!(state.snapshots.is_empty() && state.groups.is_empty() && state.group_names.is_empty());
        let again = state.apply(20, 0, Command::DeleteGroupSnapshot { id: g.id.clone() }).unwrap();
        assert!(matches!(again, Outcome::Existed(false)));
    }

    #[test]
    fn a_group_of_nothing_or_of_unknown_volumes_is_refused() {
        let (mut state, _) = state_with_volumes(&["db"]);
        let empty = Command::CreateGroupSnapshot { name: "g".into(), source_volume_ids: vec![] };
        assert!(matches!(state.apply(5, 0, empty), Err(MetaError::InvalidArgument(_))));
        let unknown = Command::CreateGroupSnapshot { name: "g".into(), source_volume_ids: vec!["vol-404".into()] };
        assert!(matches!(state.apply(6, 0, unknown), Err(MetaError::NotFound(_))));
        assert!(state.groups.is_empty());
    }
}
