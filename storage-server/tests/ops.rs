//! Every operation, over real sockets, on both I/O backends.

mod common;

use ballast_proto::frame::{block_checksums, ChunkAt, ChunkEntry, DataClient, ErrorCode, DIRTY_RECOVERED};
use bytes::Bytes;
use common::{code, pattern, read_data, write, TestServer, BLOCK};
use storage_server::BackendChoice;

const MIB: u64 = 1 << 20;
const VOL: u64 = 0xabc;

async fn started(backend: BackendChoice) -> TestServer {
    let t = TestServer::start(backend).await;
    let expected = match backend {
        BackendChoice::Threadpool => storage_server::BackendKind::ThreadPool,
        _ => storage_server::BackendKind::Uring,
    };
    assert_eq!(t.server().backend(), expected);
    t
}

async fn write_and_read_round_trip(backend: BackendChoice) {
    let t = started(backend).await;
    let c = &t.client;
    c.ping().await.unwrap();
    c.create_chunk(VOL, 0, (4 * MIB) as u32, 1).await.unwrap();

    // Unwritten blocks read as zeros, with the checksum of a zero block.
    let (data, crcs) =
        c.read(ChunkAt { volume: VOL, chunk: 0, offset: 0, epoch: 1, generation: 0 }, 2 * BLOCK as u32).await.unwrap();
    assert!(data.iter().all(|&b| b == 0));
    assert_eq!(crcs, block_checksums(&data));

    let data = pattern(1, 3, 5);
    write(c, VOL, 0, 3 * BLOCK, data.clone(), 1, false).await.unwrap();
    let (got, crcs) = c
        .read(ChunkAt { volume: VOL, chunk: 0, offset: 3 * BLOCK, epoch: 1, generation: 1 }, 5 * BLOCK as u32)
        .await
        .unwrap();
    assert_eq!(got, data);
    assert_eq!(crcs, block_checksums(&data));

    // A read spanning written and unwritten blocks.
    let (got, _) = c
        .read(ChunkAt { volume: VOL, chunk: 0, offset: 2 * BLOCK, epoch: 1, generation: 0 }, 7 * BLOCK as u32)
        .await
        .unwrap();
    assert!(got[..BLOCK as usize].iter().all(|&b| b == 0));
    assert_eq!(&got[BLOCK as usize..6 * BLOCK as usize], &data[..]);
    assert!(got[6 * BLOCK as usize..].iter().all(|&b| b == 0));

    // A large write and a FUA write.
    let big = pattern(2, 256, 512);
    write(c, VOL, 0, MIB, big.clone(), 1, true).await.unwrap();
    assert_eq!(
        read_data(c, ChunkAt { volume: VOL, chunk: 0, offset: MIB, epoch: 1, generation: 0 }, 2 * MIB as u32).await,
        big
    );
    // The last block of the chunk.
    let last = pattern(3, 1023, 1);
    write(c, VOL, 0, 4 * MIB - BLOCK, last.clone(), 1, false).await.unwrap();
    assert_eq!(
        read_data(c, ChunkAt { volume: VOL, chunk: 0, offset: 4 * MIB - BLOCK, epoch: 1, generation: 0 }, BLOCK as u32)
            .await,
        last
    );
    c.flush(Some(VOL)).await.unwrap();
    c.flush(None).await.unwrap();

    // Unix socket too.
    let unix = DataClient::connect_unix(t.server().unix_path().unwrap()).await.unwrap();
    assert_eq!(
        read_data(
            &unix,
            ChunkAt { volume: VOL, chunk: 0, offset: 3 * BLOCK, epoch: 1, generation: 0 },
            5 * BLOCK as u32
        )
        .await,
        data
    );
    assert!(!unix.is_closed());
    t.stop().await;
    // The server is gone: calls fail and the client says it is closed.
    assert!(unix.ping().await.is_err());
    assert!(unix.is_closed());
}

async fn pipelined_requests_complete(backend: BackendChoice) {
    let t = started(backend).await;
    let c = t.client.clone();
    c.create_chunk(VOL, 1, (2 * MIB) as u32, 1).await.unwrap();
    let mut tasks = Vec::new();
    for i in 0..64u64 {
        let c = c.clone();
        tasks.push(tokio::spawn(async move {
            let data = pattern(100 + i, i * 4, 4);
            write(&c, VOL, 1, i * 4 * BLOCK, data.clone(), 0, false).await.unwrap();
            let (got, _) = c
                .read(
                    ChunkAt { volume: VOL, chunk: 1, offset: i * 4 * BLOCK, epoch: 1, generation: 0 },
                    4 * BLOCK as u32,
                )
                .await
                .unwrap();
            assert_eq!(got, data);
        }));
    }
    for task in tasks {
        task.await.unwrap();
    }
    t.stop().await;
}

async fn trim_and_write_zeroes(backend: BackendChoice) {
    let t = started(backend).await;
    let c = &t.client;
    c.create_chunk(VOL, 2, (2 * MIB) as u32, 1).await.unwrap();
    let data = pattern(7, 0, 64);
    write(c, VOL, 2, 0, data.clone(), 0, false).await.unwrap();

    c.trim(ChunkAt { volume: VOL, chunk: 2, offset: 4 * BLOCK, epoch: 0, generation: 1 }, 4 * BLOCK as u32, false)
        .await
        .unwrap();
    c.write_zeroes(
        ChunkAt { volume: VOL, chunk: 2, offset: 16 * BLOCK, epoch: 0, generation: 1 },
        4 * BLOCK as u32,
        true,
        false,
    )
    .await
    .unwrap();
    c.write_zeroes(
        ChunkAt { volume: VOL, chunk: 2, offset: 32 * BLOCK, epoch: 0, generation: 1 },
        4 * BLOCK as u32,
        false,
        true,
    )
    .await
    .unwrap();
    let (got, crcs) =
        c.read(ChunkAt { volume: VOL, chunk: 2, offset: 0, epoch: 1, generation: 0 }, 64 * BLOCK as u32).await.unwrap();
    assert_eq!(crcs, block_checksums(&got));
    for b in 0..64usize {
        let block = &got[b * BLOCK as usize..(b + 1) * BLOCK as usize];
        let zeroed = (4..8).contains(&b) || (16..20).contains(&b) || (32..36).contains(&b);
        if zeroed {
            assert!(block.iter().all(|&x| x == 0), "block {b} zeroed");
        } else {
            assert_eq!(block, &data[b * BLOCK as usize..(b + 1) * BLOCK as usize]);
        }
    }
    // Zeroes survive a restart (the checksum table was flushed on shutdown).
    let mut t = t;
    t.restart().await;
    let (again, _) = t
        .client
        .read(ChunkAt { volume: VOL, chunk: 2, offset: 0, epoch: 1, generation: 0 }, 64 * BLOCK as u32)
        .await
        .unwrap();
    assert_eq!(again, got);
    t.stop().await;
}

async fn chunk_admin(backend: BackendChoice) {
    let t = started(backend).await;
    let c = &t.client;
    c.create_chunk(VOL, 5, MIB as u32, 3).await.unwrap();
    c.create_chunk(VOL, 6, (2 * MIB) as u32, 3).await.unwrap();
    c.create_chunk(VOL + 1, 0, MIB as u32, 1).await.unwrap();
    assert_eq!(code(c.create_chunk(VOL, 5, MIB as u32, 3).await), ErrorCode::ChunkExists);
    assert_eq!(code(c.create_chunk(VOL, 9, 1000, 3).await), ErrorCode::Misaligned);
    assert_eq!(code(c.create_chunk(VOL, 9, 0, 3).await), ErrorCode::BadFrame);

    let listed = c.list_chunks(Some(VOL)).await.unwrap();
    assert_eq!(
        listed,
        vec![
            ChunkEntry { volume: VOL, chunk: 5, size: MIB, generation: 3 },
            ChunkEntry { volume: VOL, chunk: 6, size: 2 * MIB, generation: 3 },
        ]
    );
    assert_eq!(c.list_chunks(None).await.unwrap().len(), 3);

    let info = c.chunk_info(VOL, 5).await.unwrap();
    assert_eq!((info.size, info.generation), (MIB, 3));
    assert_eq!(info.blocks_unknown, 256);
    let crcs = block_checksums(&pattern(1, 0, 2));
    c.write(ChunkAt { volume: VOL, chunk: 5, offset: 0, epoch: 0, generation: 3 }, pattern(1, 0, 2), &crcs, false)
        .await
        .unwrap();
    let info = c.chunk_info(VOL, 5).await.unwrap();
    assert_eq!((info.blocks_ok, info.blocks_bad, info.blocks_unknown), (2, 0, 254));
    assert_eq!(info.dirty_regions, 1);

    // Generations: writes must match, reads with 0 skip the check.
    assert_eq!(
        code(
            c.write(
                ChunkAt { volume: VOL, chunk: 5, offset: 0, epoch: 0, generation: 2 },
                pattern(1, 0, 1),
                &crcs[..1],
                false
            )
            .await
        ),
        ErrorCode::StaleGeneration
    );
    c.set_generation(VOL, 5, 4).await.unwrap();
    assert_eq!(code(c.set_generation(VOL, 5, 3).await), ErrorCode::StaleGeneration);
    assert_eq!(
        code(
            c.write(
                ChunkAt { volume: VOL, chunk: 5, offset: 0, epoch: 0, generation: 3 },
                pattern(1, 0, 1),
                &crcs[..1],
                false
            )
            .await
        ),
        ErrorCode::StaleGeneration
    );
    c.write(ChunkAt { volume: VOL, chunk: 5, offset: 0, epoch: 0, generation: 4 }, pattern(1, 0, 1), &crcs[..1], false)
        .await
        .unwrap();
    assert_eq!(
        code(c.read(ChunkAt { volume: VOL, chunk: 5, offset: 0, epoch: 1, generation: 3 }, BLOCK as u32).await),
        ErrorCode::StaleGeneration
    );
    c.read(ChunkAt { volume: VOL, chunk: 5, offset: 0, epoch: 1, generation: 4 }, BLOCK as u32).await.unwrap();
    c.read(ChunkAt { volume: VOL, chunk: 5, offset: 0, epoch: 1, generation: 0 }, BLOCK as u32).await.unwrap();

    // Range and alignment checks.
    assert_eq!(
        code(c.read(ChunkAt { volume: VOL, chunk: 5, offset: MIB, epoch: 1, generation: 0 }, BLOCK as u32).await),
        ErrorCode::OutOfRange
    );
    assert_eq!(
        code(c.read(ChunkAt { volume: VOL, chunk: 5, offset: 100, epoch: 1, generation: 0 }, BLOCK as u32).await),
        ErrorCode::Misaligned
    );
    assert_eq!(
        code(c.read(ChunkAt { volume: VOL, chunk: 5, offset: 0, epoch: 1, generation: 0 }, 100).await),
        ErrorCode::Misaligned
    );
    assert_eq!(
        code(
            c.trim(
                ChunkAt { volume: VOL, chunk: 5, offset: MIB - BLOCK, epoch: 0, generation: 4 },
                2 * BLOCK as u32,
                false
            )
            .await
        ),
        ErrorCode::OutOfRange
    );
    assert_eq!(
        code(c.read(ChunkAt { volume: VOL, chunk: 77, offset: 0, epoch: 1, generation: 0 }, BLOCK as u32).await),
        ErrorCode::NoSuchChunk
    );

    // Delete: generation checked, then gone; the generation survives a restart.
    assert_eq!(code(c.delete_chunk(VOL, 6, 2).await), ErrorCode::StaleGeneration);
    c.delete_chunk(VOL, 6, 3).await.unwrap();
    assert_eq!(code(c.chunk_info(VOL, 6).await), ErrorCode::NoSuchChunk);
    assert_eq!(code(c.delete_chunk(VOL, 6, 0).await), ErrorCode::NoSuchChunk);
    assert!(!t.chunk_file(VOL, 6).exists());
    let mut t = t;
    t.restart().await;
    let listed = t.client.list_chunks(None).await.unwrap();
    assert_eq!(listed.len(), 2);
    assert_eq!(t.client.chunk_info(VOL, 5).await.unwrap().generation, 4);
    t.stop().await;
}

async fn chunk_stream(backend: BackendChoice) {
    let t = started(backend).await;
    let c = &t.client;
    let size = 3 * MIB + 8 * BLOCK;
    c.create_chunk(VOL, 7, size as u32, 1).await.unwrap();
    let data = pattern(9, 200, 300);
    write(c, VOL, 7, 200 * BLOCK, data.clone(), 0, false).await.unwrap();

    let mut stream = c.read_chunk_stream(VOL, 7, 0, 0, 1).await.unwrap();
    let mut whole = Vec::new();
    let mut segments = 0;
    while let Some(segment) = stream.next().await {
        let segment = segment.unwrap();
        assert_eq!(segment.offset, whole.len() as u64);
        assert_eq!(segment.checksums, block_checksums(&segment.data));
        whole.extend_from_slice(&segment.data);
        segments += 1;
    }
    assert_eq!(whole.len() as u64, size);
    assert!(segments >= 4, "streamed in segments");
    assert_eq!(&whole[200 * BLOCK as usize..500 * BLOCK as usize], &data[..]);

    // A sub-range, and a range past the end.
    let mut stream = c.read_chunk_stream(VOL, 7, 200 * BLOCK, 300 * BLOCK as u32, 0).await.unwrap();
    let mut part = Vec::new();
    while let Some(segment) = stream.next().await {
        part.extend_from_slice(&segment.unwrap().data);
    }
    assert_eq!(Bytes::from(part), data);
    let mut stream = c.read_chunk_stream(VOL, 7, size, BLOCK as u32, 0).await.unwrap();
    assert_eq!(code(stream.next().await.unwrap()), ErrorCode::OutOfRange);
    assert!(stream.next().await.is_none());
    t.stop().await;
}

async fn scrub_and_dirty_regions(backend: BackendChoice) {
    let t = started(backend).await;
    let c = &t.client;
    c.create_chunk(VOL, 8, (8 * MIB) as u32, 1).await.unwrap();
    c.create_chunk(VOL + 1, 8, MIB as u32, 1).await.unwrap();
    write(c, VOL, 8, 0, pattern(1, 0, 4), 0, false).await.unwrap();
    write(c, VOL, 8, 5 * MIB, pattern(1, 1280, 4), 0, false).await.unwrap();
    write(c, VOL + 1, 8, 0, pattern(1, 0, 4), 0, false).await.unwrap();

    let regions = c.dirty_regions(Some(VOL)).await.unwrap();
    let offsets: Vec<u64> = regions.iter().map(|r| r.offset).collect();
    assert_eq!(offsets, vec![0, 4 * MIB], "one 4 MiB region per written extent");
    assert!(regions.iter().all(|r| r.length == (4 * MIB) as u32 && r.flags & DIRTY_RECOVERED == 0));
    assert_eq!(c.dirty_regions(None).await.unwrap().len(), 3);

    c.flush(Some(VOL)).await.unwrap();
    assert!(c.dirty_regions(Some(VOL)).await.unwrap().is_empty(), "flush cleans");
    assert_eq!(c.dirty_regions(None).await.unwrap().len(), 1, "other volumes stay dirty");
    c.flush(None).await.unwrap();
    assert!(c.dirty_regions(None).await.unwrap().is_empty());

    let report = c.scrub(None).await.unwrap();
    assert_eq!(report.blocks_checked, (9 * MIB / BLOCK));
    assert!(report.bad.is_empty());
    let report = c.scrub(Some(VOL + 1)).await.unwrap();
    assert_eq!(report.blocks_checked, MIB / BLOCK);
    let info = c.chunk_info(VOL, 8).await.unwrap();
    assert_eq!(info.blocks_ok, (8 * MIB / BLOCK) as u32, "scrub verified every block");
    t.stop().await;
}

async fn capacity_and_exclusive_data_dir(backend: BackendChoice) {
    let dir = tempfile::tempdir().unwrap();
    let mut config = common::config(dir.path(), backend);
    config.capacity = Some(3 * MIB);
    let server = storage_server::start(config.clone()).await.unwrap();
    let c = DataClient::connect_tcp(server.tcp_addr().unwrap()).await.unwrap();
    c.create_chunk(1, 0, MIB as u32, 1).await.unwrap();
    // 1 MiB + 2 MiB of data plus headers and checksum tables exceed 3 MiB.
    assert_eq!(code(c.create_chunk(1, 1, (2 * MIB) as u32, 1).await), ErrorCode::NoSpace);
    c.create_chunk(1, 1, MIB as u32, 1).await.unwrap();
    c.delete_chunk(1, 0, 0).await.unwrap();
    c.create_chunk(1, 2, MIB as u32, 1).await.unwrap();

    // A second server on the same data directory is refused.
    config.unix = None;
    let err = storage_server::start(config).await.err().expect("second server refused");
    assert!(err.to_string().contains("in use"), "{err}");
    server.shutdown().await.unwrap();
}

both_backends!(
    capacity_and_exclusive_data_dir,
    write_and_read_round_trip,
    pipelined_requests_complete,
    trim_and_write_zeroes,
    chunk_admin,
    chunk_stream,
    scrub_and_dirty_regions,
);
