//! Prometheus metrics of a metadata member.

use std::sync::LazyLock;

use prometheus::{
    register_histogram_vec, register_int_counter, register_int_counter_vec, register_int_gauge, HistogramVec,
    IntCounter, IntCounterVec, IntGauge,
};

use crate::types::Raft;

pub static TERM: LazyLock<IntGauge> =
    LazyLock::new(|| register_int_gauge!("ballast_meta_raft_term", "Current Raft term").unwrap());
pub static LEADER: LazyLock<IntGauge> = LazyLock::new(|| {
    register_int_gauge!("ballast_meta_raft_leader_id", "Member id of the current leader, 0 if unknown").unwrap()
});
pub static IS_LEADER: LazyLock<IntGauge> =
    LazyLock::new(|| register_int_gauge!("ballast_meta_raft_is_leader", "1 if this member is the leader").unwrap());
pub static COMMITTED_INDEX: LazyLock<IntGauge> =
    LazyLock::new(|| register_int_gauge!("ballast_meta_raft_committed_index", "Highest committed log index").unwrap());
pub static APPLIED_INDEX: LazyLock<IntGauge> = LazyLock::new(|| {
    register_int_gauge!("ballast_meta_raft_applied_index", "Highest log index applied to the state machine").unwrap()
});
pub static LAST_LOG_INDEX: LazyLock<IntGauge> =
    LazyLock::new(|| register_int_gauge!("ballast_meta_raft_last_log_index", "Last log index on this member").unwrap());
pub static SNAPSHOT_INDEX: LazyLock<IntGauge> = LazyLock::new(|| {
    register_int_gauge!("ballast_meta_raft_snapshot_index", "Last log index covered by the newest snapshot").unwrap()
});
pub static REQUEST_LATENCY: LazyLock<HistogramVec> = LazyLock::new(|| {
    register_histogram_vec!(
        "ballast_meta_request_duration_seconds",
        "Client API request latency by method and gRPC code",
        &["method", "code"],
        ballast_telemetry::latency_buckets()
    )
    .unwrap()
});

/// Bytes written to chunk servers to make replicas whole again: whole
/// chunks copied by rebuilds, regions copied by fence resyncs.
pub static COPIED_BYTES: LazyLock<IntCounterVec> = LazyLock::new(|| {
    register_int_counter_vec!(
        "ballast_meta_copied_bytes_total",
        "Bytes copied between chunk servers to repair replicas, by reason (rebuild, resync)",
        &["reason"]
    )
    .unwrap()
});

/// Connections refused before any call: no TLS, a certificate of another
/// authority, or one that names no identity.
pub static REFUSED_CONNECTIONS: LazyLock<IntCounter> = LazyLock::new(|| {
    register_int_counter!(
        "ballast_meta_refused_connections_total",
        "Connections refused in the TLS handshake (no TLS, unknown authority, no identity)"
    )
    .unwrap()
});

pub fn refused_connection() {
    REFUSED_CONNECTIONS.inc();
}

/// Calls refused because the caller's role may not make them.
pub static DENIED_CALLS: LazyLock<IntCounterVec> = LazyLock::new(|| {
    register_int_counter_vec!(
        "ballast_meta_denied_calls_total",
        "Calls refused with PERMISSION_DENIED, by the caller's role and the method",
        &["role", "method"]
    )
    .unwrap()
});

/// Mirrors openraft's metrics into the gauges until the member shuts down.
pub async fn follow_raft(raft: Raft) {
    let mut rx = raft.metrics();
    loop {
        {
            let m = rx.borrow_and_update();
            TERM.set(m.current_term as i64);
            LEADER.set(m.current_leader.unwrap_or(0) as i64);
            IS_LEADER.set(i64::from(m.current_leader == Some(m.id)));
            LAST_LOG_INDEX.set(m.last_log_index.unwrap_or(0) as i64);
            SNAPSHOT_INDEX.set(m.snapshot.map(|s| s.index).unwrap_or(0) as i64);
        }
        if rx.changed().await.is_err() {
            return;
        }
    }
}
