#![allow(missing_docs)] // test-local flows and drivers
//! Reads of instances that have ended go straight to the store, from the caller's task:
//! a result, a state, a probe or `finished()` of an ended instance is answered while the
//! runner is busy. A handle that waited for its instance to finish holds its final state:
//! reading the result costs no second trip. The runner answers for live instances only.

use std::sync::Arc;
use std::time::Duration;

use flowwire::prelude::*;
use tokio::sync::Semaphore;

#[derive(Debug, Clone, Serialize, Deserialize, thiserror::Error)]
#[error("never")]
pub struct Never;

#[driver(timeout = "60s")]
pub trait Gate {
    async fn pass(&self, n: u32) -> Result<u32, Never>;
}

#[derive(Clone)]
pub struct Turnstile {
    open: Arc<Semaphore>,
}

#[driver]
impl Gate for Turnstile {
    async fn pass(&self, n: u32) -> Result<u32, Never> {
        if n == 0 {
            // Held until the test ends: its instance stays in the runner's memory.
            self.open.acquire().await.unwrap().forget();
        }
        Ok(n * 2)
    }
}

#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct Count {
    n: u32,
    doubled: Option<u32>,
}

#[flow]
pub struct Doubler {
    #[link]
    state: Count,
    #[link]
    gate: impl Gate,
}

#[flow]
impl Doubler {
    #[probe]
    fn doubled(&self) -> Option<u32> {
        self.state.doubled
    }

    #[wire]
    fn run(&mut self) -> Command<Self> {
        if self.state.doubled.is_some() {
            return Command::finish();
        }
        Command::drive(self.gate.pass(self.state.n)).then(|f, r| {
            f.state.doubled = Some(r?);
            Ok(())
        })
    }
}

async fn engine(dir: &std::path::Path) -> Engine {
    Engine::builder()
        .data_dir(dir)
        .flow::<Doubler>()
        .driver(Turnstile {
            open: Arc::new(Semaphore::new(0)),
        })
        .start()
        .await
        .unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_ended_instance_is_read_while_the_runner_is_busy() {
    let dir = tempfile::tempdir().unwrap();
    let engine = engine(dir.path()).await;
    let done = engine
        .start::<Doubler>(
            "done",
            Count {
                n: 21,
                doubled: None,
            },
        )
        .await
        .unwrap();
    assert_eq!(done.finished().await.unwrap(), Ended::Finished);
    // A live instance, its call held: in the runner's memory.
    let live = engine
        .start::<Doubler>("live", Count::default())
        .await
        .unwrap();

    // A probe of the live instance runs in the runner; this one holds it until the reads
    // below are done. Reads that went through the runner would wait for ever.
    let (release, held) = std::sync::mpsc::channel::<()>();
    let busy = tokio::spawn(async move { live.probe(move |_| held.recv().is_ok()).await });
    tokio::time::sleep(Duration::from_millis(100)).await;

    let reads = async {
        let reached = engine.handle::<Doubler>("done").await.unwrap();
        assert_eq!(reached.state().await.unwrap().doubled, Some(42));
        assert_eq!(reached.doubled().await.unwrap(), Some(42));
        assert_eq!(reached.finished().await.unwrap(), Ended::Finished);
        // The handle `start` returned knows it ended, from its `finished()`.
        assert_eq!(done.state().await.unwrap().doubled, Some(42));
    };
    let answered = tokio::time::timeout(Duration::from_secs(30), reads).await;
    release.send(()).unwrap();
    assert!(
        answered.is_ok(),
        "the ended instance was read behind the busy runner"
    );
    assert!(busy.await.unwrap().unwrap(), "the probe was released");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_ended_instance_reached_in_the_store_holds_no_store_open_after_shutdown() {
    let dir = tempfile::tempdir().unwrap();
    let engine = engine(dir.path()).await;
    let h = engine
        .start::<Doubler>(
            "p",
            Count {
                n: 3,
                doubled: None,
            },
        )
        .await
        .unwrap();
    assert_eq!(h.finished().await.unwrap(), Ended::Finished);
    // Not live: reached and read from the store.
    let again = engine.handle::<Doubler>("p").await.unwrap();
    assert_eq!(again.doubled().await.unwrap(), Some(6));
    // An id that was never started is still not found.
    assert!(matches!(
        engine.handle::<Doubler>("nobody").await,
        Err(flowwire::Error::NotFound { .. })
    ));
    engine.shutdown().await;
    // After the shutdown, a handle kept does not hold the store open.
    let reopened = self::engine(dir.path()).await;
    assert_eq!(
        reopened
            .handle::<Doubler>("p")
            .await
            .unwrap()
            .doubled()
            .await
            .unwrap(),
        Some(6)
    );
    assert!(matches!(
        again.state().await,
        Err(flowwire::Error::Shutdown)
    ));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_handle_that_saw_its_instance_finish_holds_its_result() {
    let dir = tempfile::tempdir().unwrap();
    let engine = engine(dir.path()).await;
    let h = engine
        .start::<Doubler>(
            "r",
            Count {
                n: 5,
                doubled: None,
            },
        )
        .await
        .unwrap();
    let copy = h.clone();
    assert_eq!(h.finished().await.unwrap(), Ended::Finished);
    engine.shutdown().await;
    // Neither the runner nor the store is there any more: the result came with the end,
    // to this handle and its clones.
    assert_eq!(h.state().await.unwrap().doubled, Some(10));
    assert_eq!(copy.doubled().await.unwrap(), Some(10));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_handle_that_asks_after_the_end_holds_the_result_too() {
    let dir = tempfile::tempdir().unwrap();
    let open = Arc::new(Semaphore::new(0));
    let engine = Engine::builder()
        .data_dir(dir.path())
        .flow::<Doubler>()
        .driver(Turnstile { open: open.clone() })
        .start()
        .await
        .unwrap();
    let h = engine
        .start::<Doubler>(
            "late",
            Count {
                n: 0,
                doubled: None,
            },
        )
        .await
        .unwrap();
    // Taken while the instance is live, so it asks the runner, not the store.
    let late = engine.handle::<Doubler>("late").await.unwrap();
    open.add_permits(1);
    assert_eq!(h.finished().await.unwrap(), Ended::Finished);
    // The instance has ended and left the runner's memory before this wait: the runner
    // answers from the store, with the final state.
    assert_eq!(late.finished().await.unwrap(), Ended::Finished);
    // A handle taken after the end learns it from the store, and keeps the state too.
    let after = engine.handle::<Doubler>("late").await.unwrap();
    assert_eq!(after.finished().await.unwrap(), Ended::Finished);
    engine.shutdown().await;
    assert_eq!(late.state().await.unwrap().doubled, Some(0));
    assert_eq!(after.doubled().await.unwrap(), Some(0));
}
