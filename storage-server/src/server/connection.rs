//! One client connection: a reader decoding pipelined requests, a task per
//! request, and one writer sending replies as they complete.

use std::sync::Arc;

use ballast_proto::frame::{
    decode_request, peek_request, write_loop, DecodeError, Opcode, RequestPrefix, WireFrame, REQUEST_HEADER_LEN,
};
use bytes::{BufMut, BytesMut};
use futures::stream::{FuturesUnordered, StreamExt};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite};
use tokio::sync::{mpsc, watch};

use super::access::{Access, Caller};
use super::handler::{decode_error_frame, Handler};
use crate::metrics::metrics;
use crate::store::buf::{AlignedBuf, BufPool};

/// Requests of one connection executing at once; further frames wait in
/// the socket, which pushes back on the client.
const MAX_INFLIGHT: usize = 256;
/// Reply frames queued for the writer. Streams send 1 MiB segments, so
/// this also bounds what a slow reader of a stream keeps in memory.
const REPLY_QUEUE: usize = 64;
const READ_CHUNK: usize = 256 << 10;
/// Write payloads at least this large are received into their own aligned
/// buffer rather than the connection's read buffer.
const DIRECT_MIN: usize = 64 << 10;

struct Gauge;

impl Gauge {
    fn new() -> Gauge {
        metrics().connections.inc();
        Gauge
    }
}

impl Drop for Gauge {
    fn drop(&mut self) {
        metrics().connections.dec();
    }
}

/// Serves one connection until the peer closes it, sends an undecodable
/// frame, or `stop` turns true; requests already running finish and their
/// replies are sent before it returns. `alive` tells the server the
/// connection still uses the store.
///
/// Requests run concurrently inside this one task rather than as spawned
/// tasks: that keeps a request on the thread that read it and saves waking
/// other runtime threads for each one.
pub async fn serve<R, W>(
    mut reader: R,
    writer: W,
    caller: Caller,
    handler: Arc<Handler>,
    mut stop: watch::Receiver<bool>,
    alive: mpsc::Sender<()>,
) where
    R: AsyncRead + Unpin,
    W: AsyncWrite + Unpin + Send + 'static,
{
    let _gauge = Gauge::new();
    // Requests are admitted in the order they arrive, so an AUTHORIZE
    // covers everything sent after it even though requests run concurrently.
    let mut access = Access::new(caller);
    let (tx, rx) = mpsc::channel::<WireFrame>(REPLY_QUEUE);
    let writer = tokio::spawn(async move {
        if let Err(e) = write_loop(writer, rx).await {
            tracing::debug!(error = %e, "connection write failed");
        }
    });
    let pool = handler.store().pool().clone();
    let mut running = FuturesUnordered::new();
    let mut buf = BytesMut::with_capacity(READ_CHUNK);
    let mut direct: Option<DirectPayload> = None;
    // After a large write, read the next header alone: if it starts another
    // large write, none of its payload lands in `buf` to be copied out.
    let mut after_direct = false;
    let mut reading = !*stop.borrow();
    while reading {
        while running.len() < MAX_INFLIGHT && direct.is_none() {
            direct = DirectPayload::start(&mut buf, &pool);
            if direct.is_some() {
                break;
            }
            match decode_request(&mut buf) {
                Ok(Some(req)) => {
                    let admitted = handler.admit(&mut access, &req);
                    running.push(handler.handle(req, admitted, &tx));
                }
                Ok(None) => break,
                Err(e) => {
                    if !bad_frame(&e, &tx).await {
                        reading = false;
                        break;
                    }
                }
            }
        }
        if !reading {
            break;
        }
        if direct.is_none() && buf.capacity() - buf.len() < READ_CHUNK / 4 {
            buf.reserve(READ_CHUNK);
        }
        let header_left = REQUEST_HEADER_LEN.saturating_sub(buf.len());
        let read = async {
            match direct.as_mut() {
                Some(d) => d.read(&mut reader).await,
                None if after_direct && header_left > 0 => reader.read_buf(&mut (&mut buf).limit(header_left)).await,
                None => reader.read_buf(&mut buf).await,
            }
        };
        tokio::select! {
            Some(()) = running.next(), if !running.is_empty() => {}
            read = read, if running.len() < MAX_INFLIGHT => match read {
                Ok(0) => reading = false,
                Ok(_) => {}
                Err(e) => {
                    tracing::debug!(error = %e, "connection read failed");
                    reading = false;
                }
            },
            _ = stop.changed() => reading = false,
        }
        after_direct = direct.is_some() || (after_direct && buf.len() < REQUEST_HEADER_LEN);
        if direct.as_ref().is_some_and(DirectPayload::complete) {
            let d = direct.take().expect("checked");
            match d.prefix.finish(d.payload.into_bytes()) {
                Ok(req) => {
                    let admitted = handler.admit(&mut access, &req);
                    running.push(handler.handle(req, admitted, &tx));
                }
                Err(e) => reading = bad_frame(&e, &tx).await,
            }
        }
    }
    // Let running requests finish and their replies go out.
    while running.next().await.is_some() {}
    drop(running);
    drop(tx);
    let _ = writer.await;
    // The server waits for `alive` before it closes the store: let go of
    // the store first.
    drop(handler);
    drop(alive);
}

/// Counts and answers an undecodable frame; false when the connection must close.
async fn bad_frame(e: &DecodeError, tx: &mpsc::Sender<WireFrame>) -> bool {
    metrics().bad_frames.inc();
    tracing::debug!(error = %e, fatal = e.is_fatal(), "bad frame");
    if let Some(id) = e.request_id() {
        let _ = tx.send(decode_error_frame(e, id)).await;
    }
    !e.is_fatal()
}

/// The payload of a large `WRITE`, received straight from the socket into an
/// aligned buffer that then goes to the disk as it is: no copy in between.
struct DirectPayload {
    prefix: RequestPrefix,
    payload: AlignedBuf,
    filled: usize,
}

impl DirectPayload {
    /// Takes over the frame at the front of `buf` if it is a large write
    /// whose payload has not fully arrived (`buf` holds nothing after it).
    fn start(buf: &mut BytesMut, pool: &BufPool) -> Option<DirectPayload> {
        let prefix = peek_request(buf).ok()??;
        let partial = buf.len() < prefix.frame_len();
        if prefix.opcode != Opcode::Write as u8 || prefix.payload_len < DIRECT_MIN || !partial {
            return None;
        }
        let mut payload = pool.get(prefix.payload_len);
        let filled = buf.len() - REQUEST_HEADER_LEN;
        payload[..filled].copy_from_slice(&buf[REQUEST_HEADER_LEN..]);
        buf.clear();
        Some(DirectPayload { prefix, payload, filled })
    }

    async fn read<R: AsyncRead + Unpin>(&mut self, reader: &mut R) -> std::io::Result<usize> {
        let n = reader.read(&mut self.payload[self.filled..]).await?;
        self.filled += n;
        Ok(n)
    }

    fn complete(&self) -> bool {
        self.filled == self.payload.len()
    }
}
