//! Cancellation: an instance stops what it waits for (a call, a fan-out, a sleep, a wait, a
//! backoff), runs the compensations it registered, and ends cancelled. The late outcome of
//! the call it abandoned is recorded in history, never applied.

use std::sync::Arc;

use bytes::Bytes;
use flowwire_storage::codec;
use flowwire_storage::{Cancel, Status, StepInput, StepOutput};

use crate::driver::Fault;
use crate::flow::Flow;

use super::saga::Why;
use super::{Awaiting, Dispatches, Instance, Rejected, Scratch, Step};

/// The impulse id a cancellation is applied under: the store inserts it once per instance,
/// so a cancellation retried after it was applied (after a restart, from another process)
/// changes nothing. User impulse ids that start with NUL are reserved.
pub const CANCEL_ID: &str = "\u{0}cancel";

impl<F: Flow> Instance<F> {
    /// Cancels the instance: whatever it waits for is abandoned (a call in flight runs on,
    /// but its outcome will not be applied), its registered compensations run, last first,
    /// and it ends [`Status::Cancelled`] with `reason`.
    ///
    /// Refused when it has ended, is parked, or is already compensating a failure;
    /// `Rejected::Ended("cancelled")` when it was cancelled before (its compensations may
    /// still be running).
    pub fn cancel(
        &mut self,
        reason: String,
        now_ms: u64,
        scratch: &mut Scratch,
    ) -> Result<Step, Rejected> {
        scratch.now_ms = now_ms;
        match &self.record.status {
            Status::Finished => return Err(Rejected::Ended("finished")),
            Status::Failed { .. } => return Err(Rejected::Ended("failed")),
            Status::Cancelled { .. } => return Err(Rejected::Ended("cancelled")),
            Status::Quarantined { reason } => return Err(Rejected::Quarantined(reason.clone())),
            Status::Compensating if self.record.cancel.is_some() => {
                return Err(Rejected::Ended("cancelled"));
            }
            Status::Compensating => return Err(Rejected::Ended("compensating")),
            Status::Running | Status::Waiting | Status::Sleeping => {}
        }
        let abandoned = match (&self.record.fan, &self.record.pending) {
            (Some(fan), _) => Some(fan.seq),
            (None, Some(call)) => Some(call.seq),
            (None, None) => None,
        };
        self.awaiting = Awaiting::Nothing;
        let cancel = Cancel {
            reason: reason.clone(),
            abandoned,
        };
        let compensations = self.compensations_now();
        let state = self.record.state.clone();
        let input = StepInput::Cancel {
            reason: reason.clone(),
        };
        Ok(self.unwind(
            input,
            Some(Arc::from(CANCEL_ID)),
            Why::Cancelled(cancel),
            compensations,
            state,
            scratch,
        ))
    }

    /// Whether `seq` is the call (or fan-out) the instance abandoned when it was cancelled.
    pub(super) fn abandoned(&self, seq: u64) -> bool {
        self.record
            .cancel
            .as_ref()
            .is_some_and(|c| c.abandoned == Some(seq))
            && self.record.pending.as_ref().is_none_or(|p| p.seq != seq)
    }

    /// The step that records the late outcome of an abandoned call: the record is kept as
    /// it is (the outcome is the step's payload, its output says it was not applied).
    pub(super) fn late(
        &mut self,
        seq: u64,
        branch: Option<u32>,
        outcome: Result<&Bytes, &Fault>,
        scratch: &mut Scratch,
    ) -> Step {
        let ok = outcome.is_ok_and(|b| codec::reply_is_ok(b));
        let input = match branch {
            Some(branch) => StepInput::BranchOutcome {
                call_seq: seq,
                branch,
                ok,
            },
            None => StepInput::Outcome { call_seq: seq, ok },
        };
        let output = StepOutput::Abandoned {
            call_seq: seq,
            branch,
        };
        let r = &self.record;
        let (status, state, pending, timer) = (
            r.status.clone(),
            r.state.clone(),
            r.pending.clone(),
            r.timer,
        );
        let payload = Some(match outcome {
            Ok(bytes) => bytes.clone(),
            Err(fault) => Bytes::from(fault.to_string()),
        });
        let at_ms = scratch.now_ms;
        self.build(
            input,
            None,
            status,
            state,
            pending,
            Dispatches::new(),
            timer,
            output,
            super::Extra {
                fan: None,
                payload,
                at_ms,
            },
        )
    }
}
