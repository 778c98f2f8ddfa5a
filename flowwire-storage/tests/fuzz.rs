//! Fuzzing of every decoder that reads the store's bytes back: the record envelope, a
//! history entry, a state, a framed blob and a logged batch. Zero panics, and memory bounded
//! by the decode limit whatever the input claims (a counting allocator measures the peak).
//! The write-ahead log's reader is fuzzed in its own module, the bus messages in the
//! runtime's. `FLOWWIRE_FUZZ_ITERS` sets the inputs per target (see `flowwire_storage::fuzz`).

use std::alloc::{GlobalAlloc, Layout, System};
use std::sync::atomic::{AtomicUsize, Ordering};

use bytes::Bytes;
use flowwire_storage::blob::{self, BlobRef};
use flowwire_storage::codec::{self, Kind};
use flowwire_storage::fuzz;
use flowwire_storage::record::{PlacedRecord, Record};
use flowwire_storage::{
    Expect, HistoryEntry, InstanceKey, Payload, Status, StepInput, StepOutput, StepWrite,
};

/// Counts the bytes allocated now and the peak.
struct Counting;

static NOW: AtomicUsize = AtomicUsize::new(0);
static PEAK: AtomicUsize = AtomicUsize::new(0);

#[allow(unsafe_code)]
unsafe impl GlobalAlloc for Counting {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        let now = NOW.fetch_add(layout.size(), Ordering::Relaxed) + layout.size();
        PEAK.fetch_max(now, Ordering::Relaxed);
        unsafe { System.alloc(layout) }
    }
    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        NOW.fetch_sub(layout.size(), Ordering::Relaxed);
        unsafe { System.dealloc(ptr, layout) }
    }
}

#[global_allocator]
static ALLOC: Counting = Counting;

/// The decode limit the targets use: 1 MiB.
const LIMIT: usize = 1 << 20;

/// Runs a target and checks that it never held more than a few times the limit at once.
fn fuzz_bounded(name: &str, seeds: &[Vec<u8>], target: impl FnMut(&[u8])) {
    // One target at a time, so the peak is this target's.
    static ONE: std::sync::Mutex<()> = std::sync::Mutex::new(());
    let _one = ONE
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner);
    let iters = fuzz::iterations(20_000);
    let before = NOW.load(Ordering::Relaxed);
    PEAK.store(before, Ordering::Relaxed);
    fuzz::run(name, seeds, iters, target);
    let peak = PEAK.load(Ordering::Relaxed) - before;
    assert!(peak < 4 * LIMIT, "{name}: {peak} bytes held at the peak");
}

fn key() -> InstanceKey {
    InstanceKey::new("Order", "o-1")
}

fn record() -> PlacedRecord {
    PlacedRecord {
        record: Record {
            flow_version: 2,
            seq: 9,
            status: Status::Failed {
                reason: "declined".into(),
            },
            state: Payload::Inline(Bytes::from_static(b"some state bytes")),
            pending: None,
            timer: None,
            compensations: Vec::new(),
            failing: Some("why".into()),
            correlation: Some("key-1".into()),
            fan: None,
            error: Some(flowwire_storage::ErrorValue {
                type_name: "shop::PaymentError".into(),
                value: Bytes::from_static(&[1]),
            }),
            cancel: Some(flowwire_storage::Cancel {
                reason: "the customer called".into(),
                abandoned: Some(8),
            }),
        },
        retired: Vec::new(),
        trash: vec![BlobRef {
            tier: "fs".into(),
            key: "Order/o-1/3.s-00ff".into(),
            len: 10,
            crc: 7,
        }],
    }
}

#[test]
fn fuzz_the_record_envelope() {
    let mut seed = Vec::new();
    record().encode(&key(), &mut seed).unwrap();
    fuzz_bounded("record", &[seed], |input| {
        if let Ok(r) = PlacedRecord::decode(input, &key(), LIMIT) {
            assert!(r.record.seq < u64::MAX);
        }
    });
}

/// A stamp (the checksum the in-memory store computes on read) never panics, leaves what
/// is no envelope as it was, and changes nothing of an envelope but its checksum, after
/// which it opens.
#[test]
fn fuzz_a_stamp() {
    use flowwire_storage::codec::{self, Checksums, Kind};
    let mut seed = Vec::new();
    record()
        .encode_with(&key(), &mut seed, Checksums::OnRead)
        .unwrap();
    fuzz_bounded("stamp", &[seed], |input| {
        let mut stamped = input.to_vec();
        match codec::stamp_owned(Kind::Record, &mut stamped, &key()) {
            Err(_) => assert_eq!(stamped, input),
            Ok(()) => {
                assert_eq!(stamped[..10], input[..10]);
                assert_eq!(stamped[14..], input[14..]);
                codec::open_owned(Kind::Record, &stamped, &key(), usize::MAX)
                    .expect("a stamped envelope opens");
            }
        }
    });
}

#[test]
fn fuzz_a_chunk_manifest_behind_the_checksum() {
    // The envelope's checksum refuses almost every mutation of a whole record; this feeds
    // the record decoder itself a record whose state is a manifest of chunks, and checks
    // that whatever decodes reads as a manifest a fetch can check (lengths that add up are
    // compared, never trusted, by `Placement::fetch`).
    use flowwire_storage::chunk::{ChunkRef, Chunked};
    let mut r = record();
    let chunk = |seq, len| ChunkRef {
        hash: [seq as u8; 32],
        seq,
        len,
        crc: 9,
        pack: 0,
        at: 0,
    };
    r.record.state = Payload::Chunked(Chunked {
        tier: "fs".into(),
        role: 's',
        len: 300_000,
        chunks: vec![chunk(3, 100_000), chunk(4, 150_000), chunk(3, 50_000)].into(),
        inline: std::sync::Arc::default(),
    });
    let mut seed = Vec::new();
    codec::encode_raw(&r, &mut seed).unwrap();
    // And one with a chunk inline (its own stored form).
    let head = Bytes::from_static(b"the fields around a blob");
    let mut with_inline = r.clone();
    with_inline.record.state = Payload::Chunked(Chunked {
        tier: "fs".into(),
        role: 's',
        len: 100_024,
        chunks: vec![
            chunk(flowwire_storage::chunk::INLINE, 24),
            chunk(3, 100_000),
        ]
        .into(),
        inline: vec![head].into(),
    });
    let mut inline_seed = Vec::new();
    codec::encode_raw(&with_inline, &mut inline_seed).unwrap();
    // And one with chunks in a pack (record format 10).
    let mut packed = r.clone();
    packed.record.state = Payload::Chunked(Chunked {
        tier: "fs".into(),
        role: 's',
        len: 250_000,
        chunks: vec![
            ChunkRef {
                pack: 0xfeed,
                at: 0,
                ..chunk(5, 100_000)
            },
            ChunkRef {
                pack: 0xfeed,
                at: 100_000,
                ..chunk(6, 150_000)
            },
        ]
        .into(),
        inline: std::sync::Arc::default(),
    });
    let mut packed_seed = Vec::new();
    codec::encode_raw(&packed, &mut packed_seed).unwrap();
    fuzz_bounded(
        "chunk manifest",
        &[seed, inline_seed, packed_seed],
        |input| {
            if let Ok(r) = codec::decode_raw::<PlacedRecord>(input, LIMIT)
                && let Payload::Chunked(c) = &r.record.state
            {
                assert!(
                    c.chunks.len() <= input.len(),
                    "no more chunks than input bytes"
                );
                assert!(
                    c.inline.iter().map(Bytes::len).sum::<usize>() <= input.len(),
                    "no more inline bytes than input bytes"
                );
            }
        },
    );
}

#[test]
fn fuzz_a_history_entry() {
    let entry = HistoryEntry {
        seq: 4,
        input: StepInput::Impulse {
            id: "i-1".into(),
            name: "approve".into(),
        },
        output: StepOutput::Quarantine {
            reason: "panicked".into(),
        },
        version: 5,
        payload: Some(Payload::Inline(Bytes::from_static(b"impulse"))),
        state: None,
        at_ms: 1_700_000_000_000,
    };
    let mut seed = Vec::new();
    entry.encode(&key(), &mut seed).unwrap();
    fuzz_bounded("history entry", &[seed], |input| {
        let _ = HistoryEntry::decode(input, &key(), LIMIT);
    });
}

#[test]
fn fuzz_a_state_and_a_raw_value() {
    let mut enveloped = Vec::new();
    codec::encode(
        Kind::State,
        &(7u64, vec!["a".to_string(); 30], vec![1u8; 200]),
        &mut enveloped,
    )
    .unwrap();
    let raw = enveloped[codec::HEADER_LEN..].to_vec();
    fuzz_bounded("state", &[enveloped, raw], |input| {
        let _ = codec::decode::<(u64, Vec<String>, Vec<u8>)>(Kind::State, input, LIMIT);
        let _ = codec::decode_raw::<(u64, Vec<String>, Vec<u8>)>(input, LIMIT);
        let _ = codec::decode_raw::<Vec<Vec<u64>>>(input, LIMIT);
    });
}

#[test]
fn fuzz_a_framed_blob() {
    let body = Bytes::from(vec![0x5au8; 300]);
    let reference = BlobRef {
        tier: "fs".into(),
        key: "Order/o-1/3.s-00ff".into(),
        len: body.len() as u64,
        crc: crc32fast::hash(&body),
    };
    let mut seed = blob::header(&reference.key, reference.len, reference.crc).to_vec();
    seed.extend_from_slice(&body);
    fuzz_bounded("framed blob", &[seed], |input| {
        if let Ok(got) = blob::unframe(Bytes::copy_from_slice(input), &reference) {
            assert_eq!(got, body);
        }
    });
}

#[test]
fn fuzz_a_logged_batch() {
    let mut record_bytes = Vec::new();
    record().encode(&key(), &mut record_bytes).unwrap();
    let batch = vec![StepWrite {
        key: key(),
        expect: Expect::Version(3),
        version: 4,
        seq: 4,
        record: record_bytes.into(),
        active: true,
        parked: false,
        timer: Some(99),
        correlation: Some("k".into()),
        uncorrelate: None,
        ended_key: None,
        impulse: Some("imp".into()),
        history: Some((4, Bytes::from_static(b"entry"))),
        prune_below: Some(2),
        fence: Some(7),
        acknowledges: None,
        sends: Vec::new(),
        checksums: flowwire_storage::codec::Checksums::Written,
    }];
    let seed = postcard::to_allocvec(&batch).unwrap();
    // As the store's recovery decodes a logged batch.
    fuzz_bounded("logged batch", &[seed], |input| {
        let _ = postcard::from_bytes::<Vec<StepWrite>>(input);
    });
}
