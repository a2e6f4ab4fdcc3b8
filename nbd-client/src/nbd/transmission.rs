//! The transmission phase of one connection: one reader parses requests and
//! starts each as its own task, the tasks answer in whatever order they
//! finish, and one writer puts the replies on the wire.

use std::io::{self, Cursor};
use std::sync::Arc;

use bytes::{Bytes, BytesMut};
use tokio::io::{
    AsyncBufRead, AsyncBufReadExt, AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt, BufReader, BufWriter,
};
use tokio::sync::{mpsc, OwnedSemaphorePermit, Semaphore};
use tracing::{debug, warn};

use crate::nbd::exports::ExportEntry;
use crate::nbd::proto::{self, RequestHeader, SimpleReplyHeader};
use crate::nbd::shutdown::ShutdownSignal;
use crate::nbd::NbdError;
use volume_engine::export::{BlockExport, ExportError};

/// Read buffering: big enough that a burst of small requests costs one
/// syscall, small enough to be irrelevant per connection.
const READ_BUFFER: usize = 256 * 1024;
const WRITE_BUFFER: usize = 256 * 1024;

/// One reply on its way to the writer.
struct Reply {
    handle: u64,
    error: u32,
    data: Option<Bytes>,
}

impl Reply {
    fn error(handle: u64, error: u32) -> Self {
        Self { handle, error, data: None }
    }
}

/// Why the reader stopped taking requests.
#[derive(Debug)]
enum ReadEnd {
    /// The client sent `NBD_CMD_DISC`.
    Disconnect,
    /// The client closed its side.
    Eof,
    /// The server is shutting down.
    Shutdown,
    /// The connection goes to another server, between two requests.
    HandOver,
}

/// How serving a connection ended.
pub enum Served<S> {
    /// The client disconnected or the server shut down; every request read
    /// was answered.
    Closed,
    /// Stopped between two requests for another server to go on with: every
    /// request read was answered, and `unread` holds what was read from the
    /// stream but not parsed yet (the start of the next requests), which
    /// that server must take first.
    HandedOver { stream: S, unread: Bytes },
}

/// Serves requests on `stream`, after the bytes in `unread`, until the
/// client disconnects, the server shuts down, or `handover` fires; in every
/// case the requests already read are answered first.
pub(crate) async fn serve<E, S>(
    stream: S,
    unread: Bytes,
    entry: Arc<ExportEntry<E>>,
    mut shutdown: ShutdownSignal,
    mut handover: Option<ShutdownSignal>,
    max_in_flight: usize,
) -> Result<Served<S>, NbdError>
where
    E: BlockExport,
    S: AsyncRead + AsyncWrite + Send + Unpin + 'static,
{
    let (read_half, write_half) = tokio::io::split(stream);
    let mut reader = BufReader::with_capacity(READ_BUFFER, Cursor::new(unread).chain(read_half));
    // Capacity equals the permit count, so a task never waits to queue its reply.
    let (tx, rx) = mpsc::channel(max_in_flight);
    let permits = Arc::new(Semaphore::new(max_in_flight));

    let writer = write_replies(write_half, rx);
    tokio::pin!(writer);
    let reader_result = {
        let read = read_requests(&mut reader, &entry, &tx, &permits, &mut shutdown, &mut handover);
        tokio::pin!(read);
        tokio::select! {
            end = &mut read => end,
            // The writer only ends early when the peer is gone.
            written = &mut writer => return written.map(|_| Served::Closed).map_err(NbdError::from),
        }
    };
    // Tasks still running hold clones of `tx`: the writer finishes once the
    // last of them has queued its reply.
    drop(tx);
    let mut write_half = writer.await?;
    match reader_result? {
        ReadEnd::HandOver => {
            // What the buffer holds comes before what the cursor still has.
            let mut rest = BytesMut::from(reader.buffer());
            let (cursor, read_half) = reader.into_inner().into_inner();
            rest.extend_from_slice(&cursor.get_ref()[cursor.position() as usize..]);
            Ok(Served::HandedOver { stream: read_half.unsplit(write_half), unread: rest.freeze() })
        }
        end => {
            debug!(?end, "NBD connection finished");
            match write_half.shutdown().await {
                Err(e) if e.kind() != io::ErrorKind::NotConnected => Err(e.into()),
                _ => Ok(Served::Closed),
            }
        }
    }
}

/// Resolves when the connection is to be handed over; never without a signal.
async fn handover_wanted(handover: &mut Option<ShutdownSignal>) {
    match handover {
        Some(signal) => signal.wait().await,
        None => std::future::pending().await,
    }
}

async fn read_requests<E, R>(
    reader: &mut R,
    entry: &Arc<ExportEntry<E>>,
    tx: &mpsc::Sender<Reply>,
    permits: &Arc<Semaphore>,
    shutdown: &mut ShutdownSignal,
    handover: &mut Option<ShutdownSignal>,
) -> Result<ReadEnd, NbdError>
where
    E: BlockExport,
    R: AsyncBufRead + Unpin,
{
    let mut payloads = BytesMut::new();
    loop {
        // Waiting for a permit stops reading, which pushes back on the client.
        let permit = tokio::select! {
            biased;
            _ = shutdown.wait() => return Ok(ReadEnd::Shutdown),
            _ = handover_wanted(handover) => return Ok(ReadEnd::HandOver),
            permit = permits.clone().acquire_owned() => permit.expect("semaphore is never closed"),
        };
        // Wait for the next request without consuming any of it, so that a
        // hand-over between requests leaves every byte to the next server.
        tokio::select! {
            biased;
            _ = shutdown.wait() => return Ok(ReadEnd::Shutdown),
            _ = handover_wanted(handover) => return Ok(ReadEnd::HandOver),
            filled = reader.fill_buf() => match filled {
                Ok([]) => return Ok(ReadEnd::Eof),
                Ok(_) => {}
                Err(e) => return Err(e.into()),
            },
        }
        let mut header = [0u8; RequestHeader::LEN];
        tokio::select! {
            biased;
            _ = shutdown.wait() => return Ok(ReadEnd::Shutdown),
            read = reader.read_exact(&mut header) => match read {
                Ok(_) => {}
                Err(e) if e.kind() == io::ErrorKind::UnexpectedEof => return Ok(ReadEnd::Eof),
                Err(e) => return Err(e.into()),
            },
        }
        let Some(request) = RequestHeader::decode(&header) else {
            return Err(NbdError::Protocol("bad request magic"));
        };

        let op = match request.command {
            proto::CMD_DISC => return Ok(ReadEnd::Disconnect),
            proto::CMD_WRITE => {
                if request.length > proto::MAX_PAYLOAD {
                    // The payload follows regardless: consume it to stay in sync.
                    tokio::select! {
                        biased;
                        _ = shutdown.wait() => return Ok(ReadEnd::Shutdown),
                        drained = drain(reader, request.length) => drained?,
                    }
                    debug!(handle = request.handle, len = request.length, "NBD write larger than the maximum payload");
                    send_now(tx, Reply::error(request.handle, proto::EINVAL), permit).await;
                    continue;
                }
                let data = tokio::select! {
                    biased;
                    _ = shutdown.wait() => return Ok(ReadEnd::Shutdown),
                    data = read_payload(reader, &mut payloads, request.length as usize) => data?,
                };
                validate_write(&request, entry, proto::CMD_FLAG_FUA).map(|()| Op::Write(data))
            }
            proto::CMD_READ => validate_read(&request, entry).map(|()| Op::Read),
            proto::CMD_FLUSH => check_flags(&request, proto::CMD_FLAG_FUA).map(|()| Op::Flush),
            proto::CMD_TRIM => validate_trim(&request, entry).map(|()| Op::Trim),
            proto::CMD_WRITE_ZEROES => {
                validate_write(&request, entry, proto::CMD_FLAG_FUA | proto::CMD_FLAG_NO_HOLE).map(|()| Op::WriteZeroes)
            }
            _ => Err(proto::EINVAL),
        };
        match op {
            Ok(op) => {
                let export = entry.export.clone();
                let tx = tx.clone();
                tokio::spawn(async move {
                    let reply = execute(&*export, &request, op).await;
                    let _ = tx.send(reply).await;
                    drop(permit);
                });
            }
            Err(errno) => {
                debug!(
                    command = proto::command_name(request.command),
                    flags = request.flags,
                    offset = request.offset,
                    len = request.length,
                    errno,
                    "NBD request refused"
                );
                send_now(tx, Reply::error(request.handle, errno), permit).await;
            }
        }
    }
}

/// A request that passed validation, ready for the export.
enum Op {
    Read,
    Write(Bytes),
    Flush,
    Trim,
    WriteZeroes,
}

async fn execute<E: BlockExport>(export: &E, request: &RequestHeader, op: Op) -> Reply {
    let fua = request.flags & proto::CMD_FLAG_FUA != 0;
    let (offset, len) = (request.offset, request.length);
    let (result, writes) = match op {
        Op::Read => match export.read(offset, len).await {
            Ok(data) if data.len() == len as usize => {
                return Reply { handle: request.handle, error: 0, data: Some(data) };
            }
            // A short or long buffer would desynchronise the stream.
            Ok(data) => {
                (Err(ExportError::Io(format!("export returned {} bytes for a {len}-byte read", data.len()))), false)
            }
            Err(e) => (Err(e), false),
        },
        Op::Write(data) => (export.write(offset, data, fua).await, true),
        Op::Flush => (export.flush().await, false),
        Op::Trim => (export.trim(offset, len, fua).await, true),
        Op::WriteZeroes => (export.write_zeroes(offset, len, fua).await, true),
    };
    match result {
        Ok(()) => Reply::error(request.handle, 0),
        Err(e) => {
            warn!(command = proto::command_name(request.command), offset, len, error = %e, "NBD request failed");
            Reply::error(request.handle, errno_for(&e, writes))
        }
    }
}

/// Maps an export error onto the error values the protocol allows.
fn errno_for(error: &ExportError, writes: bool) -> u32 {
    match error {
        ExportError::OutOfRange { .. } if writes => proto::ENOSPC,
        ExportError::OutOfRange { .. } => proto::EINVAL,
        ExportError::ReadOnly(_) => proto::EPERM,
        ExportError::NoSpace(_) => proto::ENOSPC,
        ExportError::Io(_) => proto::EIO,
    }
}

fn check_flags(request: &RequestHeader, allowed: u16) -> Result<(), u32> {
    if request.flags & !allowed != 0 {
        Err(proto::EINVAL)
    } else {
        Ok(())
    }
}

/// True when `[offset, offset + len)` is non-empty and inside the export.
fn in_range(request: &RequestHeader, size: u64) -> bool {
    request.length > 0 && request.offset.checked_add(u64::from(request.length)).is_some_and(|end| end <= size)
}

fn validate_read<E: BlockExport>(request: &RequestHeader, entry: &ExportEntry<E>) -> Result<(), u32> {
    check_flags(request, proto::CMD_FLAG_FUA)?;
    if request.length > proto::MAX_PAYLOAD || !in_range(request, entry.size()) {
        return Err(proto::EINVAL);
    }
    Ok(())
}

/// WRITE and WRITE_ZEROES: refused on read-only exports, `ENOSPC` past the end.
fn validate_write<E: BlockExport>(request: &RequestHeader, entry: &ExportEntry<E>, allowed: u16) -> Result<(), u32> {
    check_flags(request, allowed)?;
    if entry.options.read_only {
        return Err(proto::EPERM);
    }
    if request.length == 0 {
        return Err(proto::EINVAL);
    }
    if !in_range(request, entry.size()) {
        return Err(proto::ENOSPC);
    }
    Ok(())
}

fn validate_trim<E: BlockExport>(request: &RequestHeader, entry: &ExportEntry<E>) -> Result<(), u32> {
    check_flags(request, proto::CMD_FLAG_FUA)?;
    if entry.options.read_only {
        return Err(proto::EPERM);
    }
    if !in_range(request, entry.size()) {
        return Err(proto::EINVAL);
    }
    Ok(())
}

/// Queues a reply decided by the reader itself.
async fn send_now(tx: &mpsc::Sender<Reply>, reply: Reply, permit: OwnedSemaphorePermit) {
    let _ = tx.send(reply).await;
    drop(permit);
}

/// Reads a write payload into the shared buffer and splits it off. Once the
/// export has dropped earlier payloads the allocation is reused, so steady
/// state does not allocate per request.
async fn read_payload<R: AsyncRead + Unpin>(reader: &mut R, buf: &mut BytesMut, len: usize) -> io::Result<Bytes> {
    buf.reserve(len);
    let mut limited = reader.take(len as u64);
    while buf.len() < len {
        if limited.read_buf(buf).await? == 0 {
            return Err(io::ErrorKind::UnexpectedEof.into());
        }
    }
    Ok(buf.split_to(len).freeze())
}

/// Reads and discards `len` bytes.
async fn drain<R: AsyncRead + Unpin>(reader: &mut R, len: u32) -> io::Result<()> {
    let copied = tokio::io::copy(&mut reader.take(u64::from(len)), &mut tokio::io::sink()).await?;
    if copied < u64::from(len) {
        return Err(io::ErrorKind::UnexpectedEof.into());
    }
    Ok(())
}

/// Writes replies until every sender is gone; returns the writer with
/// everything flushed, for the caller to close or hand over.
async fn write_replies<W: AsyncWrite + Unpin>(writer: W, mut rx: mpsc::Receiver<Reply>) -> io::Result<W> {
    let mut writer = BufWriter::with_capacity(WRITE_BUFFER, writer);
    while let Some(reply) = rx.recv().await {
        write_reply(&mut writer, reply).await?;
        // Coalesce whatever else is ready into the same flush.
        while let Ok(reply) = rx.try_recv() {
            write_reply(&mut writer, reply).await?;
        }
        writer.flush().await?;
    }
    Ok(writer.into_inner())
}

async fn write_reply<W: AsyncWrite + Unpin>(writer: &mut BufWriter<W>, reply: Reply) -> io::Result<()> {
    writer.write_all(&SimpleReplyHeader { error: reply.error, handle: reply.handle }.encode()).await?;
    if let Some(data) = reply.data {
        writer.write_all(&data).await?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn request(offset: u64, length: u32) -> RequestHeader {
        RequestHeader { flags: 0, command: proto::CMD_READ, handle: 1, offset, length }
    }

    #[test]
    fn range_checks() {
        assert!(in_range(&request(0, 4096), 4096));
        assert!(!in_range(&request(1, 4096), 4096));
        assert!(!in_range(&request(4096, 1), 4096));
        assert!(!in_range(&request(0, 0), 4096));
        assert!(!in_range(&request(u64::MAX, 2), u64::MAX));
    }

    #[test]
    fn export_errors_map_to_protocol_errors() {
        let out_of_range = ExportError::OutOfRange { offset: 0, len: 1 };
        assert_eq!(errno_for(&out_of_range, true), proto::ENOSPC);
        assert_eq!(errno_for(&out_of_range, false), proto::EINVAL);
        assert_eq!(errno_for(&ExportError::ReadOnly("fenced".into()), true), proto::EPERM);
        assert_eq!(errno_for(&ExportError::NoSpace("full".into()), true), proto::ENOSPC);
        assert_eq!(errno_for(&ExportError::Io("checksum".into()), false), proto::EIO);
    }

    #[tokio::test]
    async fn payloads_reuse_the_buffer() {
        let data = vec![7u8; 8192];
        let mut reader = &data[..];
        let mut buf = BytesMut::new();
        let first = read_payload(&mut reader, &mut buf, 4096).await.unwrap();
        let ptr = first.as_ptr();
        drop(first);
        let second = read_payload(&mut reader, &mut buf, 4096).await.unwrap();
        assert_eq!(second.as_ptr(), ptr);
        assert!(second.iter().all(|b| *b == 7));
        assert!(read_payload(&mut reader, &mut buf, 1).await.is_err());
    }
}
