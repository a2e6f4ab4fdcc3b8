//! `loadgen`: a checksummed write-and-verify load for the VM tests.
//!
//! Standard library only, built with plain `rustc` by `tests/vm/run.sh`
//! (it is not a workspace member). It rewrites blocks of one file with
//! O_DIRECT, each block carrying its index, a generation and a checksum,
//! reads every block back after writing it, re-reads a random earlier block
//! now and then, fdatasyncs every few writes and, at the end, verifies the
//! whole file. Every operation's latency is measured, so the longest I/O
//! pause during a restart is the longest operation.
//!
//! ```text
//! loadgen --file /mnt/load.dat [--size-mib 16] [--bs-kib 64] [--sync-every 8]
//!         [--duration 120] [--stop-file /tmp/stop] [--min-secs 0] [--slow-ms 200]
//! ```
//!
//! Stops at the first of: `--duration` seconds, or `--stop-file` existing
//! (but not before `--min-secs`). Prints `LOADGEN key=value ...` as its last
//! line; exits 1 when any I/O failed or any block read back wrong.

// `is_multiple_of` is newer than the workspace's minimum Rust (1.85).
#![allow(unknown_lints, clippy::manual_is_multiple_of)]

use std::alloc::{alloc_zeroed, dealloc, Layout};
use std::fs::{File, OpenOptions};
use std::io;
use std::os::unix::fs::{FileExt, OpenOptionsExt};
use std::path::PathBuf;
use std::time::{Duration, Instant};

const O_DIRECT: i32 = 0o40000;
const MAGIC: u64 = 0x4241_4c4c_4153_5400; // "BALLAST\0"
const HEADER: usize = 32;

struct Options {
    file: PathBuf,
    size_mib: u64,
    bs: usize,
    sync_every: u64,
    duration: Duration,
    stop_file: Option<PathBuf>,
    min_secs: Duration,
    slow: Duration,
}

fn usage() -> ! {
    eprintln!(
        "usage: loadgen --file PATH [--size-mib N] [--bs-kib N] [--sync-every N] [--duration S] \
         [--stop-file PATH] [--min-secs S] [--slow-ms MS]"
    );
    std::process::exit(2)
}

fn parse() -> Options {
    let mut o = Options {
        file: PathBuf::new(),
        size_mib: 16,
        bs: 64 * 1024,
        sync_every: 8,
        duration: Duration::from_secs(120),
        stop_file: None,
        min_secs: Duration::ZERO,
        slow: Duration::from_millis(200),
    };
    let mut args = std::env::args().skip(1);
    while let Some(flag) = args.next() {
        let mut value = || args.next().unwrap_or_else(|| usage());
        let mut num = || value().parse::<u64>().unwrap_or_else(|_| usage());
        match flag.as_str() {
            "--file" => o.file = PathBuf::from(value()),
            "--size-mib" => o.size_mib = num(),
            "--bs-kib" => o.bs = num() as usize * 1024,
            "--sync-every" => o.sync_every = num(),
            "--duration" => o.duration = Duration::from_secs(num()),
            "--stop-file" => o.stop_file = Some(PathBuf::from(value())),
            "--min-secs" => o.min_secs = Duration::from_secs(num()),
            "--slow-ms" => o.slow = Duration::from_millis(num()),
            _ => usage(),
        }
    }
    if o.file.as_os_str().is_empty() || o.bs == 0 || o.bs % 4096 != 0 || o.size_mib == 0 {
        usage();
    }
    o
}

/// A 4 KiB-aligned buffer, as O_DIRECT needs.
struct Buf {
    ptr: *mut u8,
    layout: Layout,
}

impl Buf {
    fn new(len: usize) -> Buf {
        let layout = Layout::from_size_align(len, 4096).expect("layout");
        // SAFETY: non-zero size, valid alignment; checked for null.
        let ptr = unsafe { alloc_zeroed(layout) };
        assert!(!ptr.is_null(), "out of memory");
        Buf { ptr, layout }
    }
    fn bytes(&mut self) -> &mut [u8] {
        // SAFETY: ptr points at layout.size() initialised bytes owned by self.
        unsafe { std::slice::from_raw_parts_mut(self.ptr, self.layout.size()) }
    }
}

impl Drop for Buf {
    fn drop(&mut self) {
        // SAFETY: allocated in new() with this layout.
        unsafe { dealloc(self.ptr, self.layout) }
    }
}

fn splitmix(state: &mut u64) -> u64 {
    *state = state.wrapping_add(0x9e37_79b9_7f4a_7c15);
    let mut z = *state;
    z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    z ^ (z >> 31)
}

/// FNV-1a over the payload: cheap and enough to catch torn or stale blocks.
fn checksum(data: &[u8]) -> u64 {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for b in data {
        h ^= u64::from(*b);
        h = h.wrapping_mul(0x0100_0000_01b3);
    }
    h
}

fn fill(buf: &mut [u8], seed: u64, block: u64, generation: u64) {
    let mut state = seed ^ block.wrapping_mul(0x1000_0000_01b3) ^ generation.rotate_left(32);
    for word in buf[HEADER..].chunks_exact_mut(8) {
        word.copy_from_slice(&splitmix(&mut state).to_le_bytes());
    }
    let sum = checksum(&buf[HEADER..]);
    buf[0..8].copy_from_slice(&MAGIC.to_le_bytes());
    buf[8..16].copy_from_slice(&block.to_le_bytes());
    buf[16..24].copy_from_slice(&generation.to_le_bytes());
    buf[24..32].copy_from_slice(&sum.to_le_bytes());
}

/// Checks a block read back: `None` if it is what `generation` wrote, else why not.
fn check(buf: &[u8], block: u64, generation: u64) -> Option<String> {
    let word = |i: usize| u64::from_le_bytes(buf[i..i + 8].try_into().expect("8 bytes"));
    if word(0) != MAGIC {
        return Some(format!("bad magic {:#x}", word(0)));
    }
    if word(8) != block || word(16) != generation {
        return Some(format!(
            "holds block {} generation {}, expected {block} generation {generation}",
            word(8),
            word(16)
        ));
    }
    if word(24) != checksum(&buf[HEADER..]) {
        return Some("checksum mismatch (torn or corrupted block)".into());
    }
    None
}

fn uptime() -> f64 {
    std::fs::read_to_string("/proc/uptime")
        .ok()
        .and_then(|s| s.split_whitespace().next().and_then(|f| f.parse().ok()))
        .unwrap_or(0.0)
}

struct Stats {
    start: Instant,
    start_uptime: f64,
    ops: u64,
    writes: u64,
    reads: u64,
    syncs: u64,
    errors: u64,
    slow: Duration,
    /// Longest operations: (latency, uptime when it started, what).
    longest: Vec<(Duration, f64, &'static str)>,
}

impl Stats {
    fn at(&self, t: Instant) -> f64 {
        self.start_uptime + t.duration_since(self.start).as_secs_f64()
    }

    fn record(&mut self, what: &'static str, began: Instant, result: &io::Result<()>) {
        let took = began.elapsed();
        self.ops += 1;
        match what {
            "write" => self.writes += 1,
            "read" | "verify" => self.reads += 1,
            _ => self.syncs += 1,
        }
        if let Err(e) = result {
            self.errors += 1;
            println!("ERROR {what} at t={:.3}: {e}", self.at(began));
        }
        if took >= self.slow {
            println!("slow {what}: {:.3} s at t={:.3}", took.as_secs_f64(), self.at(began));
        }
        self.longest.push((took, self.at(began), what));
        self.longest.sort_by_key(|l| std::cmp::Reverse(l.0));
        self.longest.truncate(3);
    }

    fn mismatch(&mut self, block: u64, why: String) {
        self.errors += 1;
        println!("ERROR verify block {block}: {why}");
    }
}

fn main() {
    let o = parse();
    let file: File = OpenOptions::new()
        .read(true)
        .write(true)
        .create(true)
        .truncate(false)
        .custom_flags(O_DIRECT)
        .open(&o.file)
        .unwrap_or_else(|e| {
            eprintln!("loadgen: opening {}: {e}", o.file.display());
            std::process::exit(1)
        });
    let blocks = o.size_mib * 1024 * 1024 / o.bs as u64;
    let seed = std::process::id() as u64 ^ (uptime() * 1000.0) as u64;
    let mut rng = seed;
    let mut generations = vec![0u64; blocks as usize];
    let mut wbuf = Buf::new(o.bs);
    let mut rbuf = Buf::new(o.bs);
    let mut st = Stats {
        start: Instant::now(),
        start_uptime: uptime(),
        ops: 0,
        writes: 0,
        reads: 0,
        syncs: 0,
        errors: 0,
        slow: o.slow,
        longest: Vec::new(),
    };
    println!(
        "loadgen: {} blocks of {} KiB in {}, start t={:.3}",
        blocks,
        o.bs / 1024,
        o.file.display(),
        st.start_uptime
    );
    let mut last_report = Instant::now();
    let mut next = 0u64;
    let mut stop_reason = "duration";
    loop {
        let elapsed = st.start.elapsed();
        if elapsed >= o.duration {
            break;
        }
        if elapsed >= o.min_secs && o.stop_file.as_ref().is_some_and(|p| p.exists()) {
            stop_reason = "stop-file";
            break;
        }
        if st.errors > 100 {
            stop_reason = "too many errors";
            break;
        }
        // The first pass writes every block in order, then blocks are random.
        let block = if next < blocks { next } else { splitmix(&mut rng) % blocks };
        next += 1;
        let generation = generations[block as usize] + 1;
        let offset = block * o.bs as u64;
        fill(wbuf.bytes(), seed, block, generation);
        let began = Instant::now();
        let result = file.write_all_at(wbuf.bytes(), offset);
        st.record("write", began, &result);
        if result.is_ok() {
            generations[block as usize] = generation;
        }
        let began = Instant::now();
        let result = file.read_exact_at(rbuf.bytes(), offset);
        st.record("read", began, &result);
        if result.is_ok() && generations[block as usize] == generation {
            if let Some(why) = check(rbuf.bytes(), block, generation) {
                st.mismatch(block, why);
            }
        }
        if o.sync_every > 0 && next % o.sync_every == 0 {
            let began = Instant::now();
            let result = file.sync_data();
            st.record("fdatasync", began, &result);
        }
        // Now and then re-read an earlier block: a lost or misplaced write shows here.
        if next % 4 == 0 && next > 1 {
            let other = splitmix(&mut rng) % next.min(blocks);
            let expected = generations[other as usize];
            if expected > 0 {
                let began = Instant::now();
                let result = file.read_exact_at(rbuf.bytes(), other * o.bs as u64);
                st.record("verify", began, &result);
                if result.is_ok() {
                    if let Some(why) = check(rbuf.bytes(), other, expected) {
                        st.mismatch(other, why);
                    }
                }
            }
        }
        if last_report.elapsed() >= Duration::from_secs(5) {
            last_report = Instant::now();
            println!(
                "progress t={:.1} ops={} errors={} max_op_ms={}",
                st.at(last_report),
                st.ops,
                st.errors,
                st.longest.first().map_or(0, |l| l.0.as_millis())
            );
        }
    }
    let began = Instant::now();
    let result = file.sync_data();
    st.record("fdatasync", began, &result);
    // Final pass: every block holds its last generation.
    let mut verified = 0u64;
    for block in 0..blocks {
        let expected = generations[block as usize];
        if expected == 0 {
            continue;
        }
        let began = Instant::now();
        let result = file.read_exact_at(rbuf.bytes(), block * o.bs as u64);
        st.record("verify", began, &result);
        if result.is_ok() {
            verified += 1;
            if let Some(why) = check(rbuf.bytes(), block, expected) {
                st.mismatch(block, why);
            }
        }
    }
    let longest: Vec<String> =
        st.longest.iter().map(|(d, t, what)| format!("{}ms@{t:.3}({what})", d.as_millis())).collect();
    println!(
        "LOADGEN ops={} writes={} reads={} syncs={} errors={} verified_blocks={} max_op_ms={} longest={} \
         secs={:.1} stop={}",
        st.ops,
        st.writes,
        st.reads,
        st.syncs,
        st.errors,
        verified,
        st.longest.first().map_or(0, |l| l.0.as_millis()),
        longest.join(","),
        st.start.elapsed().as_secs_f64(),
        stop_reason
    );
    std::process::exit(if st.errors == 0 { 0 } else { 1 });
}
