#![allow(missing_docs)] // test-local flows and drivers
//! Calls and outcomes cross between a runner and its driver's workers a batch at a time,
//! and nothing is held across a wait: an answered call's outcome reaches its runner while
//! the call run after it on the same worker still waits.

use std::sync::Arc;
use std::time::Duration;

use flowwire::prelude::*;
use tokio::sync::Semaphore;

#[derive(Debug, Serialize, Deserialize, thiserror::Error)]
#[error("never")]
pub struct Never;

#[driver(timeout = "60s")]
pub trait Gate {
    async fn pass(&self, slow: bool) -> Result<u32, Never>;
}

#[derive(Debug, Default, Clone, Serialize, Deserialize)]
pub struct WalkState {
    slow: bool,
    passed: Option<u32>,
}

#[flow]
pub struct Walk {
    #[link]
    state: WalkState,
    #[link]
    gate: impl Gate,
}

#[flow]
impl Walk {
    #[wire]
    fn run(&mut self) -> Command<Self> {
        match self.state.passed {
            None => Command::drive(self.gate.pass(self.state.slow)).then(|f, r| {
                f.state.passed = Some(r?);
                Ok(())
            }),
            Some(_) => Command::finish(),
        }
    }
}

/// Answers a fast call at once; a slow one once the test lets it through.
#[derive(Clone)]
struct Turnstile {
    open: Arc<Semaphore>,
}

#[driver]
impl Gate for Turnstile {
    async fn pass(&self, slow: bool) -> Result<u32, Never> {
        if slow {
            let _permit = self.open.acquire().await.expect("the semaphore stays open");
            return Ok(2);
        }
        Ok(1)
    }
}

/// One thread and one worker: the two calls of one round are run by the same worker, the
/// fast one first.
#[tokio::test(flavor = "current_thread")]
async fn an_answered_call_s_outcome_is_not_held_behind_a_call_that_waits() {
    let open = Arc::new(Semaphore::new(0));
    let engine = Engine::builder()
        .in_memory()
        .flow::<Walk>()
        .driver(Turnstile { open: open.clone() })
        .driver_concurrency(1)
        .start()
        .await
        .expect("an in-memory engine");
    // Started together: one round, whose two calls go to the driver's queue together.
    let (fast, slow) = tokio::join!(
        engine.start::<Walk>(
            "fast",
            WalkState {
                slow: false,
                passed: None
            }
        ),
        engine.start::<Walk>(
            "slow",
            WalkState {
                slow: true,
                passed: None
            }
        ),
    );
    let (fast, slow) = (fast.expect("started"), slow.expect("started"));
    let ended = tokio::time::timeout(Duration::from_secs(10), fast.finished())
        .await
        .expect("the fast call's outcome is handed over while the slow call waits")
        .expect("an end");
    assert_eq!(ended, Ended::Finished);
    assert!(
        tokio::time::timeout(Duration::from_millis(50), slow.finished())
            .await
            .is_err(),
        "the slow call is still waiting for the test"
    );
    open.add_permits(1);
    let ended = tokio::time::timeout(Duration::from_secs(10), slow.finished())
        .await
        .expect("the slow call ends once let through")
        .expect("an end");
    assert_eq!(ended, Ended::Finished);
    engine.shutdown().await;
}
