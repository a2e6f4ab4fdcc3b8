//! The sending side of the Raft RPCs.

use std::sync::Arc;
use std::time::Duration;

use ballast_proto::meta::raft_client::RaftClient;
use ballast_proto::meta::RaftMessage;
use ballast_tls::connect::grpc_connector;
use ballast_tls::rustls::ClientConfig;
use openraft::error::{InstallSnapshotError, NetworkError, RPCError, RaftError, RemoteError, Unreachable};
use openraft::network::{RPCOption, RaftNetwork, RaftNetworkFactory};
use openraft::raft::{
    AppendEntriesRequest, AppendEntriesResponse, InstallSnapshotRequest, InstallSnapshotResponse, VoteRequest,
    VoteResponse,
};
use openraft::BasicNode;
use serde::de::DeserializeOwned;
use serde::Serialize;
use tonic::transport::{Channel, Endpoint};

use crate::types::{NodeId, TypeConfig};

const CONNECT_TIMEOUT: Duration = Duration::from_millis(500);

/// Creates one [`PeerClient`] per replication target.
#[derive(Clone, Default)]
pub struct PeerNetwork {
    /// Mutual TLS to peers that must be metadata members; `None` with
    /// `--insecure`.
    tls: Option<Arc<ClientConfig>>,
}

impl PeerNetwork {
    pub fn new(tls: Option<Arc<ClientConfig>>) -> Self {
        Self { tls }
    }
}

impl RaftNetworkFactory<TypeConfig> for PeerNetwork {
    type Network = PeerClient;

    async fn new_client(&mut self, target: NodeId, node: &BasicNode) -> PeerClient {
        let channel = Endpoint::from_shared(format!("http://{}", node.addr))
            .map(|endpoint| {
                let endpoint = endpoint.connect_timeout(CONNECT_TIMEOUT);
                match &self.tls {
                    Some(tls) => endpoint.connect_with_connector_lazy(grpc_connector(tls.clone())),
                    None => endpoint.connect_lazy(),
                }
            })
            .map_err(|e| format!("peer {target} has an invalid address {:?}: {e}", node.addr));
        PeerClient { target, channel }
    }
}

/// A lazily connected channel to one peer.
pub struct PeerClient {
    target: NodeId,
    channel: Result<Channel, String>,
}

type RpcResult<T, E> = Result<T, RPCError<NodeId, BasicNode, E>>;

impl PeerClient {
    async fn call<Req, Resp, E>(&mut self, method: Method, request: &Req, option: &RPCOption) -> RpcResult<Resp, E>
    where
        Req: Serialize,
        Resp: DeserializeOwned,
        E: std::error::Error + DeserializeOwned,
    {
        let channel =
            self.channel.clone().map_err(|msg| RPCError::Unreachable(Unreachable::new(&std::io::Error::other(msg))))?;
        let payload = serde_json::to_vec(request).map_err(|e| RPCError::Network(NetworkError::new(&e)))?;
        let mut client = RaftClient::new(channel).max_decoding_message_size(super::RAFT_MESSAGE_LIMIT);
        let message = tonic::Request::new(RaftMessage { payload });
        let call = async {
            match method {
                Method::AppendEntries => client.append_entries(message).await,
                Method::Vote => client.vote(message).await,
                Method::InstallSnapshot => client.install_snapshot(message).await,
            }
        };
        let reply = match tokio::time::timeout(option.hard_ttl(), call).await {
            Ok(Ok(reply)) => reply.into_inner(),
            Ok(Err(status)) => return Err(RPCError::Unreachable(Unreachable::new(&status))),
            Err(elapsed) => return Err(RPCError::Unreachable(Unreachable::new(&elapsed))),
        };
        let result: Result<Resp, E> =
            serde_json::from_slice(&reply.payload).map_err(|e| RPCError::Network(NetworkError::new(&e)))?;
        result.map_err(|e| RPCError::RemoteError(RemoteError::new(self.target, e)))
    }
}

#[derive(Clone, Copy)]
enum Method {
    AppendEntries,
    Vote,
    InstallSnapshot,
}

impl RaftNetwork<TypeConfig> for PeerClient {
    async fn append_entries(
        &mut self,
        rpc: AppendEntriesRequest<TypeConfig>,
        option: RPCOption,
    ) -> RpcResult<AppendEntriesResponse<NodeId>, RaftError<NodeId>> {
        self.call(Method::AppendEntries, &rpc, &option).await
    }

    async fn install_snapshot(
        &mut self,
        rpc: InstallSnapshotRequest<TypeConfig>,
        option: RPCOption,
    ) -> RpcResult<InstallSnapshotResponse<NodeId>, RaftError<NodeId, InstallSnapshotError>> {
        self.call(Method::InstallSnapshot, &rpc, &option).await
    }

    async fn vote(
        &mut self,
        rpc: VoteRequest<NodeId>,
        option: RPCOption,
    ) -> RpcResult<VoteResponse<NodeId>, RaftError<NodeId>> {
        self.call(Method::Vote, &rpc, &option).await
    }
}
