//! A connection in the transmission phase moves from one NBD server to
//! another between two requests, as a kernel nbd device's connections move
//! from a serving process to its successor (`map --take-over`): every
//! request the client sent is answered exactly once, including those the
//! first server had read but not parsed and one whose payload was still
//! arriving, and the data is what the client wrote.

use std::collections::HashMap;
use std::time::Duration;

use bytes::Bytes;
use nbd_client::nbd::{proto, ExportOptions, NbdServer, Served, ServerConfig};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::UnixStream;

mod common;

use common::mem_export::TestMemExport;

const BLOCK: usize = 4096;
/// Writes sent before the hand-over: more than the first server may have in
/// flight, so the rest wait, read but not parsed, in its buffer.
const FIRST_WRITES: u64 = 12;
const FIRST_IN_FLIGHT: usize = 4;

fn request(command: u16, handle: u64, offset: u64, length: u32) -> Vec<u8> {
    proto::RequestHeader { flags: 0, command, handle, offset, length }.encode().to_vec()
}

fn block_of(value: u64) -> Vec<u8> {
    vec![value as u8 + 1; BLOCK]
}

#[tokio::test]
async fn a_connection_moves_to_another_server_without_losing_a_request() {
    let size = (FIRST_WRITES + 2) * BLOCK as u64;
    // Every request takes 300 ms: those in flight are still running when
    // the hand-over is asked for.
    let export = TestMemExport::slow(size, size, Duration::from_millis(300));
    let config = ServerConfig { max_in_flight: FIRST_IN_FLIGHT, ..ServerConfig::default() };
    let first = NbdServer::with_config(config);
    first.add_export("", export.clone(), ExportOptions::read_write()).unwrap();
    let second = NbdServer::single(export.clone(), ExportOptions::read_write());

    let (mut client, served) = UnixStream::pair().unwrap();
    // Sent before the first server reads anything: twelve whole writes and
    // the start of a thirteenth (its header and a quarter of its payload).
    let mut sent = Vec::new();
    for i in 0..FIRST_WRITES {
        sent.extend(request(proto::CMD_WRITE, i, i * BLOCK as u64, BLOCK as u32));
        sent.extend(block_of(i));
    }
    let partial = block_of(FIRST_WRITES);
    sent.extend(request(proto::CMD_WRITE, FIRST_WRITES, FIRST_WRITES * BLOCK as u64, BLOCK as u32));
    sent.extend(&partial[..BLOCK / 4]);
    client.write_all(&sent).await.unwrap();

    let serving = tokio::spawn({
        let first = first.clone();
        async move { first.serve_transmission(served, Bytes::new(), "").await }
    });
    tokio::time::sleep(Duration::from_millis(100)).await;
    first.hand_over();
    // The rest of the thirteenth write arrives while the first server stops.
    tokio::time::sleep(Duration::from_millis(50)).await;
    client.write_all(&partial[BLOCK / 4..]).await.unwrap();

    let (stream, unread) = match tokio::time::timeout(Duration::from_secs(30), serving).await.unwrap().unwrap() {
        Ok(Served::HandedOver { stream, unread }) => (stream, unread),
        Ok(Served::Closed) => panic!("the first server closed the connection instead of handing it over"),
        Err(e) => panic!("the first server failed: {e}"),
    };
    let per_write = proto::RequestHeader::LEN + BLOCK;
    assert!(
        unread.len() >= per_write,
        "requests read but not parsed go with the connection (got {} bytes)",
        unread.len()
    );
    let continuing = tokio::spawn(async move { second.serve_transmission(stream, unread, "").await });

    // Every write is answered once, without error.
    let mut answered: HashMap<u64, u32> = HashMap::new();
    while answered.len() < (FIRST_WRITES + 1) as usize {
        let (handle, error) = reply(&mut client).await;
        assert!(answered.insert(handle, error).is_none(), "handle {handle} answered twice");
    }
    assert!(answered.values().all(|e| *e == 0), "errors: {answered:?}");
    let expected: Vec<u8> = (0..=FIRST_WRITES).flat_map(block_of).collect();
    assert!(export.snapshot()[..expected.len()] == expected[..], "the export holds every write");

    // The second server goes on: a read of everything written, a disconnect.
    let read_handle = FIRST_WRITES + 1;
    client.write_all(&request(proto::CMD_READ, read_handle, 0, expected.len() as u32)).await.unwrap();
    let mut data = vec![0u8; expected.len()];
    assert_eq!(reply(&mut client).await, (read_handle, 0));
    client.read_exact(&mut data).await.unwrap();
    assert!(data == expected, "the second server reads back every write");
    client.write_all(&request(proto::CMD_DISC, 0, 0, 0)).await.unwrap();
    assert!(matches!(continuing.await.unwrap(), Ok(Served::Closed)));
}

/// The next reply header: its handle and error.
async fn reply(client: &mut UnixStream) -> (u64, u32) {
    let mut header = [0u8; proto::SimpleReplyHeader::LEN];
    tokio::time::timeout(Duration::from_secs(30), client.read_exact(&mut header))
        .await
        .expect("a reply within 30 s")
        .unwrap();
    let reply = proto::SimpleReplyHeader::decode(&header).expect("a reply header");
    (reply.handle, reply.error)
}
