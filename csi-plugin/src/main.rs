//! `csi-plugin`: the Ballast CSI driver (`csi.ballast.io`).

use std::net::SocketAddr;
use std::path::PathBuf;

use anyhow::Context;
use ballast_telemetry::LogFormat;
use clap::Parser;
use csi_plugin::kubelet_registration::KubeletRegistration;
use csi_plugin::{liveness, params, server, Config, Mode};
use meta_client::{parse_endpoints, META_ENV};

/// Ballast CSI plugin: Identity, Controller and Node services on a unix socket.
///
/// Examples:
///   csi-plugin --mode controller --endpoint unix:///csi/csi.sock --meta meta-0:7101,meta-1:7101,meta-2:7101
///   csi-plugin --mode node --node-id "$NODE_NAME" --endpoint unix:///csi/csi.sock --meta meta-0:7101 \
///     --topology topology.ballast.io/cluster=prod --max-volumes 16
#[derive(Parser)]
#[command(name = "csi-plugin", version, verbatim_doc_comment)]
struct Args {
    /// Which services to serve.
    #[arg(long, value_enum, env = "BALLAST_CSI_MODE", default_value = "all")]
    mode: Mode,
    /// The unix socket to listen on.
    #[arg(long, env = "BALLAST_CSI_ENDPOINT", default_value = "unix:///csi/csi.sock")]
    endpoint: String,
    /// This node's id (the Kubernetes node name); required in node and all modes.
    #[arg(long, env = "BALLAST_CSI_NODE_ID")]
    node_id: Option<String>,
    /// Metadata service endpoints, comma-separated host:port.
    #[arg(long, env = META_ENV)]
    meta: String,
    /// Topology labels of the storage cluster this plugin serves, `key=value,...`.
    #[arg(long, env = "BALLAST_CSI_TOPOLOGY", default_value = "")]
    topology: String,
    /// Volumes this node can attach at once, reported to the scheduler (0: no limit).
    #[arg(long, env = "BALLAST_CSI_MAX_VOLUMES", default_value_t = 0)]
    max_volumes: i64,
    /// The nbd-client binary (default: next to csi-plugin, else in PATH).
    #[arg(long, env = "BALLAST_CSI_NBD_CLIENT_BIN")]
    nbd_client_bin: Option<PathBuf>,
    /// Where nbd-client keeps its records of mapped volumes (its --state-dir;
    /// default: nbd-client's own, /run/ballast/nbd). Every plugin and
    /// tool on a node must agree on it.
    #[arg(long, env = "BALLAST_CSI_NBD_STATE_DIR")]
    nbd_state_dir: Option<PathBuf>,
    /// Where the node keeps its per-volume state; must survive plugin restarts.
    #[arg(long, env = "BALLAST_CSI_STATE_DIR", default_value = "/var/lib/kubelet/plugins/csi.ballast.io/state")]
    state_dir: PathBuf,
    /// Serve Prometheus metrics on this address (e.g. 0.0.0.0:9810), and
    /// /healthz: the plugin's own CSI Probe, for a liveness probe.
    #[arg(long, env = "BALLAST_CSI_METRICS_ADDR")]
    metrics_addr: Option<SocketAddr>,
    /// Register the node plugin with the kubelet through this directory
    /// (the kubelet's plugins_registry, e.g. /var/lib/kubelet/plugins_registry).
    #[arg(long, env = "BALLAST_CSI_REGISTRATION_DIR")]
    registration_dir: Option<PathBuf>,
    /// The CSI socket's path as the kubelet sees it, when it differs from
    /// --endpoint's (the plugin runs in a container with its own mounts).
    #[arg(long, env = "BALLAST_CSI_KUBELET_REGISTRATION_PATH", requires = "registration_dir")]
    kubelet_registration_path: Option<PathBuf>,
    #[arg(long, value_enum, env = "BALLAST_CSI_LOG_FORMAT", default_value = "human")]
    log_format: LogFormat,
    /// This plugin's certificate directory (tls.crt, tls.key, ca.crt from
    /// `ballast pki issue`, role node or controller): mutual TLS to the
    /// cluster, for the plugin and the serving processes it starts.
    /// Without it, plaintext.
    #[arg(long, env = "BALLAST_TLS_DIR")]
    tls_dir: Option<PathBuf>,
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    ballast_telemetry::init_tracing(args.log_format);
    if args.max_volumes < 0 {
        anyhow::bail!("--max-volumes must not be negative");
    }
    let topology = params::parse_segments(&args.topology).context("--topology")?;
    let socket = server::socket_path(&args.endpoint)?;
    if let Some(addr) = args.metrics_addr {
        let (bound, _task) = ballast_telemetry::serve_metrics_and_health(addr, liveness::probe_check(socket.clone()))
            .await
            .with_context(|| format!("serving metrics on {addr}"))?;
        tracing::info!(%bound, "metrics and /healthz endpoint");
    }
    let kubelet_registration = args
        .registration_dir
        .map(|dir| KubeletRegistration { dir, csi_endpoint: args.kubelet_registration_path.unwrap_or(socket) });
    let config = Config {
        mode: args.mode,
        endpoint: args.endpoint,
        node_id: args.node_id,
        meta: parse_endpoints(&args.meta),
        topology,
        max_volumes: args.max_volumes,
        nbd_client_bin: args.nbd_client_bin,
        nbd_state_dir: args.nbd_state_dir,
        state_dir: args.state_dir,
        kubelet_registration,
        log_format: args.log_format,
        tls_dir: args.tls_dir,
    };
    csi_plugin::serve(config, ballast_telemetry::shutdown_signal()).await?;
    Ok(())
}
