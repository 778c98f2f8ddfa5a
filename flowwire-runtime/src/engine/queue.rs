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
//!
//! (Over 600 lines: most of it is the tests, which spell out the wake-up protocol case by
//! case.)

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
mod tests {
    use std::future::Future;
    use std::sync::Arc;
    use std::time::Duration;

    use tokio::sync::mpsc;

    use super::{TrySendError, channel};
    use crate::engine::job::{CallPolicy, Job};

    fn job(seq: u64) -> Job {
        let (reply, _) = crate::engine::outcomes::channel();
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
    async fn a_round_of_jobs_is_queued_in_order_as_far_as_there_is_room_and_the_rest_kept() {
        let (port, jobs) = channel(3);
        assert!(port.try_send(job(1)).is_ok());
        let mut round: std::collections::VecDeque<_> = (2..=4).map(job).collect();
        assert!(port.try_send_all(&mut round));
        assert_eq!(
            round.iter().map(|j| j.seq).collect::<Vec<_>>(),
            [4],
            "what did not fit stays with the sender"
        );
        let taken: Vec<_> = std::iter::from_fn(|| jobs.try_recv().map(|j| j.seq)).collect();
        assert_eq!(taken, [1, 2, 3]);
        assert!(port.try_send_all(&mut round));
        assert!(round.is_empty());
        assert_eq!(jobs.recv().await.map(|j| j.seq), Some(4));
        drop(jobs);
    }

    #[tokio::test]
    async fn a_round_of_jobs_wakes_a_waiting_taker_which_takes_them_all() {
        let (port, jobs) = channel(8);
        let taker = tokio::spawn({
            let jobs = jobs.clone();
            async move {
                let first = jobs.recv().await.map(|j| j.seq);
                let rest: Vec<_> = std::iter::from_fn(|| jobs.try_recv().map(|j| j.seq)).collect();
                (first, rest)
            }
        });
        tokio::time::sleep(Duration::from_millis(20)).await;
        let mut round: std::collections::VecDeque<_> = (1..=3).map(job).collect();
        assert!(port.try_send_all(&mut round));
        let (first, rest) = tokio::time::timeout(Duration::from_secs(5), taker)
            .await
            .expect("the taker is woken")
            .expect("the taker's task");
        assert_eq!((first, rest), (Some(1), vec![2, 3]));
        drop((port, jobs));
    }

    #[tokio::test]
    async fn a_run_of_jobs_taken_ahead_goes_back_in_order_and_wakes_a_taker_for_it() {
        use std::collections::VecDeque;
        let (port, jobs) = channel(8);
        let mut round: VecDeque<_> = (1..=6).map(job).collect();
        assert!(port.try_send_all(&mut round));
        let seqs = |q: &VecDeque<Job>| q.iter().map(|j| j.seq).collect::<Vec<_>>();
        let mut ahead = VecDeque::new();
        let first = jobs.try_recv_many(&mut ahead, 2).map(|j| j.seq);
        assert_eq!(
            (first, seqs(&ahead)),
            (Some(1), vec![2, 3]),
            "at most 2 ahead"
        );
        jobs.put_back(&mut ahead);
        let first = jobs.try_recv_many(&mut ahead, 8).map(|j| j.seq);
        assert_eq!(
            (first, seqs(&ahead)),
            (Some(2), vec![3, 4, 5, 6]),
            "back in order"
        );
        // A taker waiting on the emptied queue is woken for what is put back.
        let other = jobs.clone();
        let taker = tokio::spawn(async move { other.recv().await.map(|j| j.seq) });
        tokio::time::sleep(Duration::from_millis(20)).await;
        jobs.put_back(&mut ahead);
        assert!(ahead.is_empty());
        let woken = tokio::time::timeout(Duration::from_secs(5), taker).await;
        assert_eq!(woken.expect("a taker is woken").expect("its task"), Some(3));
        let rest: Vec<_> = std::iter::from_fn(|| jobs.try_recv().map(|j| j.seq)).collect();
        assert_eq!(rest, [4, 5, 6]);
        assert!(jobs.try_recv_many(&mut ahead, 3).is_none() && ahead.is_empty());
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

    /// Counts the polls of the future it wraps.
    struct Polls<'a, F>(std::pin::Pin<Box<F>>, &'a std::sync::atomic::AtomicUsize);

    impl<F: Future> Future for Polls<'_, F> {
        type Output = F::Output;
        fn poll(
            mut self: std::pin::Pin<&mut Self>,
            cx: &mut std::task::Context<'_>,
        ) -> std::task::Poll<F::Output> {
            self.1.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
            self.0.as_mut().poll(cx)
        }
    }

    #[tokio::test]
    async fn a_burst_of_jobs_wakes_one_taker_and_one_more_not_one_a_job() {
        use std::sync::atomic::{AtomicUsize, Ordering};
        let (port, jobs) = channel(64);
        let polls = Arc::new(AtomicUsize::new(0));
        let (done, mut taken) = mpsc::unbounded_channel();
        for _ in 0..8 {
            let (jobs, polls, done) = (jobs.clone(), polls.clone(), done.clone());
            tokio::spawn(async move {
                loop {
                    let Some(j) = Polls(Box::pin(jobs.recv()), &polls).await else {
                        return;
                    };
                    let _ = done.send(j.seq);
                }
            });
        }
        tokio::task::yield_now().await; // every taker waits
        let waiting = polls.swap(0, Ordering::Relaxed);
        assert_eq!(waiting, 8, "each taker polled once, to wait");
        for seq in 0..32 {
            assert!(port.try_send(job(seq)).is_ok());
        }
        let mut seen = Vec::new();
        while seen.len() < 32 {
            seen.push(taken.recv().await.unwrap());
        }
        assert_eq!(seen, (0..32).collect::<Vec<_>>(), "in order");
        for _ in 0..4 {
            tokio::task::yield_now().await;
        }
        // The woken taker takes all 32 back to back, and wakes one more (which finds them
        // taken): one poll a job taken, and two wake-ups, where one a job woke all eight.
        assert_eq!(polls.load(Ordering::Relaxed), 32 + 2);
    }

    #[tokio::test]
    async fn a_job_left_behind_by_a_taker_that_waits_is_taken_by_another() {
        let (port, jobs) = channel(8);
        let (done, mut taken) = mpsc::unbounded_channel();
        let gate = Arc::new(tokio::sync::Notify::new());
        for taker in 0..2 {
            let (jobs, done, gate) = (jobs.clone(), done.clone(), gate.clone());
            tokio::spawn(async move {
                while let Some(j) = jobs.recv().await {
                    let _ = done.send((taker, j.seq));
                    if j.seq == 1 {
                        // A call that waits (for ever, here).
                        gate.notified().await;
                    }
                }
            });
        }
        tokio::task::yield_now().await;
        assert!(port.try_send(job(1)).is_ok());
        assert!(port.try_send(job(2)).is_ok());
        let (first, one) = taken.recv().await.unwrap();
        let (second, two) = tokio::time::timeout(Duration::from_secs(5), taken.recv())
            .await
            .expect("the second job is taken while the first waits")
            .unwrap();
        assert_eq!((one, two), (1, 2));
        assert_ne!(first, second, "by the other taker");
        // One queued later, while the first taker still waits, is taken too.
        assert!(port.try_send(job(3)).is_ok());
        let (third, three) = tokio::time::timeout(Duration::from_secs(5), taken.recv())
            .await
            .expect("a job queued later is taken")
            .unwrap();
        assert_eq!((third, three), (second, 3));
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
