//! A local metadata cluster of real `meta-raft` processes on loopback, for
//! tests and development. Every process is killed when the handle drops.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use ballast_proto::meta as pb;
use ballast_tls::TlsDir;

use ballast_cli::dev::free_ports;
use meta_client::MetaClient;

pub struct MetaMember {
    pub id: u64,
    pub address: String,
    pub data_dir: PathBuf,
    process: Option<Child>,
}

/// Members started from one binary with one bootstrap list.
pub struct LocalMetaCluster {
    binary: PathBuf,
    bootstrap: String,
    extra_args: Vec<String>,
    pub members: Vec<MetaMember>,
    /// The certificate [`client`](Self::client) presents, when the members
    /// serve mutual TLS.
    client_tls: Option<TlsDir>,
}

impl LocalMetaCluster {
    /// Starts `count` members under `dir` and waits for a leader.
    pub async fn start(binary: &Path, dir: &Path, count: usize, extra_args: &[&str]) -> Self {
        Self::launch(binary, dir, count, extra_args, None).await
    }

    /// Like [`start`](Self::start), the members serving mutual TLS with the
    /// certificate in `member_tls`; [`client`](Self::client) presents
    /// `client_tls`.
    pub async fn start_with_tls(
        binary: &Path,
        dir: &Path,
        count: usize,
        member_tls: &Path,
        client_tls: TlsDir,
        extra_args: &[&str],
    ) -> Self {
        let mut args = vec!["--tls-dir", member_tls.to_str().expect("utf-8 path")];
        args.extend_from_slice(extra_args);
        Self::launch(binary, dir, count, &args, Some(client_tls)).await
    }

    async fn launch(binary: &Path, dir: &Path, count: usize, extra_args: &[&str], client_tls: Option<TlsDir>) -> Self {
        let ports = free_ports(count);
        let members: Vec<MetaMember> = ports
            .iter()
            .enumerate()
            .map(|(i, port)| MetaMember {
                id: i as u64 + 1,
                address: format!("127.0.0.1:{port}"),
                data_dir: dir.join(format!("meta{}", i + 1)),
                process: None,
            })
            .collect();
        let bootstrap = members.iter().map(|m| format!("{}={}", m.id, m.address)).collect::<Vec<_>>().join(",");
        let mut cluster = Self {
            binary: binary.to_path_buf(),
            bootstrap,
            extra_args: extra_args.iter().map(|s| s.to_string()).collect(),
            members,
            client_tls,
        };
        for id in 1..=count as u64 {
            cluster.start_member(id);
        }
        cluster.wait_for_leader().await;
        cluster
    }

    pub fn endpoints(&self) -> Vec<String> {
        self.members.iter().map(|m| m.address.clone()).collect()
    }

    pub fn client(&self) -> MetaClient {
        let client = MetaClient::new(self.endpoints()).expect("valid endpoints");
        match &self.client_tls {
            Some(tls) => client.with_tls(tls).expect("a usable certificate directory"),
            None => client,
        }
    }

    fn member(&mut self, id: u64) -> &mut MetaMember {
        self.members.iter_mut().find(|m| m.id == id).expect("known member id")
    }

    /// (Re)starts member `id` from its data directory.
    pub fn start_member(&mut self, id: u64) {
        let binary = self.binary.clone();
        let bootstrap = self.bootstrap.clone();
        let extra = self.extra_args.clone();
        // Without a certificate the members are told to serve plaintext.
        let insecure = (!extra.iter().any(|a| a == "--tls-dir")).then_some("--insecure");
        let member = self.member(id);
        std::fs::create_dir_all(&member.data_dir).expect("creating member dir");
        let log = std::fs::File::create(member.data_dir.with_extension("log")).expect("creating member log");
        let child = Command::new(binary)
            .args(["serve", "--id", &id.to_string(), "--listen", &member.address, "--bootstrap", &bootstrap])
            .arg("--data-dir")
            .arg(&member.data_dir)
            .args(extra)
            .args(insecure)
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .expect("spawning meta-raft");
        member.process = Some(child);
    }

    /// SIGKILLs member `id`.
    pub fn kill_member(&mut self, id: u64) {
        if let Some(mut child) = self.member(id).process.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    /// SIGTERMs member `id` and waits for it to exit.
    pub fn stop_member(&mut self, id: u64) -> std::process::ExitStatus {
        let mut child = self.member(id).process.take().expect("member is running");
        let pid = nix::unistd::Pid::from_raw(child.id() as i32);
        let _ = nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGTERM);
        child.wait().expect("waiting for member")
    }

    /// Waits until some member reports a leader that the others agree on.
    pub async fn wait_for_leader(&self) -> pb::ClusterStatus {
        let client = self.client();
        for _ in 0..200 {
            for endpoint in self.endpoints() {
                if let Ok(status) = client.member_status(&endpoint).await {
                    if status.leader_id != 0 && status.state == "Leader" {
                        return status;
                    }
                }
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        panic!("no leader elected within 20 s");
    }
}

impl Drop for LocalMetaCluster {
    fn drop(&mut self) {
        for member in &mut self.members {
            if let Some(mut child) = member.process.take() {
                let _ = child.kill();
                let _ = child.wait();
            }
        }
    }
}
