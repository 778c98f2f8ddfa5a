//! The file-system calls the file tier makes, behind one seam: the real file system
//! ([`Real`]), or — in the power-loss tests — a simulated disk that keeps only what a
//! completed sync covered, directory entries included.
//!
//! The seam is as narrow as the tier's protocol: make a directory, write a new file and
//! sync it, rename it, sync a directory, remove, read. Each call is one step a power cut can
//! fall between, so the tests can cut the tier's put at every point.

use std::fmt;
use std::fs::{self, File, OpenOptions};
use std::io::{self, Read, Seek, SeekFrom, Write};
use std::path::{Path, PathBuf};
use std::time::Duration;

/// A file being written: appends, then one sync.
pub(crate) trait NewFile: Send {
    /// Appends all of `buf`.
    fn write_all(&mut self, buf: &[u8]) -> io::Result<()>;
    /// Makes the written bytes and the file's length durable (`fsync`).
    fn sync_all(&mut self) -> io::Result<()>;
    /// Asks the disk to start writing the bytes appended so far, without waiting for it and
    /// without promising anything: only [`sync_all`](Self::sync_all) makes them durable, and
    /// reports what went wrong. The default (a disk with no such call) does nothing.
    fn start_writeback(&mut self) {}
}

/// A file opened for reading.
pub(crate) trait ReadFile: Send {
    /// The file's length.
    fn len(&mut self) -> io::Result<u64>;
    /// Reads up to `cap` bytes from `offset`: fewer where the file ends. The caller bounds
    /// `cap` by [`len`](Self::len): it sizes the buffer.
    fn read(&mut self, offset: u64, cap: u64) -> io::Result<Vec<u8>>;
}

/// The calls the file tier makes on its disk.
pub(crate) trait Files: Send + Sync + fmt::Debug + 'static {
    /// Whether a directory exists at `path`.
    fn is_dir(&self, path: &Path) -> bool;
    /// Makes the directory `path` (its parent must exist); `AlreadyExists` if there is one.
    fn create_dir(&self, path: &Path) -> io::Result<()>;
    /// Makes the entries of the directory `path` durable (`fsync` of the directory).
    fn sync_dir(&self, path: &Path) -> io::Result<()>;
    /// Creates a new file at `path`, never opening one that exists (`AlreadyExists`).
    fn create_new(&self, path: &Path) -> io::Result<Box<dyn NewFile>>;
    /// Renames `from` to `to` in the same directory, replacing `to` atomically.
    fn rename(&self, from: &Path, to: &Path) -> io::Result<()>;
    /// Removes the file at `path` (`NotFound` if there is none).
    fn remove(&self, path: &Path) -> io::Result<()>;
    /// Opens the file at `path` for reading; `None` if there is none.
    fn open(&self, path: &Path) -> io::Result<Option<Box<dyn ReadFile>>>;
    /// The files in the directory `dir` whose names hold a `+` (the tier's temp files; no
    /// key holds one), each with how long ago it was last written. Blobs are not looked at.
    fn temp_files(&self, dir: &Path) -> io::Result<Vec<(PathBuf, Duration)>>;
}

/// The real file system.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Real;

impl NewFile for File {
    fn write_all(&mut self, buf: &[u8]) -> io::Result<()> {
        Write::write_all(self, buf)
    }
    fn sync_all(&mut self) -> io::Result<()> {
        File::sync_all(self)
    }
    #[cfg(target_os = "linux")]
    fn start_writeback(&mut self) {
        start_writeback(self);
    }
}

/// `sync_file_range(fd, 0, 0, SYNC_FILE_RANGE_WRITE)`: starts the writeback of the file's
/// dirty pages that are not being written yet, and returns (it waits only where the disk's
/// request queue is full). It makes nothing durable: no metadata, no disk cache flush. Its
/// result is not looked at: the `fsync` that follows reports any failure to write.
#[cfg(target_os = "linux")]
#[allow(unsafe_code)]
fn start_writeback(file: &File) {
    use std::os::fd::AsRawFd;
    // SAFETY: the call reads no memory of this process: it takes a descriptor, which
    // `file` keeps open for the call's duration, and three integers.
    let _ = unsafe { libc::sync_file_range(file.as_raw_fd(), 0, 0, libc::SYNC_FILE_RANGE_WRITE) };
}

impl ReadFile for File {
    fn len(&mut self) -> io::Result<u64> {
        Ok(self.metadata()?.len())
    }
    fn read(&mut self, offset: u64, cap: u64) -> io::Result<Vec<u8>> {
        // `cap` comes from the tier, already bounded by the file's length.
        let mut buf = Vec::with_capacity(usize::try_from(cap).unwrap_or(usize::MAX));
        if cap > 0 {
            self.seek(SeekFrom::Start(offset))?;
            Read::by_ref(self).take(cap).read_to_end(&mut buf)?;
        }
        Ok(buf)
    }
}

impl Files for Real {
    fn is_dir(&self, path: &Path) -> bool {
        path.is_dir()
    }
    fn create_dir(&self, path: &Path) -> io::Result<()> {
        fs::create_dir(path)
    }
    fn sync_dir(&self, path: &Path) -> io::Result<()> {
        File::open(path)?.sync_all()
    }
    fn create_new(&self, path: &Path) -> io::Result<Box<dyn NewFile>> {
        let file = OpenOptions::new().write(true).create_new(true).open(path)?;
        Ok(Box::new(file))
    }
    fn rename(&self, from: &Path, to: &Path) -> io::Result<()> {
        fs::rename(from, to)
    }
    fn remove(&self, path: &Path) -> io::Result<()> {
        fs::remove_file(path)
    }
    fn open(&self, path: &Path) -> io::Result<Option<Box<dyn ReadFile>>> {
        match File::open(path) {
            Ok(f) => Ok(Some(Box::new(f))),
            Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(None),
            Err(e) => Err(e),
        }
    }
    fn temp_files(&self, dir: &Path) -> io::Result<Vec<(PathBuf, Duration)>> {
        let mut out = Vec::new();
        for entry in fs::read_dir(dir)? {
            let entry = entry?;
            if !entry.file_name().as_encoded_bytes().contains(&b'+') {
                continue;
            }
            // A temp file its put renamed or removed since the listing is not a stray. Its
            // age is by the wall clock, the clock file times are kept in; a time ahead of
            // the clock reads as just written.
            match entry.metadata().and_then(|m| m.modified()) {
                Ok(written) => out.push((entry.path(), written.elapsed().unwrap_or_default())),
                Err(e) if e.kind() == io::ErrorKind::NotFound => {}
                Err(e) => return Err(e),
            }
        }
        Ok(out)
    }
}

/// Creates `dir` and its missing ancestors, each made durable in its parent: a directory
/// entry is data of the directory that holds it, and an fsync of a file in a new directory
/// does not make the directory's own entry durable on every file system. A directory that
/// exists is taken as durable (on a put's path); see [`make_durable_dir`] for where it may
/// not be.
pub(crate) fn ensure_dir(files: &dyn Files, dir: &Path) -> io::Result<()> {
    if files.is_dir(dir) {
        return Ok(());
    }
    let mut missing = Vec::new();
    let mut at = Some(dir);
    while let Some(d) = at.filter(|d| !d.as_os_str().is_empty() && !files.is_dir(d)) {
        missing.push(d);
        at = d.parent();
    }
    for d in missing.iter().rev() {
        make_dir(files, d)?;
    }
    for d in missing.iter().rev() {
        files.sync_dir(parent_of(d))?;
    }
    Ok(())
}

/// Makes the directory `dir`, which another put may have made first; whether this call
/// made it.
pub(crate) fn make_dir(files: &dyn Files, dir: &Path) -> io::Result<bool> {
    match files.create_dir(dir) {
        Ok(()) => Ok(true),
        Err(e) if e.kind() == io::ErrorKind::AlreadyExists && files.is_dir(dir) => Ok(false),
        Err(e) => Err(e),
    }
}

/// Makes `dir` and its missing ancestors, then syncs every directory that holds one of
/// them, up to the file system's root (or the working directory, for a relative path):
/// when it returns, `dir` survives a power cut even if a process killed earlier made part
/// of the path and never synced it. For what is opened once (a tier's first put, a data
/// directory), never on a step's path.
pub(crate) fn make_durable_dir(files: &dyn Files, dir: &Path) -> io::Result<()> {
    ensure_dir(files, dir)?;
    let mut at = dir;
    loop {
        let parent = parent_of(at);
        if parent == at {
            return Ok(());
        }
        files.sync_dir(parent)?;
        at = parent;
    }
}

/// The directory holding `path`: `.` for a relative path of one component, `/` for `/`.
pub(crate) fn parent_of(path: &Path) -> &Path {
    match path.parent() {
        Some(p) if p.as_os_str().is_empty() => Path::new("."),
        Some(p) => p,
        None => path,
    }
}
