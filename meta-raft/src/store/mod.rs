//! Durable Raft storage in one sled database: the log and vote
//! ([`log::LogStore`]) and the state machine with its snapshots
//! ([`state_machine::StateMachineStore`]).

// openraft's storage traits return its `StorageError`, which is large; the
// helpers here return the same type rather than box and unbox it.
#![allow(clippy::result_large_err)]

pub mod log;
pub mod state_machine;

use std::path::Path;

pub use log::LogStore;
pub use state_machine::{SharedState, StateMachineStore};

/// Opens (or creates) the member's storage under `dir`.
pub fn open(dir: &Path) -> Result<(LogStore, StateMachineStore), sled::Error> {
    std::fs::create_dir_all(dir)?;
    let db = sled::Config::new().path(dir.join("raft.sled")).open()?;
    let log = LogStore::new(&db)?;
    let sm = StateMachineStore::new(&db)?;
    Ok((log, sm))
}

#[cfg(test)]
mod tests {
    use openraft::testing::{StoreBuilder, Suite};
    use openraft::StorageError;

    use super::*;
    use crate::types::{NodeId, TypeConfig};

    struct TempSledBuilder;

    impl StoreBuilder<TypeConfig, LogStore, StateMachineStore, tempfile::TempDir> for TempSledBuilder {
        async fn build(&self) -> Result<(tempfile::TempDir, LogStore, StateMachineStore), StorageError<NodeId>> {
            let dir = tempfile::tempdir().expect("temp dir");
            let (log, sm) = open(dir.path()).expect("opening sled");
            Ok((dir, log, sm))
        }
    }

    /// openraft's own conformance suite for log and state-machine storage.
    #[test]
    fn sled_store_passes_the_openraft_storage_suite() {
        Suite::test_all(TempSledBuilder).unwrap();
    }
}
