//! The repair loop: on the leader, brings every chunk back to the number of
//! replicas its volume asks for.
//!
//! Each pass:
//! 0. A chunk with a region its server found dirty when it restarted
//!    (written since its last flush when it crashed: torn, or with stale
//!    checksums) is suspect on that server: the server leaves the chunk's
//!    set once a peer with a clean copy is reachable, and step 2 copies the
//!    chunk back from such a peer. If every member crashed, the first one's
//!    copy is kept as it is on disk and becomes that clean copy.
//! 1. Replicas on servers that missed heartbeats for longer than the repair
//!    delay leave their set (as a writer's failure report would), and the
//!    remaining members move to the new generation.
//! 2. One missing replica of each under-replicated chunk is rebuilt: on a
//!    former member that is back (it catches up with only the blocks it
//!    missed), else, once the chunk has been short for the repair delay,
//!    on a server placement picks. The volume is paused on the set's servers
//!    (changes wait; those in flight finish), the chunk is copied from a
//!    live member with a clean copy, the copy joins the set at the generation it was copied
//!    from (refused if the set changed meanwhile), the members move to the
//!    new generation, and the volume resumes. Writes that waited in the
//!    pause are refused under the old generation; their writers re-read the
//!    set and write to the new replica too, so the copy misses nothing.

use std::collections::{BTreeSet, HashMap, HashSet};
use std::time::{Duration, Instant};

use ballast_proto::frame::{
    holds_clean_copy, sync_chunk, ClientError, Connector, CopyTarget, DataClient, DirtyRegion, ErrorCode, HeldPause,
};
use futures::future::join_all;

use crate::error::MetaError;
use crate::liveness::Liveness;
use crate::model::{volume_id, ReplicaSet};
use crate::state::MetaState;
use crate::store::SharedState;
use crate::types::{Command, NodeId, Outcome, Raft, Request};
use crate::CHUNK_SERVER_ANSWER;
use crate::{metrics, placement};
use meta_client::now_ms;

/// How often the leader looks for work, and after how long without
/// heartbeats a server's replicas are given up.
#[derive(Clone, Copy, Debug)]
pub struct RepairConfig {
    pub interval: Duration,
    pub dead_after: Duration,
}

impl Default for RepairConfig {
    fn default() -> Self {
        Self { interval: Duration::from_secs(5), dead_after: Duration::from_secs(60) }
    }
}

/// Each hold of a rebuild's pause lasts this long unless renewed (it is,
/// while the rebuild runs); a rebuilder that dies releases it this way.
const PAUSE: Duration = Duration::from_secs(30);
/// How long a rebuild whose commit is undecided keeps the volume paused
/// while it looks for the outcome (a new leader settles it well within).
const UNDECIDED_WAIT: Duration = Duration::from_secs(120);
/// Chunks rebuilt per pass: one pass never pauses volumes for long.
const REBUILDS_PER_PASS: usize = 8;

/// Chunks short of replicas, by (volume id, chunk index): since when, on
/// this member's monotonic clock and on the wall clock heartbeats are
/// stamped with.
type ShortChunks = HashMap<(String, u64), (Instant, u64)>;

/// One allocated chunk that needs work.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ChunkRepair {
    pub volume_id: String,
    pub data_id: u64,
    pub epoch: u64,
    pub chunk_size: u64,
    pub chunk_index: u64,
    pub wanted: usize,
    pub set: ReplicaSet,
    /// Members on servers dead for longer than the repair delay.
    pub dead: Vec<String>,
}

impl ChunkRepair {
    fn live_members(&self) -> Vec<String> {
        self.set.servers.iter().filter(|s| !self.dead.contains(s)).cloned().collect()
    }
}

/// The chunks of volumes with members on `silent` servers or fewer members
/// than wanted. Silence alone never takes a set below the volume's write
/// quorum (a majority of its replicas): writers report real failures on
/// their own, and a rebuild needs survivors to copy from. Snapshots keep
/// the copies they were taken with.
pub fn plan(state: &MetaState, silent: &BTreeSet<String>) -> Vec<ChunkRepair> {
    let mut work = Vec::new();
    for (volume_id, chunks) in &state.chunk_maps {
        let Some(volume) = state.volumes.get(volume_id) else { continue };
        let quorum = volume.replicas as usize / 2 + 1;
        for (&chunk_index, set) in chunks {
            let mut dead: Vec<String> = set
                .servers
                .iter()
                .filter(|s| silent.contains(*s) || !state.servers.contains_key(*s))
                .cloned()
                .collect();
            dead.truncate(set.servers.len().saturating_sub(quorum));
            if dead.is_empty() && set.servers.len() >= volume.replicas as usize {
                continue;
            }
            work.push(ChunkRepair {
                volume_id: volume_id.clone(),
                data_id: volume.data_id,
                epoch: volume.epoch,
                chunk_size: volume.chunk_size_bytes,
                chunk_index,
                wanted: volume.replicas as usize,
                set: set.clone(),
                dead,
            });
        }
    }
    work
}

/// The members of a chunk's set, by the state of their copy.
#[derive(Default)]
struct Copies {
    clean: Vec<(String, DataClient)>,
    /// Left with regions recovered after a crash (see [`holds_clean_copy`]).
    dirty: Vec<(String, DataClient)>,
    unreachable: usize,
}

impl Copies {
    /// Every member that answered, clean ones first.
    fn reachable(&self) -> Vec<(String, DataClient)> {
        self.clean.iter().chain(&self.dirty).cloned().collect()
    }
}

/// Brings a source behind the set's generation up to it before it is read
/// at that generation: it refused every change sent under the newer one,
/// so it missed none that was acknowledged.
async fn catch_up(source: &DataClient, chunk: &ChunkRepair) -> Result<(), ClientError> {
    match source.chunk_info(chunk.data_id, chunk.chunk_index).await {
        Ok(info) if info.generation < chunk.set.generation => {
            source.set_generation(chunk.data_id, chunk.chunk_index, chunk.set.generation).await
        }
        Err(e) if e.code() != Some(ErrorCode::NoSuchChunk) => Err(e),
        _ => Ok(()),
    }
}

fn copy_error(source: &str, target: &str, e: ClientError) -> RepairError {
    RepairError::Server { server: format!("{source} -> {target}"), message: format!("copying the chunk: {e}") }
}

/// How a rebuild failed: before its commit, or with the commit undecided.
enum RebuildError {
    NotCommitted(RepairError),
    Undecided(RepairError),
}

impl RebuildError {
    fn into_inner(self) -> RepairError {
        match self {
            RebuildError::NotCommitted(e) | RebuildError::Undecided(e) => e,
        }
    }
}

#[derive(Debug, thiserror::Error)]
enum RepairError {
    #[error("metadata: {0}")]
    Meta(#[from] MetaError),
    #[error("raft: {0}")]
    Raft(String),
    #[error("{server}: {message}")]
    Server { server: String, message: String },
}

pub struct Repairer {
    id: NodeId,
    raft: Raft,
    state: SharedState,
    config: RepairConfig,
    chunk_servers: Connector,
}

impl Repairer {
    pub fn new(id: NodeId, raft: Raft, state: SharedState, config: RepairConfig, chunk_servers: Connector) -> Self {
        Self { id, raft, state, config, chunk_servers }
    }

    /// Runs passes until the task is dropped; only the leader works.
    pub async fn run(self) {
        let mut ticks = tokio::time::interval(self.config.interval);
        ticks.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let mut liveness = Liveness::new(self.config.dead_after, self.config.interval);
        let mut short = ShortChunks::default();
        loop {
            ticks.tick().await;
            if self.raft.metrics().borrow().current_leader != Some(self.id) {
                liveness.forget();
                short.clear();
                continue;
            }
            self.pass(&mut liveness, &mut short).await;
            liveness.pass_done(std::time::Instant::now());
        }
    }

    async fn pass(&self, liveness: &mut Liveness, short: &mut ShortChunks) {
        // Silence is taken in first: the time spent below waiting for
        // servers out of reach must not look like this member was frozen.
        let silent = {
            let applied = self.state.read().expect("state lock poisoned");
            liveness.silent(std::time::Instant::now(), &applied.state.servers)
        };
        self.resync_dirty_regions().await;
        let work = plan(&self.state.read().expect("state lock poisoned").state, &silent);
        let needing_work: HashSet<(&str, u64)> = work.iter().map(|c| (c.volume_id.as_str(), c.chunk_index)).collect();
        short.retain(|(volume_id, chunk), _| needing_work.contains(&(volume_id.as_str(), *chunk)));
        let mut rebuilds = 0;
        for mut chunk in work {
            if !chunk.dead.is_empty() {
                match self.drop_dead(&chunk).await {
                    Ok(set) => {
                        chunk.set = set;
                        chunk.dead.clear();
                    }
                    Err(e) => {
                        tracing::warn!(volume = %chunk.volume_id, chunk = chunk.chunk_index, error = %e,
                            "cannot drop replicas on dead servers");
                        continue;
                    }
                }
            }
            if chunk.set.servers.len() < chunk.wanted && rebuilds < REBUILDS_PER_PASS {
                let Some(target) = self.rebuild_target(&chunk, short) else { continue };
                rebuilds += 1;
                if let Err(e) = self.rebuild(&chunk, target).await {
                    tracing::warn!(volume = %chunk.volume_id, chunk = chunk.chunk_index, error = %e,
                        "replica rebuild failed; retrying on the next pass");
                }
            }
        }
    }

    /// Resyncs the recovered dirty regions every live server lists.
    async fn resync_dirty_regions(&self) {
        let live: Vec<String> = {
            let applied = self.state.read().expect("state lock poisoned");
            let now = now_ms();
            applied.state.servers.values().filter(|s| s.is_alive(now)).map(|s| s.id.clone()).collect()
        };
        for (server, client) in self.connect(&live).await {
            let regions = match client.dirty_regions(None).await {
                Ok(regions) => regions,
                Err(e) => {
                    tracing::debug!(%server, error = %e, "listing dirty regions");
                    continue;
                }
            };
            for region in regions.into_iter().filter(DirtyRegion::is_recovered) {
                if let Err(e) = self.resync(&server, &client, &region).await {
                    tracing::warn!(%server, data_id = region.volume, chunk = region.chunk, offset = region.offset,
                        error = %e, "resyncing a dirty region failed; retrying on the next pass");
                }
            }
        }
    }

    /// A recovered dirty region makes the server's copy of that chunk
    /// suspect: the server leaves the chunk's set (its peers move to the new
    /// generation) and the rebuild that follows copies the whole chunk from
    /// a peer, onto it or another server. Copying only the region would race
    /// writers, who keep writing to a member while its peers are paused.
    /// It leaves only for a peer that holds a clean copy. When every member
    /// is reachable and each was left dirty, the whole set went down
    /// together and none knows more than another: the first member keeps
    /// its copy as it is on disk (unflushed writes are kept or lost, the
    /// same way everywhere afterwards), and the others are rebuilt from it.
    async fn resync(&self, server: &str, client: &DataClient, region: &DirtyRegion) -> Result<(), RepairError> {
        let volume_id = volume_id(region.volume);
        let set = {
            let applied = self.state.read().expect("state lock poisoned");
            let state = &applied.state;
            if !state.volumes.contains_key(&volume_id) {
                // Not a volume's (a snapshot's copy is redone by whoever takes it).
                return Ok(());
            }
            state.chunk_maps.get(&volume_id).and_then(|m| m.get(&region.chunk)).cloned()
        };
        if let Some(set) = set.filter(|set| set.servers.iter().any(|s| s == server)) {
            let copies = self.survey(&set.servers, region.volume, region.chunk).await;
            if copies.clean.is_empty() {
                if copies.unreachable > 0 {
                    // A member out of reach may hold the only good copy:
                    // keep this one until it is back; reads fail over past
                    // its bad blocks meanwhile.
                    tracing::warn!(%server, volume = %volume_id, chunk = region.chunk,
                        unreachable = copies.unreachable,
                        "a dirty chunk has no reachable clean peer to be rebuilt from; keeping it for now");
                } else if set.servers.first().is_some_and(|first| first == server) {
                    tracing::warn!(%server, volume = %volume_id, chunk = region.chunk,
                        members = set.servers.len(),
                        "every replica of the chunk crashed with unflushed writes: keeping this one's copy");
                    client.accept_dirty_regions(region.volume, region.chunk).await.map_err(|e| {
                        RepairError::Server { server: server.to_string(), message: format!("accepting: {e}") }
                    })?;
                }
                return Ok(());
            }
            let command = Command::ReportFailedReplica {
                volume_id: volume_id.clone(),
                chunk_index: region.chunk,
                server_id: server.to_string(),
                generation: set.generation,
                writer_epoch: None,
            };
            match self.propose(command).await? {
                Outcome::ReplicaSet { set: current, .. } if !current.servers.iter().any(|s| s == server) => {
                    tracing::warn!(%server, volume = %volume_id, chunk = region.chunk, offset = region.offset,
                        "dirty after a crash: the replica leaves the set and is rebuilt from a peer");
                    let members = self.connect(&current.servers).await;
                    join_all(
                        members.iter().map(|(_, c)| c.set_generation(region.volume, region.chunk, current.generation)),
                    )
                    .await;
                }
                // The set moved on meanwhile: try again on the next pass.
                Outcome::ReplicaSet { .. } => return Ok(()),
                other => return Err(RepairError::Raft(format!("unexpected outcome {other:?}"))),
            }
        }
        client
            .clear_dirty_regions(region.volume, region.chunk, 0, 0)
            .await
            .map_err(|e| RepairError::Server { server: server.to_string(), message: format!("clearing: {e}") })?;
        Ok(())
    }

    /// Which members of a chunk's set hold a clean copy of it, which a copy
    /// left dirty by a crash, and how many could not be asked.
    async fn survey(&self, servers: &[String], data_id: u64, chunk: u64) -> Copies {
        let members = self.connect(servers).await;
        let mut copies = Copies { unreachable: servers.len() - members.len(), ..Copies::default() };
        for (server, client) in members {
            match holds_clean_copy(&client, data_id, chunk).await {
                Ok(true) => copies.clean.push((server, client)),
                Ok(false) => copies.dirty.push((server, client)),
                Err(e) => {
                    tracing::debug!(%server, error = %e, "listing dirty regions");
                    copies.unreachable += 1;
                }
            }
        }
        copies
    }

    async fn propose(&self, command: Command) -> Result<Outcome, RepairError> {
        let request = Request { at_ms: now_ms(), command };
        let written = self.raft.client_write(request).await.map_err(|e| RepairError::Raft(e.to_string()))?;
        Ok(written.data?)
    }

    /// Takes the dead members out of the set; the live ones move to the new
    /// generation so that writers with the old view re-read it.
    async fn drop_dead(&self, chunk: &ChunkRepair) -> Result<ReplicaSet, RepairError> {
        let mut set = chunk.set.clone();
        for server in &chunk.dead {
            tracing::warn!(volume = %chunk.volume_id, chunk = chunk.chunk_index, %server,
                "dropping a replica on a server that stopped heartbeating");
            let command = Command::ReportFailedReplica {
                volume_id: chunk.volume_id.clone(),
                chunk_index: chunk.chunk_index,
                server_id: server.clone(),
                generation: set.generation,
                writer_epoch: None,
            };
            match self.propose(command).await {
                Ok(Outcome::ReplicaSet { set: current, .. }) => set = current,
                // The last replica stays: there is nothing to rebuild from otherwise.
                Err(RepairError::Meta(MetaError::FailedPrecondition(_))) => break,
                Ok(other) => return Err(RepairError::Raft(format!("unexpected outcome {other:?}"))),
                Err(e) => return Err(e),
            }
        }
        let clients = self.connect(&set.servers).await;
        join_all(clients.iter().map(|(_, c)| c.set_generation(chunk.data_id, chunk.chunk_index, set.generation))).await;
        Ok(set)
    }

    /// Connects to the members that answer, by server id.
    async fn connect(&self, servers: &[String]) -> Vec<(String, DataClient)> {
        let addresses: Vec<(String, String)> = {
            let applied = self.state.read().expect("state lock poisoned");
            servers
                .iter()
                .filter_map(|id| applied.state.servers.get(id).map(|s| (id.clone(), s.address.clone())))
                .collect()
        };
        let connector = &self.chunk_servers;
        let connected = join_all(addresses.into_iter().map(|(id, address)| async move {
            match connector.connect_within(&address, CHUNK_SERVER_ANSWER).await {
                Ok(client) => Some((id, client)),
                Err(e) => {
                    tracing::debug!(server = %id, %address, error = %e, "cannot reach chunk server");
                    None
                }
            }
        }))
        .await;
        connected.into_iter().flatten().collect()
    }

    /// Where `chunk`'s missing replica goes: back to a former member heard
    /// from since the chunk came up short (it catches up with the blocks
    /// it missed); while none is and the chunk has been short for less than
    /// the repair delay, nowhere yet (a restarting server is not worth a
    /// whole copy elsewhere); then wherever placement puts a new one.
    fn rebuild_target(&self, chunk: &ChunkRepair, short: &mut ShortChunks) -> Option<String> {
        let (since, since_ms) =
            *short.entry((chunk.volume_id.clone(), chunk.chunk_index)).or_insert_with(|| (Instant::now(), now_ms()));
        let applied = self.state.read().expect("state lock poisoned");
        let servers = &applied.state.servers;
        let back = chunk.set.former.iter().find(|id| {
            servers.get(*id).is_some_and(|s| s.last_heartbeat_ms > since_ms && !s.draining)
                && !chunk.set.servers.contains(id)
        });
        if let Some(id) = back {
            return Some(id.clone());
        }
        if !chunk.set.former.is_empty() && since.elapsed() < self.config.dead_after {
            return None;
        }
        let target = placement::choose_replicas(servers, 1, chunk.chunk_size, now_ms(), &chunk.set.servers).pop();
        if target.is_none() {
            tracing::debug!(volume = %chunk.volume_id, chunk = chunk.chunk_index, "no server can take a new replica");
        }
        target
    }

    /// Rebuilds one missing replica of `chunk` on `target`.
    async fn rebuild(&self, chunk: &ChunkRepair, target: String) -> Result<(), RepairError> {
        let copies = self.survey(&chunk.live_members(), chunk.data_id, chunk.chunk_index).await;
        let members = copies.reachable();
        if members.is_empty() {
            return Err(RepairError::Server { server: "every member".into(), message: "unreachable".into() });
        }
        let target_client = self
            .connect(std::slice::from_ref(&target))
            .await
            .pop()
            .map(|(_, c)| c)
            .ok_or_else(|| RepairError::Server { server: target.clone(), message: "unreachable".into() })?;
        // A target that does not answer is found out before the volume is
        // paused, not while writers wait.
        target_client
            .ping()
            .await
            .map_err(|e| RepairError::Server { server: target.clone(), message: format!("not answering: {e}") })?;
        tracing::info!(volume = %chunk.volume_id, chunk = chunk.chunk_index, to = %target,
            generation = chunk.set.generation, "rebuilding a replica");
        let started = Instant::now();

        // Renewed in the background until released: the volume stays
        // paused for as long as the outcome is undecided.
        let servers: Vec<DataClient> = members.iter().map(|(_, c)| c.clone()).collect();
        let pause = HeldPause::acquire(servers, chunk.data_id, PAUSE).await.map_err(|(index, e)| {
            RepairError::Server { server: members[index].0.clone(), message: format!("pausing the volume: {e}") }
        })?;
        let result = self.copy_and_commit(chunk, &target, &target_client, &copies, &pause).await;
        pause.release().await;
        match &result {
            Ok(()) => tracing::info!(volume = %chunk.volume_id, chunk = chunk.chunk_index, server = %target,
                elapsed_ms = started.elapsed().as_millis() as u64, "replica rebuilt"),
            // Never committed: the copy is nobody's.
            Err(RebuildError::NotCommitted(_)) => {
                let _ = target_client.delete_chunk(chunk.data_id, chunk.chunk_index, 0).await;
            }
            // Maybe committed: the copy stays; orphan cleanup removes it if not.
            Err(RebuildError::Undecided(_)) => {}
        }
        result.map_err(RebuildError::into_inner)
    }

    async fn copy_and_commit(
        &self,
        chunk: &ChunkRepair,
        target: &str,
        target_client: &DataClient,
        copies: &Copies,
        pause: &HeldPause,
    ) -> Result<(), RebuildError> {
        let next = chunk.set.generation + 1;
        let copy = CopyTarget {
            data_id: chunk.data_id,
            chunk: chunk.chunk_index,
            size: chunk.chunk_size,
            generation: next,
            epoch: chunk.epoch,
        };
        // Any member holds every acknowledged write, unless a crash left it
        // regions that may be torn or behind its peers: the source is a
        // clean member (a set whose members all crashed gets one first; see
        // `resync`).
        let sources = &copies.clean;
        if sources.is_empty() {
            return Err(RebuildError::NotCommitted(RepairError::Server {
                server: format!("{} member(s)", copies.dirty.len() + copies.unreachable),
                message: "no reachable member holds a clean copy to rebuild from".into(),
            }));
        }
        let mut copied = false;
        let mut failure = None;
        let mut absent = 0;
        for (server, source) in sources {
            if let Err(e) = catch_up(source, chunk).await {
                failure = Some(copy_error(server, target, e));
                continue;
            }
            match sync_chunk(source, chunk.set.generation, target_client, copy).await {
                Ok(bytes) => {
                    metrics::COPIED_BYTES.with_label_values(&["rebuild"]).inc_by(bytes);
                    copied = true;
                    break;
                }
                Err(e) if e.code() == Some(ErrorCode::NoSuchChunk) => absent += 1,
                Err(e) => failure = Some(copy_error(server, target, e)),
            }
        }
        if !copied {
            if let Some(e) = failure {
                return Err(RebuildError::NotCommitted(e));
            }
            // Every member says the chunk does not exist: it was allocated
            // and never written, and its new replica is an empty chunk.
            if absent < chunk.set.servers.len() {
                return Err(RebuildError::NotCommitted(RepairError::Server {
                    server: "some member".into(),
                    message: "unreachable, and the reachable ones hold no copy".into(),
                }));
            }
            let size = chunk.chunk_size as u32;
            match target_client.create_chunk(chunk.data_id, chunk.chunk_index, size, next).await {
                Err(e) if e.code() != Some(ErrorCode::ChunkExists) => {
                    return Err(RebuildError::NotCommitted(RepairError::Server {
                        server: target.into(),
                        message: format!("creating the chunk: {e}"),
                    }))
                }
                _ => {}
            }
        }
        if !pause.is_intact() {
            // Changes may have gone on at some member: the copy may miss them.
            return Err(RebuildError::NotCommitted(RepairError::Server {
                server: "some member".into(),
                message: "the pause lapsed during the copy".into(),
            }));
        }
        let command = Command::AddReplica {
            volume_id: chunk.volume_id.clone(),
            chunk_index: chunk.chunk_index,
            server_id: target.to_string(),
            generation: chunk.set.generation,
        };
        match self.propose(command).await {
            Ok(_) => {}
            Err(e @ RepairError::Meta(_)) => return Err(RebuildError::NotCommitted(e)),
            // Leadership changed or quorum lost: the entry may still commit.
            Err(e) => {
                if !self.wait_until_joined(chunk, target).await {
                    return Err(RebuildError::Undecided(e));
                }
            }
        }
        // Still paused: the members move to the new generation before any
        // waiting write goes on under the old one.
        for (server, client) in copies.reachable() {
            if let Err(e) = client.set_generation(chunk.data_id, chunk.chunk_index, next).await {
                tracing::warn!(%server, error = %e, "moving a member to the new generation; writers will");
            }
        }
        Ok(())
    }

    /// After a proposal whose outcome is unknown: waits (the volume stays
    /// paused) until this member's state shows `target` in the chunk's set,
    /// or the set moved on without it (the proposal, which names the
    /// generation it was copied from, can then never apply), or
    /// [`UNDECIDED_WAIT`] passes.
    async fn wait_until_joined(&self, chunk: &ChunkRepair, target: &str) -> bool {
        let deadline = Instant::now() + UNDECIDED_WAIT;
        while Instant::now() < deadline {
            let current = {
                let applied = self.state.read().expect("state lock poisoned");
                let set = applied.state.chunk_maps.get(&chunk.volume_id).and_then(|m| m.get(&chunk.chunk_index));
                set.map(|s| (s.generation, s.servers.iter().any(|id| id == target)))
            };
            match current {
                Some((generation, true)) if generation > chunk.set.generation => return true,
                Some((generation, _)) if generation == chunk.set.generation => {}
                // Moved on without the target, or the chunk is gone.
                _ => return false,
            }
            tokio::time::sleep(Duration::from_millis(500)).await;
        }
        tracing::error!(volume = %chunk.volume_id, chunk = chunk.chunk_index, %target,
            "cannot tell whether the rebuilt replica joined its set; the volume resumes");
        false
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const NOW: u64 = 1_000_000;

    fn state() -> MetaState {
        let mut state = MetaState::default();
        for i in 0..4 {
            let command = Command::RegisterChunkServer {
                id: format!("s{i}"),
                address: format!("127.0.0.1:{}", 7400 + i),
                capacity_bytes: 100 << 30,
                labels: Default::default(),
                cluster_id: String::new(),
            };
            state.apply(i + 1, NOW, command).unwrap();
        }
        let create = Command::CreateVolume {
            name: "v".into(),
            size_bytes: 3 << 20,
            replicas: 3,
            chunk_size_bytes: 1 << 20,
            parameters: Default::default(),
            source: None,
            limits: Default::default(),
        };
        let Outcome::Volume(volume) = state.apply(10, NOW, create).unwrap() else { panic!("a volume") };
        for chunk_index in 0..3 {
            let allocate = Command::AllocateChunk { volume_id: volume.id.clone(), chunk_index, writer_epoch: None };
            state.apply(11 + chunk_index, NOW, allocate).unwrap();
        }
        state
    }

    #[test]
    fn plans_silent_members_and_missing_replicas_but_keeps_a_write_quorum() {
        let mut state = state();
        assert!(plan(&state, &BTreeSet::new()).is_empty(), "healthy chunks need nothing");

        let volume_id = state.volumes.keys().next().unwrap().clone();
        let chunks = state.chunk_maps.get_mut(&volume_id).unwrap();
        let lost = chunks[&0].servers[0].clone();
        chunks.get_mut(&1).unwrap().servers.pop();
        let work = plan(&state, &BTreeSet::new());
        assert_eq!(work.iter().map(|w| w.chunk_index).collect::<Vec<_>>(), vec![1]);
        assert!(work[0].dead.is_empty());
        assert_eq!(work[0].wanted, 3);

        let work = plan(&state, &BTreeSet::from([lost.clone()]));
        let zero = work.iter().find(|w| w.chunk_index == 0).expect("chunk 0 has a silent member");
        assert_eq!(zero.dead, vec![lost.clone()]);
        assert!(!zero.live_members().contains(&lost));

        // Two of three members silent: only one leaves, two (a majority) stay.
        let members = state.chunk_maps[&volume_id][&2].servers.clone();
        let work = plan(&state, &members[..2].iter().cloned().collect());
        let two = work.iter().find(|w| w.chunk_index == 2).expect("chunk 2 has silent members");
        assert_eq!(two.dead.len(), 1);
    }
}
