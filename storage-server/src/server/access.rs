//! Who may send which requests to a chunk server.
//!
//! Over TLS every connection carries the identity its certificate proved,
//! and each request is checked against the caller's role. A node's
//! certificate reaches only the volumes it presented a capability for on
//! the connection (`AUTHORIZE`, signed by the metadata service for the
//! volumes published to that node), changes them only at the capability's
//! epoch, and only until it expires. The unix socket is reachable only from
//! this machine and its file permissions decide; a server started
//! `--insecure` trusts every caller.

use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::RwLock;

use ballast_proto::frame::{Opcode, Request, RequestHeader, FLAG_ALL_VOLUMES};
use ballast_tls::{Capability, CapabilityVerifier, Identity, Role};

use crate::identity;

/// The other end of a connection.
#[derive(Clone, Debug)]
pub enum Caller {
    /// The unix socket, or a TCP connection to a server without TLS.
    Unauthenticated,
    /// A TLS connection and the identity its certificate names.
    Certified(Identity),
}

impl Caller {
    /// The role a refusal is counted under.
    pub fn role_label(&self) -> &'static str {
        match self {
            Caller::Unauthenticated => "none",
            Caller::Certified(identity) => identity.role.name(),
        }
    }
}

/// The key capabilities are checked with: learnt from the metadata
/// service's heartbeat replies and kept in the data directory.
pub struct ClusterKey {
    data_dir: PathBuf,
    verifier: RwLock<Option<CapabilityVerifier>>,
}

impl ClusterKey {
    pub fn open(data_dir: PathBuf) -> std::io::Result<ClusterKey> {
        let verifier = match identity::capability_key(&data_dir)? {
            Some(key) => Some(CapabilityVerifier::new(&key).map_err(std::io::Error::other)?),
            None => None,
        };
        Ok(ClusterKey { data_dir, verifier: RwLock::new(verifier) })
    }

    /// Takes the key the metadata service announced, if it is new.
    pub fn learn(&self, public_key: &[u8]) {
        if public_key.is_empty() || self.verifier().is_some_and(|v| v.public_key() == public_key) {
            return;
        }
        let verifier = match CapabilityVerifier::new(public_key) {
            Ok(verifier) => verifier,
            Err(e) => return tracing::error!(error = %e, "the metadata service announced an unusable capability key"),
        };
        if let Err(e) = identity::set_capability_key(&self.data_dir, public_key) {
            tracing::warn!(error = %e, "keeping the capability key in the data directory");
        }
        tracing::info!("capability key learnt from the metadata service");
        *self.verifier.write().expect("cluster key lock") = Some(verifier);
    }

    pub fn verifier(&self) -> Option<CapabilityVerifier> {
        self.verifier.read().expect("cluster key lock").clone()
    }
}

/// A refused request: the role it is counted under, and why.
#[derive(Debug)]
pub struct Denied {
    pub role: &'static str,
    pub message: String,
}

/// What the server knows when it decides a request.
pub struct Circumstances<'a> {
    pub key: &'a ClusterKey,
    pub now_ms: u64,
    /// The newest epoch this server has seen for a volume (asked only of
    /// a node's changes).
    pub volume_epoch: &'a dyn Fn(u64) -> u64,
}

/// What one connection may do: its caller, and the capabilities presented
/// on it (volume data id → capability).
pub struct Access {
    caller: Caller,
    capabilities: HashMap<u64, Capability>,
}

/// What a node's engine sends. Everything else (deleting, cloning, pausing,
/// surveying, fencing) is for the metadata service and operators.
fn node_may_send(opcode: Opcode) -> bool {
    matches!(
        opcode,
        Opcode::Ping
            | Opcode::Authorize
            | Opcode::Read
            | Opcode::Write
            | Opcode::Flush
            | Opcode::Trim
            | Opcode::WriteZeroes
            | Opcode::ChunkCreate
            | Opcode::ChunkSetGeneration
    )
}

fn changes_data(opcode: Opcode) -> bool {
    matches!(
        opcode,
        Opcode::Write | Opcode::Trim | Opcode::WriteZeroes | Opcode::ChunkCreate | Opcode::ChunkSetGeneration
    )
}

impl Access {
    pub fn new(caller: Caller) -> Access {
        Access { caller, capabilities: HashMap::new() }
    }

    /// Decides `req`; an `AUTHORIZE` that is accepted takes effect for every
    /// request decided after it.
    pub fn admit(&mut self, req: &Request, now: &Circumstances) -> Result<(), Denied> {
        let Caller::Certified(identity) = &self.caller else { return Ok(()) };
        let denied = |message: String| Denied { role: identity.role.name(), message };
        let deny = |message: String| Err(denied(message));
        let opcode = req.header.opcode;
        match identity.role {
            // Repair, fencing and reconciliation; `ballast` for operators.
            Role::Meta | Role::Admin => Ok(()),
            // Snapshots and clones: the volume data and its chunks, not
            // fencing a volume or surveying the server.
            Role::Controller if matches!(opcode, Opcode::VolumeFence | Opcode::ListChunks | Opcode::Scrub) => {
                deny(format!("a controller certificate may not send {}", opcode.name()))
            }
            Role::Controller => Ok(()),
            // Chunk servers never call each other.
            Role::Storage => deny(format!("a storage certificate may not send {}", opcode.name())),
            Role::Node if !node_may_send(opcode) => deny(format!("a node certificate may not send {}", opcode.name())),
            Role::Node if opcode == Opcode::Authorize => {
                let capability = verify(&req.payload, identity, now).map_err(denied)?;
                self.capabilities.insert(capability.data_id, capability);
                Ok(())
            }
            Role::Node if opcode == Opcode::Ping => Ok(()),
            Role::Node => self.capability_allows(&req.header, now).map_err(denied),
        }
    }

    /// Whether the capability this connection holds for the request's
    /// volume covers the request.
    fn capability_allows(&self, h: &RequestHeader, now: &Circumstances) -> Result<(), String> {
        if h.has_flag(FLAG_ALL_VOLUMES) {
            return Err(format!("a node may not send {} for every volume", h.opcode.name()));
        }
        let Some(capability) = self.capabilities.get(&h.volume) else {
            return Err(format!("no capability for volume {} on this connection", h.volume));
        };
        if now.now_ms >= capability.expires_at_ms {
            return Err(format!("the capability for volume {} has expired", h.volume));
        }
        if !changes_data(h.opcode) {
            return Ok(());
        }
        if capability.readonly {
            return Err(format!("the capability for volume {} is read-only", h.volume));
        }
        // A capability of an attachment that a newer publish replaced
        // changes nothing, whatever the request claims.
        let volume_epoch = (now.volume_epoch)(h.volume);
        if capability.epoch < volume_epoch {
            return Err(format!(
                "the capability for volume {} is for epoch {}, and the volume is at epoch {volume_epoch}",
                h.volume, capability.epoch
            ));
        }
        let carries_epoch = matches!(h.opcode, Opcode::Write | Opcode::Trim | Opcode::WriteZeroes);
        if carries_epoch && h.epoch != capability.epoch {
            return Err(format!("changes to volume {} carry epoch {}, not {}", h.volume, capability.epoch, h.epoch));
        }
        Ok(())
    }
}

/// The capability a node presented, if the cluster signed it for this
/// node and it has not expired.
fn verify(token: &[u8], identity: &Identity, now: &Circumstances) -> Result<Capability, String> {
    let verifier = now
        .key
        .verifier()
        .ok_or("this chunk server has not learnt the cluster's capability key from the metadata service yet")?;
    let capability = verifier.verify(token).map_err(|e| e.to_string())?;
    if capability.node != identity.name {
        return Err(format!("the capability was issued to node {:?}, not {identity}", capability.node));
    }
    if now.now_ms >= capability.expires_at_ms {
        return Err(format!("the capability for volume {} has expired", capability.data_id));
    }
    Ok(capability)
}

#[cfg(test)]
mod tests {
    use super::*;
    use ballast_proto::frame::RequestHeader;
    use ballast_tls::CapabilityIssuer;
    use bytes::Bytes;

    fn certified(role: Role) -> Access {
        Access::new(Caller::Certified(Identity::new(role, "n1").unwrap()))
    }

    fn request(opcode: Opcode, volume: u64, epoch: u64, payload: Bytes) -> Request {
        Request { header: RequestHeader { volume, epoch, ..RequestHeader::new(opcode, 1) }, payload }
    }

    struct Cluster {
        issuer: CapabilityIssuer,
        key: ClusterKey,
        _dir: tempfile::TempDir,
    }

    fn cluster() -> Cluster {
        let dir = tempfile::tempdir().unwrap();
        let issuer = CapabilityIssuer::from_pkcs8(&CapabilityIssuer::generate_key().unwrap()).unwrap();
        let key = ClusterKey::open(dir.path().to_owned()).unwrap();
        key.learn(&issuer.public_key());
        Cluster { issuer, key, _dir: dir }
    }

    fn at<'a>(cluster: &'a Cluster, now_ms: u64, volume_epoch: &'a dyn Fn(u64) -> u64) -> Circumstances<'a> {
        Circumstances { key: &cluster.key, now_ms, volume_epoch }
    }

    fn token(cluster: &Cluster, node: &str, readonly: bool) -> Bytes {
        let capability = Capability { data_id: 5, node: node.into(), epoch: 3, readonly, expires_at_ms: 1000 };
        Bytes::from(cluster.issuer.issue(&capability))
    }

    #[test]
    fn a_node_reaches_only_the_volume_of_its_capability_at_its_epoch() {
        let c = cluster();
        let now = at(&c, 500, &|_| 3);
        let mut node = certified(Role::Node);
        assert!(node.admit(&request(Opcode::Read, 5, 3, Bytes::new()), &now).is_err(), "no capability yet");
        node.admit(&request(Opcode::Authorize, 0, 0, token(&c, "n1", false)), &now).unwrap();
        node.admit(&request(Opcode::Read, 5, 3, Bytes::new()), &now).unwrap();
        node.admit(&request(Opcode::Write, 5, 3, Bytes::new()), &now).unwrap();
        assert!(node.admit(&request(Opcode::Read, 6, 3, Bytes::new()), &now).is_err(), "another volume");
        assert!(node.admit(&request(Opcode::Write, 5, u64::MAX, Bytes::new()), &now).is_err(), "another epoch");
        assert!(node.admit(&request(Opcode::ChunkDelete, 5, 3, Bytes::new()), &now).is_err());
        assert!(node.admit(&request(Opcode::Read, 5, 3, Bytes::new()), &at(&c, 1000, &|_| 3)).is_err(), "expired");
        assert!(node.admit(&request(Opcode::Write, 5, 3, Bytes::new()), &at(&c, 500, &|_| 4)).is_err(), "fenced");
        assert!(node.admit(&request(Opcode::ChunkCreate, 5, 0, Bytes::new()), &at(&c, 500, &|_| 4)).is_err());
    }

    #[test]
    fn a_capability_serves_only_the_node_it_names_and_only_as_issued() {
        let c = cluster();
        let now = at(&c, 500, &|_| 3);
        let mut node = certified(Role::Node);
        let denied = node.admit(&request(Opcode::Authorize, 0, 0, token(&c, "n2", false)), &now).unwrap_err();
        assert!(denied.message.contains("issued to node \"n2\""), "{}", denied.message);
        let readonly = token(&c, "n1", true);
        node.admit(&request(Opcode::Authorize, 0, 0, readonly.clone()), &now).unwrap();
        assert!(node.admit(&request(Opcode::Write, 5, 3, Bytes::new()), &now).is_err(), "read-only");
        let mut forged = readonly.to_vec();
        forged[6 + 24] = 0; // the read-only flag
        assert!(node.admit(&request(Opcode::Authorize, 0, 0, Bytes::from(forged)), &now).is_err());
    }

    #[test]
    fn without_the_clusters_key_no_capability_is_accepted() {
        let c = cluster();
        let dir = tempfile::tempdir().unwrap();
        let unknown = ClusterKey::open(dir.path().to_owned()).unwrap();
        let now = Circumstances { key: &unknown, now_ms: 500, volume_epoch: &|_| 0 };
        let mut node = certified(Role::Node);
        assert!(node.admit(&request(Opcode::Authorize, 0, 0, token(&c, "n1", false)), &now).is_err());
        // Kept in the data directory: known again after a restart.
        assert!(ClusterKey::open(c._dir.path().to_owned()).unwrap().verifier().is_some());
    }

    #[test]
    fn operators_need_no_capability_and_chunk_servers_send_nothing() {
        let c = cluster();
        let now = at(&c, 500, &|_| 3);
        for op in [Opcode::Read, Opcode::ChunkDelete, Opcode::VolumeFence] {
            certified(Role::Meta).admit(&request(op, 5, 3, Bytes::new()), &now).unwrap();
            assert!(certified(Role::Storage).admit(&request(op, 5, 3, Bytes::new()), &now).is_err());
        }
        assert!(certified(Role::Controller).admit(&request(Opcode::VolumeFence, 5, 3, Bytes::new()), &now).is_err());
        certified(Role::Controller).admit(&request(Opcode::ChunkReadStream, 5, 3, Bytes::new()), &now).unwrap();
    }
}
