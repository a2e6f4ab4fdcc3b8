//! What the node knows of a staged volume's health and of the storage it
//! reaches: whether the volume is still attached and served here, and
//! whether its chunks have their live replicas (asked of the metadata
//! service, briefly: a slow answer leaves the replicas unknown rather than
//! holding the kubelet's call).

use std::path::Path;
use std::time::Duration;

use ballast_proto::csi;
use ballast_proto::csi::volume_health::VolumeHealthEntry;
use ballast_proto::csi::VolumeHealthErrorType;
use ballast_proto::meta as pb;

use super::{mounts, required, NodeService, Staged};
use crate::error::{CsiError, Result};
use crate::health::{self, Census};

/// How long a health call waits for the metadata service.
const HEALTH_DEADLINE: Duration = Duration::from_secs(2);

impl NodeService {
    /// Why the volume cannot be used here, if it cannot: not attached, or
    /// its serving process gone.
    async fn attachment_problem(&self, staged: &Staged) -> Option<String> {
        match self.nbd.find(&staged.meta_volume_id).await {
            Ok(None) => Some(format!("volume is not attached ({} is gone)", staged.device.display())),
            Ok(Some(m)) if !m.is_served() => {
                Some(format!("the process serving {} (pid {}) has exited", m.device.display(), m.pid))
            }
            Ok(Some(_)) => None,
            Err(err) => Some(format!("cannot tell whether the volume is attached: {err}")),
        }
    }

    /// The volume's chunks by live replicas, if the metadata service
    /// answers in time.
    async fn replica_census(&self, staged: &Staged) -> Option<Census> {
        let meta = self.meta.with_deadline(HEALTH_DEADLINE);
        let census = async {
            let key = pb::get_volume_request::Key::Id(staged.meta_volume_id.clone());
            let volume = meta.get_volume(pb::GetVolumeRequest { key: Some(key) }).await?;
            let live = health::live_servers(&meta).await?;
            health::census(&meta, &volume, &live).await
        };
        match census.await {
            Ok(census) => Some(census),
            Err(err) => {
                tracing::debug!("replica health unknown: {err}");
                None
            }
        }
    }

    /// The condition NodeGetVolumeStats reports.
    pub(super) async fn condition(&self, staged: &Staged, usage_error: Option<String>) -> csi::VolumeCondition {
        let abnormal = |message: String| csi::VolumeCondition { abnormal: true, message };
        if let Some(problem) = usage_error {
            return abnormal(problem);
        }
        if let Some(problem) = self.attachment_problem(staged).await {
            return abnormal(problem);
        }
        match self.replica_census(staged).await {
            Some(census) => census.condition(),
            None => csi::VolumeCondition { abnormal: false, message: "attached; replica health unknown".into() },
        }
    }

    /// NodeGetVolumeHealth: INACCESSIBLE when the volume is not served here
    /// or not mounted where the kubelet says, then the replicas' health.
    pub(super) async fn node_volume_health(
        &self,
        req: csi::NodeGetVolumeHealthRequest,
    ) -> Result<csi::NodeGetVolumeHealthResponse> {
        let volume_id = required("volume_id", &req.volume_id)?;
        let staged = self
            .state
            .load(volume_id)?
            .ok_or_else(|| CsiError::not_found(format!("volume {volume_id} is not staged on this node")))?;
        let inaccessible = |reason: &str, message: String| VolumeHealthEntry {
            status: VolumeHealthErrorType::Inaccessible as i32,
            reason: reason.into(),
            message,
        };
        let mut statuses = Vec::new();
        if let Some(problem) = self.attachment_problem(&staged).await {
            statuses.push(inaccessible("NotAttached", problem));
        }
        for path in [&req.staging_target_path, &req.volume_publish_path].into_iter().filter(|p| !p.is_empty()) {
            if mounts::mounted_at(Path::new(path))?.is_none() {
                statuses.push(inaccessible("NotMounted", format!("nothing is mounted at {path}")));
            }
        }
        if let Some(census) = self.replica_census(&staged).await {
            statuses.extend(census.health(volume_id).health_statuses);
        }
        let health = csi::VolumeHealth { volume_id: volume_id.to_string(), health_statuses: statuses };
        Ok(csi::NodeGetVolumeHealthResponse { volume_health: Some(health) })
    }

    /// NodeGetStorageHealth: whether this node reaches the metadata service
    /// and how many chunk servers are heartbeating.
    pub(super) async fn storage_health(&self) -> csi::NodeGetStorageHealthResponse {
        let meta = self.meta.with_deadline(HEALTH_DEADLINE);
        let servers = meta.list_chunk_servers(pb::ListChunkServersRequest {}).await.map(|l| l.servers);
        csi::NodeGetStorageHealthResponse { backend_health: backend_health(servers) }
    }
}

/// The storage's health from the chunk servers metadata lists (or why it
/// could not list them); empty when every server heartbeats.
fn backend_health(
    servers: std::result::Result<Vec<pb::ChunkServer>, tonic::Status>,
) -> Vec<csi::node_get_storage_health_response::StorageBackendHealth> {
    use csi::node_get_storage_health_response::StorageBackendHealth;
    use csi::StorageHealthErrorType::{StorageDegraded, StorageUnreachable};
    let entry = |status: csi::StorageHealthErrorType, reason: &str, message: String| StorageBackendHealth {
        status: status as i32,
        reason: reason.into(),
        message,
        volume_capability: None,
    };
    let servers = match servers {
        Ok(servers) => servers,
        Err(status) => {
            let message = format!("metadata service: {}", status.message());
            return vec![entry(StorageUnreachable, "MetadataUnreachable", message)];
        }
    };
    let total = servers.len();
    let silent = servers.iter().filter(|s| !s.alive).count();
    if silent == total {
        let message = format!("none of {total} chunk servers is heartbeating");
        vec![entry(StorageUnreachable, "NoChunkServers", message)]
    } else if silent > 0 {
        let message = format!("{silent} of {total} chunk servers are not heartbeating");
        vec![entry(StorageDegraded, "ChunkServersSilent", message)]
    } else {
        Vec::new()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn storage_is_degraded_by_silent_servers_and_unreachable_without_any() {
        let server = |alive| pb::ChunkServer { alive, ..Default::default() };
        assert!(backend_health(Ok(vec![server(true), server(true)])).is_empty());
        let degraded = backend_health(Ok(vec![server(true), server(false)]));
        assert_eq!(degraded[0].status, csi::StorageHealthErrorType::StorageDegraded as i32);
        assert_eq!(degraded[0].message, "1 of 2 chunk servers are not heartbeating");
        for unreachable in [Ok(vec![server(false)]), Ok(vec![]), Err(tonic::Status::unavailable("no leader"))] {
            let health = backend_health(unreachable);
            assert_eq!(health[0].status, csi::StorageHealthErrorType::StorageUnreachable as i32, "{health:?}");
        }
    }
}
