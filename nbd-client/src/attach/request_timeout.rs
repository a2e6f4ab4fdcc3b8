//! A kernel device's request timeout. Short, because it is how long
//! requests stranded on a crashed serving process's connections wait before
//! the kernel resends them to its successor. A request that is merely slow
//! is resent too: the kernel drops its connection, the serving process
//! replaces it at once, and the engine runs the resent copy only after the
//! first one finished. So the timeout is raised while that happens (an
//! overloaded device is not also fed resent copies) and lowered again once
//! it stops, and it is long while the volume has I/O limits (requests queue
//! in the throttle).

use std::time::{Duration, Instant};

/// What a device gets unless told otherwise.
pub const DEFAULT_IO_TIMEOUT: Duration = Duration::from_millis(500);
/// The least timeout while the volume has I/O limits.
pub const LIMITED_IO_TIMEOUT: Duration = Duration::from_secs(30);
/// Each dropped connection doubles the timeout, this many times at most.
const MAX_RAISES: u32 = 4;
/// How long without a dropped connection before one doubling is undone.
const CALM: Duration = Duration::from_secs(60);

#[derive(Debug)]
pub struct RequestTimeout {
    configured: Duration,
    limited: bool,
    raises: u32,
    dropped: u64,
    changed: Instant,
}

impl RequestTimeout {
    pub fn new(configured: Duration, limited: bool, now: Instant) -> Self {
        Self { configured, limited, raises: 0, dropped: 0, changed: now }
    }

    pub fn current(&self) -> Duration {
        let floor = if self.limited { self.configured.max(LIMITED_IO_TIMEOUT) } else { self.configured };
        floor * 2u32.pow(self.raises)
    }

    /// Follows the volume's limits and the count of connections the kernel
    /// dropped so far; returns the timeout when it changed.
    pub fn update(&mut self, limited: bool, dropped: u64, now: Instant) -> Option<Duration> {
        let before = self.current();
        self.limited = limited;
        if dropped > self.dropped {
            self.dropped = dropped;
            self.raises = (self.raises + 1).min(MAX_RAISES);
            self.changed = now;
        } else if self.raises > 0 && now.duration_since(self.changed) >= CALM {
            self.raises -= 1;
            self.changed = now;
        }
        let after = self.current();
        (after != before).then_some(after)
    }
}

/// The driver counts its request timeout in seconds and reads 0 as "none":
/// round up, so a sub-second timeout (set exactly through sysfs afterwards)
/// never turns into no timeout at all.
pub(crate) fn whole_seconds(timeout: Duration) -> u64 {
    timeout.as_millis().div_ceil(1000).max(1) as u64
}

/// The request timeout a new connection gives the kernel: 0 sets its
/// default (30 s) and makes it keep a request on a single connection.
pub(crate) fn connect_timeout_seconds(timeout: Option<Duration>) -> u64 {
    timeout.map_or(0, whole_seconds)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sub_second_timeouts_round_up_to_a_whole_second() {
        assert_eq!(whole_seconds(Duration::from_millis(1)), 1);
        assert_eq!(whole_seconds(Duration::from_millis(1000)), 1);
        assert_eq!(whole_seconds(Duration::from_millis(1001)), 2);
        assert_eq!(whole_seconds(Duration::from_secs(8)), 8);
    }

    #[test]
    fn dropped_connections_raise_the_timeout_and_calm_lowers_it() {
        let start = Instant::now();
        let mut timeout = RequestTimeout::new(DEFAULT_IO_TIMEOUT, false, start);
        assert_eq!(timeout.current(), Duration::from_millis(500));
        assert_eq!(timeout.update(false, 0, start), None);
        assert_eq!(timeout.update(false, 1, start), Some(Duration::from_secs(1)));
        assert_eq!(timeout.update(false, 3, start), Some(Duration::from_secs(2)));
        for dropped in 4..10 {
            timeout.update(false, dropped, start);
        }
        assert_eq!(timeout.current(), Duration::from_secs(8), "raised at most four times");
        assert_eq!(timeout.update(false, 9, start + CALM / 2), None, "not calm for long enough");
        assert_eq!(timeout.update(false, 9, start + CALM), Some(Duration::from_secs(4)));
        assert_eq!(timeout.update(false, 9, start + CALM * 2), Some(Duration::from_secs(2)));
    }

    #[test]
    fn limited_volumes_get_a_long_timeout() {
        let start = Instant::now();
        let mut timeout = RequestTimeout::new(DEFAULT_IO_TIMEOUT, true, start);
        assert_eq!(timeout.current(), LIMITED_IO_TIMEOUT);
        assert_eq!(timeout.update(false, 0, start), Some(DEFAULT_IO_TIMEOUT), "limits lifted");
        assert_eq!(timeout.update(true, 0, start), Some(LIMITED_IO_TIMEOUT));
        let long = RequestTimeout::new(Duration::from_secs(60), true, start);
        assert_eq!(long.current(), Duration::from_secs(60), "a longer configured timeout stays");
    }
}
