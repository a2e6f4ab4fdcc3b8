//! Prometheus metrics of the chunk server, registered in the default
//! registry (served by `ballast_telemetry::serve_metrics`).

use std::sync::LazyLock;

use prometheus::{
    register_histogram_vec, register_int_counter, register_int_counter_vec, register_int_gauge, register_int_gauge_vec,
    HistogramVec, IntCounter, IntCounterVec, IntGauge, IntGaugeVec,
};

pub struct Metrics {
    /// Requests by opcode and status (`ok` or the error code).
    pub ops: IntCounterVec,
    /// Request latency by opcode, from decode to reply queued.
    pub latency: HistogramVec,
    pub bytes_read: IntCounter,
    pub bytes_written: IntCounter,
    /// Checksum failures by kind: `payload` (refused write) or `stored` (corrupt block).
    pub checksum_errors: IntCounterVec,
    /// Bad blocks handed to the repair loop (their chunk is rebuilt here).
    pub suspect_blocks: IntCounter,
    /// 1 for the I/O backend in use, labelled by name.
    pub io_backend: IntGaugeVec,
    /// Frames that could not be decoded.
    pub bad_frames: IntCounter,
    pub connections: IntGauge,
    pub chunks: IntGauge,
    pub capacity_bytes: IntGauge,
    pub used_bytes: IntGauge,
    pub dirty_regions: IntGauge,
    pub scrub_bytes: IntCounter,
    pub scrub_passes: IntCounter,
    /// Bad blocks found by the latest complete scrub pass.
    pub scrub_bad_blocks: IntGauge,
    /// Unix time the latest complete scrub pass finished.
    pub scrub_last_pass: IntGauge,
    /// `VOLUME_PAUSE` requests that paused or renewed a pause.
    pub volume_pauses: IntCounter,
    /// Pauses ended, by reason: `request` (`VOLUME_RESUME`) or `timeout`.
    pub volume_resumes: IntCounterVec,
    /// Volumes paused now.
    pub paused_volumes: IntGauge,
    /// Chunks created by `CHUNK_CLONE`.
    pub chunk_clones: IntCounter,
    /// TLS connections refused in the handshake.
    pub refused_connections: IntCounter,
    /// Connections closed at once for being over `--max-connections`.
    pub connections_over_limit: IntCounter,
    /// Requests refused because the caller's role may not send them.
    pub denied_requests: IntCounterVec,
}

static METRICS: LazyLock<Metrics> = LazyLock::new(|| {
    let m = Metrics {
        ops: register_int_counter_vec!(
            "ballast_storage_requests_total",
            "Data-plane requests by opcode and status",
            &["op", "status"]
        )
        .expect("register metric"),
        latency: register_histogram_vec!(
            "ballast_storage_request_duration_seconds",
            "Data-plane request latency by opcode",
            &["op"],
            ballast_telemetry::latency_buckets()
        )
        .expect("register metric"),
        bytes_read: register_int_counter!("ballast_storage_read_bytes_total", "Data bytes read")
            .expect("register metric"),
        bytes_written: register_int_counter!("ballast_storage_written_bytes_total", "Data bytes written")
            .expect("register metric"),
        checksum_errors: register_int_counter_vec!(
            "ballast_storage_checksum_errors_total",
            "Blocks failing their checksum: payload (write refused) or stored (corrupt on disk)",
            &["kind"]
        )
        .expect("register metric"),
        suspect_blocks: register_int_counter!(
            "ballast_storage_suspect_blocks_total",
            "Bad blocks found by reads or scrub whose chunk is listed for a rebuild from a peer"
        )
        .expect("register metric"),
        io_backend: register_int_gauge_vec!(
            "ballast_storage_io_backend",
            "Disk I/O backend in use (1 for the active one)",
            &["backend"]
        )
        .expect("register metric"),
        refused_connections: register_int_counter!(
            "ballast_storage_refused_connections_total",
            "Connections refused in the TLS handshake (no TLS, unknown authority, no identity)"
        )
        .expect("register metric"),
        connections_over_limit: register_int_counter!(
            "ballast_storage_connections_over_limit_total",
            "Connections closed as soon as accepted: the server had --max-connections open"
        )
        .expect("register metric"),
        denied_requests: register_int_counter_vec!(
            "ballast_storage_denied_requests_total",
            "Requests refused with PERMISSION_DENIED, by the caller's role and the opcode",
            &["role", "op"]
        )
        .expect("register metric"),
        bad_frames: register_int_counter!("ballast_storage_bad_frames_total", "Undecodable request frames")
            .expect("register metric"),
        connections: register_int_gauge!("ballast_storage_connections", "Open data-plane connections")
            .expect("register metric"),
        chunks: register_int_gauge!("ballast_storage_chunks", "Chunks stored").expect("register metric"),
        capacity_bytes: register_int_gauge!("ballast_storage_capacity_bytes", "Bytes available for chunks")
            .expect("register metric"),
        used_bytes: register_int_gauge!("ballast_storage_used_bytes", "Bytes allocated to chunks")
            .expect("register metric"),
        dirty_regions: register_int_gauge!("ballast_storage_dirty_regions", "Chunk regions in the activity log")
            .expect("register metric"),
        scrub_bytes: register_int_counter!("ballast_storage_scrub_bytes_total", "Bytes verified by scrubs")
            .expect("register metric"),
        scrub_passes: register_int_counter!("ballast_storage_scrub_passes_total", "Complete background scrub passes")
            .expect("register metric"),
        scrub_bad_blocks: register_int_gauge!(
            "ballast_storage_scrub_bad_blocks",
            "Bad blocks found by the latest complete scrub pass"
        )
        .expect("register metric"),
        scrub_last_pass: register_int_gauge!(
            "ballast_storage_scrub_last_pass_timestamp_seconds",
            "Unix time the latest scrub pass finished"
        )
        .expect("register metric"),
        volume_pauses: register_int_counter!(
            "ballast_storage_volume_pauses_total",
            "Volume pauses requested (new or renewed)"
        )
        .expect("register metric"),
        volume_resumes: register_int_counter_vec!(
            "ballast_storage_volume_resumes_total",
            "Volume pauses ended, by reason: request (VOLUME_RESUME) or timeout",
            &["reason"]
        )
        .expect("register metric"),
        paused_volumes: register_int_gauge!("ballast_storage_paused_volumes", "Volumes paused now")
            .expect("register metric"),
        chunk_clones: register_int_counter!("ballast_storage_chunk_clones_total", "Chunks created as clones")
            .expect("register metric"),
    };
    // Export the checksum error series at 0 from the start, for alerting.
    for kind in ["payload", "stored"] {
        m.checksum_errors.with_label_values(&[kind]);
    }
    // Likewise pause timeouts (a coordinator that died mid-snapshot).
    for reason in ["request", "timeout"] {
        m.volume_resumes.with_label_values(&[reason]);
    }
    m
});

/// The process-wide metrics (registered on first use).
pub fn metrics() -> &'static Metrics {
    &METRICS
}
