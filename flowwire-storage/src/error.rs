//! Errors of the storage layer.

use std::path::PathBuf;

/// A persisted value could not be encoded or decoded.
#[derive(Debug, thiserror::Error, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub enum CodecError {
    /// The bytes do not start with the flowwire magic: they are not a flowwire value.
    #[error("not a flowwire value: the envelope magic is missing (found {found:02x?})")]
    BadMagic {
        /// The first bytes found.
        found: [u8; 2],
    },
    /// The bytes end before the envelope says they do.
    #[error("truncated value: the envelope needs {needed} bytes, {available} are present")]
    Truncated {
        /// Bytes the envelope declares.
        needed: usize,
        /// Bytes present.
        available: usize,
    },
    /// The value is larger than the configured decode limit.
    #[error(
        "value of {size} bytes exceeds the decode limit of {limit} bytes; raise the limit if this is expected"
    )]
    TooLarge {
        /// Declared size.
        size: usize,
        /// The limit in force.
        limit: usize,
    },
    /// The envelope was written by a newer (or unknown) format version.
    #[error(
        "unknown format version {found} for {kind}: this build reads versions up to {supported}; upgrade flowwire"
    )]
    UnknownFormat {
        /// The kind of value.
        kind: &'static str,
        /// Version found in the envelope.
        found: u16,
        /// Newest version this build reads.
        supported: u16,
    },
    /// The envelope names a codec this build does not have.
    #[error("unknown codec id {0}: this build only reads postcard (1)")]
    UnknownCodec(u8),
    /// The envelope holds a different kind of value than expected.
    #[error("expected a {expected} value, found a {found} value")]
    WrongKind {
        /// What the caller asked for.
        expected: &'static str,
        /// What the envelope says.
        found: &'static str,
    },
    /// The checksum does not match: the bytes were changed after they were written, or
    /// (for a value bound to its instance) they are another instance's.
    #[error(
        "checksum mismatch (stored {stored:08x}, computed {computed:08x}): the value is corrupted, or is stored under another instance's key"
    )]
    Checksum {
        /// Checksum in the envelope.
        stored: u32,
        /// Checksum of the bytes present.
        computed: u32,
    },
    /// The payload is not a valid encoding of the expected type.
    #[error("malformed payload: {0}")]
    Malformed(String),
    /// The value could not be serialized.
    #[error("could not encode value: {0}")]
    Encode(String),
}

/// An instance store operation failed.
///
/// Every error is either **transient** ([`StoreError::is_transient`]: a backend that is
/// unreachable, slow or out of space; the engine retries with backoff and the store
/// recovers by itself when the cause goes away) or **permanent** (a damaged, locked or
/// stopped store, or a value that does not decode: what depends on it stops, and
/// `Engine::health` reports it).
#[derive(Debug, Clone, thiserror::Error)]
#[non_exhaustive]
pub enum StoreError {
    /// The store file is damaged and could not be opened or read. Permanent.
    #[error(
        "the store at {path} is corrupted: {detail}; restore it from a backup or move it aside to start empty"
    )]
    Corrupted {
        /// The damaged file.
        path: PathBuf,
        /// What is wrong, and where.
        detail: String,
    },
    /// Another process has the store open. Permanent (for this process).
    #[error(
        "the store at {path} is already open in another process; stop that process or use another data directory"
    )]
    Locked {
        /// Where the store lives.
        path: PathBuf,
    },
    /// A stored value could not be decoded. Permanent.
    #[error("stored {what} for instance {flow}/{id} cannot be read: {source}")]
    Decode {
        /// Flow name of the instance.
        flow: String,
        /// Instance id.
        id: String,
        /// Which value.
        what: &'static str,
        /// Why.
        #[source]
        source: CodecError,
    },
    /// The store takes no more writes until it is opened again (a write failed half way,
    /// and only reopening recovers it). Permanent for the handle that failed; the embedded
    /// store opens itself again on its next call and reports the failure as transient.
    #[error("the store at {path} stopped taking writes until it is opened again: {detail}")]
    Stopped {
        /// Where the store lives.
        path: PathBuf,
        /// Why.
        detail: String,
    },
    /// The store lost its data: its backing server came back empty (a Redis restarted
    /// without persistence, or flushed). Permanent: the instances it held are gone from it.
    #[error(
        "the store lost its data: {detail}; the instances it held are gone from it — restore the server's data from its persistence or a backup (and run Redis with `appendonly yes`), or start over under a new key prefix"
    )]
    Lost {
        /// What showed it.
        detail: String,
    },
    /// The store holds data this build cannot use: written with another key layout or
    /// format generation. Permanent: nothing is read or written, so nothing is mistaken
    /// for empty.
    #[error(
        "the store holds data this build cannot use: {detail}; finish or export its instances with the flowwire that wrote them, or start over under a new key prefix"
    )]
    Incompatible {
        /// What was found, and what this build expects.
        detail: String,
    },
    /// The backend could not be reached or did not do what was asked (an I/O error, a
    /// full disk, a refused connection). Transient: the operation may be retried.
    #[error("{what}: {source}")]
    Unavailable {
        /// What failed.
        what: String,
        /// The backend's error.
        #[source]
        source: std::sync::Arc<dyn std::error::Error + Send + Sync>,
    },
    /// The backend failed in a way it describes only in words. Transient.
    #[error("store backend error: {0}")]
    Backend(String),
    /// The store took longer than allowed. Transient.
    #[error("store operation timed out after {0:?}")]
    Timeout(std::time::Duration),
}

impl StoreError {
    /// Whether trying again later can succeed (a backend that is unreachable, slow or out
    /// of space), as opposed to a damaged, locked or stopped store.
    ///
    /// ```
    /// use flowwire::storage::StoreError;
    /// assert!(StoreError::Backend("connection refused".into()).is_transient());
    /// let damaged = StoreError::Corrupted { path: "s.redb".into(), detail: "a bad page".into() };
    /// assert!(!damaged.is_transient());
    /// ```
    pub fn is_transient(&self) -> bool {
        matches!(
            self,
            StoreError::Backend(_) | StoreError::Unavailable { .. } | StoreError::Timeout(_)
        )
    }

    /// A transient error that keeps `source` as its cause.
    pub fn unavailable(
        what: impl Into<String>,
        source: impl std::error::Error + Send + Sync + 'static,
    ) -> Self {
        StoreError::Unavailable {
            what: what.into(),
            source: std::sync::Arc::new(source),
        }
    }
}

/// A payload could not be placed on its tier or read back from it.
///
/// Every variant names the instance, the tier and the blob key, so an operator can find
/// the blob. [`BlobError::is_transient`] tells whether retrying later can help (the engine
/// does that by itself, with backoff).
#[derive(Debug, thiserror::Error, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub enum BlobError {
    /// The record refers to a blob the tier does not have.
    #[error(
        "blob `{key}` of instance {instance} is missing from tier `{tier}`; restore it from a backup of that tier"
    )]
    Missing {
        /// The instance (`flow/id`).
        instance: String,
        /// The tier's name.
        tier: String,
        /// The blob's key.
        key: String,
    },
    /// The blob does not hold what the record says it holds.
    #[error("blob `{key}` of instance {instance} on tier `{tier}` is corrupt: {detail}")]
    Corrupt {
        /// The instance.
        instance: String,
        /// The tier's name.
        tier: String,
        /// The blob's key.
        key: String,
        /// What does not match.
        detail: String,
    },
    /// The blob is shorter (or longer) than the record says.
    #[error(
        "blob `{key}` of instance {instance} on tier `{tier}` is truncated: {found} bytes where {expected} were written"
    )]
    Truncated {
        /// The instance.
        instance: String,
        /// The tier's name.
        tier: String,
        /// The blob's key.
        key: String,
        /// Bytes written (header and body).
        expected: u64,
        /// Bytes found.
        found: u64,
    },
    /// The record refers to a tier this engine's ladder does not have.
    #[error(
        "instance {instance} refers to blob `{key}` on tier `{tier}`, which this engine's ladder does not have; add the tier back to the ladder"
    )]
    UnknownTier {
        /// The instance.
        instance: String,
        /// The tier's name.
        tier: String,
        /// The blob's key.
        key: String,
    },
    /// The tier failed.
    #[error("tier `{tier}` failed on blob `{key}` of instance {instance}: {source}")]
    Tier {
        /// The instance.
        instance: String,
        /// The tier's name.
        tier: String,
        /// The blob's key.
        key: String,
        /// What the tier reported.
        #[source]
        source: TierError,
    },
    /// A payload is larger than the engine reads back (its decode limit), so it was not
    /// written: the write limit and the decode limit are one setting.
    #[error(
        "the {what} of instance {instance} is {len} bytes, over the {limit}-byte limit of what the engine reads back, so nothing was written; keep it smaller, or raise `EngineBuilder::decode_limit`"
    )]
    OverLimit {
        /// The instance.
        instance: String,
        /// Which payload (`state`, `driver call`, …).
        what: &'static str,
        /// Its size.
        len: u64,
        /// The limit.
        limit: usize,
    },
    /// A payload is too large for the record and the ladder has no tier for it.
    #[error(
        "a payload of {len} bytes of instance {instance} does not fit in its record (limit {limit} bytes) and the ladder has no tier for it; add a tier with `default_to`"
    )]
    TooLarge {
        /// The instance.
        instance: String,
        /// The payload's size.
        len: u64,
        /// The record limit.
        limit: usize,
    },
}

impl BlobError {
    /// Whether the error is a payload over the engine's limit (see [`BlobError::OverLimit`]).
    pub fn is_over_limit(&self) -> bool {
        matches!(self, BlobError::OverLimit { .. })
    }

    /// Whether retrying later may succeed (the tier was unavailable).
    pub fn is_transient(&self) -> bool {
        matches!(self, BlobError::Tier { source, .. } if source.is_transient())
    }
}

/// A blob tier operation failed.
#[derive(Debug, Clone, thiserror::Error, PartialEq, Eq)]
#[non_exhaustive]
pub enum TierError {
    /// The backend cannot be reached or failed transiently (I/O error, connection refused,
    /// timeout, server error). The engine retries with backoff.
    #[error("tier `{tier}` is unavailable: {detail}")]
    Unavailable {
        /// The tier's name.
        tier: String,
        /// What the backend reported.
        detail: String,
    },
    /// The backend refused the operation for good (permission denied, no such bucket);
    /// fix the configuration.
    #[error("tier `{tier}` refused the operation: {detail}; check its configuration")]
    Rejected {
        /// The tier's name.
        tier: String,
        /// What the backend reported.
        detail: String,
    },
    /// The key is not one a tier accepts.
    #[error(
        "invalid blob key {key:?}: {reason} (keys are 1 to 200 bytes of A-Z a-z 0-9 . _ - % ~ in /-separated non-empty segments)"
    )]
    InvalidKey {
        /// The key.
        key: String,
        /// Which rule it breaks.
        reason: &'static str,
    },
}

impl TierError {
    /// Whether retrying later may succeed.
    pub fn is_transient(&self) -> bool {
        matches!(self, TierError::Unavailable { .. })
    }

    pub(crate) fn unavailable(tier: &str, detail: impl std::fmt::Display) -> Self {
        TierError::Unavailable {
            tier: tier.to_string(),
            detail: detail.to_string(),
        }
    }

    pub(crate) fn rejected(tier: &str, detail: impl std::fmt::Display) -> Self {
        TierError::Rejected {
            tier: tier.to_string(),
            detail: detail.to_string(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::{BlobError, CodecError, StoreError, TierError};

    #[test]
    fn every_store_error_is_transient_or_permanent() {
        let io = std::io::Error::from(std::io::ErrorKind::ConnectionRefused);
        let transient = [
            StoreError::Backend("refused".into()),
            StoreError::unavailable("redis", io),
            StoreError::Timeout(std::time::Duration::from_secs(1)),
        ];
        let permanent = [
            StoreError::Corrupted {
                path: "s.redb".into(),
                detail: "x".into(),
            },
            StoreError::Locked {
                path: "s.redb".into(),
            },
            StoreError::Stopped {
                path: "s.redb".into(),
                detail: "x".into(),
            },
            StoreError::Lost { detail: "x".into() },
            StoreError::Decode {
                flow: "F".into(),
                id: "i".into(),
                what: "record",
                source: CodecError::Malformed("x".into()),
            },
        ];
        assert!(transient.iter().all(StoreError::is_transient));
        assert!(!permanent.iter().any(StoreError::is_transient));
    }

    #[test]
    fn a_blob_error_is_transient_only_when_its_tier_was_unavailable() {
        let tier = |source| BlobError::Tier {
            instance: "F/i".into(),
            tier: "s3".into(),
            key: "k".into(),
            source,
        };
        assert!(
            tier(TierError::Unavailable {
                tier: "s3".into(),
                detail: "down".into()
            })
            .is_transient()
        );
        let over = BlobError::OverLimit {
            instance: "F/i".into(),
            what: "state",
            len: 10,
            limit: 5,
        };
        assert!(!over.is_transient() && over.is_over_limit());
    }
}
