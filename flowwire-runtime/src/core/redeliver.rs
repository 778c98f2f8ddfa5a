//! Calls in flight after a restart (or a handover): sent again, counted as redelivered,
//! or the instance parked when their driver's policy says so.

use flowwire_storage::{PendingCall, Status, StepInput, StepOutput};

use crate::flow::Flow;

use super::{Instance, Scratch, Step, call_name, one};

impl<F: Flow> Instance<F> {
    /// The step start-up recovery writes for a call that was in flight when the engine
    /// stopped (it may have run): with `park`, the instance is parked for an operator;
    /// otherwise the call is counted as redelivered and sent again.
    ///
    /// `park` says whether a call's driver (by link and method) declares the `park` policy.
    /// A fan-out's branches in flight are all sent again, or the instance is parked when any
    /// of them declares `park`.
    ///
    /// Returns `None` when no call is in flight.
    pub fn redeliver(
        &mut self,
        park: impl Fn(u16, u16) -> bool,
        now_ms: u64,
        scratch: &mut Scratch,
    ) -> Option<Step> {
        scratch.now_ms = now_ms;
        if !self.record.has_call_out() {
            return None;
        }
        if let Some(fan) = self.record.fan.clone() {
            let input = StepInput::Redeliver { call_seq: fan.seq };
            if let Some((i, b)) = fan.in_flight().find(|(_, b)| park(b.link, b.method)) {
                let reason = format!(
                    "branch {i} ({}) of the fan-out sent at step {} was in flight when the engine stopped, so it may or may not have run; its driver's policy is `ambiguous = \"park\"`: check the service it calls, then resume the instance (the branches in flight are sent again) or rewind it",
                    call_name::<F>(b.link, b.method),
                    fan.seq
                );
                return Some(self.park(input, reason, scratch));
            }
            return Some(self.resend_fan(fan, input, scratch));
        }
        let pending = self.record.pending.clone()?;
        let park = park(pending.link, pending.method);
        let input = StepInput::Redeliver {
            call_seq: pending.seq,
        };
        if park {
            let reason = format!(
                "the call sent at step {} was in flight when the engine stopped, so it may or may not have run; its driver's policy is `ambiguous = \"park\"`: check the service it calls, then resume the instance (the call is sent again) or rewind it",
                pending.seq
            );
            return Some(self.park(input, reason, scratch));
        }
        let status = self.record.status.clone();
        let mut step = self.resend(pending, input, status);
        step.draft.at_ms = scratch.now_ms;
        Some(step)
    }

    /// A step that sends the call in flight again (counted as redelivered), with the
    /// committed state.
    pub(super) fn resend(
        &mut self,
        pending: PendingCall,
        input: StepInput,
        status: Status,
    ) -> Step {
        let mut again = pending;
        again.redelivered = again.redelivered.saturating_add(1);
        let output = self.resend_output(&again);
        let state = self.record.state.clone();
        self.build(
            input,
            None,
            status,
            state,
            Some(again.clone()),
            one(again),
            None,
            output,
            super::Extra::default(),
        )
    }

    /// The history output of a call sent again (after a restart, or by an operator).
    pub(super) fn resend_output(&self, call: &PendingCall) -> StepOutput {
        // A failure is recorded only while compensations run (or wait for an operator).
        match self.record.compensations.last() {
            Some(c) if self.record.failing.is_some() => StepOutput::Compensate {
                call_seq: call.seq,
                registered: c.seq,
                link: call.link,
                method: call.method,
            },
            _ => StepOutput::Drive {
                call_seq: call.seq,
                link: call.link,
                method: call.method,
            },
        }
    }
}
