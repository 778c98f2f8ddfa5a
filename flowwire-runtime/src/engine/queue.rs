//! The queue between the runners and one driver's workers: bounded, many senders, many
//! takers, no hand-off between takers.
//!
//! A worker takes a job under a short lock and runs it with the lock released, then takes
//! the next one itself. A call that answers at once is followed by the next without a task
//! switch, so a burst of calls comes back to the runner as one round; a call that waits
//! leaves the queue to the other workers. (A fair async mutex around one receiver, which
//! this replaces, passed the queue to the next worker after every job: each worker ran one
//! job per wake-up, and the runner woke for every one or two outcomes.)
//!
//! One worker is woken for a burst of jobs, not one a job (see [`Jobs::recv`]): waking one
//! a job had a round's 64 instant calls on one thread wake 64 workers, 63 of which found
//! the queue emptied by the first.
//!
//! Closed when the last [`Port`] is dropped: takers get the jobs still queued, then `None`.

use std::collections::VecDeque;
use std::pin::pin;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};

use tokio::sync::Notify;

use crate::engine::job::Job;

/// A queue of at most `cap` jobs: its sending side and its taking side.
pub(crate) fn channel(cap: usize) -> (Port, Jobs) {
    let queue = Arc::new(Queue {
        state: Mutex::new(State {
            jobs: VecDeque::new(),
            closed: false,
            waiting: 0,
            waking: false,
        }),
        ready: Notify::new(),
        space: Notify::new(),
        cap: cap.max(1),
        senders: AtomicUsize::new(1),
    });
    (
        Port {
            queue: queue.clone(),
        },
        Jobs { queue },
    )
}

struct Queue {
    state: Mutex<State>,
    /// A job was queued, or the queue closed.
    ready: Notify,
    /// A job was taken while senders wait for room.
    space: Notify,
    cap: usize,
    senders: AtomicUsize,
}

struct State {
    jobs: VecDeque<Job>,
    closed: bool,
    /// Senders waiting for room.
    waiting: usize,
    /// A taker was woken for the jobs queued and has not looked at the queue since: no
    /// other is woken for them (see [`Jobs::recv`]).
    waking: bool,
}

impl Queue {
    fn lock(&self) -> MutexGuard<'_, State> {
        // Every critical section is a push or a pop: a panic cannot leave it half done.
        self.state.lock().unwrap_or_else(PoisonError::into_inner)
    }
}

/// Why [`Port::try_send`] did not queue a job (it is handed back).
pub(crate) enum TrySendError {
    /// The queue holds `cap` jobs.
    Full(Job),
    /// Every taker is gone (the engine is shutting down).
    Closed(Job),
}

/// The sending side. Cloned for every runner that links the driver.
pub(crate) struct Port {
    queue: Arc<Queue>,
}

impl Clone for Port {
    fn clone(&self) -> Self {
        self.queue.senders.fetch_add(1, Ordering::Relaxed);
        Self {
            queue: self.queue.clone(),
        }
    }
}

impl Drop for Port {
    fn drop(&mut self) {
        if self.queue.senders.fetch_sub(1, Ordering::AcqRel) == 1 {
            self.queue.lock().closed = true;
            self.queue.ready.notify_waiters();
        }
    }
}

impl Port {
    /// Queues a job if there is room, without waiting (the runners queue a round's calls
    /// with [`Port::try_send_all`]).
    #[cfg(test)]
    #[allow(
        clippy::result_large_err,
        reason = "the job is handed back, as tokio's channels do: boxing it would allocate"
    )]
    pub(crate) fn try_send(&self, job: Job) -> Result<(), TrySendError> {
        self.push(job, false)
    }

    /// Queues a job if there is room. A sender that will wait for room (`wait`) is
    /// counted under the same lock that found the queue full, so a taker that makes room
    /// after it looked knows to wake it.
    #[allow(
        clippy::result_large_err,
        reason = "the job is handed back, as tokio's channels do: boxing it would allocate"
    )]
    fn push(&self, job: Job, wait: bool) -> Result<(), TrySendError> {
        let q = &self.queue;
        {
            let mut state = q.lock();
            if state.closed {
                return Err(TrySendError::Closed(job));
            }
            if state.jobs.len() >= q.cap {
                if wait {
                    state.waiting += 1;
                }
                return Err(TrySendError::Full(job));
            }
            state.jobs.push_back(job);
            if std::mem::replace(&mut state.waking, true) {
                // A taker is on its way: it takes this job too, or wakes another for it.
                return Ok(());
            }
        }
        q.ready.notify_one();
        Ok(())
    }

    /// Queues jobs from the front of `jobs`, as many as there is room for, under one lock
    /// and with at most one wake-up; what did not fit stays in `jobs`, in order. `false`
    /// if the queue is closed (nothing is queued then).
    pub(crate) fn try_send_all(&self, jobs: &mut VecDeque<Job>) -> bool {
        let q = &self.queue;
        {
            let mut state = q.lock();
            if state.closed {
                return false;
            }
            let room = q.cap.saturating_sub(state.jobs.len());
            if room == 0 || jobs.is_empty() {
                return true;
            }
            if room >= jobs.len() && state.jobs.is_empty() {
                // The usual case (the workers kept up): a swap, not a copy.
                std::mem::swap(&mut state.jobs, jobs);
            } else {
                let n = room.min(jobs.len());
                state.jobs.extend(jobs.drain(..n));
            }
            if std::mem::replace(&mut state.waking, true) {
                // A taker is on its way: it takes these too, or wakes another for them.
                return true;
            }
        }
        q.ready.notify_one();
        true
    }

    /// Queues a job, waiting for room; hands it back if the queue closed. Cancel-safe: a
    /// job is queued whole or dropped with the future, never half.
    pub(crate) async fn send(&self, mut job: Job) -> Result<(), Job> {
        loop {
            let mut room = pin!(self.queue.space.notified());
            room.as_mut().enable();
            match self.push(job, true) {
                Ok(()) => return Ok(()),
                Err(TrySendError::Closed(j)) => return Err(j),
                Err(TrySendError::Full(j)) => job = j,
            }
            // Counted by `push`; uncounted when the wait ends (or the future is dropped).
            let _waiting = Waiting(&self.queue);
            room.await;
        }
    }
}

/// Lowers the count of waiting senders when a waiting `send` stops waiting.
struct Waiting<'a>(&'a Queue);

impl Drop for Waiting<'_> {
    fn drop(&mut self) {
        let mut state = self.0.lock();
        state.waiting = state.waiting.saturating_sub(1);
    }
}

/// The taking side, shared by a driver's workers (or by the bus publisher).
#[derive(Clone)]
pub(crate) struct Jobs {
    queue: Arc<Queue>,
}

impl Jobs {
    /// The next job, if one is queued (the bus publisher's; workers take runs of jobs
    /// with [`try_recv_many`](Self::try_recv_many)).
    #[cfg_attr(not(feature = "redis"), allow(dead_code))]
    pub(crate) fn try_recv(&self) -> Option<Job> {
        self.take(false)
    }

    /// The next job, if one is queued; `woken`: this taker was woken for the queue and
    /// looks at it now. A taker that leaves jobs behind makes sure one more is woken for
    /// them, unless one is already on its way.
    fn take(&self, woken: bool) -> Option<Job> {
        let q = &self.queue;
        let mut state = q.lock();
        if woken {
            state.waking = false;
        }
        // The job stays where `pop_front` puts it until it is returned (a job is 184
        // bytes: gathering it into a tuple with the flags copied it once more).
        let job = state.jobs.pop_front();
        let wake = job.is_some() && !state.jobs.is_empty() && !state.waking;
        if wake {
            state.waking = true;
        }
        let waiting = job.is_some() && state.waiting > 0;
        drop(state);
        if waiting {
            q.space.notify_one();
        }
        if wake {
            q.ready.notify_one();
        }
        job
    }

    /// The next job, if one is queued, and up to `more` of the jobs after it into `ahead`
    /// (which the caller has emptied): one lock for a run of jobs, where a taker that
    /// runs calls back to back took the lock once a job. A taker that leaves jobs behind
    /// wakes one more for them, as [`take`](Self::take) does; a taker that will wait on
    /// something puts what it took ahead back first ([`put_back`](Self::put_back)).
    pub(crate) fn try_recv_many(&self, ahead: &mut VecDeque<Job>, more: usize) -> Option<Job> {
        debug_assert!(ahead.is_empty());
        let q = &self.queue;
        let mut state = q.lock();
        let job = state.jobs.pop_front()?;
        let n = more.min(state.jobs.len());
        ahead.extend(state.jobs.drain(..n));
        let wake = !state.jobs.is_empty() && !state.waking;
        if wake {
            state.waking = true;
        }
        let waiting = state.waiting > 0;
        drop(state);
        if waiting {
            // Room for as many jobs as were taken: every waiting sender looks again.
            q.space.notify_waiters();
        }
        if wake {
            q.ready.notify_one();
        }
        Some(job)
    }

    /// Puts jobs taken ahead ([`try_recv_many`](Self::try_recv_many)) back at the front
    /// of the queue, in their order, and wakes a taker for them: they are not kept behind
    /// a call that waits. The queue may hold up to that many jobs more than its capacity
    /// for a while (senders queued into the room they left).
    pub(crate) fn put_back(&self, ahead: &mut VecDeque<Job>) {
        if ahead.is_empty() {
            return;
        }
        let q = &self.queue;
        let mut state = q.lock();
        while let Some(job) = ahead.pop_back() {
            state.jobs.push_front(job);
        }
        if std::mem::replace(&mut state.waking, true) {
            // A taker is on its way: it takes these too, or wakes another for them.
            return;
        }
        drop(state);
        q.ready.notify_one();
    }

    /// The next job, waiting for one; `None` once the queue is closed and empty.
    /// Cancel-safe: a job is taken only when it is returned (a wake-up a dropped call
    /// received passes on to another taker).
    ///
    /// One taker is woken for a burst of jobs, not one a job: the woken taker takes the
    /// first and, if more are left, wakes one more (which takes the next, or finds them
    /// taken), and so on. A burst of calls that answer at once is run by one taker while
    /// the next is woken once; calls that wait still spread over the takers (each one that
    /// leaves jobs behind wakes another). One wake-up a job made a burst of 64 instant
    /// calls on one thread wake 64 takers, 63 of which found the queue empty.
    pub(crate) async fn recv(&self) -> Option<Job> {
        if let Some(job) = self.take(false) {
            return Some(job);
        }
        loop {
            let mut ready = pin!(self.queue.ready.notified());
            ready.as_mut().enable();
            if let Some(job) = self.take(false) {
                return Some(job);
            }
            if self.queue.lock().closed {
                // Closed and, checked after the flag, empty: no sender can queue again.
                return self.take(false);
            }
            ready.await;
            // Woken (for a job, or by the close): this taker's look is the wake-up's.
            if let Some(job) = self.take(true) {
                return Some(job);
            }
        }
    }
}

#[cfg(test)]
#[path = "queue_tests.rs"]
mod tests;
