//! The effects of a step after its commit, or of its failure: replies, dispatches,
//! events, timers, waiters, and what a conflict, a seen impulse or a failed write does.

use std::sync::Arc;

use flowwire_storage::Status;
use flowwire_storage::record::{BusSend, Persisted};

use crate::core::{CANCEL_ID, Outgoing};
use crate::ended::Ended;
use crate::engine::job::{CallPolicy, Job, OutcomeMsg};
use crate::error::Error;
use crate::events::EventKind;
use crate::flow::Flow;
use crate::meta::Policy;

use super::{Ack, Input, Internal, Runner, Staged, backoff};

/// Reply handles a runner keeps for its next jobs (more come back only when more calls
/// were out at once: the rest are dropped).
const SPARE_REPLIES: usize = 4096;

impl<F: Flow> Staged<F> {
    /// Gives an outcome back the reply its step took (`Instance::take_outcome` moves the
    /// reply's bytes into the step's history payload, leaving the outcome empty bytes):
    /// called before the outcome is parted from its step to be applied again. A reply
    /// that was empty gets back the same empty bytes; a failed attempt's outcome
    /// (`retry_ms`) is applied by `Instance::retry`, which takes nothing.
    fn restore_reply(&mut self) {
        if let Ack::Outcome(o) = &mut self.ack
            && o.retry_ms.is_none()
            && let Ok(reply) = &mut o.result
            && reply.is_empty()
            && let Some(payload) = &mut self.step.draft.payload
        {
            *reply = std::mem::take(payload);
        }
    }
}

impl<F: Flow> Runner<F> {
    /// Acknowledges an outcome that came over the bus: it is applied or no longer needed.
    ///
    /// One its worker handed over is not: its call stays pending, and the worker, seeing
    /// that no commit settled it, writes the outcome to the stream, where it is settled.
    pub(super) fn settle(&self, o: &OutcomeMsg) {
        if let (Some(entry), Some(owned)) = (
            o.receipt.as_ref().and_then(|r| r.stream_entry()),
            &self.owned,
        ) {
            let _ = owned.acks.send(entry.to_string());
        }
    }

    /// Acts on a committed step; `listening`: whether anyone listens to the engine's events.
    ///
    /// The instance takes `placed` by a swap: `placed` is left holding the form it had
    /// before, for the batch to drop.
    pub(super) fn committed(&mut self, s: &mut Staged<F>, placed: &mut Persisted, listening: bool) {
        let record = &s.step.draft.record;
        let (seq, after) = (record.seq, record.timer.map(|t| t.due_ms));
        let ended = Ended::of(record);
        let announced = Self::announced(&record.status);
        let quarantined = match &record.status {
            Status::Quarantined { reason } => Some(reason.clone()),
            _ => None,
        };
        let leaves = !record.has_call_out();
        let Some(slot) = self.slots.get_mut(s.id()) else {
            // A step of an instance that is not in memory (parking a record another
            // version wrote): nothing to adopt.
            self.announce(s, seq, listening);
            return;
        };
        let before = slot.inst.record().timer.map(|t| t.due_ms);
        slot.failures = 0;
        // Its blobs are the committed record's now (see `forget_attempt`).
        slot.attempt = None;
        match &mut slot.placed {
            Some(held) => std::mem::swap(held, placed),
            None => slot.placed = Some(std::mem::replace(placed, Persisted::Inline)),
        }
        if let Some(Persisted::Placed(held)) = &slot.placed {
            super::resident::collect(&self.placement, &held.trash);
        }
        if ended.is_none() {
            // The instance takes the step's record (found once: an ended one leaves memory
            // below). From here, the step holds the record the instance had before: what
            // is read of the committed one was read above.
            slot.inst.adopt(&mut s.step);
        }
        if leaves {
            // It may leave memory at the end of the round (one with a call in flight stays).
            self.touched.push(s.id().clone());
        }
        tracing::debug!(flow = F::NAME, id = %s.id(), step = seq, input = ?s.step.draft.input, output = ?s.step.draft.output, "step");
        // The timer set follows the records: a moved or dropped timer leaves it, a timer
        // armed within the window read from the index joins it.
        if before != after {
            if let Some(old) = before {
                self.timers.remove(&(old, s.id().clone()));
            }
            if let Some(due) = after
                && due <= self.horizon
            {
                self.timers.insert((due, s.id().clone()));
            }
        }
        self.announce(s, seq, listening);
        // An outcome's own handle on the instance's id, for the job of the call its step
        // sends (the same id: its step is the instance's).
        let mut id_back = None;
        match std::mem::replace(&mut s.ack, Ack::Quiet) {
            Ack::Start(reply) | Ack::Impulse(reply, _) => {
                // The commit replied and settled the bus request with the step (`carry`).
                if let Some(via) = &s.via
                    && self.carries()
                {
                    via.mark_settled();
                }
                let _ = reply.send(Ok(()));
            }
            Ack::Operate(reply) => {
                let _ = reply.send(Ok(seq));
            }
            // Acknowledged by the write itself (`StepWrite::acknowledges`); its reply handle
            // goes to the next job.
            Ack::Outcome(o) => id_back = Some(self.reuse_reply(o)),
            Ack::Retry(_) | Ack::Quiet => {}
        }
        // The step is done with its calls: each is handed to its job (the arguments'
        // buffer moves, and the first job takes the outcome's id: where a clone would take
        // a reference count and give it back).
        for out in std::mem::take(&mut s.step.dispatch) {
            if !self.carried(&out) {
                self.dispatch(s.id(), id_back.take(), out);
            }
        }
        if let Some(owned) = &self.owned
            && owned.outbox.is_none()
            && announced
        {
            let _ = owned.ended.send(s.id().clone());
        }
        if let Some(ended) = ended {
            // Not adopted above: the step holds the committed record.
            self.slots.remove(s.id());
            let state = ended
                .state_is_final()
                .then(|| s.step.draft.record.state.clone());
            for w in self.waiters.remove(s.id()).unwrap_or_default() {
                let _ = w.send(Ok((ended.clone(), state.clone())));
            }
            return;
        }
        if let Some(reason) = quarantined {
            tracing::error!(flow = F::NAME, id = %s.id(), %reason, "instance quarantined");
            for w in self.waiters.remove(s.id()).unwrap_or_default() {
                let _ = w.send(Err(Self::quarantined(s.id(), reason.clone())));
            }
        }
    }

    /// Whether a step's end is announced to callers of `finished()` in other processes.
    fn announced(status: &Status) -> bool {
        status.is_terminal() || matches!(status, Status::Quarantined { .. })
    }

    /// Whether the step's commit carries this call to its driver's stream (see
    /// [`Owned::outbox`](super::Owned::outbox)): a call to a driver this flow links, when
    /// the store carries sends.
    fn carried(&self, out: &Outgoing) -> bool {
        let link = out.call.link;
        self.carries() && link != crate::child::CHILD_LINK && usize::from(link) < F::LINKS.len()
    }

    /// Whether the store carries a step's bus messages in its commit (see
    /// [`Owned::outbox`](super::Owned::outbox)).
    fn carries(&self) -> bool {
        self.owned.as_ref().is_some_and(|o| o.outbox.is_some())
    }

    /// Adds to a step's write the bus messages its commit carries (nothing unless the
    /// store carries them): its driver calls, the announcement that it ended (with
    /// `record`, the step's encoded record, when small), and for a request that came over
    /// the bus, its reply and (one read from the request stream) its entry's
    /// acknowledgement.
    pub(super) fn carry(
        &self,
        s: &Staged<F>,
        record: &[u8],
        sends: &mut Vec<flowwire_storage::record::BusSend>,
    ) {
        let Some(outbox) = self.owned.as_ref().and_then(|o| o.outbox.as_ref()) else {
            return;
        };
        if let Some(via) = &s.via {
            sends.push(BusSend::Publish {
                channel: via.reply_to.clone(),
                body: via.applied.clone(),
            });
            if let Some(entry) = &via.entry {
                sends.push(BusSend::Settle {
                    stream: entry.stream.clone(),
                    group: entry.group.to_string(),
                    entry: entry.id.clone(),
                });
            }
        }
        // An outcome handed over by its worker settles its call.
        if let Ack::Outcome(o) = &s.ack
            && let Some(settle) = o.receipt.as_ref().and_then(|r| r.settles())
        {
            sends.push(settle);
        }
        for out in &s.step.dispatch {
            if self.carried(out) {
                let driver = Self::names(out.call.link, out.call.method).0;
                sends.extend(outbox.call(F::NAME, s.id(), out, driver));
            }
        }
        if Self::announced(&s.step.draft.record.status) {
            sends.push(outbox.ended(s.id(), record));
        }
    }

    /// Sends the lifecycle events of a committed step (only if anyone listens: `listening`,
    /// asked once a batch); what they are is `events::of_step`'s.
    pub(super) fn announce(&self, s: &Staged<F>, seq: u64, listening: bool) {
        if !listening {
            return;
        }
        let d = &s.step.draft;
        let sent = s
            .step
            .dispatch
            .iter()
            .map(|o| (o.call.link, o.call.method, o.call.seq, o.branch));
        crate::events::of_step(&d.input, &d.output, sent, Self::names, |kind| {
            self.events.send(F::NAME, s.id(), seq, kind);
        });
    }

    /// Sends one of the runner's own inputs again after a backoff (its step could not be
    /// persisted).
    pub(super) fn again(&self, input: Input<F>, failures: u32) {
        let delay = backoff(failures);
        let inbox = self.inbox.clone();
        tokio::spawn(async move {
            tokio::time::sleep(delay).await;
            let _ = inbox.send(Internal::Again(Box::new(input)));
        });
    }

    pub(super) async fn conflicted(&mut self, mut s: Staged<F>) {
        s.restore_reply();
        // (The id is the step's: `s.ack` moves out below, `s.step` stays.)
        let id = &s.step.draft.key.id;
        match s.ack {
            Ack::Start(reply) => {
                self.slots.remove(id);
                let _ = reply.send(Err(Error::AlreadyExists {
                    flow: F::NAME,
                    id: id.to_string(),
                }));
            }
            ack => {
                // Someone else wrote the record: the store is the truth, reload it.
                self.slots.remove(id);
                let _ = self.fault_in(id).await;
                let conflict = Error::Conflict {
                    flow: F::NAME,
                    id: id.to_string(),
                };
                match ack {
                    Ack::Impulse(reply, _) => {
                        let _ = reply.send(Err(conflict));
                    }
                    Ack::Operate(reply) => {
                        let _ = reply.send(Err(conflict));
                    }
                    // Applied again to the record as it now is: still in flight, it
                    // counts; applied already, it is dropped.
                    Ack::Outcome(o) => self.requeue.push_back(Input::Outcome(o)),
                    _ => {}
                }
            }
        }
    }

    pub(super) fn seen(&mut self, s: Staged<F>, step: u64) {
        if let Some(slot) = self.slots.get_mut(s.id())
            && slot.inst.revert().is_err()
        {
            tracing::error!(flow = F::NAME, id = %s.id(), "committed state no longer decodes");
        }
        // (The id is the step's: `s.ack` moves out below, `s.step` stays.)
        let id = &s.step.draft.key.id;
        if let Ack::Impulse(reply, impulse_id) = s.ack {
            if &*impulse_id == CANCEL_ID {
                // Cancelled before (by another process, or before a restart): done.
                let _ = reply.send(Ok(()));
                return;
            }
            let _ = reply.send(Err(Error::ImpulseAlreadyApplied {
                flow: F::NAME,
                id: id.to_string(),
                impulse_id: impulse_id.to_string(),
                step,
            }));
        }
    }

    /// A step that could not be persisted (a tier or the store failed): nothing of it is
    /// kept. A start or an impulse reports the error to its caller (who may retry with the
    /// same id); an outcome is applied again after a backoff, until it sticks — the
    /// instance waits, the others go on.
    pub(super) fn failed(&mut self, mut s: Staged<F>, err: &Error) {
        s.restore_reply();
        // (The id is the step's: `s.ack` moves out below, `s.step` stays.)
        let id = &s.step.draft.key.id;
        match s.ack {
            Ack::Start(reply) => {
                self.slots.remove(id);
                let _ = reply.send(Err(err.clone_for_caller()));
            }
            ack => {
                let Some(slot) = self.slots.get_mut(id) else {
                    return;
                };
                let _ = slot.inst.revert();
                if let Error::Store(e) = err
                    && !e.is_transient()
                {
                    self.store_failed(id, err);
                    // The store is damaged or stopped: retrying cannot help, and
                    // `Engine::health` reports it. Callers get the error; an outcome is not
                    // sent again (its call is redelivered when the store is opened again).
                    tracing::error!(flow = F::NAME, id = %id, error = %err, "step not persisted: the store failed for good");
                    match ack {
                        Ack::Impulse(reply, _) => {
                            let _ = reply.send(Err(err.clone_for_caller()));
                        }
                        Ack::Operate(reply) => {
                            let _ = reply.send(Err(err.clone_for_caller()));
                        }
                        _ => {}
                    }
                    return;
                }
                if matches!(err, Error::TooLarge { .. })
                    && matches!(ack, Ack::Outcome(_) | Ack::Retry(_))
                {
                    // The same input gives the same bytes: retrying cannot help. The
                    // instance is parked (its committed state fits), and the input is
                    // settled with that step.
                    let reason = format!(
                        "{err}; an operator can patch the state or raise the limit, then resume it"
                    );
                    tracing::error!(flow = F::NAME, id = %id, error = %err, "step too large; parking the instance");
                    let step = slot.inst.quarantine(reason, self.now_ms, &mut self.scratch);
                    self.stage(Staged {
                        step,
                        ack,
                        via: None,
                    });
                    return;
                }
                slot.failures = slot.failures.saturating_add(1);
                let delay = backoff(slot.failures);
                tracing::warn!(flow = F::NAME, id = %id, error = %err, retry_in = ?delay, "step not persisted");
                match ack {
                    Ack::Impulse(reply, _) => {
                        let _ = reply.send(Err(err.clone_for_caller()));
                    }
                    Ack::Operate(reply) => {
                        let _ = reply.send(Err(err.clone_for_caller()));
                    }
                    Ack::Outcome(o) => {
                        let outcomes = self.outcomes.clone();
                        tokio::spawn(async move {
                            tokio::time::sleep(delay).await;
                            let _ = outcomes.send(o);
                        });
                    }
                    Ack::Retry(input) => {
                        let failures = slot.failures;
                        self.again(input, failures);
                    }
                    Ack::Start(_) | Ack::Quiet => {}
                }
            }
        }
    }

    /// The store failed for good: every `finished` waiter gets the error (nothing will
    /// progress), and an event says so, once.
    pub(super) fn store_failed(&mut self, id: &Arc<str>, err: &Error) {
        for (_, waiters) in self.waiters.drain() {
            for w in waiters {
                let _ = w.send(Err(err.clone_for_caller()));
            }
        }
        if !self.store_down {
            self.store_down = true;
            self.events.send(
                F::NAME,
                id,
                0,
                EventKind::StoreFailed {
                    error: err.to_string(),
                },
            );
        }
    }

    /// The job for a call: its reply handle is one an earlier outcome brought back, when
    /// there is one (see [`OutcomeMsg::back`]).
    /// `owned`: a handle on the id the job may take rather than clone `id`.
    pub(super) fn job(&mut self, id: &Arc<str>, owned: Option<Arc<str>>, out: Outgoing) -> Job {
        let reply = self.replies.pop().unwrap_or_else(|| self.outcomes.clone());
        let p = out.call;
        debug_assert!(owned.as_ref().is_none_or(|o| o == id));
        Job {
            flow: F::NAME,
            id: owned.unwrap_or_else(|| id.clone()),
            seq: p.seq,
            branch: out.branch,
            method: p.method,
            call: p.call,
            redelivered: p.redelivered,
            attempt: p.attempts.saturating_add(1),
            policy: self.policy(p.link, p.method).unwrap_or_else(|| {
                CallPolicy::resolve(Policy::NONE, Policy::NONE, self.limits.call_policy)
            }),
            names: Self::names(p.link, p.method),
            reply,
            receipt: None,
        }
    }

    /// Keeps the reply handle `o` carried back, for the next job; gives back `o`'s id.
    pub(super) fn reuse_reply(&mut self, o: OutcomeMsg) -> Arc<str> {
        if let Some(back) = o.back
            && self.replies.len() < SPARE_REPLIES
        {
            self.replies.push(back);
        }
        o.id
    }

    /// Sends this runner's child calls to the engine's child service.
    pub(crate) fn children(&mut self, port: crate::engine::children::ChildPort) {
        self.children = Some(port);
    }

    /// Sends a step's driver call: queued in the runner's outbox for its driver, which
    /// [`send_jobs`](Self::send_jobs) hands to the driver's queue once the round's steps
    /// are acted on (one lock and at most one wake-up for the round's calls).
    /// `owned`: a handle on `id` the job may take (see [`job`](Self::job)).
    pub(super) fn dispatch(&mut self, id: &Arc<str>, owned: Option<Arc<str>>, out: Outgoing) {
        let link = out.call.link;
        if link == crate::child::CHILD_LINK {
            if self.children.is_none() {
                tracing::error!(flow = F::NAME, id = %id, "a child call, but no child service");
                return;
            }
            let job = self.job(id, owned, out);
            if let Some(children) = &self.children {
                children.send(job);
            }
            return;
        }
        let job = self.job(id, owned, out);
        let Some(jobs) = self.outbox.get_mut(usize::from(link)) else {
            tracing::error!(flow = F::NAME, id = %id, link, "call for an unknown link");
            return;
        };
        jobs.push_back(job);
    }

    /// Hands the calls in the outbox to their drivers' queues. A full queue must not stall
    /// the runner: what does not fit goes to a task that waits for room, in order. A
    /// closed queue means the engine is shutting down; the calls run after the restart.
    pub(super) fn send_jobs(&mut self) {
        for (port, jobs) in self.ports.iter().zip(self.outbox.iter_mut()) {
            if jobs.is_empty() {
                continue;
            }
            if !port.try_send_all(jobs) {
                jobs.clear();
                continue;
            }
            if !jobs.is_empty() {
                let (port, rest) = (port.clone(), std::mem::take(jobs));
                tokio::spawn(async move {
                    for job in rest {
                        if port.send(job).await.is_err() {
                            break;
                        }
                    }
                });
            }
        }
    }

    /// The driver and method names of a call.
    pub(super) fn names(link: u16, method: u16) -> (&'static str, &'static str) {
        if link == crate::child::CHILD_LINK {
            return (
                "child",
                if method == crate::child::CANCEL {
                    "cancel"
                } else {
                    "start"
                },
            );
        }
        F::LINKS.get(usize::from(link)).map_or(("?", "?"), |l| {
            (
                l.driver.name,
                l.driver
                    .methods
                    .get(usize::from(method))
                    .map_or("?", |m| m.name),
            )
        })
    }
}
