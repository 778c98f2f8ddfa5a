//! Retries: a failed attempt of a driver call that its policy retries is recorded as a
//! step of its own (the failure, the attempt count, a durable timer), and the next attempt
//! is sent when that timer fires. While it waits, the instance has no call out: it leaves
//! memory like a sleeping one, and a restart or a move to another process keeps both the
//! wait and the count.

use bytes::Bytes;
use flowwire_storage::{BranchState, Status, StepInput, StepOutput, TimeSpec, Timer};

use crate::driver::Fault;
use crate::flow::Flow;

use super::fan::branch_out;
use super::{Dispatches, Instance, Scratch, Step, one};

impl<F: Flow> Instance<F> {
    /// Records a failed attempt of the call issued at step `seq` (for a fan-out: of its
    /// branch `branch`) that the call's policy retries after `delay_ms`: the driver's
    /// error reply, or the runtime's fault. The continuation does not run; the call is
    /// sent again when the step's timer fires ([`Instance::fire`]).
    ///
    /// Returns `None` for an attempt that is no longer awaited (a duplicate, or a call the
    /// wire abandoned after an impulse).
    pub fn retry(
        &mut self,
        seq: u64,
        branch: Option<u32>,
        failure: Result<&Bytes, &Fault>,
        delay_ms: u64,
        now_ms: u64,
        scratch: &mut Scratch,
    ) -> Option<Step> {
        scratch.now_ms = now_ms;
        if self.abandoned(seq) {
            return Some(self.late(seq, branch, failure, scratch));
        }
        let due_ms = now_ms.saturating_add(delay_ms);
        let fault = failure.err().map(ToString::to_string);
        let payload = Some(match failure {
            Ok(bytes) => bytes.clone(),
            Err(fault) => Bytes::from(fault.to_string()),
        });
        let mut step = match branch {
            Some(branch) => {
                if self.record.status != Status::Running {
                    return None;
                }
                let mut fan = self.record.fan.clone().filter(|f| f.seq == seq)?;
                let b = fan.branches.get_mut(usize::try_from(branch).ok()?)?;
                if !matches!(b.state, BranchState::Sent { .. }) {
                    return None;
                }
                b.attempts = b.attempts.saturating_add(1);
                b.state = BranchState::Backoff { due_ms };
                let output = StepOutput::Retry {
                    call_seq: seq,
                    branch: Some(branch),
                    link: b.link,
                    method: b.method,
                    attempt: b.attempts,
                    due_ms,
                    fault,
                };
                let input = StepInput::BranchOutcome {
                    call_seq: seq,
                    branch,
                    ok: false,
                };
                let state = self.record.state.clone();
                let mut step = self.progress(input, fan, state, scratch);
                step.draft.output = output;
                step
            }
            None => {
                let mut again = self.record.pending.clone().filter(|p| p.seq == seq)?;
                if !self.record.status.has_call() || self.record.timer.is_some() {
                    return None;
                }
                again.attempts = again.attempts.saturating_add(1);
                let output = StepOutput::Retry {
                    call_seq: seq,
                    branch: None,
                    link: again.link,
                    method: again.method,
                    attempt: again.attempts,
                    due_ms,
                    fault,
                };
                let timer = Timer {
                    due_ms,
                    spec: TimeSpec::After(delay_ms),
                };
                let input = StepInput::Outcome {
                    call_seq: seq,
                    ok: false,
                };
                let (status, state) = (self.record.status.clone(), self.record.state.clone());
                self.build(
                    input,
                    None,
                    status,
                    state,
                    Some(again),
                    Dispatches::new(),
                    Some(timer),
                    output,
                    super::Extra {
                        at_ms: now_ms,
                        ..super::Extra::default()
                    },
                )
            }
        };
        step.draft.payload = payload;
        Some(step)
    }

    /// The step a backoff timer due at `due_ms` takes: the call waiting for its next
    /// attempt is sent again (for a fan-out: every branch whose backoff is over).
    pub(super) fn retry_due(&mut self, due_ms: u64, scratch: &mut Scratch) -> Option<Step> {
        let input = StepInput::Timer { due_ms };
        if let Some(mut fan) = self.record.fan.clone() {
            let now = scratch.now_ms.max(due_ms);
            let mut dispatch = Dispatches::new();
            for (i, b) in (0u32..).zip(fan.branches.iter_mut()) {
                if let BranchState::Backoff { due_ms } = b.state
                    && due_ms <= now
                {
                    b.state = BranchState::Sent { redelivered: 0 };
                    dispatch.push(branch_out(fan.seq, i, b, 0));
                }
            }
            return Some(self.progress_sending(input, fan, dispatch, scratch));
        }
        let pending = self.record.pending.clone()?;
        let output = self.resend_output(&pending);
        let (status, state) = (self.record.status.clone(), self.record.state.clone());
        let at_ms = scratch.now_ms;
        Some(self.build(
            input,
            None,
            status,
            state,
            Some(pending.clone()),
            one(pending),
            None,
            output,
            super::Extra {
                at_ms,
                ..super::Extra::default()
            },
        ))
    }
}
