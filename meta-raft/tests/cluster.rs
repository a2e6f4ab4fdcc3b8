//! A real three-member metadata cluster of `meta-raft` processes on loopback.

use std::collections::{BTreeMap, BTreeSet};
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use ballast_proto::meta as pb;
use ballast_testkit::meta_cluster::LocalMetaCluster;
use meta_client::MetaClient;
use tonic::Code;

const BINARY: &str = env!("CARGO_BIN_EXE_meta-raft");
/// Small snapshot interval and log tail so compaction happens in the tests.
const COMPACTING: &[&str] = &["--snapshot-every", "40", "--keep-logs", "5"];

async fn start(dir: &Path) -> LocalMetaCluster {
    LocalMetaCluster::start(Path::new(BINARY), dir, 3, COMPACTING).await
}

fn create(name: &str, size_bytes: u64) -> pb::CreateVolumeRequest {
    pb::CreateVolumeRequest { name: name.into(), size_bytes, replicas: 3, ..Default::default() }
}

async fn wait_until_caught_up(client: &MetaClient, endpoint: &str, index: u64) -> pb::ClusterStatus {
    for _ in 0..300 {
        if let Ok(status) = client.member_status(endpoint).await {
            if status.applied_index >= index {
                return status;
            }
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    panic!("member {endpoint} did not reach applied index {index}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn acknowledged_creates_survive_leader_sigkill_and_the_member_catches_up_by_snapshot() {
    let dir = tempfile::tempdir().unwrap();
    let mut cluster = start(dir.path()).await;
    let client = cluster.client();
    let leader = cluster.wait_for_leader().await;

    // Four clients create 200 volumes between them; the leader dies after ~40.
    let acked = Arc::new(std::sync::Mutex::new(Vec::new()));
    let mut tasks = Vec::new();
    for worker in 0..4 {
        let client = client.clone();
        let acked = acked.clone();
        tasks.push(tokio::spawn(async move {
            for i in 0..50 {
                let name = format!("vol-w{worker}-{i}");
                match client.create_volume(create(&name, 1 << 30)).await {
                    Ok(volume) => acked.lock().unwrap().push((name, volume.id)),
                    Err(status) => eprintln!("create {name} failed: {status}"),
                }
            }
        }));
    }
    while acked.lock().unwrap().len() < 40 {
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    // The killed member's log can hold nothing past this index.
    let log_at_kill = client.member_status(&leader.leader_address).await.unwrap().last_log_index;
    cluster.kill_member(leader.id);
    for task in tasks {
        task.await.unwrap();
    }

    let new_leader = cluster.wait_for_leader().await;
    assert_ne!(new_leader.id, leader.id, "a new leader took over");

    let acked = acked.lock().unwrap().clone();
    assert!(acked.len() >= 190, "only {} of 200 creates were acknowledged", acked.len());
    let volumes = client.all_volumes().await.unwrap();
    let mut by_name: BTreeMap<String, Vec<String>> = BTreeMap::new();
    for volume in &volumes {
        by_name.entry(volume.name.clone()).or_default().push(volume.id.clone());
    }
    for (name, id) in &acked {
        assert_eq!(by_name.get(name), Some(&vec![id.clone()]), "acknowledged volume {name} present exactly once");
    }

    // Enough writes after the kill for the survivors to compact their logs
    // past what the dead member has, so it must catch up by snapshot.
    for i in 0..60 {
        client.create_volume(create(&format!("after-{i}"), 1 << 20)).await.unwrap();
    }
    let status = client.status(pb::StatusRequest {}).await.unwrap();
    assert!(
        status.purged_index > log_at_kill,
        "the leader compacted its log past the dead member's last entry {log_at_kill}: {status:?}"
    );

    cluster.start_member(leader.id);
    let endpoint = cluster.members[leader.id as usize - 1].address.clone();
    let caught_up = wait_until_caught_up(&client, &endpoint, status.committed_index).await;
    // Its log ended before the leader's purge point, so it can only have
    // caught up through an installed snapshot.
    assert!(caught_up.snapshot_index > log_at_kill, "restarted member installed a snapshot: {caught_up:?}");
    assert_eq!(caught_up.term, client.status(pb::StatusRequest {}).await.unwrap().term);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_fully_restarted_cluster_keeps_every_committed_entry() {
    let dir = tempfile::tempdir().unwrap();
    let mut cluster = start(dir.path()).await;
    let client = cluster.client();
    let mut ids = BTreeSet::new();
    for i in 0..70 {
        ids.insert(client.create_volume(create(&format!("persist-{i}"), 1 << 20)).await.unwrap().id);
    }
    let epoch = client
        .publish_volume(pb::PublishVolumeRequest {
            volume_id: ids.first().unwrap().clone(),
            node_id: "n1".into(),
            readonly: false,
        })
        .await
        .unwrap()
        .epoch;

    for id in 1..=3 {
        assert!(cluster.stop_member(id).success(), "member {id} exits cleanly on SIGTERM");
    }
    for id in 1..=3 {
        cluster.start_member(id);
    }
    cluster.wait_for_leader().await;

    let after: BTreeSet<String> = client.all_volumes().await.unwrap().into_iter().map(|v| v.id).collect();
    assert_eq!(after, ids);
    let attachments = client
        .list_attachments(pb::ListAttachmentsRequest { volume_id: ids.first().unwrap().clone() })
        .await
        .unwrap()
        .attachments;
    assert_eq!(attachments.len(), 1);
    assert_eq!(attachments[0].epoch, epoch);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_creates_with_one_name_yield_one_volume() {
    let dir = tempfile::tempdir().unwrap();
    let cluster = start(dir.path()).await;
    let client = cluster.client();
    let creates = (0..20).map(|_| {
        let client = client.clone();
        tokio::spawn(async move { client.create_volume(create("shared", 8 << 20)).await })
    });
    let ids: BTreeSet<String> =
        futures::future::join_all(creates).await.into_iter().map(|r| r.unwrap().unwrap().id).collect();
    assert_eq!(ids.len(), 1);

    let conflict = client.create_volume(create("shared", 16 << 20)).await.unwrap_err();
    assert_eq!(conflict.code(), Code::AlreadyExists, "{conflict}");
    let volumes = client.all_volumes().await.unwrap();
    assert_eq!(volumes.iter().filter(|v| v.name == "shared").count(), 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fencing_epochs_strictly_increase_across_leader_changes() {
    let dir = tempfile::tempdir().unwrap();
    let mut cluster = start(dir.path()).await;
    let client = cluster.client();
    let volume = client.create_volume(create("fenced", 8 << 20)).await.unwrap();
    let mut last_epoch = 0;
    for round in 0..3 {
        for node in ["node-a", "node-b"] {
            let attachment = client
                .publish_volume(pb::PublishVolumeRequest {
                    volume_id: volume.id.clone(),
                    node_id: node.into(),
                    readonly: false,
                })
                .await
                .unwrap();
            assert!(attachment.epoch > last_epoch, "round {round}: epoch {} after {last_epoch}", attachment.epoch);
            last_epoch = attachment.epoch;
            // A retried publish to the same node is idempotent.
            let retry = client
                .publish_volume(pb::PublishVolumeRequest {
                    volume_id: volume.id.clone(),
                    node_id: node.into(),
                    readonly: false,
                })
                .await
                .unwrap();
            assert_eq!(retry.epoch, attachment.epoch);
            // While attached, nobody else may write.
            let other = client
                .publish_volume(pb::PublishVolumeRequest {
                    volume_id: volume.id.clone(),
                    node_id: "intruder".into(),
                    readonly: false,
                })
                .await
                .unwrap_err();
            assert_eq!(other.code(), Code::FailedPrecondition);
            client
                .unpublish_volume(pb::UnpublishVolumeRequest { volume_id: volume.id.clone(), node_id: node.into() })
                .await
                .unwrap();
        }
        let leader = cluster.wait_for_leader().await;
        cluster.kill_member(leader.id);
        cluster.wait_for_leader().await;
        cluster.start_member(leader.id);
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn malformed_requests_get_clear_errors() {
    let dir = tempfile::tempdir().unwrap();
    let cluster = start(dir.path()).await;
    let client = cluster.client();

    let cases: Vec<(&str, Result<(), tonic::Status>, Code)> = vec![
        ("empty name", client.create_volume(create("", 1 << 20)).await.map(drop), Code::InvalidArgument),
        ("zero size", client.create_volume(create("zero", 0)).await.map(drop), Code::InvalidArgument),
        ("unaligned size", client.create_volume(create("odd", 1000)).await.map(drop), Code::InvalidArgument),
        ("absurd size", client.create_volume(create("huge", u64::MAX - 4095)).await.map(drop), Code::OutOfRange),
        (
            "too many replicas",
            client.create_volume(pb::CreateVolumeRequest { replicas: 99, ..create("r99", 1 << 20) }).await.map(drop),
            Code::InvalidArgument,
        ),
        (
            "bad chunk size",
            client
                .create_volume(pb::CreateVolumeRequest { chunk_size_bytes: 3 << 20, ..create("c3", 1 << 20) })
                .await
                .map(drop),
            Code::InvalidArgument,
        ),
        (
            "unknown volume",
            client
                .get_volume(pb::GetVolumeRequest { key: Some(pb::get_volume_request::Key::Id("vol-nope".into())) })
                .await
                .map(drop),
            Code::NotFound,
        ),
        (
            "get without key",
            client.get_volume(pb::GetVolumeRequest { key: None }).await.map(drop),
            Code::InvalidArgument,
        ),
        (
            "expand unknown",
            client
                .expand_volume(pb::ExpandVolumeRequest { id: "vol-nope".into(), size_bytes: 1 << 20 })
                .await
                .map(drop),
            Code::NotFound,
        ),
        (
            "absurd page size",
            client
                .list_volumes(pb::ListVolumesRequest { page_size: 1_000_000, page_token: String::new() })
                .await
                .map(drop),
            Code::InvalidArgument,
        ),
        (
            "forged page token",
            client.list_volumes(pb::ListVolumesRequest { page_size: 10, page_token: "garbage".into() }).await.map(drop),
            Code::InvalidArgument,
        ),
        (
            "snapshot of unknown volume",
            client
                .create_snapshot(pb::CreateSnapshotRequest {
                    name: "s".into(),
                    source_volume_id: "vol-nope".into(),
                    ..Default::default()
                })
                .await
                .map(drop),
            Code::NotFound,
        ),
        (
            "chunk of unknown volume",
            client
                .allocate_chunk(pb::AllocateChunkRequest { volume_id: "vol-nope".into(), chunk_index: 0, epoch: 0 })
                .await
                .map(drop),
            Code::NotFound,
        ),
        (
            "heartbeat of unregistered server",
            client.heartbeat(pb::HeartbeatRequest { server_id: "ghost".into(), ..Default::default() }).await.map(drop),
            Code::NotFound,
        ),
        (
            "publish without node",
            client
                .publish_volume(pb::PublishVolumeRequest { volume_id: "vol-1".into(), ..Default::default() })
                .await
                .map(drop),
            Code::InvalidArgument,
        ),
    ];
    for (what, result, code) in cases {
        let status = result.expect_err(what);
        assert_eq!(status.code(), code, "{what}: {status}");
        assert!(!status.message().is_empty(), "{what} explains itself");
    }

    // Deleting what does not exist is not an error; the service still serves.
    let deleted = client.delete_volume(pb::DeleteVolumeRequest { id: "vol-nope".into() }).await.unwrap();
    assert!(!deleted.existed);
    let volume = client.create_volume(create("still-serving", 1 << 20)).await.unwrap();
    let shrink =
        client.expand_volume(pb::ExpandVolumeRequest { id: volume.id.clone(), size_bytes: 4096 }).await.unwrap_err();
    assert_eq!(shrink.code(), Code::OutOfRange);
    let chunk = client
        .allocate_chunk(pb::AllocateChunkRequest { volume_id: volume.id.clone(), chunk_index: 1_000, epoch: 0 })
        .await
        .unwrap_err();
    assert_eq!(chunk.code(), Code::OutOfRange);
}
