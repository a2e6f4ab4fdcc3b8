//! `meta-raft`: run a metadata member, or manage the cluster's membership.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use anyhow::{bail, Context};
use ballast_proto::meta as pb;
use ballast_telemetry::LogFormat;
use clap::{Parser, Subcommand};
use meta_client::ClientArgs;
use meta_raft::repair::RepairConfig;
use meta_raft::MemberConfig;

#[derive(Parser)]
#[command(name = "meta-raft", version, about = "Ballast metadata service member and cluster administration")]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Run a member.
    ///
    /// Example, a new 3-member cluster (run one per member, same --bootstrap):
    ///   meta-raft serve --id 1 --listen 127.0.0.1:7101 --data-dir /var/lib/ballast/meta1 \
    ///     --bootstrap 1=127.0.0.1:7101,2=127.0.0.1:7102,3=127.0.0.1:7103
    Serve(ServeArgs),
    /// Initialise a new cluster from running, empty members.
    ///
    /// Example: meta-raft init --meta 127.0.0.1:7101 --members 1=127.0.0.1:7101,2=127.0.0.1:7102
    Init {
        #[command(flatten)]
        meta: ClientArgs,
        /// Voters as `id=host:port,...`.
        #[arg(long)]
        members: String,
    },
    /// Add a member as a learner (it replicates but does not vote yet).
    AddLearner {
        #[command(flatten)]
        meta: ClientArgs,
        #[arg(long)]
        id: u64,
        #[arg(long)]
        address: String,
        /// Return before the learner has caught up.
        #[arg(long)]
        no_wait: bool,
    },
    /// Promote learners to voters (or drop voters): the new set of voter ids.
    ///
    /// Example, promote learner 4: meta-raft set-voters --voters 1,2,3,4
    SetVoters {
        #[command(flatten)]
        meta: ClientArgs,
        #[arg(long, value_delimiter = ',')]
        voters: Vec<u64>,
    },
    /// Remove a member from the cluster entirely.
    Remove {
        #[command(flatten)]
        meta: ClientArgs,
        #[arg(long)]
        id: u64,
    },
    /// Print each member's view of the cluster as JSON lines.
    Status {
        #[command(flatten)]
        meta: ClientArgs,
    },
    /// After losing a majority of the members: make a stopped survivor the
    /// only member of its cluster, keeping everything it knew. Start it
    /// again afterwards (its --bootstrap is ignored), then add new members.
    ///
    /// Example: meta-raft force-single-member --id 1 --address 127.0.0.1:7101 \
    ///   --data-dir /var/lib/ballast/meta1
    ForceSingleMember {
        /// The survivor's id.
        #[arg(long)]
        id: u64,
        /// The address it will serve on (its --advertise, or --listen).
        #[arg(long)]
        address: String,
        #[arg(long)]
        data_dir: PathBuf,
    },
}

#[derive(clap::Args)]
struct ServeArgs {
    /// This member's id (1, 2, ...), fixed for its lifetime.
    #[arg(long, env = "BALLAST_META_ID")]
    id: u64,
    /// Address to serve Raft and the client API on.
    #[arg(long, env = "BALLAST_META_LISTEN", default_value = "127.0.0.1:7101")]
    listen: SocketAddr,
    /// Address others reach this member at, if not --listen.
    #[arg(long, env = "BALLAST_META_ADVERTISE")]
    advertise: Option<String>,
    #[arg(long, env = "BALLAST_META_DATA_DIR")]
    data_dir: PathBuf,
    /// Initial voters `id=host:port,...`; an empty member initialises the cluster with them.
    #[arg(long, env = "BALLAST_META_BOOTSTRAP")]
    bootstrap: Option<String>,
    /// Prometheus metrics address.
    #[arg(long, env = "BALLAST_META_METRICS_ADDR")]
    metrics_addr: Option<SocketAddr>,
    #[arg(long, env = "BALLAST_LOG_FORMAT", value_enum, default_value_t = LogFormat::Human)]
    log_format: LogFormat,
    /// Build a state-machine snapshot after this many log entries.
    #[arg(long, env = "BALLAST_META_SNAPSHOT_EVERY", default_value_t = 1000)]
    snapshot_every: u64,
    /// Log entries kept behind a snapshot for lagging members.
    #[arg(long, env = "BALLAST_META_KEEP_LOGS", default_value_t = 1000)]
    keep_logs: u64,
    /// Seconds between passes of the repair loop (on the leader).
    #[arg(long, env = "BALLAST_META_REPAIR_INTERVAL", default_value_t = 5)]
    repair_interval: u64,
    /// Seconds without heartbeats after which a chunk server's replicas are
    /// given up and rebuilt elsewhere.
    #[arg(long, env = "BALLAST_META_REPAIR_AFTER", default_value_t = 60)]
    repair_after: u64,
    /// Seconds a node's capability for a volume is valid; nodes renew at
    /// half-life, and a node a volume was unpublished from keeps reaching
    /// its chunks at most this long.
    #[arg(long, env = "BALLAST_META_CAPABILITY_LIFETIME", default_value_t = meta_raft::capability::DEFAULT_LIFETIME.as_secs())]
    capability_lifetime: u64,
    /// The member's certificate (role meta), or --insecure.
    #[command(flatten)]
    tls: ballast_tls::ServeTls,
}

fn parse_members(list: &str) -> anyhow::Result<Vec<(u64, String)>> {
    list.split(',')
        .filter(|s| !s.trim().is_empty())
        .map(|item| {
            let (id, addr) =
                item.trim().split_once('=').with_context(|| format!("expected id=host:port, got {item:?}"))?;
            let id: u64 = id.parse().with_context(|| format!("member id {id:?} is not a number"))?;
            if id == 0 {
                bail!("member ids start at 1");
            }
            Ok((id, addr.to_string()))
        })
        .collect()
}

async fn serve(args: ServeArgs) -> anyhow::Result<()> {
    ballast_telemetry::init_tracing(args.log_format);
    if let Some(addr) = args.metrics_addr {
        let (bound, _) = ballast_telemetry::serve_metrics(addr).await.context("serving metrics")?;
        tracing::info!(%bound, "metrics endpoint");
    }
    let bootstrap = match &args.bootstrap {
        Some(list) => parse_members(list)?,
        None => Vec::new(),
    };
    let tls = args.tls.resolve()?;
    if let Some(dir) = &tls {
        tracing::info!(identity = %dir.identity()?, "mutual TLS; calls authorised by role");
    }
    let config = MemberConfig {
        id: args.id,
        listen: args.listen,
        advertise: args.advertise,
        data_dir: args.data_dir,
        bootstrap,
        snapshot_every: args.snapshot_every,
        keep_logs: args.keep_logs,
        repair: RepairConfig {
            interval: Duration::from_secs(args.repair_interval.max(1)),
            dead_after: Duration::from_secs(args.repair_after),
        },
        tls,
        capability_lifetime: Duration::from_secs(args.capability_lifetime.max(1)),
    };
    meta_raft::run(config, ballast_telemetry::shutdown_signal()).await?;
    Ok(())
}

fn print_json(status: &pb::ClusterStatus) {
    let members: Vec<serde_json::Value> = status
        .members
        .iter()
        .map(|m| serde_json::json!({"id": m.id, "address": m.address, "voter": m.voter}))
        .collect();
    let value = serde_json::json!({
        "id": status.id, "state": status.state, "term": status.term,
        "leader_id": status.leader_id, "leader_address": status.leader_address,
        "committed_index": status.committed_index, "applied_index": status.applied_index,
        "last_log_index": status.last_log_index, "snapshot_index": status.snapshot_index, "purged_index": status.purged_index,
        "members": members,
    });
    println!("{value}");
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let cli = Cli::parse();
    match cli.command {
        Command::Serve(args) => serve(args).await,
        Command::Init { meta, members } => {
            let members = parse_members(&members)?
                .into_iter()
                .map(|(id, address)| pb::Member { id, address, voter: true })
                .collect();
            print_json(&meta.client()?.initialize(members).await?);
            Ok(())
        }
        Command::AddLearner { meta, id, address, no_wait } => {
            let member = pb::Member { id, address, voter: false };
            let request = pb::AddLearnerRequest { member: Some(member), blocking: !no_wait };
            print_json(&meta.client()?.add_learner(request).await?);
            Ok(())
        }
        Command::SetVoters { meta, voters } => {
            let request = pb::ChangeMembershipRequest { voters, retain_learners: true };
            print_json(&meta.client()?.change_membership(request).await?);
            Ok(())
        }
        Command::Remove { meta, id } => {
            let client = meta.client()?;
            let status = client.status(pb::StatusRequest {}).await?;
            let voters: Vec<u64> = status.members.iter().filter(|m| m.voter && m.id != id).map(|m| m.id).collect();
            let request = pb::ChangeMembershipRequest { voters, retain_learners: false };
            print_json(&client.change_membership(request).await?);
            Ok(())
        }
        Command::ForceSingleMember { id, address, data_dir } => {
            let recovered = meta_raft::recovery::force_single_member(&data_dir, id, &address).await?;
            println!(
                "{}",
                serde_json::json!({
                    "id": id, "address": address, "last_index": recovered.last_index,
                    "replayed_entries": recovered.replayed, "volumes": recovered.volumes,
                    "snapshots": recovered.snapshots, "chunk_servers": recovered.servers,
                })
            );
            Ok(())
        }
        Command::Status { meta } => {
            let client = meta.client()?;
            let mut failures = 0;
            for endpoint in client.endpoints().to_vec() {
                match client.member_status(&endpoint).await {
                    Ok(status) => print_json(&status),
                    Err(e) => {
                        failures += 1;
                        eprintln!("{endpoint}: {}", e.message());
                    }
                }
            }
            if failures == client.endpoints().len() {
                bail!("no member answered");
            }
            Ok(())
        }
    }
}
