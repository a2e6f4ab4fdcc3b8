//! Volume condition: whether every allocated chunk of a volume still has
//! as many live replicas as the volume was created with.

use std::collections::HashSet;

use ballast_proto::csi;
use ballast_proto::meta as pb;
use meta_raft::MetaClient;

use crate::error::Result;

/// Ids of the chunk servers that are heartbeating.
pub async fn live_servers(meta: &MetaClient) -> Result<HashSet<String>> {
    let servers = meta.list_chunk_servers(pb::ListChunkServersRequest {}).await?;
    Ok(servers.servers.into_iter().filter(|s| s.alive).map(|s| s.id).collect())
}

/// The condition of `volume` given its chunk map and the live servers.
/// Chunks are allocated on first write, so a new volume has none and is
/// healthy.
pub fn condition(volume: &pb::Volume, map: &pb::ChunkMap, live: &HashSet<String>) -> csi::VolumeCondition {
    let wanted = volume.replicas as usize;
    let mut degraded = 0usize;
    let mut unreachable = 0usize;
    let mut worst: Option<(u64, usize)> = None;
    for chunk in &map.chunks {
        let healthy = chunk.replicas.iter().filter(|r| live.contains(&r.server_id)).count();
        if healthy < wanted {
            degraded += 1;
            if healthy == 0 {
                unreachable += 1;
            }
            if worst.is_none_or(|(_, h)| healthy < h) {
                worst = Some((chunk.chunk_index, healthy));
            }
        }
    }
    let total = map.chunks.len();
    match worst {
        None => csi::VolumeCondition {
            abnormal: false,
            message: format!("all {total} allocated chunks have {wanted} live replicas"),
        },
        Some((index, healthy)) => csi::VolumeCondition {
            abnormal: true,
            message: format!(
                "{degraded} of {total} allocated chunks have fewer than {wanted} live replicas \
                 ({unreachable} with none); chunk {index} has {healthy}"
            ),
        },
    }
}

/// Fetches what [`condition`] needs and computes it.
pub async fn volume_condition(
    meta: &MetaClient,
    volume: &pb::Volume,
    live: &HashSet<String>,
) -> Result<csi::VolumeCondition> {
    let map = meta.get_chunk_map(pb::GetChunkMapRequest { volume_id: volume.id.clone() }).await?;
    Ok(condition(volume, &map, live))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn chunk(index: u64, servers: &[&str]) -> pb::ChunkReplicaSet {
        pb::ChunkReplicaSet {
            volume_id: "vol-1".into(),
            chunk_index: index,
            generation: 1,
            replicas: servers
                .iter()
                .map(|s| pb::Replica { server_id: s.to_string(), address: String::new() })
                .collect(),
        }
    }

    #[test]
    fn a_chunk_short_of_live_replicas_makes_the_volume_abnormal() {
        let volume = pb::Volume { id: "vol-1".into(), replicas: 3, ..Default::default() };
        let live: HashSet<String> = ["a", "b", "c"].iter().map(|s| s.to_string()).collect();
        let empty = pb::ChunkMap { volume_id: "vol-1".into(), chunks: vec![] };
        assert!(!condition(&volume, &empty, &live).abnormal);

        let healthy = pb::ChunkMap { volume_id: "vol-1".into(), chunks: vec![chunk(0, &["a", "b", "c"])] };
        assert!(!condition(&volume, &healthy, &live).abnormal);

        let map = pb::ChunkMap {
            volume_id: "vol-1".into(),
            chunks: vec![chunk(0, &["a", "b", "c"]), chunk(1, &["a", "b", "d"]), chunk(2, &["d", "e"])],
        };
        let c = condition(&volume, &map, &live);
        assert!(c.abnormal);
        assert!(c.message.contains("2 of 3"), "{}", c.message);
        assert!(c.message.contains("chunk 2 has 0"), "{}", c.message);
    }
}
