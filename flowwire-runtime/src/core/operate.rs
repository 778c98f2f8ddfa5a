//! Parking an instance for an operator, and the operator's operations on a parked one
//! (patch, rewind, resume).

use flowwire_storage::{Rope, Status, StepInput, StepOutput};
use flowwire_storage::{codec, rope};

use crate::flow::Flow;
use crate::guard::guard;

use super::{Awaiting, Dispatches, Instance, Operation, Refused, Scratch, Step};

impl<F: Flow> Instance<F> {
    /// Applies an operator's operation to a parked instance (a rewind also applies to a
    /// failed one). The instance stays parked after a patch or a rewind, so that an operator
    /// can check the result before resuming it.
    pub fn operate(
        &mut self,
        op: Operation<F>,
        now_ms: u64,
        scratch: &mut Scratch,
    ) -> Result<Step, Refused> {
        scratch.now_ms = now_ms;
        let parked = matches!(self.record.status, Status::Quarantined { .. });
        let failed = matches!(self.record.status, Status::Failed { .. });
        let allowed = parked || (failed && matches!(op, Operation::Rewind { .. }));
        if !allowed {
            return Err(Refused::NotParked(self.record.status.name()));
        }
        let mut step = match op {
            Operation::Resume => self.resume(scratch),
            Operation::Patch(patch) => {
                let mut state: F::State = rope::read::decode_rope(&self.record.state, self.limit)
                    .map_err(|e| {
                    Refused::State(format!("the stored state does not decode: {e}"))
                })?;
                guard(|| patch(&mut state)).map_err(Refused::PatchPanicked)?;
                scratch.state.clear();
                codec::encode_raw(&state, &mut scratch.state).map_err(|e| {
                    Refused::State(format!("the patched state does not encode: {e}"))
                })?;
                self.flow = F::from_state(state);
                let bytes = scratch.arena.take(&mut scratch.state);
                self.operated(StepInput::Patch, bytes.into(), None)
            }
            Operation::Rewind { to, state } => {
                let decoded: F::State = codec::decode_raw(&state, self.limit).map_err(|e| {
                    Refused::State(format!(
                        "the state recorded at step {to} does not decode: {e}"
                    ))
                })?;
                self.flow = F::from_state(decoded);
                let reason = format!(
                    "rewound to step {to} by an operator: resume it to run the wire from there"
                );
                let mut step = self.operated(StepInput::Rewind { to }, state.into(), Some(reason));
                step.draft.record.pending = None;
                step.draft.record.fan = None;
                step.draft.record.failing = None;
                step.draft.record.error = None;
                step
            }
        };
        step.draft.at_ms = scratch.now_ms;
        Ok(step)
    }

    /// A step that keeps the instance parked with a new state (and, given, a new reason).
    pub(super) fn operated(
        &mut self,
        input: StepInput,
        state: Rope,
        reason: Option<String>,
    ) -> Step {
        let reason = reason.unwrap_or_else(|| match &self.record.status {
            Status::Quarantined { reason } => reason.clone(),
            other => other.name().to_string(),
        });
        self.quarantined(input, reason, state)
    }

    /// Resumes a parked instance: its call in flight (or compensation) is sent again,
    /// counted as redelivered; without one, the wire runs.
    pub(super) fn resume(&mut self, scratch: &mut Scratch) -> Step {
        if let Some(fan) = self.record.fan.clone() {
            return self.resend_fan(fan, StepInput::Resume, scratch);
        }
        let Some(pending) = self.record.pending.clone() else {
            return self.advance(StepInput::Resume, None, false, scratch);
        };
        let status = if self.record.failing.is_some() {
            Status::Compensating
        } else {
            Status::Running
        };
        self.resend(pending, StepInput::Resume, status)
    }

    /// Parks the instance for an operator: a step that keeps its committed state and call,
    /// quarantined with `reason` (a step that cannot be written, whatever the retries).
    pub fn quarantine(&mut self, reason: String, now_ms: u64, scratch: &mut Scratch) -> Step {
        scratch.now_ms = now_ms;
        self.park(StepInput::Park, reason, scratch)
    }

    /// A parking step: the committed state, quarantined with a reason.
    pub(super) fn park(&mut self, input: StepInput, reason: String, scratch: &mut Scratch) -> Step {
        // User code may have changed the state before it panicked: park the committed one.
        let state = self.record.state.clone();
        if state.is_empty() {
            // A start that panicked: park the initial state as given.
            scratch.state.clear();
            let _ = codec::encode_raw(self.flow.state(), &mut scratch.state);
        } else if let Ok(s) = rope::read::decode_rope::<F::State>(&state, self.limit) {
            self.flow = F::from_state(s);
        }
        let state = if state.is_empty() {
            scratch.arena.take(&mut scratch.state).into()
        } else {
            state
        };
        self.awaiting = Awaiting::Nothing;
        self.registered = None;
        let mut step = self.quarantined(input, reason, state);
        step.draft.at_ms = scratch.now_ms;
        step
    }

    /// A parked step: it keeps the call (or fan-out) in flight (an operator may resume it)
    /// but no timer (resuming runs the wire, which arms it again).
    pub(super) fn quarantined(&mut self, input: StepInput, reason: String, state: Rope) -> Step {
        let output = StepOutput::Quarantine {
            reason: reason.clone(),
        };
        let (pending, fan) = (self.record.pending.clone(), self.record.fan.clone());
        self.build(
            input,
            None,
            Status::Quarantined { reason },
            state,
            pending,
            Dispatches::new(),
            None,
            output,
            super::Extra {
                fan,
                ..super::Extra::default()
            },
        )
    }
}
