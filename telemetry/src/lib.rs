//! Logging and metrics plumbing shared by every Ballast daemon.
//!
//! - [`init_tracing`]: human or JSON logs, filtered by `RUST_LOG`.
//! - [`serve_metrics`]: a Prometheus `/metrics` endpoint for the default
//!   registry, which every crate registers its metrics into; with
//!   [`serve_metrics_and_health`] it also answers a liveness probe.
//! - [`shutdown_signal`]: completes when the daemon is asked to stop.

use std::convert::Infallible;
use std::future::Future;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::Arc;

use http_body_util::Full;
use hyper::body::Bytes;
use hyper::{Request, Response};
use hyper_util::rt::TokioIo;
use prometheus::{Encoder, TextEncoder};
use tokio::net::TcpListener;
use tokio::task::JoinHandle;

/// Log output format, chosen with `--log-format`.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, clap::ValueEnum)]
pub enum LogFormat {
    #[default]
    Human,
    Json,
}

/// Installs the global tracing subscriber. `RUST_LOG` overrides the default
/// level (`info`). Logs go to stderr so stdout stays free for command output.
pub fn init_tracing(format: LogFormat) {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info,openraft=warn"));
    let builder = tracing_subscriber::fmt().with_env_filter(filter).with_writer(std::io::stderr);
    let result = match format {
        LogFormat::Human => builder.try_init(),
        LogFormat::Json => builder.json().try_init(),
    };
    // A second init (tests starting several daemons in one process) is harmless.
    let _ = result;
}

/// A liveness check: `Ok` is healthy, `Err` says what is wrong.
pub type HealthCheck = Arc<dyn Fn() -> Pin<Box<dyn Future<Output = Result<(), String>> + Send>> + Send + Sync>;

/// Binds `addr` and serves the default Prometheus registry on every path
/// (conventionally `/metrics`). Returns the bound address (useful with port 0)
/// and the serving task.
pub async fn serve_metrics(addr: SocketAddr) -> std::io::Result<(SocketAddr, JoinHandle<()>)> {
    serve(addr, None).await
}

/// [`serve_metrics`], and `/healthz` answered by `health`: 200 when it
/// passes, 503 with its reason when it does not (what a Kubernetes
/// liveness probe reads).
pub async fn serve_metrics_and_health(
    addr: SocketAddr,
    health: HealthCheck,
) -> std::io::Result<(SocketAddr, JoinHandle<()>)> {
    serve(addr, Some(health)).await
}

async fn serve(addr: SocketAddr, health: Option<HealthCheck>) -> std::io::Result<(SocketAddr, JoinHandle<()>)> {
    let listener = TcpListener::bind(addr).await?;
    let bound = listener.local_addr()?;
    let task = tokio::spawn(async move {
        loop {
            let Ok((stream, _)) = listener.accept().await else {
                continue;
            };
            let health = health.clone();
            tokio::spawn(async move {
                let service = hyper::service::service_fn(move |req: Request<hyper::body::Incoming>| {
                    let health = health.clone().filter(|_| req.uri().path() == "/healthz");
                    async move {
                        Ok::<_, Infallible>(match health {
                            Some(check) => render_health(check().await),
                            None => render(),
                        })
                    }
                });
                let _ =
                    hyper::server::conn::http1::Builder::new().serve_connection(TokioIo::new(stream), service).await;
            });
        }
    });
    Ok((bound, task))
}

fn render_health(result: Result<(), String>) -> Response<Full<Bytes>> {
    let (status, body) = match result {
        Ok(()) => (hyper::StatusCode::OK, "ok\n".to_string()),
        Err(reason) => (hyper::StatusCode::SERVICE_UNAVAILABLE, format!("{reason}\n")),
    };
    Response::builder()
        .status(status)
        .header("content-type", "text/plain")
        .body(Full::new(Bytes::from(body)))
        .expect("static response parts are valid")
}

fn render() -> Response<Full<Bytes>> {
    let encoder = TextEncoder::new();
    let mut body = Vec::new();
    if let Err(err) = encoder.encode(&prometheus::gather(), &mut body) {
        body = format!("# encoding metrics failed: {err}\n").into_bytes();
    }
    Response::builder()
        .header("content-type", encoder.format_type())
        .body(Full::new(Bytes::from(body)))
        .expect("static response parts are valid")
}

/// Completes on SIGTERM or SIGINT: the signals a daemon stops gracefully on.
pub async fn shutdown_signal() {
    use tokio::signal::unix::{signal, SignalKind};
    let mut term = signal(SignalKind::terminate()).expect("installing the SIGTERM handler");
    let mut int = signal(SignalKind::interrupt()).expect("installing the SIGINT handler");
    tokio::select! {
        _ = term.recv() => tracing::info!("SIGTERM: shutting down"),
        _ = int.recv() => tracing::info!("SIGINT: shutting down"),
    }
}

/// Latency buckets in seconds, from 10 µs to 10 s, for request histograms.
pub fn latency_buckets() -> Vec<f64> {
    prometheus::exponential_buckets(0.000_01, 2.5, 16).expect("valid bucket parameters")
}
