//! Load generator for one chunk server: 1 MiB sequential writes (which also
//! fill the data set), then 4 KiB random writes and reads at queue depth 1
//! and 32, over one pipelined connection.
//!
//! ```text
//! cargo run --release -p storage-server --example loadgen -- --addr 127.0.0.1:7400 --size 1GiB --seconds 10
//! ```

use std::sync::Arc;
use std::time::{Duration, Instant};

use ballast_proto::frame::{block_checksums, ChunkAt, DataClient};
use ballast_proto::size::parse_size;
use bytes::Bytes;
use clap::Parser;
use rand::{Rng, RngCore, SeedableRng};
use tokio::sync::Mutex;

#[derive(Parser)]
struct Args {
    /// Server endpoint: host:port or unix:/path.
    #[arg(long, default_value = "127.0.0.1:7400")]
    addr: String,
    /// Bytes of data set (spread over chunks of --chunk-size).
    #[arg(long, value_parser = parse_size, default_value = "1GiB")]
    size: u64,
    #[arg(long, value_parser = parse_size, default_value = "64MiB")]
    chunk_size: u64,
    /// Seconds per random-I/O phase.
    #[arg(long, default_value_t = 10)]
    seconds: u64,
    /// Queue depth of the sequential write phase.
    #[arg(long, default_value_t = 8)]
    seq_depth: usize,
    /// Volume id used for the test chunks (deleted at the end).
    #[arg(long, default_value_t = 0xb0a7_10ad)]
    volume: u64,
    /// Pid of the server (on this machine), to report its CPU time per operation.
    #[arg(long)]
    server_pid: Option<u32>,
}

/// CPU seconds (user + system) used so far by process `pid`.
fn cpu_seconds(pid: u32) -> Option<f64> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // Fields after the parenthesised command name; utime and stime are 14 and 15.
    let fields: Vec<&str> = stat.rsplit_once(')')?.1.split_whitespace().collect();
    let ticks: f64 = fields.get(11)?.parse::<f64>().ok()? + fields.get(12)?.parse::<f64>().ok()?;
    // SAFETY: sysconf has no preconditions.
    let hz = unsafe { libc::sysconf(libc::_SC_CLK_TCK) } as f64;
    Some(ticks / hz)
}

struct Phase {
    name: String,
    ops: u64,
    bytes: u64,
    elapsed: Duration,
    latencies_us: Vec<u32>,
    /// Server CPU seconds spent during the phase, when its pid is known.
    server_cpu: Option<f64>,
}

impl Phase {
    fn report(&mut self) {
        self.latencies_us.sort_unstable();
        let pct = |p: f64| {
            let i = ((self.latencies_us.len() as f64 - 1.0) * p).round() as usize;
            self.latencies_us.get(i).copied().unwrap_or(0)
        };
        let secs = self.elapsed.as_secs_f64();
        let cpu = self
            .server_cpu
            .map(|c| format!("   server cpu {:>5.1} us/op", c * 1e6 / self.ops.max(1) as f64))
            .unwrap_or_default();
        println!(
            "{:<24} {:>10.0} IOPS {:>9.1} MiB/s   p50 {:>6} us   p99 {:>6} us{cpu}",
            self.name,
            self.ops as f64 / secs,
            self.bytes as f64 / secs / (1 << 20) as f64,
            pct(0.5),
            pct(0.99)
        );
    }
}

#[derive(Clone, Copy, PartialEq)]
enum Kind {
    Ping,
    Read,
    Write,
}

/// `depth` workers issuing random 4 KiB I/O for `seconds`.
async fn random_io(client: &DataClient, args: &Args, kind: Kind, depth: usize) -> Phase {
    let chunks = args.size / args.chunk_size;
    let blocks = args.chunk_size / 4096;
    let deadline = Instant::now() + Duration::from_secs(args.seconds);
    let started = Instant::now();
    let results = Arc::new(Mutex::new(Vec::new()));
    let mut workers = Vec::new();
    for w in 0..depth {
        let client = client.clone();
        let results = results.clone();
        let volume = args.volume;
        workers.push(tokio::spawn(async move {
            let mut rng = rand::rngs::StdRng::seed_from_u64(w as u64 + 1);
            let mut buf = vec![0u8; 4096];
            let mut latencies = Vec::new();
            while Instant::now() < deadline {
                let chunk = rng.random_range(0..chunks);
                let offset = rng.random_range(0..blocks) * 4096;
                let t = Instant::now();
                match kind {
                    Kind::Write => {
                        rng.fill_bytes(&mut buf);
                        let crcs = block_checksums(&buf);
                        let data = Bytes::copy_from_slice(&buf);
                        client
                            .write(ChunkAt { volume, chunk, offset, epoch: 1, generation: 1 }, data, &crcs, false)
                            .await
                            .expect("write");
                    }
                    Kind::Read => {
                        client
                            .read(ChunkAt { volume, chunk, offset, epoch: 1, generation: 0 }, 4096)
                            .await
                            .expect("read");
                    }
                    Kind::Ping => client.ping().await.expect("ping"),
                }
                latencies.push(t.elapsed().as_micros() as u32);
            }
            results.lock().await.extend(latencies);
        }));
    }
    for w in workers {
        w.await.expect("worker");
    }
    let elapsed = started.elapsed();
    let latencies_us = std::mem::take(&mut *results.lock().await);
    let name = match kind {
        Kind::Ping => format!("ping qd{depth}"),
        Kind::Read => format!("4k randread qd{depth}"),
        Kind::Write => format!("4k randwrite qd{depth}"),
    };
    Phase {
        name,
        ops: latencies_us.len() as u64,
        bytes: if kind == Kind::Ping { 0 } else { latencies_us.len() as u64 * 4096 },
        elapsed,
        latencies_us,
        server_cpu: None,
    }
}

/// Writes the whole data set once in 1 MiB requests, `depth` at a time.
async fn sequential_write(client: &DataClient, args: &Args) -> Phase {
    const IO: u64 = 1 << 20;
    let per_chunk = args.chunk_size / IO;
    let total = args.size / args.chunk_size * per_chunk;
    let mut data = vec![0u8; IO as usize];
    rand::rngs::StdRng::seed_from_u64(7).fill_bytes(&mut data);
    let data = Bytes::from(data);
    let next = Arc::new(std::sync::atomic::AtomicU64::new(0));
    let started = Instant::now();
    let mut workers = Vec::new();
    for _ in 0..args.seq_depth {
        let (client, data, next) = (client.clone(), data.clone(), next.clone());
        let volume = args.volume;
        workers.push(tokio::spawn(async move {
            let mut latencies = Vec::new();
            loop {
                let i = next.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                if i >= total {
                    return latencies;
                }
                let t = Instant::now();
                let crcs = block_checksums(&data);
                client
                    .write(
                        ChunkAt { volume, chunk: i / per_chunk, offset: i % per_chunk * IO, epoch: 1, generation: 1 },
                        data.clone(),
                        &crcs,
                        false,
                    )
                    .await
                    .expect("write");
                latencies.push(t.elapsed().as_micros() as u32);
            }
        }));
    }
    let mut latencies_us = Vec::new();
    for w in workers {
        latencies_us.extend(w.await.expect("worker"));
    }
    Phase {
        name: format!("1M seq write qd{}", args.seq_depth),
        ops: total,
        bytes: total * IO,
        elapsed: started.elapsed(),
        latencies_us,
        server_cpu: None,
    }
}

#[tokio::main]
async fn main() {
    let args = Args::parse();
    let client = DataClient::connect(&args.addr).await.expect("connect");
    let chunks = args.size / args.chunk_size;
    for chunk in 0..chunks {
        client.create_chunk(args.volume, chunk, args.chunk_size as u32, 1).await.expect("create chunk");
    }
    println!("data set: {} chunks of {} MiB on {}", chunks, args.chunk_size >> 20, args.addr);
    let cpu = || args.server_pid.and_then(cpu_seconds);
    let mut phases = Vec::new();
    // The protocol's floor (round trips that touch no disk), then the
    // sequential write that also fills the data set for the reads.
    for (kind, depth) in
        [(Kind::Ping, 1), (Kind::Write, 0), (Kind::Write, 1), (Kind::Write, 32), (Kind::Read, 1), (Kind::Read, 32)]
    {
        let before = cpu();
        let mut phase = match depth {
            0 => sequential_write(&client, &args).await,
            _ => random_io(&client, &args, kind, depth).await,
        };
        phase.server_cpu = before.zip(cpu()).map(|(b, a)| a - b);
        phases.push(phase);
        if kind == Kind::Write {
            client.flush(Some(args.volume)).await.expect("flush");
        }
    }
    for phase in &mut phases {
        phase.report();
    }
    for chunk in 0..chunks {
        client.delete_chunk(args.volume, chunk, 0).await.expect("delete chunk");
    }
}
