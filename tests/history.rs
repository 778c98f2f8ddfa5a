#![allow(missing_docs)] // test-local flows
//! History and time travel, through the public API: every step is recorded with what came
//! in, what went out, its record version and its time; `Engine::history` pages through
//! them; `Engine::state_at` reads the state after any step the history keeps; retention
//! decides how much is kept, and a step outside it is a typed error naming what is kept.

use std::sync::{Arc, Mutex};

use flowwire::Error;
use flowwire::prelude::*;
use flowwire::storage::codec::Checksums;
use flowwire::storage::record::PlacedRecord;
use flowwire::storage::{
    BoxFuture, InstanceKey, InstanceStore, MemoryStore, RedbStore, Retention, StepInput,
    StepOutput, StepResult, StepWrite, StoreError,
};

#[macro_use]
#[path = "support/forward.rs"]
mod forward;

#[derive(Debug, Default, Clone, PartialEq, Serialize, Deserialize)]
pub struct TallyState {
    count: u32,
    done: bool,
}

/// Counts impulses until told to stop.
#[flow]
pub struct Tally {
    #[link]
    state: TallyState,
}

#[flow]
impl Tally {
    #[impulse]
    fn add(&mut self) {
        self.state.count += 1;
    }

    #[impulse]
    fn stop(&mut self) {
        self.state.done = true;
    }

    #[wire]
    fn run(&mut self) -> Command<Self> {
        if self.state.done {
            Command::finish()
        } else {
            Command::wait()
        }
    }
}

async fn tally(retention: Retention) -> Engine {
    let engine = Engine::builder()
        .in_memory()
        .history(retention)
        .flow::<Tally>()
        .start()
        .await
        .unwrap();
    let h = engine
        .start::<Tally>("t", TallyState::default())
        .await
        .unwrap();
    for _ in 0..3 {
        h.add().await.unwrap();
    }
    h.stop().await.unwrap();
    engine
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn history_pages_through_every_step_in_order() {
    let engine = tally(Retention::All).await;
    let mut steps = Vec::new();
    let mut from = Some(0);
    let mut pages = 0;
    while let Some(start) = from {
        let page = engine.history::<Tally>("t", start, 2).await.unwrap();
        assert!(page.steps.len() <= 2);
        steps.extend(page.steps);
        from = page.next;
        pages += 1;
    }
    assert_eq!(pages, 3, "five steps in pages of two");
    let seqs: Vec<u64> = steps.iter().map(|s| s.seq).collect();
    assert_eq!(seqs, [1, 2, 3, 4, 5]);
    assert_eq!(steps[0].input, StepInput::Start);
    assert_eq!(steps[0].output, StepOutput::Wait);
    assert!(matches!(&steps[1].input, StepInput::Impulse { name, .. } if name == "add"));
    assert_eq!(steps[4].output, StepOutput::Finish);
    assert!(steps.iter().all(|s| s.at_ms > 0 && s.has_state));
    assert!(
        steps
            .windows(2)
            .all(|w| w[0].at_ms <= w[1].at_ms && w[0].version < w[1].version),
        "times and versions grow"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_state_after_any_kept_step_can_be_read_back() {
    let engine = tally(Retention::All).await;
    for (step, count) in [(1, 0), (2, 1), (4, 3)] {
        let s = engine.state_at::<Tally>("t", step).await.unwrap();
        assert_eq!(s.count, count, "after step {step}");
    }
    assert!(engine.state_at::<Tally>("t", 5).await.unwrap().done);
    let err = engine.state_at::<Tally>("t", 99).await.unwrap_err();
    assert!(
        matches!(&err, Error::NotInHistory { step: 99, kept, .. } if kept == "steps 1 to 5"),
        "{err}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn retention_decides_what_time_travel_can_reach() {
    let engine = tally(Retention::Last(2)).await;
    let page = engine.history::<Tally>("t", 0, 100).await.unwrap();
    let seqs: Vec<u64> = page.steps.iter().map(|s| s.seq).collect();
    assert_eq!(seqs, [4, 5], "the last two steps are kept");
    assert_eq!(engine.state_at::<Tally>("t", 4).await.unwrap().count, 3);
    let err = engine.state_at::<Tally>("t", 1).await.unwrap_err();
    assert!(
        matches!(&err, Error::NotInHistory { kept, .. } if kept == "steps 4 to 5"),
        "{err}"
    );

    let engine = tally(Retention::None).await;
    assert!(
        engine
            .history::<Tally>("t", 0, 100)
            .await
            .unwrap()
            .steps
            .is_empty()
    );
    let err = engine.state_at::<Tally>("t", 1).await.unwrap_err();
    assert!(err.to_string().contains("history is off"), "{err}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn history_of_an_unknown_instance_is_not_found() {
    let engine = tally(Retention::All).await;
    let err = engine.history::<Tally>("nope", 0, 10).await.unwrap_err();
    assert!(matches!(err, Error::NotFound { .. }), "{err}");
    let err = engine.state_at::<Tally>("nope", 1).await.unwrap_err();
    assert!(matches!(err, Error::NotFound { .. }), "{err}");
}

/// A store layer that notes, of each step it is given, when its checksums are computed.
struct Noting {
    inner: Arc<dyn InstanceStore>,
    seen: Arc<Mutex<Vec<Checksums>>>,
}

impl InstanceStore for Noting {
    fn commit(
        &self,
        batch: Vec<StepWrite>,
    ) -> BoxFuture<'static, Result<Vec<StepResult>, StoreError>> {
        self.seen
            .lock()
            .unwrap()
            .extend(batch.iter().map(|w| w.checksums));
        self.inner.commit(batch)
    }

    forward_to_inner!();
}

/// The in-memory store computes checksums when it hands values out: an engine on it seals
/// its steps without them, an engine on any other store with them, and on both every
/// value read back (the history, the states after each step, the ended instance's
/// record) has its checksum.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn checksums_are_left_to_a_store_that_computes_them_on_read_and_only_to_it() {
    let dir = tempfile::tempdir().unwrap();
    let stores: [(Arc<dyn InstanceStore>, Checksums); 2] = [
        (Arc::new(MemoryStore::new()), Checksums::OnRead),
        (
            Arc::new(RedbStore::open(dir.path().join("instances.redb")).unwrap()),
            Checksums::Written,
        ),
    ];
    for (inner, expected) in stores {
        let seen = Arc::new(Mutex::new(Vec::new()));
        let engine = Engine::builder()
            .store(Noting {
                inner: inner.clone(),
                seen: seen.clone(),
            })
            .flow::<Tally>()
            .start()
            .await
            .unwrap();
        let h = engine
            .start::<Tally>("t", TallyState::default())
            .await
            .unwrap();
        h.add().await.unwrap();
        h.stop().await.unwrap();
        assert_eq!(h.finished().await.unwrap(), Ended::Finished);
        assert_eq!(*seen.lock().unwrap(), vec![expected; 3]);
        let page = engine.history::<Tally>("t", 0, 100).await.unwrap();
        assert_eq!(page.steps.len(), 3);
        assert_eq!(engine.state_at::<Tally>("t", 2).await.unwrap().count, 1);
        assert!(h.state().await.unwrap().done);
        let key = InstanceKey::new("Tally", "t");
        let found = inner.load(&key).await.unwrap().expect("stored");
        let record = PlacedRecord::decode(&found.bytes, &key, 1 << 20).expect("it decodes");
        assert_eq!(record.record.seq, 3);
        engine.shutdown().await;
    }
}
