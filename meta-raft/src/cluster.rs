//! Cluster membership and status (`ballast.meta.v1.Cluster`).

use std::collections::{BTreeMap, BTreeSet};

use ballast_proto::meta as pb;
use ballast_proto::meta::cluster_server::Cluster;
use openraft::error::{InitializeError, RaftError};
use openraft::BasicNode;
use tonic::{Request, Response, Status};

use crate::service::raft_status;
use crate::types::{NodeId, Raft};

pub struct ClusterService {
    raft: Raft,
}

impl ClusterService {
    pub fn new(raft: Raft) -> Self {
        Self { raft }
    }
}

/// This member's view of the cluster.
pub fn status(raft: &Raft) -> pb::ClusterStatus {
    let m = raft.metrics().borrow().clone();
    let membership = m.membership_config.membership();
    let voters: BTreeSet<NodeId> = membership.voter_ids().collect();
    let members: Vec<pb::Member> = membership
        .nodes()
        .map(|(id, node)| pb::Member { id: *id, address: node.addr.clone(), voter: voters.contains(id) })
        .collect();
    let leader_address =
        m.current_leader.and_then(|id| membership.get_node(&id).map(|n| n.addr.clone())).unwrap_or_default();
    pb::ClusterStatus {
        id: m.id,
        term: m.current_term,
        leader_id: m.current_leader.unwrap_or(0),
        leader_address,
        committed_index: crate::metrics::COMMITTED_INDEX.get() as u64,
        applied_index: m.last_applied.map(|l| l.index).unwrap_or(0),
        last_log_index: m.last_log_index.unwrap_or(0),
        members,
        state: format!("{:?}", m.state),
        snapshot_index: m.snapshot.map(|s| s.index).unwrap_or(0),
        purged_index: m.purged.map(|s| s.index).unwrap_or(0),
    }
}

fn member_node(member: &pb::Member) -> Result<(NodeId, BasicNode), Status> {
    if member.id == 0 {
        return Err(Status::invalid_argument("member ids start at 1"));
    }
    if member.address.is_empty() {
        return Err(Status::invalid_argument(format!("member {} has no address", member.id)));
    }
    Ok((member.id, BasicNode { addr: member.address.clone() }))
}

#[tonic::async_trait]
impl Cluster for ClusterService {
    async fn initialize(&self, request: Request<pb::InitializeRequest>) -> Result<Response<pb::ClusterStatus>, Status> {
        let members: BTreeMap<NodeId, BasicNode> =
            request.into_inner().members.iter().map(member_node).collect::<Result<_, _>>()?;
        if members.is_empty() {
            return Err(Status::invalid_argument("at least one member is required"));
        }
        match self.raft.initialize(members).await {
            Ok(()) => {}
            Err(RaftError::APIError(InitializeError::NotAllowed(e))) => {
                return Err(Status::failed_precondition(format!("cluster is already initialised: {e}")))
            }
            Err(RaftError::APIError(e)) => return Err(Status::invalid_argument(e.to_string())),
            Err(RaftError::Fatal(e)) => return Err(Status::unavailable(e.to_string())),
        }
        Ok(Response::new(status(&self.raft)))
    }

    async fn add_learner(
        &self,
        request: Request<pb::AddLearnerRequest>,
    ) -> Result<Response<pb::ClusterStatus>, Status> {
        let r = request.into_inner();
        let member = r.member.ok_or_else(|| Status::invalid_argument("member is required"))?;
        let (id, node) = member_node(&member)?;
        self.raft.add_learner(id, node, r.blocking).await.map_err(raft_status)?;
        Ok(Response::new(status(&self.raft)))
    }

    async fn change_membership(
        &self,
        request: Request<pb::ChangeMembershipRequest>,
    ) -> Result<Response<pb::ClusterStatus>, Status> {
        let r = request.into_inner();
        let voters: BTreeSet<NodeId> = r.voters.into_iter().collect();
        if voters.is_empty() {
            return Err(Status::invalid_argument("at least one voter is required"));
        }
        self.raft.change_membership(voters, r.retain_learners).await.map_err(raft_status)?;
        Ok(Response::new(status(&self.raft)))
    }

    async fn status(&self, _request: Request<pb::StatusRequest>) -> Result<Response<pb::ClusterStatus>, Status> {
        Ok(Response::new(status(&self.raft)))
    }
}
