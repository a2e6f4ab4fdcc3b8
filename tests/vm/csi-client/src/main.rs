//! `csi-client`: one CSI call per invocation, for the VM tests (the guest
//! has no grpcurl). Mount volumes are ext4, single-node-writer.
//!
//! ```text
//! csi-client SOCKET create NAME SIZE_MIB [KEY=VALUE...]    -> volume_id, then context KEY=VALUE lines
//!                                      (from-snapshot=ID: restore a snapshot)
//! csi-client SOCKET snapshot NAME VOLUME                   -> snapshot id
//! csi-client SOCKET delete-snapshot SNAPSHOT
//! csi-client SOCKET controller-publish VOLUME NODE         -> publish context KEY=VALUE lines
//! csi-client SOCKET controller-unpublish VOLUME NODE
//! csi-client SOCKET delete VOLUME
//! csi-client SOCKET controller-expand VOLUME SIZE_MIB      -> capacity bytes, node_expansion_required
//! csi-client SOCKET node-expand VOLUME PATH SIZE_MIB       -> capacity bytes
//! csi-client SOCKET node-info                              -> node id
//! csi-client SOCKET stage VOLUME STAGING_PATH [KEY=VALUE...]   (publish context;
//!                                      ctx:KEY=VALUE volume context, secret:KEY=VALUE node-stage secrets)
//! csi-client SOCKET publish VOLUME STAGING_PATH TARGET_PATH
//! csi-client SOCKET stats VOLUME PATH                      -> bytes total/used/available
//! csi-client SOCKET unpublish VOLUME TARGET_PATH
//! csi-client SOCKET unstage VOLUME STAGING_PATH
//! ```
//!
//! Exits 0 on success; on a gRPC error prints `CODE: message` and exits 1.

use std::collections::HashMap;
use std::path::PathBuf;
use std::process::ExitCode;

use ballast_proto::csi;
use ballast_proto::csi::controller_client::ControllerClient;
use ballast_proto::csi::node_client::NodeClient;
use ballast_proto::csi::volume_capability::access_mode::Mode;
use ballast_proto::csi::volume_capability::{AccessMode, AccessType, MountVolume};
use tokio::net::UnixStream;
use tonic::transport::{Channel, Endpoint};

fn usage() -> ExitCode {
    eprintln!("usage: csi-client SOCKET (create|snapshot|delete-snapshot|controller-publish|controller-unpublish|delete|controller-expand|node-expand|node-info|stage|publish|stats|unpublish|unstage) ARGS...");
    ExitCode::from(2)
}

fn mount_capability() -> csi::VolumeCapability {
    csi::VolumeCapability {
        access_type: Some(AccessType::Mount(MountVolume { fs_type: "ext4".into(), ..Default::default() })),
        access_mode: Some(AccessMode { mode: Mode::SingleNodeWriter as i32 }),
    }
}

fn pairs(args: &[String]) -> HashMap<String, String> {
    args.iter().filter_map(|a| a.split_once('=')).map(|(k, v)| (k.to_string(), v.to_string())).collect()
}

/// The pairs whose key starts with `prefix`, without it.
fn prefixed(args: &[String], prefix: &str) -> HashMap<String, String> {
    pairs(args).into_iter().filter_map(|(k, v)| Some((k.strip_prefix(prefix)?.to_string(), v))).collect()
}

/// The pairs whose key has no `ctx:` or `secret:` prefix.
fn unprefixed(args: &[String]) -> HashMap<String, String> {
    pairs(args).into_iter().filter(|(k, _)| !k.starts_with("ctx:") && !k.starts_with("secret:")).collect()
}

fn print_pairs(map: &HashMap<String, String>) {
    let mut keys: Vec<_> = map.keys().collect();
    keys.sort();
    for k in keys {
        println!("{k}={}", map[k]);
    }
}

async fn connect(socket: PathBuf) -> Result<Channel, tonic::transport::Error> {
    Endpoint::try_from("http://[::]:50051")?
        .connect_with_connector(tower::service_fn(move |_| {
            let socket = socket.clone();
            async move { Ok::<_, std::io::Error>(hyper_util::rt::TokioIo::new(UnixStream::connect(socket).await?)) }
        }))
        .await
}

async fn call(channel: Channel, rpc: &str, a: &[String]) -> Result<bool, tonic::Status> {
    let mut controller = ControllerClient::new(channel.clone());
    let mut node = NodeClient::new(channel);
    let arg = |i: usize| a.get(i).cloned().unwrap_or_default();
    let mib = |i: usize| -> Result<i64, tonic::Status> {
        arg(i).parse::<i64>().map(|m| m << 20).map_err(|_| tonic::Status::invalid_argument("SIZE_MIB"))
    };
    match (rpc, a.len()) {
        ("create", n) if n >= 2 => {
            let mut parameters = pairs(&a[2..]);
            let volume_content_source = parameters.remove("from-snapshot").map(|snapshot_id| {
                use csi::volume_content_source::{SnapshotSource, Type};
                csi::VolumeContentSource { r#type: Some(Type::Snapshot(SnapshotSource { snapshot_id })) }
            });
            let req = csi::CreateVolumeRequest {
                name: arg(0),
                capacity_range: Some(csi::CapacityRange { required_bytes: mib(1)?, limit_bytes: 0 }),
                volume_capabilities: vec![mount_capability()],
                parameters,
                volume_content_source,
                ..Default::default()
            };
            let volume = controller.create_volume(req).await?.into_inner().volume.unwrap_or_default();
            println!("{}", volume.volume_id);
            print_pairs(&volume.volume_context);
        }
        ("controller-publish", 2) => {
            let req = csi::ControllerPublishVolumeRequest {
                volume_id: arg(0),
                node_id: arg(1),
                volume_capability: Some(mount_capability()),
                ..Default::default()
            };
            print_pairs(&controller.controller_publish_volume(req).await?.into_inner().publish_context);
        }
        ("controller-unpublish", 2) => {
            let req =
                csi::ControllerUnpublishVolumeRequest { volume_id: arg(0), node_id: arg(1), ..Default::default() };
            controller.controller_unpublish_volume(req).await?;
        }
        ("snapshot", 2) => {
            let req = csi::CreateSnapshotRequest { name: arg(0), source_volume_id: arg(1), ..Default::default() };
            let snapshot = controller.create_snapshot(req).await?.into_inner().snapshot.unwrap_or_default();
            println!("{}", snapshot.snapshot_id);
        }
        ("delete-snapshot", 1) => {
            let req = csi::DeleteSnapshotRequest { snapshot_id: arg(0), ..Default::default() };
            controller.delete_snapshot(req).await?;
        }
        ("delete", 1) => {
            controller.delete_volume(csi::DeleteVolumeRequest { volume_id: arg(0), ..Default::default() }).await?;
        }
        ("controller-expand", 2) => {
            let req = csi::ControllerExpandVolumeRequest {
                volume_id: arg(0),
                capacity_range: Some(csi::CapacityRange { required_bytes: mib(1)?, limit_bytes: 0 }),
                volume_capability: Some(mount_capability()),
                ..Default::default()
            };
            let reply = controller.controller_expand_volume(req).await?.into_inner();
            println!("{} node_expansion_required={}", reply.capacity_bytes, reply.node_expansion_required);
        }
        ("node-expand", 3) => {
            let req = csi::NodeExpandVolumeRequest {
                volume_id: arg(0),
                volume_path: arg(1),
                capacity_range: Some(csi::CapacityRange { required_bytes: mib(2)?, limit_bytes: 0 }),
                volume_capability: Some(mount_capability()),
                ..Default::default()
            };
            println!("{}", node.node_expand_volume(req).await?.into_inner().capacity_bytes);
        }
        ("node-info", 0) => {
            println!("{}", node.node_get_info(csi::NodeGetInfoRequest {}).await?.into_inner().node_id);
        }
        ("stage", n) if n >= 2 => {
            let req = csi::NodeStageVolumeRequest {
                volume_id: arg(0),
                staging_target_path: arg(1),
                publish_context: unprefixed(&a[2..]),
                volume_context: prefixed(&a[2..], "ctx:"),
                secrets: prefixed(&a[2..], "secret:"),
                volume_capability: Some(mount_capability()),
            };
            node.node_stage_volume(req).await?;
        }
        ("publish", 3) => {
            let req = csi::NodePublishVolumeRequest {
                volume_id: arg(0),
                staging_target_path: arg(1),
                target_path: arg(2),
                volume_capability: Some(mount_capability()),
                ..Default::default()
            };
            node.node_publish_volume(req).await?;
        }
        ("stats", 2) => {
            let req = csi::NodeGetVolumeStatsRequest { volume_id: arg(0), volume_path: arg(1), ..Default::default() };
            let reply = node.node_get_volume_stats(req).await?.into_inner();
            for u in reply.usage {
                println!("unit={} total={} used={} available={}", u.unit, u.total, u.used, u.available);
            }
            if let Some(c) = reply.volume_condition {
                println!("abnormal={} message={}", c.abnormal, c.message);
            }
        }
        ("unpublish", 2) => {
            node.node_unpublish_volume(csi::NodeUnpublishVolumeRequest { volume_id: arg(0), target_path: arg(1) })
                .await?;
        }
        ("unstage", 2) => {
            let req = csi::NodeUnstageVolumeRequest { volume_id: arg(0), staging_target_path: arg(1) };
            node.node_unstage_volume(req).await?;
        }
        _ => return Ok(false),
    }
    Ok(true)
}

#[tokio::main(flavor = "current_thread")]
async fn main() -> ExitCode {
    let args: Vec<String> = std::env::args().skip(1).collect();
    if args.len() < 2 {
        return usage();
    }
    let socket = PathBuf::from(args[0].trim_start_matches("unix://"));
    let channel = match connect(socket.clone()).await {
        Ok(channel) => channel,
        Err(e) => {
            eprintln!("connecting to {}: {e}", socket.display());
            return ExitCode::FAILURE;
        }
    };
    match call(channel, &args[1], &args[2..]).await {
        Ok(true) => ExitCode::SUCCESS,
        Ok(false) => usage(),
        Err(status) => {
            eprintln!("{:?}: {}", status.code(), status.message());
            ExitCode::FAILURE
        }
    }
}
