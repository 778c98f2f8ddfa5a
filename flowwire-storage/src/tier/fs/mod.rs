//! The local-disk tier: one file per blob under a root directory.
//!
//! Layout: `root/<fan-out>/<key with '/' written as '@'>`, where the fan-out directory is
//! two hex digits of the key's CRC-32 (256 directories, so no directory grows past what
//! file systems list quickly). A put writes a new file `<name>+<64 random bits in hex>`,
//! fsyncs it, renames it over the final name and fsyncs the directory: a reader sees the
//! old blob or the new one, and a crash leaves at most a stray temp file, which the first
//! put of a later handle sweeps once it is [an hour](FsTier::STRAY_AFTER) old. A temp name holds
//! a `+`, which no key may, so it is never a blob's name; and a temp file is only ever
//! created new, so a put never writes into a file it did not make (two processes on a
//! shared mount, or a stray file of a crashed one).
//! A directory the put creates (the root, a fan-out directory) is fsynced into its parent
//! first; a handle's first put makes all 256 fan-out directories at once.
//! A delete removes the file and fsyncs its directory, also when the file was already gone
//! (an earlier delete may have been interrupted before its sync): once it returns, a power
//! cut does not bring the blob back. (The ladder deletes what no kept record refers to and
//! then forgets it: a blob that came back would stay on disk for good.) All file I/O runs
//! on tokio's blocking pool, through the seam in `files.rs`; `power_loss.rs` cuts the
//! power under every call of a put and of a delete.

use std::io;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::Duration;

use bytes::Bytes;

use self::files::{Files, Real, ensure_dir, make_dir, make_durable_dir};
use super::{BlobTier, TierError, check_key};
use crate::join::BoxFuture;

pub(crate) mod files;
#[cfg(test)]
mod power_loss;
#[cfg(test)]
mod sim;

/// Blobs as files in a directory on a local (fast) disk.
///
/// ```
/// # tokio::runtime::Builder::new_multi_thread().build().unwrap().block_on(async {
/// use flowwire::storage::tier::{BlobTier, FsTier, TierExt};
/// let dir = tempfile::tempdir().unwrap();
/// let tier = FsTier::new(dir.path());
/// tier.put_bytes("order/o-1/2.s", "state".into()).await?;
/// assert!(tier.exists("order/o-1/2.s").await?);
/// # Ok::<(), flowwire::storage::tier::TierError>(()) }).unwrap();
/// ```
#[derive(Debug, Clone)]
pub struct FsTier {
    files: Arc<dyn Files>,
    root: Arc<PathBuf>,
    shared: bool,
    seq: Arc<AtomicU64>,
    /// Turns `seq` into this handle's temp names.
    salt: Arc<std::hash::RandomState>,
    /// Whether every fan-out directory exists (made by this handle's first put).
    fanned: Arc<AtomicBool>,
    /// Whether this handle has started its sweep of stray temp files.
    swept: Arc<AtomicBool>,
}

impl FsTier {
    /// How long a temp file must have gone unwritten before a sweep takes it for the
    /// leftover of a put a crash cut short. A put writes its temp file from start to end and
    /// renames it within its own timeout; an hour is far past any.
    pub const STRAY_AFTER: Duration = Duration::from_hours(1);

    /// A tier rooted at `root` (created on first write).
    pub fn new(root: impl Into<PathBuf>) -> Self {
        Self::on(Arc::new(Real), root.into())
    }

    /// A tier rooted at `root` on `files` (the real file system, or a simulated disk).
    fn on(files: Arc<dyn Files>, root: PathBuf) -> Self {
        Self {
            files,
            root: Arc::new(root),
            shared: false,
            seq: Arc::new(AtomicU64::new(0)),
            salt: Arc::new(std::hash::RandomState::new()),
            fanned: Arc::new(AtomicBool::new(false)),
            swept: Arc::new(AtomicBool::new(false)),
        }
    }

    /// Declares the directory a mount that every process of the deployment sees.
    #[must_use]
    pub fn shared(mut self) -> Self {
        self.shared = true;
        self
    }

    /// The root directory.
    pub fn root(&self) -> &Path {
        &self.root
    }

    /// Where the blob under `key` lives.
    pub fn path_of(&self, key: &str) -> PathBuf {
        let fan = crc32fast::hash(key.as_bytes()) & 0xff;
        self.root
            .join(format!("{fan:02x}"))
            .join(key.replace('/', "@"))
    }

    /// Removes the temp files that puts cut short by a crash left behind (`<name>+<16 hex
    /// digits>`, unwritten for [`STRAY_AFTER`](Self::STRAY_AFTER)), and returns how many it removed. A handle's
    /// first put starts this in the background; it is public for operators and tests. A
    /// temp file written more recently may be a put in progress (of this process or, on a
    /// shared mount, another) and is left alone.
    ///
    /// ```
    /// # tokio::runtime::Builder::new_multi_thread().build().unwrap().block_on(async {
    /// use flowwire::storage::tier::{FsTier, TierExt};
    /// let dir = tempfile::tempdir().unwrap();
    /// let tier = FsTier::new(dir.path());
    /// tier.put_bytes("order/o-1/2.s", "state".into()).await?;
    /// assert_eq!(tier.sweep_strays().await?, 0);
    /// # Ok::<(), flowwire::storage::tier::TierError>(()) }).unwrap();
    /// ```
    pub async fn sweep_strays(&self) -> Result<usize, TierError> {
        let (files, root) = (self.files.clone(), self.root.clone());
        match tokio::task::spawn_blocking(move || sweep(&*files, &root, Self::STRAY_AFTER)).await {
            Ok(r) => r.map_err(io_error),
            Err(e) => Err(TierError::unavailable(
                "fs",
                format!("I/O task failed: {e}"),
            )),
        }
    }

    /// Starts [`sweep_strays`](Self::sweep_strays) in the background, once per handle.
    fn sweep_once(&self) {
        if self.swept.swap(true, Ordering::AcqRel) {
            return;
        }
        let tier = self.clone();
        tokio::spawn(async move {
            match tier.sweep_strays().await {
                Ok(0) => {}
                Ok(n) => {
                    tracing::info!(root = %tier.root.display(), removed = n, "stray temp files of interrupted puts removed");
                }
                Err(e) => {
                    tracing::warn!(root = %tier.root.display(), error = %e, "stray temp files not swept");
                }
            }
        });
    }

    fn blocking<T: Send + 'static>(
        &self,
        key: &str,
        f: impl FnOnce(&dyn Files, PathBuf) -> io::Result<T> + Send + 'static,
    ) -> BoxFuture<'static, Result<T, TierError>> {
        let checked = check_key(key).map(|()| self.path_of(key));
        let files = self.files.clone();
        Box::pin(async move {
            let path = checked?;
            match tokio::task::spawn_blocking(move || f(&*files, path)).await {
                Ok(r) => r.map_err(io_error),
                Err(e) => Err(TierError::unavailable(
                    "fs",
                    format!("I/O task failed: {e}"),
                )),
            }
        })
    }
}

fn io_error(e: io::Error) -> TierError {
    match e.kind() {
        io::ErrorKind::PermissionDenied | io::ErrorKind::ReadOnlyFilesystem => {
            TierError::rejected("fs", e)
        }
        _ => TierError::unavailable("fs", e),
    }
}

/// Makes the root and its 256 fan-out directories, durably, with one fsync of the root for
/// all of them: otherwise the first put into each directory would make it and fsync the
/// root for it, on the step's path (traced under strace: the `mkdir` alone took 0.13 ms of
/// a 2 MiB pack's put). The syncs are made whether or not this handle made the
/// directories: a process killed between its `mkdir`s and their sync leaves directories
/// that exist but whose entries a power cut can still take, with every blob put in them
/// later (found by `power_loss.rs`).
fn fan_out(files: &dyn Files, root: &Path) -> io::Result<()> {
    make_durable_dir(files, root)?;
    for fan in 0..=0xffu32 {
        make_dir(files, &root.join(format!("{fan:02x}")))?;
    }
    files.sync_dir(root)
}

/// The most bytes one `write` call copies into the page cache. Measured on this project's
/// test VM (2026-12-03): a 32 MiB pack written in one call took 8 ms while the page cache
/// had room it had used recently, and 60-70 ms once it did not (after a few hundred MiB of
/// other files were deleted); written 512 KiB at a time, 8 ms throughout. Why one large
/// call is slow there is not established (large page-cache folios taken from memory the
/// host reclaimed is a guess); pieces cost nothing measurable either way.
///
/// Each piece's writeback is started once it is copied, so the disk writes it while the
/// next is copied and the closing `fsync` waits for little more than the last piece. The
/// same VM, a 2 MiB blob (the pieces, `fsync`, rename, directory `fsync`; medians of 40,
/// four rounds): 1.4-1.8 ms with writeback started per piece, 2.0-2.3 ms without, and
/// 1.7-1.9 ms for one `write` and `fdatasync` of a new file.
const WRITE_PIECE: usize = 512 * 1024;

/// Whether `name` is a temp file's: a key's name (no `+` in it), `+`, 16 hex digits.
fn is_temp(name: &std::ffi::OsStr) -> bool {
    let name = name.as_encoded_bytes();
    name.len() > 17
        && name[name.len() - 17] == b'+'
        && name[name.len() - 16..].iter().all(u8::is_ascii_hexdigit)
        && !name[..name.len() - 17].contains(&b'+')
}

/// Removes the temp files in the fan-out directories under `root` unwritten for at least
/// `after`; how many it removed. A root with no fan-out yet has none.
fn sweep(files: &dyn Files, root: &Path, after: Duration) -> io::Result<usize> {
    let mut removed = 0;
    for fan in 0..=0xffu32 {
        let dir = root.join(format!("{fan:02x}"));
        if !files.is_dir(&dir) {
            continue;
        }
        for (path, age) in files.temp_files(&dir)? {
            if age < after || !path.file_name().is_some_and(is_temp) {
                continue;
            }
            match files.remove(&path) {
                Ok(()) => removed += 1,
                // Renamed or removed by its put, or by another sweep.
                Err(e) if e.kind() == io::ErrorKind::NotFound => {}
                Err(e) => return Err(e),
            }
        }
    }
    Ok(removed)
}

fn write_blob(files: &dyn Files, path: &Path, tmp: &Path, parts: &[Bytes]) -> io::Result<()> {
    let dir = path.parent().expect("blob paths have a fan-out directory");
    ensure_dir(files, dir)?;
    // Outside the clean-up below: a file this put did not create is not its to remove.
    let mut f = files.create_new(tmp)?;
    let written = (|| {
        // Bytes written since the last writeback was started.
        let mut unstarted = 0;
        for p in parts {
            for piece in p.chunks(WRITE_PIECE) {
                f.write_all(piece)?;
                unstarted += piece.len();
                if unstarted >= WRITE_PIECE {
                    // The disk writes these bytes while the next are copied, and the sync
                    // waits for the last piece only (see [`WRITE_PIECE`]).
                    f.start_writeback();
                    unstarted = 0;
                }
            }
        }
        f.sync_all()?;
        drop(f);
        files.rename(tmp, path)?;
        files.sync_dir(dir)
    })();
    if written.is_err() {
        let _ = files.remove(tmp);
    }
    written
}

impl BlobTier for FsTier {
    fn put<'a>(&'a self, key: &'a str, parts: &'a [Bytes]) -> BoxFuture<'a, Result<(), TierError>> {
        let parts: Vec<Bytes> = parts.to_vec();
        let n = self.seq.fetch_add(1, Ordering::Relaxed);
        let nonce = std::hash::BuildHasher::hash_one(&*self.salt, n);
        let (root, fanned) = (self.root.clone(), self.fanned.clone());
        let put = self.blocking(key, move |files, path| {
            if !fanned.load(Ordering::Acquire) {
                fan_out(files, &root)?;
                fanned.store(true, Ordering::Release);
            }
            let mut tmp = path.clone().into_os_string();
            tmp.push(format!("+{nonce:016x}"));
            write_blob(files, &path, Path::new(&tmp), &parts)
        });
        Box::pin(async move {
            put.await?;
            // After the first put, off its path: the fan-out directories exist by then.
            self.sweep_once();
            Ok(())
        })
    }

    fn get<'a>(
        &'a self,
        key: &'a str,
        expect: Option<u64>,
    ) -> BoxFuture<'a, Result<Option<Bytes>, TierError>> {
        self.blocking(key, move |files, path| {
            let Some(mut f) = files.open(&path)? else {
                return Ok(None);
            };
            let size = f.len()?;
            // Read at most one byte past what the caller expects: a longer file is damage,
            // and reading it whole would trust a length the caller did not give.
            let cap = expect.map_or(size, |e| size.min(e.saturating_add(1)));
            Ok(Some(Bytes::from(f.read(0, cap)?)))
        })
    }

    fn get_range<'a>(
        &'a self,
        key: &'a str,
        offset: u64,
        len: u64,
    ) -> BoxFuture<'a, Result<Option<Bytes>, TierError>> {
        self.blocking(key, move |files, path| {
            let Some(mut f) = files.open(&path)? else {
                return Ok(None);
            };
            let size = f.len()?;
            let (start, end) =
                super::clamp(usize::try_from(size).unwrap_or(usize::MAX), offset, len);
            Ok(Some(Bytes::from(
                f.read(start as u64, (end - start) as u64)?,
            )))
        })
    }

    fn delete<'a>(&'a self, key: &'a str) -> BoxFuture<'a, Result<(), TierError>> {
        self.blocking(key, |files, path| {
            match files.remove(&path) {
                Err(e) if e.kind() != io::ErrorKind::NotFound => return Err(e),
                _ => {}
            }
            // The removal is an entry of the directory: durable once the directory is
            // synced. Synced even when the file was gone already, which an earlier delete
            // interrupted between the two may have left unsynced.
            match files.sync_dir(files::parent_of(&path)) {
                // No directory: the blob was never written.
                Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(()),
                synced => synced,
            }
        })
    }

    fn is_shared(&self) -> bool {
        self.shared
    }
}
