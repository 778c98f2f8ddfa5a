//! The local-disk tier: one file per blob under a root directory.
//!
//! Layout: `root/<fan-out>/<key with '/' written as '@'>`, where the fan-out directory is
//! two hex digits of the key's CRC-32 (256 directories, so no directory grows past what
//! file systems list quickly). A put writes `<name>.tmp.<pid>.<n>`, fsyncs it, renames it
//! over the final name and fsyncs the directory: a reader sees the old blob or the new one,
//! and a crash leaves at most a stray temp file, whose name never collides with a blob's.
//! A directory the put creates (the root, a fan-out directory) is fsynced into its parent
//! first; a handle's first put makes all 256 fan-out directories at once.
//! All file I/O runs on tokio's blocking pool.

use std::fs::{self, File};
use std::io::{self, Read, Write};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

use bytes::Bytes;

use super::{BlobTier, TierError, check_key};
use crate::join::BoxFuture;

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
    root: Arc<PathBuf>,
    shared: bool,
    seq: Arc<AtomicU64>,
    /// Whether every fan-out directory exists (made by this handle's first put).
    fanned: Arc<std::sync::atomic::AtomicBool>,
}

impl FsTier {
    /// A tier rooted at `root` (created on first write).
    pub fn new(root: impl Into<PathBuf>) -> Self {
        Self {
            root: Arc::new(root.into()),
            shared: false,
            seq: Arc::new(AtomicU64::new(0)),
            fanned: Arc::new(std::sync::atomic::AtomicBool::new(false)),
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

    fn blocking<T: Send + 'static>(
        &self,
        key: &str,
        f: impl FnOnce(PathBuf) -> io::Result<T> + Send + 'static,
    ) -> BoxFuture<'static, Result<T, TierError>> {
        let checked = check_key(key).map(|()| self.path_of(key));
        Box::pin(async move {
            let path = checked?;
            match tokio::task::spawn_blocking(move || f(path)).await {
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

/// Creates `dir` and its missing ancestors, each made durable in its parent: a directory
/// entry is data of the directory that holds it, and an fsync of a file in a new directory
/// does not make the directory's own entry durable on every file system.
fn ensure_dir(dir: &Path) -> io::Result<()> {
    if dir.is_dir() {
        return Ok(());
    }
    let mut missing = Vec::new();
    let mut at = Some(dir);
    while let Some(d) = at.filter(|d| !d.exists()) {
        missing.push(d);
        at = d.parent();
    }
    fs::create_dir_all(dir)?;
    for d in missing.iter().rev() {
        if let Some(parent) = d.parent().filter(|p| !p.as_os_str().is_empty()) {
            File::open(parent)?.sync_all()?;
        }
    }
    Ok(())
}

/// Makes the root and its 256 fan-out directories, durably, with one fsync of the root for
/// all of them: otherwise the first put into each directory would make it and fsync the
/// root for it, on the step's path (traced under strace: the `mkdir` alone took 0.13 ms of
/// a 2 MiB pack's put).
fn fan_out(root: &Path) -> io::Result<()> {
    ensure_dir(root)?;
    let mut made = false;
    for fan in 0..=0xffu32 {
        match fs::create_dir(root.join(format!("{fan:02x}"))) {
            Ok(()) => made = true,
            Err(e) if e.kind() == io::ErrorKind::AlreadyExists => {}
            Err(e) => return Err(e),
        }
    }
    if made {
        File::open(root)?.sync_all()?;
    }
    Ok(())
}

/// The most bytes one `write` call copies into the page cache. Measured on this project's
/// test VM (2026-12-03): a 32 MiB pack written in one call took 8 ms while the page cache
/// had room it had used recently, and 60-70 ms once it did not (after a few hundred MiB of
/// other files were deleted); written 512 KiB at a time, 8 ms throughout. Why one large
/// call is slow there is not established (large page-cache folios taken from memory the
/// host reclaimed is a guess); pieces cost nothing measurable either way.
const WRITE_PIECE: usize = 512 * 1024;

fn write_blob(path: &Path, tmp: &Path, parts: &[Bytes]) -> io::Result<()> {
    let dir = path.parent().expect("blob paths have a fan-out directory");
    ensure_dir(dir)?;
    let written = (|| {
        let mut f = File::create(tmp)?;
        for p in parts {
            for piece in p.chunks(WRITE_PIECE) {
                f.write_all(piece)?;
            }
        }
        f.sync_all()?;
        fs::rename(tmp, path)?;
        File::open(dir)?.sync_all()
    })();
    if written.is_err() {
        let _ = fs::remove_file(tmp);
    }
    written
}

impl BlobTier for FsTier {
    fn put<'a>(&'a self, key: &'a str, parts: &'a [Bytes]) -> BoxFuture<'a, Result<(), TierError>> {
        let parts: Vec<Bytes> = parts.to_vec();
        let n = self.seq.fetch_add(1, Ordering::Relaxed);
        let (root, fanned) = (self.root.clone(), self.fanned.clone());
        self.blocking(key, move |path| {
            if !fanned.load(Ordering::Acquire) {
                fan_out(&root)?;
                fanned.store(true, Ordering::Release);
            }
            let mut tmp = path.clone().into_os_string();
            tmp.push(format!(".tmp.{}.{n}", std::process::id()));
            write_blob(&path, Path::new(&tmp), &parts)
        })
    }

    fn get<'a>(
        &'a self,
        key: &'a str,
        expect: Option<u64>,
    ) -> BoxFuture<'a, Result<Option<Bytes>, TierError>> {
        self.blocking(key, move |path| {
            let f = match File::open(&path) {
                Ok(f) => f,
                Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(None),
                Err(e) => return Err(e),
            };
            let size = f.metadata()?.len();
            // Read at most one byte past what the caller expects: a longer file is damage,
            // and reading it whole would trust a length the caller did not give.
            let cap = expect.map_or(size, |e| size.min(e.saturating_add(1)));
            let mut buf = Vec::with_capacity(usize::try_from(cap).unwrap_or(usize::MAX));
            f.take(cap).read_to_end(&mut buf)?;
            Ok(Some(Bytes::from(buf)))
        })
    }

    fn get_range<'a>(
        &'a self,
        key: &'a str,
        offset: u64,
        len: u64,
    ) -> BoxFuture<'a, Result<Option<Bytes>, TierError>> {
        self.blocking(key, move |path| {
            use std::io::{Seek, SeekFrom};
            let mut f = match File::open(&path) {
                Ok(f) => f,
                Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(None),
                Err(e) => return Err(e),
            };
            // The buffer is sized by the file, never by the caller's length alone.
            let size = f.metadata()?.len();
            let (start, end) =
                super::clamp(usize::try_from(size).unwrap_or(usize::MAX), offset, len);
            let mut buf = Vec::with_capacity(end - start);
            f.seek(SeekFrom::Start(start as u64))?;
            f.take((end - start) as u64).read_to_end(&mut buf)?;
            Ok(Some(Bytes::from(buf)))
        })
    }

    fn delete<'a>(&'a self, key: &'a str) -> BoxFuture<'a, Result<(), TierError>> {
        self.blocking(key, |path| match fs::remove_file(&path) {
            Err(e) if e.kind() != io::ErrorKind::NotFound => Err(e),
            _ => Ok(()),
        })
    }

    fn is_shared(&self) -> bool {
        self.shared
    }
}
