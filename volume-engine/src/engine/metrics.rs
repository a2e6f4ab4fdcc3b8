//! Per-volume metrics of the engine.

use std::sync::LazyLock;

use prometheus::{
    register_histogram_vec, register_int_counter_vec, register_int_gauge_vec, HistogramVec, IntCounterVec, IntGaugeVec,
};

pub static OPERATIONS: LazyLock<IntCounterVec> = LazyLock::new(|| {
    register_int_counter_vec!(
        "ballast_volume_operations_total",
        "Block operations by volume, op and result",
        &["volume", "op", "result"]
    )
    .unwrap()
});
pub static BYTES: LazyLock<IntCounterVec> = LazyLock::new(|| {
    register_int_counter_vec!("ballast_volume_bytes_total", "Bytes read and written by volume", &["volume", "op"])
        .unwrap()
});
pub static LATENCY: LazyLock<HistogramVec> = LazyLock::new(|| {
    register_histogram_vec!(
        "ballast_volume_operation_duration_seconds",
        "Block operation latency by volume and op",
        &["volume", "op"],
        ballast_telemetry::latency_buckets()
    )
    .unwrap()
});
pub static FAILOVERS: LazyLock<IntCounterVec> = LazyLock::new(|| {
    register_int_counter_vec!(
        "ballast_volume_replica_failovers_total",
        "Reads retried on another replica, by volume",
        &["volume"]
    )
    .unwrap()
});
pub static REPLICAS_DROPPED: LazyLock<IntCounterVec> = LazyLock::new(|| {
    register_int_counter_vec!(
        "ballast_volume_replicas_dropped_total",
        "Replicas reported failed and removed from a chunk's set, by volume",
        &["volume"]
    )
    .unwrap()
});
pub static DEGRADED_CHUNKS: LazyLock<IntGaugeVec> = LazyLock::new(|| {
    register_int_gauge_vec!(
        "ballast_volume_degraded_chunks",
        "Chunks with fewer replicas than the volume asks for",
        &["volume"]
    )
    .unwrap()
});
