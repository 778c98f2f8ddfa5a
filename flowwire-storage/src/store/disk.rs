//! Where the embedded store's two files live: the real file system ([`Fs`]), or — in the
//! power-loss tests — a simulated disk that keeps only what a completed sync covered.
//!
//! redb reads and writes its file through its own `StorageBackend` seam; the log through
//! [`LogFile`]. A [`Disk`] hands out both, so one simulated disk holds the two files and a
//! power cut takes the unsynced writes of both at the same instant.

use std::fmt;
use std::fs::{File, OpenOptions};
use std::io;
use std::os::unix::fs::FileExt;
use std::path::Path;

/// A log file: positioned reads and writes, and the two syncs.
pub(crate) trait LogFile: Send + Sync + fmt::Debug {
    /// The file's length.
    fn len(&self) -> io::Result<u64>;
    /// Fills `buf` from `offset` (an error if the file ends first).
    fn read_at(&self, buf: &mut [u8], offset: u64) -> io::Result<()>;
    /// Writes all of `buf` at `offset`.
    fn write_at(&self, buf: &[u8], offset: u64) -> io::Result<()>;
    /// Makes the written bytes durable (`fdatasync`).
    fn sync_data(&self) -> io::Result<()>;
    /// Makes the written bytes and the file's length durable (`fsync`).
    fn sync_all(&self) -> io::Result<()>;
}

impl LogFile for File {
    fn len(&self) -> io::Result<u64> {
        Ok(self.metadata()?.len())
    }
    fn read_at(&self, buf: &mut [u8], offset: u64) -> io::Result<()> {
        self.read_exact_at(buf, offset)
    }
    fn write_at(&self, buf: &[u8], offset: u64) -> io::Result<()> {
        self.write_all_at(buf, offset)
    }
    fn sync_data(&self) -> io::Result<()> {
        File::sync_data(self)
    }
    fn sync_all(&self) -> io::Result<()> {
        File::sync_all(self)
    }
}

/// Where the store file and its log are opened.
pub(crate) trait Disk: Send + Sync + fmt::Debug {
    /// The store file's backend for redb, or `None` to let redb open `path` itself (with its
    /// file lock).
    fn store_backend(&self, path: &Path) -> io::Result<Option<Box<dyn redb::StorageBackend>>>;
    /// Whether a file exists at `path`.
    fn exists(&self, path: &Path) -> io::Result<bool>;
    /// Opens the log at `path`, its name (and those of the other files in its directory)
    /// durable; with `create`, a new empty file (replacing any file there).
    fn open_log(&self, path: &Path, create: bool) -> io::Result<Box<dyn LogFile>>;
    /// Renames `from` to `to` (replacing it), atomically and durably.
    fn rename(&self, from: &Path, to: &Path) -> io::Result<()>;
    /// Removes the file at `path`, if there is one.
    fn remove(&self, path: &Path) -> io::Result<()>;
}

/// Syncs the directory holding `path`, so that a name made or changed there survives a
/// crash.
fn sync_dir(path: &Path) -> io::Result<()> {
    let dir = match path.parent() {
        Some(dir) if !dir.as_os_str().is_empty() => dir,
        _ => Path::new("."),
    };
    File::open(dir)?.sync_all()
}

/// The real file system.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Fs;

impl Disk for Fs {
    fn store_backend(&self, _: &Path) -> io::Result<Option<Box<dyn redb::StorageBackend>>> {
        Ok(None)
    }

    fn exists(&self, path: &Path) -> io::Result<bool> {
        path.try_exists()
    }

    fn open_log(&self, path: &Path, create: bool) -> io::Result<Box<dyn LogFile>> {
        let file = OpenOptions::new()
            .read(true)
            .write(true)
            .create(create)
            .truncate(create)
            .open(path)?;
        // A new file's name must survive a power cut too. An existing one's as well: a
        // process killed after it made the log (or renamed a new store file into place)
        // and before it synced their directory left names the disk may not hold, and
        // this process is about to acknowledge commits in them. The log is opened once
        // per open of the store, so the sync is off every step's path.
        sync_dir(path)?;
        Ok(Box::new(file))
    }

    fn rename(&self, from: &Path, to: &Path) -> io::Result<()> {
        std::fs::rename(from, to)?;
        sync_dir(to)
    }

    fn remove(&self, path: &Path) -> io::Result<()> {
        match std::fs::remove_file(path) {
            Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(()),
            r => r,
        }
    }
}

/// A boxed backend, handed to redb (which takes a backend by value).
#[derive(Debug)]
pub(crate) struct Boxed(pub Box<dyn redb::StorageBackend>);

impl redb::StorageBackend for Boxed {
    fn len(&self) -> io::Result<u64> {
        self.0.len()
    }
    fn read(&self, offset: u64, out: &mut [u8]) -> io::Result<()> {
        self.0.read(offset, out)
    }
    fn set_len(&self, len: u64) -> io::Result<()> {
        self.0.set_len(len)
    }
    fn sync_data(&self) -> io::Result<()> {
        self.0.sync_data()
    }
    fn write(&self, offset: u64, data: &[u8]) -> io::Result<()> {
        self.0.write(offset, data)
    }
    fn close(&self) -> io::Result<()> {
        self.0.close()
    }
}
