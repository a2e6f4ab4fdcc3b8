//! The replicated metadata (the entities of [`crate::model`] in maps) and
//! the deterministic rules that change it.
//!
//! [`MetaState::apply`] is the only writer. It runs on every member for
//! every committed command, so it must depend on nothing but its inputs.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

use crate::error::MetaError;
use crate::group::GroupSnapshot;
use crate::model::{Attachment, ChunkServer, CsiNode, ReplicaSet, Snapshot, Volume};
use crate::types::{Command, Outcome};

mod attachments;
mod replicas;
mod servers;
mod snapshots;
mod volumes;

use volumes::VolumeShape;

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
            Command::Unpublish { volume_id, node_id } => self.unpublish(&volume_id, &node_id),
        }
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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::HeldChunk;
    use crate::page::paginate;

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
