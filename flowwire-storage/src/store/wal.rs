//! The embedded store's write-ahead log: one sequential append and one `fdatasync` per
//! committed batch.
//!
//! A redb commit writes its header and the B-tree paths it changed, pages scattered over
//! the file, and syncs them; on a virtio disk each scattered page costs about as much again
//! as the first. So [`RedbStore`](super::RedbStore) applies each batch in a redb
//! transaction, appends the batch to this log and syncs the log — the batch is durable when
//! the sync returns — and then commits the transaction *without* durability. Every so often a batch is committed to redb durably instead
//! (a checkpoint) and the log starts over from its beginning.
//!
//! Each redb commit records the number of its batch in the same transaction, so after a
//! crash the store knows which batches redb holds, and re-applies, in order, the logged
//! ones after them. Re-applying a batch to the state it was first applied to gives the same
//! results: the store's checks (versions, impulse ids, fences) read only that state.
//!
//! Layout: entries back to back from offset 0, each
//! `magic (u32) | payload length (u32) | batch number (u64) | CRC-32 (u32) | payload`, the
//! CRC over the number and the payload. The file is zero-filled ahead of the writes, so an
//! append changes no file metadata and `fdatasync` writes the entry's blocks only. After a
//! checkpoint the log is written from offset 0 again with higher numbers: reading stops at
//! the first entry that is torn, damaged, or does not continue the numbering, which is how
//! a fresh run ends where an older, longer one continues.

use std::fs::{File, OpenOptions};
use std::io;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};

/// Marks the start of an entry ("FWL1").
const MAGIC: u32 = 0x3146_574c;
/// Magic, length, number, CRC.
const HEADER: usize = 4 + 4 + 8 + 4;
/// The log grows by at least this much at a time (zero-filled and synced once).
const GROW: u64 = 4 << 20;

/// An entry read back: its batch number and payload.
pub(crate) type Entry = (u64, Vec<u8>);

/// The log file, positioned for the next append.
#[derive(Debug)]
pub(crate) struct Wal {
    file: File,
    path: PathBuf,
    /// Where the next entry goes.
    end: u64,
    /// The bytes of the file that are written (entries or zeros): appends below this
    /// change no metadata.
    filled: u64,
    /// An entry's header and payload, assembled for one write.
    buf: Vec<u8>,
}

impl Wal {
    /// Opens (or creates) the log at `path` and reads its entries: the run that starts at
    /// offset 0, up to the first entry that is torn, damaged or out of sequence. Bounded by
    /// the file's length; no length field is trusted beyond it.
    pub(crate) fn open(path: &Path) -> io::Result<(Self, Vec<Entry>)> {
        let file = OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(false)
            .open(path)?;
        // A new file's name must survive a crash too.
        if let Some(dir) = path.parent() {
            File::open(dir)?.sync_all()?;
        }
        let len = file.metadata()?.len();
        let mut entries: Vec<Entry> = Vec::new();
        let mut at = 0u64;
        let mut header = [0u8; HEADER];
        while at + HEADER as u64 <= len {
            file.read_exact_at(&mut header, at)?;
            let word = |i: usize| {
                u32::from_le_bytes([header[i], header[i + 1], header[i + 2], header[i + 3]])
            };
            if word(0) != MAGIC {
                break;
            }
            let size = u64::from(word(4));
            if size > len - at - HEADER as u64 {
                break;
            }
            let mut seq = [0u8; 8];
            seq.copy_from_slice(&header[8..16]);
            let seq = u64::from_le_bytes(seq);
            if entries
                .last()
                .is_some_and(|(prev, _)| seq != prev.wrapping_add(1))
            {
                break;
            }
            let Ok(size) = usize::try_from(size) else {
                break;
            };
            let mut payload = vec![0u8; size];
            file.read_exact_at(&mut payload, at + HEADER as u64)?;
            let mut crc = crc32fast::Hasher::new();
            crc.update(&header[8..16]);
            crc.update(&payload);
            if crc.finalize() != word(16) {
                break;
            }
            entries.push((seq, payload));
            at += (HEADER + size) as u64;
        }
        let wal = Self {
            file,
            path: path.to_path_buf(),
            end: 0,
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
        self.end
    }

    /// Appends batch `seq` and syncs it: when this returns `Ok`, the entry survives a
    /// crash. On an error the entry may or may not be in the log.
    pub(crate) fn append(&mut self, seq: u64, payload: &[u8]) -> io::Result<()> {
        let size = u32::try_from(payload.len())
            .map_err(|_| io::Error::new(io::ErrorKind::InvalidInput, "a batch over 4 GiB"))?;
        self.buf.clear();
        self.buf.extend_from_slice(&MAGIC.to_le_bytes());
        self.buf.extend_from_slice(&size.to_le_bytes());
        self.buf.extend_from_slice(&seq.to_le_bytes());
        let mut crc = crc32fast::Hasher::new();
        crc.update(&seq.to_le_bytes());
        crc.update(payload);
        self.buf.extend_from_slice(&crc.finalize().to_le_bytes());
        self.buf.extend_from_slice(payload);
        let end = self.end + self.buf.len() as u64;
        if end > self.filled {
            self.fill(end)?;
        }
        self.file.write_all_at(&self.buf, self.end)?;
        self.file.sync_data()?;
        self.end = end;
        // A long-lived buffer does not keep one huge batch's size.
        if self.buf.capacity() > GROW as usize {
            self.buf = Vec::new();
        }
        Ok(())
    }

    /// Starts the next run at offset 0 (everything logged so far is in redb durably).
    pub(crate) fn restart(&mut self) {
        self.end = 0;
    }

    /// Zero-fills the file up to at least `end` (in steps of [`GROW`]) and syncs it, size
    /// included: later appends below it then sync data blocks only.
    fn fill(&mut self, end: u64) -> io::Result<()> {
        let target = end.max(self.filled + GROW);
        let zeros = vec![0u8; 1 << 20];
        let mut at = self.filled;
        while at < target {
            let n = usize::try_from((target - at).min(zeros.len() as u64)).unwrap_or(zeros.len());
            self.file.write_all_at(&zeros[..n], at)?;
            at += n as u64;
        }
        self.file.sync_all()?;
        self.filled = target;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::Wal;

    fn payloads(entries: &[(u64, Vec<u8>)]) -> Vec<(u64, &[u8])> {
        entries.iter().map(|(s, p)| (*s, &p[..])).collect()
    }

    #[test]
    fn entries_appended_are_read_back_in_order_after_reopening() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("log");
        let (mut wal, entries) = Wal::open(&path).unwrap();
        assert!(entries.is_empty());
        wal.append(7, b"seven").unwrap();
        wal.append(8, b"").unwrap();
        wal.append(9, &[9u8; 5000]).unwrap();
        drop(wal);
        let (_, entries) = Wal::open(&path).unwrap();
        assert_eq!(
            payloads(&entries),
            [(7, &b"seven"[..]), (8, &b""[..]), (9, &[9u8; 5000][..])]
        );
    }

    #[test]
    fn a_torn_or_damaged_entry_ends_the_log() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("log");
        let (mut wal, _) = Wal::open(&path).unwrap();
        wal.append(1, b"one").unwrap();
        wal.append(2, b"two").unwrap();
        wal.append(3, b"three").unwrap();
        drop(wal);
        // Damage the second entry's payload: the first alone is read.
        let file = std::fs::OpenOptions::new().write(true).open(&path).unwrap();
        std::os::unix::fs::FileExt::write_all_at(&file, b"X", 20 + 3 + 20).unwrap();
        let (_, entries) = Wal::open(&path).unwrap();
        assert_eq!(payloads(&entries), [(1, &b"one"[..])]);
        // A file cut inside the first entry holds none.
        file.set_len(10).unwrap();
        let (_, entries) = Wal::open(&path).unwrap();
        assert!(entries.is_empty());
    }

    #[test]
    fn a_length_past_the_end_of_the_file_is_not_trusted() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("log");
        let (mut wal, _) = Wal::open(&path).unwrap();
        wal.append(1, b"one").unwrap();
        drop(wal);
        let file = std::fs::OpenOptions::new().write(true).open(&path).unwrap();
        std::os::unix::fs::FileExt::write_all_at(&file, &u32::MAX.to_le_bytes(), 4).unwrap();
        let (_, entries) = Wal::open(&path).unwrap();
        assert!(entries.is_empty());
    }

    #[test]
    fn after_a_restart_the_older_longer_run_is_not_read() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("log");
        let (mut wal, _) = Wal::open(&path).unwrap();
        for seq in 1..=5 {
            wal.append(seq, b"old run").unwrap();
        }
        wal.restart();
        wal.append(6, b"new").unwrap();
        wal.append(7, b"new").unwrap();
        drop(wal);
        let (_, entries) = Wal::open(&path).unwrap();
        assert_eq!(payloads(&entries), [(6, &b"new"[..]), (7, &b"new"[..])]);
    }

    #[test]
    fn the_file_is_filled_ahead_so_appends_do_not_grow_it() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("log");
        let (mut wal, _) = Wal::open(&path).unwrap();
        wal.append(1, b"x").unwrap();
        let len = std::fs::metadata(&path).unwrap().len();
        assert_eq!(len, super::GROW);
        for seq in 2..100 {
            wal.append(seq, &[0u8; 1000]).unwrap();
        }
        assert_eq!(std::fs::metadata(&path).unwrap().len(), len);
        assert_eq!(wal.len(), 98 * 1000 + 99 * 20 + 1);
    }
}
