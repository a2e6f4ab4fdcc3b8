//! Changing a live volume: its replica count and its I/O limits.
//!
//! More replicas only raise the count: the repair loop sees the short sets
//! and builds the missing copies from the live members (no former member
//! to wait for), pausing the volume briefly per chunk as for any rebuild.
//! Fewer replicas take effect at once: each set drops its least useful
//! members (silent servers first, then draining ones, then the newest) and
//! moves to a new generation. Every member of a set holds every
//! acknowledged write, so the members kept lose nothing; the dropped
//! copies become orphans their servers delete. A writer still using the
//! old set writes to the dropped server too, harmlessly, and learns the new
//! set when a kept member refuses the old generation.
//!
//! Limits are recorded here and enforced by the node serving the volume,
//! which picks them up while it serves (see the volume engine).

use serde::{Deserialize, Serialize};

use crate::error::MetaError;
use ballast_proto::volume::MAX_REPLICAS;

use crate::state::MetaState;
use crate::types::Outcome;

/// A volume's I/O limits; 0 = no limit.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct IoLimits {
    /// Reads, writes, trims and zeroings per second.
    pub max_iops: u64,
    /// Bytes read and written per second.
    pub max_bandwidth_bytes: u64,
}

/// The lowest limits accepted: below these one large request would wait
/// for seconds, which looks like a hung device.
pub const MIN_IOPS: u64 = 10;
pub const MIN_BANDWIDTH_BYTES: u64 = 1 << 20;

impl IoLimits {
    pub fn validate(&self) -> Result<(), MetaError> {
        if self.max_iops != 0 && self.max_iops < MIN_IOPS {
            return Err(MetaError::invalid(format!(
                "max IOPS must be 0 (no limit) or at least {MIN_IOPS}, not {}",
                self.max_iops
            )));
        }
        if self.max_bandwidth_bytes != 0 && self.max_bandwidth_bytes < MIN_BANDWIDTH_BYTES {
            return Err(MetaError::invalid(format!(
                "max bandwidth must be 0 (no limit) or at least {MIN_BANDWIDTH_BYTES} bytes per second, not {}",
                self.max_bandwidth_bytes
            )));
        }
        Ok(())
    }
}

/// What a modification changes; `None` keeps the current value.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct VolumeChange {
    pub replicas: Option<u32>,
    pub max_iops: Option<u64>,
    pub max_bandwidth_bytes: Option<u64>,
}

pub fn validate_replicas(replicas: u32) -> Result<(), MetaError> {
    if !(1..=MAX_REPLICAS).contains(&replicas) {
        return Err(MetaError::invalid(format!("replicas must be between 1 and {MAX_REPLICAS}, not {replicas}")));
    }
    Ok(())
}

impl MetaState {
    pub(crate) fn modify_volume(&mut self, at_ms: u64, id: &str, change: VolumeChange) -> Result<Outcome, MetaError> {
        let volume = self.volumes.get(id).ok_or_else(|| MetaError::not_found(format!("volume {id}")))?;
        let limits = IoLimits {
            max_iops: change.max_iops.unwrap_or(volume.limits.max_iops),
            max_bandwidth_bytes: change.max_bandwidth_bytes.unwrap_or(volume.limits.max_bandwidth_bytes),
        };
        limits.validate()?;
        let replicas = change.replicas.unwrap_or(volume.replicas);
        validate_replicas(replicas)?;
        if replicas < volume.replicas {
            self.drop_extra_replicas(at_ms, id, replicas as usize);
        }
        let volume = self.volumes.get_mut(id).expect("checked above");
        volume.replicas = replicas;
        volume.limits = limits;
        Ok(Outcome::Volume(volume.clone()))
    }

    /// Takes every set of the volume down to `wanted` members.
    fn drop_extra_replicas(&mut self, at_ms: u64, id: &str, wanted: usize) {
        let chunk_size = self.volumes[id].chunk_size_bytes;
        let Some(chunks) = self.chunk_maps.get_mut(id) else { return };
        let mut released = Vec::new();
        for set in chunks.values_mut() {
            if set.servers.len() <= wanted {
                continue;
            }
            // Least useful first: silent or unknown, then draining, then the
            // newest member (the end of the list).
            let mut order: Vec<(usize, String)> = set.servers.iter().cloned().enumerate().collect();
            order.sort_by_key(|(position, server_id)| {
                let server = self.servers.get(server_id);
                let alive = server.is_some_and(|s| s.is_alive(at_ms));
                let draining = server.is_some_and(|s| s.draining);
                (alive, !draining, std::cmp::Reverse(*position))
            });
            let dropped: Vec<String> =
                order.into_iter().take(set.servers.len() - wanted).map(|(_, server_id)| server_id).collect();
            set.servers.retain(|s| !dropped.contains(s));
            // Whole at the new count: nobody who left needs to come back.
            set.former.clear();
            set.generation += 1;
            released.extend(dropped);
        }
        for server_id in released {
            if let Some(server) = self.servers.get_mut(&server_id) {
                server.allocated_bytes = server.allocated_bytes.saturating_sub(chunk_size);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use std::collections::{BTreeMap, BTreeSet};

    use super::*;
    use crate::model::{HeldChunk, ReplicaSet, Volume};
    use crate::types::Command;

    const NOW: u64 = 1_000_000;
    const CHUNK: u64 = 1 << 20;

    /// Four servers and a 3-replica volume of two allocated chunks.
    fn cluster() -> (MetaState, Volume) {
        let mut state = MetaState::default();
        for i in 0..4 {
            let register = Command::RegisterChunkServer {
                id: format!("s{i}"),
                address: format!("127.0.0.1:{}", 7400 + i),
                capacity_bytes: 1 << 30,
                labels: BTreeMap::new(),
                cluster_id: String::new(),
            };
            state.apply(i + 1, NOW, register).unwrap();
        }
        let create = Command::CreateVolume {
            name: "v".into(),
            size_bytes: 2 * CHUNK,
            replicas: 3,
            chunk_size_bytes: CHUNK,
            parameters: BTreeMap::new(),
            source: None,
            limits: IoLimits::default(),
        };
        let Ok(Outcome::Volume(volume)) = state.apply(10, NOW, create) else { panic!("volume not created") };
        for chunk_index in 0..2 {
            let allocate = Command::AllocateChunk { volume_id: volume.id.clone(), chunk_index, writer_epoch: None };
            state.apply(11 + chunk_index, NOW, allocate).unwrap();
        }
        (state, volume)
    }

    fn modify(state: &mut MetaState, id: &str, change: VolumeChange) -> Result<Outcome, MetaError> {
        state.apply(20, NOW, Command::ModifyVolume { id: id.into(), change })
    }

    fn sets(state: &MetaState, id: &str) -> Vec<ReplicaSet> {
        state.chunk_maps[id].values().cloned().collect()
    }

    #[test]
    fn fewer_replicas_drop_the_least_useful_member_of_every_set_at_once() {
        let (mut state, volume) = cluster();
        let before = sets(&state, &volume.id);
        let draining = before[0].servers[0].clone();
        state.servers.get_mut(&draining).unwrap().draining = true;
        let allocated: u64 = state.servers.values().map(|s| s.allocated_bytes).sum();

        modify(&mut state, &volume.id, VolumeChange { replicas: Some(2), ..Default::default() }).unwrap();
        assert_eq!(state.volumes[&volume.id].replicas, 2);
        for (old, new) in before.iter().zip(sets(&state, &volume.id)) {
            assert_eq!(new.servers.len(), 2);
            assert_eq!(new.generation, old.generation + 1, "writers of the old set are told by the kept members");
            assert!(new.servers.iter().all(|s| old.servers.contains(s)));
            if old.servers.contains(&draining) {
                assert!(!new.servers.contains(&draining), "a draining server goes first: {new:?}");
            } else {
                assert_eq!(new.servers, old.servers[..2], "else the newest member goes");
            }
        }
        let now_allocated: u64 = state.servers.values().map(|s| s.allocated_bytes).sum();
        assert_eq!(now_allocated, allocated - 2 * CHUNK, "each dropped copy's space is released");

        // The dropped copy is an orphan its server deletes.
        let dropped = before[0].servers.iter().find(|s| !sets(&state, &volume.id)[0].servers.contains(s)).unwrap();
        let held = vec![HeldChunk { data_id: volume.data_id, chunk_index: 0, generation: before[0].generation }];
        let beat = Command::Heartbeat {
            server_id: dropped.clone(),
            used_bytes: 0,
            capacity_bytes: 1 << 30,
            held: Some(held.clone()),
            cluster_id: String::new(),
        };
        let Ok(Outcome::Orphaned(orphaned)) = state.apply(21, NOW, beat) else { panic!("no heartbeat outcome") };
        assert_eq!(orphaned, held);
    }

    #[test]
    fn more_replicas_leave_the_sets_to_the_repair_loop() {
        let (mut state, volume) = cluster();
        modify(&mut state, &volume.id, VolumeChange { replicas: Some(2), ..Default::default() }).unwrap();
        let shrunk = sets(&state, &volume.id);
        assert!(crate::repair::plan(&state, &BTreeSet::new()).is_empty(), "two of two: nothing to do");

        let Outcome::Volume(grown) =
            modify(&mut state, &volume.id, VolumeChange { replicas: Some(4), ..Default::default() }).unwrap()
        else {
            panic!("no volume")
        };
        assert_eq!(grown.replicas, 4);
        assert_eq!(sets(&state, &volume.id), shrunk, "no set changes until copies exist");
        let work = crate::repair::plan(&state, &BTreeSet::new());
        assert_eq!(work.len(), 2, "{work:?}");
        assert!(work.iter().all(|chunk| chunk.wanted == 4 && chunk.set.former.is_empty()));
    }

    #[test]
    fn limits_change_alone_and_bad_values_change_nothing() {
        let (mut state, volume) = cluster();
        let iops = VolumeChange { max_iops: Some(500), ..Default::default() };
        modify(&mut state, &volume.id, iops).unwrap();
        let bandwidth = VolumeChange { max_bandwidth_bytes: Some(64 << 20), ..Default::default() };
        modify(&mut state, &volume.id, bandwidth).unwrap();
        let expected = IoLimits { max_iops: 500, max_bandwidth_bytes: 64 << 20 };
        assert_eq!(state.volumes[&volume.id].limits, expected, "a change keeps what it does not name");

        let before = state.clone();
        for bad in [
            VolumeChange { replicas: Some(0), ..Default::default() },
            VolumeChange { replicas: Some(MAX_REPLICAS + 1), ..Default::default() },
            VolumeChange { replicas: Some(1), max_iops: Some(MIN_IOPS - 1), ..Default::default() },
            VolumeChange { max_bandwidth_bytes: Some(4096), ..Default::default() },
        ] {
            let err = modify(&mut state, &volume.id, bad.clone()).unwrap_err();
            assert!(matches!(err, MetaError::InvalidArgument(_)), "{bad:?}: {err:?}");
            assert_eq!(state, before, "{bad:?} changed the state");
        }
        let missing = modify(&mut state, "vol-404", VolumeChange::default()).unwrap_err();
        assert!(matches!(missing, MetaError::NotFound(_)), "{missing:?}");
    }
}
