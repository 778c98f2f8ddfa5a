//! The embedded tier: blobs in a redb file of their own (one fsync per put).

use std::path::PathBuf;
use std::sync::Arc;

use bytes::Bytes;
use redb::{Database, ReadableDatabase, TableDefinition};
use tokio::sync::OnceCell;

use super::{BlobTier, TierError, check_key};
use crate::join::BoxFuture;

const BLOBS: TableDefinition<'_, &str, &[u8]> = TableDefinition::new("blobs");

/// Blobs in an embedded redb file, opened on first use.
///
/// ```
/// # tokio::runtime::Builder::new_multi_thread().build().unwrap().block_on(async {
/// use flowwire::storage::tier::{BlobTier, EmbeddedTier, TierExt};
/// let dir = tempfile::tempdir().unwrap();
/// let tier = EmbeddedTier::new(dir.path().join("blobs.redb"));
/// tier.put_bytes("k", "v".into()).await?;
/// assert!(tier.exists("k").await?);
/// # Ok::<(), flowwire::storage::tier::TierError>(()) }).unwrap();
/// ```
#[derive(Debug, Clone)]
pub struct EmbeddedTier {
    path: Arc<PathBuf>,
    db: Arc<OnceCell<Arc<Database>>>,
}

impl EmbeddedTier {
    /// A tier in the redb file at `path` (created on first use).
    pub fn new(path: impl Into<PathBuf>) -> Self {
        Self {
            path: Arc::new(path.into()),
            db: Arc::new(OnceCell::new()),
        }
    }

    async fn db(&self) -> Result<Arc<Database>, TierError> {
        let path = self.path.clone();
        self.db
            .get_or_try_init(|| async move {
                let opened = tokio::task::spawn_blocking(move || -> Result<Database, String> {
                    if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
                        crate::dirs::create(dir).map_err(|e| e.to_string())?;
                    }
                    let db = Database::create(&*path).map_err(|e| e.to_string())?;
                    let txn = db.begin_write().map_err(|e| e.to_string())?;
                    txn.open_table(BLOBS).map_err(|e| e.to_string())?;
                    txn.commit().map_err(|e| e.to_string())?;
                    // redb makes the file but syncs only its contents: its name is made
                    // durable here, before any put is acknowledged (every open, since a
                    // process killed before this sync leaves a file it did not sync).
                    crate::dirs::sync_parent(&path).map_err(|e| e.to_string())?;
                    Ok(db)
                })
                .await
                .map_err(|e| TierError::unavailable("embedded", e))?;
                opened
                    .map(Arc::new)
                    .map_err(|e| TierError::unavailable("embedded", e))
            })
            .await
            .cloned()
    }

    async fn blocking<T: Send + 'static>(
        &self,
        key: &str,
        f: impl FnOnce(&Database, &str) -> Result<T, redb::Error> + Send + 'static,
    ) -> Result<T, TierError> {
        check_key(key)?;
        let db = self.db().await?;
        let key = key.to_string();
        match tokio::task::spawn_blocking(move || f(&db, &key)).await {
            Ok(r) => r.map_err(|e| TierError::unavailable("embedded", e)),
            Err(e) => Err(TierError::unavailable("embedded", e)),
        }
    }
}

impl BlobTier for EmbeddedTier {
    fn put<'a>(&'a self, key: &'a str, parts: &'a [Bytes]) -> BoxFuture<'a, Result<(), TierError>> {
        let parts = parts.to_vec();
        Box::pin(self.blocking(key, move |db, key| {
            let txn = db.begin_write()?;
            {
                let mut t = txn.open_table(BLOBS)?;
                let len = parts.iter().map(Bytes::len).sum();
                let mut slot = t.insert_reserve(key, len)?;
                let mut at = 0;
                for p in &parts {
                    slot.as_mut()[at..at + p.len()].copy_from_slice(p);
                    at += p.len();
                }
            }
            txn.commit()?;
            Ok(())
        }))
    }

    fn get<'a>(
        &'a self,
        key: &'a str,
        _expect: Option<u64>,
    ) -> BoxFuture<'a, Result<Option<Bytes>, TierError>> {
        Box::pin(self.blocking(key, |db, key| {
            let txn = db.begin_read()?;
            let t = txn.open_table(BLOBS)?;
            Ok(t.get(key)?.map(|g| Bytes::copy_from_slice(g.value())))
        }))
    }

    fn get_range<'a>(
        &'a self,
        key: &'a str,
        offset: u64,
        len: u64,
    ) -> BoxFuture<'a, Result<Option<Bytes>, TierError>> {
        Box::pin(self.blocking(key, move |db, key| {
            let txn = db.begin_read()?;
            let t = txn.open_table(BLOBS)?;
            Ok(t.get(key)?.map(|g| {
                let value = g.value();
                let (start, end) = super::clamp(value.len(), offset, len);
                Bytes::copy_from_slice(&value[start..end])
            }))
        }))
    }

    fn delete<'a>(&'a self, key: &'a str) -> BoxFuture<'a, Result<(), TierError>> {
        Box::pin(self.blocking(key, |db, key| {
            let txn = db.begin_write()?;
            txn.open_table(BLOBS)?.remove(key)?;
            txn.commit()?;
            Ok(())
        }))
    }

    fn is_shared(&self) -> bool {
        false
    }
}
