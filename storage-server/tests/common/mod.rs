//! Shared helpers: in-process servers on loopback over temp dirs, the real
//! binary as a child process, and deterministic block contents.
#![allow(dead_code)]

use std::io::{BufRead, BufReader};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use ballast_proto::frame::{block_checksums, ChunkAt, ClientError, DataClient, ErrorCode, BLOCK_SIZE};
use ballast_tls::pki::{Authority, DEFAULT_VALIDITY};
use ballast_tls::{Identity, Role, TlsDir};
use bytes::Bytes;
use storage_server::{BackendChoice, Config, RunningServer};
use tempfile::TempDir;

pub const BLOCK: u64 = BLOCK_SIZE as u64;

/// Instantiates `async fn name(backend: BackendChoice)` tests once per backend.
#[macro_export]
macro_rules! both_backends {
    ($($name:ident),* $(,)?) => {
        mod uring {
            $(
                #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
                async fn $name() {
                    super::$name(storage_server::BackendChoice::Uring).await
                }
            )*
        }
        mod threadpool {
            $(
                #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
                async fn $name() {
                    super::$name(storage_server::BackendChoice::Threadpool).await
                }
            )*
        }
    };
}

/// An in-process server over its own temp dir, restartable.
pub struct TestServer {
    pub dir: TempDir,
    pub backend: BackendChoice,
    server: Option<RunningServer>,
    pub client: DataClient,
}

pub fn config(dir: &Path, backend: BackendChoice) -> Config {
    let mut config = Config::new(dir);
    config.io_backend = backend;
    config.unix = Some(dir.join("data.sock"));
    config
}

impl TestServer {
    pub async fn start(backend: BackendChoice) -> TestServer {
        let dir = tempfile::tempdir().expect("temp dir");
        let server = storage_server::start(config(dir.path(), backend)).await.expect("server starts");
        let client = DataClient::connect_tcp(server.tcp_addr().unwrap()).await.unwrap();
        TestServer { dir, backend, server: Some(server), client }
    }

    pub fn server(&self) -> &RunningServer {
        self.server.as_ref().expect("running")
    }

    pub fn addr(&self) -> SocketAddr {
        self.server().tcp_addr().unwrap()
    }

    pub async fn connect(&self) -> DataClient {
        DataClient::connect_tcp(self.addr()).await.unwrap()
    }

    /// Graceful stop and start on the same data dir; reconnects `client`.
    pub async fn restart(&mut self) {
        let server = self.server.take().expect("running");
        server.shutdown().await.expect("clean shutdown");
        let server = storage_server::start(config(self.dir.path(), self.backend)).await.expect("server restarts");
        self.client = DataClient::connect_tcp(server.tcp_addr().unwrap()).await.unwrap();
        self.server = Some(server);
    }

    pub async fn stop(mut self) {
        if let Some(server) = self.server.take() {
            server.shutdown().await.expect("clean shutdown");
        }
    }

    pub fn chunk_file(&self, volume: u64, chunk: u64) -> PathBuf {
        chunk_file(self.dir.path(), volume, chunk)
    }
}

pub fn chunk_file(data_dir: &Path, volume: u64, chunk: u64) -> PathBuf {
    data_dir.join("chunks").join(format!("{volume:016x}")).join(format!("{chunk:016x}.chunk"))
}

/// Deterministic contents for `blocks` blocks: each block starts with
/// (`tag`, block index) so a read can tell which write it came from.
pub fn pattern(tag: u64, first_block: u64, blocks: usize) -> Bytes {
    let mut out = Vec::with_capacity(blocks * BLOCK_SIZE);
    for b in 0..blocks as u64 {
        let block = first_block + b;
        let mut state = tag.wrapping_mul(0x9e37_79b9_7f4a_7c15) ^ block.wrapping_mul(0xc2b2_ae3d_27d4_eb4f) | 1;
        let start = out.len();
        out.extend_from_slice(&tag.to_le_bytes());
        out.extend_from_slice(&block.to_le_bytes());
        while out.len() < start + BLOCK_SIZE {
            state ^= state << 13;
            state ^= state >> 7;
            state ^= state << 17;
            out.extend_from_slice(&state.to_le_bytes());
        }
        out.truncate(start + BLOCK_SIZE);
    }
    Bytes::from(out)
}

/// The data `len` bytes at `at` read back (checksums verified by the client).
pub async fn read_data(client: &DataClient, at: ChunkAt, len: u32) -> Bytes {
    client.read(at, len).await.unwrap_or_else(|e| panic!("reading {len} bytes at {at:?}: {e}")).0
}

/// Writes `data` with correct checksums.
pub async fn write(
    client: &DataClient,
    volume: u64,
    chunk: u64,
    offset: u64,
    data: Bytes,
    epoch: u64,
    fua: bool,
) -> Result<(), ClientError> {
    let crcs = block_checksums(&data);
    client.write(ChunkAt { volume, chunk, offset, epoch, generation: 1 }, data, &crcs, fua).await
}

pub fn code(result: Result<impl std::fmt::Debug, ClientError>) -> ErrorCode {
    match result {
        Err(e) => e.code().unwrap_or_else(|| panic!("expected a server error, got {e}")),
        Ok(v) => panic!("expected an error, got {v:?}"),
    }
}

/// The real `storage-server` binary, killed (SIGKILL) when dropped.
pub struct Binary {
    pub child: Child,
    pub tcp: SocketAddr,
}

impl Binary {
    pub fn start(data_dir: &Path, extra: &[&str]) -> Binary {
        let mut child = Command::new(env!("CARGO_BIN_EXE_storage-server"))
            .args(["serve", "--listen", "127.0.0.1:0", "--scrub-rate", "0", "--data-dir"])
            .arg(data_dir)
            .args(extra)
            .args((!extra.contains(&"--tls-dir")).then_some("--insecure"))
            .env("RUST_LOG", "warn")
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .spawn()
            .expect("spawn storage-server");
        let stdout = child.stdout.take().expect("stdout piped");
        let mut line = String::new();
        BufReader::new(stdout).read_line(&mut line).expect("ready line");
        let tcp = line
            .split_whitespace()
            .find_map(|w| w.strip_prefix("tcp="))
            .unwrap_or_else(|| {
                let _ = child.kill();
                panic!("no address in {line:?}")
            })
            .parse()
            .expect("socket address");
        Binary { child, tcp }
    }

    pub fn kill(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }

    /// SIGTERM, then waits (bounded) for the exit status.
    pub fn terminate(&mut self) -> std::process::ExitStatus {
        let pid = nix::unistd::Pid::from_raw(self.child.id() as i32);
        nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGTERM).expect("signal");
        for _ in 0..300 {
            if let Some(status) = self.child.try_wait().expect("wait") {
                return status;
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        self.kill();
        panic!("server did not exit within 15 s of SIGTERM");
    }
}

impl Drop for Binary {
    fn drop(&mut self) {
        self.kill();
    }
}

/// The `meta-raft` binary built beside this package's.
pub fn meta_raft_binary() -> PathBuf {
    let binary = Path::new(env!("CARGO_BIN_EXE_storage-server")).with_file_name("meta-raft");
    assert!(binary.exists(), "{} is missing: build it first with `cargo build -p meta-raft`", binary.display());
    binary
}

/// A certificate of `ca` for `role`/`name`, in a directory under `root`.
pub fn issue(ca: &Authority, root: &Path, role: Role, name: &str) -> TlsDir {
    let out = root.join(format!("{role}-{name}"));
    ca.issue(&Identity::new(role, name).unwrap(), &[], DEFAULT_VALIDITY, &out).unwrap()
}
