//! Sealing a step: its payloads placed (`place.rs`), the blob references the record keeps,
//! the accounting of blobs a step retires, and the record and history entry encoded into
//! the write the store commits.

use std::sync::Arc;

use bytes::Bytes;

use crate::blob::{BlobRef, Payload};
use crate::error::BlobError;
use crate::record::{Draft, HistoryEntryRef, PayloadRef, PlacedRecord, Retired, StepWrite};
use crate::rope::Rope;

use super::{Placement, Retention, Sealed};

impl Placement {
    #[allow(clippy::result_large_err)] // as for `place`
    /// Places a step's payloads and builds its write.
    ///
    /// `prev` is the committed record: its persisted form, and its state when it is the one
    /// that form holds (`None` after a migration changed them in memory: the
    /// state is then placed anew even when the step leaves it as it is). `None` for a start.
    /// `written`: the chunks this step's precut wrote, if it had one. `buf` is a reusable
    /// encode buffer; the record and the history entry are carved from `arena`.
    pub fn seal(
        &self,
        draft: &Draft,
        prev: Option<(&PlacedRecord, Option<&Rope>)>,
        reuse: Option<&super::Reuse<'_>>,
        retention: Retention,
        buf: &mut Vec<u8>,
        arena: &mut crate::arena::Arena,
    ) -> Result<Sealed, BlobError> {
        let (mut write, mut placed) = (None, None);
        let rest = self.seal_with(
            draft,
            prev,
            reuse,
            retention,
            (buf, arena),
            (&mut placed, |w| write = Some(w)),
        )?;
        let (Some(write), Some(placed)) = (write, placed) else {
            return Err(BlobError::Corrupt {
                instance: draft.key.to_string(),
                tier: "record".into(),
                key: draft.key.to_string(),
                detail: "a sealed step gave no write".into(),
            });
        };
        Ok(Sealed {
            write,
            placed,
            puts: rest.puts,
            attempt: rest.attempt,
        })
    }

    #[allow(clippy::result_large_err)] // as for `place`
    /// As [`seal`](Self::seal), with the step's write pushed onto `writes` and its placed
    /// record onto `placed`, where a batch keeps them: each is built where it stays,
    /// instead of moving (a copy of several hundred bytes each time) through a returned
    /// [`Sealed`]. Nothing is pushed when it fails.
    ///
    /// ```
    /// use flowwire::storage::arena::Arena;
    /// use flowwire::storage::record::{Draft, Expect, InstanceKey, Record, Status, StepInput, StepOutput};
    /// use flowwire::storage::{Ladder, Retention};
    ///
    /// let placement = Ladder::inline_only().validate(1 << 20).expect("a valid ladder");
    /// let record = Record {
    ///     flow_version: 1,
    ///     seq: 0,
    ///     status: Status::Waiting,
    ///     state: b"state".as_slice().into(),
    ///     pending: None,
    ///     timer: None,
    ///     compensations: Vec::new(),
    ///     failing: None,
    ///     correlation: None,
    ///     fan: None,
    ///     error: None,
    ///     cancel: None,
    /// };
    /// let draft = Draft {
    ///     key: InstanceKey::new("Order", "order-1"),
    ///     expect: Expect::Absent,
    ///     version: 1,
    ///     record: record.live(),
    ///     impulse: None,
    ///     input: StepInput::Start,
    ///     output: StepOutput::Wait,
    ///     payload: None,
    ///     at_ms: 0,
    /// };
    /// let (mut writes, mut placed) = (Vec::new(), Vec::new());
    /// let (mut buf, mut arena) = (Vec::new(), Arena::default());
    /// let rest = placement
    ///     .seal_into(&draft, None, None, Retention::All, (&mut buf, &mut arena), (&mut writes, &mut placed))
    ///     .expect("a small step seals");
    /// assert!(rest.puts.is_empty()); // nothing to write before the commit: all inline
    /// assert_eq!((writes.len(), placed.len()), (1, 1));
    /// assert_eq!(writes[0].version, 1);
    /// ```
    pub fn seal_into(
        &self,
        draft: &Draft,
        prev: Option<(&PlacedRecord, Option<&Rope>)>,
        reuse: Option<&super::Reuse<'_>>,
        retention: Retention,
        (buf, arena): (&mut Vec<u8>, &mut crate::arena::Arena),
        (writes, placed): (&mut Vec<StepWrite>, &mut Vec<PlacedRecord>),
    ) -> Result<super::SealedRest, BlobError> {
        self.seal_with(
            draft,
            prev,
            reuse,
            retention,
            (buf, arena),
            (placed, |w| writes.push(w)),
        )
    }

    #[allow(clippy::result_large_err)] // as for `place`
    fn seal_with(
        &self,
        draft: &Draft,
        prev: Option<(&PlacedRecord, Option<&Rope>)>,
        reuse: Option<&super::Reuse<'_>>,
        retention: Retention,
        (buf, arena): (&mut Vec<u8>, &mut crate::arena::Arena),
        (slot, emit): (&mut impl PlacedSlot, impl FnOnce(StepWrite)),
    ) -> Result<super::SealedRest, BlobError> {
        let written = reuse.and_then(|r| r.written);
        let attempt = reuse.and_then(|r| r.attempt);
        // Borrowed, not cloned: only what the placed record and the write keep is copied
        // (reference counts for payloads).
        let Draft {
            key,
            expect,
            version,
            record,
            impulse,
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
        let active = record.has_call_out();
        let parked = matches!(record.status, crate::record::Status::Quarantined { .. });
        let timer = record.timer.map(|t| t.due_ms);
        let correlation: Option<Arc<str>> = record
            .correlation
            .as_deref()
            .filter(|_| !record.status.is_terminal())
            .map(Arc::from);
        let ended_key: Option<Arc<str>> = record
            .correlation
            .as_deref()
            .filter(|_| record.status.is_terminal())
            .map(Arc::from);
        let uncorrelate = prev
            .and_then(|(p, _)| p.record.correlation.as_deref())
            .filter(|old| correlation.as_deref() != Some(*old))
            .map(Arc::from);
        // Built where it stays (a record is several hundred bytes: each move copies it),
        // and taken back out if the step cannot be sealed.
        let Some(placed) = slot.put(PlacedRecord {
            record: record.with_payloads(state, pending),
            retired: kept,
            trash: if gone.is_empty() {
                dead
            } else {
                dead.into_iter()
                    .chain(gone.into_iter().map(|r| r.blob))
                    .collect()
            },
        }) else {
            return Err(BlobError::Corrupt {
                instance: key.to_string(),
                tier: "record".into(),
                key: key.to_string(),
                detail: "no place to build the record in".into(),
            });
        };
        placed.record.correlation = correlation.as_deref().map(str::to_owned);
        let encoded = self.encode_step(
            draft,
            placed,
            match inline_input {
                Some(b) => Some(PayloadRef::Inline(b)),
                None => payload.as_ref().map(PayloadRef::Placed),
            },
            keep_history,
            (buf, arena),
        );
        let (record_bytes, history) = match encoded {
            Ok(bytes) => bytes,
            Err(e) => {
                slot.take_back();
                return Err(e);
            }
        };
        let prune_below = match retention {
            Retention::Last(_) if keep_from > 0 => Some(keep_from),
            _ => None,
        };
        // Only chunks are ever referred to again (a whole blob's key is the write's own).
        let attempt = (placed.record.state.chunked().is_some()
            || payload.as_ref().and_then(Payload::chunked).is_some())
        .then(|| super::Attempt {
            state: placed.record.state.clone(),
            input: payload,
        });
        emit(StepWrite {
            key: key.clone(),
            expect: *expect,
            version: *version,
            seq,
            record: record_bytes,
            active,
            parked,
            timer,
            correlation,
            uncorrelate,
            ended_key,
            impulse: impulse.clone(),
            history,
            prune_below,
            fence: None,
            acknowledges: None,
            sends: Vec::new(),
            checksums: self.checksums(),
        });
        Ok(super::SealedRest { puts, attempt })
    }

    #[allow(clippy::result_large_err)] // as for `place`
    /// A step's record and, when history is kept, its history entry, encoded into `arena`.
    fn encode_step(
        &self,
        draft: &Draft,
        placed: &PlacedRecord,
        payload: Option<PayloadRef<'_>>,
        keep_history: bool,
        (buf, arena): (&mut Vec<u8>, &mut crate::arena::Arena),
    ) -> Result<(Bytes, Option<(u64, Bytes)>), BlobError> {
        let Draft {
            key,
            version,
            input,
            output,
            at_ms,
            ..
        } = draft;
        let seq = draft.record.seq;
        // A value this build cannot encode (its error, for the value named `tier`).
        // (Nothing is allocated unless it fails: this runs every step.)
        let corrupt = |tier: &'static str| {
            move |e: crate::CodecError| BlobError::Corrupt {
                instance: key.to_string(),
                tier: tier.into(),
                key: key.to_string(),
                detail: e.to_string(),
            }
        };
        buf.clear();
        placed
            .encode_with(key, buf, self.checksums())
            .map_err(corrupt("record"))?;
        // The envelope's header is not counted by the decode limit; the payload is.
        let payload_len = buf.len().saturating_sub(crate::codec::HEADER_LEN);
        if payload_len > self.record_limit {
            return Err(BlobError::OverLimit {
                instance: key.to_string(),
                what: "record",
                len: payload_len as u64,
                limit: self.record_limit,
            });
        }
        let record_bytes = arena.copy(buf);
        if !keep_history {
            return Ok((record_bytes, None));
        }
        let entry = HistoryEntryRef {
            seq,
            input,
            output,
            version: *version,
            payload,
            state: Some(&placed.record.state),
            at_ms: *at_ms,
        };
        buf.clear();
        entry
            .encode_with(key, buf, self.checksums())
            .map_err(corrupt("history"))?;
        Ok((record_bytes, Some((seq, arena.copy(buf)))))
    }
}

/// Where a sealed step's placed record is built: in place, where it stays, so that it is
/// not copied by each move (several hundred bytes each time).
trait PlacedSlot {
    /// Puts `p` in its place; the record there.
    fn put(&mut self, p: PlacedRecord) -> Option<&mut PlacedRecord>;
    /// Takes back the record put last (the step could not be sealed).
    fn take_back(&mut self);
}

impl PlacedSlot for Option<PlacedRecord> {
    fn put(&mut self, p: PlacedRecord) -> Option<&mut PlacedRecord> {
        Some(self.insert(p))
    }

    fn take_back(&mut self) {
        *self = None;
    }
}

impl PlacedSlot for Vec<PlacedRecord> {
    fn put(&mut self, p: PlacedRecord) -> Option<&mut PlacedRecord> {
        self.push(p);
        self.last_mut()
    }

    fn take_back(&mut self) {
        self.pop();
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

#[cfg(test)]
mod tests {
    use crate::arena::Arena;
    use crate::record::{Draft, Expect, InstanceKey, Record, Status, StepInput, StepOutput};
    use crate::{Ladder, Retention};

    fn start(id: &str, correlation: Option<String>) -> Draft {
        let record = Record {
            flow_version: 1,
            seq: 0,
            status: Status::Waiting,
            state: bytes::Bytes::from_static(b"state"),
            pending: None,
            timer: None,
            compensations: Vec::new(),
            failing: None,
            correlation,
            fan: None,
            error: None,
            cancel: None,
        };
        Draft {
            key: InstanceKey::new("Order", id),
            expect: Expect::Absent,
            version: 1,
            record: record.live(),
            impulse: None,
            input: StepInput::Start,
            output: StepOutput::Wait,
            payload: None,
            at_ms: 0,
        }
    }

    /// A batch keeps its steps, their writes and their placed records index for index: a
    /// step that cannot be sealed must leave nothing behind in the batch's vectors, or the
    /// next step's write would be paired with another instance's record.
    #[test]
    fn a_step_that_cannot_be_sealed_leaves_the_batch_as_it_was() {
        let placement = Ladder::inline_only().validate(256).expect("a valid ladder");
        let (mut writes, mut placed) = (Vec::new(), Vec::new());
        let (mut buf, mut arena) = (Vec::new(), Arena::default());
        placement
            .seal_into(
                &start("small", None),
                None,
                None,
                Retention::All,
                (&mut buf, &mut arena),
                (&mut writes, &mut placed),
            )
            .expect("a small step seals");
        // Its state is small, but its correlation key takes its record over the 256-byte limit.
        let err = placement
            .seal_into(
                &start("keyed", Some("k".repeat(300))),
                None,
                None,
                Retention::All,
                (&mut buf, &mut arena),
                (&mut writes, &mut placed),
            )
            .expect_err("a record over the limit is refused");
        assert!(
            matches!(err, crate::BlobError::OverLimit { what: "record", .. }),
            "{err}"
        );
        assert_eq!((writes.len(), placed.len()), (1, 1));
        assert_eq!(&*writes[0].key.id, "small");
        let decoded =
            crate::record::PlacedRecord::decode(&writes[0].record, &writes[0].key, 1 << 20)
                .expect("the first step's record decodes");
        assert_eq!(decoded, placed[0]);
    }
}
