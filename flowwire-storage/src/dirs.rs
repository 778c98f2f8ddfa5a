//! Directories made durably.
//!
//! A directory's entry is data of the directory that holds it: a new directory, or a file
//! created in one, survives a power cut only once that parent is fsynced, and an fsync of
//! the file alone does not do it on every file system. The engine makes its data directory
//! with [`create`], and the embedded tier its file's directory; the file tier does the same
//! through its own seam, where its power-loss simulation tests it.

use std::io;
use std::path::Path;

use crate::tier::fs::files::{Files, Real, make_durable_dir, parent_of};

/// Makes `dir` and its missing ancestors, then fsyncs every directory that holds one of
/// them, up to the file system's root (or the working directory, for a relative path). When
/// it returns, `dir` survives a power cut, even if a process killed earlier made part of
/// the path and never synced it. A few fsyncs: for what is opened once, not for a hot path.
///
/// ```
/// let tmp = tempfile::tempdir().unwrap();
/// let dir = tmp.path().join("flowwire-data").join("blobs");
/// flowwire::storage::dirs::create(&dir)?;
/// assert!(dir.is_dir());
/// flowwire::storage::dirs::create(&dir)?; // there already: synced again, no error
/// # Ok::<(), std::io::Error>(())
/// ```
pub fn create(dir: &Path) -> io::Result<()> {
    make_durable_dir(&Real, dir)
}

/// Fsyncs the directory that holds `path`, so that the name of a file just created there
/// survives a power cut.
///
/// ```
/// let tmp = tempfile::tempdir().unwrap();
/// let file = tmp.path().join("made.bin");
/// std::fs::write(&file, b"bytes")?;
/// std::fs::File::open(&file)?.sync_all()?;
/// flowwire::storage::dirs::sync_parent(&file)?;
/// # Ok::<(), std::io::Error>(())
/// ```
pub fn sync_parent(path: &Path) -> io::Result<()> {
    Real.sync_dir(parent_of(path))
}
