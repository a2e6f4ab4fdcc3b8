//! Where the replicas of a chunk go: distinct servers, distinct failure
//! domains where the labels allow it, most free space first.

use std::collections::{BTreeMap, BTreeSet};

use crate::model::ChunkServer;

/// A server that missed heartbeats for this long takes no new replicas.
pub const LIVENESS_TIMEOUT_MS: u64 = 15_000;

/// Picks up to `count` servers for a new replica set of a chunk of
/// `chunk_size` bytes. Servers in `exclude` (already holding the chunk) are
/// skipped. Deterministic: every member computes the same answer.
pub fn choose_replicas(
    servers: &BTreeMap<String, ChunkServer>,
    count: usize,
    chunk_size: u64,
    now_ms: u64,
    exclude: &[String],
) -> Vec<String> {
    let mut candidates: Vec<&ChunkServer> = servers
        .values()
        .filter(|s| !s.draining && s.is_alive(now_ms))
        .filter(|s| s.free_bytes() >= chunk_size)
        .filter(|s| !exclude.contains(&s.id))
        .collect();
    // Most free space first; ties broken by id so the order is total.
    candidates.sort_by(|a, b| b.free_bytes().cmp(&a.free_bytes()).then(a.id.cmp(&b.id)));

    let mut taken_domains: BTreeSet<String> =
        exclude.iter().filter_map(|id| servers.get(id)).map(ChunkServer::failure_domain).collect();
    let mut chosen: Vec<String> = Vec::with_capacity(count);
    // First pass: one replica per failure domain.
    for server in &candidates {
        if chosen.len() == count {
            return chosen;
        }
        if taken_domains.insert(server.failure_domain()) {
            chosen.push(server.id.clone());
        }
    }
    // Second pass: not enough domains; distinct servers still.
    for server in &candidates {
        if chosen.len() == count {
            break;
        }
        if !chosen.contains(&server.id) {
            chosen.push(server.id.clone());
        }
    }
    chosen
}

#[cfg(test)]
mod tests {
    use super::*;

    fn server(id: &str, free_gib: u64, zone: Option<&str>) -> ChunkServer {
        ChunkServer {
            id: id.into(),
            address: format!("{id}:1"),
            capacity_bytes: free_gib << 30,
            used_bytes: 0,
            allocated_bytes: 0,
            labels: zone.map(|z| [("zone".to_string(), z.to_string())].into()).unwrap_or_default(),
            draining: false,
            last_heartbeat_ms: 1_000,
        }
    }

    fn fleet(list: Vec<ChunkServer>) -> BTreeMap<String, ChunkServer> {
        list.into_iter().map(|s| (s.id.clone(), s)).collect()
    }

    #[test]
    fn spreads_across_failure_domains_before_free_space() {
        let servers = fleet(vec![
            server("a", 100, Some("z1")),
            server("b", 90, Some("z1")),
            server("c", 10, Some("z2")),
            server("d", 5, Some("z3")),
        ]);
        let chosen = choose_replicas(&servers, 3, 64 << 20, 2_000, &[]);
        assert_eq!(chosen, vec!["a", "c", "d"]);
    }

    #[test]
    fn falls_back_to_distinct_servers_when_domains_run_out() {
        let servers = fleet(vec![server("a", 10, Some("z1")), server("b", 20, Some("z1")), server("c", 5, Some("z1"))]);
        let chosen = choose_replicas(&servers, 3, 64 << 20, 2_000, &[]);
        assert_eq!(chosen, vec!["b", "a", "c"]);
    }

    #[test]
    fn skips_draining_dead_full_and_excluded_servers() {
        let mut servers =
            fleet(vec![server("a", 10, None), server("b", 10, None), server("c", 10, None), server("d", 10, None)]);
        servers.get_mut("a").unwrap().draining = true;
        servers.get_mut("b").unwrap().last_heartbeat_ms = 0;
        servers.get_mut("c").unwrap().used_bytes = 10 << 30;
        let chosen = choose_replicas(&servers, 3, 64 << 20, LIVENESS_TIMEOUT_MS + 1, &["d".to_string()]);
        assert!(chosen.is_empty(), "{chosen:?}");
    }
}
