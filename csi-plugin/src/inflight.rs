//! The keys (volume ids, names) with a call running in this process. The
//! CSI spec wants ABORTED for a second call on a volume while one is
//! pending; the sidecars and the kubelet retry it later.

use std::collections::HashSet;
use std::sync::{Arc, Mutex};

use crate::error::{CsiError, Result};

#[derive(Clone, Default)]
pub struct InFlight {
    keys: Arc<Mutex<HashSet<String>>>,
}

/// Holds a key until dropped.
pub struct Guard {
    keys: Arc<Mutex<HashSet<String>>>,
    key: String,
}

impl InFlight {
    /// Claims `key`, or fails with ABORTED if a call already holds it.
    pub fn claim(&self, key: impl Into<String>) -> Result<Guard> {
        let key = key.into();
        let mut keys = self.keys.lock().expect("in-flight set lock");
        if !keys.insert(key.clone()) {
            return Err(CsiError::InProgress(key));
        }
        Ok(Guard { keys: self.keys.clone(), key })
    }
}

impl Drop for Guard {
    fn drop(&mut self) {
        self.keys.lock().expect("in-flight set lock").remove(&self.key);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_key_is_held_until_the_guard_drops() {
        let set = InFlight::default();
        let guard = set.claim("vol-1").unwrap();
        assert!(matches!(set.claim("vol-1"), Err(CsiError::InProgress(_))));
        let _other = set.claim("vol-2").unwrap();
        drop(guard);
        set.claim("vol-1").unwrap();
    }
}
