//! Sealing a step some payload of which is placed on a tier, or was (the previous
//! record's): its placed record, built with the accounting of the blobs it keeps, retires
//! and drops. (A step whose payloads all stay inline is sealed from its live record:
//! `seal.rs`.)

use crate::blob::{BlobRef, Payload};
use crate::error::BlobError;
use crate::record::{Draft, PayloadRef, Persisted, PlacedRecord, Retired, persisted_correlation};
use crate::rope::Rope;

use super::encode::{Encoded, Written};
use super::{Placement, Retention};

impl Placement {
    #[allow(clippy::result_large_err)] // as for `place`
    /// Seals a step some payload of which is placed (or was: the previous record's), by
    /// building its placed record: the record and history entry encoded, and what is left
    /// to write before the commit. `prev`: the previous placed record, with its state when
    /// that is the one it persists.
    pub(super) fn seal_placed(
        &self,
        draft: &Draft,
        prev: Option<(&PlacedRecord, Option<&Rope>)>,
        reuse: Option<&super::Reuse<'_>>,
        retention: Retention,
        (buf, arena): (&mut Vec<u8>, &mut crate::arena::Arena),
    ) -> Result<(Encoded, super::SealedRest, Persisted), BlobError> {
        let written = reuse.and_then(|r| r.written);
        let attempt = reuse.and_then(|r| r.attempt);
        // Borrowed, not cloned: only what the placed record and the write keep is copied
        // (reference counts for payloads).
        let Draft {
            key,
            record,
            payload,
            ..
        } = draft;
        let seq = record.seq;
        let mut puts = Vec::new();
        let state = match prev {
            // A chunked state is compared by its split (which keeps every chunk of an
            // unchanged one): comparing it here too would read both states once more. An
            // inline one is not compared either: placing it anew costs no more than the
            // comparison, and writes nothing.
            Some((p, Some(rope)))
                if same_state(
                    rope,
                    &record.state,
                    p.record.state.chunked().is_none() && !self.stays_inline(record.state.len()),
                ) =>
            {
                p.record.state.clone()
            }
            // The chunks of a failed attempt of this step cover all of its state (the
            // committed state's chunks it shared included): it is where they are found.
            _ => self.place_state(
                key,
                seq,
                &record.state,
                attempt
                    .map(|a| (&a.state, None))
                    .or_else(|| prev.map(|(p, rope)| (&p.record.state, rope))),
                written,
                &mut puts,
            )?,
        };
        let pending = match &record.pending {
            None => None,
            Some(c) => {
                let kept = prev
                    .and_then(|(p, _)| p.record.pending.as_ref())
                    .filter(|p| p.seq == c.seq)
                    .map(|p| p.call.clone());
                let call = match kept {
                    Some(call) => call,
                    None => self.place(
                        key,
                        c.seq,
                        'c',
                        c.call.clone(),
                        prev.and_then(|(p, _)| p.record.pending.as_ref())
                            .map(|p| (&p.call, None)),
                        &mut puts,
                    )?,
                };
                Some(c.with_call(call))
            }
        };
        let keep_history = retention != Retention::None;
        // The input's payload, for the history entry: one that stays inline (most) is
        // encoded from where it is (`inline_input`), not placed (a placed copy is a
        // reference count taken and given back, for nothing); any other is placed.
        let inline_input = payload
            .as_ref()
            .filter(|b| keep_history && self.stays_inline(b.len()));
        let payload = match payload {
            Some(b) if keep_history && inline_input.is_none() => Some(self.place(
                key,
                seq,
                'i',
                b.clone(),
                attempt.and_then(|a| a.input.as_ref()).map(|p| (p, None)),
                &mut puts,
            )?),
            _ => None,
        };

        // Blob accounting. A call argument no history entry refers to: once the record
        // drops it, it is garbage. A state the previous record referred to and this one does
        // not is retired at this step (the previous step's snapshot shares it); the input's
        // blob only this step's entry refers to.
        // A chunked payload counts each of its chunks: the ones the next payload of its role
        // shares stay, the others are dropped.
        let mut dead: Vec<BlobRef> = Vec::new();
        if let Some((p, _)) = prev
            && let Some(old) = p.record.pending.as_ref()
        {
            dead = old.call.dropped_by(key, pending.as_ref().map(|c| &c.call));
        }
        let mut retired: Vec<Retired> = Vec::new();
        if retention != Retention::All {
            if let Some((p, _)) = prev {
                retired.extend(p.retired.iter().cloned());
                retired.extend(
                    p.record
                        .state
                        .dropped_by(key, Some(&state))
                        .into_iter()
                        .map(|blob| Retired { died: seq, blob }),
                );
            }
            if let Some(p) = &payload {
                retired.extend(p.blobs(key).into_iter().map(|blob| Retired {
                    died: seq + 1,
                    blob,
                }));
            }
        }
        let keep_from = retention.keep_from(seq);
        // Most steps retire nothing: no iterator machinery for them.
        let (gone, kept): (Vec<Retired>, Vec<Retired>) = if retired.is_empty() {
            (Vec::new(), Vec::new())
        } else {
            retired.into_iter().partition(|r| r.died <= keep_from)
        };
        let mut placed = PlacedRecord {
            record: record.with_payloads(state, pending),
            retired: kept,
            trash: if gone.is_empty() {
                dead
            } else {
                dead.into_iter()
                    .chain(gone.into_iter().map(|r| r.blob))
                    .collect()
            },
        };
        placed.record.correlation = persisted_correlation(record).map(str::to_owned);
        let encoded = self.encode_step(
            draft,
            Written::Placed(&placed),
            match inline_input {
                Some(b) => Some(PayloadRef::Inline(b)),
                None => payload.as_ref().map(PayloadRef::Placed),
            },
            PayloadRef::Placed(&placed.record.state),
            keep_history,
            (buf, arena),
        );
        let (record_bytes, history) = encoded?;
        // Only chunks are ever referred to again (a whole blob's key is the write's own).
        let attempt = (placed.record.state.chunked().is_some()
            || payload.as_ref().and_then(Payload::chunked).is_some())
        .then(|| super::Attempt {
            state: placed.record.state.clone(),
            input: payload,
        });
        // A record placed inline throughout (the first step after one was read back, or
        // after a payload on a tier) is kept as the live one it is.
        Ok((
            (record_bytes, history),
            super::SealedRest { puts, attempt },
            Persisted::of(placed),
        ))
    }
}

/// Whether two states hold the same bytes: the same buffer or the same pieces (an
/// unchanged state is shared, not copied) answers without comparing large bytes; otherwise
/// one-piece states are compared if `compare`. (A state in pieces that is not the same is
/// placed again: its split keeps every chunk an unchanged one has.)
fn same_state(a: &Rope, b: &Rope, compare: bool) -> bool {
    a.same(b)
        || (compare
            && match (a, b) {
                (Rope::Flat(x), Rope::Flat(y)) => x == y,
                _ => false,
            })
}
