//! Fencing a volume's previous writer when the volume is published: the new
//! epoch goes to every chunk server before the publish returns. A server
//! learns of a new epoch from the first change that carries it, which for a
//! chunk the new owner has not written yet may be never; meanwhile a
//! writer cut off from metadata would still land writes there.

use std::time::Duration;

use ballast_proto::frame::{ChunkAt, Connector, DataClient, DirtyRegion};
use futures::future::join_all;

use crate::{metrics, CHUNK_SERVER_ANSWER};

/// A server that did not confirm the fence, and why.
#[derive(Debug)]
pub struct Unfenced {
    pub server_id: String,
    pub error: String,
}

/// Sends `epoch` of volume `data_id` to every server of `servers` (id,
/// address) at once; returns those that did not confirm it.
pub async fn push_epoch(
    connector: &Connector,
    servers: Vec<(String, String)>,
    data_id: u64,
    epoch: u64,
) -> Vec<Unfenced> {
    let results = join_all(servers.into_iter().map(|(server_id, address)| async move {
        // Connect, persist the epoch, drain the changes in flight.
        let fenced = tokio::time::timeout(CHUNK_SERVER_ANSWER, async {
            let client = connector.connect(&address).await?;
            client.fence_volume(data_id, epoch).await
        })
        .await;
        match fenced {
            Ok(Ok(_)) => None,
            Ok(Err(e)) => Some(Unfenced { server_id, error: e.to_string() }),
            Err(_) => Some(Unfenced { server_id, error: format!("no answer within {CHUNK_SERVER_ANSWER:?}") }),
        }
    }))
    .await;
    results.into_iter().flatten().collect()
}

/// The pause holder of a fence's resync (see [`resync_unflushed`]).
const RESYNC_HOLDER: u64 = u64::from_le_bytes(*b"fence-rs");
const RESYNC_PAUSE: Duration = Duration::from_secs(30);

/// One chunk of the fenced volume: index, generation, members (id, address).
pub struct ChunkMembers {
    pub chunk_index: u64,
    pub generation: u64,
    pub members: Vec<(String, String)>,
}

/// A member whose copy could not be brought in line: it must leave the set.
#[derive(Debug)]
pub struct Diverged {
    pub chunk_index: u64,
    pub generation: u64,
    pub server_id: String,
    pub error: String,
}

/// After a fence, makes the members of every chunk agree where any of them
/// has a region written since its last flush: the old writer's last
/// changes may have landed on some members and been refused by the others.
/// Each such region is copied from one member to the others while the
/// volume is paused on all of them. Acknowledged writes are on every
/// member, so any member is a right source; an unacknowledged write is kept
/// or lost, but the same way on every member. Regions recovered after a
/// crash are the repair loop's (the whole chunk is rebuilt there).
/// Returns the bytes copied and the members that could not be resynced.
pub async fn resync_unflushed(
    connector: &Connector,
    chunks: &[ChunkMembers],
    data_id: u64,
    epoch: u64,
) -> (u64, Vec<Diverged>) {
    let mut addresses: Vec<(String, String)> = chunks.iter().flat_map(|c| c.members.iter().cloned()).collect();
    addresses.sort();
    addresses.dedup();
    let clients: Vec<(String, Option<DataClient>)> = join_all(addresses.into_iter().map(|(id, address)| async move {
        let client = connector.connect_within(&address, CHUNK_SERVER_ANSWER).await.ok();
        (id, client)
    }))
    .await;
    let client = |id: &str| clients.iter().find(|(c, _)| c == id).and_then(|(_, c)| c.as_ref());

    let mut paused = Vec::new();
    let mut dirty: Vec<(String, DirtyRegion)> = Vec::new();
    // Members whose copy of a chunk a crash left suspect: never a source.
    let mut recovered: Vec<(String, u64)> = Vec::new();
    for (id, c) in clients.iter().filter_map(|(id, c)| c.as_ref().map(|c| (id, c))) {
        if c.pause_volume_for(data_id, RESYNC_HOLDER, RESYNC_PAUSE).await.is_ok() {
            paused.push(c);
        }
        match c.dirty_regions(Some(data_id)).await {
            Ok(regions) => {
                for region in regions {
                    if region.is_recovered() {
                        recovered.push((id.clone(), region.chunk));
                    } else {
                        dirty.push((id.clone(), region));
                    }
                }
            }
            Err(e) => tracing::warn!(server = %id, error = %e, "listing unflushed regions after a fence"),
        }
    }

    let mut copied = 0u64;
    let mut diverged = Vec::new();
    for chunk in chunks {
        let mut regions: Vec<(u64, u32)> =
            dirty.iter().filter(|(_, r)| r.chunk == chunk.chunk_index).map(|(_, r)| (r.offset, r.length)).collect();
        regions.sort_unstable();
        regions.dedup();
        for (offset, length) in regions {
            let mut source = None;
            let clean = |id: &String| !recovered.contains(&(id.clone(), chunk.chunk_index));
            for (id, _) in chunk.members.iter().filter(|(id, _)| clean(id)) {
                if let Some(c) = client(id) {
                    if let Ok(read) = c
                        .read(
                            ChunkAt { volume: data_id, chunk: chunk.chunk_index, offset, epoch, generation: 0 },
                            length,
                        )
                        .await
                    {
                        source = Some((id.clone(), read));
                        break;
                    }
                }
            }
            let Some((source_id, (data, checksums))) = source else {
                tracing::warn!(
                    data_id,
                    chunk = chunk.chunk_index,
                    offset,
                    "no member could be read to resync a region"
                );
                continue;
            };
            for (id, _) in chunk.members.iter().filter(|(id, _)| *id != source_id) {
                let written = match client(id) {
                    Some(c) => c
                        .write_holding_pause(
                            ChunkAt {
                                volume: data_id,
                                chunk: chunk.chunk_index,
                                offset,
                                epoch,
                                generation: chunk.generation,
                            },
                            data.clone(),
                            &checksums,
                        )
                        .await
                        .map_err(|e| e.to_string()),
                    None => Err("unreachable".to_string()),
                };
                match written {
                    Ok(()) => {
                        copied += u64::from(length);
                        metrics::COPIED_BYTES.with_label_values(&["resync"]).inc_by(u64::from(length));
                    }
                    Err(error) => diverged.push(Diverged {
                        chunk_index: chunk.chunk_index,
                        generation: chunk.generation,
                        server_id: id.clone(),
                        error,
                    }),
                }
            }
        }
    }
    for c in paused {
        let _ = c.resume_volume_for(data_id, RESYNC_HOLDER).await;
    }
    (copied, diverged)
}
