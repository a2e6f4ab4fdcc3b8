//! One coordinator's pause of a volume on several chunk servers: taken on
//! all of them, renewed in the background while the coordinator works, and
//! released on all of them. Holds of other coordinators are untouched.

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use futures::future::join_all;
use tokio::task::JoinHandle;

use super::client::{ClientError, DataClient};

static NEXT: AtomicU64 = AtomicU64::new(1);

/// A holder id no other coordinator uses: this process, this moment, a counter.
fn new_holder() -> u64 {
    let nanos = SystemTime::now().duration_since(UNIX_EPOCH).map_or(0, |d| d.as_nanos() as u64);
    (u64::from(std::process::id()) << 40) ^ nanos ^ NEXT.fetch_add(1, Ordering::Relaxed).rotate_left(20)
}

pub struct HeldPause {
    servers: Vec<DataClient>,
    volume: u64,
    holder: u64,
    renewing: JoinHandle<()>,
    /// Set when a renewal failed or came late: some server may have let
    /// the hold lapse, and changes may have gone on there.
    lapsed: Arc<AtomicBool>,
}

impl HeldPause {
    /// Pauses `volume` on every server (each hold lasting `timeout` unless
    /// renewed) and returns once all have drained their changes in flight.
    /// On a failure the holds already taken are released; the error names
    /// the server's index in `servers`.
    pub async fn acquire(
        servers: Vec<DataClient>,
        volume: u64,
        timeout: Duration,
    ) -> Result<Self, (usize, ClientError)> {
        let holder = new_holder();
        let paused = join_all(servers.iter().map(|c| c.pause_volume_for(volume, holder, timeout))).await;
        if let Some((index, error)) = paused.into_iter().enumerate().find_map(|(i, r)| r.err().map(|e| (i, e))) {
            join_all(servers.iter().map(|c| c.resume_volume_for(volume, holder))).await;
            return Err((index, error));
        }
        let lapsed = Arc::new(AtomicBool::new(false));
        let renewing = {
            let (servers, lapsed) = (servers.clone(), lapsed.clone());
            tokio::spawn(async move {
                loop {
                    tokio::time::sleep(timeout / 3).await;
                    // Each server on its own clock: a slow one must not make
                    // the others' holds lapse.
                    let renewed = join_all(
                        servers
                            .iter()
                            .map(|c| tokio::time::timeout(timeout / 3, c.pause_volume_for(volume, holder, timeout))),
                    )
                    .await;
                    if renewed.iter().any(|r| !matches!(r, Ok(Ok(())))) {
                        lapsed.store(true, Ordering::SeqCst);
                    }
                }
            })
        };
        Ok(Self { servers, volume, holder, renewing, lapsed })
    }

    /// Whether every renewal so far reached every server in time: only then
    /// is it certain that no change went on anywhere since the pause began.
    pub fn is_intact(&self) -> bool {
        !self.lapsed.load(Ordering::SeqCst)
    }

    /// Ends this hold everywhere. A server that misses it ends the hold
    /// itself when its timeout passes.
    pub async fn release(self) {
        self.renewing.abort();
        join_all(self.servers.iter().map(|c| c.resume_volume_for(self.volume, self.holder))).await;
    }
}

impl Drop for HeldPause {
    fn drop(&mut self) {
        // Released or not, stop renewing: the holds then time out.
        self.renewing.abort();
    }
}
