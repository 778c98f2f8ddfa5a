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
//! # Layout
//! ```text
//! offset 0     floor slot A ┐ "FWLS" | run salt u64 | run's first batch u64 | floor u64 | CRC-32
//! offset 4096  floor slot B ┘ (even batches write A, odd ones B)
//! offset 8192  entries, back to back:
//!              "FWL2" | length u32 | batch u64 | run salt u64 | CRC-32 | payload | batch u64 | !salt u64
//! ```
//! - The CRC covers the whole entry but itself: magic, length, batch, salt and payload.
//! - Each run has a random salt, recorded in redb by the checkpoint that starts the run.
//!   An entry of another run (bytes an older, longer run left behind, or bytes a user put
//!   in a payload) is never read as one of this run.
//! - The trailer (`batch`, `!salt`) is written last. A torn write is a prefix of the
//!   entry, so it has no trailer; an entry with its trailer whose CRC fails was written
//!   whole and damaged afterwards.
//! - Each append also writes the *floor* — the last batch acknowledged before it — into
//!   the slot of its parity, in the same sync. The floor is true once written, whatever
//!   order the disk persists the two writes in, so a lost power never makes it lie. The
//!   slot also names its run (salt and first batch), so a log that is on a later run than
//!   the one redb records shows that redb lost durable commits.
//! - The file is zero-filled ahead of the writes, and always by at least one header past
//!   the last entry, so an append changes no file metadata (`fdatasync` writes the
//!   entry's blocks only) and a file shorter than that was cut.
//!
//! # Reading rules ([`Wal::open`])
//! Entries are read from the start of the entry area while they are whole, of this run and
//! numbered one after another. Where that stops, the log ends there if what stops it is a
//! torn write of the next batch, and is **damaged** ([`LogDamage`](read::LogDamage)) if any of these holds:
//! - an entry written whole fails its checksum, or holds another number than the next;
//! - any entry of this run numbered after the last one read lies further on (a bad entry
//!   followed by valid ones is corruption, never a torn tail);
//! - an entry's length runs past the end of the file, or the file ends within a header's
//!   length of the last entry (the file was cut);
//! - a floor slot names a batch the entries read do not reach (acknowledged batches are
//!   missing);
//! - a slot belongs to a run that starts after `run` ([`OpenError::RunAhead`]: the store
//!   file, not the log, went back).

mod format;
mod read;

use std::io;
use std::path::{Path, PathBuf};

use super::disk::{Disk, LogFile};
pub(crate) use format::{Entry, Run, START};
use format::{GROW, HEADER, MAGIC, SLOTS, slot_bytes};
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

    /// Appends batch `seq` of the current run and syncs it, with the floor `seq - 1` in
    /// its slot: when this returns `Ok`, the entry survives a crash.
    ///
    /// On an error the entry may be in the file in part or whole; the log stays positioned
    /// where it was, so the next append (of the same batch number) writes over it.
    pub(crate) fn append(&mut self, seq: u64, payload: &[u8]) -> io::Result<()> {
        let size = u32::try_from(payload.len())
            .map_err(|_| io::Error::new(io::ErrorKind::InvalidInput, "a batch over 4 GiB"))?;
        let salt = self.run.salt;
        self.buf.clear();
        self.buf.extend_from_slice(&MAGIC.to_le_bytes());
        self.buf.extend_from_slice(&size.to_le_bytes());
        self.buf.extend_from_slice(&seq.to_le_bytes());
        self.buf.extend_from_slice(&salt.to_le_bytes());
        let mut crc = crc32fast::Hasher::new();
        crc.update(&self.buf);
        crc.update(payload);
        self.buf.extend_from_slice(&crc.finalize().to_le_bytes());
        self.buf.extend_from_slice(payload);
        self.buf.extend_from_slice(&seq.to_le_bytes());
        self.buf.extend_from_slice(&(!salt).to_le_bytes());
        let end = self.end + self.buf.len() as u64;
        // One header's length past the last entry is always written: a shorter file was cut.
        if end + HEADER as u64 > self.filled {
            self.fill(end + HEADER as u64)?;
        }
        self.file.write_at(&self.buf, self.end)?;
        let slot = slot_bytes(self.run, seq.saturating_sub(1));
        self.file.write_at(&slot, SLOTS[(seq % 2) as usize])?;
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
