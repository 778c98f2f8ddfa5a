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
//!
//! The files: this one holds the instance, starting and rebuilding it, and building a
//! step; `advance.rs` runs the wire after an impulse, an outcome or a timer; `fan.rs` the
//! fan-outs; `saga.rs` the compensations; `redeliver.rs` calls in flight after a restart;
//! `retry.rs` failed attempts and their durable backoff; `cancel.rs` cancellation and the
//! late outcomes of abandoned calls; `operate.rs` parking and the operator's operations.

mod advance;
mod cancel;
mod children;
mod fan;
mod migrate;
mod operate;
mod plan;
mod redeliver;
mod retry;
mod saga;
mod upgrade;

use std::sync::Arc;

use flowwire_storage::arena::Arena;
use flowwire_storage::record::Draft;
use flowwire_storage::{
    CodecError, Compensation, Expect, InstanceKey, LiveRecord, PendingCall, Record, Rope, Status,
    StepInput, StepOutput, Timer,
};
use flowwire_storage::{codec, rope};
use smallvec::{SmallVec, smallvec};

use crate::board::Board;
use crate::command::{Join, Then, Undo, Wake};
use crate::flow::Flow;
pub use crate::operation::{Operation, Patch};
pub use cancel::CANCEL_ID;
pub use migrate::{StateRead, state_for_read};
pub(crate) use migrate::{decode_written, final_state};
pub use upgrade::{Upgrade, check_upgrade};

/// The continuation (and compensation) of the call in flight, as the wire returned them.
struct Armed<F: Board> {
    seq: u64,
    then: Then<F>,
    undo: Option<Undo<F>>,
}

/// The continuations of the fan-out in flight, as the wire returned them.
struct FanArmed<F> {
    seq: u64,
    join: Join<F>,
}

/// What the instance's continuation waits for, as the wire returned it: at most one of a
/// call, a fan-out and a timer (rederived from the record after a restart, when it is
/// `Nothing` but the record has something in flight).
enum Awaiting<F: Board> {
    Nothing,
    /// The continuation (and compensation) of the call in flight.
    Call(Armed<F>),
    /// The continuations of the fan-out in flight.
    Fan(FanArmed<F>),
    /// The continuation of the armed timer, by its due time.
    Timer {
        due_ms: u64,
        wake: Wake<F>,
    },
}

impl<F: Board> Awaiting<F> {
    /// Takes what is awaited, leaving `Nothing`.
    fn take(&mut self) -> Self {
        std::mem::replace(self, Awaiting::Nothing)
    }
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

/// Reusable encode buffers, one set per runner.
#[derive(Debug, Default)]
pub struct Scratch {
    /// Where the step's small payloads are carved from (no allocation each).
    pub arena: Arena,
    call: Vec<u8>,
    state: Vec<u8>,
    /// Where the large blobs left out of `state` go.
    cuts: Vec<flowwire_storage::rope::codec::Cut>,
    /// The runner's buffer for encoding records and history entries.
    pub out: Vec<u8>,
    /// The time of the step being built, in milliseconds since the Unix epoch, as the entry
    /// point that builds it was given (the core reads no clock): timers are armed
    /// relative to it and history entries record it.
    now_ms: u64,
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
    pub fn record(&self) -> &LiveRecord {
        &self.draft.record
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
    record: LiveRecord,
    /// What its continuation waits for.
    awaiting: Awaiting<F>,
    /// The compensation the step being built registers (its drive's call succeeded).
    registered: Option<Compensation>,
    /// The call (step and fan-out branch) whose outcome the step being built applies: a
    /// child that has ended, not to be cancelled if the parent unwinds.
    delivered: Option<(u64, Option<u32>)>,
    limit: usize,
}

/// `Driver.method` of a flow's link, for messages.
pub(crate) fn call_name<F: Board>(link: u16, method: u16) -> String {
    if link == crate::child::CHILD_LINK {
        return if method == crate::child::CANCEL {
            "the cancelling of a child flow".to_string()
        } else {
            "a child flow".to_string()
        };
    }
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
        now_ms: u64,
        scratch: &mut Scratch,
    ) -> (Self, Step) {
        let mut inst = Self::start_unrun(key, state, limit, now_ms, scratch);
        let step = inst.advance(StepInput::Start, None, false, scratch);
        (inst, step)
    }

    /// An instance about to take its first step: no record written yet.
    fn start_unrun(
        key: InstanceKey,
        state: F::State,
        limit: usize,
        now_ms: u64,
        scratch: &mut Scratch,
    ) -> Self {
        scratch.now_ms = now_ms;
        Self {
            key,
            flow: F::from_state(state),
            version: 0,
            record: Record::unwritten(F::VERSION, Rope::default()),
            awaiting: Awaiting::Nothing,
            registered: None,
            delivered: None,
            limit,
        }
    }

    /// Starts an instance with an impulse applied to its initial state before the wire
    /// first runs, as one step (the impulse id is recorded with it): the start half of
    /// `Engine::start_or_impulse`. An impulse that panics parks the new instance.
    pub fn start_with(
        key: InstanceKey,
        state: F::State,
        impulse_id: Arc<str>,
        impulse: F::Impulse,
        limit: usize,
        now_ms: u64,
        scratch: &mut Scratch,
    ) -> (Self, Step) {
        let mut inst = Self::start_unrun(key, state, limit, now_ms, scratch);
        let name = crate::flow::ImpulseSet::name(&impulse);
        scratch.call.clear();
        let payload = match codec::encode_raw(&impulse, &mut scratch.call) {
            Ok(()) => Some(scratch.arena.take(&mut scratch.call)),
            Err(_) => None,
        };
        let input = StepInput::StartWith {
            id: impulse_id.to_string(),
            name: name.to_string(),
        };
        let step = match crate::guard::guard(|| inst.flow.apply_impulse(impulse)) {
            Ok(()) => inst.advance_from(input, Some(impulse_id), false, payload, scratch, 0),
            Err(panic) => {
                let reason = format!("impulse `{name}` panicked: {panic}");
                let mut step = inst.park(input, reason, scratch);
                step.draft.impulse = Some(impulse_id);
                step.draft.payload = payload;
                step
            }
        };
        (inst, step)
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
    pub fn record(&self) -> &LiveRecord {
        &self.record
    }

    /// The flow as of its last applied input (its committed state unless a step is on its
    /// way to the store).
    pub fn flow(&self) -> &F {
        &self.flow
    }

    /// The version of the record this instance was built from, or last committed.
    pub fn version(&self) -> u64 {
        self.version
    }

    /// The call in flight, if any.
    pub fn pending(&self) -> Option<&PendingCall> {
        self.record.pending.as_ref()
    }

    /// The current state, encoded, its large blobs by reference (a failure to encode is
    /// the reason to park).
    fn encoded_state(&self, scratch: &mut Scratch) -> Result<Rope, String> {
        scratch.state.clear();
        scratch.cuts.clear();
        // A large state is likely about as large as it was: one allocation, not a doubling
        // series of them (each a copy of what was encoded so far).
        if let Rope::Flat(b) = &self.record.state {
            scratch.state.reserve(b.len());
        }
        rope::codec::encode_rope(self.flow.state(), &mut scratch.state, &mut scratch.cuts)
            .map_err(|e| format!("the state could not be encoded: {e}"))?;
        let head = scratch.arena.take(&mut scratch.state);
        Ok(Rope::assemble(head, &mut scratch.cuts))
    }

    /// Adopts a step after the store committed it.
    pub fn commit(&mut self, step: &Step) {
        self.version = step.draft.version;
        self.record = step.draft.record.clone();
    }

    /// Adopts a step after the store committed it, as [`commit`](Self::commit) does, by
    /// taking its record instead of copying it: `step` is left holding the record the
    /// instance had before, for the caller to drop with it. (A record's payloads are shared
    /// buffers: a copy costs an atomic count update for each, and again when it is dropped.)
    pub fn adopt(&mut self, step: &mut Step) {
        self.version = step.draft.version;
        std::mem::swap(&mut self.record, &mut step.draft.record);
    }

    /// Returns to the committed record after a step was not committed.
    pub fn revert(&mut self) -> Result<(), CodecError> {
        let state: F::State = rope::read::decode_rope(&self.record.state, self.limit)?;
        self.flow = F::from_state(state);
        self.awaiting = Awaiting::Nothing;
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

    #[allow(clippy::too_many_arguments)]
    fn build(
        &mut self,
        input: StepInput,
        impulse: Option<Arc<str>>,
        status: Status,
        state: Rope,
        pending: Option<PendingCall>,
        dispatch: Dispatches,
        timer: Option<Timer>,
        output: StepOutput,
        extra: Extra,
    ) -> Step {
        // An ended flow has nothing left to undo and no failure in progress.
        let ended = status.is_terminal();
        let compensations = if ended {
            self.registered = None;
            Vec::new()
        } else {
            self.compensations_now()
        };
        let (failing, error) = if ended {
            (None, None)
        } else {
            (self.record.failing.clone(), self.record.error.clone())
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
            error,
            cancel: self.record.cancel.clone(),
            correlation: self.correlation(),
            status,
            state,
            pending,
            timer,
            compensations,
            fan: extra.fan,
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
                payload: extra.payload,
                at_ms: extra.at_ms,
            },
            dispatch,
        }
    }
}

/// What a step is built with beyond its record's usual parts, by the builders that know it
/// then (a step is several hundred bytes: setting a field after it is built, then returning
/// it, copies it once more).
#[derive(Default)]
struct Extra {
    fan: Option<flowwire_storage::Fan>,
    payload: Option<bytes::Bytes>,
    at_ms: u64,
}

/// `step`, carrying `payload` to its history entry (for the paths off the usual one).
fn carrying(mut step: Step, payload: Option<bytes::Bytes>) -> Step {
    step.draft.payload = payload;
    step
}
