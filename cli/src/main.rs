//! `ballast`: run a local development cluster and administer volumes,
//! snapshots and chunk servers.

use std::path::PathBuf;

use anyhow::{bail, Context};
use ballast_cli::output::{self, Format};
use ballast_cli::{chunks, dev, pki};
use ballast_proto::frame::Connector;
use ballast_proto::meta as pb;
use ballast_proto::size;
use clap::{Parser, Subcommand};
use meta_client::ClientArgs;
use meta_client::MetaClient;
use meta_client::META_ENV;
use serde_json::json;

#[derive(Parser)]
#[command(name = "ballast", version, about = "Ballast replicated block storage: administration")]
struct Cli {
    #[command(subcommand)]
    command: Top,
}

#[derive(clap::Args, Clone)]
struct Target {
    /// Metadata endpoints, comma-separated host:port.
    #[arg(long, env = META_ENV, global = true, default_value = "")]
    meta: String,
    /// Output format of read commands.
    #[arg(short = 'o', long = "output", value_enum, global = true, default_value_t = Format::Table)]
    output: Format,
    /// Certificate directory (tls.crt, tls.key, ca.crt) for a cluster that
    /// serves mutual TLS; an admin certificate for changes.
    #[arg(long, env = "BALLAST_TLS_DIR", global = true)]
    tls_dir: Option<PathBuf>,
}

impl Target {
    fn client(&self) -> anyhow::Result<MetaClient> {
        Ok(ClientArgs { meta: self.meta.clone(), tls_dir: self.tls_dir.clone() }.client()?)
    }

    /// How to reach chunk servers: with the same certificate, if any.
    fn chunk_servers(&self) -> anyhow::Result<Connector> {
        Ok(match &self.tls_dir {
            Some(dir) => Connector::tls(&ballast_tls::TlsDir::open(dir)?)?,
            None => Connector::plaintext(),
        })
    }
}

#[derive(Subcommand)]
enum Top {
    /// A local cluster of processes on loopback, for development and demos.
    #[command(subcommand)]
    Dev(Dev),
    /// The cluster's certificate authority and its certificates.
    #[command(subcommand)]
    Pki(Pki),
    /// Leader, members, chunk servers, volumes and degraded chunks.
    Status {
        #[command(flatten)]
        target: Target,
    },
    /// Create, list, inspect, grow and delete volumes.
    Volume {
        #[command(flatten)]
        target: Target,
        #[command(subcommand)]
        command: VolumeCmd,
    },
    /// Create, list and delete snapshots.
    Snapshot {
        #[command(flatten)]
        target: Target,
        #[command(subcommand)]
        command: SnapshotCmd,
    },
    /// What the chunk servers hold, asked of each server, and whether
    /// metadata knows each chunk: run it before recovering or replacing
    /// metadata to see what would become an orphan.
    ///
    /// Example, with metadata lost: ballast chunks --servers 10.0.0.5:7200,10.0.0.6:7200
    Chunks {
        #[command(flatten)]
        target: Target,
        /// Ask these servers (host:port, comma-separated) instead of those
        /// metadata lists; without --meta, metadata is not asked at all.
        #[arg(long, value_delimiter = ',')]
        servers: Vec<String>,
    },
}

#[derive(Subcommand)]
enum Pki {
    /// Create the cluster's certificate authority (ca.crt, ca.key) in DIR.
    ///
    /// Example: ballast pki init --dir /etc/ballast/ca
    Init {
        #[arg(long)]
        dir: PathBuf,
        /// A name for the cluster, in the authority's certificate.
        #[arg(long, default_value = "ballast")]
        cluster: String,
    },
    /// Issue a component its certificate (tls.crt, tls.key, ca.crt in OUT).
    ///
    /// Roles: meta (a metadata member), storage (a chunk server, named by
    /// its server id), node (a CSI node, named by its node id), controller,
    /// admin. Issuing into a directory a component loads renews its
    /// certificate without a restart.
    ///
    /// Example: ballast pki issue --ca /etc/ballast/ca --role node --name worker-1 --out /etc/ballast/tls
    Issue {
        #[arg(long)]
        ca: PathBuf,
        #[arg(long)]
        role: ballast_tls::Role,
        #[arg(long)]
        name: String,
        /// A DNS name or IP address it serves as (repeatable).
        #[arg(long = "host")]
        hosts: Vec<String>,
        #[arg(long, default_value_t = 365)]
        days: u64,
        #[arg(long)]
        out: PathBuf,
    },
}

#[derive(Subcommand)]
enum Dev {
    /// Start metadata members and chunk servers under DIR and wait until healthy.
    ///
    /// Example: ballast dev up --dir /tmp/ballast && . /tmp/ballast/cluster.env
    Up {
        #[arg(long)]
        dir: PathBuf,
        #[arg(long, default_value_t = 3)]
        meta: usize,
        #[arg(long, default_value_t = 3)]
        storage: usize,
        /// Directory holding meta-raft, storage-server, ... (default: next to `ballast`).
        #[arg(long)]
        bin_dir: Option<PathBuf>,
        /// No TLS and no certificates: anyone who reaches the ports can read
        /// and change every volume.
        #[arg(long)]
        insecure: bool,
    },
    /// Stop everything `dev up` started under DIR.
    Down {
        #[arg(long)]
        dir: PathBuf,
    },
}

#[derive(Subcommand)]
enum VolumeCmd {
    /// Example: ballast volume create db --size 10GiB --replicas 3
    Create {
        name: String,
        #[arg(long, value_parser = size::parse_size)]
        size: u64,
        #[arg(long, default_value_t = 3)]
        replicas: u32,
        #[arg(long, value_parser = size::parse_size)]
        chunk_size: Option<u64>,
        /// Start with the data of this snapshot (id).
        #[arg(long, conflicts_with = "from_volume")]
        from_snapshot: Option<String>,
        /// Start with a point-in-time copy of this volume (id or name).
        #[arg(long)]
        from_volume: Option<String>,
        #[command(flatten)]
        limits: LimitArgs,
    },
    List,
    /// VOLUME is an id or a name.
    Get {
        volume: String,
    },
    Delete {
        volume: String,
    },
    /// Grow a volume. Example: ballast volume expand db --size 20GiB
    Expand {
        volume: String,
        #[arg(long, value_parser = size::parse_size)]
        size: u64,
    },
    /// Change a live volume's replica count or I/O limits; what is not
    /// given stays. More replicas are built in the background (`volume get`
    /// shows how far); fewer drop a copy of each chunk at once. The node
    /// serving the volume applies new limits within seconds.
    ///
    /// Example: ballast volume modify db --replicas 3 --max-iops 5000 --max-bandwidth 200MiB
    #[command(group(clap::ArgGroup::new("change").required(true).multiple(true)
        .args(["replicas", "max_iops", "max_bandwidth"])))]
    Modify {
        volume: String,
        #[arg(long)]
        replicas: Option<u32>,
        #[command(flatten)]
        limits: LimitArgs,
    },
}

/// A volume's I/O limits; 0 lifts one.
#[derive(clap::Args)]
struct LimitArgs {
    /// Operations per second (reads, writes, trims); 0: no limit.
    #[arg(long)]
    max_iops: Option<u64>,
    /// Bytes per second read and written, e.g. 200MiB; 0: no limit.
    #[arg(long, value_parser = size::parse_size)]
    max_bandwidth: Option<u64>,
}

#[derive(Subcommand)]
enum SnapshotCmd {
    /// Example: ballast snapshot create nightly --volume db
    Create {
        name: String,
        #[arg(long)]
        volume: String,
    },
    List {
        #[arg(long)]
        volume: Option<String>,
    },
    Delete {
        id: String,
    },
}

fn print_volumes(format: Format, volumes: &[pb::Volume]) {
    match format {
        Format::Json => println!("{}", json!(volumes.iter().map(output::volume).collect::<Vec<_>>())),
        Format::Table => output::print_table(output::VOLUME_HEADER, volumes.iter().map(output::volume_row).collect()),
    }
}

fn print_snapshots(format: Format, snapshots: &[pb::Snapshot]) {
    match format {
        Format::Json => println!("{}", json!(snapshots.iter().map(output::snapshot).collect::<Vec<_>>())),
        Format::Table => {
            output::print_table(output::SNAPSHOT_HEADER, snapshots.iter().map(output::snapshot_row).collect())
        }
    }
}

async fn volume(target: Target, command: VolumeCmd) -> anyhow::Result<()> {
    let client = target.client()?;
    match command {
        VolumeCmd::Create { name, size, replicas, chunk_size, from_snapshot, from_volume, limits } => {
            use pb::content_source::Source;
            let source = match (from_snapshot, from_volume) {
                (Some(id), _) => Some(Source::SnapshotId(id)),
                (None, Some(volume)) => Some(Source::VolumeId(client.find_volume(&volume).await?.id)),
                (None, None) => None,
            };
            let request = pb::CreateVolumeRequest {
                name,
                size_bytes: size,
                replicas,
                chunk_size_bytes: chunk_size.unwrap_or(0),
                content_source: source.map(|s| pb::ContentSource { source: Some(s) }),
                limits: Some(pb::IoLimits {
                    max_iops: limits.max_iops.unwrap_or(0),
                    max_bandwidth_bytes: limits.max_bandwidth.unwrap_or(0),
                }),
                ..Default::default()
            };
            let created = client.create_volume(request).await?;
            let volume = volume_engine::snapshot::populate(&client, &created).await?;
            print_volumes(target.output, &[volume]);
        }
        VolumeCmd::List => print_volumes(target.output, &client.all_volumes().await?),
        VolumeCmd::Get { volume } => {
            let volume = client.find_volume(&volume).await?;
            let map = client.get_chunk_map(pb::GetChunkMapRequest { volume_id: volume.id.clone() }).await?;
            let copies = output::Copies::of(&volume, &map);
            match target.output {
                Format::Json => println!("{}", json!([output::volume_with_copies(&volume, &copies)])),
                Format::Table => {
                    output::print_table(output::VOLUME_DETAIL_HEADER, vec![output::volume_detail_row(&volume, &copies)])
                }
            }
        }
        VolumeCmd::Delete { volume } => {
            let id = client.find_volume(&volume).await?.id;
            client.delete_volume(pb::DeleteVolumeRequest { id: id.clone() }).await?;
            eprintln!("deleted {id}");
        }
        VolumeCmd::Expand { volume, size } => {
            let id = client.find_volume(&volume).await?.id;
            print_volumes(
                target.output,
                &[client.expand_volume(pb::ExpandVolumeRequest { id, size_bytes: size }).await?],
            );
        }
        VolumeCmd::Modify { volume, replicas, limits } => {
            let id = client.find_volume(&volume).await?.id;
            let request = pb::ModifyVolumeRequest {
                id,
                replicas,
                max_iops: limits.max_iops,
                max_bandwidth_bytes: limits.max_bandwidth,
            };
            print_volumes(target.output, &[client.modify_volume(request).await?]);
        }
    }
    Ok(())
}

async fn snapshot(target: Target, command: SnapshotCmd) -> anyhow::Result<()> {
    let client = target.client()?;
    match command {
        SnapshotCmd::Create { name, volume } => {
            let source_volume_id = client.find_volume(&volume).await?.id;
            let snap = client
                .create_snapshot(pb::CreateSnapshotRequest { name, source_volume_id, ..Default::default() })
                .await?;
            let snap = volume_engine::snapshot::take(&client, &snap).await?;
            print_snapshots(target.output, &[snap]);
        }
        SnapshotCmd::List { volume } => {
            let source_volume_id = match volume {
                Some(v) => client.find_volume(&v).await?.id,
                None => String::new(),
            };
            let snapshots = client.all_snapshots(&source_volume_id).await?;
            print_snapshots(target.output, &snapshots);
        }
        SnapshotCmd::Delete { id } => {
            let reply = client.delete_snapshot(pb::DeleteSnapshotRequest { id: id.clone() }).await?;
            eprintln!("{} {id}", if reply.existed { "deleted" } else { "no such snapshot" });
        }
    }
    Ok(())
}

async fn list_chunks(target: Target, servers: Vec<String>) -> anyhow::Result<()> {
    let meta = if target.meta.is_empty() && !servers.is_empty() { None } else { Some(target.client()?) };
    let (addresses, placement) = match &meta {
        Some(meta) => {
            let addresses = if servers.is_empty() {
                let listed = meta.list_chunk_servers(pb::ListChunkServersRequest {}).await?.servers;
                listed.into_iter().map(|s| s.address).collect()
            } else {
                servers
            };
            (addresses, Some(chunks::Placement::from_meta(meta).await?))
        }
        None => (servers, None),
    };
    let held = chunks::held(&target.chunk_servers()?, &addresses, placement.as_ref()).await?;
    match target.output {
        Format::Json => println!("{}", serde_json::to_string(&held)?),
        Format::Table => {
            let rows = held
                .iter()
                .map(|c| {
                    vec![
                        c.server.clone(),
                        c.data_id.to_string(),
                        c.chunk_index.to_string(),
                        c.generation.to_string(),
                        size::format_size(c.size_bytes),
                        if c.owner.is_empty() { "-".into() } else { c.owner.clone() },
                        c.state.describe().into(),
                    ]
                })
                .collect();
            output::print_table(&["SERVER", "DATA ID", "CHUNK", "GENERATION", "SIZE", "OWNER", "STATE"], rows);
            let unknown: Vec<_> = held.iter().filter(|c| c.state == chunks::ChunkState::Unknown).collect();
            let bytes = unknown.iter().map(|c| c.size_bytes).sum();
            println!(
                "\n{} chunks on {} servers; {} unknown to metadata ({})",
                held.len(),
                addresses.len(),
                unknown.len(),
                size::format_size(bytes)
            );
        }
    }
    Ok(())
}

async fn status(target: Target) -> anyhow::Result<()> {
    let client = target.client()?;
    let cluster = client.status(pb::StatusRequest {}).await?;
    let servers = client.list_chunk_servers(pb::ListChunkServersRequest {}).await?.servers;
    let volumes = client.all_volumes().await?;
    let live: std::collections::BTreeSet<&str> = servers.iter().filter(|s| s.alive).map(|s| s.id.as_str()).collect();
    let mut degraded = Vec::new();
    for v in &volumes {
        let map = client.get_chunk_map(pb::GetChunkMapRequest { volume_id: v.id.clone() }).await?;
        for chunk in map.chunks {
            let healthy = chunk.replicas.iter().filter(|r| live.contains(r.server_id.as_str())).count();
            if healthy < v.replicas as usize {
                degraded.push(json!({"volume_id": v.id, "chunk_index": chunk.chunk_index,
                    "healthy_replicas": healthy, "replicas": v.replicas, "generation": chunk.generation}));
            }
        }
    }
    let members: Vec<_> =
        cluster.members.iter().map(|m| json!({"id": m.id, "address": m.address, "voter": m.voter})).collect();
    match target.output {
        Format::Json => println!(
            "{}",
            json!({
                "leader": {"id": cluster.leader_id, "address": cluster.leader_address},
                "term": cluster.term, "committed_index": cluster.committed_index,
                "members": members,
                "chunk_servers": servers.iter().map(output::chunk_server).collect::<Vec<_>>(),
                "volumes": volumes.iter().map(output::volume).collect::<Vec<_>>(),
                "degraded_chunks": degraded,
            })
        ),
        Format::Table => {
            println!("leader: {} ({}), term {}", cluster.leader_id, cluster.leader_address, cluster.term);
            let rows = cluster
                .members
                .iter()
                .map(|m| vec![m.id.to_string(), m.address.clone(), if m.voter { "voter" } else { "learner" }.into()])
                .collect();
            output::print_table(&["MEMBER", "ADDRESS", "ROLE"], rows);
            println!();
            let rows = servers
                .iter()
                .map(|s| {
                    vec![
                        s.id.clone(),
                        s.address.clone(),
                        if s.alive { "up" } else { "down" }.into(),
                        size::format_size(s.capacity_bytes),
                        size::format_size(s.used_bytes),
                    ]
                })
                .collect();
            output::print_table(&["CHUNK SERVER", "ADDRESS", "STATE", "CAPACITY", "USED"], rows);
            println!();
            print_volumes(Format::Table, &volumes);
            println!("\ndegraded chunks: {}", degraded.len());
        }
    }
    Ok(())
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    match Cli::parse().command {
        Top::Dev(Dev::Up { dir, meta, storage, bin_dir, insecure }) => {
            let bin_dir = match bin_dir {
                Some(d) => d,
                None => std::env::current_exe()?.parent().context("executable has no directory")?.to_path_buf(),
            };
            let state = dev::up(dev::UpOptions {
                dir: dir.clone(),
                meta,
                storage,
                bin_dir,
                layout: Default::default(),
                insecure,
            })
            .await?;
            println!(
                "cluster up: {} processes; environment in {}",
                state.processes.len(),
                dir.join("cluster.env").display()
            );
            println!("BALLAST_META={}", state.meta.join(","));
            if let Some(tls) = &state.tls_dir {
                println!("BALLAST_TLS_DIR={}", tls.display());
            }
            println!("stop it with: ballast dev down --dir {}", dir.display());
            Ok(())
        }
        Top::Dev(Dev::Down { dir }) => {
            let stopped = dev::down(&dir)?;
            if stopped.is_empty() {
                println!("nothing running in {}", dir.display());
            } else {
                println!("stopped {}", stopped.join(", "));
            }
            Ok(())
        }
        Top::Pki(Pki::Init { dir, cluster }) => {
            pki::init(&dir, &cluster)?;
            println!("certificate authority of cluster {cluster:?} created in {}", dir.display());
            println!("keep {} secret: whoever holds it can join the cluster as anyone", dir.join("ca.key").display());
            Ok(())
        }
        Top::Pki(Pki::Issue { ca, role, name, hosts, days, out }) => {
            let identity = pki::issue(&pki::IssueRequest { ca, role, name, hosts, days, out: out.clone() })?;
            println!("issued {identity} into {}", out.display());
            Ok(())
        }
        Top::Status { target } => status(target).await,
        Top::Volume { target, command } => volume(target, command).await,
        Top::Snapshot { target, command } => snapshot(target, command).await,
        Top::Chunks { target, servers } => list_chunks(target, servers).await,
    }
    .or_else(|e: anyhow::Error| match e.downcast_ref::<tonic::Status>() {
        Some(status) => bail!("{}: {}", code_name(status.code()), status.message()),
        None => Err(e),
    })
}

fn code_name(code: tonic::Code) -> String {
    format!("{code:?}")
}
