//! Model-based test: random writes, reads, trims, zeroing, flushes and
//! restarts against an in-memory model of the chunks; every read matches.

mod common;

use ballast_proto::frame::ChunkAt;
use common::{pattern, write, TestServer, BLOCK};
use proptest::prelude::*;
use storage_server::BackendChoice;

const VOL: u64 = 3;
const CHUNKS: u64 = 2;
const BLOCKS: u64 = 256;

#[derive(Clone, Debug)]
enum Op {
    Write { chunk: u64, block: u64, len: u64, tag: u64, fua: bool },
    Read { chunk: u64, block: u64, len: u64 },
    Trim { chunk: u64, block: u64, len: u64 },
    WriteZeroes { chunk: u64, block: u64, len: u64, no_hole: bool },
    Flush,
    Restart,
}

/// A block range inside a chunk: start, and a length clipped to the chunk.
fn range() -> impl Strategy<Value = (u64, u64, u64)> {
    (0..CHUNKS, 0..BLOCKS, 1..=24u64).prop_map(|(chunk, block, len)| (chunk, block, len.min(BLOCKS - block)))
}

fn op() -> impl Strategy<Value = Op> {
    prop_oneof![
        6 => (range(), any::<u64>(), any::<bool>())
            .prop_map(|((chunk, block, len), tag, fua)| Op::Write { chunk, block, len, tag, fua }),
        5 => range().prop_map(|(chunk, block, len)| Op::Read { chunk, block, len }),
        1 => range().prop_map(|(chunk, block, len)| Op::Trim { chunk, block, len }),
        1 => (range(), any::<bool>())
            .prop_map(|((chunk, block, len), no_hole)| Op::WriteZeroes { chunk, block, len, no_hole }),
        1 => Just(Op::Flush),
        1 => Just(Op::Restart),
    ]
}

async fn run(backend: BackendChoice, ops: Vec<Op>) {
    let mut t = TestServer::start(backend).await;
    let mut model = vec![vec![0u8; (BLOCKS * BLOCK) as usize]; CHUNKS as usize];
    for chunk in 0..CHUNKS {
        t.client.create_chunk(VOL, chunk, (BLOCKS * BLOCK) as u32, 1).await.unwrap();
    }
    let span = |block: u64, len: u64| (block * BLOCK) as usize..((block + len) * BLOCK) as usize;
    for op in ops {
        let c = t.client.clone();
        match op {
            Op::Write { chunk, block, len, tag, fua } => {
                let data = pattern(tag, block, len as usize);
                write(&c, VOL, chunk, block * BLOCK, data.clone(), 1, fua).await.unwrap();
                model[chunk as usize][span(block, len)].copy_from_slice(&data);
            }
            Op::Read { chunk, block, len } => {
                let (got, _) = c
                    .read(
                        ChunkAt { volume: VOL, chunk, offset: block * BLOCK, epoch: 1, generation: 1 },
                        (len * BLOCK) as u32,
                    )
                    .await
                    .unwrap();
                assert!(got[..] == model[chunk as usize][span(block, len)], "read {chunk}:{block}+{len} differs");
            }
            Op::Trim { chunk, block, len } => {
                c.trim(
                    ChunkAt { volume: VOL, chunk, offset: block * BLOCK, epoch: 1, generation: 1 },
                    (len * BLOCK) as u32,
                    false,
                )
                .await
                .unwrap();
                model[chunk as usize][span(block, len)].fill(0);
            }
            Op::WriteZeroes { chunk, block, len, no_hole } => {
                c.write_zeroes(
                    ChunkAt { volume: VOL, chunk, offset: block * BLOCK, epoch: 1, generation: 1 },
                    (len * BLOCK) as u32,
                    false,
                    no_hole,
                )
                .await
                .unwrap();
                model[chunk as usize][span(block, len)].fill(0);
            }
            Op::Flush => c.flush(Some(VOL)).await.unwrap(),
            Op::Restart => t.restart().await,
        }
    }
    for chunk in 0..CHUNKS {
        let (got, _) = t
            .client
            .read(ChunkAt { volume: VOL, chunk, offset: 0, epoch: 1, generation: 0 }, (BLOCKS * BLOCK) as u32)
            .await
            .unwrap();
        assert!(got[..] == model[chunk as usize][..], "chunk {chunk} differs at the end");
    }
    let report = t.client.scrub(None).await.unwrap();
    assert!(report.bad.is_empty(), "{report:?}");
    t.stop().await;
}

fn check(backend: BackendChoice, ops: Vec<Op>) {
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap()
        .block_on(run(backend, ops));
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 24, failure_persistence: None, ..ProptestConfig::default() })]

    #[test]
    fn model_uring(ops in proptest::collection::vec(op(), 1..48)) {
        check(BackendChoice::Uring, ops);
    }

    #[test]
    fn model_threadpool(ops in proptest::collection::vec(op(), 1..48)) {
        check(BackendChoice::Threadpool, ops);
    }
}
