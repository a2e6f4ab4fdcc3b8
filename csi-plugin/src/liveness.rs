//! The plugin's `/healthz`: its own CSI Probe, asked over its own socket,
//! which is what Kubernetes' livenessprobe sidecar would ask. A plugin whose
//! socket stopped answering, or that reports itself not ready, fails it.

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use ballast_proto::csi;
use ballast_proto::csi::identity_client::IdentityClient;
use ballast_telemetry::HealthCheck;

use crate::server::dial;

/// Below a liveness probe's usual timeout, so a hung socket reports why.
const PROBE_LIMIT: Duration = Duration::from_secs(4);

/// A check that probes the plugin serving on `socket`.
pub fn probe_check(socket: PathBuf) -> HealthCheck {
    Arc::new(move || {
        let socket = socket.clone();
        Box::pin(async move {
            match tokio::time::timeout(PROBE_LIMIT, probe(&socket)).await {
                Ok(result) => result,
                Err(_) => Err(format!("Probe on {} did not answer within {PROBE_LIMIT:?}", socket.display())),
            }
        })
    })
}

async fn probe(socket: &std::path::Path) -> Result<(), String> {
    let channel = dial(socket).await.map_err(|e| format!("dialing {}: {e}", socket.display()))?;
    let reply = IdentityClient::new(channel)
        .probe(csi::ProbeRequest {})
        .await
        .map_err(|status| format!("Probe: {}", status.message()))?;
    match reply.into_inner().ready {
        Some(false) => Err("Probe: the plugin reports it is not ready".to_string()),
        _ => Ok(()),
    }
}
