//! `TestMemExport`: an in-memory export for the tests of the NBD server and
//! the attach machinery in isolation. The volume engine is tested through
//! these same interfaces on a real cluster (`engine.rs`, `serve.rs`, `map.rs`).

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, RwLock};
use std::time::Duration;

use bytes::Bytes;
use volume_engine::{BlockExport, ExportError};

pub struct TestMemExport {
    data: RwLock<Vec<u8>>,
    /// Every operation whose offset is below this waits `delay` first, so a
    /// test can hold requests in flight or make them finish out of order.
    slow_below: u64,
    delay: Duration,
    pub flushes: AtomicU64,
}

impl TestMemExport {
    pub fn new(size: u64) -> Arc<Self> {
        Self::slow(size, 0, Duration::ZERO)
    }

    pub fn slow(size: u64, slow_below: u64, delay: Duration) -> Arc<Self> {
        Arc::new(Self { data: RwLock::new(vec![0; size as usize]), slow_below, delay, flushes: AtomicU64::new(0) })
    }

    pub fn with_contents(contents: Vec<u8>) -> Arc<Self> {
        Arc::new(Self { data: RwLock::new(contents), slow_below: 0, delay: Duration::ZERO, flushes: AtomicU64::new(0) })
    }

    pub fn snapshot(&self) -> Vec<u8> {
        self.data.read().unwrap().clone()
    }

    async fn maybe_wait(&self, offset: u64) {
        if offset < self.slow_below {
            tokio::time::sleep(self.delay).await;
        }
    }

    fn check(&self, offset: u64, len: u64) -> Result<std::ops::Range<usize>, ExportError> {
        let size = self.data.read().unwrap().len() as u64;
        match offset.checked_add(len) {
            Some(end) if end <= size => Ok(offset as usize..end as usize),
            _ => Err(ExportError::OutOfRange { offset, len }),
        }
    }
}

impl BlockExport for TestMemExport {
    fn size(&self) -> u64 {
        self.data.read().unwrap().len() as u64
    }

    async fn read(&self, offset: u64, len: u32) -> Result<Bytes, ExportError> {
        self.maybe_wait(offset).await;
        let range = self.check(offset, len.into())?;
        Ok(Bytes::copy_from_slice(&self.data.read().unwrap()[range]))
    }

    async fn write(&self, offset: u64, data: Bytes, _fua: bool) -> Result<(), ExportError> {
        self.maybe_wait(offset).await;
        let range = self.check(offset, data.len() as u64)?;
        self.data.write().unwrap()[range].copy_from_slice(&data);
        Ok(())
    }

    async fn flush(&self) -> Result<(), ExportError> {
        self.flushes.fetch_add(1, Ordering::Relaxed);
        Ok(())
    }

    async fn trim(&self, offset: u64, len: u32, _fua: bool) -> Result<(), ExportError> {
        self.write_zeroes(offset, len, false).await
    }

    async fn write_zeroes(&self, offset: u64, len: u32, _fua: bool) -> Result<(), ExportError> {
        self.maybe_wait(offset).await;
        let range = self.check(offset, len.into())?;
        self.data.write().unwrap()[range].fill(0);
        Ok(())
    }
}
