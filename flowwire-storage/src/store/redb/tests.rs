//! The embedded store's recovery from its write-ahead log.

use bytes::Bytes;

use super::RedbStore;
use super::log::LOG_FORMAT;
use crate::error::StoreError;
use crate::record::{Expect, InstanceKey, StepWrite};
use crate::store::InstanceStore;
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
        impulse: None,
        history: Some((version, Bytes::from_static(b"entry"))),
        prune_below: None,
        fence: None,
    }
}

/// Logs `batch` as number `seq` without applying it to redb: what a crash leaves when
/// redb lost its commits since the last durable one.
fn log_only(path: &std::path::Path, seq: u64, batch: &[StepWrite]) {
    // A reopened log writes from its start: put back what it holds, then the batch.
    let (mut wal, entries) = Wal::open(&RedbStore::log_path(path)).unwrap();
    for (s, p) in &entries {
        wal.append(*s, p).unwrap();
    }
    let payload = postcard::to_extend(batch, vec![LOG_FORMAT]).unwrap();
    wal.append(seq, &payload).unwrap();
}

#[tokio::test]
async fn batches_only_the_log_holds_are_applied_when_the_store_opens() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("instances.redb");
    drop(RedbStore::open(&path).unwrap());
    let a = InstanceKey::new("F", "a");
    let b = InstanceKey::new("F", "b");
    log_only(&path, 1, &[step(&a, Expect::Absent, 1)]);
    log_only(
        &path,
        2,
        &[step(&a, Expect::Version(1), 2), step(&b, Expect::Absent, 1)],
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

#[tokio::test]
async fn a_log_that_skips_a_batch_is_reported_as_damaged() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("instances.redb");
    drop(RedbStore::open(&path).unwrap());
    log_only(
        &path,
        2,
        &[step(&InstanceKey::new("F", "a"), Expect::Absent, 1)],
    );
    let err = RedbStore::open(&path).unwrap_err();
    assert!(
        matches!(&err, StoreError::Corrupted { detail, .. } if detail.contains("skips from batch 0 to batch 2")),
        "{err}"
    );
}

#[tokio::test]
async fn a_logged_batch_that_does_not_decode_is_reported_as_damaged() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("instances.redb");
    drop(RedbStore::open(&path).unwrap());
    let (mut wal, _) = Wal::open(&RedbStore::log_path(&path)).unwrap();
    wal.append(1, &[LOG_FORMAT, 0xff, 0xff, 0xff]).unwrap();
    wal.append(2, &[9]).unwrap();
    drop(wal);
    let err = RedbStore::open(&path).unwrap_err();
    assert!(
        matches!(&err, StoreError::Corrupted { detail, .. } if detail.contains("batch 1 does not decode")),
        "{err}"
    );
}
