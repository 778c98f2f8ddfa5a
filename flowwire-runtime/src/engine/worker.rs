//! Driver workers: each registered implementation gets a pool of tasks that take jobs from
//! one bounded queue, run one attempt of each with a timeout and panic guard, and send the
//! outcome back to the flow's runner, with the wait before the next attempt when the call's
//! policy retries a failed one (the runner makes that wait a durable timer).
//!
//! Calls that answer at once are run back to back, and their outcomes handed to their
//! runner together ([`Held`]): a few at a time, and always before the worker waits for
//! anything (a job, a call that did not answer at once, its turn on the thread).

use std::collections::VecDeque;
use std::future::Future;
use std::pin::pin;
use std::sync::Arc;
use std::task::Poll;
use std::time::Duration;

use flowwire_storage::arena::Arena;

use crate::context::CallContext;
use crate::driver::{Dispatch, Fault, Verdict};
use crate::engine::Limits;
use crate::engine::job::{Job, OutcomeMsg};
use crate::engine::outcomes::OutcomeTx;
use crate::engine::queue::{self, Jobs, Port};
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
    /// Counts `n` calls as running, before the check of [`Drain::stopping`] that lets them
    /// start: `stop` sees every call that passed it.
    fn count(&self, n: usize) {
        self.running
            .fetch_add(n, std::sync::atomic::Ordering::SeqCst);
    }

    /// Whether the engine is stopping (no call starts once it is).
    fn stopping(&self) -> bool {
        self.stopping.load(std::sync::atomic::Ordering::SeqCst)
    }

    /// The outcomes of `n` calls were handed to their runner.
    fn end_many(&self, n: usize) {
        use std::sync::atomic::Ordering::SeqCst;
        // Only a stop waits for the last one (`notify_waiters` takes a lock: not on every
        // call). The count falls before the flag is read, and `stop` raises the flag
        // before it reads the count: either `stop` sees no call running, or this sees the
        // flag and wakes it.
        if n > 0 && self.running.fetch_sub(n, SeqCst) == n && self.stopping.load(SeqCst) {
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

/// Jobs a worker takes from the queue with the one it runs, under the same lock: a run of
/// calls that answer at once takes the lock once for many. They go back to the queue
/// before the worker waits on anything (a call that did not answer at once, its turn on
/// the thread), so no job waits behind a slow call while another worker is free.
const AHEAD: usize = 15;

/// Outcomes a worker holds before it hands them over: enough that a runner is woken once
/// for many, few enough that a runner on another thread applies the first while the
/// worker runs the next ones.
const HOLD: usize = 32;

/// Outcomes of calls run back to back, not yet handed to their runner (all to the same
/// one: an outcome for another runner hands these over first). Each counts as a call
/// still running for [`Drain`] until it is handed over, and the runner's sender is kept
/// only as long as outcomes are held for it, as each job's own copy was before.
#[derive(Default)]
struct Held {
    to: Option<OutcomeTx>,
    outcomes: VecDeque<OutcomeMsg>,
    /// Calls counted as running for [`Drain`] and not started yet (see [`Held::begin`]).
    credit: usize,
}

impl Held {
    /// The worker is about to run a call, with `ahead` more taken from the queue: `false`
    /// once the engine is stopping (then the call is not run).
    ///
    /// Calls are counted as running a run at a time: the first of a run counts itself and
    /// the ones taken with it, with one atomic update (one a call cost about 1.5 % of a
    /// step on one core), and each checks [`Drain::stopping`] before it starts. What was
    /// counted and not started is given back when the worker hands over its outcomes,
    /// which it does before it waits on anything.
    fn begin(&mut self, drain: &Drain, ahead: usize) -> bool {
        if self.credit == 0 {
            self.credit = 1 + ahead;
            drain.count(self.credit);
        }
        if drain.stopping() {
            drain.end_many(std::mem::take(&mut self.credit));
            return false;
        }
        self.credit -= 1;
        true
    }

    /// Holds `o` for the runner behind `to`, handing over what is held first when that is
    /// another runner, and everything once [`HOLD`] are held.
    /// A handle on a channel already held for goes back with its outcome, for the
    /// runner's next job (see [`OutcomeMsg::back`]).
    fn hold(&mut self, to: OutcomeTx, mut o: OutcomeMsg, drain: &Drain) {
        match &self.to {
            Some(held) if held.same_channel(&to) => o.back = Some(to),
            _ => {
                self.hand_over(drain);
                self.to = Some(to);
            }
        }
        self.outcomes.push_back(o);
        if self.outcomes.len() >= HOLD {
            self.hand_over(drain);
        }
    }

    /// Hands every held outcome to its runner, and gives back the count of calls not
    /// started (see [`Held::begin`]).
    fn hand_over(&mut self, drain: &Drain) {
        let n = self.outcomes.len() + std::mem::take(&mut self.credit);
        if let Some(to) = self.to.take() {
            to.send_all(&mut self.outcomes);
        }
        // Handed over, or dropped with a runner that is gone (as a single send's would be).
        self.outcomes.clear();
        drain.end_many(n);
    }
}

/// What a worker does before it waits: it hands over the outcomes it holds, and puts back
/// the jobs it took ahead of the one it runs.
struct BeforeWait<'a> {
    held: &'a mut Held,
    drain: &'a Drain,
    jobs: &'a Jobs,
    ahead: &'a mut VecDeque<Job>,
}

impl BeforeWait<'_> {
    fn now(&mut self) {
        self.held.hand_over(self.drain);
        self.jobs.put_back(self.ahead);
    }
}

/// Spawns the pool for one driver implementation and returns its queue.
pub(crate) fn spawn_pool<D: Dispatch<S>, S: Send + Sync + 'static>(
    svc: Arc<S>,
    limits: &Limits,
    drain: &Arc<Drain>,
) -> Port {
    let (port, jobs) = queue::channel(limits.driver_queue);
    for _ in 0..limits.driver_concurrency.max(1) {
        let svc = svc.clone();
        let jobs = jobs.clone();
        let limits = limits.clone();
        let drain = drain.clone();
        tokio::spawn(async move {
            let mut buf = Vec::new();
            let mut arena = Arena::default();
            let mut burst = 0;
            let mut held = Held::default();
            let mut ahead = VecDeque::new();
            loop {
                let job = match ahead.pop_front() {
                    Some(job) => job,
                    None => match jobs.try_recv_many(&mut ahead, AHEAD) {
                        Some(job) => job,
                        None => {
                            // A wait ends the run of jobs back to back.
                            burst = 0;
                            held.hand_over(&drain);
                            match jobs.recv().await {
                                Some(job) => job,
                                None => break,
                            }
                        }
                    },
                };
                if !held.begin(&drain, ahead.len()) {
                    // Stopping: the call is sent again after the restart.
                    held.hand_over(&drain);
                    continue;
                }
                let before_wait = BeforeWait {
                    held: &mut held,
                    drain: &drain,
                    jobs: &jobs,
                    ahead: &mut ahead,
                };
                let (reply, outcome) =
                    run_job::<D, S>(&svc, job, (&mut buf, &mut arena), &limits, before_wait).await;
                held.hold(reply, outcome, &drain);
                burst += 1;
                if burst >= BURST {
                    burst = 0;
                    BeforeWait {
                        held: &mut held,
                        drain: &drain,
                        jobs: &jobs,
                        ahead: &mut ahead,
                    }
                    .now();
                    tokio::task::yield_now().await;
                }
            }
            held.hand_over(&drain);
        });
    }
    port
}

/// Runs one attempt of a call: its outcome (its reply, or the runtime's fault) for the
/// runner that `reply` reaches, with the wait before the next attempt when it failed and
/// the call's policy retries it. Retries are not waited out here: the runner records each
/// failed attempt and arms a durable timer for the next one, so a backoff survives
/// restarts and costs no memory while it runs.
async fn run_job<D: Dispatch<S>, S: Send + Sync + 'static>(
    svc: &S,
    job: Job,
    (buf, arena): (&mut Vec<u8>, &mut Arena),
    limits: &Limits,
    mut before_wait: BeforeWait<'_>,
) -> (OutcomeTx, OutcomeMsg) {
    let Job {
        flow,
        id,
        seq,
        branch,
        method,
        call,
        redelivered,
        attempt,
        policy,
        names,
        reply,
        receipt,
    } = job;
    let attempt = attempt.max(1);
    let outcome = |id, result, retry: Option<Duration>| OutcomeMsg {
        id,
        seq,
        branch,
        result,
        retry_ms: retry.map(|d| d.as_millis() as u64),
        receipt,
        back: None,
    };
    // A large `Blob` argument is a slice of the job's buffer, not a copy.
    let decoded: Result<D::Call, _> =
        flowwire_storage::rope::codec::decode_shared(&call, limits.decode_limit);
    let call = match decoded {
        Ok(call) => call,
        Err(e) => return (reply, outcome(id, Err(Fault::Codec(e.to_string())), None)),
    };
    debug_assert_eq!(crate::driver::DriverCall::method(&call), method);
    buf.clear();
    // The context owns the instance id while the call runs, and gives it back after
    // (a clone would be a reference count taken and given back for every call).
    let ctx = CallContext::new(flow, id, seq, branch, attempt, redelivered);
    let (ran, id) = {
        let mut run = pin!(ctx.scope(guard_future(D::dispatch(svc, call, buf))));
        // A call that answers at its first poll (a cache, an in-process service) needs
        // no timer: the timeout is armed only once the call waits. Time spent in the
        // first poll is the driver's own code, which no timer could interrupt either.
        let ran = match std::future::poll_fn(|cx| Poll::Ready(run.as_mut().poll(cx))).await {
            Poll::Ready(r) => Ok(r),
            Poll::Pending => {
                // The outcomes held and the jobs taken ahead are not kept waiting for
                // this call.
                before_wait.now();
                tokio::time::timeout(policy.timeout, run.as_mut()).await
            }
        };
        // The future gives its context back whenever it is not being polled: the `None`
        // arm never runs (were it to, the outcome would reach no instance, and the call
        // would be sent again when the engine restarts, as after a crash).
        let id = match run.as_mut().take_value() {
            Some(ctx) => ctx.into_instance(),
            None => {
                debug_assert!(false, "a call's context was not given back");
                tracing::error!(
                    flow,
                    step = seq,
                    "a driver call's context was not given back"
                );
                Arc::from("")
            }
        };
        (ran, id)
    };
    let (result, transient) = match ran {
        Ok(Ok(Ok(Verdict::Ok))) => return (reply, outcome(id, Ok(arena.copy(buf)), None)),
        Ok(Ok(Ok(Verdict::Err { transient }))) => (Ok(arena.copy(buf)), transient),
        Ok(Ok(Err(e))) => return (reply, outcome(id, Err(Fault::Codec(e.to_string())), None)),
        Ok(Err(message)) => (
            Err(Fault::Panicked {
                attempts: attempt,
                message,
            }),
            true,
        ),
        Err(_) => (
            Err(Fault::TimedOut {
                attempts: attempt,
                timeout_ms: policy.timeout.as_millis() as u64,
            }),
            true,
        ),
    };
    let retry = if transient {
        policy.retry_after(attempt)
    } else {
        None
    };
    if let Some(delay) = retry {
        let why = match &result {
            Ok(_) => "the driver returned an error".to_string(),
            Err(fault) => fault.to_string(),
        };
        tracing::debug!(
            flow,
            id = %id,
            step = seq,
            branch,
            driver = names.0,
            method = names.1,
            attempt,
            retry_in = ?delay,
            "{why}; the call is retried"
        );
    }
    (reply, outcome(id, result, retry))
}

#[cfg(test)]
mod tests {
    use super::{Drain, Held};
    use crate::engine::job::OutcomeMsg;
    use crate::engine::outcomes::channel;

    fn outcome(seq: u64) -> OutcomeMsg {
        OutcomeMsg::ok_for_test(seq)
    }

    fn running(drain: &Drain) -> usize {
        drain.running.load(std::sync::atomic::Ordering::SeqCst)
    }

    #[test]
    fn a_run_of_calls_is_counted_at_once_and_what_did_not_start_is_given_back() {
        let (a, _from_a) = channel();
        let drain = Drain::default();
        let mut held = Held::default();
        assert!(held.begin(&drain, 3), "one call, three more taken with it");
        assert_eq!(running(&drain), 4, "the four are counted at once");
        held.hold(a.clone(), outcome(1), &drain);
        assert!(held.begin(&drain, 2));
        assert_eq!(
            running(&drain),
            4,
            "the second call was counted with the first"
        );
        held.hold(a.clone(), outcome(2), &drain);
        // Before the worker waits: its two outcomes are handed over, and the two calls it
        // counted and did not start are given back (they go back to the queue).
        held.hand_over(&drain);
        assert_eq!(running(&drain), 0);

        // Once the engine is stopping, no call starts and none stays counted.
        drain
            .stopping
            .store(true, std::sync::atomic::Ordering::SeqCst);
        assert!(!held.begin(&drain, 5));
        assert_eq!(running(&drain), 0);
    }

    #[test]
    fn an_outcome_for_the_runner_held_for_carries_its_jobs_reply_handle_back() {
        let (a, mut from_a) = channel();
        let (b, mut from_b) = channel();
        let drain = Drain::default();
        let mut held = Held::default();
        for _ in 0..4 {
            assert!(held.begin(&drain, 0));
        }
        // The first job's handle is the one held to send with; the next one for the same
        // runner goes back with its outcome, for the runner's next job.
        held.hold(a.clone(), outcome(1), &drain);
        held.hold(a.clone(), outcome(2), &drain);
        // An outcome for another runner hands the held ones over first.
        held.hold(b.clone(), outcome(3), &drain);
        held.hold(b.clone(), outcome(4), &drain);
        held.hand_over(&drain);
        let back = |o: OutcomeMsg, to: &crate::engine::outcomes::OutcomeTx| {
            (o.seq, o.back.is_some_and(|h| h.same_channel(to)))
        };
        let from_a: Vec<_> = std::iter::from_fn(|| from_a.try_recv())
            .map(|o| back(o, &a))
            .collect();
        let from_b: Vec<_> = std::iter::from_fn(|| from_b.try_recv())
            .map(|o| back(o, &b))
            .collect();
        assert_eq!(from_a, [(1, false), (2, true)]);
        assert_eq!(from_b, [(3, false), (4, true)]);
        assert_eq!(
            drain.running.load(std::sync::atomic::Ordering::SeqCst),
            0,
            "every outcome handed over ends its call"
        );
    }
}
