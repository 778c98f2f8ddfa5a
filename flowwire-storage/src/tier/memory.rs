//! The in-memory tier: a map in this process. For tests and for an engine that keeps
//! everything in memory anyway.

use std::collections::HashMap;
use std::sync::Mutex;

use bytes::Bytes;

use super::{BlobTier, TierError, check_key, concat};
use crate::join::BoxFuture;

/// Blobs in a map in this process's memory.
///
/// ```
/// # tokio::runtime::Builder::new_current_thread().build().unwrap().block_on(async {
/// use flowwire::storage::tier::{BlobTier, MemoryTier, TierExt};
/// let tier = MemoryTier::new();
/// tier.put_bytes("a/1", "hello".into()).await?;
/// assert_eq!(tier.get("a/1", None).await?.as_deref(), Some(&b"hello"[..]));
/// # Ok::<(), flowwire::storage::tier::TierError>(()) }).unwrap();
/// ```
#[derive(Debug, Default)]
pub struct MemoryTier {
    blobs: Mutex<HashMap<String, Bytes>>,
}

impl MemoryTier {
    /// An empty tier.
    pub fn new() -> Self {
        Self::default()
    }

    /// How many blobs it holds.
    pub fn len(&self) -> usize {
        self.map().len()
    }

    /// Whether it holds no blob.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    fn map(&self) -> std::sync::MutexGuard<'_, HashMap<String, Bytes>> {
        // A panic while holding the lock cannot leave the map half-updated (each operation
        // is one insert or remove), so a poisoned lock is safe to reuse.
        self.blobs
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }
}

impl BlobTier for MemoryTier {
    fn put<'a>(&'a self, key: &'a str, parts: &'a [Bytes]) -> BoxFuture<'a, Result<(), TierError>> {
        Box::pin(async move {
            check_key(key)?;
            let value = concat(parts);
            self.map().insert(key.to_string(), value);
            Ok(())
        })
    }

    fn get<'a>(
        &'a self,
        key: &'a str,
        _expect: Option<u64>,
    ) -> BoxFuture<'a, Result<Option<Bytes>, TierError>> {
        Box::pin(async move {
            check_key(key)?;
            Ok(self.map().get(key).cloned())
        })
    }

    fn delete<'a>(&'a self, key: &'a str) -> BoxFuture<'a, Result<(), TierError>> {
        Box::pin(async move {
            check_key(key)?;
            self.map().remove(key);
            Ok(())
        })
    }

    fn is_shared(&self) -> bool {
        false
    }
}
