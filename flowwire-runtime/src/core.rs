//! The sans-IO step core.
//!
//! An [`Instance`] holds a flow and its last committed record. Each input — a start, an
//! impulse, a driver outcome — runs user code (impulse, continuation, wire) and returns a
//! [`Step`]: the write to persist and the call to dispatch once it is durable. Nothing here
//! touches a socket, a file, a clock or a task; the engine shell moves the bytes.
//!
//! Invariants:
//! * one input is one step is one atomic write of {state, status, pending call, applied
//!   impulse id, history entry};
//! * a step is adopted ([`Instance::commit`]) only after the store committed it; until then
//!   the committed record is the truth and [`Instance::revert`] returns to it;
//! * user code that panics never leaves a half-changed state behind: the instance is parked
//!   with its committed state.

use std::panic::{AssertUnwindSafe, catch_unwind};
use std::sync::Arc;

use bytes::Bytes;
use flowwire_storage::arena::Arena;
use flowwire_storage::codec;
use flowwire_storage::record::Draft;
use flowwire_storage::{
    BranchState, CodecError, Compensation, Expect, Fan, InstanceKey, PendingCall, Record, Status,
    StepInput, StepOutput, TimeSpec, Timer,
};
use smallvec::{SmallVec, smallvec};

use crate::board::{Board, CallSet};
use crate::command::{CommandKind, Delivered, Join, Then, ThenError, Wake};
use crate::driver::Fault;
use crate::flow::{Flow, ImpulseSet};
use crate::guard::panic_message;

/// The continuation (and compensation) of the call in flight, as the wire returned them.
struct Armed<F: Board> {
    seq: u64,
    then: Then<F>,
    undo: Option<F::Call>,
}

/// The continuations of the fan-out in flight, as the wire returned them.
struct FanArmed<F> {
    seq: u64,
    join: Join<F>,
}

/// The most branches a fan-out may have (its calls are kept in the record).
pub const MAX_BRANCHES: usize = 1024;

/// A driver call to send once its step is committed: a drive's or compensation's call, or
/// a fan-out branch.
#[derive(Debug, Clone)]
pub struct Outgoing {
    /// The call (for a branch: the fan-out's step, and the branch's redelivery count).
    pub call: PendingCall,
    /// The fan-out branch's index.
    pub branch: Option<u32>,
}

/// The calls a step sends (one at most, except when a fan-out starts or resumes).
pub type Dispatches = SmallVec<[Outgoing; 1]>;

fn one(call: PendingCall) -> Dispatches {
    smallvec![Outgoing { call, branch: None }]
}

/// Reusable encode buffers, one set per runner, and the time of the steps being built.
#[derive(Debug, Default)]
pub struct Scratch {
    /// Where the step's small payloads are carved from (no allocation each).
    pub arena: Arena,
    call: Vec<u8>,
    state: Vec<u8>,
    /// The runner's buffer for encoding records and history entries.
    pub out: Vec<u8>,
    /// The time of the steps being built, in milliseconds since the Unix epoch: set by the
    /// shell (the core reads no clock). Timers are armed relative to it and history
    /// entries record it.
    pub now_ms: u64,
}

/// One step, ready to be placed on the ladder and persisted.
#[derive(Debug)]
pub struct Step {
    /// The step with its payloads in memory (the record the instance adopts once the
    /// step is committed is `draft.record`).
    pub draft: Draft,
    /// The driver calls to dispatch once the write is committed.
    pub dispatch: Dispatches,
}

impl Step {
    /// The record the step writes.
    pub fn record(&self) -> &Record {
        &self.draft.record
    }
}

/// An operator's change to a parked instance's state.
pub type Patch<F> = Box<dyn FnOnce(&mut <F as Board>::State) + Send>;

/// What an operator does to a parked instance.
pub enum Operation<F: Flow> {
    /// Runs it again: sends its call in flight again (or the compensation in flight, for a
    /// failing flow), or runs the wire.
    Resume,
    /// Changes its state with a closure (it stays parked).
    Patch(Patch<F>),
    /// Puts back the state recorded at a step of its history (it stays parked, with no
    /// call in flight and no failure).
    Rewind {
        /// The step.
        to: u64,
        /// The state recorded then, encoded.
        state: Bytes,
    },
}

impl<F: Flow> Operation<F> {
    /// The operation's name, for messages.
    pub fn name(&self) -> &'static str {
        match self {
            Operation::Resume => "resume",
            Operation::Patch(_) => "patch",
            Operation::Rewind { .. } => "rewind",
        }
    }
}

/// Why an operation was refused.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Refused {
    /// The instance is not parked (for a rewind: neither parked nor failed).
    NotParked(&'static str),
    /// The patch closure panicked (the state is unchanged).
    PatchPanicked(String),
    /// The state does not decode or encode (the message says which).
    State(String),
}

/// Why an impulse was not applied.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Rejected {
    /// The instance ended.
    Ended(&'static str),
    /// The instance is parked.
    Quarantined(String),
}

/// A flow instance and its last committed record.
pub struct Instance<F: Flow> {
    key: InstanceKey,
    flow: F,
    version: u64,
    record: Record,
    then: Option<Armed<F>>,
    /// The continuations of the fan-out in flight (rederived after a restart).
    fan: Option<FanArmed<F>>,
    /// The continuation of the armed timer, by its due time (rederived after a restart).
    wake: Option<(u64, Wake<F>)>,
    /// The compensation the step being built registers (its drive's call succeeded).
    registered: Option<Compensation>,
    limit: usize,
}

/// `Driver.method` of a flow's link, for messages.
pub(crate) fn call_name<F: Board>(link: u16, method: u16) -> String {
    let Some(l) = F::LINKS.get(usize::from(link)) else {
        return format!("link {link}, method {method}");
    };
    match l.driver.methods.get(usize::from(method)) {
        Some(m) => format!("{}.{}", l.driver.name, m.name),
        None => format!("{}, method {method}", l.driver.name),
    }
}

impl<F: Flow> Instance<F> {
    /// Starts an instance: runs the wire on the initial state and returns the first step.
    pub fn start(
        key: InstanceKey,
        state: F::State,
        limit: usize,
        scratch: &mut Scratch,
    ) -> (Self, Step) {
        let mut inst = Self {
            key,
            flow: F::from_state(state),
            version: 0,
            record: Record {
                flow_version: F::VERSION,
                seq: 0,
                status: Status::Waiting,
                state: Bytes::new(),
                pending: None,
                timer: None,
                compensations: Vec::new(),
                failing: None,
                correlation: None,
                fan: None,
            },
            then: None,
            fan: None,
            wake: None,
            registered: None,
            limit,
        };
        let step = inst.advance(StepInput::Start, None, false, scratch);
        (inst, step)
    }

    /// Rebuilds an instance from its stored record (after a restart).
    ///
    /// Returns a parking step when the record was written by another flow version: the
    /// instance must not run on code it was not written for.
    pub fn recover(
        key: InstanceKey,
        mut record: Record,
        version: u64,
        limit: usize,
        scratch: &mut Scratch,
    ) -> Result<(Self, Option<Step>), CodecError> {
        let written = record.flow_version;
        let upgrade = written != F::VERSION
            && written.checked_add(1) == Some(F::VERSION)
            && !record.status.is_terminal();
        let mut failed_migration = None;
        let state: F::State = if upgrade {
            match catch_unwind(AssertUnwindSafe(|| F::migrate(&record.state, limit))) {
                Ok(Some(migrated)) => {
                    let state = migrated?;
                    // The migrated state is the committed one from now on (the next step
                    // persists it with this version).
                    scratch.state.clear();
                    codec::encode_raw(&state, &mut scratch.state)?;
                    record.state = scratch.arena.take(&mut scratch.state);
                    record.flow_version = F::VERSION;
                    state
                }
                Ok(None) => codec::decode_raw(&record.state, limit)?,
                Err(p) => {
                    let message = panic_message(&*p);
                    // A state the new type reads as it is can still be parked (and patched).
                    let Ok(state) = codec::decode_raw(&record.state, limit) else {
                        return Err(CodecError::Malformed(format!(
                            "the migration from version {written} panicked: {message}"
                        )));
                    };
                    failed_migration = Some(message);
                    state
                }
            }
        } else {
            codec::decode_raw(&record.state, limit)?
        };
        let mut inst = Self {
            key,
            flow: F::from_state(state),
            version,
            record,
            then: None,
            fan: None,
            wake: None,
            registered: None,
            limit,
        };
        if inst.record.flow_version != F::VERSION && inst.record.status.is_active() {
            let reason = match failed_migration {
                Some(message) => format!(
                    "the instance was written by {} version {written}; this engine runs version {}, and its migration from version {written} panicked: {message}",
                    F::NAME,
                    F::VERSION
                ),
                None if F::MIGRATES => format!(
                    "the instance was written by {} version {written}; this engine runs version {}, which migrates only from version {}",
                    F::NAME,
                    F::VERSION,
                    F::VERSION - 1
                ),
                None => format!(
                    "the instance was written by {} version {written}, this engine runs version {} (it declares no migration)",
                    F::NAME,
                    F::VERSION
                ),
            };
            let step = inst.park(StepInput::Park, reason, scratch);
            return Ok((inst, Some(step)));
        }
        Ok((inst, None))
    }

    /// The step that parks an instance written by another flow version whose state does
    /// not decode as this version's (so no instance can be built around it): the record
    /// as it was, quarantined with a reason naming both versions.
    pub fn park_unreadable(
        key: InstanceKey,
        record: &Record,
        version: u64,
        detail: &CodecError,
        now_ms: u64,
    ) -> Step {
        let written = record.flow_version;
        let path = if F::MIGRATES && written.checked_add(1) == Some(F::VERSION) {
            "its migration failed".to_string()
        } else if F::MIGRATES {
            format!("it migrates only from version {}", F::VERSION - 1)
        } else {
            "it declares no migration".to_string()
        };
        let reason = format!(
            "the instance was written by {} version {written}; this engine runs version {} ({path}), and the state does not decode as this version's: {detail}",
            F::NAME,
            F::VERSION
        );
        let mut parked = record.clone();
        parked.seq += 1;
        parked.timer = None;
        parked.status = Status::Quarantined {
            reason: reason.clone(),
        };
        Step {
            draft: Draft {
                key,
                expect: Expect::Version(version),
                version: version + 1,
                record: parked,
                impulse: None,
                input: StepInput::Park,
                output: StepOutput::Quarantine { reason },
                payload: None,
                at_ms: now_ms,
            },
            dispatch: Dispatches::new(),
        }
    }

    /// The instance key.
    pub fn key(&self) -> &InstanceKey {
        &self.key
    }

    /// The committed status.
    pub fn status(&self) -> &Status {
        &self.record.status
    }

    /// The committed record.
    pub fn record(&self) -> &Record {
        &self.record
    }

    /// The flow as of its last applied input (its committed state unless a step is on its
    /// way to the store).
    pub fn flow(&self) -> &F {
        &self.flow
    }

    /// The committed state, encoded.
    pub fn state_bytes(&self) -> Bytes {
        self.record.state.clone()
    }

    /// The version of the record this instance was built from, or last committed.
    pub fn version(&self) -> u64 {
        self.version
    }

    /// The call in flight, if any.
    pub fn pending(&self) -> Option<&PendingCall> {
        self.record.pending.as_ref()
    }

    /// Applies an impulse and runs the wire.
    pub fn impulse(
        &mut self,
        impulse_id: Arc<str>,
        impulse: F::Impulse,
        scratch: &mut Scratch,
    ) -> Result<Step, Rejected> {
        match &self.record.status {
            Status::Finished => return Err(Rejected::Ended("finished")),
            Status::Failed { .. } => return Err(Rejected::Ended("failed")),
            Status::Quarantined { reason } => return Err(Rejected::Quarantined(reason.clone())),
            Status::Compensating => return Err(Rejected::Ended("compensating")),
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
        let applied = catch_unwind(AssertUnwindSafe(|| self.flow.apply_impulse(impulse)));
        if let Err(p) = applied {
            let reason = format!("impulse `{name}` panicked: {}", panic_message(&*p));
            let mut step = self.park(input, reason, scratch);
            step.draft.payload = payload;
            return Ok(step);
        }
        let mut step = self.advance(input, Some(impulse_id), true, scratch);
        step.draft.payload = payload;
        Ok(step)
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
        scratch: &mut Scratch,
    ) -> Option<Step> {
        if let Some(branch) = branch {
            return self.branch_outcome(seq, branch, outcome, scratch);
        }
        let pending = self.record.pending.clone()?;
        if pending.seq != seq {
            return None;
        }
        let ok = outcome.is_ok_and(|b| codec::reply_is_ok(b));
        let payload = Some(match outcome {
            Ok(bytes) => bytes.clone(),
            Err(fault) => Bytes::from(fault.to_string()),
        });
        let input = StepInput::Outcome { call_seq: seq, ok };
        match self.record.status {
            Status::Running => {}
            Status::Compensating => {
                let mut step = self.compensated(input, ok, outcome.err(), scratch);
                step.draft.payload = payload;
                return Some(step);
            }
            _ => return None,
        }
        let armed = match self.then.take() {
            Some(a) if a.seq == seq => a,
            _ => match self.rederive(&pending, scratch) {
                Ok(a) => a,
                Err(reason) => return Some(self.park(StepInput::Park, reason, scratch)),
            },
        };
        if ok && let Some(undo) = &armed.undo {
            // The call did what it did: whatever the continuation makes of it, the flow
            // must undo it if it fails later.
            scratch.call.clear();
            if let Err(e) = undo.encode(&mut scratch.call) {
                let reason =
                    format!("the compensation of the call at step {seq} could not be encoded: {e}");
                return Some(self.park(input, reason, scratch));
            }
            self.registered = Some(Compensation {
                seq,
                link: undo.link(),
                method: undo.method(),
                call: scratch.arena.copy(&scratch.call),
            });
        }
        let delivered = match outcome {
            Ok(bytes) => Delivered::Reply(&bytes[..]),
            Err(fault) => Delivered::Fault(fault),
        };
        let limit = self.limit;
        let then = armed.then;
        let ran = catch_unwind(AssertUnwindSafe(|| {
            then.call(&mut self.flow, delivered, limit, 0)
        }));
        let mut step = match ran {
            Ok(Ok(())) => self.advance(input, None, false, scratch),
            Ok(Err(ThenError::Failed(failure))) => self.end(input, failure.to_string(), scratch),
            Ok(Err(ThenError::Decode(e))) => {
                let reason = format!("the reply of the call at step {seq} does not decode: {e}");
                self.park(input, reason, scratch)
            }
            Err(p) => {
                let reason = format!("the continuation panicked: {}", panic_message(&*p));
                self.park(input, reason, scratch)
            }
        };
        step.draft.payload = payload;
        Some(step)
    }

    /// The outcome of branch `branch` of the fan-out issued at step `seq`: applied by its
    /// continuation (for `first`, only the first success, or the last failure), then the
    /// next queued branch is sent, or the fan-out joins and the wire runs.
    fn branch_outcome(
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
        let join = match self.fan.take() {
            Some(a) if a.seq == seq => a.join,
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
            Ok(bytes) => Delivered::Reply(&bytes[..]),
            Err(fault) => Delivered::Fault(fault),
        };
        let (k, then) = match join {
            Join::First(_) if !ok && open => {
                // Another branch may still succeed: this failure is not applied.
                self.fan = Some(FanArmed { seq, join });
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
        let ran = catch_unwind(AssertUnwindSafe(|| {
            k.call(&mut self.flow, delivered, limit, i)
        }));
        let mut step = match ran {
            Ok(Ok(())) if then.is_none() || !open => match then {
                Some(then) => self.join(input, None, then, scratch, 0),
                None => self.advance(input, None, false, scratch),
            },
            Ok(Ok(())) => {
                self.fan = Some(FanArmed { seq, join });
                match self.encoded_state(scratch) {
                    Ok(state) => self.progress(input, fan, state, scratch),
                    Err(reason) => self.park(input, reason, scratch),
                }
            }
            Ok(Err(ThenError::Failed(failure))) => self.end(input, failure.to_string(), scratch),
            Ok(Err(ThenError::Decode(e))) => {
                let reason = format!(
                    "the reply of branch {branch} of the fan-out at step {seq} does not decode: {e}"
                );
                self.park(input, reason, scratch)
            }
            Err(p) => {
                let reason = format!(
                    "the continuation of branch {branch} of the fan-out at step {seq} panicked: {}",
                    panic_message(&*p)
                );
                self.park(input, reason, scratch)
            }
        };
        step.draft.payload = payload;
        Some(step)
    }

    /// Runs a fan-out's join continuation, then the wire (`joined`: fan-outs without calls
    /// this step joined before, see [`Instance::advance_from`]).
    fn join(
        &mut self,
        input: StepInput,
        impulse: Option<Arc<str>>,
        then: Wake<F>,
        scratch: &mut Scratch,
        joined: u32,
    ) -> Step {
        match catch_unwind(AssertUnwindSafe(|| then(&mut self.flow))) {
            Ok(Ok(())) => self.advance_from(input, impulse, false, scratch, joined),
            Ok(Err(failure)) => self.end(input, failure.to_string(), scratch),
            Err(p) => {
                let reason = format!(
                    "the fan-out's join continuation panicked: {}",
                    panic_message(&*p)
                );
                self.park(input, reason, scratch)
            }
        }
    }

    /// The current state, encoded (a failure to encode is the reason to park).
    fn encoded_state(&self, scratch: &mut Scratch) -> Result<Bytes, String> {
        scratch.state.clear();
        codec::encode_raw(self.flow.state(), &mut scratch.state)
            .map_err(|e| format!("the state could not be encoded: {e}"))?;
        Ok(scratch.arena.take(&mut scratch.state))
    }

    /// A step of a fan-out in progress: the fan-out with the next queued branches sent.
    fn progress(
        &mut self,
        input: StepInput,
        mut fan: Fan,
        state: Bytes,
        scratch: &mut Scratch,
    ) -> Step {
        let dispatch = top_up(&mut fan);
        let output = fan_output(&fan);
        let mut step = self.build(
            input,
            None,
            Status::Running,
            state,
            None,
            dispatch,
            None,
            output,
        );
        step.draft.record.fan = Some(fan);
        step.draft.at_ms = scratch.now_ms;
        step
    }

    /// A step that sends the branches of the fan-out in flight again (counted as
    /// redelivered), with the committed state.
    fn resend_fan(&mut self, mut fan: Fan, input: StepInput, scratch: &mut Scratch) -> Step {
        let mut dispatch = Dispatches::new();
        for (i, b) in (0u32..).zip(fan.branches.iter_mut()) {
            if let BranchState::Sent { redelivered } = b.state {
                let again = redelivered.saturating_add(1);
                b.state = BranchState::Sent { redelivered: again };
                dispatch.push(branch_out(fan.seq, i, b, again));
            }
        }
        let state = self.record.state.clone();
        let mut step = self.progress(input, fan, state, scratch);
        let topped = std::mem::take(&mut step.dispatch);
        dispatch.extend(topped);
        step.dispatch = dispatch;
        step
    }

    /// Runs the wire again to find the continuations of the fan-out in flight.
    fn rederive_fan(&mut self, fan: &Fan) -> Result<Join<F>, String> {
        let cmd = catch_unwind(AssertUnwindSafe(|| self.flow.wire()))
            .map_err(|p| format!("the wire panicked: {}", panic_message(&*p)))?;
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

    /// The outcome of the compensation in flight: on success the next one is sent (or the
    /// flow ends failed after the last); on failure the instance is parked with it still in
    /// flight, so that resuming sends it again.
    fn compensated(
        &mut self,
        input: StepInput,
        ok: bool,
        fault: Option<&Fault>,
        scratch: &mut Scratch,
    ) -> Step {
        let reason = self.record.failing.clone().unwrap_or_default();
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
        self.unwind(input, None, reason, rest, state, scratch)
    }
    /// Fires the armed timer due at `due_ms`: runs its continuation, then the wire.
    ///
    /// Returns `None` when no such timer is armed (it was re-armed, or an impulse moved the
    /// instance on): the caller repairs the timer index.
    pub fn fire(&mut self, due_ms: u64, scratch: &mut Scratch) -> Option<Step> {
        let timer = self.record.timer?;
        if timer.due_ms != due_ms
            || !matches!(self.record.status, Status::Sleeping | Status::Waiting)
        {
            return None;
        }
        let input = StepInput::Timer { due_ms };
        let wake = match self.wake {
            Some((due, wake)) if due == due_ms => wake,
            _ => match self.rederive_timer(&timer) {
                Ok(wake) => wake,
                Err(reason) => return Some(self.park(input, reason, scratch)),
            },
        };
        self.wake = None;
        let ran = catch_unwind(AssertUnwindSafe(|| wake(&mut self.flow)));
        Some(match ran {
            Ok(Ok(())) => self.advance(input, None, false, scratch),
            Ok(Err(failure)) => self.end(input, failure.to_string(), scratch),
            Err(p) => {
                let reason = format!("the timer's continuation panicked: {}", panic_message(&*p));
                self.park(input, reason, scratch)
            }
        })
    }

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
        scratch: &mut Scratch,
    ) -> Option<Step> {
        if !self.record.status.has_call() {
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
    fn resend(&mut self, pending: PendingCall, input: StepInput, status: Status) -> Step {
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
        )
    }

    /// Applies an operator's operation to a parked instance (a rewind also applies to a
    /// failed one). The instance stays parked after a patch or a rewind, so that an operator
    /// can check the result before resuming it.
    pub fn operate(&mut self, op: Operation<F>, scratch: &mut Scratch) -> Result<Step, Refused> {
        let parked = matches!(self.record.status, Status::Quarantined { .. });
        let failed = matches!(self.record.status, Status::Failed { .. });
        let allowed = parked || (failed && matches!(op, Operation::Rewind { .. }));
        if !allowed {
            return Err(Refused::NotParked(self.record.status.name()));
        }
        let mut step = match op {
            Operation::Resume => self.resume(scratch),
            Operation::Patch(patch) => {
                let mut state: F::State = codec::decode_raw(&self.record.state, self.limit)
                    .map_err(|e| {
                        Refused::State(format!("the stored state does not decode: {e}"))
                    })?;
                catch_unwind(AssertUnwindSafe(|| patch(&mut state)))
                    .map_err(|p| Refused::PatchPanicked(panic_message(&*p)))?;
                scratch.state.clear();
                codec::encode_raw(&state, &mut scratch.state).map_err(|e| {
                    Refused::State(format!("the patched state does not encode: {e}"))
                })?;
                self.flow = F::from_state(state);
                let bytes = scratch.arena.take(&mut scratch.state);
                self.operated(StepInput::Patch, bytes, None)
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
                let mut step = self.operated(StepInput::Rewind { to }, state, Some(reason));
                step.draft.record.pending = None;
                step.draft.record.fan = None;
                step.draft.record.failing = None;
                step
            }
        };
        step.draft.at_ms = scratch.now_ms;
        Ok(step)
    }

    /// A step that keeps the instance parked with a new state (and, given, a new reason).
    fn operated(&mut self, input: StepInput, state: Bytes, reason: Option<String>) -> Step {
        let reason = reason.unwrap_or_else(|| match &self.record.status {
            Status::Quarantined { reason } => reason.clone(),
            other => other.name().to_string(),
        });
        self.quarantined(input, reason, state)
    }

    /// Resumes a parked instance: its call in flight (or compensation) is sent again,
    /// counted as redelivered; without one, the wire runs.
    fn resume(&mut self, scratch: &mut Scratch) -> Step {
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

    /// Adopts a step after the store committed it.
    pub fn commit(&mut self, step: &Step) {
        self.version = step.draft.version;
        self.record = step.draft.record.clone();
    }

    /// Returns to the committed record after a step was not committed.
    pub fn revert(&mut self) -> Result<(), CodecError> {
        let state: F::State = codec::decode_raw(&self.record.state, self.limit)?;
        self.flow = F::from_state(state);
        self.then = None;
        self.fan = None;
        self.wake = None;
        Ok(())
    }

    /// The flow's correlation key as of its current state (flows without one allocate
    /// nothing here).
    fn correlation(&self) -> Option<String> {
        let mut key = String::new();
        if !self.flow.correlate(&mut key) {
            return None;
        }
        Some(key)
    }

    /// Runs the wire again to find the continuation of the armed timer (after a restart,
    /// or after the instance left memory while it slept or waited).
    fn rederive_timer(&mut self, timer: &Timer) -> Result<Wake<F>, String> {
        let cmd = catch_unwind(AssertUnwindSafe(|| self.flow.wire()))
            .map_err(|p| format!("the wire panicked: {}", panic_message(&*p)))?;
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
    fn rederive(
        &mut self,
        pending: &PendingCall,
        scratch: &mut Scratch,
    ) -> Result<Armed<F>, String> {
        let cmd = catch_unwind(AssertUnwindSafe(|| self.flow.wire()))
            .map_err(|p| format!("the wire panicked: {}", panic_message(&*p)))?;
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
    fn advance(
        &mut self,
        input: StepInput,
        impulse: Option<Arc<str>>,
        keep_pending: bool,
        scratch: &mut Scratch,
    ) -> Step {
        self.advance_from(input, impulse, keep_pending, scratch, 0)
    }

    /// [`Instance::advance`], after `joined` fan-outs without calls joined at once.
    fn advance_from(
        &mut self,
        input: StepInput,
        impulse: Option<Arc<str>>,
        keep_pending: bool,
        scratch: &mut Scratch,
        joined: u32,
    ) -> Step {
        /// Fan-outs without calls one step may join before the wire is taken to loop.
        const EMPTY_JOINS: u32 = 8;
        let seq = self.record.seq + 1;
        let cmd = match catch_unwind(AssertUnwindSafe(|| self.flow.wire())) {
            Ok(cmd) => cmd,
            Err(p) => {
                let reason = format!("the wire panicked: {}", panic_message(&*p));
                return self.park(input, reason, scratch);
            }
        };
        let mut timer = None;
        let mut failing = None;
        let mut fan = None;
        let (status, pending, dispatch, output) = match cmd.kind {
            CommandKind::Drive { call, then, undo } => {
                scratch.call.clear();
                if let Err(e) = call.encode(&mut scratch.call) {
                    let reason = format!("the wire's call could not be encoded: {e}");
                    return self.park(input, reason, scratch);
                }
                let (link, method) = (call.link(), call.method());
                let kept = self.record.pending.as_ref().filter(|p| {
                    keep_pending && p.link == link && p.method == method && p.call == scratch.call
                });
                let (pending, dispatch) = match kept {
                    Some(p) => (p.clone(), Dispatches::new()),
                    None => {
                        let p = PendingCall {
                            seq,
                            link,
                            method,
                            call: scratch.arena.take(&mut scratch.call),
                            redelivered: 0,
                        };
                        (p.clone(), one(p))
                    }
                };
                self.then = Some(Armed {
                    seq: pending.seq,
                    then,
                    undo,
                });
                let output = StepOutput::Drive {
                    call_seq: pending.seq,
                    link,
                    method,
                };
                (Status::Running, Some(pending), dispatch, output)
            }
            CommandKind::Fan {
                calls,
                parallel,
                join,
            } => {
                let kept = self.record.fan.as_ref().filter(|f| {
                    keep_pending
                        && self.record.status == Status::Running
                        && same_fan(f, &calls, &join)
                });
                if let Some(f) = kept {
                    let f = f.clone();
                    let output = fan_output(&f);
                    self.fan = Some(FanArmed { seq: f.seq, join });
                    fan = Some(f);
                    (Status::Running, None, Dispatches::new(), output)
                } else if calls.len() > MAX_BRANCHES {
                    let reason = format!(
                        "the wire returned a fan-out of {} calls; at most {MAX_BRANCHES} are allowed (split the work into several fan-outs)",
                        calls.len()
                    );
                    return self.park(input, reason, scratch);
                } else if calls.is_empty() {
                    let Join::All { then, .. } = join else {
                        let reason = "the wire returned `first` over a fan-out without calls: there is no outcome to continue with (return another command when there is nothing to race)".to_string();
                        return self.park(input, reason, scratch);
                    };
                    if joined >= EMPTY_JOINS {
                        let reason = format!(
                            "the wire returned a fan-out without calls {EMPTY_JOINS} times in a row: its join continuation must change the state so that the wire moves on"
                        );
                        return self.park(input, reason, scratch);
                    }
                    // Nothing to wait for: join at once.
                    return self.join(input, impulse, then, scratch, joined + 1);
                } else {
                    let mut branches = Vec::with_capacity(calls.len());
                    for (i, (call, undo)) in calls.iter().enumerate() {
                        match encode_branch(seq, call, undo.as_ref(), &mut scratch.call) {
                            Ok(b) => branches.push(b),
                            Err(e) => {
                                let reason = format!(
                                    "branch {i} of the wire's fan-out could not be encoded: {e}"
                                );
                                return self.park(input, reason, scratch);
                            }
                        }
                    }
                    let mut f = Fan {
                        seq,
                        first: join.is_first(),
                        parallel,
                        branches,
                    };
                    let dispatch = top_up(&mut f);
                    let output = fan_output(&f);
                    self.fan = Some(FanArmed { seq, join });
                    fan = Some(f);
                    (Status::Running, None, dispatch, output)
                }
            }
            CommandKind::Wait => (Status::Waiting, None, Dispatches::new(), StepOutput::Wait),
            CommandKind::Timer { spec, wait, wake } => {
                let was = if wait {
                    Status::Waiting
                } else {
                    Status::Sleeping
                };
                let kept = self
                    .record
                    .timer
                    .filter(|t| keep_pending && t.spec == spec && self.record.status == was);
                let due_ms = match kept {
                    Some(t) => t.due_ms,
                    None => match spec {
                        TimeSpec::After(ms) => scratch.now_ms.saturating_add(ms),
                        TimeSpec::At(at) => at,
                    },
                };
                timer = Some(Timer { due_ms, spec });
                self.wake = Some((due_ms, wake));
                let output = if wait {
                    StepOutput::WaitUntil { due_ms }
                } else {
                    StepOutput::Sleep { due_ms }
                };
                (was, None, Dispatches::new(), output)
            }
            CommandKind::Finish => (
                Status::Finished,
                None,
                Dispatches::new(),
                StepOutput::Finish,
            ),
            CommandKind::Fail(f) => {
                failing = Some(f.to_string());
                (Status::Waiting, None, Dispatches::new(), StepOutput::Wait)
            }
        };
        scratch.state.clear();
        if let Err(e) = codec::encode_raw(self.flow.state(), &mut scratch.state) {
            let reason = format!("the state could not be encoded: {e}");
            return self.park(input, reason, scratch);
        }
        let state = scratch.arena.take(&mut scratch.state);
        if let Some(reason) = failing {
            let compensations = self.compensations_now();
            // The impulse that led the wire to fail was applied: its id is recorded with
            // the step, as with any other.
            return self.unwind(input, impulse, reason, compensations, state, scratch);
        }
        let mut step = self.build(
            input, impulse, status, state, pending, dispatch, timer, output,
        );
        step.draft.record.fan = fan;
        step.draft.at_ms = scratch.now_ms;
        step
    }

    /// The step after a continuation failed the flow: its changed state is kept, and the
    /// compensations (with the one this step registers) start.
    fn end(&mut self, input: StepInput, reason: String, scratch: &mut Scratch) -> Step {
        scratch.state.clear();
        let state = match codec::encode_raw(self.flow.state(), &mut scratch.state) {
            Ok(()) => scratch.arena.take(&mut scratch.state),
            Err(_) => self.record.state.clone(),
        };
        let compensations = self.compensations_now();
        self.unwind(input, None, reason, compensations, state, scratch)
    }

    /// The committed compensations, with the one the step being built registers.
    fn compensations_now(&mut self) -> Vec<Compensation> {
        let mut all = self.record.compensations.clone();
        all.extend(self.registered.take());
        all
    }

    /// A failing step: sends the last of `compensations` (status compensating), or ends the
    /// flow failed when none is left.
    fn unwind(
        &mut self,
        input: StepInput,
        impulse: Option<Arc<str>>,
        reason: String,
        compensations: Vec<Compensation>,
        state: Bytes,
        scratch: &mut Scratch,
    ) -> Step {
        self.then = None;
        self.fan = None;
        self.wake = None;
        self.registered = None;
        let seq = self.record.seq + 1;
        let mut step = match compensations.last() {
            None => {
                let output = StepOutput::Fail {
                    reason: reason.clone(),
                };
                let status = Status::Failed { reason };
                self.build(
                    input,
                    impulse,
                    status,
                    state,
                    None,
                    Dispatches::new(),
                    None,
                    output,
                )
            }
            Some(c) => {
                let call = PendingCall {
                    seq,
                    link: c.link,
                    method: c.method,
                    call: c.call.clone(),
                    redelivered: 0,
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
                );
                step.draft.record.failing = Some(reason);
                step.draft.record.compensations = compensations;
                step
            }
        };
        step.draft.at_ms = scratch.now_ms;
        step
    }

    /// The history output of a call sent again (after a restart, or by an operator).
    fn resend_output(&self, call: &PendingCall) -> StepOutput {
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

    /// Parks the instance for an operator: a step that keeps its committed state and call,
    /// quarantined with `reason` (a step that cannot be written, whatever the retries).
    pub fn quarantine(&mut self, reason: String, scratch: &mut Scratch) -> Step {
        self.park(StepInput::Park, reason, scratch)
    }

    /// A parking step: the committed state, quarantined with a reason.
    fn park(&mut self, input: StepInput, reason: String, scratch: &mut Scratch) -> Step {
        // User code may have changed the state before it panicked: park the committed one.
        let state = self.record.state.clone();
        if state.is_empty() {
            // A start that panicked: park the initial state as given.
            scratch.state.clear();
            let _ = codec::encode_raw(self.flow.state(), &mut scratch.state);
        } else if let Ok(s) = codec::decode_raw::<F::State>(&state, self.limit) {
            self.flow = F::from_state(s);
        }
        let state = if state.is_empty() {
            scratch.arena.take(&mut scratch.state)
        } else {
            state
        };
        self.then = None;
        self.fan = None;
        self.registered = None;
        self.wake = None;
        let mut step = self.quarantined(input, reason, state);
        step.draft.at_ms = scratch.now_ms;
        step
    }

    /// A parked step: it keeps the call (or fan-out) in flight (an operator may resume it)
    /// but no timer (resuming runs the wire, which arms it again).
    fn quarantined(&mut self, input: StepInput, reason: String, state: Bytes) -> Step {
        let output = StepOutput::Quarantine {
            reason: reason.clone(),
        };
        let pending = self.record.pending.clone();
        let mut step = self.build(
            input,
            None,
            Status::Quarantined { reason },
            state,
            pending,
            Dispatches::new(),
            None,
            output,
        );
        step.draft.record.fan.clone_from(&self.record.fan);
        step
    }

    #[allow(clippy::too_many_arguments)]
    fn build(
        &mut self,
        input: StepInput,
        impulse: Option<Arc<str>>,
        status: Status,
        state: Bytes,
        pending: Option<PendingCall>,
        dispatch: Dispatches,
        timer: Option<Timer>,
        output: StepOutput,
    ) -> Step {
        // An ended flow has nothing left to undo and no failure in progress.
        let ended = status.is_terminal();
        let compensations = if ended {
            self.registered = None;
            Vec::new()
        } else {
            self.compensations_now()
        };
        let failing = if ended {
            None
        } else {
            self.record.failing.clone()
        };
        // A parked instance keeps the version that wrote it (an operator's resume, or the
        // next step after a migration, writes this one).
        let flow_version = if matches!(status, Status::Quarantined { .. }) {
            self.record.flow_version
        } else {
            F::VERSION
        };
        let record = Record {
            flow_version,
            seq: self.record.seq + 1,
            failing,
            correlation: self.correlation(),
            status,
            state,
            pending,
            timer,
            compensations,
            fan: None,
        };
        let expect = if self.version == 0 {
            Expect::Absent
        } else {
            Expect::Version(self.version)
        };
        Step {
            draft: Draft {
                key: self.key.clone(),
                expect,
                version: self.version + 1,
                record,
                impulse,
                input,
                output,
                payload: None,
                at_ms: 0,
            },
            dispatch,
        }
    }
}

/// Whether the wire's fan-out is the one in flight: the same join, and as many branches
/// calling the same methods (the arguments are the recorded ones).
fn same_fan<F: Board>(fan: &Fan, calls: &[(F::Call, Option<F::Call>)], join: &Join<F>) -> bool {
    fan.first == join.is_first()
        && fan.branches.len() == calls.len()
        && fan
            .branches
            .iter()
            .zip(calls)
            .all(|(b, (c, _))| b.link == c.link() && b.method == c.method())
}

/// A fan-out branch, queued, with its call (and compensation) encoded.
fn encode_branch<C: CallSet>(
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
    })
}

/// The call of branch `i` of the fan-out issued at step `seq`, to send.
fn branch_out(seq: u64, i: u32, b: &flowwire_storage::Branch, redelivered: u32) -> Outgoing {
    Outgoing {
        call: PendingCall {
            seq,
            link: b.link,
            method: b.method,
            call: b.call.clone(),
            redelivered,
        },
        branch: Some(i),
    }
}

/// Sends queued branches, in order, until the parallelism bound is reached; returns them.
fn top_up(fan: &mut Fan) -> Dispatches {
    let bound = usize::try_from(fan.parallel).unwrap_or(usize::MAX);
    let mut in_flight = fan.in_flight().count();
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

/// The history output of a step with a fan-out in flight.
fn fan_output(fan: &Fan) -> StepOutput {
    let count = |n: usize| u32::try_from(n).unwrap_or(u32::MAX);
    StepOutput::Fan {
        call_seq: fan.seq,
        done: count(fan.done()),
        branches: count(fan.branches.len()),
    }
}
