//! Sealing a step: the write the store commits, and the persisted form of its record the
//! writer keeps for the next step. A step whose payloads all stay inline (most) is sealed
//! from its live record here; one with a payload on a tier has its placed record built,
//! with its blob accounting (`placed.rs`). Both are encoded by `encode.rs`.

use std::sync::Arc;

use bytes::Bytes;

use crate::error::BlobError;
use crate::record::{Draft, LiveRecord, PayloadRef, Persisted, StepWrite, persisted_correlation};
use crate::rope::Rope;

use super::encode::Written;
use super::{Placement, Retention, Sealed};

impl Placement {
    #[allow(clippy::result_large_err)] // as for `place`
    /// Places a step's payloads and builds its write.
    ///
    /// `prev` is the committed record: its persisted form, and the record as the writer
    /// keeps it (its state is read as the persisted one unless a migration changed the
    /// flow version in memory: the state is then placed anew even when the step leaves it
    /// as it is). `None` for a start. `reuse`: the chunks this step's precut wrote, if it
    /// had one, and those of a failed attempt of it. `buf` is a reusable encode buffer;
    /// the record and the history entry are carved from `arena`.
    pub fn seal(
        &self,
        draft: &Draft,
        prev: Option<(&Persisted, &LiveRecord)>,
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
    /// As [`seal`](Self::seal), with the step's write pushed onto `writes` and its
    /// persisted form onto `placed`, where a batch keeps them: each is built where it
    /// stays, instead of moving (a copy of several hundred bytes each time) through a
    /// returned [`Sealed`]. Nothing is pushed when it fails.
    ///
    /// ```
    /// use flowwire::storage::arena::Arena;
    /// use flowwire::storage::record::{Draft, Expect, InstanceKey, Persisted, Record, Status, StepInput, StepOutput};
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
    /// assert_eq!(placed[0], Persisted::Inline); // the record is its own persisted form
    /// assert_eq!(writes[0].version, 1);
    /// ```
    pub fn seal_into(
        &self,
        draft: &Draft,
        prev: Option<(&Persisted, &LiveRecord)>,
        reuse: Option<&super::Reuse<'_>>,
        retention: Retention,
        (buf, arena): (&mut Vec<u8>, &mut crate::arena::Arena),
        (writes, placed): (&mut Vec<StepWrite>, &mut Vec<Persisted>),
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
        prev: Option<(&Persisted, &LiveRecord)>,
        reuse: Option<&super::Reuse<'_>>,
        retention: Retention,
        (buf, arena): (&mut Vec<u8>, &mut crate::arena::Arena),
        (slot, emit): (&mut impl PlacedSlot, impl FnOnce(StepWrite)),
    ) -> Result<super::SealedRest, BlobError> {
        let Draft {
            key,
            expect,
            version,
            record,
            impulse,
            ..
        } = draft;
        let keep_history = retention != Retention::None;
        // The correlation key the previous record was persisted with (see `uncorrelate`).
        let before = match prev {
            None => None,
            Some((Persisted::Placed(p), _)) => p.record.correlation.as_deref(),
            Some((Persisted::Inline, live)) => persisted_correlation(live),
        };
        let ((record_bytes, history), rest) =
            match self.inline_state(draft, prev, reuse, keep_history) {
                // Most steps: every payload stays inline and the previous record referred
                // to no blob. The record is written from the live one; nothing is placed,
                // accounted or kept.
                Some(state) => {
                    let encoded = self.encode_step(
                        draft,
                        Written::Inline(record),
                        draft.payload.as_ref().map(PayloadRef::Inline),
                        PayloadRef::Inline(state),
                        keep_history,
                        (buf, arena),
                    )?;
                    slot.put(Persisted::Inline);
                    let rest = super::SealedRest {
                        puts: Vec::new(),
                        attempt: None,
                    };
                    (encoded, rest)
                }
                None => {
                    // The previous record as it was persisted: an inline one is the live one.
                    let materialized;
                    let prev = match prev {
                        None => None,
                        Some((p, live)) => match p.placed_with_state(live) {
                            Some(placed) => Some(placed),
                            None => {
                                materialized = p.to_placed(live);
                                Some((&materialized, Some(&live.state)))
                            }
                        },
                    };
                    let (encoded, rest, persisted) =
                        self.seal_placed(draft, prev, reuse, retention, (buf, arena))?;
                    slot.put(persisted);
                    (encoded, rest)
                }
            };
        let active = record.has_call_out();
        let parked = matches!(record.status, crate::record::Status::Quarantined { .. });
        let timer = record.timer.map(|t| t.due_ms);
        let correlation: Option<Arc<str>> = persisted_correlation(record).map(Arc::from);
        let ended_key: Option<Arc<str>> = record
            .correlation
            .as_deref()
            .filter(|_| record.status.is_terminal())
            .map(Arc::from);
        let uncorrelate = before
            .filter(|old| correlation.as_deref() != Some(*old))
            .map(Arc::from);
        let keep_from = retention.keep_from(record.seq);
        let prune_below = match retention {
            Retention::Last(_) if keep_from > 0 => Some(keep_from),
            _ => None,
        };
        emit(StepWrite {
            key: key.clone(),
            expect: *expect,
            version: *version,
            seq: record.seq,
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
        Ok(rest)
    }

    /// The step's state, when the step needs nothing placed: its state, its call's
    /// arguments and its input (when history keeps it) stay inline, the previous record
    /// referred to no blob, and no earlier write of the step's is to be reused.
    fn inline_state<'d>(
        &self,
        draft: &'d Draft,
        prev: Option<(&Persisted, &LiveRecord)>,
        reuse: Option<&super::Reuse<'_>>,
        keep_history: bool,
    ) -> Option<&'d Bytes> {
        let record = &draft.record;
        let Rope::Flat(state) = &record.state else {
            return None;
        };
        let fits = self.stays_inline(state.len())
            && record
                .pending
                .as_ref()
                .is_none_or(|c| self.stays_inline(c.call.len()))
            && draft
                .payload
                .as_ref()
                .is_none_or(|b| !keep_history || self.stays_inline(b.len()))
            && matches!(prev, None | Some((Persisted::Inline, _)))
            && reuse.is_none_or(|r| r.written.is_none() && r.attempt.is_none());
        fits.then_some(state)
    }
}

/// Where a sealed step's persisted form is kept (put once the step is sealed: a step
/// that cannot be sealed leaves nothing).
trait PlacedSlot {
    /// Puts `p` in its place.
    fn put(&mut self, p: Persisted);
}

impl PlacedSlot for Option<Persisted> {
    fn put(&mut self, p: Persisted) {
        *self = Some(p);
    }
}

impl PlacedSlot for Vec<Persisted> {
    fn put(&mut self, p: Persisted) {
        self.push(p);
    }
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
        let small = start("small", None);
        placement
            .seal_into(
                &small,
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
        assert_eq!(decoded, placed[0].to_placed(&small.record));
    }

    /// A step with every payload inline keeps no placed copy of its record, and its record
    /// is what the placed form would be; a state that moves to a tier and back has its blob
    /// placed, then (when no history is kept) dropped as trash, and the step after that is
    /// inline again.
    #[test]
    fn a_record_is_kept_inline_until_a_payload_goes_to_a_tier_and_after_it_came_back() {
        use crate::Tier;
        use crate::record::{Persisted, PlacedRecord};

        let placement = Ladder::new()
            .inline_below(64)
            .default_to(Tier::memory().named("mem"))
            .validate(1 << 20)
            .expect("a valid ladder");
        let (mut buf, mut arena) = (Vec::new(), Arena::default());
        for (retention, after_the_tier) in [
            // History refers to the blob: it stays.
            (Retention::All, "inline"),
            // Nothing refers to it once the state came back: it goes.
            (Retention::None, "placed, 1 in the trash"),
        ] {
            let mut draft = start("a-1", Some("customer-7".into()));
            let mut prev: Option<(Persisted, crate::record::LiveRecord)> = None;
            let mut forms = Vec::new();
            for (seq, len) in [(0u64, 5usize), (1, 5), (2, 5_000), (3, 5), (4, 5)] {
                draft.record.seq = seq;
                draft.expect = if seq == 0 {
                    Expect::Absent
                } else {
                    Expect::Version(seq)
                };
                draft.version = seq + 1;
                draft.record.state = bytes::Bytes::from(vec![seq as u8; len]).into();
                // The last step moves the instance to another correlation key.
                let key = if seq == 4 { "customer-8" } else { "customer-7" };
                draft.record.correlation = Some(key.into());
                let sealed = placement
                    .seal(
                        &draft,
                        prev.as_ref().map(|(p, live)| (p, live)),
                        None,
                        retention,
                        &mut buf,
                        &mut arena,
                    )
                    .expect("sealed");
                // What the store is given is the placed form, whichever is kept.
                let decoded = PlacedRecord::decode(&sealed.write.record, &draft.key, 1 << 20)
                    .expect("the record decodes");
                assert_eq!(
                    decoded,
                    sealed.placed.to_placed(&draft.record),
                    "step {seq}"
                );
                assert_eq!(sealed.write.correlation.as_deref(), Some(key));
                let moved = (seq == 4).then_some("customer-7");
                assert_eq!(sealed.write.uncorrelate.as_deref(), moved, "step {seq}");
                assert_eq!(sealed.puts.len(), usize::from(len > 64), "step {seq}");
                forms.push(match &sealed.placed {
                    Persisted::Inline => "inline".to_string(),
                    Persisted::Placed(p) => format!("placed, {} in the trash", p.trash.len()),
                });
                prev = Some((sealed.placed, draft.record.clone()));
            }
            assert_eq!(
                forms,
                [
                    "inline",
                    "inline",
                    "placed, 0 in the trash",
                    after_the_tier,
                    "inline",
                ],
                "{retention:?}"
            );
        }
    }
}
