//! Registration with the metadata service: announcing this server (id,
//! address, failure-domain labels, capacity), heartbeating with usage, and
//! reconciling the chunks held here against what metadata still references.
//!
//! The first registration tells the server its metadata cluster's id, which
//! it keeps in its data directory and sends with every registration and
//! heartbeat: a metadata cluster with another id (bootstrapped afresh after
//! losing its data, or a wrong address) refuses the server, so it never
//! learns of orphans from a cluster that does not know its chunks. Orphans
//! go to the trash (`crate::trash`), deleted after `--orphan-grace`, or
//! earlier when the disk is short of free space.

use std::collections::{BTreeMap, BTreeSet};
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use ballast_proto::meta as pb;
use ballast_tls::TlsDir;
use meta_client::MetaClient;
use tokio::sync::watch;

use crate::identity;
use crate::server::access::ClusterKey;
use crate::store::chunk::ChunkKey;
use crate::store::Store;
use crate::trash;

const HEARTBEAT_INTERVAL: Duration = Duration::from_secs(2);
/// Every this many heartbeats, the chunk list goes along for reconciliation.
const RECONCILE_EVERY: u64 = 5;
const RETRY_BACKOFF: Duration = Duration::from_secs(1);
/// Between attempts after a cluster refused this server (an operator's
/// matter: no hurry, and no log flood).
const REFUSED_BACKOFF: Duration = Duration::from_secs(10);

/// What this server announces about itself.
#[derive(Clone, Debug)]
pub struct Registration {
    pub server_id: String,
    pub tcp_addr: Option<SocketAddr>,
    pub unix_path: Option<PathBuf>,
    pub labels: BTreeMap<String, String>,
    pub capacity: u64,
    /// Where the cluster id and the trash are kept.
    pub data_dir: PathBuf,
    /// How long an orphaned chunk stays in the trash.
    pub orphan_grace: Duration,
}

impl Registration {
    /// The data-plane address volume engines connect to.
    fn address(&self) -> Option<String> {
        match (&self.tcp_addr, &self.unix_path) {
            (Some(addr), _) => Some(addr.to_string()),
            (None, Some(path)) => Some(format!("unix:{}", path.display())),
            (None, None) => None,
        }
    }
}

/// Registers with the metadata service at `meta` and heartbeats until
/// `stop` turns true. Chunks that metadata no longer references (deleted
/// volumes, replicas dropped from their set) go to the trash once two
/// consecutive reconciliations agree.
pub async fn register_and_heartbeat(
    meta: Vec<String>,
    tls: Option<TlsDir>,
    info: Registration,
    store: Arc<Store>,
    key: Arc<ClusterKey>,
    mut stop: watch::Receiver<bool>,
) {
    if meta.is_empty() {
        tracing::info!(server_id = %info.server_id, "metadata service not configured (--meta); running standalone");
        return;
    }
    let Some(address) = info.address() else {
        tracing::warn!("no listener to announce; not registering with the metadata service");
        return;
    };
    let client = MetaClient::new(meta).and_then(|client| match &tls {
        Some(dir) => client.with_tls(dir),
        None => Ok(client),
    });
    let client = match client {
        Ok(client) => client.with_deadline(Duration::from_secs(5)),
        Err(e) => {
            tracing::error!(error = %e, "invalid metadata endpoints; running standalone");
            return;
        }
    };
    let mut cluster_id = match identity::cluster_id(&info.data_dir) {
        Ok(id) => id,
        Err(e) => {
            tracing::error!(error = %e, "reading the cluster id of the data directory; not registering");
            return;
        }
    };
    let mut registered = false;
    let mut refused = false;
    let mut beats = 0u64;
    let mut suspected: BTreeSet<(u64, u64)> = BTreeSet::new();
    loop {
        if !registered {
            let request = pb::RegisterChunkServerRequest {
                id: info.server_id.clone(),
                address: address.clone(),
                capacity_bytes: info.capacity,
                labels: info.labels.clone().into_iter().collect(),
                cluster_id: cluster_id.clone().unwrap_or_default(),
            };
            refused = false;
            match client.register_chunk_server(request).await {
                Ok(server) => match adopt_cluster(&info.data_dir, &mut cluster_id, &server.cluster_id) {
                    Ok(()) => {
                        tracing::info!(server_id = %info.server_id, %address, cluster_id = %server.cluster_id,
                            "registered with the metadata service");
                        registered = true;
                    }
                    Err(message) => {
                        tracing::error!("{message}; not registering, and deleting nothing");
                        refused = true;
                    }
                },
                Err(status) if status.code() == tonic::Code::FailedPrecondition => {
                    tracing::error!(
                        "the metadata service refuses this server: {}; not registering, and deleting \
                        nothing (point --meta at the cluster this data belongs to, or recover that cluster)",
                        status.message()
                    );
                    refused = true;
                }
                Err(e) => tracing::warn!(error = %e, "registering with the metadata service; retrying"),
            }
        }
        if registered {
            let reconcile = beats.is_multiple_of(RECONCILE_EVERY);
            beats += 1;
            let chunks: Vec<pb::HeldChunk> = if reconcile {
                store
                    .list_chunks(None)
                    .iter()
                    .map(|c| pb::HeldChunk { data_id: c.volume, chunk_index: c.chunk, generation: c.generation })
                    .collect()
            } else {
                Vec::new()
            };
            let request = pb::HeartbeatRequest {
                server_id: info.server_id.clone(),
                used_bytes: store.used(),
                capacity_bytes: info.capacity,
                chunks,
                reports_chunks: reconcile,
                cluster_id: cluster_id.clone().unwrap_or_default(),
            };
            let reply = client.heartbeat(request).await;
            if let Ok(reply) = &reply {
                key.learn(&reply.capability_key);
            }
            match reply {
                Ok(reply) if reconcile => {
                    let orphaned: BTreeSet<(u64, u64)> =
                        reply.orphaned.iter().map(|c| (c.data_id, c.chunk_index)).collect();
                    for &(volume, chunk) in orphaned.intersection(&suspected) {
                        trash_orphan(&store, ChunkKey { volume, chunk }, info.orphan_grace).await;
                    }
                    suspected = orphaned;
                    purge_trash(&info.data_dir, info.orphan_grace).await;
                }
                Ok(_) => {}
                Err(status) if matches!(status.code(), tonic::Code::NotFound | tonic::Code::FailedPrecondition) => {
                    tracing::warn!(error = %status.message(), "the metadata service does not accept this server's \
                        heartbeats; registering again");
                    registered = false;
                    suspected.clear();
                }
                Err(e) => tracing::warn!(error = %e, "heartbeat failed"),
            }
        }
        let wait = match (registered, refused) {
            (true, _) => HEARTBEAT_INTERVAL,
            (false, true) => REFUSED_BACKOFF,
            (false, false) => RETRY_BACKOFF,
        };
        tokio::select! {
            _ = tokio::time::sleep(wait) => {}
            _ = stop.changed() => return,
        }
        if *stop.borrow() {
            return;
        }
    }
}

/// Takes the cluster id a registration answered with: recorded at the
/// first registration, and otherwise the one recorded, or an error.
fn adopt_cluster(data_dir: &std::path::Path, known: &mut Option<String>, answered: &str) -> Result<(), String> {
    match known {
        Some(id) if id == answered => Ok(()),
        Some(id) => Err(format!("this server belongs to metadata cluster {id}; the service answered as {answered:?}")),
        None if answered.is_empty() => Err("the metadata service did not name its cluster".into()),
        None => {
            identity::set_cluster_id(data_dir, answered).map_err(|e| format!("recording the cluster id: {e}"))?;
            *known = Some(answered.to_string());
            Ok(())
        }
    }
}

async fn trash_orphan(store: &Store, key: ChunkKey, grace: Duration) {
    match store.trash_chunk(key).await {
        Ok(()) => tracing::info!(chunk = %key, grace = ?grace,
            "moved a chunk no volume references to the trash; deleted after the grace period"),
        Err(e) => tracing::warn!(chunk = %key, error = %e, "moving an unreferenced chunk to the trash"),
    }
}

/// Deletes the trash whose grace period ended, and the oldest trash while
/// the filesystem is short of its free floor.
async fn purge_trash(data_dir: &std::path::Path, grace: Duration) {
    let data_dir = data_dir.to_owned();
    let purged = tokio::task::spawn_blocking(move || {
        let expired = trash::purge(&data_dir, grace)?;
        Ok::<_, std::io::Error>((expired, trash::keep_free_floor(&data_dir)?))
    })
    .await;
    match purged {
        Ok(Ok((expired, early))) => {
            for chunk in expired {
                tracing::info!(chunk = %chunk.key, "deleted a chunk whose grace period in the trash ended");
            }
            trash::log_early_deletions(&early, "the disk is short of free space");
        }
        Ok(Err(e)) => tracing::warn!(error = %e, "emptying the trash"),
        Err(e) => tracing::warn!(error = %e, "emptying the trash"),
    }
}
