//! The record formats: round trips, identity binding, and the decoding of every older
//! format.

use bytes::Bytes;
use serde::Serialize;

use super::*;
use crate::blob::{BlobRef, Payload};
use crate::codec::{self, Kind};
use crate::error::CodecError;

#[test]
fn a_borrowed_history_entry_encodes_to_the_bytes_of_the_owned_one() {
    let owned = HistoryEntry {
        seq: 7,
        input: StepInput::Impulse {
            id: "i-1".into(),
            name: "note".into(),
        },
        output: StepOutput::Drive {
            call_seq: 7,
            link: 1,
            method: 2,
        },
        version: 8,
        payload: Some(Payload::Inline(Bytes::from_static(b"reply"))),
        state: Some(Payload::Inline(Bytes::from_static(b"state"))),
        at_ms: 1_700_000_000_000,
    };
    let borrowed = HistoryEntryRef {
        seq: owned.seq,
        input: &owned.input,
        output: &owned.output,
        version: owned.version,
        payload: owned.payload.as_ref().map(PayloadRef::Placed),
        state: owned.state.as_ref().map(PayloadRef::Placed),
        at_ms: owned.at_ms,
    };
    let key = InstanceKey::new("F", "i");
    let (mut a, mut b) = (Vec::new(), Vec::new());
    codec::encode_owned(Kind::History, &key, &owned, &mut a).unwrap(); // serde of the owned struct
    borrowed.encode(&key, &mut b).unwrap();
    assert_eq!(a, b);
    assert_eq!(HistoryEntry::decode(&b, &key, 1 << 20).unwrap(), owned);
    // Sealing refers to an input that stays inline by its bytes, not as a placed payload:
    // the entry is the same, byte for byte.
    let reply = Bytes::from_static(b"reply");
    let by_bytes = HistoryEntryRef {
        payload: Some(PayloadRef::Inline(&reply)),
        ..borrowed
    };
    let mut c = Vec::new();
    by_bytes.encode(&key, &mut c).unwrap();
    assert_eq!(a, c);
}

/// Format 3 as it was written (no failure reason, no correlation key).
#[derive(Serialize)]
struct Written3 {
    flow_version: u32,
    seq: u64,
    status: Status,
    state: Payload,
    pending: Option<PlacedCall>,
    timer: Option<Timer>,
    compensations: Vec<Compensation>,
    retired: Vec<Retired>,
    trash: Vec<BlobRef>,
}

/// Format 4 as it was written (no fan-out).
#[derive(Serialize)]
struct Written4 {
    flow_version: u32,
    seq: u64,
    status: Status,
    state: Payload,
    pending: Option<PlacedCall>,
    timer: Option<Timer>,
    compensations: Vec<Compensation>,
    failing: Option<String>,
    correlation: Option<String>,
    retired: Vec<Retired>,
    trash: Vec<BlobRef>,
}

#[test]
fn a_format_4_record_still_decodes() {
    let old = Written4 {
        flow_version: 2,
        seq: 7,
        status: Status::Compensating,
        state: Payload::Inline(Bytes::from_static(b"s")),
        pending: None,
        timer: None,
        compensations: Vec::new(),
        failing: Some("out of stock".into()),
        correlation: Some("A-1".into()),
        retired: Vec::new(),
        trash: Vec::new(),
    };
    let mut buf = Vec::new();
    codec::encode_with_version(Kind::Record, 4, &old, &mut buf).unwrap();
    let r = PlacedRecord::decode(&buf, &InstanceKey::new("F", "i"), 1 << 20)
        .unwrap()
        .record;
    assert_eq!((r.seq, r.status), (7, Status::Compensating));
    assert_eq!(r.failing.as_deref(), Some("out of stock"));
    assert_eq!(r.correlation.as_deref(), Some("A-1"));
    assert_eq!(r.fan, None);
}

#[test]
fn a_fan_out_round_trips_in_the_current_format() {
    let placed = PlacedRecord {
        record: Record {
            flow_version: 1,
            seq: 3,
            status: Status::Running,
            state: Payload::Inline(Bytes::from_static(b"s")),
            pending: None,
            timer: None,
            compensations: Vec::new(),
            failing: None,
            correlation: None,
            fan: Some(Fan {
                seq: 2,
                first: false,
                parallel: 2,
                branches: vec![
                    Branch {
                        link: 1,
                        method: 0,
                        call: Bytes::from_static(b"a"),
                        undo: None,
                        state: BranchState::Done { ok: true },
                        attempts: 0,
                    },
                    Branch {
                        link: 1,
                        method: 0,
                        call: Bytes::from_static(b"b"),
                        undo: None,
                        state: BranchState::Sent { redelivered: 1 },
                        attempts: 2,
                    },
                ],
            }),
            error: None,
            cancel: None,
        },
        retired: Vec::new(),
        trash: Vec::new(),
    };
    let mut buf = Vec::new();
    let key = InstanceKey::new("F", "i");
    placed.encode(&key, &mut buf).unwrap();
    let back = PlacedRecord::decode(&buf, &key, 1 << 20).unwrap();
    assert_eq!(back, placed);
    let fan = back.record.fan.unwrap();
    assert_eq!(fan.done(), 1);
    assert_eq!(fan.in_flight().map(|(i, _)| i).collect::<Vec<_>>(), [1]);
}

#[test]
fn a_format_3_record_still_decodes() {
    let comp = Compensation {
        seq: 2,
        link: 0,
        method: 1,
        call: Bytes::from_static(b"c"),
    };
    let old = Written3 {
        flow_version: 1,
        seq: 4,
        status: Status::Sleeping,
        state: Payload::Inline(Bytes::from_static(b"s")),
        pending: None,
        timer: Some(Timer {
            due_ms: 9,
            spec: TimeSpec::After(5),
        }),
        compensations: vec![comp.clone()],
        retired: Vec::new(),
        trash: Vec::new(),
    };
    let mut buf = Vec::new();
    codec::encode_with_version(Kind::Record, 3, &old, &mut buf).unwrap();
    let r = PlacedRecord::decode(&buf, &InstanceKey::new("F", "i"), 1 << 20)
        .unwrap()
        .record;
    assert_eq!((r.seq, r.status, r.timer), (4, Status::Sleeping, old.timer));
    assert_eq!(r.compensations, vec![comp]);
    assert_eq!((r.failing, r.correlation), (None, None));
}

/// Format 6 as it was written: calls and branches without attempt counts.
#[test]
fn a_format_6_record_decodes_with_no_failed_attempts() {
    #[derive(Serialize)]
    struct Call6 {
        seq: u64,
        link: u16,
        method: u16,
        call: Payload,
        redelivered: u32,
    }
    #[derive(Serialize)]
    struct Branch6 {
        link: u16,
        method: u16,
        call: Bytes,
        undo: Option<Compensation>,
        state: BranchState,
    }
    #[derive(Serialize)]
    struct Fan6 {
        seq: u64,
        first: bool,
        parallel: u32,
        branches: Vec<Branch6>,
    }
    #[derive(Serialize)]
    struct Written6 {
        flow_version: u32,
        seq: u64,
        status: Status,
        state: Payload,
        pending: Option<Call6>,
        timer: Option<Timer>,
        compensations: Vec<Compensation>,
        failing: Option<String>,
        correlation: Option<String>,
        fan: Option<Fan6>,
        retired: Vec<Retired>,
        trash: Vec<BlobRef>,
    }
    let old = Written6 {
        flow_version: 1,
        seq: 5,
        status: Status::Running,
        state: Payload::Inline(Bytes::from_static(b"s")),
        pending: Some(Call6 {
            seq: 5,
            link: 1,
            method: 2,
            call: Payload::Inline(Bytes::from_static(b"c")),
            redelivered: 3,
        }),
        timer: None,
        compensations: Vec::new(),
        failing: None,
        correlation: Some("k".into()),
        fan: Some(Fan6 {
            seq: 4,
            first: true,
            parallel: 2,
            branches: vec![Branch6 {
                link: 0,
                method: 1,
                call: Bytes::from_static(b"b"),
                undo: None,
                state: BranchState::Sent { redelivered: 2 },
            }],
        }),
        retired: Vec::new(),
        trash: Vec::new(),
    };
    let key = InstanceKey::new("F", "i");
    let mut buf = Vec::new();
    codec::encode_owned_with_version(Kind::Record, 6, &key, &old, &mut buf).unwrap();
    let r = PlacedRecord::decode(&buf, &key, 1 << 20).unwrap().record;
    let call = r.pending.unwrap();
    assert_eq!((call.seq, call.redelivered, call.attempts), (5, 3, 0));
    assert_eq!(r.correlation.as_deref(), Some("k"));
    let fan = r.fan.unwrap();
    assert_eq!((fan.seq, fan.first, fan.parallel), (4, true, 2));
    assert_eq!(fan.branches[0].state, BranchState::Sent { redelivered: 2 });
    assert_eq!(fan.branches[0].attempts, 0);
}

/// A record with its identity bound in: read under its own key it decodes; under any
/// other key, or with any header or payload byte changed, it is refused.
#[test]
fn a_record_is_refused_under_another_key_or_with_any_byte_changed() {
    let placed = PlacedRecord {
        record: Record {
            flow_version: 1,
            seq: 3,
            status: Status::Waiting,
            state: Payload::Inline(Bytes::from_static(b"state")),
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
    let key = InstanceKey::new("Order", "a");
    let mut buf = Vec::new();
    placed.encode(&key, &mut buf).unwrap();
    assert_eq!(PlacedRecord::decode(&buf, &key, 1 << 20).unwrap(), placed);
    for other in [
        InstanceKey::new("Order", "b"),
        InstanceKey::new("Order", "a "),
        InstanceKey::new("Orde", "ra"),
        InstanceKey::new("Other", "a"),
    ] {
        let err = PlacedRecord::decode(&buf, &other, 1 << 20).unwrap_err();
        assert!(matches!(err, CodecError::Checksum { .. }), "{other}: {err}");
    }
    for i in 0..buf.len() {
        let mut bad = buf.clone();
        bad[i] ^= 0x01;
        assert!(
            PlacedRecord::decode(&bad, &key, 1 << 20).is_err(),
            "byte {i}"
        );
    }
}

/// The placed record holds the record as one field (`Record<Payload>`) and its garbage
/// lists; postcard frames no struct, so its bytes are those of the flat layout it had when
/// the fields were written out one by one (format 5; format 7 appends a field to the
/// record and to its calls): stored records read as before.
#[test]
fn the_placed_record_encodes_to_the_flat_format_5_layout() {
    #[derive(Serialize)]
    struct Flat {
        flow_version: u32,
        seq: u64,
        status: Status,
        state: Payload,
        pending: Option<PlacedCall>,
        timer: Option<Timer>,
        compensations: Vec<Compensation>,
        failing: Option<String>,
        correlation: Option<String>,
        fan: Option<Fan>,
        error: Option<ErrorValue>,
        cancel: Option<Cancel>,
        retired: Vec<Retired>,
        trash: Vec<BlobRef>,
    }
    let call = PlacedCall {
        seq: 4,
        link: 1,
        method: 2,
        call: Payload::Inline(Bytes::from_static(b"call")),
        redelivered: 1,
        attempts: 0,
    };
    let timer = Some(Timer {
        due_ms: 99,
        spec: TimeSpec::After(5),
    });
    let compensations = vec![Compensation {
        seq: 2,
        link: 0,
        method: 1,
        call: Bytes::from_static(b"undo"),
    }];
    let blob = BlobRef {
        tier: "fs".into(),
        key: "F/i/1.s-01".into(),
        len: 3,
        crc: 9,
    };
    let placed = PlacedRecord {
        record: Record {
            flow_version: 3,
            seq: 4,
            status: Status::Running,
            state: Payload::Blob(blob.clone()),
            pending: Some(call.clone()),
            timer,
            compensations: compensations.clone(),
            failing: Some("why".into()),
            correlation: Some("key".into()),
            fan: None,
            error: None,
            cancel: None,
        },
        retired: vec![Retired {
            died: 3,
            blob: blob.clone(),
        }],
        trash: vec![blob.clone()],
    };
    let flat = Flat {
        flow_version: 3,
        seq: 4,
        status: Status::Running,
        state: Payload::Blob(blob.clone()),
        pending: Some(call),
        timer,
        compensations,
        failing: Some("why".into()),
        correlation: Some("key".into()),
        fan: None,
        error: None,
        cancel: None,
        retired: vec![Retired {
            died: 3,
            blob: blob.clone(),
        }],
        trash: vec![blob],
    };
    let (mut a, mut b) = (Vec::new(), Vec::new());
    codec::encode_raw(&placed, &mut a).unwrap();
    codec::encode_raw(&flat, &mut b).unwrap();
    assert_eq!(a, b);
}

/// History as formats 1 to 5 wrote it: a failure without a typed value, no retries.
#[test]
fn a_format_5_history_entry_decodes_its_failure_untyped() {
    #[derive(Serialize)]
    enum Output5 {
        _Drive {
            call_seq: u64,
            link: u16,
            method: u16,
        },
        _Wait,
        _Finish,
        Fail {
            reason: String,
        },
    }
    #[derive(Serialize)]
    struct Entry5 {
        seq: u64,
        input: StepInput,
        output: Output5,
        version: u64,
        payload: Option<Payload>,
        state: Option<Payload>,
        at_ms: u64,
    }
    let key = InstanceKey::new("F", "i");
    let old = Entry5 {
        seq: 4,
        input: StepInput::Outcome {
            call_seq: 3,
            ok: false,
        },
        output: Output5::Fail {
            reason: "declined".into(),
        },
        version: 4,
        payload: None,
        state: None,
        at_ms: 17,
    };
    let mut buf = Vec::new();
    codec::encode_owned_with_version(Kind::History, 5, &key, &old, &mut buf).unwrap();
    let entry = HistoryEntry::decode(&buf, &key, 1 << 20).unwrap();
    assert_eq!(
        entry.output,
        StepOutput::Fail {
            reason: "declined".into(),
            error: None
        }
    );
    assert_eq!((entry.seq, entry.version, entry.at_ms), (4, 4, 17));
}
