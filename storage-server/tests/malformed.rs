//! Malformed frames get an error reply or a closed connection, and never
//! disturb other connections.

mod common;

use std::time::Duration;

use ballast_proto::frame::{
    decode_reply, ChunkAt, ErrorCode, Opcode, Reply, RequestHeader, BLOCK_SIZE, MAX_PAYLOAD, REQUEST_MAGIC,
};
use bytes::BytesMut;
use common::{pattern, read_data, write, TestServer, BLOCK};
use storage_server::BackendChoice;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

/// Reads one reply, or `None` if the server closes the connection first.
async fn next_reply(s: &mut TcpStream, buf: &mut BytesMut) -> Option<Reply> {
    loop {
        if let Some(reply) = decode_reply(buf).expect("valid reply") {
            return Some(reply);
        }
        let read =
            tokio::time::timeout(Duration::from_secs(10), s.read_buf(buf)).await.expect("server answers or closes");
        match read {
            Ok(0) | Err(_) => return None,
            Ok(_) => {}
        }
    }
}

fn ping(id: u64) -> [u8; 64] {
    RequestHeader::new(Opcode::Ping, id).encode(0)
}

async fn malformed_frames(backend: BackendChoice) {
    let t = TestServer::start(backend).await;
    t.client.create_chunk(1, 0, 1 << 20, 1).await.unwrap();
    write(&t.client, 1, 0, 0, pattern(1, 0, 1), 0, false).await.unwrap();

    // Bad magic: no request id to answer, the connection is closed.
    let mut s = TcpStream::connect(t.addr()).await.unwrap();
    s.write_all(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n").await.unwrap();
    assert!(next_reply(&mut s, &mut BytesMut::new()).await.is_none());

    // Unknown opcode: an error reply, and the connection stays usable.
    let mut s = TcpStream::connect(t.addr()).await.unwrap();
    let mut frame = ping(11);
    frame[5] = 99;
    s.write_all(&frame).await.unwrap();
    s.write_all(&ping(12)).await.unwrap();
    let mut buf = BytesMut::new();
    let reply = next_reply(&mut s, &mut buf).await.unwrap();
    assert_eq!((reply.header.request_id, reply.header.status), (11, Err(ErrorCode::UnknownOpcode)));
    assert_eq!(reply.header.opcode, 99);
    let reply = next_reply(&mut s, &mut buf).await.unwrap();
    assert_eq!((reply.header.request_id, reply.header.status), (12, Ok(())));

    // Out-of-range and misaligned offsets: error replies, connection kept.
    let read = |id, offset, length| {
        RequestHeader { volume: 1, offset, length, ..RequestHeader::new(Opcode::Read, id) }.encode(0)
    };
    s.write_all(&read(13, 1 << 20, BLOCK as u32)).await.unwrap();
    s.write_all(&read(14, 100, BLOCK as u32)).await.unwrap();
    s.write_all(&read(15, 0, BLOCK as u32)).await.unwrap();
    let mut replies = Vec::new();
    for _ in 0..3 {
        let r = next_reply(&mut s, &mut buf).await.unwrap();
        replies.push((r.header.request_id, r.header.status, r.payload.len()));
    }
    replies.sort_unstable_by_key(|r| r.0);
    assert_eq!(replies[0].1, Err(ErrorCode::OutOfRange));
    assert_eq!(replies[1].1, Err(ErrorCode::Misaligned));
    assert_eq!((replies[2].1, replies[2].2), (Ok(()), BLOCK_SIZE + 4));

    // A large write whose length does not match its payload: its payload is
    // consumed, the error answered, and the connection kept.
    let header = RequestHeader { volume: 1, length: 1 << 20, ..RequestHeader::new(Opcode::Write, 20) };
    s.write_all(&header.encode(200 << 10)).await.unwrap();
    s.write_all(&vec![7u8; 200 << 10]).await.unwrap();
    s.write_all(&ping(21)).await.unwrap();
    let reply = next_reply(&mut s, &mut buf).await.unwrap();
    assert_eq!((reply.header.request_id, reply.header.status), (20, Err(ErrorCode::BadFrame)));
    let reply = next_reply(&mut s, &mut buf).await.unwrap();
    assert_eq!((reply.header.request_id, reply.header.status), (21, Ok(())));

    // Oversized payload: an error reply naming the request, then closed.
    let mut frame = ping(16);
    frame[44..48].copy_from_slice(&(MAX_PAYLOAD as u32 + 1).to_le_bytes());
    s.write_all(&frame).await.unwrap();
    let reply = next_reply(&mut s, &mut buf).await.unwrap();
    assert_eq!((reply.header.request_id, reply.header.status), (16, Err(ErrorCode::TooLarge)));
    assert!(next_reply(&mut s, &mut buf).await.is_none(), "closed after a fatal frame");

    // Bad version: answered, then closed.
    let mut s = TcpStream::connect(t.addr()).await.unwrap();
    let mut frame = ping(17);
    frame[4] = 9;
    s.write_all(&frame).await.unwrap();
    let mut buf = BytesMut::new();
    let reply = next_reply(&mut s, &mut buf).await.unwrap();
    assert_eq!((reply.header.request_id, reply.header.status), (17, Err(ErrorCode::BadFrame)));
    assert!(next_reply(&mut s, &mut buf).await.is_none());

    // A truncated frame then a hang-up: the server just drops the connection.
    let mut s = TcpStream::connect(t.addr()).await.unwrap();
    s.write_all(&REQUEST_MAGIC.to_le_bytes()).await.unwrap();
    s.write_all(&[1, 3, 0]).await.unwrap();
    drop(s);

    // The long-lived client connection and a new one still work.
    t.client.ping().await.unwrap();
    let fresh = t.connect().await;
    assert_eq!(
        read_data(&fresh, ChunkAt { volume: 1, chunk: 0, offset: 0, epoch: 1, generation: 0 }, BLOCK as u32).await,
        pattern(1, 0, 1)
    );
    t.stop().await;
}

both_backends!(malformed_frames);

/// Past `--max-connections` a new connection is closed as soon as it is
/// accepted, the ones open are served on, and a freed slot is taken again.
#[tokio::test]
async fn connections_past_the_limit_are_closed_and_the_rest_served() {
    let dir = tempfile::tempdir().unwrap();
    let server = common::Binary::start(dir.path(), &["--max-connections", "3"]);
    let mut open = Vec::new();
    for _ in 0..3 {
        let client = ballast_proto::frame::DataClient::connect_tcp(server.tcp).await.unwrap();
        client.ping().await.unwrap();
        open.push(client);
    }
    let one_more = ballast_proto::frame::DataClient::connect_tcp(server.tcp).await.unwrap();
    assert!(one_more.ping().await.is_err(), "a connection past the limit was served");
    for client in &open {
        client.ping().await.unwrap();
    }
    drop(open.pop());
    let mut served = false;
    for _ in 0..50 {
        let client = ballast_proto::frame::DataClient::connect_tcp(server.tcp).await.unwrap();
        if client.ping().await.is_ok() {
            served = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert!(served, "the freed slot was never taken again");
}
