//! Volume group snapshots over the plugin's socket, on a local cluster
//! with chunk servers: a writer keeps two volumes in a dependent order (a
//! counter written to the first volume, then, once acknowledged, to the
//! second, like a database's log and its data), a group snapshot is taken
//! meanwhile, and the restored pair must show a moment that really
//! happened: the second volume never ahead of the first, and at most one
//! write behind.

mod common;

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use ballast_proto::csi;
use ballast_proto::csi::volume_capability::access_mode::Mode;
use ballast_proto::meta as pb;
use bytes::Bytes;
use common::cluster::*;
use common::*;
use tonic::Code;
use volume_engine::engine::{EngineOptions, Volume};

/// Opens `volume` for writing, published to a node of its own.
async fn writer_engine(t: &ClusterHarness, volume_id: &str) -> Volume {
    let request = pb::PublishVolumeRequest { volume_id: volume_id.into(), node_id: "writer".into(), readonly: false };
    let attachment = t.meta.publish_volume(request).await.expect("PublishVolume");
    Volume::open(t.meta.clone(), volume_id, EngineOptions { epoch: attachment.epoch, ..Default::default() })
        .await
        .expect("opening the volume")
}

/// The counter in the first block of a volume.
async fn counter(t: &ClusterHarness, volume_id: &str) -> u64 {
    let volume = Volume::open(t.meta.clone(), volume_id, EngineOptions::default()).await.expect("opening");
    let block = volume.read_at(0, 4096).await.expect("reading the first block");
    u64::from_le_bytes(block[..8].try_into().unwrap())
}

fn block(n: u64) -> Bytes {
    let mut data = vec![0u8; 4096];
    data[..8].copy_from_slice(&n.to_le_bytes());
    Bytes::from(data)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_group_snapshot_is_one_moment_of_all_its_volumes() {
    let t = ClusterHarness::start().await;
    let mut c = t.plugin.controller().await;
    let mut g = t.plugin.group_controller().await;
    let cap = block_cap(Mode::SingleNodeWriter);
    let log = t.create("pvc-log", cap.clone(), Some(64 * MIB), &[]).await;
    let data = t.create("pvc-data", cap.clone(), Some(64 * MIB), &[]).await;

    let (first, second) = (writer_engine(&t, &log.volume_id).await, writer_engine(&t, &data.volume_id).await);
    let stop = Arc::new(AtomicBool::new(false));
    let writer = {
        let stop = stop.clone();
        tokio::spawn(async move {
            let mut n = 0u64;
            while !stop.load(Ordering::SeqCst) {
                n += 1;
                first.write_at(0, block(n), true).await.expect("writing the first volume");
                second.write_at(0, block(n), true).await.expect("writing the second volume");
            }
            n
        })
    };
    tokio::time::sleep(Duration::from_millis(500)).await;

    let request = csi::CreateVolumeGroupSnapshotRequest {
        name: "group-1".into(),
        source_volume_ids: vec![log.volume_id.clone(), data.volume_id.clone()],
        ..Default::default()
    };
    let group = g.create_volume_group_snapshot(request.clone()).await.expect("CreateVolumeGroupSnapshot");
    let group = group.into_inner().group_snapshot.unwrap();
    tokio::time::sleep(Duration::from_millis(300)).await;
    stop.store(true, Ordering::SeqCst);
    let writes = writer.await.unwrap();
    assert!(group.ready_to_use, "{group:?}");
    assert_eq!(group.snapshots.len(), 2);
    assert!(group.snapshots.iter().all(|s| s.group_snapshot_id == group.group_snapshot_id));
    let again = g.create_volume_group_snapshot(request).await.expect("CreateVolumeGroupSnapshot again");
    assert_eq!(again.into_inner().group_snapshot.unwrap().group_snapshot_id, group.group_snapshot_id, "idempotent");

    // Restore each member, volume by volume, and read the moment it holds.
    let mut restored = Vec::new();
    for source in [&log, &data] {
        let member = group.snapshots.iter().find(|s| s.source_volume_id == source.volume_id).unwrap();
        let mut req = create_request(&format!("restored-{}", source.volume_id), 64 * MIB);
        req.volume_capabilities = vec![cap.clone()];
        req.volume_content_source = Some(csi::VolumeContentSource {
            r#type: Some(csi::volume_content_source::Type::Snapshot(csi::volume_content_source::SnapshotSource {
                snapshot_id: member.snapshot_id.clone(),
            })),
        });
        let volume = c.create_volume(req).await.expect("CreateVolume from a member").into_inner().volume.unwrap();
        restored.push(counter(&t, &volume.volume_id).await);
    }
    let (log_at, data_at) = (restored[0], restored[1]);
    eprintln!("{writes} dependent writes; the group snapshot holds {log_at} in the log and {data_at} in the data");
    assert!(log_at > 0 && log_at < writes, "taken while the writer ran");
    assert!(
        data_at == log_at || data_at + 1 == log_at,
        "not one moment: the log holds write {log_at} and the data write {data_at}"
    );

    // Members go only with their group; the group goes whole, once or twice.
    let member = group.snapshots[0].snapshot_id.clone();
    let alone = c.delete_snapshot(csi::DeleteSnapshotRequest { snapshot_id: member, ..Default::default() }).await;
    assert_eq!(alone.unwrap_err().code(), Code::FailedPrecondition);
    let get =
        csi::GetVolumeGroupSnapshotRequest { group_snapshot_id: group.group_snapshot_id.clone(), ..Default::default() };
    let got = g.get_volume_group_snapshot(get.clone()).await.expect("GetVolumeGroupSnapshot");
    assert_eq!(got.into_inner().group_snapshot.unwrap().snapshots.len(), 2);
    for _ in 0..2 {
        let delete = csi::DeleteVolumeGroupSnapshotRequest {
            group_snapshot_id: group.group_snapshot_id.clone(),
            ..Default::default()
        };
        g.delete_volume_group_snapshot(delete).await.expect("DeleteVolumeGroupSnapshot");
    }
    assert_eq!(g.get_volume_group_snapshot(get).await.unwrap_err().code(), Code::NotFound);
    let listed = c.list_snapshots(csi::ListSnapshotsRequest::default()).await.unwrap().into_inner();
    assert!(listed.entries.is_empty(), "{listed:?}");
}
