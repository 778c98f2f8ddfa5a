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
    /// The checksum does not match: the bytes were changed after they were written.
    #[error(
        "checksum mismatch (stored {stored:08x}, computed {computed:08x}): the value is corrupted"
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
