//! Running the wire: an impulse, an outcome or a timer applied, then the wire looped
//! until it asks for something that takes time, and the step that records it.

use std::sync::Arc;

use bytes::Bytes;
use flowwire_storage::codec;
use flowwire_storage::{
    Compensation, Fan, PendingCall, Rope, Status, StepInput, StepOutput, Timer,
};

use crate::board::CallSet;
use crate::command::{Command, CommandKind, Delivered, ThenError, Undo, Wake};
use crate::driver::Fault;
use crate::failure::Failure;
use crate::flow::{Flow, ImpulseSet};
use crate::guard::guard;

use super::fan::{fan_output, fan_timer, top_up};
use super::plan::{Plan, plan};
use super::{Armed, Awaiting, Dispatches, Extra, Instance, Rejected, Scratch, Step, carrying};

impl<F: Flow> Instance<F> {
    /// Applies an impulse and runs the wire.
    pub fn impulse(
        &mut self,
        impulse_id: Arc<str>,
        impulse: F::Impulse,
        now_ms: u64,
        scratch: &mut Scratch,
    ) -> Result<Step, Rejected> {
        scratch.now_ms = now_ms;
        match &self.record.status {
            Status::Finished => return Err(Rejected::Ended("finished")),
            Status::Failed { .. } => return Err(Rejected::Ended("failed")),
            Status::Quarantined { reason } => return Err(Rejected::Quarantined(reason.clone())),
            Status::Compensating => return Err(Rejected::Ended("compensating")),
            Status::Cancelled { .. } => return Err(Rejected::Ended("cancelled")),
            Status::Running | Status::Waiting | Status::Sleeping => {}
        }
        let name = impulse.name();
        scratch.call.clear();
        let payload = match codec::encode_raw(&impulse, &mut scratch.call) {
            Ok(()) => Some(scratch.arena.take(&mut scratch.call)),
            Err(_) => None,
        };
        let input = StepInput::Impulse {
            id: impulse_id.to_string(),
            name: name.to_string(),
        };
        if let Err(panic) = guard(|| self.flow.apply_impulse(impulse)) {
            let reason = format!("impulse `{name}` panicked: {panic}");
            return Ok(carrying(self.park(input, reason, scratch), payload));
        }
        Ok(self.advance_from(input, Some(impulse_id), true, payload, scratch, 0))
    }

    /// Applies a driver outcome for the call issued at step `seq` (for a fan-out: of its
    /// branch `branch`) and runs the wire.
    ///
    /// Returns `None` for an outcome that is no longer awaited (a duplicate, or a call the
    /// wire abandoned after an impulse).
    pub fn outcome(
        &mut self,
        seq: u64,
        branch: Option<u32>,
        outcome: Result<&Bytes, &Fault>,
        now_ms: u64,
        scratch: &mut Scratch,
    ) -> Option<Step> {
        let mut reply = outcome.cloned().map_err(Fault::clone);
        self.take_outcome(seq, branch, &mut reply, now_ms, scratch)
    }

    /// As [`outcome`](Self::outcome), but the reply's bytes move into the step, as the
    /// history payload of its input, rather than being shared with it: when the step
    /// returned records them, `reply` is left `Ok` with no bytes. Whoever applies the
    /// outcome again (its step could not be persisted) restores them from
    /// `step.draft.payload` first. (A shared buffer's count costs two atomic updates.)
    ///
    /// ```
    /// use flowwire::core::{Instance, Scratch};
    ///
    /// // Applies the reply to the call sent at step `seq`.
    /// fn apply<F: flowwire::Flow>(inst: &mut Instance<F>, seq: u64, scratch: &mut Scratch) {
    ///     let mut reply = Ok(bytes::Bytes::from_static(&[0]));
    ///     if let Some(step) = inst.take_outcome(seq, None, &mut reply, 0, scratch) {
    ///         // The step carries the reply; `reply` holds it no more.
    ///         assert!(reply.is_ok_and(|b| b.is_empty()) && step.draft.payload.is_some());
    ///     }
    /// }
    /// ```
    pub fn take_outcome(
        &mut self,
        seq: u64,
        branch: Option<u32>,
        reply: &mut Result<Bytes, Fault>,
        now_ms: u64,
        scratch: &mut Scratch,
    ) -> Option<Step> {
        scratch.now_ms = now_ms;
        if self.abandoned(seq) {
            return Some(self.late(seq, branch, reply.as_ref(), scratch));
        }
        if let Some(branch) = branch {
            return self.branch_outcome(seq, branch, reply.as_ref(), scratch);
        }
        if !self.awaits_reply(seq) {
            return None;
        }
        Some(self.take_reply(seq, reply, now_ms, scratch))
    }

    /// Whether the reply to the call sent at step `seq` (not a fan-out branch's) is what
    /// the instance waits for: its call in flight, while it runs or compensates. Then
    /// [`take_outcome`](Self::take_outcome) applies it as [`take_reply`](Self::take_reply)
    /// does (a call in flight is never an abandoned one).
    pub(crate) fn awaits_reply(&self, seq: u64) -> bool {
        // Not copied here: the call's arguments are a shared buffer (a count update).
        self.record.pending.as_ref().is_some_and(|p| p.seq == seq)
            && matches!(self.record.status, Status::Running | Status::Compensating)
    }

    /// Applies the reply to the call in flight, sent at step `seq`, as
    /// [`take_outcome`](Self::take_outcome) does, for an instance that
    /// [`awaits_reply`](Self::awaits_reply): the step is returned as it is built, not
    /// wrapped (a step is several hundred bytes, and the `Option` around it was a copy of
    /// it, the runner's usual outcome's). Called otherwise, the step parks the instance.
    pub(crate) fn take_reply(
        &mut self,
        seq: u64,
        reply: &mut Result<Bytes, Fault>,
        now_ms: u64,
        scratch: &mut Scratch,
    ) -> Step {
        scratch.now_ms = now_ms;
        let ok = reply.as_ref().is_ok_and(|b| codec::reply_is_ok(b));
        // The input's payload for history, taken once the reply is no longer read.
        let payload = |reply: &mut Result<Bytes, Fault>| {
            Some(match reply {
                Ok(bytes) => std::mem::take(bytes),
                Err(fault) => Bytes::from(fault.to_string()),
            })
        };
        let input = StepInput::Outcome { call_seq: seq, ok };
        let pending = match &self.record.pending {
            Some(p) if p.seq == seq => p,
            _ => {
                let reason = format!("a reply to step {seq}, whose call is not in flight");
                return self.park(StepInput::Park, reason, scratch);
            }
        };
        match self.record.status {
            Status::Running => {}
            Status::Compensating => {
                let mut step = self.compensated(input, ok, reply.as_ref().err(), scratch);
                step.draft.payload = payload(reply);
                return step;
            }
            _ => {
                let reason = format!(
                    "a reply to step {seq} while the instance is {:?}",
                    self.record.status
                );
                return self.park(StepInput::Park, reason, scratch);
            }
        }
        let outcome = reply.as_ref();
        let armed = match self.awaiting.take() {
            Awaiting::Call(a) if a.seq == seq => a,
            _ => {
                let pending = pending.clone();
                match self.rederive(&pending, scratch) {
                    Ok(a) => a,
                    Err(reason) => return self.park(StepInput::Park, reason, scratch),
                }
            }
        };
        let built;
        let undo = match (&armed.undo, outcome) {
            (Some(Undo::Call(call)), _) if ok => Some(call),
            (Some(Undo::With(with)), Ok(bytes)) if ok => {
                let limit = self.limit;
                match guard(|| with.build(bytes, limit)) {
                    Ok(Ok(call)) => {
                        built = call;
                        built.as_ref()
                    }
                    Ok(Err(e)) => {
                        let reason =
                            format!("the reply of the call at step {seq} does not decode: {e}");
                        let mut step = self.park(input, reason, scratch);
                        step.draft.payload = payload(reply);
                        return step;
                    }
                    Err(panic) => {
                        let reason = format!(
                            "the compensation of the call at step {seq} panicked while built from its reply: {panic}"
                        );
                        let mut step = self.park(input, reason, scratch);
                        step.draft.payload = payload(reply);
                        return step;
                    }
                }
            }
            _ => None,
        };
        if let Some(undo) = undo {
            // The call did what it did: whatever the continuation makes of it, the flow
            // must undo it if it fails later.
            scratch.call.clear();
            if let Err(e) = undo.encode(&mut scratch.call) {
                let reason =
                    format!("the compensation of the call at step {seq} could not be encoded: {e}");
                return self.park(input, reason, scratch);
            }
            self.registered = Some(Compensation {
                seq,
                link: undo.link(),
                method: undo.method(),
                call: scratch.arena.copy(&scratch.call),
            });
        }
        let delivered = match outcome {
            Ok(bytes) => Delivered::Reply(bytes),
            Err(fault) => Delivered::Fault(fault),
        };
        let limit = self.limit;
        let then = armed.then;
        self.delivered = Some((seq, None));
        let ran = guard(|| then.call(&mut self.flow, delivered, limit, 0));
        let mut step = match ran {
            // The usual outcome: the step is built where it is returned (each move of a
            // step, several hundred bytes, is a copy).
            Ok(Ok(())) => {
                let payload = payload(reply);
                return self.advance_from(input, None, false, payload, scratch, 0);
            }
            Ok(Err(ThenError::Failed(failure))) => self.end(input, failure, scratch),
            Ok(Err(ThenError::Decode(e))) => {
                let reason = format!("the reply of the call at step {seq} does not decode: {e}");
                self.park(input, reason, scratch)
            }
            Err(panic) => {
                let reason = format!("the continuation panicked: {panic}");
                self.park(input, reason, scratch)
            }
        };
        step.draft.payload = payload(reply);
        step
    }

    /// A step of a fan-out in progress: the fan-out with the next queued branches sent.
    pub(super) fn progress(
        &mut self,
        input: StepInput,
        mut fan: Fan,
        state: Rope,
        scratch: &mut Scratch,
    ) -> Step {
        let dispatch = top_up(&mut fan);
        let output = fan_output(&fan);
        let timer = fan_timer(&fan);
        let at_ms = scratch.now_ms;
        self.build(
            input,
            None,
            Status::Running,
            state,
            None,
            dispatch,
            timer,
            output,
            Extra {
                fan: Some(fan),
                payload: None,
                at_ms,
            },
        )
    }

    /// Runs the wire; a panic comes back as the reason to park the instance.
    pub(super) fn run_wire(&mut self) -> Result<Command<F>, String> {
        guard(|| self.flow.wire()).map_err(|panic| format!("the wire panicked: {panic}"))
    }

    /// Runs the wire again to find the continuation of the armed timer (after a restart,
    /// or after the instance left memory while it slept or waited).
    pub(super) fn rederive_timer(&mut self, timer: &Timer) -> Result<Wake<F>, String> {
        let cmd = self.run_wire()?;
        let waiting = self.record.status == Status::Waiting;
        match cmd.kind {
            CommandKind::Timer { spec, wait, wake } if spec == timer.spec && wait == waiting => {
                Ok(wake)
            }
            _ => Err(format!(
                "non-deterministic wire: a timer is armed at step {}, but the wire now returns `{}` (with other time or kind)",
                self.record.seq,
                cmd.name()
            )),
        }
    }

    /// Runs the wire again to find the continuation of the call in flight (after a restart).
    pub(super) fn rederive(
        &mut self,
        pending: &PendingCall,
        scratch: &mut Scratch,
    ) -> Result<Armed<F>, String> {
        let cmd = self.run_wire()?;
        let CommandKind::Drive { call, then, undo } = cmd.kind else {
            return Err(format!(
                "non-deterministic wire: the call at step {} is in flight, but the wire now returns `{}`",
                pending.seq,
                cmd.name()
            ));
        };
        scratch.call.clear();
        call.encode(&mut scratch.call)
            .map_err(|e| format!("the call could not be encoded: {e}"))?;
        if call.link() != pending.link
            || call.method() != pending.method
            || scratch.call != pending.call
        {
            return Err(format!(
                "non-deterministic wire: the call at step {} differs from the one the wire returns now",
                pending.seq
            ));
        }
        Ok(Armed {
            seq: pending.seq,
            then,
            undo,
        })
    }

    /// Runs the wire and builds the step that follows `input`.
    pub(super) fn advance(
        &mut self,
        input: StepInput,
        impulse: Option<Arc<str>>,
        keep_pending: bool,
        scratch: &mut Scratch,
    ) -> Step {
        self.advance_from(input, impulse, keep_pending, None, scratch, 0)
    }

    /// [`Instance::advance`], after `joined` fan-outs without calls joined at once, for a
    /// step whose input carries `payload` (an outcome's reply, an impulse) to its history
    /// entry.
    pub(super) fn advance_from(
        &mut self,
        input: StepInput,
        impulse: Option<Arc<str>>,
        keep_pending: bool,
        payload: Option<Bytes>,
        scratch: &mut Scratch,
        joined: u32,
    ) -> Step {
        let seq = self.record.seq + 1;
        let cmd = match self.run_wire() {
            Ok(cmd) => cmd,
            Err(reason) => return carrying(self.park(input, reason, scratch), payload),
        };
        let (status, pending, dispatch, output, timer, fan, failing) =
            match plan(cmd.kind, &self.record, keep_pending, seq, joined, scratch) {
                Plan::Write {
                    status,
                    pending,
                    dispatch,
                    output,
                    timer,
                    fan,
                    awaiting,
                } => {
                    if let Some(awaiting) = awaiting {
                        self.awaiting = awaiting;
                    }
                    (status, pending, dispatch, output, timer, fan, None)
                }
                Plan::Fail(failure) => (
                    Status::Waiting,
                    None,
                    Dispatches::new(),
                    StepOutput::Wait,
                    None,
                    None,
                    Some(failure),
                ),
                Plan::JoinNow(then) => {
                    let step = self.join(input, impulse, then, scratch, joined + 1);
                    return carrying(step, payload);
                }
                Plan::Park(reason) => return carrying(self.park(input, reason, scratch), payload),
            };
        let state = match self.encoded_state(scratch) {
            Ok(state) => state,
            Err(reason) => return carrying(self.park(input, reason, scratch), payload),
        };
        if let Some(failure) = failing {
            let compensations = self.compensations_now();
            // The impulse that led the wire to fail was applied: its id is recorded with
            // the step, as with any other.
            let why = self.why(failure);
            let step = self.unwind(input, impulse, why, compensations, state, scratch);
            return carrying(step, payload);
        }
        let at_ms = scratch.now_ms;
        self.build(
            input,
            impulse,
            status,
            state,
            pending,
            dispatch,
            timer,
            output,
            Extra {
                fan,
                payload,
                at_ms,
            },
        )
    }

    /// The step after a continuation failed the flow: its changed state is kept, and the
    /// compensations (with the one this step registers) start.
    pub(super) fn end(
        &mut self,
        input: StepInput,
        failure: Failure,
        scratch: &mut Scratch,
    ) -> Step {
        let state = match self.encoded_state(scratch) {
            Ok(state) => state,
            Err(_) => self.record.state.clone(),
        };
        let compensations = self.compensations_now();
        let why = self.why(failure);
        self.unwind(input, None, why, compensations, state, scratch)
    }
}
