//! Group commit across the callers of one store: the batches that arrive while a commit is
//! on its way to the server go together in the next one.
//!
//! An orchestrator runs one runner per shard it holds, each with one batch in flight. On
//! their own, sixteen runners send sixteen small commit scripts a round (1.8 steps a script
//! at concurrency 64, measured with `INFO commandstats`), and each script costs the server a
//! fixed part: its lookup, its argument tables, the epoch check, its replication wrapper and
//! its reply (about 46 K instructions, an eighth of what a workflow's commits cost the
//! server at 1.8 steps a script: `benches/scale/commit_cost.rs`). Here the store takes the
//! batches of all its callers in rounds, as the embedded store groups its commits: at most
//! `ROUNDS_IN_FLIGHT` rounds are on their way at a time, and the batches that arrive
//! meanwhile make the next one.
//!
//! A round merges its batches in their order of arrival into one batch (cut into scripts
//! of at most `STEPS_PER_SCRIPT` steps, in one pipeline) and hands each caller its own
//! results. Steps are checked and written each on its own by the script, so a merged
//! round commits exactly what its batches would have committed one after the other.
//!
//! One thing had to change for it: a script that failed on the server stopped at the step
//! it failed on, and so failed every step after it, now the steps of other callers too. A
//! step that fails (a key of another type than the store writes there) now stops itself
//! alone (see `COMMIT`): its caller's batch fails, as it did alone, and the batches beside
//! it in the round are answered. An error of the round itself (the connection dropped or
//! timed out, the data lost) goes to every caller of the round, whose steps may or may not
//! have been written, as alone.
//!
//! A caller that finds the lane idle commits its batch itself, with no hand-off to a task
//! (a lone caller, concurrency 1, pays nothing for the lane); the batches that queue behind
//! it go to a round task when it is done, or when its caller stops waiting. Rounds of
//! queued batches run on tasks of their own, not in a caller's future: a caller that stops
//! waiting (its future dropped) leaves its batch to be committed or not, as a commit cut
//! off on its way to the server does; the other callers' batches go on. A round task that
//! is dropped (its runtime shut down) fails the batches it holds, and the last one those
//! waiting, so no caller waits for ever.

use std::sync::Arc;

use tokio::sync::oneshot;

use crate::error::StoreError;
use crate::record::{StepResult, StepWrite};

use super::RedisStore;

/// The most steps one round takes (a batch larger on its own still goes in one round).
const ROUND_STEPS: usize = 1024;

/// The most rounds on their way to the server at once. One alone makes every batch that
/// arrives while it flies wait for its reply, a whole turn of the server's event loop and
/// its `fdatasync`: at concurrency 64, that wait cost more than the merging saved. With
/// more, the next round is already in the server's socket while the last one's sync runs,
/// and lands in the next turn, as a batch sent on its own would. Four ran 3.8–4.1 K
/// workflows/s at concurrency 64 where two ran 3.1–3.7 K, in alternating runs, with the
/// same 0.3 scripts a workflow (BENCHMARKS.md, "Commit rounds").
const ROUNDS_IN_FLIGHT: usize = 4;

/// The answer to one caller's batch.
type Answer = Result<Vec<StepResult>, StoreError>;

/// The batches waiting for the next round, and how many round tasks are running.
#[derive(Default)]
pub(super) struct Lane(std::sync::Mutex<Queue>);

#[derive(Default)]
struct Queue {
    waiting: Vec<Ticket>,
    /// Rounds running: a task's (it takes a round, commits it, and takes the next while
    /// any batch waits), or a caller's that found the lane idle and commits its own batch.
    running: usize,
}

/// A caller's batch and where its answer goes.
struct Ticket {
    batch: Vec<StepWrite>,
    reply: oneshot::Sender<Answer>,
}

impl std::fmt::Debug for Lane {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let q = self.lock();
        f.debug_struct("Lane")
            .field("waiting", &q.waiting.len())
            .field("running", &q.running)
            .finish()
    }
}

impl Lane {
    fn lock(&self) -> std::sync::MutexGuard<'_, Queue> {
        self.0
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// Enters a batch: the caller commits it itself when the lane is idle (no round
    /// running, none waiting: a lone caller pays no hand-off), else it is queued, and the
    /// caller starts a round task when fewer than [`ROUNDS_IN_FLIGHT`] run.
    fn enter(self: &Arc<Self>, batch: Vec<StepWrite>) -> Entry {
        let mut q = self.lock();
        if q.running == 0 && q.waiting.is_empty() {
            q.running = 1;
            return Entry::Alone(batch, Held::new(self));
        }
        let (reply, answer) = oneshot::channel();
        q.waiting.push(Ticket { batch, reply });
        let start = (q.running < ROUNDS_IN_FLIGHT).then(|| {
            q.running += 1;
            Held::new(self)
        });
        Entry::Queued { answer, start }
    }

    /// Gives back a round's place when nothing waits (`true`); else the caller keeps it, to
    /// run the waiting batches.
    fn leave_if_idle(&self) -> bool {
        let mut q = self.lock();
        if q.waiting.is_empty() {
            q.running = q.running.saturating_sub(1);
            return true;
        }
        false
    }

    /// Takes the batches of the next round, in their order of arrival, up to
    /// [`ROUND_STEPS`] steps (at least one batch). When none wait, the calling task is
    /// done: it is counted out, and gets an empty round.
    fn next_round(&self) -> Vec<Ticket> {
        let mut q = self.lock();
        if q.waiting.is_empty() {
            q.running = q.running.saturating_sub(1);
            return Vec::new();
        }
        let mut steps = 0;
        let take = q
            .waiting
            .iter()
            .take_while(|t| {
                let first = steps == 0;
                steps += t.batch.len();
                first || steps <= ROUND_STEPS
            })
            .count()
            .max(1);
        q.waiting.drain(..take).collect()
    }
}

/// How a batch entered the lane.
enum Entry {
    /// The lane was idle: the caller commits its batch itself, holding a round's place.
    Alone(Vec<StepWrite>, Held),
    /// Queued: the answer comes from a round task, which the caller starts when it got a
    /// round's place for it.
    Queued {
        answer: oneshot::Receiver<Answer>,
        start: Option<Held>,
    },
}

/// A round's place (one of `running`). Dropped before it is given back (its task dropped
/// as its runtime shut down), it counts itself out, and the last one fails the batches
/// still waiting, so no caller waits for ever.
struct Held {
    lane: Arc<Lane>,
    done: bool,
}

impl Held {
    fn new(lane: &Arc<Lane>) -> Self {
        Self {
            lane: lane.clone(),
            done: false,
        }
    }
}

impl Drop for Held {
    fn drop(&mut self) {
        if self.done {
            // Given back, with nothing waiting.
            return;
        }
        let waiting = {
            let mut q = self.lane.lock();
            q.running = q.running.saturating_sub(1);
            if q.running > 0 {
                // Another round takes them.
                return;
            }
            std::mem::take(&mut q.waiting)
        };
        for t in waiting {
            let _ = t.reply.send(Err(abandoned()));
        }
    }
}

/// A lone caller's round: when it ends, or its caller stops waiting, the batches that
/// queued behind it go to a round task, which takes its place.
struct Alone<'a> {
    store: &'a RedisStore,
    held: Option<Held>,
}

impl Alone<'_> {
    fn hand_over(&mut self) {
        let Some(mut held) = self.held.take() else {
            return;
        };
        if self.store.lane.leave_if_idle() {
            held.done = true;
        } else if tokio::runtime::Handle::try_current().is_ok() {
            tokio::spawn(self.store.clone().rounds(held));
        }
        // (Else no runtime runs a round: `held` is dropped, and fails what waits if it is
        // the last.)
    }
}

impl Drop for Alone<'_> {
    fn drop(&mut self) {
        self.hand_over();
    }
}

/// The error of a batch whose round stopped before it was answered.
fn abandoned() -> StoreError {
    StoreError::Backend(
        "redis: the commit stopped before it was answered (its runtime shut down); its steps \
         may or may not be written"
            .to_string(),
    )
}

impl RedisStore {
    /// Commits `batch` in the lane's next round (see the module docs).
    pub(super) async fn commit_in_lane(self, batch: Vec<StepWrite>) -> Answer {
        if batch.is_empty() {
            return Ok(Vec::new());
        }
        match self.lane.enter(batch) {
            Entry::Alone(batch, held) => {
                let mut alone = Alone {
                    store: &self,
                    held: Some(held),
                };
                let answer = self.commit_batch(&batch).await;
                alone.hand_over();
                answer
            }
            Entry::Queued { answer, start } => {
                if let Some(held) = start {
                    tokio::spawn(self.clone().rounds(held));
                }
                answer.await.unwrap_or_else(|_| Err(abandoned()))
            }
        }
    }

    /// Runs rounds until no batch waits, in the round's place `held`.
    async fn rounds(self, mut held: Held) {
        loop {
            let round = self.lane.next_round();
            if round.is_empty() {
                held.done = true;
                return;
            }
            self.round(round).await;
        }
    }

    /// Commits one round's batches together, and answers each.
    async fn round(&self, round: Vec<Ticket>) {
        let mut replies = Vec::with_capacity(round.len());
        let mut merged = Vec::with_capacity(round.iter().map(|t| t.batch.len()).sum());
        for t in round {
            replies.push((t.reply, t.batch.len()));
            merged.extend(t.batch);
        }
        match self.commit_steps(&merged).await {
            Ok(steps) => {
                let mut steps = steps.into_iter();
                for (reply, n) in replies {
                    // A batch with a step that failed on the server fails (with its first
                    // error), as it would alone; the others are answered step by step.
                    let answer = steps.by_ref().take(n).collect();
                    let _ = reply.send(answer);
                }
            }
            Err(e) => {
                for (reply, _) in replies {
                    let _ = reply.send(Err(e.clone()));
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;

    use super::{Entry, Lane, ROUNDS_IN_FLIGHT, Ticket};
    use crate::record::StepWrite;

    fn steps(n: usize) -> Vec<StepWrite> {
        let key = crate::record::InstanceKey::new("F", "i");
        let step = StepWrite::new(key, crate::record::Expect::Absent, 1, bytes::Bytes::new());
        vec![step; n]
    }

    fn ticket(n: usize) -> Ticket {
        Ticket {
            batch: steps(n),
            reply: tokio::sync::oneshot::channel().0,
        }
    }

    #[test]
    fn a_round_takes_batches_in_order_up_to_its_size() {
        let lane = Lane::default();
        lane.lock().waiting = vec![ticket(600), ticket(400), ticket(100), ticket(1)];
        lane.lock().running = 1;
        let sizes = |r: Vec<Ticket>| r.iter().map(|t| t.batch.len()).collect::<Vec<_>>();
        assert_eq!(sizes(lane.next_round()), [600, 400]);
        assert_eq!(sizes(lane.next_round()), [100, 1]);
        assert!(lane.next_round().is_empty());
        assert_eq!(
            lane.lock().running,
            0,
            "a task that finds nothing waiting is done"
        );
    }

    #[test]
    fn a_batch_larger_than_a_round_goes_alone() {
        let lane = Lane::default();
        lane.lock().waiting = vec![ticket(3000), ticket(1)];
        assert_eq!(lane.next_round().len(), 1);
        assert_eq!(lane.next_round().len(), 1);
    }

    #[test]
    fn a_lone_batch_is_committed_by_its_caller_and_the_next_ones_by_a_bounded_number_of_rounds() {
        let lane = Arc::new(Lane::default());
        let first = lane.enter(steps(1));
        assert!(
            matches!(first, Entry::Alone(..)),
            "an idle lane: no hand-off"
        );
        let mut started = Vec::new();
        for _ in 1..ROUNDS_IN_FLIGHT {
            let next = lane.enter(steps(1));
            assert!(
                matches!(next, Entry::Queued { start: Some(_), .. }),
                "a round task starts beside the ones in flight"
            );
            started.push(next);
        }
        let last = lane.enter(steps(1));
        assert!(
            matches!(last, Entry::Queued { start: None, .. }),
            "once {ROUNDS_IN_FLIGHT} rounds run, a batch waits for one of them"
        );
        assert_eq!(lane.lock().running, ROUNDS_IN_FLIGHT);
        // The places are given back as the entries drop (none was marked done).
        drop((first, started));
        assert_eq!(lane.lock().running, 0);
        let Entry::Queued { mut answer, .. } = last else {
            unreachable!()
        };
        assert!(
            matches!(answer.try_recv(), Ok(Err(_))),
            "the last place given back fails what still waits"
        );
    }

    #[test]
    fn a_lone_caller_that_finds_batches_behind_it_keeps_its_place_for_them() {
        let lane = Arc::new(Lane::default());
        let Entry::Alone(_, mut held) = lane.enter(steps(1)) else {
            unreachable!()
        };
        let _queued = lane.enter(steps(1));
        assert!(!lane.leave_if_idle(), "a batch waits: the place is kept");
        assert_eq!(lane.lock().running, 2);
        lane.lock().waiting.clear();
        assert!(lane.leave_if_idle());
        held.done = true;
        assert_eq!(lane.lock().running, 1);
    }
}
