//! The client library every Ballast component uses to talk to the metadata
//! service. It knows every member, follows the leader (by the address a
//! follower names, else by trying the next member with backoff), and puts a
//! deadline on every call.

use std::collections::HashMap;
use std::future::Future;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use ballast_proto::frame::Connector;
use ballast_proto::meta as pb;
use ballast_proto::meta::cluster_client::ClusterClient;
use ballast_proto::meta::meta_client::MetaClient as MetaGrpc;
use ballast_tls::connect::grpc_connector;
use ballast_tls::rustls::ClientConfig;
use ballast_tls::{Identity, Role, TlsDir};
use rand::Rng;
use tokio::time::Instant;
use tonic::transport::{Channel, Endpoint};
use tonic::{Code, Response, Status};

use crate::LEADER_HEADER;

/// Environment variable holding comma-separated metadata endpoints.
pub const META_ENV: &str = "BALLAST_META";

const DEFAULT_DEADLINE: Duration = Duration::from_secs(15);
const ATTEMPT_TIMEOUT: Duration = Duration::from_secs(3);
const FIRST_BACKOFF: Duration = Duration::from_millis(25);
const MAX_BACKOFF: Duration = Duration::from_millis(800);

#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    #[error("no metadata endpoints given (use --meta or {META_ENV})")]
    NoEndpoints,
    #[error("invalid metadata endpoint {0:?}: {1}")]
    BadEndpoint(String, String),
    #[error("TLS: {0}")]
    Tls(#[from] ballast_tls::TlsError),
}

/// A handle to the metadata cluster; cheap to clone.
#[derive(Clone)]
pub struct MetaClient {
    inner: Arc<Inner>,
}

struct Inner {
    endpoints: Vec<String>,
    channels: Mutex<HashMap<String, Channel>>,
    /// The member believed to be the leader.
    leader: Mutex<Option<String>>,
    deadline: Duration,
    /// Mutual TLS to the members; `None`: plaintext.
    tls: Option<Arc<ClientConfig>>,
    /// Who the certificate says this client is; `None`: plaintext.
    identity: Option<Identity>,
    /// How this client's process reaches chunk servers: with the same
    /// certificate, or in plaintext.
    chunk_servers: Connector,
}

/// Splits `a:1,b:2` into endpoints, ignoring blanks.
pub fn parse_endpoints(list: &str) -> Vec<String> {
    list.split(',').map(str::trim).filter(|s| !s.is_empty()).map(String::from).collect()
}

fn is_retryable(status: &Status) -> bool {
    matches!(status.code(), Code::Unavailable | Code::Unknown | Code::Cancelled | Code::DeadlineExceeded)
}

fn leader_hint(status: &Status) -> Option<String> {
    status.metadata().get(LEADER_HEADER)?.to_str().ok().map(String::from)
}

impl MetaClient {
    /// A client for the members at `endpoints` (`host:port`).
    pub fn new<S: Into<String>>(endpoints: impl IntoIterator<Item = S>) -> Result<Self, ClientError> {
        let endpoints: Vec<String> = endpoints.into_iter().map(Into::into).collect();
        if endpoints.is_empty() {
            return Err(ClientError::NoEndpoints);
        }
        for endpoint in &endpoints {
            Endpoint::from_shared(format!("http://{endpoint}"))
                .map_err(|e| ClientError::BadEndpoint(endpoint.clone(), e.to_string()))?;
        }
        Ok(Self {
            inner: Arc::new(Inner {
                endpoints,
                channels: Mutex::new(HashMap::new()),
                leader: Mutex::new(None),
                deadline: DEFAULT_DEADLINE,
                tls: None,
                identity: None,
                chunk_servers: Connector::plaintext(),
            }),
        })
    }

    /// A client for a comma-separated endpoint list.
    pub fn from_list(list: &str) -> Result<Self, ClientError> {
        Self::new(parse_endpoints(list))
    }

    /// The same cluster with another overall deadline per call.
    pub fn with_deadline(&self, deadline: Duration) -> Self {
        let inner = Inner {
            endpoints: self.inner.endpoints.clone(),
            channels: Mutex::new(self.inner.channels.lock().expect("lock").clone()),
            leader: Mutex::new(self.inner.leader.lock().expect("lock").clone()),
            deadline,
            tls: self.inner.tls.clone(),
            identity: self.inner.identity.clone(),
            chunk_servers: self.inner.chunk_servers.clone(),
        };
        Self { inner: Arc::new(inner) }
    }

    /// The same cluster over mutual TLS, presenting the certificate in
    /// `dir` and talking only to metadata members of its authority.
    pub fn with_tls(&self, dir: &TlsDir) -> Result<Self, ClientError> {
        let inner = Inner {
            endpoints: self.inner.endpoints.clone(),
            channels: Mutex::new(HashMap::new()),
            leader: Mutex::new(None),
            deadline: self.inner.deadline,
            tls: Some(ballast_tls::client_config(dir, &[Role::Meta])?),
            identity: Some(dir.identity()?),
            chunk_servers: Connector::tls(dir)?,
        };
        Ok(Self { inner: Arc::new(inner) })
    }

    /// Over mutual TLS with the certificate directory `dir`, if given.
    pub fn with_tls_dir(self, dir: Option<&std::path::Path>) -> Result<Self, ClientError> {
        match dir {
            Some(dir) => self.with_tls(&TlsDir::open(dir)?),
            None => Ok(self),
        }
    }

    /// Connects to chunk servers as this client does to the metadata
    /// service: over mutual TLS with its certificate, or in plaintext.
    pub fn chunk_servers(&self) -> &Connector {
        &self.inner.chunk_servers
    }

    /// The identity this client's certificate proves; `None` in plaintext.
    pub fn identity(&self) -> Option<&Identity> {
        self.inner.identity.as_ref()
    }

    pub fn endpoints(&self) -> &[String] {
        &self.inner.endpoints
    }

    fn channel(&self, endpoint: &str) -> Channel {
        let mut channels = self.inner.channels.lock().expect("lock");
        channels
            .entry(endpoint.to_string())
            .or_insert_with(|| {
                let endpoint = Endpoint::from_shared(format!("http://{endpoint}"))
                    .expect("endpoints are validated in new()")
                    .connect_timeout(Duration::from_millis(500))
                    .tcp_nodelay(true);
                match &self.inner.tls {
                    Some(tls) => endpoint.connect_with_connector_lazy(grpc_connector(tls.clone())),
                    None => endpoint.connect_lazy(),
                }
            })
            .clone()
    }

    /// Runs `call` against the leader, following redirects and retrying
    /// members that are down until the deadline passes.
    async fn call<T, F, Fut>(&self, call: F) -> Result<T, Status>
    where
        F: Fn(Channel) -> Fut,
        Fut: Future<Output = Result<Response<T>, Status>>,
    {
        let deadline = Instant::now() + self.inner.deadline;
        let mut backoff = FIRST_BACKOFF;
        let mut next_member = rand::rng().random_range(0..self.inner.endpoints.len());
        loop {
            let target = self.inner.leader.lock().expect("lock").clone().unwrap_or_else(|| {
                next_member = (next_member + 1) % self.inner.endpoints.len();
                self.inner.endpoints[next_member].clone()
            });
            let attempt = tokio::time::timeout(ATTEMPT_TIMEOUT, call(self.channel(&target))).await;
            let status = match attempt {
                Ok(Ok(response)) => {
                    *self.inner.leader.lock().expect("lock") = Some(target);
                    return Ok(response.into_inner());
                }
                Ok(Err(status)) if !is_retryable(&status) => return Err(self.explained(status)),
                Ok(Err(status)) => status,
                Err(_) => Status::deadline_exceeded(format!("metadata member {target} did not answer in time")),
            };
            let hint = leader_hint(&status).filter(|hint| *hint != target);
            let follow_hint = hint.is_some();
            *self.inner.leader.lock().expect("lock") = hint;
            if Instant::now() >= deadline {
                // tonic reports a failed connection as UNKNOWN: after
                // retrying to the deadline, the service is unavailable.
                let code = if status.code() == Code::Unknown { Code::Unavailable } else { status.code() };
                return Err(self.explained(Status::new(
                    code,
                    format!("metadata service unavailable after {:?}: {}", self.inner.deadline, status.message()),
                )));
            }
            if !follow_hint {
                let jitter = rand::rng().random_range(0..=backoff.as_millis() as u64 / 2);
                tokio::time::sleep(backoff + Duration::from_millis(jitter)).await;
                backoff = (backoff * 2).min(MAX_BACKOFF);
            }
        }
    }

    /// A plaintext request to a member that serves TLS fails as garbled
    /// HTTP/2: say what is likely missing.
    fn explained(&self, status: Status) -> Status {
        if self.inner.tls.is_some() || !status.message().contains("h2 protocol error") {
            return status;
        }
        let message = format!(
            "{} (the cluster may require TLS: give this client a certificate with --tls-dir or BALLAST_TLS_DIR)",
            status.message()
        );
        Status::new(status.code(), message)
    }

    /// Asks one member directly (no leader following), e.g. for its status.
    pub async fn member_status(&self, endpoint: &str) -> Result<pb::ClusterStatus, Status> {
        let mut client = ClusterClient::new(self.channel(endpoint));
        let reply = tokio::time::timeout(ATTEMPT_TIMEOUT, client.status(pb::StatusRequest {}))
            .await
            .map_err(|_| Status::deadline_exceeded(format!("member {endpoint} did not answer in time")))??;
        Ok(reply.into_inner())
    }
}

/// Generates a leader-following method per RPC of a service.
macro_rules! rpcs {
    ($grpc:ident: $($method:ident($request:ident) -> $reply:ident;)*) => {
        impl MetaClient {
            $(
                pub async fn $method(&self, request: pb::$request) -> Result<pb::$reply, Status> {
                    self.call(|channel| {
                        let request = request.clone();
                        async move { $grpc::new(channel).$method(request).await }
                    })
                    .await
                }
            )*
        }
    };
}

rpcs! { MetaGrpc:
    create_volume(CreateVolumeRequest) -> Volume;
    delete_volume(DeleteVolumeRequest) -> DeleteVolumeResponse;
    get_volume(GetVolumeRequest) -> Volume;
    list_volumes(ListVolumesRequest) -> ListVolumesResponse;
    expand_volume(ExpandVolumeRequest) -> Volume;
    modify_volume(ModifyVolumeRequest) -> Volume;
    create_group_snapshot(CreateGroupSnapshotRequest) -> GroupSnapshot;
    delete_group_snapshot(DeleteGroupSnapshotRequest) -> DeleteGroupSnapshotResponse;
    get_group_snapshot(GetGroupSnapshotRequest) -> GroupSnapshot;
    create_snapshot(CreateSnapshotRequest) -> Snapshot;
    delete_snapshot(DeleteSnapshotRequest) -> DeleteSnapshotResponse;
    list_snapshots(ListSnapshotsRequest) -> ListSnapshotsResponse;
    complete_snapshot(CompleteSnapshotRequest) -> Snapshot;
    mark_volume_ready(MarkVolumeReadyRequest) -> Volume;
    register_chunk_server(RegisterChunkServerRequest) -> ChunkServer;
    heartbeat(HeartbeatRequest) -> HeartbeatResponse;
    list_chunk_servers(ListChunkServersRequest) -> ListChunkServersResponse;
    set_draining(SetDrainingRequest) -> ChunkServer;
    allocate_chunk(AllocateChunkRequest) -> ChunkReplicaSet;
    get_chunk_map(GetChunkMapRequest) -> ChunkMap;
    report_failed_replica(ReportFailedReplicaRequest) -> ChunkReplicaSet;
    publish_volume(PublishVolumeRequest) -> Attachment;
    unpublish_volume(UnpublishVolumeRequest) -> UnpublishVolumeResponse;
    list_attachments(ListAttachmentsRequest) -> ListAttachmentsResponse;
    issue_capability(IssueCapabilityRequest) -> VolumeCapability;
    register_node(RegisterNodeRequest) -> CsiNode;
    get_node(GetNodeRequest) -> CsiNode;
}

rpcs! { ClusterClient:
    add_learner(AddLearnerRequest) -> ClusterStatus;
    change_membership(ChangeMembershipRequest) -> ClusterStatus;
    status(StatusRequest) -> ClusterStatus;
}

impl MetaClient {
    /// Initialises a new cluster through the first endpoint.
    pub async fn initialize(&self, members: Vec<pb::Member>) -> Result<pb::ClusterStatus, Status> {
        let endpoint = self.inner.endpoints[0].clone();
        let mut client = ClusterClient::new(self.channel(&endpoint));
        Ok(client.initialize(pb::InitializeRequest { members }).await?.into_inner())
    }

    /// Finds a volume by id, else by name; NotFound names what was asked.
    pub async fn find_volume(&self, volume: &str) -> Result<pb::Volume, Status> {
        use pb::get_volume_request::Key;
        for key in [Key::Id(volume.to_string()), Key::Name(volume.to_string())] {
            match self.get_volume(pb::GetVolumeRequest { key: Some(key) }).await {
                Err(status) if status.code() == Code::NotFound => continue,
                found => return found,
            }
        }
        Err(Status::not_found(format!("no volume with id or name {volume:?}")))
    }

    /// Fetches every volume, following pagination.
    pub async fn all_volumes(&self) -> Result<Vec<pb::Volume>, Status> {
        let mut volumes = Vec::new();
        let mut page_token = String::new();
        loop {
            let page = self.list_volumes(pb::ListVolumesRequest { page_size: 1000, page_token }).await?;
            volumes.extend(page.volumes);
            if page.next_page_token.is_empty() {
                return Ok(volumes);
            }
            page_token = page.next_page_token;
        }
    }

    /// Fetches every snapshot (of one volume, or all with ""), following
    /// pagination.
    pub async fn all_snapshots(&self, source_volume_id: &str) -> Result<Vec<pb::Snapshot>, Status> {
        let mut snapshots = Vec::new();
        let mut page_token = String::new();
        loop {
            let request = pb::ListSnapshotsRequest {
                source_volume_id: source_volume_id.to_string(),
                page_size: 1000,
                page_token,
                ..Default::default()
            };
            let page = self.list_snapshots(request).await?;
            snapshots.extend(page.snapshots);
            if page.next_page_token.is_empty() {
                return Ok(snapshots);
            }
            page_token = page.next_page_token;
        }
    }
}
