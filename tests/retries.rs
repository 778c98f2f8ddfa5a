#![allow(missing_docs)] // test-local flows and drivers
//! Driver retries and timeouts, through the public API: the policy of a method overrides its
//! trait's, which overrides the engine's; a failed attempt (the driver's error, a panic, a
//! timeout) is retried after a backoff that doubles; every attempt carries the same
//! idempotency key and its attempt number; an error its type calls permanent
//! (`flowwire::Transient`) is not retried; when retries run out, the continuation receives
//! the last failure, typed; each failed attempt is a step in history and an event. Kill
//! tests for the ambiguous window and for a backoff across a restart are in tests/kill.rs.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use flowwire::prelude::*;
use flowwire::{EventKind, Fault};

#[derive(Debug, Clone, Serialize, Deserialize, thiserror::Error)]
#[error("refused: {0}")]
pub struct Refused(String);

/// A driver whose attempts fail a set number of times.
#[driver(retries = 3, backoff = "10ms", max_backoff = "20ms", timeout = "2s")]
pub trait Flaky {
    /// Panics on the first `fail` attempts of each call.
    async fn fetch(&self, fail: u32) -> Result<u32, Refused>;
    /// Never retried: panics on the first `fail` attempts.
    #[driver(retries = 0)]
    async fn pay(&self, fail: u32) -> Result<u32, Refused>;
    /// Sleeps past its 50 ms timeout on the first `slow` attempts.
    #[driver(timeout = "50ms")]
    async fn slow(&self, slow: u32) -> Result<u32, Refused>;
    /// Returns its own error, always: retried like a fault (its type says nothing).
    async fn refuse(&self) -> Result<u32, Refused>;
    /// Busy for the first `busy` attempts (transient), then declined (permanent).
    async fn charge(&self, busy: u32) -> Result<u32, PayError>;
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, thiserror::Error)]
pub enum PayError {
    #[error("the gateway is busy")]
    Busy,
    #[error("the card was declined")]
    Declined,
}

impl flowwire::Transient for PayError {
    fn is_transient(&self) -> bool {
        *self == PayError::Busy
    }
}

/// What the driver saw: per idempotency key, the attempt numbers in order.
#[derive(Default, Clone)]
pub struct Seen(Arc<Mutex<HashMap<String, Vec<u32>>>>);

impl Seen {
    fn record(&self) -> u32 {
        let ctx = CallContext::current().expect("a call has a context");
        let mut seen = self.0.lock().unwrap();
        let attempts = seen.entry(ctx.idempotency_key()).or_default();
        attempts.push(ctx.attempt());
        ctx.attempt()
    }

    fn attempts(&self, key: &str) -> Vec<u32> {
        self.0.lock().unwrap().get(key).cloned().unwrap_or_default()
    }
}

#[driver]
impl Flaky for Seen {
    async fn fetch(&self, fail: u32) -> Result<u32, Refused> {
        let attempt = self.record();
        assert!(attempt > fail, "attempt {attempt} fails");
        Ok(attempt)
    }
    async fn pay(&self, fail: u32) -> Result<u32, Refused> {
        let attempt = self.record();
        assert!(attempt > fail, "attempt {attempt} fails");
        Ok(attempt)
    }
    async fn slow(&self, slow: u32) -> Result<u32, Refused> {
        let attempt = self.record();
        if attempt <= slow {
            tokio::time::sleep(Duration::from_secs(5)).await;
        }
        Ok(attempt)
    }
    async fn refuse(&self) -> Result<u32, Refused> {
        self.record();
        Err(Refused("no".into()))
    }
    async fn charge(&self, busy: u32) -> Result<u32, PayError> {
        if self.record() <= busy {
            return Err(PayError::Busy);
        }
        Err(PayError::Declined)
    }
}

#[derive(Debug, Clone, Copy, Serialize, Deserialize, PartialEq, Eq)]
pub enum Which {
    Fetch,
    Pay,
    Slow,
    Refuse,
    Charge,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct CallState {
    which: Which,
    fail: u32,
    outcome: Option<Result<u32, String>>,
}

#[flow]
pub struct OneCall {
    #[link]
    state: CallState,
    #[link]
    flaky: impl Flaky,
}

#[flow]
impl OneCall {
    #[wire]
    fn run(&mut self) -> Command<Self> {
        if self.state.outcome.is_some() {
            return Command::finish();
        }
        let fail = self.state.fail;
        let call = match self.state.which {
            Which::Fetch => self.flaky.fetch(fail),
            Which::Pay => self.flaky.pay(fail),
            Which::Slow => self.flaky.slow(fail),
            Which::Refuse => self.flaky.refuse(),
            Which::Charge => {
                return Command::drive(self.flaky.charge(fail)).then(|f, r| {
                    // The error arrives typed: matched, not parsed from a string.
                    f.state.outcome = Some(match r {
                        Ok(n) => Ok(n),
                        Err(DriveError::Driver(PayError::Declined)) => Err("declined".into()),
                        Err(e) => Err(format!("unexpected: {e}")),
                    });
                    Ok(())
                });
            }
        };
        Command::drive(call).then(|f, r| {
            f.state.outcome = Some(r.map_err(|e| e.to_string()));
            Ok(())
        })
    }
}

async fn run(which: Which, fail: u32) -> (Engine, Seen, Result<u32, String>) {
    let seen = Seen::default();
    let engine = Engine::builder()
        .in_memory()
        .flow::<OneCall>()
        .driver(seen.clone())
        .start()
        .await
        .unwrap();
    let state = CallState {
        which,
        fail,
        outcome: None,
    };
    let h = engine.start::<OneCall>("c", state).await.unwrap();
    assert_eq!(h.finished().await.unwrap(), Ended::Finished);
    let outcome = h.state().await.unwrap().outcome.unwrap();
    (engine, seen, outcome)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_failing_attempt_is_retried_with_the_same_key_until_one_succeeds() {
    let (_engine, seen, outcome) = run(Which::Fetch, 2).await;
    assert_eq!(outcome, Ok(3), "the third attempt succeeded");
    assert_eq!(
        seen.attempts("OneCall/c/1"),
        [1, 2, 3],
        "one key, attempts numbered"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn when_retries_run_out_the_continuation_receives_the_fault() {
    let (_engine, seen, outcome) = run(Which::Fetch, 99).await;
    let err = outcome.unwrap_err();
    let expected = Fault::Panicked {
        attempts: 4,
        message: "attempt 4 fails".into(),
    };
    assert_eq!(err, expected.to_string(), "the trait allows 3 retries");
    assert_eq!(seen.attempts("OneCall/c/1"), [1, 2, 3, 4]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_method_policy_overrides_its_trait() {
    let (_engine, seen, outcome) = run(Which::Pay, 1).await;
    assert!(
        outcome.unwrap_err().contains("after 1 attempt(s)"),
        "`pay` has retries = 0"
    );
    assert_eq!(seen.attempts("OneCall/c/1"), [1]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_timed_out_attempt_is_retried() {
    let (_engine, seen, outcome) = run(Which::Slow, 1).await;
    assert_eq!(
        outcome,
        Ok(2),
        "the method's 50 ms timeout cut the first attempt"
    );
    assert_eq!(seen.attempts("OneCall/c/1"), [1, 2]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_drivers_own_error_is_retried_and_the_last_one_reaches_the_continuation() {
    let (_engine, seen, outcome) = run(Which::Refuse, 0).await;
    assert_eq!(outcome, Err("driver error: refused: no".to_string()));
    assert_eq!(
        seen.attempts("OneCall/c/1"),
        [1, 2, 3, 4],
        "an error type without `Transient` is retried under the policy"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_error_its_type_calls_permanent_is_not_retried() {
    let (_engine, seen, outcome) = run(Which::Charge, 0).await;
    assert_eq!(outcome, Err("declined".to_string()));
    assert_eq!(seen.attempts("OneCall/c/1"), [1], "declined at once");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn transient_errors_are_retried_until_a_permanent_one_comes() {
    let (engine, seen, outcome) = run(Which::Charge, 2).await;
    assert_eq!(outcome, Err("declined".to_string()));
    assert_eq!(
        seen.attempts("OneCall/c/1"),
        [1, 2, 3],
        "busy twice, then declined"
    );
    // Each failed attempt that was retried is a step of its own, with the driver's error as
    // its payload; then the timer sends the call again.
    let page = engine.history::<OneCall>("c", 0, 100).await.unwrap();
    let outputs: Vec<String> = page
        .steps
        .iter()
        .map(|s| match &s.output {
            flowwire::storage::StepOutput::Retry { attempt, fault, .. } => {
                assert_eq!(*fault, None, "the driver's own error, not a runtime fault");
                format!("retry {attempt}")
            }
            flowwire::storage::StepOutput::Drive { .. } => "drive".into(),
            flowwire::storage::StepOutput::Finish => "finish".into(),
            other => format!("{other:?}"),
        })
        .collect();
    assert_eq!(
        outputs,
        ["drive", "retry 1", "drive", "retry 2", "drive", "finish"]
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn each_retry_is_an_event_with_its_attempt_and_a_doubling_backoff() {
    let seen = Seen::default();
    let engine = Engine::builder()
        .in_memory()
        .flow::<OneCall>()
        .driver(seen.clone())
        .start()
        .await
        .unwrap();
    let mut events = engine.events();
    let state = CallState {
        which: Which::Fetch,
        fail: 3,
        outcome: None,
    };
    let h = engine.start::<OneCall>("e", state).await.unwrap();
    h.finished().await.unwrap();
    let mut retries = Vec::new();
    while let Some(Ok(e)) = events.try_next() {
        if let EventKind::Retry {
            attempt,
            due_ms,
            driver,
            method,
            call_step,
            fault,
            ..
        } = e.kind
        {
            assert_eq!((driver, method, call_step), ("Flaky", "fetch", 1));
            let fault = fault.expect("a panic is the runtime's fault");
            assert!(fault.contains("panicked"), "{fault}");
            retries.push((attempt, due_ms, e.step));
        }
    }
    let attempts: Vec<u32> = retries.iter().map(|r| r.0).collect();
    assert_eq!(attempts, [1, 2, 3]);
    // The wait is the due time less the time of the step that recorded the failure.
    let page = engine.history::<OneCall>("e", 0, 100).await.unwrap();
    let retries: Vec<(u32, u64)> = retries
        .iter()
        .map(|&(attempt, due_ms, step)| {
            let at = page.steps.iter().find(|s| s.seq == step).unwrap().at_ms;
            (attempt, due_ms - at)
        })
        .collect();
    // 10 ms doubling, capped at 20 ms; each wait between half and all of its step.
    for ((_, backoff), step) in retries.iter().zip([10, 20, 20]) {
        assert!(
            (step / 2..=step).contains(backoff),
            "{backoff} ms for a {step} ms step"
        );
    }
}

/// A driver that declares nothing: the engine's defaults apply.
#[driver]
pub trait Plain {
    async fn once(&self) -> Result<u32, Refused>;
}

#[derive(Default, Clone)]
pub struct Fragile(Seen);

#[driver]
impl Plain for Fragile {
    async fn once(&self) -> Result<u32, Refused> {
        let attempt = self.0.record();
        assert!(attempt > 1, "the first attempt fails");
        Ok(attempt)
    }
}

#[derive(Debug, Default, Clone, Serialize, Deserialize)]
pub struct PlainState {
    outcome: Option<Result<u32, String>>,
}

#[flow]
pub struct PlainFlow {
    #[link]
    state: PlainState,
    #[link]
    plain: impl Plain,
}

#[flow]
impl PlainFlow {
    #[wire]
    fn run(&mut self) -> Command<Self> {
        if self.state.outcome.is_some() {
            return Command::finish();
        }
        Command::drive(self.plain.once()).then(|f, r| {
            f.state.outcome = Some(r.map_err(|e| e.to_string()));
            Ok(())
        })
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_engine_defaults_apply_when_the_driver_declares_nothing() {
    for (retries, expect) in [(0, Err(())), (1, Ok(2))] {
        let driver = Fragile::default();
        let engine = Engine::builder()
            .in_memory()
            .flow::<PlainFlow>()
            .driver(driver.clone())
            .call_retries(retries)
            .call_backoff(Duration::from_millis(1), Duration::from_millis(2))
            .start()
            .await
            .unwrap();
        let h = engine
            .start::<PlainFlow>("p", PlainState::default())
            .await
            .unwrap();
        h.finished().await.unwrap();
        let outcome = h.state().await.unwrap().outcome.unwrap();
        assert_eq!(outcome.map_err(|_| ()), expect, "call_retries({retries})");
    }
}

#[test]
fn the_declared_policies_are_in_the_metadata() {
    let meta = serde_json::to_value(<OneCall as flowwire::Flow>::META).unwrap();
    let flaky = &meta["links"][0]["driver"];
    assert_eq!(flaky["policy"]["retries"], 3);
    assert_eq!(flaky["policy"]["backoff_ms"], 10);
    assert_eq!(flaky["methods"][1]["name"], "pay");
    assert_eq!(flaky["methods"][1]["policy"]["retries"], 0);
    assert_eq!(flaky["methods"][2]["policy"]["timeout_ms"], 50);
}
