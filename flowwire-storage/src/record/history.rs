//! History: what each step took ([`StepInput`]) and did ([`StepOutput`]), as persisted
//! ([`HistoryEntry`]), with the decoding of older formats.

use serde::{Deserialize, Serialize};

use super::model::ErrorValue;
use crate::blob::{BlobRef, Payload};
use crate::codec::{self, Kind};
use crate::error::CodecError;
use crate::key::InstanceKey;

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
    /// The instance was cancelled (history format 6).
    Cancel {
        /// Why, as the canceller said.
        reason: String,
    },
    /// The instance was started with an impulse applied to its initial state, in one step
    /// (`Engine::start_or_impulse` found no instance; history format 6).
    StartWith {
        /// The impulse's id (the caller's or a generated one).
        id: String,
        /// The impulse method's name.
        name: String,
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
        /// Why, for people.
        reason: String,
        /// The typed failure, when the flow failed with one (history format 6).
        error: Option<ErrorValue>,
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
    /// An attempt of a driver call failed and its policy retries it: the next attempt is
    /// sent when the record's timer fires (history format 6). The failure is the step's
    /// payload: the driver's encoded error reply, or the runtime fault's message.
    Retry {
        /// The step that issued the call.
        call_seq: u64,
        /// The fan-out branch (`None` for a drive or a compensation).
        branch: Option<u32>,
        /// The linked driver.
        link: u16,
        /// The driver method.
        method: u16,
        /// The attempt that failed, from 1.
        attempt: u32,
        /// When the next attempt is due, in milliseconds since the Unix epoch.
        due_ms: u64,
        /// The runtime's fault (a timeout, a panic), or `None` for the driver's own error.
        fault: Option<String>,
    },
    /// The instance ended cancelled (history format 6).
    Cancelled {
        /// Why, as the canceller said.
        reason: String,
    },
    /// The late outcome of a call the instance abandoned when it was cancelled: recorded,
    /// not applied (history format 6). The outcome is the step's payload.
    Abandoned {
        /// The step that issued the call (or fan-out).
        call_seq: u64,
        /// The fan-out branch (`None` for a drive).
        branch: Option<u32>,
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
    pub payload: Option<PayloadRef<'a>>,
    pub state: Option<PayloadRef<'a>>,
    pub at_ms: u64,
}

/// A payload as a history entry refers to it: bytes that stay inline, written as
/// [`Payload::Inline`] is (without being one: see `Placement::seal_into`), or a placed
/// payload.
#[derive(Clone, Copy)]
pub(crate) enum PayloadRef<'a> {
    Inline(&'a bytes::Bytes),
    Placed(&'a Payload),
}

impl Serialize for PayloadRef<'_> {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        match self {
            PayloadRef::Inline(b) => s.serialize_newtype_variant(
                crate::blob::INLINE.0,
                crate::blob::INLINE.1,
                crate::blob::INLINE.2,
                b,
            ),
            PayloadRef::Placed(p) => p.serialize(s),
        }
    }
}

impl HistoryEntryRef<'_> {
    /// Encodes the entry of instance `key` in its envelope, appending to `out`.
    pub(crate) fn encode(&self, key: &InstanceKey, out: &mut Vec<u8>) -> Result<(), CodecError> {
        self.encode_with(key, out, codec::Checksums::Written)
    }

    /// Like [`encode`](Self::encode), its checksum computed now or left for the store
    /// ([`codec::stamp_owned`]).
    pub(crate) fn encode_with(
        &self,
        key: &InstanceKey,
        out: &mut Vec<u8>,
        checksums: codec::Checksums,
    ) -> Result<(), CodecError> {
        // Postcard's bytes, written without serde for the common parts (`direct.rs`).
        codec::encode_owned_by(Kind::History, key, out, checksums, |out| {
            super::direct::history_entry(self, out)
        })
    }
}

/// What went out of a step, as history formats 1 to 5 wrote it (no typed failure, no
/// retries).
#[derive(Deserialize)]
enum StepOutputV5 {
    Drive {
        call_seq: u64,
        link: u16,
        method: u16,
    },
    Wait,
    Finish,
    Fail {
        reason: String,
    },
    Quarantine {
        reason: String,
    },
    Sleep {
        due_ms: u64,
    },
    WaitUntil {
        due_ms: u64,
    },
    Compensate {
        call_seq: u64,
        registered: u64,
        link: u16,
        method: u16,
    },
    Fan {
        call_seq: u64,
        done: u32,
        branches: u32,
    },
}

impl From<StepOutputV5> for StepOutput {
    fn from(o: StepOutputV5) -> Self {
        match o {
            StepOutputV5::Drive {
                call_seq,
                link,
                method,
            } => StepOutput::Drive {
                call_seq,
                link,
                method,
            },
            StepOutputV5::Wait => StepOutput::Wait,
            StepOutputV5::Finish => StepOutput::Finish,
            StepOutputV5::Fail { reason } => StepOutput::Fail {
                reason,
                error: None,
            },
            StepOutputV5::Quarantine { reason } => StepOutput::Quarantine { reason },
            StepOutputV5::Sleep { due_ms } => StepOutput::Sleep { due_ms },
            StepOutputV5::WaitUntil { due_ms } => StepOutput::WaitUntil { due_ms },
            StepOutputV5::Compensate {
                call_seq,
                registered,
                link,
                method,
            } => StepOutput::Compensate {
                call_seq,
                registered,
                link,
                method,
            },
            StepOutputV5::Fan {
                call_seq,
                done,
                branches,
            } => StepOutput::Fan {
                call_seq,
                done,
                branches,
            },
        }
    }
}

/// A history entry as formats 3 to 5 wrote it.
#[derive(Deserialize)]
struct HistoryEntryV5 {
    seq: u64,
    input: StepInput,
    output: StepOutputV5,
    version: u64,
    payload: Option<Payload>,
    state: Option<Payload>,
    at_ms: u64,
}

/// A history entry as format 2 wrote it.
#[derive(Deserialize)]
struct HistoryEntryV2 {
    seq: u64,
    input: StepInput,
    output: StepOutputV5,
    version: u64,
    payload: Option<Payload>,
    state: Option<Payload>,
}

/// A history entry as flowwire 0.1 wrote it (format 1).
#[derive(Deserialize)]
struct HistoryEntryV1 {
    seq: u64,
    input: StepInput,
    output: StepOutputV5,
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
            payload: self.payload.as_ref().map(PayloadRef::Placed),
            state: self.state.as_ref().map(PayloadRef::Placed),
            at_ms: self.at_ms,
        }
        .encode(key, out)
    }

    /// Decodes an entry of instance `key` from its envelope (current format, or formats 1
    /// to 5), refusing an entry written for another instance ([`CodecError::Checksum`]).
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
                    output: h.output.into(),
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
                    output: h.output.into(),
                    version: h.version,
                    payload: h.payload,
                    state: h.state,
                    at_ms: 0,
                })
            }
            3..=5 => {
                let h: HistoryEntryV5 = codec::decode_raw(payload, limit)?;
                Ok(HistoryEntry {
                    seq: h.seq,
                    input: h.input,
                    output: h.output.into(),
                    version: h.version,
                    payload: h.payload,
                    state: h.state,
                    at_ms: h.at_ms,
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
