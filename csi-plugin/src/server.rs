//! The gRPC server on the unix socket the sidecars and the kubelet dial,
//! and [`dial`], a client channel to such a socket.
//!
//! A socket file left behind by a plugin that died is removed at start; a
//! socket something still answers on is never removed: two plugins on one
//! socket would each serve half the calls.

use std::future::Future;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use ballast_proto::csi::controller_server::ControllerServer;
use ballast_proto::csi::group_controller_server::GroupControllerServer;
use ballast_proto::csi::identity_server::IdentityServer;
use ballast_proto::csi::node_server::NodeServer;
use ballast_telemetry::LogFormat;
use meta_client::MetaClient;
use tokio::net::{UnixListener, UnixStream};
use tokio_stream::wrappers::ReceiverStream;
use tonic::transport::{Channel, Endpoint};

use crate::authority;
use crate::controller::ControllerService;
use crate::group_controller::GroupControllerService;
use crate::identity::IdentityService;
use crate::inflight::InFlight;
use crate::kubelet_registration::{self, KubeletRegistration};
use crate::node::attach::NbdClient;
use crate::node::{NodeConfig, NodeService};
use crate::params::Segments;

/// How long shutdown waits for calls in flight.
const DRAIN_LIMIT: Duration = Duration::from_secs(30);

/// Which CSI services this process serves.
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum Mode {
    /// Identity + Controller: one per cluster, next to the provisioner,
    /// attacher, snapshotter and resizer sidecars.
    Controller,
    /// Identity + Node: one per node, next to the registrar.
    Node,
    /// Everything in one process, for single-node clusters and tests. The
    /// controller then serves only this node.
    All,
}

impl Mode {
    pub fn controller(self) -> bool {
        matches!(self, Self::Controller | Self::All)
    }

    pub fn node(self) -> bool {
        matches!(self, Self::Node | Self::All)
    }
}

pub struct Config {
    pub mode: Mode,
    /// `unix:///path/csi.sock`.
    pub endpoint: String,
    /// Required in node and all modes.
    pub node_id: Option<String>,
    /// Metadata service endpoints (`host:port`).
    pub meta: Vec<String>,
    pub topology: Segments,
    /// Reported by NodeGetInfo; 0 means no limit.
    pub max_volumes: i64,
    pub nbd_client_bin: Option<PathBuf>,
    /// `nbd-client --state-dir` (its records of mapped volumes); `None`
    /// leaves nbd-client's default.
    pub nbd_state_dir: Option<PathBuf>,
    pub state_dir: PathBuf,
    /// The plugin's log format, passed on to the serving processes.
    pub log_format: LogFormat,
    /// The plugin's certificate directory (a node's or the controller's),
    /// for mutual TLS to the cluster; passed on to the serving processes.
    /// `None`: plaintext.
    pub tls_dir: Option<PathBuf>,
    /// Register with the kubelet (node mode, without a registrar sidecar).
    pub kubelet_registration: Option<KubeletRegistration>,
}

#[derive(Debug, thiserror::Error)]
pub enum ServerError {
    #[error("endpoint {0:?} is not a unix socket (expected unix:///path/csi.sock)")]
    BadEndpoint(String),
    #[error("{} is in use: another server answers on it; refusing to start (stop it, or pick another --endpoint)", .0.display())]
    SocketInUse(PathBuf),
    #[error("{} exists and is not a socket; refusing to remove it", .0.display())]
    NotASocket(PathBuf),
    #[error("{op} {}: {source}", path.display())]
    Io {
        op: &'static str,
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("{0}")]
    Config(String),
    #[error(transparent)]
    Meta(#[from] meta_client::ClientError),
    #[error("serving gRPC: {0}")]
    Transport(#[from] tonic::transport::Error),
}

fn io_err<'a>(op: &'static str, path: &'a Path) -> impl FnOnce(std::io::Error) -> ServerError + 'a {
    move |source| ServerError::Io { op, path: path.to_path_buf(), source }
}

/// The socket path of a `unix://` endpoint (`unix:///abs`, `unix:/abs` or a
/// bare absolute path).
pub fn socket_path(endpoint: &str) -> Result<PathBuf, ServerError> {
    let path = endpoint.strip_prefix("unix://").or_else(|| endpoint.strip_prefix("unix:")).unwrap_or(endpoint);
    if !path.starts_with('/') {
        return Err(ServerError::BadEndpoint(endpoint.to_string()));
    }
    Ok(PathBuf::from(path))
}

/// A gRPC channel to the server on the unix socket at `path`.
pub async fn dial(path: &Path) -> Result<Channel, tonic::transport::Error> {
    let path = path.to_path_buf();
    // The URI is required by tonic and unused: the connector decides where to go.
    Endpoint::from_static("http://[::]:50051")
        .connect_with_connector(tower::service_fn(move |_| {
            let path = path.clone();
            async move { Ok::<_, std::io::Error>(hyper_util::rt::TokioIo::new(UnixStream::connect(path).await?)) }
        }))
        .await
}

/// Makes `path` free to bind: removes a stale socket, refuses a live one.
pub async fn prepare_socket(path: &Path) -> Result<(), ServerError> {
    use std::os::unix::fs::FileTypeExt;
    match std::fs::symlink_metadata(path) {
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
        Err(e) => return Err(io_err("inspecting", path)(e)),
        Ok(meta) if !meta.file_type().is_socket() => return Err(ServerError::NotASocket(path.to_path_buf())),
        Ok(_) => match tokio::time::timeout(Duration::from_secs(2), UnixStream::connect(path)).await {
            Ok(Ok(_)) | Err(_) => return Err(ServerError::SocketInUse(path.to_path_buf())),
            Ok(Err(e)) if e.kind() == std::io::ErrorKind::ConnectionRefused => {
                tracing::info!(path = %path.display(), "removing a stale socket");
                std::fs::remove_file(path).map_err(io_err("removing", path))?;
            }
            Ok(Err(e)) => return Err(io_err("probing", path)(e)),
        },
    }
    if let Some(parent) = path.parent() {
        std::fs::create_dir_all(parent).map_err(io_err("creating", parent))?;
    }
    Ok(())
}

/// Serves the configured services until `shutdown` completes, then removes
/// the socket.
pub async fn serve(config: Config, shutdown: impl Future<Output = ()> + Send) -> Result<(), ServerError> {
    let path = socket_path(&config.endpoint)?;
    let meta = MetaClient::new(config.meta.clone())?.with_tls_dir(config.tls_dir.as_deref())?;
    let node_id = config.node_id.clone().filter(|id| !id.is_empty());
    if config.mode.node() && node_id.is_none() {
        return Err(ServerError::Config(format!("--node-id is required in {:?} mode", config.mode)));
    }
    if let Some(registration) = &config.kubelet_registration {
        if !config.mode.node() {
            return Err(ServerError::Config("--registration-dir is for the node plugin (--mode node)".into()));
        }
        kubelet_registration::check_dir(&registration.dir)?;
    }
    let inflight = InFlight::default();
    let nbd = NbdClient::new(config.nbd_client_bin.clone(), config.nbd_state_dir.clone(), config.log_format)
        .with_tls_dir(config.tls_dir.clone());

    let controller = config.mode.controller().then(|| {
        let local_node = if config.mode == Mode::All { node_id.clone() } else { None };
        ControllerServer::new(ControllerService::new(
            meta.clone(),
            config.topology.clone(),
            local_node,
            inflight.clone(),
        ))
    });
    let group_controller = config
        .mode
        .controller()
        .then(|| GroupControllerServer::new(GroupControllerService::new(meta.clone(), inflight.clone())));
    let node = match (config.mode.node(), &node_id) {
        (true, Some(node_id)) => Some(Arc::new(NodeService::new(
            NodeConfig {
                node_id: node_id.clone(),
                max_volumes: config.max_volumes,
                topology: config.topology.clone(),
                meta: meta.clone(),
                nbd: nbd.clone(),
                state_dir: config.state_dir.clone(),
            },
            inflight.clone(),
        ))),
        _ => None,
    };
    if let (Some(service), Some(node_id)) = (&node, &node_id) {
        let request = crate::node::registration::request(node_id, config.max_volumes, &config.topology);
        crate::node::registration::register(meta.clone(), request).await;
        match nbd.binary() {
            Ok(binary) => {
                tracing::info!(nbd_client = %binary.display(), "attaching volumes with nbd-client");
                crate::node::host::report_attach_method(&nbd).await;
            }
            Err(err) => tracing::warn!("{err}; volumes cannot be staged until it is installed"),
        }
        if let Err(err) = crate::node::serving_logs::Relay::new(nbd.state_dir()).spawn() {
            tracing::warn!("cannot relay the serving processes' logs: {err}");
        }
        // Within the kernel's dead-connection timeout, while calls are
        // already served.
        let service = service.clone();
        tokio::spawn(async move { service.reattach_orphans().await });
    }
    let node = node.map(NodeServer::from_arc);
    let identity = IdentityServer::new(IdentityService::new(
        config.mode.controller().then(|| meta.clone()),
        config.mode.node().then(|| nbd.clone()),
        !config.topology.is_empty(),
    ));

    prepare_socket(&path).await?;
    let listener = UnixListener::bind(&path).map_err(io_err("binding", &path))?;
    // Only the plugin's own user (root: the kubelet and the sidecars) may
    // call it, whatever the umask says.
    std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o600)).map_err(io_err("restricting", &path))?;
    tracing::info!(
        endpoint = %path.display(),
        mode = ?config.mode,
        node = node_id.as_deref().unwrap_or("-"),
        meta = %config.meta.join(","),
        "serving CSI {} {}",
        crate::identity::DRIVER_NAME,
        crate::identity::VERSION,
    );
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    // gRPC C-core clients (Python's grpcio and the tools built on it) send
    // the socket path as the :authority, which the HTTP/2 server refuses:
    // every connection reaches it through the rewrite.
    let (connections, incoming) = tokio::sync::mpsc::channel(16);
    let accepting = tokio::spawn(authority::serve(listener, connections));
    let mut server = tokio::spawn(
        tonic::transport::Server::builder()
            .add_service(identity)
            .add_optional_service(controller)
            .add_optional_service(group_controller)
            .add_optional_service(node)
            .serve_with_incoming_shutdown(ReceiverStream::new(incoming), async {
                let _ = stopped.await;
            }),
    );
    // The kubelet dials the CSI socket as soon as it reads it here: the
    // listener above already queues its connection.
    let registered = match &config.kubelet_registration {
        Some(registration) => Some(kubelet_registration::serve(registration).await?),
        None => None,
    };
    let result = tokio::select! {
        joined = &mut server => joined.map_err(|e| ServerError::Config(format!("server task failed: {e}"))).and_then(|r| r.map_err(ServerError::from)),
        () = shutdown => {
            // Stop accepting, then wait for the calls in flight (an attach
            // or a mkfs must not be cut in half), not for idle connections:
            // the sidecars keep theirs open.
            accepting.abort();
            let _ = stop.send(());
            let deadline = tokio::time::Instant::now() + DRAIN_LIMIT;
            while crate::metrics::active_calls() > 0 && tokio::time::Instant::now() < deadline {
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
            if crate::metrics::active_calls() > 0 {
                tracing::warn!(calls = crate::metrics::active_calls(), "calls still running after {DRAIN_LIMIT:?}; exiting anyway");
            }
            server.abort();
            Ok(())
        }
    };
    accepting.abort();
    drop(registered);
    let _ = std::fs::remove_file(&path);
    tracing::info!("stopped");
    result
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn endpoints() {
        assert_eq!(socket_path("unix:///csi/csi.sock").unwrap(), PathBuf::from("/csi/csi.sock"));
        assert_eq!(socket_path("unix:/csi/csi.sock").unwrap(), PathBuf::from("/csi/csi.sock"));
        assert_eq!(socket_path("/csi/csi.sock").unwrap(), PathBuf::from("/csi/csi.sock"));
        assert!(socket_path("tcp://127.0.0.1:1").is_err());
        assert!(socket_path("unix://relative").is_err());
    }

    #[tokio::test]
    async fn stale_sockets_go_live_ones_stay() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("csi.sock");
        prepare_socket(&path).await.unwrap();

        let live = UnixListener::bind(&path).unwrap();
        assert!(matches!(prepare_socket(&path).await, Err(ServerError::SocketInUse(_))));
        assert!(path.exists());
        drop(live);
        // The listener is gone, its file is not: stale. (A test running
        // in parallel may fork while the listener is open; the child holds
        // it until it execs, so give it a moment.)
        let mut attempts = 0;
        while let Err(ServerError::SocketInUse(_)) = prepare_socket(&path).await {
            attempts += 1;
            assert!(attempts < 50, "the closed listener's socket is still taken for a live one");
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        assert!(!path.exists());

        std::fs::write(&path, b"not a socket").unwrap();
        assert!(matches!(prepare_socket(&path).await, Err(ServerError::NotASocket(_))));
    }
}
