//! Volume pauses, for crash-consistent snapshots: while a volume is paused
//! no change (write, trim, zeroing) to it is admitted — new ones wait at
//! the gate — and a pause takes effect once the changes admitted before it
//! have finished. Nothing else waits: reads, flushes and chunk admin
//! (clones included) never pass through the gate.
//!
//! A pause has holders (a snapshot, a replica rebuild), each named by the
//! coordinator and with its own timeout; the volume stays paused while any
//! holder remains, so one coordinator's resume never ends another's pause.
//! A holder leaves on resume, or by itself when its timeout elapses, so a
//! coordinator that dies mid-snapshot cannot hold a volume for ever.

use std::collections::HashMap;
use std::sync::{Arc, Mutex, MutexGuard, Weak};
use std::time::Duration;

use tokio::sync::Notify;
use tokio::task::AbortHandle;
use tokio::time::Instant;

use crate::error::StoreError;
use crate::metrics::metrics;

/// Timeout of a pause that asks for none.
pub const DEFAULT_PAUSE: Duration = Duration::from_secs(10);
/// Longest pause granted.
pub const MAX_PAUSE: Duration = Duration::from_secs(60);

/// The timeout granted for a requested one (zero = [`DEFAULT_PAUSE`]).
pub fn granted(requested: Duration) -> Duration {
    if requested.is_zero() {
        DEFAULT_PAUSE
    } else {
        requested.min(MAX_PAUSE)
    }
}

#[derive(Default)]
pub struct Pauses {
    inner: Arc<Inner>,
}

#[derive(Default)]
struct Inner {
    state: Mutex<State>,
    /// Woken when a pause ends, when the last in-flight change of a paused
    /// volume finishes, and on shutdown. Only waiters on paused volumes
    /// listen, so the data path never notifies anyone.
    changed: Notify,
}

#[derive(Default)]
struct State {
    /// Volumes with changes in flight or a pause; others have no entry.
    volumes: HashMap<u64, Volume>,
    next_token: u64,
    closed: bool,
}

#[derive(Default)]
struct Volume {
    /// Changes admitted and not yet finished.
    inflight: u64,
    pause: Option<Pause>,
}

struct Pause {
    /// Tells this pause from a later one of the same volume.
    token: u64,
    /// Holder → when its hold ends.
    holders: HashMap<u64, Instant>,
    timer: AbortHandle,
    /// When the timer wakes next.
    timer_at: Instant,
}

impl Pause {
    /// When the next holder's hold ends.
    fn next_deadline(&self) -> Instant {
        self.holders.values().copied().min().unwrap_or_else(Instant::now)
    }

    /// Forgets the holders whose holds have ended.
    fn drop_expired(&mut self) {
        let now = Instant::now();
        self.holders.retain(|_, until| *until > now);
    }

    /// Makes the timer wake by the next hold's end (a new, shorter hold, or
    /// the end of a longer one, moves it earlier).
    fn rearm(&mut self, inner: &Arc<Inner>, volume: u64) {
        let next = self.next_deadline();
        if next < self.timer_at {
            self.timer.abort();
            self.timer = tokio::spawn(expire(Arc::downgrade(inner), volume, self.token, next)).abort_handle();
            self.timer_at = next;
        }
    }
}

impl Inner {
    fn lock(&self) -> MutexGuard<'_, State> {
        self.state.lock().expect("pause state poisoned")
    }
}

impl State {
    /// Drops the entry of `volume` once it has nothing to remember.
    fn tidy(&mut self, volume: u64) {
        if self.volumes.get(&volume).is_some_and(|v| v.inflight == 0 && v.pause.is_none()) {
            self.volumes.remove(&volume);
        }
    }

    fn paused_count(&self) -> usize {
        self.volumes.values().filter(|v| v.pause.is_some()).count()
    }
}

/// A change admitted through the gate; finished when dropped.
pub struct ChangeGuard {
    inner: Arc<Inner>,
    volume: u64,
}

impl Drop for ChangeGuard {
    fn drop(&mut self) {
        let mut state = self.inner.lock();
        let Some(v) = state.volumes.get_mut(&self.volume) else { return };
        v.inflight -= 1;
        if v.inflight == 0 {
            if v.pause.is_some() {
                // A pause may be waiting for this volume to drain.
                drop(state);
                self.inner.changed.notify_waiters();
            } else {
                state.tidy(self.volume);
            }
        }
    }
}

impl Pauses {
    /// Admits a change to `volume`, waiting while the volume is paused.
    /// Fails with `ShuttingDown` instead of waiting once [`Pauses::close`]
    /// was called.
    pub async fn admit(&self, volume: u64) -> Result<ChangeGuard, StoreError> {
        loop {
            // Registered before the check, so a resume in between is not missed.
            let changed = self.inner.changed.notified();
            {
                let mut state = self.inner.lock();
                let closed = state.closed;
                let v = state.volumes.entry(volume).or_default();
                if v.pause.is_none() {
                    v.inflight += 1;
                    return Ok(ChangeGuard { inner: self.inner.clone(), volume });
                }
                if closed {
                    return Err(StoreError::ShuttingDown);
                }
            }
            changed.await;
        }
    }

    /// Pauses `volume` for `holder` for `timeout` (see [`granted`]), or
    /// renews that holder's hold, then waits until the volume's in-flight
    /// changes have finished. Returns the timeout granted; `Interrupted` if
    /// the pause ended first.
    pub async fn pause(&self, volume: u64, holder: u64, timeout: Duration) -> Result<Duration, StoreError> {
        let timeout = granted(timeout);
        let deadline = Instant::now() + timeout;
        {
            let mut state = self.inner.lock();
            if state.closed {
                return Err(StoreError::ShuttingDown);
            }
            let State { volumes, next_token, .. } = &mut *state;
            let v = volumes.entry(volume).or_default();
            match &mut v.pause {
                Some(pause) => {
                    pause.holders.insert(holder, deadline);
                    pause.rearm(&self.inner, volume);
                }
                None => {
                    *next_token += 1;
                    let token = *next_token;
                    let timer = tokio::spawn(expire(Arc::downgrade(&self.inner), volume, token, deadline));
                    let holders = HashMap::from([(holder, deadline)]);
                    v.pause = Some(Pause { token, holders, timer: timer.abort_handle(), timer_at: deadline });
                    tracing::info!(volume, holder, ?timeout, "volume paused");
                }
            }
            let paused = state.paused_count();
            metrics().paused_volumes.set(paused as i64);
        }
        metrics().volume_pauses.inc();
        loop {
            let changed = self.inner.changed.notified();
            {
                let state = self.inner.lock();
                match state.volumes.get(&volume) {
                    Some(v) if v.pause.is_some() => {
                        if v.inflight == 0 {
                            return Ok(timeout);
                        }
                    }
                    _ => {
                        return Err(StoreError::Interrupted(format!(
                            "the pause of volume {volume:#x} ended before its in-flight changes finished"
                        )))
                    }
                }
                if state.closed {
                    return Err(StoreError::ShuttingDown);
                }
            }
            changed.await;
        }
    }

    /// Ends `holder`'s hold on `volume`; true if that ended the pause (no
    /// other holder remains).
    pub fn resume(&self, volume: u64, holder: u64) -> bool {
        let resumed = {
            let mut state = self.inner.lock();
            let Some(v) = state.volumes.get_mut(&volume) else { return false };
            if let Some(pause) = &mut v.pause {
                let held = pause.holders.remove(&holder).is_some();
                pause.drop_expired();
                if !held || !pause.holders.is_empty() {
                    pause.rearm(&self.inner, volume);
                    return false;
                }
            }
            let pause = v.pause.take();
            state.tidy(volume);
            if let Some(pause) = &pause {
                pause.timer.abort();
                metrics().paused_volumes.set(state.paused_count() as i64);
            }
            pause.is_some()
        };
        if resumed {
            self.inner.changed.notify_waiters();
            metrics().volume_resumes.with_label_values(&["request"]).inc();
            tracing::info!(volume, "volume resumed");
        }
        resumed
    }

    /// True while `volume` is paused.
    pub fn is_paused(&self, volume: u64) -> bool {
        self.inner.lock().volumes.get(&volume).is_some_and(|v| v.pause.is_some())
    }

    /// For shutdown: changes waiting on a pause (now and later) and pauses
    /// fail with `ShuttingDown` rather than hold connections open.
    pub fn close(&self) {
        self.inner.lock().closed = true;
        self.inner.changed.notify_waiters();
    }
}

/// Ends the holds of the pause `token` of `volume` as their deadlines
/// (which renewals move) pass, and the pause with the last of them.
async fn expire(inner: Weak<Inner>, volume: u64, token: u64, mut deadline: Instant) {
    loop {
        tokio::time::sleep_until(deadline).await;
        let Some(inner) = inner.upgrade() else { return };
        let mut state = inner.lock();
        let Some(v) = state.volumes.get_mut(&volume) else { return };
        match &mut v.pause {
            Some(pause) if pause.token == token => {
                pause.drop_expired();
                if !pause.holders.is_empty() {
                    deadline = pause.next_deadline();
                    pause.timer_at = deadline;
                    continue;
                }
            }
            _ => return,
        }
        v.pause = None;
        state.tidy(volume);
        metrics().paused_volumes.set(state.paused_count() as i64);
        drop(state);
        inner.changed.notify_waiters();
        metrics().volume_resumes.with_label_values(&["timeout"]).inc();
        tracing::warn!(volume, "volume pause timed out without a resume; changes proceed");
        return;
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;

    /// Polls `fut` once: true if it is still pending.
    async fn pending<F: std::future::Future + Unpin>(fut: &mut F) -> bool {
        tokio::time::timeout(Duration::from_millis(1), fut).await.is_err()
    }

    #[test]
    fn timeouts_default_and_cap() {
        assert_eq!(granted(Duration::ZERO), DEFAULT_PAUSE);
        assert_eq!(granted(Duration::from_millis(250)), Duration::from_millis(250));
        assert_eq!(granted(Duration::from_secs(3600)), MAX_PAUSE);
    }

    #[tokio::test(start_paused = true)]
    async fn changes_wait_while_paused_and_resume_releases_them() {
        let p = Pauses::default();
        assert_eq!(p.pause(1, 0, Duration::from_secs(30)).await.unwrap(), Duration::from_secs(30));
        assert!(p.is_paused(1));
        let mut waiting = Box::pin(p.admit(1));
        assert!(pending(&mut waiting).await);
        // Other volumes are not paused.
        drop(p.admit(2).await.unwrap());
        assert!(p.resume(1, 0));
        assert!(!p.resume(1, 0), "resuming again is a no-op");
        let guard = waiting.await.unwrap();
        drop(guard);
        assert!(p.inner.lock().volumes.is_empty(), "idle volumes leave no entry");
    }

    #[tokio::test(start_paused = true)]
    async fn pause_waits_for_changes_in_flight() {
        let p = Pauses::default();
        let a = p.admit(7).await.unwrap();
        let b = p.admit(7).await.unwrap();
        let mut pausing = Box::pin(p.pause(7, 0, Duration::ZERO));
        assert!(pending(&mut pausing).await);
        drop(a);
        assert!(pending(&mut pausing).await);
        drop(b);
        assert_eq!(pausing.await.unwrap(), DEFAULT_PAUSE);
        // Paused now: nothing is admitted.
        assert!(pending(&mut Box::pin(p.admit(7))).await);
    }

    #[tokio::test(start_paused = true)]
    async fn pause_times_out_and_renewal_extends_it() {
        let p = Pauses::default();
        let start = Instant::now();
        p.pause(3, 0, Duration::from_secs(2)).await.unwrap();
        tokio::time::sleep(Duration::from_secs(1)).await;
        p.pause(3, 0, Duration::from_secs(2)).await.unwrap();
        let guard = p.admit(3).await.unwrap();
        let waited = start.elapsed();
        assert!(waited >= Duration::from_secs(3), "the renewed pause ran 2 s from the renewal: {waited:?}");
        assert!(waited < Duration::from_millis(3100), "{waited:?}");
        assert!(!p.is_paused(3));
        drop(guard);
        assert!(!p.resume(3, 0), "a timed-out pause needs no resume");
    }

    #[tokio::test(start_paused = true)]
    async fn pause_that_ends_before_the_drain_is_interrupted() {
        let p = Pauses::default();
        let inflight = p.admit(5).await.unwrap();
        let err = p.pause(5, 0, Duration::from_millis(100)).await.unwrap_err();
        assert!(matches!(err, StoreError::Interrupted(_)), "{err}");
        assert!(!p.is_paused(5));
        drop(inflight);

        let inflight = p.admit(5).await.unwrap();
        let mut pausing = Box::pin(p.pause(5, 0, Duration::from_secs(10)));
        assert!(pending(&mut pausing).await);
        p.resume(5, 0);
        assert!(matches!(pausing.await, Err(StoreError::Interrupted(_))));
        drop(inflight);
    }

    #[tokio::test(start_paused = true)]
    async fn close_fails_waiters_but_not_unpaused_changes() {
        let p = Pauses::default();
        p.pause(9, 0, Duration::from_secs(30)).await.unwrap();
        let mut waiting = Box::pin(p.admit(9));
        assert!(pending(&mut waiting).await);
        p.close();
        assert!(matches!(waiting.await, Err(StoreError::ShuttingDown)));
        assert!(matches!(p.admit(9).await, Err(StoreError::ShuttingDown)));
        assert!(matches!(p.pause(10, 0, Duration::ZERO).await, Err(StoreError::ShuttingDown)));
        drop(p.admit(10).await.unwrap());
    }

    #[tokio::test(start_paused = true)]
    async fn a_pause_lasts_while_any_holder_holds_it() {
        let p = Pauses::default();
        p.pause(4, 1, Duration::from_secs(30)).await.unwrap();
        p.pause(4, 2, Duration::from_secs(5)).await.unwrap();
        assert!(!p.resume(4, 1), "holder 2 still holds the volume");
        assert!(p.is_paused(4));
        assert!(!p.resume(4, 7), "a holder that holds nothing changes nothing");
        // Holder 2's hold runs out by itself, 5 s in, not when holder 1's would have.
        let start = Instant::now();
        drop(p.admit(4).await.unwrap());
        let waited = start.elapsed();
        assert!(waited >= Duration::from_secs(5) && waited < Duration::from_secs(6), "{waited:?}");

        p.pause(4, 1, Duration::from_secs(2)).await.unwrap();
        p.pause(4, 2, Duration::from_secs(30)).await.unwrap();
        tokio::time::sleep(Duration::from_secs(3)).await;
        assert!(p.is_paused(4), "holder 1's timeout ends only its own hold");
        assert!(p.resume(4, 2));
        assert!(!p.is_paused(4));
    }
}
