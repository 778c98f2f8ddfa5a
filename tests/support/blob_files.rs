//! Counting what a file-system tier holds, for tests that watch blobs come and go.

use std::path::Path;

/// Blob files under a file-system tier's directory (its fan-out folders), temporary files
/// of a write in progress left out.
pub fn blob_files(dir: &Path) -> usize {
    let Ok(fans) = std::fs::read_dir(dir) else {
        return 0;
    };
    fans.flat_map(|f| std::fs::read_dir(f.unwrap().path()).unwrap())
        .filter(|f| {
            !f.as_ref()
                .unwrap()
                .file_name()
                .to_string_lossy()
                .contains(".tmp.")
        })
        .count()
}
