//! What the stores persist: instance records, history entries and the step writes that
//! carry them.
//!
//! A step of an instance is one [`StepWrite`]: the new record (compare-and-swap on its
//! version), the impulse id it applied (insert-if-absent, which is what makes impulses
//! exactly-once), and its history entry. A store commits a whole batch of step writes in
//! one durable transaction (group commit) and reports a [`StepResult`] for each.

use std::sync::Arc;

use bytes::Bytes;
use serde::{Deserialize, Serialize};

use crate::blob::{BlobRef, Payload};
use crate::codec::{self, Kind};
use crate::error::CodecError;
pub use crate::key::InstanceKey;

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
    /// The flow failed ([`Record::failing`] says why) and its registered compensations are
    /// running, last registered first; the one in flight is [`Record::pending`].
    Compensating,
}

impl Status {
    /// Whether the instance will never run again by itself.
    pub fn is_terminal(&self) -> bool {
        matches!(self, Status::Finished | Status::Failed { .. })
    }

    /// Whether the instance is live: neither ended nor parked.
    pub fn is_active(&self) -> bool {
        matches!(
            self,
            Status::Running | Status::Waiting | Status::Sleeping | Status::Compensating
        )
    }

    /// Whether a driver call is in flight: the engine loads such instances at start-up to
    /// send the call again. Waiting and sleeping instances are not loaded; an impulse or
    /// their timer brings them back.
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
        }
    }
}

/// The driver call an instance is waiting for.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct PendingCall {
    /// The step that issued the call; with the instance key it is the idempotency key.
    pub seq: u64,
    /// Which linked driver serves it (index in the flow's links).
    pub link: u16,
    /// Which method of that driver.
    pub method: u16,
    /// The encoded call (the driver's call enum, postcard).
    pub call: Bytes,
    /// How many times start-up recovery sent the call again after a restart (a restart
    /// while a call is in flight leaves it unknown whether it ran).
    pub redelivered: u32,
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

/// The record of one instance as the runtime sees it: every payload in memory.
///
/// What is persisted is its [`PlacedRecord`], where payloads above the ladder's inline
/// threshold are references to blobs. (Format 1 of the persisted record had this shape.)
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Record {
    /// The flow version the instance runs under.
    pub flow_version: u32,
    /// Steps taken so far; the last step's number.
    pub seq: u64,
    /// Where the instance stands.
    pub status: Status,
    /// The flow state, encoded with postcard.
    pub state: Bytes,
    /// The call in flight, when [`Status::Running`].
    pub pending: Option<PendingCall>,
    /// The armed timer, when [`Status::Sleeping`] or waiting with a timeout.
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
}

/// The record as flowwire 0.1 persisted it (format 1: everything inline).
#[derive(Deserialize)]
struct RecordV1 {
    flow_version: u32,
    seq: u64,
    status: Status,
    state: Bytes,
    pending: Option<CallV1>,
}

/// A call in flight as formats 1 and 2 persisted it.
#[derive(Deserialize)]
struct CallV1 {
    seq: u64,
    link: u16,
    method: u16,
    call: Bytes,
}

#[derive(Deserialize)]
struct PlacedCallV2 {
    seq: u64,
    link: u16,
    method: u16,
    call: Payload,
}

/// The record as format 2 persisted it (payloads on the ladder, no timers or sagas).
#[derive(Deserialize)]
struct PlacedRecordV2 {
    flow_version: u32,
    seq: u64,
    status: Status,
    state: Payload,
    pending: Option<PlacedCallV2>,
    retired: Vec<Retired>,
    trash: Vec<BlobRef>,
}

/// The record as format 4 persisted it (no fan-out).
#[derive(Deserialize)]
struct PlacedRecordV4 {
    flow_version: u32,
    seq: u64,
    status: Status,
    state: Payload,
    pending: Option<PlacedCall>,
    timer: Option<Timer>,
    compensations: Vec<Compensation>,
    failing: Option<String>,
    correlation: Option<String>,
    retired: Vec<Retired>,
    trash: Vec<BlobRef>,
}

/// The record as format 3 persisted it (no failure reason or correlation key).
#[derive(Deserialize)]
struct PlacedRecordV3 {
    flow_version: u32,
    seq: u64,
    status: Status,
    state: Payload,
    pending: Option<PlacedCall>,
    timer: Option<Timer>,
    compensations: Vec<Compensation>,
    retired: Vec<Retired>,
    trash: Vec<BlobRef>,
}

/// The driver call in flight, as persisted.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct PlacedCall {
    /// The step that issued the call.
    pub seq: u64,
    /// Which linked driver serves it.
    pub link: u16,
    /// Which method of that driver.
    pub method: u16,
    /// The encoded call.
    pub call: Payload,
    /// Times start-up recovery sent it again.
    pub redelivered: u32,
}

/// A blob the record no longer refers to but kept history may: it is deleted once every
/// history entry before step `died` is gone.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Retired {
    /// The first step whose entry no longer refers to the blob.
    pub died: u64,
    /// The blob.
    pub blob: BlobRef,
}

/// The persisted record of one instance: payloads placed on the ladder, and the blobs
/// waiting for garbage collection.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct PlacedRecord {
    /// The flow version the instance runs under.
    pub flow_version: u32,
    /// Steps taken so far.
    pub seq: u64,
    /// Where the instance stands.
    pub status: Status,
    /// The flow state.
    pub state: Payload,
    /// The call in flight.
    pub pending: Option<PlacedCall>,
    /// The armed timer.
    pub timer: Option<Timer>,
    /// Registered compensations.
    pub compensations: Vec<Compensation>,
    /// Why the flow failed, while it compensates.
    pub failing: Option<String>,
    /// The correlation key.
    pub correlation: Option<String>,
    /// The fan-out in flight.
    pub fan: Option<Fan>,
    /// Blobs only kept history refers to (tracked unless history is kept whole).
    pub retired: Vec<Retired>,
    /// Blobs no record or kept history refers to any more, deleted after this record is
    /// committed (deletes are idempotent, so recovery deletes them again).
    pub trash: Vec<BlobRef>,
}

impl PlacedRecord {
    /// Encodes the record of instance `key` in its envelope (its checksum binds `key`),
    /// appending to `out`.
    pub fn encode(&self, key: &InstanceKey, out: &mut Vec<u8>) -> Result<(), CodecError> {
        codec::encode_owned(Kind::Record, key, self, out)
    }

    /// Decodes the record of instance `key` from its envelope (current format, or formats
    /// 1 to 5), refusing more than `limit` bytes, and a record written for another
    /// instance ([`CodecError::Checksum`]).
    pub fn decode(
        bytes: &[u8],
        key: &InstanceKey,
        limit: usize,
    ) -> Result<PlacedRecord, CodecError> {
        let (version, payload) = codec::open_owned(Kind::Record, bytes, key, limit)?;
        match version {
            1 => {
                let r: RecordV1 = codec::decode_raw(payload, limit)?;
                Ok(PlacedRecord {
                    flow_version: r.flow_version,
                    seq: r.seq,
                    status: r.status,
                    state: Payload::Inline(r.state),
                    pending: r.pending.map(|p| PlacedCall {
                        seq: p.seq,
                        link: p.link,
                        method: p.method,
                        call: Payload::Inline(p.call),
                        redelivered: 0,
                    }),
                    timer: None,
                    compensations: Vec::new(),
                    failing: None,
                    correlation: None,
                    fan: None,
                    retired: Vec::new(),
                    trash: Vec::new(),
                })
            }
            2 => {
                let r: PlacedRecordV2 = codec::decode_raw(payload, limit)?;
                Ok(PlacedRecord {
                    flow_version: r.flow_version,
                    seq: r.seq,
                    status: r.status,
                    state: r.state,
                    pending: r.pending.map(|p| PlacedCall {
                        seq: p.seq,
                        link: p.link,
                        method: p.method,
                        call: p.call,
                        redelivered: 0,
                    }),
                    timer: None,
                    compensations: Vec::new(),
                    failing: None,
                    correlation: None,
                    fan: None,
                    retired: r.retired,
                    trash: r.trash,
                })
            }
            3 => {
                let r: PlacedRecordV3 = codec::decode_raw(payload, limit)?;
                Ok(PlacedRecord {
                    flow_version: r.flow_version,
                    seq: r.seq,
                    status: r.status,
                    state: r.state,
                    pending: r.pending,
                    timer: r.timer,
                    compensations: r.compensations,
                    failing: None,
                    correlation: None,
                    fan: None,
                    retired: r.retired,
                    trash: r.trash,
                })
            }
            4 => {
                let r: PlacedRecordV4 = codec::decode_raw(payload, limit)?;
                Ok(PlacedRecord {
                    flow_version: r.flow_version,
                    seq: r.seq,
                    status: r.status,
                    state: r.state,
                    pending: r.pending,
                    timer: r.timer,
                    compensations: r.compensations,
                    failing: r.failing,
                    correlation: r.correlation,
                    fan: None,
                    retired: r.retired,
                    trash: r.trash,
                })
            }
            _ => codec::decode_raw(payload, limit),
        }
    }

    /// The blobs the record itself refers to.
    pub fn live_blobs(&self) -> impl Iterator<Item = &BlobRef> {
        self.state
            .blob()
            .into_iter()
            .chain(self.pending.as_ref().and_then(|p| p.call.blob()))
    }
}

/// What came into a step.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum StepInput {
    /// The instance was started.
    Start,
    /// An impulse was applied.
    Impulse {
        /// Its id (the caller's or a generated one).
        id: String,
        /// The impulse method's name.
        name: String,
    },
    /// A driver call's outcome was applied.
    Outcome {
        /// The step that issued the call.
        call_seq: u64,
        /// Whether the driver's call succeeded (`false` for a driver error or a runtime error).
        ok: bool,
    },
    /// The instance was parked (the step's output says why).
    Park,
    /// Its timer fired.
    Timer {
        /// When it was due, in milliseconds since the Unix epoch.
        due_ms: u64,
    },
    /// Start-up recovery sent the call in flight again (or parked the instance, for a
    /// driver whose policy is `park`), after a restart left unknown whether it ran.
    Redeliver {
        /// The step that issued the call.
        call_seq: u64,
    },
    /// An operator resumed the parked instance.
    Resume,
    /// An operator patched the parked instance's state.
    Patch,
    /// An operator put back the state recorded at an earlier step.
    Rewind {
        /// That step.
        to: u64,
    },
    /// The outcome of one branch of a fan-out was applied.
    BranchOutcome {
        /// The step that issued the fan-out.
        call_seq: u64,
        /// The branch's index.
        branch: u32,
        /// Whether the driver's call succeeded.
        ok: bool,
    },
}

/// What went out of a step.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum StepOutput {
    /// A driver call was issued, or the one in flight was kept.
    Drive {
        /// The step that issued the call.
        call_seq: u64,
        /// The linked driver.
        link: u16,
        /// The driver method.
        method: u16,
    },
    /// The instance waits for an impulse.
    Wait,
    /// The instance finished.
    Finish,
    /// The instance failed.
    Fail {
        /// Why.
        reason: String,
    },
    /// The instance was quarantined.
    Quarantine {
        /// Why.
        reason: String,
    },
    /// The instance sleeps until its timer fires.
    Sleep {
        /// When, in milliseconds since the Unix epoch.
        due_ms: u64,
    },
    /// The instance waits for an impulse, or for its timer, whichever comes first.
    WaitUntil {
        /// When the wait times out, in milliseconds since the Unix epoch.
        due_ms: u64,
    },
    /// A compensation call was issued (the flow failed; it runs its compensations).
    Compensate {
        /// The step that issued the compensation call.
        call_seq: u64,
        /// The step whose drive registered it.
        registered: u64,
        /// The linked driver.
        link: u16,
        /// The driver method.
        method: u16,
    },
    /// A fan-out is in flight (issued at this step, or going on).
    Fan {
        /// The step that issued it.
        call_seq: u64,
        /// Branches whose outcome is applied.
        done: u32,
        /// Branches in all.
        branches: u32,
    },
}

/// One entry of an instance's history: one step.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct HistoryEntry {
    /// The step's number.
    pub seq: u64,
    /// What came in.
    pub input: StepInput,
    /// What went out.
    pub output: StepOutput,
    /// The record version the step wrote.
    pub version: u64,
    /// What came in with the input: the encoded impulse, or the driver's encoded reply.
    pub payload: Option<Payload>,
    /// The state after the step (a snapshot; shares its blob with the record when large).
    pub state: Option<Payload>,
    /// When the step was taken, in milliseconds since the Unix epoch (0: not recorded,
    /// formats 1 and 2).
    pub at_ms: u64,
}

/// A [`HistoryEntry`] borrowed from the step it records, without cloning the step's
/// parts: the one form entries are encoded from (postcard writes a reference as what it
/// refers to, so [`HistoryEntry`] decodes it).
#[derive(Serialize)]
pub(crate) struct HistoryEntryRef<'a> {
    pub seq: u64,
    pub input: &'a StepInput,
    pub output: &'a StepOutput,
    pub version: u64,
    pub payload: Option<&'a Payload>,
    pub state: Option<&'a Payload>,
    pub at_ms: u64,
}

impl HistoryEntryRef<'_> {
    /// Encodes the entry of instance `key` in its envelope, appending to `out`.
    pub(crate) fn encode(&self, key: &InstanceKey, out: &mut Vec<u8>) -> Result<(), CodecError> {
        codec::encode_owned(Kind::History, key, self, out)
    }
}

/// A history entry as format 2 wrote it.
#[derive(Deserialize)]
struct HistoryEntryV2 {
    seq: u64,
    input: StepInput,
    output: StepOutput,
    version: u64,
    payload: Option<Payload>,
    state: Option<Payload>,
}

/// A history entry as flowwire 0.1 wrote it (format 1).
#[derive(Deserialize)]
struct HistoryEntryV1 {
    seq: u64,
    input: StepInput,
    output: StepOutput,
    version: u64,
}

impl HistoryEntry {
    /// Encodes the entry of instance `key` in its envelope (its checksum binds `key`),
    /// appending to `out`.
    pub fn encode(&self, key: &InstanceKey, out: &mut Vec<u8>) -> Result<(), CodecError> {
        // One encoding path: the borrowed form, which sealing uses.
        HistoryEntryRef {
            seq: self.seq,
            input: &self.input,
            output: &self.output,
            version: self.version,
            payload: self.payload.as_ref(),
            state: self.state.as_ref(),
            at_ms: self.at_ms,
        }
        .encode(key, out)
    }

    /// Decodes an entry of instance `key` from its envelope (current format, or formats 1
    /// to 4), refusing an entry written for another instance ([`CodecError::Checksum`]).
    pub fn decode(
        bytes: &[u8],
        key: &InstanceKey,
        limit: usize,
    ) -> Result<HistoryEntry, CodecError> {
        let (version, payload) = codec::open_owned(Kind::History, bytes, key, limit)?;
        match version {
            1 => {
                let h: HistoryEntryV1 = codec::decode_raw(payload, limit)?;
                Ok(HistoryEntry {
                    seq: h.seq,
                    input: h.input,
                    output: h.output,
                    version: h.version,
                    payload: None,
                    state: None,
                    at_ms: 0,
                })
            }
            2 => {
                let h: HistoryEntryV2 = codec::decode_raw(payload, limit)?;
                Ok(HistoryEntry {
                    seq: h.seq,
                    input: h.input,
                    output: h.output,
                    version: h.version,
                    payload: h.payload,
                    state: h.state,
                    at_ms: 0,
                })
            }
            _ => codec::decode_raw(payload, limit),
        }
    }

    /// The blobs the entry refers to.
    pub fn blobs(&self) -> impl Iterator<Item = &BlobRef> {
        self.payload
            .iter()
            .chain(self.state.iter())
            .filter_map(Payload::blob)
    }
}

/// The condition a step write puts on the stored record.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum Expect {
    /// No record may exist (a start).
    Absent,
    /// The stored record must have this version.
    Version(u64),
}

/// One step of one instance before its payloads are placed: what the runtime's core hands
/// to [`Placement::seal`](crate::ladder::Placement::seal).
#[derive(Debug, Clone)]
pub struct Draft {
    /// The instance.
    pub key: InstanceKey,
    /// Compare-and-swap condition on the stored record.
    pub expect: Expect,
    /// The version the new record gets.
    pub version: u64,
    /// The new record.
    pub record: Record,
    /// The impulse id this step applies.
    pub impulse: Option<Arc<str>>,
    /// What came in.
    pub input: StepInput,
    /// What went out.
    pub output: StepOutput,
    /// The input's payload (encoded impulse or reply), for history.
    pub payload: Option<Bytes>,
    /// When the step was taken, in milliseconds since the Unix epoch.
    pub at_ms: u64,
}

/// One step of one instance, as handed to [`InstanceStore::commit`](crate::InstanceStore::commit).
///
/// Serializable: the embedded store logs batches of them (see its write-ahead log).
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct StepWrite {
    /// The instance.
    pub key: InstanceKey,
    /// Compare-and-swap condition on the stored record.
    pub expect: Expect,
    /// The version the new record gets.
    pub version: u64,
    /// The step's number (recorded with an applied impulse id).
    pub seq: u64,
    /// The encoded [`PlacedRecord`] (in its envelope).
    pub record: Bytes,
    /// Whether the instance has a driver call in flight after the step (the store keeps an
    /// index of these "active" instances so that start-up recovery reads only them).
    pub active: bool,
    /// Whether the instance is parked after the step (the store keeps an index of parked
    /// instances for operators).
    pub parked: bool,
    /// The instance's armed timer after the step, when it is due (ms since the Unix
    /// epoch); the store keeps an index by due time.
    pub timer: Option<u64>,
    /// The instance's correlation key after the step (`None` once it ended); the store
    /// keeps an index from `(flow, key)` to instance ids.
    pub correlation: Option<Arc<str>>,
    /// The key the previous record was indexed under, when it differs from
    /// [`StepWrite::correlation`]: the store drops that entry.
    pub uncorrelate: Option<Arc<str>>,
    /// The correlation key of an instance that has ended, set by the steps of an ended
    /// instance: the store keeps it ([`InstanceStore::ended_with_key`](crate::InstanceStore::ended_with_key))
    /// until the instance is deleted, so that an impulse retried by key after the instance
    /// ended is told it was applied rather than that no instance has the key.
    pub ended_key: Option<Arc<str>>,
    /// The impulse id this step applied: the step commits only if the id was never
    /// applied to this instance before.
    pub impulse: Option<Arc<str>>,
    /// The step's history entry: its number and encoded [`HistoryEntry`].
    pub history: Option<(u64, Bytes)>,
    /// Delete the instance's history entries before this step (history retention).
    pub prune_below: Option<u64>,
    /// The writer's fencing token (multi-process mode): a shared store refuses the step
    /// ([`StepResult::Fenced`]) if a higher token was granted for the instance's shard, or
    /// the record was last written with one, so an orchestrator that lost its lease cannot
    /// write after a newer owner took over. `None`: no check (one process owns every
    /// instance).
    pub fence: Option<u64>,
}

/// The fate of one [`StepWrite`] in a committed batch.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum StepResult {
    /// Durably written.
    Committed,
    /// Not written: the stored record's version differs from the expectation.
    Conflict {
        /// The version found (`None`: no record).
        found: Option<u64>,
    },
    /// Not written: the impulse id was already applied, at the given step.
    ImpulseSeen {
        /// The step that applied it.
        seq: u64,
    },
    /// Not written: the record was last written under a higher fencing token (a newer
    /// owner); see [`StepWrite::fence`].
    Fenced {
        /// The token the record carries.
        token: u64,
    },
}

/// A record as read back from a store.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Stored {
    /// Its version (for compare-and-swap).
    pub version: u64,
    /// The encoded [`Record`].
    pub bytes: Bytes,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_borrowed_history_entry_encodes_to_the_bytes_of_the_owned_one() {
        let owned = HistoryEntry {
            seq: 7,
            input: StepInput::Impulse {
                id: "i-1".into(),
                name: "note".into(),
            },
            output: StepOutput::Drive {
                call_seq: 7,
                link: 1,
                method: 2,
            },
            version: 8,
            payload: Some(Payload::Inline(Bytes::from_static(b"reply"))),
            state: Some(Payload::Inline(Bytes::from_static(b"state"))),
            at_ms: 1_700_000_000_000,
        };
        let borrowed = HistoryEntryRef {
            seq: owned.seq,
            input: &owned.input,
            output: &owned.output,
            version: owned.version,
            payload: owned.payload.as_ref(),
            state: owned.state.as_ref(),
            at_ms: owned.at_ms,
        };
        let key = InstanceKey::new("F", "i");
        let (mut a, mut b) = (Vec::new(), Vec::new());
        codec::encode_owned(Kind::History, &key, &owned, &mut a).unwrap(); // serde of the owned struct
        borrowed.encode(&key, &mut b).unwrap();
        assert_eq!(a, b);
        assert_eq!(HistoryEntry::decode(&b, &key, 1 << 20).unwrap(), owned);
    }

    /// Format 3 as it was written (no failure reason, no correlation key).
    #[derive(Serialize)]
    struct Written3 {
        flow_version: u32,
        seq: u64,
        status: Status,
        state: Payload,
        pending: Option<PlacedCall>,
        timer: Option<Timer>,
        compensations: Vec<Compensation>,
        retired: Vec<Retired>,
        trash: Vec<BlobRef>,
    }

    /// Format 4 as it was written (no fan-out).
    #[derive(Serialize)]
    struct Written4 {
        flow_version: u32,
        seq: u64,
        status: Status,
        state: Payload,
        pending: Option<PlacedCall>,
        timer: Option<Timer>,
        compensations: Vec<Compensation>,
        failing: Option<String>,
        correlation: Option<String>,
        retired: Vec<Retired>,
        trash: Vec<BlobRef>,
    }

    #[test]
    fn a_format_4_record_still_decodes() {
        let old = Written4 {
            flow_version: 2,
            seq: 7,
            status: Status::Compensating,
            state: Payload::Inline(Bytes::from_static(b"s")),
            pending: None,
            timer: None,
            compensations: Vec::new(),
            failing: Some("out of stock".into()),
            correlation: Some("A-1".into()),
            retired: Vec::new(),
            trash: Vec::new(),
        };
        let mut buf = Vec::new();
        codec::encode_with_version(Kind::Record, 4, &old, &mut buf).unwrap();
        let r = PlacedRecord::decode(&buf, &InstanceKey::new("F", "i"), 1 << 20).unwrap();
        assert_eq!((r.seq, r.status), (7, Status::Compensating));
        assert_eq!(r.failing.as_deref(), Some("out of stock"));
        assert_eq!(r.correlation.as_deref(), Some("A-1"));
        assert_eq!(r.fan, None);
    }

    #[test]
    fn a_fan_out_round_trips_in_the_current_format() {
        let placed = PlacedRecord {
            flow_version: 1,
            seq: 3,
            status: Status::Running,
            state: Payload::Inline(Bytes::from_static(b"s")),
            pending: None,
            timer: None,
            compensations: Vec::new(),
            failing: None,
            correlation: None,
            fan: Some(Fan {
                seq: 2,
                first: false,
                parallel: 2,
                branches: vec![
                    Branch {
                        link: 1,
                        method: 0,
                        call: Bytes::from_static(b"a"),
                        undo: None,
                        state: BranchState::Done { ok: true },
                    },
                    Branch {
                        link: 1,
                        method: 0,
                        call: Bytes::from_static(b"b"),
                        undo: None,
                        state: BranchState::Sent { redelivered: 1 },
                    },
                ],
            }),
            retired: Vec::new(),
            trash: Vec::new(),
        };
        let mut buf = Vec::new();
        let key = InstanceKey::new("F", "i");
        placed.encode(&key, &mut buf).unwrap();
        let back = PlacedRecord::decode(&buf, &key, 1 << 20).unwrap();
        assert_eq!(back, placed);
        let fan = back.fan.unwrap();
        assert_eq!(fan.done(), 1);
        assert_eq!(fan.in_flight().map(|(i, _)| i).collect::<Vec<_>>(), [1]);
    }

    #[test]
    fn a_format_3_record_still_decodes() {
        let comp = Compensation {
            seq: 2,
            link: 0,
            method: 1,
            call: Bytes::from_static(b"c"),
        };
        let old = Written3 {
            flow_version: 1,
            seq: 4,
            status: Status::Sleeping,
            state: Payload::Inline(Bytes::from_static(b"s")),
            pending: None,
            timer: Some(Timer {
                due_ms: 9,
                spec: TimeSpec::After(5),
            }),
            compensations: vec![comp.clone()],
            retired: Vec::new(),
            trash: Vec::new(),
        };
        let mut buf = Vec::new();
        codec::encode_with_version(Kind::Record, 3, &old, &mut buf).unwrap();
        let r = PlacedRecord::decode(&buf, &InstanceKey::new("F", "i"), 1 << 20).unwrap();
        assert_eq!((r.seq, r.status, r.timer), (4, Status::Sleeping, old.timer));
        assert_eq!(r.compensations, vec![comp]);
        assert_eq!((r.failing, r.correlation), (None, None));
    }

    /// A record with its identity bound in: read under its own key it decodes; under any
    /// other key, or with any header or payload byte changed, it is refused.
    #[test]
    fn a_record_is_refused_under_another_key_or_with_any_byte_changed() {
        let placed = PlacedRecord {
            flow_version: 1,
            seq: 3,
            status: Status::Waiting,
            state: Payload::Inline(Bytes::from_static(b"state")),
            pending: None,
            timer: None,
            compensations: Vec::new(),
            failing: None,
            correlation: None,
            fan: None,
            retired: Vec::new(),
            trash: Vec::new(),
        };
        let key = InstanceKey::new("Order", "a");
        let mut buf = Vec::new();
        placed.encode(&key, &mut buf).unwrap();
        assert_eq!(PlacedRecord::decode(&buf, &key, 1 << 20).unwrap(), placed);
        for other in [
            InstanceKey::new("Order", "b"),
            InstanceKey::new("Order", "a "),
            InstanceKey::new("Orde", "ra"),
            InstanceKey::new("Other", "a"),
        ] {
            let err = PlacedRecord::decode(&buf, &other, 1 << 20).unwrap_err();
            assert!(matches!(err, CodecError::Checksum { .. }), "{other}: {err}");
        }
        for i in 0..buf.len() {
            let mut bad = buf.clone();
            bad[i] ^= 0x01;
            assert!(
                PlacedRecord::decode(&bad, &key, 1 << 20).is_err(),
                "byte {i}"
            );
        }
    }
}
