//! The node's capability for the volume it serves: asked of the metadata
//! service at open, presented on every connection to a chunk server
//! (`AUTHORIZE`), and renewed at half-life for as long as the volume is
//! open. Only a node certificate needs one; operators' and the
//! controller's certificates reach chunks without.

use std::time::Duration;

use ballast_proto::meta as pb;
use ballast_tls::Role;
use bytes::Bytes;
use meta_client::now_ms;
use meta_client::MetaClient;
use tokio::sync::watch;
use tokio::task::JoinHandle;
use tonic::Code;

use super::EngineError;

/// Between attempts after a renewal failed.
const RETRY: Duration = Duration::from_secs(5);

/// A capability token and its place in the sequence of renewals: a
/// connection that presented an older one presents this one before its
/// next request.
#[derive(Clone, Debug)]
pub struct Presented {
    pub token: Bytes,
    pub version: u64,
}

/// The current capability, renewed in the background until dropped.
pub struct Lease {
    current: watch::Receiver<Presented>,
    renewal: JoinHandle<()>,
}

impl Drop for Lease {
    fn drop(&mut self) {
        self.renewal.abort();
    }
}

impl Lease {
    /// The capability of this node for `volume`, if its certificate is a
    /// node's. The attachment's epoch must be `epoch`: a node given another
    /// was fenced, or told wrong.
    pub async fn obtain(meta: &MetaClient, volume: &pb::Volume, epoch: u64) -> Result<Option<Lease>, EngineError> {
        let Some(identity) = meta.identity().filter(|identity| identity.role == Role::Node) else {
            return Ok(None);
        };
        let request = pb::IssueCapabilityRequest { volume_id: volume.id.clone(), node_id: identity.name.clone() };
        let issued = meta.issue_capability(request.clone()).await?;
        if issued.epoch != epoch {
            return Err(EngineError::Denied(format!(
                "volume {} is attached to node {} at epoch {}, not {epoch}",
                volume.id, identity.name, issued.epoch
            )));
        }
        let (tx, current) = watch::channel(Presented { token: Bytes::from(issued.token), version: 0 });
        let renewal = tokio::spawn(renew(meta.clone(), request, issued.expires_at_ms, tx));
        Ok(Some(Lease { current, renewal }))
    }

    /// Follows renewals.
    pub fn watch(&self) -> watch::Receiver<Presented> {
        self.current.clone()
    }
}

/// Asks for a fresh capability at half of the current one's remaining
/// life, and again every few seconds while the metadata service cannot be
/// reached. A refusal (the volume was unpublished from this node) ends the
/// renewals: I/O stops being admitted when the current capability expires.
async fn renew(
    meta: MetaClient,
    request: pb::IssueCapabilityRequest,
    mut expires_at_ms: u64,
    tx: watch::Sender<Presented>,
) {
    let mut version = 0;
    let mut wait = half_life(expires_at_ms);
    loop {
        tokio::time::sleep(wait).await;
        match meta.issue_capability(request.clone()).await {
            Ok(issued) => {
                version += 1;
                expires_at_ms = issued.expires_at_ms;
                if tx.send(Presented { token: Bytes::from(issued.token), version }).is_err() {
                    return;
                }
                wait = half_life(expires_at_ms);
            }
            Err(status) => {
                let left = life_left(expires_at_ms);
                let refused =
                    matches!(status.code(), Code::FailedPrecondition | Code::NotFound | Code::PermissionDenied);
                if refused {
                    tracing::warn!(volume = %request.volume_id, reason = %status.message(), ?left,
                        "the volume's capability is not renewed: its I/O is refused once it lapses");
                    return;
                }
                tracing::warn!(volume = %request.volume_id, error = %status.message(), ?left,
                    "renewing the volume's capability failed; retrying");
                wait = RETRY;
            }
        }
    }
}

fn life_left(expires_at_ms: u64) -> Duration {
    Duration::from_millis(expires_at_ms.saturating_sub(now_ms()))
}

/// Half of what is left of a capability's life (at least a second).
fn half_life(expires_at_ms: u64) -> Duration {
    (life_left(expires_at_ms) / 2).max(Duration::from_secs(1))
}
