//! Pipelined connections to chunk servers, a few per server, reused by
//! every request of the volume. A node presents its capability on each
//! connection before the connection's first request, and again after
//! every renewal.

use std::collections::HashMap;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Mutex;

use ballast_proto::frame::{ClientError, Connector, DataClient};
use tokio::sync::watch;

use super::capability::Presented;

/// Connections per server: pipelining does most of the work; a second one
/// keeps a large transfer from delaying small ones behind it.
const CONNECTIONS_PER_SERVER: usize = 2;

#[derive(Clone)]
struct Pooled {
    client: DataClient,
    /// The capability version presented on it, if any.
    presented: Option<u64>,
}

pub struct ConnectionPool {
    connector: Connector,
    capability: Option<watch::Receiver<Presented>>,
    servers: Mutex<HashMap<String, Vec<Option<Pooled>>>>,
    next: AtomicUsize,
}

impl ConnectionPool {
    pub fn new(connector: Connector, capability: Option<watch::Receiver<Presented>>) -> ConnectionPool {
        ConnectionPool { connector, capability, servers: Mutex::default(), next: AtomicUsize::default() }
    }

    /// A connection to `address`, connecting if needed, that has presented
    /// the current capability.
    pub async fn get(&self, address: &str) -> Result<(usize, DataClient), ClientError> {
        let slot = self.next.fetch_add(1, Ordering::Relaxed) % CONNECTIONS_PER_SERVER;
        // A connection the server closed meanwhile (it restarted) is
        // replaced now, not failed on: that would report a healthy replica.
        let pooled = self.servers.lock().expect("pool lock").get(address).and_then(|s| s[slot].clone());
        let pooled = match pooled {
            Some(pooled) if !pooled.client.is_closed() => pooled,
            stale => {
                if stale.is_some() {
                    self.discard(address, slot);
                }
                let client = self.connector.connect(address).await?;
                let mut servers = self.servers.lock().expect("pool lock");
                let slots = servers.entry(address.to_string()).or_insert_with(|| vec![None; CONNECTIONS_PER_SERVER]);
                // Another task may have connected meanwhile; either connection works.
                slots[slot].get_or_insert(Pooled { client, presented: None }).clone()
            }
        };
        let Some(capability) = &self.capability else { return Ok((slot, pooled.client)) };
        let current = capability.borrow().clone();
        if pooled.presented != Some(current.version) {
            pooled.client.authorize(current.token).await?;
            if let Some(Some(entry)) = self.servers.lock().expect("pool lock").get_mut(address).map(|s| &mut s[slot]) {
                if entry.client.same_connection(&pooled.client) {
                    entry.presented = entry.presented.max(Some(current.version));
                }
            }
        }
        Ok((slot, pooled.client))
    }

    /// Forgets a connection that failed, so the next use reconnects.
    pub fn discard(&self, address: &str, slot: usize) {
        if let Some(slots) = self.servers.lock().expect("pool lock").get_mut(address) {
            slots[slot] = None;
        }
    }
}
