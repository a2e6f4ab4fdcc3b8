//! Byte range locks: overlapping holders wait for each other unless all are
//! shared. The chunk server serialises overlapping writes and keeps readers
//! out of blocks being written (a block's data and checksum change
//! together); the volume engine serialises overlapping writes so that they
//! land on every replica in the order they were issued.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Mutex;

use tokio::sync::Notify;

#[derive(Default)]
pub struct RangeLock {
    held: Mutex<Vec<Held>>,
    released: Notify,
}

struct Held {
    id: u64,
    start: u64,
    end: u64,
    exclusive: bool,
}

pub struct RangeGuard<'a> {
    lock: &'a RangeLock,
    id: u64,
}

static NEXT_ID: AtomicU64 = AtomicU64::new(0);

impl RangeLock {
    /// Locks bytes `start..end`, shared or exclusive, waiting for
    /// conflicting holders to release.
    pub async fn lock(&self, start: u64, end: u64, exclusive: bool) -> RangeGuard<'_> {
        let id = NEXT_ID.fetch_add(1, Ordering::Relaxed);
        loop {
            // Register for wake-ups before checking, so a release in between is not missed.
            let released = self.released.notified();
            {
                let mut held = self.held.lock().expect("range lock poisoned");
                let conflict = held.iter().any(|h| h.start < end && start < h.end && (exclusive || h.exclusive));
                if !conflict {
                    held.push(Held { id, start, end, exclusive });
                    return RangeGuard { lock: self, id };
                }
            }
            released.await;
        }
    }
}

impl Drop for RangeGuard<'_> {
    fn drop(&mut self) {
        let mut held = self.lock.held.lock().expect("range lock poisoned");
        if let Some(pos) = held.iter().position(|h| h.id == self.id) {
            held.swap_remove(pos);
        }
        drop(held);
        self.lock.released.notify_waiters();
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;
    use std::time::Duration;

    use super::*;

    #[tokio::test]
    async fn overlapping_exclusive_ranges_wait() {
        let lock = Arc::new(RangeLock::default());
        let a = lock.lock(0, 8192, true).await;
        let _shared_elsewhere = lock.lock(8192, 16384, false).await;
        let lock2 = lock.clone();
        let waiter = tokio::spawn(async move {
            let _b = lock2.lock(4096, 12288, false).await;
        });
        tokio::time::sleep(Duration::from_millis(20)).await;
        assert!(!waiter.is_finished(), "shared lock overlapping an exclusive one waits");
        drop(a);
        tokio::time::timeout(Duration::from_secs(5), waiter).await.expect("released").unwrap();
    }
}
