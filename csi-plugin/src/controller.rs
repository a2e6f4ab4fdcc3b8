//! The CSI Controller service: volumes, attachments and snapshots as
//! entries in the metadata service. Nothing here touches data: a volume is
//! thin, its chunks are placed on first write by the node's volume engine.
//!
//! The metadata service already has CSI's semantics (idempotency by name,
//! AlreadyExists for an incompatible repeat, FailedPrecondition for
//! deleting a published volume, one writer node per volume), so most calls
//! validate, map and pass its answer through.

use std::collections::{BTreeMap, HashMap, HashSet};

use ballast_proto::csi;
use ballast_proto::csi::controller_server::Controller;
use ballast_proto::csi::controller_service_capability::rpc::Type as RpcType;
use ballast_proto::meta as pb;
use futures::{StreamExt, TryStreamExt};
use meta_client::MetaClient;
use tonic::{Request, Response, Status};

use ballast_proto::volume::{MAX_PAGE_SIZE, PAGE_TOKEN_PREFIX};

use crate::capability::{self, Checked};
use crate::error::{found, CsiError, Result};
use crate::health;
use crate::inflight::InFlight;
use crate::metrics::observe;
use crate::params::{self, MutableParams, Segments, VolumeParams};

/// The capabilities this controller implements, and nothing else.
pub const CAPABILITIES: [RpcType; 17] = [
    RpcType::CreateDeleteVolume,
    RpcType::PublishUnpublishVolume,
    // ControllerPublishVolume honours `readonly`.
    RpcType::PublishReadonly,
    RpcType::ListVolumes,
    RpcType::ListVolumesPublishedNodes,
    RpcType::GetCapacity,
    RpcType::CreateDeleteSnapshot,
    RpcType::ListSnapshots,
    RpcType::GetSnapshot,
    RpcType::CloneVolume,
    RpcType::ExpandVolume,
    RpcType::GetVolume,
    RpcType::VolumeCondition,
    RpcType::SingleNodeMultiWriter,
    // Replica count and I/O limits (VolumeAttributesClass).
    RpcType::ModifyVolume,
    RpcType::GetVolumeHealth,
    RpcType::ListVolumeHealth,
];

/// Volumes whose attachments and chunk maps are fetched at once in a listing.
const LIST_CONCURRENCY: usize = 16;

pub struct ControllerService {
    meta: MetaClient,
    topology: Segments,
    /// The one node this plugin serves in `all` mode. Publishing to any
    /// other node is then NotFound. In `controller` mode the metadata
    /// service keeps no node registry yet, so every node id is accepted.
    local_node: Option<String>,
    inflight: InFlight,
}

impl ControllerService {
    pub fn new(meta: MetaClient, topology: Segments, local_node: Option<String>, inflight: InFlight) -> Self {
        Self { meta, topology, local_node, inflight }
    }

    fn accessible_topology(&self) -> Vec<csi::Topology> {
        if self.topology.is_empty() {
            return Vec::new();
        }
        vec![csi::Topology { segments: self.topology.clone().into_iter().collect() }]
    }

    /// Every Ballast volume is reachable from every node of the cluster the
    /// plugin serves, which the configured labels name: a requirement is
    /// met when one of its requisite segments does not contradict them.
    fn check_topology(&self, requirement: Option<&csi::TopologyRequirement>) -> Result<()> {
        let Some(requirement) = requirement else { return Ok(()) };
        if self.topology.is_empty() || requirement.requisite.is_empty() {
            return Ok(());
        }
        if requirement.requisite.iter().any(|t| params::segments_compatible(&self.topology, &t.segments)) {
            return Ok(());
        }
        Err(CsiError::ResourceExhausted(format!(
            "no requisite topology matches this storage cluster's labels {:?}",
            self.topology
        )))
    }

    fn volume_response(&self, volume: &pb::Volume) -> csi::Volume {
        let mut context = HashMap::new();
        context.insert(params::REPLICAS.to_string(), volume.replicas.to_string());
        context.insert(params::CHUNK_SIZE_MIB.to_string(), (volume.chunk_size_bytes >> 20).to_string());
        for key in [params::FS_TYPE, params::ENCRYPTED] {
            if let Some(value) = volume.parameters.get(key) {
                context.insert(key.to_string(), value.clone());
            }
        }
        csi::Volume {
            capacity_bytes: volume.size_bytes as i64,
            volume_id: volume.id.clone(),
            volume_context: context,
            content_source: volume.content_source.as_ref().and_then(csi_source),
            accessible_topology: self.accessible_topology(),
        }
    }

    async fn source_size(&self, source: &pb::ContentSource) -> Result<u64> {
        match &source.source {
            Some(pb::content_source::Source::SnapshotId(id)) => {
                let snapshot = self
                    .find_snapshot(id)
                    .await?
                    .ok_or_else(|| CsiError::not_found(format!("source snapshot {id} does not exist")))?;
                Ok(snapshot.size_bytes)
            }
            Some(pb::content_source::Source::VolumeId(id)) => {
                let volume = found(self.meta.get_volume(by_id(id)).await)?
                    .ok_or_else(|| CsiError::not_found(format!("source volume {id} does not exist")))?;
                Ok(volume.size_bytes)
            }
            None => Err(CsiError::invalid("volume_content_source names no snapshot or volume")),
        }
    }

    async fn find_snapshot(&self, id: &str) -> Result<Option<pb::Snapshot>> {
        let list =
            self.meta.list_snapshots(pb::ListSnapshotsRequest { snapshot_id: id.into(), ..Default::default() }).await?;
        Ok(list.snapshots.into_iter().next())
    }

    async fn get_snapshot(&self, id: &str) -> Result<csi::GetSnapshotResponse> {
        if id.is_empty() {
            return Err(CsiError::Missing("snapshot_id"));
        }
        let snapshot = self
            .find_snapshot(id)
            .await?
            .ok_or_else(|| CsiError::not_found(format!("snapshot {id} does not exist")))?;
        Ok(csi::GetSnapshotResponse { snapshot: Some(csi_snapshot(&snapshot)) })
    }

    async fn get_volume(&self, id: &str) -> Result<pb::Volume> {
        found(self.meta.get_volume(by_id(id)).await)?
            .ok_or_else(|| CsiError::not_found(format!("volume {id} does not exist")))
    }

    /// Node ids the volume is published to; none when it vanished meanwhile.
    async fn published_nodes(&self, volume_id: &str) -> Result<Vec<String>> {
        let list = found(self.meta.list_attachments(pb::ListAttachmentsRequest { volume_id: volume_id.into() }).await)?;
        Ok(list.map(|l| l.attachments.into_iter().map(|a| a.node_id).collect()).unwrap_or_default())
    }

    async fn volume_status(
        &self,
        volume: &pb::Volume,
        live: &HashSet<String>,
    ) -> Result<(Vec<String>, csi::VolumeCondition)> {
        let nodes = self.published_nodes(&volume.id).await?;
        let condition = match health::census(&self.meta, volume, live).await {
            Err(CsiError::Meta(status)) if status.code() == tonic::Code::NotFound => {
                csi::VolumeCondition { abnormal: true, message: "the volume was deleted while being listed".into() }
            }
            other => other?.condition(),
        };
        Ok((nodes, condition))
    }

    async fn volume_health(&self, volume: &pb::Volume, live: &HashSet<String>) -> Result<csi::VolumeHealth> {
        match health::census(&self.meta, volume, live).await {
            Err(CsiError::Meta(status)) if status.code() == tonic::Code::NotFound => {
                Ok(health::deleted_meanwhile(&volume.id))
            }
            other => Ok(other?.health(&volume.id)),
        }
    }

    /// One page of volumes (`max_entries` 0: all of them) and the token of
    /// the next.
    async fn volume_page(&self, max_entries: i32, starting_token: &str) -> Result<(Vec<pb::Volume>, String)> {
        let limit = page_limit(max_entries)?;
        check_token(starting_token, "vol-")?;
        let mut volumes = Vec::new();
        let mut token = starting_token.to_string();
        let next_token = loop {
            let page_size = limit.map_or(MAX_PAGE_SIZE, |l| l.min(MAX_PAGE_SIZE));
            let page = self.meta.list_volumes(pb::ListVolumesRequest { page_size, page_token: token }).await?;
            volumes.extend(page.volumes);
            // With max_entries set, one page; without, everything.
            if limit.is_some() || page.next_page_token.is_empty() {
                break page.next_page_token;
            }
            token = page.next_page_token;
        };
        Ok((volumes, next_token))
    }

    async fn create_volume(&self, req: csi::CreateVolumeRequest) -> Result<csi::CreateVolumeResponse> {
        if req.name.is_empty() {
            return Err(CsiError::Missing("name"));
        }
        let caps = capability::check_all(&req.volume_capabilities)?;
        let mut volume_params = VolumeParams::parse(&req.parameters, &[])?;
        let mutable = MutableParams::parse(&req.mutable_parameters)?;
        volume_params.replicas = mutable.replicas.unwrap_or(volume_params.replicas);
        let fs = capability::filesystem(&caps, volume_params.fs_type)?;
        self.check_topology(req.accessibility_requirements.as_ref())?;
        let source = req.volume_content_source.as_ref().map(meta_source).transpose()?;
        let _guard = self.inflight.claim(format!("volume-name/{}", req.name))?;

        let source_size = match &source {
            Some(source) => Some(self.source_size(source).await?),
            None => None,
        };
        let size = params::size_for(req.capacity_range.as_ref(), source_size)?;
        let mut stored: BTreeMap<String, String> = volume_params.labels.clone();
        if let Some(fs) = fs {
            stored.insert(params::FS_TYPE.into(), fs.to_string());
        }
        if volume_params.encrypted {
            stored.insert(params::ENCRYPTED.into(), "true".into());
        }

        let existing = found(
            self.meta
                .get_volume(pb::GetVolumeRequest { key: Some(pb::get_volume_request::Key::Name(req.name.clone())) })
                .await,
        )?;
        if let Some(existing) = existing {
            let stored_existing: BTreeMap<String, String> = existing.parameters.clone().into_iter().collect();
            let compatible = params::size_fits(existing.size_bytes, req.capacity_range.as_ref())
                && existing.replicas == volume_params.replicas
                && existing.chunk_size_bytes == volume_params.chunk_size_bytes
                && stored_existing == stored
                && existing.content_source == source
                && existing.limits.unwrap_or_default() == mutable.limits();
            if !compatible {
                return Err(CsiError::AlreadyExists(format!(
                    "volume {:?} exists as {} ({} bytes, {} replicas) with a different size, parameters or source",
                    req.name, existing.id, existing.size_bytes, existing.replicas
                )));
            }
            // A retry after an interrupted copy from the source copies again.
            let existing = volume_engine::snapshot::populate(&self.meta, &existing).await?;
            return Ok(csi::CreateVolumeResponse { volume: Some(self.volume_response(&existing)) });
        }

        let created = self
            .meta
            .create_volume(pb::CreateVolumeRequest {
                name: req.name.clone(),
                size_bytes: size,
                replicas: volume_params.replicas,
                chunk_size_bytes: volume_params.chunk_size_bytes,
                parameters: stored.into_iter().collect(),
                content_source: source,
                limits: Some(mutable.limits()),
            })
            .await?;
        tracing::info!(id = %created.id, size, replicas = created.replicas, "volume created");
        let created = volume_engine::snapshot::populate(&self.meta, &created).await?;
        Ok(csi::CreateVolumeResponse { volume: Some(self.volume_response(&created)) })
    }

    async fn delete_volume(&self, req: csi::DeleteVolumeRequest) -> Result<csi::DeleteVolumeResponse> {
        if req.volume_id.is_empty() {
            return Err(CsiError::Missing("volume_id"));
        }
        let _guard = self.inflight.claim(req.volume_id.clone())?;
        let reply = self.meta.delete_volume(pb::DeleteVolumeRequest { id: req.volume_id.clone() }).await?;
        if !reply.existed {
            tracing::info!("volume did not exist");
        }
        Ok(csi::DeleteVolumeResponse {})
    }

    async fn publish(&self, req: csi::ControllerPublishVolumeRequest) -> Result<csi::ControllerPublishVolumeResponse> {
        if req.volume_id.is_empty() {
            return Err(CsiError::Missing("volume_id"));
        }
        if req.node_id.is_empty() {
            return Err(CsiError::Missing("node_id"));
        }
        let cap = capability::check(req.volume_capability.as_ref().ok_or(CsiError::Missing("volume_capability"))?)?;
        let readonly = req.readonly || cap.read_only_mode();
        let _guard = self.inflight.claim(req.volume_id.clone())?;
        match &self.local_node {
            Some(local) if *local != req.node_id => {
                // Check the volume first: an unknown volume is NotFound too,
                // but should say so.
                self.get_volume(&req.volume_id).await?;
                return Err(CsiError::not_found(format!("node {} is not served by this plugin", req.node_id)));
            }
            Some(_) => {}
            None => {
                self.get_volume(&req.volume_id).await?;
                let node = pb::GetNodeRequest { node_id: req.node_id.clone() };
                if found(self.meta.get_node(node).await)?.is_none() {
                    return Err(CsiError::not_found(format!(
                        "node {} is unknown: no Ballast node plugin registered it",
                        req.node_id
                    )));
                }
            }
        }
        let attachment = self
            .meta
            .publish_volume(pb::PublishVolumeRequest {
                volume_id: req.volume_id.clone(),
                node_id: req.node_id.clone(),
                readonly,
            })
            .await?;
        tracing::info!(node = %req.node_id, epoch = attachment.epoch, readonly, "published");
        let context = HashMap::from([
            (params::CTX_EPOCH.to_string(), attachment.epoch.to_string()),
            (params::CTX_VOLUME_ID.to_string(), attachment.volume_id),
            (params::CTX_READONLY.to_string(), attachment.readonly.to_string()),
        ]);
        Ok(csi::ControllerPublishVolumeResponse { publish_context: context })
    }

    async fn unpublish(
        &self,
        req: csi::ControllerUnpublishVolumeRequest,
    ) -> Result<csi::ControllerUnpublishVolumeResponse> {
        if req.volume_id.is_empty() {
            return Err(CsiError::Missing("volume_id"));
        }
        let _guard = self.inflight.claim(req.volume_id.clone())?;
        // No node: unpublish from every node.
        let nodes = if req.node_id.is_empty() {
            self.published_nodes(&req.volume_id).await?
        } else {
            vec![req.node_id.clone()]
        };
        for node_id in nodes {
            let reply = self
                .meta
                .unpublish_volume(pb::UnpublishVolumeRequest {
                    volume_id: req.volume_id.clone(),
                    node_id: node_id.clone(),
                })
                .await?;
            tracing::info!(node = %node_id, existed = reply.existed, "unpublished");
        }
        Ok(csi::ControllerUnpublishVolumeResponse {})
    }

    async fn validate(
        &self,
        req: csi::ValidateVolumeCapabilitiesRequest,
    ) -> Result<csi::ValidateVolumeCapabilitiesResponse> {
        if req.volume_id.is_empty() {
            return Err(CsiError::Missing("volume_id"));
        }
        if req.volume_capabilities.is_empty() {
            return Err(CsiError::Missing("volume_capabilities"));
        }
        let volume = self.get_volume(&req.volume_id).await?;
        let refuse = |message: String| Ok(csi::ValidateVolumeCapabilitiesResponse { confirmed: None, message });
        let caps = match capability::check_all(&req.volume_capabilities) {
            Ok(caps) => caps,
            Err(err) => return refuse(err.to_string()),
        };
        let stored_fs = volume.parameters.get(params::FS_TYPE).map(String::as_str);
        for cap in &caps {
            if let capability::Access::Mount { fs_type: Some(fs), .. } = &cap.access {
                if stored_fs.is_some_and(|stored| stored != fs.as_str()) {
                    return refuse(format!("volume was created with {}, not {fs}", stored_fs.unwrap_or_default()));
                }
            }
        }
        if let Err(err) = MutableParams::parse(&req.mutable_parameters) {
            return refuse(err.to_string());
        }
        match VolumeParams::parse(&req.parameters, &[]) {
            Ok(p)
                if !req.parameters.is_empty()
                    && (p.replicas != volume.replicas || p.chunk_size_bytes != volume.chunk_size_bytes) =>
            {
                return refuse("the parameters ask for a different replica count or chunk size".into());
            }
            Ok(_) => {}
            Err(err) => return refuse(err.to_string()),
        }
        Ok(csi::ValidateVolumeCapabilitiesResponse {
            confirmed: Some(csi::validate_volume_capabilities_response::Confirmed {
                volume_context: req.volume_context,
                volume_capabilities: req.volume_capabilities,
                parameters: req.parameters,
                mutable_parameters: req.mutable_parameters,
            }),
            message: String::new(),
        })
    }

    async fn list_volumes(&self, req: csi::ListVolumesRequest) -> Result<csi::ListVolumesResponse> {
        let (volumes, next_token) = self.volume_page(req.max_entries, &req.starting_token).await?;
        let live = health::live_servers(&self.meta).await?;
        let entries = futures::stream::iter(volumes)
            .map(|volume| {
                let live = &live;
                async move {
                    let (nodes, condition) = self.volume_status(&volume, live).await?;
                    Ok::<_, CsiError>(csi::list_volumes_response::Entry {
                        volume: Some(self.volume_response(&volume)),
                        status: Some(csi::list_volumes_response::VolumeStatus {
                            published_node_ids: nodes,
                            volume_condition: Some(condition),
                        }),
                    })
                }
            })
            .buffered(LIST_CONCURRENCY)
            .try_collect()
            .await?;
        Ok(csi::ListVolumesResponse { entries, next_token })
    }

    async fn get_capacity(&self, req: csi::GetCapacityRequest) -> Result<csi::GetCapacityResponse> {
        let volume_params = VolumeParams::parse(&req.parameters, &[])?;
        let mut available = 0;
        let supported = req.volume_capabilities.iter().all(|c| capability::check(c).is_ok());
        let reachable = req
            .accessible_topology
            .as_ref()
            .is_none_or(|t| self.topology.is_empty() || params::segments_compatible(&self.topology, &t.segments));
        if supported && reachable {
            let servers = self.meta.list_chunk_servers(pb::ListChunkServersRequest {}).await?;
            let chunk = volume_params.chunk_size_bytes;
            let free_chunks: Vec<u64> = servers
                .servers
                .iter()
                .filter(|s| s.alive && !s.draining)
                .map(|s| s.capacity_bytes.saturating_sub(s.used_bytes.max(s.allocated_bytes)) / chunk)
                .collect();
            available = placeable_chunks(&free_chunks, volume_params.replicas as u64).saturating_mul(chunk);
        }
        Ok(csi::GetCapacityResponse {
            available_capacity: available.min(i64::MAX as u64) as i64,
            // Volumes are thin: any size up to the limit can be created,
            // and only written chunks take space.
            maximum_volume_size: Some(params::MAX_VOLUME_SIZE as i64),
            minimum_volume_size: Some(params::MIN_VOLUME_SIZE as i64),
        })
    }

    async fn create_snapshot(&self, req: csi::CreateSnapshotRequest) -> Result<csi::CreateSnapshotResponse> {
        if req.name.is_empty() {
            return Err(CsiError::Missing("name"));
        }
        if req.source_volume_id.is_empty() {
            return Err(CsiError::Missing("source_volume_id"));
        }
        params::reject_snapshot_parameters(&req.parameters, "snapshot")?;
        let _guard = self.inflight.claim(format!("snapshot-name/{}", req.name))?;
        let snapshot = self
            .meta
            .create_snapshot(pb::CreateSnapshotRequest {
                name: req.name,
                source_volume_id: req.source_volume_id,
                ..Default::default()
            })
            .await?;
        // Copies the data (again, if an earlier attempt was interrupted).
        let snapshot = volume_engine::snapshot::take(&self.meta, &snapshot).await?;
        tracing::info!(id = %snapshot.id, "snapshot created");
        Ok(csi::CreateSnapshotResponse { snapshot: Some(csi_snapshot(&snapshot)) })
    }

    async fn delete_snapshot(&self, req: csi::DeleteSnapshotRequest) -> Result<csi::DeleteSnapshotResponse> {
        if req.snapshot_id.is_empty() {
            return Err(CsiError::Missing("snapshot_id"));
        }
        let _guard = self.inflight.claim(req.snapshot_id.clone())?;
        let reply = self.meta.delete_snapshot(pb::DeleteSnapshotRequest { id: req.snapshot_id }).await?;
        if !reply.existed {
            tracing::info!("snapshot did not exist");
        }
        Ok(csi::DeleteSnapshotResponse {})
    }

    async fn list_snapshots(&self, req: csi::ListSnapshotsRequest) -> Result<csi::ListSnapshotsResponse> {
        let limit = page_limit(req.max_entries)?;
        check_token(&req.starting_token, "snap-")?;
        let mut snapshots = Vec::new();
        let mut token = req.starting_token.clone();
        let next_token = loop {
            let page_size = limit.map_or(MAX_PAGE_SIZE, |l| l.min(MAX_PAGE_SIZE));
            let page = self
                .meta
                .list_snapshots(pb::ListSnapshotsRequest {
                    source_volume_id: req.source_volume_id.clone(),
                    snapshot_id: req.snapshot_id.clone(),
                    page_size,
                    page_token: token,
                })
                .await?;
            snapshots.extend(page.snapshots);
            if limit.is_some() || page.next_page_token.is_empty() {
                break page.next_page_token;
            }
            token = page.next_page_token;
        };
        let entries =
            snapshots.iter().map(|s| csi::list_snapshots_response::Entry { snapshot: Some(csi_snapshot(s)) }).collect();
        Ok(csi::ListSnapshotsResponse { entries, next_token })
    }

    async fn expand(&self, req: csi::ControllerExpandVolumeRequest) -> Result<csi::ControllerExpandVolumeResponse> {
        if req.volume_id.is_empty() {
            return Err(CsiError::Missing("volume_id"));
        }
        let range = req.capacity_range.as_ref().ok_or(CsiError::Missing("capacity_range"))?;
        let cap: Option<Checked> = req.volume_capability.as_ref().map(capability::check).transpose()?;
        let size = params::size_for(Some(range), None)?;
        let _guard = self.inflight.claim(req.volume_id.clone())?;
        let volume = self.get_volume(&req.volume_id).await?;
        let node_expansion_required = match &cap {
            Some(cap) => !cap.is_block(),
            None => volume.parameters.contains_key(params::FS_TYPE),
        };
        let capacity = if volume.size_bytes >= size {
            if range.limit_bytes > 0 && volume.size_bytes > range.limit_bytes as u64 {
                return Err(CsiError::OutOfRange(format!(
                    "volume is {} bytes, above limit_bytes {}; volumes cannot shrink",
                    volume.size_bytes, range.limit_bytes
                )));
            }
            volume.size_bytes
        } else {
            let grown =
                self.meta.expand_volume(pb::ExpandVolumeRequest { id: volume.id.clone(), size_bytes: size }).await?;
            tracing::info!(from = volume.size_bytes, to = grown.size_bytes, "volume expanded");
            grown.size_bytes
        };
        Ok(csi::ControllerExpandVolumeResponse { capacity_bytes: capacity as i64, node_expansion_required })
    }

    /// Changes a live volume's replica count or I/O limits. More replicas
    /// are built in the background; the response does not wait for them.
    async fn modify(&self, req: csi::ControllerModifyVolumeRequest) -> Result<csi::ControllerModifyVolumeResponse> {
        if req.volume_id.is_empty() {
            return Err(CsiError::Missing("volume_id"));
        }
        let change = MutableParams::parse(&req.mutable_parameters)?;
        let _guard = self.inflight.claim(req.volume_id.clone())?;
        let volume = self.get_volume(&req.volume_id).await?;
        let modified = self
            .meta
            .modify_volume(pb::ModifyVolumeRequest {
                id: volume.id.clone(),
                replicas: change.replicas,
                max_iops: change.max_iops,
                max_bandwidth_bytes: change.max_bandwidth_bytes,
            })
            .await?;
        let limits = modified.limits.unwrap_or_default();
        tracing::info!(
            replicas = modified.replicas,
            max_iops = limits.max_iops,
            max_bandwidth = limits.max_bandwidth_bytes,
            "volume modified"
        );
        Ok(csi::ControllerModifyVolumeResponse {})
    }

    async fn get_health(
        &self,
        req: csi::ControllerGetVolumeHealthRequest,
    ) -> Result<csi::ControllerGetVolumeHealthResponse> {
        if req.volume_id.is_empty() {
            return Err(CsiError::Missing("volume_id"));
        }
        let volume = self.get_volume(&req.volume_id).await?;
        let live = health::live_servers(&self.meta).await?;
        let health = self.volume_health(&volume, &live).await?;
        Ok(csi::ControllerGetVolumeHealthResponse { volume_health: Some(health) })
    }

    async fn list_health(
        &self,
        req: csi::ControllerListVolumeHealthRequest,
    ) -> Result<csi::ControllerListVolumeHealthResponse> {
        let (volumes, next_token) = self.volume_page(req.max_entries, &req.starting_token).await?;
        let live = health::live_servers(&self.meta).await?;
        let entries = futures::stream::iter(volumes)
            .map(|volume| {
                let live = &live;
                async move { self.volume_health(&volume, live).await }
            })
            .buffered(LIST_CONCURRENCY)
            .try_collect()
            .await?;
        Ok(csi::ControllerListVolumeHealthResponse { entries, next_token })
    }

    async fn get(&self, req: csi::ControllerGetVolumeRequest) -> Result<csi::ControllerGetVolumeResponse> {
        if req.volume_id.is_empty() {
            return Err(CsiError::Missing("volume_id"));
        }
        let volume = self.get_volume(&req.volume_id).await?;
        let live = health::live_servers(&self.meta).await?;
        let (nodes, condition) = self.volume_status(&volume, &live).await?;
        Ok(csi::ControllerGetVolumeResponse {
            volume: Some(self.volume_response(&volume)),
            status: Some(csi::controller_get_volume_response::VolumeStatus {
                published_node_ids: nodes,
                volume_condition: Some(condition),
            }),
        })
    }
}

fn by_id(id: &str) -> pb::GetVolumeRequest {
    pb::GetVolumeRequest { key: Some(pb::get_volume_request::Key::Id(id.to_string())) }
}

fn meta_source(source: &csi::VolumeContentSource) -> Result<pb::ContentSource> {
    use csi::volume_content_source::Type;
    let source = match &source.r#type {
        Some(Type::Snapshot(s)) if !s.snapshot_id.is_empty() => {
            pb::content_source::Source::SnapshotId(s.snapshot_id.clone())
        }
        Some(Type::Volume(v)) if !v.volume_id.is_empty() => pb::content_source::Source::VolumeId(v.volume_id.clone()),
        _ => return Err(CsiError::invalid("volume_content_source must name a snapshot or a volume")),
    };
    Ok(pb::ContentSource { source: Some(source) })
}

fn csi_source(source: &pb::ContentSource) -> Option<csi::VolumeContentSource> {
    use csi::volume_content_source::{SnapshotSource, Type, VolumeSource};
    let kind = match source.source.as_ref()? {
        pb::content_source::Source::SnapshotId(id) => Type::Snapshot(SnapshotSource { snapshot_id: id.clone() }),
        pb::content_source::Source::VolumeId(id) => Type::Volume(VolumeSource { volume_id: id.clone() }),
    };
    Some(csi::VolumeContentSource { r#type: Some(kind) })
}

pub(crate) fn csi_snapshot(s: &pb::Snapshot) -> csi::Snapshot {
    csi::Snapshot {
        size_bytes: s.size_bytes as i64,
        snapshot_id: s.id.clone(),
        source_volume_id: s.source_volume_id.clone(),
        creation_time: Some(timestamp(s.created_at_ms)),
        ready_to_use: s.ready_to_use,
        group_snapshot_id: s.group_id.clone(),
    }
}

pub(crate) fn timestamp(ms: u64) -> prost_types::Timestamp {
    prost_types::Timestamp { seconds: (ms / 1000) as i64, nanos: ((ms % 1000) * 1_000_000) as i32 }
}

/// `max_entries`: negative is invalid, zero means no limit.
fn page_limit(max_entries: i32) -> Result<Option<u32>> {
    match max_entries {
        n if n < 0 => Err(CsiError::invalid(format!("max_entries {n} is negative"))),
        0 => Ok(None),
        n => Ok(Some(n as u32)),
    }
}

/// Tokens are the metadata service's page tokens, `after:<id>`; anything
/// else was not issued by this plugin and is ABORTED, as the spec asks.
fn check_token(token: &str, id_prefix: &str) -> Result<()> {
    if token.is_empty() {
        return Ok(());
    }
    let valid = token
        .strip_prefix(PAGE_TOKEN_PREFIX)
        .and_then(|id| id.strip_prefix(id_prefix))
        .is_some_and(|hex| !hex.is_empty() && hex.chars().all(|c| c.is_ascii_hexdigit()));
    if valid {
        Ok(())
    } else {
        Err(CsiError::BadToken(token.to_string()))
    }
}

/// How many chunks of `replicas` copies fit on servers with `free` whole
/// chunks each, every copy of a chunk on a different server: the largest
/// `k` with `Σ min(freeᵢ, k) ≥ replicas · k`.
pub fn placeable_chunks(free: &[u64], replicas: u64) -> u64 {
    let replicas = replicas.max(1);
    let fits = |k: u64| free.iter().map(|&f| f.min(k) as u128).sum::<u128>() >= replicas as u128 * k as u128;
    let (mut low, mut high) = (0u64, free.iter().sum::<u64>() / replicas);
    while low < high {
        let mid = low + (high - low).div_ceil(2);
        if fits(mid) {
            low = mid;
        } else {
            high = mid - 1;
        }
    }
    low
}

#[tonic::async_trait]
impl Controller for ControllerService {
    async fn create_volume(
        &self,
        request: Request<csi::CreateVolumeRequest>,
    ) -> Result<Response<csi::CreateVolumeResponse>, Status> {
        let req = request.into_inner();
        let name = req.name.clone();
        observe("CreateVolume", &name, self.create_volume(req)).await
    }

    async fn delete_volume(
        &self,
        request: Request<csi::DeleteVolumeRequest>,
    ) -> Result<Response<csi::DeleteVolumeResponse>, Status> {
        let req = request.into_inner();
        let id = req.volume_id.clone();
        observe("DeleteVolume", &id, self.delete_volume(req)).await
    }

    async fn controller_publish_volume(
        &self,
        request: Request<csi::ControllerPublishVolumeRequest>,
    ) -> Result<Response<csi::ControllerPublishVolumeResponse>, Status> {
        let req = request.into_inner();
        let id = req.volume_id.clone();
        observe("ControllerPublishVolume", &id, self.publish(req)).await
    }

    async fn controller_unpublish_volume(
        &self,
        request: Request<csi::ControllerUnpublishVolumeRequest>,
    ) -> Result<Response<csi::ControllerUnpublishVolumeResponse>, Status> {
        let req = request.into_inner();
        let id = req.volume_id.clone();
        observe("ControllerUnpublishVolume", &id, self.unpublish(req)).await
    }

    async fn validate_volume_capabilities(
        &self,
        request: Request<csi::ValidateVolumeCapabilitiesRequest>,
    ) -> Result<Response<csi::ValidateVolumeCapabilitiesResponse>, Status> {
        let req = request.into_inner();
        let id = req.volume_id.clone();
        observe("ValidateVolumeCapabilities", &id, self.validate(req)).await
    }

    async fn list_volumes(
        &self,
        request: Request<csi::ListVolumesRequest>,
    ) -> Result<Response<csi::ListVolumesResponse>, Status> {
        observe("ListVolumes", "", self.list_volumes(request.into_inner())).await
    }

    async fn get_capacity(
        &self,
        request: Request<csi::GetCapacityRequest>,
    ) -> Result<Response<csi::GetCapacityResponse>, Status> {
        observe("GetCapacity", "", self.get_capacity(request.into_inner())).await
    }

    async fn controller_get_capabilities(
        &self,
        _request: Request<csi::ControllerGetCapabilitiesRequest>,
    ) -> Result<Response<csi::ControllerGetCapabilitiesResponse>, Status> {
        observe("ControllerGetCapabilities", "", async {
            let capabilities = CAPABILITIES
                .iter()
                .map(|t| csi::ControllerServiceCapability {
                    r#type: Some(csi::controller_service_capability::Type::Rpc(
                        csi::controller_service_capability::Rpc { r#type: *t as i32 },
                    )),
                })
                .collect();
            Ok(csi::ControllerGetCapabilitiesResponse { capabilities })
        })
        .await
    }

    async fn create_snapshot(
        &self,
        request: Request<csi::CreateSnapshotRequest>,
    ) -> Result<Response<csi::CreateSnapshotResponse>, Status> {
        let req = request.into_inner();
        let source = req.source_volume_id.clone();
        observe("CreateSnapshot", &source, self.create_snapshot(req)).await
    }

    async fn delete_snapshot(
        &self,
        request: Request<csi::DeleteSnapshotRequest>,
    ) -> Result<Response<csi::DeleteSnapshotResponse>, Status> {
        let req = request.into_inner();
        let id = req.snapshot_id.clone();
        observe("DeleteSnapshot", &id, self.delete_snapshot(req)).await
    }

    async fn list_snapshots(
        &self,
        request: Request<csi::ListSnapshotsRequest>,
    ) -> Result<Response<csi::ListSnapshotsResponse>, Status> {
        let req = request.into_inner();
        let source = req.source_volume_id.clone();
        observe("ListSnapshots", &source, self.list_snapshots(req)).await
    }

    async fn get_snapshot(
        &self,
        request: Request<csi::GetSnapshotRequest>,
    ) -> Result<Response<csi::GetSnapshotResponse>, Status> {
        let id = request.into_inner().snapshot_id;
        observe("GetSnapshot", &id, self.get_snapshot(&id)).await
    }

    async fn controller_expand_volume(
        &self,
        request: Request<csi::ControllerExpandVolumeRequest>,
    ) -> Result<Response<csi::ControllerExpandVolumeResponse>, Status> {
        let req = request.into_inner();
        let id = req.volume_id.clone();
        observe("ControllerExpandVolume", &id, self.expand(req)).await
    }

    async fn controller_get_volume(
        &self,
        request: Request<csi::ControllerGetVolumeRequest>,
    ) -> Result<Response<csi::ControllerGetVolumeResponse>, Status> {
        let req = request.into_inner();
        let id = req.volume_id.clone();
        observe("ControllerGetVolume", &id, self.get(req)).await
    }

    async fn controller_get_volume_health(
        &self,
        request: Request<csi::ControllerGetVolumeHealthRequest>,
    ) -> Result<Response<csi::ControllerGetVolumeHealthResponse>, Status> {
        let req = request.into_inner();
        let id = req.volume_id.clone();
        observe("ControllerGetVolumeHealth", &id, self.get_health(req)).await
    }

    async fn controller_list_volume_health(
        &self,
        request: Request<csi::ControllerListVolumeHealthRequest>,
    ) -> Result<Response<csi::ControllerListVolumeHealthResponse>, Status> {
        observe("ControllerListVolumeHealth", "", self.list_health(request.into_inner())).await
    }

    async fn controller_modify_volume(
        &self,
        request: Request<csi::ControllerModifyVolumeRequest>,
    ) -> Result<Response<csi::ControllerModifyVolumeResponse>, Status> {
        let req = request.into_inner();
        let id = req.volume_id.clone();
        observe("ControllerModifyVolume", &id, self.modify(req)).await
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn placement_bound_keeps_copies_on_distinct_servers() {
        assert_eq!(placeable_chunks(&[], 3), 0);
        assert_eq!(placeable_chunks(&[10, 10, 10], 3), 10);
        assert_eq!(placeable_chunks(&[10, 10, 10], 1), 30);
        // Two servers cannot hold three distinct copies of anything.
        assert_eq!(placeable_chunks(&[100, 100], 3), 0);
        // One big server cannot make up for small ones.
        assert_eq!(placeable_chunks(&[1000, 5, 5], 3), 5);
        assert_eq!(placeable_chunks(&[1000, 5, 5, 5], 3), 7);
        assert_eq!(placeable_chunks(&[4, 4, 4, 4], 2), 8);
    }

    #[test]
    fn tokens_are_the_metadata_service_page_tokens() {
        check_token("", "vol-").unwrap();
        check_token("after:vol-1f", "vol-").unwrap();
        check_token("after:snap-2", "snap-").unwrap();
        for bad in ["invalid-token", "after:", "after:vol-", "after:vol-xyz", "after:snap-1"] {
            assert!(matches!(check_token(bad, "vol-"), Err(CsiError::BadToken(_))), "{bad}");
        }
        assert!(page_limit(-1).is_err());
        assert_eq!(page_limit(0).unwrap(), None);
        assert_eq!(page_limit(5).unwrap(), Some(5));
    }
}
