//! The Prometheus endpoint serves the server's metrics. In a file of its
//! own: metrics are process-wide, so no other server may run beside it.

mod common;

use ballast_proto::frame::{ChunkAt, DataClient};
use common::{pattern, write, BLOCK};
use storage_server::BackendChoice;

const MIB: u64 = 1 << 20;

async fn scrape(addr: std::net::SocketAddr) -> String {
    tokio::task::spawn_blocking(move || ballast_testkit::metrics::scrape(&addr.to_string()).unwrap()).await.unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn metrics_are_served() {
    for (backend, active) in [(BackendChoice::Uring, "uring"), (BackendChoice::Threadpool, "threadpool")] {
        let dir = tempfile::tempdir().unwrap();
        let mut config = common::config(dir.path(), backend);
        config.metrics_addr = Some("127.0.0.1:0".parse().unwrap());
        let server = storage_server::start(config).await.unwrap();
        let c = DataClient::connect_tcp(server.tcp_addr().unwrap()).await.unwrap();
        c.create_chunk(1, 1, MIB as u32, 1).await.unwrap();
        write(&c, 1, 1, 0, pattern(1, 0, 1), 0, false).await.unwrap();
        c.read(ChunkAt { volume: 1, chunk: 1, offset: 0, epoch: 1, generation: 0 }, BLOCK as u32).await.unwrap();
        c.pause_volume(1, std::time::Duration::from_secs(10)).await.unwrap();
        c.clone_chunk(1, 1, 2, 1, 1).await.unwrap();
        c.resume_volume(1).await.unwrap();
        let body = scrape(server.metrics_addr().unwrap()).await;
        for name in [
            "ballast_storage_requests_total{op=\"write\",status=\"ok\"}",
            "ballast_storage_request_duration_seconds_bucket{op=\"read\"",
            "ballast_storage_written_bytes_total",
            "ballast_storage_read_bytes_total",
            "ballast_storage_checksum_errors_total",
            "ballast_storage_dirty_regions 1",
            "ballast_storage_chunks 2",
            "ballast_storage_requests_total{op=\"chunk_clone\",status=\"ok\"}",
            "ballast_storage_requests_total{op=\"volume_pause\",status=\"ok\"}",
            "ballast_storage_requests_total{op=\"volume_resume\",status=\"ok\"}",
            "ballast_storage_volume_pauses_total",
            "ballast_storage_volume_resumes_total{reason=\"request\"}",
            "ballast_storage_volume_resumes_total{reason=\"timeout\"} 0",
            "ballast_storage_paused_volumes 0",
            "ballast_storage_chunk_clones_total",
        ] {
            assert!(body.contains(name), "{name} missing from metrics:\n{body}");
        }
        assert!(body.contains(&format!("ballast_storage_io_backend{{backend=\"{active}\"}} 1")), "{body}");
        server.shutdown().await.unwrap();
    }
}
