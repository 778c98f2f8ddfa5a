//! The instance-store conformance suite on every backend that runs without a server.

use flowwire_storage::store::conformance;
use flowwire_storage::{InstanceStore, MemoryStore, RedbStore, StoreError};

#[tokio::test]
async fn memory_store_conforms() {
    conformance::run_all(|| Box::new(MemoryStore::new())).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn redb_store_conforms() {
    let dir = tempfile::tempdir().unwrap();
    let n = std::sync::atomic::AtomicUsize::new(0);
    conformance::run_all(|| {
        let i = n.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        Box::new(RedbStore::open(dir.path().join(format!("s{i}.redb"))).unwrap())
            as Box<dyn InstanceStore>
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn redb_store_conforms_through_an_arc() {
    let dir = tempfile::tempdir().unwrap();
    let store = std::sync::Arc::new(RedbStore::open(dir.path().join("arc.redb")).unwrap());
    conformance::create_then_compare_and_swap(&store).await;
}

#[test]
fn a_store_open_in_this_process_is_locked() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("locked.redb");
    let _first = RedbStore::open(&path).unwrap();
    let err = RedbStore::open(&path).unwrap_err();
    assert!(matches!(err, StoreError::Locked { .. }), "{err}");
    assert!(err.to_string().contains("already open"), "{err}");
}

#[test]
fn a_file_that_is_not_a_store_is_corrupted_not_a_panic() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("garbage.redb");
    std::fs::write(&path, vec![0xAB; 64 * 1024]).unwrap();
    let err = RedbStore::open(&path).unwrap_err();
    assert!(matches!(err, StoreError::Corrupted { .. }), "{err}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_truncated_store_file_is_a_typed_error_or_recovers_committed_data() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("t.redb");
    {
        let store = RedbStore::open(&path).unwrap();
        conformance::history_pages_in_step_order(&store).await;
    }
    let len = std::fs::metadata(&path).unwrap().len();
    for cut in [len / 2, len / 4, 4096, 512, 10] {
        let f = std::fs::OpenOptions::new().write(true).open(&path).unwrap();
        f.set_len(cut).unwrap();
        drop(f);
        match RedbStore::open(&path) {
            Err(e) => assert!(
                matches!(e, StoreError::Corrupted { .. } | StoreError::Backend(_)),
                "cut at {cut}: {e}"
            ),
            Ok(store) => {
                // Whatever redb recovered must read back without panicking.
                let k = flowwire_storage::InstanceKey::new("flow", "h");
                let _ = store.load(&k).await;
                let _ = store.history(&k, 0, 100).await;
            }
        }
    }
}
