//! Running one member: storage, Raft, and the gRPC server that carries both
//! the Raft RPCs and the client API.

use std::collections::BTreeMap;
use std::future::Future;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use ballast_proto::frame::Connector;
use ballast_proto::meta::cluster_server::ClusterServer;
use ballast_proto::meta::meta_server::MetaServer;
use ballast_proto::meta::raft_server::RaftServer;
use ballast_tls::accept::HANDSHAKES_IN_FLIGHT;
use ballast_tls::{Acceptor, Role, TlsDir};
use openraft::{BasicNode, Config, SnapshotPolicy};
use tokio::net::TcpListener;
use tokio_stream::wrappers::{ReceiverStream, TcpListenerStream};

use crate::access::Authorize;
use crate::cluster::ClusterService;
use crate::network::{PeerNetwork, RaftService, RAFT_MESSAGE_LIMIT};
use crate::repair::{RepairConfig, Repairer};
use crate::service::MetaService;
use crate::types::{NodeId, Raft};
use crate::{metrics, store};

/// How long calls in flight may take to finish after a shutdown request.
const SHUTDOWN_GRACE: Duration = Duration::from_secs(2);

/// How to run a member.
#[derive(Clone, Debug)]
pub struct MemberConfig {
    pub id: NodeId,
    pub listen: SocketAddr,
    /// Address other members and clients use; defaults to `listen`.
    pub advertise: Option<String>,
    pub data_dir: PathBuf,
    /// Initial voters; when given, an uninitialised member initialises the
    /// cluster with them (every member may do so with the same list).
    pub bootstrap: Vec<(NodeId, String)>,
    /// Build a snapshot after this many log entries.
    pub snapshot_every: u64,
    /// Log entries kept behind a snapshot for lagging followers.
    pub keep_logs: u64,
    /// The repair loop (runs on whichever member leads).
    pub repair: RepairConfig,
    /// This member's certificate directory: mutual TLS for clients and
    /// peers. `None` serves plaintext (`--insecure`).
    pub tls: Option<TlsDir>,
    /// How long a node's capabilities are valid (it renews them at half-life).
    pub capability_lifetime: Duration,
}

#[derive(Debug, thiserror::Error)]
pub enum StartError {
    #[error("opening storage in {dir}: {source}")]
    Storage { dir: PathBuf, source: sled::Error },
    #[error("invalid raft configuration: {0}")]
    Config(String),
    #[error("starting raft: {0}")]
    Raft(String),
    #[error("binding {addr}: {source}")]
    Bind { addr: SocketAddr, source: std::io::Error },
    #[error("serving gRPC: {0}")]
    Serve(#[from] tonic::transport::Error),
    #[error("TLS: {0}")]
    Tls(#[from] ballast_tls::TlsError),
}

fn raft_config(config: &MemberConfig) -> Result<Arc<Config>, StartError> {
    let raft_config = Config {
        cluster_name: "ballast-meta".into(),
        heartbeat_interval: 100,
        election_timeout_min: 400,
        election_timeout_max: 800,
        install_snapshot_timeout: 2_000,
        snapshot_policy: SnapshotPolicy::LogsSinceLast(config.snapshot_every),
        max_in_snapshot_log_to_keep: config.keep_logs,
        purge_batch_size: 64,
        ..Default::default()
    };
    raft_config.validate().map(Arc::new).map_err(|e| StartError::Config(e.to_string()))
}

/// Runs a member until `shutdown` resolves, then stops serving and shuts
/// Raft down cleanly.
pub async fn run(config: MemberConfig, shutdown: impl Future<Output = ()> + Send + 'static) -> Result<(), StartError> {
    let (log_store, state_machine) =
        store::open(&config.data_dir).map_err(|source| StartError::Storage { dir: config.data_dir.clone(), source })?;
    let shared = state_machine.shared();
    let (peers, chunk_servers) = match &config.tls {
        Some(dir) => (PeerNetwork::new(Some(ballast_tls::client_config(dir, &[Role::Meta])?)), Connector::tls(dir)?),
        None => (PeerNetwork::new(None), Connector::plaintext()),
    };
    let raft = Raft::new(config.id, raft_config(&config)?, peers, log_store, state_machine)
        .await
        .map_err(|e| StartError::Raft(e.to_string()))?;
    tokio::spawn(metrics::follow_raft(raft.clone()));

    let listener =
        TcpListener::bind(config.listen).await.map_err(|source| StartError::Bind { addr: config.listen, source })?;
    let advertise = config.advertise.clone().unwrap_or_else(|| config.listen.to_string());
    tracing::info!(id = config.id, listen = %config.listen, %advertise, "metadata member serving");

    if !config.bootstrap.is_empty() {
        bootstrap(&raft, &config.bootstrap).await;
    }

    let (stopping, stopped) = tokio::sync::oneshot::channel::<()>();
    let shutdown = async move {
        shutdown.await;
        let _ = stopping.send(());
    };
    let repair = tokio::spawn(
        Repairer::new(config.id, raft.clone(), shared.clone(), config.repair, chunk_servers.clone()).run(),
    );
    let router = tonic::transport::Server::builder()
        .layer(tower::layer::layer_fn(Authorize::new))
        .add_service(RaftServer::new(RaftService::new(raft.clone())).max_decoding_message_size(RAFT_MESSAGE_LIMIT))
        .add_service(MetaServer::new(MetaService::new(raft.clone(), shared, chunk_servers, config.capability_lifetime)))
        .add_service(ClusterServer::new(ClusterService::new(raft.clone())));
    let tls = config.tls.clone();
    let server = async move {
        match &tls {
            Some(dir) => {
                let acceptor = Acceptor::new(ballast_tls::server_config(dir)?);
                let incoming = acceptor.incoming(listener, HANDSHAKES_IN_FLIGHT, |_, _| metrics::refused_connection());
                router.serve_with_incoming_shutdown(ReceiverStream::new(incoming), shutdown).await?
            }
            None => router.serve_with_incoming_shutdown(TcpListenerStream::new(listener), shutdown).await?,
        }
        Ok::<(), StartError>(())
    };
    // Graceful shutdown waits for every connection to close, and peers and
    // clients keep theirs open: give calls in flight a moment, no more.
    let grace = async {
        if stopped.await.is_ok() {
            tokio::time::sleep(SHUTDOWN_GRACE).await;
        } else {
            std::future::pending::<()>().await;
        }
    };
    let result = tokio::select! {
        result = server => result,
        _ = grace => {
            tracing::info!(id = config.id, "connections still open after {SHUTDOWN_GRACE:?}; closing them");
            Ok(())
        }
    };
    repair.abort();
    tracing::info!(id = config.id, "stopping raft");
    if let Err(e) = raft.shutdown().await {
        tracing::warn!(error = %e, "raft shutdown");
    }
    result
}

async fn bootstrap(raft: &Raft, members: &[(NodeId, String)]) {
    match raft.is_initialized().await {
        Ok(true) => return,
        Ok(false) => {}
        Err(e) => {
            tracing::warn!(error = %e, "cannot tell whether the cluster is initialised");
            return;
        }
    }
    let nodes: BTreeMap<NodeId, BasicNode> =
        members.iter().map(|(id, addr)| (*id, BasicNode { addr: addr.clone() })).collect();
    match raft.initialize(nodes).await {
        Ok(()) => tracing::info!(?members, "initialised a new cluster"),
        // Another member initialised first and already replicated to us.
        Err(e) => tracing::info!(error = %e, "cluster initialisation skipped"),
    }
}
