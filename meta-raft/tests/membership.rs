//! Membership changes through the `meta-raft` command line.

use std::path::Path;
use std::process::{Command, Stdio};

use ballast_cli::dev::free_ports;
use ballast_proto::meta as pb;
use ballast_testkit::meta_cluster::LocalMetaCluster;

const BINARY: &str = env!("CARGO_BIN_EXE_meta-raft");

fn admin(meta: &str, args: &[&str]) -> Vec<serde_json::Value> {
    let output = Command::new(BINARY).args(args).args(["--meta", meta]).output().expect("running meta-raft");
    assert!(output.status.success(), "meta-raft {args:?}: {}", String::from_utf8_lossy(&output.stderr));
    String::from_utf8(output.stdout)
        .unwrap()
        .lines()
        .map(|line| serde_json::from_str(line).expect("JSON status line"))
        .collect()
}

struct Reaper(std::process::Child);
impl Drop for Reaper {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn add_a_learner_promote_it_and_remove_a_member() {
    let dir = tempfile::tempdir().unwrap();
    let cluster = LocalMetaCluster::start(Path::new(BINARY), dir.path(), 3, &[]).await;
    let meta = cluster.endpoints().join(",");
    let client = cluster.client();
    client
        .create_volume(pb::CreateVolumeRequest { name: "before".into(), size_bytes: 1 << 20, ..Default::default() })
        .await
        .unwrap();

    // A fourth, empty member joins as a learner and catches up.
    let address = format!("127.0.0.1:{}", free_ports(1)[0]);
    let _fourth = Reaper(
        Command::new(BINARY)
            .args(["serve", "--id", "4", "--listen", &address, "--insecure"])
            .arg("--data-dir")
            .arg(dir.path().join("meta4"))
            .stderr(Stdio::null())
            .spawn()
            .unwrap(),
    );
    let status = admin(&meta, &["add-learner", "--id", "4", "--address", &address]);
    let member4 = |s: &serde_json::Value| s["members"].as_array().unwrap().iter().find(|m| m["id"] == 4).cloned();
    assert_eq!(member4(&status[0]).unwrap()["voter"], false);

    let status = admin(&meta, &["set-voters", "--voters", "1,2,3,4"]);
    assert_eq!(member4(&status[0]).unwrap()["voter"], true);
    // "Caught up" for openraft means within its replication lag threshold,
    // so the new member may still be starting: wait for it to apply the log.
    let mut learner_view = None;
    for _ in 0..100 {
        match client.member_status(&address).await {
            Ok(status) if status.applied_index >= 2 => {
                learner_view = Some(status);
                break;
            }
            _ => tokio::time::sleep(std::time::Duration::from_millis(100)).await,
        }
    }
    assert!(learner_view.is_some(), "the new member replicated the log within 10 s");

    let status = admin(&meta, &["remove", "--id", "1"]);
    let ids: Vec<u64> = status[0]["members"].as_array().unwrap().iter().map(|m| m["id"].as_u64().unwrap()).collect();
    assert_eq!(ids, vec![2, 3, 4]);

    // The reshaped cluster still serves, from any endpoint that remains.
    let client = meta_client::MetaClient::new([cluster.members[1].address.clone(), address.clone()]).unwrap();
    let volume = client
        .get_volume(pb::GetVolumeRequest { key: Some(pb::get_volume_request::Key::Name("before".into())) })
        .await
        .unwrap();
    assert_eq!(volume.size_bytes, 1 << 20);
}
