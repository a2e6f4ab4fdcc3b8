//! Pipelined connections to chunk servers, a few per server, reused by
//! every request of the volume.

use std::collections::HashMap;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Mutex;

use ballast_proto::frame::{ClientError, Connector, DataClient};

/// Connections per server: pipelining does most of the work; a second one
/// keeps a large transfer from delaying small ones behind it.
const CONNECTIONS_PER_SERVER: usize = 2;

pub struct ConnectionPool {
    connector: Connector,
    servers: Mutex<HashMap<String, Vec<Option<DataClient>>>>,
    next: AtomicUsize,
}

impl ConnectionPool {
    pub fn new(connector: Connector) -> ConnectionPool {
        ConnectionPool { connector, servers: Mutex::default(), next: AtomicUsize::default() }
    }

    /// A connection to `address`, connecting if needed.
    pub async fn get(&self, address: &str) -> Result<(usize, DataClient), ClientError> {
        let slot = self.next.fetch_add(1, Ordering::Relaxed) % CONNECTIONS_PER_SERVER;
        // A connection the server closed meanwhile (it restarted) is
        // replaced now, not failed on: that would report a healthy replica.
        let pooled = self.servers.lock().expect("pool lock").get(address).and_then(|s| s[slot].clone());
        match pooled {
            Some(client) if !client.is_closed() => return Ok((slot, client)),
            Some(_) => self.discard(address, slot),
            None => {}
        }
        let client = self.connector.connect(address).await?;
        let mut servers = self.servers.lock().expect("pool lock");
        let slots = servers.entry(address.to_string()).or_insert_with(|| vec![None; CONNECTIONS_PER_SERVER]);
        // Another task may have connected meanwhile; either connection works.
        Ok((slot, slots[slot].get_or_insert(client).clone()))
    }

    /// Forgets a connection that failed, so the next use reconnects.
    pub fn discard(&self, address: &str, slot: usize) {
        if let Some(slots) = self.servers.lock().expect("pool lock").get_mut(address) {
            slots[slot] = None;
        }
    }
}
