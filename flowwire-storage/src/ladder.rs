//! The blob ladder: every payload goes to a place chosen by its size.
//!
//! ```text
//!  size:  0 ──────── inline_below ──────── below(n₁, tier₁) ── … ──▶ default_to(tier)
//!         │  in the record  │      on tier₁       │   …    │   on the default tier
//! ```
//!
//! [`Ladder`] is the builder; [`Ladder::validate`] checks it against the record limit and
//! returns a [`Placement`], which the engine uses on every path that carries user data:
//! flow state, driver call arguments, driver replies, impulse payloads and history
//! snapshots.
//!
//! # One step, placed
//! [`Placement::seal`] turns a step's [`Draft`] into the store's [`StepWrite`] and a list of
//! blob puts: payloads below the inline threshold stay in the record, larger ones become
//! [`BlobRef`]s under keys `flow/id/step.role` (`s` state, `c` call, `i` input). A state
//! that did not change keeps its blob. The runtime runs the puts, then commits the write,
//! then deletes the step's trash — so a committed record never refers to a blob that is not
//! durable, and a blob is deleted only after no committed record refers to it.
//!
//! # Garbage collection
//! A blob the record stops referring to is *retired* at that step; history entries before
//! that step may still refer to it (their state snapshots share blobs with the record).
//! With [`Retention::Last`], entries older than the window are pruned in the same commit,
//! and retired blobs no kept entry refers to go to the record's trash. With
//! [`Retention::None`] they go at once. With [`Retention::All`] (the default) history keeps
//! every snapshot, so nothing is collected.

use std::collections::HashMap;
use std::fmt::{self, Write as _};
use std::sync::Arc;

use bytes::Bytes;

use crate::blob::{self, BlobRef, FrameFault, Payload};
use crate::error::BlobError;
use crate::record::{
    Draft, HistoryEntryRef, InstanceKey, PlacedCall, PlacedRecord, Record, Retired, StepWrite,
};
use crate::tier::{BlobTier, Tier, TierError};

/// 1024 bytes.
pub const KIB: usize = 1024;
/// 1024 KiB.
pub const MIB: usize = 1024 * KIB;
/// 1024 MiB.
pub const GIB: usize = 1024 * MIB;
/// 1000 bytes.
pub const KB: usize = 1000;
/// 1000 KB.
pub const MB: usize = 1000 * KB;

/// How much of an instance's history is kept.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Retention {
    /// Every step, for ever (time travel to any step).
    #[default]
    All,
    /// The last `n` steps (`n` ≥ 1); older entries and the blobs only they refer to are
    /// deleted as the instance moves on.
    Last(u64),
    /// No history: payloads that only history would refer to are not even written.
    None,
}

impl Retention {
    /// The lowest step whose entry is kept after step `seq` is committed.
    fn keep_from(self, seq: u64) -> u64 {
        match self {
            Retention::All => 0,
            Retention::Last(n) => (seq + 1).saturating_sub(n.max(1)),
            Retention::None => seq + 1,
        }
    }
}

/// A ladder that breaks a rule, found when the engine is built.
#[derive(Debug, Clone, thiserror::Error, PartialEq, Eq)]
#[non_exhaustive]
pub enum LadderError {
    /// A threshold is zero.
    #[error("ladder rule broken: thresholds must be greater than 0 (`{which}` is 0)")]
    ZeroThreshold {
        /// Which threshold (`inline_below` or `below`).
        which: &'static str,
    },
    /// Thresholds do not increase from rung to rung.
    #[error(
        "ladder rule broken: thresholds must strictly increase, but {next} bytes (for tier `{tier}`) follows {previous} bytes"
    )]
    NotIncreasing {
        /// The threshold before.
        previous: usize,
        /// The offending threshold.
        next: usize,
        /// The tier of the offending rung.
        tier: String,
    },
    /// No tier takes payloads above the last threshold.
    #[error(
        "ladder rule broken: exactly one default tier is needed (`default_to`), none was given"
    )]
    NoDefault,
    /// More than one default tier.
    #[error(
        "ladder rule broken: exactly one default tier is needed (`default_to`), {count} were given"
    )]
    SeveralDefaults {
        /// How many were given.
        count: usize,
    },
    /// The inline threshold lets a record grow past what the engine decodes.
    #[error(
        "ladder rule broken: the inline limit ({inline} bytes) must be at most half the record limit ({limit} bytes), since a record holds the state and a call inline; lower `inline_below` or raise the decode limit"
    )]
    InlineAboveRecordLimit {
        /// The inline threshold.
        inline: usize,
        /// The record (decode) limit.
        limit: usize,
    },
    /// Two tiers share a name (blob references find their tier by name).
    #[error(
        "ladder rule broken: tier names must be unique, `{name}` is used twice; rename one with `Tier::named`"
    )]
    DuplicateTierName {
        /// The name.
        name: String,
    },
    /// `inline_only` combined with tiers.
    #[error("ladder rule broken: an inline-only ladder has no tiers, but `{tier}` was added")]
    InlineOnlyWithTier {
        /// The tier.
        tier: String,
    },
}

/// The ladder builder.
///
/// ```
/// use flowwire_storage::{Ladder, LadderError, Tier, KIB, MB};
/// let dir = tempfile::tempdir().unwrap();
/// let ok = Ladder::new()
///     .inline_below(4 * KIB)
///     .below(MB, Tier::fs(dir.path()))
///     .default_to(Tier::memory());
/// assert!(ok.validate(64 * MB).is_ok());
///
/// let unordered = Ladder::new().inline_below(MB).below(4 * KIB, Tier::fs(dir.path()));
/// assert!(matches!(
///     unordered.default_to(Tier::memory()).validate(64 * MB),
///     Err(LadderError::NotIncreasing { .. })
/// ));
/// ```
#[derive(Debug, Clone)]
pub struct Ladder {
    inline_below: usize,
    inline_only: bool,
    rungs: Vec<(usize, Tier)>,
    defaults: Vec<Tier>,
}

impl Default for Ladder {
    fn default() -> Self {
        Self::new()
    }
}

impl Ladder {
    /// An empty ladder: payloads below 4 KiB inline; add rungs and one default tier.
    pub fn new() -> Self {
        Self {
            inline_below: 4 * KIB,
            inline_only: false,
            rungs: Vec::new(),
            defaults: Vec::new(),
        }
    }

    /// Every payload inline in its record (an in-memory engine, or small states only).
    /// A payload larger than the record limit is then an error.
    pub fn inline_only() -> Self {
        Self {
            inline_only: true,
            ..Self::new()
        }
    }

    /// Payloads smaller than `bytes` live in the record.
    #[must_use]
    pub fn inline_below(mut self, bytes: usize) -> Self {
        self.inline_below = bytes;
        self
    }

    /// Payloads from the previous threshold up to (not including) `bytes` go to `tier`.
    #[must_use]
    pub fn below(mut self, bytes: usize, tier: Tier) -> Self {
        self.rungs.push((bytes, tier));
        self
    }

    /// Payloads above the last threshold go to `tier`.
    #[must_use]
    pub fn default_to(mut self, tier: Tier) -> Self {
        self.defaults.push(tier);
        self
    }

    /// Checks the rules against the engine's record limit and returns the placement.
    pub fn validate(&self, record_limit: usize) -> Result<Placement, LadderError> {
        if self.inline_only {
            if let Some(t) = self.rungs.iter().map(|r| &r.1).chain(&self.defaults).next() {
                return Err(LadderError::InlineOnlyWithTier {
                    tier: t.name().to_string(),
                });
            }
            return Ok(Placement::new(usize::MAX, Vec::new(), None, record_limit));
        }
        if self.inline_below == 0 {
            return Err(LadderError::ZeroThreshold {
                which: "inline_below",
            });
        }
        if self.inline_below > record_limit / 2 {
            return Err(LadderError::InlineAboveRecordLimit {
                inline: self.inline_below,
                limit: record_limit,
            });
        }
        let mut previous = self.inline_below;
        for (bytes, tier) in &self.rungs {
            if *bytes == 0 {
                return Err(LadderError::ZeroThreshold { which: "below" });
            }
            if *bytes <= previous {
                return Err(LadderError::NotIncreasing {
                    previous,
                    next: *bytes,
                    tier: tier.name().to_string(),
                });
            }
            previous = *bytes;
        }
        let default = match self.defaults.as_slice() {
            [] => return Err(LadderError::NoDefault),
            [one] => one.clone(),
            many => return Err(LadderError::SeveralDefaults { count: many.len() }),
        };
        let mut seen: HashMap<&str, &Tier> = HashMap::new();
        for t in self.rungs.iter().map(|r| &r.1).chain(Some(&default)) {
            // One tier may serve several rungs; two different tiers may not share a name.
            match seen.insert(t.name(), t) {
                Some(other) if !other.same(t) => {
                    return Err(LadderError::DuplicateTierName {
                        name: t.name().to_string(),
                    });
                }
                _ => {}
            }
        }
        Ok(Placement::new(
            self.inline_below,
            self.rungs.clone(),
            Some(default),
            record_limit,
        ))
    }
}

/// A validated ladder: where each payload goes, and the blob operations of a step.
#[derive(Clone)]
pub struct Placement {
    inline_below: usize,
    rungs: Vec<(usize, Tier)>,
    default: Option<Tier>,
    by_name: HashMap<Arc<str>, Tier>,
    record_limit: usize,
}

impl fmt::Debug for Placement {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.describe())
    }
}

/// A blob to write before a step's record is committed.
#[derive(Debug, Clone)]
pub struct Put {
    /// The tier.
    pub tier: Tier,
    /// The blob's key.
    pub key: Arc<str>,
    /// Header and body.
    pub parts: [Bytes; 2],
}

/// A step with its payloads placed.
#[derive(Debug)]
pub struct Sealed {
    /// What the store commits.
    pub write: StepWrite,
    /// The persisted form of the new record (the next step's `prev`).
    pub placed: PlacedRecord,
    /// Blobs to write, durably, before the commit.
    pub puts: Vec<Put>,
}

/// Percent-escapes `s` into `out`, so that the result names one path segment: every byte
/// but `[A-Za-z0-9._-]` is escaped, and so is a leading `.` (no segment is `.` or `..`).
fn escape_into(out: &mut String, s: &str) {
    for (i, b) in s.bytes().enumerate() {
        if b.is_ascii_alphanumeric() || matches!(b, b'_' | b'-') || (b == b'.' && i > 0) {
            out.push(b as char);
        } else {
            let _ = write!(out, "%{b:02X}");
        }
    }
}

/// The longest escaped id spelled out in a key; longer (and empty) ids are hashed.
const SPELLED_ID: usize = 120;

/// A unique tag for each blob written by this process: a random 64-bit start (drawn
/// once per process from the operating system's randomness, through std's hasher keys)
/// stepped by an odd constant, so no two writes of one process share a tag and two
/// processes share one with probability 2⁻⁶⁴ per pair.
fn write_tag() -> u64 {
    use std::hash::BuildHasher as _;
    use std::sync::OnceLock;
    use std::sync::atomic::{AtomicU64, Ordering};
    static START: OnceLock<u64> = OnceLock::new();
    static COUNT: AtomicU64 = AtomicU64::new(0);
    let start = *START.get_or_init(|| std::hash::RandomState::new().hash_one(std::process::id()));
    let n = COUNT.fetch_add(1, Ordering::Relaxed);
    start.wrapping_add(n.wrapping_mul(0x9e37_79b9_7f4a_7c15))
}

/// The key of a blob of `role` written at step `seq` of an instance, tagged with `tag`:
/// `flow/id/seq.role-tag`.
///
/// Keys are collision-free by construction: the id is percent-escaped (ids longer than
/// 120 escaped bytes, and the empty id, are named by 128 bits of their BLAKE3 hash and
/// their length, after a `~` no escaped id starts with), and every write has its own tag,
/// so a key a committed record refers to is never written again with other bytes — not
/// by a refused duplicate start, nor by a retried step.
pub fn blob_key(instance: &InstanceKey, seq: u64, role: char, tag: u64) -> String {
    let mut key = String::with_capacity(instance.flow.len() + SPELLED_ID + 48);
    escape_into(&mut key, &instance.flow);
    key.push('/');
    let mark = key.len();
    escape_into(&mut key, &instance.id);
    if key.len() - mark > SPELLED_ID || key.len() == mark {
        key.truncate(mark);
        let hash = blake3::hash(instance.id.as_bytes());
        key.push('~');
        for b in &hash.as_bytes()[..16] {
            let _ = write!(key, "{b:02x}");
        }
        let _ = write!(key, "-{}", instance.id.len());
    }
    let _ = write!(key, "/{seq}.{role}-{tag:016x}");
    key
}

impl Placement {
    fn new(
        inline_below: usize,
        rungs: Vec<(usize, Tier)>,
        default: Option<Tier>,
        record_limit: usize,
    ) -> Self {
        let by_name = rungs
            .iter()
            .map(|r| &r.1)
            .chain(default.as_ref())
            .map(|t| (t.name_arc().clone(), t.clone()))
            .collect();
        Self {
            inline_below,
            rungs,
            default,
            by_name,
            record_limit,
        }
    }

    /// One line for logs: `inline < 4096 B, fs < 1000000 B, s3`.
    pub fn describe(&self) -> String {
        if self.default.is_none() {
            return "inline only".to_string();
        }
        let mut s = format!("inline < {} B", self.inline_below);
        for (b, t) in &self.rungs {
            let _ = write!(s, ", {} < {b} B", t.name());
        }
        if let Some(d) = &self.default {
            let _ = write!(s, ", {}", d.name());
        }
        s
    }

    /// Whether every payload stays in its record.
    pub fn is_inline_only(&self) -> bool {
        self.default.is_none()
    }

    /// The tiers, each once.
    pub fn tiers(&self) -> impl Iterator<Item = &Tier> {
        self.by_name.values()
    }

    /// The tier for a payload of `len` bytes; `None` means inline.
    pub fn tier_for(&self, len: usize) -> Option<&Tier> {
        if len < self.inline_below {
            return None;
        }
        self.rungs
            .iter()
            .find(|(below, _)| len < *below)
            .map(|r| &r.1)
            .or(self.default.as_ref())
    }

    // Blob errors name instance, tier and key (owned strings); the error path is cold.
    #[allow(clippy::result_large_err)]
    /// Places one payload: inline, or a put of a framed blob under `flow/id/seq.role`.
    pub fn place(
        &self,
        instance: &InstanceKey,
        seq: u64,
        role: char,
        bytes: Bytes,
        puts: &mut Vec<Put>,
    ) -> Result<Payload, BlobError> {
        // What the engine could not read back is never written: the write limit is the
        // decode limit.
        if bytes.len() > self.record_limit {
            return Err(BlobError::OverLimit {
                instance: instance.to_string(),
                what: role_name(role),
                len: bytes.len() as u64,
                limit: self.record_limit,
            });
        }
        let Some(tier) = self.tier_for(bytes.len()) else {
            if bytes.len() > self.record_limit / 2 {
                return Err(BlobError::TooLarge {
                    instance: instance.to_string(),
                    len: bytes.len() as u64,
                    limit: self.record_limit,
                });
            }
            return Ok(Payload::Inline(bytes));
        };
        let key: Arc<str> = blob_key(instance, seq, role, write_tag()).into();
        let len = bytes.len() as u64;
        let crc = crc32fast::hash(&bytes);
        puts.push(Put {
            tier: tier.clone(),
            key: key.clone(),
            parts: [blob::header(&key, len, crc), bytes],
        });
        Ok(Payload::Blob(BlobRef {
            tier: tier.name_arc().clone(),
            key,
            len,
            crc,
        }))
    }

    #[allow(clippy::result_large_err)] // as for `place`
    /// Places a step's payloads and builds its write.
    ///
    /// `prev` is the committed record (persisted form and its state bytes), `None` for a
    /// start. `buf` is a reusable encode buffer; the record and the history entry are
    /// carved from `arena`.
    pub fn seal(
        &self,
        draft: &Draft,
        prev: Option<(&PlacedRecord, &Bytes)>,
        retention: Retention,
        buf: &mut Vec<u8>,
        arena: &mut crate::arena::Arena,
    ) -> Result<Sealed, BlobError> {
        // Borrowed, not cloned: only what the placed record and the write keep is copied
        // (reference counts for payloads).
        let Draft {
            key,
            expect,
            version,
            record,
            impulse,
            input,
            output,
            payload,
            at_ms,
        } = draft;
        let seq = record.seq;
        let mut puts = Vec::new();
        let state = match prev {
            Some((p, bytes)) if same_bytes(bytes, &record.state) => p.state.clone(),
            _ => self.place(key, seq, 's', record.state.clone(), &mut puts)?,
        };
        let pending = match &record.pending {
            None => None,
            Some(c) => {
                let kept = prev
                    .and_then(|(p, _)| p.pending.as_ref())
                    .filter(|p| p.seq == c.seq)
                    .map(|p| p.call.clone());
                let call = match kept {
                    Some(call) => call,
                    None => self.place(key, c.seq, 'c', c.call.clone(), &mut puts)?,
                };
                Some(PlacedCall {
                    seq: c.seq,
                    link: c.link,
                    method: c.method,
                    call,
                    redelivered: c.redelivered,
                })
            }
        };
        let keep_history = retention != Retention::None;
        let payload = match payload {
            Some(b) if keep_history => Some(self.place(key, seq, 'i', b.clone(), &mut puts)?),
            _ => None,
        };

        // Blob accounting. A call argument no history entry refers to: once the record
        // drops it, it is garbage. A state the previous record referred to and this one does
        // not is retired at this step (the previous step's snapshot shares it); the input's
        // blob only this step's entry refers to.
        let mut dead: Vec<BlobRef> = Vec::new();
        if let Some((p, _)) = prev
            && let Some(old) = p.pending.as_ref().and_then(|c| c.call.blob())
            && pending.as_ref().and_then(|c| c.call.blob()) != Some(old)
        {
            dead.push(old.clone());
        }
        let mut retired: Vec<Retired> = Vec::new();
        if retention != Retention::All {
            if let Some((p, _)) = prev {
                retired.extend(p.retired.iter().cloned());
                if let Some(old) = p.state.blob()
                    && state.blob() != Some(old)
                {
                    retired.push(Retired {
                        died: seq,
                        blob: old.clone(),
                    });
                }
            }
            if let Some(b) = payload.as_ref().and_then(Payload::blob) {
                retired.push(Retired {
                    died: seq + 1,
                    blob: b.clone(),
                });
            }
        }
        let keep_from = retention.keep_from(seq);
        let (gone, kept): (Vec<Retired>, Vec<Retired>) =
            retired.into_iter().partition(|r| r.died <= keep_from);
        let active = record.status.has_call();
        let parked = matches!(record.status, crate::record::Status::Quarantined { .. });
        let timer = record.timer.map(|t| t.due_ms);
        let correlation: Option<Arc<str>> = record
            .correlation
            .as_deref()
            .filter(|_| !record.status.is_terminal())
            .map(Arc::from);
        let ended_key: Option<Arc<str>> = record
            .correlation
            .as_deref()
            .filter(|_| record.status.is_terminal())
            .map(Arc::from);
        let uncorrelate = prev
            .and_then(|(p, _)| p.correlation.as_deref())
            .filter(|old| correlation.as_deref() != Some(*old))
            .map(Arc::from);
        let placed = PlacedRecord {
            flow_version: record.flow_version,
            seq,
            status: record.status.clone(),
            state,
            pending,
            timer: record.timer,
            compensations: record.compensations.clone(),
            failing: record.failing.clone(),
            correlation: correlation.as_deref().map(str::to_owned),
            fan: record.fan.clone(),
            retired: kept,
            trash: dead
                .into_iter()
                .chain(gone.into_iter().map(|r| r.blob))
                .collect(),
        };
        buf.clear();
        placed.encode(key, buf).map_err(|e| BlobError::Corrupt {
            instance: key.to_string(),
            tier: "record".into(),
            key: key.to_string(),
            detail: e.to_string(),
        })?;
        // The envelope's header is not counted by the decode limit; the payload is.
        let payload_len = buf.len().saturating_sub(crate::codec::HEADER_LEN);
        if payload_len > self.record_limit {
            return Err(BlobError::OverLimit {
                instance: key.to_string(),
                what: "record",
                len: payload_len as u64,
                limit: self.record_limit,
            });
        }
        let record_bytes = arena.copy(buf);
        let history = if keep_history {
            let entry = HistoryEntryRef {
                seq,
                input,
                output,
                version: *version,
                payload: payload.as_ref(),
                state: Some(&placed.state),
                at_ms: *at_ms,
            };
            buf.clear();
            entry.encode(key, buf).map_err(|e| BlobError::Corrupt {
                instance: key.to_string(),
                tier: "history".into(),
                key: key.to_string(),
                detail: e.to_string(),
            })?;
            Some((seq, arena.copy(buf)))
        } else {
            None
        };
        let prune_below = match retention {
            Retention::Last(_) if keep_from > 0 => Some(keep_from),
            _ => None,
        };
        Ok(Sealed {
            write: StepWrite {
                key: key.clone(),
                expect: *expect,
                version: *version,
                seq,
                record: record_bytes,
                active,
                parked,
                timer,
                correlation,
                uncorrelate,
                ended_key,
                impulse: impulse.clone(),
                history,
                prune_below,
                fence: None,
            },
            placed,
            puts,
        })
    }

    /// Writes blobs, all at once; the first failure is returned (the others still finish).
    pub async fn put_all(&self, instance: &InstanceKey, puts: &[Put]) -> Result<(), BlobError> {
        let futs = puts.iter().map(|p| p.tier.put(&p.key, &p.parts));
        let results = crate::join::join_all(futs).await;
        for (p, r) in puts.iter().zip(results) {
            r.map_err(|source| BlobError::Tier {
                instance: instance.to_string(),
                tier: p.tier.name().to_string(),
                key: p.key.to_string(),
                source,
            })?;
        }
        Ok(())
    }

    /// Reads a payload back, checking it against its reference.
    pub async fn fetch(
        &self,
        instance: &InstanceKey,
        payload: &Payload,
    ) -> Result<Bytes, BlobError> {
        let r = match payload {
            Payload::Inline(b) => return Ok(b.clone()),
            Payload::Blob(r) => r,
        };
        let names = || (instance.to_string(), r.tier.to_string(), r.key.to_string());
        let Some(tier) = self.by_name.get(&r.tier) else {
            let (instance, tier, key) = names();
            return Err(BlobError::UnknownTier {
                instance,
                tier,
                key,
            });
        };
        let framed_len = blob::header(&r.key, r.len, r.crc).len() as u64 + r.len;
        let got = tier.get(&r.key, Some(framed_len)).await.map_err(|source| {
            let (instance, tier, key) = names();
            BlobError::Tier {
                instance,
                tier,
                key,
                source,
            }
        })?;
        let Some(framed) = got else {
            let (instance, tier, key) = names();
            return Err(BlobError::Missing {
                instance,
                tier,
                key,
            });
        };
        blob::unframe(framed, r).map_err(|fault| {
            let (instance, tier, key) = names();
            match fault {
                FrameFault::Truncated { expected, found } => BlobError::Truncated {
                    instance,
                    tier,
                    key,
                    expected,
                    found,
                },
                FrameFault::Corrupt(detail) => BlobError::Corrupt {
                    instance,
                    tier,
                    key,
                    detail,
                },
            }
        })
    }

    /// The record with its payloads read back.
    pub async fn resolve(
        &self,
        instance: &InstanceKey,
        placed: &PlacedRecord,
    ) -> Result<Record, BlobError> {
        let state = self.fetch(instance, &placed.state).await?;
        let pending = match &placed.pending {
            None => None,
            Some(c) => Some(crate::record::PendingCall {
                seq: c.seq,
                link: c.link,
                method: c.method,
                call: self.fetch(instance, &c.call).await?,
                redelivered: c.redelivered,
            }),
        };
        Ok(Record {
            flow_version: placed.flow_version,
            seq: placed.seq,
            status: placed.status.clone(),
            state,
            pending,
            timer: placed.timer,
            compensations: placed.compensations.clone(),
            failing: placed.failing.clone(),
            correlation: placed.correlation.clone(),
            fan: placed.fan.clone(),
        })
    }

    /// Deletes blobs (after the record that dropped them is committed). Returns the ones
    /// that could not be deleted now (to try again with a later step).
    pub async fn delete_all(&self, blobs: &[BlobRef]) -> Vec<(BlobRef, TierError)> {
        let mut failed = Vec::new();
        let futs = blobs.iter().map(|b| {
            let tier = self.by_name.get(&b.tier).cloned();
            let key = b.key.clone();
            let fut: crate::join::BoxFuture<'static, Result<(), TierError>> =
                Box::pin(async move {
                    match tier {
                        Some(t) => t.delete(&key).await,
                        None => Ok(()),
                    }
                });
            fut
        });
        for (b, r) in blobs.iter().zip(crate::join::join_all(futs).await) {
            if let Err(e) = r {
                failed.push((b.clone(), e));
            }
        }
        failed
    }
}

/// What a blob role holds, for people.
fn role_name(role: char) -> &'static str {
    match role {
        's' => "state",
        'c' => "driver call",
        'i' => "input (impulse or driver reply)",
        _ => "payload",
    }
}

/// Whether two payloads hold the same bytes: the same buffer (an unchanged state is
/// shared, not copied) answers without comparing them.
fn same_bytes(a: &Bytes, b: &Bytes) -> bool {
    (a.as_ptr() == b.as_ptr() && a.len() == b.len()) || a == b
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keys_escape_ids_and_hash_long_ones() {
        let k = InstanceKey::new("Order", "o 1/ü");
        assert_eq!(
            blob_key(&k, 3, 's', 0xff),
            "Order/o%201%2F%C3%BC/3.s-00000000000000ff"
        );
        crate::tier::check_key(&blob_key(&k, 3, 's', 0)).unwrap();
        let long = InstanceKey::new("Order", "x".repeat(500));
        let key = blob_key(&long, 7, 'c', u64::MAX);
        assert!(key.len() < 80, "{key}");
        crate::tier::check_key(&key).unwrap();
        let empty = InstanceKey::new("Order", "");
        crate::tier::check_key(&blob_key(&empty, 1, 's', 1)).unwrap();
    }

    #[test]
    fn every_id_makes_a_valid_key_of_its_own() {
        let mut seen = std::collections::HashSet::new();
        for id in crate::tier::conformance::awkward_ids() {
            let key = blob_key(&InstanceKey::new("F", id.as_str()), 1, 's', 0);
            crate::tier::check_key(&key).unwrap_or_else(|e| panic!("{id:.40?}: {e}"));
            assert!(seen.insert(key.clone()), "{id:.40?} shares {key}");
        }
    }

    #[test]
    fn ids_that_collide_under_64_bit_fnv_get_keys_of_their_own() {
        // Two 126-byte ids with the same 64-bit FNV-1a hash (16 hex digits found by a rho
        // search in a few minutes, then a common suffix), which the keys of earlier
        // versions shared.
        let (a, b) = ("5cdc38da781222ad", "48cab85938350e17");
        let fnv = |s: &str| {
            s.bytes().fold(0xcbf2_9ce4_8422_2325_u64, |h, b| {
                (h ^ u64::from(b)).wrapping_mul(0x0100_0000_01b3)
            })
        };
        let (a, b) = (
            format!("{a}{}", "s".repeat(110)),
            format!("{b}{}", "s".repeat(110)),
        );
        assert_eq!((a.len(), fnv(&a)), (b.len(), fnv(&b)), "the twins collide");
        let key = |id: &str| blob_key(&InstanceKey::new("F", id), 1, 's', 0);
        assert_ne!(key(&a), key(&b));
    }

    #[test]
    fn each_write_gets_its_own_tag() {
        let tags: std::collections::HashSet<u64> = (0..10_000).map(|_| write_tag()).collect();
        assert_eq!(tags.len(), 10_000);
    }

    #[test]
    fn sizes_pick_their_rung() {
        let p = Ladder::new()
            .inline_below(4 * KIB)
            .below(MB, Tier::memory().named("fast"))
            .default_to(Tier::memory().named("slow"))
            .validate(64 * MB)
            .unwrap();
        assert!(p.tier_for(0).is_none());
        assert!(p.tier_for(4 * KIB - 1).is_none());
        assert_eq!(p.tier_for(4 * KIB).unwrap().name(), "fast");
        assert_eq!(p.tier_for(MB - 1).unwrap().name(), "fast");
        assert_eq!(p.tier_for(MB).unwrap().name(), "slow");
        assert_eq!(p.describe(), "inline < 4096 B, fast < 1000000 B, slow");
    }

    #[test]
    fn every_rule_has_its_error() {
        let t = || Tier::memory();
        let limit = 64 * MB;
        let v = |l: Ladder| l.validate(limit).unwrap_err();
        assert_eq!(
            v(Ladder::new().inline_below(0).default_to(t())),
            LadderError::ZeroThreshold {
                which: "inline_below"
            }
        );
        assert_eq!(
            v(Ladder::new().below(0, t().named("a")).default_to(t())),
            LadderError::ZeroThreshold { which: "below" }
        );
        assert!(matches!(
            v(Ladder::new()
                .below(MB, t().named("a"))
                .below(MB, t().named("b"))
                .default_to(t())),
            LadderError::NotIncreasing { previous, next, .. } if previous == MB && next == MB
        ));
        assert!(matches!(
            v(Ladder::new()
                .inline_below(8 * KIB)
                .below(4 * KIB, t().named("a"))
                .default_to(t())),
            LadderError::NotIncreasing { .. }
        ));
        assert_eq!(v(Ladder::new()), LadderError::NoDefault);
        assert_eq!(
            v(Ladder::new().default_to(t()).default_to(t().named("b"))),
            LadderError::SeveralDefaults { count: 2 }
        );
        assert!(matches!(
            v(Ladder::new().inline_below(limit).default_to(t())),
            LadderError::InlineAboveRecordLimit { .. }
        ));
        assert!(matches!(
            v(Ladder::new().below(MB, t()).default_to(t())),
            LadderError::DuplicateTierName { .. }
        ));
        assert!(matches!(
            v(Ladder::inline_only().default_to(t())),
            LadderError::InlineOnlyWithTier { .. }
        ));
        assert!(Ladder::inline_only().validate(limit).is_ok());
    }
}
