//! The embedded, crash-safe default store, on redb.
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
use std::sync::{Arc, Mutex, PoisonError};

use bytes::Bytes;
use redb::{Database, Durability, ReadableDatabase, ReadableTable, TableDefinition};

use super::wal::Wal;
use super::{BoxFuture, InstanceStore};
use crate::error::StoreError;
use crate::record::{Expect, InstanceKey, StepResult, StepWrite, Stored};

const RECORDS: TableDefinition<'_, (&str, &str), (u64, &[u8])> = TableDefinition::new("records");
const ACTIVE: TableDefinition<'_, (&str, &str), ()> = TableDefinition::new("active");
const IMPULSES: TableDefinition<'_, (&str, &str, &str), u64> = TableDefinition::new("impulses");
const HISTORY: TableDefinition<'_, (&str, &str, u64), &[u8]> = TableDefinition::new("history");
const PARKED: TableDefinition<'_, (&str, &str), ()> = TableDefinition::new("parked");
const TIMERS: TableDefinition<'_, (&str, u64, &str), ()> = TableDefinition::new("timers");
const TIMER_OF: TableDefinition<'_, (&str, &str), u64> = TableDefinition::new("timer_of");
const CORRELATED: TableDefinition<'_, (&str, &str, &str), ()> = TableDefinition::new("correlated");
const META: TableDefinition<'_, &str, u64> = TableDefinition::new("meta");
/// The `meta` row holding the number of the last batch committed.
const BATCH: &str = "batch";

/// A batch is committed to redb durably (and the log starts over) after this many logged
/// batches…
const CHECKPOINT_BATCHES: u32 = 512;
/// …or once the log holds this many bytes.
const CHECKPOINT_BYTES: u64 = 8 << 20;
/// The format of a logged batch: this byte, then the postcard encoding of the steps.
const LOG_FORMAT: u8 = 1;

/// The embedded store: one redb file and its write-ahead log, crash-safe, one sequential
/// write and one fsync per committed batch.
///
/// A batch is appended to the log ([`RedbStore::log_path`]) and the log synced, then
/// committed to redb without an fsync; every few hundred batches a batch is
/// committed to redb durably and the log starts over. Opening the store re-applies the
/// logged batches that a crash took from redb.
///
/// ```no_run
/// use flowwire_storage::RedbStore;
/// let store = RedbStore::open("./flowwire-data/instances.redb")?;
/// # Ok::<(), flowwire_storage::StoreError>(())
/// ```
#[derive(Debug, Clone)]
pub struct RedbStore {
    db: Arc<Database>,
    path: Arc<PathBuf>,
    log: Arc<Mutex<Log>>,
}

/// The write-ahead log and the numbering of batches (one commit at a time holds it).
#[derive(Debug)]
struct Log {
    wal: Wal,
    /// The number the next batch gets.
    next: u64,
    /// Batches logged since the last durable redb commit.
    since: u32,
    /// A sync of the log failed (the file's state is unknown), or a batch was logged but
    /// not committed to redb: nothing more is committed until the store is opened again,
    /// which recovers from the log.
    failed: bool,
    /// A batch's encoding, reused.
    buf: Vec<u8>,
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
    /// use flowwire_storage::RedbStore;
    /// let store = RedbStore::open_with_cache("./flowwire-data/instances.redb", 256 << 20)?;
    /// # Ok::<(), flowwire_storage::StoreError>(())
    /// ```
    pub fn open_with_cache(path: impl AsRef<Path>, cache_bytes: usize) -> Result<Self, StoreError> {
        let path = path.as_ref().to_path_buf();
        let err_path = path.clone();
        let opened = std::panic::catch_unwind(move || {
            redb::Builder::new()
                .set_cache_size(cache_bytes)
                .create(&err_path)
        });
        let db = match opened {
            Ok(Ok(db)) => db,
            Ok(Err(e)) => return Err(map_err(&path, e)),
            Err(_) => {
                return Err(StoreError::Corrupted {
                    path,
                    detail: "the store could not be opened (its structure is damaged)".into(),
                });
            }
        };
        create_tables(&db, &path)?;
        let log = recover(&db, &path)?;
        Ok(Self {
            db: Arc::new(db),
            path: Arc::new(path),
            log: Arc::new(Mutex::new(log)),
        })
    }

    /// Where the store file lives.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Where the write-ahead log of the store file at `path` lives: beside it, named
    /// `<file name>.log`. Back up, move or delete the two together: the log holds the
    /// latest committed batches until the store file holds them durably.
    ///
    /// ```
    /// use std::path::Path;
    /// use flowwire_storage::RedbStore;
    /// let log = RedbStore::log_path(Path::new("data/instances.redb"));
    /// assert_eq!(log, Path::new("data/instances.redb.log"));
    /// ```
    pub fn log_path(path: &Path) -> PathBuf {
        let mut name = path.as_os_str().to_owned();
        name.push(".log");
        PathBuf::from(name)
    }

    /// Runs a blocking closure over the database off the async workers.
    fn blocking<T, F>(&self, f: F) -> BoxFuture<'static, Result<T, StoreError>>
    where
        T: Send + 'static,
        F: FnOnce(&Database, &Path) -> Result<T, StoreError> + Send + 'static,
    {
        let db = self.db.clone();
        let path = self.path.clone();
        Box::pin(async move {
            match tokio::task::spawn_blocking(move || f(&db, &path)).await {
                Ok(r) => r,
                Err(e) => Err(StoreError::Backend(format!("store task failed: {e}"))),
            }
        })
    }
}

fn create_tables(db: &Database, p: &Path) -> Result<(), StoreError> {
    let txn = db.begin_write().map_err(|e| map_err(p, e))?;
    txn.open_table(RECORDS).map_err(|e| map_err(p, e))?;
    txn.open_table(ACTIVE).map_err(|e| map_err(p, e))?;
    txn.open_table(IMPULSES).map_err(|e| map_err(p, e))?;
    txn.open_table(HISTORY).map_err(|e| map_err(p, e))?;
    txn.open_table(PARKED).map_err(|e| map_err(p, e))?;
    txn.open_table(TIMERS).map_err(|e| map_err(p, e))?;
    txn.open_table(TIMER_OF).map_err(|e| map_err(p, e))?;
    txn.open_table(CORRELATED).map_err(|e| map_err(p, e))?;
    txn.open_table(META).map_err(|e| map_err(p, e))?;
    txn.commit().map_err(|e| map_err(p, e))
}

/// Re-applies the logged batches redb does not hold (a crash lost its commits since the
/// last durable one), makes them durable, and starts the log over.
fn recover(db: &Database, path: &Path) -> Result<Log, StoreError> {
    let log_path = RedbStore::log_path(path);
    let unreadable = |detail: String| StoreError::Corrupted {
        path: log_path.clone(),
        detail,
    };
    let (mut wal, entries) = Wal::open(&log_path).map_err(|err| {
        StoreError::Backend(format!("write-ahead log {}: {err}", log_path.display()))
    })?;
    let e = |err: redb::Error| map_err(path, err);
    let done = {
        let txn = db.begin_read().map_err(|x| e(x.into()))?;
        let meta = txn.open_table(META).map_err(|x| e(x.into()))?;
        meta.get(BATCH)
            .map_err(|x| e(x.into()))?
            .map_or(0, |g| g.value())
    };
    let mut last = done;
    for (seq, payload) in entries {
        if seq <= done {
            continue;
        }
        if seq != last + 1 {
            return Err(unreadable(format!(
                "the log skips from batch {last} to batch {seq}"
            )));
        }
        let batch: Vec<StepWrite> = match payload.split_first() {
            Some((&LOG_FORMAT, rest)) => postcard::from_bytes(rest)
                .map_err(|err| unreadable(format!("batch {seq} does not decode: {err}")))?,
            _ => return Err(unreadable(format!("batch {seq} has an unknown format"))),
        };
        commit_blocking(db, path, &batch, seq, Durability::None)?;
        last = seq;
    }
    if last > done {
        // One durable commit holds every re-applied batch.
        let txn = db.begin_write().map_err(|x| e(x.into()))?;
        {
            let mut meta = txn.open_table(META).map_err(|x| e(x.into()))?;
            meta.insert(BATCH, last).map_err(|x| e(x.into()))?;
        }
        txn.commit().map_err(|x| e(x.into()))?;
        tracing::info!(store = %path.display(), batches = last - done, "re-applied the write-ahead log");
    }
    wal.restart();
    Ok(Log {
        wal,
        next: last + 1,
        since: 0,
        failed: false,
        buf: Vec::new(),
    })
}

/// Commits a batch: applied to redb, logged and synced, then committed to redb without
/// an fsync of its own — so a reader never sees a batch the log does not hold. At a
/// checkpoint the batch commits to redb durably instead, and the log starts over.
fn commit_logged(
    db: &Database,
    path: &Path,
    log: &Mutex<Log>,
    batch: &[StepWrite],
) -> Result<Vec<StepResult>, StoreError> {
    let mut log = log.lock().unwrap_or_else(PoisonError::into_inner);
    let failed = |log: &Log, detail: &dyn std::fmt::Display| {
        StoreError::Backend(format!(
            "write-ahead log {}: {detail}; open the store again to recover",
            log.wal.path().display()
        ))
    };
    if log.failed {
        return Err(failed(&log, &"an earlier batch could not be logged"));
    }
    let seq = log.next;
    if log.since >= CHECKPOINT_BATCHES || log.wal.len() >= CHECKPOINT_BYTES {
        let results = commit_blocking(db, path, batch, seq, Durability::Immediate)?;
        log.next = seq + 1;
        log.since = 0;
        log.wal.restart();
        return Ok(results);
    }
    let (txn, results) = apply(db, path, batch, seq, Durability::None)?;
    let mut buf = std::mem::take(&mut log.buf);
    buf.clear();
    buf.push(LOG_FORMAT);
    let buf = postcard::to_extend(batch, buf).map_err(|err| failed(&log, &err))?;
    let appended = log.wal.append(seq, &buf);
    log.buf = buf;
    if let Err(err) = appended {
        // The transaction is dropped (aborted). The entry may still be in the log in part,
        // or whole if only the sync failed: a sync that failed says nothing reliable about
        // the file, so the store takes no more batches until it is opened again.
        log.failed = true;
        return Err(failed(&log, &err));
    }
    log.next = seq + 1;
    log.since += 1;
    if let Err(err) = txn.commit() {
        // Logged but not in redb: opening the store again applies it.
        log.failed = true;
        return Err(map_err(path, err));
    }
    Ok(results)
}

fn map_err(path: &Path, e: impl Into<redb::Error>) -> StoreError {
    match e.into() {
        redb::Error::Corrupted(detail) => StoreError::Corrupted {
            path: path.to_path_buf(),
            detail,
        },
        redb::Error::DatabaseAlreadyOpen => StoreError::Locked {
            path: path.to_path_buf(),
        },
        redb::Error::Io(io) if io.kind() == std::io::ErrorKind::InvalidData => {
            StoreError::Corrupted {
                path: path.to_path_buf(),
                detail: io.to_string(),
            }
        }
        other => StoreError::Backend(other.to_string()),
    }
}

/// Applies batch number `seq` in one redb transaction (recording `seq` in it) and
/// commits it.
fn commit_blocking(
    db: &Database,
    path: &Path,
    batch: &[StepWrite],
    seq: u64,
    durability: Durability,
) -> Result<Vec<StepResult>, StoreError> {
    let (txn, results) = apply(db, path, batch, seq, durability)?;
    txn.commit().map_err(|x| map_err(path, x))?;
    Ok(results)
}

/// Applies batch number `seq` in a redb transaction (recording `seq` in it), left open:
/// nothing of it is visible until it commits, and dropping it aborts it.
fn apply(
    db: &Database,
    path: &Path,
    batch: &[StepWrite],
    seq: u64,
    durability: Durability,
) -> Result<(redb::WriteTransaction, Vec<StepResult>), StoreError> {
    let e = |err: redb::Error| map_err(path, err);
    let mut txn = db.begin_write().map_err(|x| e(x.into()))?;
    txn.set_durability(durability)
        .map_err(|x| StoreError::Backend(format!("redb: {x}")))?;
    let mut results = Vec::with_capacity(batch.len());
    {
        let mut meta = txn.open_table(META).map_err(|x| e(x.into()))?;
        meta.insert(BATCH, seq).map_err(|x| e(x.into()))?;
        let mut records = txn.open_table(RECORDS).map_err(|x| e(x.into()))?;
        let mut active = txn.open_table(ACTIVE).map_err(|x| e(x.into()))?;
        let mut impulses = txn.open_table(IMPULSES).map_err(|x| e(x.into()))?;
        let mut history = txn.open_table(HISTORY).map_err(|x| e(x.into()))?;
        let mut parked = txn.open_table(PARKED).map_err(|x| e(x.into()))?;
        let mut timers = txn.open_table(TIMERS).map_err(|x| e(x.into()))?;
        let mut timer_of = txn.open_table(TIMER_OF).map_err(|x| e(x.into()))?;
        let mut correlated = txn.open_table(CORRELATED).map_err(|x| e(x.into()))?;
        for step in batch {
            let key = (&*step.key.flow, &*step.key.id);
            let found = records
                .get(key)
                .map_err(|x| e(x.into()))?
                .map(|g| g.value().0);
            let holds = match step.expect {
                Expect::Absent => found.is_none(),
                Expect::Version(v) => found == Some(v),
            };
            if !holds {
                results.push(StepResult::Conflict { found });
                continue;
            }
            if let Some(impulse) = &step.impulse {
                let ikey = (key.0, key.1, &**impulse);
                if let Some(seq) = impulses.get(ikey).map_err(|x| e(x.into()))? {
                    results.push(StepResult::ImpulseSeen { seq: seq.value() });
                    continue;
                }
                impulses.insert(ikey, step.seq).map_err(|x| e(x.into()))?;
            }
            records
                .insert(key, (step.version, &step.record[..]))
                .map_err(|x| e(x.into()))?;
            // Index tables are written only when their entry changes: a write, even of the
            // same value, copies the B-tree path to the root into the commit.
            set_member(&mut active, key, step.active).map_err(e)?;
            set_member(&mut parked, key, step.parked).map_err(e)?;
            set_timer(&mut timers, &mut timer_of, key, step.timer).map_err(e)?;
            if let Some(old) = &step.uncorrelate {
                correlated
                    .remove((key.0, &**old, key.1))
                    .map_err(|x| e(x.into()))?;
            }
            if let Some(new) = &step.correlation {
                correlated
                    .insert((key.0, &**new, key.1), ())
                    .map_err(|x| e(x.into()))?;
            }
            if let Some((seq, entry)) = &step.history {
                history
                    .insert((key.0, key.1, *seq), &entry[..])
                    .map_err(|x| e(x.into()))?;
            }
            if let Some(below) = step.prune_below
                && history
                    .range((key.0, key.1, 0)..(key.0, key.1, below))
                    .map_err(|x| e(x.into()))?
                    .next()
                    .is_some()
            {
                history
                    .retain_in((key.0, key.1, 0)..(key.0, key.1, below), |_, _| false)
                    .map_err(|x| e(x.into()))?;
            }
            results.push(StepResult::Committed);
        }
    }
    Ok((txn, results))
}

type Table<'t, K, V> = redb::Table<'t, K, V>;

/// Puts `key` in an index table or takes it out, writing only if that changes it.
fn set_member(
    table: &mut Table<'_, (&str, &str), ()>,
    key: (&str, &str),
    member: bool,
) -> Result<(), redb::Error> {
    let present = table.get(key)?.is_some();
    if member && !present {
        table.insert(key, ())?;
    } else if !member && present {
        table.remove(key)?;
    }
    Ok(())
}

/// Moves an instance's entry in the timer index to `due` (or removes it).
fn set_timer(
    timers: &mut Table<'_, (&str, u64, &str), ()>,
    timer_of: &mut Table<'_, (&str, &str), u64>,
    key: (&str, &str),
    due: Option<u64>,
) -> Result<(), redb::Error> {
    let old = timer_of.get(key)?.map(|g| g.value());
    if old == due {
        return Ok(());
    }
    if let Some(old) = old {
        timers.remove((key.0, old, key.1))?;
    }
    match due {
        Some(due) => {
            timers.insert((key.0, due, key.1), ())?;
            timer_of.insert(key, due)?;
        }
        None => {
            timer_of.remove(key)?;
        }
    }
    Ok(())
}

impl InstanceStore for RedbStore {
    fn commit(
        &self,
        batch: Vec<StepWrite>,
    ) -> BoxFuture<'static, Result<Vec<StepResult>, StoreError>> {
        let log = self.log.clone();
        self.blocking(move |db, path| commit_logged(db, path, &log, &batch))
    }

    fn load<'a>(
        &'a self,
        key: &'a InstanceKey,
    ) -> BoxFuture<'a, Result<Option<Stored>, StoreError>> {
        let key = key.clone();
        self.blocking(move |db, path| {
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

    fn active<'a>(&'a self, flow: &'a str) -> BoxFuture<'a, Result<super::ActiveList, StoreError>> {
        let flow: Arc<str> = flow.into();
        self.blocking(move |db, path| {
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
        self.blocking(move |db, path| {
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
        self.blocking(move |db, path| {
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
        self.blocking(move |db, path| {
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
        self.blocking(move |db, path| {
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
        self.blocking(move |db, path| {
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
        let (flow, key): (Arc<str>, Arc<str>) = (flow.into(), key.into());
        self.blocking(move |db, path| {
            let e = |err: redb::Error| map_err(path, err);
            let txn = db.begin_read().map_err(|x| e(x.into()))?;
            let table = txn.open_table(CORRELATED).map_err(|x| e(x.into()))?;
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
}

#[cfg(test)]
mod tests {
    use bytes::Bytes;

    use super::{LOG_FORMAT, RedbStore, Wal};
    use crate::error::StoreError;
    use crate::record::{Expect, InstanceKey, StepWrite};
    use crate::store::InstanceStore;

    fn step(key: &InstanceKey, expect: Expect, version: u64) -> StepWrite {
        StepWrite {
            key: key.clone(),
            expect,
            version,
            seq: version,
            record: Bytes::from(format!("record {version}")),
            active: true,
            parked: false,
            timer: None,
            correlation: None,
            uncorrelate: None,
            impulse: None,
            history: Some((version, Bytes::from_static(b"entry"))),
            prune_below: None,
            fence: None,
        }
    }

    /// Logs `batch` as number `seq` without applying it to redb: what a crash leaves when
    /// redb lost its commits since the last durable one.
    fn log_only(path: &std::path::Path, seq: u64, batch: &[StepWrite]) {
        // A reopened log writes from its start: put back what it holds, then the batch.
        let (mut wal, entries) = Wal::open(&RedbStore::log_path(path)).unwrap();
        for (s, p) in &entries {
            wal.append(*s, p).unwrap();
        }
        let payload = postcard::to_extend(batch, vec![LOG_FORMAT]).unwrap();
        wal.append(seq, &payload).unwrap();
    }

    #[tokio::test]
    async fn batches_only_the_log_holds_are_applied_when_the_store_opens() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("instances.redb");
        drop(RedbStore::open(&path).unwrap());
        let a = InstanceKey::new("F", "a");
        let b = InstanceKey::new("F", "b");
        log_only(&path, 1, &[step(&a, Expect::Absent, 1)]);
        log_only(
            &path,
            2,
            &[step(&a, Expect::Version(1), 2), step(&b, Expect::Absent, 1)],
        );

        let store = RedbStore::open(&path).unwrap();
        let found = store.load(&a).await.unwrap().expect("a is there");
        assert_eq!((found.version, &found.bytes[..]), (2, &b"record 2"[..]));
        assert_eq!(store.load(&b).await.unwrap().unwrap().version, 1);
        assert_eq!(store.history(&a, 0, 10).await.unwrap().len(), 2);
        // The next batch continues the numbering, and opening again applies nothing twice.
        store
            .commit(vec![step(&b, Expect::Version(1), 2)])
            .await
            .unwrap();
        drop(store);
        let store = RedbStore::open(&path).unwrap();
        assert_eq!(store.load(&b).await.unwrap().unwrap().version, 2);
        assert_eq!(store.load(&a).await.unwrap().unwrap().version, 2);
    }

    #[tokio::test]
    async fn a_log_that_skips_a_batch_is_reported_as_damaged() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("instances.redb");
        drop(RedbStore::open(&path).unwrap());
        log_only(
            &path,
            2,
            &[step(&InstanceKey::new("F", "a"), Expect::Absent, 1)],
        );
        let err = RedbStore::open(&path).unwrap_err();
        assert!(
            matches!(&err, StoreError::Corrupted { detail, .. } if detail.contains("skips from batch 0 to batch 2")),
            "{err}"
        );
    }

    #[tokio::test]
    async fn a_logged_batch_that_does_not_decode_is_reported_as_damaged() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("instances.redb");
        drop(RedbStore::open(&path).unwrap());
        let (mut wal, _) = Wal::open(&RedbStore::log_path(&path)).unwrap();
        wal.append(1, &[LOG_FORMAT, 0xff, 0xff, 0xff]).unwrap();
        wal.append(2, &[9]).unwrap();
        drop(wal);
        let err = RedbStore::open(&path).unwrap_err();
        assert!(
            matches!(&err, StoreError::Corrupted { detail, .. } if detail.contains("batch 1 does not decode")),
            "{err}"
        );
    }
}
