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
//! torn write of the next batch, and is **damaged** ([`LogDamage`]) if any of these holds:
//! - an entry written whole fails its checksum, or holds another number than the next;
//! - any entry of this run numbered after the last one read lies further on (a bad entry
//!   followed by valid ones is corruption, never a torn tail);
//! - an entry's length runs past the end of the file, or the file ends within a header's
//!   length of the last entry (the file was cut);
//! - a floor slot names a batch the entries read do not reach (acknowledged batches are
//!   missing);
//! - a slot belongs to a run that starts after `run` ([`OpenError::RunAhead`]: the store
//!   file, not the log, went back).

use std::fmt;
use std::io;
use std::path::{Path, PathBuf};

use super::disk::{Disk, LogFile};

/// Marks the start of an entry ("FWL2").
const MAGIC: u32 = 0x3246_574c;
/// Marks a floor slot ("FWLS").
const SLOT_MAGIC: u32 = 0x534c_5746;
/// Magic, length, batch, salt, CRC.
const HEADER: usize = 4 + 4 + 8 + 8 + 4;
/// Batch, inverted salt.
const TRAILER: usize = 8 + 8;
/// Magic, salt, first, floor, CRC.
const SLOT: usize = 4 + 8 + 8 + 8 + 4;
/// Where the two floor slots live (each on a page of its own).
const SLOTS: [u64; 2] = [0, 4096];
/// Where entries start.
pub(crate) const START: u64 = 8192;
/// The log grows by at least this much at a time (zero-filled and synced once).
const GROW: u64 = 4 << 20;

/// An entry read back: its batch number and payload.
pub(crate) type Entry = (u64, Vec<u8>);

/// One run of the log: the salt its entries carry and the number of its first batch.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Run {
    /// Random, different for every run.
    pub salt: u64,
    /// The batch the run starts with.
    pub first: u64,
}

impl Run {
    /// A new run starting at batch `first`, with a fresh random salt.
    pub(crate) fn fresh(first: u64) -> Self {
        use std::hash::BuildHasher as _;
        use std::sync::atomic::{AtomicU64, Ordering};
        static COUNT: AtomicU64 = AtomicU64::new(0);
        let n = COUNT.fetch_add(1, Ordering::Relaxed);
        // std's hasher keys come from the operating system's randomness.
        let salt = std::hash::RandomState::new().hash_one((n, std::process::id(), first));
        Self {
            salt: salt | 1,
            first,
        }
    }
}

/// Why a log cannot be trusted: acknowledged batches in it are damaged or missing.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct LogDamage {
    /// The first batch that cannot be read.
    pub batch: u64,
    /// Where it should be.
    pub offset: u64,
    /// What is wrong.
    pub detail: String,
}

impl fmt::Display for LogDamage {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "batch {} at offset {} cannot be read: {}",
            self.batch, self.offset, self.detail
        )
    }
}

/// Opening a log failed.
#[derive(Debug)]
pub(crate) enum OpenError {
    /// The file could not be read.
    Io(io::Error),
    /// The file is damaged.
    Damaged(LogDamage),
    /// The log is on a run that starts at batch `first`, after the run asked for: whoever
    /// recorded that run (redb) lost the durable commits since.
    RunAhead {
        /// The first batch of the log's run.
        first: u64,
    },
}

impl From<io::Error> for OpenError {
    fn from(e: io::Error) -> Self {
        OpenError::Io(e)
    }
}

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

/// Bytes the log is read from: its file, or (for fuzzing and tests) a buffer.
pub(crate) trait ReadAt {
    /// Fills `buf` from `offset`; an error if the source ends first.
    fn fill_at(&self, buf: &mut [u8], offset: u64) -> io::Result<()>;
}

impl ReadAt for dyn LogFile {
    fn fill_at(&self, buf: &mut [u8], offset: u64) -> io::Result<()> {
        self.read_at(buf, offset)
    }
}

impl ReadAt for [u8] {
    fn fill_at(&self, buf: &mut [u8], offset: u64) -> io::Result<()> {
        let at = usize::try_from(offset).map_err(|_| io::ErrorKind::UnexpectedEof)?;
        let src = self
            .get(at..at.saturating_add(buf.len()))
            .ok_or(io::ErrorKind::UnexpectedEof)?;
        buf.copy_from_slice(src);
        Ok(())
    }
}

/// Reads the entries of `run` from a log held in `bytes` (see [`Wal::open`]).
#[cfg(test)]
pub(crate) fn read_bytes(bytes: &[u8], run: Run) -> Result<Vec<Entry>, OpenError> {
    read_run(bytes, bytes.len() as u64, run).map(|(entries, _)| entries)
}

/// What lies at an offset of the entry area.
enum Found {
    /// A whole entry of the run, and where the next one starts.
    Entry {
        seq: u64,
        payload: Vec<u8>,
        next: u64,
    },
    /// Zeros, another run's bytes, or the torn start of an entry.
    Nothing,
    /// An entry of the run written whole (its trailer is there) that fails its checksum.
    Damaged { seq: u64 },
    /// An entry of the run whose length runs past the end of the file.
    Cut { seq: u64, size: u64 },
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

fn slot_bytes(run: Run, floor: u64) -> [u8; SLOT] {
    let mut slot = [0u8; SLOT];
    slot[..4].copy_from_slice(&SLOT_MAGIC.to_le_bytes());
    slot[4..12].copy_from_slice(&run.salt.to_le_bytes());
    slot[12..20].copy_from_slice(&run.first.to_le_bytes());
    slot[20..28].copy_from_slice(&floor.to_le_bytes());
    let crc = crc32fast::hash(&slot[..28]);
    slot[28..].copy_from_slice(&crc.to_le_bytes());
    slot
}

fn le32(b: &[u8]) -> u32 {
    u32::from_le_bytes([b[0], b[1], b[2], b[3]])
}

fn le64(b: &[u8]) -> u64 {
    let mut a = [0u8; 8];
    a.copy_from_slice(&b[..8]);
    u64::from_le_bytes(a)
}

/// The valid floor slots of the file: each one's run and floor (a slot that is torn or
/// damaged says nothing).
fn slots(file: &(impl ReadAt + ?Sized), len: u64) -> io::Result<Vec<(Run, u64)>> {
    let mut found = Vec::new();
    for at in SLOTS {
        if at + SLOT as u64 > len {
            continue;
        }
        let mut slot = [0u8; SLOT];
        file.fill_at(&mut slot, at)?;
        if le32(&slot) == SLOT_MAGIC && le32(&slot[28..]) == crc32fast::hash(&slot[..28]) {
            let run = Run {
                salt: le64(&slot[4..]),
                first: le64(&slot[12..]),
            };
            found.push((run, le64(&slot[20..])));
        }
    }
    Ok(found)
}

/// Whether the file at `path` is a log of this format (a valid floor slot): a store that
/// records no run must not have one.
pub(crate) fn has_runs(disk: &dyn Disk, path: &Path) -> io::Result<bool> {
    let file = disk.open_log(path, false)?;
    let len = file.len()?;
    Ok(!slots(&*file, len)?.is_empty())
}

/// What lies at offset `at` of a file of `len` bytes.
fn entry_at(file: &(impl ReadAt + ?Sized), len: u64, at: u64, run: Run) -> io::Result<Found> {
    let mut header = [0u8; HEADER];
    if at + HEADER as u64 > len {
        return Ok(Found::Nothing);
    }
    file.fill_at(&mut header, at)?;
    if le32(&header) != MAGIC || le64(&header[16..]) != run.salt {
        return Ok(Found::Nothing);
    }
    let seq = le64(&header[8..]);
    let size = u64::from(le32(&header[4..]));
    let next = at + HEADER as u64 + size + TRAILER as u64;
    if next > len {
        return Ok(Found::Cut { seq, size });
    }
    let mut payload = vec![0u8; usize::try_from(size).unwrap_or(usize::MAX)];
    file.fill_at(&mut payload, at + HEADER as u64)?;
    let mut crc = crc32fast::Hasher::new();
    crc.update(&header[..24]);
    crc.update(&payload);
    if crc.finalize() == le32(&header[24..]) {
        return Ok(Found::Entry { seq, payload, next });
    }
    let mut trailer = [0u8; TRAILER];
    file.fill_at(&mut trailer, next - TRAILER as u64)?;
    if le64(&trailer) == seq && le64(&trailer[8..]) == !run.salt {
        Ok(Found::Damaged { seq })
    } else {
        Ok(Found::Nothing)
    }
}

/// The first trailer of `run` at or after `from` that names a batch numbered `min` or
/// higher: proof that such an entry was written whole.
fn trailer_after(
    file: &(impl ReadAt + ?Sized),
    len: u64,
    from: u64,
    min: u64,
    run: Run,
) -> io::Result<Option<(u64, u64)>> {
    let mark = (!run.salt).to_le_bytes();
    let mut at = from;
    let chunk = 1 << 20;
    let mut buf = vec![0u8; chunk + TRAILER];
    while at + TRAILER as u64 <= len {
        let n = usize::try_from((len - at).min(buf.len() as u64)).unwrap_or(buf.len());
        file.fill_at(&mut buf[..n], at)?;
        for i in 0..n.saturating_sub(TRAILER - 1) {
            if buf[i + 8..i + 16] == mark {
                let seq = le64(&buf[i..]);
                if seq >= min {
                    return Ok(Some((seq, at + i as u64)));
                }
            }
        }
        // Overlap by a trailer's length, so one split across chunks is seen.
        at += (n.saturating_sub(TRAILER - 1)).max(1) as u64;
    }
    Ok(None)
}

/// Reads the entries of `run` (see the module documentation for the rules), and where
/// they end.
fn read_run(
    file: &(impl ReadAt + ?Sized),
    len: u64,
    run: Run,
) -> Result<(Vec<Entry>, u64), OpenError> {
    let mut entries: Vec<Entry> = Vec::new();
    let mut at = START;
    let mut expect = run.first;
    let damaged = |batch: u64, offset: u64, detail: String| {
        OpenError::Damaged(LogDamage {
            batch,
            offset,
            detail,
        })
    };
    loop {
        match entry_at(file, len, at, run)? {
            Found::Entry { seq, payload, next } if seq == expect => {
                entries.push((seq, payload));
                at = next;
                expect += 1;
            }
            Found::Entry { seq, .. } => {
                return Err(damaged(
                    expect,
                    at,
                    format!("batch {seq} lies where batch {expect} belongs"),
                ));
            }
            Found::Damaged { seq } => {
                return Err(damaged(
                    expect,
                    at,
                    format!("the entry of batch {seq} was written whole but fails its checksum"),
                ));
            }
            Found::Cut { seq, size } => {
                return Err(damaged(
                    expect,
                    at,
                    format!(
                        "the entry of batch {seq} needs {size} bytes of payload, past the end of the file at {len} bytes: the file was cut"
                    ),
                ));
            }
            Found::Nothing => break,
        }
    }
    if len < at + HEADER as u64 {
        return Err(damaged(
            expect,
            at,
            format!(
                "the file ends at {len} bytes, inside the space kept after the last entry: it was cut"
            ),
        ));
    }
    if let Some((seq, offset)) = trailer_after(file, len, at, expect, run)? {
        return Err(damaged(
            expect,
            at,
            format!(
                "batch {seq} was written whole further on (its end is at offset {offset}), so what lies here is damage, not a torn write"
            ),
        ));
    }
    let slots = slots(file, len)?;
    if let Some(&(ahead, _)) = slots.iter().find(|(r, _)| r.first > run.first) {
        return Err(OpenError::RunAhead { first: ahead.first });
    }
    let floor = slots
        .iter()
        .filter(|(r, _)| *r == run)
        .map(|(_, floor)| *floor)
        .max();
    if let Some(floor) = floor
        && floor >= expect
    {
        return Err(damaged(
            expect,
            at,
            format!(
                "batches up to {floor} were acknowledged, but the log's entries end before batch {expect}"
            ),
        ));
    }
    Ok((entries, at))
}

/// Reads a log of the first format (flowwire before run salts: entries from offset 0,
/// `"FWL1" | length | batch | CRC of batch and payload | payload`), up to the first entry
/// that is torn, damaged or out of sequence — the rules that format was written for. Only a
/// store that records no run was written with it.
pub(crate) fn read_legacy(disk: &dyn Disk, path: &Path) -> io::Result<Vec<Entry>> {
    const LEGACY_MAGIC: u32 = 0x3146_574c;
    const LEGACY_HEADER: u64 = 20;
    let file = disk.open_log(path, false)?;
    let len = file.len()?;
    let mut entries: Vec<Entry> = Vec::new();
    let mut at = 0u64;
    let mut header = [0u8; LEGACY_HEADER as usize];
    while at + LEGACY_HEADER <= len {
        file.read_at(&mut header, at)?;
        let size = u64::from(le32(&header[4..]));
        let seq = le64(&header[8..]);
        if le32(&header) != LEGACY_MAGIC
            || size > len - at - LEGACY_HEADER
            || entries.last().is_some_and(|(prev, _)| seq != prev + 1)
        {
            break;
        }
        let mut payload = vec![0u8; usize::try_from(size).unwrap_or(usize::MAX)];
        file.read_at(&mut payload, at + LEGACY_HEADER)?;
        let mut crc = crc32fast::Hasher::new();
        crc.update(&header[8..16]);
        crc.update(&payload);
        if crc.finalize() != le32(&header[16..]) {
            break;
        }
        entries.push((seq, payload));
        at += LEGACY_HEADER + size;
    }
    Ok(entries)
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
#[path = "wal_tests.rs"]
mod tests;
