//! A store that computes checksums when it hands values out (the in-memory store,
//! `InstanceStore::checksums_on_read`): the engine seals its steps without them
//! (`Checksums::OnRead`), and what the store hands out is, byte for byte, what it would have
//! been given with them written. Until it is stamped, a value is refused by every reader.

use bytes::Bytes;
use flowwire_storage::arena::Arena;
use flowwire_storage::codec::{self, Checksums, Kind};
use flowwire_storage::record::{
    Draft, Expect, HistoryEntry, InstanceKey, PlacedRecord, Record, Status, StepInput, StepOutput,
    StepResult, StepWrite,
};
use flowwire_storage::{CodecError, InstanceStore, Ladder, MemoryStore, Placement, Retention};

const LIMIT: usize = 1 << 20;

/// Step `seq` of `key`: an outcome of call `seq - 1` applied and call `seq` sent, its state
/// `state`.
fn draft(key: &InstanceKey, seq: u64, state: &'static [u8]) -> Draft {
    let record = Record {
        seq,
        status: Status::Running,
        ..Record::unwritten(1, Bytes::from_static(state))
    };
    Draft {
        key: key.clone(),
        expect: if seq == 0 {
            Expect::Absent
        } else {
            Expect::Version(seq)
        },
        version: seq + 1,
        record: record.live(),
        impulse: None,
        input: StepInput::Outcome {
            call_seq: seq.saturating_sub(1),
            ok: true,
        },
        output: StepOutput::Drive {
            call_seq: seq,
            link: 0,
            method: 1,
        },
        payload: Some(Bytes::from(format!("reply {seq}"))),
        at_ms: 1_700_000_000_000 + seq,
    }
}

/// `draft` sealed by `placement`: its write and its placed record.
fn seal(placement: &Placement, draft: &Draft) -> (StepWrite, PlacedRecord) {
    let (mut writes, mut placed) = (Vec::new(), Vec::new());
    let (mut buf, mut arena) = (Vec::new(), Arena::default());
    placement
        .seal_into(
            draft,
            None,
            None,
            Retention::All,
            (&mut buf, &mut arena),
            (&mut writes, &mut placed),
        )
        .expect("an inline step seals");
    let placed: flowwire_storage::record::Persisted = placed.remove(0);
    (writes.remove(0), placed.to_placed(&draft.record))
}

fn placements() -> (Placement, Placement) {
    let written = Ladder::inline_only()
        .validate(LIMIT)
        .expect("a valid ladder");
    let on_read = written.clone().with_checksums(Checksums::OnRead);
    (written, on_read)
}

async fn commit(store: &MemoryStore, write: StepWrite) {
    assert_eq!(
        store.commit(vec![write]).await.expect("committed"),
        vec![StepResult::Committed]
    );
}

#[tokio::test]
async fn the_memory_store_hands_out_what_it_would_have_been_given_with_checksums() {
    let store = MemoryStore::new();
    assert!(store.checksums_on_read());
    let (written, on_read) = placements();
    let key = InstanceKey::new("Order", "order-1");
    let mut expected_history = Vec::new();
    let mut last = None;
    for (seq, state) in [(0, &b"one"[..]), (1, b"two"), (2, b"three")] {
        let d = draft(&key, seq, state);
        let (with, placed) = seal(&written, &d);
        let (without, _) = seal(&on_read, &d);
        assert_eq!(without.checksums, Checksums::OnRead);
        assert_eq!(with.checksums, Checksums::Written);
        // Sealed without its checksums, a step's values differ in those four bytes only,
        // and no reader takes them.
        assert_eq!(with.record.len(), without.record.len());
        assert_eq!(with.record[..10], without.record[..10]);
        assert_eq!(with.record[14..], without.record[14..]);
        assert!(matches!(
            PlacedRecord::decode(&without.record, &key, LIMIT),
            Err(CodecError::Checksum { .. })
        ));
        let (h_seq, entry) = without.history.clone().expect("history is kept");
        assert!(matches!(
            HistoryEntry::decode(&entry, &key, LIMIT),
            Err(CodecError::Checksum { .. })
        ));
        expected_history.push((h_seq, with.history.clone().expect("history is kept").1));
        commit(&store, without).await;
        last = Some((with.record, placed));
    }
    let (record, placed) = last.expect("three steps");
    let loaded = store.load(&key).await.expect("read").expect("stored");
    assert_eq!(loaded.version, 3);
    assert_eq!(loaded.bytes, record);
    assert_eq!(
        PlacedRecord::decode(&loaded.bytes, &key, LIMIT).expect("it decodes"),
        placed
    );
    for listed in [
        store.records("Order").await.expect("listed"),
        store.active("Order").await.expect("listed"),
    ] {
        assert_eq!(listed.len(), 1, "{listed:?}");
        assert_eq!(listed[0].1.bytes, record);
    }
    let history = store.history(&key, 0, 10).await.expect("read");
    assert_eq!(history, expected_history);
    for (_, entry) in &history {
        HistoryEntry::decode(entry, &key, LIMIT).expect("each entry decodes");
    }
}

/// An instance whose steps come both ways (another writer's, with checksums written, among
/// the engine's): each value is handed out with its checksum, whichever came first.
#[tokio::test]
async fn an_instance_given_steps_both_ways_hands_out_every_value_with_its_checksum() {
    let (written, on_read) = placements();
    for ways in [
        [
            Checksums::OnRead,
            Checksums::OnRead,
            Checksums::Written,
            Checksums::OnRead,
        ],
        [
            Checksums::Written,
            Checksums::OnRead,
            Checksums::OnRead,
            Checksums::Written,
        ],
    ] {
        let store = MemoryStore::new();
        let key = InstanceKey::new("Order", "both-ways");
        let mut expected = Vec::new();
        let mut record = Bytes::new();
        for (seq, way) in (0u64..).zip(ways) {
            let d = draft(&key, seq, b"state");
            let (with, _) = seal(&written, &d);
            let given = match way {
                Checksums::OnRead => seal(&on_read, &d).0,
                Checksums::Written => with.clone(),
            };
            expected.push(with.history.clone().expect("history is kept"));
            record = with.record.clone();
            commit(&store, given).await;
            let loaded = store.load(&key).await.expect("read").expect("stored");
            assert_eq!(loaded.bytes, record, "{ways:?}, step {seq}");
            assert_eq!(
                store.history(&key, 0, 10).await.expect("read"),
                expected,
                "{ways:?}, step {seq}"
            );
        }
        assert_eq!(
            store.history(&key, 2, 1).await.expect("read"),
            expected[2..3].to_vec()
        );
        PlacedRecord::decode(&record, &key, LIMIT).expect("the last record decodes");
    }
}

#[test]
fn a_stamp_refuses_what_is_no_envelope_of_its_kind_and_leaves_it_as_it_was() {
    let key = InstanceKey::new("Order", "order-1");
    let mut record = Vec::new();
    codec::encode_owned(Kind::Record, &key, &7u32, &mut record).expect("encodes");
    let mut as_history = record.clone();
    assert!(matches!(
        codec::stamp_owned(Kind::History, &mut as_history, &key),
        Err(CodecError::WrongKind { .. })
    ));
    assert_eq!(as_history, record);
    let mut garbage = b"not an envelope at all".to_vec();
    assert!(codec::stamp_owned(Kind::Record, &mut garbage, &key).is_err());
    assert_eq!(garbage, b"not an envelope at all");
    let mut short = record[..record.len() - 1].to_vec();
    assert!(matches!(
        codec::stamp_owned(Kind::Record, &mut short, &key),
        Err(CodecError::Truncated { .. })
    ));
    // Stamping a value that has its checksum gives it the same one.
    let mut again = record.clone();
    codec::stamp_owned(Kind::Record, &mut again, &key).expect("an envelope");
    assert_eq!(again, record);
}

/// A value given with its checksum is handed out as it was given, a damaged one too: the
/// store stamps only what it was given without one, and never launders a wrong checksum.
#[tokio::test]
async fn a_damaged_value_given_with_its_checksum_is_handed_out_as_given() {
    let (written, on_read) = placements();
    let store = MemoryStore::new();
    let key = InstanceKey::new("Order", "damaged");
    let mut expected = Vec::new();
    for seq in 0..2 {
        let d = draft(&key, seq, b"state");
        expected.push(seal(&written, &d).0.history.expect("history is kept"));
        commit(&store, seal(&on_read, &d).0).await;
    }
    // A third step from another writer, its last byte flipped after its checksum was written.
    let (mut damaged, _) = seal(&written, &draft(&key, 2, b"state"));
    let flip = |b: &Bytes| {
        let mut v = b.to_vec();
        if let Some(last) = v.last_mut() {
            *last ^= 1;
        }
        Bytes::from(v)
    };
    damaged.record = flip(&damaged.record);
    let (seq, entry) = damaged.history.take().expect("history is kept");
    damaged.history = Some((seq, flip(&entry)));
    expected.push((seq, flip(&entry)));
    let record = damaged.record.clone();
    commit(&store, damaged).await;
    let loaded = store.load(&key).await.expect("read").expect("stored");
    assert_eq!(loaded.bytes, record);
    assert!(matches!(
        PlacedRecord::decode(&loaded.bytes, &key, LIMIT),
        Err(CodecError::Checksum { .. })
    ));
    let history = store.history(&key, 0, 10).await.expect("read");
    assert_eq!(history, expected);
    assert!(matches!(
        HistoryEntry::decode(&history[2].1, &key, LIMIT),
        Err(CodecError::Checksum { .. })
    ));
    for (_, entry) in &history[..2] {
        HistoryEntry::decode(entry, &key, LIMIT).expect("the engine's entries decode");
    }
}
