//! The fixed newstyle handshake: greet, haggle over options, and pick the
//! export the transmission phase will serve.

use std::sync::Arc;

use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tracing::debug;

use crate::nbd::exports::{ExportEntry, ExportRegistry};
use crate::nbd::proto::{self, put_option_reply};
use crate::nbd::shutdown::ShutdownSignal;
use crate::nbd::NbdError;
use volume_engine::export::BlockExport;

/// Runs the handshake. `Ok(Some(export))` enters transmission with that
/// export; `Ok(None)` means the client aborted (or the server is stopping)
/// and the connection should simply be closed.
pub(crate) async fn negotiate<E, S>(
    stream: &mut S,
    exports: &ExportRegistry<E>,
    shutdown: &mut ShutdownSignal,
) -> Result<Option<Arc<ExportEntry<E>>>, NbdError>
where
    E: BlockExport,
    S: AsyncRead + AsyncWrite + Unpin,
{
    let mut greeting = Vec::with_capacity(18);
    greeting.extend_from_slice(&proto::NBDMAGIC.to_be_bytes());
    greeting.extend_from_slice(&proto::IHAVEOPT.to_be_bytes());
    greeting.extend_from_slice(&(proto::FLAG_FIXED_NEWSTYLE | proto::FLAG_NO_ZEROES).to_be_bytes());
    stream.write_all(&greeting).await?;
    stream.flush().await?;

    let client_flags = stream.read_u32().await?;
    if client_flags & !(proto::FLAG_C_FIXED_NEWSTYLE | proto::FLAG_C_NO_ZEROES) != 0 {
        return Err(NbdError::Protocol("unknown client flags"));
    }
    let no_zeroes = client_flags & proto::FLAG_C_NO_ZEROES != 0;

    loop {
        // An idle client in the handshake holds no requests: on shutdown just close.
        let magic = tokio::select! {
            biased;
            _ = shutdown.wait() => return Ok(None),
            magic = stream.read_u64() => magic?,
        };
        if magic != proto::IHAVEOPT {
            return Err(NbdError::Protocol("bad option magic"));
        }
        let option = stream.read_u32().await?;
        let len = stream.read_u32().await?;
        if len > proto::MAX_OPTION_LEN {
            return Err(NbdError::Protocol("option data too long"));
        }
        let mut data = vec![0u8; len as usize];
        stream.read_exact(&mut data).await?;
        debug!(option = proto::option_name(option), len, "NBD option");

        let mut out = Vec::new();
        if shutdown.is_triggered() && option != proto::OPT_ABORT {
            put_option_reply(&mut out, option, proto::REP_ERR_SHUTDOWN, b"server is shutting down");
            send(stream, &out).await?;
            continue;
        }
        match option {
            proto::OPT_EXPORT_NAME => {
                // This option cannot carry an error: an unknown name ends the session.
                let name = std::str::from_utf8(&data).map_err(|_| NbdError::Protocol("export name is not UTF-8"))?;
                let Some(entry) = exports.lookup(name) else {
                    return Err(NbdError::UnknownExport(name.to_owned()));
                };
                out.extend_from_slice(&entry.size().to_be_bytes());
                out.extend_from_slice(&entry.transmission_flags().to_be_bytes());
                if !no_zeroes {
                    out.extend_from_slice(&[0u8; 124]);
                }
                send(stream, &out).await?;
                return Ok(Some(entry));
            }
            proto::OPT_ABORT => {
                put_option_reply(&mut out, option, proto::REP_ACK, &[]);
                // The client may already have closed; that is fine.
                let _ = send(stream, &out).await;
                return Ok(None);
            }
            proto::OPT_LIST => {
                if !data.is_empty() {
                    put_option_reply(&mut out, option, proto::REP_ERR_INVALID, b"NBD_OPT_LIST takes no data");
                } else {
                    for entry in exports.list() {
                        let mut server = Vec::with_capacity(4 + entry.name.len());
                        server.extend_from_slice(&(entry.name.len() as u32).to_be_bytes());
                        server.extend_from_slice(entry.name.as_bytes());
                        if let Some(description) = &entry.options.description {
                            server.extend_from_slice(description.as_bytes());
                        }
                        put_option_reply(&mut out, option, proto::REP_SERVER, &server);
                    }
                    put_option_reply(&mut out, option, proto::REP_ACK, &[]);
                }
                send(stream, &out).await?;
            }
            proto::OPT_INFO | proto::OPT_GO => {
                let chosen = answer_info(&mut out, option, &data, exports);
                send(stream, &out).await?;
                if option == proto::OPT_GO {
                    if let Some(entry) = chosen {
                        return Ok(Some(entry));
                    }
                }
            }
            _ => {
                // STARTTLS, STRUCTURED_REPLY, META_CONTEXT, EXTENDED_HEADERS and
                // anything newer: we serve simple replies without TLS.
                put_option_reply(&mut out, option, proto::REP_ERR_UNSUP, b"option not supported");
                send(stream, &out).await?;
            }
        }
    }
}

/// Builds the replies to `NBD_OPT_INFO`/`NBD_OPT_GO`; returns the export when
/// the request succeeded.
fn answer_info<E: BlockExport>(
    out: &mut Vec<u8>,
    option: u32,
    data: &[u8],
    exports: &ExportRegistry<E>,
) -> Option<Arc<ExportEntry<E>>> {
    let Some(request) = InfoRequest::parse(data) else {
        put_option_reply(out, option, proto::REP_ERR_INVALID, b"malformed info request");
        return None;
    };
    let Ok(name) = std::str::from_utf8(request.name) else {
        put_option_reply(out, option, proto::REP_ERR_INVALID, b"export name is not UTF-8");
        return None;
    };
    let Some(entry) = exports.lookup(name) else {
        put_option_reply(out, option, proto::REP_ERR_UNKNOWN, b"unknown export");
        return None;
    };

    let mut info = Vec::with_capacity(12);
    info.extend_from_slice(&proto::INFO_EXPORT.to_be_bytes());
    info.extend_from_slice(&entry.size().to_be_bytes());
    info.extend_from_slice(&entry.transmission_flags().to_be_bytes());
    put_option_reply(out, option, proto::REP_INFO, &info);

    if request.wants(proto::INFO_NAME) {
        let mut info = proto::INFO_NAME.to_be_bytes().to_vec();
        info.extend_from_slice(entry.name.as_bytes());
        put_option_reply(out, option, proto::REP_INFO, &info);
    }
    if let (true, Some(description)) = (request.wants(proto::INFO_DESCRIPTION), &entry.options.description) {
        let mut info = proto::INFO_DESCRIPTION.to_be_bytes().to_vec();
        info.extend_from_slice(description.as_bytes());
        put_option_reply(out, option, proto::REP_INFO, &info);
    }
    // Sent even when not requested (the spec allows it): a minimum of one
    // byte asks nothing of clients that ignore it.
    let mut info = proto::INFO_BLOCK_SIZE.to_be_bytes().to_vec();
    info.extend_from_slice(&proto::MIN_BLOCK_SIZE.to_be_bytes());
    info.extend_from_slice(&proto::PREFERRED_BLOCK_SIZE.to_be_bytes());
    info.extend_from_slice(&proto::MAX_PAYLOAD.to_be_bytes());
    put_option_reply(out, option, proto::REP_INFO, &info);

    put_option_reply(out, option, proto::REP_ACK, &[]);
    Some(entry)
}

/// The data of `NBD_OPT_INFO`/`NBD_OPT_GO`: a name and the info types wanted.
struct InfoRequest<'a> {
    name: &'a [u8],
    requests: &'a [u8],
}

impl<'a> InfoRequest<'a> {
    fn parse(data: &'a [u8]) -> Option<Self> {
        let name_len = u32::from_be_bytes(data.get(0..4)?.try_into().ok()?) as usize;
        let name = data.get(4..4usize.checked_add(name_len)?)?;
        let rest = &data[4 + name_len..];
        let count = u16::from_be_bytes(rest.get(0..2)?.try_into().ok()?) as usize;
        let requests = &rest[2..];
        (requests.len() == count * 2).then_some(Self { name, requests })
    }

    fn wants(&self, info: u16) -> bool {
        self.requests.chunks_exact(2).any(|r| u16::from_be_bytes([r[0], r[1]]) == info)
    }
}

async fn send<S: AsyncWrite + Unpin>(stream: &mut S, bytes: &[u8]) -> std::io::Result<()> {
    stream.write_all(bytes).await?;
    stream.flush().await
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn info_request_parsing() {
        let mut data = 3u32.to_be_bytes().to_vec();
        data.extend_from_slice(b"vol");
        data.extend_from_slice(&2u16.to_be_bytes());
        data.extend_from_slice(&proto::INFO_NAME.to_be_bytes());
        data.extend_from_slice(&proto::INFO_BLOCK_SIZE.to_be_bytes());
        let request = InfoRequest::parse(&data).unwrap();
        assert_eq!(request.name, b"vol");
        assert!(request.wants(proto::INFO_NAME));
        assert!(request.wants(proto::INFO_BLOCK_SIZE));
        assert!(!request.wants(proto::INFO_DESCRIPTION));

        // Count disagreeing with the length, truncated data, absurd name length.
        assert!(InfoRequest::parse(&data[..data.len() - 1]).is_none());
        assert!(InfoRequest::parse(&data[..5]).is_none());
        assert!(InfoRequest::parse(&u32::MAX.to_be_bytes()).is_none());
        let mut empty_name = 0u32.to_be_bytes().to_vec();
        empty_name.extend_from_slice(&0u16.to_be_bytes());
        assert_eq!(InfoRequest::parse(&empty_name).unwrap().name, b"");
    }
}
