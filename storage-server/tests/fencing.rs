//! Fencing: a change or a read carrying an older epoch than the newest seen
//! for its volume is refused, also after a restart.

mod common;

use ballast_proto::frame::{ChunkAt, ClientError, ErrorCode};
use common::{code, pattern, read_data, write, TestServer, BLOCK};
use storage_server::BackendChoice;

const VOL: u64 = 9;

async fn stale_epochs_are_refused(backend: BackendChoice) {
    let mut t = TestServer::start(backend).await;
    let c = t.client.clone();
    c.create_chunk(VOL, 0, 1 << 20, 1).await.unwrap();
    c.create_chunk(VOL + 1, 0, 1 << 20, 1).await.unwrap();
    write(&c, VOL, 0, 0, pattern(1, 0, 1), 0, false).await.unwrap();
    write(&c, VOL, 0, 0, pattern(2, 0, 1), 5, false).await.unwrap();

    // The old owner (epoch 4) is fenced off for writes, trims and zeroing.
    let err = write(&c, VOL, 0, 0, pattern(3, 0, 1), 4, false).await.unwrap_err();
    match &err {
        ClientError::Remote { code, aux, .. } => {
            assert_eq!(*code, ErrorCode::StaleEpoch);
            assert_eq!(*aux, 5, "reply carries the current epoch");
        }
        other => panic!("{other}"),
    }
    assert_eq!(
        code(c.trim(ChunkAt { volume: VOL, chunk: 0, offset: 0, epoch: 4, generation: 1 }, BLOCK as u32, false).await),
        ErrorCode::StaleEpoch
    );
    assert_eq!(
        code(
            c.write_zeroes(
                ChunkAt { volume: VOL, chunk: 0, offset: 0, epoch: 0, generation: 1 },
                BLOCK as u32,
                false,
                false
            )
            .await
        ),
        ErrorCode::StaleEpoch
    );
    // Nor may it read what the new owner wrote.
    assert_eq!(
        code(c.read(ChunkAt { volume: VOL, chunk: 0, offset: 0, epoch: 4, generation: 0 }, BLOCK as u32).await),
        ErrorCode::StaleEpoch
    );
    assert_eq!(
        read_data(&c, ChunkAt { volume: VOL, chunk: 0, offset: 0, epoch: 5, generation: 0 }, BLOCK as u32).await,
        pattern(2, 0, 1)
    );
    // Epochs are per volume.
    write(&c, VOL + 1, 0, 0, pattern(4, 0, 1), 1, false).await.unwrap();

    t.restart().await;
    let c = t.client.clone();
    assert_eq!(code(write(&c, VOL, 0, 0, pattern(3, 0, 1), 4, false).await), ErrorCode::StaleEpoch);
    assert_eq!(code(write(&c, VOL, 0, 0, pattern(3, 0, 1), 0, false).await), ErrorCode::StaleEpoch);
    assert_eq!(
        code(c.read(ChunkAt { volume: VOL, chunk: 0, offset: 0, epoch: 0, generation: 0 }, BLOCK as u32).await),
        ErrorCode::StaleEpoch
    );
    assert_eq!(
        read_data(&c, ChunkAt { volume: VOL, chunk: 0, offset: 0, epoch: 5, generation: 0 }, BLOCK as u32).await,
        pattern(2, 0, 1)
    );
    write(&c, VOL, 0, 0, pattern(6, 0, 1), 5, false).await.unwrap();
    write(&c, VOL, 0, 0, pattern(7, 0, 1), 6, false).await.unwrap();
    assert_eq!(code(write(&c, VOL, 0, 0, pattern(8, 0, 1), 5, false).await), ErrorCode::StaleEpoch);
    assert_eq!(
        read_data(&c, ChunkAt { volume: VOL, chunk: 0, offset: 0, epoch: 6, generation: 0 }, BLOCK as u32).await,
        pattern(7, 0, 1)
    );
    t.stop().await;
}

/// Concurrent writers with old and new epochs: once a newer epoch's write
/// is acknowledged, no older-epoch write lands after it.
async fn raising_epoch_races_old_writer(backend: BackendChoice) {
    let t = TestServer::start(backend).await;
    let c = t.client.clone();
    c.create_chunk(VOL, 1, 1 << 20, 1).await.unwrap();
    let old = {
        let c = c.clone();
        tokio::spawn(async move {
            let mut refused = 0;
            for i in 0..200u64 {
                if write(&c, VOL, 1, 0, pattern(1000 + i, 0, 1), 1, false).await.is_err() {
                    refused += 1;
                }
            }
            refused
        })
    };
    tokio::task::yield_now().await;
    write(&c, VOL, 1, 0, pattern(2, 0, 1), 2, false).await.unwrap();
    let refused = old.await.unwrap();
    // Old-epoch writes either landed before the new one or were refused.
    let (got, _) =
        c.read(ChunkAt { volume: VOL, chunk: 1, offset: 0, epoch: 2, generation: 0 }, BLOCK as u32).await.unwrap();
    assert_eq!(got, pattern(2, 0, 1), "a stale write landed after the new epoch's write ({refused} refused)");
    t.stop().await;
}

both_backends!(stale_epochs_are_refused, raising_epoch_races_old_writer);
