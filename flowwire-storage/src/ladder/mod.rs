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
//! [`Placement::seal`] turns a step's [`Draft`](crate::record::Draft) into the store's
//! [`StepWrite`] and a list of blob puts: payloads below the inline threshold stay in the
//! record, larger ones become [`BlobRef`](crate::BlobRef)s under keys
//! `flow/id/step.role-tag` (`s` state, `c` call, `i` input; a 64-bit tag per write). A
//! state that did not change keeps its blob. The runtime runs the puts, then commits the
//! write, then deletes the step's trash — so a committed record never refers to a blob
//! that is not durable, and a blob is deleted only after no committed record refers to it.
//!
//! # Garbage collection
//! A blob the record stops referring to is *retired* at that step; history entries before
//! that step may still refer to it (their state snapshots share blobs with the record).
//! With [`Retention::Last`], entries older than the window are pruned in the same commit,
//! and retired blobs no kept entry refers to go to the record's trash. With
//! [`Retention::None`] they go at once. With [`Retention::All`] (the default) history keeps
//! every snapshot, so nothing is collected.
//!
//! # The files
//! This one holds the builder, its validation and the [`Placement`] it yields; `seal.rs`
//! seals a step: from its live record when every payload stays inline (most steps: nothing
//! placed, and only [`Persisted::Inline`] kept), or through `placed.rs`, which places its
//! payloads (`place.rs`) and does the retention accounting; `encode.rs` encodes the
//! record and history entry of either; `precut.rs` cuts a
//! step's new blobs and writes their chunks as one pack before the seal, overlapping the
//! two; `io.rs` writes, reads (packs by range), resolves and deletes blobs on their tiers;
//! `keys.rs` makes blob keys.

mod encode;
mod io;
mod keys;
mod place;
mod placed;
mod precut;
mod seal;

use crate::codec::Checksums;
use crate::record::{Persisted, StepWrite};
use crate::tier::Tier;
use bytes::Bytes;
use std::collections::HashMap;
use std::fmt::{self, Write as _};
use std::sync::Arc;

pub use self::keys::blob_key;
pub use self::precut::{Precut, Written};

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
/// use flowwire::storage::{Ladder, LadderError, Tier, KIB, MB};
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
    chunk_from: usize,
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
            chunk_from: MIB,
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

    /// Payloads of at least `bytes` that go to a tier are stored as content-defined chunks
    /// (of the tier's [`Tier::chunk_size`]) under content-addressed keys, so a step that changes a few
    /// bytes of a large state writes the chunks it changed and a small manifest, and history
    /// shares every unchanged chunk (see [`crate::chunk`]). Default: 1 MiB; `usize::MAX`
    /// stores every payload as one blob.
    ///
    /// ```
    /// use flowwire::storage::{Ladder, Tier, MIB};
    /// let dir = tempfile::tempdir().unwrap();
    /// let ladder = Ladder::new().chunk_from(4 * MIB).default_to(Tier::fs(dir.path()));
    /// assert!(ladder.validate(64 * MIB).is_ok());
    /// ```
    #[must_use]
    pub fn chunk_from(mut self, bytes: usize) -> Self {
        self.chunk_from = bytes;
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
            return Ok(Placement::new(
                usize::MAX,
                usize::MAX,
                Vec::new(),
                None,
                record_limit,
            ));
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
            self.chunk_from,
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
    chunk_from: usize,
    rungs: Vec<(usize, Tier)>,
    default: Option<Tier>,
    by_name: HashMap<Arc<str>, Tier>,
    record_limit: usize,
    checksums: Checksums,
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
    /// Its bytes, in parts: a blob's header and body, or the chunks of a pack.
    pub parts: Vec<Bytes>,
}

/// A step with its payloads placed.
#[derive(Debug)]
pub struct Sealed {
    /// What the store commits.
    pub write: StepWrite,
    /// The persisted form of the new record (the next step's `prev`).
    pub placed: Persisted,
    /// Blobs to write, durably, before the commit.
    pub puts: Vec<Put>,
    /// Its state and input as placed, when either is in chunks: what a retry of the step
    /// may refer to if its commit fails after its blobs were written ([`Reuse::attempt`]).
    pub attempt: Option<Attempt>,
}

/// What [`Placement::seal_into`] leaves with its caller: the step's write and placed
/// record went to the caller's vectors.
#[derive(Debug)]
pub struct SealedRest {
    /// Blobs to write, durably, before the commit.
    pub puts: Vec<Put>,
    /// As [`Sealed::attempt`].
    pub attempt: Option<Attempt>,
}

/// The payloads of a step whose blobs were written durably and whose commit then failed
/// (or went unanswered): a retry of the same step refers to their chunks instead of
/// writing them again, so a store outage does not leave a pack behind per attempt.
///
/// Safe to refer to while no later commit of the instance has succeeded: no record refers
/// to these chunks (or, if the commit landed after all, the record of this very step
/// does), and chunks are deleted only after a committed record drops them.
#[derive(Debug, Clone)]
pub struct Attempt {
    /// The state as placed.
    pub state: crate::blob::Payload,
    /// The input as placed (`None`: none kept, or inline).
    pub input: Option<crate::blob::Payload>,
}

/// What a step's seal may refer to instead of writing it again.
#[derive(Debug, Clone, Copy, Default)]
pub struct Reuse<'a> {
    /// The chunks the step's precut wrote ([`Placement::cut_and_put`]).
    pub written: Option<&'a Written>,
    /// An earlier attempt of the same step whose commit failed (see [`Attempt`]).
    pub attempt: Option<&'a Attempt>,
}

impl Placement {
    fn new(
        inline_below: usize,
        chunk_from: usize,
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
            chunk_from,
            rungs,
            default,
            by_name,
            record_limit,
            checksums: Checksums::Written,
        }
    }

    /// The same placement, sealing steps whose records and history entries have their
    /// checksums computed as `checksums` says: [`Checksums::OnRead`] only for a store
    /// whose [`checksums_on_read`](crate::InstanceStore::checksums_on_read) is true (the
    /// engine sets it from its store).
    ///
    /// ```
    /// use flowwire::storage::codec::Checksums;
    /// use flowwire::storage::{InstanceStore, Ladder, MemoryStore};
    ///
    /// let store = MemoryStore::new();
    /// let placement = Ladder::inline_only().validate(1 << 20)?;
    /// let placement = if store.checksums_on_read() {
    ///     placement.with_checksums(Checksums::OnRead)
    /// } else {
    ///     placement
    /// };
    /// assert_eq!(placement.checksums(), Checksums::OnRead);
    /// # Ok::<(), flowwire::storage::LadderError>(())
    /// ```
    #[must_use]
    pub fn with_checksums(mut self, checksums: Checksums) -> Self {
        self.checksums = checksums;
        self
    }

    /// When the checksums of the steps this placement seals are computed (see
    /// [`with_checksums`](Self::with_checksums)).
    pub fn checksums(&self) -> Checksums {
        self.checksums
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

    /// The size from which a payload that goes to a tier is chunked.
    pub fn chunk_from(&self) -> usize {
        self.chunk_from
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
}

#[cfg(test)]
mod tests {
    use super::*;

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
