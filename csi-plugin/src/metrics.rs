//! Prometheus metrics of the plugin, and the wrapper every RPC runs in: a
//! tracing span naming the RPC and the volume, the outcome counted by gRPC
//! code, the latency observed.

use std::future::Future;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::LazyLock;
use std::time::Instant;

use prometheus::{register_histogram_vec, register_int_counter_vec, HistogramVec, IntCounterVec};
use tonic::{Code, Response, Status};
use tracing::Instrument;

use crate::error::CsiError;

pub static OPERATIONS: LazyLock<IntCounterVec> = LazyLock::new(|| {
    register_int_counter_vec!("ballast_csi_operations_total", "CSI calls by RPC and gRPC result code", &["rpc", "code"])
        .unwrap()
});

pub static LATENCY: LazyLock<HistogramVec> = LazyLock::new(|| {
    register_histogram_vec!(
        "ballast_csi_operation_duration_seconds",
        "CSI call latency by RPC and gRPC result code",
        &["rpc", "code"],
        ballast_telemetry::latency_buckets()
    )
    .unwrap()
});

/// Calls running right now; shutdown waits for them.
static ACTIVE: AtomicUsize = AtomicUsize::new(0);

pub fn active_calls() -> usize {
    ACTIVE.load(Ordering::SeqCst)
}

struct Active;

impl Active {
    fn enter() -> Self {
        ACTIVE.fetch_add(1, Ordering::SeqCst);
        Self
    }
}

impl Drop for Active {
    fn drop(&mut self) {
        ACTIVE.fetch_sub(1, Ordering::SeqCst);
    }
}

/// Calls that are frequent and change nothing: logged at debug level only.
fn is_chatty(rpc: &str) -> bool {
    matches!(
        rpc,
        "Probe"
            | "GetPluginInfo"
            | "GetPluginCapabilities"
            | "ControllerGetCapabilities"
            | "NodeGetCapabilities"
            | "NodeGetInfo"
            | "NodeGetVolumeStats"
            | "GetCapacity"
            | "ListVolumes"
            | "ListSnapshots"
            | "ControllerGetVolume"
    )
}

/// Runs one RPC inside a span carrying `volume` (a volume id, a name or a
/// snapshot id; empty when the call has none), and records its outcome.
/// Requests are never logged whole: they may carry secrets.
pub async fn observe<T>(
    rpc: &'static str,
    volume: &str,
    call: impl Future<Output = Result<T, CsiError>>,
) -> Result<Response<T>, Status> {
    let span = tracing::info_span!("csi", rpc, volume = %volume);
    async move {
        let _active = Active::enter();
        let started = Instant::now();
        let result = call.await;
        let elapsed = started.elapsed();
        let code = match &result {
            Ok(_) => Code::Ok,
            Err(err) => err.code(),
        };
        // Spelled as the metadata service's metrics spell them.
        let code_name = if code == Code::Ok { "OK".to_string() } else { format!("{code:?}") };
        OPERATIONS.with_label_values(&[rpc, &code_name]).inc();
        LATENCY.with_label_values(&[rpc, &code_name]).observe(elapsed.as_secs_f64());
        match &result {
            Ok(_) if is_chatty(rpc) => tracing::debug!(?elapsed, "ok"),
            Ok(_) => tracing::info!(?elapsed, "ok"),
            Err(err) if matches!(code, Code::Internal | Code::Unavailable | Code::Unknown) => {
                tracing::error!(?elapsed, code = %code_name, "{err}")
            }
            Err(err) => tracing::warn!(?elapsed, code = %code_name, "{err}"),
        }
        result.map(Response::new).map_err(Status::from)
    }
    .instrument(span)
    .await
}
