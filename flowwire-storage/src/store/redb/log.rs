//! The write-ahead log in front of redb: committing a batch through it, recovering the
//! batches a crash took from redb, and closing cleanly.
//!
//! redb's `meta` table records, in the same transactions as the batches:
//! - `batch`: the number of the last batch applied;
//! - `run salt` and `run first`: the log run that follows the last durable commit (written
//!   by that commit, so redb and the log agree on which entries are this run's);
//! - `clean`: 1 once the store was closed cleanly (every batch durable in redb), 0 while it
//!   is open. A store that was not closed cleanly needs its log.

use std::path::{Path, PathBuf};
use std::sync::{Mutex, PoisonError};

use redb::{Database, Durability, ReadableDatabase};

use super::apply::apply;
use super::schema::{BATCH, META, map_err};
use crate::error::StoreError;
use crate::record::{StepResult, StepWrite};
use crate::store::disk::Disk;
use crate::store::wal::{self, OpenError, Run, Wal};

/// A batch is committed to redb durably (and the log starts over) after this many logged
/// batches…
pub(super) const CHECKPOINT_BATCHES: u32 = 512;
/// …or once the log holds this many bytes.
pub(super) const CHECKPOINT_BYTES: u64 = 8 << 20;
/// The format of a logged batch: this byte, then the postcard encoding of the steps.
pub(super) const LOG_FORMAT: u8 = 1;
/// `meta` rows beside [`BATCH`].
const RUN_SALT: &str = "run salt";
const RUN_FIRST: &str = "run first";
const CLEAN: &str = "clean";

/// The write-ahead log and the numbering of batches (one commit at a time holds it).
#[derive(Debug)]
pub(super) struct Log {
    wal: Wal,
    /// The number the next batch gets.
    next: u64,
    /// Batches logged since the last durable redb commit.
    since: u32,
    /// A checkpoint after this many logged batches ([`CHECKPOINT_BATCHES`] but in tests).
    checkpoint_batches: u32,
    /// A batch was logged but redb did not commit it: nothing more is committed until the
    /// store is opened again, which applies it from the log.
    failed: bool,
    /// A batch's encoding, reused.
    buf: Vec<u8>,
}

impl Log {
    /// Whether a logged batch is not in redb (the store must be opened again).
    pub(super) fn failed(&self) -> bool {
        self.failed
    }
}

/// Where the write-ahead log of the store file at `path` lives: `<file name>.log`.
pub(super) fn log_path(path: &Path) -> PathBuf {
    let mut name = path.as_os_str().to_owned();
    name.push(".log");
    PathBuf::from(name)
}

/// What redb's `meta` table says about the log.
struct Meta {
    /// The last batch redb holds.
    done: u64,
    /// The run that follows redb's last durable commit (`None`: a new store, or one
    /// written before runs were recorded).
    run: Option<Run>,
    /// Whether the store was closed cleanly.
    clean: bool,
}

fn read_meta(db: &Database, path: &Path) -> Result<Meta, StoreError> {
    let e = |err: redb::Error| map_err(path, err);
    let txn = db.begin_read().map_err(|x| e(x.into()))?;
    let meta = txn.open_table(META).map_err(|x| e(x.into()))?;
    let get = |row: &str| -> Result<Option<u64>, StoreError> {
        Ok(meta.get(row).map_err(|x| e(x.into()))?.map(|g| g.value()))
    };
    let done = get(BATCH)?.unwrap_or(0);
    let run = match (get(RUN_SALT)?, get(RUN_FIRST)?) {
        (Some(salt), Some(first)) => Some(Run { salt, first }),
        _ => None,
    };
    Ok(Meta {
        done,
        run,
        clean: get(CLEAN)? == Some(1),
    })
}

/// Whether the store was closed cleanly (or is new): then redb holds every batch durably.
pub(super) fn closed_cleanly(db: &Database, path: &Path) -> Result<bool, StoreError> {
    let meta = read_meta(db, path)?;
    Ok(meta.clean || (meta.run.is_none() && meta.done == 0))
}

/// Re-applies the logged batches redb does not hold (a crash lost its commits since the
/// last durable one), makes them durable together with a new run, and positions the log
/// for it. A log that is missing, damaged or cut where acknowledged batches should be is
/// [`StoreError::Corrupted`], naming the log, the batch and the offset.
pub(super) fn recover(
    db: &Database,
    disk: &dyn Disk,
    path: &Path,
    checkpoint_batches: u32,
) -> Result<Log, StoreError> {
    let log_path = log_path(path);
    let damaged = |detail: String| StoreError::Corrupted {
        path: log_path.clone(),
        detail,
    };
    let io = |err: std::io::Error| {
        StoreError::unavailable(format!("write-ahead log {}", log_path.display()), err)
    };
    let meta = read_meta(db, path)?;
    let exists = disk.exists(&log_path).map_err(io)?;
    let entries = match meta.run {
        // A log of runs beside a store file that records none: the store file went back
        // to before its first open.
        None if exists && wal::has_runs(disk, &log_path).map_err(io)? => {
            return Err(StoreError::Corrupted {
                path: path.to_path_buf(),
                detail: "the store file records no log run, but its log has runs: the store file lost its durable commits; restore the two files from a backup".into(),
            });
        }
        // A new store, or one whose log has the first format.
        None if exists => wal::read_legacy(disk, &log_path).map_err(io)?,
        None => Vec::new(),
        Some(_) if meta.clean => Vec::new(),
        Some(run) if !exists => {
            return Err(damaged(format!(
                "the write-ahead log is missing, and the store was not closed cleanly: the batches acknowledged after batch {} (from {} on) may be only in it; put the log back beside the store file (back up, move and restore the two together)",
                meta.done, run.first
            )));
        }
        Some(run) => {
            if meta.done + 1 < run.first {
                return Err(StoreError::Corrupted {
                    path: path.to_path_buf(),
                    detail: format!(
                        "the store holds batches up to {}, but its log continues from batch {}: the store file lost durable commits",
                        meta.done, run.first
                    ),
                });
            }
            match Wal::open(disk, &log_path, run) {
                Ok((_, entries)) => {
                    let last = entries.last().map_or(run.first - 1, |(seq, _)| *seq);
                    if last < meta.done {
                        return Err(damaged(format!(
                            "the log ends at batch {last}, but the store holds batch {}, which was logged first: the log lost acknowledged batches",
                            meta.done
                        )));
                    }
                    entries
                }
                Err(OpenError::Damaged(d)) => {
                    return Err(damaged(format!(
                        "{d}; restore the log from a backup taken with the store file, or move both aside to start empty"
                    )));
                }
                Err(OpenError::RunAhead { first }) => {
                    return Err(StoreError::Corrupted {
                        path: path.to_path_buf(),
                        detail: format!(
                            "the store file's last durable commit is followed by log run {}, but its log has moved on to the run from batch {first}: the store file lost durable commits; restore the two files from a backup",
                            run.first
                        ),
                    });
                }
                Err(OpenError::Io(err)) => return Err(io(err)),
            }
        }
    };
    let mut last = meta.done;
    for (seq, payload) in entries {
        if seq <= meta.done {
            continue;
        }
        if seq != last + 1 {
            return Err(damaged(format!(
                "the log skips from batch {last} to batch {seq}"
            )));
        }
        let batch: Vec<StepWrite> = match payload.split_first() {
            Some((&LOG_FORMAT, rest)) => postcard::from_bytes(rest)
                .map_err(|err| damaged(format!("batch {seq} does not decode: {err}")))?,
            _ => return Err(damaged(format!("batch {seq} has an unknown format"))),
        };
        let (txn, _) = apply(db, path, &batch, seq, Durability::None)?;
        txn.commit().map_err(|x| map_err(path, x))?;
        last = seq;
    }
    if last > meta.done {
        tracing::info!(store = %path.display(), batches = last - meta.done, "re-applied the write-ahead log");
    }
    // The log file is ready (created, zero-filled and synced) before the durable commit
    // that holds every re-applied batch and names the new run: a crash between the two
    // leaves a store that names no run in a log of no runs, or names the run of a log that
    // is ready for it.
    let run = Run::fresh(last + 1);
    let wal = match meta.run {
        Some(_) if exists => wal::reuse(disk, &log_path, run).map_err(io)?,
        _ => Wal::create(disk, &log_path, run).map_err(io)?,
    };
    mark(db, path, Some(last), Some(run), false)?;
    Ok(Log {
        wal,
        next: last + 1,
        since: 0,
        checkpoint_batches,
        failed: false,
        buf: Vec::new(),
    })
}

/// Writes `meta` rows in one durable commit.
fn mark(
    db: &Database,
    path: &Path,
    batch: Option<u64>,
    run: Option<Run>,
    clean: bool,
) -> Result<(), StoreError> {
    let e = |err: redb::Error| map_err(path, err);
    let txn = db.begin_write().map_err(|x| e(x.into()))?;
    {
        let mut meta = txn.open_table(META).map_err(|x| e(x.into()))?;
        write_meta(&mut meta, batch, run, clean).map_err(e)?;
    }
    txn.commit().map_err(|x| e(x.into()))
}

fn write_meta(
    meta: &mut redb::Table<'_, &str, u64>,
    batch: Option<u64>,
    run: Option<Run>,
    clean: bool,
) -> Result<(), redb::Error> {
    if let Some(batch) = batch {
        meta.insert(BATCH, batch)?;
    }
    if let Some(run) = run {
        meta.insert(RUN_SALT, run.salt)?;
        meta.insert(RUN_FIRST, run.first)?;
    }
    meta.insert(CLEAN, u64::from(clean))?;
    Ok(())
}

/// Closes the store: one durable commit makes every batch redb holds durable and marks
/// the store clean, so the next open needs neither the log nor an integrity check. A store
/// whose log holds a batch redb lacks stays unclean (the next open applies it).
pub(super) fn close(db: &Database, path: &Path, log: &Mutex<Log>) -> Result<(), StoreError> {
    let log = log.lock().unwrap_or_else(PoisonError::into_inner);
    if log.failed {
        return Ok(());
    }
    mark(db, path, None, None, true)
}

/// Commits a batch: applied to redb, logged and synced, then committed to redb without
/// an fsync of its own — so a reader never sees a batch the log does not hold. At a
/// checkpoint the batch commits to redb durably instead, with the run that follows it,
/// and the log starts that run.
pub(super) fn commit_logged(
    db: &Database,
    path: &Path,
    log: &Mutex<Log>,
    batch: &[StepWrite],
) -> Result<Vec<StepResult>, StoreError> {
    let mut log = log.lock().unwrap_or_else(PoisonError::into_inner);
    let failed = |log: &Log, err: std::io::Error| {
        StoreError::unavailable(format!("write-ahead log {}", log.wal.path().display()), err)
    };
    if log.failed {
        return Err(StoreError::Stopped {
            path: path.to_path_buf(),
            detail: "a logged batch could not be committed to the store file; opening the store again applies it from the log".into(),
        });
    }
    let seq = log.next;
    if log.since >= log.checkpoint_batches || log.wal.len() >= CHECKPOINT_BYTES {
        let run = Run::fresh(seq + 1);
        let (txn, results) = apply(db, path, batch, seq, Durability::Immediate)?;
        {
            let mut meta = txn.open_table(META).map_err(|x| map_err(path, x))?;
            write_meta(&mut meta, None, Some(run), false).map_err(|x| map_err(path, x))?;
        }
        txn.commit().map_err(|x| map_err(path, x))?;
        log.next = seq + 1;
        log.since = 0;
        log.wal.restart(run);
        return Ok(results);
    }
    let (txn, results) = apply(db, path, batch, seq, Durability::None)?;
    let mut buf = std::mem::take(&mut log.buf);
    buf.clear();
    buf.push(LOG_FORMAT);
    let buf = postcard::to_extend(batch, buf)
        .map_err(|err| StoreError::Backend(format!("a batch does not encode: {err}")))?;
    let appended = log.wal.append(seq, &buf);
    log.buf = buf;
    if let Err(err) = appended {
        // The transaction is dropped (aborted), and the batch's number is given to the
        // next batch, whose entry is written over whatever of this one reached the file.
        return Err(failed(&log, err));
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

/// Marks the store unclean and returns its run, as a crash leaves it: for tests that
/// write log entries redb never saw.
#[cfg(test)]
pub(super) fn as_if_crashed(path: &Path) -> Run {
    let db = Database::create(path).unwrap();
    let run = read_meta(&db, path).unwrap().run.unwrap();
    mark(&db, path, None, None, false).unwrap();
    run
}
