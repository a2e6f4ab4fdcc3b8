//! Sending frames: a header plus payload parts written with vectored I/O, so
//! payload `Bytes` go from memory to the socket without being copied into an
//! intermediate buffer, and many small frames share one syscall.

use std::io::{self, IoSlice};

use bytes::Bytes;
use tokio::io::{AsyncWrite, AsyncWriteExt};
use tokio::sync::mpsc;

use super::{ReplyHeader, RequestHeader, REQUEST_HEADER_LEN};

/// Most iovecs handed to one `writev` (Linux `IOV_MAX` is 1024).
const MAX_IOV: usize = 256;
/// Bytes gathered into one batch of vectored writes.
const WRITE_BATCH_BYTES: usize = 4 << 20;

/// One encoded frame ready for the socket: header bytes and up to two payload
/// parts (data and checksums) sent back to back.
#[derive(Clone, Debug)]
pub struct WireFrame {
    header: [u8; REQUEST_HEADER_LEN],
    header_len: usize,
    parts: [Bytes; 2],
}

impl WireFrame {
    /// A request frame whose payload is `data` followed by `tail`.
    pub fn request(header: &RequestHeader, data: Bytes, tail: Bytes) -> WireFrame {
        let encoded = header.encode(data.len() + tail.len());
        WireFrame { header: encoded, header_len: encoded.len(), parts: [data, tail] }
    }

    /// A reply frame whose payload is `data` followed by `tail`.
    pub fn reply(header: &ReplyHeader, data: Bytes, tail: Bytes) -> WireFrame {
        let encoded = header.encode(data.len() + tail.len());
        let mut bytes = [0u8; REQUEST_HEADER_LEN];
        bytes[..encoded.len()].copy_from_slice(&encoded);
        WireFrame { header: bytes, header_len: encoded.len(), parts: [data, tail] }
    }

    /// Total encoded length.
    pub fn len(&self) -> usize {
        self.header_len + self.parts[0].len() + self.parts[1].len()
    }

    pub fn is_empty(&self) -> bool {
        false
    }

    fn slices(&self) -> [&[u8]; 3] {
        [&self.header[..self.header_len], &self.parts[0], &self.parts[1]]
    }
}

/// Writes `frames` in order with as few vectored writes as the socket allows.
pub async fn write_frames<W>(w: &mut W, frames: &[WireFrame]) -> io::Result<()>
where
    W: AsyncWrite + Unpin + ?Sized,
{
    let slices: Vec<&[u8]> = frames.iter().flat_map(WireFrame::slices).filter(|s| !s.is_empty()).collect();
    let mut iov: Vec<IoSlice<'_>> = Vec::with_capacity(slices.len().min(MAX_IOV));
    let (mut idx, mut off) = (0, 0);
    while idx < slices.len() {
        iov.clear();
        iov.push(IoSlice::new(&slices[idx][off..]));
        iov.extend(slices[idx + 1..].iter().take(MAX_IOV - 1).map(|s| IoSlice::new(s)));
        let mut n = w.write_vectored(&iov).await?;
        if n == 0 {
            return Err(io::ErrorKind::WriteZero.into());
        }
        while n > 0 {
            let left = slices[idx].len() - off;
            if n >= left {
                n -= left;
                idx += 1;
                off = 0;
            } else {
                off += n;
                n = 0;
            }
        }
    }
    w.flush().await
}

/// Sends every frame received on `rx`, batching whatever is queued into one
/// vectored write, until all senders are gone; then shuts the write side down.
pub async fn write_loop<W>(mut writer: W, mut rx: mpsc::Receiver<WireFrame>) -> io::Result<()>
where
    W: AsyncWrite + Unpin,
{
    let mut batch = Vec::new();
    while let Some(frame) = rx.recv().await {
        let mut bytes = frame.len();
        batch.push(frame);
        while bytes < WRITE_BATCH_BYTES {
            let Ok(frame) = rx.try_recv() else { break };
            bytes += frame.len();
            batch.push(frame);
        }
        write_frames(&mut writer, &batch).await?;
        batch.clear();
    }
    writer.shutdown().await
}
