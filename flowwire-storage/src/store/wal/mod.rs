//! The embedded store's write-ahead log: one sequential append and one `fdatasync` per
//! committed batch.
//!
//! A redb commit writes its header and the B-tree paths it changed, pages scattered over
//! the file, and syncs them; on a virtio disk each scattered page costs about as much again
//! as the first. So [`RedbStore`](super::RedbStore) applies each batch in a redb
//! transaction, appends the batch to this log and syncs the log — the batch is durable when
//! the sync returns — and then commits the transaction *without* durability. Every so
//! often a batch is committed to redb durably instead (a checkpoint) and the log starts a
//! new *run* from the start of its entry area.
//!
//! # Layout (format 3)
//! ```text
//! offset 0     slot A ┐ "FWS3" | run salt u64 | run's first batch u64 | floor u64
//! offset 4096  slot B ┘   | batch u64 | its offset u64 | its size u64 | CRC-32 [| copy of a small entry]
//!                         (even batches write A, odd ones B)
//! offset 8192  entries, back to back:
//!              "FWL3" | length u32 | batch u64 | run salt u64 | CRC-32 | payload | batch u64 | !salt u64
//!              [zeros to the next page | copy of a large entry]
//! ```
//! - The CRC covers the whole entry but itself: magic, length, batch, salt and payload.
//! - Each run has a random salt, recorded in redb by the checkpoint that starts the run.
//!   An entry of another run (bytes an older, longer run left behind, or bytes a user put
//!   in a payload) is never read as one of this run.
//! - The trailer (`batch`, `!salt`) is written last. A torn write is a prefix of the
//!   entry, so it has no trailer; an entry with its trailer whose CRC fails was written
//!   whole and damaged afterwards.
//! - Each append also writes the slot of its parity, in the same sync. The slot holds the
//!   *floor* — the last batch acknowledged before this one. The floor is true once
//!   written, whatever order the disk persists the two writes in, so a lost power never
//!   makes it lie. The slot also names its run (salt and first batch), so a log that is on
//!   a later run than the one redb records shows that redb lost durable commits.
//! - **Every entry is written twice.** Nothing written in the same sync as the last entry
//!   can prove that the sync completed, so damage that takes the end of the last
//!   acknowledged entry and its trailer looks exactly like the torn write of a batch that
//!   was never acknowledged. So the slot also says where its batch lies, and a copy of
//!   the entry is kept where no single damaged page or run of bytes reaches both: in the
//!   slot's page, right after the slot, when it fits (the page is written anyway), or
//!   else in the entry area from the next page boundary after the entry, in the same
//!   write. An entry that cannot be read is read from its copy: the last two batches
//!   always have one, and older ones are covered by the floor and by the entries after
//!   them. A whole copy is the batch as it was written, so reading it after a power cut
//!   that took the entry but not the slot gives a batch that was durable, if not yet
//!   acknowledged.
//! - The file is zero-filled ahead of the writes, and always by at least one header past
//!   the last entry, so an append changes no file metadata (`fdatasync` writes the
//!   entry's blocks only) and a file shorter than that was cut.
//! - A log of format 2 (`"FWL2"` entries with no copies, `"FWLS"` slots with the floor
//!   only) is still read, by the same rules without copies: a crash before an upgrade
//!   leaves one behind. The run that follows its recovery is written in format 3.
//!
//! # Reading rules ([`Wal::open`])
//! Entries are read from the start of the entry area while they are whole, of this run and
//! numbered one after another, each from its copy where it cannot be read itself. Where
//! that stops, the log ends there if what stops it is a torn write of the next batch, and
//! is **damaged** ([`LogDamage`](read::LogDamage)) if any of these holds:
//! - an entry written whole fails its checksum and has no whole copy, or an entry holds
//!   another number than the next;
//! - any entry of this run numbered after the last one read lies further on (a bad entry
//!   followed by valid ones is corruption, never a torn tail);
//! - an entry's length runs past the end of the file, or the file ends within a header's
//!   length of the last entry (the file was cut);
//! - a floor slot names a batch the entries read do not reach (acknowledged batches are
//!   missing);
//! - a slot belongs to a run that starts after `run` ([`OpenError::RunAhead`]: the store
//!   file, not the log, went back).
//!
//! Damage to both an entry and its copy (two damages) can still look like a torn write;
//! one damaged page or run of bytes anywhere in the file cannot.

mod format;
mod read;

use std::io;
use std::path::{Path, PathBuf};

use super::disk::{Disk, LogFile};
pub(crate) use format::{Entry, Run, START};
use format::{GROW, HEADER, MAGIC, Placed, SLOTS, after, copy_at, slot_bytes};
use read::read_run;
#[cfg(test)]
pub(crate) use read::{LogDamage, read_bytes};
pub(crate) use read::{OpenError, has_runs, read_legacy};

/// The log file, positioned for the next append.
#[derive(Debug)]
pub(crate) struct Wal {
    file: Box<dyn LogFile>,
    path: PathBuf,
    run: Run,
    /// Where the next entry goes.
    end: u64,
    /// The bytes of the file that are written (entries or zeros): appends below this
    /// change no metadata.
    filled: u64,
    /// An entry's header, payload and trailer, assembled for one write.
    buf: Vec<u8>,
}

impl Wal {
    /// Creates a new, empty log at `path` (replacing any file there) for `run`, its
    /// name and zero-filled blocks synced.
    pub(crate) fn create(disk: &dyn Disk, path: &Path, run: Run) -> io::Result<Self> {
        let file = disk.open_log(path, true)?;
        let mut wal = Self {
            file,
            path: path.to_path_buf(),
            run,
            end: START,
            filled: 0,
            buf: Vec::new(),
        };
        wal.fill(START + HEADER as u64)?;
        Ok(wal)
    }

    /// Opens the log at `path` and reads the entries of `run` by the rules of the module
    /// documentation. The file's length bounds every read; no length field is trusted
    /// beyond it.
    pub(crate) fn open(
        disk: &dyn Disk,
        path: &Path,
        run: Run,
    ) -> Result<(Self, Vec<Entry>), OpenError> {
        let file = disk.open_log(path, false)?;
        let len = file.len()?;
        let (entries, end) = read_run(&*file, len, run)?;
        let wal = Self {
            file,
            path: path.to_path_buf(),
            run,
            end,
            filled: len,
            buf: Vec::new(),
        };
        Ok((wal, entries))
    }

    /// Where the log lives.
    pub(crate) fn path(&self) -> &Path {
        &self.path
    }

    /// How many bytes the current run holds.
    pub(crate) fn len(&self) -> u64 {
        self.end - START
    }

    /// Appends batch `seq` of the current run and syncs it, with the floor `seq - 1` and
    /// the entry's copy (see the module documentation): when this returns `Ok`, the entry
    /// survives a crash, and so does one of its two copies whatever single block of the
    /// file is damaged later.
    ///
    /// On an error the entry may be in the file in part or whole; the log stays positioned
    /// where it was, so the next append (of the same batch number) writes over it.
    pub(crate) fn append(&mut self, seq: u64, payload: &[u8]) -> io::Result<()> {
        let too_big = || io::Error::new(io::ErrorKind::InvalidInput, "a batch over 4 GiB");
        let size = u32::try_from(payload.len()).map_err(|_| too_big())?;
        let salt = self.run.salt;
        let buf = &mut self.buf;
        buf.clear();
        buf.extend_from_slice(&MAGIC.to_le_bytes());
        buf.extend_from_slice(&size.to_le_bytes());
        buf.extend_from_slice(&seq.to_le_bytes());
        buf.extend_from_slice(&salt.to_le_bytes());
        let mut crc = crc32fast::Hasher::new();
        crc.update(buf);
        crc.update(payload);
        buf.extend_from_slice(&crc.finalize().to_le_bytes());
        buf.extend_from_slice(payload);
        buf.extend_from_slice(&seq.to_le_bytes());
        buf.extend_from_slice(&(!salt).to_le_bytes());
        let placed = Placed {
            batch: seq,
            at: self.end,
            size: buf.len() as u64,
        };
        let (Some(copy), Some(end)) = (copy_at(placed), after(placed)) else {
            return Err(too_big());
        };
        let slot = slot_bytes(self.run, seq.saturating_sub(1), placed);
        // The entry and, in the entry area, its copy: one write. The slot and, in its
        // page, the copy of a small entry: the other.
        let entry = buf.len();
        if copy > self.end {
            buf.resize(usize::try_from(copy - self.end).map_err(|_| too_big())?, 0);
            buf.extend_from_within(..entry);
        }
        let appended = buf.len();
        buf.extend_from_slice(&slot);
        if copy < self.end {
            buf.extend_from_within(..entry);
        }
        // One header's length past the last entry is always written: a shorter file was cut.
        if end + HEADER as u64 > self.filled {
            self.fill(end + HEADER as u64)?;
        }
        self.file.write_at(&self.buf[..appended], self.end)?;
        self.file
            .write_at(&self.buf[appended..], SLOTS[(seq % 2) as usize])?;
        self.file.sync_data()?;
        self.end = end;
        // A long-lived buffer does not keep one huge batch's size.
        if self.buf.capacity() > GROW as usize {
            self.buf = Vec::new();
        }
        Ok(())
    }

    /// Starts `run` at the start of the entry area (everything logged so far is in redb
    /// durably, and redb records `run`).
    pub(crate) fn restart(&mut self, run: Run) {
        self.run = run;
        self.end = START;
    }

    /// Zero-fills the file up to at least `end` (in steps of [`GROW`]) and syncs it, size
    /// included: later appends below it then sync data blocks only.
    fn fill(&mut self, end: u64) -> io::Result<()> {
        let target = end.max(self.filled + GROW);
        let zeros = vec![0u8; 1 << 20];
        let mut at = self.filled;
        while at < target {
            let n = usize::try_from((target - at).min(zeros.len() as u64)).unwrap_or(zeros.len());
            self.file.write_at(&zeros[..n], at)?;
            at += n as u64;
        }
        self.file.sync_all()?;
        self.filled = target;
        Ok(())
    }
}

/// Opens the log at `path` for appending to `run` without reading it: a store closed
/// cleanly holds every logged batch durably, so what the file holds does not matter.
pub(crate) fn reuse(disk: &dyn Disk, path: &Path, run: Run) -> io::Result<Wal> {
    let file = disk.open_log(path, false)?;
    let len = file.len()?;
    Ok(Wal {
        file,
        path: path.to_path_buf(),
        run,
        end: START,
        filled: len,
        buf: Vec::new(),
    })
}

#[cfg(test)]
mod tests;
