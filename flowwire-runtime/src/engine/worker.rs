//! Driver workers: each registered implementation gets a pool of tasks that take jobs from
//! one bounded queue, run them with a timeout and panic guard, retry faults with backoff,
//! and send the outcome back to the flow's runner.

use std::future::Future;
use std::panic::{AssertUnwindSafe, catch_unwind};
use std::pin::pin;
use std::sync::Arc;
use std::task::Poll;
use std::time::Duration;

use bytes::Bytes;
use flowwire_storage::arena::Arena;
use tokio::sync::mpsc;

use crate::context::CallContext;
use crate::driver::{Dispatch, Fault};
use crate::engine::Limits;
use crate::engine::queue::{self, Port};
use crate::events::{Emitter, EventKind};

/// A driver method's policy with every fallback applied.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct CallPolicy {
    pub timeout: Duration,
    pub retries: u32,
    pub backoff_ms: u64,
    pub max_backoff_ms: u64,
    pub park: bool,
}

impl CallPolicy {
    /// Method, then trait, then engine.
    pub(crate) fn resolve(
        method: crate::meta::Policy,
        driver: crate::meta::Policy,
        engine: crate::meta::Policy,
    ) -> Self {
        // Every field is set once the built-in defaults are under the rest.
        let p = method
            .or(driver)
            .or(engine)
            .or(crate::meta::Policy::DEFAULT);
        Self {
            timeout: Duration::from_millis(p.timeout_ms.unwrap_or_default()),
            retries: p.retries.unwrap_or_default(),
            backoff_ms: p.backoff_ms.unwrap_or_default(),
            max_backoff_ms: p.max_backoff_ms.unwrap_or_default(),
            park: p.ambiguous == Some(crate::meta::Ambiguous::Park),
        }
    }

    /// The wait before retry `attempt` (1-based): the first backoff doubling, capped, each
    /// delay between half and all of its step (jitter, so retries of many calls spread).
    pub(crate) fn backoff(&self, attempt: u32) -> Duration {
        let step = self
            .backoff_ms
            .saturating_mul(1u64 << attempt.saturating_sub(1).min(32))
            .min(self.max_backoff_ms);
        let jitter = u64::from(crate::clock::jitter()) % (step / 2 + 1);
        Duration::from_millis(step / 2 + jitter)
    }
}

/// Where a call or an outcome came from on the multi-process bus, so that it is
/// acknowledged once it is done with: the stream entry, and (for a call) the outcome
/// stream its result goes to.
#[derive(Debug, Clone)]
pub(crate) struct Receipt {
    pub entry: String,
    #[cfg_attr(not(feature = "redis"), allow(dead_code))]
    pub reply_to: String,
}

/// One driver call to run.
pub(crate) struct Job {
    pub flow: &'static str,
    pub id: Arc<str>,
    pub seq: u64,
    /// The fan-out branch.
    pub branch: Option<u32>,
    pub method: u16,
    pub call: Bytes,
    /// Restarts that interrupted this call before.
    pub redelivered: u32,
    pub policy: CallPolicy,
    pub names: (&'static str, &'static str),
    pub reply: mpsc::UnboundedSender<OutcomeMsg>,
    /// Set when the call came over the bus (multi-process mode).
    pub receipt: Option<Box<Receipt>>,
}

/// A call's outcome, on its way back to the runner.
pub(crate) struct OutcomeMsg {
    pub id: Arc<str>,
    pub seq: u64,
    pub branch: Option<u32>,
    pub result: Result<Bytes, Fault>,
    /// Set when the call or the outcome came over the bus (multi-process mode).
    pub receipt: Option<Box<Receipt>>,
}

/// The graceful stop of an engine's driver pools: once [`Drain::stop`] is called, workers
/// start no more calls (a call not started stays in its instance's record and is sent
/// again when the engine restarts), and `stop` waits for the calls already running to
/// finish and hand their outcomes to their runners.
#[derive(Debug, Default)]
pub(crate) struct Drain {
    stopping: std::sync::atomic::AtomicBool,
    running: std::sync::atomic::AtomicUsize,
    idle: tokio::sync::Notify,
}

impl Drain {
    /// A worker is about to run a call: `false` once the engine is stopping (then the call
    /// is not run).
    fn begin(&self) -> bool {
        use std::sync::atomic::Ordering::SeqCst;
        // Counted before the check: `stop` sees every call that passed it.
        self.running.fetch_add(1, SeqCst);
        if self.stopping.load(SeqCst) {
            self.end();
            return false;
        }
        true
    }

    /// A call's outcome was handed to its runner.
    fn end(&self) {
        use std::sync::atomic::Ordering::SeqCst;
        if self.running.fetch_sub(1, SeqCst) == 1 {
            self.idle.notify_waiters();
        }
    }

    /// Starts no more calls and waits, up to `limit`, for the running ones; `true` if every
    /// one finished.
    pub(crate) async fn stop(&self, limit: Duration) -> bool {
        use std::sync::atomic::Ordering::SeqCst;
        self.stopping.store(true, SeqCst);
        tokio::time::timeout(limit, async {
            loop {
                let idle = self.idle.notified();
                let mut idle = pin!(idle);
                idle.as_mut().enable();
                if self.running.load(SeqCst) == 0 {
                    return;
                }
                idle.await;
            }
        })
        .await
        .is_ok()
    }
}

/// Jobs a worker runs back to back before it lets other tasks on its thread run (the
/// budget tokio gives its own resources): calls that answer at once are not awaited on
/// anything that would yield.
const BURST: u32 = 128;

/// Spawns the pool for one driver implementation and returns its queue.
pub(crate) fn spawn_pool<D: Dispatch<S>, S: Send + Sync + 'static>(
    svc: Arc<S>,
    limits: &Limits,
    events: &Emitter,
    drain: &Arc<Drain>,
) -> Port {
    let (port, jobs) = queue::channel(limits.driver_queue);
    for _ in 0..limits.driver_concurrency.max(1) {
        let svc = svc.clone();
        let jobs = jobs.clone();
        let limits = limits.clone();
        let events = events.clone();
        let drain = drain.clone();
        tokio::spawn(async move {
            let mut buf = Vec::new();
            let mut arena = Arena::default();
            let mut burst = 0;
            while let Some(job) = jobs.recv().await {
                if !drain.begin() {
                    // Stopping: the call is sent again after the restart.
                    continue;
                }
                let result =
                    run_job::<D, S>(&svc, &job, (&mut buf, &mut arena), &limits, &events).await;
                let _ = job.reply.send(OutcomeMsg {
                    id: job.id,
                    seq: job.seq,
                    branch: job.branch,
                    result,
                    receipt: job.receipt,
                });
                drain.end();
                burst += 1;
                if burst >= BURST {
                    burst = 0;
                    tokio::task::yield_now().await;
                }
            }
        });
    }
    port
}

/// Polls a future, turning a panic into an error; no allocation, no extra task.
async fn guarded<T>(fut: impl Future<Output = T>) -> Result<T, String> {
    let mut fut = pin!(fut);
    std::future::poll_fn(
        move |cx| match catch_unwind(AssertUnwindSafe(|| fut.as_mut().poll(cx))) {
            Ok(Poll::Ready(v)) => Poll::Ready(Ok(v)),
            Ok(Poll::Pending) => Poll::Pending,
            Err(p) => Poll::Ready(Err(crate::core::panic_message(&*p))),
        },
    )
    .await
}

async fn run_job<D: Dispatch<S>, S: Send + Sync + 'static>(
    svc: &S,
    job: &Job,
    (buf, arena): (&mut Vec<u8>, &mut Arena),
    limits: &Limits,
    events: &Emitter,
) -> Result<Bytes, Fault> {
    let policy = job.policy;
    let timeout_ms = policy.timeout.as_millis() as u64;
    let mut attempt = 0;
    let span = tracing::debug_span!(
        "call",
        flow = job.flow,
        id = %job.id,
        step = job.seq,
        branch = job.branch,
        driver = job.names.0,
        method = job.names.1,
    );
    loop {
        attempt += 1;
        let call: D::Call = flowwire_storage::codec::decode_raw(&job.call, limits.decode_limit)
            .map_err(|e| Fault::Codec(e.to_string()))?;
        debug_assert_eq!(crate::driver::DriverCall::method(&call), job.method);
        buf.clear();
        let ctx = CallContext::new(
            job.flow,
            job.id.clone(),
            job.seq,
            job.branch,
            attempt,
            job.redelivered,
        );
        let ran = {
            let mut run = pin!(ctx.scope(guarded(D::dispatch(svc, call, buf))));
            // A call that answers at its first poll (a cache, an in-process service) needs
            // no timer: the timeout is armed only once the call waits. Time spent in the
            // first poll is the driver's own code, which no timer could interrupt either.
            match std::future::poll_fn(|cx| Poll::Ready(run.as_mut().poll(cx))).await {
                Poll::Ready(r) => Ok(r),
                Poll::Pending => tokio::time::timeout(policy.timeout, run).await,
            }
        };
        let fault = match ran {
            Ok(Ok(Ok(()))) => return Ok(arena.copy(buf)),
            Ok(Ok(Err(e))) => return Err(Fault::Codec(e.to_string())),
            Ok(Err(message)) => Fault::Panicked {
                attempts: attempt,
                message,
            },
            Err(_) => Fault::TimedOut {
                attempts: attempt,
                timeout_ms,
            },
        };
        if attempt > policy.retries {
            return Err(fault);
        }
        let delay = policy.backoff(attempt);
        span.in_scope(|| tracing::warn!(attempt, %fault, retry_in = ?delay, "driver call retried"));
        if events.wanted() {
            events.send(
                job.flow,
                &job.id,
                job.seq,
                EventKind::Retry {
                    driver: job.names.0,
                    method: job.names.1,
                    call_step: job.seq,
                    attempt,
                    fault: fault.to_string(),
                    backoff_ms: delay.as_millis() as u64,
                },
            );
        }
        tokio::time::sleep(delay).await;
    }
}

#[cfg(test)]
mod tests {
    use super::CallPolicy;
    use crate::meta::Policy;

    #[test]
    fn backoff_doubles_up_to_its_cap_with_jitter_below_each_step() {
        let p = CallPolicy::resolve(
            Policy {
                backoff_ms: Some(100),
                max_backoff_ms: Some(1_000),
                ..Policy::NONE
            },
            Policy::NONE,
            Policy::NONE,
        );
        for (attempt, step) in [
            (1, 100),
            (2, 200),
            (3, 400),
            (4, 800),
            (5, 1_000),
            (40, 1_000),
        ] {
            let d = p.backoff(attempt).as_millis() as u64;
            assert!(d >= step / 2 && d <= step, "attempt {attempt}: {d} ms");
        }
    }

    #[test]
    fn a_method_policy_overrides_its_trait_which_overrides_the_engine() {
        let engine = Policy {
            timeout_ms: Some(30_000),
            retries: Some(3),
            ..Policy::NONE
        };
        let driver = Policy {
            retries: Some(5),
            ..Policy::NONE
        };
        let method = Policy {
            timeout_ms: Some(10),
            ambiguous: Some(crate::meta::Ambiguous::Park),
            ..Policy::NONE
        };
        let p = CallPolicy::resolve(method, driver, engine);
        assert_eq!(p.timeout.as_millis(), 10);
        assert_eq!(p.retries, 5);
        assert!(p.park);
        assert!(!CallPolicy::resolve(Policy::NONE, driver, engine).park);
    }
}
