//! The GroupController service: volume group snapshots, crash-consistent
//! snapshots of several volumes at one instant (Kubernetes
//! VolumeGroupSnapshot). Every volume of the group is paused on every
//! chunk server before any chunk is cloned; each member restores like any
//! snapshot, volume by volume.

use ballast_proto::csi;
use ballast_proto::csi::group_controller_server::GroupController;
use ballast_proto::csi::group_controller_service_capability::rpc::Type as RpcType;
use ballast_proto::meta as pb;
use meta_client::MetaClient;
use tonic::{Request, Response, Status};

use crate::controller::{csi_snapshot, timestamp};
use crate::error::{CsiError, Result};
use crate::inflight::InFlight;
use crate::metrics::observe;
use crate::params;

pub struct GroupControllerService {
    meta: MetaClient,
    inflight: InFlight,
}

impl GroupControllerService {
    pub fn new(meta: MetaClient, inflight: InFlight) -> Self {
        Self { meta, inflight }
    }

    async fn create(
        &self,
        req: csi::CreateVolumeGroupSnapshotRequest,
    ) -> Result<csi::CreateVolumeGroupSnapshotResponse> {
        if req.name.is_empty() {
            return Err(CsiError::Missing("name"));
        }
        if req.source_volume_ids.is_empty() {
            return Err(CsiError::Missing("source_volume_ids"));
        }
        params::reject_snapshot_parameters(&req.parameters, "group snapshot")?;
        let _guard = self.inflight.claim(format!("group-snapshot-name/{}", req.name))?;
        let request = pb::CreateGroupSnapshotRequest { name: req.name, source_volume_ids: req.source_volume_ids };
        let group = self.meta.create_group_snapshot(request).await?;
        // Takes the members' data (again, if an earlier attempt was interrupted).
        let group = volume_engine::snapshot::take_group(&self.meta, &group).await?;
        tracing::info!(id = %group.id, members = group.snapshots.len(), "group snapshot created");
        Ok(csi::CreateVolumeGroupSnapshotResponse { group_snapshot: Some(csi_group(&group)) })
    }

    async fn delete(
        &self,
        req: csi::DeleteVolumeGroupSnapshotRequest,
    ) -> Result<csi::DeleteVolumeGroupSnapshotResponse> {
        if req.group_snapshot_id.is_empty() {
            return Err(CsiError::Missing("group_snapshot_id"));
        }
        let _guard = self.inflight.claim(req.group_snapshot_id.clone())?;
        let id = req.group_snapshot_id;
        let reply = self.meta.delete_group_snapshot(pb::DeleteGroupSnapshotRequest { id }).await?;
        if !reply.existed {
            tracing::info!("group snapshot did not exist");
        }
        Ok(csi::DeleteVolumeGroupSnapshotResponse {})
    }

    async fn get(&self, req: csi::GetVolumeGroupSnapshotRequest) -> Result<csi::GetVolumeGroupSnapshotResponse> {
        if req.group_snapshot_id.is_empty() {
            return Err(CsiError::Missing("group_snapshot_id"));
        }
        let group = self.meta.get_group_snapshot(pb::GetGroupSnapshotRequest { id: req.group_snapshot_id }).await?;
        Ok(csi::GetVolumeGroupSnapshotResponse { group_snapshot: Some(csi_group(&group)) })
    }
}

fn csi_group(g: &pb::GroupSnapshot) -> csi::VolumeGroupSnapshot {
    csi::VolumeGroupSnapshot {
        group_snapshot_id: g.id.clone(),
        snapshots: g.snapshots.iter().map(csi_snapshot).collect(),
        creation_time: Some(timestamp(g.created_at_ms)),
        ready_to_use: g.ready_to_use,
    }
}

#[tonic::async_trait]
impl GroupController for GroupControllerService {
    async fn group_controller_get_capabilities(
        &self,
        _request: Request<csi::GroupControllerGetCapabilitiesRequest>,
    ) -> Result<Response<csi::GroupControllerGetCapabilitiesResponse>, Status> {
        use csi::group_controller_service_capability::{Rpc, Type};
        let capability = csi::GroupControllerServiceCapability {
            r#type: Some(Type::Rpc(Rpc { r#type: RpcType::CreateDeleteGetVolumeGroupSnapshot as i32 })),
        };
        Ok(Response::new(csi::GroupControllerGetCapabilitiesResponse { capabilities: vec![capability] }))
    }

    async fn create_volume_group_snapshot(
        &self,
        request: Request<csi::CreateVolumeGroupSnapshotRequest>,
    ) -> Result<Response<csi::CreateVolumeGroupSnapshotResponse>, Status> {
        let req = request.into_inner();
        let name = req.name.clone();
        observe("CreateVolumeGroupSnapshot", &name, self.create(req)).await
    }

    async fn delete_volume_group_snapshot(
        &self,
        request: Request<csi::DeleteVolumeGroupSnapshotRequest>,
    ) -> Result<Response<csi::DeleteVolumeGroupSnapshotResponse>, Status> {
        let req = request.into_inner();
        let id = req.group_snapshot_id.clone();
        observe("DeleteVolumeGroupSnapshot", &id, self.delete(req)).await
    }

    async fn get_volume_group_snapshot(
        &self,
        request: Request<csi::GetVolumeGroupSnapshotRequest>,
    ) -> Result<Response<csi::GetVolumeGroupSnapshotResponse>, Status> {
        let req = request.into_inner();
        let id = req.group_snapshot_id.clone();
        observe("GetVolumeGroupSnapshot", &id, self.get(req)).await
    }
}
