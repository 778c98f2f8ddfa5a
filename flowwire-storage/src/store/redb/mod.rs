//! The embedded, crash-safe default store, on redb.
//! (Long because the `InstanceStore` implementation is one `impl` block; the schema, the
//! batch application, the log and the operator writes are files of their own.)
//!
//! Tables (keys are tuples, so one instance's rows are adjacent):
//!
//! | table | key | value |
//! | --- | --- | --- |
//! | `records` | (flow, id) | (version, enveloped record) |
//! | `active` | (flow, id) | () — the instances start-up recovery loads |
//! | `impulses` | (flow, id, impulse id) | step that applied it |
//! | `history` | (flow, id, step) | enveloped history entry |
//! | `parked` | (flow, id) | () — quarantined instances, for operators |
//! | `timers` | (flow, due ms, id) | () — armed timers by due time |
//! | `timer_of` | (flow, id) | due ms — finds an instance's `timers` row |
//! | `correlated` | (flow, correlation key, id) | () — live instances by correlation key |
//! | `meta` | `"batch"` | the number of the last batch committed |
//!
//! One [`InstanceStore::commit`] is one redb write transaction, made durable by a
//! write-ahead log (`<file>.log`, see the `wal` module): the batch is applied in a
//! transaction, appended to the log and the log synced — one sequential write instead of
//! redb's scattered pages — and then the transaction commits without an fsync of its own.
//! A reader never sees a batch the log does not hold. Every [`CHECKPOINT_BATCHES`]
//! batches (or [`CHECKPOINT_BYTES`] of log), a batch commits to redb durably instead and
//! the log starts over. Opening the store re-applies the logged batches redb does not
//! hold. Blocking calls run on tokio's blocking pool.

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, OnceLock, PoisonError, RwLock};

use bytes::Bytes;
use redb::{Database, ReadableDatabase, ReadableTable};

use super::disk::{Boxed, Disk, Fs};
use super::{BoxFuture, DamagedList, InstanceStore};
use crate::error::StoreError;
use crate::record::{InstanceKey, StepResult, StepWrite, Stored};
use apply::set_timer;
use log::{CHECKPOINT_BATCHES, Log, close, closed_cleanly, commit_logged, recover};
use schema::{
    ACTIVE, CORRELATED, ENDED_KEYS, HISTORY, IMPULSES, PARKED, RECORDS, TIMER_OF, TIMERS,
    create_tables, guard, map_err,
};

mod apply;
mod log;
mod operate;
#[cfg(test)]
mod power_loss;
mod schema;
#[cfg(test)]
mod tests;

/// The embedded store: one redb file and its write-ahead log, crash-safe, one sequential
/// write and one fsync per committed batch.
///
/// A batch is appended to the log ([`RedbStore::log_path`]) and the log synced, then
/// committed to redb without an fsync; every few hundred batches a batch is
/// committed to redb durably and the log starts over. Opening the store re-applies the
/// logged batches that a crash took from redb.
///
/// ```no_run
/// use flowwire::storage::RedbStore;
/// let store = RedbStore::open("./flowwire-data/instances.redb")?;
/// # Ok::<(), flowwire::storage::StoreError>(())
/// ```
#[derive(Debug, Clone)]
pub struct RedbStore {
    inner: Arc<Inner>,
}

/// What every clone of a store shares; dropping the last clone closes the store cleanly.
#[derive(Debug)]
struct Inner {
    path: PathBuf,
    disk: Arc<dyn Disk>,
    cache_bytes: usize,
    checkpoint_batches: u32,
    /// The open database and its log (`None` while opening again failed).
    open: RwLock<Option<Open>>,
    /// Set when redb panicked: its state can no longer be trusted, so every later call
    /// is refused with the reason, until the store is opened again.
    broken: OnceLock<String>,
    /// Why the last commit failed (cleared by one that succeeds).
    fault: Mutex<Option<StoreError>>,
}

/// A database opened and recovered, with its log.
#[derive(Debug)]
struct Open {
    db: Database,
    log: Mutex<Log>,
    /// A write failed half way (redb takes no more, or a logged batch is not in redb): the
    /// next call opens the store again, which recovers it from its log.
    stopped: AtomicBool,
}

impl Drop for Inner {
    fn drop(&mut self) {
        if self.broken.get().is_some() {
            return;
        }
        let open = self.open.get_mut().unwrap_or_else(PoisonError::into_inner);
        let Some(open) = open.as_ref().filter(|o| !o.stopped.load(Ordering::SeqCst)) else {
            return;
        };
        let path = &self.path;
        if let Err(e) = guard(path, || close(&open.db, path, &open.log)) {
            tracing::warn!(store = %path.display(), error = %e, "the store was not closed cleanly; the next open recovers it from its log");
        }
    }
}

impl Inner {
    /// Runs `f` on the open database; a database stopped by a failed write is first
    /// closed and opened again (its integrity checked, the log applied). A write that
    /// stops the database is reported as transient: the next call recovers it.
    fn with<T>(
        &self,
        f: impl FnOnce(&Database, &Mutex<Log>) -> Result<T, StoreError>,
    ) -> Result<T, StoreError> {
        {
            let open = self.open.read().unwrap_or_else(PoisonError::into_inner);
            if let Some(o) = open.as_ref().filter(|o| !o.stopped.load(Ordering::SeqCst)) {
                let r = f(&o.db, &o.log);
                return self.settle(o, r);
            }
        }
        let mut open = self.open.write().unwrap_or_else(PoisonError::into_inner);
        if open
            .as_ref()
            .is_none_or(|o| o.stopped.load(Ordering::SeqCst))
        {
            // Closing first releases the file; a database stopped by a failed write commits
            // nothing more as it closes.
            *open = None;
            let reopened = open_state(
                &*self.disk,
                &self.path,
                self.cache_bytes,
                self.checkpoint_batches,
            )?;
            tracing::info!(store = %self.path.display(), "opened the store again after a failed write");
            *open = Some(reopened);
        }
        let o = open.as_ref().expect("just opened");
        let r = f(&o.db, &o.log);
        self.settle(o, r)
    }

    /// Marks `open` stopped when the call's write failed half way, and tells the caller
    /// the failure is transient: the next call opens the store again.
    fn settle<T>(&self, open: &Open, r: Result<T, StoreError>) -> Result<T, StoreError> {
        let Err(e) = r else {
            return r;
        };
        let failed = open
            .log
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .failed();
        if !failed && !matches!(e, StoreError::Stopped { .. }) {
            return Err(e);
        }
        open.stopped.store(true, Ordering::SeqCst);
        Err(StoreError::unavailable(
            format!(
                "store {} (a write failed half way; the next call opens it again)",
                self.path.display()
            ),
            e,
        ))
    }
}

/// Opens the existing store file at `path`: checks its integrity and recovers it from its
/// log.
fn open_state(
    disk: &dyn Disk,
    path: &Path,
    cache_bytes: usize,
    checkpoint_batches: u32,
) -> Result<Open, StoreError> {
    let mut db = create_db(disk, path, path, cache_bytes)?;
    let log = guard(path, || {
        create_tables(&db, path)?;
        // Every page's checksum, and the allocator state, after a crash and after a clean
        // stop alike: a file damaged while the store was down is refused here, not served
        // (redb checks checksums only when asked). A repair rolls redb back to its previous
        // durable commit, which the log's run then shows.
        let clean = closed_cleanly(&db, path)?;
        let intact = db.check_integrity().map_err(|e| map_err(path, e))?;
        if !intact {
            tracing::warn!(store = %path.display(), clean, "redb repaired the store file");
        }
        recover(&db, disk, path, checkpoint_batches)
    })?;
    Ok(Open {
        db,
        log: Mutex::new(log),
        stopped: AtomicBool::new(false),
    })
}

/// Opens (creating if need be) the redb file at `at`, errors naming `path`.
fn create_db(
    disk: &dyn Disk,
    path: &Path,
    at: &Path,
    cache_bytes: usize,
) -> Result<Database, StoreError> {
    guard(path, || {
        let mut builder = redb::Builder::new();
        builder.set_cache_size(cache_bytes);
        let backend = disk
            .store_backend(at)
            .map_err(|e| StoreError::unavailable(format!("store {}", path.display()), e))?;
        match backend {
            Some(backend) => builder.create_with_backend(Boxed(backend)),
            None => builder.create(at),
        }
        .map_err(|e| map_err(path, e))
    })
}

impl RedbStore {
    /// The page cache a store keeps unless told otherwise: 64 MiB.
    ///
    /// Enough for the B-tree's inner pages and the hot records of a large node; the rest
    /// is read from the operating system's page cache on demand. (redb's own default, 1 GiB,
    /// would make a node holding a million sleeping instances keep all of them resident.)
    pub const DEFAULT_CACHE: usize = 64 * 1024 * 1024;

    /// Opens the store file at `path`, creating it (and its tables) if it does not exist,
    /// with a page cache of [`RedbStore::DEFAULT_CACHE`].
    ///
    /// A file left by a crash is recovered by redb; a damaged file is
    /// [`StoreError::Corrupted`]; a file open in another process is [`StoreError::Locked`].
    pub fn open(path: impl AsRef<Path>) -> Result<Self, StoreError> {
        Self::open_with_cache(path, Self::DEFAULT_CACHE)
    }

    /// Opens the store file at `path` (see [`RedbStore::open`]) with a page cache of
    /// `cache_bytes`: the most memory the store keeps for pages it read or wrote.
    ///
    /// ```no_run
    /// use flowwire::storage::RedbStore;
    /// let store = RedbStore::open_with_cache("./flowwire-data/instances.redb", 256 << 20)?;
    /// # Ok::<(), flowwire::storage::StoreError>(())
    /// ```
    pub fn open_with_cache(path: impl AsRef<Path>, cache_bytes: usize) -> Result<Self, StoreError> {
        Self::open_on(Arc::new(Fs), path.as_ref(), cache_bytes, CHECKPOINT_BATCHES)
    }

    /// Opens the store at `path` on `disk` (the file system, or a simulated disk).
    fn open_on(
        disk: Arc<dyn Disk>,
        path: &Path,
        cache_bytes: usize,
        checkpoint_batches: u32,
    ) -> Result<Self, StoreError> {
        let path = path.to_path_buf();
        let io = |e| StoreError::unavailable(format!("store {}", path.display()), e);
        if !disk.exists(&path).map_err(io)? {
            // A new store is made whole beside its name and renamed into place, so a crash
            // while it is made leaves no half-made store file.
            let mut staged = path.clone().into_os_string();
            staged.push(".new");
            let staged = PathBuf::from(staged);
            disk.remove(&staged).map_err(io)?;
            let db = create_db(&*disk, &path, &staged, cache_bytes)?;
            guard(&path, || create_tables(&db, &path))?;
            drop(db);
            disk.rename(&staged, &path).map_err(io)?;
        }
        let open = open_state(&*disk, &path, cache_bytes, checkpoint_batches)?;
        Ok(Self {
            inner: Arc::new(Inner {
                path,
                disk,
                cache_bytes,
                checkpoint_batches,
                open: RwLock::new(Some(open)),
                broken: OnceLock::new(),
                fault: Mutex::new(None),
            }),
        })
    }

    /// Where the store file lives.
    pub fn path(&self) -> &Path {
        &self.inner.path
    }

    /// Where the write-ahead log of the store file at `path` lives: beside it, named
    /// `<file name>.log`. Back up, move or delete the two together: the log holds the
    /// latest committed batches until the store file holds them durably.
    ///
    /// ```
    /// use std::path::Path;
    /// use flowwire::storage::RedbStore;
    /// let log = RedbStore::log_path(Path::new("data/instances.redb"));
    /// assert_eq!(log, Path::new("data/instances.redb.log"));
    /// ```
    pub fn log_path(path: &Path) -> PathBuf {
        log::log_path(path)
    }

    /// The ids a `(flow, key, id)` index holds under `(flow, key)`, in id order, at most
    /// `limit` (the live and the ended instances by correlation key).
    fn keyed(
        &self,
        index: redb::TableDefinition<'static, (&'static str, &'static str, &'static str), ()>,
        flow: &str,
        key: &str,
        limit: usize,
    ) -> BoxFuture<'static, Result<Vec<Arc<str>>, StoreError>> {
        let (flow, key): (Arc<str>, Arc<str>) = (flow.into(), key.into());
        self.blocking(move |db, path, _| {
            let e = |err: redb::Error| map_err(path, err);
            let txn = db.begin_read().map_err(|x| e(x.into()))?;
            let table = txn.open_table(index).map_err(|x| e(x.into()))?;
            let mut out = Vec::new();
            for row in table
                .range((&*flow, &*key, "")..)
                .map_err(|x| e(x.into()))?
            {
                let (k, _) = row.map_err(|x| e(x.into()))?;
                let (f, ck, id) = k.value();
                if f != &*flow || ck != &*key || out.len() >= limit {
                    break;
                }
                out.push(Arc::from(id));
            }
            Ok(out)
        })
    }

    /// Runs a blocking closure over the database off the async workers.
    fn blocking<T, F>(&self, f: F) -> BoxFuture<'static, Result<T, StoreError>>
    where
        T: Send + 'static,
        F: FnOnce(&Database, &Path, &Mutex<Log>) -> Result<T, StoreError> + Send + 'static,
    {
        let inner = self.inner.clone();
        Box::pin(async move {
            let run = move || {
                let path = &inner.path;
                if let Some(why) = inner.broken.get() {
                    return Err(StoreError::Corrupted {
                        path: path.clone(),
                        detail: why.clone(),
                    });
                }
                let r = guard(path, || inner.with(|db, log| f(db, path, log)));
                if let Err(StoreError::Corrupted { detail, .. }) = &r
                    && detail.starts_with("redb panicked")
                {
                    let _ = inner.broken.set(detail.clone());
                }
                r
            };
            match tokio::task::spawn_blocking(run).await {
                Ok(r) => r,
                Err(e) => Err(StoreError::Backend(format!("store task failed: {e}"))),
            }
        })
    }
}

impl InstanceStore for RedbStore {
    fn commit(
        &self,
        batch: Vec<StepWrite>,
    ) -> BoxFuture<'static, Result<Vec<StepResult>, StoreError>> {
        let inner = self.inner.clone();
        let commit = self.blocking(move |db, path, log| commit_logged(db, path, log, &batch));
        Box::pin(async move {
            // As the caller sees it: a write that stopped the database is transient (the
            // next call opens it again), so the store is degraded, not failed.
            let r = commit.await;
            *inner.fault.lock().unwrap_or_else(PoisonError::into_inner) = r.as_ref().err().cloned();
            r
        })
    }

    fn mark_damaged<'a>(
        &'a self,
        key: &'a InstanceKey,
        reason: Option<&'a str>,
    ) -> BoxFuture<'a, Result<(), StoreError>> {
        let (key, reason) = (key.clone(), reason.map(str::to_string));
        self.blocking(move |db, path, _| operate::mark_damaged(db, path, &key, reason.as_deref()))
    }

    fn damaged<'a>(
        &'a self,
        flow: &'a str,
        after: Option<&'a str>,
        limit: usize,
    ) -> BoxFuture<'a, Result<DamagedList, StoreError>> {
        let (flow, after) = (flow.to_string(), after.map(str::to_string));
        self.blocking(move |db, path, _| operate::damaged(db, path, &flow, after.as_deref(), limit))
    }

    fn delete<'a>(&'a self, key: &'a InstanceKey) -> BoxFuture<'a, Result<(), StoreError>> {
        let key = key.clone();
        self.blocking(move |db, path, _| operate::delete(db, path, &key))
    }

    fn fault(&self) -> Option<StoreError> {
        if let Some(why) = self.inner.broken.get() {
            return Some(StoreError::Corrupted {
                path: self.inner.path.clone(),
                detail: why.clone(),
            });
        }
        self.inner
            .fault
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .clone()
    }

    fn load<'a>(
        &'a self,
        key: &'a InstanceKey,
    ) -> BoxFuture<'a, Result<Option<Stored>, StoreError>> {
        let key = key.clone();
        self.blocking(move |db, path, _| {
            let e = |err: redb::Error| map_err(path, err);
            let txn = db.begin_read().map_err(|x| e(x.into()))?;
            let table = txn.open_table(RECORDS).map_err(|x| e(x.into()))?;
            let found = table
                .get((&*key.flow, &*key.id))
                .map_err(|x| e(x.into()))?
                .map(|g| {
                    let (version, bytes) = g.value();
                    Stored {
                        version,
                        bytes: Bytes::copy_from_slice(bytes),
                    }
                });
            Ok(found)
        })
    }

    fn records<'a>(
        &'a self,
        flow: &'a str,
    ) -> BoxFuture<'a, Result<super::ActiveList, StoreError>> {
        let flow: Arc<str> = flow.into();
        self.blocking(move |db, path, _| {
            let e = |err: redb::Error| map_err(path, err);
            let txn = db.begin_read().map_err(|x| e(x.into()))?;
            let records = txn.open_table(RECORDS).map_err(|x| e(x.into()))?;
            let mut out = Vec::new();
            for row in records.range((&*flow, "")..).map_err(|x| e(x.into()))? {
                let (k, v) = row.map_err(|x| e(x.into()))?;
                let (f, id) = k.value();
                if f != &*flow {
                    break;
                }
                let (version, bytes) = v.value();
                out.push((
                    Arc::from(id),
                    Stored {
                        version,
                        bytes: Bytes::copy_from_slice(bytes),
                    },
                ));
            }
            Ok(out)
        })
    }

    fn active<'a>(&'a self, flow: &'a str) -> BoxFuture<'a, Result<super::ActiveList, StoreError>> {
        let flow: Arc<str> = flow.into();
        self.blocking(move |db, path, _| {
            let e = |err: redb::Error| map_err(path, err);
            let txn = db.begin_read().map_err(|x| e(x.into()))?;
            let active = txn.open_table(ACTIVE).map_err(|x| e(x.into()))?;
            let records = txn.open_table(RECORDS).map_err(|x| e(x.into()))?;
            let mut out = Vec::new();
            for row in active.range((&*flow, "")..).map_err(|x| e(x.into()))? {
                let (k, _) = row.map_err(|x| e(x.into()))?;
                let (f, id) = k.value();
                if f != &*flow {
                    break;
                }
                if let Some(g) = records.get((f, id)).map_err(|x| e(x.into()))? {
                    let (version, bytes) = g.value();
                    out.push((
                        Arc::from(id),
                        Stored {
                            version,
                            bytes: Bytes::copy_from_slice(bytes),
                        },
                    ));
                }
            }
            Ok(out)
        })
    }

    fn history<'a>(
        &'a self,
        key: &'a InstanceKey,
        from: u64,
        limit: usize,
    ) -> BoxFuture<'a, Result<Vec<(u64, Bytes)>, StoreError>> {
        let key = key.clone();
        self.blocking(move |db, path, _| {
            let e = |err: redb::Error| map_err(path, err);
            let txn = db.begin_read().map_err(|x| e(x.into()))?;
            let table = txn.open_table(HISTORY).map_err(|x| e(x.into()))?;
            let (f, id) = (&*key.flow, &*key.id);
            let mut out = Vec::new();
            for row in table
                .range((f, id, from)..=(f, id, u64::MAX))
                .map_err(|x| e(x.into()))?
                .take(limit)
            {
                let (k, v) = row.map_err(|x| e(x.into()))?;
                out.push((k.value().2, Bytes::copy_from_slice(v.value())));
            }
            Ok(out)
        })
    }

    fn impulse_applied<'a>(
        &'a self,
        key: &'a InstanceKey,
        impulse_id: &'a str,
    ) -> BoxFuture<'a, Result<Option<u64>, StoreError>> {
        let key = key.clone();
        let impulse: Arc<str> = impulse_id.into();
        self.blocking(move |db, path, _| {
            let e = |err: redb::Error| map_err(path, err);
            let txn = db.begin_read().map_err(|x| e(x.into()))?;
            let table = txn.open_table(IMPULSES).map_err(|x| e(x.into()))?;
            Ok(table
                .get((&*key.flow, &*key.id, &*impulse))
                .map_err(|x| e(x.into()))?
                .map(|g| g.value()))
        })
    }

    fn due<'a>(
        &'a self,
        flow: &'a str,
        until_ms: u64,
        limit: usize,
    ) -> BoxFuture<'a, Result<super::DueList, StoreError>> {
        let flow: Arc<str> = flow.into();
        self.blocking(move |db, path, _| {
            let e = |err: redb::Error| map_err(path, err);
            let txn = db.begin_read().map_err(|x| e(x.into()))?;
            let table = txn.open_table(TIMERS).map_err(|x| e(x.into()))?;
            let mut out = Vec::new();
            for row in table
                .range((&*flow, 0, "")..(&*flow, until_ms.saturating_add(1), ""))
                .map_err(|x| e(x.into()))?
                .take(limit)
            {
                let (k, _) = row.map_err(|x| e(x.into()))?;
                let (_, due, id) = k.value();
                out.push((Arc::from(id), due));
            }
            Ok(out)
        })
    }

    fn retime<'a>(
        &'a self,
        key: &'a InstanceKey,
        stale: u64,
        actual: Option<u64>,
    ) -> BoxFuture<'a, Result<(), StoreError>> {
        let key = key.clone();
        self.blocking(move |db, path, _| {
            let e = |err: redb::Error| map_err(path, err);
            let txn = db.begin_write().map_err(|x| e(x.into()))?;
            {
                let mut timers = txn.open_table(TIMERS).map_err(|x| e(x.into()))?;
                let mut timer_of = txn.open_table(TIMER_OF).map_err(|x| e(x.into()))?;
                let k = (&*key.flow, &*key.id);
                let now = timer_of.get(k).map_err(|x| e(x.into()))?.map(|g| g.value());
                if now == Some(stale) {
                    set_timer(&mut timers, &mut timer_of, k, actual).map_err(e)?;
                }
            }
            txn.commit().map_err(|x| e(x.into()))
        })
    }

    fn parked<'a>(
        &'a self,
        flow: &'a str,
        after: Option<&'a str>,
        limit: usize,
    ) -> BoxFuture<'a, Result<Vec<Arc<str>>, StoreError>> {
        let flow: Arc<str> = flow.into();
        let after: Option<Arc<str>> = after.map(Arc::from);
        self.blocking(move |db, path, _| {
            let e = |err: redb::Error| map_err(path, err);
            let txn = db.begin_read().map_err(|x| e(x.into()))?;
            let table = txn.open_table(PARKED).map_err(|x| e(x.into()))?;
            let start = after.as_deref().unwrap_or("");
            let mut out = Vec::new();
            for row in table.range((&*flow, start)..).map_err(|x| e(x.into()))? {
                let (k, _) = row.map_err(|x| e(x.into()))?;
                let (f, id) = k.value();
                if f != &*flow || out.len() >= limit {
                    break;
                }
                if after.as_deref() == Some(id) {
                    continue;
                }
                out.push(Arc::from(id));
            }
            Ok(out)
        })
    }

    fn correlated<'a>(
        &'a self,
        flow: &'a str,
        key: &'a str,
        limit: usize,
    ) -> BoxFuture<'a, Result<Vec<Arc<str>>, StoreError>> {
        self.keyed(CORRELATED, flow, key, limit)
    }

    fn ended_with_key<'a>(
        &'a self,
        flow: &'a str,
        key: &'a str,
        limit: usize,
    ) -> BoxFuture<'a, Result<Vec<Arc<str>>, StoreError>> {
        self.keyed(ENDED_KEYS, flow, key, limit)
    }
}
