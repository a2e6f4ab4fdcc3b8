//! Controller service conformance: every RPC, its required errors and its
//! idempotency, against the real binary and a real metadata cluster.

mod common;

use std::collections::HashSet;

use ballast_proto::csi;
use ballast_proto::csi::controller_service_capability::rpc::Type as RpcType;
use ballast_proto::csi::volume_capability::access_mode::Mode;
use ballast_proto::meta as pb;
use common::*;
use tonic::Code;

const TOPOLOGY: &str = "topology.ballast.io/cluster=test";

async fn controller() -> Harness {
    Harness::start(&["--mode", "controller", "--topology", TOPOLOGY]).await
}

#[tokio::test]
async fn capabilities_list_exactly_what_is_implemented() {
    let h = controller().await;
    let mut c = h.plugin.controller().await;
    let caps = c.controller_get_capabilities(csi::ControllerGetCapabilitiesRequest {}).await.unwrap().into_inner();
    let got: HashSet<i32> = caps
        .capabilities
        .iter()
        .map(|cap| match &cap.r#type {
            Some(csi::controller_service_capability::Type::Rpc(rpc)) => rpc.r#type,
            None => panic!("capability without a type"),
        })
        .collect();
    let want: HashSet<i32> = [
        RpcType::CreateDeleteVolume,
        RpcType::PublishUnpublishVolume,
        RpcType::PublishReadonly,
        RpcType::ListVolumes,
        RpcType::ListVolumesPublishedNodes,
        RpcType::GetCapacity,
        RpcType::CreateDeleteSnapshot,
        RpcType::ListSnapshots,
        RpcType::GetSnapshot,
        RpcType::CloneVolume,
        RpcType::ExpandVolume,
        RpcType::GetVolume,
        RpcType::VolumeCondition,
        RpcType::SingleNodeMultiWriter,
        RpcType::ModifyVolume,
        RpcType::GetVolumeHealth,
        RpcType::ListVolumeHealth,
    ]
    .iter()
    .map(|t| *t as i32)
    .collect();
    assert_eq!(got, want);
}

#[tokio::test]
async fn modify_volume_changes_replicas_and_limits_and_refuses_what_it_does_not_know() {
    let h = controller().await;
    let mut c = h.plugin.controller().await;

    // Mutable parameters at creation: a VolumeAttributesClass named by the claim.
    let mut req = create_request("modified", GIB);
    req.parameters = params(&[("replicas", "3")]);
    req.mutable_parameters = params(&[("maxIOPS", "500"), ("replicas", "2")]);
    let volume = c.create_volume(req.clone()).await.expect("CreateVolume").into_inner().volume.unwrap();
    let record = h.meta.get_volume(by_id(&volume.volume_id)).await.unwrap();
    assert_eq!(record.replicas, 2, "the mutable parameters override the StorageClass");
    assert_eq!(record.limits, Some(pb::IoLimits { max_iops: 500, max_bandwidth_bytes: 0 }));
    c.create_volume(req).await.expect("CreateVolume again, with the same class");

    let modify = |mutable: &[(&str, &str)]| csi::ControllerModifyVolumeRequest {
        volume_id: volume.volume_id.clone(),
        mutable_parameters: params(mutable),
        ..Default::default()
    };
    c.controller_modify_volume(modify(&[("replicas", "3"), ("maxBandwidth", "100Mi")])).await.expect("modify");
    let record = h.meta.get_volume(by_id(&volume.volume_id)).await.unwrap();
    assert_eq!(record.replicas, 3);
    assert_eq!(record.limits, Some(pb::IoLimits { max_iops: 500, max_bandwidth_bytes: 100 << 20 }), "IOPS kept");

    // Refused, and nothing changes.
    for bad in [&[("XXX_FakeKey", "x")][..], &[("replicas", "9")], &[("maxIOPS", "5")], &[("maxBandwidth", "fast")]] {
        assert_eq!(code(c.controller_modify_volume(modify(bad)).await), Code::InvalidArgument, "{bad:?}");
    }
    assert_eq!(h.meta.get_volume(by_id(&volume.volume_id)).await.unwrap(), record);
    let mut missing = modify(&[("maxIOPS", "100")]);
    missing.volume_id.clear();
    assert_eq!(code(c.controller_modify_volume(missing.clone()).await), Code::InvalidArgument);
    missing.volume_id = "vol-404404".into();
    assert_eq!(code(c.controller_modify_volume(missing).await), Code::NotFound);
}

#[tokio::test]
async fn create_volume_validates_rounds_and_is_idempotent() {
    let h = controller().await;
    let mut c = h.plugin.controller().await;

    // Required fields.
    let mut req = create_request("", GIB);
    assert_eq!(code(c.create_volume(req.clone()).await), Code::InvalidArgument);
    req.name = "v1".into();
    req.volume_capabilities.clear();
    assert_eq!(code(c.create_volume(req).await), Code::InvalidArgument);

    // Access modes: multi-node writers are refused.
    for mode in [Mode::MultiNodeMultiWriter, Mode::MultiNodeSingleWriter] {
        let mut req = create_request("v1", GIB);
        req.volume_capabilities = vec![mount_cap("ext4", mode)];
        assert_eq!(code(c.create_volume(req).await), Code::InvalidArgument, "{mode:?}");
    }
    let mut req = create_request("v1", GIB);
    req.volume_capabilities = vec![mount_cap("btrfs", Mode::SingleNodeWriter)];
    assert_eq!(code(c.create_volume(req).await), Code::InvalidArgument);

    // StorageClass parameters.
    for bad in [
        &[("replicas", "0")][..],
        &[("replicas", "6")],
        &[("fsType", "ntfs")],
        &[("chunkSizeMiB", "48")],
        &[("chunkSizeMiB", "2048")],
        &[("replica", "3")],
    ] {
        let mut req = create_request("v1", GIB);
        req.parameters = params(bad);
        assert_eq!(code(c.create_volume(req).await), Code::InvalidArgument, "{bad:?}");
    }
    for bad in [&[("iops", "100")][..], &[("maxIOPS", "3")], &[("replicas", "0")]] {
        let mut req = create_request("v1", GIB);
        req.mutable_parameters = params(bad);
        assert_eq!(code(c.create_volume(req).await), Code::InvalidArgument, "{bad:?}");
    }

    // Capacity ranges.
    let mut req = create_request("v1", GIB);
    req.capacity_range = range(2 * GIB, GIB);
    assert_eq!(code(c.create_volume(req.clone()).await), Code::InvalidArgument, "limit < required");
    req.capacity_range = range(10, 4000);
    assert_eq!(code(c.create_volume(req.clone()).await), Code::OutOfRange, "rounded size above limit");
    req.capacity_range = range(-1, 0);
    assert_eq!(code(c.create_volume(req).await), Code::InvalidArgument);

    // A good one, rounded up to 4 KiB blocks; sidecar keys are accepted.
    let mut req = create_request("v1", 100 * MIB + 1);
    req.parameters = params(&[
        ("replicas", "2"),
        ("fsType", "xfs"),
        ("chunkSizeMiB", "16"),
        ("csi.storage.k8s.io/pvc/name", "data"),
        ("csi.storage.k8s.io/pvc/namespace", "default"),
        ("csi.storage.k8s.io/provisioner-secret-name", "ignored"),
    ]);
    req.volume_capabilities = vec![mount_cap("", Mode::SingleNodeWriter)];
    req.secrets = params(&[("token", "do-not-log-me")]);
    let vol = c.create_volume(req.clone()).await.unwrap().into_inner().volume.unwrap();
    assert_eq!(vol.capacity_bytes, 100 * MIB + 4096);
    assert_eq!(vol.volume_context["fsType"], "xfs");
    assert_eq!(vol.volume_context["replicas"], "2");
    assert_eq!(vol.volume_context["chunkSizeMiB"], "16");
    assert_eq!(vol.accessible_topology.len(), 1);
    assert_eq!(vol.accessible_topology[0].segments["topology.ballast.io/cluster"], "test");
    let stored = h
        .meta
        .get_volume(pb::GetVolumeRequest { key: Some(pb::get_volume_request::Key::Id(vol.volume_id.clone())) })
        .await
        .unwrap();
    assert_eq!((stored.replicas, stored.chunk_size_bytes), (2, 16 << 20));
    assert_eq!(stored.parameters["csi.storage.k8s.io/pvc/name"], "data");
    assert!(!stored.parameters.contains_key("csi.storage.k8s.io/provisioner-secret-name"));

    // Idempotent: the same request, or any range the volume satisfies.
    let again = c.create_volume(req.clone()).await.unwrap().into_inner().volume.unwrap();
    assert_eq!(again.volume_id, vol.volume_id);
    let mut wider = req.clone();
    wider.capacity_range = range(50 * MIB, 200 * MIB);
    assert_eq!(c.create_volume(wider).await.unwrap().into_inner().volume.unwrap().volume_id, vol.volume_id);
    // Incompatible repeats.
    let mut bigger = req.clone();
    bigger.capacity_range = range(2 * GIB, 2 * GIB);
    assert_eq!(code(c.create_volume(bigger).await), Code::AlreadyExists);
    let mut other_replicas = req.clone();
    other_replicas.parameters.insert("replicas".into(), "3".into());
    assert_eq!(code(c.create_volume(other_replicas).await), Code::AlreadyExists);

    // No capacity range: the default size; minimum size for tiny requests.
    let mut req = create_request("v-default", 0);
    req.capacity_range = None;
    assert_eq!(c.create_volume(req).await.unwrap().into_inner().volume.unwrap().capacity_bytes, GIB);
    let tiny = c.create_volume(create_request("v-tiny", 1)).await.unwrap().into_inner().volume.unwrap();
    assert_eq!(tiny.capacity_bytes, MIB);

    // Raw block: no filesystem in the context.
    let mut req = create_request("v-block", GIB);
    req.volume_capabilities = vec![block_cap(Mode::SingleNodeWriter)];
    let block = c.create_volume(req).await.unwrap().into_inner().volume.unwrap();
    assert!(!block.volume_context.contains_key("fsType"));

    // Topology: a requisite segment of another cluster cannot be served.
    let mut req = create_request("v-topo", GIB);
    req.accessibility_requirements = Some(csi::TopologyRequirement {
        requisite: vec![csi::Topology { segments: params(&[("topology.ballast.io/cluster", "other")]) }],
        preferred: vec![],
    });
    assert_eq!(code(c.create_volume(req.clone()).await), Code::ResourceExhausted);
    req.accessibility_requirements
        .as_mut()
        .unwrap()
        .requisite
        .push(csi::Topology { segments: params(&[("topology.ballast.io/cluster", "test")]) });
    c.create_volume(req).await.unwrap();

    // Secrets are never logged.
    assert!(!h.plugin.log_text().contains("do-not-log-me"));
}

#[tokio::test]
async fn concurrent_creates_of_one_name_yield_one_volume_or_aborted() {
    let h = controller().await;
    let c = h.plugin.controller().await;
    let calls = (0..8).map(|_| {
        let mut c = c.clone();
        async move { c.create_volume(create_request("racy", GIB)).await }
    });
    let results = futures::future::join_all(calls).await;
    let mut ids = HashSet::new();
    for result in results {
        match result {
            Ok(reply) => {
                ids.insert(reply.into_inner().volume.unwrap().volume_id);
            }
            Err(status) => assert_eq!(status.code(), Code::Aborted, "{status:?}"),
        }
    }
    assert_eq!(ids.len(), 1, "{ids:?}");
}

#[tokio::test]
async fn clones_from_snapshots_and_volumes() {
    let h = controller().await;
    let mut c = h.plugin.controller().await;
    let source = c.create_volume(create_request("src", 256 * MIB)).await.unwrap().into_inner().volume.unwrap();
    let snap = c
        .create_snapshot(csi::CreateSnapshotRequest {
            source_volume_id: source.volume_id.clone(),
            name: "snap".into(),
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner()
        .snapshot
        .unwrap();
    assert!(snap.ready_to_use);

    let from = |kind: csi::volume_content_source::Type| Some(csi::VolumeContentSource { r#type: Some(kind) });
    let snap_source = from(csi::volume_content_source::Type::Snapshot(csi::volume_content_source::SnapshotSource {
        snapshot_id: snap.snapshot_id.clone(),
    }));
    let vol_source = from(csi::volume_content_source::Type::Volume(csi::volume_content_source::VolumeSource {
        volume_id: source.volume_id.clone(),
    }));

    // No size asked: the source's size.
    let mut req = create_request("from-snap", 0);
    req.capacity_range = None;
    req.volume_content_source = snap_source.clone();
    let clone = c.create_volume(req.clone()).await.unwrap().into_inner().volume.unwrap();
    assert_eq!(clone.capacity_bytes, 256 * MIB);
    assert_eq!(clone.content_source, snap_source);
    assert_eq!(c.create_volume(req).await.unwrap().into_inner().volume.unwrap().volume_id, clone.volume_id);

    let mut req = create_request("from-vol", GIB);
    req.volume_content_source = vol_source.clone();
    let clone = c.create_volume(req.clone()).await.unwrap().into_inner().volume.unwrap();
    assert_eq!(clone.capacity_bytes, GIB);
    assert_eq!(clone.content_source, vol_source);
    // Same name, other source: incompatible.
    req.volume_content_source = snap_source;
    assert_eq!(code(c.create_volume(req).await), Code::AlreadyExists);

    // Smaller than the source.
    let mut req = create_request("too-small", 128 * MIB);
    req.volume_content_source = vol_source;
    assert_eq!(code(c.create_volume(req).await), Code::OutOfRange);

    // Unknown sources.
    let mut req = create_request("from-nothing", GIB);
    req.volume_content_source =
        from(csi::volume_content_source::Type::Snapshot(csi::volume_content_source::SnapshotSource {
            snapshot_id: "snap-ffff".into(),
        }));
    assert_eq!(code(c.create_volume(req.clone()).await), Code::NotFound);
    req.volume_content_source =
        from(csi::volume_content_source::Type::Volume(csi::volume_content_source::VolumeSource {
            volume_id: "vol-ffff".into(),
        }));
    assert_eq!(code(c.create_volume(req).await), Code::NotFound);
}

#[tokio::test]
async fn publish_unpublish_and_delete() {
    let h = controller().await;
    let mut c = h.plugin.controller().await;
    let vol = c.create_volume(create_request("pub", GIB)).await.unwrap().into_inner().volume.unwrap();
    let cap = Some(mount_cap("ext4", Mode::SingleNodeWriter));
    let publish = |node: &str, readonly: bool| csi::ControllerPublishVolumeRequest {
        volume_id: vol.volume_id.clone(),
        node_id: node.into(),
        volume_capability: cap.clone(),
        readonly,
        ..Default::default()
    };

    // Required fields.
    let mut req = publish("n1", false);
    req.volume_id.clear();
    assert_eq!(code(c.controller_publish_volume(req).await), Code::InvalidArgument);
    assert_eq!(code(c.controller_publish_volume(publish("", false)).await), Code::InvalidArgument);
    let mut req = publish("n1", false);
    req.volume_capability = None;
    assert_eq!(code(c.controller_publish_volume(req).await), Code::InvalidArgument);
    let mut req = publish("n1", false);
    req.volume_capability = Some(mount_cap("ext4", Mode::MultiNodeMultiWriter));
    assert_eq!(code(c.controller_publish_volume(req).await), Code::InvalidArgument);
    let mut req = publish("n1", false);
    req.volume_id = "vol-ffff".into();
    assert_eq!(code(c.controller_publish_volume(req).await), Code::NotFound);

    // Nodes exist once their node plugin registered them.
    let err = c.controller_publish_volume(publish("n1", false)).await.unwrap_err();
    assert_eq!(err.code(), Code::NotFound, "{err:?}");
    assert!(err.message().contains("node n1"), "{}", err.message());
    for node in ["n1", "n2", "r1", "r2"] {
        h.register_node(node, if node == "n1" { 1 } else { 0 }).await;
    }

    // Publish: the epoch and the volume in the context; idempotent.
    let first = c.controller_publish_volume(publish("n1", false)).await.unwrap().into_inner().publish_context;
    assert_eq!(first["volumeId"], vol.volume_id);
    assert_eq!(first["readonly"], "false");
    let epoch: u64 = first["epoch"].parse().unwrap();
    assert!(epoch >= 1);
    let again = c.controller_publish_volume(publish("n1", false)).await.unwrap().into_inner().publish_context;
    assert_eq!(again, first);
    // Incompatible on the same node; a second writer node.
    assert_eq!(code(c.controller_publish_volume(publish("n1", true)).await), Code::AlreadyExists);
    assert_eq!(code(c.controller_publish_volume(publish("n2", false)).await), Code::FailedPrecondition);

    // Published volumes are listed as such, and cannot be deleted.
    let got = c
        .controller_get_volume(csi::ControllerGetVolumeRequest { volume_id: vol.volume_id.clone() })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(got.status.unwrap().published_node_ids, vec!["n1".to_string()]);
    // n1 holds one volume at most (its --max-volumes).
    let other = c.create_volume(create_request("pub-2", GIB)).await.unwrap().into_inner().volume.unwrap();
    let mut req = publish("n1", false);
    req.volume_id = other.volume_id.clone();
    assert_eq!(code(c.controller_publish_volume(req).await), Code::ResourceExhausted);
    let delete = csi::DeleteVolumeRequest { volume_id: vol.volume_id.clone(), ..Default::default() };
    assert_eq!(code(c.delete_volume(delete.clone()).await), Code::FailedPrecondition);

    // Unpublish: idempotent, unknown volume or node is success.
    let unpublish = |volume: &str, node: &str| csi::ControllerUnpublishVolumeRequest {
        volume_id: volume.into(),
        node_id: node.into(),
        ..Default::default()
    };
    assert_eq!(code(c.controller_unpublish_volume(unpublish("", "n1")).await), Code::InvalidArgument);
    c.controller_unpublish_volume(unpublish(&vol.volume_id, "n1")).await.unwrap();
    c.controller_unpublish_volume(unpublish(&vol.volume_id, "n1")).await.unwrap();
    c.controller_unpublish_volume(unpublish(&vol.volume_id, "nobody")).await.unwrap();
    c.controller_unpublish_volume(unpublish("vol-ffff", "n1")).await.unwrap();

    // A new publication fences the old one: a higher epoch. Readers: any
    // number, read-only; a reader-only mode forces read-only.
    let second = c.controller_publish_volume(publish("n2", false)).await.unwrap().into_inner().publish_context;
    assert!(second["epoch"].parse::<u64>().unwrap() > epoch);
    c.controller_unpublish_volume(unpublish(&vol.volume_id, "n2")).await.unwrap();
    for node in ["r1", "r2"] {
        let mut req = publish(node, false);
        req.volume_capability = Some(mount_cap("ext4", Mode::MultiNodeReaderOnly));
        let ctx = c.controller_publish_volume(req).await.unwrap().into_inner().publish_context;
        assert_eq!(ctx["readonly"], "true");
    }
    // An empty node id unpublishes from every node.
    c.controller_unpublish_volume(unpublish(&vol.volume_id, "")).await.unwrap();
    let got = c
        .controller_get_volume(csi::ControllerGetVolumeRequest { volume_id: vol.volume_id.clone() })
        .await
        .unwrap()
        .into_inner();
    assert!(got.status.unwrap().published_node_ids.is_empty());

    // Delete: idempotent, unknown ids are success.
    c.delete_volume(delete.clone()).await.unwrap();
    c.delete_volume(delete).await.unwrap();
    c.delete_volume(csi::DeleteVolumeRequest { volume_id: "no-such-volume".into(), ..Default::default() })
        .await
        .unwrap();
    assert_eq!(code(c.delete_volume(csi::DeleteVolumeRequest::default()).await), Code::InvalidArgument);
    assert_eq!(
        code(c.controller_get_volume(csi::ControllerGetVolumeRequest { volume_id: vol.volume_id.clone() }).await),
        Code::NotFound
    );
}

#[tokio::test]
async fn all_mode_serves_only_its_own_node() {
    let h = Harness::start(&["--mode", "all", "--node-id", "self", "--nbd-client-bin", "/nonexistent"]).await;
    let mut c = h.plugin.controller().await;
    let vol = c.create_volume(create_request("mine", GIB)).await.unwrap().into_inner().volume.unwrap();
    let req = |node: &str| csi::ControllerPublishVolumeRequest {
        volume_id: vol.volume_id.clone(),
        node_id: node.into(),
        volume_capability: Some(mount_cap("ext4", Mode::SingleNodeWriter)),
        ..Default::default()
    };
    assert_eq!(code(c.controller_publish_volume(req("elsewhere")).await), Code::NotFound);
    c.controller_publish_volume(req("self")).await.unwrap();
}

#[tokio::test]
async fn validate_volume_capabilities() {
    let h = controller().await;
    let mut c = h.plugin.controller().await;
    let mut req = create_request("val", GIB);
    req.parameters = params(&[("fsType", "ext4")]);
    let vol = c.create_volume(req).await.unwrap().into_inner().volume.unwrap();
    let validate = |caps: Vec<csi::VolumeCapability>| csi::ValidateVolumeCapabilitiesRequest {
        volume_id: vol.volume_id.clone(),
        volume_capabilities: caps,
        ..Default::default()
    };

    assert_eq!(code(c.validate_volume_capabilities(validate(vec![])).await), Code::InvalidArgument);
    let mut unknown = validate(vec![mount_cap("ext4", Mode::SingleNodeWriter)]);
    unknown.volume_id = "vol-ffff".into();
    assert_eq!(code(c.validate_volume_capabilities(unknown).await), Code::NotFound);
    let mut no_id = validate(vec![mount_cap("ext4", Mode::SingleNodeWriter)]);
    no_id.volume_id.clear();
    assert_eq!(code(c.validate_volume_capabilities(no_id).await), Code::InvalidArgument);

    let caps = vec![
        mount_cap("ext4", Mode::SingleNodeWriter),
        block_cap(Mode::SingleNodeMultiWriter),
        mount_cap("", Mode::MultiNodeReaderOnly),
    ];
    let reply = c.validate_volume_capabilities(validate(caps.clone())).await.unwrap().into_inner();
    assert_eq!(reply.confirmed.unwrap().volume_capabilities, caps);

    for refused in [
        vec![mount_cap("ext4", Mode::MultiNodeMultiWriter)],
        vec![mount_cap("xfs", Mode::SingleNodeWriter)],
        vec![mount_cap("ext4", Mode::SingleNodeWriter), mount_cap("ext4", Mode::MultiNodeSingleWriter)],
    ] {
        let reply = c.validate_volume_capabilities(validate(refused.clone())).await.unwrap().into_inner();
        assert!(reply.confirmed.is_none(), "{refused:?}");
        assert!(!reply.message.is_empty());
    }
    let mut with_params = validate(vec![mount_cap("ext4", Mode::SingleNodeWriter)]);
    with_params.parameters = params(&[("replicas", "5")]);
    assert!(c.validate_volume_capabilities(with_params).await.unwrap().into_inner().confirmed.is_none());
}

#[tokio::test]
async fn list_volumes_paginates_with_published_nodes_and_condition() {
    let h = controller().await;
    let mut c = h.plugin.controller().await;
    let mut ids = Vec::new();
    for i in 0..7 {
        ids.push(
            c.create_volume(create_request(&format!("list-{i}"), GIB))
                .await
                .unwrap()
                .into_inner()
                .volume
                .unwrap()
                .volume_id,
        );
    }
    h.register_node("n1", 0).await;
    c.controller_publish_volume(csi::ControllerPublishVolumeRequest {
        volume_id: ids[3].clone(),
        node_id: "n1".into(),
        volume_capability: Some(mount_cap("ext4", Mode::SingleNodeWriter)),
        ..Default::default()
    })
    .await
    .unwrap();

    let list = |max: i32, token: &str| csi::ListVolumesRequest { max_entries: max, starting_token: token.into() };
    assert_eq!(code(c.list_volumes(list(0, "invalid-token")).await), Code::Aborted);
    assert_eq!(code(c.list_volumes(list(-1, "")).await), Code::InvalidArgument);

    // Everything at once without max_entries.
    let all = c.list_volumes(list(0, "")).await.unwrap().into_inner();
    assert_eq!(all.entries.len(), 7);
    assert!(all.next_token.is_empty());

    // Pages of 3: 3 + 3 + 1, each volume once.
    let mut seen = Vec::new();
    let mut token = String::new();
    loop {
        let page = c.list_volumes(list(3, &token)).await.unwrap().into_inner();
        assert!(page.entries.len() <= 3);
        for entry in page.entries {
            let volume = entry.volume.unwrap();
            let status = entry.status.unwrap();
            let nodes = status.published_node_ids;
            if volume.volume_id == ids[3] {
                assert_eq!(nodes, vec!["n1".to_string()]);
            } else {
                assert!(nodes.is_empty());
            }
            assert!(!status.volume_condition.unwrap().abnormal);
            seen.push(volume.volume_id);
        }
        if page.next_token.is_empty() {
            break;
        }
        token = page.next_token;
    }
    let mut sorted = ids.clone();
    sorted.sort();
    seen.sort();
    assert_eq!(seen, sorted);
}

#[tokio::test]
async fn get_capacity_counts_whole_chunks_on_distinct_live_servers() {
    let h = controller().await;
    let mut c = h.plugin.controller().await;
    let empty = c.get_capacity(csi::GetCapacityRequest::default()).await.unwrap().into_inner();
    assert_eq!(empty.available_capacity, 0);
    assert_eq!(empty.maximum_volume_size, Some(1 << 50));
    assert_eq!(empty.minimum_volume_size, Some(MIB));

    h.add_servers(3, 10 * GIB as u64).await;
    let capacity = |p: &[(&str, &str)]| csi::GetCapacityRequest { parameters: params(p), ..Default::default() };
    // Three servers of 10 GiB, three replicas: 10 GiB of volume data.
    let three = c.get_capacity(capacity(&[])).await.unwrap().into_inner();
    assert_eq!(three.available_capacity, 10 * GIB);
    let one = c.get_capacity(capacity(&[("replicas", "1")])).await.unwrap().into_inner();
    assert_eq!(one.available_capacity, 30 * GIB);
    let five = c.get_capacity(capacity(&[("replicas", "5")])).await.unwrap().into_inner();
    assert_eq!(five.available_capacity, 0, "five copies need five servers");
    assert_eq!(code(c.get_capacity(capacity(&[("replicas", "9")])).await), Code::InvalidArgument);

    // A draining server takes no new chunks.
    h.meta.set_draining(pb::SetDrainingRequest { server_id: "cs0".into(), draining: true }).await.unwrap();
    let two = c.get_capacity(capacity(&[("replicas", "2")])).await.unwrap().into_inner();
    assert_eq!(two.available_capacity, 10 * GIB);

    // Other topology, or an unsupported capability: nothing.
    let mut req = capacity(&[("replicas", "1")]);
    req.accessible_topology = Some(csi::Topology { segments: params(&[("topology.ballast.io/cluster", "other")]) });
    assert_eq!(c.get_capacity(req).await.unwrap().into_inner().available_capacity, 0);
    let mut req = capacity(&[("replicas", "1")]);
    req.volume_capabilities = vec![mount_cap("ext4", Mode::MultiNodeMultiWriter)];
    assert_eq!(c.get_capacity(req).await.unwrap().into_inner().available_capacity, 0);
}

#[tokio::test]
async fn controller_get_volume_reports_degraded_chunks() {
    let h = controller().await;
    let mut c = h.plugin.controller().await;
    h.add_servers(4, 10 * GIB as u64).await;
    let vol = c.create_volume(create_request("health", GIB)).await.unwrap().into_inner().volume.unwrap();
    let get = csi::ControllerGetVolumeRequest { volume_id: vol.volume_id.clone() };

    let got = c.controller_get_volume(get.clone()).await.unwrap().into_inner();
    assert_eq!(got.volume.unwrap().capacity_bytes, GIB);
    let condition = got.status.unwrap().volume_condition.unwrap();
    assert!(!condition.abnormal, "{}", condition.message);

    // A chunk written on three servers, then one replica reported failed.
    let set = h
        .meta
        .allocate_chunk(pb::AllocateChunkRequest { volume_id: vol.volume_id.clone(), chunk_index: 2, epoch: 0 })
        .await
        .unwrap();
    assert_eq!(set.replicas.len(), 3);
    let condition =
        c.controller_get_volume(get.clone()).await.unwrap().into_inner().status.unwrap().volume_condition.unwrap();
    assert!(!condition.abnormal, "{}", condition.message);
    h.meta
        .report_failed_replica(pb::ReportFailedReplicaRequest {
            volume_id: vol.volume_id.clone(),
            chunk_index: 2,
            server_id: set.replicas[0].server_id.clone(),
            generation: set.generation,
            epoch: 0,
        })
        .await
        .unwrap();
    let condition = c.controller_get_volume(get).await.unwrap().into_inner().status.unwrap().volume_condition.unwrap();
    assert!(condition.abnormal);
    assert!(condition.message.contains("chunk 2 has 2"), "{}", condition.message);

    // The same, sorted as health: DEGRADED, for one volume and in the list.
    let health_of = csi::ControllerGetVolumeHealthRequest { volume_id: vol.volume_id.clone(), ..Default::default() };
    let health = c.controller_get_volume_health(health_of).await.unwrap().into_inner().volume_health.unwrap();
    assert_eq!(health.volume_id, vol.volume_id);
    let statuses: Vec<i32> = health.health_statuses.iter().map(|s| s.status).collect();
    assert_eq!(statuses, vec![csi::VolumeHealthErrorType::Degraded as i32], "{health:?}");
    assert!(health.health_statuses[0].message.starts_with("1 of 1 allocated chunks"), "{health:?}");
    let healthy = c.create_volume(create_request("healthy", GIB)).await.unwrap().into_inner().volume.unwrap();
    let listed = c.controller_list_volume_health(csi::ControllerListVolumeHealthRequest::default()).await.unwrap();
    let listed = listed.into_inner().entries;
    assert_eq!(listed.len(), 2, "{listed:?}");
    for entry in listed {
        let degraded = entry.volume_id == vol.volume_id;
        assert_eq!(entry.health_statuses.is_empty(), !degraded, "{entry:?} ({} is healthy)", healthy.volume_id);
    }
    let no_id = csi::ControllerGetVolumeHealthRequest::default();
    assert_eq!(code(c.controller_get_volume_health(no_id).await), Code::InvalidArgument);
    let unknown = csi::ControllerGetVolumeHealthRequest { volume_id: "vol-ffff".into(), ..Default::default() };
    assert_eq!(code(c.controller_get_volume_health(unknown).await), Code::NotFound);

    assert_eq!(code(c.controller_get_volume(csi::ControllerGetVolumeRequest::default()).await), Code::InvalidArgument);
    let unknown = csi::ControllerGetVolumeRequest { volume_id: "vol-ffff".into() };
    assert_eq!(code(c.controller_get_volume(unknown).await), Code::NotFound);
}

#[tokio::test]
async fn snapshots_create_list_delete() {
    let h = controller().await;
    let mut c = h.plugin.controller().await;
    let v1 = c.create_volume(create_request("s-v1", GIB)).await.unwrap().into_inner().volume.unwrap().volume_id;
    let v2 = c.create_volume(create_request("s-v2", GIB)).await.unwrap().into_inner().volume.unwrap().volume_id;
    let snap = |name: &str, source: &str| csi::CreateSnapshotRequest {
        name: name.into(),
        source_volume_id: source.into(),
        ..Default::default()
    };

    assert_eq!(code(c.create_snapshot(snap("", &v1)).await), Code::InvalidArgument);
    assert_eq!(code(c.create_snapshot(snap("s", "")).await), Code::InvalidArgument);
    assert_eq!(code(c.create_snapshot(snap("s", "vol-ffff")).await), Code::NotFound);
    let mut with_param = snap("s", &v1);
    with_param.parameters = params(&[("tier", "gold")]);
    assert_eq!(code(c.create_snapshot(with_param).await), Code::InvalidArgument);
    let mut with_sidecar = snap("s", &v1);
    with_sidecar.parameters = params(&[("csi.storage.k8s.io/volumesnapshot/name", "s")]);

    let first = c.create_snapshot(with_sidecar).await.unwrap().into_inner().snapshot.unwrap();
    assert_eq!(first.source_volume_id, v1);
    assert_eq!(first.size_bytes, GIB);
    assert!(first.ready_to_use);
    assert!(first.creation_time.unwrap().seconds > 1_600_000_000);
    let again = c.create_snapshot(snap("s", &v1)).await.unwrap().into_inner().snapshot.unwrap();
    assert_eq!(again.snapshot_id, first.snapshot_id);
    assert_eq!(code(c.create_snapshot(snap("s", &v2)).await), Code::AlreadyExists);

    for i in 0..4 {
        c.create_snapshot(snap(&format!("s{i}"), &v2)).await.unwrap();
    }
    let lister = c.clone();
    let list = |req: csi::ListSnapshotsRequest| {
        let mut c = lister.clone();
        async move { c.list_snapshots(req).await }
    };
    let all = list(csi::ListSnapshotsRequest::default()).await.unwrap().into_inner();
    assert_eq!(all.entries.len(), 5);
    let by_id = list(csi::ListSnapshotsRequest { snapshot_id: first.snapshot_id.clone(), ..Default::default() })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(by_id.entries.len(), 1);
    let got = c
        .get_snapshot(csi::GetSnapshotRequest { snapshot_id: first.snapshot_id.clone(), ..Default::default() })
        .await
        .unwrap()
        .into_inner()
        .snapshot
        .unwrap();
    assert_eq!(got, first);
    assert_eq!(code(c.get_snapshot(csi::GetSnapshotRequest::default()).await), Code::InvalidArgument);
    assert_eq!(
        code(c.get_snapshot(csi::GetSnapshotRequest { snapshot_id: "snap-ffff".into(), ..Default::default() }).await),
        Code::NotFound
    );
    let none = list(csi::ListSnapshotsRequest { snapshot_id: "snap-ffff".into(), ..Default::default() }).await.unwrap();
    assert!(none.into_inner().entries.is_empty());
    let of_v2 = list(csi::ListSnapshotsRequest { source_volume_id: v2.clone(), ..Default::default() }).await.unwrap();
    assert_eq!(of_v2.into_inner().entries.len(), 4);
    let of_unknown =
        list(csi::ListSnapshotsRequest { source_volume_id: "vol-ffff".into(), ..Default::default() }).await.unwrap();
    assert!(of_unknown.into_inner().entries.is_empty());
    assert_eq!(
        code(list(csi::ListSnapshotsRequest { starting_token: "bogus".into(), ..Default::default() }).await),
        Code::Aborted
    );
    let page = list(csi::ListSnapshotsRequest { max_entries: 2, ..Default::default() }).await.unwrap().into_inner();
    assert_eq!(page.entries.len(), 2);
    let rest = list(csi::ListSnapshotsRequest { starting_token: page.next_token, ..Default::default() })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(rest.entries.len(), 3);
    assert!(rest.next_token.is_empty());

    let delete = csi::DeleteSnapshotRequest { snapshot_id: first.snapshot_id.clone(), ..Default::default() };
    c.delete_snapshot(delete.clone()).await.unwrap();
    c.delete_snapshot(delete).await.unwrap();
    c.delete_snapshot(csi::DeleteSnapshotRequest { snapshot_id: "nonsense".into(), ..Default::default() })
        .await
        .unwrap();
    assert_eq!(code(c.delete_snapshot(csi::DeleteSnapshotRequest::default()).await), Code::InvalidArgument);
    assert_eq!(list(csi::ListSnapshotsRequest::default()).await.unwrap().into_inner().entries.len(), 4);
}

#[tokio::test]
async fn expand_grows_never_shrinks() {
    let h = controller().await;
    let mut c = h.plugin.controller().await;
    let mount = c.create_volume(create_request("e-mount", GIB)).await.unwrap().into_inner().volume.unwrap();
    let mut req = create_request("e-block", GIB);
    req.volume_capabilities = vec![block_cap(Mode::SingleNodeWriter)];
    let block = c.create_volume(req).await.unwrap().into_inner().volume.unwrap();
    let expand = |id: &str, required: i64, limit: i64| csi::ControllerExpandVolumeRequest {
        volume_id: id.into(),
        capacity_range: range(required, limit),
        ..Default::default()
    };

    assert_eq!(code(c.controller_expand_volume(expand("", GIB, 0)).await), Code::InvalidArgument);
    let mut no_range = expand(&mount.volume_id, GIB, 0);
    no_range.capacity_range = None;
    assert_eq!(code(c.controller_expand_volume(no_range).await), Code::InvalidArgument);
    assert_eq!(code(c.controller_expand_volume(expand("vol-ffff", 2 * GIB, 0)).await), Code::NotFound);
    assert_eq!(
        code(c.controller_expand_volume(expand(&mount.volume_id, 3 * GIB, 2 * GIB)).await),
        Code::InvalidArgument
    );

    let grown = c.controller_expand_volume(expand(&mount.volume_id, 2 * GIB + 1, 0)).await.unwrap().into_inner();
    assert_eq!(grown.capacity_bytes, 2 * GIB + 4096);
    assert!(grown.node_expansion_required);
    // Again, or asking for less: the current size, unchanged.
    let same = c.controller_expand_volume(expand(&mount.volume_id, 2 * GIB + 1, 0)).await.unwrap().into_inner();
    assert_eq!(same.capacity_bytes, 2 * GIB + 4096);
    let smaller = c.controller_expand_volume(expand(&mount.volume_id, GIB, 0)).await.unwrap().into_inner();
    assert_eq!(smaller.capacity_bytes, 2 * GIB + 4096);
    assert_eq!(code(c.controller_expand_volume(expand(&mount.volume_id, GIB, GIB)).await), Code::OutOfRange);

    let grown = c.controller_expand_volume(expand(&block.volume_id, 2 * GIB, 0)).await.unwrap().into_inner();
    assert_eq!(grown.capacity_bytes, 2 * GIB);
    assert!(!grown.node_expansion_required);
    let mut with_cap = expand(&mount.volume_id, 3 * GIB, 0);
    with_cap.volume_capability = Some(block_cap(Mode::SingleNodeWriter));
    assert!(!c.controller_expand_volume(with_cap).await.unwrap().into_inner().node_expansion_required);
}

/// Provisioner, attacher, snapshotter and resizer secrets reach every call
/// they belong to, successful or refused; none is ever logged.
#[tokio::test]
async fn operation_secrets_are_accepted_and_never_logged() {
    let h = controller().await;
    h.register_node("n1", 0).await;
    let mut c = h.plugin.controller().await;
    let mut create = create_request("secretive", GIB);
    create.secrets = secrets();
    let vol = c.create_volume(create.clone()).await.unwrap().into_inner().volume.unwrap();
    let mut refused = create;
    refused.parameters = params(&[("replicas", "9")]);
    assert_eq!(code(c.create_volume(refused).await), Code::InvalidArgument);

    let publish = csi::ControllerPublishVolumeRequest {
        volume_id: vol.volume_id.clone(),
        node_id: "n1".into(),
        volume_capability: Some(mount_cap("ext4", Mode::SingleNodeWriter)),
        secrets: secrets(),
        ..Default::default()
    };
    let mut unknown_node = publish.clone();
    unknown_node.node_id = "nowhere".into();
    assert_eq!(code(c.controller_publish_volume(unknown_node).await), Code::NotFound);
    c.controller_publish_volume(publish).await.unwrap();
    let snapshot = c
        .create_snapshot(csi::CreateSnapshotRequest {
            source_volume_id: vol.volume_id.clone(),
            name: "secretive-snap".into(),
            secrets: secrets(),
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner()
        .snapshot
        .unwrap();
    c.list_snapshots(csi::ListSnapshotsRequest { secrets: secrets(), ..Default::default() }).await.unwrap();
    c.delete_snapshot(csi::DeleteSnapshotRequest { snapshot_id: snapshot.snapshot_id, secrets: secrets() })
        .await
        .unwrap();
    c.controller_expand_volume(csi::ControllerExpandVolumeRequest {
        volume_id: vol.volume_id.clone(),
        capacity_range: range(2 * GIB, 0),
        secrets: secrets(),
        ..Default::default()
    })
    .await
    .unwrap();
    c.controller_unpublish_volume(csi::ControllerUnpublishVolumeRequest {
        volume_id: vol.volume_id.clone(),
        node_id: "n1".into(),
        secrets: secrets(),
    })
    .await
    .unwrap();
    c.delete_volume(csi::DeleteVolumeRequest { volume_id: vol.volume_id.clone(), secrets: secrets() }).await.unwrap();
    h.plugin.assert_logged_without_secrets(&vol.volume_id);
}

fn by_id(id: &str) -> pb::GetVolumeRequest {
    pb::GetVolumeRequest { key: Some(pb::get_volume_request::Key::Id(id.into())) }
}
