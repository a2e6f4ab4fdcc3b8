//! The CSI Identity service: who the plugin is, what it offers, and whether
//! it can serve right now.

use std::time::Duration;

use ballast_proto::csi;
use ballast_proto::csi::identity_server::Identity;
use ballast_proto::csi::plugin_capability::{service, volume_expansion};
use ballast_proto::meta as pb;
use meta_client::MetaClient;
use tonic::{Request, Response, Status};

use crate::error::Result;
use crate::metrics::observe;
use crate::node::attach::NbdClient;

pub const DRIVER_NAME: &str = "csi.ballast.io";
pub const VERSION: &str = env!("CARGO_PKG_VERSION");

/// How long Probe waits for the metadata service.
const PROBE_DEADLINE: Duration = Duration::from_secs(2);

pub struct IdentityService {
    /// Set when the controller service is served: Probe needs the metadata
    /// service to answer.
    controller: Option<MetaClient>,
    /// Set when the node service is served: Probe needs the attach tool.
    node: Option<NbdClient>,
    topology: bool,
}

impl IdentityService {
    pub fn new(controller: Option<MetaClient>, node: Option<NbdClient>, topology: bool) -> Self {
        let controller = controller.map(|meta| meta.with_deadline(PROBE_DEADLINE));
        Self { controller, node, topology }
    }

    fn capabilities(&self) -> Vec<csi::PluginCapability> {
        let service = |t: service::Type| csi::PluginCapability {
            r#type: Some(csi::plugin_capability::Type::Service(csi::plugin_capability::Service { r#type: t as i32 })),
        };
        // Capabilities of the driver as a whole, the same from every
        // instance: a node instance belongs to a driver whose controller
        // runs elsewhere, and tools that only reach the node (the kubelet,
        // csi-sanity's node tests) decide on ControllerPublish from this.
        let mut caps = vec![service(service::Type::ControllerService), service(service::Type::GroupControllerService)];
        if self.topology {
            caps.push(service(service::Type::VolumeAccessibilityConstraints));
        }
        // Online: NodeExpandVolume grows the mapped device and the mounted
        // filesystem on it.
        caps.push(csi::PluginCapability {
            r#type: Some(csi::plugin_capability::Type::VolumeExpansion(csi::plugin_capability::VolumeExpansion {
                r#type: volume_expansion::Type::Online as i32,
            })),
        });
        caps
    }

    /// Ready when everything the served services depend on answers. A
    /// missing attach tool is a configuration error (FailedPrecondition);
    /// an unreachable metadata service is "not ready yet".
    async fn probe(&self) -> Result<csi::ProbeResponse> {
        if let Some(nbd) = &self.node {
            nbd.binary()?;
        }
        if let Some(meta) = &self.controller {
            // A linearizable read: it proves a leader with a quorum.
            if let Err(status) =
                meta.list_volumes(pb::ListVolumesRequest { page_size: 1, page_token: String::new() }).await
            {
                tracing::warn!("not ready: metadata service: {}", status.message());
                return Ok(csi::ProbeResponse { ready: Some(false) });
            }
        }
        Ok(csi::ProbeResponse { ready: Some(true) })
    }
}

#[tonic::async_trait]
impl Identity for IdentityService {
    async fn get_plugin_info(
        &self,
        _request: Request<csi::GetPluginInfoRequest>,
    ) -> Result<Response<csi::GetPluginInfoResponse>, Status> {
        observe("GetPluginInfo", "", async {
            Ok(csi::GetPluginInfoResponse {
                name: DRIVER_NAME.to_string(),
                vendor_version: VERSION.to_string(),
                manifest: Default::default(),
            })
        })
        .await
    }

    async fn get_plugin_capabilities(
        &self,
        _request: Request<csi::GetPluginCapabilitiesRequest>,
    ) -> Result<Response<csi::GetPluginCapabilitiesResponse>, Status> {
        observe("GetPluginCapabilities", "", async {
            Ok(csi::GetPluginCapabilitiesResponse { capabilities: self.capabilities() })
        })
        .await
    }

    async fn probe(&self, _request: Request<csi::ProbeRequest>) -> Result<Response<csi::ProbeResponse>, Status> {
        observe("Probe", "", self.probe()).await
    }
}
