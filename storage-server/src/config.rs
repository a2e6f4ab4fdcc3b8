//! Server configuration, and the `serve` command line that builds it.
//! Every flag has a `BALLAST_STORAGE_*` environment variable fallback.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use ballast_proto::size::parse_size;
use ballast_telemetry::LogFormat;

use crate::store::backend::BackendChoice;

/// How long an orphaned chunk stays in the trash by default: a day to notice
/// that metadata was lost or misconfigured before anything is deleted.
pub const DEFAULT_ORPHAN_GRACE: Duration = Duration::from_secs(24 * 3600);

/// Everything a chunk server needs to start.
#[derive(Clone, Debug)]
pub struct Config {
    /// TCP listen address (`None`: unix socket only).
    pub listen: Option<SocketAddr>,
    /// Unix socket path for local peers.
    pub unix: Option<PathBuf>,
    pub data_dir: PathBuf,
    pub io_backend: BackendChoice,
    /// Bytes available for chunks (default: free space of the data directory).
    pub capacity: Option<u64>,
    /// Failure-domain labels (zone, rack, host...).
    pub labels: BTreeMap<String, String>,
    /// Server id (default: random, persisted in the data directory).
    pub server_id: Option<String>,
    pub metrics_addr: Option<SocketAddr>,
    /// Background scrub rate in bytes per second (0: off).
    pub scrub_rate: u64,
    /// Metadata service endpoints.
    pub meta: Vec<String>,
    /// How long a chunk metadata no longer references waits in the trash.
    pub orphan_grace: Duration,
    /// Certificate directory (role storage, named by the server id): the
    /// server's id, and mutual TLS with the metadata service.
    pub tls_dir: Option<PathBuf>,
    /// Most data-plane connections open at once (TCP and unix together);
    /// one more is closed as soon as it is accepted.
    pub max_connections: usize,
}

/// Room for a volume engine's two connections per volume from many nodes,
/// well inside a daemon's usual descriptor limit.
pub const DEFAULT_MAX_CONNECTIONS: usize = 8192;

impl Config {
    /// Defaults for a server on `data_dir`, listening on an ephemeral
    /// loopback port, without background scrub.
    pub fn new(data_dir: impl Into<PathBuf>) -> Config {
        Config {
            listen: Some(SocketAddr::from(([127, 0, 0, 1], 0))),
            unix: None,
            data_dir: data_dir.into(),
            io_backend: BackendChoice::Auto,
            capacity: None,
            labels: BTreeMap::new(),
            server_id: None,
            metrics_addr: None,
            scrub_rate: 0,
            meta: Vec::new(),
            orphan_grace: DEFAULT_ORPHAN_GRACE,
            tls_dir: None,
            max_connections: DEFAULT_MAX_CONNECTIONS,
        }
    }
}

/// Failure-domain labels: `key=value,key=value`.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Labels(pub BTreeMap<String, String>);

pub fn parse_labels(text: &str) -> Result<Labels, String> {
    let mut labels = BTreeMap::new();
    for pair in text.split(',').map(str::trim).filter(|p| !p.is_empty()) {
        let (k, v) = pair.split_once('=').ok_or_else(|| format!("label {pair:?} is not key=value"))?;
        if k.trim().is_empty() {
            return Err(format!("label {pair:?} has an empty key"));
        }
        labels.insert(k.trim().to_string(), v.trim().to_string());
    }
    Ok(Labels(labels))
}

/// `storage-server serve` flags.
#[derive(Clone, Debug, clap::Args)]
pub struct ServeArgs {
    /// TCP address to serve the data-plane protocol on.
    #[arg(long, env = "BALLAST_STORAGE_LISTEN", default_value = "0.0.0.0:7400")]
    pub listen: SocketAddr,
    /// Also serve on this unix socket (for peers on the same host).
    #[arg(long, env = "BALLAST_STORAGE_UNIX")]
    pub unix: Option<PathBuf>,
    /// Directory holding chunks, the activity log and fencing state.
    #[arg(long, env = "BALLAST_STORAGE_DATA_DIR")]
    pub data_dir: PathBuf,
    /// Disk I/O backend.
    #[arg(long, env = "BALLAST_STORAGE_IO_BACKEND", value_enum, default_value_t = BackendChoice::Auto)]
    pub io_backend: BackendChoice,
    /// Bytes available for chunks, e.g. 500GiB (default: free space of the data directory).
    #[arg(long, env = "BALLAST_STORAGE_CAPACITY", value_parser = parse_size)]
    pub capacity: Option<u64>,
    /// Failure-domain labels, e.g. zone=a,rack=r12.
    #[arg(long, env = "BALLAST_STORAGE_LABELS", value_parser = parse_labels, default_value = "")]
    pub labels: Labels,
    /// Server id (default: random, generated on first start and kept in the data directory).
    #[arg(long, env = "BALLAST_STORAGE_SERVER_ID")]
    pub server_id: Option<String>,
    /// Address of the Prometheus metrics endpoint.
    #[arg(long, env = "BALLAST_STORAGE_METRICS_ADDR")]
    pub metrics_addr: Option<SocketAddr>,
    #[arg(long, env = "BALLAST_STORAGE_LOG_FORMAT", value_enum, default_value_t = LogFormat::Human)]
    pub log_format: LogFormat,
    /// Background scrub rate in bytes per second, e.g. 16MiB (0 disables).
    #[arg(long, env = "BALLAST_STORAGE_SCRUB_RATE", value_parser = parse_size, default_value = "16MiB")]
    pub scrub_rate: u64,
    /// Metadata service endpoints, comma-separated.
    #[arg(long, env = "BALLAST_STORAGE_META", value_delimiter = ',')]
    pub meta: Vec<String>,
    /// Seconds a chunk metadata no longer references stays in DATA_DIR/trash
    /// before it is deleted (`storage-server trash restore` brings it back).
    #[arg(long, env = "BALLAST_STORAGE_ORPHAN_GRACE", default_value_t = DEFAULT_ORPHAN_GRACE.as_secs())]
    pub orphan_grace: u64,
    /// Most data-plane connections open at once; one more is closed as
    /// soon as it is accepted (`ballast_storage_connections_over_limit_total`),
    /// so that no client holds every descriptor of the server.
    #[arg(long, env = "BALLAST_STORAGE_MAX_CONNECTIONS", default_value_t = DEFAULT_MAX_CONNECTIONS)]
    pub max_connections: usize,
    /// The server's certificate (`ballast pki issue --role storage --name
    /// SERVER_ID`: also its id), or --insecure.
    #[command(flatten)]
    pub tls: ballast_tls::ServeTls,
}

impl ServeArgs {
    pub fn into_config(self) -> Result<Config, ballast_tls::TlsError> {
        let tls_dir = self.tls.resolve()?.map(|dir| dir.path().to_path_buf());
        Ok(Config {
            listen: Some(self.listen),
            unix: self.unix,
            data_dir: self.data_dir,
            io_backend: self.io_backend,
            capacity: self.capacity,
            labels: self.labels.0,
            server_id: self.server_id,
            metrics_addr: self.metrics_addr,
            scrub_rate: self.scrub_rate,
            meta: self.meta.into_iter().filter(|m| !m.trim().is_empty()).collect(),
            orphan_grace: Duration::from_secs(self.orphan_grace),
            tls_dir,
            max_connections: self.max_connections.max(1),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn labels_parse() {
        let labels = parse_labels("zone=a, rack=r1").unwrap();
        assert_eq!(labels.0.get("rack").map(String::as_str), Some("r1"));
        assert_eq!(parse_labels("").unwrap(), Labels::default());
        assert!(parse_labels("zone").is_err());
    }
}
