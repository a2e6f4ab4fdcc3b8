//! Conversions between the replicated state and the protobuf messages.

use ballast_proto::meta as pb;

use crate::group::GroupSnapshot;
use crate::modify::IoLimits;
use meta_client::now_ms;

use crate::model::Source;
use crate::model::{Attachment, ChunkServer, CsiNode, ReplicaSet, Snapshot, Volume};
use crate::state::MetaState;

pub fn source_from_pb(source: Option<pb::ContentSource>) -> Option<Source> {
    match source?.source? {
        pb::content_source::Source::SnapshotId(id) => Some(Source::Snapshot(id)),
        pb::content_source::Source::VolumeId(id) => Some(Source::Volume(id)),
    }
}

fn source_to_pb(source: &Option<Source>) -> Option<pb::ContentSource> {
    source.as_ref().map(|s| pb::ContentSource {
        source: Some(match s {
            Source::Snapshot(id) => pb::content_source::Source::SnapshotId(id.clone()),
            Source::Volume(id) => pb::content_source::Source::VolumeId(id.clone()),
        }),
    })
}

pub fn volume(v: &Volume) -> pb::Volume {
    pb::Volume {
        id: v.id.clone(),
        name: v.name.clone(),
        size_bytes: v.size_bytes,
        replicas: v.replicas,
        chunk_size_bytes: v.chunk_size_bytes,
        parameters: v.parameters.clone().into_iter().collect(),
        content_source: source_to_pb(&v.source),
        state: if v.populating { pb::VolumeState::Populating } else { pb::VolumeState::Ready } as i32,
        created_at_ms: v.created_at_ms,
        data_id: v.data_id,
        limits: Some(pb::IoLimits { max_iops: v.limits.max_iops, max_bandwidth_bytes: v.limits.max_bandwidth_bytes }),
    }
}

pub fn limits_from_pb(limits: Option<pb::IoLimits>) -> IoLimits {
    limits.map_or_else(IoLimits::default, |l| IoLimits {
        max_iops: l.max_iops,
        max_bandwidth_bytes: l.max_bandwidth_bytes,
    })
}

pub fn snapshot(state: &MetaState, s: &Snapshot) -> pb::Snapshot {
    pb::Snapshot {
        chunk_size_bytes: s.chunk_size_bytes,
        chunks: s.chunks.iter().map(|(i, set)| replica_set(state, &s.id, *i, set)).collect(),
        id: s.id.clone(),
        name: s.name.clone(),
        source_volume_id: s.source_volume_id.clone(),
        size_bytes: s.size_bytes,
        created_at_ms: s.created_at_ms,
        ready_to_use: s.ready_to_use,
        data_id: s.data_id,
        group_id: s.group_id.clone().unwrap_or_default(),
    }
}

pub fn group_snapshot(state: &MetaState, g: &GroupSnapshot) -> pb::GroupSnapshot {
    pb::GroupSnapshot {
        id: g.id.clone(),
        name: g.name.clone(),
        source_volume_ids: g.source_volume_ids.clone(),
        created_at_ms: g.created_at_ms,
        snapshots: state.group_members(g).into_iter().map(|s| snapshot(state, s)).collect(),
        ready_to_use: state.group_ready(g),
    }
}

pub fn chunk_server(s: &ChunkServer, cluster_id: &str) -> pb::ChunkServer {
    pb::ChunkServer {
        id: s.id.clone(),
        address: s.address.clone(),
        capacity_bytes: s.capacity_bytes,
        used_bytes: s.used_bytes,
        allocated_bytes: s.allocated_bytes,
        labels: s.labels.clone().into_iter().collect(),
        draining: s.draining,
        last_heartbeat_ms: s.last_heartbeat_ms,
        alive: s.is_alive(now_ms()),
        cluster_id: cluster_id.to_string(),
    }
}

pub fn replica_set(state: &MetaState, volume_id: &str, chunk_index: u64, set: &ReplicaSet) -> pb::ChunkReplicaSet {
    pb::ChunkReplicaSet {
        volume_id: volume_id.to_string(),
        chunk_index,
        generation: set.generation,
        replicas: set
            .servers
            .iter()
            .map(|id| pb::Replica {
                server_id: id.clone(),
                address: state.servers.get(id).map(|s| s.address.clone()).unwrap_or_default(),
            })
            .collect(),
    }
}

pub fn attachment(a: &Attachment) -> pb::Attachment {
    pb::Attachment { volume_id: a.volume_id.clone(), node_id: a.node_id.clone(), epoch: a.epoch, readonly: a.readonly }
}

pub fn csi_node(n: &CsiNode) -> pb::CsiNode {
    pb::CsiNode {
        node_id: n.node_id.clone(),
        max_volumes: n.max_volumes,
        topology: n.topology.clone().into_iter().collect(),
        registered_at_ms: n.registered_at_ms,
    }
}
