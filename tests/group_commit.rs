#![allow(missing_docs)] // test-local flows
//! Group commit, pipelined: the runner sends the steps of many instances to the store in
//! one commit, and builds the next batch while that commit is on its way to disk.
//!
//! The store here is the embedded redb store behind a gate the test opens one commit at a
//! time, so that what is in flight, and what waits for it, is under the test's control.
//! The gate logs every batch as the store receives it.
//!
//! Specified:
//! * a step is acknowledged only after its commit: a start's caller waits while the commit
//!   is held;
//! * the steps of other instances that arrive meanwhile form the next batch, together;
//! * an instance with a step in flight is not stepped again until that step is committed:
//!   its impulse goes into a later batch, never beside its start;
//! * everything taken is committed at shutdown, and is there after a restart.

use std::sync::{Arc, Mutex};
use std::time::Duration;

use flowwire::prelude::*;
use flowwire::storage::{BoxFuture, InstanceStore, RedbStore, StepResult, StepWrite, StoreError};
use tokio::sync::Semaphore;

#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct TallyState {
    count: u32,
}

#[flow]
pub struct Tally {
    #[link]
    state: TallyState,
}

#[flow]
impl Tally {
    #[wire]
    fn run(&mut self) -> Command<Self> {
        if self.state.count >= 2 {
            Command::finish()
        } else {
            Command::wait()
        }
    }

    #[impulse]
    fn add(&mut self) {
        self.state.count += 1;
    }
}

/// The redb store, with commits held until the test lets them through; each batch is
/// logged (as the instance ids of its steps) when the store receives it.
#[derive(Clone)]
struct Gated {
    inner: RedbStore,
    gate: Arc<Semaphore>,
    log: Arc<Mutex<Vec<Vec<String>>>>,
}

impl Gated {
    fn new(dir: &std::path::Path, open: bool) -> Self {
        let gate = if open { Semaphore::MAX_PERMITS } else { 0 };
        Self {
            inner: RedbStore::open(dir.join("instances.redb")).unwrap(),
            gate: Arc::new(Semaphore::new(gate)),
            log: Arc::default(),
        }
    }

    fn batches(&self) -> Vec<Vec<String>> {
        self.log.lock().unwrap().clone()
    }

    /// Lets `n` more commits through.
    fn open(&self, n: usize) {
        self.gate.add_permits(n);
    }

    /// Waits until the store has received `n` batches.
    async fn received(&self, n: usize) -> Vec<Vec<String>> {
        tokio::time::timeout(Duration::from_secs(10), async {
            loop {
                let batches = self.batches();
                if batches.len() >= n {
                    return batches;
                }
                tokio::time::sleep(Duration::from_millis(1)).await;
            }
        })
        .await
        .unwrap_or_else(|_| panic!("{n} batches expected, got {:?}", self.batches()))
    }
}

#[macro_use]
#[path = "support/forward.rs"]
mod forward;

impl InstanceStore for Gated {
    fn commit(
        &self,
        batch: Vec<StepWrite>,
    ) -> BoxFuture<'static, Result<Vec<StepResult>, StoreError>> {
        let mut ids: Vec<String> = batch.iter().map(|w| w.key.id.to_string()).collect();
        ids.sort();
        self.log.lock().unwrap().push(ids);
        let this = self.clone();
        Box::pin(async move {
            this.gate.acquire().await.unwrap().forget();
            this.inner.commit(batch).await
        })
    }
    forward_to_inner!();
}

async fn engine_on(store: &Gated) -> Engine {
    Engine::builder()
        .store(store.clone())
        .flow::<Tally>()
        .start()
        .await
        .unwrap()
}

/// Waits until `n` instances of `Tally` are in memory: every message sent before the
/// query has been taken by the runner (it takes messages in order).
async fn taken(engine: &Engine, n: usize) {
    tokio::time::timeout(Duration::from_secs(10), async {
        while engine.resident::<Tally>().await.unwrap() < n {
            tokio::task::yield_now().await;
        }
    })
    .await
    .expect("the runner takes the messages sent");
}

// The default test runtime runs one thread: spawned tasks send in the order spawned.
#[tokio::test]
async fn steps_that_arrive_during_a_commit_form_the_next_batch_and_an_instance_waits_for_its_own() {
    let dir = tempfile::tempdir().unwrap();
    let store = Gated::new(dir.path(), false);
    let engine = engine_on(&store).await;
    store.open(1);
    let a = engine
        .start::<Tally>("a", TallyState::default())
        .await
        .unwrap();

    let h = a.clone();
    let first = tokio::spawn(async move { h.add().await });
    assert_eq!(
        store.received(2).await[1],
        ["a"],
        "a's impulse is on its way"
    );

    // While it is held: a second impulse for `a`, then two starts.
    let h = a.clone();
    let second = tokio::spawn(async move { h.add().await });
    let mut starts = Vec::new();
    for id in ["b", "c"] {
        let e = engine.clone();
        starts.push(tokio::spawn(async move {
            e.start::<Tally>(id, TallyState::default()).await
        }));
    }
    taken(&engine, 3).await;
    assert!(
        !first.is_finished(),
        "an impulse is acknowledged only after its commit"
    );
    assert_eq!(store.batches().len(), 2, "one batch in flight at a time");

    store.open(1);
    first.await.unwrap().unwrap();
    assert_eq!(
        store.received(3).await[2],
        ["b", "c"],
        "the starts that arrived meanwhile go together, without a's second impulse"
    );
    store.open(1);
    for s in starts {
        s.await.unwrap().unwrap();
    }
    assert_eq!(
        store.received(4).await[3],
        ["a"],
        "a's second impulse goes once its first is committed"
    );
    store.open(1);
    second.await.unwrap().unwrap();
    store.open(Semaphore::MAX_PERMITS / 2);
    assert_eq!(
        a.finished().await.unwrap(),
        Ended::Finished,
        "both impulses applied"
    );
    engine.shutdown().await;
}

#[tokio::test]
async fn what_the_runner_took_is_committed_at_shutdown_and_there_after_a_restart() {
    let dir = tempfile::tempdir().unwrap();
    let store = Gated::new(dir.path(), false);
    let engine = engine_on(&store).await;
    let e = engine.clone();
    let start_a = tokio::spawn(async move { e.start::<Tally>("a", TallyState::default()).await });
    store.received(1).await;
    let e = engine.clone();
    let start_b = tokio::spawn(async move { e.start::<Tally>("b", TallyState::default()).await });
    taken(&engine, 2).await;

    // Shutdown waits for the batch in flight and commits the one being built.
    let e = engine.clone();
    let shutdown = tokio::spawn(async move { e.shutdown().await });
    store.open(Semaphore::MAX_PERMITS);
    shutdown.await.unwrap();
    start_a.await.unwrap().unwrap();
    start_b.await.unwrap().unwrap();
    drop((engine, store));

    let store = Gated::new(dir.path(), true);
    let restarted = engine_on(&store).await;
    for id in ["a", "b"] {
        let h = restarted.handle::<Tally>(id).await.unwrap();
        assert_eq!(h.state().await.unwrap().count, 0, "{id} was committed");
    }
    restarted.shutdown().await;
}
