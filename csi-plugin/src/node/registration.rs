//! Announcing this node to the metadata service: the controller answers
//! NOT_FOUND for a node no plugin registered, and the metadata service
//! refuses to publish more than `--max-volumes` volumes to it.

use std::collections::HashMap;
use std::time::Duration;

use ballast_proto::meta as pb;
use meta_client::MetaClient;

use crate::params::Segments;

/// How long startup waits for the first registration before going on in
/// the background.
const STARTUP_WAIT: Duration = Duration::from_secs(3);
const RETRY_MAX: Duration = Duration::from_secs(30);

pub fn request(node_id: &str, max_volumes: i64, topology: &Segments) -> pb::RegisterNodeRequest {
    pb::RegisterNodeRequest {
        node_id: node_id.to_string(),
        max_volumes: max_volumes.max(0) as u64,
        topology: topology.iter().map(|(k, v)| (k.clone(), v.clone())).collect::<HashMap<_, _>>(),
    }
}

/// Registers the node, retrying with backoff. Waits up to [`STARTUP_WAIT`]
/// for success so that a plugin whose socket is up is known to the
/// controller; after that the retries go on in the background.
pub async fn register(meta: MetaClient, request: pb::RegisterNodeRequest) {
    let node_id = request.node_id.clone();
    let mut attempts = tokio::spawn(async move {
        let mut delay = Duration::from_millis(200);
        loop {
            match meta.register_node(request.clone()).await {
                Ok(node) => {
                    tracing::info!(node = %node.node_id, max_volumes = node.max_volumes, "node registered");
                    return;
                }
                Err(status) => {
                    tracing::warn!(node = %request.node_id, error = %status.message(), "registering the node; retrying")
                }
            }
            tokio::time::sleep(delay).await;
            delay = (delay * 2).min(RETRY_MAX);
        }
    });
    if tokio::time::timeout(STARTUP_WAIT, &mut attempts).await.is_err() {
        tracing::warn!(node = %node_id, "not registered yet; serving anyway and retrying in the background");
    }
}
