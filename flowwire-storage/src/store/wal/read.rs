//! Reading a log back by the rules of the [module](super) documentation: entries, floor
//! slots, the proof that a stop is damage rather than a torn write, and the first format.

use std::fmt;
use std::io;
use std::path::Path;

use super::format::{
    Entry, HEADER, MAGIC, MAGIC_V2, Placed, Run, SLOT, SLOTS, START, Slot, TRAILER, after, copy_at,
    le32, le64, parse_slot,
};
use crate::store::disk::{Disk, LogFile};

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

/// Reads the entries of `run` from a log held in `bytes` (see [`Wal::open`](super::Wal::open)).
#[cfg(test)]
pub(crate) fn read_bytes(bytes: &[u8], run: Run) -> Result<Vec<Entry>, OpenError> {
    read_run(bytes, bytes.len() as u64, run).map(|(entries, _)| entries)
}

/// What lies at an offset of the entry area.
enum Found {
    /// A whole entry of the run: its batch, its payload, where it ends, and whether it is
    /// of the third format (its copy is kept).
    Entry {
        seq: u64,
        payload: Vec<u8>,
        end: u64,
        copied: bool,
    },
    /// Zeros, another run's bytes, or the torn start of an entry.
    Nothing,
    /// An entry of the run written whole (its trailer is there) that fails its checksum.
    Damaged { seq: u64 },
    /// An entry of the run whose length runs past the end of the file.
    Cut { seq: u64, size: u64 },
}

/// The valid slots of the file (a slot that is torn or damaged says nothing).
fn slots(file: &(impl ReadAt + ?Sized), len: u64) -> io::Result<Vec<Slot>> {
    let mut found = Vec::new();
    for at in SLOTS {
        let n = len.saturating_sub(at).min(SLOT as u64);
        if n == 0 {
            continue;
        }
        let mut bytes = [0u8; SLOT];
        let bytes = &mut bytes[..usize::try_from(n).unwrap_or(SLOT)];
        file.fill_at(bytes, at)?;
        found.extend(parse_slot(bytes));
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
    if at.saturating_add(HEADER as u64) > len {
        return Ok(Found::Nothing);
    }
    file.fill_at(&mut header, at)?;
    let copied = match le32(&header) {
        MAGIC => true,
        MAGIC_V2 => false,
        _ => return Ok(Found::Nothing),
    };
    if le64(&header[16..]) != run.salt {
        return Ok(Found::Nothing);
    }
    let seq = le64(&header[8..]);
    let size = u64::from(le32(&header[4..]));
    let end = at + HEADER as u64 + size + TRAILER as u64;
    if end > len {
        return Ok(Found::Cut { seq, size });
    }
    let mut payload = vec![0u8; usize::try_from(size).unwrap_or(usize::MAX)];
    file.fill_at(&mut payload, at + HEADER as u64)?;
    let mut crc = crc32fast::Hasher::new();
    crc.update(&header[..24]);
    crc.update(&payload);
    if crc.finalize() == le32(&header[24..]) {
        return Ok(Found::Entry {
            seq,
            payload,
            end,
            copied,
        });
    }
    let mut trailer = [0u8; TRAILER];
    file.fill_at(&mut trailer, end - TRAILER as u64)?;
    if le64(&trailer) == seq && le64(&trailer[8..]) == !run.salt {
        Ok(Found::Damaged { seq })
    } else {
        Ok(Found::Nothing)
    }
}

/// The copy of batch `batch`, which belongs at offset `at`, as a slot of `run` keeps it:
/// its payload and where the entry after it starts, if the copy is whole.
fn copy_of(
    file: &(impl ReadAt + ?Sized),
    len: u64,
    slots: &[Slot],
    run: Run,
    batch: u64,
    at: u64,
) -> io::Result<Option<(Vec<u8>, u64)>> {
    for slot in slots {
        let Some(placed) = slot.placed else { continue };
        if slot.run != run || placed.batch != batch || placed.at != at {
            continue;
        }
        let (Some(copy), Some(next)) = (copy_at(placed), after(placed)) else {
            continue;
        };
        if let Found::Entry {
            seq,
            payload,
            end,
            copied: true,
        } = entry_at(file, len, copy, run)?
            && seq == batch
            && end - copy == placed.size
        {
            return Ok(Some((payload, next)));
        }
    }
    Ok(None)
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
pub(super) fn read_run(
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
    let slots = slots(file, len)?;
    loop {
        let found = entry_at(file, len, at, run)?;
        if let Found::Entry {
            seq,
            payload,
            end,
            copied,
        } = found
        {
            if seq != expect {
                return Err(damaged(
                    expect,
                    at,
                    format!("batch {seq} lies where batch {expect} belongs"),
                ));
            }
            entries.push((seq, payload));
            let placed = Placed {
                batch: seq,
                at,
                size: end - at,
            };
            at = if copied {
                after(placed).unwrap_or(u64::MAX)
            } else {
                end
            };
            expect += 1;
            continue;
        }
        // Whatever lies here, a whole copy of the batch that belongs here is the batch.
        if let Some((payload, next)) = copy_of(file, len, &slots, run, expect, at)? {
            entries.push((expect, payload));
            at = next;
            expect += 1;
            continue;
        }
        match found {
            Found::Damaged { seq } => {
                return Err(damaged(
                    expect,
                    at,
                    format!(
                        "the entry of batch {seq} was written whole but fails its checksum, and no slot keeps a whole copy of it"
                    ),
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
            Found::Nothing | Found::Entry { .. } => break,
        }
    }
    if len < at.saturating_add(HEADER as u64) {
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
    if let Some(ahead) = slots.iter().find(|s| s.run.first > run.first) {
        return Err(OpenError::RunAhead {
            first: ahead.run.first,
        });
    }
    let floor = slots.iter().filter(|s| s.run == run).map(|s| s.floor).max();
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
