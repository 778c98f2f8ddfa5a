//! The runner: one task per flow type, owning its instances.
//!
//! Each round it takes the messages waiting (its own tasks' reports first, then outcomes,
//! then requests, at most `max_batch`, or fewer for a store that commits at once), runs the steps through the sans-IO [`Instance`]
//! core, commits all their writes in one store transaction (group commit), and only then
//! acts: replies to callers, dispatches new calls, wakes waiters. A batch holds at most one
//! step per instance; a second message for the same instance waits for the next round.
//!
//! Commits are pipelined one deep: while a batch is on its way to disk, the runner takes
//! the next messages and builds the next batch, which goes to the store the moment the
//! first lands. An instance with a step in flight is not stepped again until that step is
//! committed (its messages wait), so each batch builds only on committed state and a step
//! is still acknowledged only after its own commit. A store that commits at once (the
//! in-memory one) has its batch acted on in the same round.
//!
//! A step whose payloads go to a blob tier is not committed in its round: a task of its
//! own writes its blobs (a new `Blob` written as one pack while it is cut into chunks),
//! and the step joins the commit of the round after they land. Until then its instance
//! holds inputs back; the others go on (a slow tier stalls only instances stored there).
//!
//! Only instances with a driver call in flight stay in memory. One that sleeps, waits or
//! is parked leaves memory once its step is committed; an impulse, a probe or its timer
//! loads it again. Timers come from the store's timer index: the runner keeps the ones
//! due within a look-ahead window in a small ordered set, reads the next window when it
//! reaches the end of this one, and adds timers armed within the window as their steps
//! commit.
//!
//! Where an instance stands is named: being read or resident (`phase::Presence`), and a
//! resident one's place in this pipeline is its slot's [`Phase`]: in a batch (being built,
//! written, or committed, by the batch's number) or uploading; else it is only stored.
//!
//! The files: this one holds the runner's state and its select loop; [`requests`] what
//! each input does; [`commit`] the batch pipeline; [`effects`] what a committed (or
//! failed) step does; [`resident`] loading, recovering and evicting instances; [`timers`]
//! the timer window.

mod commit;
mod effects;
mod lifecycle;
mod phase;
mod refusals;
mod requests;
mod resident;
mod timers;

use std::collections::{BTreeSet, VecDeque};
use std::sync::Arc;

// Keyed by instance ids, looked up several times a step: foldhash, randomly seeded per
// process, at a fraction of SipHash's cost on short keys.
use foldhash::{HashMap, HashMapExt, HashSet, HashSetExt};

use flowwire_storage::ladder::{Sealed, Written};
use flowwire_storage::record::Persisted;
use flowwire_storage::{InstanceKey, InstanceStore, Placement, Retention, StepResult, StoreError};
use tokio::sync::{mpsc, oneshot};

use crate::core::{Instance, Scratch, Step};
use crate::engine::Limits;
use crate::engine::job::{CallPolicy, OutcomeMsg};
use crate::engine::outcomes::{OutcomeRx, OutcomeTx};
use crate::error::Result;
use crate::events::Emitter;
use crate::flow::Flow;
use phase::{Instances, Phase};

/// A probe, type-erased: runs on a flow and sends its result through a channel it owns.
use crate::engine::msg::{Msg, Via};

enum Input<F: Flow> {
    Msg(Msg<F>),
    Outcome(OutcomeMsg),
    /// Load an active instance that could not be read before (its tier or the store was
    /// unreachable); `resend`: send its call in flight whatever the handover said.
    Reload {
        id: Arc<str>,
        attempt: u32,
        resend: bool,
    },
    /// Check an instance in memory against the store after a commit whose outcome is
    /// unknown: if the store holds another version (the commit landed after all), the
    /// store's record replaces the one in memory and its call in flight is sent.
    Verify {
        id: Arc<str>,
        attempt: u32,
    },
    /// An instance's timer is due.
    Fire {
        id: Arc<str>,
        due_ms: u64,
    },
    /// Send again the call in flight of an instance loaded from the store (or park it, per
    /// its driver's policy); see `Instance::redeliver`.
    Redeliver {
        id: Arc<str>,
    },
}

/// What the runner's own tasks report back.
enum Internal<F: Flow> {
    /// A step's blobs are written (or could not be): seal or commit it.
    Uploaded(Box<Uploaded<F>>),
    /// Time to try loading an instance again.
    Reload {
        id: Arc<str>,
        attempt: u32,
        resend: bool,
    },
    /// Try an input again (its step could not be persisted).
    Again(Box<Input<F>>),
    /// An instance was read off the runner's task (see `Runner::fetch`).
    Fetched {
        id: Arc<str>,
        read: Box<resident::Read>,
    },
}

struct Uploaded<F: Flow> {
    staged: Staged<F>,
    result: Result<Upload>,
}

/// What a step's task wrote: its blobs (`Sealed`: it joins the next batch), or the chunks
/// of its new blobs (`Cut`, by `Placement::cut_and_put`: it is sealed now, without them).
#[allow(clippy::large_enum_variant)] // it travels in `Uploaded`, boxed
enum Upload {
    Sealed(Sealed),
    Cut(Written),
}

enum Ack<F: Flow> {
    Start(oneshot::Sender<Result<()>>),
    Impulse(oneshot::Sender<Result<()>>, Arc<str>),
    /// An operator's operation: replied with the step it wrote.
    Operate(oneshot::Sender<Result<u64>>),
    /// An outcome: kept so that a step that could not be persisted is tried again.
    Outcome(OutcomeMsg),
    /// A runner's own input (timer, redelivery): tried again if not persisted.
    Retry(Input<F>),
    Quiet,
}

struct Staged<F: Flow> {
    /// The step (its draft's key names the instance: see [`Staged::id`]).
    step: Step,
    ack: Ack<F>,
    /// The bus request the step applies, which its commit settles where the store carries
    /// sends (multi-process mode on one Redis server).
    via: Via,
}

impl<F: Flow> Staged<F> {
    /// The instance's id: its step's key's (one string for both, so a step costs no
    /// reference count of its own for it).
    fn id(&self) -> &Arc<str> {
        &self.step.draft.key.id
    }
}

/// Steps with their records' persisted forms and store writes, index for index: a step
/// is a few hundred bytes, so the three go side by side rather than moving into tuples.
struct Batch<F: Flow> {
    staged: Vec<Staged<F>>,
    placed: Vec<Persisted>,
    writes: Vec<flowwire_storage::StepWrite>,
    /// The last batch's length: the next `writes` is allocated at it (see `Batch::push`).
    hint: usize,
}

impl<F: Flow> Default for Batch<F> {
    fn default() -> Self {
        Self {
            staged: Vec::new(),
            placed: Vec::new(),
            writes: Vec::new(),
            hint: 0,
        }
    }
}

/// The store's answer to a batch.
type Committed = std::result::Result<Vec<StepResult>, StoreError>;

/// A batch whose commit is on its way; its steps are acted on when it lands.
struct InFlight<F: Flow> {
    staged: Vec<Staged<F>>,
    placed: Vec<Persisted>,
    commit:
        std::pin::Pin<Box<tokio::time::Timeout<flowwire_storage::BoxFuture<'static, Committed>>>>,
}

/// Polls `fut` once with the task's waker: its output, if ready.
async fn poll_once<T>(fut: impl Future<Output = T>) -> Option<T> {
    let mut fut = std::pin::pin!(fut);
    std::future::poll_fn(|cx| match fut.as_mut().poll(cx) {
        std::task::Poll::Ready(v) => std::task::Poll::Ready(Some(v)),
        std::task::Poll::Pending => std::task::Poll::Ready(None),
    })
    .await
}

struct Slot<F: Flow> {
    inst: Instance<F>,
    /// The committed record as persisted (`None` until the first step is committed).
    placed: Option<Persisted>,
    /// Consecutive steps that could not be persisted (for the retry backoff).
    failures: u32,
    phase: Phase,
    /// Inputs waiting for its upload to land.
    held: VecDeque<Input<F>>,
    /// Its step in the batch being built or in flight, as placed; kept when the commit
    /// fails transiently, so the retry refers to the blobs it wrote (see
    /// `flowwire::storage::ladder::Attempt`). Cleared by any other answer of the store.
    attempt: Option<flowwire_storage::ladder::Attempt>,
}

impl<F: Flow> Slot<F> {
    fn new(inst: Instance<F>, placed: Option<Persisted>) -> Self {
        Self {
            inst,
            placed,
            failures: 0,
            phase: Phase::Batched { round: 0 },
            held: VecDeque::new(),
            attempt: None,
        }
    }
}

/// The shard a runner owns in multi-process mode, under a lease.
pub(crate) struct Owned {
    pub shard: u16,
    /// The lease's fencing token: every write carries it.
    pub token: u64,
    /// Until when the lease surely holds: nothing is committed after it.
    pub lease: crate::engine::lease::LeaseDeadline,
    /// The previous owner released the shard cleanly: every call it committed is on the
    /// bus, so loaded instances need no redelivery.
    pub clean: bool,
    /// Stream entries of outcomes this runner is done with, to acknowledge.
    pub acks: mpsc::UnboundedSender<String>,
    /// Instances that ended (or were parked), to announce to waiting callers elsewhere.
    pub ended: mpsc::UnboundedSender<Arc<str>>,
    /// When the store carries a step's bus messages in its commit: the calls a step
    /// dispatches to drivers, and the announcement of its end, go out with the step (not
    /// through `ended` and the driver ports).
    pub outbox: Option<Outbox>,
}

#[cfg(feature = "redis")]
pub(crate) use crate::engine::scale::messages::Outbox;

/// No outbox without the bus (multi-process mode needs the `redis` feature).
#[cfg(not(feature = "redis"))]
#[derive(Debug)]
pub(crate) enum Outbox {}

#[cfg(not(feature = "redis"))]
impl Outbox {
    #[allow(clippy::unused_self, reason = "the same calls as the bus's outbox")]
    fn call(
        &self,
        _: &str,
        _: &str,
        _: &crate::core::Outgoing,
        _: &str,
    ) -> Option<flowwire_storage::record::BusSend> {
        match *self {}
    }

    #[allow(clippy::unused_self, reason = "the same calls as the bus's outbox")]
    fn ended(&self, _: &str, _: &[u8]) -> flowwire_storage::record::BusSend {
        match *self {}
    }
}

/// How far ahead the runner reads the timer index.
const LOOKAHEAD_MS: u64 = 30_000;
/// Timers read from the index at once.
const TIMER_PAGE: usize = 1024;

pub(crate) struct Runner<F: Flow> {
    /// The flow's name, as its instances' keys hold it (copied, not counted).
    flow: flowwire_storage::record::FlowName,
    /// The instances it knows of: being read, or resident (see `Presence`).
    slots: Instances<Slot<F>, Input<F>>,
    /// Callers of `finished()`, by instance (the instance may be out of memory meanwhile).
    waiters: HashMap<Arc<str>, Vec<oneshot::Sender<crate::engine::msg::EndedReply>>>,
    /// The store failed for good (its event was sent).
    store_down: bool,
    /// Timers due up to `horizon`, earliest first: every one the index holds and every one
    /// armed since (entries an impulse moved on are removed as their steps commit).
    timers: BTreeSet<(u64, Arc<str>)>,
    /// The end of the window read from the timer index (ms since the Unix epoch).
    horizon: u64,
    /// Instances touched this round: those without a call in flight leave memory after it.
    touched: Vec<Arc<str>>,
    /// The policy of each linked driver's methods.
    policies: Vec<Vec<CallPolicy>>,
    events: Emitter,
    store: Arc<dyn InstanceStore>,
    placement: Arc<Placement>,
    retention: Retention,
    ports: Vec<crate::engine::queue::Port>,
    /// Calls of steps acted on this round, one queue per link (index for index with
    /// `ports`), for [`Runner::send_jobs`].
    outbox: Vec<VecDeque<crate::engine::job::Job>>,
    outcomes: OutcomeTx,
    /// Handles on `outcomes` that outcomes carried back from their workers, for the next
    /// jobs (see [`OutcomeMsg::back`](crate::engine::job::OutcomeMsg)); at most
    /// `effects::SPARE_REPLIES`.
    replies: Vec<OutcomeTx>,
    limits: Limits,
    scratch: Scratch,
    /// The time of the round's steps (ms since the Unix epoch), read once a round and
    /// handed to the core, which reads no clock.
    now_ms: u64,
    inbox: mpsc::UnboundedSender<Internal<F>>,
    inbox_rx: Option<mpsc::UnboundedReceiver<Internal<F>>>,
    /// Steps whose blobs are being written.
    uploading: usize,
    /// Inputs released by a finished upload, for the front of the next round.
    requeue: VecDeque<Input<F>>,
    /// The batch being built: sealed steps waiting for the store.
    building: Batch<F>,
    /// The step and placed-record vectors of the batch before the one in flight, kept for
    /// their capacity (the store takes a batch's writes, so those are not kept).
    spare: (Vec<Staged<F>>, Vec<Persisted>),
    /// The batch whose commit is under way (at most one).
    inflight: Option<InFlight<F>>,
    /// The number of the batch being built: a resident instance that took a message for
    /// it is marked with it (at most one message per instance a batch).
    round: u64,
    /// The number of the batch in flight.
    flight_round: u64,
    /// Instances that took a message for the batch being built while not in memory.
    busy: HashSet<Arc<str>>,
    /// The same for the batch in flight.
    flight_busy: HashSet<Arc<str>>,
    /// Messages for instances with a step in flight: taken again once it is committed.
    waiting: VecDeque<Input<F>>,
    /// Inputs waiting for a read to start (at most `MAX_FETCHES` run at once).
    fetch_wait: VecDeque<Input<F>>,
    /// Reads that ended, for the first input of theirs that loads the instance; dropped
    /// at the end of the round that took their inputs.
    reads: HashMap<Arc<str>, resident::Read>,
    /// Where child calls go (the engine's child service).
    children: Option<crate::engine::children::ChildPort>,
    /// Multi-process mode: the shard this runner owns.
    owned: Option<Owned>,
    /// A write was refused because a newer owner holds the shard: stop.
    lost: bool,
    /// The store answered the last commit at once (see `Runner::round_max`).
    instant: bool,
}

impl<F: Flow> Runner<F> {
    pub(crate) fn new(
        store: Arc<dyn InstanceStore>,
        placement: Arc<Placement>,
        retention: Retention,
        ports: Vec<crate::engine::queue::Port>,
        limits: Limits,
        events: Emitter,
    ) -> (Self, OutcomeRx) {
        let (outcomes, orx) = crate::engine::outcomes::channel();
        let outbox = std::iter::repeat_with(VecDeque::new)
            .take(ports.len())
            .collect();
        let (inbox, inbox_rx) = mpsc::unbounded_channel();
        let policies = F::LINKS
            .iter()
            .map(|link| {
                link.driver
                    .methods
                    .iter()
                    .map(|m| CallPolicy::resolve(m.policy, link.driver.policy, limits.call_policy))
                    .collect()
            })
            .collect();
        let runner = Self {
            flow: flowwire_storage::record::FlowName::from_static(F::NAME),
            slots: Instances::default(),
            waiters: HashMap::new(),
            store_down: false,
            timers: BTreeSet::new(),
            horizon: 0,
            touched: Vec::new(),
            policies,
            events,
            store,
            placement,
            retention,
            ports,
            outbox,
            outcomes,
            replies: Vec::new(),
            limits,
            scratch: Scratch::default(),
            now_ms: 0,
            inbox,
            inbox_rx: Some(inbox_rx),
            uploading: 0,
            requeue: VecDeque::new(),
            building: Batch::default(),
            spare: (Vec::new(), Vec::new()),
            inflight: None,
            round: 1,
            flight_round: 0,
            busy: HashSet::new(),
            flight_busy: HashSet::new(),
            waiting: VecDeque::new(),
            fetch_wait: VecDeque::new(),
            reads: HashMap::new(),
            children: None,
            owned: None,
            lost: false,
            instant: false,
        };
        (runner, orx)
    }

    /// Makes this runner the owner of one shard (multi-process mode): it loads, fires and
    /// writes only that shard's instances, every write carries the lease's token.
    #[cfg_attr(not(feature = "redis"), allow(dead_code))]
    pub(crate) fn own(&mut self, owned: Owned) {
        self.owned = Some(owned);
    }

    /// Where outcomes for this runner go (the bus feeds them in, in multi-process mode).
    #[cfg_attr(not(feature = "redis"), allow(dead_code))]
    pub(crate) fn outcome_port(&self) -> OutcomeTx {
        self.outcomes.clone()
    }

    /// Whether a loaded instance's call in flight is sent again: always, except right
    /// after a clean handover of the shard (its calls are on the bus).
    fn redeliver_loaded(&self) -> bool {
        !self.owned.as_ref().is_some_and(|o| o.clean)
    }

    fn key(&self, id: &Arc<str>) -> InstanceKey {
        InstanceKey {
            flow: self.flow.clone(),
            id: id.clone(),
        }
    }

    /// The policy of a call.
    fn policy(&self, link: u16, method: u16) -> Option<CallPolicy> {
        policy_in(&self.policies, link, method)
    }

    /// Sorts a report of the runner's own tasks into this round.
    fn take_internal(&mut self, internal: Internal<F>, backlog: &mut VecDeque<Input<F>>) {
        match internal {
            Internal::Uploaded(u) => self.landed(*u),
            Internal::Reload {
                id,
                attempt,
                resend,
            } => backlog.push_back(Input::Reload {
                id,
                attempt,
                resend,
            }),
            Internal::Again(input) => backlog.push_back(*input),
            Internal::Fetched { id, read } => self.fetched(id, *read, backlog),
        }
    }

    pub(crate) async fn run(mut self, mut rx: mpsc::Receiver<Msg<F>>, mut orx: OutcomeRx) {
        let Some(mut inbox) = self.inbox_rx.take() else {
            return;
        };
        let mut backlog: VecDeque<Input<F>> = VecDeque::new();
        let mut shutdown: Option<oneshot::Sender<()>> = None;
        // Second messages for instances already in the batch being built.
        let mut deferred: VecDeque<Input<F>> = VecDeque::new();
        loop {
            let max = self.round_max();
            while let Some(i) = self.requeue.pop_back() {
                backlog.push_front(i);
            }
            // Calls of steps acted on go out before the runner waits for anything.
            self.send_jobs();
            // A full batch waits for the one in flight; so does a runner with nothing to take.
            let full = self.building.staged.len() >= max && self.inflight.is_some();
            if backlog.is_empty() || full {
                let (clock, due) = (self.limits.clock.clone(), self.next_timer());
                tokio::select! {
                    biased;
                    r = Self::landing(&mut self.inflight), if self.inflight.is_some() => {
                        self.land(r).await;
                    }
                    Some(i) = inbox.recv(), if !full => self.take_internal(i, &mut backlog),
                    Some(o) = orx.recv(), if !full => backlog.push_back(Input::Outcome(o)),
                    m = rx.recv(), if !full => match m {
                        Some(m) => backlog.push_back(Input::Msg(m)),
                        None => {
                            // The engine is gone: what was taken is still committed.
                            self.flush().await;
                            break;
                        }
                    },
                    () = crate::clock::sleep_until(&*clock, due), if !full => {}
                }
            } else if self.inflight.is_some()
                && let Some(r) = poll_once(Self::landing(&mut self.inflight)).await
            {
                self.land(r).await;
            }
            let now = self.limits.clock.now_ms();
            if now >= self.next_timer() {
                self.tick(&mut backlog).await;
            }
            self.now_ms = now;
            // Bounded: one report per upload or reload this runner started.
            while let Ok(i) = inbox.try_recv() {
                self.take_internal(i, &mut backlog);
            }
            while backlog.len() < max {
                match orx.try_recv() {
                    Some(o) => backlog.push_back(Input::Outcome(o)),
                    None => break,
                }
            }
            while backlog.len() < max {
                match rx.try_recv() {
                    Ok(m) => backlog.push_back(Input::Msg(m)),
                    Err(_) => break,
                }
            }
            self.take(&mut backlog, &mut deferred, &mut shutdown).await;
            if self.inflight.is_none() {
                self.submit().await;
                // The batch they wait for is sent: they wait for its commit now.
                while let Some(d) = deferred.pop_back() {
                    backlog.push_front(d);
                }
            }
            self.evict_idle();
            if self.lost {
                // A newer owner holds the shard, or the lease may have run out: everything
                // held here is stale. Inputs from the bus are not acknowledged, so the new
                // owner gets them. The lease's span ends here, whatever a renewal still
                // on its way says.
                if let Some(owned) = &self.owned {
                    owned.lease.end();
                }
                if let Some(reply) = shutdown.take() {
                    let _ = reply.send(());
                }
                break;
            }
            if let Some(reply) = shutdown.take() {
                // Steps taken and steps whose blobs are on their way are committed before
                // the runner stops (each upload is bounded by the store timeout); inputs
                // still waiting are dropped, so their callers see `Error::Shutdown`.
                self.flush().await;
                while self.uploading > 0 && !self.lost {
                    match inbox.recv().await {
                        Some(Internal::Uploaded(u)) => {
                            self.landed(*u);
                            self.flush().await;
                        }
                        Some(
                            Internal::Reload { .. } | Internal::Again(_) | Internal::Fetched { .. },
                        ) => {}
                        None => break,
                    }
                }
                let _ = reply.send(());
                break;
            }
        }
    }
}

/// The policy of a call, by its link and method.
fn policy_in(policies: &[Vec<CallPolicy>], link: u16, method: u16) -> Option<CallPolicy> {
    policies
        .get(usize::from(link))
        .and_then(|m| m.get(usize::from(method)))
        .copied()
}

/// The backoff of steps that could not be persisted (and of reloads): the driver retry
/// backoff's shape, from 100 ms doubling to 5 s, with jitter.
fn backoff(failures: u32) -> std::time::Duration {
    const STEPS: CallPolicy = CallPolicy {
        timeout: std::time::Duration::ZERO,
        retries: 0,
        backoff_ms: 50,
        max_backoff_ms: 5_000,
        park: false,
    };
    STEPS.backoff(failures.saturating_add(1))
}
