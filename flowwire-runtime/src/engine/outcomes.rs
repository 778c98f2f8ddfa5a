//! The channel a runner's outcomes come back on: unbounded, many senders, one receiver,
//! and taken a batch at a time on both sides.
//!
//! A driver worker that runs calls back to back hands their outcomes over together
//! ([`OutcomeTx::send_all`]: one lock and at most one wake-up for the lot), and the runner
//! takes everything waiting at once (one lock), then hands the outcomes out from its own
//! queue. Per outcome that is a push and a pop, where a general channel pays its own
//! atomic bookkeeping and a wake-up check for each.
//!
//! Low in the crate, beside [`job`](super::job): the workers, the bus feed and the
//! runners all speak it.

use std::collections::VecDeque;
use std::future::poll_fn;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::task::{Poll, Waker};

use super::job::OutcomeMsg;

/// A new channel.
pub(crate) fn channel() -> (OutcomeTx, OutcomeRx) {
    let shared = Arc::new(Shared {
        state: Mutex::new(State {
            queue: VecDeque::new(),
            waker: None,
            open: true,
        }),
        senders: AtomicUsize::new(1),
    });
    (
        OutcomeTx {
            shared: shared.clone(),
        },
        OutcomeRx {
            shared,
            taken: VecDeque::new(),
        },
    )
}

struct Shared {
    state: Mutex<State>,
    /// Live senders: the receiver ends once there are none and the queue is empty.
    senders: AtomicUsize,
}

struct State {
    queue: VecDeque<OutcomeMsg>,
    /// The receiver's task, set while it waits on an empty queue.
    waker: Option<Waker>,
    /// `false` once the receiver is dropped: outcomes sent after are refused.
    open: bool,
}

impl Shared {
    fn lock(&self) -> MutexGuard<'_, State> {
        // Every critical section leaves the state whole (a push, a swap, a flag).
        self.state.lock().unwrap_or_else(PoisonError::into_inner)
    }
}

/// Sends outcomes to one runner.
pub(crate) struct OutcomeTx {
    shared: Arc<Shared>,
}

impl Clone for OutcomeTx {
    fn clone(&self) -> Self {
        self.shared.senders.fetch_add(1, Ordering::Relaxed);
        Self {
            shared: self.shared.clone(),
        }
    }
}

impl Drop for OutcomeTx {
    fn drop(&mut self) {
        if self.shared.senders.fetch_sub(1, Ordering::AcqRel) == 1 {
            // The last sender: a receiver waiting on an empty queue learns it ends. The
            // count falls before the lock is taken, and the receiver reads it under the
            // lock: either it sees none left, or its waker is there to be woken.
            let waker = self.shared.lock().waker.take();
            if let Some(w) = waker {
                w.wake();
            }
        }
    }
}

impl std::fmt::Debug for OutcomeTx {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("OutcomeTx").finish_non_exhaustive()
    }
}

impl OutcomeTx {
    /// Sends one outcome; gives it back when the runner is gone.
    pub(crate) fn send(&self, o: OutcomeMsg) -> Result<(), OutcomeMsg> {
        let mut state = self.shared.lock();
        if !state.open {
            return Err(o);
        }
        state.queue.push_back(o);
        let waker = state.waker.take();
        drop(state);
        if let Some(w) = waker {
            w.wake();
        }
        Ok(())
    }

    /// Sends every outcome in `batch`, in order, leaving it empty (with its capacity); the
    /// number sent, 0 when the runner is gone (the outcomes are dropped then, as `send`'s
    /// callers drop what it gives back).
    pub(crate) fn send_all(&self, batch: &mut VecDeque<OutcomeMsg>) -> usize {
        if batch.is_empty() {
            return 0;
        }
        let mut state = self.shared.lock();
        if !state.open {
            drop(state);
            batch.clear();
            return 0;
        }
        let n = batch.len();
        if state.queue.is_empty() {
            // The usual case (the runner took what was there): a swap, not a copy.
            std::mem::swap(&mut state.queue, batch);
        } else {
            state.queue.append(batch);
        }
        let waker = state.waker.take();
        drop(state);
        if let Some(w) = waker {
            w.wake();
        }
        n
    }

    /// Whether `self` and `other` send to the same runner.
    pub(crate) fn same_channel(&self, other: &Self) -> bool {
        Arc::ptr_eq(&self.shared, &other.shared)
    }
}

/// A runner's side: the outcomes sent to it, in the order each sender sent them.
pub(crate) struct OutcomeRx {
    shared: Arc<Shared>,
    /// Taken from the shared queue, not yet handed out (owned here, not by a `recv`
    /// future: dropping one loses nothing).
    taken: VecDeque<OutcomeMsg>,
}

impl Drop for OutcomeRx {
    fn drop(&mut self) {
        let mut state = self.shared.lock();
        state.open = false;
        // What was sent is dropped here, not when the last sender goes.
        state.queue.clear();
    }
}

impl OutcomeRx {
    /// The next outcome, if one is waiting.
    pub(crate) fn try_recv(&mut self) -> Option<OutcomeMsg> {
        if let Some(o) = self.taken.pop_front() {
            return Some(o);
        }
        self.refill(None);
        self.taken.pop_front()
    }

    /// The next outcome, waiting for one; `None` once every sender is gone and nothing
    /// is left. Cancel-safe: an outcome is taken only by the poll that returns it.
    pub(crate) async fn recv(&mut self) -> Option<OutcomeMsg> {
        poll_fn(|cx| {
            if let Some(o) = self.taken.pop_front() {
                return Poll::Ready(Some(o));
            }
            match self.refill(Some(cx.waker())) {
                true => Poll::Ready(self.taken.pop_front()),
                false if self.shared.senders.load(Ordering::Acquire) == 0 => {
                    // Read again: a last sender may have sent before it went.
                    self.refill(None);
                    Poll::Ready(self.taken.pop_front())
                }
                false => Poll::Pending,
            }
        })
        .await
    }

    /// Takes everything waiting (an empty `taken` is swapped in, so both queues keep
    /// their capacity); `false` if nothing was. With `waker`, an empty queue keeps it to
    /// be woken by the next send.
    fn refill(&mut self, waker: Option<&Waker>) -> bool {
        let mut state = self.shared.lock();
        if state.queue.is_empty() {
            if let Some(w) = waker
                && self.shared.senders.load(Ordering::Acquire) > 0
            {
                match &mut state.waker {
                    Some(old) if old.will_wake(w) => {}
                    slot => *slot = Some(w.clone()),
                }
            }
            return false;
        }
        std::mem::swap(&mut state.queue, &mut self.taken);
        true
    }
}

#[cfg(test)]
mod tests {
    use std::collections::VecDeque;
    use std::time::Duration;

    use super::channel;
    use crate::engine::job::OutcomeMsg;

    fn outcome(seq: u64) -> OutcomeMsg {
        OutcomeMsg::ok_for_test(seq)
    }

    #[tokio::test]
    async fn outcomes_come_out_in_the_order_sent_one_at_a_time_or_in_batches() {
        let (tx, mut rx) = channel();
        assert!(tx.send(outcome(1)).is_ok());
        let mut batch: VecDeque<_> = (2..=4).map(outcome).collect();
        assert_eq!(tx.send_all(&mut batch), 3);
        assert!(batch.is_empty());
        assert!(tx.send(outcome(5)).is_ok());
        let mut seen = Vec::new();
        while let Some(o) = rx.try_recv() {
            seen.push(o.seq);
        }
        assert_eq!(seen, [1, 2, 3, 4, 5]);
    }

    #[tokio::test]
    async fn a_waiting_receiver_wakes_for_an_outcome_sent_from_another_task() {
        let (tx, mut rx) = channel();
        let sender = tokio::spawn(async move {
            tokio::time::sleep(Duration::from_millis(20)).await;
            let mut batch: VecDeque<_> = [outcome(7)].into();
            tx.send_all(&mut batch);
            tx
        });
        let got = tokio::time::timeout(Duration::from_secs(5), rx.recv())
            .await
            .expect("woken");
        assert_eq!(got.map(|o| o.seq), Some(7));
        drop(sender.await);
    }

    #[tokio::test]
    async fn the_receiver_ends_when_the_last_sender_goes_after_what_was_sent() {
        let (tx, mut rx) = channel();
        let other = tx.clone();
        assert!(tx.send(outcome(1)).is_ok());
        drop(tx);
        let waiting = tokio::spawn(async move {
            let first = rx.recv().await.map(|o| o.seq);
            let end = rx.recv().await.map(|o| o.seq);
            (first, end)
        });
        tokio::time::sleep(Duration::from_millis(20)).await;
        drop(other);
        let ends = tokio::time::timeout(Duration::from_secs(5), waiting)
            .await
            .expect("not left waiting")
            .expect("the receiver's task");
        assert_eq!(ends, (Some(1), None));
    }

    #[tokio::test]
    async fn a_cancelled_recv_loses_nothing() {
        let (tx, mut rx) = channel();
        // A recv that is dropped while it waits takes nothing with it.
        let _ = tokio::time::timeout(Duration::from_millis(10), rx.recv()).await;
        assert!(tx.send(outcome(3)).is_ok());
        assert_eq!(rx.try_recv().map(|o| o.seq), Some(3));
    }

    #[test]
    fn outcomes_sent_to_a_dropped_receiver_are_refused() {
        let (tx, rx) = channel();
        drop(rx);
        assert!(tx.send(outcome(1)).is_err());
        let mut batch: VecDeque<_> = [outcome(2)].into();
        assert_eq!(tx.send_all(&mut batch), 0);
        assert!(batch.is_empty());
    }

    #[test]
    fn senders_of_one_runner_are_told_apart_from_another_s() {
        let (a, _ra) = channel();
        let (b, _rb) = channel();
        assert!(a.same_channel(&a.clone()));
        assert!(!a.same_channel(&b));
    }
}
