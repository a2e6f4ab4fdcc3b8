//! The state machine: [`MetaState`] in memory, made durable by snapshots in
//! sled plus the committed log that openraft re-applies after a restart.

use std::io::Cursor;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, RwLock};

use openraft::storage::RaftStateMachine;
use openraft::{
    Entry, EntryPayload, LogId, OptionalSend, RaftSnapshotBuilder, Snapshot, SnapshotMeta, StorageError,
    StorageIOError, StoredMembership,
};
use serde::{Deserialize, Serialize};

use crate::metrics;
use crate::state::MetaState;
use crate::types::{NodeId, Outcome, Response, TypeConfig};

type StorageResult<T> = Result<T, StorageError<NodeId>>;
type Membership = StoredMembership<NodeId, openraft::BasicNode>;

const CURRENT_SNAPSHOT: &[u8] = b"current";

/// Makes snapshot ids unique when two snapshots end at the same log id.
static SNAPSHOT_SEQ: AtomicU64 = AtomicU64::new(0);

/// What has been applied, shared with the API service for reads.
#[derive(Debug, Default)]
pub struct Applied {
    pub last_applied: Option<LogId<NodeId>>,
    pub last_membership: Membership,
    pub state: MetaState,
}

pub type SharedState = Arc<RwLock<Applied>>;

#[derive(Serialize, Deserialize)]
struct StoredSnapshot {
    meta: SnapshotMeta<NodeId, openraft::BasicNode>,
    data: Vec<u8>,
}

#[derive(Clone)]
pub struct StateMachineStore {
    applied: SharedState,
    db: sled::Db,
    snapshots: sled::Tree,
}

impl StateMachineStore {
    /// Opens the state machine, restoring the newest snapshot if any. Log
    /// entries after it are re-applied by openraft at startup.
    pub fn new(db: &sled::Db) -> Result<Self, sled::Error> {
        let snapshots = db.open_tree("snapshots")?;
        let store = Self { applied: SharedState::default(), db: db.clone(), snapshots };
        if let Some(stored) = store.read_stored().map_err(|e| sled::Error::Unsupported(e.to_string()))? {
            store.restore(&stored.meta, &stored.data).map_err(|e| sled::Error::Unsupported(e.to_string()))?;
        }
        Ok(store)
    }

    pub fn shared(&self) -> SharedState {
        self.applied.clone()
    }

    fn read_stored(&self) -> Result<Option<StoredSnapshot>, StorageIOError<NodeId>> {
        match self.snapshots.get(CURRENT_SNAPSHOT).map_err(|e| StorageIOError::read_snapshot(None, &e))? {
            Some(bytes) => {
                serde_json::from_slice(&bytes).map(Some).map_err(|e| StorageIOError::read_snapshot(None, &e))
            }
            None => Ok(None),
        }
    }

    async fn persist(&self, stored: &StoredSnapshot) -> Result<(), StorageIOError<NodeId>> {
        let signature = Some(stored.meta.signature());
        let bytes = serde_json::to_vec(stored).map_err(|e| StorageIOError::write_snapshot(signature.clone(), &e))?;
        self.snapshots
            .insert(CURRENT_SNAPSHOT, bytes)
            .map_err(|e| StorageIOError::write_snapshot(signature.clone(), &e))?;
        self.db.flush_async().await.map_err(|e| StorageIOError::write_snapshot(signature, &e))?;
        Ok(())
    }

    fn restore(
        &self,
        meta: &SnapshotMeta<NodeId, openraft::BasicNode>,
        data: &[u8],
    ) -> Result<(), StorageIOError<NodeId>> {
        let state: MetaState =
            serde_json::from_slice(data).map_err(|e| StorageIOError::read_snapshot(Some(meta.signature()), &e))?;
        let mut applied = self.applied.write().expect("state lock poisoned");
        applied.state = state;
        applied.last_applied = meta.last_log_id;
        applied.last_membership = meta.last_membership.clone();
        Ok(())
    }
}

impl RaftSnapshotBuilder<TypeConfig> for StateMachineStore {
    async fn build_snapshot(&mut self) -> StorageResult<Snapshot<TypeConfig>> {
        let (data, last_applied, last_membership) = {
            let applied = self.applied.read().expect("state lock poisoned");
            let data = serde_json::to_vec(&applied.state).map_err(|e| StorageIOError::read_state_machine(&e))?;
            (data, applied.last_applied, applied.last_membership.clone())
        };
        let snapshot_id = match last_applied {
            Some(id) => format!("{}-{}-{}", id.leader_id, id.index, SNAPSHOT_SEQ.fetch_add(1, Ordering::Relaxed)),
            None => format!("empty-{}", SNAPSHOT_SEQ.fetch_add(1, Ordering::Relaxed)),
        };
        let meta = SnapshotMeta { last_log_id: last_applied, last_membership, snapshot_id };
        let stored = StoredSnapshot { meta: meta.clone(), data };
        self.persist(&stored).await?;
        Ok(Snapshot { meta, snapshot: Box::new(Cursor::new(stored.data)) })
    }
}

impl RaftStateMachine<TypeConfig> for StateMachineStore {
    type SnapshotBuilder = Self;

    async fn applied_state(&mut self) -> StorageResult<(Option<LogId<NodeId>>, Membership)> {
        let applied = self.applied.read().expect("state lock poisoned");
        Ok((applied.last_applied, applied.last_membership.clone()))
    }

    async fn apply<I>(&mut self, entries: I) -> StorageResult<Vec<Response>>
    where
        I: IntoIterator<Item = Entry<TypeConfig>> + OptionalSend,
        I::IntoIter: OptionalSend,
    {
        let mut applied = self.applied.write().expect("state lock poisoned");
        let mut responses = Vec::new();
        for entry in entries {
            applied.last_applied = Some(entry.log_id);
            let response = match entry.payload {
                EntryPayload::Blank => Ok(Outcome::Empty),
                EntryPayload::Normal(request) => {
                    applied.state.apply(entry.log_id.index, request.at_ms, request.command)
                }
                EntryPayload::Membership(membership) => {
                    applied.last_membership = StoredMembership::new(Some(entry.log_id), membership);
                    Ok(Outcome::Empty)
                }
            };
            responses.push(response);
        }
        if let Some(id) = applied.last_applied {
            metrics::APPLIED_INDEX.set(id.index as i64);
        }
        Ok(responses)
    }

    async fn get_snapshot_builder(&mut self) -> Self::SnapshotBuilder {
        self.clone()
    }

    async fn begin_receiving_snapshot(&mut self) -> StorageResult<Box<Cursor<Vec<u8>>>> {
        Ok(Box::new(Cursor::new(Vec::new())))
    }

    async fn install_snapshot(
        &mut self,
        meta: &SnapshotMeta<NodeId, openraft::BasicNode>,
        snapshot: Box<Cursor<Vec<u8>>>,
    ) -> StorageResult<()> {
        let stored = StoredSnapshot { meta: meta.clone(), data: snapshot.into_inner() };
        self.restore(&stored.meta, &stored.data)?;
        self.persist(&stored).await?;
        Ok(())
    }

    async fn get_current_snapshot(&mut self) -> StorageResult<Option<Snapshot<TypeConfig>>> {
        Ok(self
            .read_stored()?
            .map(|stored| Snapshot { meta: stored.meta, snapshot: Box::new(Cursor::new(stored.data)) }))
    }
}
