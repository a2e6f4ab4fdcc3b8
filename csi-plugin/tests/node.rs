//! Node service against the real binaries: a local cluster (3 metadata
//! members, 3 chunk servers), the plugin in `all` mode, and the real
//! `nbd-client` attaching volumes (through FUSE and a loop device where the
//! nbd kernel module is missing). Formatting, mounting, publishing, stats,
//! expansion and teardown are real too.
//!
//! These need root, FUSE, loop devices and mkfs.

mod common;

use std::io::{Read, Seek, SeekFrom, Write};
use std::os::unix::fs::FileTypeExt;
use std::path::Path;

use ballast_proto::csi;
use ballast_proto::csi::node_service_capability::rpc::Type as NodeRpc;
use ballast_proto::csi::volume_capability::access_mode::Mode;
use ballast_proto::meta as pb;
use common::cluster::*;
use common::*;
use csi_plugin::node::mounts;
use tonic::Code;

#[tokio::test]
async fn node_info_capabilities_and_argument_errors() {
    let dir = tempfile::tempdir().unwrap();
    let state = dir.path().join("state");
    let plugin = Plugin::start(
        dir.path(),
        "node",
        "127.0.0.1:1",
        &[
            "--mode",
            "node",
            "--node-id",
            NODE,
            "--topology",
            TOPOLOGY,
            "--max-volumes",
            "16",
            "--state-dir",
            state.to_str().unwrap(),
            "--nbd-client-bin",
            "/nonexistent/nbd-client",
        ],
        &[],
    )
    .await;
    let mut n = plugin.node().await;

    let info = n.node_get_info(csi::NodeGetInfoRequest {}).await.unwrap().into_inner();
    assert_eq!(info.node_id, NODE);
    assert_eq!(info.max_volumes_per_node, 16);
    assert_eq!(info.accessible_topology.unwrap().segments["topology.ballast.io/cluster"], "test");

    let caps = n.node_get_capabilities(csi::NodeGetCapabilitiesRequest {}).await.unwrap().into_inner();
    let got: Vec<i32> = caps
        .capabilities
        .iter()
        .map(|c| match &c.r#type {
            Some(csi::node_service_capability::Type::Rpc(rpc)) => rpc.r#type,
            None => panic!("capability without a type"),
        })
        .collect();
    let want: Vec<i32> = [
        NodeRpc::StageUnstageVolume,
        NodeRpc::GetVolumeStats,
        NodeRpc::ExpandVolume,
        NodeRpc::VolumeCondition,
        NodeRpc::SingleNodeMultiWriter,
        NodeRpc::GetVolumeHealth,
        NodeRpc::GetStorageHealth,
    ]
    .iter()
    .map(|t| *t as i32)
    .collect();
    assert_eq!(got, want);

    let cap = Some(mount_cap("ext4", Mode::SingleNodeWriter));
    let stage = csi::NodeStageVolumeRequest {
        volume_id: "vol-1".into(),
        staging_target_path: "/tmp/x".into(),
        volume_capability: cap.clone(),
        publish_context: params(&[("epoch", "1")]),
        ..Default::default()
    };
    for (field, req) in [
        ("volume_id", csi::NodeStageVolumeRequest { volume_id: String::new(), ..stage.clone() }),
        ("staging path", csi::NodeStageVolumeRequest { staging_target_path: String::new(), ..stage.clone() }),
        ("capability", csi::NodeStageVolumeRequest { volume_capability: None, ..stage.clone() }),
        ("epoch", csi::NodeStageVolumeRequest { publish_context: Default::default(), ..stage.clone() }),
        ("bad id", csi::NodeStageVolumeRequest { volume_id: "../../etc".into(), ..stage.clone() }),
    ] {
        assert_eq!(code(n.node_stage_volume(req).await), Code::InvalidArgument, "{field}");
    }
    // Staging needs the attach tool.
    assert_eq!(code(n.node_stage_volume(stage).await), Code::FailedPrecondition);

    assert_eq!(code(n.node_unstage_volume(unstage_request("", Path::new("/tmp/x"))).await), Code::InvalidArgument);
    assert_eq!(code(n.node_unstage_volume(unstage_request("vol-1", Path::new(""))).await), Code::InvalidArgument);
    // Nothing staged, nothing recorded: unstaging is a no-op.
    let nowhere = dir.path().join("nowhere");
    n.node_unstage_volume(unstage_request("vol-1", &nowhere)).await.unwrap();

    let publish = csi::NodePublishVolumeRequest {
        volume_id: "vol-1".into(),
        staging_target_path: "/tmp/x".into(),
        target_path: dir.path().join("t").to_str().unwrap().into(),
        volume_capability: cap.clone(),
        ..Default::default()
    };
    for req in [
        csi::NodePublishVolumeRequest { volume_id: String::new(), ..publish.clone() },
        csi::NodePublishVolumeRequest { target_path: String::new(), ..publish.clone() },
        csi::NodePublishVolumeRequest { volume_capability: None, ..publish.clone() },
        csi::NodePublishVolumeRequest { staging_target_path: String::new(), ..publish.clone() },
    ] {
        assert_eq!(code(n.node_publish_volume(req).await), Code::InvalidArgument);
    }
    assert_eq!(code(n.node_publish_volume(publish).await), Code::FailedPrecondition, "not staged");

    assert_eq!(code(n.node_unpublish_volume(unpublish_request("", Path::new("/tmp/t"))).await), Code::InvalidArgument);
    assert_eq!(code(n.node_unpublish_volume(unpublish_request("vol-1", Path::new(""))).await), Code::InvalidArgument);

    let stats = |id: &str, path: &str| csi::NodeGetVolumeStatsRequest {
        volume_id: id.into(),
        volume_path: path.into(),
        staging_target_path: String::new(),
    };
    assert_eq!(code(n.node_get_volume_stats(stats("", "/tmp")).await), Code::InvalidArgument);
    assert_eq!(code(n.node_get_volume_stats(stats("vol-1", "")).await), Code::InvalidArgument);
    assert_eq!(code(n.node_get_volume_stats(stats("vol-1", "some/path")).await), Code::NotFound);

    let expand = |id: &str, path: &str| csi::NodeExpandVolumeRequest {
        volume_id: id.into(),
        volume_path: path.into(),
        ..Default::default()
    };
    assert_eq!(code(n.node_expand_volume(expand("", "/tmp")).await), Code::InvalidArgument);
    assert_eq!(code(n.node_expand_volume(expand("vol-1", "")).await), Code::InvalidArgument);
    assert_eq!(code(n.node_expand_volume(expand("vol-1", "some/path")).await), Code::NotFound);
}

#[tokio::test]
async fn filesystem_volume_lifecycle() {
    if !attach_possible(&[]) {
        return;
    }
    let t = ClusterHarness::start().await;
    let mut n = t.plugin.node().await;
    // A plugin whose socket is up has registered its node and limit.
    let registered = t.meta.get_node(pb::GetNodeRequest { node_id: NODE.into() }).await.expect("node registered");
    assert_eq!(registered.max_volumes, 16);
    assert_eq!(registered.topology["topology.ballast.io/cluster"], "test");
    let cap = mount_cap("ext4", Mode::SingleNodeWriter);
    let volume = t.create("fs", cap.clone(), None, &[]).await;
    let staging = t.path("staging");
    let (target, target_ro) = (t.path("pods/a/mount"), t.path("pods/b/mount"));

    // Staging needs the epoch of a publication.
    assert_eq!(
        code(n.node_stage_volume(stage_request(&volume, &staging, &cap, &Default::default())).await),
        Code::InvalidArgument
    );
    let ctx = t.publish(&volume, &cap).await;
    n.node_stage_volume(stage_request(&volume, &staging, &cap, &ctx)).await.unwrap();
    n.node_stage_volume(stage_request(&volume, &staging, &cap, &ctx)).await.unwrap();
    let entry = mounts::mounted_at(&staging).unwrap().expect("staging path mounted");
    assert_eq!(entry.fs_type, "ext4");
    assert_eq!(mounts::mounts_at(&staging).unwrap().len(), 1, "staging twice mounts once");
    let device = entry.source.clone();
    let mapping = t.mapping(&volume.volume_id).expect("nbd-client lists the volume");
    assert_eq!(mapping.device, device);
    assert_eq!(mapping.served, Some(true), "{mapping:?}");
    assert_eq!(mapping.epoch.to_string(), ctx["epoch"], "attached with the epoch of the publication");
    std::fs::write(staging.join("precious"), b"data").unwrap();

    // Staged again as raw block: incompatible.
    let block = block_cap(Mode::SingleNodeWriter);
    assert_eq!(code(n.node_stage_volume(stage_request(&volume, &staging, &block, &ctx)).await), Code::AlreadyExists);

    // Publish read-write, twice, and read-only elsewhere.
    n.node_publish_volume(publish_request(&volume, &staging, &target, &cap, false)).await.unwrap();
    n.node_publish_volume(publish_request(&volume, &staging, &target, &cap, false)).await.unwrap();
    assert_eq!(mounts::mounts_at(&target).unwrap().len(), 1);
    assert_eq!(std::fs::read(target.join("precious")).unwrap(), b"data");
    n.node_publish_volume(publish_request(&volume, &staging, &target_ro, &cap, true)).await.unwrap();
    assert!(mounts::mounted_at(&target_ro).unwrap().unwrap().read_only());
    assert!(std::fs::write(target_ro.join("nope"), b"x").is_err());
    assert_eq!(
        code(n.node_publish_volume(publish_request(&volume, &staging, &target, &cap, true)).await),
        Code::AlreadyExists
    );

    // Stats: bytes and inodes of the filesystem, a healthy condition.
    let stats = n
        .node_get_volume_stats(csi::NodeGetVolumeStatsRequest {
            volume_id: volume.volume_id.clone(),
            volume_path: target.to_str().unwrap().into(),
            staging_target_path: staging.to_str().unwrap().into(),
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(stats.usage.len(), 2);
    let bytes = &stats.usage[0];
    assert!(bytes.total > 400 * MIB && bytes.total <= 512 * MIB, "{bytes:?}");
    assert!(bytes.used > 0 && bytes.available > 0);
    assert!(stats.usage[1].total > 0);
    let condition = stats.volume_condition.unwrap();
    assert!(!condition.abnormal, "{}", condition.message);
    let elsewhere = t.path("elsewhere");
    std::fs::create_dir_all(&elsewhere).unwrap();
    let not_here = csi::NodeGetVolumeStatsRequest {
        volume_id: volume.volume_id.clone(),
        volume_path: elsewhere.to_str().unwrap().into(),
        staging_target_path: String::new(),
    };
    assert_eq!(code(n.node_get_volume_stats(not_here).await), Code::NotFound);

    // Expansion. Before the volume grew in metadata the node cannot grow
    // it, and says why; after ControllerExpandVolume the mapped device
    // grows under the mounted filesystem, and then the filesystem.
    let grown = 1024 * MIB;
    let err = n.node_expand_volume(expand_request(&volume, &target, grown, &cap)).await.unwrap_err();
    assert_eq!(err.code(), Code::FailedPrecondition, "{err:?}");
    assert!(err.message().contains("ControllerExpandVolume"), "{}", err.message());
    assert_eq!(device_bytes(&device), 512 * MIB);
    let mut c = t.plugin.controller().await;
    let reply = c
        .controller_expand_volume(csi::ControllerExpandVolumeRequest {
            volume_id: volume.volume_id.clone(),
            capacity_range: range(grown, 0),
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    assert!(reply.node_expansion_required);
    if has_capability(CAP_SYS_RESOURCE) {
        let expanded = n.node_expand_volume(expand_request(&volume, &target, grown, &cap)).await.unwrap().into_inner();
        assert_eq!(expanded.capacity_bytes, grown);
        assert!(df_size(&target) > 900 * MIB, "df shows {} bytes", df_size(&target));
        let again = n.node_expand_volume(expand_request(&volume, &target, grown, &cap)).await.unwrap().into_inner();
        assert_eq!(again.capacity_bytes, grown, "NodeExpandVolume is idempotent");
    } else {
        // resize2fs on a mounted ext4 needs CAP_SYS_RESOURCE; the xfs test
        // covers filesystem growth here.
        eprintln!("skipping online ext4 growth: no CAP_SYS_RESOURCE here");
        let err = n.node_expand_volume(expand_request(&volume, &target, grown, &cap)).await.unwrap_err();
        assert_eq!(err.code(), Code::FailedPrecondition, "{err:?}");
        assert!(err.message().contains("CAP_SYS_RESOURCE"), "{err:?}");
    }
    assert_eq!(device_bytes(&device), grown, "the mapped device grew");
    assert_eq!(std::fs::read(target.join("precious")).unwrap(), b"data");

    // Unstaging while published is refused; unpublish, then unstage.
    assert_eq!(
        code(n.node_unstage_volume(unstage_request(&volume.volume_id, &staging)).await),
        Code::FailedPrecondition
    );
    assert!(mounts::mounted_at(&staging).unwrap().is_some(), "a refused unstage changes nothing");
    for path in [&target, &target_ro] {
        n.node_unpublish_volume(unpublish_request(&volume.volume_id, path)).await.unwrap();
        n.node_unpublish_volume(unpublish_request(&volume.volume_id, path)).await.unwrap();
        assert!(!path.exists(), "{} removed", path.display());
    }
    n.node_unstage_volume(unstage_request(&volume.volume_id, &staging)).await.unwrap();
    n.node_unstage_volume(unstage_request(&volume.volume_id, &staging)).await.unwrap();
    assert!(mounts::mounted_at(&staging).unwrap().is_none());
    assert!(t.mapping(&volume.volume_id).is_none(), "{:?}", t.mapped());

    // Staging again maps the volume anew, at its new size; the filesystem
    // is found and never reformatted.
    n.node_stage_volume(stage_request(&volume, &staging, &cap, &ctx)).await.unwrap();
    assert_eq!(std::fs::read(staging.join("precious")).unwrap(), b"data");
    let device = mounts::mounted_at(&staging).unwrap().unwrap().source;
    assert_eq!(device_bytes(&device), grown);
    n.node_unstage_volume(unstage_request(&volume.volume_id, &staging)).await.unwrap();
    assert!(t.mapping(&volume.volume_id).is_none(), "{:?}", t.mapped());
}

/// Writes `data` at `offset` of a block device (or reads it back) and
/// syncs.
fn write_at(path: &Path, offset: u64, data: &[u8]) {
    let mut file = std::fs::OpenOptions::new().write(true).open(path).unwrap();
    file.seek(SeekFrom::Start(offset)).unwrap();
    file.write_all(data).unwrap();
    file.sync_all().unwrap();
}

fn read_at(path: &Path, offset: u64, len: usize) -> Vec<u8> {
    let mut file = std::fs::File::open(path).unwrap();
    file.seek(SeekFrom::Start(offset)).unwrap();
    let mut data = vec![0; len];
    file.read_exact(&mut data).unwrap();
    data
}

#[tokio::test]
async fn raw_block_volume_lifecycle() {
    if !attach_possible(&[]) {
        return;
    }
    let t = ClusterHarness::start().await;
    let mut n = t.plugin.node().await;
    let cap = block_cap(Mode::SingleNodeSingleWriter);
    let size = 256 * MIB;
    let volume = t.create("raw", cap.clone(), Some(size), &[]).await;
    assert!(!volume.volume_context.contains_key("fsType"));
    let ctx = t.publish(&volume, &cap).await;
    let staging = t.path("staging");
    std::fs::create_dir_all(&staging).unwrap();
    let (target, second) = (t.path("pods/a/dev/raw"), t.path("pods/b/dev/raw"));

    n.node_stage_volume(stage_request(&volume, &staging, &cap, &ctx)).await.unwrap();
    n.node_stage_volume(stage_request(&volume, &staging, &cap, &ctx)).await.unwrap();
    assert!(mounts::mounted_at(&staging).unwrap().is_none(), "raw block volumes are not mounted at staging");

    n.node_publish_volume(publish_request(&volume, &staging, &target, &cap, false)).await.unwrap();
    n.node_publish_volume(publish_request(&volume, &staging, &target, &cap, false)).await.unwrap();
    assert!(std::fs::metadata(&target).unwrap().file_type().is_block_device());
    let mapping = t.mapping(&volume.volume_id).expect("nbd-client lists the volume");
    assert!(same_device(&target, &mapping.device), "{} is {}", target.display(), mapping.device.display());
    assert_eq!(blkid_type(target.to_str().unwrap()), "", "a raw volume is never formatted");
    let pattern: Vec<u8> = (0..MIB as usize).map(|i| (i % 251) as u8).collect();
    write_at(&target, 100 * MIB as u64, &pattern);
    // SINGLE_NODE_SINGLE_WRITER: one publication only.
    assert_eq!(
        code(n.node_publish_volume(publish_request(&volume, &staging, &second, &cap, false)).await),
        Code::FailedPrecondition
    );
    // Published as a filesystem: no.
    let fs = mount_cap("ext4", Mode::SingleNodeWriter);
    assert_eq!(
        code(n.node_publish_volume(publish_request(&volume, &staging, &second, &fs, false)).await),
        Code::InvalidArgument
    );

    let stats = n
        .node_get_volume_stats(csi::NodeGetVolumeStatsRequest {
            volume_id: volume.volume_id.clone(),
            volume_path: target.to_str().unwrap().into(),
            staging_target_path: String::new(),
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(stats.usage.len(), 1);
    assert_eq!(stats.usage[0].total, size);
    let condition = stats.volume_condition.unwrap();
    assert!(!condition.abnormal, "{}", condition.message);
    let expanded = n.node_expand_volume(expand_request(&volume, &target, size, &cap)).await.unwrap().into_inner();
    assert_eq!(expanded.capacity_bytes, size);

    // Unstaging while published is refused.
    assert_eq!(
        code(n.node_unstage_volume(unstage_request(&volume.volume_id, &staging)).await),
        Code::FailedPrecondition
    );
    n.node_unpublish_volume(unpublish_request(&volume.volume_id, &target)).await.unwrap();
    assert!(!target.exists());
    n.node_unstage_volume(unstage_request(&volume.volume_id, &staging)).await.unwrap();
    assert!(t.mapping(&volume.volume_id).is_none(), "{:?}", t.mapped());

    // Attached again: the data is the volume's, not the device's.
    n.node_stage_volume(stage_request(&volume, &staging, &cap, &ctx)).await.unwrap();
    n.node_publish_volume(publish_request(&volume, &staging, &target, &cap, false)).await.unwrap();
    assert!(read_at(&target, 100 * MIB as u64, pattern.len()) == pattern, "the written MiB reads back");
    n.node_unpublish_volume(unpublish_request(&volume.volume_id, &target)).await.unwrap();
    n.node_unstage_volume(unstage_request(&volume.volume_id, &staging)).await.unwrap();
    assert!(t.mapping(&volume.volume_id).is_none(), "{:?}", t.mapped());
}

#[tokio::test]
async fn xfs_volumes_grow_and_foreign_content_is_never_formatted() {
    if !attach_possible(&["mkfs.xfs", "xfs_growfs"]) {
        return;
    }
    let t = ClusterHarness::start().await;
    let mut n = t.plugin.node().await;
    let xfs = mount_cap("xfs", Mode::SingleNodeWriter);
    let volume = t.create("xfs", xfs.clone(), None, &[]).await;
    assert_eq!(volume.volume_context["fsType"], "xfs");
    let ctx = t.publish(&volume, &xfs).await;
    let staging = t.path("staging");
    let target = t.path("pods/x/mount");
    n.node_stage_volume(stage_request(&volume, &staging, &xfs, &ctx)).await.unwrap();
    assert_eq!(mounts::mounted_at(&staging).unwrap().unwrap().fs_type, "xfs");
    n.node_publish_volume(publish_request(&volume, &staging, &target, &xfs, false)).await.unwrap();
    std::fs::write(target.join("kept"), b"xfs data").unwrap();

    // Grown in metadata, then online: the device under the mounted
    // filesystem, then the filesystem (xfs_growfs).
    let grown = 768 * MIB;
    let mut c = t.plugin.controller().await;
    c.controller_expand_volume(csi::ControllerExpandVolumeRequest {
        volume_id: volume.volume_id.clone(),
        capacity_range: range(grown, 0),
        volume_capability: Some(xfs.clone()),
        ..Default::default()
    })
    .await
    .unwrap();
    assert!(df_size(&target) < 512 * MIB);
    let expanded = n.node_expand_volume(expand_request(&volume, &target, grown, &xfs)).await.unwrap().into_inner();
    assert_eq!(expanded.capacity_bytes, grown);
    assert!(df_size(&target) > 600 * MIB, "df shows {} bytes", df_size(&target));
    assert_eq!(std::fs::read(target.join("kept")).unwrap(), b"xfs data");
    n.node_unpublish_volume(unpublish_request(&volume.volume_id, &target)).await.unwrap();
    n.node_unstage_volume(unstage_request(&volume.volume_id, &staging)).await.unwrap();

    // The same volume staged as ext4: it holds xfs, which stays.
    let ext4 = mount_cap("ext4", Mode::SingleNodeWriter);
    let err = n.node_stage_volume(stage_request(&volume, &staging, &ext4, &ctx)).await.unwrap_err();
    assert_eq!(err.code(), Code::FailedPrecondition, "{err:?}");
    assert!(err.message().contains("xfs"), "{}", err.message());
    let mapping = t.mapping(&volume.volume_id).expect("attached by the refused stage");
    assert_eq!(blkid_type(&mapping.device), "xfs");
    n.node_unstage_volume(unstage_request(&volume.volume_id, &staging)).await.unwrap();
    assert!(t.mapping(&volume.volume_id).is_none(), "{:?}", t.mapped());
}

#[tokio::test]
async fn ephemeral_inline_volumes_live_as_long_as_their_publication() {
    if !attach_possible(&[]) {
        return;
    }
    let t = ClusterHarness::start().await;
    let mut n = t.plugin.node().await;
    let target = t.path("pods/e/mount");
    let volume_id = "csi-0123456789abcdef";
    let req = ephemeral_request(volume_id, &target, &[("size", "300Mi"), ("replicas", "2")]);
    let mut bad = req.clone();
    bad.volume_context.insert("colour".into(), "blue".into());
    assert_eq!(code(n.node_publish_volume(bad).await), Code::InvalidArgument);

    n.node_publish_volume(req.clone()).await.unwrap();
    n.node_publish_volume(req).await.unwrap();
    assert_eq!(mounts::mounted_at(&target).unwrap().unwrap().fs_type, "ext4");
    std::fs::write(target.join("scratch"), b"x").unwrap();
    let meta_volume = t.meta.get_volume(ephemeral_by_name(volume_id)).await.unwrap();
    assert_eq!((meta_volume.size_bytes, meta_volume.replicas), (300 << 20, 2));
    let attachments =
        t.meta.list_attachments(pb::ListAttachmentsRequest { volume_id: meta_volume.id.clone() }).await.unwrap();
    assert_eq!(attachments.attachments[0].node_id, NODE);
    assert!(t.mapping(&meta_volume.id).is_some_and(|m| m.served == Some(true)), "{:?}", t.mapped());

    n.node_unpublish_volume(unpublish_request(volume_id, &target)).await.unwrap();
    n.node_unpublish_volume(unpublish_request(volume_id, &target)).await.unwrap();
    assert!(!target.exists());
    assert_eq!(t.meta.get_volume(ephemeral_by_name(volume_id)).await.unwrap_err().code(), Code::NotFound);
    assert!(t.mapping(&meta_volume.id).is_none(), "{:?}", t.mapped());
}

/// NodePublishVolume of an inline ephemeral volume, as the kubelet sends it.
fn ephemeral_request(volume_id: &str, target: &Path, attributes: &[(&str, &str)]) -> csi::NodePublishVolumeRequest {
    let mut context = params(&[("csi.storage.k8s.io/ephemeral", "true"), ("csi.storage.k8s.io/pod.name", "p")]);
    context.extend(params(attributes));
    csi::NodePublishVolumeRequest {
        volume_id: volume_id.into(),
        target_path: target.to_str().unwrap().into(),
        volume_capability: Some(mount_cap("", Mode::SingleNodeWriter)),
        volume_context: context,
        ..Default::default()
    }
}

fn ephemeral_by_name(volume_id: &str) -> pb::GetVolumeRequest {
    pb::GetVolumeRequest { key: Some(pb::get_volume_request::Key::Name(format!("ephemeral-{volume_id}"))) }
}

/// The node plugin crashes while inline volumes are published: once with
/// its state intact, once having lost a volume's state file (a crash
/// between attaching the volume and recording it). Unpublishing through
/// the restarted plugin removes everything: mounts, the device and its
/// serving process, the metadata volume.
#[tokio::test]
async fn ephemeral_volumes_leak_nothing_across_a_plugin_crash() {
    if !attach_possible(&[]) {
        return;
    }
    let mut t = ClusterHarness::start().await;
    let state_dir = t.path("state");
    let pods = [("csi-aaaaaaaaaaaaaaaa", false), ("csi-bbbbbbbbbbbbbbbb", true)];
    let mut published = Vec::new();
    let mut n = t.plugin.node().await;
    for (volume_id, _) in pods {
        let target = t.path(&format!("pods/{volume_id}/mount"));
        n.node_publish_volume(ephemeral_request(volume_id, &target, &[("size", "64Mi")])).await.unwrap();
        std::fs::write(target.join("scratch"), volume_id).unwrap();
        let meta_volume = t.meta.get_volume(ephemeral_by_name(volume_id)).await.unwrap();
        assert!(t.mapping(&meta_volume.id).is_some_and(|m| m.served == Some(true)), "{:?}", t.mapped());
        published.push((volume_id, target, meta_volume.id));
    }

    t.plugin.crash_and_restart().await;
    for (volume_id, lose_state) in pods {
        if lose_state {
            std::fs::remove_file(state_dir.join(format!("{volume_id}.json"))).unwrap();
        }
    }
    let mut n = t.plugin.node().await;
    for (volume_id, target, meta_id) in &published {
        n.node_unpublish_volume(unpublish_request(volume_id, target)).await.unwrap();
        assert!(!target.exists());
        assert_eq!(t.meta.get_volume(ephemeral_by_name(volume_id)).await.unwrap_err().code(), Code::NotFound);
        assert!(t.mapping(meta_id).is_none(), "{volume_id} is still mapped: {:?}", t.mapped());
    }
    let root = std::fs::canonicalize(t.dir.path()).unwrap();
    let left: Vec<_> =
        mounts::mount_table().unwrap().into_iter().filter(|m| m.mount_point.starts_with(&root)).collect();
    assert!(left.is_empty(), "mounts left behind: {left:?}");
    let records: Vec<_> = std::fs::read_dir(&state_dir)
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.extension().is_some_and(|e| e == "json"))
        .collect();
    assert!(records.is_empty(), "state left behind: {records:?}");
}

#[tokio::test]
async fn a_dead_serving_process_is_reported_and_replaced_by_staging_again() {
    if !attach_possible(&[]) {
        return;
    }
    let mut t = ClusterHarness::start().await;
    let mut n = t.plugin.node().await;
    let cap = block_cap(Mode::SingleNodeWriter);
    let volume = t.create("crash", cap.clone(), Some(64 * MIB), &[]).await;
    let ctx = t.publish(&volume, &cap).await;
    let staging = t.path("staging");
    std::fs::create_dir_all(&staging).unwrap();
    let target = t.path("pods/c/dev/crash");
    n.node_stage_volume(stage_request(&volume, &staging, &cap, &ctx)).await.unwrap();
    n.node_publish_volume(publish_request(&volume, &staging, &target, &cap, false)).await.unwrap();
    let pattern: Vec<u8> = (0..256 * 1024).map(|i| (i % 241) as u8).collect();
    write_at(&target, 8 * MIB as u64, &pattern);

    let stats = || csi::NodeGetVolumeStatsRequest {
        volume_id: volume.volume_id.clone(),
        volume_path: target.to_str().unwrap().into(),
        staging_target_path: String::new(),
    };
    let healthy = n.node_get_volume_stats(stats()).await.unwrap().into_inner().volume_condition.unwrap();
    assert!(!healthy.abnormal, "{}", healthy.message);
    let health = || csi::NodeGetVolumeHealthRequest {
        volume_id: volume.volume_id.clone(),
        volume_publish_path: target.to_str().unwrap().into(),
        staging_target_path: String::new(),
    };
    let statuses = |reply: csi::NodeGetVolumeHealthResponse| reply.volume_health.unwrap().health_statuses;
    assert_eq!(statuses(n.node_get_volume_health(health()).await.unwrap().into_inner()), vec![]);
    let storage = n.node_get_storage_health(csi::NodeGetStorageHealthRequest::default()).await.unwrap();
    assert_eq!(storage.into_inner().backend_health, vec![], "every chunk server heartbeats");
    let elsewhere = csi::NodeGetVolumeHealthRequest { volume_id: "vol-ffff".into(), ..Default::default() };
    assert_eq!(code(n.node_get_volume_health(elsewhere).await), Code::NotFound);
    assert_eq!(code(n.node_get_volume_health(csi::NodeGetVolumeHealthRequest::default()).await), Code::InvalidArgument);

    // The process serving the device dies.
    let mapping = t.mapping(&volume.volume_id).unwrap();
    nix::sys::signal::kill(nix::unistd::Pid::from_raw(mapping.pid as i32), nix::sys::signal::Signal::SIGKILL).unwrap();
    while Path::new(&format!("/proc/{}/cmdline", mapping.pid)).exists()
        && !std::fs::read(format!("/proc/{}/cmdline", mapping.pid)).unwrap_or_default().is_empty()
    {
        tokio::time::sleep(std::time::Duration::from_millis(20)).await;
    }
    assert_eq!(t.mapping(&volume.volume_id).unwrap().served, Some(false));
    let condition = n.node_get_volume_stats(stats()).await.unwrap().into_inner().volume_condition.unwrap();
    assert!(condition.abnormal, "{condition:?}");
    assert!(condition.message.contains("has exited"), "{}", condition.message);
    let sick = statuses(n.node_get_volume_health(health()).await.unwrap().into_inner());
    assert_eq!(sick[0].status, csi::VolumeHealthErrorType::Inaccessible as i32, "{sick:?}");
    assert!(sick[0].message.contains("has exited"), "{sick:?}");

    // A restarted plugin replaces lost serving processes only where the
    // kernel device survives them (netlink nbd); a FUSE + loop device
    // does not, and must not get a second device beside it.
    t.plugin.crash_and_restart().await;
    let mut n = t.plugin.node().await;
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(20);
    let expected =
        if mapping.method.as_deref() == Some("netlink") { "serving process replaced" } else { "cannot be taken over" };
    while !t.plugin.log_text().contains(expected) {
        assert!(std::time::Instant::now() < deadline, "no recovery after the restart:\n{}", t.plugin.log_text());
        tokio::time::sleep(std::time::Duration::from_millis(100)).await;
    }
    if mapping.method.as_deref() != Some("netlink") {
        let after = t.mapping(&volume.volume_id).unwrap();
        assert!(after.served == Some(false) && after.pid == mapping.pid, "{after:?}");
    }

    // The kubelet tears down and sets up again: a new serving process,
    // the data as written.
    n.node_unpublish_volume(unpublish_request(&volume.volume_id, &target)).await.unwrap();
    n.node_unstage_volume(unstage_request(&volume.volume_id, &staging)).await.unwrap();
    assert!(t.mapping(&volume.volume_id).is_none(), "{:?}", t.mapped());
    n.node_stage_volume(stage_request(&volume, &staging, &cap, &ctx)).await.unwrap();
    n.node_publish_volume(publish_request(&volume, &staging, &target, &cap, false)).await.unwrap();
    let replaced = t.mapping(&volume.volume_id).unwrap();
    assert!(replaced.served == Some(true) && replaced.pid != mapping.pid, "{replaced:?}");
    assert!(read_at(&target, 8 * MIB as u64, pattern.len()) == pattern, "the data survives its server");
    let condition = n.node_get_volume_stats(stats()).await.unwrap().into_inner().volume_condition.unwrap();
    assert!(!condition.abnormal, "{}", condition.message);
    n.node_unpublish_volume(unpublish_request(&volume.volume_id, &target)).await.unwrap();
    n.node_unstage_volume(unstage_request(&volume.volume_id, &staging)).await.unwrap();
}
