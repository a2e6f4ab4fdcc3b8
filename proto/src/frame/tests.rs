use bytes::{BufMut, Bytes, BytesMut};
use proptest::prelude::*;

use super::*;

fn data(blocks: usize, seed: u8) -> Bytes {
    (0..blocks * BLOCK_SIZE).map(|i| (i as u8).wrapping_mul(31).wrapping_add(seed)).collect::<Vec<u8>>().into()
}

fn request_for(opcode: Opcode) -> Request {
    let mut header = RequestHeader {
        flags: 0,
        volume: 0x1122_3344_5566_7788,
        chunk: 42,
        offset: 8192,
        length: 4096,
        epoch: 7,
        generation: 3,
        ..RequestHeader::new(opcode, 0xdead_beef_0000_0001 + opcode as u64)
    };
    let payload = match opcode {
        Opcode::Write => {
            header.flags = FLAG_FUA;
            header.length = 2 * BLOCK_SIZE as u32;
            let d = data(2, 9);
            let mut p = BytesMut::new();
            p.put_slice(&d);
            p.put_slice(Checksums::compute(&d).as_bytes());
            p.freeze()
        }
        Opcode::WriteZeroes => {
            header.flags = FLAG_NO_HOLE | FLAG_FUA;
            Bytes::new()
        }
        Opcode::Flush | Opcode::ListChunks | Opcode::Scrub => {
            header.flags = FLAG_ALL_VOLUMES;
            Bytes::new()
        }
        Opcode::DirtyRegions => {
            header.flags = FLAG_CLEAR;
            Bytes::new()
        }
        Opcode::ChunkCreate => {
            header.length = 64 << 20;
            Bytes::new()
        }
        Opcode::VolumePause => {
            header.length = 15_000;
            Bytes::new()
        }
        Opcode::ChunkClone => {
            header.generation = 0;
            encode_entries(&[CloneTarget { volume: 0x5e7a_0001, chunk: 42, generation: 1 }])
        }
        Opcode::Authorize => Bytes::from_static(b"a capability token"),
        _ => Bytes::new(),
    };
    Request { header, payload }
}

#[test]
fn every_request_opcode_round_trips() {
    for opcode in Opcode::ALL {
        let req = request_for(opcode);
        let mut buf = BytesMut::new();
        req.encode(&mut buf);
        assert_eq!(buf.len(), REQUEST_HEADER_LEN + req.payload.len());
        // Two frames back to back decode in order.
        req.encode(&mut buf);
        for _ in 0..2 {
            let got = decode_request(&mut buf).unwrap().expect("complete frame");
            assert_eq!(got, req, "{opcode:?}");
        }
        assert!(buf.is_empty());
        assert_eq!(decode_request(&mut buf), Ok(None));
    }
}

#[test]
fn clone_requests_carry_one_target() {
    let req = request_for(Opcode::ChunkClone);
    let mut buf = BytesMut::new();
    req.encode(&mut buf);
    assert_eq!(buf.len(), REQUEST_HEADER_LEN + CloneTarget::SIZE);
    let got = decode_request(&mut buf).unwrap().unwrap();
    assert_eq!(got.clone_target(), Some(CloneTarget { volume: 0x5e7a_0001, chunk: 42, generation: 1 }));
    assert_eq!((got.header.volume, got.header.chunk), (0x1122_3344_5566_7788, 42));
    // A clone without a target, or with trailing bytes, is refused and consumed.
    for len in [0, CloneTarget::SIZE - 8, CloneTarget::SIZE + 8] {
        let mut buf = BytesMut::from(&req.header.encode(len)[..]);
        buf.put_bytes(7, len);
        let err = decode_request(&mut buf).unwrap_err();
        assert_eq!(err.code(), ErrorCode::BadFrame, "payload of {len} bytes");
        assert!(!err.is_fatal());
        assert!(buf.is_empty());
    }
    assert_eq!(request_for(Opcode::Ping).clone_target(), None);
}

#[test]
fn pause_resume_and_clone_address_one_volume() {
    for opcode in [Opcode::VolumePause, Opcode::VolumeResume, Opcode::ChunkClone, Opcode::VolumeFence] {
        let mut req = request_for(opcode);
        req.header.flags = FLAG_ALL_VOLUMES;
        let mut buf = BytesMut::new();
        req.encode(&mut buf);
        let err = decode_request(&mut buf).unwrap_err();
        assert_eq!(err.code(), ErrorCode::BadFrame, "{opcode:?}");
        assert!(!err.is_fatal());
    }
    // A payload on a pause or resume is refused as on other payload-less requests.
    let raw = request_for(Opcode::VolumePause).header.encode(8);
    let mut buf = BytesMut::from(&raw[..]);
    buf.put_bytes(0, 8);
    assert_eq!(decode_request(&mut buf).unwrap_err().code(), ErrorCode::BadFrame);
    assert_eq!(Opcode::from_u8(15), Some(Opcode::VolumePause));
    assert_eq!(Opcode::from_u8(16), Some(Opcode::VolumeResume));
    assert_eq!(Opcode::from_u8(17), Some(Opcode::ChunkClone));
    assert_eq!(Opcode::from_u8(18), Some(Opcode::VolumeFence));
    assert_eq!(Opcode::from_u8(19), Some(Opcode::ChunkHashes));
    assert_eq!(Opcode::from_u8(20), Some(Opcode::Authorize));
    assert_eq!(Opcode::from_u8(21), None);
    assert_eq!(ErrorCode::from_u16(15), Some(ErrorCode::Interrupted));
}

#[test]
fn an_authorize_carries_one_capability_token() {
    for len in [0, MAX_CAPABILITY + 1] {
        let mut buf = BytesMut::from(&RequestHeader::new(Opcode::Authorize, 1).encode(len)[..]);
        buf.put_bytes(7, len);
        let err = decode_request(&mut buf).unwrap_err();
        assert_eq!(err.code(), ErrorCode::BadFrame, "payload of {len} bytes");
        assert!(buf.is_empty());
    }
}

#[test]
fn write_payload_splits_without_copy() {
    let req = request_for(Opcode::Write);
    let mut buf = BytesMut::new();
    req.encode(&mut buf);
    let base = buf.as_ptr() as usize;
    let got = decode_request(&mut buf).unwrap().unwrap();
    // The payload still lives in the read buffer's allocation.
    assert_eq!(got.payload.as_ptr() as usize, base + REQUEST_HEADER_LEN);
    let (d, crcs) = got.write_parts();
    assert_eq!(d.len(), 2 * BLOCK_SIZE);
    assert_eq!(crcs.to_vec(), block_checksums(&d));
    assert_eq!(first_bad_block(&d, &crcs), None);
}

#[test]
fn every_reply_round_trips() {
    let d = data(3, 1);
    let crcs = Checksums::compute(&d);
    let info = ChunkInfo {
        size: 64 << 20,
        generation: 5,
        blocks_ok: 10,
        blocks_bad: 1,
        blocks_unknown: 16373,
        dirty_regions: 2,
    };
    for opcode in Opcode::ALL {
        let payload = match opcode {
            Opcode::Read | Opcode::ChunkReadStream => {
                let mut p = BytesMut::new();
                p.put_slice(&d);
                p.put_slice(crcs.as_bytes());
                p.freeze()
            }
            Opcode::ChunkInfo => encode_entries(&[info]),
            Opcode::ListChunks => encode_entries(&[ChunkEntry { volume: 1, chunk: 2, size: 3, generation: 4 }]),
            Opcode::Scrub => encode_entries(&[BadBlocks { volume: 1, chunk: 2, first_block: 3, count: 4 }]),
            Opcode::DirtyRegions => encode_entries(&[DirtyRegion {
                volume: 1,
                chunk: 2,
                offset: 4 << 20,
                length: 4 << 20,
                flags: DIRTY_RECOVERED,
            }]),
            _ => Bytes::new(),
        };
        let reply = Reply { header: ReplyHeader { aux: 99, ..ReplyHeader::new(opcode, 77, Ok(())) }, payload };
        let mut buf = BytesMut::new();
        reply.encode(&mut buf);
        let got = decode_reply(&mut buf).unwrap().unwrap();
        assert_eq!(got, reply);
        match opcode {
            Opcode::Read | Opcode::ChunkReadStream => {
                let (gd, gc) = decode_data_payload(got.payload).unwrap();
                assert_eq!(gd, d);
                assert_eq!(gc, crcs);
            }
            Opcode::ChunkInfo => {
                assert_eq!(decode_entries::<ChunkInfo>(got.payload), Some(vec![info]))
            }
            Opcode::ListChunks => {
                assert_eq!(decode_entries::<ChunkEntry>(got.payload).unwrap().len(), 1)
            }
            Opcode::Scrub => assert_eq!(decode_entries::<BadBlocks>(got.payload).unwrap()[0].count, 4),
            Opcode::DirtyRegions => {
                assert!(decode_entries::<DirtyRegion>(got.payload).unwrap()[0].is_recovered())
            }
            _ => assert!(got.payload.is_empty()),
        }
    }
}

#[test]
fn every_error_code_round_trips() {
    for code in ErrorCode::ALL {
        let reply = Reply {
            header: ReplyHeader { flags: REPLY_END, aux: 12, ..ReplyHeader::new(Opcode::Write, 5, Err(code)) },
            payload: Bytes::from_static(b"why"),
        };
        let mut buf = BytesMut::new();
        reply.encode(&mut buf);
        let got = decode_reply(&mut buf).unwrap().unwrap();
        assert_eq!(got.header.status, Err(code));
        assert_eq!(got.message(), "why");
        assert_eq!(ErrorCode::from_u16(code as u16), Some(code));
    }
    assert_eq!(ErrorCode::from_u16(0), None);
}

#[test]
fn truncated_frames_need_more_bytes() {
    let req = request_for(Opcode::Write);
    let mut full = BytesMut::new();
    req.encode(&mut full);
    for cut in 0..full.len() {
        let mut buf = BytesMut::from(&full[..cut]);
        assert_eq!(decode_request(&mut buf), Ok(None), "cut at {cut}");
        assert_eq!(buf.len(), cut, "nothing consumed");
    }
}

#[test]
fn bad_frames_are_reported() {
    let mut buf = BytesMut::from(&b"GET / HTTP/1.1\r\n\r\n"[..]);
    let err = decode_request(&mut buf).unwrap_err();
    assert!(err.is_fatal());
    assert_eq!(err.request_id(), None);

    let mut raw = request_for(Opcode::Ping).header.encode(0);
    raw[5] = 200;
    let mut buf = BytesMut::from(&raw[..]);
    let err = decode_request(&mut buf).unwrap_err();
    assert_eq!(err.code(), ErrorCode::UnknownOpcode);
    assert!(!err.is_fatal());
    assert!(buf.is_empty(), "an unknown opcode's frame is consumed");

    let mut raw = request_for(Opcode::Ping).header.encode(0);
    raw[44..48].copy_from_slice(&u32::MAX.to_le_bytes());
    let err = decode_request(&mut BytesMut::from(&raw[..])).unwrap_err();
    assert_eq!(err.code(), ErrorCode::TooLarge);
    assert!(err.is_fatal());
    assert!(err.request_id().is_some());

    let mut header = request_for(Opcode::Write).header;
    header.length = 100;
    let raw = header.encode(104);
    let mut buf = BytesMut::from(&raw[..]);
    buf.put_slice(&[0u8; 104]);
    let err = decode_request(&mut buf).unwrap_err();
    assert_eq!(err.code(), ErrorCode::Misaligned);
    assert!(buf.is_empty());

    let mut header = request_for(Opcode::Read).header;
    header.length = (MAX_DATA + BLOCK_SIZE) as u32;
    let err = decode_request(&mut BytesMut::from(&header.encode(0)[..])).unwrap_err();
    assert_eq!(err.code(), ErrorCode::TooLarge);
    assert!(!err.is_fatal());

    let mut header = request_for(Opcode::Ping).header;
    header.flags = 1 << 15;
    let err = decode_request(&mut BytesMut::from(&header.encode(0)[..])).unwrap_err();
    assert_eq!(err.code(), ErrorCode::BadFrame);
}

#[test]
fn checksums_detect_corruption() {
    let d = data(4, 3);
    let crcs = Checksums::compute(&d);
    let mut bad = d.to_vec();
    bad[2 * BLOCK_SIZE + 17] ^= 1;
    assert_eq!(first_bad_block(&bad, &crcs), Some(2));
    assert_eq!(first_bad_block(&d[..3 * BLOCK_SIZE], &crcs), Some(3));
    assert_eq!(Checksums::from_slice(&crcs.to_vec()), crcs);
}

proptest! {
    #[test]
    fn request_decoder_never_panics(bytes in proptest::collection::vec(any::<u8>(), 0..512)) {
        let mut buf = BytesMut::from(&bytes[..]);
        for _ in 0..8 {
            match decode_request(&mut buf) {
                Ok(Some(_)) => continue,
                Ok(None) => break,
                Err(e) if e.is_fatal() => break,
                Err(_) => continue,
            }
        }
    }

    #[test]
    fn reply_decoder_never_panics(bytes in proptest::collection::vec(any::<u8>(), 0..512)) {
        let mut buf = BytesMut::from(&bytes[..]);
        for _ in 0..8 {
            match decode_reply(&mut buf) {
                Ok(Some(_)) => continue,
                Ok(None) => break,
                Err(e) if e.is_fatal() => break,
                Err(_) => continue,
            }
        }
    }

    /// Valid headers with random fields, then truncated or mutated.
    #[test]
    fn mutated_valid_frames_never_panic(
        opcode in 0u8..20,
        flags in any::<u16>(),
        length in prop_oneof![Just(4096u32), Just(8192), any::<u32>()],
        payload_len in prop_oneof![Just(0u32), Just(4100), Just(8200), 0u32..20_000],
        cut in any::<prop::sample::Index>(),
        flip in proptest::option::of((any::<prop::sample::Index>(), any::<u8>())),
    ) {
        let mut raw = BytesMut::new();
        raw.put_u32_le(REQUEST_MAGIC);
        raw.put_u8(VERSION);
        raw.put_u8(opcode);
        raw.put_u16_le(flags);
        raw.put_u64_le(1);
        raw.put_u64_le(2);
        raw.put_u64_le(3);
        raw.put_u64_le(4096);
        raw.put_u32_le(length);
        raw.put_u32_le(payload_len);
        raw.put_u64_le(5);
        raw.put_u64_le(6);
        raw.put_bytes(0xab, payload_len as usize);
        if let Some((at, byte)) = flip {
            let i = at.index(raw.len());
            raw[i] ^= byte;
        }
        let keep = cut.index(raw.len() + 1);
        let mut buf = BytesMut::from(&raw[..keep]);
        let before = buf.len();
        match decode_request(&mut buf) {
            Ok(Some(req)) => prop_assert_eq!(before - buf.len(), REQUEST_HEADER_LEN + req.payload.len()),
            Ok(None) => prop_assert_eq!(buf.len(), before),
            Err(_) => {}
        }
    }
}

#[test]
fn prefix_lets_a_reader_supply_the_payload_buffer() {
    let req = request_for(Opcode::Write);
    let mut full = BytesMut::new();
    req.encode(&mut full);
    assert_eq!(peek_request(&full[..REQUEST_HEADER_LEN - 1]), Ok(None));
    let prefix = peek_request(&full[..REQUEST_HEADER_LEN + 10]).unwrap().unwrap();
    assert_eq!(prefix.frame_len(), full.len());
    assert_eq!(prefix.opcode, Opcode::Write as u8);
    let payload = Bytes::copy_from_slice(&full[REQUEST_HEADER_LEN..]);
    assert_eq!(prefix.finish(payload.clone()).unwrap(), req);
    let short = prefix.finish(payload.slice(..payload.len() - 4)).unwrap_err();
    assert_eq!(short.code(), ErrorCode::BadFrame);
    assert!(!short.is_fatal());
    assert!(peek_request(b"nope").is_err());
}
