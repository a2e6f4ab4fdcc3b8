//! The client API (`ballast.meta.v1.Meta`): writes go through the Raft log,
//! reads are linearizable. A member that is not the leader answers
//! UNAVAILABLE with the leader's address for the client to follow.

use std::future::Future;
use std::time::{Duration, Instant};

use ballast_proto::frame::Connector;
use ballast_proto::meta as pb;
use ballast_proto::meta::meta_server::Meta;
use ballast_tls::{CapabilityIssuer, Role};
use meta_client::{now_ms, EPHEMERAL_NODE};
use openraft::error::{ClientWriteError, RaftError};
use tonic::{Request, Response, Status};

use crate::access::{check_acting_as, check_node_owns};
use crate::capability;
use crate::convert;
use crate::error::{not_leader, MetaError};
use crate::fence;
use crate::metrics::REQUEST_LATENCY;
use crate::model::{HeldChunk, ReplicaSet, Snapshot};
use crate::modify::VolumeChange;
use crate::page::{page_size, paginate};
use crate::state::MetaState;
use crate::store::SharedState;
use crate::types::{Command, NodeId, Outcome, Raft};

#[derive(Clone)]
pub struct MetaService {
    raft: Raft,
    state: SharedState,
    /// How this member reaches chunk servers (to fence volumes).
    chunk_servers: Connector,
    /// How long the capabilities it issues are valid.
    capability_lifetime: Duration,
}

type Reply<T> = Result<Response<T>, Status>;

/// Turns an openraft error into a status, pointing at the leader if the
/// error says where it is.
pub fn raft_status<E>(err: RaftError<NodeId, E>) -> Status
where
    E: std::fmt::Debug
        + std::fmt::Display
        + openraft::TryAsRef<openraft::error::ForwardToLeader<NodeId, openraft::BasicNode>>,
{
    if let Some(forward) = err.forward_to_leader::<openraft::BasicNode>() {
        return not_leader(forward.leader_node.as_ref().map(|n| n.addr.as_str()));
    }
    match err {
        RaftError::Fatal(fatal) => Status::unavailable(format!("metadata member is shutting down: {fatal}")),
        RaftError::APIError(api) => Status::unavailable(api.to_string()),
    }
}

impl MetaService {
    pub fn new(raft: Raft, state: SharedState, chunk_servers: Connector, capability_lifetime: Duration) -> Self {
        Self { raft, state, chunk_servers, capability_lifetime }
    }

    /// A node caller acts only on its own inline ephemeral volumes (see
    /// [`check_node_owns`]); a volume that does not exist is left to the
    /// call to report.
    async fn check_node_owns<T>(&self, request: &Request<T>, volume_id: &str) -> Result<(), Status> {
        let is_node = request.extensions().get::<ballast_tls::Peer>().is_some_and(|p| p.identity.role == Role::Node);
        if !is_node {
            return Ok(());
        }
        let owner = self.read(|state| match state.volumes.get(volume_id) {
            Some(volume) => Ok(Some(volume.parameters.get(EPHEMERAL_NODE).cloned())),
            None => Ok(None),
        });
        match owner.await? {
            Some(owner) => check_node_owns(request, volume_id, owner.as_deref()),
            None => Ok(()),
        }
    }

    /// The cluster's capability key, created by the first caller that
    /// needs it (once: a concurrent proposal's key loses to the applied one).
    async fn capability_issuer(&self) -> Result<CapabilityIssuer, Status> {
        let mut pkcs8 = self.read_local(|state| Ok(state.capability_key.clone()))?;
        if pkcs8.is_empty() {
            let fresh = CapabilityIssuer::generate_key().map_err(|e| Status::internal(e.to_string()))?;
            pkcs8 = self.propose_for(Command::SetCapabilityKey { pkcs8: fresh }, Outcome::capability_key).await?;
        }
        CapabilityIssuer::from_pkcs8(&pkcs8).map_err(|e| Status::internal(e.to_string()))
    }

    /// Commits `command` and returns what applying it produced.
    async fn propose(&self, command: Command) -> Result<Outcome, Status> {
        let request = crate::types::Request { at_ms: now_ms(), command };
        match self.raft.client_write(request).await {
            Ok(written) => written.data.map_err(Status::from),
            Err(err) => Err(raft_status::<ClientWriteError<NodeId, openraft::BasicNode>>(err)),
        }
    }

    /// Proposes `command` and takes the outcome it must produce (`expected`
    /// is one of `Outcome`'s accessors); any other is an internal error.
    async fn propose_for<T>(&self, command: Command, expected: fn(Outcome) -> Result<T, String>) -> Result<T, Status> {
        expected(self.propose(command).await?).map_err(|found| unexpected(&found))
    }

    /// Runs `f` on state that reflects every write acknowledged before the call.
    async fn read<T>(&self, f: impl FnOnce(&MetaState) -> Result<T, MetaError>) -> Result<T, Status> {
        self.raft.ensure_linearizable().await.map_err(raft_status)?;
        self.read_local(f)
    }

    fn read_local<T>(&self, f: impl FnOnce(&MetaState) -> Result<T, MetaError>) -> Result<T, Status> {
        let applied = self.state.read().expect("state lock poisoned");
        f(&applied.state).map_err(Status::from)
    }

    /// Pushes `epoch` of `volume_id` to every chunk server (see
    /// [`crate::fence`]). A server that does not confirm it leaves the
    /// replica set of every chunk of the volume it holds, so that what it
    /// might still accept from the old writer is never read; if it holds
    /// the last replica of a chunk, the publish fails (UNAVAILABLE) and can
    /// be retried once the server is back. Then the members of each chunk
    /// are brought to agree on what the old writer left unflushed.
    async fn fence(&self, volume_id: &str, epoch: u64) -> Result<(), Status> {
        let data_id = self.fence_servers(volume_id, epoch).await?;
        let chunks = self.read_local(|state| {
            let address = |id: &String| state.servers.get(id).map(|s| (id.clone(), s.address.clone()));
            Ok(state
                .chunk_map(volume_id)
                .map(|map| {
                    map.iter()
                        .map(|(&chunk_index, set)| fence::ChunkMembers {
                            chunk_index,
                            generation: set.generation,
                            members: set.servers.iter().filter_map(address).collect(),
                        })
                        .collect::<Vec<_>>()
                })
                .unwrap_or_default())
        })?;
        let (copied, diverged) = fence::resync_unflushed(&self.chunk_servers, &chunks, data_id, epoch).await;
        if copied > 0 {
            tracing::info!(
                volume = volume_id,
                epoch,
                copied,
                "members agree again on what the old writer left unflushed"
            );
        }
        for d in diverged {
            tracing::warn!(volume = volume_id, chunk = d.chunk_index, server = %d.server_id, error = %d.error,
                "a member could not be resynced after the fence: it leaves the set");
            let command = Command::ReportFailedReplica {
                volume_id: volume_id.to_string(),
                chunk_index: d.chunk_index,
                server_id: d.server_id.clone(),
                generation: d.generation,
                writer_epoch: None,
            };
            self.propose(command).await?;
        }
        Ok(())
    }

    /// The fence itself; returns the volume's data id.
    async fn fence_servers(&self, volume_id: &str, epoch: u64) -> Result<u64, Status> {
        let (data_id, servers, held) = self.read_local(|state| {
            let volume =
                state.volumes.get(volume_id).ok_or_else(|| MetaError::not_found(format!("volume {volume_id}")))?;
            let servers: Vec<(String, String)> =
                state.servers.values().map(|s| (s.id.clone(), s.address.clone())).collect();
            let held: Vec<(u64, ReplicaSet)> = state
                .chunk_map(volume_id)
                .map(|m| m.iter().map(|(i, set)| (*i, set.clone())).collect())
                .unwrap_or_default();
            Ok((volume.data_id, servers, held))
        })?;
        for unfenced in fence::push_epoch(&self.chunk_servers, servers, data_id, epoch).await {
            let chunks: Vec<&(u64, ReplicaSet)> =
                held.iter().filter(|(_, set)| set.servers.contains(&unfenced.server_id)).collect();
            if chunks.is_empty() {
                tracing::warn!(volume = volume_id, server = %unfenced.server_id, error = %unfenced.error,
                    "could not fence a chunk server that holds none of the volume's chunks");
                continue;
            }
            tracing::warn!(volume = volume_id, server = %unfenced.server_id, error = %unfenced.error, chunks = chunks.len(),
                "could not fence a chunk server: it leaves the volume's replica sets");
            for (chunk_index, set) in chunks {
                let command = Command::ReportFailedReplica {
                    volume_id: volume_id.to_string(),
                    chunk_index: *chunk_index,
                    server_id: unfenced.server_id.clone(),
                    generation: set.generation,
                    writer_epoch: None,
                };
                self.propose(command).await.map_err(|status| {
                    Status::unavailable(format!(
                        "volume {volume_id} cannot be fenced: chunk server {} ({}) did not confirm epoch {epoch} and \
                         cannot leave the set of chunk {chunk_index}: {}; publish again when it is back",
                        unfenced.server_id,
                        unfenced.error,
                        status.message()
                    ))
                })?;
            }
        }
        Ok(data_id)
    }

    fn replica_reply(&self, outcome: Outcome) -> Reply<pb::ChunkReplicaSet> {
        match outcome {
            Outcome::ReplicaSet { volume_id, chunk_index, set } => self
                .read_local(|state| Ok(convert::replica_set(state, &volume_id, chunk_index, &set)))
                .map(Response::new),
            other => Err(unexpected(&format!("{other:?}"))),
        }
    }
}

impl MetaService {
    fn snapshot_reply(&self, snapshot: &Snapshot) -> Reply<pb::Snapshot> {
        self.read_local(|state| Ok(convert::snapshot(state, snapshot))).map(Response::new)
    }
}

fn unexpected(outcome: &dyn std::fmt::Display) -> Status {
    Status::internal(format!("state machine returned an unexpected outcome: {outcome}"))
}

/// Records the latency of one API call by method and result code.
async fn timed<T>(method: &'static str, call: impl Future<Output = Reply<T>>) -> Reply<T> {
    let started = Instant::now();
    let result = call.await;
    let code = match &result {
        Ok(_) => "OK".to_string(),
        Err(status) => format!("{:?}", status.code()),
    };
    REQUEST_LATENCY.with_label_values(&[method, &code]).observe(started.elapsed().as_secs_f64());
    result
}

fn required(field: &str, value: &str) -> Result<(), Status> {
    if value.is_empty() {
        return Err(Status::invalid_argument(format!("{field} is required")));
    }
    Ok(())
}

#[tonic::async_trait]
impl Meta for MetaService {
    async fn create_volume(&self, request: Request<pb::CreateVolumeRequest>) -> Reply<pb::Volume> {
        timed("CreateVolume", async {
            let owner = request.get_ref().parameters.get(EPHEMERAL_NODE).cloned();
            check_node_owns(&request, &request.get_ref().name, owner.as_deref())?;
            let r = request.into_inner();
            let command = Command::CreateVolume {
                name: r.name,
                size_bytes: r.size_bytes,
                replicas: r.replicas,
                chunk_size_bytes: r.chunk_size_bytes,
                parameters: r.parameters.into_iter().collect(),
                source: convert::source_from_pb(r.content_source),
                limits: convert::limits_from_pb(r.limits),
            };
            let v = self.propose_for(command, Outcome::volume).await?;
            Ok(Response::new(convert::volume(&v)))
        })
        .await
    }

    async fn delete_volume(&self, request: Request<pb::DeleteVolumeRequest>) -> Reply<pb::DeleteVolumeResponse> {
        timed("DeleteVolume", async {
            self.check_node_owns(&request, &request.get_ref().id).await?;
            let id = request.into_inner().id;
            required("volume id", &id)?;
            let existed = self.propose_for(Command::DeleteVolume { id }, Outcome::existed).await?;
            Ok(Response::new(pb::DeleteVolumeResponse { existed }))
        })
        .await
    }

    async fn get_volume(&self, request: Request<pb::GetVolumeRequest>) -> Reply<pb::Volume> {
        timed("GetVolume", async {
            let key =
                request.into_inner().key.ok_or_else(|| Status::invalid_argument("a volume id or name is required"))?;
            let volume = self
                .read(|state| {
                    let found = match &key {
                        pb::get_volume_request::Key::Id(id) => state.volumes.get(id),
                        pb::get_volume_request::Key::Name(name) => state.volume_by_name(name),
                    };
                    found.map(convert::volume).ok_or_else(|| MetaError::not_found(format!("volume {key:?}")))
                })
                .await?;
            Ok(Response::new(volume))
        })
        .await
    }

    async fn list_volumes(&self, request: Request<pb::ListVolumesRequest>) -> Reply<pb::ListVolumesResponse> {
        timed("ListVolumes", async {
            let r = request.into_inner();
            let size = page_size(r.page_size)?;
            let page = self.read(|state| paginate(&state.volumes, |_| true, &r.page_token, size)).await?;
            Ok(Response::new(pb::ListVolumesResponse {
                volumes: page.items.iter().map(convert::volume).collect(),
                next_page_token: page.next.unwrap_or_default(),
            }))
        })
        .await
    }

    async fn expand_volume(&self, request: Request<pb::ExpandVolumeRequest>) -> Reply<pb::Volume> {
        timed("ExpandVolume", async {
            let r = request.into_inner();
            required("volume id", &r.id)?;
            let v =
                self.propose_for(Command::ExpandVolume { id: r.id, size_bytes: r.size_bytes }, Outcome::volume).await?;
            Ok(Response::new(convert::volume(&v)))
        })
        .await
    }

    async fn modify_volume(&self, request: Request<pb::ModifyVolumeRequest>) -> Reply<pb::Volume> {
        timed("ModifyVolume", async {
            let r = request.into_inner();
            required("volume id", &r.id)?;
            let change =
                VolumeChange { replicas: r.replicas, max_iops: r.max_iops, max_bandwidth_bytes: r.max_bandwidth_bytes };
            let v = self.propose_for(Command::ModifyVolume { id: r.id, change }, Outcome::volume).await?;
            Ok(Response::new(convert::volume(&v)))
        })
        .await
    }

    async fn create_snapshot(&self, request: Request<pb::CreateSnapshotRequest>) -> Reply<pb::Snapshot> {
        timed("CreateSnapshot", async {
            let r = request.into_inner();
            let group_id = (!r.group_id.is_empty()).then_some(r.group_id);
            let command = Command::CreateSnapshot { name: r.name, source_volume_id: r.source_volume_id, group_id };
            let s = self.propose_for(command, Outcome::snapshot).await?;
            self.snapshot_reply(&s)
        })
        .await
    }

    async fn delete_snapshot(&self, request: Request<pb::DeleteSnapshotRequest>) -> Reply<pb::DeleteSnapshotResponse> {
        timed("DeleteSnapshot", async {
            let id = request.into_inner().id;
            required("snapshot id", &id)?;
            let existed = self.propose_for(Command::DeleteSnapshot { id }, Outcome::existed).await?;
            Ok(Response::new(pb::DeleteSnapshotResponse { existed }))
        })
        .await
    }

    async fn create_group_snapshot(
        &self,
        request: Request<pb::CreateGroupSnapshotRequest>,
    ) -> Reply<pb::GroupSnapshot> {
        timed("CreateGroupSnapshot", async {
            let r = request.into_inner();
            let command = Command::CreateGroupSnapshot { name: r.name, source_volume_ids: r.source_volume_ids };
            let g = self.propose_for(command, Outcome::group_snapshot).await?;
            self.read_local(|state| Ok(convert::group_snapshot(state, &g))).map(Response::new)
        })
        .await
    }

    async fn delete_group_snapshot(
        &self,
        request: Request<pb::DeleteGroupSnapshotRequest>,
    ) -> Reply<pb::DeleteGroupSnapshotResponse> {
        timed("DeleteGroupSnapshot", async {
            let id = request.into_inner().id;
            required("group snapshot id", &id)?;
            let existed = self.propose_for(Command::DeleteGroupSnapshot { id }, Outcome::existed).await?;
            Ok(Response::new(pb::DeleteGroupSnapshotResponse { existed }))
        })
        .await
    }

    async fn get_group_snapshot(&self, request: Request<pb::GetGroupSnapshotRequest>) -> Reply<pb::GroupSnapshot> {
        timed("GetGroupSnapshot", async {
            let id = request.into_inner().id;
            required("group snapshot id", &id)?;
            let group = self
                .read(|state| {
                    let group =
                        state.groups.get(&id).ok_or_else(|| MetaError::not_found(format!("group snapshot {id}")))?;
                    Ok(convert::group_snapshot(state, group))
                })
                .await?;
            Ok(Response::new(group))
        })
        .await
    }

    async fn list_snapshots(&self, request: Request<pb::ListSnapshotsRequest>) -> Reply<pb::ListSnapshotsResponse> {
        timed("ListSnapshots", async {
            let r = request.into_inner();
            let size = page_size(r.page_size)?;
            let (snapshots, next) = self
                .read(|state| {
                    let keep = |s: &Snapshot| {
                        (r.snapshot_id.is_empty() || s.id == r.snapshot_id)
                            && (r.source_volume_id.is_empty() || s.source_volume_id == r.source_volume_id)
                    };
                    let page = paginate(&state.snapshots, keep, &r.page_token, size)?;
                    Ok((page.items.iter().map(|s| convert::snapshot(state, s)).collect(), page.next))
                })
                .await?;
            Ok(Response::new(pb::ListSnapshotsResponse { snapshots, next_page_token: next.unwrap_or_default() }))
        })
        .await
    }

    async fn complete_snapshot(&self, request: Request<pb::CompleteSnapshotRequest>) -> Reply<pb::Snapshot> {
        timed("CompleteSnapshot", async {
            let r = request.into_inner();
            required("snapshot id", &r.snapshot_id)?;
            let chunks = r.chunks.into_iter().map(|c| (c.chunk_index, c.server_ids)).collect();
            let s =
                self.propose_for(Command::CompleteSnapshot { id: r.snapshot_id, chunks }, Outcome::snapshot).await?;
            self.snapshot_reply(&s)
        })
        .await
    }

    async fn mark_volume_ready(&self, request: Request<pb::MarkVolumeReadyRequest>) -> Reply<pb::Volume> {
        timed("MarkVolumeReady", async {
            let id = request.into_inner().id;
            required("volume id", &id)?;
            let v = self.propose_for(Command::MarkVolumeReady { id }, Outcome::volume).await?;
            Ok(Response::new(convert::volume(&v)))
        })
        .await
    }

    async fn register_chunk_server(&self, request: Request<pb::RegisterChunkServerRequest>) -> Reply<pb::ChunkServer> {
        timed("RegisterChunkServer", async {
            check_acting_as(&request, Role::Storage, &request.get_ref().id)?;
            let r = request.into_inner();
            // The first registration names the cluster (once: a concurrent
            // proposal's id loses and the applied one is returned).
            let mut cluster_id = self.read(|state| Ok(state.cluster_id.clone())).await?;
            if cluster_id.is_empty() {
                let id = format!("{:016x}{:016x}", rand::random::<u64>(), rand::random::<u64>());
                cluster_id = self.propose_for(Command::SetClusterId { id }, Outcome::cluster_id).await?;
            }
            let command = Command::RegisterChunkServer {
                id: r.id,
                address: r.address,
                capacity_bytes: r.capacity_bytes,
                labels: r.labels.into_iter().collect(),
                cluster_id: r.cluster_id,
            };
            let s = self.propose_for(command, Outcome::chunk_server).await?;
            Ok(Response::new(convert::chunk_server(&s, &cluster_id)))
        })
        .await
    }

    async fn heartbeat(&self, request: Request<pb::HeartbeatRequest>) -> Reply<pb::HeartbeatResponse> {
        timed("Heartbeat", async {
            check_acting_as(&request, Role::Storage, &request.get_ref().server_id)?;
            let r = request.into_inner();
            required("server id", &r.server_id)?;
            let held = r.reports_chunks.then(|| {
                r.chunks
                    .iter()
                    .map(|c| HeldChunk { data_id: c.data_id, chunk_index: c.chunk_index, generation: c.generation })
                    .collect()
            });
            let command = Command::Heartbeat {
                server_id: r.server_id,
                used_bytes: r.used_bytes,
                capacity_bytes: r.capacity_bytes,
                held,
                cluster_id: r.cluster_id,
            };
            let orphaned = self.propose_for(command, Outcome::orphaned).await?;
            let capability_key = self.capability_issuer().await?.public_key();
            let orphaned = orphaned
                .into_iter()
                .map(|c| pb::HeldChunk { data_id: c.data_id, chunk_index: c.chunk_index, generation: c.generation })
                .collect();
            Ok(Response::new(pb::HeartbeatResponse { capability_key, orphaned }))
        })
        .await
    }

    async fn list_chunk_servers(
        &self,
        _request: Request<pb::ListChunkServersRequest>,
    ) -> Reply<pb::ListChunkServersResponse> {
        timed("ListChunkServers", async {
            let servers = self
                .read(|state| Ok(state.servers.values().map(|s| convert::chunk_server(s, &state.cluster_id)).collect()))
                .await?;
            Ok(Response::new(pb::ListChunkServersResponse { servers }))
        })
        .await
    }

    async fn set_draining(&self, request: Request<pb::SetDrainingRequest>) -> Reply<pb::ChunkServer> {
        timed("SetDraining", async {
            let r = request.into_inner();
            required("server id", &r.server_id)?;
            let s = self
                .propose_for(
                    Command::SetDraining { server_id: r.server_id, draining: r.draining },
                    Outcome::chunk_server,
                )
                .await?;
            let cluster_id = self.read_local(|state| Ok(state.cluster_id.clone()))?;
            Ok(Response::new(convert::chunk_server(&s, &cluster_id)))
        })
        .await
    }

    async fn allocate_chunk(&self, request: Request<pb::AllocateChunkRequest>) -> Reply<pb::ChunkReplicaSet> {
        timed("AllocateChunk", async {
            let r = request.into_inner();
            required("volume id", &r.volume_id)?;
            let outcome = self
                .propose(Command::AllocateChunk {
                    volume_id: r.volume_id,
                    chunk_index: r.chunk_index,
                    writer_epoch: Some(r.epoch),
                })
                .await?;
            self.replica_reply(outcome)
        })
        .await
    }

    async fn get_chunk_map(&self, request: Request<pb::GetChunkMapRequest>) -> Reply<pb::ChunkMap> {
        timed("GetChunkMap", async {
            let volume_id = request.into_inner().volume_id;
            required("volume id", &volume_id)?;
            let map = self
                .read(|state| {
                    if !state.volumes.contains_key(&volume_id) {
                        return Err(MetaError::not_found(format!("volume {volume_id}")));
                    }
                    let chunks = state
                        .chunk_map(&volume_id)
                        .map(|m| m.iter().map(|(i, set)| convert::replica_set(state, &volume_id, *i, set)).collect())
                        .unwrap_or_default();
                    Ok(pb::ChunkMap { volume_id: volume_id.clone(), chunks })
                })
                .await?;
            Ok(Response::new(map))
        })
        .await
    }

    async fn report_failed_replica(
        &self,
        request: Request<pb::ReportFailedReplicaRequest>,
    ) -> Reply<pb::ChunkReplicaSet> {
        timed("ReportFailedReplica", async {
            let r = request.into_inner();
            required("volume id", &r.volume_id)?;
            required("server id", &r.server_id)?;
            let outcome = self
                .propose(Command::ReportFailedReplica {
                    volume_id: r.volume_id,
                    chunk_index: r.chunk_index,
                    server_id: r.server_id,
                    generation: r.generation,
                    writer_epoch: Some(r.epoch),
                })
                .await?;
            self.replica_reply(outcome)
        })
        .await
    }

    async fn publish_volume(&self, request: Request<pb::PublishVolumeRequest>) -> Reply<pb::Attachment> {
        timed("PublishVolume", async {
            check_acting_as(&request, Role::Node, &request.get_ref().node_id)?;
            self.check_node_owns(&request, &request.get_ref().volume_id).await?;
            let r = request.into_inner();
            let command = Command::Publish { volume_id: r.volume_id, node_id: r.node_id, readonly: r.readonly };
            let a = self.propose_for(command, Outcome::attachment).await?;
            // Repeated publishes (the same epoch) fence again: the
            // first may have failed halfway.
            self.fence(&a.volume_id, a.epoch).await?;
            Ok(Response::new(convert::attachment(&a)))
        })
        .await
    }

    async fn unpublish_volume(
        &self,
        request: Request<pb::UnpublishVolumeRequest>,
    ) -> Reply<pb::UnpublishVolumeResponse> {
        timed("UnpublishVolume", async {
            check_acting_as(&request, Role::Node, &request.get_ref().node_id)?;
            let r = request.into_inner();
            let existed = self
                .propose_for(Command::Unpublish { volume_id: r.volume_id, node_id: r.node_id }, Outcome::existed)
                .await?;
            Ok(Response::new(pb::UnpublishVolumeResponse { existed }))
        })
        .await
    }

    async fn issue_capability(&self, request: Request<pb::IssueCapabilityRequest>) -> Reply<pb::VolumeCapability> {
        timed("IssueCapability", async {
            check_acting_as(&request, Role::Node, &request.get_ref().node_id)?;
            let r = request.into_inner();
            required("volume id", &r.volume_id)?;
            required("node id", &r.node_id)?;
            let issuer = self.capability_issuer().await?;
            let lifetime = self.capability_lifetime;
            let issued = self
                .read(|state| capability::issue(state, &issuer, &r.volume_id, &r.node_id, now_ms(), lifetime))
                .await?;
            Ok(Response::new(issued))
        })
        .await
    }

    async fn register_node(&self, request: Request<pb::RegisterNodeRequest>) -> Reply<pb::CsiNode> {
        timed("RegisterNode", async {
            check_acting_as(&request, Role::Node, &request.get_ref().node_id)?;
            let r = request.into_inner();
            required("node id", &r.node_id)?;
            let command = Command::RegisterNode {
                node_id: r.node_id,
                max_volumes: r.max_volumes,
                topology: r.topology.into_iter().collect(),
            };
            let n = self.propose_for(command, Outcome::node).await?;
            Ok(Response::new(convert::csi_node(&n)))
        })
        .await
    }

    async fn get_node(&self, request: Request<pb::GetNodeRequest>) -> Reply<pb::CsiNode> {
        timed("GetNode", async {
            let node_id = request.into_inner().node_id;
            required("node id", &node_id)?;
            let node = self
                .read(|state| {
                    state.nodes.get(&node_id).map(convert::csi_node).ok_or_else(|| {
                        MetaError::not_found(format!("node {node_id} (no CSI node plugin registered it)"))
                    })
                })
                .await?;
            Ok(Response::new(node))
        })
        .await
    }

    async fn list_attachments(
        &self,
        request: Request<pb::ListAttachmentsRequest>,
    ) -> Reply<pb::ListAttachmentsResponse> {
        timed("ListAttachments", async {
            let volume_id = request.into_inner().volume_id;
            let attachments = self
                .read(|state| {
                    // No volume id: every attachment of the cluster.
                    if volume_id.is_empty() {
                        return Ok(state
                            .attachments
                            .values()
                            .flat_map(|n| n.values())
                            .map(convert::attachment)
                            .collect());
                    }
                    if !state.volumes.contains_key(&volume_id) {
                        return Err(MetaError::not_found(format!("volume {volume_id}")));
                    }
                    Ok(state.attachments_of(&volume_id).iter().map(convert::attachment).collect())
                })
                .await?;
            Ok(Response::new(pb::ListAttachmentsResponse { attachments }))
        })
        .await
    }
}
