//! The manifest formats: chunks as blobs of their own (records 8 and 9), inline (9) and in
//! packs (10), each round trip and each older form kept byte for byte.

use super::*;
use crate::blob::Payload;
use crate::codec::{self, Kind};

#[test]
fn a_record_and_an_entry_holding_chunks_round_trip_in_the_format_that_knows_them() {
    use crate::chunk::{ChunkRef, Chunked};
    let key = InstanceKey::new("Order", "a");
    let state = Payload::Chunked(Chunked {
        tier: "fs".into(),
        role: 's',
        len: 5,
        chunks: vec![ChunkRef {
            hash: [1; 32],
            seq: 3,
            len: 5,
            crc: 7,
            pack: 0x5eed,
            at: 4096,
        }]
        .into(),
        inline: std::sync::Arc::default(),
    });
    let placed = PlacedRecord {
        record: Record {
            flow_version: 1,
            seq: 3,
            status: Status::Waiting,
            state: state.clone(),
            pending: None,
            timer: None,
            compensations: Vec::new(),
            failing: None,
            correlation: None,
            fan: None,
            error: None,
            cancel: None,
        },
        retired: Vec::new(),
        trash: Vec::new(),
    };
    let version = |kind, buf: &[u8]| codec::open_owned(kind, buf, &key, 1 << 20).unwrap().0;
    let mut buf = Vec::new();
    placed.encode(&key, &mut buf).unwrap();
    assert_eq!(version(Kind::Record, &buf), 10);
    assert_eq!(PlacedRecord::decode(&buf, &key, 1 << 20).unwrap(), placed);
    let entry = HistoryEntry {
        seq: 3,
        input: StepInput::Start,
        output: StepOutput::Wait,
        version: 1,
        payload: None,
        state: Some(state),
        at_ms: 9,
    };
    buf.clear();
    entry.encode(&key, &mut buf).unwrap();
    assert_eq!(version(Kind::History, &buf), 9);
    assert_eq!(HistoryEntry::decode(&buf, &key, 1 << 20).unwrap(), entry);
}

/// A chunk as record formats 8 and 9 wrote it, to compare with.
#[derive(Clone, Copy, serde::Serialize)]
struct ChunkV8 {
    hash: [u8; 32],
    seq: u64,
    len: u32,
    crc: u32,
}

/// A manifest as record formats 8 and 9 wrote it, to compare with.
#[derive(serde::Serialize)]
enum PayloadV9 {
    #[allow(dead_code)]
    Inline(bytes::Bytes),
    #[allow(dead_code)]
    Blob(crate::BlobRef),
    Chunked {
        tier: std::sync::Arc<str>,
        role: char,
        len: u64,
        chunks: Vec<ChunkV8>,
    },
    ChunkedInline {
        tier: std::sync::Arc<str>,
        role: char,
        len: u64,
        chunks: Vec<ChunkV8>,
        inline: Vec<bytes::Bytes>,
    },
}

#[test]
fn a_manifest_holding_small_chunks_inline_round_trips_and_one_without_keeps_format_8s_bytes() {
    use crate::chunk::{ChunkRef, Chunked, INLINE};
    let stored = ChunkRef {
        hash: [1; 32],
        seq: 3,
        len: 5,
        crc: 7,
        pack: 0,
        at: 0,
    };
    let v8 = ChunkV8 {
        hash: [1; 32],
        seq: 3,
        len: 5,
        crc: 7,
    };
    let plain = Chunked {
        tier: "fs".into(),
        role: 's',
        len: 5,
        chunks: vec![stored].into(),
        inline: std::sync::Arc::default(),
    };
    let mut ours = Vec::new();
    codec::encode_raw(&Payload::Chunked(plain.clone()), &mut ours).unwrap();
    let mut theirs = Vec::new();
    let old = PayloadV9::Chunked {
        tier: "fs".into(),
        role: 's',
        len: 5,
        chunks: vec![v8],
    };
    codec::encode_raw(&old, &mut theirs).unwrap();
    assert_eq!(ours, theirs, "stored as format 8 stored it");

    let head = bytes::Bytes::from_static(b"around the blob");
    let inline = ChunkRef {
        seq: INLINE,
        ..ChunkRef::of(&head)
    };
    let with_inline = Payload::Chunked(Chunked {
        len: 5 + 15 + 15,
        chunks: vec![inline, stored, inline].into(),
        inline: vec![head.clone(), head.clone()].into(),
        ..plain.clone()
    });
    let mut buf = Vec::new();
    codec::encode_raw(&with_inline, &mut buf).unwrap();
    assert_ne!(buf[0], ours[0], "a form of its own");
    let mut theirs = Vec::new();
    let inline_v8 = ChunkV8 {
        hash: inline.hash,
        seq: INLINE,
        len: 15,
        crc: inline.crc,
    };
    let old = PayloadV9::ChunkedInline {
        tier: "fs".into(),
        role: 's',
        len: 35,
        chunks: vec![inline_v8, v8, inline_v8],
        inline: vec![head.clone(), head],
    };
    codec::encode_raw(&old, &mut theirs).unwrap();
    assert_eq!(buf, theirs, "stored as format 9 stored it");
    let back: Payload = codec::decode_raw(&buf, 1 << 20).unwrap();
    assert_eq!(back, with_inline);
    let chunked = back.chunked().unwrap();
    assert_eq!(
        chunked.distinct().copied().collect::<Vec<_>>(),
        vec![stored],
        "only chunks in blobs are collected"
    );
}

#[test]
fn a_manifest_with_chunks_in_packs_round_trips_in_a_form_of_its_own() {
    use crate::chunk::{ChunkRef, Chunked};
    let own = ChunkRef {
        seq: 2,
        ..ChunkRef::of(b"written before packs")
    };
    let packed = |at: u64, body: &[u8]| ChunkRef {
        seq: 5,
        pack: 77,
        at,
        ..ChunkRef::of(body)
    };
    let (a, b) = (packed(0, b"first"), packed(5, b"second"));
    let manifest = Chunked {
        tier: "fs".into(),
        role: 's',
        len: 31,
        chunks: vec![own, a, b].into(),
        inline: std::sync::Arc::default(),
    };
    let payload = Payload::Chunked(manifest.clone());
    let mut buf = Vec::new();
    codec::encode_raw(&payload, &mut buf).unwrap();
    assert_eq!(buf[0], 4, "the packed form");
    let back: Payload = codec::decode_raw(&buf, 1 << 20).unwrap();
    assert_eq!(back, payload);
    // One blob of each: the old chunk's own, and the pack once for both of its chunks.
    let key = InstanceKey::new("Order", "a");
    let blobs = payload.blobs(&key);
    assert_eq!(blobs.len(), 2, "{blobs:?}");
    assert!(
        blobs[1].key.ends_with(&format!("/5.sp-{:016x}", 77)),
        "{blobs:?}"
    );
    // A pack stays while any chunk in it is kept.
    let keeps_b = Chunked {
        chunks: vec![b].into(),
        ..manifest.clone()
    };
    let dropped: Vec<_> = manifest.dropped_by(Some(&keeps_b)).copied().collect();
    assert_eq!(dropped, vec![own], "the pack is still referred to");
    let keeps_none = Chunked {
        chunks: vec![own].into(),
        ..manifest.clone()
    };
    let dropped: Vec<_> = manifest.dropped_by(Some(&keeps_none)).copied().collect();
    assert_eq!(dropped, vec![a], "the pack, once, through its first chunk");
}
