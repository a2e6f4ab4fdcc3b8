//! Copying a chunk from one chunk server to another: whole, for snapshot
//! copies and new replicas; or only the blocks that differ, for a replica
//! catching up.

use futures::StreamExt;

use super::client::{ClientError, DataClient};
use super::{ChunkAt, ErrorCode, BAD_BLOCK_HASH, BLOCK_SIZE};

/// Where a copied chunk goes and under which fencing it is written.
#[derive(Clone, Copy, Debug)]
pub struct CopyTarget {
    pub data_id: u64,
    pub chunk: u64,
    /// Chunk size in bytes.
    pub size: u64,
    /// Generation the new chunk is created with and written under.
    pub generation: u64,
    /// Fencing epoch of the writes: the volume's newest, so that a server
    /// which has seen it accepts them.
    pub epoch: u64,
}

/// Whether `member`'s copy of a chunk may be the source of a copy: no region
/// of it is listed as recovered, i.e. written and unflushed when the server
/// crashed (possibly torn, or missing writes its peers kept) or found bad
/// by a read or scrub. Such a copy is the one to rebuild, never the one to
/// rebuild from.
pub async fn holds_clean_copy(member: &DataClient, data_id: u64, chunk: u64) -> Result<bool, ClientError> {
    let regions = member.dirty_regions(Some(data_id)).await?;
    Ok(!regions.iter().any(|r| r.chunk == chunk && r.is_recovered()))
}

/// Replaces whatever `to` holds of the chunk with `from`'s copy, checked
/// block by block (the checksums travel with the data), and makes it
/// durable. `from` must hold the chunk at `from_generation` (0: any).
/// Blocks that read as zeros are skipped: a new chunk reads as zeros
/// already. Returns the bytes written to `to`.
pub async fn copy_chunk(
    from: &DataClient,
    from_generation: u64,
    to: &DataClient,
    target: CopyTarget,
) -> Result<u64, ClientError> {
    let CopyTarget { data_id, chunk, size, generation, epoch } = target;
    let size = u32::try_from(size).map_err(|_| ClientError::Protocol(format!("chunk size {size} too large")))?;
    match to.delete_chunk(data_id, chunk, 0).await {
        Err(e) if e.code() != Some(ErrorCode::NoSuchChunk) => return Err(e),
        _ => {}
    }
    to.create_chunk(data_id, chunk, size, generation).await?;
    let mut stream = from.read_chunk_stream(data_id, chunk, 0, 0, from_generation).await?;
    let mut written = 0;
    while let Some(segment) = stream.next().await {
        let segment = segment?;
        if segment.data.iter().all(|b| *b == 0) {
            continue;
        }
        written += segment.data.len() as u64;
        to.write(
            ChunkAt { volume: data_id, chunk, offset: segment.offset, epoch, generation },
            segment.data,
            &segment.checksums,
            false,
        )
        .await?;
    }
    to.flush(Some(data_id)).await?;
    Ok(written)
}

/// Range whose block hashes one request covers when catching a copy up.
const SYNC_SEGMENT: u64 = 4 << 20;
/// Most blocks one catch-up read and write carry.
const SYNC_RUN: usize = 256;
/// Catch-up reads and writes in flight at once.
const SYNC_IN_FLIGHT: usize = 32;

/// Brings `to`'s copy of the chunk, if it holds one, to `from`'s: both
/// hash their blocks and only the blocks that differ travel, so a replica
/// that missed the writes of a short absence catches up with those (DRBD's
/// checksum-based resync; Longhorn's fast rebuild). A target without the
/// chunk, with one of another size or one ahead of `target.generation`
/// gets a whole copy ([`copy_chunk`]). The copy ends at
/// `target.generation`, durable, with its recovered regions cleared (it
/// now matches `from` there too). Returns the bytes written to `to`.
pub async fn sync_chunk(
    from: &DataClient,
    from_generation: u64,
    to: &DataClient,
    target: CopyTarget,
) -> Result<u64, ClientError> {
    let CopyTarget { data_id, chunk, size, generation, epoch } = target;
    match to.chunk_info(data_id, chunk).await {
        Ok(info) if info.size == size && info.generation <= generation => {}
        Err(e) if e.code() != Some(ErrorCode::NoSuchChunk) => return Err(e),
        _ => return copy_chunk(from, from_generation, to, target).await,
    }
    // Writers that still use the set it left are refused by it from now on.
    to.set_generation(data_id, chunk, generation).await?;
    let mut written = 0;
    let mut segment = 0;
    while segment < size {
        let length = (size - segment).min(SYNC_SEGMENT) as u32;
        let theirs = from.block_hashes(data_id, chunk, segment, length, from_generation).await?;
        if let Some(bad) = theirs.iter().position(|h| *h == BAD_BLOCK_HASH) {
            let offset = segment + (bad * BLOCK_SIZE) as u64;
            return Err(ClientError::Remote {
                code: ErrorCode::CorruptBlock,
                aux: offset,
                message: format!("the source's block at {offset} fails its checksum"),
            });
        }
        let ours = to.block_hashes(data_id, chunk, segment, length, generation).await?;
        // Scattered small runs are bound by round trips: keep several going.
        let base = segment;
        let copies = differing_runs(&theirs, &ours).into_iter().map(move |(first, count)| async move {
            let offset = base + (first * BLOCK_SIZE) as u64;
            let length = (count * BLOCK_SIZE) as u32;
            let (data, checksums) = from
                .read(ChunkAt { volume: data_id, chunk, offset, epoch, generation: from_generation }, length)
                .await?;
            to.write(ChunkAt { volume: data_id, chunk, offset, epoch, generation }, data, &checksums, false).await?;
            Ok::<u64, ClientError>(u64::from(length))
        });
        let mut copies = futures::stream::iter(copies).buffer_unordered(SYNC_IN_FLIGHT);
        while let Some(copied) = copies.next().await {
            written += copied?;
        }
        segment += u64::from(length);
    }
    to.flush(Some(data_id)).await?;
    to.clear_dirty_regions(data_id, chunk, 0, 0).await?;
    Ok(written)
}

/// Runs of consecutive blocks whose hashes differ, as (first, count), each
/// at most [`SYNC_RUN`] long.
fn differing_runs(theirs: &[u64], ours: &[u64]) -> Vec<(usize, usize)> {
    let mut runs: Vec<(usize, usize)> = Vec::new();
    for (block, _) in theirs.iter().zip(ours).enumerate().filter(|(_, (a, b))| a != b) {
        match runs.last_mut() {
            Some((first, count)) if *first + *count == block && *count < SYNC_RUN => *count += 1,
            _ => runs.push((block, 1)),
        }
    }
    runs
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn differing_blocks_come_in_bounded_runs() {
        let theirs: Vec<u64> = (0..600).collect();
        let mut ours = theirs.clone();
        for block in [3, 4, 5, 9] {
            ours[block] = 0;
        }
        ours[20..].iter_mut().for_each(|hash| *hash += 1);
        assert_eq!(differing_runs(&theirs, &ours), vec![(3, 3), (9, 1), (20, 256), (276, 256), (532, 68)]);
        assert!(differing_runs(&theirs, &theirs).is_empty());
    }
}
