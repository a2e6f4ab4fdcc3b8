//! Replication: a change goes to every replica of the chunk's current set
//! and is acknowledged only when each of them has it, or when the ones that
//! failed have been removed from the set through the metadata service and
//! enough replicas remain. Reads go to one replica, the one expected to
//! answer soonest, and fail over.

use std::future::Future;

use ballast_proto::frame::{ChunkAt, ClientError, DataClient, ErrorCode};
use ballast_proto::meta as pb;
use futures::future::{join_all, try_join_all};

use super::chunk_map::{ChunkView, Replica};
use super::{metrics, EngineError, Volume};

/// Attempts of one change before giving up on a chunk whose replica set
/// keeps changing underneath it.
const MAX_ATTEMPTS: usize = 5;

impl Volume {
    /// Runs one request against one replica, bounded by the replica timeout.
    async fn on_replica<T, F, Fut>(&self, replica: &Replica, request: F) -> Result<T, ClientError>
    where
        F: FnOnce(DataClient) -> Fut,
        Fut: Future<Output = Result<T, ClientError>>,
    {
        // A stopped server completes the TCP handshake in its kernel but
        // never the TLS one: connecting is bounded as well.
        let limit = self.options.replica_timeout;
        let (slot, client) = match tokio::time::timeout(limit, self.pool.get(&replica.address)).await {
            Ok(connected) => connected?,
            Err(_) => return Err(ClientError::Closed(format!("no connection within {limit:?}"))),
        };
        match tokio::time::timeout(limit, request(client)).await {
            Ok(Err(ClientError::Closed(reason))) => {
                self.pool.discard(&replica.address, slot);
                Err(ClientError::Closed(reason))
            }
            Ok(result) => result,
            Err(_) => {
                // The connection may be stuck; start afresh next time.
                self.pool.discard(&replica.address, slot);
                Err(ClientError::Closed(format!("no answer within {limit:?}")))
            }
        }
    }

    /// A refusal of the metadata service; ABORTED means a newer publish
    /// fenced this writer.
    fn meta_error(&self, status: tonic::Status) -> EngineError {
        match status.code() {
            tonic::Code::Aborted => EngineError::Fenced(self.options.epoch),
            _ => status.into(),
        }
    }

    /// The chunk's replica set, allocating the chunk on its first write.
    async fn view_for_write(&self, chunk: u64) -> Result<ChunkView, EngineError> {
        if let Some(view) = self.map.get(chunk) {
            return Ok(view);
        }
        let _allocating = self.allocation.lock().await;
        if let Some(view) = self.map.get(chunk) {
            return Ok(view);
        }
        let request =
            pb::AllocateChunkRequest { volume_id: self.info.id.clone(), chunk_index: chunk, epoch: self.options.epoch };
        let set = self.meta.allocate_chunk(request).await.map_err(|s| self.meta_error(s))?;
        let view = ChunkView::from(&set);
        let size = self.info.chunk_size_bytes as u32;
        let created = join_all(view.replicas.iter().map(|r| {
            self.on_replica(r, |c| async move {
                match c.create_chunk(self.info.data_id, chunk, size, view.generation).await {
                    Err(e) if e.code() == Some(ErrorCode::ChunkExists) => Ok(()),
                    other => other,
                }
            })
        }))
        .await;
        if let Some(refusal) = refused(&created) {
            return Err(refusal);
        }
        let failed = failures(&view, created);
        let view = if failed.is_empty() { view } else { self.drop_replicas(chunk, view, failed).await? };
        Ok(self.map.update(chunk, view))
    }

    /// Asks meta for the chunk's current replica set.
    async fn refresh_set(&self, chunk: u64) -> Result<ChunkView, EngineError> {
        let map = self.meta.get_chunk_map(pb::GetChunkMapRequest { volume_id: self.info.id.clone() }).await?;
        let set = map.chunks.iter().find(|s| s.chunk_index == chunk).ok_or(EngineError::Degraded {
            chunk,
            have: 0,
            need: self.min_replicas(),
        })?;
        Ok(self.map.update(chunk, ChunkView::from(set)))
    }

    /// Applies a change to every replica of `chunk`. `change` gets a
    /// connection and the generation the request must carry.
    pub(super) async fn replicate<F, Fut>(&self, chunk: u64, change: F) -> Result<(), EngineError>
    where
        F: Fn(DataClient, u64) -> Fut,
        Fut: Future<Output = Result<(), ClientError>>,
    {
        let mut view = self.view_for_write(chunk).await?;
        for _ in 0..MAX_ATTEMPTS {
            let generation = view.generation;
            let results =
                join_all(view.replicas.iter().map(|r| self.on_replica(r, |client| change(client, generation)))).await;
            if let Some(refusal) = refused(&results) {
                return Err(refusal);
            }
            if results.iter().any(|r| matches!(r, Err(e) if e.code() == Some(ErrorCode::StaleGeneration))) {
                // Our view is older than some replica's, or a replica is
                // older than the set: re-read, bring laggards up, and redo.
                let asked = view;
                view = self.refresh_set(chunk).await?;
                self.catch_up_generations(chunk, &asked, &results, &view).await;
                continue;
            }
            let failed = failures(&view, results);
            if failed.is_empty() {
                return Ok(());
            }
            // The survivors have the change; the failed ones leave the set
            // before the change is acknowledged.
            self.drop_replicas(chunk, view, failed).await?;
            return Ok(());
        }
        Err(EngineError::Degraded { chunk, have: view.replicas.len(), need: self.min_replicas() })
    }

    /// Moves members of `current` that refused a change for being behind its
    /// generation (whoever moved the set could not reach them then) to it.
    async fn catch_up_generations(
        &self,
        chunk: u64,
        asked: &ChunkView,
        results: &[Result<(), ClientError>],
        current: &ChunkView,
    ) {
        let generation = current.generation;
        let behind = asked.replicas.iter().zip(results).filter_map(|(replica, result)| match result {
            Err(ClientError::Remote { code: ErrorCode::StaleGeneration, aux, .. })
                if *aux < generation && current.replicas.iter().any(|r| r.server_id == replica.server_id) =>
            {
                Some(replica)
            }
            _ => None,
        });
        let data_id = self.info.data_id;
        join_all(
            behind.map(|r| self.on_replica(r, |c| async move { c.set_generation(data_id, chunk, generation).await })),
        )
        .await;
    }

    /// Reports `failed` replicas to meta, moves the survivors to the new
    /// generation (so they refuse changes sent under the old one), and
    /// checks that enough of them remain.
    async fn drop_replicas(
        &self,
        chunk: u64,
        mut view: ChunkView,
        mut failed: Vec<(Replica, ClientError)>,
    ) -> Result<ChunkView, EngineError> {
        while !failed.is_empty() {
            for (replica, error) in failed.drain(..) {
                tracing::warn!(volume = %self.info.id, chunk, server = %replica.server_id, %error,
                    "dropping failed replica from the chunk's set");
                let request = pb::ReportFailedReplicaRequest {
                    volume_id: self.info.id.clone(),
                    chunk_index: chunk,
                    server_id: replica.server_id.clone(),
                    generation: view.generation,
                    epoch: self.options.epoch,
                };
                match self.meta.report_failed_replica(request).await {
                    Ok(set) => {
                        view = ChunkView::from(&set);
                        metrics::REPLICAS_DROPPED.with_label_values(&[&self.info.id]).inc();
                    }
                    // The last replica is never dropped.
                    Err(status) if status.code() == tonic::Code::FailedPrecondition => {
                        return Err(EngineError::Degraded { chunk, have: 0, need: self.min_replicas() })
                    }
                    Err(status) => return Err(self.meta_error(status)),
                }
            }
            let generation = view.generation;
            let results = join_all(view.replicas.iter().map(|r| {
                self.on_replica(r, |c| async move { c.set_generation(self.info.data_id, chunk, generation).await })
            }))
            .await;
            failed = failures(&view, results);
        }
        let view = self.map.update(chunk, view);
        self.update_degraded_gauge();
        if view.replicas.len() < self.min_replicas() {
            return Err(EngineError::Degraded { chunk, have: view.replicas.len(), need: self.min_replicas() });
        }
        Ok(view)
    }

    /// Reads whole blocks from one replica, failing over to the others on
    /// errors and checksum failures, and reporting the replicas that failed.
    pub(super) async fn read_from_replicas(
        &self,
        chunk: u64,
        mut view: ChunkView,
        offset: u64,
        len: u32,
    ) -> Result<bytes::Bytes, EngineError> {
        let mut last = String::from("no replicas");
        for _ in 0..MAX_ATTEMPTS {
            let mut failed = Vec::new();
            let mut stale = false;
            for replica in self.read_order(&view) {
                let (epoch, generation) = (self.options.epoch, view.generation);
                let pending = self.read_choice.start(&replica.server_id);
                let read = self
                    .on_replica(&replica, |c| async move {
                        c.read(ChunkAt { volume: self.info.data_id, chunk, offset, epoch, generation }, len).await
                    })
                    .await;
                match &read {
                    // No answer: the connection failed, timed out, or carried corrupt data.
                    Err(e) if e.code().is_none() => pending.failed(self.options.replica_timeout),
                    _ => pending.answered(),
                }
                match read {
                    Ok((data, _checksums)) => {
                        if !failed.is_empty() {
                            // Best effort: the data is good; a failed report only delays repair.
                            let _ = self.drop_replicas(chunk, view.clone(), failed).await;
                        }
                        return Ok(data);
                    }
                    Err(e) if e.code() == Some(ErrorCode::StaleGeneration) => {
                        stale = true;
                        break;
                    }
                    Err(ClientError::Remote { code: ErrorCode::StaleEpoch, aux, .. }) => {
                        return Err(EngineError::Fenced(aux));
                    }
                    Err(ClientError::Remote { code: ErrorCode::PermissionDenied, message, .. }) => {
                        return Err(EngineError::Denied(message));
                    }
                    Err(e) => {
                        metrics::FAILOVERS.with_label_values(&[&self.info.id]).inc();
                        tracing::warn!(volume = %self.info.id, chunk, server = %replica.server_id, error = %e,
                            "read failed on replica, trying another");
                        last = e.to_string();
                        failed.push((replica, e));
                    }
                }
            }
            if !stale {
                if !failed.is_empty() {
                    let _ = self.drop_replicas(chunk, view.clone(), failed).await;
                }
                break;
            }
            view = self.refresh_set(chunk).await?;
        }
        Err(EngineError::Unreadable { chunk, last })
    }

    /// Replicas in the order a read tries them: the one expected to answer
    /// soonest first ([`read_choice`](super::read_choice)), replicas alike
    /// in that rotated so that reads spread over the set.
    fn read_order(&self, view: &ChunkView) -> Vec<Replica> {
        let mut order = view.replicas.clone();
        if order.is_empty() {
            return order;
        }
        let rotation = self.next_rotation() % order.len();
        order.rotate_left(rotation);
        self.read_choice.order(&mut order);
        order
    }

    /// Flushes the volume on every server holding one of its chunks. A
    /// server that fails the flush may have lost acknowledged writes: it
    /// leaves the replica set of every chunk it holds.
    pub(super) async fn flush_all_replicas(&self) -> Result<(), EngineError> {
        let chunks = self.map.all();
        let mut servers: Vec<Replica> = chunks.iter().flat_map(|(_, v)| v.replicas.iter().cloned()).collect();
        servers.sort_by(|a, b| a.server_id.cmp(&b.server_id));
        servers.dedup_by(|a, b| a.server_id == b.server_id);
        let data_id = self.info.data_id;
        let results =
            join_all(servers.iter().map(|r| self.on_replica(r, |c| async move { c.flush(Some(data_id)).await }))).await;
        if let Some(refusal) = refused(&results) {
            return Err(refusal);
        }
        let failed: Vec<(&Replica, String)> = servers
            .iter()
            .zip(results)
            .filter_map(|(server, result)| result.err().map(|e| (server, format!("flush failed: {e}"))))
            .collect();
        if failed.is_empty() {
            return Ok(());
        }
        // Every chunk on a failed server leaves it, all chunks at once: the
        // flush waits for the slowest drop, not for their sum.
        try_join_all(chunks.iter().filter_map(|(chunk, view)| {
            let on_chunk: Vec<(Replica, ClientError)> = failed
                .iter()
                .filter(|(server, _)| view.replicas.iter().any(|r| r.server_id == server.server_id))
                .map(|(server, why)| ((*server).clone(), ClientError::Closed(why.clone())))
                .collect();
            if on_chunk.is_empty() {
                return None;
            }
            let current = self.map.get(*chunk).unwrap_or_else(|| view.clone());
            Some(self.drop_replicas(*chunk, current, on_chunk))
        }))
        .await?;
        Ok(())
    }
}

/// A replica's refusal of this writer, as opposed to a replica's failure:
/// fenced by a newer epoch, or denied access. Nobody is dropped from a set
/// for it.
fn refused(results: &[Result<(), ClientError>]) -> Option<EngineError> {
    results.iter().find_map(|r| match r {
        Err(ClientError::Remote { code: ErrorCode::StaleEpoch, aux, .. }) => Some(EngineError::Fenced(*aux)),
        Err(ClientError::Remote { code: ErrorCode::PermissionDenied, message, .. }) => {
            Some(EngineError::Denied(message.clone()))
        }
        _ => None,
    })
}

/// Pairs each failed result with its replica.
fn failures(view: &ChunkView, results: Vec<Result<(), ClientError>>) -> Vec<(Replica, ClientError)> {
    view.replicas.iter().cloned().zip(results).filter_map(|(r, result)| result.err().map(|e| (r, e))).collect()
}
