//! The way back after losing a majority of the metadata members: one
//! survivor's data directory becomes a cluster of that one member.
//!
//! Raft cannot elect a leader without a majority, so the survivor alone
//! would wait for ever. Offline (the member stopped), its log is applied to
//! the end, including entries that never committed (what etcd's
//! `--force-new-cluster` does: the survivor's view becomes the truth), the
//! result is saved as a snapshot whose membership names only this member,
//! and the log is purged up to it. Started again, the member elects itself
//! and serves everything it knew; new members join it as usual
//! (`add-learner`, `set-voters`). Anything the lost members committed that
//! never reached the survivor is gone: hence the chunk servers' trash.

use std::collections::{BTreeMap, BTreeSet};
use std::path::Path;

use anyhow::{bail, Context};
use openraft::storage::{RaftLogStorage, RaftStateMachine};
use openraft::{BasicNode, Membership, RaftLogReader, RaftSnapshotBuilder, StoredMembership};

use crate::store;
use crate::types::NodeId;

/// What the recovered member holds.
#[derive(Debug)]
pub struct Recovered {
    /// Index of the last log entry applied (the snapshot's).
    pub last_index: u64,
    /// Entries applied now that the survivor had not applied before.
    pub replayed: u64,
    pub volumes: usize,
    pub snapshots: usize,
    pub servers: usize,
}

/// Turns the stopped member whose data is in `dir` into the only member of
/// its cluster, reachable at `address`.
pub async fn force_single_member(dir: &Path, id: NodeId, address: &str) -> anyhow::Result<Recovered> {
    if !dir.join("raft.sled").exists() {
        bail!("{} holds no metadata member's data (no raft.sled)", dir.display());
    }
    // sled locks its files: this fails while the member still runs.
    let (mut log, mut machine) =
        store::open(dir).with_context(|| format!("opening {} (is the member stopped?)", dir.display()))?;
    let (applied, _) = machine.applied_state().await?;
    let start = applied.map_or(0, |id| id.index + 1);
    let entries = log.get_log_reader().await.try_get_log_entries(start..).await?;
    let replayed = entries.len() as u64;
    machine.apply(entries).await?;
    let (Some(last), _) = machine.applied_state().await? else {
        bail!("this member never applied an entry: there is nothing to recover");
    };

    let voters = BTreeSet::from([id]);
    let nodes = BTreeMap::from([(id, BasicNode::new(address))]);
    let membership = Membership::new(vec![voters], nodes);
    let counts = {
        let shared = machine.shared();
        let mut applied = shared.write().expect("state lock poisoned");
        applied.last_membership = StoredMembership::new(Some(last), membership);
        (applied.state.volumes.len(), applied.state.snapshots.len(), applied.state.servers.len())
    };
    machine.get_snapshot_builder().await.build_snapshot().await?;
    log.save_committed(Some(last)).await?;
    log.purge(last).await?;
    let (volumes, snapshots, servers) = counts;
    Ok(Recovered { last_index: last.index, replayed, volumes, snapshots, servers })
}
