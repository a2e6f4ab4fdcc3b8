//! The fallback backend: blocking pread/pwrite/fdatasync on tokio's blocking
//! thread pool, so runtime threads never wait on the disk.

use std::io;
use std::os::fd::AsRawFd;
use std::os::unix::fs::FileExt;
use std::sync::Arc;

use bytes::Bytes;

use super::{fallocate_fd, BackendKind, IoBackend, IoFile, IoFuture};
use crate::store::buf::AlignedBuf;

#[derive(Default)]
pub struct ThreadPoolBackend;

impl ThreadPoolBackend {
    pub fn new() -> ThreadPoolBackend {
        ThreadPoolBackend
    }
}

impl IoBackend for ThreadPoolBackend {
    fn kind(&self) -> BackendKind {
        BackendKind::ThreadPool
    }

    fn open(&self, file: std::fs::File) -> Arc<dyn IoFile> {
        Arc::new(PoolFile { file: Arc::new(file) })
    }
}

struct PoolFile {
    file: Arc<std::fs::File>,
}

fn blocking<T, F>(f: F) -> IoFuture<T>
where
    T: Send + 'static,
    F: FnOnce() -> io::Result<T> + Send + 'static,
{
    Box::pin(async move {
        tokio::task::spawn_blocking(f).await.map_err(|e| io::Error::other(format!("I/O task failed: {e}")))?
    })
}

impl IoFile for PoolFile {
    fn read_at(&self, mut buf: AlignedBuf, offset: u64) -> IoFuture<AlignedBuf> {
        let file = self.file.clone();
        blocking(move || {
            file.read_exact_at(&mut buf, offset)?;
            Ok(buf)
        })
    }

    fn write_at(&self, data: Bytes, offset: u64) -> IoFuture<()> {
        debug_assert!(super::aligned(&data));
        let file = self.file.clone();
        blocking(move || file.write_all_at(&data, offset))
    }

    fn sync_data(&self) -> IoFuture<()> {
        let file = self.file.clone();
        blocking(move || file.sync_data())
    }

    fn fallocate(&self, mode: i32, offset: u64, len: u64) -> IoFuture<()> {
        let file = self.file.clone();
        blocking(move || fallocate_fd(file.as_raw_fd(), mode, offset, len))
    }
}
