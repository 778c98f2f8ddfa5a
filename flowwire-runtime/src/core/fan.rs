//! Fan-outs: a branch's outcome, the join when the last one lands, and the branches'
//! calls and outputs (rederived after a restart).

use std::sync::Arc;

use bytes::Bytes;
use flowwire_storage::codec;
use flowwire_storage::{
    BranchState, CodecError, Compensation, Fan, PendingCall, Status, StepInput, StepOutput,
    TimeSpec, Timer,
};

use crate::board::{Board, CallSet};
use crate::command::{CommandKind, Delivered, Join, ThenError, Wake};
use crate::driver::Fault;
use crate::flow::Flow;
use crate::guard::guard;

use super::{Awaiting, Dispatches, FanArmed, Instance, Outgoing, Scratch, Step};

impl<F: Flow> Instance<F> {
    /// The outcome of branch `branch` of the fan-out issued at step `seq`: applied by its
    /// continuation (for `first`, only the first success, or the last failure), then the
    /// next queued branch is sent, or the fan-out joins and the wire runs.
    pub(super) fn branch_outcome(
        &mut self,
        seq: u64,
        branch: u32,
        outcome: Result<&Bytes, &Fault>,
        scratch: &mut Scratch,
    ) -> Option<Step> {
        if self.record.status != Status::Running {
            return None;
        }
        let fan = self.record.fan.as_ref().filter(|f| f.seq == seq)?;
        let i = usize::try_from(branch).ok()?;
        if !matches!(fan.branches.get(i)?.state, BranchState::Sent { .. }) {
            return None;
        }
        let mut fan = fan.clone();
        let ok = outcome.is_ok_and(|b| codec::reply_is_ok(b));
        let payload = Some(match outcome {
            Ok(bytes) => bytes.clone(),
            Err(fault) => Bytes::from(fault.to_string()),
        });
        let input = StepInput::BranchOutcome {
            call_seq: seq,
            branch,
            ok,
        };
        let join = match self.awaiting.take() {
            Awaiting::Fan(a) if a.seq == seq => a.join,
            _ => match self.rederive_fan(&fan) {
                Ok(join) => join,
                Err(reason) => return Some(self.park(StepInput::Park, reason, scratch)),
            },
        };
        fan.branches[i].state = BranchState::Done { ok };
        let open = fan
            .branches
            .iter()
            .any(|b| !matches!(b.state, BranchState::Done { .. }));
        let delivered = match outcome {
            Ok(bytes) => Delivered::Reply(bytes),
            Err(fault) => Delivered::Fault(fault),
        };
        let (k, then) = match join {
            Join::First(_) if !ok && open => {
                // Another branch may still succeed: this failure is not applied.
                self.awaiting = Awaiting::Fan(FanArmed { seq, join });
                let state = self.record.state.clone();
                let mut step = self.progress(input, fan, state, scratch);
                step.draft.payload = payload;
                return Some(step);
            }
            Join::First(first) => (first, None),
            Join::All { each, then } => (each, Some(then)),
        };
        if ok {
            // As for a drive: the branch did what it did, whatever its continuation makes
            // of it.
            self.registered = fan.branches[i].undo.take();
        }
        let limit = self.limit;
        self.delivered = Some((seq, Some(branch)));
        let ran = guard(|| k.call(&mut self.flow, delivered, limit, i));
        let mut step = match ran {
            Ok(Ok(())) if then.is_none() || !open => match then {
                Some(then) => self.join(input, None, then, scratch, 0),
                None => self.advance(input, None, false, scratch),
            },
            Ok(Ok(())) => {
                self.awaiting = Awaiting::Fan(FanArmed { seq, join });
                match self.encoded_state(scratch) {
                    Ok(state) => self.progress(input, fan, state, scratch),
                    Err(reason) => self.park(input, reason, scratch),
                }
            }
            Ok(Err(ThenError::Failed(failure))) => self.end(input, failure, scratch),
            Ok(Err(ThenError::Decode(e))) => {
                let reason = format!(
                    "the reply of branch {branch} of the fan-out at step {seq} does not decode: {e}"
                );
                self.park(input, reason, scratch)
            }
            Err(panic) => {
                let reason = format!(
                    "the continuation of branch {branch} of the fan-out at step {seq} panicked: {panic}"
                );
                self.park(input, reason, scratch)
            }
        };
        step.draft.payload = payload;
        Some(step)
    }

    /// Runs a fan-out's join continuation, then the wire (`joined`: fan-outs without calls
    /// this step joined before, see [`Instance::advance_from`]).
    pub(super) fn join(
        &mut self,
        input: StepInput,
        impulse: Option<Arc<str>>,
        then: Wake<F>,
        scratch: &mut Scratch,
        joined: u32,
    ) -> Step {
        match guard(|| then(&mut self.flow)) {
            Ok(Ok(())) => self.advance_from(input, impulse, false, None, scratch, joined),
            Ok(Err(failure)) => self.end(input, failure, scratch),
            Err(panic) => {
                let reason = format!("the fan-out's join continuation panicked: {panic}");
                self.park(input, reason, scratch)
            }
        }
    }

    /// A step that sends the branches of the fan-out in flight again (counted as
    /// redelivered), with the committed state.
    pub(super) fn resend_fan(
        &mut self,
        mut fan: Fan,
        input: StepInput,
        scratch: &mut Scratch,
    ) -> Step {
        let mut dispatch = Dispatches::new();
        for (i, b) in (0u32..).zip(fan.branches.iter_mut()) {
            if let BranchState::Sent { redelivered } = b.state {
                let again = redelivered.saturating_add(1);
                b.state = BranchState::Sent { redelivered: again };
                dispatch.push(branch_out(fan.seq, i, b, again));
            }
        }
        self.progress_sending(input, fan, dispatch, scratch)
    }

    /// A step of the fan-out in progress, with the committed state, that sends `dispatch`
    /// (branches sent again) before the queued branches the bound lets go.
    pub(super) fn progress_sending(
        &mut self,
        input: StepInput,
        fan: Fan,
        mut dispatch: Dispatches,
        scratch: &mut Scratch,
    ) -> Step {
        let state = self.record.state.clone();
        let mut step = self.progress(input, fan, state, scratch);
        let topped = std::mem::take(&mut step.dispatch);
        dispatch.extend(topped);
        step.dispatch = dispatch;
        step
    }

    /// Runs the wire again to find the continuations of the fan-out in flight.
    pub(super) fn rederive_fan(&mut self, fan: &Fan) -> Result<Join<F>, String> {
        let cmd = self.run_wire()?;
        let name = cmd.name();
        match cmd.kind {
            CommandKind::Fan { calls, join, .. } if same_fan(fan, &calls, &join) => Ok(join),
            _ => Err(format!(
                "non-deterministic wire: the fan-out issued at step {} ({} branches) is in flight, but the wire now returns `{name}` (or a fan-out of other branches)",
                fan.seq,
                fan.branches.len()
            )),
        }
    }
}

/// Whether the wire's fan-out is the one in flight: the same join, and as many branches
/// calling the same methods (the arguments are the recorded ones).
pub(super) fn same_fan<F: Board>(
    fan: &Fan,
    calls: &[(F::Call, Option<F::Call>)],
    join: &Join<F>,
) -> bool {
    fan.first == join.is_first()
        && fan.branches.len() == calls.len()
        && fan
            .branches
            .iter()
            .zip(calls)
            .all(|(b, (c, _))| b.link == c.link() && b.method == c.method())
}

/// A fan-out branch, queued, with its call (and compensation) encoded.
pub(super) fn encode_branch<C: CallSet>(
    seq: u64,
    call: &C,
    undo: Option<&C>,
    buf: &mut Vec<u8>,
) -> Result<flowwire_storage::Branch, CodecError> {
    buf.clear();
    call.encode(buf)?;
    let bytes = Bytes::copy_from_slice(buf);
    let undo = match undo {
        None => None,
        Some(u) => {
            buf.clear();
            u.encode(buf)?;
            Some(Compensation {
                seq,
                link: u.link(),
                method: u.method(),
                call: Bytes::copy_from_slice(buf),
            })
        }
    };
    Ok(flowwire_storage::Branch {
        link: call.link(),
        method: call.method(),
        call: bytes,
        undo,
        state: BranchState::Queued,
        attempts: 0,
    })
}

/// The call of branch `i` of the fan-out issued at step `seq`, to send.
pub(super) fn branch_out(
    seq: u64,
    i: u32,
    b: &flowwire_storage::Branch,
    redelivered: u32,
) -> Outgoing {
    Outgoing {
        call: PendingCall {
            seq,
            link: b.link,
            method: b.method,
            call: b.call.clone(),
            redelivered,
            attempts: b.attempts,
        },
        branch: Some(i),
    }
}

/// Sends queued branches, in order, until the parallelism bound is reached; returns them.
pub(super) fn top_up(fan: &mut Fan) -> Dispatches {
    let bound = usize::try_from(fan.parallel).unwrap_or(usize::MAX);
    // A branch waiting out a backoff keeps its place under the bound.
    let mut in_flight = fan
        .branches
        .iter()
        .filter(|b| {
            matches!(
                b.state,
                BranchState::Sent { .. } | BranchState::Backoff { .. }
            )
        })
        .count();
    let mut out = Dispatches::new();
    for (i, b) in (0u32..).zip(fan.branches.iter_mut()) {
        if in_flight >= bound {
            break;
        }
        if b.state == BranchState::Queued {
            b.state = BranchState::Sent { redelivered: 0 };
            in_flight += 1;
            out.push(branch_out(fan.seq, i, b, 0));
        }
    }
    out
}

/// The record's timer while branches of `fan` wait out a backoff: the earliest is due.
pub(super) fn fan_timer(fan: &Fan) -> Option<Timer> {
    fan.branches
        .iter()
        .filter_map(|b| match b.state {
            BranchState::Backoff { due_ms } => Some(due_ms),
            _ => None,
        })
        .min()
        .map(|due_ms| Timer {
            due_ms,
            spec: TimeSpec::At(due_ms),
        })
}

/// The history output of a step with a fan-out in flight.
pub(super) fn fan_output(fan: &Fan) -> StepOutput {
    let count = |n: usize| u32::try_from(n).unwrap_or(u32::MAX);
    StepOutput::Fan {
        call_seq: fan.seq,
        done: count(fan.done()),
        branches: count(fan.branches.len()),
    }
}
