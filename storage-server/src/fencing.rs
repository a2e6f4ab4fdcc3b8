//! Fencing: the newest attachment epoch seen per volume.
//!
//! Every change (`WRITE`, `TRIM`, `WRITE_ZEROES`) carries the epoch of the
//! volume attachment that issued it. A change with an older epoch than the
//! newest seen for its volume is refused (`StaleEpoch`), so a node that lost
//! its attachment can never overwrite the new owner's data. A newer epoch is
//! persisted before the change that raised it is executed, so the fence
//! holds across restarts.
//!
//! Epoch 0 is simply the lowest epoch: it has no special powers, and is only
//! accepted while no higher epoch has been seen for the volume. Rebuild and
//! admin traffic must carry the volume's current epoch.

use std::collections::HashMap;
use std::io;
use std::path::{Path, PathBuf};
use std::sync::Mutex;

use crate::error::StoreError;

const MAGIC: u64 = u64::from_le_bytes(*b"BLEPOCH1");

pub struct Fencing {
    path: PathBuf,
    epochs: Mutex<HashMap<u64, u64>>,
    /// Serialises raises so the file is written in epoch order.
    persist: tokio::sync::Mutex<()>,
}

fn encode(epochs: &HashMap<u64, u64>) -> Vec<u8> {
    let mut entries: Vec<(u64, u64)> = epochs.iter().map(|(v, e)| (*v, *e)).collect();
    entries.sort_unstable();
    let mut out = Vec::with_capacity(20 + entries.len() * 16);
    out.extend_from_slice(&MAGIC.to_le_bytes());
    out.extend_from_slice(&(entries.len() as u64).to_le_bytes());
    for (volume, epoch) in entries {
        out.extend_from_slice(&volume.to_le_bytes());
        out.extend_from_slice(&epoch.to_le_bytes());
    }
    let crc = crc32fast::hash(&out);
    out.extend_from_slice(&crc.to_le_bytes());
    out
}

fn decode(bytes: &[u8]) -> Option<HashMap<u64, u64>> {
    let u64_at = |at: usize| Some(u64::from_le_bytes(bytes.get(at..at + 8)?.try_into().ok()?));
    let (body, crc) = bytes.split_at_checked(bytes.len().checked_sub(4)?)?;
    if u32::from_le_bytes(crc.try_into().ok()?) != crc32fast::hash(body) || u64_at(0)? != MAGIC {
        return None;
    }
    let count = usize::try_from(u64_at(8)?).ok()?;
    if body.len() != 16 + count.checked_mul(16)? {
        return None;
    }
    (0..count).map(|i| Some((u64_at(16 + i * 16)?, u64_at(24 + i * 16)?))).collect()
}

impl Fencing {
    /// Loads the epochs at `path`. A damaged file is an error: starting
    /// without the fence could let a stale writer in.
    pub fn open(path: &Path) -> io::Result<Fencing> {
        let epochs = match std::fs::read(path) {
            Ok(bytes) => decode(&bytes).ok_or_else(|| io::Error::other(format!("{} is damaged", path.display())))?,
            Err(e) if e.kind() == io::ErrorKind::NotFound => HashMap::new(),
            Err(e) => return Err(e),
        };
        Ok(Fencing { path: path.to_owned(), epochs: Mutex::new(epochs), persist: tokio::sync::Mutex::new(()) })
    }

    /// Newest epoch seen for `volume` (0 if none).
    pub fn current(&self, volume: u64) -> u64 {
        self.epochs.lock().expect("fencing poisoned").get(&volume).copied().unwrap_or(0)
    }

    /// Refuses `epoch` if it is older than the volume's newest.
    pub fn check(&self, volume: u64, epoch: u64) -> Result<(), StoreError> {
        let current = self.current(volume);
        if epoch < current {
            return Err(StoreError::StaleEpoch { got: epoch, current });
        }
        Ok(())
    }

    /// Like [`Fencing::check`], and makes a newer `epoch` the volume's
    /// newest, durably, before returning.
    pub async fn admit(&self, volume: u64, epoch: u64) -> Result<(), StoreError> {
        let current = self.current(volume);
        if epoch <= current {
            return self.check(volume, epoch);
        }
        let _persisting = self.persist.lock().await;
        let mut next = self.epochs.lock().expect("fencing poisoned").clone();
        let current = next.get(&volume).copied().unwrap_or(0);
        if epoch <= current {
            return self.check(volume, epoch);
        }
        next.insert(volume, epoch);
        let bytes = encode(&next);
        let path = self.path.clone();
        tokio::task::spawn_blocking(move || crate::durable::replace(&path, &bytes))
            .await
            .map_err(|e| StoreError::io("persisting epochs", io::Error::other(e)))?
            .map_err(|e| StoreError::io("persisting epochs", e))?;
        *self.epochs.lock().expect("fencing poisoned") = next;
        tracing::info!(volume, epoch, previous = current, "volume epoch raised");
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn epochs_only_rise_and_persist() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("epochs");
        let fencing = Fencing::open(&path).unwrap();
        fencing.admit(7, 0).await.unwrap();
        fencing.admit(7, 3).await.unwrap();
        assert!(matches!(fencing.admit(7, 2).await, Err(StoreError::StaleEpoch { got: 2, current: 3 })));
        fencing.admit(8, 1).await.unwrap();
        let reopened = Fencing::open(&path).unwrap();
        assert_eq!(reopened.current(7), 3);
        assert_eq!(reopened.current(8), 1);
        assert!(reopened.check(7, 2).is_err());
        let mut bytes = std::fs::read(&path).unwrap();
        bytes[20] ^= 1;
        std::fs::write(&path, bytes).unwrap();
        assert!(Fencing::open(&path).is_err(), "a damaged epoch file refuses to load");
    }
}
