//! What a writer keeps of a committed record's persisted form between its steps: the
//! placed record, or nothing when the live record is that form already (every payload
//! inline, no blob to account for), which is most steps of most flows.

use super::direct::{RecordParts, record_parts};
use super::model::{LiveRecord, Record};
use super::placed::PlacedRecord;
use crate::blob::Payload;
use crate::codec::{self, Checksums, Kind};
use crate::error::CodecError;
use crate::key::InstanceKey;
use crate::rope::Rope;

/// A committed record's persisted form, as the writer keeps it for the instance's next
/// step ([`Placement::seal_into`](crate::ladder::Placement::seal_into) reads it beside the
/// live record as the previous record, and gives the new one's).
///
/// ```
/// use bytes::Bytes;
/// use flowwire::storage::blob::Payload;
/// use flowwire::storage::record::{Persisted, Record};
///
/// let live = Record::unwritten(1, Bytes::from_static(b"state")).live();
/// // An inline record's placed form is the live record with its payloads inline.
/// let placed = Persisted::Inline.to_placed(&live);
/// assert_eq!(placed.record.state, Payload::Inline(Bytes::from_static(b"state")));
/// assert!(placed.retired.is_empty() && placed.trash.is_empty());
/// ```
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Persisted {
    /// Every payload of the record stays inline and it refers to no blob: what was
    /// persisted is the live record itself (without its correlation key once it ended),
    /// so no copy of it is kept. (A copy cost a step several hundred bytes moved and a
    /// reference count taken and given back for each payload.)
    Inline,
    /// The record with its payloads placed on the ladder, and its lists of blobs (boxed:
    /// the inline form, most steps', is then a word, cheap to move and swap).
    Placed(Box<PlacedRecord>),
}

impl Persisted {
    /// The placed record, `live` being the record this was persisted from.
    pub fn to_placed(&self, live: &LiveRecord) -> PlacedRecord {
        match self {
            Persisted::Placed(p) => (**p).clone(),
            Persisted::Inline => PlacedRecord {
                record: Record {
                    correlation: persisted_correlation(live).map(str::to_owned),
                    ..live.with_payloads(
                        Payload::Inline(live.state.flat()),
                        live.pending
                            .as_ref()
                            .map(|c| c.with_call(Payload::Inline(c.call.clone()))),
                    )
                },
                retired: Vec::new(),
                trash: Vec::new(),
            },
        }
    }

    /// The placed record, with the live record's state when that is the one it persists
    /// (not after a migration on load changed the flow version in memory); `None` for an
    /// inline record, which has no placed copy.
    pub(crate) fn placed_with_state<'a>(
        &'a self,
        live: &'a LiveRecord,
    ) -> Option<(&'a PlacedRecord, Option<&'a Rope>)> {
        match self {
            Persisted::Inline => None,
            Persisted::Placed(p) => Some((
                &**p,
                (p.record.flow_version == live.flow_version).then_some(&live.state),
            )),
        }
    }

    /// The state as placed, with the live record's when that is the one persisted (see
    /// `placed_with_state`): what a step's state is compared with, and shares chunks with
    /// ([`Placement::precut`](crate::ladder::Placement::precut)). `None` for an inline
    /// record: its state has no chunk to share, and a state in pieces is never the same as
    /// a flat one.
    pub fn placed_state<'a>(
        &'a self,
        live: &'a LiveRecord,
    ) -> Option<(&'a Payload, Option<&'a Rope>)> {
        self.placed_with_state(live)
            .map(|(p, state)| (&p.record.state, state))
    }

    /// `p`, or [`Persisted::Inline`] when that is what `p` is (see
    /// [`PlacedRecord::is_inline`]).
    pub fn of(p: PlacedRecord) -> Persisted {
        if p.is_inline() {
            Persisted::Inline
        } else {
            Persisted::Placed(Box::new(p))
        }
    }
}

impl PlacedRecord {
    /// Whether every payload is inline and no blob waits to be collected: the record is
    /// then the live record it was placed from ([`Persisted::Inline`]).
    pub fn is_inline(&self) -> bool {
        matches!(self.record.state, Payload::Inline(_))
            && self
                .record
                .pending
                .as_ref()
                .is_none_or(|c| matches!(c.call, Payload::Inline(_)))
            && self.retired.is_empty()
            && self.trash.is_empty()
    }
}

/// The correlation key a record is persisted with: its own while the instance has not
/// ended (the store indexes it), none after.
pub(crate) fn persisted_correlation<P, S>(r: &Record<P, S>) -> Option<&str> {
    r.correlation.as_deref().filter(|_| !r.status.is_terminal())
}

impl LiveRecord {
    /// Encodes the record of instance `key` as the [`PlacedRecord`] that
    /// [`Persisted::Inline`] stands for (its payloads inline, no blob lists) would be, in
    /// its envelope, appending to `out`. For a record whose payloads all stay inline.
    pub(crate) fn encode_inline(
        &self,
        key: &InstanceKey,
        out: &mut Vec<u8>,
        checksums: Checksums,
    ) -> Result<(), CodecError> {
        codec::encode_owned_by(Kind::Record, key, out, checksums, |out| {
            record_parts(
                &RecordParts {
                    record: self,
                    correlation: persisted_correlation(self),
                    retired: &[],
                    trash: &[],
                },
                out,
            )
        })
    }
}

#[cfg(test)]
mod tests {
    use bytes::Bytes;

    use super::Persisted;
    use crate::codec::Checksums;
    use crate::record::{
        Cancel, InstanceKey, LiveRecord, PendingCall, PlacedRecord, Record, Status, TimeSpec, Timer,
    };
    use crate::rope::Rope;

    fn live(status: Status, correlation: Option<&str>, call: Option<&[u8]>) -> LiveRecord {
        Record {
            seq: 300,
            status,
            pending: call.map(|c| PendingCall {
                seq: 299,
                link: 1,
                method: 2,
                call: Bytes::copy_from_slice(c),
                redelivered: 0,
                attempts: 1,
            }),
            timer: Some(Timer {
                due_ms: 1_764_000_000_000,
                spec: TimeSpec::After(5_000),
            }),
            correlation: correlation.map(str::to_owned),
            cancel: Some(Cancel {
                reason: "by the customer".into(),
                abandoned: None,
            }),
            ..Record::unwritten(3, Rope::Flat(Bytes::from(vec![0xa5; 200])))
        }
    }

    /// A record written from the live one is, byte for byte, the placed record it stands
    /// for, which decodes back to it: with and without a call in flight, a correlation key
    /// kept while the instance runs and dropped once it ended, either kind of checksum.
    #[test]
    fn an_inline_record_is_written_as_its_placed_form_is() {
        let key = InstanceKey::new("Order", "order-1");
        let mut checked = 0;
        for status in [Status::Running, Status::Waiting, Status::Finished] {
            for correlation in [None, Some("customer-7")] {
                for call in [None, Some(&b"charge 9995"[..])] {
                    let live = live(status.clone(), correlation, call);
                    let placed = Persisted::Inline.to_placed(&live);
                    assert!(placed.is_inline());
                    assert_eq!(
                        placed.record.correlation.is_some(),
                        correlation.is_some() && !status.is_terminal()
                    );
                    for checksums in [Checksums::Written, Checksums::OnRead] {
                        let (mut ours, mut theirs) = (Vec::new(), Vec::new());
                        live.encode_inline(&key, &mut ours, checksums).unwrap();
                        placed.encode_with(&key, &mut theirs, checksums).unwrap();
                        assert_eq!(ours, theirs, "{status:?} {correlation:?} {call:?}");
                    }
                    let mut bytes = Vec::new();
                    live.encode_inline(&key, &mut bytes, Checksums::Written)
                        .unwrap();
                    assert_eq!(PlacedRecord::decode(&bytes, &key, 1 << 20).unwrap(), placed);
                    checked += 1;
                }
            }
        }
        assert_eq!(checked, 12);
    }

    /// Only a record with every payload inline and no blob to account for is the live
    /// one: a placed record with a blob stays what it is.
    #[test]
    fn only_a_record_inline_throughout_is_kept_as_inline() {
        let live = live(Status::Running, None, Some(b"call"));
        let inline = Persisted::Inline.to_placed(&live);
        assert_eq!(Persisted::of(inline.clone()), Persisted::Inline);
        let blob = crate::blob::BlobRef {
            tier: "fs".into(),
            key: "Order/order-1/300.s".into(),
            len: 300_000,
            crc: 7,
        };
        let mut on_a_tier = inline.clone();
        on_a_tier.record.state = crate::blob::Payload::Blob(blob.clone());
        let mut with_trash = inline.clone();
        with_trash.trash.push(blob);
        for p in [on_a_tier, with_trash] {
            assert!(!p.is_inline());
            assert_eq!(Persisted::of(p.clone()), Persisted::Placed(Box::new(p)));
        }
    }
}
