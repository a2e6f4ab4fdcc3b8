//! `storage-server serve`: runs a Ballast chunk server until SIGTERM/SIGINT.

use std::io::Write;

use anyhow::Context;
use clap::{Parser, Subcommand};
use storage_server::config::ServeArgs;

#[derive(Parser)]
#[command(name = "storage-server", version, about = "Ballast chunk server")]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Serve chunks from a data directory.
    Serve(ServeArgs),
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let Command::Serve(args) = Cli::parse().command;
    ballast_telemetry::init_tracing(args.log_format);
    let server = storage_server::start(args.into_config()).await.context("starting the storage server")?;
    // One machine-readable line on stdout with the bound addresses.
    let mut line = format!("ready server_id={} io_backend={}", server.server_id(), server.backend());
    if let Some(addr) = server.tcp_addr() {
        line += &format!(" tcp={addr}");
    }
    if let Some(path) = server.unix_path() {
        line += &format!(" unix={}", path.display());
    }
    if let Some(addr) = server.metrics_addr() {
        line += &format!(" metrics={addr}");
    }
    let mut stdout = std::io::stdout();
    writeln!(stdout, "{line}")?;
    stdout.flush()?;

    ballast_telemetry::shutdown_signal().await;
    server.shutdown().await.context("shutting down")?;
    Ok(())
}
