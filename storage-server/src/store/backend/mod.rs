//! The disk I/O interface of the chunk store and its two implementations:
//! io_uring ([`uring`]) and a thread pool doing pread/pwrite ([`threadpool`]).
//!
//! io_uring is preferred; containers whose seccomp profile blocks it and old
//! kernels get the thread pool. [`select`] probes at startup.

pub mod threadpool;
pub mod uring;

use std::fmt;
use std::future::Future;
use std::io;
use std::path::Path;
use std::pin::Pin;
use std::sync::Arc;

use bytes::Bytes;

use super::buf::{AlignedBuf, BufPool, ALIGN};

/// A boxed I/O future (backends differ in how they run).
pub type IoFuture<T> = Pin<Box<dyn Future<Output = io::Result<T>> + Send + 'static>>;

/// `fallocate(2)` mode: deallocate, keep the file size (reads return zeros).
pub const PUNCH_HOLE: i32 = libc::FALLOC_FL_PUNCH_HOLE | libc::FALLOC_FL_KEEP_SIZE;
/// `fallocate(2)` mode: zero, keep the blocks allocated and the file size.
pub const ZERO_RANGE: i32 = libc::FALLOC_FL_ZERO_RANGE | libc::FALLOC_FL_KEEP_SIZE;

/// Which backend runs the disk I/O.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum BackendKind {
    Uring,
    ThreadPool,
}

impl BackendKind {
    pub fn name(self) -> &'static str {
        match self {
            BackendKind::Uring => "uring",
            BackendKind::ThreadPool => "threadpool",
        }
    }
}

impl fmt::Display for BackendKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

/// The `--io-backend` choice.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, clap::ValueEnum)]
pub enum BackendChoice {
    /// io_uring when it works here, otherwise the thread pool.
    #[default]
    Auto,
    Uring,
    Threadpool,
}

/// Opens files for I/O through one backend.
pub trait IoBackend: Send + Sync + 'static {
    fn kind(&self) -> BackendKind;
    /// Takes over an open file (opened with O_DIRECT where possible).
    fn open(&self, file: std::fs::File) -> Arc<dyn IoFile>;
}

/// True when `data` may be handed to O_DIRECT I/O as it is.
pub fn aligned(data: &[u8]) -> bool {
    (data.as_ptr() as usize).is_multiple_of(ALIGN) && data.len().is_multiple_of(512)
}

/// Positional I/O on one file. Reads and writes transfer the whole buffer
/// or fail (a short read is `UnexpectedEof`).
pub trait IoFile: Send + Sync {
    fn read_at(&self, buf: AlignedBuf, offset: u64) -> IoFuture<AlignedBuf>;
    /// Writes `data`, which must start at a 4 KiB-aligned address ([`aligned`]):
    /// an [`AlignedBuf`] turned into `Bytes`, or a slice of one.
    fn write_at(&self, data: Bytes, offset: u64) -> IoFuture<()>;
    /// `fdatasync(2)`.
    fn sync_data(&self) -> IoFuture<()>;
    /// `fallocate(2)` with `mode` ([`PUNCH_HOLE`], [`ZERO_RANGE`], or 0).
    fn fallocate(&self, mode: i32, offset: u64, len: u64) -> IoFuture<()>;
}

#[derive(Debug, thiserror::Error)]
pub enum BackendError {
    #[error("io_uring backend unavailable: {0}")]
    UringUnavailable(String),
    #[error("disk I/O probe failed: {0}")]
    Probe(String),
}

/// Starts the backend `choice` asks for. `auto` tries io_uring with a probe
/// (a write, read back and fdatasync of a scratch file in `probe_dir`) and
/// falls back to the thread pool with a warning saying why.
pub async fn select(choice: BackendChoice, probe_dir: &Path) -> Result<Arc<dyn IoBackend>, BackendError> {
    let uring = match choice {
        BackendChoice::Threadpool => Err("not requested".to_string()),
        _ => match uring::UringBackend::start(uring::DEFAULT_THREADS) {
            Ok(backend) => {
                let backend: Arc<dyn IoBackend> = Arc::new(backend);
                match probe(&*backend, probe_dir).await {
                    Ok(direct) => Ok((backend, direct)),
                    Err(e) => Err(format!("probe I/O failed: {e}")),
                }
            }
            Err(e) => Err(format!("cannot set up a ring: {e}")),
        },
    };
    let (backend, direct) = match (uring, choice) {
        (Ok(chosen), _) => chosen,
        (Err(reason), BackendChoice::Uring) => return Err(BackendError::UringUnavailable(reason)),
        (Err(reason), _) => {
            if choice == BackendChoice::Auto {
                tracing::warn!(
                    %reason,
                    "io_uring is unavailable; falling back to the thread-pool pread/pwrite backend"
                );
            }
            let backend: Arc<dyn IoBackend> = Arc::new(threadpool::ThreadPoolBackend::new());
            let direct = probe(&*backend, probe_dir).await.map_err(|e| BackendError::Probe(e.to_string()))?;
            (backend, direct)
        }
    };
    if !direct {
        tracing::warn!(
            dir = %probe_dir.display(),
            "the filesystem refuses O_DIRECT; using buffered I/O (flushes still fdatasync)"
        );
    }
    tracing::info!(backend = %backend.kind(), direct, "disk I/O backend selected");
    Ok(backend)
}

/// Writes, reads back and syncs one block through `backend`; returns
/// whether O_DIRECT is in effect in `dir`.
pub async fn probe(backend: &dyn IoBackend, dir: &Path) -> io::Result<bool> {
    let path = dir.join(".io-probe");
    let (file, direct) = open_direct(&path, true)?;
    let _ = std::fs::remove_file(&path);
    let file = backend.open(file);
    let pool = BufPool::default();
    let mut out = pool.get(ALIGN);
    for (i, b) in out.iter_mut().enumerate() {
        *b = (i % 251) as u8;
    }
    let expected = out.to_vec();
    file.write_at(out.into_bytes(), 0).await?;
    file.sync_data().await?;
    let back = file.read_at(pool.get(ALIGN), 0).await?;
    if back[..] != expected[..] {
        return Err(io::Error::other("probe read returned different bytes"));
    }
    Ok(direct)
}

/// Opens (or creates) `path` read-write with O_DIRECT, falling back to
/// buffered I/O where the filesystem refuses O_DIRECT (tmpfs, some FUSE
/// filesystems). Returns the file and whether O_DIRECT is in effect.
pub fn open_direct(path: &Path, create: bool) -> io::Result<(std::fs::File, bool)> {
    use std::os::unix::fs::OpenOptionsExt;
    let open = |flags: i32| {
        std::fs::OpenOptions::new().read(true).write(true).create(create).truncate(false).custom_flags(flags).open(path)
    };
    match open(libc::O_DIRECT) {
        Ok(file) => Ok((file, true)),
        Err(e) if e.raw_os_error() == Some(libc::EINVAL) => Ok((open(0)?, false)),
        Err(e) => Err(e),
    }
}

/// `fallocate(2)` on a raw descriptor.
pub(crate) fn fallocate_fd(fd: i32, mode: i32, offset: u64, len: u64) -> io::Result<()> {
    let (offset, len) = (to_off(offset)?, to_off(len)?);
    loop {
        // SAFETY: plain syscall on a descriptor the caller keeps open.
        let rc = unsafe { libc::fallocate(fd, mode, offset, len) };
        if rc == 0 {
            return Ok(());
        }
        let err = io::Error::last_os_error();
        if err.kind() != io::ErrorKind::Interrupted {
            return Err(err);
        }
    }
}

fn to_off(v: u64) -> io::Result<libc::off_t> {
    libc::off_t::try_from(v).map_err(|_| io::Error::from(io::ErrorKind::InvalidInput))
}
