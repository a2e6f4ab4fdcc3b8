//! A volume's I/O limits (operations and bytes per second), enforced where
//! the block device's requests enter the engine: a request over the limit
//! waits for its turn instead of failing, so a limited volume is slower,
//! never broken. The limits can change while the volume is served.
//!
//! Each limit is a schedule of theoretical arrival times (the generic cell
//! rate algorithm): a request reserves the next `cost / rate` seconds of
//! the schedule and may start up to [`BURST`] ahead of it, so short bursts
//! pass at once and the long-run rate never exceeds the limit.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Mutex;
use std::time::Duration;

use tokio::time::Instant;

/// How far ahead of its place in the schedule a request may start.
const BURST: Duration = Duration::from_millis(100);

/// Limits per second; 0 = no limit.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Limits {
    pub iops: u64,
    pub bytes: u64,
}

impl Limits {
    /// Whether requests may wait here at all.
    pub fn any(&self) -> bool {
        self.iops > 0 || self.bytes > 0
    }
}

#[derive(Default)]
pub struct Throttle {
    /// Set while any limit is: an unlimited volume's requests take no lock.
    limited: AtomicBool,
    state: Mutex<State>,
}

#[derive(Default)]
struct State {
    limits: Limits,
    /// When the schedule of operations, and of bytes, is next free.
    ops_free_at: Option<Instant>,
    bytes_free_at: Option<Instant>,
}

/// Reserves `cost` units at `rate` per second on a schedule; returns when
/// the request may start.
fn reserve(free_at: &mut Option<Instant>, now: Instant, cost: u64, rate: u64) -> Instant {
    if rate == 0 {
        *free_at = None;
        return now;
    }
    let start = free_at.map_or(now, |at| at.max(now));
    *free_at = Some(start + Duration::from_secs_f64(cost as f64 / rate as f64));
    start.checked_sub(BURST).map_or(now, |early| early.max(now))
}

impl Throttle {
    pub fn limits(&self) -> Limits {
        self.state.lock().expect("throttle lock").limits
    }

    /// Takes effect for the next request; requests already waiting keep
    /// the turn they were given.
    pub fn set(&self, limits: Limits) {
        let mut state = self.state.lock().expect("throttle lock");
        if state.limits != limits {
            tracing::info!(iops = limits.iops, bytes_per_second = limits.bytes, "I/O limits changed (0: none)");
            state.limits = limits;
            self.limited.store(limits != Limits::default(), Ordering::Release);
        }
    }

    /// Waits until a request moving `bytes` may start.
    pub async fn admit(&self, bytes: u64) {
        if !self.limited.load(Ordering::Acquire) {
            return;
        }
        let (start, now) = {
            let mut state = self.state.lock().expect("throttle lock");
            let (limits, now) = (state.limits, Instant::now());
            let by_ops = reserve(&mut state.ops_free_at, now, 1, limits.iops);
            let by_bytes = reserve(&mut state.bytes_free_at, now, bytes, limits.bytes);
            (by_ops.max(by_bytes), now)
        };
        // Not even a timer when nothing needs to wait: a timer, however
        // short, costs a tick of the timer wheel (a millisecond).
        if start > now {
            tokio::time::sleep_until(start).await;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// How long `count` requests of `bytes` take to be admitted, on
    /// tokio's paused clock (no real waiting).
    async fn admitted_in(throttle: &Throttle, count: u64, bytes: u64) -> Duration {
        let started = Instant::now();
        for _ in 0..count {
            throttle.admit(bytes).await;
        }
        started.elapsed()
    }

    #[tokio::test(start_paused = true)]
    async fn operations_are_paced_at_the_limit_after_a_short_burst() {
        let throttle = Throttle::default();
        assert_eq!(admitted_in(&throttle, 10_000, 4096).await, Duration::ZERO, "no limit, no wait");
        throttle.set(Limits { iops: 100, bytes: 0 });
        let took = admitted_in(&throttle, 200, 4096).await;
        // 200 operations at 100/s: two seconds, less the burst allowance.
        assert!(took >= Duration::from_millis(1890) && took <= Duration::from_millis(2000), "{took:?}");
    }

    #[tokio::test(start_paused = true)]
    async fn bytes_are_paced_and_the_stricter_limit_wins() {
        let throttle = Throttle::default();
        throttle.set(Limits { iops: 1000, bytes: 1 << 20 });
        // 8 MiB in 64 KiB requests at 1 MiB/s: eight seconds, though 128
        // operations are far below 1000/s.
        let took = admitted_in(&throttle, 128, 64 << 10).await;
        assert!(took >= Duration::from_millis(7800) && took <= Duration::from_secs(8), "{took:?}");
    }

    #[tokio::test(start_paused = true)]
    async fn lifting_a_limit_ends_the_waiting() {
        let throttle = Throttle::default();
        throttle.set(Limits { iops: 10, bytes: 0 });
        admitted_in(&throttle, 20, 0).await;
        throttle.set(Limits::default());
        assert_eq!(admitted_in(&throttle, 1000, 0).await, Duration::ZERO);
    }
}
