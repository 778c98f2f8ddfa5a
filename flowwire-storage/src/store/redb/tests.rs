//! The embedded store's recovery from its write-ahead log.

use bytes::Bytes;

use super::RedbStore;
use super::log::{LOG_FORMAT, as_if_crashed};
use crate::error::StoreError;
use crate::record::{Expect, InstanceKey, StepWrite};
use crate::store::InstanceStore;
use crate::store::disk::Fs;
use crate::store::wal::Wal;

fn step(key: &InstanceKey, expect: Expect, version: u64) -> StepWrite {
    StepWrite {
        key: key.clone(),
        expect,
        version,
        seq: version,
        record: Bytes::from(format!("record {version}")),
        active: true,
        parked: false,
        timer: None,
        correlation: None,
        uncorrelate: None,
        ended_key: None,
        impulse: None,
        history: Some((version, Bytes::from_static(b"entry"))),
        prune_below: None,
        fence: None,
        acknowledges: None,
        sends: Vec::new(),
        checksums: crate::codec::Checksums::Written,
    }
}

/// Logs `batches` without applying them to redb, and leaves the store as a crash does:
/// what a kill leaves when redb lost its commits since the last durable one.
fn crash_with_logged(path: &std::path::Path, batches: &[(u64, &[StepWrite])]) {
    let run = as_if_crashed(path);
    let (mut wal, entries) = Wal::open(&Fs, &RedbStore::log_path(path), run).unwrap();
    assert!(entries.is_empty());
    for (seq, batch) in batches {
        let payload = postcard::to_extend(batch, vec![LOG_FORMAT]).unwrap();
        wal.append(*seq, &payload).unwrap();
    }
}

#[tokio::test]
async fn batches_only_the_log_holds_are_applied_when_the_store_opens() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("instances.redb");
    drop(RedbStore::open(&path).unwrap());
    let a = InstanceKey::new("F", "a");
    let b = InstanceKey::new("F", "b");
    crash_with_logged(
        &path,
        &[
            (1, &[step(&a, Expect::Absent, 1)]),
            (
                2,
                &[step(&a, Expect::Version(1), 2), step(&b, Expect::Absent, 1)],
            ),
        ],
    );

    let store = RedbStore::open(&path).unwrap();
    let found = store.load(&a).await.unwrap().expect("a is there");
    assert_eq!((found.version, &found.bytes[..]), (2, &b"record 2"[..]));
    assert_eq!(store.load(&b).await.unwrap().unwrap().version, 1);
    assert_eq!(store.history(&a, 0, 10).await.unwrap().len(), 2);
    // The next batch continues the numbering, and opening again applies nothing twice.
    store
        .commit(vec![step(&b, Expect::Version(1), 2)])
        .await
        .unwrap();
    drop(store);
    let store = RedbStore::open(&path).unwrap();
    assert_eq!(store.load(&b).await.unwrap().unwrap().version, 2);
    assert_eq!(store.load(&a).await.unwrap().unwrap().version, 2);
}

fn corrupted(err: &StoreError) -> (&std::path::Path, &str) {
    match err {
        StoreError::Corrupted { path, detail } => (path, detail),
        other => panic!("not Corrupted: {other}"),
    }
}

#[tokio::test]
async fn a_log_that_skips_a_batch_is_reported_as_damaged() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("instances.redb");
    drop(RedbStore::open(&path).unwrap());
    crash_with_logged(
        &path,
        &[(2, &[step(&InstanceKey::new("F", "a"), Expect::Absent, 1)])],
    );
    let err = RedbStore::open(&path).unwrap_err();
    let (file, detail) = corrupted(&err);
    assert_eq!(file, RedbStore::log_path(&path));
    assert!(
        detail.contains("batch 2 lies where batch 1 belongs"),
        "{err}"
    );
}

#[tokio::test]
async fn a_logged_batch_that_does_not_decode_is_reported_as_damaged() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("instances.redb");
    drop(RedbStore::open(&path).unwrap());
    let run = as_if_crashed(&path);
    let (mut wal, _) = Wal::open(&Fs, &RedbStore::log_path(&path), run).unwrap();
    wal.append(1, &[LOG_FORMAT, 0xff, 0xff, 0xff]).unwrap();
    wal.append(2, &[9]).unwrap();
    drop(wal);
    let err = RedbStore::open(&path).unwrap_err();
    assert!(
        corrupted(&err).1.contains("batch 1 does not decode"),
        "{err}"
    );
}

/// Commits `n` batches of one step each (instances `i0`…), and returns the store.
async fn filled(path: &std::path::Path, n: u64) -> RedbStore {
    let store = RedbStore::open(path).unwrap();
    for i in 0..n {
        let key = InstanceKey::new("F", format!("i{i}"));
        store
            .commit(vec![step(&key, Expect::Absent, 1)])
            .await
            .unwrap();
    }
    store
}

#[tokio::test]
async fn a_missing_log_is_refused_after_an_unclean_shutdown_and_recreated_after_a_clean_one() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("instances.redb");
    drop(filled(&path, 3).await);
    std::fs::remove_file(RedbStore::log_path(&path)).unwrap();
    let store = RedbStore::open(&path).unwrap();
    assert!(
        store
            .load(&InstanceKey::new("F", "i2"))
            .await
            .unwrap()
            .is_some()
    );
    drop(store);

    as_if_crashed(&path);
    std::fs::remove_file(RedbStore::log_path(&path)).unwrap();
    let err = RedbStore::open(&path).unwrap_err();
    let (file, detail) = corrupted(&err);
    assert_eq!(file, RedbStore::log_path(&path));
    assert!(detail.contains("missing"), "{err}");
}

#[tokio::test]
async fn a_damaged_batch_in_the_log_is_refused_naming_the_file_the_batch_and_the_offset() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("instances.redb");
    drop(RedbStore::open(&path).unwrap());
    let keys: Vec<InstanceKey> = (0..10)
        .map(|i| InstanceKey::new("F", format!("i{i}")))
        .collect();
    let steps: Vec<Vec<StepWrite>> = keys
        .iter()
        .map(|k| vec![step(k, Expect::Absent, 1)])
        .collect();
    let batches: Vec<(u64, &[StepWrite])> = steps
        .iter()
        .enumerate()
        .map(|(i, s)| (i as u64 + 1, &s[..]))
        .collect();
    crash_with_logged(&path, &batches);
    // Flip one bit in the payload of batch 4.
    let log = RedbStore::log_path(&path);
    let mut bytes = std::fs::read(&log).unwrap();
    let entry = |i: usize| {
        let mut at = super::super::wal::START as usize;
        for _ in 0..i {
            let len = u32::from_le_bytes(bytes[at + 4..at + 8].try_into().unwrap()) as usize;
            at += 28 + len + 16;
        }
        at
    };
    let at = entry(3);
    bytes[at + 40] ^= 0x10;
    std::fs::write(&log, &bytes).unwrap();
    let err = RedbStore::open(&path).unwrap_err();
    let (file, detail) = corrupted(&err);
    assert_eq!(file, log);
    assert!(detail.contains(&format!("batch 4 at offset {at}")), "{err}");
}

#[tokio::test]
async fn a_clean_close_makes_every_batch_durable_so_the_log_is_not_needed() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("instances.redb");
    drop(filled(&path, 5).await);
    // Garbage over the whole log: a clean store does not read it.
    let log = RedbStore::log_path(&path);
    let len = std::fs::metadata(&log).unwrap().len() as usize;
    std::fs::write(&log, vec![0x5a; len]).unwrap();
    let store = RedbStore::open(&path).unwrap();
    for i in 0..5 {
        assert!(
            store
                .load(&InstanceKey::new("F", format!("i{i}")))
                .await
                .unwrap()
                .is_some()
        );
    }
    // And the log works again from there.
    store
        .commit(vec![step(
            &InstanceKey::new("F", "later"),
            Expect::Absent,
            1,
        )])
        .await
        .unwrap();
}
