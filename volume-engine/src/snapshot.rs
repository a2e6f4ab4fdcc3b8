//! Snapshots and clones with real data.
//!
//! Taking a snapshot: the source volume is paused on every chunk server
//! holding one of its chunks (changes wait, in-flight ones finish), each
//! chunk is cloned on one server into the snapshot's id, and the volume is
//! resumed; the pause spans every clone, so the snapshot is crash-consistent
//! across chunks. The clones are then copied to the other servers of each
//! chunk's replica set, and meta records where they live. A group snapshot
//! pauses all its volumes before cloning any: crash-consistent across them.
//!
//! Populating a volume created from a snapshot copies the snapshot's chunks
//! into it through the engine (so the copy is replicated and checksummed
//! like any write), then marks it ready. A clone of a volume goes through a
//! temporary snapshot, for the same point-in-time guarantee.

use std::collections::BTreeMap;
use std::time::Duration;

use futures::future::join_all;

use ballast_proto::frame::{copy_chunk, holds_clean_copy, ClientError, CopyTarget, DataClient, ErrorCode, HeldPause};
use ballast_proto::meta as pb;
use meta_client::MetaClient;

use crate::engine::{EngineError, EngineOptions, Volume};

/// Longest a volume stays paused if this process dies mid-snapshot.
const PAUSE_TIMEOUT: Duration = Duration::from_secs(15);

#[derive(Debug, thiserror::Error)]
pub enum SnapshotError {
    #[error("metadata service: {0}")]
    Meta(#[from] tonic::Status),
    #[error(transparent)]
    Engine(#[from] EngineError),
    #[error("chunk server {address}: {source}")]
    Server { address: String, source: ClientError },
    #[error("no server could clone chunk {chunk}: {last}")]
    CloneFailed { chunk: u64, last: String },
    #[error("snapshot {0} not found")]
    NoSuchSnapshot(String),
    #[error("snapshot chunk {chunk} could not be read from any server: {last}")]
    Unreadable { chunk: u64, last: String },
    /// A server may have let the pause lapse while chunks were cloned, so
    /// the clones may not be of one moment; taking the snapshot again redoes them.
    #[error("the volume's pause lapsed on a server while the snapshot was taken; take it again")]
    PauseLapsed,
}

async fn connect(meta: &MetaClient, address: &str) -> Result<DataClient, SnapshotError> {
    let connected = meta.chunk_servers().connect(address).await;
    connected.map_err(|source| SnapshotError::Server { address: address.into(), source })
}

async fn get_snapshot(meta: &MetaClient, id: &str) -> Result<pb::Snapshot, SnapshotError> {
    let request = pb::ListSnapshotsRequest { snapshot_id: id.into(), page_size: 1, ..Default::default() };
    meta.list_snapshots(request).await?.snapshots.pop().ok_or_else(|| SnapshotError::NoSuchSnapshot(id.into()))
}

/// Copies the data of a snapshot that meta has recorded but not completed,
/// and completes it. Safe to call again after a failure.
pub async fn take(meta: &MetaClient, snapshot: &pb::Snapshot) -> Result<pb::Snapshot, SnapshotError> {
    let mut taken = take_together(meta, std::slice::from_ref(snapshot)).await?;
    Ok(taken.pop().expect("one snapshot in, one out"))
}

/// A snapshot to take: its source volume and where that volume's chunks are.
struct Pending {
    snapshot: pb::Snapshot,
    source: pb::Volume,
    map: pb::ChunkMap,
}

impl Pending {
    fn addresses(&self) -> Vec<String> {
        let mut addresses: Vec<String> =
            self.map.chunks.iter().flat_map(|c| c.replicas.iter().map(|r| r.address.clone())).collect();
        addresses.sort();
        addresses.dedup();
        addresses
    }
}

/// Takes several snapshots at one instant (a group snapshot; one snapshot
/// is a group of one). Every source volume is paused on every server
/// holding its chunks before any chunk is cloned, and all resume only once
/// every chunk is cloned: a write acknowledged before another write was
/// issued, to any of the volumes, is in the snapshots whenever the later
/// one is. Returns the snapshots completed, in the order given. Safe to
/// call again after a failure.
pub async fn take_together(meta: &MetaClient, snapshots: &[pb::Snapshot]) -> Result<Vec<pb::Snapshot>, SnapshotError> {
    let mut pending = Vec::new();
    for snapshot in snapshots.iter().filter(|s| !s.ready_to_use) {
        let source = meta.find_volume(&snapshot.source_volume_id).await?;
        let map = meta.get_chunk_map(pb::GetChunkMapRequest { volume_id: source.id.clone() }).await?;
        pending.push(Pending { snapshot: snapshot.clone(), source, map });
    }
    let mut clients = BTreeMap::new();
    for address in pending.iter().flat_map(Pending::addresses) {
        if let std::collections::btree_map::Entry::Vacant(entry) = clients.entry(address) {
            let client = connect(meta, entry.key()).await?;
            entry.insert(client);
        }
    }

    // Pause everywhere first; clone only once every server has paused every
    // volume. The pauses are renewed while cloning, so many chunks take as
    // long as they need.
    let mut pauses = Vec::new();
    for p in &pending {
        let addresses = p.addresses();
        let servers: Vec<DataClient> = addresses.iter().map(|a| clients[a].clone()).collect();
        match HeldPause::acquire(servers, p.source.data_id, PAUSE_TIMEOUT).await {
            Ok(pause) => pauses.push(pause),
            Err((index, source)) => {
                join_all(pauses.into_iter().map(HeldPause::release)).await;
                return Err(SnapshotError::Server { address: addresses[index].clone(), source });
            }
        }
    }
    let mut cloned = Vec::new();
    for p in &pending {
        match clone_chunks(&clients, &p.map, p.source.data_id, p.snapshot.data_id).await {
            Ok(primaries) => cloned.push(primaries),
            Err(e) => {
                join_all(pauses.into_iter().map(HeldPause::release)).await;
                return Err(e);
            }
        }
    }
    let intact = pauses.iter().all(HeldPause::is_intact);
    join_all(pauses.into_iter().map(HeldPause::release)).await;
    if !intact {
        return Err(SnapshotError::PauseLapsed);
    }

    let mut completed = BTreeMap::new();
    for (p, primaries) in pending.iter().zip(&cloned) {
        let snapshot = complete(meta, &clients, p, primaries).await?;
        completed.insert(snapshot.id.clone(), snapshot);
    }
    Ok(snapshots.iter().map(|s| completed.remove(&s.id).unwrap_or_else(|| s.clone())).collect())
}

/// Copies each chunk's clone to the rest of its replica set (redundancy)
/// and records where the copies are.
async fn complete(
    meta: &MetaClient,
    clients: &BTreeMap<String, DataClient>,
    p: &Pending,
    primaries: &BTreeMap<u64, pb::Replica>,
) -> Result<pb::Snapshot, SnapshotError> {
    let snapshot = &p.snapshot;
    let mut chunks = Vec::new();
    for set in &p.map.chunks {
        let primary = &primaries[&set.chunk_index];
        let mut holders = vec![primary.server_id.clone()];
        for replica in set.replicas.iter().filter(|r| r.server_id != primary.server_id) {
            let target = &clients[&replica.address];
            // A snapshot's data id is new: its chunks start at generation
            // 1 and no server has seen an epoch for it.
            let copy = CopyTarget {
                data_id: snapshot.data_id,
                chunk: set.chunk_index,
                size: snapshot.chunk_size_bytes,
                generation: 1,
                epoch: 0,
            };
            match copy_chunk(&clients[&primary.address], 1, target, copy).await {
                Ok(_) => holders.push(replica.server_id.clone()),
                Err(e) => tracing::warn!(snapshot = %snapshot.id, chunk = set.chunk_index, server = %replica.server_id,
                    error = %e, "copying a snapshot chunk; the snapshot keeps fewer copies"),
            }
        }
        chunks.push(pb::SnapshotChunk { chunk_index: set.chunk_index, server_ids: holders });
    }
    let request = pb::CompleteSnapshotRequest { snapshot_id: snapshot.id.clone(), chunks };
    Ok(meta.complete_snapshot(request).await?)
}

/// Takes a group snapshot recorded in meta: records a member snapshot for
/// each source volume that has none yet, then takes every member not yet
/// taken, together. Safe to call again after a failure: a member recorded
/// but not taken is taken then.
pub async fn take_group(meta: &MetaClient, group: &pb::GroupSnapshot) -> Result<pb::GroupSnapshot, SnapshotError> {
    let mut members = group.snapshots.clone();
    for volume in &group.source_volume_ids {
        if !members.iter().any(|s| &s.source_volume_id == volume) {
            let request = pb::CreateSnapshotRequest {
                name: format!("{}-{volume}", group.id),
                source_volume_id: volume.clone(),
                group_id: group.id.clone(),
            };
            members.push(meta.create_snapshot(request).await?);
        }
    }
    take_together(meta, &members).await?;
    Ok(meta.get_group_snapshot(pb::GetGroupSnapshotRequest { id: group.id.clone() }).await?)
}

/// Clones every chunk on the first replica that manages it; returns the
/// replica holding each clone.
async fn clone_chunks(
    clients: &BTreeMap<String, DataClient>,
    map: &pb::ChunkMap,
    volume: u64,
    snapshot: u64,
) -> Result<BTreeMap<u64, pb::Replica>, SnapshotError> {
    let mut primaries = BTreeMap::new();
    for set in &map.chunks {
        let mut last = String::from("no replicas");
        for replica in &set.replicas {
            let client = &clients[&replica.address];
            match holds_clean_copy(client, volume, set.chunk_index).await {
                Ok(true) => {}
                Ok(false) => {
                    last = format!("{}: regions left dirty by a crash, not a source", replica.address);
                    continue;
                }
                Err(e) => {
                    last = format!("{}: {e}", replica.address);
                    continue;
                }
            }
            let mut result = client.clone_chunk(volume, set.chunk_index, snapshot, set.chunk_index, 1).await;
            if matches!(&result, Err(e) if e.code() == Some(ErrorCode::ChunkExists)) {
                // Left by an earlier, interrupted attempt: take it again now.
                let _ = client.delete_chunk(snapshot, set.chunk_index, 0).await;
                result = client.clone_chunk(volume, set.chunk_index, snapshot, set.chunk_index, 1).await;
            }
            match result {
                Ok(()) => {
                    primaries.insert(set.chunk_index, replica.clone());
                    break;
                }
                Err(e) => last = format!("{}: {e}", replica.address),
            }
        }
        if !primaries.contains_key(&set.chunk_index) {
            return Err(SnapshotError::CloneFailed { chunk: set.chunk_index, last });
        }
    }
    Ok(primaries)
}

/// Copies the content of a volume's source (snapshot or volume) into it and
/// marks it ready. Idempotent: a retry copies again.
pub async fn populate(meta: &MetaClient, volume: &pb::Volume) -> Result<pb::Volume, SnapshotError> {
    if volume.state != pb::VolumeState::Populating as i32 {
        return Ok(volume.clone());
    }
    let source = volume.content_source.as_ref().and_then(|s| s.source.clone());
    match source {
        Some(pb::content_source::Source::SnapshotId(id)) => {
            let snapshot = get_snapshot(meta, &id).await?;
            let snapshot = take(meta, &snapshot).await?;
            copy_snapshot_into(meta, &snapshot, volume).await?;
        }
        Some(pb::content_source::Source::VolumeId(id)) => {
            // A point-in-time copy of a live volume: through a snapshot of its own.
            let request = pb::CreateSnapshotRequest {
                name: format!("clone-source-of-{}", volume.id),
                source_volume_id: id,
                ..Default::default()
            };
            let snapshot = meta.create_snapshot(request).await?;
            let snapshot = take(meta, &snapshot).await?;
            copy_snapshot_into(meta, &snapshot, volume).await?;
            meta.delete_snapshot(pb::DeleteSnapshotRequest { id: snapshot.id.clone() }).await?;
        }
        None => {}
    }
    Ok(meta.mark_volume_ready(pb::MarkVolumeReadyRequest { id: volume.id.clone() }).await?)
}

async fn copy_snapshot_into(
    meta: &MetaClient,
    snapshot: &pb::Snapshot,
    volume: &pb::Volume,
) -> Result<(), SnapshotError> {
    // Nothing is attached yet: the lowest epoch is the right one.
    let target = Volume::open(meta.clone(), &volume.id, EngineOptions { epoch: 0, ..Default::default() }).await?;
    for chunk in &snapshot.chunks {
        let base = chunk.chunk_index * snapshot.chunk_size_bytes;
        let mut last = String::from("no copies");
        let mut copied = false;
        for replica in &chunk.replicas {
            match copy_from_replica(&target, &replica.address, snapshot.data_id, chunk.chunk_index, base).await {
                Ok(()) => {
                    copied = true;
                    break;
                }
                Err(e) => last = format!("{}: {e}", replica.address),
            }
        }
        if !copied {
            return Err(SnapshotError::Unreadable { chunk: chunk.chunk_index, last });
        }
    }
    target.flush().await?;
    Ok(())
}

async fn copy_from_replica(
    target: &Volume,
    address: &str,
    data_id: u64,
    chunk: u64,
    base: u64,
) -> Result<(), SnapshotError> {
    let client = connect(target.meta(), address).await?;
    let server_error = |source| SnapshotError::Server { address: address.into(), source };
    let mut stream = client.read_chunk_stream(data_id, chunk, 0, 0, 0).await.map_err(server_error)?;
    while let Some(segment) = stream.next().await {
        let segment = segment.map_err(server_error)?;
        let offset = base + segment.offset;
        // The tail of the source's last chunk may lie past the end of the volume.
        let len = (segment.data.len() as u64).min(target.size_bytes().saturating_sub(offset)) as usize;
        let data = segment.data.slice(..len);
        if data.iter().all(|b| *b == 0) {
            continue; // thin: the new volume already reads zeros there
        }
        target.write_at(offset, data, false).await?;
    }
    Ok(())
}
