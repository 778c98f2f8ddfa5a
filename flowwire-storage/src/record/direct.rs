//! The two values every step encodes — its record and its history entry — written as
//! postcard writes them, without going through serde for their common parts.
//!
//! Postcard writes a struct as its fields one after the other, with no framing: an integer
//! as a varint, a byte string as its length (a varint) and its bytes, an option as a tag
//! byte and its value, an enum as its variant's index (a varint) and its fields. So a value
//! can be written part by part, and each part that is not the common one (a fan-out, a
//! typed error, a saga, a payload on a tier) is handed to postcard itself. What this file
//! writes is postcard's own bytes: the tests at the end compare them, byte for byte, over
//! every variant and every optional part, and the decoders are serde's.
//!
//! Why: serde's way through these values costs a call and a `Result` per field, and
//! the record and the entry together are a quarter of a step's instructions on the
//! in-memory engine (BENCHMARKS.md, "One core").

use bytes::Bytes;

use super::history::{HistoryEntryRef, PayloadRef, StepInput, StepOutput};
use super::model::{PendingCall, Record, Status};
use super::placed::{PlacedRecord, Retired};
use crate::blob::{BlobRef, Payload};
use crate::codec::{append_postcard, push_small};
use crate::rope::Rope;

/// Appends `v` as a postcard varint (LEB128: seven bits a byte, lowest first).
#[inline]
fn varint(out: &mut Vec<u8>, mut v: u64) {
    while v >= 0x80 {
        out.push((v as u8) | 0x80);
        v >>= 7;
    }
    out.push(v as u8);
}

/// Appends a byte string or a string: its length, then its bytes.
#[inline]
fn bytes(out: &mut Vec<u8>, b: &[u8]) {
    varint(out, b.len() as u64);
    push_small(out, b);
}

/// Appends an inline payload as [`Payload::Inline`] is written (its variant's index, 0,
/// then its bytes).
#[inline]
fn inline(out: &mut Vec<u8>, b: &Bytes) {
    out.push(crate::blob::INLINE.1 as u8);
    bytes(out, b);
}

#[inline]
fn payload(out: &mut Vec<u8>, p: &Payload) -> postcard::Result<()> {
    match p {
        Payload::Inline(b) => {
            inline(out, b);
            Ok(())
        }
        other => append_postcard(other, out),
    }
}

/// A record's payload as it is written: placed ([`Payload`]), or bytes that stay inline,
/// written as [`Payload::Inline`] is (a record all of whose payloads stay inline is written
/// from the live record, without a placed copy of it: `Placement::seal_into`).
pub(super) trait PutPayload {
    /// The bytes written inline (0 for a payload elsewhere).
    fn inline_len(&self) -> usize;
    /// Appends the payload.
    fn put(&self, out: &mut Vec<u8>) -> postcard::Result<()>;
}

impl PutPayload for Payload {
    fn inline_len(&self) -> usize {
        match self {
            Payload::Inline(b) => b.len(),
            _ => 0,
        }
    }

    #[inline]
    fn put(&self, out: &mut Vec<u8>) -> postcard::Result<()> {
        payload(out, self)
    }
}

impl PutPayload for Bytes {
    fn inline_len(&self) -> usize {
        self.len()
    }

    #[inline]
    fn put(&self, out: &mut Vec<u8>) -> postcard::Result<()> {
        inline(out, self);
        Ok(())
    }
}

impl PutPayload for Rope {
    fn inline_len(&self) -> usize {
        self.len()
    }

    #[inline]
    fn put(&self, out: &mut Vec<u8>) -> postcard::Result<()> {
        match self {
            Rope::Flat(b) => inline(out, b),
            // Its bytes, contiguous (a state in pieces is placed, not written from here).
            Rope::Pieces { .. } => inline(out, &self.flat()),
        }
        Ok(())
    }
}

/// An option written by postcard when it is set (rare parts), as the tag 0 when not.
#[inline]
fn rare<T: serde::Serialize>(out: &mut Vec<u8>, v: Option<&T>) -> postcard::Result<()> {
    match v {
        None => {
            out.push(0);
            Ok(())
        }
        // `Some(&T)` is written as `Some(T)` is.
        Some(_) => append_postcard(&v, out),
    }
}

/// A list written by postcard when it has items, as the length 0 when not.
#[inline]
fn list<T: serde::Serialize>(out: &mut Vec<u8>, v: &[T]) -> postcard::Result<()> {
    if v.is_empty() {
        out.push(0);
        Ok(())
    } else {
        append_postcard(v, out)
    }
}

#[inline]
fn string(out: &mut Vec<u8>, v: Option<&str>) {
    match v {
        None => out.push(0),
        Some(s) => {
            out.push(1);
            bytes(out, s.as_bytes());
        }
    }
}

#[inline]
fn status(out: &mut Vec<u8>, s: &Status) -> postcard::Result<()> {
    // The variants' indices, in declaration order (checked by the tests below).
    let index = match s {
        Status::Running => 0,
        Status::Waiting => 1,
        Status::Finished => 2,
        Status::Sleeping => 5,
        Status::Compensating => 6,
        other => return append_postcard(other, out),
    };
    out.push(index);
    Ok(())
}

#[inline]
fn pending<P: PutPayload>(out: &mut Vec<u8>, c: Option<&PendingCall<P>>) -> postcard::Result<()> {
    let Some(c) = c else {
        out.push(0);
        return Ok(());
    };
    out.push(1);
    varint(out, c.seq);
    varint(out, u64::from(c.link));
    varint(out, u64::from(c.method));
    c.call.put(out)?;
    varint(out, u64::from(c.redelivered));
    varint(out, u64::from(c.attempts));
    Ok(())
}

/// A persisted record's parts, as [`PlacedRecord`] holds them: its record (its payloads
/// written as `P` and `S` say), its correlation key as persisted, and its lists of blobs.
pub(super) struct RecordParts<'a, P, S> {
    pub record: &'a Record<P, S>,
    pub correlation: Option<&'a str>,
    pub retired: &'a [Retired],
    pub trash: &'a [BlobRef],
}

/// Writes `p`'s postcard bytes (what `PlacedRecord`'s derived `Serialize` writes).
pub(super) fn placed_record(p: &PlacedRecord, out: &mut Vec<u8>) -> postcard::Result<()> {
    record_parts(
        &RecordParts {
            record: &p.record,
            correlation: p.record.correlation.as_deref(),
            retired: &p.retired,
            trash: &p.trash,
        },
        out,
    )
}

/// Writes the postcard bytes of the [`PlacedRecord`] whose parts `p` are.
pub(super) fn record_parts<P: PutPayload, S: PutPayload>(
    p: &RecordParts<'_, P, S>,
    out: &mut Vec<u8>,
) -> postcard::Result<()> {
    let r = p.record;
    // Room for every fixed part at its widest, and the payloads inline: one growth at
    // most for the common record.
    out.reserve(96 + r.state.inline_len() + r.pending.as_ref().map_or(0, |c| c.call.inline_len()));
    varint(out, u64::from(r.flow_version));
    varint(out, r.seq);
    status(out, &r.status)?;
    r.state.put(out)?;
    pending(out, r.pending.as_ref())?;
    rare(out, r.timer.as_ref())?;
    list(out, &r.compensations)?;
    string(out, r.failing.as_deref());
    string(out, p.correlation);
    rare(out, r.fan.as_ref())?;
    rare(out, r.error.as_ref())?;
    rare(out, r.cancel.as_ref())?;
    list(out, p.retired)?;
    list(out, p.trash)
}

#[inline]
fn step_input(out: &mut Vec<u8>, input: &StepInput) -> postcard::Result<()> {
    match input {
        StepInput::Outcome { call_seq, ok } => {
            out.push(2);
            varint(out, *call_seq);
            out.push(u8::from(*ok));
            Ok(())
        }
        other => append_postcard(other, out),
    }
}

#[inline]
fn step_output(out: &mut Vec<u8>, output: &StepOutput) -> postcard::Result<()> {
    match output {
        StepOutput::Drive {
            call_seq,
            link,
            method,
        } => {
            out.push(0);
            varint(out, *call_seq);
            varint(out, u64::from(*link));
            varint(out, u64::from(*method));
            Ok(())
        }
        other => append_postcard(other, out),
    }
}

/// Writes `e`'s postcard bytes (what `HistoryEntryRef`'s derived `Serialize` writes).
pub(super) fn history_entry(e: &HistoryEntryRef<'_>, out: &mut Vec<u8>) -> postcard::Result<()> {
    let payload_len = |p: Option<PayloadRef<'_>>| match p {
        Some(PayloadRef::Inline(b)) => b.len(),
        Some(PayloadRef::Placed(p)) => p.inline_len(),
        None => 0,
    };
    out.reserve(96 + payload_len(e.payload) + payload_len(e.state));
    varint(out, e.seq);
    step_input(out, e.input)?;
    step_output(out, e.output)?;
    varint(out, e.version);
    match e.payload {
        None => out.push(0),
        Some(PayloadRef::Inline(b)) => {
            out.push(1);
            inline(out, b);
        }
        Some(PayloadRef::Placed(p)) => {
            out.push(1);
            payload(out, p)?;
        }
    }
    match e.state {
        None => out.push(0),
        Some(PayloadRef::Inline(b)) => {
            out.push(1);
            inline(out, b);
        }
        Some(PayloadRef::Placed(p)) => {
            out.push(1);
            payload(out, p)?;
        }
    }
    varint(out, e.at_ms);
    Ok(())
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;

    use bytes::Bytes;

    use super::{history_entry, placed_record};
    use crate::blob::{BlobRef, Payload};
    use crate::chunk::{ChunkRef, Chunked};
    use crate::record::history::{HistoryEntryRef, PayloadRef};
    use crate::record::{
        Branch, BranchState, Cancel, Compensation, ErrorValue, Fan, PendingCall, PlacedRecord,
        Record, Retired, Status, StepInput, StepOutput, TimeSpec, Timer,
    };

    fn blob(key: &str) -> BlobRef {
        BlobRef {
            tier: "fs".into(),
            key: key.into(),
            len: 300_000,
            crc: 0xdead_beef,
        }
    }

    /// Every form a payload takes: inline (empty, short, longer than a short copy), in a
    /// blob, in chunks.
    fn payloads() -> Vec<Payload> {
        vec![
            Payload::Inline(Bytes::new()),
            Payload::Inline(Bytes::from_static(b"state")),
            Payload::Inline(Bytes::from(vec![0xa5; 300])),
            Payload::Blob(blob("Order/a/3.s")),
            Payload::Chunked(Chunked {
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
                inline: Arc::default(),
            }),
        ]
    }

    fn statuses() -> Vec<Status> {
        let reason = "the card was declined".to_string();
        vec![
            Status::Running,
            Status::Waiting,
            Status::Finished,
            Status::Failed {
                reason: reason.clone(),
            },
            Status::Quarantined {
                reason: reason.clone(),
            },
            Status::Sleeping,
            Status::Compensating,
            Status::Cancelled { reason },
        ]
    }

    fn plain(status: Status, state: Payload) -> PlacedRecord {
        PlacedRecord {
            record: Record {
                status,
                ..Record::unwritten(1, state)
            },
            retired: Vec::new(),
            trash: Vec::new(),
        }
    }

    fn assert_as_postcard(p: &PlacedRecord) {
        let mut ours = vec![0xee]; // appended after what is there
        placed_record(p, &mut ours).expect("written");
        let theirs = postcard::to_allocvec(p).expect("serialized");
        assert_eq!(ours[1..], theirs[..], "{p:?}");
    }

    /// A record written part by part is postcard's own bytes for it: every status, every
    /// form of its state and of its call's arguments, integers of every width, and each
    /// rarely set part on its own and all together.
    #[test]
    fn a_record_is_written_byte_for_byte_as_postcard_writes_it() {
        for status in statuses() {
            for state in payloads() {
                assert_as_postcard(&plain(status.clone(), state));
            }
        }
        let mut all = plain(Status::Running, Payload::Inline(Bytes::from_static(b"s")));
        for call in payloads() {
            for wide in [0, 127, 128, u64::from(u32::MAX), u64::MAX] {
                all.record.flow_version = wide as u32;
                all.record.seq = wide;
                all.record.pending = Some(PendingCall {
                    seq: wide,
                    link: wide as u16,
                    method: 300,
                    call: call.clone(),
                    redelivered: wide as u32,
                    attempts: 129,
                });
                assert_as_postcard(&all);
            }
        }
        let rare: [fn(&mut PlacedRecord); 9] = [
            |p| {
                p.record.timer = Some(Timer {
                    due_ms: 1_700_000_000_000,
                    spec: TimeSpec::After(5_000),
                });
            },
            |p| {
                p.record.compensations = vec![Compensation {
                    seq: 4,
                    link: 1,
                    method: 2,
                    call: Bytes::from_static(b"refund"),
                }];
            },
            |p| p.record.failing = Some("out of stock".into()),
            |p| p.record.correlation = Some("order-77".into()),
            |p| p.record.correlation = Some("k".repeat(200)),
            |p| {
                p.record.fan = Some(Fan {
                    seq: 9,
                    first: true,
                    parallel: 4,
                    branches: vec![Branch {
                        link: 1,
                        method: 0,
                        call: Bytes::from_static(b"ship"),
                        undo: None,
                        state: BranchState::Sent { redelivered: 1 },
                        attempts: 2,
                    }],
                });
            },
            |p| {
                p.record.error = Some(ErrorValue {
                    type_name: "Declined".into(),
                    value: Bytes::from_static(b"\x01"),
                });
            },
            |p| {
                p.record.cancel = Some(Cancel {
                    reason: "by the customer".into(),
                    abandoned: Some(7),
                });
            },
            |p| {
                p.retired = vec![Retired {
                    died: 3,
                    blob: blob("Order/a/2.s"),
                }];
                p.trash = vec![blob("Order/a/1.c")];
            },
        ];
        let mut every = plain(Status::Compensating, Payload::Blob(blob("Order/a/5.s")));
        for set in rare {
            let mut one = plain(Status::Waiting, Payload::Inline(Bytes::from_static(b"s")));
            set(&mut one);
            assert_as_postcard(&one);
            set(&mut every);
        }
        assert_as_postcard(&every);
    }

    fn inputs() -> Vec<StepInput> {
        let (id, name) = ("imp-1".to_string(), "note".to_string());
        vec![
            StepInput::Start,
            StepInput::Impulse {
                id: id.clone(),
                name: name.clone(),
            },
            StepInput::Outcome {
                call_seq: 3,
                ok: true,
            },
            StepInput::Outcome {
                call_seq: 300,
                ok: false,
            },
            StepInput::Park,
            StepInput::Timer { due_ms: 1 << 40 },
            StepInput::Redeliver { call_seq: 5 },
            StepInput::Resume,
            StepInput::Patch,
            StepInput::Rewind { to: 2 },
            StepInput::BranchOutcome {
                call_seq: 6,
                branch: 2,
                ok: true,
            },
            StepInput::Cancel {
                reason: "late".into(),
            },
            StepInput::StartWith { id, name },
        ]
    }

    fn outputs() -> Vec<StepOutput> {
        vec![
            StepOutput::Drive {
                call_seq: 4,
                link: 1,
                method: 2,
            },
            StepOutput::Drive {
                call_seq: 1 << 20,
                link: 400,
                method: 200,
            },
            StepOutput::Wait,
            StepOutput::Finish,
            StepOutput::Fail {
                reason: "declined".into(),
                error: Some(ErrorValue {
                    type_name: "Declined".into(),
                    value: Bytes::from_static(b"\x00"),
                }),
            },
            StepOutput::Quarantine {
                reason: "panicked".into(),
            },
            StepOutput::Sleep { due_ms: 9 },
            StepOutput::WaitUntil { due_ms: 10 },
            StepOutput::Compensate {
                call_seq: 1,
                registered: 2,
                link: 3,
                method: 4,
            },
            StepOutput::Fan {
                call_seq: 5,
                done: 1,
                branches: 3,
            },
            StepOutput::Retry {
                call_seq: 6,
                branch: Some(1),
                link: 0,
                method: 1,
                attempt: 2,
                due_ms: 3,
                fault: Some("timed out".into()),
            },
            StepOutput::Cancelled {
                reason: "by the customer".into(),
            },
            StepOutput::Abandoned {
                call_seq: 7,
                branch: None,
            },
        ]
    }

    /// A history entry written part by part is postcard's own bytes for it: every input
    /// and every output, its payload absent, inline or placed, its state absent or in
    /// every form.
    #[test]
    fn a_history_entry_is_written_byte_for_byte_as_postcard_writes_it() {
        let reply = Bytes::from_static(b"\x00\x2a");
        let placed = payloads();
        let mut forms: Vec<Option<PayloadRef<'_>>> = vec![None, Some(PayloadRef::Inline(&reply))];
        forms.extend(placed.iter().map(|p| Some(PayloadRef::Placed(p))));
        let states: Vec<Option<PayloadRef<'_>>> = [None, Some(PayloadRef::Inline(&reply))]
            .into_iter()
            .chain(placed.iter().map(|p| Some(PayloadRef::Placed(p))))
            .collect();
        let (inputs, outputs) = (inputs(), outputs());
        let mut checked = 0;
        for input in &inputs {
            for output in &outputs {
                for (payload, state) in forms.iter().zip(states.iter().cycle()) {
                    let entry = HistoryEntryRef {
                        seq: 1 << 33,
                        input,
                        output,
                        version: 130,
                        payload: *payload,
                        state: *state,
                        at_ms: 1_764_000_000_000,
                    };
                    let mut ours = vec![0xee];
                    history_entry(&entry, &mut ours).expect("written");
                    let theirs = postcard::to_allocvec(&entry).expect("serialized");
                    assert_eq!(ours[1..], theirs[..], "{input:?} {output:?}");
                    checked += 1;
                }
            }
        }
        assert_eq!(checked, inputs.len() * outputs.len() * forms.len());
    }
}
