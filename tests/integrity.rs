#![allow(missing_docs)] // test-local flows and drivers
//! What the engine promises about acknowledged data, tried from outside through the public
//! API as an attacker of a storage engine would: a refused start never touches the instance
//! that holds the id, awkward ids work on every rung of the ladder, and a write the engine
//! could not read back is refused before anything is stored.

use std::path::Path;

use flowwire::prelude::*;
use flowwire::storage::{KIB, Ladder, MB, Tier};
use flowwire::{Engine, Error};

#[derive(Debug, Default, Clone, PartialEq, Serialize, Deserialize)]
pub struct BoxState {
    data: Vec<u8>,
    done: bool,
}

/// Holds bytes until told to finish; waits (so it is not resident) in between.
#[flow]
pub struct Vault {
    #[link]
    state: BoxState,
}

#[flow]
impl Vault {
    #[impulse]
    fn fill(&mut self, len: u32, byte: u8) {
        self.state.data = vec![byte; len as usize];
    }
    #[impulse]
    fn close(&mut self) {
        self.state.done = true;
    }
    #[probe]
    fn data(&self) -> Vec<u8> {
        self.state.data.clone()
    }
    #[wire]
    fn run(&mut self) -> Command<Self> {
        if self.state.done {
            return Command::finish();
        }
        Command::wait()
    }
}

fn ladder(dir: &Path) -> Ladder {
    Ladder::new()
        .inline_below(4 * KIB)
        .below(MB, Tier::fs(dir.join("fast")).named("fast"))
        .default_to(Tier::fs(dir.join("slow")).named("slow"))
}

async fn engine(dir: &Path) -> Engine {
    Engine::builder()
        .data_dir(dir.join("data"))
        .storage(ladder(dir))
        .flow::<Vault>()
        .start()
        .await
        .unwrap()
}

fn state(len: usize, byte: u8) -> BoxState {
    BoxState {
        data: vec![byte; len],
        done: false,
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_refused_duplicate_start_leaves_the_existing_instance_intact() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path();
    let engine = self::engine(dir).await;
    // Large states, on both tiers; the instances wait, so they are not resident.
    for (id, len) in [("fast", 100_000), ("slow", 2_000_000)] {
        engine.start::<Vault>(id, state(len, 1)).await.unwrap();
        for other in [state(len, 2), state(len / 2, 3), state(10, 4)] {
            let err = engine.start::<Vault>(id, other).await.unwrap_err();
            assert!(matches!(err, Error::AlreadyExists { .. }), "{err}");
        }
        let vault = engine.handle::<Vault>(id).await.unwrap();
        assert_eq!(vault.data().await.unwrap(), vec![1; len], "{id}");
    }
    engine.shutdown().await;

    // Also after a restart, and in history.
    let engine = self::engine(dir).await;
    for (id, len) in [("fast", 100_000), ("slow", 2_000_000)] {
        let vault = engine.handle::<Vault>(id).await.unwrap();
        assert_eq!(vault.data().await.unwrap(), vec![1; len], "{id}");
        let first: BoxState = engine.state_at::<Vault>(id, 1).await.unwrap();
        assert_eq!(first, state(len, 1), "{id} at its first step");
    }
    engine.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn awkward_ids_work_inline_and_on_every_tier_across_a_restart() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path();
    let ids = flowwire::storage::tier::conformance::awkward_ids();
    let engine = self::engine(dir).await;
    for (i, id) in ids.iter().enumerate() {
        let vault = engine
            .start::<Vault>(id.as_str(), state(10, i as u8))
            .await
            .unwrap_or_else(|e| panic!("{id:.40?}: {e}"));
        // Inline, then on `fast`, then on `slow`.
        for len in [100_000, 1_500_000] {
            vault.fill(len, i as u8).await.unwrap();
        }
    }
    engine.shutdown().await;

    let engine = self::engine(dir).await;
    for (i, id) in ids.iter().enumerate() {
        let vault = engine.handle::<Vault>(id.as_str()).await.unwrap();
        assert_eq!(
            vault.data().await.unwrap(),
            vec![i as u8; 1_500_000],
            "{id:.40?}"
        );
        for (step, len) in [(1, 10), (2, 100_000)] {
            let then: BoxState = engine.state_at::<Vault>(id.as_str(), step).await.unwrap();
            assert_eq!(then.data, vec![i as u8; len], "{id:.40?} at step {step}");
        }
        vault.close().await.unwrap();
    }
    engine.shutdown().await;
}

async fn engine_with_limit(dir: &Path, limit: usize) -> Engine {
    Engine::builder()
        .data_dir(dir.join("data"))
        .storage(ladder(dir))
        .decode_limit(limit)
        .flow::<Vault>()
        .start()
        .await
        .unwrap()
}

/// Blob files under a tier's directory (temporary files of a write excluded).
fn blob_files(dir: &Path) -> usize {
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

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_write_over_the_decode_limit_is_refused_before_anything_is_stored() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path();
    let limit = 2 * MB;
    let engine = engine_with_limit(dir, limit).await;

    // A start whose state the engine could not read back.
    let err = engine
        .start::<Vault>("big", state(3 * MB, 1))
        .await
        .unwrap_err();
    assert!(
        matches!(err, Error::TooLarge { what: "state", size, limit: l } if size > 3 * MB as u64 && l == limit),
        "{err}"
    );
    assert!(matches!(
        engine.handle::<Vault>("big").await,
        Err(Error::NotFound { .. })
    ));
    assert_eq!(
        blob_files(&dir.join("fast")) + blob_files(&dir.join("slow")),
        0
    );

    // An impulse that would grow the state past it: refused, the state as it was.
    let vault = engine.start::<Vault>("v", state(MB, 2)).await.unwrap();
    let err = vault.fill(3 * MB as u32, 3).await.unwrap_err();
    assert!(
        matches!(err, Error::TooLarge { what: "state", .. }),
        "{err}"
    );
    assert_eq!(vault.data().await.unwrap(), vec![2; MB]);
    // Under the limit it still applies.
    vault.fill(MB as u32 + 1, 4).await.unwrap();
    engine.shutdown().await;

    let engine = engine_with_limit(dir, limit).await;
    let vault = engine.handle::<Vault>("v").await.unwrap();
    assert_eq!(vault.data().await.unwrap(), vec![4; MB + 1]);
    engine.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_record_stored_under_another_instances_key_is_refused_not_served() {
    use flowwire::storage::{Expect, InstanceKey, InstanceStore, MemoryStore, StepWrite};
    use std::sync::Arc;

    let store = Arc::new(MemoryStore::new());
    let engine = Engine::builder()
        .store(store.clone())
        .flow::<Vault>()
        .start()
        .await
        .unwrap();
    engine.start::<Vault>("a", state(10, 1)).await.unwrap();
    engine.start::<Vault>("b", state(10, 2)).await.unwrap();
    engine.shutdown().await;

    // Put a's record under a new key, as a damaged index or a flipped key bit would.
    let a = store
        .load(&InstanceKey::new("Vault", "a"))
        .await
        .unwrap()
        .unwrap();
    let results = store
        .commit(vec![StepWrite {
            key: InstanceKey::new("Vault", "c"),
            expect: Expect::Absent,
            version: a.version,
            seq: 1,
            record: a.bytes.clone(),
            active: false,
            parked: false,
            timer: None,
            correlation: None,
            uncorrelate: None,
            impulse: None,
            history: None,
            prune_below: None,
            fence: None,
        }])
        .await
        .unwrap();
    assert_eq!(results.len(), 1);

    let engine = Engine::builder()
        .store(store.clone())
        .flow::<Vault>()
        .start()
        .await
        .unwrap();
    let err = match engine.handle::<Vault>("c").await {
        Ok(c) => c.data().await.unwrap_err(),
        Err(e) => e,
    };
    assert!(err.to_string().contains("another instance's key"), "{err}");
    // The instances themselves are untouched.
    let a = engine.handle::<Vault>("a").await.unwrap();
    assert_eq!(a.data().await.unwrap(), vec![1; 10]);
    engine.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn long_ids_that_collide_under_a_64_bit_hash_keep_their_own_state() {
    // 126-byte ids with the same 64-bit FNV-1a hash, which blob keys used to share.
    let twins = ["5cdc38da781222ad", "48cab85938350e17"].map(|p| format!("{p}{}", "s".repeat(110)));
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path();
    let engine = self::engine(dir).await;
    for (i, id) in twins.iter().enumerate() {
        engine
            .start::<Vault>(id.as_str(), state(100_000, i as u8 + 1))
            .await
            .unwrap();
    }
    for (i, id) in twins.iter().enumerate() {
        let vault = engine.handle::<Vault>(id.as_str()).await.unwrap();
        assert_eq!(vault.data().await.unwrap(), vec![i as u8 + 1; 100_000]);
    }
    engine.shutdown().await;
}
