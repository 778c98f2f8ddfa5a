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
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum StoreError {
    /// The store file is damaged and could not be opened or read.
    #[error(
        "the store at {path} is corrupted: {detail}; restore it from a backup or move it aside to start empty"
    )]
    Corrupted {
        /// Where the store lives.
        path: PathBuf,
        /// What the backend reported.
        detail: String,
    },
    /// Another process has the store open.
    #[error(
        "the store at {path} is already open in another process; stop that process or use another data directory"
    )]
    Locked {
        /// Where the store lives.
        path: PathBuf,
    },
    /// A stored value could not be decoded.
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
    /// An I/O or backend error; the operation may be retried.
    #[error("store backend error: {0}")]
    Backend(String),
    /// The store took longer than allowed.
    #[error("store operation timed out after {0:?}")]
    Timeout(std::time::Duration),
}

impl StoreError {
    /// Whether trying again later can succeed (a backend that is unreachable or slow), as
    /// opposed to a damaged or locked store.
    ///
    /// ```
    /// use flowwire_storage::StoreError;
    /// assert!(StoreError::Backend("connection refused".into()).is_transient());
    /// ```
    pub fn is_transient(&self) -> bool {
        matches!(self, StoreError::Backend(_) | StoreError::Timeout(_))
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
        source: crate::tier::TierError,
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
