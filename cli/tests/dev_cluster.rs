//! `ballast dev up|down` and the volume commands against the cluster it starts.

use std::path::Path;
use std::process::{Command, Output};

const BALLAST: &str = env!("CARGO_BIN_EXE_ballast");

/// Runs `ballast ARGS` in the environment `cluster.env` sets, if given.
fn ballast(args: &[&str], cluster_env: Option<&str>) -> Output {
    let mut command = Command::new(BALLAST);
    command.args(args).env_remove("BALLAST_META").env_remove("BALLAST_TLS_DIR");
    for (key, value) in cluster_env.unwrap_or_default().lines().filter_map(|l| l.split_once('=')) {
        command.env(key, value);
    }
    command.output().expect("running ballast")
}

fn ok(output: Output) -> String {
    assert!(output.status.success(), "stderr: {}", String::from_utf8_lossy(&output.stderr));
    String::from_utf8(output.stdout).unwrap()
}

/// Stops the cluster even when an assertion fails half-way.
struct Down<'a>(&'a Path);
impl Drop for Down<'_> {
    fn drop(&mut self) {
        let _ = ballast(&["dev", "down", "--dir", self.0.to_str().unwrap()], None);
    }
}

#[test]
fn dev_up_serves_volume_commands_and_dev_down_stops_everything() {
    let dir = tempfile::tempdir().unwrap();
    let dir_arg = dir.path().to_str().unwrap();
    let _down = Down(dir.path());
    ok(ballast(&["dev", "up", "--dir", dir_arg, "--storage", "0"], None));

    let env = std::fs::read_to_string(dir.path().join("cluster.env")).unwrap();
    let meta = env.lines().find_map(|l| l.strip_prefix("BALLAST_META=")).expect("BALLAST_META in cluster.env");
    assert_eq!(meta.split(',').count(), 3);
    let socket =
        env.lines().find_map(|l| l.strip_prefix("BALLAST_CSI_SOCKET=")).expect("BALLAST_CSI_SOCKET in cluster.env");
    let connected = std::os::unix::net::UnixStream::connect(socket);
    assert!(connected.is_ok(), "the CSI plugin listens on {socket}: {connected:?}");

    // Up again: the same cluster, still serving.
    ok(ballast(&["dev", "up", "--dir", dir_arg, "--storage", "0"], None));
    assert_eq!(std::fs::read_to_string(dir.path().join("cluster.env")).unwrap(), env);
    let other_shape = ballast(&["dev", "up", "--dir", dir_arg, "--storage", "2"], None);
    assert!(!other_shape.status.success());
    assert!(String::from_utf8_lossy(&other_shape.stderr).contains("holds a cluster of 3"), "{other_shape:?}");

    // Without the certificate the cluster answers nothing, and says why.
    let plaintext = ballast(&["volume", "list"], Some(&format!("BALLAST_META={meta}")));
    assert!(!plaintext.status.success());
    assert!(String::from_utf8_lossy(&plaintext.stderr).contains("--tls-dir"), "{plaintext:?}");

    ok(ballast(&["volume", "create", "data", "--size", "64MiB", "--replicas", "3"], Some(&env)));
    let listed: serde_json::Value =
        serde_json::from_str(&ok(ballast(&["volume", "list", "-o", "json"], Some(&env)))).unwrap();
    assert_eq!(listed[0]["name"], "data");
    assert_eq!(listed[0]["size_bytes"], 64 << 20);

    ok(ballast(&["volume", "expand", "data", "--size", "128MiB"], Some(&env)));
    let got: serde_json::Value =
        serde_json::from_str(&ok(ballast(&["volume", "get", "data", "-o", "json"], Some(&env)))).unwrap();
    assert_eq!(got[0]["size_bytes"], 128 << 20);
    assert_eq!(got[0]["chunks"], serde_json::json!({"allocated": 0, "with_all_replicas": 0}));

    ok(ballast(&["volume", "modify", "data", "--replicas", "2", "--max-bandwidth", "50MiB"], Some(&env)));
    ok(ballast(&["volume", "modify", "data", "--max-iops", "800"], Some(&env)));
    let got: serde_json::Value =
        serde_json::from_str(&ok(ballast(&["volume", "get", "data", "-o", "json"], Some(&env)))).unwrap();
    assert_eq!(got[0]["replicas"], 2);
    assert_eq!(got[0]["limits"], serde_json::json!({"max_iops": 800, "max_bandwidth_bytes": 50 << 20}));
    let nothing = ballast(&["volume", "modify", "data"], Some(&env));
    assert!(!nothing.status.success(), "a modification must name a change: {nothing:?}");
    let too_slow = ballast(&["volume", "modify", "data", "--max-iops", "3"], Some(&env));
    assert!(String::from_utf8_lossy(&too_slow.stderr).contains("at least 10"), "{too_slow:?}");

    ok(ballast(&["snapshot", "create", "snap1", "--volume", "data"], Some(&env)));
    let snaps: serde_json::Value =
        serde_json::from_str(&ok(ballast(&["snapshot", "list", "--volume", "data", "-o", "json"], Some(&env))))
            .unwrap();
    assert_eq!(snaps[0]["name"], "snap1");

    let status: serde_json::Value = serde_json::from_str(&ok(ballast(&["status", "-o", "json"], Some(&env)))).unwrap();
    assert_ne!(status["leader"]["id"], 0);
    assert_eq!(status["volumes"].as_array().unwrap().len(), 1);

    let shrink = ballast(&["volume", "expand", "data", "--size", "4KiB"], Some(&env));
    assert!(!shrink.status.success());
    assert!(String::from_utf8_lossy(&shrink.stderr).contains("OutOfRange"), "{shrink:?}");

    ok(ballast(&["volume", "delete", "data"], Some(&env)));
    let listed: serde_json::Value =
        serde_json::from_str(&ok(ballast(&["volume", "list", "-o", "json"], Some(&env)))).unwrap();
    assert_eq!(listed, serde_json::json!([]));

    ok(ballast(&["volume", "create", "kept", "--size", "64MiB", "--replicas", "3"], Some(&env)));
    let state: serde_json::Value =
        serde_json::from_slice(&std::fs::read(dir.path().join("cluster.json")).unwrap()).unwrap();
    let pids: Vec<i32> =
        state["processes"].as_array().unwrap().iter().map(|p| p["pid"].as_i64().unwrap() as i32).collect();
    let stopped = ok(ballast(&["dev", "down", "--dir", dir_arg], None));
    assert!(stopped.contains("meta1"), "{stopped}");
    for pid in pids {
        assert!(
            !Path::new(&format!("/proc/{pid}/cmdline")).exists()
                || std::fs::read(format!("/proc/{pid}/cmdline")).unwrap().is_empty(),
            "pid {pid} stopped"
        );
    }

    // Up after down: the same cluster again, with its data.
    ok(ballast(&["dev", "up", "--dir", dir_arg, "--storage", "0"], None));
    assert_eq!(std::fs::read_to_string(dir.path().join("cluster.env")).unwrap(), env);
    let kept: serde_json::Value =
        serde_json::from_str(&ok(ballast(&["volume", "get", "kept", "-o", "json"], Some(&env)))).unwrap();
    assert_eq!(kept[0]["name"], "kept");
}
