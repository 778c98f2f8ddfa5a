//! The commit pipeline: taking inputs into the batch being built, staging steps (and
//! uploading their blobs first when they go to a tier), sending one batch at a time to the
//! store, and acting on the store's answer step by step.

use std::collections::VecDeque;
use std::mem;

use flowwire_storage::ladder::{Sealed, Written};
use flowwire_storage::record::Persisted;
use flowwire_storage::{StepResult, StoreError};
use tokio::sync::oneshot;

use crate::engine::msg::Msg;
use crate::error::Error;
use crate::flow::Flow;

use super::{
    Ack, Batch, Committed, InFlight, Input, Internal, Phase, Result, Runner, Staged, Upload,
    Uploaded, poll_once,
};

impl<F: Flow> Batch<F> {
    /// Adds a step, with its placed record and its write. The store takes `writes` with
    /// each batch, so the next one is allocated at the last batch's length at once rather
    /// than grown by doubling (each doubling copied the writes so far).
    /// (The sealed step comes whole, its parts moved from where it lies: each move of a
    /// part through an argument of its own copied it once more.)
    pub(super) fn push(&mut self, s: Staged<F>, sealed: Sealed) {
        Self::reserve(&mut self.writes, self.hint);
        self.writes.push(sealed.write);
        self.placed.push(sealed.placed);
        self.staged.push(s);
    }

    /// Allocates `writes`, a new batch's, at the last batch's length, `hint` (see
    /// [`Batch::push`]). (Given the batch's parts: its steps may be borrowed meanwhile.)
    fn reserve(writes: &mut Vec<flowwire_storage::StepWrite>, hint: usize) {
        if writes.capacity() == 0 {
            writes.reserve(hint);
        }
    }
}

/// The most steps a round takes when the store answers its commits at once (the in-memory
/// store): there is no disk sync to share, so a larger round only spreads each step's
/// work over more memory. Measured on 1,024 instances stepping on one core
/// (`engine-* --bench "steps, 1 core"`, 2026-12-04): 0.59-0.60 M steps/s in rounds of up
/// to 1,024 steps, 0.60 M at 256, 0.65 M at 64 and at 32, 0.63-0.64 M at 16 (more rounds,
/// each with its fixed cost).
const INSTANT_ROUND: usize = 64;

impl<F: Flow> Runner<F> {
    /// The most steps the next round takes: `max_batch`, or [`INSTANT_ROUND`] if it is
    /// less and the store answered the last commit at once.
    pub(super) fn round_max(&self) -> usize {
        if self.instant {
            self.limits.max_batch.min(INSTANT_ROUND)
        } else {
            self.limits.max_batch
        }
    }

    /// Takes messages from the backlog into the batch being built, at most one per
    /// instance and `max_batch` in all. A message for an instance with a step in flight
    /// waits for its commit; a second one for an instance in this batch waits in
    /// `deferred` until the batch is sent; a shutdown stops the taking.
    pub(super) async fn take(
        &mut self,
        backlog: &mut VecDeque<Input<F>>,
        deferred: &mut VecDeque<Input<F>>,
        shutdown: &mut Option<oneshot::Sender<()>>,
    ) {
        let max = self.round_max();
        let mut reached = false;
        while self.building.staged.len() < max {
            let Some(input) = backlog.pop_front() else {
                break;
            };
            reached = true;
            // Its instance is being read: it waits behind the input that asked first.
            if let Some(id) = input.instance()
                && let Some(held) = self.slots.loading_mut(id)
            {
                held.push_back(input);
                continue;
            }
            // Whether the input's instance is in memory (found by the lookup below, once).
            let mut resident = false;
            if let Some(id) = input.serial_on() {
                // A probe need not wait for an upload: it reads the committed bytes.
                let probe = matches!(input, Input::Msg(Msg::Probe { .. }));
                let flying = self.inflight.is_some();
                // A resident instance is marked with the batch that took a message for it
                // (no set to hash into); any other goes in `busy` (an empty set answers
                // without hashing).
                let slot = self.slots.get_mut(id);
                resident = slot.is_some();
                let taken = match slot {
                    Some(slot) if slot.phase.uploading() && !probe => {
                        slot.held.push_back(input);
                        continue;
                    }
                    Some(slot)
                        if flying
                            && (slot.phase.round() == self.flight_round
                                || self.flight_busy.contains(id)) =>
                    {
                        self.waiting.push_back(input);
                        continue;
                    }
                    None if flying && self.flight_busy.contains(id) => {
                        self.waiting.push_back(input);
                        continue;
                    }
                    Some(slot) if slot.phase.round() == self.round || self.busy.contains(id) => {
                        true
                    }
                    Some(slot) => {
                        slot.phase = slot.phase.taken_for(self.round);
                        // An outcome for an instance in memory (the usual input) is applied
                        // here, with the slot just found (one lookup the fewer), and
                        // without building the future of `handle`, which is several KiB.
                        if let Input::Outcome(mut o) = input {
                            if o.retry_ms.is_none()
                                && o.branch.is_none()
                                && slot.inst.awaits_reply(o.seq)
                            {
                                // The usual one, the reply its wire waits for: its step
                                // comes unwrapped (see `Instance::take_reply`).
                                let step = slot.inst.take_reply(
                                    o.seq,
                                    &mut o.result,
                                    self.now_ms,
                                    &mut self.scratch,
                                );
                                self.stage(Staged {
                                    step,
                                    ack: Ack::Outcome(o),
                                    via: None,
                                });
                            } else {
                                let step = Self::outcome_step(
                                    slot,
                                    &mut o,
                                    self.now_ms,
                                    &mut self.scratch,
                                );
                                self.stage_outcome(step, o);
                            }
                            continue;
                        }
                        false
                    }
                    None => !self.busy.insert(id.clone()),
                };
                if taken {
                    deferred.push_back(input);
                    continue;
                }
            }
            if let Input::Msg(Msg::Shutdown { reply }) = input {
                *shutdown = Some(reply);
                break;
            }
            if let Some(id) = input.serial_on()
                && input.faults_in()
                && !resident
                && !self.reads.contains_key(id)
            {
                // It took no message for this batch: only its read is under way.
                self.busy.remove(id);
                self.fetch(id.clone(), input);
                continue;
            }
            if let Some(s) = self.handle(input).await {
                self.stage(s);
            }
        }
        // The inputs of the reads that ended went first in this round: a read none of them
        // took (they were answered without it, or wait for the next round) is not kept,
        // since its record may be outdated by then. An input that waits reads again.
        if reached {
            self.reads.clear();
        }
    }

    /// Places a step's payloads and adds it to the batch being built. A step with blobs
    /// to write starts their upload and joins a later batch once they land (a step with
    /// new blobs to cut has them cut and written first, off the runner: see
    /// `Placement::precut`); one whose payloads cannot be placed fails now.
    ///
    /// The step goes into the batch first and is placed where it lies: a step is several
    /// hundred bytes, and each move of it is a copy (a move into the batch is two).
    pub(super) fn stage(&mut self, s: Staged<F>) {
        self.building.staged.push(s);
        self.place(None);
    }

    /// Places the step last added to the batch being built (see [`stage`](Self::stage));
    /// `written`: its precut wrote these (`Some`: the step comes back from its task, so its
    /// instance joins the batch being built here). A step that does not join the batch now
    /// is taken back out of it.
    fn place(&mut self, written: Option<&Written>) {
        let Some(s) = self.building.staged.last() else {
            return;
        };
        let slot = self.slots.get(s.id());
        // The committed record: as persisted, and as the instance holds it.
        let prev = slot.and_then(|slot| slot.placed.as_ref().map(|p| (p, slot.inst.record())));
        // An earlier attempt of this step whose commit failed: its chunks are where the
        // retry finds its own (the committed state's it shared included).
        let attempt = slot.and_then(|slot| slot.attempt.as_ref());
        if written.is_none()
            && let Some(plan) = self.placement.precut(
                &s.step.draft.record.state,
                attempt
                    .map(|a| (&a.state, None))
                    .or_else(|| prev.and_then(|(p, live)| p.placed_state(live))),
            )
        {
            let placement = self.placement.clone();
            let (key, seq) = (s.step.draft.key.clone(), s.step.draft.record.seq);
            let Some(s) = self.building.staged.pop() else {
                return;
            };
            self.upload(s, true, async move {
                let written = placement.cut_and_put(&key, seq, plan).await?;
                Ok(Upload::Cut(written))
            });
            return;
        }
        // An outcome from the bus is acknowledged by the write that applies it.
        // (One handed over by its worker settles its call instead: `carry`.)
        let acknowledges = match &s.ack {
            Ack::Outcome(o) => o
                .receipt
                .as_ref()
                .and_then(|r| r.stream_entry())
                .map(std::sync::Arc::from),
            _ => None,
        };
        let back = written.is_some();
        // The write and the placed record are built in the batch's vectors, where they
        // stay (see `Placement::seal_into`).
        Batch::<F>::reserve(&mut self.building.writes, self.building.hint);
        let sealed = self.placement.seal_into(
            &s.step.draft,
            prev,
            Some(&flowwire_storage::ladder::Reuse { written, attempt }),
            self.retention,
            (&mut self.scratch.out, &mut self.scratch.arena),
            (&mut self.building.writes, &mut self.building.placed),
        );
        let mut rest = match sealed {
            Ok(rest) => rest,
            Err(e) => {
                let Some(s) = self.building.staged.pop() else {
                    return;
                };
                if back {
                    self.joins(s.id());
                }
                self.failed(s, &Error::from(e));
                return;
            }
        };
        let mut sends = Vec::new();
        if let Some(write) = self.building.writes.last() {
            self.carry(s, &write.record, &mut sends);
        }
        let fence = self.owned.as_ref().map(|o| o.token);
        if let Some(write) = self.building.writes.last_mut() {
            write.fence = fence;
            write.acknowledges = acknowledges;
            write.sends = sends;
        }
        if rest.puts.is_empty() {
            // It stays in the batch. (Its id is cloned only on the rare paths below.)
            if back || rest.attempt.is_some() {
                let id = self.building.staged.last().map(|s| s.id().clone());
                if let Some(id) = id {
                    if back {
                        self.joins(&id);
                    }
                    self.attempting(&id, rest.attempt.take());
                }
            }
            return;
        }
        let Some(s) = self.building.staged.pop() else {
            return;
        };
        let (Some(write), Some(placed)) = (self.building.writes.pop(), self.building.placed.pop())
        else {
            // `seal_into` pushes both when it succeeds: never here.
            let e = flowwire_storage::BlobError::Corrupt {
                instance: s.id().to_string(),
                tier: "record".into(),
                key: s.id().to_string(),
                detail: "a sealed step left no write in the batch".into(),
            };
            self.failed(s, &Error::from(e));
            return;
        };
        // Rare (a blob to write, a payload too large): not in this batch. A start's id was
        // checked before its precut.
        let mut sealed = Sealed {
            write,
            placed,
            puts: rest.puts,
            attempt: rest.attempt,
        };
        let placement = self.placement.clone();
        self.upload(s, !back, async move {
            let key = &sealed.write.key;
            placement.put_all(key, &sealed.puts).await?;
            // The bytes are on their tier; the step needs only the record now.
            drop(mem::take(&mut sealed.puts));
            Ok(Upload::Sealed(sealed))
        });
    }

    /// The step of `id` joins a batch with its blobs written: a retry after a failed
    /// commit may refer to them. A step with none in chunks keeps an earlier attempt's:
    /// only a commit's answer (`forget_attempt`) ends what the blobs are safe for.
    fn attempting(&mut self, id: &str, attempt: Option<flowwire_storage::ladder::Attempt>) {
        if let Some(attempt) = attempt
            && let Some(slot) = self.slots.get_mut(id)
        {
            slot.attempt = Some(attempt);
        }
    }

    /// The store answered a step of `id` other than with a transient failure: its blobs
    /// are referred to by the record it committed, or by none (and may be collected), so
    /// no later step may refer to them as an attempt's.
    pub(super) fn forget_attempt(&mut self, id: &str) {
        if let Some(slot) = self.slots.get_mut(id) {
            slot.attempt = None;
        }
    }

    /// A step's task is done: a sealed step joins the batch being built, and its
    /// instance's held messages wait for that batch's commit; a precut step is sealed.
    pub(super) fn landed(&mut self, u: Uploaded<F>) {
        let Uploaded { staged: s, result } = u;
        self.uploading = self.uploading.saturating_sub(1);
        match result {
            Ok(Upload::Cut(written)) => {
                self.building.staged.push(s);
                self.place(Some(&written));
            }
            Ok(Upload::Sealed(mut sealed)) => {
                self.joins(s.id());
                self.attempting(s.id(), sealed.attempt.take());
                self.building.push(s, sealed);
            }
            Err(e) => {
                self.joins(s.id());
                self.failed(s, &e);
            }
        }
    }

    /// The instance `id`, back from a task of its step's, joins the batch being built;
    /// the messages it held go back to the backlog.
    fn joins(&mut self, id: &str) {
        if let Some(slot) = self.slots.get_mut(id) {
            slot.phase = Phase::Batched { round: self.round };
            self.requeue.extend(slot.held.drain(..));
        }
    }

    /// Sends the batch being built to the store in one call, and starts the next batch.
    /// A store that answers at once has its results acted on now; otherwise the commit
    /// stays in flight (bounded by the store timeout) while the next batch is built.
    pub(super) async fn submit(&mut self) {
        // One batch in flight at a time (the loop submits only when none is).
        self.land_now().await;
        if self.building.staged.is_empty() {
            // Messages taken without a step (probes, refusals) release their instances.
            self.round += 1;
            self.busy.clear();
            return;
        }
        // The vectors alternate between the two batches and keep their capacity; the
        // store takes the writes (a remote one sends them elsewhere): one allocation.
        let writes = mem::take(&mut self.building.writes);
        self.building.hint = writes.len();
        let staged = mem::replace(&mut self.building.staged, mem::take(&mut self.spare.0));
        let placed = mem::replace(&mut self.building.placed, mem::take(&mut self.spare.1));
        self.flight_round = self.round;
        self.round += 1;
        mem::swap(&mut self.busy, &mut self.flight_busy);
        self.busy.clear();
        if let Some(owned) = &self.owned
            && !owned.lease.holds()
        {
            // The lease may have run out, and a newer owner may be writing: nothing is
            // committed. Inputs from the bus are not acknowledged, so the next owner
            // takes them; the supervisor releases the shard.
            tracing::warn!(
                flow = F::NAME,
                shard = owned.shard,
                token = owned.token,
                "shard lease ran out before its renewal was confirmed; stopping"
            );
            self.lost = true;
            drop(writes);
            self.spare = (staged, placed);
            self.spare.0.clear();
            self.spare.1.clear();
            self.flight_busy.clear();
            return;
        }
        let mut commit = self.store.commit(writes);
        let answered = poll_once(&mut commit).await;
        self.instant = answered.is_some();
        match answered {
            Some(result) => self.act(staged, placed, result).await,
            None => {
                let limit = self.limits.store_timeout;
                self.inflight = Some(InFlight {
                    staged,
                    placed,
                    commit: Box::pin(tokio::time::timeout(limit, commit)),
                });
            }
        }
    }

    /// Waits for the batch in flight to land (forever if there is none).
    pub(super) async fn landing(
        inflight: &mut Option<InFlight<F>>,
    ) -> std::result::Result<Committed, tokio::time::error::Elapsed> {
        match inflight {
            Some(f) => f.commit.as_mut().await,
            None => std::future::pending().await,
        }
    }

    /// Acts on the landed batch in flight.
    pub(super) async fn land(
        &mut self,
        r: std::result::Result<Committed, tokio::time::error::Elapsed>,
    ) {
        let Some(InFlight { staged, placed, .. }) = self.inflight.take() else {
            return;
        };
        let result = r.unwrap_or(Err(StoreError::Timeout(self.limits.store_timeout)));
        self.act(staged, placed, result).await;
    }

    /// Waits for the batch in flight, if any, and acts on it.
    pub(super) async fn land_now(&mut self) {
        if self.inflight.is_some() {
            let r = Self::landing(&mut self.inflight).await;
            self.land(r).await;
        }
    }

    /// Commits everything taken: the batch in flight, then the one being built.
    pub(super) async fn flush(&mut self) {
        self.land_now().await;
        self.submit().await;
        self.land_now().await;
    }

    /// Acts on each step of a committed batch (in batch order), and lets the messages that
    /// waited for it be taken again.
    pub(super) async fn act(
        &mut self,
        mut staged: Vec<Staged<F>>,
        mut placed: Vec<Persisted>,
        result: Committed,
    ) {
        // Whether anyone listens to the engine's events: asked once a batch (the question
        // takes a lock).
        let listening = self.events.wanted();
        match result {
            Ok(results)
                if results.len() == staged.len()
                    && results.iter().all(|r| matches!(r, StepResult::Committed)) =>
            {
                // The usual batch, every step committed: each is acted on where it lies (a
                // step is several hundred bytes; moving it out only to drop it is most of
                // what acting on it would copy).
                for (s, placed) in staged.iter_mut().zip(placed.iter_mut()) {
                    self.committed(s, placed, listening);
                }
                staged.clear();
            }
            Ok(results) => {
                let mut results = results.into_iter();
                for (mut s, mut placed) in staged.drain(..).zip(placed.drain(..)) {
                    self.forget_attempt(s.id());
                    match results.next() {
                        Some(StepResult::Committed) => {
                            self.committed(&mut s, &mut placed, listening);
                        }
                        Some(StepResult::Conflict { .. }) => {
                            // It reads the store: the calls of the steps before it go first.
                            self.send_jobs();
                            self.conflicted(s).await;
                        }
                        Some(StepResult::ImpulseSeen { seq }) => self.seen(s, seq),
                        Some(StepResult::Fenced { token }) => {
                            // Nothing of it is kept: its caller sees the runner stop, and
                            // the new owner takes the input from the bus.
                            tracing::warn!(flow = F::NAME, id = %s.id(), token, "shard lost to a newer owner; stopping");
                            self.lost = true;
                        }
                        None => {
                            // The store broke its contract: the step is not known to
                            // be committed.
                            let e = StoreError::Backend(
                                "the store answered fewer results than steps".into(),
                            );
                            self.failed(s, &Error::Store(e));
                        }
                    }
                }
            }
            Err(e) if e.is_transient() => {
                // The batch may have been applied all the same (a reply lost, a timeout on
                // this side): each instance is checked against the store once it answers.
                let e = Error::Store(e);
                tracing::error!(flow = F::NAME, error = %e, "commit failed or unanswered");
                for s in staged.drain(..) {
                    let id = s.id().clone();
                    self.failed(s, &e);
                    self.again(Input::Verify { id, attempt: 0 }, 0);
                }
            }
            Err(e) => {
                let e = Error::Store(e);
                tracing::error!(flow = F::NAME, error = %e, "commit failed");
                for s in staged.drain(..) {
                    self.forget_attempt(s.id());
                    self.failed(s, &e);
                }
            }
        }
        self.send_jobs();
        placed.clear();
        self.spare = (staged, placed);
        self.flight_busy.clear();
        self.requeue.extend(self.waiting.drain(..));
    }

    /// Runs `work` (writing a step's blobs) on a task of its own, bounded by the store
    /// timeout, and reports back through the inbox. The instance holds its next inputs
    /// until then. `check`: a start is refused before anything is written if its id is
    /// taken (the commit's `Expect::Absent` still decides a race; the blob keys are unique
    /// per write, so a losing start's blobs can never replace the winner's).
    pub(super) fn upload(
        &mut self,
        s: Staged<F>,
        check: bool,
        work: impl Future<Output = Result<Upload>> + Send + 'static,
    ) {
        if let Some(slot) = self.slots.get_mut(s.id()) {
            slot.phase = Phase::Uploading {
                round: slot.phase.round(),
            };
        }
        self.uploading += 1;
        let inbox = self.inbox.clone();
        let limit = self.limits.store_timeout;
        let taken = (check && matches!(s.ack, Ack::Start(_))).then(|| self.store.clone());
        let key = s.step.draft.key.clone();
        tokio::spawn(async move {
            let run = async {
                if let Some(store) = taken
                    && store.load(&key).await?.is_some()
                {
                    return Err(Error::AlreadyExists {
                        flow: F::NAME,
                        id: key.id.to_string(),
                    });
                }
                work.await
            };
            let result = match tokio::time::timeout(limit, run).await {
                Ok(r) => r,
                Err(_) => Err(Error::Store(StoreError::Timeout(limit))),
            };
            let _ = inbox.send(Internal::Uploaded(Box::new(Uploaded { staged: s, result })));
        });
    }
}
