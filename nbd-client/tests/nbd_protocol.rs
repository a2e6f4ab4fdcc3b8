//! Interoperability of the NBD server with real clients (qemu-io, qemu-img,
//! nbdinfo, nbdcopy, fio's nbd engine) and with a hand-written raw client
//! that sends malformed, out-of-range and oversized requests.
//!
//! The server serves `TestMemExport`, an in-memory export defined here for
//! tests only; the replicated volume engine is exercised elsewhere.
//!
//! A missing tool skips its test (`ballast_testkit::machine_has`).

use std::path::{Path, PathBuf};
use std::process::Output;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;

use nbd_client::nbd::{proto, ExportOptions, NbdError, NbdServer};
use rand::RngCore;
use tempfile::TempDir;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::net::{TcpListener, UnixStream};
use tokio::task::JoinHandle;

mod common;

const MIB: u64 = 1024 * 1024;
const TOOL_TIMEOUT: Duration = Duration::from_secs(120);

use common::mem_export::TestMemExport;

// ---------------------------------------------------------------------------
// Harness
// ---------------------------------------------------------------------------

/// A server on a unix socket in a private temp dir; stopped and cleaned up on drop.
struct TestServer {
    server: NbdServer<TestMemExport>,
    task: Option<JoinHandle<Result<(), NbdError>>>,
    socket: PathBuf,
    dir: TempDir,
}

impl TestServer {
    async fn unix(server: NbdServer<TestMemExport>) -> Self {
        let dir = tempfile::tempdir().unwrap();
        let socket = dir.path().join("nbd.sock");
        let task = tokio::spawn({
            let server = server.clone();
            let socket = socket.clone();
            async move { server.serve_unix(socket).await }
        });
        for _ in 0..200 {
            if socket.exists() {
                break;
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        assert!(socket.exists(), "server socket never appeared");
        Self { server, task: Some(task), socket, dir }
    }

    async fn single(export: Arc<TestMemExport>) -> Self {
        Self::unix(NbdServer::single(export, ExportOptions::default())).await
    }

    fn uri(&self) -> String {
        format!("nbd+unix:///?socket={}", self.socket.display())
    }

    fn path(&self, name: &str) -> PathBuf {
        self.dir.path().join(name)
    }

    /// Graceful stop; returns what `serve_unix` returned.
    async fn stop(mut self) -> Result<(), NbdError> {
        self.server.shutdown();
        let task = self.task.take().unwrap();
        tokio::time::timeout(Duration::from_secs(10), task).await.expect("server did not stop").unwrap()
    }
}

impl Drop for TestServer {
    fn drop(&mut self) {
        self.server.shutdown();
        if let Some(task) = self.task.take() {
            task.abort();
        }
    }
}

/// Runs a tool to completion (killed if the test fails first or it hangs);
/// panics with its output unless it succeeded.
async fn run(program: &str, args: &[&str]) -> Output {
    let child =
        tokio::process::Command::new(program).args(args).kill_on_drop(true).stdin(std::process::Stdio::null()).output();
    let output = tokio::time::timeout(TOOL_TIMEOUT, child)
        .await
        .unwrap_or_else(|_| panic!("{program} timed out"))
        .unwrap_or_else(|e| panic!("cannot run {program}: {e}"));
    assert!(
        output.status.success(),
        "{program} {args:?} failed ({}):\nstdout: {}\nstderr: {}",
        output.status,
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    );
    output
}

fn random_bytes(len: usize) -> Vec<u8> {
    let mut data = vec![0u8; len];
    rand::rng().fill_bytes(&mut data);
    data
}

/// qemu-io prints failures but does not always exit non-zero: check both.
async fn qemu_io(uri: &str, commands: &[&str]) -> String {
    let mut args = vec!["-f", "raw", uri];
    for c in commands {
        args.extend(["-c", c]);
    }
    let output = run("qemu-io", &args).await;
    let text = format!("{}{}", String::from_utf8_lossy(&output.stdout), String::from_utf8_lossy(&output.stderr));
    assert!(
        !text.contains("fail") && !text.contains("error") && !text.contains("Error"),
        "qemu-io reported a problem:\n{text}"
    );
    text
}

// ---------------------------------------------------------------------------
// Real clients
// ---------------------------------------------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn qemu_io_writes_and_verifies_patterns_over_unix() {
    if !ballast_testkit::machine_has(&["qemu-io"]) {
        return;
    }
    let export = TestMemExport::new(8 * MIB);
    let server = TestServer::single(export.clone()).await;
    qemu_io(
        &server.uri(),
        &[
            "write -P 0xa5 0 1M",
            "write -P 0x5a 1M 64k",
            "write -P 0x11 4097 3000",
            "write -z 2M 128k",
            "discard 3M 64k",
            "flush",
            "read -P 0xa5 0 4096",
            "read -P 0x11 4097 3000",
            "read -P 0xa5 8192 1040384",
            "read -P 0x5a 1M 64k",
            "read -P 0 2M 128k",
            "read -P 0 3M 64k",
        ],
    )
    .await;
    let data = export.snapshot();
    assert!(data[..4097].iter().all(|b| *b == 0xa5));
    assert!(data[4097..7097].iter().all(|b| *b == 0x11));
    assert!(data[MIB as usize..(MIB + 65536) as usize].iter().all(|b| *b == 0x5a));
    assert!(export.flushes.load(Ordering::Relaxed) >= 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn qemu_io_over_tcp_default_and_named_exports() {
    if !ballast_testkit::machine_has(&["qemu-io"]) {
        return;
    }
    let first = TestMemExport::new(4 * MIB);
    let second = TestMemExport::new(2 * MIB);
    let server = NbdServer::new();
    server.add_export("vol-a", first.clone(), ExportOptions::default()).unwrap();
    server.add_export("vol-b", second.clone(), ExportOptions::default()).unwrap();
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let port = listener.local_addr().unwrap().port();
    let task = tokio::spawn({
        let server = server.clone();
        async move { server.serve_tcp_listener(listener).await }
    });

    // No export name: the default export, which is the first one added.
    qemu_io(&format!("nbd://127.0.0.1:{port}"), &["write -P 0x42 0 512k", "read -P 0x42 0 512k"]).await;
    qemu_io(&format!("nbd://127.0.0.1:{port}/vol-b"), &["write -P 0x24 1M 256k", "read -P 0x24 1M 256k"]).await;
    assert!(first.snapshot()[..512 * 1024].iter().all(|b| *b == 0x42));
    assert!(second.snapshot()[MIB as usize..(MIB as usize + 256 * 1024)].iter().all(|b| *b == 0x24));

    server.shutdown();
    tokio::time::timeout(Duration::from_secs(10), task).await.unwrap().unwrap().unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn qemu_img_info_and_convert_round_trip_bit_identical() {
    if !ballast_testkit::machine_has(&["qemu-img"]) {
        return;
    }
    let size = 8 * MIB;
    let export = TestMemExport::new(size);
    let server = TestServer::single(export.clone()).await;
    let source = random_bytes(size as usize);
    let src = server.path("src.img");
    let out = server.path("out.img");
    std::fs::write(&src, &source).unwrap();
    let uri = server.uri();

    let info = run("qemu-img", &["info", "--output=json", &uri]).await;
    let info: serde_json::Value = serde_json::from_slice(&info.stdout).unwrap();
    assert_eq!(info["virtual-size"].as_u64(), Some(size), "{info}");

    run("qemu-img", &["convert", "-n", "-f", "raw", "-O", "raw", src.to_str().unwrap(), &uri]).await;
    assert!(export.snapshot() == source, "export differs from the image written into it");
    run("qemu-img", &["convert", "-f", "raw", "-O", "raw", &uri, out.to_str().unwrap()]).await;
    assert!(std::fs::read(&out).unwrap() == source, "image read back differs");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn nbdinfo_reports_size_flags_and_block_sizes() {
    if !ballast_testkit::machine_has(&["nbdinfo"]) {
        return;
    }
    let server = TestServer::single(TestMemExport::new(6 * MIB)).await;
    let output = run("nbdinfo", &["--json", &server.uri()]).await;
    let info: serde_json::Value = serde_json::from_slice(&output.stdout).unwrap();
    let export = &info["exports"][0];
    assert_eq!(export["export-size"].as_u64(), Some(6 * MIB), "{info}");
    for (key, want) in [
        ("is_read_only", false),
        ("can_flush", true),
        ("can_fua", true),
        ("can_trim", true),
        ("can_zero", true),
        ("can_multi_conn", true),
    ] {
        assert_eq!(export[key].as_bool(), Some(want), "{key} in {info}");
    }
    assert_eq!(export["block_size_minimum"].as_u64(), Some(1), "{info}");
    assert_eq!(export["block_size_preferred"].as_u64(), Some(4096), "{info}");
    assert_eq!(export["block_size_maximum"].as_u64(), Some(32 * MIB), "{info}");
    assert_eq!(info["protocol"].as_str(), Some("newstyle-fixed"), "{info}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn nbdinfo_lists_exports_and_sees_read_only() {
    if !ballast_testkit::machine_has(&["nbdinfo"]) {
        return;
    }
    let nbd = NbdServer::new();
    nbd.add_export("data", TestMemExport::new(MIB), ExportOptions::default().with_description("data volume")).unwrap();
    nbd.add_export("golden", TestMemExport::new(2 * MIB), ExportOptions::read_only()).unwrap();
    let server = TestServer::unix(nbd).await;

    let output = run("nbdinfo", &["--json", "--list", &server.uri()]).await;
    let info: serde_json::Value = serde_json::from_slice(&output.stdout).unwrap();
    let exports = info["exports"].as_array().unwrap();
    let names: Vec<_> = exports.iter().map(|e| e["export-name"].as_str().unwrap()).collect();
    assert_eq!(names, ["data", "golden"], "{info}");
    assert_eq!(exports[0]["description"].as_str(), Some("data volume"), "{info}");
    assert_eq!(exports[1]["is_read_only"].as_bool(), Some(true), "{info}");
    assert_eq!(exports[1]["export-size"].as_u64(), Some(2 * MIB), "{info}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn nbdcopy_round_trip_bit_identical() {
    if !ballast_testkit::machine_has(&["nbdcopy"]) {
        return;
    }
    let size = 16 * MIB + 12345;
    let export = TestMemExport::new(size);
    let server = TestServer::single(export.clone()).await;
    let source = random_bytes(size as usize);
    let src = server.path("src.img");
    let out = server.path("out.img");
    std::fs::write(&src, &source).unwrap();
    // nbdcopy opens several connections since the export allows multi-conn.
    run("nbdcopy", &[src.to_str().unwrap(), &server.uri()]).await;
    assert!(export.snapshot() == source, "export differs after nbdcopy in");
    run("nbdcopy", &[&server.uri(), out.to_str().unwrap()]).await;
    assert!(std::fs::read(&out).unwrap() == source, "file differs after nbdcopy out");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fio_nbd_engine_writes_and_verifies() {
    if !ballast_testkit::machine_has(&["fio"]) {
        return;
    }
    let server = TestServer::single(TestMemExport::new(32 * MIB)).await;
    let uri = format!("--uri={}", server.uri());
    run(
        "fio",
        &[
            "--name=verify",
            "--ioengine=nbd",
            &uri,
            "--rw=randwrite",
            "--bs=4k",
            "--size=32M",
            "--iodepth=16",
            "--verify=crc32c",
            "--do_verify=1",
            "--verify_fatal=1",
            // Keep fio from leaving a verify state file in the working directory.
            "--verify_state_save=0",
            "--output-format=terse",
        ],
    )
    .await;
}

// ---------------------------------------------------------------------------
// Raw client
// ---------------------------------------------------------------------------

/// A minimal NBD client speaking bytes directly, to send what real clients never would.
struct Raw<S> {
    stream: S,
}

impl Raw<UnixStream> {
    async fn connect(path: &Path) -> Self {
        Self { stream: UnixStream::connect(path).await.unwrap() }
    }

    /// Handshake with `NBD_OPT_GO`; returns (size, transmission flags).
    async fn go(path: &Path, name: &str) -> (Self, u64, u16) {
        let mut raw = Self::connect(path).await;
        raw.greet(proto::FLAG_C_FIXED_NEWSTYLE | proto::FLAG_C_NO_ZEROES).await;
        raw.send_option(proto::OPT_GO, &info_request(name, &[])).await;
        let mut info = None;
        loop {
            let (reply, data) = raw.option_reply(proto::OPT_GO).await;
            match reply {
                proto::REP_INFO if u16::from_be_bytes([data[0], data[1]]) == proto::INFO_EXPORT => {
                    info = Some((
                        u64::from_be_bytes(data[2..10].try_into().unwrap()),
                        u16::from_be_bytes(data[10..12].try_into().unwrap()),
                    ));
                }
                proto::REP_INFO => {}
                proto::REP_ACK => break,
                other => panic!("NBD_OPT_GO failed with {other:#x}"),
            }
        }
        let (size, flags) = info.expect("no NBD_INFO_EXPORT");
        (raw, size, flags)
    }
}

impl<S: AsyncRead + AsyncWrite + Unpin> Raw<S> {
    async fn greet(&mut self, client_flags: u32) -> u16 {
        assert_eq!(self.stream.read_u64().await.unwrap(), proto::NBDMAGIC);
        assert_eq!(self.stream.read_u64().await.unwrap(), proto::IHAVEOPT);
        let flags = self.stream.read_u16().await.unwrap();
        self.stream.write_u32(client_flags).await.unwrap();
        flags
    }

    async fn send_option(&mut self, option: u32, data: &[u8]) {
        let mut msg = proto::IHAVEOPT.to_be_bytes().to_vec();
        msg.extend_from_slice(&option.to_be_bytes());
        msg.extend_from_slice(&(data.len() as u32).to_be_bytes());
        msg.extend_from_slice(data);
        self.stream.write_all(&msg).await.unwrap();
    }

    async fn option_reply(&mut self, option: u32) -> (u32, Vec<u8>) {
        assert_eq!(self.stream.read_u64().await.unwrap(), proto::OPTION_REPLY_MAGIC);
        assert_eq!(self.stream.read_u32().await.unwrap(), option);
        let reply = self.stream.read_u32().await.unwrap();
        let len = self.stream.read_u32().await.unwrap();
        let mut data = vec![0; len as usize];
        self.stream.read_exact(&mut data).await.unwrap();
        (reply, data)
    }

    async fn request(&mut self, command: u16, flags: u16, handle: u64, offset: u64, length: u32, payload: &[u8]) {
        let header = proto::RequestHeader { flags, command, handle, offset, length };
        self.stream.write_all(&header.encode()).await.unwrap();
        self.stream.write_all(payload).await.unwrap();
    }

    /// Reads one simple reply header: (error, handle).
    async fn reply(&mut self) -> (u32, u64) {
        let mut buf = [0u8; proto::SimpleReplyHeader::LEN];
        tokio::time::timeout(Duration::from_secs(10), self.stream.read_exact(&mut buf))
            .await
            .expect("no reply")
            .unwrap();
        let reply = proto::SimpleReplyHeader::decode(&buf).expect("bad reply magic");
        (reply.error, reply.handle)
    }

    async fn data(&mut self, len: usize) -> Vec<u8> {
        let mut data = vec![0; len];
        self.stream.read_exact(&mut data).await.unwrap();
        data
    }

    /// A request with no payload answered by a payload-less reply: returns the error.
    async fn call(&mut self, command: u16, flags: u16, offset: u64, length: u32) -> u32 {
        self.request(command, flags, 99, offset, length, &[]).await;
        let (error, handle) = self.reply().await;
        assert_eq!(handle, 99);
        error
    }

    async fn write(&mut self, offset: u64, data: &[u8]) -> u32 {
        self.request(proto::CMD_WRITE, 0, 7, offset, data.len() as u32, data).await;
        let (error, handle) = self.reply().await;
        assert_eq!(handle, 7);
        error
    }

    async fn read(&mut self, offset: u64, len: u32) -> Result<Vec<u8>, u32> {
        self.request(proto::CMD_READ, 0, 8, offset, len, &[]).await;
        let (error, handle) = self.reply().await;
        assert_eq!(handle, 8);
        if error != 0 {
            return Err(error);
        }
        Ok(self.data(len as usize).await)
    }

    async fn expect_closed(&mut self) {
        let mut byte = [0u8; 1];
        let read =
            tokio::time::timeout(Duration::from_secs(10), self.stream.read(&mut byte)).await.expect("not closed");
        assert!(matches!(read, Ok(0) | Err(_)), "connection still open");
    }
}

fn info_request(name: &str, infos: &[u16]) -> Vec<u8> {
    let mut data = (name.len() as u32).to_be_bytes().to_vec();
    data.extend_from_slice(name.as_bytes());
    data.extend_from_slice(&(infos.len() as u16).to_be_bytes());
    for info in infos {
        data.extend_from_slice(&info.to_be_bytes());
    }
    data
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn raw_handshake_options() {
    let nbd = NbdServer::new();
    nbd.add_export("vol", TestMemExport::new(MIB), ExportOptions::default().with_description("first")).unwrap();
    nbd.add_export("other", TestMemExport::new(2 * MIB), ExportOptions::default()).unwrap();
    let server = TestServer::unix(nbd).await;
    let mut raw = Raw::connect(&server.socket).await;
    let flags = raw.greet(proto::FLAG_C_FIXED_NEWSTYLE | proto::FLAG_C_NO_ZEROES).await;
    assert_eq!(flags, proto::FLAG_FIXED_NEWSTYLE | proto::FLAG_NO_ZEROES);

    for option in [proto::OPT_STRUCTURED_REPLY, proto::OPT_STARTTLS, proto::OPT_EXTENDED_HEADERS, 999] {
        raw.send_option(option, &[]).await;
        assert_eq!(raw.option_reply(option).await.0, proto::REP_ERR_UNSUP, "option {option}");
    }

    raw.send_option(proto::OPT_LIST, &[]).await;
    let mut listed = Vec::new();
    loop {
        match raw.option_reply(proto::OPT_LIST).await {
            (proto::REP_SERVER, data) => {
                let len = u32::from_be_bytes(data[..4].try_into().unwrap()) as usize;
                listed.push(String::from_utf8(data[4..4 + len].to_vec()).unwrap());
            }
            (proto::REP_ACK, _) => break,
            (other, _) => panic!("unexpected reply {other:#x}"),
        }
    }
    assert_eq!(listed, ["vol", "other"]);
    raw.send_option(proto::OPT_LIST, b"junk").await;
    assert_eq!(raw.option_reply(proto::OPT_LIST).await.0, proto::REP_ERR_INVALID);

    raw.send_option(proto::OPT_INFO, &info_request("nope", &[])).await;
    assert_eq!(raw.option_reply(proto::OPT_INFO).await.0, proto::REP_ERR_UNKNOWN);
    raw.send_option(proto::OPT_INFO, &[0, 0, 0, 9, b'x']).await;
    assert_eq!(raw.option_reply(proto::OPT_INFO).await.0, proto::REP_ERR_INVALID);

    // INFO on the default export, asking for name and description.
    raw.send_option(proto::OPT_INFO, &info_request("", &[proto::INFO_NAME, proto::INFO_DESCRIPTION])).await;
    let mut seen = Vec::new();
    loop {
        let (reply, data) = raw.option_reply(proto::OPT_INFO).await;
        if reply == proto::REP_ACK {
            break;
        }
        assert_eq!(reply, proto::REP_INFO);
        let info = u16::from_be_bytes([data[0], data[1]]);
        match info {
            proto::INFO_EXPORT => {
                assert_eq!(u64::from_be_bytes(data[2..10].try_into().unwrap()), MIB);
                let flags = u16::from_be_bytes(data[10..12].try_into().unwrap());
                let want = proto::FLAG_HAS_FLAGS
                    | proto::FLAG_SEND_FLUSH
                    | proto::FLAG_SEND_FUA
                    | proto::FLAG_SEND_TRIM
                    | proto::FLAG_SEND_WRITE_ZEROES
                    | proto::FLAG_CAN_MULTI_CONN;
                assert_eq!(flags, want);
            }
            proto::INFO_NAME => assert_eq!(&data[2..], b"vol"),
            proto::INFO_DESCRIPTION => assert_eq!(&data[2..], b"first"),
            proto::INFO_BLOCK_SIZE => {
                let sizes: Vec<u32> = data[2..].chunks(4).map(|c| u32::from_be_bytes(c.try_into().unwrap())).collect();
                assert_eq!(sizes, [1, 4096, 32 * 1024 * 1024]);
            }
            other => panic!("unexpected info {other}"),
        }
        seen.push(info);
    }
    seen.sort();
    assert_eq!(seen, [proto::INFO_EXPORT, proto::INFO_NAME, proto::INFO_DESCRIPTION, proto::INFO_BLOCK_SIZE]);

    // Still negotiating: GO on the second export enters transmission.
    raw.send_option(proto::OPT_GO, &info_request("other", &[])).await;
    loop {
        match raw.option_reply(proto::OPT_GO).await.0 {
            proto::REP_INFO => {}
            proto::REP_ACK => break,
            other => panic!("unexpected reply {other:#x}"),
        }
    }
    assert_eq!(raw.read(2 * MIB - 512, 512).await.unwrap(), vec![0; 512]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn raw_export_name_honours_no_zeroes() {
    let server = TestServer::single(TestMemExport::new(MIB)).await;
    for no_zeroes in [true, false] {
        let mut raw = Raw::connect(&server.socket).await;
        let flags = if no_zeroes { proto::FLAG_C_FIXED_NEWSTYLE | proto::FLAG_C_NO_ZEROES } else { 0 };
        raw.greet(flags).await;
        raw.send_option(proto::OPT_EXPORT_NAME, b"").await;
        assert_eq!(raw.stream.read_u64().await.unwrap(), MIB);
        raw.stream.read_u16().await.unwrap();
        if !no_zeroes {
            assert_eq!(raw.data(124).await, vec![0; 124]);
        }
        // The very next bytes must be the reply to this read.
        raw.write(0, b"abc").await;
        assert_eq!(raw.read(0, 3).await.unwrap(), b"abc");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn raw_unknown_export_name_closes_and_abort_is_acked() {
    let server = TestServer::single(TestMemExport::new(MIB)).await;
    // "" resolves to the single export; any other name is unknown here.
    let mut raw = Raw::connect(&server.socket).await;
    raw.greet(proto::FLAG_C_FIXED_NEWSTYLE).await;
    raw.send_option(proto::OPT_EXPORT_NAME, b"missing").await;
    raw.expect_closed().await;

    let mut raw = Raw::connect(&server.socket).await;
    raw.greet(proto::FLAG_C_FIXED_NEWSTYLE).await;
    raw.send_option(proto::OPT_ABORT, &[]).await;
    assert_eq!(raw.option_reply(proto::OPT_ABORT).await.0, proto::REP_ACK);
    raw.expect_closed().await;

    // Unknown client flags are a hard error.
    let mut raw = Raw::connect(&server.socket).await;
    raw.greet(1 << 7).await;
    raw.expect_closed().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn raw_bad_requests_get_errors_and_the_connection_survives() {
    let size = 4 * MIB;
    let export = TestMemExport::new(size);
    let server = TestServer::single(export.clone()).await;
    let (mut raw, got_size, _) = Raw::go(&server.socket, "").await;
    assert_eq!(got_size, size);

    // Reads: beyond the end, straddling it, empty, oversized.
    assert_eq!(raw.read(size, 512).await, Err(proto::EINVAL));
    assert_eq!(raw.read(size - 512, 1024).await, Err(proto::EINVAL));
    assert_eq!(raw.read(u64::MAX - 10, 512).await, Err(proto::EINVAL));
    assert_eq!(raw.read(0, 0).await, Err(proto::EINVAL));
    assert_eq!(raw.read(0, 32 * 1024 * 1024 + 1).await, Err(proto::EINVAL));

    // Writes past the end: ENOSPC, and the payload is consumed.
    assert_eq!(raw.write(size - 2, b"four").await, proto::ENOSPC);
    // A write above the maximum payload: EINVAL, payload drained.
    let oversized = vec![0xee; 32 * 1024 * 1024 + 4096];
    assert_eq!(raw.write(0, &oversized).await, proto::EINVAL);
    assert!(export.snapshot().iter().all(|b| *b == 0), "a refused write changed data");

    // Unknown command, flags not valid for the command, flags not advertised.
    assert_eq!(raw.call(42, 0, 0, 512).await, proto::EINVAL);
    assert_eq!(raw.call(proto::CMD_BLOCK_STATUS, 0, 0, 512).await, proto::EINVAL);
    assert_eq!(raw.call(proto::CMD_CACHE, 0, 0, 512).await, proto::EINVAL);
    assert_eq!(raw.call(proto::CMD_READ, proto::CMD_FLAG_DF, 0, 512).await, proto::EINVAL);
    assert_eq!(raw.call(proto::CMD_TRIM, proto::CMD_FLAG_NO_HOLE, 0, 512).await, proto::EINVAL);
    assert_eq!(raw.call(proto::CMD_WRITE_ZEROES, proto::CMD_FLAG_FAST_ZERO, 0, 512).await, proto::EINVAL);
    assert_eq!(raw.call(proto::CMD_TRIM, 0, size, 512).await, proto::EINVAL);
    assert_eq!(raw.call(proto::CMD_WRITE_ZEROES, 0, size - 1, 2).await, proto::ENOSPC);
    // A write carrying an invalid flag still has its payload consumed.
    raw.request(proto::CMD_WRITE, proto::CMD_FLAG_DF, 5, 0, 4, b"nope").await;
    assert_eq!(raw.reply().await, (proto::EINVAL, 5));

    // The same connection still does real work.
    let data = random_bytes(64 * 1024);
    assert_eq!(raw.write(4096, &data).await, 0);
    raw.request(proto::CMD_WRITE, proto::CMD_FLAG_FUA, 9, size - 3, 3, b"end").await;
    assert_eq!(raw.reply().await, (0, 9));
    assert_eq!(raw.read(4096, data.len() as u32).await.unwrap(), data);
    assert_eq!(raw.read(size - 3, 3).await.unwrap(), b"end");
    assert_eq!(raw.call(proto::CMD_WRITE_ZEROES, proto::CMD_FLAG_NO_HOLE | proto::CMD_FLAG_FUA, 4096, 100).await, 0);
    assert_eq!(raw.call(proto::CMD_TRIM, proto::CMD_FLAG_FUA, 8192, 4096).await, 0);
    assert_eq!(raw.call(proto::CMD_FLUSH, 0, 0, 0).await, 0);
    let back = raw.read(4096, 8192).await.unwrap();
    assert!(back[..100].iter().all(|b| *b == 0));
    assert_eq!(&back[100..4096], &data[100..4096]);
    assert!(back[4096..].iter().all(|b| *b == 0));
    assert!(export.flushes.load(Ordering::Relaxed) >= 1);

    raw.request(proto::CMD_DISC, 0, 1, 0, 0, &[]).await;
    raw.expect_closed().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn raw_bad_magic_closes_only_that_connection() {
    let server = TestServer::single(TestMemExport::new(MIB)).await;
    let (mut broken, _, _) = Raw::go(&server.socket, "").await;
    let (mut healthy, _, _) = Raw::go(&server.socket, "").await;
    broken.stream.write_all(&[0xde; 28]).await.unwrap();
    broken.expect_closed().await;
    assert_eq!(healthy.write(0, b"still here").await, 0);
    let (mut fresh, _, _) = Raw::go(&server.socket, "").await;
    assert_eq!(fresh.read(0, 10).await.unwrap(), b"still here");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn raw_read_only_export_refuses_writes() {
    let export = TestMemExport::with_contents(vec![3; MIB as usize]);
    let server = TestServer::unix(NbdServer::single(export, ExportOptions::read_only())).await;
    let (mut raw, _, flags) = Raw::go(&server.socket, "").await;
    assert_ne!(flags & proto::FLAG_READ_ONLY, 0);
    assert_eq!(raw.write(0, b"x").await, proto::EPERM);
    assert_eq!(raw.call(proto::CMD_TRIM, 0, 0, 4096).await, proto::EPERM);
    assert_eq!(raw.call(proto::CMD_WRITE_ZEROES, 0, 0, 4096).await, proto::EPERM);
    assert_eq!(raw.call(proto::CMD_FLUSH, 0, 0, 0).await, 0);
    assert_eq!(raw.read(0, 4).await.unwrap(), [3, 3, 3, 3]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn raw_pipelined_requests_complete_out_of_order() {
    // Offsets below 4096 take 300 ms; the rest is immediate.
    let export = TestMemExport::slow(MIB, 4096, Duration::from_millis(300));
    let server = TestServer::single(export).await;
    let (mut raw, _, _) = Raw::go(&server.socket, "").await;
    raw.request(proto::CMD_READ, 0, 1, 0, 512, &[]).await;
    raw.request(proto::CMD_WRITE, 0, 2, 8192, 4, b"fast").await;
    raw.request(proto::CMD_READ, 0, 3, 8192, 4, &[]).await;
    // Replies for 2 and 3 overtake the slow read 1 (3 runs after 2 was read,
    // but both only need the reader; allow either order between them).
    let mut order = Vec::new();
    for _ in 0..3 {
        let (error, handle) = raw.reply().await;
        assert_eq!(error, 0);
        match handle {
            1 => assert_eq!(raw.data(512).await, vec![0; 512]),
            3 => {
                raw.data(4).await;
            }
            _ => {}
        }
        order.push(handle);
    }
    assert_eq!(*order.last().unwrap(), 1, "slow read should finish last: {order:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn graceful_shutdown_answers_in_flight_requests() {
    let export = TestMemExport::slow(MIB, MIB, Duration::from_millis(400));
    let server = TestServer::single(export.clone()).await;
    let (mut raw, _, _) = Raw::go(&server.socket, "").await;
    for handle in 0..8u64 {
        raw.request(proto::CMD_WRITE, 0, handle, handle * 4096, 4, b"done").await;
    }
    // Let the server read them all, then stop it while they are in flight.
    tokio::time::sleep(Duration::from_millis(100)).await;
    let socket = server.socket.clone();
    let stop = tokio::spawn(server.stop());
    let mut handles = Vec::new();
    for _ in 0..8 {
        let (error, handle) = raw.reply().await;
        assert_eq!(error, 0);
        handles.push(handle);
    }
    handles.sort();
    assert_eq!(handles, (0..8).collect::<Vec<_>>());
    raw.expect_closed().await;
    stop.await.unwrap().unwrap();
    assert!(!socket.exists(), "socket file left behind");
    let data = export.snapshot();
    for handle in 0..8 {
        assert_eq!(&data[handle * 4096..handle * 4096 + 4], b"done");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn disconnect_answers_in_flight_requests_first() {
    let export = TestMemExport::slow(MIB, MIB, Duration::from_millis(300));
    let server = TestServer::single(export.clone()).await;
    let (mut raw, _, _) = Raw::go(&server.socket, "").await;
    raw.request(proto::CMD_WRITE, 0, 1, 0, 3, b"one").await;
    raw.request(proto::CMD_FLUSH, 0, 2, 0, 0, &[]).await;
    raw.request(proto::CMD_DISC, 0, 3, 0, 0, &[]).await;
    let mut handles = vec![raw.reply().await.1, raw.reply().await.1];
    handles.sort();
    assert_eq!(handles, [1, 2]);
    raw.expect_closed().await;
    assert_eq!(&export.snapshot()[..3], b"one");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn serve_transmission_skips_the_handshake() {
    // The kernel path: the server gets one end of a socketpair and the
    // other end speaks transmission requests straight away.
    let export = TestMemExport::new(MIB);
    let server = NbdServer::single(export.clone(), ExportOptions::default());
    let info = server.export_info("").unwrap();
    assert_eq!(info.size, MIB);
    assert_ne!(info.transmission_flags & proto::FLAG_CAN_MULTI_CONN, 0);
    let (ours, theirs) = UnixStream::pair().unwrap();
    let task = tokio::spawn({
        let server = server.clone();
        async move { server.serve_transmission(theirs, bytes::Bytes::new(), "").await.map(drop) }
    });
    let mut raw = Raw { stream: ours };
    assert_eq!(raw.write(100, b"kernel").await, 0);
    assert_eq!(raw.read(100, 6).await.unwrap(), b"kernel");
    raw.request(proto::CMD_DISC, 0, 0, 0, 0, &[]).await;
    raw.expect_closed().await;
    task.await.unwrap().unwrap();
    assert!(matches!(
        server.serve_transmission(UnixStream::pair().unwrap().0, bytes::Bytes::new(), "nope").await,
        Err(NbdError::UnknownExport(_))
    ));
}
