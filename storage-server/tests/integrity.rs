//! Checksums end to end: corruption on disk is reported, never served, and
//! found by scrub; payloads that do not match their checksums are refused.

mod common;

use std::os::unix::fs::FileExt;

use ballast_proto::frame::{block_checksums, BadBlocks, ChunkAt, ErrorCode, BAD_BLOCK_HASH};
use common::{code, pattern, read_data, write, TestServer, BLOCK};
use storage_server::BackendChoice;

const MIB: u64 = 1 << 20;
const VOL: u64 = 42;
/// Data starts after the chunk file's 4 KiB header.
const HEADER: u64 = 4096;

fn flip_byte(path: &std::path::Path, at: u64) {
    let file = std::fs::OpenOptions::new().read(true).write(true).open(path).unwrap();
    let mut byte = [0u8; 1];
    file.read_exact_at(&mut byte, at).unwrap();
    byte[0] ^= 0x5a;
    file.write_all_at(&byte, at).unwrap();
    file.sync_all().unwrap();
}

async fn flipped_byte_is_reported_not_served(backend: BackendChoice) {
    let mut t = TestServer::start(backend).await;
    let c = t.client.clone();
    c.create_chunk(VOL, 0, (2 * MIB) as u32, 1).await.unwrap();
    c.create_chunk(VOL, 1, MIB as u32, 1).await.unwrap();
    let data = pattern(5, 0, 16);
    write(&c, VOL, 0, 0, data.clone(), 0, false).await.unwrap();
    write(&c, VOL, 1, 0, data.clone(), 0, false).await.unwrap();
    c.flush(None).await.unwrap();

    // Corrupt block 5 of chunk 0 behind the server's back; also a byte in
    // a never-written block (which must read as zeros).
    flip_byte(&t.chunk_file(VOL, 0), HEADER + 5 * BLOCK + 123);
    flip_byte(&t.chunk_file(VOL, 0), HEADER + 300 * BLOCK + 7);

    let err = c
        .read(ChunkAt { volume: VOL, chunk: 0, offset: 0, epoch: 1, generation: 0 }, 16 * BLOCK as u32)
        .await
        .unwrap_err();
    assert_eq!(err.code(), Some(ErrorCode::CorruptBlock));
    match err {
        ballast_proto::frame::ClientError::Remote { aux, .. } => assert_eq!(aux, 5 * BLOCK, "offset of the bad block"),
        other => panic!("{other}"),
    }
    assert_eq!(
        code(c.read(ChunkAt { volume: VOL, chunk: 0, offset: 5 * BLOCK, epoch: 1, generation: 0 }, BLOCK as u32).await),
        ErrorCode::CorruptBlock
    );
    assert_eq!(
        code(
            c.read(ChunkAt { volume: VOL, chunk: 0, offset: 300 * BLOCK, epoch: 1, generation: 0 }, BLOCK as u32).await
        ),
        ErrorCode::CorruptBlock
    );
    // Neighbours are fine.
    let (ok, _) =
        c.read(ChunkAt { volume: VOL, chunk: 0, offset: 0, epoch: 1, generation: 0 }, 5 * BLOCK as u32).await.unwrap();
    assert_eq!(ok, data.slice(..5 * BLOCK as usize));
    let mut stream = c.read_chunk_stream(VOL, 0, 0, 0, 0).await.unwrap();
    assert_eq!(code(stream.next().await.unwrap()), ErrorCode::CorruptBlock);
    // Block hashes name the bad blocks and tell the others apart by content.
    let hashes = c.block_hashes(VOL, 0, 0, 16 * BLOCK as u32, 0).await.unwrap();
    assert_eq!(hashes.len(), 16);
    assert_eq!(hashes.iter().position(|h| *h == BAD_BLOCK_HASH), Some(5));
    let unwritten = c.block_hashes(VOL, 0, 400 * BLOCK, 2 * BLOCK as u32, 0).await.unwrap();
    assert_eq!(unwritten[0], unwritten[1], "blocks of equal content hash alike");
    assert!(!hashes.contains(&unwritten[0]), "written blocks differ from zeros");

    let report = c.scrub(None).await.unwrap();
    assert_eq!(report.blocks_checked, 3 * MIB / BLOCK);
    assert_eq!(
        report.bad,
        vec![
            BadBlocks { volume: VOL, chunk: 0, first_block: 5, count: 1 },
            BadBlocks { volume: VOL, chunk: 0, first_block: 300, count: 1 },
        ]
    );
    let info = c.chunk_info(VOL, 0).await.unwrap();
    assert_eq!(info.blocks_bad, 2);

    // Still reported after a restart; a rewrite repairs the block.
    t.restart().await;
    let c = t.client.clone();
    assert_eq!(
        code(c.read(ChunkAt { volume: VOL, chunk: 0, offset: 0, epoch: 1, generation: 0 }, 16 * BLOCK as u32).await),
        ErrorCode::CorruptBlock
    );
    write(&c, VOL, 0, 5 * BLOCK, data.slice(5 * BLOCK as usize..6 * BLOCK as usize), 0, false).await.unwrap();
    assert_eq!(
        read_data(&c, ChunkAt { volume: VOL, chunk: 0, offset: 0, epoch: 1, generation: 0 }, 16 * BLOCK as u32).await,
        data
    );
    c.trim(ChunkAt { volume: VOL, chunk: 0, offset: 300 * BLOCK, epoch: 0, generation: 1 }, BLOCK as u32, false)
        .await
        .unwrap();
    let report = c.scrub(Some(VOL)).await.unwrap();
    assert!(report.bad.is_empty(), "{report:?}");
    t.stop().await;
}

async fn mismatched_payload_is_refused(backend: BackendChoice) {
    let t = TestServer::start(backend).await;
    let c = &t.client;
    c.create_chunk(VOL, 0, MIB as u32, 1).await.unwrap();
    let old = pattern(1, 0, 4);
    write(c, VOL, 0, 0, old.clone(), 0, false).await.unwrap();

    let new = pattern(2, 0, 4);
    let mut crcs = block_checksums(&new);
    crcs[2] ^= 1;
    let err = c
        .write(ChunkAt { volume: VOL, chunk: 0, offset: 0, epoch: 0, generation: 1 }, new.clone(), &crcs, true)
        .await
        .unwrap_err();
    assert_eq!(err.code(), Some(ErrorCode::ChecksumMismatch));
    // Nothing landed, not even the blocks before the bad one.
    assert_eq!(
        read_data(c, ChunkAt { volume: VOL, chunk: 0, offset: 0, epoch: 1, generation: 0 }, 4 * BLOCK as u32).await,
        old
    );
    // Too few checksums are a malformed frame.
    let mut raw = bytes::BytesMut::new();
    let header = ballast_proto::frame::RequestHeader {
        volume: VOL,
        length: 2 * BLOCK as u32,
        ..ballast_proto::frame::RequestHeader::new(ballast_proto::frame::Opcode::Write, 1)
    };
    raw.extend_from_slice(&header.encode(2 * BLOCK as usize + 4));
    raw.extend_from_slice(&new[..2 * BLOCK as usize]);
    raw.extend_from_slice(&[0; 4]);
    let reply = common_raw::round_trip(t.addr(), &raw).await;
    assert_eq!(reply.header.status, Err(ErrorCode::BadFrame));
    assert_eq!(
        read_data(c, ChunkAt { volume: VOL, chunk: 0, offset: 0, epoch: 1, generation: 0 }, 4 * BLOCK as u32).await,
        old
    );
    t.stop().await;
}

mod common_raw {
    use ballast_proto::frame::{decode_reply, Reply};
    use bytes::BytesMut;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    pub async fn round_trip(addr: std::net::SocketAddr, frame: &[u8]) -> Reply {
        let mut s = tokio::net::TcpStream::connect(addr).await.unwrap();
        s.write_all(frame).await.unwrap();
        let mut buf = BytesMut::new();
        loop {
            if let Some(reply) = decode_reply(&mut buf).unwrap() {
                return reply;
            }
            assert_ne!(s.read_buf(&mut buf).await.unwrap(), 0, "closed without a reply");
        }
    }
}

both_backends!(flipped_byte_is_reported_not_served, mismatched_payload_is_refused);
