//! The saga stack: compensations registered by calls that succeeded, and running them
//! last-registered-first when the flow fails.

use std::sync::Arc;

use flowwire_storage::{Cancel, Compensation, PendingCall, Rope, Status, StepInput, StepOutput};

use crate::driver::Fault;
use crate::failure::Failure;
use crate::flow::Flow;
use crate::guard::guard;

use super::{Awaiting, Dispatches, Instance, Scratch, Step, call_name, one};

/// Why an instance unwinds its compensations.
pub(super) enum Why {
    /// It failed: it ends failed.
    Failed(Failure),
    /// It was cancelled: it ends cancelled.
    Cancelled(Cancel),
}

impl<F: Flow> Instance<F> {
    /// The outcome of the compensation in flight: on success the next one is sent (or the
    /// flow ends failed after the last); on failure the instance is parked with it still in
    /// flight, so that resuming sends it again.
    pub(super) fn compensated(
        &mut self,
        input: StepInput,
        ok: bool,
        fault: Option<&Fault>,
        scratch: &mut Scratch,
    ) -> Step {
        let reason = self.record.failing.clone().unwrap_or_default();
        let error = self.record.error.clone();
        let mut rest = self.record.compensations.clone();
        if !ok {
            let name = rest.last().map_or_else(String::new, |c| {
                format!(" ({})", call_name::<F>(c.link, c.method))
            });
            let registered = rest.last().map_or(0, |c| c.seq);
            let detail = fault.map_or_else(
                || "its driver returned an error".to_string(),
                ToString::to_string,
            );
            let why = format!(
                "the compensation registered at step {registered}{name} failed: {detail}. The flow was failing with: {reason}. Fix the cause, then resume the instance: the compensation is sent again"
            );
            return self.park(input, why, scratch);
        }
        rest.pop();
        let state = self.record.state.clone();
        let why = self.why(Failure::from_parts(reason, error));
        self.unwind(input, None, why, rest, state, scratch)
    }

    /// Fires the armed timer due at `due_ms`: runs its continuation, then the wire; or, for
    /// a call waiting out a backoff, sends its next attempt.
    ///
    /// Returns `None` when no such timer is armed (it was re-armed, or an impulse moved the
    /// instance on): the caller repairs the timer index.
    pub fn fire(&mut self, due_ms: u64, now_ms: u64, scratch: &mut Scratch) -> Option<Step> {
        scratch.now_ms = now_ms;
        let timer = self.record.timer?;
        if timer.due_ms != due_ms {
            return None;
        }
        if self.record.status.has_call() {
            return self.retry_due(due_ms, scratch);
        }
        if !matches!(self.record.status, Status::Sleeping | Status::Waiting) {
            return None;
        }
        let input = StepInput::Timer { due_ms };
        let wake = match self.awaiting.take() {
            Awaiting::Timer { due_ms: due, wake } if due == due_ms => wake,
            _ => match self.rederive_timer(&timer) {
                Ok(wake) => wake,
                Err(reason) => return Some(self.park(input, reason, scratch)),
            },
        };
        Some(match guard(|| wake(&mut self.flow)) {
            Ok(Ok(())) => self.advance(input, None, false, scratch),
            Ok(Err(failure)) => self.end(input, failure, scratch),
            Err(panic) => {
                let reason = format!("the timer's continuation panicked: {panic}");
                self.park(input, reason, scratch)
            }
        })
    }

    /// The committed compensations, with the one the step being built registers.
    pub(super) fn compensations_now(&mut self) -> Vec<Compensation> {
        let registered = self.registered.take();
        if self.record.compensations.is_empty() {
            // The usual step: none committed, so no list to copy.
            return registered.into_iter().collect();
        }
        let mut all = self.record.compensations.clone();
        all.extend(registered);
        all
    }

    /// Why the instance unwinds, as it is recorded while the compensations run.
    pub(super) fn why(&self, failure: Failure) -> Why {
        match &self.record.cancel {
            Some(cancel) => Why::Cancelled(cancel.clone()),
            None => Why::Failed(failure),
        }
    }

    /// A failing or cancelling step: sends the last of `compensations` (status
    /// compensating), or ends the flow failed or cancelled when none is left.
    pub(super) fn unwind(
        &mut self,
        input: StepInput,
        impulse: Option<Arc<str>>,
        why: Why,
        compensations: Vec<Compensation>,
        state: Rope,
        scratch: &mut Scratch,
    ) -> Step {
        self.awaiting = Awaiting::Nothing;
        self.registered = None;
        let seq = self.record.seq + 1;
        let mut compensations = compensations;
        let reason = match &why {
            Why::Failed(failure) => format!("it failed: {}", failure.message()),
            Why::Cancelled(cancel) => format!("it was cancelled: {}", cancel.reason),
        };
        compensations.extend(self.child_cancels(&reason));
        self.delivered = None;
        let (reason, error, cancel) = match why {
            Why::Failed(failure) => {
                let (reason, error) = failure.into_parts();
                (reason, error, None)
            }
            Why::Cancelled(cancel) => (cancel.reason.clone(), None, Some(cancel)),
        };
        let mut step = match compensations.last() {
            None if cancel.is_some() => {
                let output = StepOutput::Cancelled {
                    reason: reason.clone(),
                };
                let status = Status::Cancelled { reason };
                let mut step = self.build(
                    input,
                    impulse,
                    status,
                    state,
                    None,
                    Dispatches::new(),
                    None,
                    output,
                    super::Extra::default(),
                );
                step.draft.record.cancel = cancel;
                step
            }
            None => {
                let output = StepOutput::Fail {
                    reason: reason.clone(),
                    error: error.clone(),
                };
                let status = Status::Failed { reason };
                let mut step = self.build(
                    input,
                    impulse,
                    status,
                    state,
                    None,
                    Dispatches::new(),
                    None,
                    output,
                    super::Extra::default(),
                );
                step.draft.record.error = error;
                step
            }
            Some(c) => {
                let call = PendingCall {
                    seq,
                    link: c.link,
                    method: c.method,
                    call: c.call.clone(),
                    redelivered: 0,
                    attempts: 0,
                };
                let output = StepOutput::Compensate {
                    call_seq: seq,
                    registered: c.seq,
                    link: c.link,
                    method: c.method,
                };
                let mut step = self.build(
                    input,
                    impulse,
                    Status::Compensating,
                    state,
                    Some(call.clone()),
                    one(call),
                    None,
                    output,
                    super::Extra::default(),
                );
                step.draft.record.failing = Some(reason);
                step.draft.record.error = error;
                step.draft.record.cancel = cancel;
                step.draft.record.compensations = compensations;
                step
            }
        };
        step.draft.at_ms = scratch.now_ms;
        step
    }
}
