//! Byte range locks: overlapping holders wait for each other unless all are
//! shared. The chunk server serialises overlapping writes and keeps readers
//! out of blocks being written (a block's data and checksum change
//! together); the volume engine serialises overlapping writes so that they
//! land on every replica in the order they were issued.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Mutex;

use tokio::sync::Notify;

/// Waiters are served in arrival order: a request never overtakes an
/// earlier one it overlaps, even when a release wakes both.
#[derive(Default)]
pub struct RangeLock {
    state: Mutex<State>,
    released: Notify,
}

#[derive(Default)]
struct State {
    held: Vec<Range>,
    /// Requests still waiting, oldest first.
    waiting: Vec<Range>,
}

#[derive(Clone, Copy)]
struct Range {
    id: u64,
    start: u64,
    end: u64,
    exclusive: bool,
}

impl Range {
    fn conflicts(&self, other: &Range) -> bool {
        self.start < other.end && other.start < self.end && (self.exclusive || other.exclusive)
    }
}

pub struct RangeGuard<'a> {
    lock: &'a RangeLock,
    id: u64,
}

static NEXT_ID: AtomicU64 = AtomicU64::new(0);

impl RangeLock {
    /// Locks bytes `start..end`, shared or exclusive, waiting for
    /// conflicting holders, and for conflicting requests that came earlier.
    pub async fn lock(&self, start: u64, end: u64, exclusive: bool) -> RangeGuard<'_> {
        let me = Range { id: NEXT_ID.fetch_add(1, Ordering::Relaxed), start, end, exclusive };
        // Holds this request's place in the queue; a request dropped while
        // waiting gives it up.
        let mut place: Option<Place<'_>> = None;
        loop {
            // Registered for wake-ups before checking, so a release in between is not missed.
            let released = self.released.notified();
            {
                let mut state = self.state.lock().expect("range lock poisoned");
                let blocked = state.held.iter().any(|h| h.conflicts(&me))
                    || state.waiting.iter().take_while(|w| w.id != me.id).any(|w| w.conflicts(&me));
                if !blocked {
                    state.held.push(me);
                    drop(state);
                    // Leaving the queue may unblock later waiters.
                    drop(place);
                    return RangeGuard { lock: self, id: me.id };
                }
                if place.is_none() {
                    state.waiting.push(me);
                    place = Some(Place { lock: self, id: me.id });
                }
            }
            released.await;
        }
    }
}

/// A waiting request's entry in the queue, removed when it is dropped.
struct Place<'a> {
    lock: &'a RangeLock,
    id: u64,
}

impl Drop for Place<'_> {
    fn drop(&mut self) {
        let mut state = self.lock.state.lock().expect("range lock poisoned");
        state.waiting.retain(|w| w.id != self.id);
        drop(state);
        self.lock.released.notify_waiters();
    }
}

impl Drop for RangeGuard<'_> {
    fn drop(&mut self) {
        let mut state = self.lock.state.lock().expect("range lock poisoned");
        if let Some(pos) = state.held.iter().position(|h| h.id == self.id) {
            state.held.swap_remove(pos);
        }
        drop(state);
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

    #[tokio::test]
    async fn waiters_are_served_in_arrival_order() {
        let lock = Arc::new(RangeLock::default());
        let first = lock.lock(0, 4096, true).await;
        let order = Arc::new(std::sync::Mutex::new(Vec::new()));
        let mut waiters = Vec::new();
        for n in 0..5u64 {
            let (lock, order) = (lock.clone(), order.clone());
            waiters.push(tokio::spawn(async move {
                // Each overlaps the one before it, all overlap the holder.
                let _g = lock.lock(0, 4096 + n * 10, true).await;
                order.lock().unwrap().push(n);
                tokio::task::yield_now().await;
            }));
            // Arrive one after the other.
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        drop(first);
        for w in waiters {
            tokio::time::timeout(Duration::from_secs(5), w).await.expect("served").unwrap();
        }
        assert_eq!(*order.lock().unwrap(), vec![0, 1, 2, 3, 4]);
    }

    #[tokio::test]
    async fn a_cancelled_waiter_leaves_the_queue() {
        let lock = RangeLock::default();
        let held = lock.lock(0, 4096, true).await;
        let cancelled = tokio::time::timeout(Duration::from_millis(20), lock.lock(0, 4096, true)).await;
        assert!(cancelled.is_err());
        drop(held);
        tokio::time::timeout(Duration::from_secs(5), lock.lock(0, 4096, true)).await.expect("not blocked by a ghost");
    }
}
