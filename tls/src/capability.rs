//! Per-volume capabilities: what a node may do to one volume's chunks,
//! signed by the metadata service and checked by chunk servers.
//!
//! A node certificate proves who a node is; a capability says which volume
//! that node may reach, at which attachment epoch, whether it may change
//! it, and until when. The metadata service signs capabilities with the
//! cluster's Ed25519 key (kept in its replicated state) for the volumes
//! published to a node; chunk servers hold only the public key, so a chunk
//! server's certificate cannot mint one.
//!
//! A token is the encoded [`Capability`] followed by its 64-byte signature.

use ring::rand::SystemRandom;
use ring::signature::{Ed25519KeyPair, KeyPair, UnparsedPublicKey, ED25519};

const MAGIC: &[u8; 6] = b"BLCAP1";
const SIGNATURE_LEN: usize = 64;
/// Longest node name a token carries (a Kubernetes node name is at most 253).
const MAX_NODE_LEN: usize = 1024;
const FLAG_READONLY: u8 = 1;

/// One node's access to one volume's data.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Capability {
    /// The volume's data id, as data-plane frames carry it.
    pub data_id: u64,
    /// The node it was issued to: only a connection whose certificate names
    /// this node may present it.
    pub node: String,
    /// The attachment epoch: the only epoch the node's changes may carry.
    pub epoch: u64,
    pub readonly: bool,
    /// Wall-clock milliseconds since the Unix epoch after which it is void.
    pub expires_at_ms: u64,
}

/// Why a token was not accepted.
#[derive(Debug, PartialEq, Eq, thiserror::Error)]
pub enum CapabilityError {
    #[error("the capability is not well-formed")]
    Malformed,
    #[error("the capability's signature is not the cluster's")]
    BadSignature,
    #[error("the cluster's capability key is not usable: {0}")]
    BadKey(String),
}

impl Capability {
    fn encode(&self) -> Vec<u8> {
        let node = self.node.as_bytes();
        let mut out = Vec::with_capacity(MAGIC.len() + 27 + node.len());
        out.extend_from_slice(MAGIC);
        out.extend_from_slice(&self.data_id.to_le_bytes());
        out.extend_from_slice(&self.epoch.to_le_bytes());
        out.extend_from_slice(&self.expires_at_ms.to_le_bytes());
        out.push(if self.readonly { FLAG_READONLY } else { 0 });
        out.extend_from_slice(&(node.len() as u16).to_le_bytes());
        out.extend_from_slice(node);
        out
    }

    fn decode(body: &[u8]) -> Option<Capability> {
        let rest = body.strip_prefix(MAGIC)?;
        let u64_at = |at: usize| Some(u64::from_le_bytes(rest.get(at..at + 8)?.try_into().ok()?));
        let flags = *rest.get(24)?;
        let node_len = usize::from(u16::from_le_bytes(rest.get(25..27)?.try_into().ok()?));
        let node = rest.get(27..)?;
        if node.len() != node_len || node_len > MAX_NODE_LEN || flags & !FLAG_READONLY != 0 {
            return None;
        }
        Some(Capability {
            data_id: u64_at(0)?,
            epoch: u64_at(8)?,
            expires_at_ms: u64_at(16)?,
            readonly: flags & FLAG_READONLY != 0,
            node: String::from_utf8(node.to_vec()).ok()?,
        })
    }
}

/// The signing side, held by metadata members.
pub struct CapabilityIssuer {
    key: Ed25519KeyPair,
}

impl CapabilityIssuer {
    /// A new key, PKCS#8-encoded: what the metadata service replicates.
    pub fn generate_key() -> Result<Vec<u8>, CapabilityError> {
        let document = Ed25519KeyPair::generate_pkcs8(&SystemRandom::new())
            .map_err(|_| CapabilityError::BadKey("no randomness".into()))?;
        Ok(document.as_ref().to_vec())
    }

    pub fn from_pkcs8(pkcs8: &[u8]) -> Result<CapabilityIssuer, CapabilityError> {
        let key = Ed25519KeyPair::from_pkcs8(pkcs8).map_err(|e| CapabilityError::BadKey(e.to_string()))?;
        Ok(CapabilityIssuer { key })
    }

    /// The key chunk servers verify with.
    pub fn public_key(&self) -> Vec<u8> {
        self.key.public_key().as_ref().to_vec()
    }

    /// The signed token for `capability`.
    pub fn issue(&self, capability: &Capability) -> Vec<u8> {
        let mut token = capability.encode();
        let signature = self.key.sign(&token);
        token.extend_from_slice(signature.as_ref());
        token
    }
}

/// The checking side, held by chunk servers.
#[derive(Clone, Debug)]
pub struct CapabilityVerifier {
    public_key: Vec<u8>,
}

impl CapabilityVerifier {
    pub fn new(public_key: &[u8]) -> Result<CapabilityVerifier, CapabilityError> {
        if public_key.len() != 32 {
            return Err(CapabilityError::BadKey(format!("an Ed25519 key has 32 bytes, not {}", public_key.len())));
        }
        Ok(CapabilityVerifier { public_key: public_key.to_vec() })
    }

    pub fn public_key(&self) -> &[u8] {
        &self.public_key
    }

    /// The capability `token` carries, if the cluster's key signed it.
    /// Whether it has expired, and for whom it is, is the caller's to check.
    pub fn verify(&self, token: &[u8]) -> Result<Capability, CapabilityError> {
        let split = token.len().checked_sub(SIGNATURE_LEN).ok_or(CapabilityError::Malformed)?;
        let (body, signature) = token.split_at(split);
        UnparsedPublicKey::new(&ED25519, &self.public_key)
            .verify(body, signature)
            .map_err(|_| CapabilityError::BadSignature)?;
        Capability::decode(body).ok_or(CapabilityError::Malformed)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn capability() -> Capability {
        Capability { data_id: 7, node: "node-a".into(), epoch: 3, readonly: false, expires_at_ms: 1_000 }
    }

    fn pair() -> (CapabilityIssuer, CapabilityVerifier) {
        let issuer = CapabilityIssuer::from_pkcs8(&CapabilityIssuer::generate_key().unwrap()).unwrap();
        let verifier = CapabilityVerifier::new(&issuer.public_key()).unwrap();
        (issuer, verifier)
    }

    #[test]
    fn a_signed_capability_verifies_as_issued() {
        let (issuer, verifier) = pair();
        let readonly = Capability { readonly: true, ..capability() };
        assert_eq!(verifier.verify(&issuer.issue(&capability())).unwrap(), capability());
        assert_eq!(verifier.verify(&issuer.issue(&readonly)).unwrap(), readonly);
    }

    #[test]
    fn any_changed_byte_voids_the_token() {
        let (issuer, verifier) = pair();
        let token = issuer.issue(&capability());
        for at in 0..token.len() {
            let mut forged = token.clone();
            forged[at] ^= 0x01;
            assert!(verifier.verify(&forged).is_err(), "byte {at} changed and still verified");
        }
        assert_eq!(verifier.verify(&token[..10]), Err(CapabilityError::Malformed));
    }

    #[test]
    fn another_clusters_key_does_not_verify() {
        let (issuer, _) = pair();
        let (_, other) = pair();
        assert_eq!(other.verify(&issuer.issue(&capability())), Err(CapabilityError::BadSignature));
    }
}
