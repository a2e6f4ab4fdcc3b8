//! Identity service and the socket, against the real binary.

mod common;

use std::path::Path;
use std::time::Duration;

use ballast_proto::csi;
use ballast_proto::csi::plugin_capability::{service, volume_expansion, Type};
use common::*;

fn http_get(addr: &str, path: &str) -> String {
    use std::io::{Read, Write};
    let mut stream = std::net::TcpStream::connect(addr).unwrap();
    write!(stream, "GET {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n\r\n").unwrap();
    let mut body = String::new();
    stream.read_to_string(&mut body).unwrap();
    body
}

fn services(caps: &csi::GetPluginCapabilitiesResponse) -> Vec<service::Type> {
    caps.capabilities
        .iter()
        .filter_map(|c| match &c.r#type {
            Some(Type::Service(s)) => Some(s.r#type()),
            _ => None,
        })
        .collect()
}

fn expansion(caps: &csi::GetPluginCapabilitiesResponse) -> Vec<volume_expansion::Type> {
    caps.capabilities
        .iter()
        .filter_map(|c| match &c.r#type {
            Some(Type::VolumeExpansion(e)) => Some(e.r#type()),
            _ => None,
        })
        .collect()
}

#[tokio::test]
async fn controller_identity_reports_name_capabilities_and_real_readiness() {
    let metrics_addr = format!("127.0.0.1:{}", ballast_cli::dev::free_ports(1)[0]);
    let mut h = Harness::start(&[
        "--mode",
        "controller",
        "--topology",
        "topology.ballast.io/cluster=test",
        "--metrics-addr",
        &metrics_addr,
    ])
    .await;
    let mut identity = h.plugin.identity().await;

    let info = identity.get_plugin_info(csi::GetPluginInfoRequest {}).await.unwrap().into_inner();
    assert_eq!(info.name, "csi.ballast.io");
    assert_eq!(info.vendor_version, env!("CARGO_PKG_VERSION"));

    let caps = identity.get_plugin_capabilities(csi::GetPluginCapabilitiesRequest {}).await.unwrap().into_inner();
    assert_eq!(
        services(&caps),
        vec![
            service::Type::ControllerService,
            service::Type::GroupControllerService,
            service::Type::VolumeAccessibilityConstraints
        ]
    );
    assert_eq!(expansion(&caps), vec![volume_expansion::Type::Online]);

    let probe = identity.probe(csi::ProbeRequest {}).await.unwrap().into_inner();
    assert_eq!(probe.ready, Some(true));
    // The liveness probe's endpoint asks the same over the socket.
    let health = http_get(&metrics_addr, "/healthz");
    assert!(health.starts_with("HTTP/1.1 200"), "{health}");

    // Calls are counted by RPC and code, and timed.
    let mut c = h.plugin.controller().await;
    let _ = c.delete_volume(csi::DeleteVolumeRequest::default()).await;
    let metrics = http_get(&metrics_addr, "/metrics");
    assert!(metrics.contains(r#"ballast_csi_operations_total{code="OK",rpc="GetPluginInfo"} 1"#), "{metrics}");
    assert!(
        metrics.contains(r#"ballast_csi_operations_total{code="InvalidArgument",rpc="DeleteVolume"} 1"#),
        "{metrics}"
    );
    assert!(metrics.contains("ballast_csi_operation_duration_seconds_bucket"), "{metrics}");

    // Without a metadata quorum the controller cannot serve: not ready,
    // and the answer comes within the probe's short deadline.
    for member in [1, 2, 3] {
        h.cluster.kill_member(member);
    }
    let started = std::time::Instant::now();
    let probe = identity.probe(csi::ProbeRequest {}).await.unwrap().into_inner();
    assert_eq!(probe.ready, Some(false));
    assert!(started.elapsed() < Duration::from_secs(5), "probe took {:?}", started.elapsed());
    let health = http_get(&metrics_addr, "/healthz");
    assert!(health.starts_with("HTTP/1.1 503"), "{health}");
    assert!(health.contains("not ready"), "{health}");

    // SIGTERM: a clean exit, and the socket file is gone.
    let status = h.plugin.stop();
    assert!(status.success(), "{status}");
    assert!(!h.plugin.socket.exists());
}

#[tokio::test]
async fn node_identity_needs_the_attach_tool() {
    let dir = tempfile::tempdir().unwrap();
    let missing = dir.path().join("no-such-nbd-client");
    let missing = missing.to_str().unwrap();
    // No metadata service needed to answer identity calls.
    let plugin = Plugin::start(
        dir.path(),
        "node",
        "127.0.0.1:1",
        &["--mode", "node", "--node-id", "n1", "--nbd-client-bin", missing],
        &[],
    )
    .await;
    let mut identity = plugin.identity().await;
    let caps = identity.get_plugin_capabilities(csi::GetPluginCapabilitiesRequest {}).await.unwrap().into_inner();
    assert_eq!(
        services(&caps),
        vec![service::Type::ControllerService, service::Type::GroupControllerService],
        "the driver's capabilities, whichever part of it answers"
    );
    assert_eq!(expansion(&caps), vec![volume_expansion::Type::Online]);
    assert_eq!(code(identity.probe(csi::ProbeRequest {}).await), tonic::Code::FailedPrecondition);

    let fake = dir.path().join("nbd-client");
    std::fs::write(&fake, "#!/bin/sh\necho '[]'\n").unwrap();
    std::fs::set_permissions(&fake, std::os::unix::fs::PermissionsExt::from_mode(0o755)).unwrap();
    let plugin = Plugin::start(
        dir.path(),
        "node2",
        "127.0.0.1:1",
        &["--mode", "node", "--node-id", "n1", "--nbd-client-bin", fake.to_str().unwrap()],
        &[],
    )
    .await;
    let probe = plugin.identity().await.probe(csi::ProbeRequest {}).await.unwrap().into_inner();
    assert_eq!(probe.ready, Some(true));
}

#[tokio::test]
async fn a_stale_socket_is_replaced_and_a_live_one_refused() {
    let dir = tempfile::tempdir().unwrap();
    let fake = dir.path().join("nbd-client");
    std::fs::write(&fake, "#!/bin/sh\necho '[]'\n").unwrap();
    std::fs::set_permissions(&fake, std::os::unix::fs::PermissionsExt::from_mode(0o755)).unwrap();
    let args = ["--mode", "node", "--node-id", "n1", "--nbd-client-bin", fake.to_str().unwrap()];

    // A socket file nobody listens on, as a killed plugin leaves behind.
    let socket = dir.path().join("csi.sock");
    drop(std::os::unix::net::UnixListener::bind(&socket).unwrap());
    assert!(socket.exists());
    let mut first = Plugin::start(dir.path(), "csi", "127.0.0.1:1", &args, &[]).await;
    first.identity().await.get_plugin_info(csi::GetPluginInfoRequest {}).await.unwrap();

    // A second plugin on the live socket must refuse, and leave it alone.
    let second = std::process::Command::new(PLUGIN)
        .args(["--endpoint", &format!("unix://{}", socket.display()), "--meta", "127.0.0.1:1"])
        .args(args)
        .output()
        .unwrap();
    assert!(!second.status.success());
    let stderr = String::from_utf8_lossy(&second.stderr);
    assert!(stderr.contains("is in use"), "{stderr}");
    assert!(socket.exists());
    first.identity().await.get_plugin_info(csi::GetPluginInfoRequest {}).await.unwrap();
    assert!(first.try_wait().is_none());

    // Something that is not a socket is never removed either.
    let file = dir.path().join("file.sock");
    std::fs::write(&file, "data").unwrap();
    let third = std::process::Command::new(PLUGIN)
        .args(["--endpoint", &format!("unix://{}", file.display()), "--meta", "127.0.0.1:1"])
        .args(args)
        .output()
        .unwrap();
    assert!(!third.status.success());
    assert_eq!(std::fs::read_to_string(&file).unwrap(), "data");
}

/// What the kubelet does with a plugin socket in its plugins_registry
/// directory: GetInfo, then NotifyRegistrationStatus.
#[tokio::test]
async fn the_node_plugin_registers_itself_with_the_kubelet() {
    use ballast_proto::pluginregistration::registration_client::RegistrationClient;
    use ballast_proto::pluginregistration::{InfoRequest, RegistrationStatus};

    let dir = tempfile::tempdir().unwrap();
    let registry = dir.path().join("plugins_registry");
    std::fs::create_dir(&registry).unwrap();
    let nbd_client = std::path::Path::new(PLUGIN).with_file_name("nbd-client");
    let mut plugin = Plugin::start(
        dir.path(),
        "node",
        "127.0.0.1:1",
        &[
            "--mode",
            "node",
            "--node-id",
            "n1",
            "--nbd-client-bin",
            nbd_client.to_str().unwrap(),
            "--registration-dir",
            registry.to_str().unwrap(),
            "--kubelet-registration-path",
            "/var/lib/kubelet/plugins/csi.ballast.io/csi.sock",
        ],
        &[],
    )
    .await;
    let socket = registry.join("csi.ballast.io-reg.sock");
    let mut kubelet = RegistrationClient::new(connect(&socket).await);
    let info = kubelet.get_info(InfoRequest {}).await.unwrap().into_inner();
    assert_eq!(info.r#type, "CSIPlugin");
    assert_eq!(info.name, "csi.ballast.io");
    assert_eq!(info.endpoint, "/var/lib/kubelet/plugins/csi.ballast.io/csi.sock");
    assert_eq!(info.supported_versions, vec!["1.0.0".to_string()]);

    let refusal = RegistrationStatus { plugin_registered: false, error: "driver name taken".into() };
    kubelet.notify_registration_status(refusal).await.unwrap();
    assert!(plugin.log_text().contains("driver name taken"), "{}", plugin.log_text());

    // Stopping removes the registration socket: the kubelet then
    // unregisters the driver instead of dialing a dead socket.
    assert!(plugin.stop().success());
    assert!(!socket.exists());
}

#[tokio::test]
async fn registration_needs_the_kubelets_directory() {
    let dir = tempfile::tempdir().unwrap();
    let missing = dir.path().join("no-plugins-registry");
    let output = std::process::Command::new(PLUGIN)
        .args(["--mode", "node", "--node-id", "n1", "--meta", "127.0.0.1:1", "--endpoint"])
        .arg(format!("unix://{}", dir.path().join("csi.sock").display()))
        .arg("--registration-dir")
        .arg(&missing)
        .output()
        .unwrap();
    assert!(!output.status.success());
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(stderr.contains("plugins_registry"), "{stderr}");
}

/// The CSI socket belongs to the plugin's user alone (0600), whatever umask
/// the plugin was started with: another user on the node cannot call it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_csi_socket_is_closed_to_other_users() {
    use std::os::unix::fs::PermissionsExt;
    use std::os::unix::process::CommandExt;
    if !ballast_testkit::machine_has(&[ballast_testkit::ROOT, "python3"]) {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    // Traversable by anyone: only the socket's own mode may keep them out.
    std::fs::set_permissions(dir.path(), std::fs::Permissions::from_mode(0o755)).unwrap();
    let socket = dir.path().join("csi.sock");
    let endpoint = format!("unix://{}", socket.display());
    let mut plugin = std::process::Command::new("sh")
        .args(["-c", "umask 000 && exec \"$@\"", "sh", PLUGIN, "--mode", "controller"])
        .args(["--endpoint", &endpoint, "--meta", "127.0.0.1:1"])
        .stderr(std::process::Stdio::null())
        .spawn()
        .unwrap();
    let deadline = std::time::Instant::now() + Duration::from_secs(20);
    while !socket.exists() {
        assert!(std::time::Instant::now() < deadline, "no socket at {}", socket.display());
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let mode = std::fs::metadata(&socket).unwrap().permissions().mode() & 0o777;
    let as_nobody = std::process::Command::new("python3")
        .args(["-c", "import socket, sys; socket.socket(socket.AF_UNIX).connect(sys.argv[1])"])
        .arg(&socket)
        .uid(65534)
        .gid(65534)
        .output()
        .unwrap();
    let _ = plugin.kill();
    let _ = plugin.wait();
    assert!(!as_nobody.status.success(), "user nobody connected to the CSI socket (mode {mode:o})");
    assert!(String::from_utf8_lossy(&as_nobody.stderr).contains("Permission denied"), "{as_nobody:?}");
    assert_eq!(mode, 0o600, "socket mode {mode:o}");
}

/// gRPC C-core clients (Python's grpcio, and the tools built on it) send
/// the socket path as the HTTP/2 :authority, which the HTTP/2 server under
/// tonic refuses as malformed: such a client must get its answer anyway.
#[tokio::test]
async fn a_grpc_c_core_client_is_answered_on_the_socket() {
    let python = concat!(env!("CARGO_MANIFEST_DIR"), "/../.cache/python/bin/python");
    if !ballast_testkit::machine_has(&[python]) {
        return;
    }
    let h = Harness::start(&["--mode", "controller"]).await;
    let script = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/grpc_c_core_client.py");
    let socket = h.plugin.socket.clone();
    let output =
        tokio::task::spawn_blocking(move || std::process::Command::new(python).arg(script).arg(socket).output())
            .await
            .unwrap()
            .unwrap();
    assert!(output.status.success(), "grpcio: {}", String::from_utf8_lossy(&output.stderr));
    assert_eq!(String::from_utf8_lossy(&output.stdout).trim(), "csi.ballast.io");
}

/// At start the node plugin says, in its log and its metrics, which kernel
/// features work and how volumes will attach: a fallback is never silent.
#[tokio::test]
async fn the_node_plugin_reports_what_its_kernel_offers() {
    let nbd_client = Path::new(PLUGIN).with_file_name("nbd-client");
    if !nbd_client.exists() || !ballast_testkit::machine_has(&[ballast_testkit::ROOT]) {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let metrics_addr = format!("127.0.0.1:{}", ballast_cli::dev::free_ports(1)[0]);
    let args = ["--mode", "node", "--node-id", "n1", "--metrics-addr", &metrics_addr, "--nbd-client-bin"];
    let mut args: Vec<&str> = args.to_vec();
    args.push(nbd_client.to_str().unwrap());
    let plugin = Plugin::start(dir.path(), "node", "127.0.0.1:1", &args, &[]).await;

    let deadline = std::time::Instant::now() + Duration::from_secs(30);
    let metrics = loop {
        let metrics = http_get(&metrics_addr, "/metrics");
        if metrics.contains("ballast_csi_node_kernel_feature") {
            break metrics;
        }
        assert!(std::time::Instant::now() < deadline, "no kernel features reported:\n{metrics}");
        tokio::time::sleep(Duration::from_millis(200)).await;
    };
    let nbd_loaded = Path::new("/sys/module/nbd").exists();
    let fuse_opens = std::fs::OpenOptions::new().read(true).write(true).open("/dev/fuse").is_ok();
    for (feature, works) in [("nbd", nbd_loaded), ("fuse", fuse_opens)] {
        let line = format!("ballast_csi_node_kernel_feature{{feature=\"{feature}\"}} {}", u8::from(works));
        assert!(metrics.contains(&line), "{line} missing:\n{metrics}");
    }
    assert!(metrics.contains(r#"ballast_csi_node_kernel_feature{feature="io_uring"}"#), "{metrics}");
    let method = if nbd_loaded { "netlink" } else { "fuse-loop" };
    assert!(metrics.contains(&format!("ballast_csi_node_attach_method{{method=\"{method}\"}} 1")), "{metrics}");
    let log = plugin.log_text();
    if !nbd_loaded {
        assert!(log.contains("kernel feature unavailable on this node") && log.contains("modprobe"), "{log}");
        assert!(log.contains("volumes attach through fuse-loop"), "{log}");
    }
}
