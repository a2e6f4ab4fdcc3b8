//! `storage-server serve`: runs a Ballast chunk server until SIGTERM/SIGINT.
//! `storage-server trash list|restore`: the chunks waiting in a data
//! directory's trash (see `storage_server::trash`).

use std::io::Write;
use std::path::PathBuf;

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
    Serve(Box<ServeArgs>),
    /// Chunks that metadata stopped referencing wait in DATA_DIR/trash
    /// for --orphan-grace before they are deleted.
    #[command(subcommand)]
    Trash(TrashCommand),
}

#[derive(Subcommand)]
enum TrashCommand {
    /// One line per chunk in the trash: volume data id, chunk, bytes, when trashed.
    List {
        #[arg(long, env = "BALLAST_STORAGE_DATA_DIR")]
        data_dir: PathBuf,
    },
    /// Put chunks back into the store (stop the server first; it loads them at its next start).
    Restore {
        #[arg(long, env = "BALLAST_STORAGE_DATA_DIR")]
        data_dir: PathBuf,
        /// Only this volume's chunks (its data id, as `list` prints it); default: all.
        #[arg(long)]
        volume: Option<u64>,
    },
}

fn trash(command: TrashCommand) -> anyhow::Result<()> {
    use storage_server::trash;
    match command {
        TrashCommand::List { data_dir } => {
            for chunk in trash::list(&data_dir).context("reading the trash")? {
                println!(
                    "volume={} chunk={} bytes={} trashed_at={}",
                    chunk.key.volume, chunk.key.chunk, chunk.bytes, chunk.trashed_at
                );
            }
        }
        TrashCommand::Restore { data_dir, volume } => {
            // Holding the data directory's lock proves no server runs on it.
            let _lock = storage_server::store::lock_data_dir(&data_dir).context("locking the data directory")?;
            let restored = trash::restore(
                &data_dir,
                |key| storage_server::store::chunk_file(&data_dir, key),
                |chunk| volume.is_none_or(|v| v == chunk.key.volume),
            )
            .context("restoring from the trash")?;
            println!("restored {} chunks", restored.len());
        }
    }
    Ok(())
}

fn main() -> anyhow::Result<()> {
    let args = match Cli::parse().command {
        Command::Serve(args) => args,
        Command::Trash(command) => return trash(command),
    };
    ballast_telemetry::init_tracing(args.log_format);
    let config = (*args).into_config()?;
    storage_server::runtime::block_on(config.io_backend, serve(config)).context("starting a runtime")?
}

async fn serve(config: storage_server::Config) -> anyhow::Result<()> {
    let server = storage_server::start(config).await.context("starting the storage server")?;
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
