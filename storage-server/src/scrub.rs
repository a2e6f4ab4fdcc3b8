//! Scrubbing: reading every block of every chunk and verifying it against
//! its stored checksum, so latent corruption is found before a read needs
//! the block. A background task scrubs continuously at a limited rate; the
//! `SCRUB` admin request runs a full pass now, unthrottled.

use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use ballast_proto::frame::{BadBlocks, BLOCK_SIZE};
use tokio::sync::watch;
use tokio::task::JoinHandle;
use tokio::time::Instant;

use crate::error::StoreError;
use crate::metrics::metrics;
use crate::store::Store;

/// Bytes verified per read.
const SEGMENT: u64 = 1 << 20;
/// Delay before the first background pass, so startup I/O comes first.
const FIRST_PASS_DELAY: Duration = Duration::from_secs(60);
/// Pause between background passes.
const PASS_GAP: Duration = Duration::from_secs(600);

/// Result of one scrub pass.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct ScrubOutcome {
    pub blocks_checked: u64,
    pub bad: Vec<BadBlocks>,
}

impl ScrubOutcome {
    pub fn bad_blocks(&self) -> u64 {
        self.bad.iter().map(|b| u64::from(b.count)).sum()
    }
}

/// Verifies every block of the chunks of `volume` (or all), at most `rate`
/// bytes per second (`None`: as fast as the disk allows). Stops early with
/// `ShuttingDown` when `stop` turns true.
pub async fn scrub(
    store: &Store,
    volume: Option<u64>,
    rate: Option<u64>,
    stop: &mut watch::Receiver<bool>,
) -> Result<ScrubOutcome, StoreError> {
    let started = Instant::now();
    let mut outcome = ScrubOutcome::default();
    let mut bytes = 0u64;
    for chunk in store.chunks(volume) {
        let mut bad: Vec<usize> = Vec::new();
        let mut offset = 0;
        while offset < chunk.size {
            if *stop.borrow() {
                return Err(StoreError::ShuttingDown);
            }
            let len = SEGMENT.min(chunk.size - offset);
            let first = (offset / BLOCK_SIZE as u64) as usize;
            match chunk.read_blocks(offset, len).await {
                Ok(read) => bad.extend(read.bad),
                Err(e) => {
                    // An unreadable range is as bad as a corrupt one.
                    tracing::error!(key = %chunk.key, offset, error = %e, "scrub read failed");
                    bad.extend(first..first + (len / BLOCK_SIZE as u64) as usize);
                }
            }
            offset += len;
            bytes += len;
            outcome.blocks_checked += len / BLOCK_SIZE as u64;
            metrics().scrub_bytes.inc_by(len);
            if let Some(rate) = rate.filter(|r| *r > 0) {
                let due = started + Duration::from_secs_f64(bytes as f64 / rate as f64);
                tokio::select! {
                    _ = tokio::time::sleep_until(due) => {}
                    _ = stop.changed() => {}
                }
            }
        }
        if !bad.is_empty() {
            metrics().checksum_errors.with_label_values(&["stored"]).inc_by(bad.len() as u64);
            tracing::warn!(key = %chunk.key, blocks = bad.len(),
                "scrub found blocks failing their checksum; the chunk is rebuilt here from a peer");
            store.suspect(chunk.key, bad.iter().map(|&b| (b * BLOCK_SIZE) as u64));
        }
        outcome.bad.extend(runs(&bad).map(|(first, count)| BadBlocks {
            volume: chunk.key.volume,
            chunk: chunk.key.chunk,
            first_block: first as u32,
            count: count as u32,
        }));
    }
    Ok(outcome)
}

/// Consecutive runs `(first, count)` of sorted block indices.
fn runs(blocks: &[usize]) -> impl Iterator<Item = (usize, usize)> + '_ {
    let mut i = 0;
    std::iter::from_fn(move || {
        let first = *blocks.get(i)?;
        let mut count = 1;
        while blocks.get(i + count) == Some(&(first + count)) {
            count += 1;
        }
        i += count;
        Some((first, count))
    })
}

/// Scrubs everything in the background at `rate` bytes per second, pass
/// after pass, until `stop` turns true.
pub fn spawn_background(store: Arc<Store>, rate: u64, mut stop: watch::Receiver<bool>) -> JoinHandle<()> {
    tokio::spawn(async move {
        let mut pause = FIRST_PASS_DELAY;
        loop {
            tokio::select! {
                _ = tokio::time::sleep(pause) => {}
                _ = stop.changed() => {}
            }
            if *stop.borrow() {
                return;
            }
            match scrub(&store, None, Some(rate), &mut stop).await {
                Ok(outcome) => {
                    let m = metrics();
                    m.scrub_passes.inc();
                    m.scrub_bad_blocks.set(outcome.bad_blocks() as i64);
                    let now = SystemTime::now().duration_since(UNIX_EPOCH).unwrap_or_default();
                    m.scrub_last_pass.set(now.as_secs() as i64);
                    tracing::info!(blocks = outcome.blocks_checked, bad = outcome.bad_blocks(), "scrub pass complete");
                }
                Err(StoreError::ShuttingDown) => return,
                Err(e) => tracing::error!(error = %e, "scrub pass failed"),
            }
            pause = PASS_GAP;
        }
    })
}

#[cfg(test)]
mod tests {
    use super::runs;

    #[test]
    fn runs_group_consecutive_blocks() {
        let got: Vec<_> = runs(&[1, 2, 3, 7, 9, 10]).collect();
        assert_eq!(got, vec![(1, 3), (7, 1), (9, 2)]);
        assert_eq!(runs(&[]).count(), 0);
    }
}
