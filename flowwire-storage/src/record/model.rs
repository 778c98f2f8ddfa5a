//! The logical record: what an instance is at a step (status, state, the call in flight,
//! a fan-out, a timer, the saga stack).

use bytes::Bytes;
use serde::{Deserialize, Serialize};

/// Where an instance stands.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum Status {
    /// A driver call is in flight (see [`Record::pending`]).
    Running,
    /// Waiting for an impulse.
    Waiting,
    /// The wire returned `Command::finish()`.
    Finished,
    /// The wire returned `Command::fail(..)` or a continuation returned an error.
    Failed {
        /// Why.
        reason: String,
    },
    /// Parked for an operator: a wire panicked, or the instance cannot run on this code.
    Quarantined {
        /// Why.
        reason: String,
    },
    /// Sleeping until its timer fires (see [`Record::timer`]).
    Sleeping,
    /// The flow failed ([`Record::failing`] says why), or was cancelled
    /// ([`Record::cancel`]), and its registered compensations are running, last registered
    /// first; the one in flight is [`Record::pending`].
    Compensating,
    /// The instance was cancelled and its compensations have run.
    Cancelled {
        /// Why, as the canceller said.
        reason: String,
    },
}

impl Status {
    /// Whether the instance will never run again by itself.
    pub fn is_terminal(&self) -> bool {
        matches!(
            self,
            Status::Finished | Status::Failed { .. } | Status::Cancelled { .. }
        )
    }

    /// Whether the instance is live: neither ended nor parked.
    pub fn is_active(&self) -> bool {
        matches!(
            self,
            Status::Running | Status::Waiting | Status::Sleeping | Status::Compensating
        )
    }

    /// Whether the instance has a driver call to see through: in flight, or waiting out a
    /// backoff before its next attempt ([`Record::has_call_out`] tells them apart).
    pub fn has_call(&self) -> bool {
        matches!(self, Status::Running | Status::Compensating)
    }

    /// A short name for logs and errors.
    pub fn name(&self) -> &'static str {
        match self {
            Status::Running => "running",
            Status::Waiting => "waiting",
            Status::Finished => "finished",
            Status::Failed { .. } => "failed",
            Status::Quarantined { .. } => "quarantined",
            Status::Sleeping => "sleeping",
            Status::Compensating => "compensating",
            Status::Cancelled { .. } => "cancelled",
        }
    }
}

/// The driver call an instance is waiting for, its encoded call held as `P`: the bytes
/// in memory (`PendingCall`), or placed on the ladder as persisted
/// ([`PlacedCall`](super::PlacedCall) is `PendingCall<Payload>`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct PendingCall<P = Bytes> {
    /// The step that issued the call; with the instance key it is the idempotency key.
    pub seq: u64,
    /// Which linked driver serves it (index in the flow's links).
    pub link: u16,
    /// Which method of that driver.
    pub method: u16,
    /// The encoded call (the driver's call enum, postcard).
    pub call: P,
    /// How many times start-up recovery sent the call again after a restart (a restart
    /// while a call is in flight leaves it unknown whether it ran).
    pub redelivered: u32,
    /// How many attempts of the call failed and were retried under its policy (format 7).
    /// While [`Record::timer`] is armed the call waits for its next attempt (see
    /// [`Record::backing_off`]); otherwise attempt `attempts + 1` is in flight.
    pub attempts: u32,
}

/// When a timer fires, as the wire asked for it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum TimeSpec {
    /// This many milliseconds after the step that armed it.
    After(u64),
    /// At this time, in milliseconds since the Unix epoch.
    At(u64),
}

/// An armed timer: a sleep, or the timeout of a wait.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct Timer {
    /// When it fires, in milliseconds since the Unix epoch.
    pub due_ms: u64,
    /// What the wire asked for (a wire that asks for the same again keeps this timer).
    pub spec: TimeSpec,
}

/// A fan-out in flight: calls sent together (at most [`Fan::parallel`] at a time), joined
/// when all of them are done, or when the first succeeds.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Fan {
    /// The step that issued the fan-out; with the instance key and a branch's index it is
    /// the branch's idempotency key.
    pub seq: u64,
    /// Joined at the first successful outcome (the rest are abandoned), not after all.
    pub first: bool,
    /// At most this many branches are in flight at once.
    pub parallel: u32,
    /// The branches, in the order the wire gave them.
    pub branches: Vec<Branch>,
}

impl Fan {
    /// How many branches have their outcome.
    pub fn done(&self) -> usize {
        self.branches
            .iter()
            .filter(|b| matches!(b.state, BranchState::Done { .. }))
            .count()
    }

    /// The branches in flight, with their index.
    pub fn in_flight(&self) -> impl Iterator<Item = (u32, &Branch)> {
        (0u32..)
            .zip(&self.branches)
            .filter(|(_, b)| matches!(b.state, BranchState::Sent { .. }))
    }
}

/// One call of a fan-out.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Branch {
    /// Which linked driver serves it.
    pub link: u16,
    /// Which method of that driver.
    pub method: u16,
    /// The encoded call (kept inline in the record: pass ids, not data).
    pub call: Bytes,
    /// The compensation it registers when it succeeds (its `seq` is the fan-out's step).
    pub undo: Option<Compensation>,
    /// Where it stands.
    pub state: BranchState,
    /// How many attempts of its call failed and were retried under its policy (format 7).
    pub attempts: u32,
}

/// Where one branch of a fan-out stands.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum BranchState {
    /// Not sent yet (the parallelism bound holds it back).
    Queued,
    /// Sent, its outcome awaited.
    Sent {
        /// How many times a restart (or an operator's resume) sent it again.
        redelivered: u32,
    },
    /// Its outcome was applied.
    Done {
        /// Whether the driver's call succeeded.
        ok: bool,
    },
    /// An attempt failed and the call's policy retries it: the next attempt is sent at
    /// `due_ms` (the record's timer fires for the earliest branch waiting).
    Backoff {
        /// When the next attempt is due, in milliseconds since the Unix epoch.
        due_ms: u64,
    },
}

/// A compensation registered by a drive whose call succeeded: run if the flow fails.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Compensation {
    /// The step whose outcome registered it.
    pub seq: u64,
    /// Which linked driver serves it.
    pub link: u16,
    /// Which method of that driver.
    pub method: u16,
    /// The encoded call (kept inline in the record: compensations carry ids, not data).
    pub call: Bytes,
}

/// A flow's typed failure, as stored: the error value encoded with postcard, named by its
/// type (`std::any::type_name`), so that a reader decodes it only as the type it was
/// written from.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ErrorValue {
    /// The error's type, as `std::any::type_name` names it.
    pub type_name: String,
    /// The value, encoded with postcard.
    pub value: Bytes,
}

/// A cancellation, in progress (while the compensations run) or done.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Cancel {
    /// Why, as the canceller said.
    pub reason: String,
    /// The step of the call (or fan-out) that was in flight when the instance was
    /// cancelled: its late outcome is recorded in history, never applied.
    pub abandoned: Option<u64>,
}

/// The record of one instance, its payloads (the call in flight's as `P`, the state as `S`,
/// by default the same): `Record` (the bytes as read back) is what a reader sees;
/// [`LiveRecord`] (the state as a [`Rope`](crate::Rope), its large blobs by reference) is
/// what the engine keeps and commits; `Record<Payload>` (each payload inline or a
/// reference to a blob on the ladder) is what a [`PlacedRecord`](crate::record::PlacedRecord)
/// persists, with its garbage lists. The fields are written once, for all.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Record<P = Bytes, S = P> {
    /// The flow version the instance runs under.
    pub flow_version: u32,
    /// Steps taken so far; the last step's number.
    pub seq: u64,
    /// Where the instance stands.
    pub status: Status,
    /// The flow state, encoded with postcard.
    pub state: S,
    /// The call in flight, when [`Status::Running`].
    pub pending: Option<PendingCall<P>>,
    /// The armed timer: when [`Status::Sleeping`] or waiting with a timeout; or, with a call
    /// in flight, when its next attempt is due after a failed one (a durable backoff).
    pub timer: Option<Timer>,
    /// Compensations registered so far, in registration order (run in reverse).
    pub compensations: Vec<Compensation>,
    /// Why the flow failed, while its compensations run (also while it is parked because
    /// one of them failed: resuming it goes on compensating).
    pub failing: Option<String>,
    /// The flow's correlation key after this step, while the instance has not ended (the
    /// store indexes it for `impulse_by_key`).
    pub correlation: Option<String>,
    /// The fan-out in flight, when [`Status::Running`] without a [`Record::pending`] call.
    pub fan: Option<Fan>,
    /// The typed failure the flow failed with, when it has one: while its compensations
    /// run, and once it has failed (format 7).
    pub error: Option<ErrorValue>,
    /// The cancellation, once the instance was cancelled (format 7).
    pub cancel: Option<Cancel>,
}

/// A record as the engine keeps it: its state a [`Rope`](crate::Rope).
pub type LiveRecord = Record<Bytes, crate::Rope>;

impl<P, S> Record<P, S> {
    /// The record of an instance before its first step: no step taken, waiting, holding
    /// `state` and nothing else.
    ///
    /// ```
    /// use flowwire::storage::record::{Record, Status};
    /// let r: Record = Record::unwritten(3, b"state".as_slice().into());
    /// assert_eq!((r.flow_version, r.seq, &r.status), (3, 0, &Status::Waiting));
    /// assert!(r.pending.is_none() && r.compensations.is_empty());
    /// ```
    pub fn unwritten(flow_version: u32, state: S) -> Self {
        Record {
            flow_version,
            seq: 0,
            status: Status::Waiting,
            state,
            pending: None,
            timer: None,
            compensations: Vec::new(),
            failing: None,
            correlation: None,
            fan: None,
            error: None,
            cancel: None,
        }
    }
}

impl Record {
    /// The record as the engine keeps it (no copy: the state becomes a one-piece rope).
    pub fn live(self) -> LiveRecord {
        let Record {
            flow_version,
            seq,
            status,
            state,
            pending,
            timer,
            compensations,
            failing,
            correlation,
            fan,
            error,
            cancel,
        } = self;
        Record {
            flow_version,
            seq,
            status,
            state: crate::Rope::Flat(state),
            pending,
            timer,
            compensations,
            failing,
            correlation,
            fan,
            error,
            cancel,
        }
    }
}

impl LiveRecord {
    /// The record with its state in one buffer (copied if it is in pieces).
    pub fn flat(&self) -> Record {
        self.with_payloads(self.state.flat(), self.pending.clone())
    }
}

impl<P, S> Record<P, S> {
    /// Whether the call in flight (or a fan-out branch) waits out a backoff before its next
    /// attempt: the record's timer sends it again.
    pub fn backing_off(&self) -> bool {
        self.status.has_call() && self.timer.is_some()
    }

    /// Whether a driver call is out now, its outcome awaited: such instances are loaded at
    /// start-up to send it again and stay in memory. An instance waiting out a backoff has
    /// none out (unless other branches of its fan-out are in flight); its timer brings it
    /// back, as it does a sleeping one.
    pub fn has_call_out(&self) -> bool {
        if !self.status.has_call() {
            return false;
        }
        match &self.fan {
            Some(fan) => fan.in_flight().next().is_some(),
            None => self.timer.is_none(),
        }
    }

    /// The same record with its payloads (the state, and the call in flight's) given anew:
    /// how a record is placed on the ladder and read back from it.
    pub fn with_payloads<Q, T>(&self, state: T, pending: Option<PendingCall<Q>>) -> Record<Q, T> {
        Record {
            flow_version: self.flow_version,
            seq: self.seq,
            status: self.status.clone(),
            state,
            pending,
            timer: self.timer,
            compensations: self.compensations.clone(),
            failing: self.failing.clone(),
            correlation: self.correlation.clone(),
            fan: self.fan.clone(),
            error: self.error.clone(),
            cancel: self.cancel.clone(),
        }
    }
}

impl<P> PendingCall<P> {
    /// The same call with its encoded call given anew (placed, or read back).
    pub fn with_call<Q>(&self, call: Q) -> PendingCall<Q> {
        PendingCall {
            seq: self.seq,
            link: self.link,
            method: self.method,
            call,
            redelivered: self.redelivered,
            attempts: self.attempts,
        }
    }
}
