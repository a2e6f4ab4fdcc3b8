//! Clients that dial a unix socket by its path may send that path as the
//! HTTP/2 `:authority` of every request: the kubelet's plugin registration
//! client does, and so do gRPC C-core clients (Python's grpcio and the
//! tools built on it) on the CSI socket. The HTTP/2 server under tonic
//! refuses such a request as malformed (RST_STREAM PROTOCOL_ERROR). Both
//! sockets are served through [`serve`].
//!
//! [`serve`] accepts connections itself and forwards them to the gRPC
//! server over a socket pair, rewriting the `:authority` field of each
//! request header block to `localhost` and passing every other byte through.
//! Only the header block is touched: HPACK (RFC 7541) representations are
//! walked by their length prefixes, the one naming `:authority` (static
//! table index 1) gets the new value, and the rest is copied as it is. The
//! decoder's table then holds `localhost` where the client's holds the path,
//! at the same index, which keeps the two in step.

use std::io;

use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::net::{UnixListener, UnixStream};
use tokio::sync::mpsc;

const PREFACE_LEN: usize = 24;
const FRAME_HEADER_LEN: usize = 9;
const HEADERS: u8 = 0x1;
const END_HEADERS: u8 = 0x4;
const PADDED: u8 = 0x8;
const PRIORITY: u8 = 0x20;
/// `:authority` in HPACK's static table.
const AUTHORITY_INDEX: usize = 1;
const AUTHORITY: &[u8] = b"localhost";
/// `:authority` as a plain (not Huffman-coded) string literal: how gRPC
/// C-core names it instead of using the static table's index.
const AUTHORITY_NAME_LITERAL: &[u8] = b"\x0a:authority";

/// Accepts connections on `listener` and hands each to `connections`, as
/// the server end of a socket pair whose client end gets the rewritten bytes.
pub async fn serve(listener: UnixListener, connections: mpsc::Sender<io::Result<UnixStream>>) {
    loop {
        let client = match listener.accept().await {
            Ok((client, _)) => client,
            Err(err) => {
                tracing::warn!("accepting on a unix socket: {err}");
                continue;
            }
        };
        let (inner, server_end) = match UnixStream::pair() {
            Ok(pair) => pair,
            Err(err) => {
                tracing::warn!("creating a socket pair: {err}");
                continue;
            }
        };
        if connections.send(Ok(server_end)).await.is_err() {
            return;
        }
        tokio::spawn(async move {
            let (client_read, mut client_write) = client.into_split();
            let (mut inner_read, inner_write) = inner.into_split();
            let requests = forward_rewriting(client_read, inner_write);
            let responses = tokio::io::copy(&mut inner_read, &mut client_write);
            let _ = tokio::join!(requests, responses);
        });
    }
}

/// Copies client-to-server HTTP/2 bytes, rewriting request header blocks.
async fn forward_rewriting(mut from: impl AsyncRead + Unpin, mut to: impl AsyncWrite + Unpin) -> io::Result<()> {
    let mut preface = [0u8; PREFACE_LEN];
    from.read_exact(&mut preface).await?;
    to.write_all(&preface).await?;
    loop {
        let mut header = [0u8; FRAME_HEADER_LEN];
        match from.read_exact(&mut header).await {
            Ok(_) => {}
            Err(err) if err.kind() == io::ErrorKind::UnexpectedEof => return to.shutdown().await,
            Err(err) => return Err(err),
        }
        let length = u32::from_be_bytes([0, header[0], header[1], header[2]]) as usize;
        let mut payload = vec![0u8; length];
        from.read_exact(&mut payload).await?;
        let (frame_type, flags) = (header[3], header[4]);
        // A block split over CONTINUATION frames is passed on as it is.
        if frame_type == HEADERS && flags & END_HEADERS != 0 {
            if let Some(rewritten) = rewrite_headers_payload(flags, &payload) {
                let length = (rewritten.len() as u32).to_be_bytes();
                header[..3].copy_from_slice(&length[1..]);
                header[4] = flags & !PADDED;
                to.write_all(&header).await?;
                to.write_all(&rewritten).await?;
                continue;
            }
        }
        to.write_all(&header).await?;
        to.write_all(&payload).await?;
    }
}

/// A HEADERS frame's payload with the padding dropped and the header block
/// rewritten; `None` if it does not parse (it is then passed on unchanged).
fn rewrite_headers_payload(flags: u8, payload: &[u8]) -> Option<Vec<u8>> {
    let mut start = 0;
    let mut end = payload.len();
    if flags & PADDED != 0 {
        let padding = *payload.first()? as usize;
        start = 1;
        end = end.checked_sub(padding)?;
    }
    let mut out = Vec::with_capacity(payload.len());
    if flags & PRIORITY != 0 {
        out.extend_from_slice(payload.get(start..start + 5)?);
        start += 5;
    }
    out.extend(rewrite_block(payload.get(start..end)?)?);
    Some(out)
}

/// An HPACK integer with an `prefix_bits`-bit prefix at `block[*at]`.
fn read_integer(block: &[u8], at: &mut usize, prefix_bits: u32) -> Option<usize> {
    let max = (1usize << prefix_bits) - 1;
    let mut value = (*block.get(*at)? as usize) & max;
    *at += 1;
    if value < max {
        return Some(value);
    }
    let mut shift = 0;
    loop {
        let byte = *block.get(*at)?;
        *at += 1;
        value = value.checked_add(((byte & 0x7f) as usize).checked_shl(shift)?)?;
        shift += 7;
        if byte & 0x80 == 0 {
            return Some(value);
        }
        if shift > 28 {
            return None;
        }
    }
}

/// Skips an HPACK string literal (Huffman flag, length, bytes).
fn skip_string(block: &[u8], at: &mut usize) -> Option<()> {
    let length = read_integer(block, at, 7)?;
    *at = at.checked_add(length).filter(|&end| end <= block.len())?;
    Some(())
}

/// The header block with every `:authority` value replaced by `localhost`.
fn rewrite_block(block: &[u8]) -> Option<Vec<u8>> {
    let mut out = Vec::with_capacity(block.len());
    let mut at = 0;
    while at < block.len() {
        let first = block[at];
        let start = at;
        let prefix_bits = match first {
            b if b & 0x80 != 0 => {
                // Indexed field: one integer.
                read_integer(block, &mut at, 7)?;
                out.extend_from_slice(&block[start..at]);
                continue;
            }
            b if b & 0xc0 == 0x40 => 6, // literal, added to the table
            b if b & 0xe0 == 0x20 => {
                // Dynamic table size update: one integer.
                read_integer(block, &mut at, 5)?;
                out.extend_from_slice(&block[start..at]);
                continue;
            }
            _ => 4, // literal, not added (0000) or never indexed (0001)
        };
        let name_index = read_integer(block, &mut at, prefix_bits)?;
        let mut literal_name = None;
        if name_index == 0 {
            let name_start = at;
            skip_string(block, &mut at)?;
            literal_name = Some(&block[name_start..at]);
        }
        let value_start = at;
        skip_string(block, &mut at)?;
        if name_index == AUTHORITY_INDEX || literal_name == Some(AUTHORITY_NAME_LITERAL) {
            out.extend_from_slice(&block[start..value_start]);
            out.push(AUTHORITY.len() as u8);
            out.extend_from_slice(AUTHORITY);
        } else {
            out.extend_from_slice(&block[start..at]);
        }
    }
    Some(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    const PATH: &[u8] = b"/var/lib/kubelet/plugins_registry/csi.ballast.io-reg.sock";

    /// A short plain string literal: its length, then its bytes.
    fn string(value: &[u8]) -> Vec<u8> {
        [&[value.len() as u8][..], value].concat()
    }

    fn literal(first: u8, value: &[u8]) -> Vec<u8> {
        [&[first][..], &string(value)].concat()
    }

    #[test]
    fn the_authority_becomes_localhost_and_the_rest_is_kept() {
        // :method POST (indexed 3), :authority = path (literal with
        // indexing, name index 1), a literal with a literal name, and a
        // dynamic table size update.
        let mut block = vec![0x83];
        block.extend(literal(0x41, PATH));
        block.extend([0x00, 0x02, b't', b'e', 0x08]);
        block.extend_from_slice(b"trailers");
        block.push(0x3f);
        block.push(0xe1);
        block.push(0x1f); // size update to 4096
        let rewritten = rewrite_block(&block).unwrap();
        let mut expected = vec![0x83];
        expected.extend(literal(0x41, b"localhost"));
        expected.extend([0x00, 0x02, b't', b'e', 0x08]);
        expected.extend_from_slice(b"trailers");
        expected.extend([0x3f, 0xe1, 0x1f]);
        assert_eq!(rewritten, expected);
    }

    #[test]
    fn an_authority_named_by_a_literal_is_rewritten_too() {
        // gRPC C-core: literal with indexing, literal name ":authority",
        // the socket path URL-encoded; then an indexed field.
        let mut block = vec![0x40, 0x0a];
        block.extend_from_slice(b":authority");
        block.extend(string(b"tmp%2Fplugin%2Fcsi.sock"));
        block.push(0x83);
        let mut expected = vec![0x40, 0x0a];
        expected.extend_from_slice(b":authority");
        expected.push(9);
        expected.extend_from_slice(b"localhost");
        expected.push(0x83);
        assert_eq!(rewrite_block(&block).unwrap(), expected);
        // Another literal name is left alone.
        let mut other = vec![0x40, 0x02];
        other.extend_from_slice(b"te");
        other.extend(string(b"trailers"));
        assert_eq!(rewrite_block(&other).unwrap(), other);
    }

    #[test]
    fn values_longer_than_the_prefix_and_never_indexed_fields() {
        // A value of 200 bytes needs a multi-byte length.
        let long = vec![b'x'; 200];
        let mut block = vec![0x11, 0x7f, 200 - 127];
        block.extend_from_slice(&long);
        let rewritten = rewrite_block(&block).unwrap();
        assert_eq!(rewritten, [&[0x11u8, 9][..], b"localhost"].concat());
    }

    #[test]
    fn padding_and_priority_are_handled() {
        let block = literal(0x41, PATH);
        let mut payload = vec![3]; // pad length
        payload.extend([0, 0, 0, 0, 16]); // priority
        payload.extend(&block);
        payload.extend([0, 0, 0]);
        let out = rewrite_headers_payload(PADDED | PRIORITY | END_HEADERS, &payload).unwrap();
        assert_eq!(out, [&[0u8, 0, 0, 0, 16][..], &literal(0x41, b"localhost")].concat());
    }

    #[test]
    fn truncated_blocks_are_left_alone() {
        assert_eq!(rewrite_block(&[0x41, 0x20, b'/']), None);
        assert_eq!(rewrite_block(&[0xff]), None);
    }
}
