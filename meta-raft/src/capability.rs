//! Capabilities for nodes: what a node may do to the chunks of a volume
//! published to it, signed with the cluster's key (see
//! `ballast_tls::capability`). Chunk servers admit a node certificate's
//! requests only under one, so a node reaches only its own volumes, writes
//! only at its attachment's epoch, and loses access once a capability
//! lapses unrenewed after the volume was unpublished from it.

use std::time::Duration;

use ballast_proto::meta as pb;
use ballast_tls::{Capability, CapabilityIssuer};

use crate::error::MetaError;
use crate::state::MetaState;

/// How long a capability is valid unless the member is told otherwise:
/// long enough that a metadata election or a short outage never stops a
/// node's I/O (the engine renews at half-life), short enough that a node a
/// volume was taken from loses it soon.
pub const DEFAULT_LIFETIME: Duration = Duration::from_secs(600);

/// The signed capability of `node_id` for `volume_id`, valid for
/// `lifetime` from `now_ms`; FAILED_PRECONDITION unless the volume is
/// published to the node.
pub fn issue(
    state: &MetaState,
    issuer: &CapabilityIssuer,
    volume_id: &str,
    node_id: &str,
    now_ms: u64,
    lifetime: Duration,
) -> Result<pb::VolumeCapability, MetaError> {
    let volume = state.volumes.get(volume_id).ok_or_else(|| MetaError::not_found(format!("volume {volume_id}")))?;
    let attachment = state.attachments.get(volume_id).and_then(|nodes| nodes.get(node_id)).ok_or_else(|| {
        MetaError::FailedPrecondition(format!("volume {volume_id} is not published to node {node_id}"))
    })?;
    let capability = Capability {
        data_id: volume.data_id,
        node: node_id.to_string(),
        epoch: attachment.epoch,
        readonly: attachment.readonly,
        expires_at_ms: now_ms.saturating_add(u64::try_from(lifetime.as_millis()).unwrap_or(u64::MAX)),
    };
    Ok(pb::VolumeCapability {
        token: issuer.issue(&capability),
        data_id: capability.data_id,
        epoch: capability.epoch,
        readonly: capability.readonly,
        expires_at_ms: capability.expires_at_ms,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::types::{Command, Outcome};
    use ballast_tls::CapabilityVerifier;

    #[test]
    fn only_a_published_volume_gets_a_capability_at_its_attachment() {
        let mut state = MetaState::default();
        let issuer = CapabilityIssuer::from_pkcs8(&CapabilityIssuer::generate_key().unwrap()).unwrap();
        let lifetime = Duration::from_secs(10);
        let refused = issue(&state, &issuer, "vol-1", "n1", 0, lifetime).unwrap_err();
        assert!(matches!(refused, MetaError::NotFound(_)), "{refused:?}");
        let create = Command::CreateVolume {
            name: "v".into(),
            size_bytes: 1 << 20,
            replicas: 1,
            chunk_size_bytes: 0,
            parameters: Default::default(),
            source: None,
            limits: Default::default(),
        };
        let Ok(Outcome::Volume(volume)) = state.apply(9, 0, create) else { panic!("volume not created") };
        let refused = issue(&state, &issuer, &volume.id, "n1", 0, lifetime).unwrap_err();
        assert!(matches!(refused, MetaError::FailedPrecondition(_)), "{refused:?}");
        let publish = Command::Publish { volume_id: volume.id.clone(), node_id: "n1".into(), readonly: true };
        let Ok(Outcome::Attachment(attachment)) = state.apply(10, 0, publish) else { panic!("not published") };
        let issued = issue(&state, &issuer, &volume.id, "n1", 1_000, lifetime).unwrap();
        assert!(issue(&state, &issuer, &volume.id, "n2", 0, lifetime).is_err(), "another node");
        let verified = CapabilityVerifier::new(&issuer.public_key()).unwrap().verify(&issued.token).unwrap();
        let expires_at_ms = 11_000;
        let (data_id, epoch) = (volume.data_id, attachment.epoch);
        let expected = Capability { data_id, node: "n1".into(), epoch, readonly: true, expires_at_ms };
        assert_eq!(verified, expected);
        assert_eq!(
            (issued.data_id, issued.epoch, issued.readonly, issued.expires_at_ms),
            (data_id, epoch, true, expires_at_ms)
        );
    }
}
