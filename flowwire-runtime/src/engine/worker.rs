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
use tokio::sync::{Mutex, mpsc};

use crate::context::CallContext;
use crate::driver::{Dispatch, Fault};
use crate::engine::Limits;

/// One driver call to run.
pub(crate) struct Job {
    pub flow: Arc<str>,
    pub id: Arc<str>,
    pub seq: u64,
    pub method: u16,
    pub call: Bytes,
    pub reply: mpsc::UnboundedSender<OutcomeMsg>,
}

/// A call's outcome, on its way back to the runner.
pub(crate) struct OutcomeMsg {
    pub id: Arc<str>,
    pub seq: u64,
    pub result: Result<Bytes, Fault>,
}

/// Spawns the pool for one driver implementation and returns its queue.
pub(crate) fn spawn_pool<D: Dispatch<S>, S: Send + Sync + 'static>(
    svc: Arc<S>,
    limits: &Limits,
) -> mpsc::Sender<Job> {
    let (tx, rx) = mpsc::channel(limits.driver_queue);
    let rx = Arc::new(Mutex::new(rx));
    for _ in 0..limits.driver_concurrency.max(1) {
        let svc = svc.clone();
        let rx = rx.clone();
        let limits = limits.clone();
        tokio::spawn(async move {
            let mut buf = Vec::new();
            loop {
                // The lock is held only while waiting for the next job.
                let job = rx.lock().await.recv().await;
                let Some(job) = job else { return };
                let result = run_job::<D, S>(&svc, &job, &mut buf, &limits).await;
                let _ = job.reply.send(OutcomeMsg {
                    id: job.id,
                    seq: job.seq,
                    result,
                });
            }
        });
    }
    tx
}

/// Polls a future, turning a panic into an error; no allocation, no extra task.
async fn guarded<T>(fut: impl Future<Output = T>) -> Result<T, String> {
    let mut fut = pin!(fut);
    std::future::poll_fn(
        move |cx| match catch_unwind(AssertUnwindSafe(|| fut.as_mut().poll(cx))) {
            Ok(Poll::Ready(v)) => Poll::Ready(Ok(v)),
            Ok(Poll::Pending) => Poll::Pending,
            Err(p) => {
                let msg = p
                    .downcast_ref::<&str>()
                    .map(|s| (*s).to_string())
                    .or_else(|| p.downcast_ref::<String>().cloned())
                    .unwrap_or_else(|| "a non-string panic payload".into());
                Poll::Ready(Err(msg))
            }
        },
    )
    .await
}

/// The backoff before retry `attempt` (1-based): 50 ms doubling, capped at 5 s, with up to
/// 50% jitter derived from the call's identity (deterministic, no RNG needed).
fn backoff(attempt: u32, seq: u64) -> Duration {
    let base = 50u64.saturating_mul(1 << attempt.min(7)).min(5_000);
    let jitter = (seq.wrapping_mul(0x9E37_79B9_7F4A_7C15) >> 33) % (base / 2 + 1);
    Duration::from_millis(base / 2 + jitter)
}

async fn run_job<D: Dispatch<S>, S: Send + Sync + 'static>(
    svc: &S,
    job: &Job,
    buf: &mut Vec<u8>,
    limits: &Limits,
) -> Result<Bytes, Fault> {
    let timeout_ms = D::META
        .timeout_ms
        .unwrap_or(limits.call_timeout.as_millis() as u64);
    let retries = D::META.retries.unwrap_or(limits.call_retries);
    let mut attempt = 0u32;
    loop {
        attempt += 1;
        let call: D::Call = flowwire_storage::codec::decode_raw(&job.call, limits.decode_limit)
            .map_err(|e| Fault::Codec(e.to_string()))?;
        debug_assert_eq!(crate::driver::DriverCall::method(&call), job.method);
        buf.clear();
        let ctx = CallContext::new(job.flow.clone(), job.id.clone(), job.seq, attempt);
        let run = ctx.scope(guarded(D::dispatch(svc, call, buf)));
        let fault = match tokio::time::timeout(Duration::from_millis(timeout_ms), run).await {
            Ok(Ok(Ok(()))) => return Ok(Bytes::copy_from_slice(buf)),
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
        if attempt > retries {
            return Err(fault);
        }
        tracing::warn!(flow = %job.flow, id = %job.id, step = job.seq, attempt, %fault, "driver call retried");
        tokio::time::sleep(backoff(attempt, job.seq)).await;
    }
}

#[cfg(test)]
mod tests {
    use super::backoff;

    #[test]
    fn backoff_grows_and_is_capped() {
        let mut last = 0;
        for attempt in 1..6 {
            let d = backoff(attempt, 7).as_millis();
            assert!(d >= last / 2, "attempt {attempt}: {d} ms");
            last = d;
        }
        assert!(backoff(30, 1).as_millis() <= 5_000);
    }
}
