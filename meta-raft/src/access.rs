//! Who may call what. Over mutual TLS every connection carries its
//! caller's [`Peer`] identity, and [`Authorize`] checks the role against
//! [`allowed`] before a call reaches a service: a refused call gets
//! PERMISSION_DENIED and is counted. A member serving without TLS
//! (`--insecure`) has no identities to check and lets every call through.

use std::future::Future;
use std::pin::Pin;
use std::task::{Context, Poll};

use ballast_tls::{Peer, Role};
use meta_client::EPHEMERAL_NODE;
use tonic::Status;

use crate::metrics::DENIED_CALLS;

const ANY: &[Role] = &[Role::Meta, Role::Storage, Role::Node, Role::Controller, Role::Admin];
const OPERATORS: &[Role] = &[Role::Controller, Role::Admin];

/// The roles that may call `method` (the last part of the gRPC path) of
/// `service`; none for a method not listed.
pub fn allowed(service: &str, method: &str) -> &'static [Role] {
    match (service, method) {
        // Only members vote and replicate.
        ("Raft", _) => &[Role::Meta],
        ("Cluster", "Status") => ANY,
        ("Cluster", "Initialize" | "AddLearner" | "ChangeMembership") => &[Role::Admin],
        (
            "Meta",
            "GetVolume" | "ListVolumes" | "ListSnapshots" | "ListAttachments" | "GetChunkMap" | "ListChunkServers"
            | "GetNode" | "GetGroupSnapshot",
        ) => ANY,
        (
            "Meta",
            "ExpandVolume"
            | "ModifyVolume"
            | "CreateSnapshot"
            | "DeleteSnapshot"
            | "CompleteSnapshot"
            | "MarkVolumeReady"
            | "CreateGroupSnapshot"
            | "DeleteGroupSnapshot",
        ) => OPERATORS,
        // The controller creates and publishes volumes for nodes. A node
        // does so only for the inline ephemeral volumes it owns (checked in
        // the handler, `check_node_owns`): publishing any other volume to
        // itself would get it a capability for that volume's data.
        ("Meta", "CreateVolume" | "DeleteVolume" | "PublishVolume") => &[Role::Node, Role::Controller, Role::Admin],
        ("Meta", "UnpublishVolume") => &[Role::Node, Role::Controller, Role::Admin],
        // A node's capabilities, for the volumes published to it.
        ("Meta", "IssueCapability") => &[Role::Node],
        // Writers of volumes: the node's engine, the controller's copies.
        ("Meta", "AllocateChunk" | "ReportFailedReplica") => &[Role::Node, Role::Controller, Role::Admin],
        ("Meta", "RegisterChunkServer" | "Heartbeat") => &[Role::Storage],
        ("Meta", "SetDraining") => &[Role::Admin],
        ("Meta", "RegisterNode") => &[Role::Node, Role::Admin],
        _ => &[],
    }
}

/// Splits `/ballast.meta.v1.Meta/CreateVolume` into `("Meta", "CreateVolume")`.
fn service_and_method(path: &str) -> (&str, &str) {
    let (service, method) = path.trim_start_matches('/').split_once('/').unwrap_or((path, ""));
    (service.rsplit('.').next().unwrap_or(service), method)
}

/// Whether `peer` may call `path`; the refusal says who and what.
pub fn check(path: &str, peer: Option<&Peer>) -> Result<(), Status> {
    let Some(peer) = peer else { return Ok(()) };
    let (service, method) = service_and_method(path);
    let roles = allowed(service, method);
    if roles.contains(&peer.identity.role) {
        return Ok(());
    }
    DENIED_CALLS.with_label_values(&[peer.identity.role.name(), method]).inc();
    tracing::warn!(peer = %peer.identity, addr = %peer.addr, %service, %method, "call refused: role not allowed");
    let wanted: Vec<&str> = roles.iter().map(|r| r.name()).collect();
    Err(Status::permission_denied(if wanted.is_empty() {
        format!("{service}/{method} is not a call anyone may make")
    } else {
        format!("{} may not call {service}/{method} (needs {})", peer.identity, wanted.join(" or "))
    }))
}

/// A caller of `role` may act only as itself: a chunk server registers and
/// heartbeats for its own id, a node registers and attaches volumes for
/// its own node id. Other roles allowed the call act for anyone.
pub fn check_acting_as<T>(request: &tonic::Request<T>, role: Role, claimed: &str) -> Result<(), Status> {
    let Some(peer) = request.extensions().get::<Peer>() else { return Ok(()) };
    if peer.identity.role != role || peer.identity.name == claimed {
        return Ok(());
    }
    DENIED_CALLS.with_label_values(&[peer.identity.role.name(), "ActAsAnother"]).inc();
    tracing::warn!(peer = %peer.identity, addr = %peer.addr, claimed, "call refused: acting as another");
    Err(Status::permission_denied(format!("{} may act only as itself, not as {claimed:?}", peer.identity)))
}

/// A node certificate acts only on the inline ephemeral volumes it owns:
/// `owner` is the volume's [`EPHEMERAL_NODE`] (`None`: not ephemeral).
/// Other roles allowed the call act on any volume.
pub fn check_node_owns<T>(request: &tonic::Request<T>, volume: &str, owner: Option<&str>) -> Result<(), Status> {
    let Some(peer) = request.extensions().get::<Peer>() else { return Ok(()) };
    if peer.identity.role != Role::Node || owner == Some(peer.identity.name.as_str()) {
        return Ok(());
    }
    DENIED_CALLS.with_label_values(&[peer.identity.role.name(), "NotItsVolume"]).inc();
    tracing::warn!(peer = %peer.identity, addr = %peer.addr, volume, "call refused: not the node's ephemeral volume");
    Err(Status::permission_denied(format!(
        "{} acts only on the inline ephemeral volumes it owns ({EPHEMERAL_NODE}={}), not on {volume}",
        peer.identity, peer.identity.name
    )))
}

/// The tower layer in front of every service of a member.
#[derive(Clone)]
pub struct Authorize<S> {
    inner: S,
}

impl<S> Authorize<S> {
    pub fn new(inner: S) -> Self {
        Self { inner }
    }
}

type BoxFuture<T> = Pin<Box<dyn Future<Output = T> + Send + 'static>>;

impl<S, B> tower::Service<http::Request<B>> for Authorize<S>
where
    S: tower::Service<http::Request<B>, Response = http::Response<tonic::body::Body>>,
    S::Future: Send + 'static,
{
    type Response = S::Response;
    type Error = S::Error;
    type Future = BoxFuture<Result<Self::Response, Self::Error>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, request: http::Request<B>) -> Self::Future {
        match check(request.uri().path(), request.extensions().get::<Peer>()) {
            Ok(()) => Box::pin(self.inner.call(request)),
            Err(status) => Box::pin(async move { Ok(status.into_http()) }),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use ballast_tls::Identity;

    fn peer(role: Role) -> Peer {
        Peer { identity: Identity::new(role, "x").unwrap(), addr: "127.0.0.1:1".parse().unwrap() }
    }

    #[test]
    fn roles_decide() {
        let delete = "/ballast.meta.v1.Meta/DeleteVolume";
        assert!(check(delete, Some(&peer(Role::Controller))).is_ok());
        let expand = "/ballast.meta.v1.Meta/ExpandVolume";
        let denied = check(expand, Some(&peer(Role::Node))).unwrap_err();
        assert_eq!(denied.code(), tonic::Code::PermissionDenied);
        assert!(denied.message().contains("node/x may not call Meta/ExpandVolume (needs controller or admin)"));
        assert!(check("/ballast.meta.v1.Raft/Vote", Some(&peer(Role::Admin))).is_err());
        assert!(check("/ballast.meta.v1.Raft/Vote", Some(&peer(Role::Meta))).is_ok());
        assert!(check("/ballast.meta.v1.Meta/Heartbeat", Some(&peer(Role::Node))).is_err());
        assert!(check("/ballast.meta.v1.Meta/Unknown", Some(&peer(Role::Admin))).is_err());
        // Without TLS there is nobody to check.
        assert!(check(delete, None).is_ok());
    }
}
