//! Registration with the metadata service: announcing this server (id,
//! address, failure-domain labels, capacity), heartbeating with usage, and
//! reconciling the chunks held here against what metadata still references.

use std::collections::{BTreeMap, BTreeSet};
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use ballast_proto::meta as pb;
use meta_raft::MetaClient;
use tokio::sync::watch;

use crate::store::chunk::ChunkKey;
use crate::store::Store;

const HEARTBEAT_INTERVAL: Duration = Duration::from_secs(2);
/// Every this many heartbeats, the chunk list goes along for reconciliation.
const RECONCILE_EVERY: u64 = 5;
const RETRY_BACKOFF: Duration = Duration::from_secs(1);

/// What this server announces about itself.
#[derive(Clone, Debug)]
pub struct Registration {
    pub server_id: String,
    pub tcp_addr: Option<SocketAddr>,
    pub unix_path: Option<PathBuf>,
    pub labels: BTreeMap<String, String>,
    pub capacity: u64,
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
/// volumes, replicas dropped from their set) are deleted once two
/// consecutive reconciliations agree.
pub async fn register_and_heartbeat(
    meta: Vec<String>,
    info: Registration,
    store: Arc<Store>,
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
    let client = match MetaClient::new(meta) {
        Ok(client) => client.with_deadline(Duration::from_secs(5)),
        Err(e) => {
            tracing::error!(error = %e, "invalid metadata endpoints; running standalone");
            return;
        }
    };
    let mut registered = false;
    let mut beats = 0u64;
    let mut suspected: BTreeSet<(u64, u64)> = BTreeSet::new();
    loop {
        if !registered {
            let request = pb::RegisterChunkServerRequest {
                id: info.server_id.clone(),
                address: address.clone(),
                capacity_bytes: info.capacity,
                labels: info.labels.clone().into_iter().collect(),
            };
            match client.register_chunk_server(request).await {
                Ok(_) => {
                    tracing::info!(server_id = %info.server_id, %address, "registered with the metadata service");
                    registered = true;
                }
                Err(e) => tracing::warn!(error = %e, "registering with the metadata service; retrying"),
            }
        }
        if registered {
            let reconcile = beats % RECONCILE_EVERY == 0;
            beats += 1;
            let chunks: Vec<pb::HeldChunk> = if reconcile {
                store
                    .list_chunks(None)
                    .iter()
                    .map(|c| pb::HeldChunk { data_id: c.volume, chunk_index: c.chunk })
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
            };
            match client.heartbeat(request).await {
                Ok(reply) if reconcile => {
                    let orphaned: BTreeSet<(u64, u64)> =
                        reply.orphaned.iter().map(|c| (c.data_id, c.chunk_index)).collect();
                    for &(volume, chunk) in orphaned.intersection(&suspected) {
                        delete_orphan(&store, ChunkKey { volume, chunk }).await;
                    }
                    suspected = orphaned;
                }
                Ok(_) => {}
                Err(status) if status.code() == tonic::Code::NotFound => {
                    tracing::warn!("the metadata service does not know this server; registering again");
                    registered = false;
                }
                Err(e) => tracing::warn!(error = %e, "heartbeat failed"),
            }
        }
        let wait = if registered { HEARTBEAT_INTERVAL } else { RETRY_BACKOFF };
        tokio::select! {
            _ = tokio::time::sleep(wait) => {}
            _ = stop.changed() => return,
        }
        if *stop.borrow() {
            return;
        }
    }
}

async fn delete_orphan(store: &Store, key: ChunkKey) {
    match store.delete_chunk(key, 0).await {
        Ok(()) => tracing::info!(chunk = %key, "deleted a chunk no volume references"),
        Err(e) => tracing::warn!(chunk = %key, error = %e, "deleting an unreferenced chunk"),
    }
}
