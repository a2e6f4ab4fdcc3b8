//! Copying a whole chunk from one chunk server to another: snapshot copies
//! and replica rebuilds.

use super::client::{ClientError, DataClient};
use super::ErrorCode;

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
        to.write(data_id, chunk, segment.offset, segment.data, &segment.checksums, epoch, generation, false).await?;
    }
    to.flush(Some(data_id)).await?;
    Ok(written)
}
