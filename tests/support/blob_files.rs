//! Counting what a file-system tier holds, for tests that watch blobs come and go.

#![allow(dead_code)] // each test uses a part

use std::path::{Path, PathBuf};

/// Blob files under a file-system tier's directory (its fan-out folders), temporary files
/// of a write in progress left out.
pub fn blob_files(dir: &Path) -> usize {
    blob_paths(dir).len()
}

/// The paths of those files, sorted.
pub fn blob_paths(dir: &Path) -> Vec<PathBuf> {
    let Ok(fans) = std::fs::read_dir(dir) else {
        return Vec::new();
    };
    let mut files: Vec<PathBuf> = fans
        .flat_map(|f| std::fs::read_dir(f.unwrap().path()).unwrap())
        .map(|f| f.unwrap().path())
        .filter(|p| {
            !p.file_name()
                .is_some_and(|n| n.to_string_lossy().contains(".tmp."))
        })
        .collect();
    files.sort();
    files
}
