#![allow(missing_docs)] // test-local flows and drivers
//! A step whose commit fails after its large payloads were written: the retry refers to
//! the chunks already written instead of writing them again, so a store outage leaves no
//! pack behind per attempt, and the state reads back whole, also after a restart.

use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use flowwire::prelude::*;
use flowwire::storage::{Ladder, MIB, RedbStore, StoreError, Tier};
use flowwire::{Blob, Engine};

#[path = "support/faulty.rs"]
#[allow(dead_code)] // shared with integrity.rs, which uses all of it
mod faulty;

#[derive(Debug, Default, Clone, Serialize, Deserialize)]
pub struct Load {
    blob: Blob,
    loaded: bool,
}

#[driver]
pub trait Source {
    async fn fetch(&self) -> Result<Bytes, String>;
}

/// Answers 2 MiB once told to.
#[derive(Clone)]
struct Held(Arc<tokio::sync::Notify>);

fn payload() -> Bytes {
    flowwire::storage::fuzz::Rng::new(7).bytes(2 * MIB).into()
}

#[driver]
impl Source for Held {
    async fn fetch(&self) -> Result<Bytes, String> {
        self.0.notified().await;
        Ok(payload())
    }
}

/// Fetches a large payload into its state, then finishes.
#[flow]
pub struct Loader {
    #[link]
    state: Load,
    #[link]
    source: impl Source,
}

#[flow]
impl Loader {
    #[wire]
    fn run(&mut self) -> Command<Self> {
        if self.state.loaded {
            return Command::finish();
        }
        Command::drive(self.source.fetch()).then(|f, r| {
            // A new `Blob` at each application of the reply: nothing of an earlier,
            // failed attempt is kept in it.
            f.state.blob = Blob::from(r?);
            f.state.loaded = true;
            Ok(())
        })
    }
}

/// The files of the tier under `root` (temp files aside).
fn blobs_on_disk(root: &std::path::Path) -> Vec<String> {
    let mut out = Vec::new();
    let Ok(fans) = std::fs::read_dir(root) else {
        return out;
    };
    for fan in fans {
        let fan = fan.unwrap().path();
        for f in std::fs::read_dir(&fan).unwrap() {
            let name = f.unwrap().file_name().to_string_lossy().into_owned();
            if !name.contains('+') {
                out.push(name);
            }
        }
    }
    out.sort();
    out
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_step_retried_after_a_failed_commit_reuses_the_chunks_it_wrote() {
    let tmp = tempfile::tempdir().unwrap();
    let store = faulty::Faulty::new(RedbStore::open(tmp.path().join("instances.redb")).unwrap());
    let chunks = tmp.path().join("chunks");
    let release = Arc::new(tokio::sync::Notify::new());
    let engine = Engine::builder()
        .store(store.clone())
        .storage(Ladder::new().default_to(Tier::fs(&chunks).named("disk")))
        .flow::<Loader>()
        .driver::<SourceProxy, _>(Held(release.clone()))
        .start()
        .await
        .unwrap();
    let h = engine.start::<Loader>("l", Load::default()).await.unwrap();

    // The reply's step writes its 2 MiB, then its commit fails (the store unreachable),
    // three times over.
    store.fail_with(Some(StoreError::Timeout(Duration::from_secs(1))));
    let before = store.commits();
    release.notify_one();
    let mut polls = 0;
    while store.commits() < before + 3 {
        polls += 1;
        assert!(
            polls < 600,
            "the step was not retried three times within 30 s"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    store.fail_with(None);
    tokio::time::timeout(Duration::from_secs(30), h.finished())
        .await
        .expect("the flow finishes once the store answers again")
        .unwrap();

    let state = h.state().await.unwrap();
    assert!(state.loaded);
    assert!(
        state.blob.bytes() == &payload(),
        "the state reads back whole"
    );
    // One pack for the state (`.sp-`) and one for the reply, kept as the step's input in
    // history (`.ip-`): none per failed attempt (before, each of the four attempts wrote
    // both).
    let on_disk = blobs_on_disk(&chunks);
    let packs = |role: &str| on_disk.iter().filter(|n| n.contains(role)).count();
    assert_eq!(
        (packs(".sp-"), packs(".ip-"), on_disk.len()),
        (1, 1, 2),
        "{on_disk:?}"
    );
    engine.shutdown().await;
    drop(store);

    // Read back from the store and the tier by an engine started afresh.
    let engine = Engine::builder()
        .store(RedbStore::open(tmp.path().join("instances.redb")).unwrap())
        .storage(Ladder::new().default_to(Tier::fs(&chunks).named("disk")))
        .flow::<Loader>()
        .driver::<SourceProxy, _>(Held(release.clone()))
        .start()
        .await
        .unwrap();
    let state = engine
        .handle::<Loader>("l")
        .await
        .unwrap()
        .state()
        .await
        .unwrap();
    assert!(
        state.blob.bytes() == &payload(),
        "the state reads back whole after a restart"
    );
    engine.shutdown().await;
}
