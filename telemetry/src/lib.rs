//! Logging and metrics plumbing shared by every Ballast daemon.
//!
//! - [`init_tracing`]: human or JSON logs, filtered by `RUST_LOG`.
//! - [`serve_metrics`]: a Prometheus `/metrics` endpoint for the default
//!   registry, which every crate registers its metrics into.
//! - [`shutdown_signal`]: completes when the daemon is asked to stop.

use std::convert::Infallible;
use std::net::SocketAddr;

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

/// Binds `addr` and serves the default Prometheus registry on every path
/// (conventionally `/metrics`). Returns the bound address (useful with port 0)
/// and the serving task.
pub async fn serve_metrics(addr: SocketAddr) -> std::io::Result<(SocketAddr, JoinHandle<()>)> {
    let listener = TcpListener::bind(addr).await?;
    let bound = listener.local_addr()?;
    let task = tokio::spawn(async move {
        loop {
            let Ok((stream, _)) = listener.accept().await else {
                continue;
            };
            tokio::spawn(async move {
                let service = hyper::service::service_fn(|_req: Request<hyper::body::Incoming>| async {
                    Ok::<_, Infallible>(render())
                });
                let _ =
                    hyper::server::conn::http1::Builder::new().serve_connection(TokioIo::new(stream), service).await;
            });
        }
    });
    Ok((bound, task))
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
