//! Blob tiers: where payloads too large for the record live.
//!
//! A tier is anything that can put, get and delete bytes by key — the [`BlobTier`] trait,
//! three methods. [`Tier`] is a named, shareable handle on one, with a constructor per
//! backend, which is what the [`Ladder`](crate::Ladder) builder takes:
//!
//! | constructor | backend | shared between processes |
//! | --- | --- | --- |
//! | [`Tier::memory`] | a map in this process (tests) | no |
//! | [`Tier::embedded`] | a redb file | no |
//! | [`Tier::fs`] | a directory on a local disk (fsync + rename) | only if declared |
//! | `Tier::redis` (feature `redis`) | a Redis server or cluster | yes |
//! | `Tier::s3` (feature `s3`) | an S3 bucket (or an S3-compatible server) | yes |
//!
//! Tiers store bytes and nothing else; framing, checksums and placement are the ladder's.
//! The same conformance suite (module `conformance`, with the feature `conformance`) runs
//! against every one of them.

use std::fmt;
use std::sync::Arc;

use bytes::Bytes;

pub use crate::error::TierError;
use crate::join::BoxFuture;

#[cfg(any(test, feature = "conformance"))]
pub mod conformance;
mod embedded;
pub(crate) mod fs;
mod memory;
#[cfg(feature = "redis")]
mod redis;
#[cfg(feature = "s3")]
mod s3;

pub use self::embedded::EmbeddedTier;
pub use self::fs::FsTier;
pub use self::memory::MemoryTier;
#[cfg(feature = "redis")]
pub use self::redis::RedisTier;
#[cfg(feature = "s3")]
pub use self::s3::{S3Config, S3Tier};

/// Longest key a tier must accept.
pub const MAX_KEY_LEN: usize = 200;

/// Checks a key against the rules every tier relies on (safe as a file name, an S3 key and a
/// Redis key, no path traversal).
pub fn check_key(key: &str) -> Result<(), TierError> {
    let bad = |reason| {
        Err(TierError::InvalidKey {
            key: key.chars().take(MAX_KEY_LEN + 8).collect(),
            reason,
        })
    };
    if key.is_empty() {
        return bad("it is empty");
    }
    if key.len() > MAX_KEY_LEN {
        return bad("it is longer than 200 bytes");
    }
    if !key
        .bytes()
        .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'_' | b'-' | b'%' | b'~' | b'/'))
    {
        return bad("it holds a character outside the allowed set");
    }
    if key
        .split('/')
        .any(|seg| seg.is_empty() || seg == "." || seg == "..")
    {
        return bad("it has an empty, `.` or `..` segment");
    }
    Ok(())
}

/// A place that stores blobs by key.
///
/// Implementations must make a completed [`put`](BlobTier::put) durable (as far as the
/// backend is durable) and atomic: a reader sees the old blob or the whole new one, never a
/// part. `get` of a key that was never put (or was deleted) is `Ok(None)`; `delete` of a
/// missing key is `Ok(())`. Every future is cancel-safe: dropping it leaves the key either
/// as it was or fully written.
pub trait BlobTier: Send + Sync + 'static {
    /// Stores the concatenation of `parts` under `key`, replacing any blob there.
    fn put<'a>(&'a self, key: &'a str, parts: &'a [Bytes]) -> BoxFuture<'a, Result<(), TierError>>;

    /// Reads the blob under `key`. `expect` is the length the caller expects, when it knows
    /// it: a tier may use it to size buffers and stop reading one byte past it.
    fn get<'a>(
        &'a self,
        key: &'a str,
        expect: Option<u64>,
    ) -> BoxFuture<'a, Result<Option<Bytes>, TierError>>;

    /// Reads `len` bytes of the blob under `key` from byte `offset`: fewer when the blob
    /// ends first, none from past its end. `Ok(None)` when there is no blob. A chunk in a
    /// pack is read this way; the default reads the whole blob and keeps the range, a tier
    /// that can read a range by itself (a file, Redis, S3) overrides it.
    ///
    /// ```
    /// # tokio::runtime::Builder::new_current_thread().build().unwrap().block_on(async {
    /// use flowwire::storage::tier::{BlobTier, FsTier, TierExt};
    /// let dir = tempfile::tempdir().unwrap();
    /// let tier = FsTier::new(dir.path());
    /// tier.put_bytes("order/o-1/2.sp-1", "0123456789".into()).await?;
    /// let got = tier.get_range("order/o-1/2.sp-1", 6, 10).await?.expect("stored");
    /// assert_eq!(&got[..], b"6789", "fewer bytes where the blob ends");
    /// assert!(tier.get_range("order/o-1/9.sp-1", 0, 1).await?.is_none());
    /// # Ok::<(), flowwire::storage::tier::TierError>(()) }).unwrap();
    /// ```
    fn get_range<'a>(
        &'a self,
        key: &'a str,
        offset: u64,
        len: u64,
    ) -> BoxFuture<'a, Result<Option<Bytes>, TierError>> {
        Box::pin(async move {
            Ok(self.get(key, None).await?.map(|b| {
                let (start, end) = clamp(b.len(), offset, len);
                b.slice(start..end)
            }))
        })
    }

    /// Deletes the blob under `key`, if there is one. Once it returns `Ok`, the deletion
    /// is as durable as the tier's puts: a tier that loses an acknowledged delete in a
    /// crash brings back a blob nothing refers to any more, which then stays for good.
    fn delete<'a>(&'a self, key: &'a str) -> BoxFuture<'a, Result<(), TierError>>;

    /// Whether every process of a deployment sees the same blobs (S3, Redis, a mount that
    /// every node shares). A node-local tier cannot serve several processes.
    fn is_shared(&self) -> bool;
}

/// The part of a blob of `total` bytes that a read of `len` bytes from `offset` covers, as
/// indexes into it.
pub(crate) fn clamp(total: usize, offset: u64, len: u64) -> (usize, usize) {
    let start = usize::try_from(offset).unwrap_or(usize::MAX).min(total);
    let end = usize::try_from(offset.saturating_add(len))
        .unwrap_or(usize::MAX)
        .min(total);
    (start, end)
}

/// Conveniences on every tier.
pub trait TierExt: BlobTier {
    /// Stores one buffer.
    fn put_bytes<'a>(&'a self, key: &'a str, data: Bytes) -> BoxFuture<'a, Result<(), TierError>> {
        Box::pin(async move { self.put(key, std::slice::from_ref(&data)).await })
    }

    /// Reads a blob into a caller-provided buffer (cleared first); `false` if it is absent.
    fn get_into<'a>(
        &'a self,
        key: &'a str,
        buf: &'a mut Vec<u8>,
    ) -> BoxFuture<'a, Result<bool, TierError>> {
        Box::pin(async move {
            buf.clear();
            match self.get(key, None).await? {
                Some(b) => {
                    buf.extend_from_slice(&b);
                    Ok(true)
                }
                None => Ok(false),
            }
        })
    }

    /// Whether a blob exists under `key`.
    fn exists<'a>(&'a self, key: &'a str) -> BoxFuture<'a, Result<bool, TierError>> {
        Box::pin(async move { Ok(self.get(key, None).await?.is_some()) })
    }
}

impl<T: BlobTier + ?Sized> TierExt for T {}

/// A named tier, cheap to clone: what a [`Ladder`](crate::Ladder) is built from.
///
/// The name is recorded in every blob reference, so it must stay the same across restarts
/// (the constructors give `memory`, `embedded`, `fs`, `redis` and `s3`; rename with
/// [`Tier::named`] to use two tiers of one kind).
///
/// ```
/// use flowwire::storage::{Ladder, Tier, KIB, MB};
/// let dir = tempfile::tempdir().unwrap();
/// let ladder = Ladder::new()
///     .inline_below(4 * KIB)
///     .below(MB, Tier::fs(dir.path().join("fast")))
///     .default_to(Tier::fs(dir.path().join("slow")).named("slow"));
/// assert!(ladder.validate(64 * MB).is_ok());
/// ```
#[derive(Clone)]
pub struct Tier {
    name: Arc<str>,
    inner: Arc<dyn BlobTier>,
    kind: &'static str,
    chunk: crate::chunk::ChunkSize,
}

impl fmt::Debug for Tier {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Tier")
            .field("name", &self.name)
            .field("kind", &self.kind)
            .field("shared", &self.inner.is_shared())
            .field("chunk", &self.chunk.avg())
            .finish()
    }
}

impl Tier {
    /// A tier in this process's memory (tests, caches).
    pub fn memory() -> Tier {
        Tier::new("memory", "memory", MemoryTier::new())
    }

    /// A directory on a local (fast) disk. Writes go to a temp file that is fsynced and
    /// renamed into place; blobs are spread over 256 subdirectories.
    pub fn fs(root: impl Into<std::path::PathBuf>) -> Tier {
        Tier::new("fs", "fs", FsTier::new(root))
    }

    /// A directory on a mount that every process of a deployment sees (NFS, a shared
    /// volume): like [`Tier::fs`], but accepted by a multi-process engine, which refuses
    /// node-local tiers.
    pub fn shared_fs(root: impl Into<std::path::PathBuf>) -> Tier {
        Tier::new("fs", "fs", FsTier::new(root).shared())
    }

    /// Whether every process of a deployment sees this tier's blobs (see
    /// [`BlobTier::is_shared`]).
    pub fn is_shared(&self) -> bool {
        self.inner.is_shared()
    }

    /// An embedded redb file holding blobs.
    pub fn embedded(path: impl Into<std::path::PathBuf>) -> Tier {
        Tier::new("embedded", "embedded", EmbeddedTier::new(path))
    }

    /// A Redis server (`redis://127.0.0.1:6379/`) holding blobs under `prefix`.
    #[cfg(feature = "redis")]
    pub fn redis(url: &str, prefix: &str) -> Result<Tier, TierError> {
        Ok(Tier::new("redis", "redis", RedisTier::open(url, prefix)?))
    }

    /// An S3 bucket (or S3-compatible server).
    #[cfg(feature = "s3")]
    pub fn s3(config: S3Config) -> Tier {
        Tier::new("s3", "s3", S3Tier::new(config))
    }

    /// A tier of your own.
    pub fn custom(name: &str, tier: impl BlobTier) -> Tier {
        Tier::new(name, "custom", tier)
    }

    fn new(name: &str, kind: &'static str, tier: impl BlobTier) -> Tier {
        Tier {
            name: name.into(),
            inner: Arc::new(tier),
            kind,
            chunk: if kind == "s3" {
                crate::chunk::ChunkSize::OBJECT_STORE
            } else {
                crate::chunk::ChunkSize::LOCAL
            },
        }
    }

    /// Sets the size the chunks of large payloads on this tier bunch around (rounded to a
    /// power of two between 16 KiB and 16 MiB; see [`Ladder::chunk_from`](crate::Ladder::chunk_from)).
    /// Default: 512 KiB, and 4 MiB on S3, where each chunk is a request. Changing it never
    /// changes what stored payloads read as; only what a new step can share with the last.
    ///
    /// ```
    /// use flowwire::storage::{Tier, MIB};
    /// let dir = tempfile::tempdir().unwrap();
    /// let tier = Tier::fs(dir.path()).chunk_size(MIB);
    /// assert_eq!(tier.chunk_sizes().avg(), MIB);
    /// ```
    #[must_use]
    pub fn chunk_size(mut self, avg: usize) -> Tier {
        self.chunk = crate::chunk::ChunkSize::around(avg);
        self
    }

    /// The sizes large payloads are chunked to on this tier.
    pub fn chunk_sizes(&self) -> crate::chunk::ChunkSize {
        self.chunk
    }

    /// Renames the tier (the name is recorded in blob references).
    #[must_use]
    pub fn named(mut self, name: &str) -> Tier {
        self.name = name.into();
        self
    }

    /// The tier's name.
    pub fn name(&self) -> &str {
        &self.name
    }

    pub(crate) fn name_arc(&self) -> &Arc<str> {
        &self.name
    }

    /// Whether both handles share one backend.
    pub fn same(&self, other: &Tier) -> bool {
        Arc::ptr_eq(&self.inner, &other.inner)
    }

    /// The backend's kind (`memory`, `embedded`, `fs`, `redis`, `s3`, `custom`).
    pub fn kind(&self) -> &'static str {
        self.kind
    }

    /// The tier itself.
    pub fn backend(&self) -> &dyn BlobTier {
        &*self.inner
    }
}

impl BlobTier for Tier {
    fn put<'a>(&'a self, key: &'a str, parts: &'a [Bytes]) -> BoxFuture<'a, Result<(), TierError>> {
        self.inner.put(key, parts)
    }
    fn get<'a>(
        &'a self,
        key: &'a str,
        expect: Option<u64>,
    ) -> BoxFuture<'a, Result<Option<Bytes>, TierError>> {
        self.inner.get(key, expect)
    }
    fn get_range<'a>(
        &'a self,
        key: &'a str,
        offset: u64,
        len: u64,
    ) -> BoxFuture<'a, Result<Option<Bytes>, TierError>> {
        self.inner.get_range(key, offset, len)
    }
    fn delete<'a>(&'a self, key: &'a str) -> BoxFuture<'a, Result<(), TierError>> {
        self.inner.delete(key)
    }
    fn is_shared(&self) -> bool {
        self.inner.is_shared()
    }
}

/// Concatenates parts (for backends that need one contiguous value).
pub(crate) fn concat(parts: &[Bytes]) -> Bytes {
    match parts {
        [] => Bytes::new(),
        [one] => one.clone(),
        many => {
            let mut v = Vec::with_capacity(many.iter().map(Bytes::len).sum());
            for p in many {
                v.extend_from_slice(p);
            }
            Bytes::from(v)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::check_key;

    #[test]
    fn keys_are_checked() {
        assert!(check_key("order/o-1/3.s").is_ok());
        assert!(check_key("a%2Fb").is_ok());
        for bad in [
            "",
            "/abs",
            "a//b",
            "a/../b",
            "a/./b",
            "trailing/",
            "sp ace",
            "ü",
        ] {
            assert!(check_key(bad).is_err(), "{bad:?} accepted");
        }
        assert!(check_key(&"k".repeat(201)).is_err());
    }
}
