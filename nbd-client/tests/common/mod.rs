//! Shared pieces of the end-to-end tests: a local cluster, a volume served
//! by the real `nbd-client` binary, and the external tools they drive.

#![allow(dead_code)]

pub mod mem_export;
pub mod writes;

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

use ballast_cli::dev::DevCluster;
use ballast_proto::meta as pb;
use meta_client::MetaClient;
use volume_engine::engine::{EngineOptions, Volume};

pub const NBD_CLIENT: &str = env!("CARGO_BIN_EXE_nbd-client");
pub const MIB: u64 = 1 << 20;

pub fn ok(output: Output, what: &str) -> String {
    assert!(
        output.status.success(),
        "{what} failed: {}\n{}",
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    );
    String::from_utf8_lossy(&output.stdout).into_owned()
}

/// A 3-replica volume of `size` bytes in 1 MiB chunks, published to node
/// `n1`, and its engine opened with that attachment's epoch.
pub async fn published_volume(meta: &MetaClient, name: &str, size: u64) -> (pb::Volume, Volume) {
    let request = pb::CreateVolumeRequest {
        name: name.into(),
        size_bytes: size,
        replicas: 3,
        chunk_size_bytes: MIB,
        ..Default::default()
    };
    let info = meta.create_volume(request).await.unwrap();
    let volume = publish_and_open(meta, &info).await;
    (info, volume)
}

/// Publishes `info` writable to node `n1` and opens it with the
/// attachment's epoch.
pub async fn publish_and_open(meta: &MetaClient, info: &pb::Volume) -> Volume {
    let attachment = meta
        .publish_volume(pb::PublishVolumeRequest { volume_id: info.id.clone(), node_id: "n1".into(), readonly: false })
        .await
        .unwrap();
    let options = EngineOptions { epoch: attachment.epoch, ..Default::default() };
    Volume::open(meta.clone(), &info.id, options).await.unwrap()
}

/// How many chunks each chunk server of `cluster` holds, by address.
pub async fn held(cluster: &DevCluster) -> Vec<(String, usize)> {
    let mut out = Vec::new();
    for process in cluster.state.processes.iter().filter(|p| p.binary == "storage-server") {
        let client = cluster.chunk_servers().connect(&process.address).await.unwrap();
        out.push((process.address.clone(), client.list_chunks(None).await.unwrap().len()));
    }
    out
}

pub async fn create_volume(cluster: &DevCluster, name: &str, size: u64, replicas: u32) -> pb::Volume {
    let request = pb::CreateVolumeRequest {
        name: name.into(),
        size_bytes: size,
        replicas,
        chunk_size_bytes: 4 * MIB,
        ..Default::default()
    };
    cluster.meta().create_volume(request).await.unwrap()
}

/// `nbd-client serve` on a unix socket; killed when dropped.
pub struct Served {
    pub socket: PathBuf,
    child: Child,
}

impl Served {
    pub fn start(cluster: &DevCluster, volume: &str, dir: &Path) -> Served {
        let socket = dir.join(format!("{volume}.sock"));
        let log = std::fs::File::create(dir.join(format!("{volume}.serve.log"))).unwrap();
        let child = Command::new(NBD_CLIENT)
            .args(["serve", volume, "--listen", &format!("unix:{}", socket.display())])
            .args(cluster.client_args())
            .args(["--replica-timeout", "2"])
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .unwrap();
        let started = Instant::now();
        while !socket.exists() {
            assert!(started.elapsed() < Duration::from_secs(30), "nbd-client serve did not start");
            std::thread::sleep(Duration::from_millis(50));
        }
        Served { socket, child }
    }

    pub fn uri(&self) -> String {
        format!("nbd+unix:///?socket={}", self.socket.display())
    }
}

impl Drop for Served {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}
