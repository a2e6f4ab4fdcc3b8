//! How the kubelet finds the node plugin: a socket in its
//! `plugins_registry` directory serving the plugin registration API. The
//! kubelet watches that directory, asks the socket for the driver's name
//! and CSI endpoint, and reports whether it registered the driver. This is
//! what Kubernetes' node-driver-registrar sidecar does for plugins that do
//! not do it themselves.

use std::path::{Path, PathBuf};

use ballast_proto::pluginregistration::registration_server::{Registration, RegistrationServer};
use ballast_proto::pluginregistration::{InfoRequest, PluginInfo, RegistrationStatus, RegistrationStatusResponse};
use tokio::net::UnixListener;
use tokio::task::JoinHandle;
use tokio_stream::wrappers::ReceiverStream;
use tonic::{Request, Response, Status};

use crate::authority;
use crate::identity::DRIVER_NAME;
use crate::server::{prepare_socket, ServerError};

/// CSI versions the driver speaks, as the kubelet expects them listed.
const SUPPORTED_VERSIONS: [&str; 1] = ["1.0.0"];

/// Where to register and what to register.
#[derive(Clone, Debug)]
pub struct KubeletRegistration {
    /// The kubelet's plugins_registry directory, as mounted in this container.
    pub dir: PathBuf,
    /// The CSI socket's path as the kubelet sees it (on the host).
    pub csi_endpoint: PathBuf,
}

impl KubeletRegistration {
    /// `<driver>-reg.sock`, the name the kubelet's documentation recommends.
    pub fn socket(&self) -> PathBuf {
        self.dir.join(format!("{DRIVER_NAME}-reg.sock"))
    }
}

struct RegistrationService {
    csi_endpoint: String,
}

#[tonic::async_trait]
impl Registration for RegistrationService {
    async fn get_info(&self, _request: Request<InfoRequest>) -> Result<Response<PluginInfo>, Status> {
        Ok(Response::new(PluginInfo {
            r#type: "CSIPlugin".to_string(),
            name: DRIVER_NAME.to_string(),
            endpoint: self.csi_endpoint.clone(),
            supported_versions: SUPPORTED_VERSIONS.iter().map(|v| v.to_string()).collect(),
        }))
    }

    async fn notify_registration_status(
        &self,
        request: Request<RegistrationStatus>,
    ) -> Result<Response<RegistrationStatusResponse>, Status> {
        let status = request.into_inner();
        if status.plugin_registered {
            tracing::info!(endpoint = %self.csi_endpoint, "the kubelet registered {DRIVER_NAME}");
        } else {
            tracing::error!(
                endpoint = %self.csi_endpoint,
                "the kubelet refused to register {DRIVER_NAME}: {}; pods on this node cannot use its volumes",
                status.error
            );
        }
        Ok(Response::new(RegistrationStatusResponse {}))
    }
}

/// The registration socket, served until dropped; dropping it removes the
/// socket, and the kubelet then unregisters the driver.
pub struct Registered {
    socket: PathBuf,
    task: JoinHandle<()>,
}

impl Drop for Registered {
    fn drop(&mut self) {
        self.task.abort();
        let _ = std::fs::remove_file(&self.socket);
    }
}

/// Binds the registration socket and serves it in the background.
pub async fn serve(registration: &KubeletRegistration) -> Result<Registered, ServerError> {
    let socket = registration.socket();
    prepare_socket(&socket).await?;
    let listener = UnixListener::bind(&socket).map_err(|source| ServerError::Io {
        op: "binding",
        path: socket.clone(),
        source,
    })?;
    let service = RegistrationService { csi_endpoint: registration.csi_endpoint.display().to_string() };
    tracing::info!(socket = %socket.display(), csi_endpoint = %service.csi_endpoint, "waiting for the kubelet to register the driver");
    let task = tokio::spawn(async move {
        // The kubelet's requests carry the socket path as their authority.
        let (connections, incoming) = tokio::sync::mpsc::channel(4);
        let accepting = tokio::spawn(authority::serve(listener, connections));
        let served = tonic::transport::Server::builder()
            .add_service(RegistrationServer::new(service))
            .serve_with_incoming(ReceiverStream::new(incoming))
            .await;
        accepting.abort();
        if let Err(err) = served {
            tracing::error!("the kubelet registration socket failed: {err}");
        }
    });
    Ok(Registered { socket, task })
}

/// The registration directory must exist: it is the kubelet's, and a
/// missing one means the wrong host path is mounted.
pub fn check_dir(dir: &Path) -> Result<(), ServerError> {
    if dir.is_dir() {
        Ok(())
    } else {
        Err(ServerError::Config(format!(
            "--registration-dir {} is not a directory: mount the kubelet's plugins_registry directory there",
            dir.display()
        )))
    }
}
