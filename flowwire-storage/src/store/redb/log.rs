//! The write-ahead log in front of redb: committing a batch through it, and recovering
//! the batches a crash took from redb.

use std::path::{Path, PathBuf};
use std::sync::{Mutex, PoisonError};

use redb::{Database, Durability, ReadableDatabase};

use super::apply::{apply, commit_blocking};
use super::schema::{BATCH, META, map_err};
use crate::error::StoreError;
use crate::record::{StepResult, StepWrite};
use crate::store::wal::Wal;

/// A batch is committed to redb durably (and the log starts over) after this many logged
/// batches…
pub(super) const CHECKPOINT_BATCHES: u32 = 512;
/// …or once the log holds this many bytes.
pub(super) const CHECKPOINT_BYTES: u64 = 8 << 20;
/// The format of a logged batch: this byte, then the postcard encoding of the steps.
pub(super) const LOG_FORMAT: u8 = 1;

/// The write-ahead log and the numbering of batches (one commit at a time holds it).
#[derive(Debug)]
pub(super) struct Log {
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

/// Where the write-ahead log of the store file at `path` lives: `<file name>.log`.
pub(super) fn log_path(path: &Path) -> PathBuf {
    let mut name = path.as_os_str().to_owned();
    name.push(".log");
    PathBuf::from(name)
}

/// Re-applies the logged batches redb does not hold (a crash lost its commits since the
/// last durable one), makes them durable, and starts the log over.
pub(super) fn recover(db: &Database, path: &Path) -> Result<Log, StoreError> {
    let log_path = log_path(path);
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
pub(super) fn commit_logged(
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
