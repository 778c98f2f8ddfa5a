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
    /// Queues a job if there is room, without waiting.
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
        }
        q.ready.notify_one();
        Ok(())
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
    /// The next job, if one is queued.
    pub(crate) fn try_recv(&self) -> Option<Job> {
        let q = &self.queue;
        let (job, waiting) = {
            let mut state = q.lock();
            (state.jobs.pop_front(), state.waiting > 0)
        };
        if job.is_some() && waiting {
            q.space.notify_one();
        }
        job
    }

    /// The next job, waiting for one; `None` once the queue is closed and empty.
    /// Cancel-safe: a job is taken only when it is returned (a wake-up a dropped call
    /// received passes on to another taker).
    pub(crate) async fn recv(&self) -> Option<Job> {
        if let Some(job) = self.try_recv() {
            return Some(job);
        }
        loop {
            let mut ready = pin!(self.queue.ready.notified());
            ready.as_mut().enable();
            if let Some(job) = self.try_recv() {
                return Some(job);
            }
            if self.queue.lock().closed {
                // Closed and, checked after the flag, empty: no sender can queue again.
                return self.try_recv();
            }
            ready.await;
        }
    }
}

#[cfg(test)]
mod tests {
    use std::future::Future;
    use std::sync::Arc;
    use std::time::Duration;

    use tokio::sync::mpsc;

    use super::{TrySendError, channel};
    use crate::engine::job::{CallPolicy, Job};

    fn job(seq: u64) -> Job {
        let (reply, _) = mpsc::unbounded_channel();
        Job {
            flow: "f",
            id: Arc::from("i"),
            seq,
            branch: None,
            method: 0,
            call: bytes::Bytes::new(),
            redelivered: 0,
            attempt: 1,
            policy: CallPolicy {
                timeout: Duration::from_secs(1),
                retries: 0,
                backoff_ms: 0,
                max_backoff_ms: 0,
                park: false,
            },
            names: ("d", "m"),
            reply,
            receipt: None,
        }
    }

    #[tokio::test]
    async fn jobs_come_out_in_order_and_a_full_queue_refuses_without_losing_the_job() {
        let (port, jobs) = channel(2);
        assert!(port.try_send(job(1)).is_ok());
        assert!(port.try_send(job(2)).is_ok());
        match port.try_send(job(3)) {
            Err(TrySendError::Full(j)) => assert_eq!(j.seq, 3),
            _ => panic!("a full queue takes no more"),
        }
        assert_eq!(jobs.recv().await.map(|j| j.seq), Some(1));
        assert!(port.try_send(job(3)).is_ok(), "a taken job makes room");
        assert_eq!(jobs.try_recv().map(|j| j.seq), Some(2));
        assert_eq!(jobs.try_recv().map(|j| j.seq), Some(3));
        assert!(jobs.try_recv().is_none());
    }

    #[tokio::test]
    async fn a_waiting_sender_queues_once_a_job_is_taken() {
        let (port, jobs) = channel(1);
        port.try_send(job(1)).ok();
        let sender = tokio::spawn({
            let port = port.clone();
            async move { port.send(job(2)).await.is_ok() }
        });
        tokio::task::yield_now().await;
        assert_eq!(jobs.recv().await.map(|j| j.seq), Some(1));
        assert!(sender.await.unwrap(), "the waiting job went in");
        assert_eq!(jobs.recv().await.map(|j| j.seq), Some(2));
    }

    #[tokio::test]
    async fn a_waiting_taker_wakes_for_a_job_and_ends_when_the_last_port_is_gone() {
        let (port, jobs) = channel(4);
        let taker = tokio::spawn({
            let jobs = jobs.clone();
            async move {
                let mut seen = Vec::new();
                while let Some(j) = jobs.recv().await {
                    seen.push(j.seq);
                }
                seen
            }
        });
        tokio::task::yield_now().await;
        let second = port.clone();
        port.try_send(job(1)).ok();
        drop(port);
        second.try_send(job(2)).ok();
        drop(second);
        assert_eq!(
            taker.await.unwrap(),
            vec![1, 2],
            "queued jobs are drained first"
        );
        let (port, jobs) = channel(1);
        drop(jobs);
        assert!(
            port.try_send(job(1)).is_ok(),
            "takers are not counted: closing is by ports"
        );
    }

    #[tokio::test]
    async fn a_cancelled_taker_passes_its_wake_up_on() {
        let (port, jobs) = channel(4);
        // Taker `a` waits first (polled once by hand), so the job's wake-up goes to it.
        let mut a = Box::pin(jobs.recv());
        let mut cx = std::task::Context::from_waker(std::task::Waker::noop());
        assert!(a.as_mut().poll(&mut cx).is_pending(), "nothing queued yet");
        let b = tokio::spawn({
            let jobs = jobs.clone();
            async move { jobs.recv().await.map(|j| j.seq) }
        });
        tokio::task::yield_now().await; // `b` waits behind `a`
        assert!(port.try_send(job(7)).is_ok());
        // `a` is woken but dropped before it takes the job (a `select!` that went the
        // other way): its wake-up must reach `b`, or `b` would wait for ever.
        drop(a);
        let got = tokio::time::timeout(Duration::from_secs(5), b)
            .await
            .expect("the wake-up passed on to the other taker")
            .unwrap();
        assert_eq!(got, Some(7));
    }
}
