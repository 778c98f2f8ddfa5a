//! The persisted record ([`PlacedRecord`]): the logical record with its payloads placed
//! inline or on tiers, bound to its instance in its checksum, and the decoding of every
//! older format.

use bytes::Bytes;
use serde::{Deserialize, Serialize};

use crate::blob::{BlobRef, Payload};
use crate::codec::{self, Checksums, Kind};
use crate::error::CodecError;
use crate::key::InstanceKey;

use super::model::{Branch, BranchState, Compensation, Fan, PendingCall, Record, Status, Timer};

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
    pending: Option<PlacedCallV6>,
    timer: Option<Timer>,
    compensations: Vec<Compensation>,
    failing: Option<String>,
    correlation: Option<String>,
    retired: Vec<Retired>,
    trash: Vec<BlobRef>,
}

/// A call in flight as formats 3 to 6 persisted it (no attempt count).
#[derive(Deserialize)]
struct PlacedCallV6 {
    seq: u64,
    link: u16,
    method: u16,
    call: Payload,
    redelivered: u32,
}

impl PlacedCallV6 {
    fn now(self) -> PlacedCall {
        PlacedCall {
            seq: self.seq,
            link: self.link,
            method: self.method,
            call: self.call,
            redelivered: self.redelivered,
            attempts: 0,
        }
    }
}

/// A fan-out branch as formats 5 and 6 persisted it (no attempt count).
#[derive(Deserialize)]
struct BranchV6 {
    link: u16,
    method: u16,
    call: Bytes,
    undo: Option<Compensation>,
    state: BranchState,
}

/// A fan-out as formats 5 and 6 persisted it.
#[derive(Deserialize)]
struct FanV6 {
    seq: u64,
    first: bool,
    parallel: u32,
    branches: Vec<BranchV6>,
}

impl FanV6 {
    fn now(self) -> Fan {
        Fan {
            seq: self.seq,
            first: self.first,
            parallel: self.parallel,
            branches: self
                .branches
                .into_iter()
                .map(|b| Branch {
                    link: b.link,
                    method: b.method,
                    call: b.call,
                    undo: b.undo,
                    state: b.state,
                    attempts: 0,
                })
                .collect(),
        }
    }
}

/// The record as formats 5 and 6 persisted it (no attempt counts).
#[derive(Deserialize)]
struct PlacedRecordV6 {
    flow_version: u32,
    seq: u64,
    status: Status,
    state: Payload,
    pending: Option<PlacedCallV6>,
    timer: Option<Timer>,
    compensations: Vec<Compensation>,
    failing: Option<String>,
    correlation: Option<String>,
    fan: Option<FanV6>,
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
    pending: Option<PlacedCallV6>,
    timer: Option<Timer>,
    compensations: Vec<Compensation>,
    retired: Vec<Retired>,
    trash: Vec<BlobRef>,
}

/// The driver call in flight, as persisted: its call inline or on the ladder.
pub type PlacedCall = PendingCall<Payload>;

/// A blob the record no longer refers to but kept history may: it is deleted once every
/// history entry before step `died` is gone.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Retired {
    /// The first step whose entry no longer refers to the blob.
    pub died: u64,
    /// The blob.
    pub blob: BlobRef,
}

/// The persisted record of one instance: the record with its payloads placed on the ladder,
/// and the blobs waiting for garbage collection. (Encoded as the record's fields followed
/// by the two lists: the layout formats 5 to 7 share, each adding fields.)
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct PlacedRecord {
    /// The record, payloads placed.
    pub record: Record<Payload>,
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
        self.encode_with(key, out, Checksums::Written)
    }

    /// Like [`encode`](Self::encode), with its checksum computed now or left for the store
    /// to compute when it hands the record out ([`codec::stamp_owned`]).
    pub fn encode_with(
        &self,
        key: &InstanceKey,
        out: &mut Vec<u8>,
        checksums: Checksums,
    ) -> Result<(), CodecError> {
        // Postcard's bytes, written without serde for the common parts (`direct.rs`).
        codec::encode_owned_by(Kind::Record, key, out, checksums, |out| {
            super::direct::placed_record(self, out)
        })
    }

    /// Decodes the record of instance `key` from its envelope (current format, or formats
    /// 1 to 6), refusing more than `limit` bytes, and a record written for another
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
                    record: Record {
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
                            attempts: 0,
                        }),
                        timer: None,
                        compensations: Vec::new(),
                        failing: None,
                        correlation: None,
                        fan: None,
                        error: None,
                        cancel: None,
                    },
                    retired: Vec::new(),
                    trash: Vec::new(),
                })
            }
            2 => {
                let r: PlacedRecordV2 = codec::decode_raw(payload, limit)?;
                Ok(PlacedRecord {
                    record: Record {
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
                            attempts: 0,
                        }),
                        timer: None,
                        compensations: Vec::new(),
                        failing: None,
                        correlation: None,
                        fan: None,
                        error: None,
                        cancel: None,
                    },
                    retired: r.retired,
                    trash: r.trash,
                })
            }
            3 => {
                let r: PlacedRecordV3 = codec::decode_raw(payload, limit)?;
                Ok(PlacedRecord {
                    record: Record {
                        flow_version: r.flow_version,
                        seq: r.seq,
                        status: r.status,
                        state: r.state,
                        pending: r.pending.map(PlacedCallV6::now),
                        timer: r.timer,
                        compensations: r.compensations,
                        failing: None,
                        correlation: None,
                        fan: None,
                        error: None,
                        cancel: None,
                    },
                    retired: r.retired,
                    trash: r.trash,
                })
            }
            4 => {
                let r: PlacedRecordV4 = codec::decode_raw(payload, limit)?;
                Ok(PlacedRecord {
                    record: Record {
                        flow_version: r.flow_version,
                        seq: r.seq,
                        status: r.status,
                        state: r.state,
                        pending: r.pending.map(PlacedCallV6::now),
                        timer: r.timer,
                        compensations: r.compensations,
                        failing: r.failing,
                        correlation: r.correlation,
                        fan: None,
                        error: None,
                        cancel: None,
                    },
                    retired: r.retired,
                    trash: r.trash,
                })
            }
            5 | 6 => {
                let r: PlacedRecordV6 = codec::decode_raw(payload, limit)?;
                Ok(PlacedRecord {
                    record: Record {
                        flow_version: r.flow_version,
                        seq: r.seq,
                        status: r.status,
                        state: r.state,
                        pending: r.pending.map(PlacedCallV6::now),
                        timer: r.timer,
                        compensations: r.compensations,
                        failing: r.failing,
                        correlation: r.correlation,
                        fan: r.fan.map(FanV6::now),
                        error: None,
                        cancel: None,
                    },
                    retired: r.retired,
                    trash: r.trash,
                })
            }
            _ => codec::decode_raw(payload, limit),
        }
    }

    /// The blobs the record itself refers to.
    pub fn live_blobs(&self) -> impl Iterator<Item = &BlobRef> {
        self.record
            .state
            .blob()
            .into_iter()
            .chain(self.record.pending.as_ref().and_then(|p| p.call.blob()))
    }
}
