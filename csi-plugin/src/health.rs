//! Volume condition and health: whether every allocated chunk of a volume
//! still has as many live replicas as the volume asks for. The condition
//! (CSI VOLUME_CONDITION) says it in one line; the health (CSI
//! GET_VOLUME_HEALTH) sorts it: chunks short of replicas make the volume
//! DEGRADED, chunks with none live make it INACCESSIBLE.

use std::collections::HashSet;

use ballast_proto::csi;
use ballast_proto::meta as pb;
use meta_client::MetaClient;

use crate::error::Result;

/// Ids of the chunk servers that are heartbeating.
pub async fn live_servers(meta: &MetaClient) -> Result<HashSet<String>> {
    let servers = meta.list_chunk_servers(pb::ListChunkServersRequest {}).await?;
    Ok(servers.servers.into_iter().filter(|s| s.alive).map(|s| s.id).collect())
}

/// A volume's chunks counted by their live replicas. Chunks are
/// allocated on first write, so a new volume has none and is healthy.
pub struct Census {
    wanted: usize,
    total: usize,
    /// Chunks with fewer live replicas than wanted (including those with none).
    short: usize,
    /// Chunks with no live replica.
    unreachable: usize,
    /// The chunk with the fewest live replicas, and how many it has.
    worst: Option<(u64, usize)>,
}

impl Census {
    pub fn of(volume: &pb::Volume, map: &pb::ChunkMap, live: &HashSet<String>) -> Census {
        let wanted = volume.replicas as usize;
        let mut census = Census { wanted, total: map.chunks.len(), short: 0, unreachable: 0, worst: None };
        for chunk in &map.chunks {
            let healthy = chunk.replicas.iter().filter(|r| live.contains(&r.server_id)).count();
            if healthy < wanted {
                census.short += 1;
                if healthy == 0 {
                    census.unreachable += 1;
                }
                if census.worst.is_none_or(|(_, h)| healthy < h) {
                    census.worst = Some((chunk.chunk_index, healthy));
                }
            }
        }
        census
    }

    pub fn condition(&self) -> csi::VolumeCondition {
        let Census { wanted, total, short, unreachable, .. } = *self;
        match self.worst {
            None => csi::VolumeCondition {
                abnormal: false,
                message: format!("all {total} allocated chunks have {wanted} live replicas"),
            },
            Some((index, healthy)) => csi::VolumeCondition {
                abnormal: true,
                message: format!(
                    "{short} of {total} allocated chunks have fewer than {wanted} live replicas \
                     ({unreachable} with none); chunk {index} has {healthy}"
                ),
            },
        }
    }

    /// The health entries: none when every chunk has all its replicas.
    pub fn health(&self, volume_id: &str) -> csi::VolumeHealth {
        use csi::volume_health::VolumeHealthEntry;
        use csi::VolumeHealthErrorType::{Degraded, Inaccessible};
        let Census { wanted, total, short, unreachable, .. } = *self;
        let mut statuses = Vec::new();
        if unreachable > 0 {
            statuses.push(VolumeHealthEntry {
                status: Inaccessible as i32,
                reason: "ReplicasUnreachable".into(),
                message: format!(
                    "{unreachable} of {total} allocated chunks have no live replica: their data cannot be read or \
                     written until a server holding them is back"
                ),
            });
        }
        if short > unreachable {
            statuses.push(VolumeHealthEntry {
                status: Degraded as i32,
                reason: "ReplicasMissing".into(),
                message: format!(
                    "{} of {total} allocated chunks have fewer than {wanted} live replicas; the repair loop \
                     rebuilds them",
                    short - unreachable
                ),
            });
        }
        csi::VolumeHealth { volume_id: volume_id.to_string(), health_statuses: statuses }
    }
}

/// What a volume whose record vanished while it was looked at reports.
pub fn deleted_meanwhile(volume_id: &str) -> csi::VolumeHealth {
    use csi::volume_health::VolumeHealthEntry;
    csi::VolumeHealth {
        volume_id: volume_id.to_string(),
        health_statuses: vec![VolumeHealthEntry {
            status: csi::VolumeHealthErrorType::Inaccessible as i32,
            reason: "Deleted".into(),
            message: "the volume was deleted".into(),
        }],
    }
}

/// Fetches the volume's chunk map and counts its chunks.
pub async fn census(meta: &MetaClient, volume: &pb::Volume, live: &HashSet<String>) -> Result<Census> {
    let map = meta.get_chunk_map(pb::GetChunkMapRequest { volume_id: volume.id.clone() }).await?;
    Ok(Census::of(volume, &map, live))
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
        assert!(!Census::of(&volume, &empty, &live).condition().abnormal);

        let healthy = pb::ChunkMap { volume_id: "vol-1".into(), chunks: vec![chunk(0, &["a", "b", "c"])] };
        assert!(!Census::of(&volume, &healthy, &live).condition().abnormal);

        let map = pb::ChunkMap {
            volume_id: "vol-1".into(),
            chunks: vec![chunk(0, &["a", "b", "c"]), chunk(1, &["a", "b", "d"]), chunk(2, &["d", "e"])],
        };
        let census = Census::of(&volume, &map, &live);
        let c = census.condition();
        assert!(c.abnormal);
        assert!(c.message.contains("2 of 3"), "{}", c.message);
        assert!(c.message.contains("chunk 2 has 0"), "{}", c.message);
        let health = census.health("vol-1");
        let statuses: Vec<i32> = health.health_statuses.iter().map(|s| s.status).collect();
        let (inaccessible, degraded) =
            (csi::VolumeHealthErrorType::Inaccessible as i32, csi::VolumeHealthErrorType::Degraded as i32);
        assert_eq!(statuses, vec![inaccessible, degraded], "{health:?}");
        assert!(health.health_statuses[0].message.starts_with("1 of 3"), "{health:?}");
        assert!(Census::of(&volume, &healthy, &live).health("vol-1").health_statuses.is_empty());
    }
}
