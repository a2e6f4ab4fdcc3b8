//! End to end, the way Kubernetes drives the plugin: every call goes over
//! the plugin's unix socket in the order the sidecars (provisioner,
//! attacher, resizer) and the kubelet make them, against a local cluster
//! (3 metadata members, 3 chunk servers, replicas=3) and the real
//! `nbd-client`. Nothing is simulated: mkfs and mount run on the attached
//! device (FUSE + loop where the nbd module is missing), files go through
//! the replicated volume to the chunk servers, and deleting the volume
//! empties their data directories.
//!
//! These need root, FUSE, loop devices, mkfs and fio.

mod common;

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use ballast_proto::csi;
use ballast_proto::csi::volume_capability::access_mode::Mode;
use ballast_proto::meta as pb;
use common::cluster::*;
use common::*;
use csi_plugin::node::mounts;
use tonic::Code;

/// Orphaned chunks go after two consecutive reconciliations (every ~10 s):
/// give it three and some slack.
const CHUNKS_GONE_LIMIT: Duration = Duration::from_secs(40);

/// Where the kubelet would stage and publish a volume (under the test
/// directory).
struct KubeletPaths {
    staging: PathBuf,
    target: PathBuf,
}

impl KubeletPaths {
    fn filesystem(t: &ClusterHarness, pv: &str) -> Self {
        let root = t.path("kubelet");
        Self {
            staging: root.join(format!("plugins/kubernetes.io/csi/csi.ballast.io/{pv}/globalmount")),
            target: root.join(format!("pods/pod-1/volumes/kubernetes.io~csi/{pv}/mount")),
        }
    }

    fn block(t: &ClusterHarness, pv: &str) -> Self {
        let root = t.path("kubelet/plugins/kubernetes.io/csi/volumeDevices");
        Self { staging: root.join(format!("staging/{pv}")), target: root.join(format!("publish/{pv}/pod-1")) }
    }
}

/// `cap` with extra mount flags.
fn with_mount_flags(cap: &csi::VolumeCapability, flags: &[&str]) -> csi::VolumeCapability {
    let mut cap = cap.clone();
    if let Some(csi::volume_capability::AccessType::Mount(mount)) = cap.access_type.as_mut() {
        mount.mount_flags.extend(flags.iter().map(|f| f.to_string()));
    }
    cap
}

/// The StorageClass parameters plus what the provisioner adds for a claim.
fn storage_class(fs: Option<&str>, pv: &str) -> HashMap<String, String> {
    let mut parameters = params(&[
        ("replicas", "3"),
        ("csi.storage.k8s.io/pvc/name", "data"),
        ("csi.storage.k8s.io/pvc/namespace", "default"),
        ("csi.storage.k8s.io/pv/name", pv),
    ]);
    if let Some(fs) = fs {
        parameters.insert("fsType".into(), fs.into());
    }
    parameters
}

/// The identity calls every sidecar makes first: plugin info, then Probe
/// until the plugin is ready.
async fn identity_ready(t: &ClusterHarness) {
    let mut identity = t.plugin.identity().await;
    let info = identity.get_plugin_info(csi::GetPluginInfoRequest {}).await.unwrap().into_inner();
    assert_eq!(info.name, "csi.ballast.io");
    let started = Instant::now();
    while identity.probe(csi::ProbeRequest {}).await.expect("Probe").into_inner().ready == Some(false) {
        assert!(started.elapsed() < Duration::from_secs(30), "the plugin is not ready after 30 s");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    let node = t.plugin.node().await.node_get_info(csi::NodeGetInfoRequest {}).await.unwrap().into_inner();
    assert_eq!(node.node_id, NODE);
}

/// Files of assorted sizes: name and content.
fn payload() -> Vec<(&'static str, Vec<u8>)> {
    vec![
        ("hello.txt", b"hello from a pod\n".to_vec()),
        ("dir/nested/small.bin", (0..4096u32).map(|i| (i * 7 % 256) as u8).collect()),
        ("big.bin", (0..5 * MIB as u32).map(|i| (i % 251) as u8 ^ (i >> 16) as u8).collect()),
    ]
}

fn write_files(root: &Path) {
    for (name, content) in payload() {
        let path = root.join(name);
        std::fs::create_dir_all(path.parent().unwrap()).unwrap();
        std::fs::write(&path, &content).unwrap();
        std::fs::File::open(&path).unwrap().sync_all().unwrap();
    }
    nix::unistd::sync();
}

#[track_caller]
fn assert_files(root: &Path) {
    for (name, content) in payload() {
        let found = std::fs::read(root.join(name)).unwrap_or_else(|e| panic!("reading {name}: {e}"));
        assert!(found == content, "{name} differs after re-attaching ({} bytes read)", found.len());
    }
}

/// Every storage server holds chunks of the volume (replicas=3 on 3
/// servers): what is deleted later was really there.
fn assert_chunks_everywhere(t: &ClusterHarness, data_id: u64) {
    for (server, files) in t.chunk_files(data_id) {
        assert!(
            files.iter().any(|f| f.extension().is_some_and(|e| e == "chunk")),
            "{server} holds no chunk of data id {data_id:#x}: {files:?}"
        );
    }
}

/// Polls until no storage server holds anything of the volume.
async fn assert_chunks_deleted(t: &ClusterHarness, data_id: u64) {
    let started = Instant::now();
    loop {
        let left: Vec<(String, Vec<PathBuf>)> =
            t.chunk_files(data_id).into_iter().filter(|(_, files)| !files.is_empty()).collect();
        if left.is_empty() {
            eprintln!("chunks of data id {data_id:#x} deleted after {:?}", started.elapsed());
            return;
        }
        assert!(
            started.elapsed() < CHUNKS_GONE_LIMIT,
            "{:?} after DeleteVolume the storage servers still hold: {left:?}",
            started.elapsed()
        );
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
}

/// ControllerUnpublish + DeleteVolume, then the volume is gone from
/// metadata and, soon, from the chunk servers.
async fn unpublish_and_delete(t: &ClusterHarness, volume: &csi::Volume, data_id: u64) {
    let mut c = t.plugin.controller().await;
    c.controller_unpublish_volume(csi::ControllerUnpublishVolumeRequest {
        volume_id: volume.volume_id.clone(),
        node_id: NODE.into(),
        ..Default::default()
    })
    .await
    .expect("ControllerUnpublishVolume");
    let attachments =
        t.meta.list_attachments(pb::ListAttachmentsRequest { volume_id: volume.volume_id.clone() }).await.unwrap();
    assert!(attachments.attachments.is_empty(), "{attachments:?}");
    c.delete_volume(csi::DeleteVolumeRequest { volume_id: volume.volume_id.clone(), ..Default::default() })
        .await
        .expect("DeleteVolume");
    let gone = t
        .meta
        .get_volume(pb::GetVolumeRequest { key: Some(pb::get_volume_request::Key::Id(volume.volume_id.clone())) })
        .await
        .unwrap_err();
    assert_eq!(gone.code(), Code::NotFound);
    // The provisioner retries DeleteVolume until it succeeds: idempotent.
    c.delete_volume(csi::DeleteVolumeRequest { volume_id: volume.volume_id.clone(), ..Default::default() })
        .await
        .expect("DeleteVolume again");
    assert_chunks_deleted(t, data_id).await;
}

#[tokio::test]
async fn filesystem_volume_end_to_end_ext4() {
    filesystem_volume_end_to_end("ext4", &[]).await;
}

#[tokio::test]
async fn filesystem_volume_end_to_end_xfs() {
    filesystem_volume_end_to_end("xfs", &["mkfs.xfs", "xfs_growfs"]).await;
}

async fn filesystem_volume_end_to_end(fs: &str, tools: &[&str]) {
    if !attach_possible(tools) {
        return;
    }
    let t = ClusterHarness::start().await;
    identity_ready(&t).await;
    let mut c = t.plugin.controller().await;
    let mut n = t.plugin.node().await;
    let pv = format!("pvc-e2e-{fs}");
    let cap = mount_cap(fs, Mode::SingleNodeWriter);
    let paths = KubeletPaths::filesystem(&t, &pv);
    let (staging, target) = (&paths.staging, &paths.target);

    // The provisioner: CreateVolume from the claim and its StorageClass.
    let volume = c
        .create_volume(csi::CreateVolumeRequest {
            name: pv.clone(),
            capacity_range: range(512 * MIB, 0),
            volume_capabilities: vec![cap.clone()],
            parameters: storage_class(Some(fs), &pv),
            ..Default::default()
        })
        .await
        .expect("CreateVolume")
        .into_inner()
        .volume
        .unwrap();
    assert_eq!(volume.capacity_bytes, 512 * MIB);
    assert_eq!(volume.volume_context["fsType"], fs);
    let record = t.meta_volume(&volume.volume_id).await;
    assert_eq!(record.replicas, 3);
    let data_id = record.data_id;

    // The attacher: ControllerPublishVolume to this node.
    let ctx = t.publish(&volume, &cap).await;
    assert!(ctx.contains_key("epoch"), "{ctx:?}");

    // The kubelet: stage (mkfs on the blank volume, mount), publish.
    n.node_stage_volume(stage_request(&volume, staging, &cap, &ctx)).await.expect("NodeStageVolume");
    let entry = mounts::mounted_at(staging).unwrap().expect("staged");
    assert_eq!(entry.fs_type, fs);
    let mapping = t.mapping(&volume.volume_id).expect("attached by nbd-client");
    assert_eq!(mapping.device, entry.source);
    eprintln!("attached as {} ({:?})", mapping.device.display(), mapping.method);
    n.node_publish_volume(publish_request(&volume, staging, target, &cap, false)).await.expect("NodePublishVolume");
    assert!(mounts::mounted_at(target).unwrap().is_some());

    // The pod writes.
    write_files(target);
    assert_chunks_everywhere(&t, data_id);

    // The pod goes, the volume is detached from the node...
    n.node_unpublish_volume(unpublish_request(&volume.volume_id, target)).await.expect("NodeUnpublishVolume");
    n.node_unstage_volume(unstage_request(&volume.volume_id, staging)).await.expect("NodeUnstageVolume");
    assert!(mounts::mounted_at(staging).unwrap().is_none());
    assert!(t.mapping(&volume.volume_id).is_none(), "{:?}", t.mapped());

    // ...and comes back: same files, no mkfs.
    n.node_stage_volume(stage_request(&volume, staging, &cap, &ctx)).await.expect("NodeStageVolume again");
    n.node_publish_volume(publish_request(&volume, staging, target, &cap, false))
        .await
        .expect("NodePublishVolume again");
    assert_files(target);

    // The snapshotter: CreateSnapshot of the volume in use. The pod's
    // writes must reach the device first (an application would fsync).
    assert!(Command::new("sync").arg("-f").arg(target).status().unwrap().success());
    let snap = c
        .create_snapshot(csi::CreateSnapshotRequest {
            source_volume_id: volume.volume_id.clone(),
            name: format!("snap-{pv}"),
            ..Default::default()
        })
        .await
        .expect("CreateSnapshot")
        .into_inner()
        .snapshot
        .unwrap();
    assert!(snap.ready_to_use, "{snap:?}");
    let snap_record = t
        .meta
        .list_snapshots(pb::ListSnapshotsRequest { snapshot_id: snap.snapshot_id.clone(), ..Default::default() })
        .await
        .unwrap()
        .snapshots
        .pop()
        .unwrap();
    assert_chunks_everywhere(&t, snap_record.data_id);
    // Written after the snapshot: never in it.
    std::fs::write(target.join("after-snapshot.txt"), b"later\n").unwrap();
    assert!(Command::new("sync").arg("-f").arg(target).status().unwrap().success());

    // The provisioner: a volume from the snapshot, used beside the original.
    let restored_pv = format!("{pv}-restored");
    let restored = c
        .create_volume(csi::CreateVolumeRequest {
            name: restored_pv.clone(),
            capacity_range: range(512 * MIB, 0),
            volume_capabilities: vec![cap.clone()],
            parameters: storage_class(Some(fs), &restored_pv),
            volume_content_source: Some(csi::VolumeContentSource {
                r#type: Some(csi::volume_content_source::Type::Snapshot(csi::volume_content_source::SnapshotSource {
                    snapshot_id: snap.snapshot_id.clone(),
                })),
            }),
            ..Default::default()
        })
        .await
        .expect("CreateVolume from the snapshot")
        .into_inner()
        .volume
        .unwrap();
    let restored_data_id = t.meta_volume(&restored.volume_id).await.data_id;
    // A block copy carries the filesystem's UUID; xfs refuses a duplicate
    // UUID on one host unless told otherwise.
    let restored_cap = if fs == "xfs" { with_mount_flags(&cap, &["nouuid"]) } else { cap.clone() };
    let restored_paths = KubeletPaths::filesystem(&t, &restored_pv);
    let restored_ctx = t.publish(&restored, &restored_cap).await;
    n.node_stage_volume(stage_request(&restored, &restored_paths.staging, &restored_cap, &restored_ctx))
        .await
        .expect("NodeStageVolume of the restored volume");
    n.node_publish_volume(publish_request(
        &restored,
        &restored_paths.staging,
        &restored_paths.target,
        &restored_cap,
        false,
    ))
    .await
    .expect("NodePublishVolume of the restored volume");
    assert_files(&restored_paths.target);
    assert!(!restored_paths.target.join("after-snapshot.txt").exists(), "later writes are not in the snapshot");
    std::fs::write(restored_paths.target.join("restored-only.txt"), b"mine\n").unwrap();
    assert!(!target.join("restored-only.txt").exists(), "writes to the restored volume stay there");
    n.node_unpublish_volume(unpublish_request(&restored.volume_id, &restored_paths.target)).await.unwrap();
    n.node_unstage_volume(unstage_request(&restored.volume_id, &restored_paths.staging)).await.unwrap();
    unpublish_and_delete(&t, &restored, restored_data_id).await;
    c.delete_snapshot(csi::DeleteSnapshotRequest { snapshot_id: snap.snapshot_id.clone(), ..Default::default() })
        .await
        .expect("DeleteSnapshot");
    assert_chunks_deleted(&t, snap_record.data_id).await;

    // The resizer: ControllerExpandVolume; then the kubelet:
    // NodeExpandVolume on the published path.
    let grown = 1024 * MIB;
    let expanded = c
        .controller_expand_volume(csi::ControllerExpandVolumeRequest {
            volume_id: volume.volume_id.clone(),
            capacity_range: range(grown, 0),
            volume_capability: Some(cap.clone()),
            ..Default::default()
        })
        .await
        .expect("ControllerExpandVolume")
        .into_inner();
    assert_eq!(expanded.capacity_bytes, grown);
    assert!(expanded.node_expansion_required);
    assert_eq!(t.meta_volume(&volume.volume_id).await.size_bytes, grown as u64);
    let before = df_size(target);
    assert!(before < 512 * MIB, "df shows {before} bytes");
    // Online: the device grows under the mounted filesystem, then the
    // filesystem grows to fill it.
    if fs == "ext4" && !has_capability(CAP_SYS_RESOURCE) {
        // resize2fs on a mounted ext4 needs CAP_SYS_RESOURCE; the xfs
        // variant checks df here.
        eprintln!("skipping the df check of online ext4 growth: no CAP_SYS_RESOURCE here");
        let err = n.node_expand_volume(expand_request(&volume, target, grown, &cap)).await.unwrap_err();
        assert!(err.message().contains("CAP_SYS_RESOURCE"), "{err:?}");
    } else {
        let reply = n.node_expand_volume(expand_request(&volume, target, grown, &cap)).await.expect("NodeExpandVolume");
        assert_eq!(reply.into_inner().capacity_bytes, grown);
        let after = df_size(target);
        assert!(after > 900 * MIB, "df shows {after} bytes after growing to {grown}");
    }
    assert_eq!(device_bytes(&t.mapping(&volume.volume_id).unwrap().device), grown);
    assert_files(target);

    // Teardown: the pod goes, then the claim.
    n.node_unpublish_volume(unpublish_request(&volume.volume_id, target)).await.expect("NodeUnpublishVolume");
    n.node_unstage_volume(unstage_request(&volume.volume_id, staging)).await.expect("NodeUnstageVolume");
    assert!(!target.exists());
    assert!(mounts::mounted_at(staging).unwrap().is_none());
    assert!(t.mapping(&volume.volume_id).is_none(), "{:?}", t.mapped());
    unpublish_and_delete(&t, &volume, data_id).await;
    t.plugin.assert_logged_without_secrets(&volume.volume_id);
}

#[tokio::test]
async fn block_volume_end_to_end_with_fio_verify() {
    if !attach_possible(&["fio"]) {
        return;
    }
    let t = ClusterHarness::start().await;
    identity_ready(&t).await;
    let mut c = t.plugin.controller().await;
    let mut n = t.plugin.node().await;
    let pv = "pvc-e2e-block";
    let cap = block_cap(Mode::SingleNodeWriter);
    let paths = KubeletPaths::block(&t, pv);
    let (staging, target) = (&paths.staging, &paths.target);

    let volume = c
        .create_volume(csi::CreateVolumeRequest {
            name: pv.into(),
            capacity_range: range(64 * MIB, 0),
            volume_capabilities: vec![cap.clone()],
            parameters: storage_class(None, pv),
            ..Default::default()
        })
        .await
        .expect("CreateVolume")
        .into_inner()
        .volume
        .unwrap();
    let data_id = t.meta_volume(&volume.volume_id).await.data_id;
    let ctx = t.publish(&volume, &cap).await;
    std::fs::create_dir_all(staging).unwrap();
    n.node_stage_volume(stage_request(&volume, staging, &cap, &ctx)).await.expect("NodeStageVolume");
    n.node_publish_volume(publish_request(&volume, staging, target, &cap, false)).await.expect("NodePublishVolume");
    let mapping = t.mapping(&volume.volume_id).expect("attached by nbd-client");
    assert!(same_device(target, &mapping.device), "{} is not {}", target.display(), mapping.device.display());
    eprintln!("attached as {} ({:?})", mapping.device.display(), mapping.method);

    let fio = Command::new("fio")
        .current_dir(t.dir.path())
        .arg("--name=e2e-block")
        .arg(format!("--filename={}", target.display()))
        .args([
            "--direct=1",
            "--rw=randwrite",
            "--bs=4k",
            "--size=32M",
            "--verify=crc32c",
            "--verify_fatal=1",
            "--verify_state_save=0",
        ])
        .output()
        .expect("running fio");
    let report = format!("{}{}", String::from_utf8_lossy(&fio.stdout), String::from_utf8_lossy(&fio.stderr));
    assert!(fio.status.success(), "fio failed ({}):\n{report}", fio.status);
    assert!(!report.contains("verify: bad"), "{report}");
    assert_chunks_everywhere(&t, data_id);

    n.node_unpublish_volume(unpublish_request(&volume.volume_id, target)).await.expect("NodeUnpublishVolume");
    n.node_unstage_volume(unstage_request(&volume.volume_id, staging)).await.expect("NodeUnstageVolume");
    assert!(!target.exists());
    assert!(t.mapping(&volume.volume_id).is_none(), "{:?}", t.mapped());
    unpublish_and_delete(&t, &volume, data_id).await;
    t.plugin.assert_logged_without_secrets(&volume.volume_id);
}

/// A new user's sequence, exactly: a volume restaged once, snapshotted,
/// cloned and the clone staged beside it, then the original expanded
/// online. The clone is a block copy, so both filesystems carry one UUID.
#[tokio::test]
async fn online_expansion_with_a_staged_clone_beside_it() {
    if !attach_possible(&[]) {
        return;
    }
    let t = ClusterHarness::start().await;
    identity_ready(&t).await;
    let mut c = t.plugin.controller().await;
    let mut n = t.plugin.node().await;
    let cap = mount_cap("ext4", Mode::SingleNodeWriter);
    let original = t.create("pvc-grow", cap.clone(), Some(GIB), &[("fsType", "ext4")]).await;
    let paths = KubeletPaths::filesystem(&t, "pvc-grow");
    let ctx = t.publish(&original, &cap).await;
    n.node_stage_volume(stage_request(&original, &paths.staging, &cap, &ctx)).await.expect("NodeStageVolume");
    n.node_publish_volume(publish_request(&original, &paths.staging, &paths.target, &cap, false))
        .await
        .expect("NodePublishVolume");
    write_files(&paths.target);
    n.node_unpublish_volume(unpublish_request(&original.volume_id, &paths.target)).await.expect("unpublish");
    n.node_unstage_volume(unstage_request(&original.volume_id, &paths.staging)).await.expect("unstage");
    n.node_stage_volume(stage_request(&original, &paths.staging, &cap, &ctx)).await.expect("restage");
    n.node_publish_volume(publish_request(&original, &paths.staging, &paths.target, &cap, false))
        .await
        .expect("republish");

    let snap = c
        .create_snapshot(csi::CreateSnapshotRequest {
            source_volume_id: original.volume_id.clone(),
            name: "snap-grow".into(),
            ..Default::default()
        })
        .await
        .expect("CreateSnapshot")
        .into_inner()
        .snapshot
        .unwrap();
    let mut clone_request = create_request("pvc-grow-clone", GIB);
    clone_request.volume_capabilities = vec![cap.clone()];
    clone_request.parameters = params(&[("fsType", "ext4")]);
    clone_request.volume_content_source = Some(csi::VolumeContentSource {
        r#type: Some(csi::volume_content_source::Type::Snapshot(csi::volume_content_source::SnapshotSource {
            snapshot_id: snap.snapshot_id.clone(),
        })),
    });
    let clone =
        c.create_volume(clone_request).await.expect("CreateVolume from the snapshot").into_inner().volume.unwrap();
    let clone_paths = KubeletPaths::filesystem(&t, "pvc-grow-clone");
    let clone_ctx = t.publish(&clone, &cap).await;
    n.node_stage_volume(stage_request(&clone, &clone_paths.staging, &cap, &clone_ctx)).await.expect("stage the clone");

    let grown = 2 * GIB;
    c.controller_expand_volume(csi::ControllerExpandVolumeRequest {
        volume_id: original.volume_id.clone(),
        capacity_range: range(grown, 0),
        volume_capability: Some(cap.clone()),
        ..Default::default()
    })
    .await
    .expect("ControllerExpandVolume");
    let expand = || expand_request(&original, &paths.target, grown, &cap);
    if !has_capability(CAP_SYS_RESOURCE) {
        // Online ext4 growth is impossible without CAP_SYS_RESOURCE: said
        // plainly, and the filesystem grows when the volume is next staged.
        let err = n.node_expand_volume(expand()).await.unwrap_err();
        assert_eq!(err.code(), Code::FailedPrecondition, "{err:?}");
        assert!(err.message().contains("CAP_SYS_RESOURCE"), "{err:?}");
        assert!(df_size(&paths.target) < GIB, "unchanged until restaged");
        n.node_unpublish_volume(unpublish_request(&original.volume_id, &paths.target)).await.expect("unpublish");
        n.node_unstage_volume(unstage_request(&original.volume_id, &paths.staging)).await.expect("unstage");
        n.node_stage_volume(stage_request(&original, &paths.staging, &cap, &ctx)).await.expect("restage");
        n.node_publish_volume(publish_request(&original, &paths.staging, &paths.target, &cap, false))
            .await
            .expect("republish");
    }
    let reply =
        n.node_expand_volume(expand()).await.expect("NodeExpandVolume of the original while its clone is staged");
    assert_eq!(reply.into_inner().capacity_bytes, grown);
    let after = df_size(&paths.target);
    assert!(after > 1900 * MIB, "df shows {after} bytes after growing to {grown}");
    assert!(df_size(&clone_paths.staging) < GIB, "the clone's filesystem keeps its size");
    assert_files(&paths.target);

    n.node_unstage_volume(unstage_request(&clone.volume_id, &clone_paths.staging)).await.expect("unstage the clone");
    n.node_unpublish_volume(unpublish_request(&original.volume_id, &paths.target)).await.expect("unpublish");
    n.node_unstage_volume(unstage_request(&original.volume_id, &paths.staging)).await.expect("unstage");
}
