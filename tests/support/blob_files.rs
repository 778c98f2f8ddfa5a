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

/// The keys of the blobs (chunks included) that `key`'s record and kept history entries
/// refer to, sorted, each once.
pub async fn referenced(
    store: &flowwire::storage::RedbStore,
    key: &flowwire::storage::InstanceKey,
) -> Vec<String> {
    use flowwire::storage::record::{HistoryEntry, PlacedRecord};
    use flowwire::storage::{InstanceStore, MIB, Payload};
    let stored = store.load(key).await.unwrap().unwrap();
    let record = PlacedRecord::decode(&stored.bytes, key, 64 * MIB).unwrap();
    let mut payloads = vec![record.record.state.clone()];
    for (_, bytes) in store.history(key, 0, 1_000).await.unwrap() {
        let entry = HistoryEntry::decode(&bytes, key, 64 * MIB).unwrap();
        payloads.extend(entry.state.into_iter().chain(entry.payload));
    }
    let mut keys: Vec<String> = payloads
        .iter()
        .flat_map(|p: &Payload| p.blobs(key))
        .map(|b| b.key.to_string())
        .collect();
    keys.sort();
    keys.dedup();
    keys
}

/// How many chunk files under a file tier at `dir` no key of `wanted` names, after checking
/// that every key of `wanted` has its file.
pub fn unreferenced(dir: &Path, wanted: &[String]) -> usize {
    let names: std::collections::BTreeSet<String> = blob_paths(dir)
        .iter()
        .map(|p| p.file_name().unwrap().to_string_lossy().replace('@', "/"))
        .collect();
    for key in wanted {
        assert!(names.contains(key), "a referenced chunk is on disk: {key}");
    }
    names.len() - wanted.len()
}
