//! What travels on the bus between processes, encoded with postcard in stream entries and
//! published replies. Each message decodes under the engine's decode limit; a message that
//! does not decode is logged and acknowledged (it can never succeed), never retried forever.

use bytes::Bytes;
use flowwire_storage::bus::RedisBus;
use flowwire_storage::codec;
use flowwire_storage::record::BusSend;
use serde::{Deserialize, Serialize};

use crate::core::Outgoing;
use crate::driver::Fault;
use crate::engine::job::{OutcomeMsg, Receipt};
use crate::error::Error;

/// A driver call, from a shard's owner to the workers of its driver trait.
#[derive(Debug, Serialize, Deserialize)]
pub(crate) struct JobMsg {
    pub flow: String,
    pub shard: u16,
    pub id: String,
    pub seq: u64,
    pub branch: Option<u32>,
    pub method: u16,
    pub redelivered: u32,
    /// Which attempt this is, from 1.
    pub attempt: u32,
    pub call: Bytes,
}

impl JobMsg {
    /// The call's bytes as its stream entry holds them; `None` (logged) if it does not
    /// encode.
    pub(crate) fn encode(&self) -> Option<Bytes> {
        let mut out = Vec::new();
        match codec::encode_raw(self, &mut out) {
            Ok(()) => Some(Bytes::from(out)),
            Err(e) => {
                tracing::error!(flow = %self.flow, id = %self.id, error = %e, "call not encodable");
                None
            }
        }
    }
}

/// The bus messages a shard runner's steps put on the bus in their own commits, when the
/// store carries them (`InstanceStore::carries_sends`: one Redis server): the calls each
/// step dispatches, and the announcement that it ended its instance. Each is then out if
/// and only if its step committed, with no round trip of its own.
#[derive(Debug)]
pub(crate) struct Outbox {
    bus: RedisBus,
    shard: u16,
    /// The channel ended instances are announced on.
    ended: String,
}

impl Outbox {
    pub(crate) fn new(bus: RedisBus, flow: &str, shard: u16) -> Outbox {
        let ended = bus.ended(flow);
        Outbox { bus, shard, ended }
    }

    /// A call to the workers of `driver`, as its stream entry; `None` (logged) if it does
    /// not encode.
    pub(crate) fn call(
        &self,
        flow: &str,
        id: &str,
        out: &Outgoing,
        driver: &str,
    ) -> Option<BusSend> {
        let p = &out.call;
        let msg = JobMsg {
            flow: flow.to_string(),
            shard: self.shard,
            id: id.to_string(),
            seq: p.seq,
            branch: out.branch,
            method: p.method,
            redelivered: p.redelivered,
            attempt: p.attempts.saturating_add(1),
            call: p.call.clone(),
        };
        Some(BusSend::Append {
            stream: self.bus.jobs(driver),
            body: msg.encode()?,
        })
    }

    /// The announcement that instance `id` ended (or was parked), with the record its step
    /// wrote when that is small (see [`announcement`]).
    pub(crate) fn ended(&self, id: &str, record: &[u8]) -> BusSend {
        BusSend::Publish {
            channel: self.ended.clone(),
            body: announcement(id, Some(record)),
        }
    }
}

/// The largest record an announcement carries: every process waiting on the flow
/// receives every announcement, so a larger one is announced by its id alone (and read
/// from the store by whoever waits on it).
pub(crate) const ANNOUNCED_RECORD_MAX: usize = 2048;

/// Marks an announcement that carries its record. An announcement of an id alone is the
/// id's UTF-8 bytes (what earlier versions publish and read), and UTF-8 never holds 0xFF.
const WITH_RECORD: u8 = 0xff;

/// The body announcing that instance `id` ended: with `record` (the encoded record its
/// step committed, so that a waiter need not read it back) when that is at most
/// [`ANNOUNCED_RECORD_MAX`] bytes — `0xFF`, the id's length (`u32`, little-endian), the
/// id, the record — or else the id alone.
pub(crate) fn announcement(id: &str, record: Option<&[u8]>) -> Bytes {
    let Some(record) = record.filter(|r| r.len() <= ANNOUNCED_RECORD_MAX) else {
        return Bytes::copy_from_slice(id.as_bytes());
    };
    let Ok(len) = u32::try_from(id.len()) else {
        return Bytes::copy_from_slice(id.as_bytes());
    };
    let mut body = Vec::with_capacity(5 + id.len() + record.len());
    body.push(WITH_RECORD);
    body.extend_from_slice(&len.to_le_bytes());
    body.extend_from_slice(id.as_bytes());
    body.extend_from_slice(record);
    Bytes::from(body)
}

/// An announcement's id, and the record it carries if any; `None` if it is neither form
/// (its lengths are checked, never trusted).
pub(crate) fn parse_announcement(body: &Bytes) -> Option<(&str, Option<Bytes>)> {
    let Some((&WITH_RECORD, rest)) = body.split_first() else {
        return Some((std::str::from_utf8(body).ok()?, None));
    };
    let (len, rest) = rest.split_first_chunk::<4>()?;
    let len = usize::try_from(u32::from_le_bytes(*len)).ok()?;
    let id = std::str::from_utf8(rest.get(..len)?).ok()?;
    let record = body.slice(5 + len..);
    Some((id, Some(record)))
}

/// A call's outcome, from a worker to the owner of the instance's shard.
#[derive(Debug, Serialize, Deserialize)]
pub(crate) struct OutcomeWire {
    pub id: String,
    pub seq: u64,
    pub branch: Option<u32>,
    pub result: Result<Bytes, Fault>,
    /// The wait before the next attempt, when this one failed and the policy retries it.
    pub retry_ms: Option<u64>,
}

impl OutcomeWire {
    /// The outcome as its shard's runner takes it: `entry` in the outcome stream, or (when
    /// `handed_from` names the call's stream) the call's entry there, settled by the commit.
    pub(crate) fn received(self, entry: String, handed_from: Option<String>) -> OutcomeMsg {
        OutcomeMsg {
            id: self.id.into(),
            seq: self.seq,
            branch: self.branch,
            result: self.result,
            retry_ms: self.retry_ms,
            receipt: Some(Box::new(Receipt {
                entry,
                reply_to: String::new(),
                handoff: None,
                handed_from,
            })),
            back: None,
        }
    }
}

/// A call's outcome handed by its worker to the shard's owner over pub/sub (one Redis
/// server): the commit that applies it settles the call's entry, so nothing is written
/// for the outcome itself. A worker whose outcome nobody received, or whose call no
/// commit settled within a second, writes the outcome to the shard's outcome stream.
#[derive(Debug, Serialize, Deserialize)]
pub(crate) struct Handoff {
    /// The call's stream and its entry there.
    pub jobs: String,
    pub entry: String,
    /// The encoded [`OutcomeWire`].
    pub outcome: Bytes,
}

impl Handoff {
    /// The outcome a handoff's bytes carry, as its shard's runner takes it (settling the
    /// call's entry with its commit); fails if either layer does not decode under `limit`.
    pub(crate) fn open(
        bytes: &[u8],
        limit: usize,
    ) -> Result<OutcomeMsg, flowwire_storage::CodecError> {
        let h = codec::decode_raw::<Handoff>(bytes, limit)?;
        let o = codec::decode_raw::<OutcomeWire>(&h.outcome, limit)?;
        Ok(o.received(h.entry, Some(h.jobs)))
    }
}

/// A request any process may send to a shard's owner.
#[derive(Debug, Serialize, Deserialize)]
pub(crate) struct Request {
    /// Matches the reply to the waiting caller.
    pub req: u64,
    /// The channel of the process waiting.
    pub reply_to: String,
    /// How long the caller waits for the reply (ms), counted on Redis's clock from when
    /// Redis appended the request: an owner that gets it later drops it unapplied, so a
    /// timeout never turns into a late surprise. (No process's own clock is involved.)
    pub timeout_ms: u64,
    pub id: String,
    pub kind: RequestKind,
}

#[derive(Debug, Serialize, Deserialize)]
pub(crate) enum RequestKind {
    Start {
        state: Bytes,
    },
    Impulse {
        impulse_id: String,
        impulse: Bytes,
    },
    Cancel {
        reason: String,
    },
    StartOrImpulse {
        state: Bytes,
        impulse_id: String,
        impulse: Bytes,
    },
}

/// The answer to a [`Request`].
#[derive(Debug, Serialize, Deserialize)]
pub(crate) struct Reply {
    pub req: u64,
    pub result: Result<(), Refusal>,
}

/// Why a request was refused, as much of the error as crosses processes.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub(crate) enum Refusal {
    AlreadyExists,
    ImpulseAlreadyApplied { step: u64 },
    NotFound,
    Ended { status: String },
    Quarantined { reason: String },
    NewerVersion { written: u32, running: u32 },
    Other { message: String },
}

impl Refusal {
    pub(crate) fn of(e: &Error) -> Refusal {
        match e {
            Error::AlreadyExists { .. } => Refusal::AlreadyExists,
            Error::ImpulseAlreadyApplied { step, .. } => {
                Refusal::ImpulseAlreadyApplied { step: *step }
            }
            Error::NotFound { .. } => Refusal::NotFound,
            Error::Ended { status, .. } => Refusal::Ended {
                status: (*status).to_string(),
            },
            Error::Quarantined { reason, .. } => Refusal::Quarantined {
                reason: reason.clone(),
            },
            &Error::NewerVersion {
                written, running, ..
            } => Refusal::NewerVersion { written, running },
            other => Refusal::Other {
                message: other.to_string(),
            },
        }
    }

    /// The error the caller sees.
    pub(crate) fn into_error(self, flow: &'static str, id: &str, impulse_id: &str) -> Error {
        let id = id.to_string();
        match self {
            Refusal::AlreadyExists => Error::AlreadyExists { flow, id },
            Refusal::ImpulseAlreadyApplied { step } => Error::ImpulseAlreadyApplied {
                flow,
                id,
                impulse_id: impulse_id.to_string(),
                step,
            },
            Refusal::NotFound => Error::NotFound { flow, id },
            Refusal::Ended { status } => Error::Ended {
                flow,
                id,
                status: static_status(&status),
            },
            Refusal::Quarantined { reason } => Error::Quarantined { flow, id, reason },
            Refusal::NewerVersion { written, running } => Error::NewerVersion {
                flow,
                id,
                written,
                running,
            },
            Refusal::Other { message } => Error::Remote { flow, id, message },
        }
    }
}

/// The status names an ended instance reports (`Status::name`).
fn static_status(name: &str) -> &'static str {
    match name {
        "finished" => "finished",
        "failed" => "failed",
        "compensating" => "compensating",
        "cancelled" => "cancelled",
        "quarantined" => "quarantined",
        _ => "ended",
    }
}

#[cfg(test)]
mod tests {
    use flowwire_storage::{codec, fuzz};

    use super::{
        ANNOUNCED_RECORD_MAX, JobMsg, OutcomeWire, Refusal, Reply, Request, RequestKind,
        announcement, parse_announcement,
    };
    use crate::driver::Fault;

    /// Every message a process reads off the bus, fuzzed: a hostile or damaged entry is an
    /// error, never a panic, and never more memory than the decode limit allows.
    #[test]
    fn fuzz_every_bus_message() {
        const LIMIT: usize = 1 << 20;
        fn enc<T: serde::Serialize>(value: &T) -> Vec<u8> {
            let mut out = Vec::new();
            codec::encode_raw(value, &mut out).unwrap();
            out
        }
        let job = JobMsg {
            flow: "Order".into(),
            shard: 3,
            id: "o-1".into(),
            seq: 7,
            branch: Some(2),
            method: 1,
            redelivered: 0,
            attempt: 2,
            call: bytes::Bytes::from_static(b"call args"),
        };
        let ok = OutcomeWire {
            id: "o-1".into(),
            seq: 7,
            branch: None,
            result: Ok(bytes::Bytes::from_static(b"reply")),
            retry_ms: None,
        };
        let fault = OutcomeWire {
            id: "o-1".into(),
            seq: 7,
            branch: Some(0),
            result: Err(Fault::Panicked {
                attempts: 3,
                message: "boom".into(),
            }),
            retry_ms: Some(400),
        };
        let start = Request {
            req: 1,
            reply_to: "chan".into(),
            timeout_ms: 30_000,
            id: "o-1".into(),
            kind: RequestKind::Start {
                state: bytes::Bytes::from_static(b"state"),
            },
        };
        let impulse = Request {
            req: 2,
            reply_to: "chan".into(),
            timeout_ms: 0,
            id: "o-1".into(),
            kind: RequestKind::Impulse {
                impulse_id: "i-1".into(),
                impulse: bytes::Bytes::from_static(b"impulse"),
            },
        };
        let cancel = Request {
            req: 3,
            reply_to: "chan".into(),
            timeout_ms: 5_000,
            id: "o-1".into(),
            kind: RequestKind::Cancel {
                reason: "the customer called".into(),
            },
        };
        let reply = Reply {
            req: 2,
            result: Err(Refusal::Quarantined {
                reason: "parked".into(),
            }),
        };
        let seeds = vec![
            enc(&job),
            enc(&ok),
            enc(&fault),
            enc(&start),
            enc(&impulse),
            enc(&cancel),
            enc(&reply),
            announcement("o-1", Some(b"record")).to_vec(),
            announcement("o-1", None).to_vec(),
        ];
        fuzz::run("bus messages", &seeds, fuzz::iterations(20_000), |input| {
            let _ = codec::decode_raw::<JobMsg>(input, LIMIT);
            let _ = codec::decode_raw::<OutcomeWire>(input, LIMIT);
            let _ = codec::decode_raw::<Request>(input, LIMIT);
            let _ = codec::decode_raw::<Reply>(input, LIMIT);
            let body = bytes::Bytes::copy_from_slice(input);
            if let Some((id, record)) = parse_announcement(&body) {
                // What parses is a part of what came, never more.
                assert!(id.len() + record.map_or(0, |r| r.len()) <= input.len());
            }
        });
    }

    #[test]
    fn an_announcement_carries_a_small_record_and_reads_back_in_either_form() {
        let with = announcement("o-1", Some(b"the record"));
        let (id, record) = parse_announcement(&with).unwrap();
        assert_eq!(id, "o-1");
        assert_eq!(record.as_deref(), Some(&b"the record"[..]));
        // An id alone: what earlier versions publish (and a record too large to carry).
        let bare = bytes::Bytes::from_static("ö-2".as_bytes());
        assert_eq!(parse_announcement(&bare), Some(("ö-2", None)));
        let big = vec![7u8; ANNOUNCED_RECORD_MAX + 1];
        let alone = announcement("o-3", Some(&big));
        assert_eq!(&alone[..], b"o-3");
        assert_eq!(parse_announcement(&alone), Some(("o-3", None)));
        // Lengths are checked, not trusted: an id longer than the body, a cut length, an
        // id that is not UTF-8.
        let mut lying = with.to_vec();
        lying[1..5].copy_from_slice(&u32::MAX.to_le_bytes());
        assert_eq!(parse_announcement(&bytes::Bytes::from(lying)), None);
        assert_eq!(
            parse_announcement(&bytes::Bytes::from_static(&[0xff, 1, 0])),
            None
        );
        assert_eq!(
            parse_announcement(&bytes::Bytes::from_static(&[0xff, 1, 0, 0, 0, 0xc3])),
            None
        );
    }
}
