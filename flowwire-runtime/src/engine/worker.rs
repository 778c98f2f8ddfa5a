//! Driver workers: each registered implementation gets a pool of tasks that take jobs from
//! one bounded queue, run them with a timeout and panic guard, retry faults with backoff,
//! and send the outcome back to the flow's runner.

use std::future::Future;
use std::pin::pin;
use std::sync::Arc;
use std::task::Poll;
use std::time::Duration;

use bytes::Bytes;
use flowwire_storage::arena::Arena;

use crate::context::CallContext;
use crate::driver::{Dispatch, Fault};
use crate::engine::Limits;
use crate::engine::job::{Job, OutcomeMsg};
use crate::engine::queue::{self, Port};
use crate::events::{Emitter, EventKind};
use crate::guard::guard_future;

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
            let mut run = pin!(ctx.scope(guard_future(D::dispatch(svc, call, buf))));
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
