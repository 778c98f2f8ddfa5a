//! The runner: one task per flow type, owning its instances.
//!
//! Each round it takes the messages waiting (its own tasks' reports first, then outcomes,
//! then requests, at most `max_batch`), runs the steps through the sans-IO [`Instance`]
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
//! A step whose payloads go to a blob tier is not committed in its round: its blobs are
//! written by a task of its own, and the step joins the commit of the round after they
//! land. Until then its instance holds further inputs back, and every other instance goes
//! on — a slow or unreachable tier stalls only the instances whose data lives there.
//!
//! Only instances with a driver call in flight stay in memory. One that sleeps, waits or
//! is parked leaves memory once its step is committed; an impulse, a probe or its timer
//! loads it again. Timers come from the store's timer index: the runner keeps the ones
//! due within a look-ahead window in a small ordered set, reads the next window when it
//! reaches the end of this one, and adds timers armed within the window as their steps
//! commit.

use std::collections::{BTreeSet, HashMap, HashSet, VecDeque};
use std::mem;
use std::panic::{AssertUnwindSafe, catch_unwind};
use std::sync::Arc;

use bytes::Bytes;
use flowwire_storage::codec;
use flowwire_storage::ladder::Sealed;
use flowwire_storage::record::PlacedRecord;
use flowwire_storage::{
    BlobRef, InstanceKey, InstanceStore, Placement, Record, Retention, Status, StepInput,
    StepOutput, StepResult, StoreError, Stored,
};
use tokio::sync::{mpsc, oneshot};

use crate::core::{Instance, Outgoing, Refused, Rejected, Scratch, Step};
use crate::ended::Ended;
use crate::engine::Limits;
use crate::engine::job::{CallPolicy, Job, OutcomeMsg};
use crate::error::{Error, Result};
use crate::events::{Emitter, EventKind};
use crate::flow::Flow;
use crate::meta::Policy;

/// A probe, type-erased: runs on a flow and sends its result through a channel it owns.
use crate::engine::msg::{Ask, Msg};

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
    /// A step's blobs are written (or could not be): commit it in the next round.
    Uploaded(Box<Uploaded<F>>),
    /// Time to try loading an instance again.
    Reload {
        id: Arc<str>,
        attempt: u32,
        resend: bool,
    },
    /// Try an input again (its step could not be persisted).
    Again(Box<Input<F>>),
}

struct Uploaded<F: Flow> {
    staged: Staged<F>,
    sealed: Sealed,
    result: Result<()>,
}

impl<F: Flow> Input<F> {
    /// The instance a message writes to or reads the committed flow of: at most one such
    /// message per instance in a round, after the steps of the rounds before are committed.
    fn serial_on(&self) -> Option<&Arc<str>> {
        match self {
            Input::Msg(
                Msg::Start { id, .. }
                | Msg::Impulse { id, .. }
                | Msg::Probe { id, .. }
                | Msg::State { id, .. }
                | Msg::Operate { id, .. },
            )
            | Input::Reload { id, .. }
            | Input::Verify { id, .. }
            | Input::Fire { id, .. }
            | Input::Redeliver { id } => Some(id),
            Input::Outcome(o) => Some(&o.id),
            Input::Msg(_) => None,
        }
    }
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
    id: Arc<str>,
    step: Step,
    ack: Ack<F>,
}

/// Steps with their placed records and store writes, index for index: a step is a few
/// hundred bytes, so the three go side by side rather than moving into tuples.
struct Batch<F: Flow> {
    staged: Vec<Staged<F>>,
    placed: Vec<PlacedRecord>,
    writes: Vec<flowwire_storage::StepWrite>,
}

impl<F: Flow> Default for Batch<F> {
    fn default() -> Self {
        Self {
            staged: Vec::new(),
            placed: Vec::new(),
            writes: Vec::new(),
        }
    }
}

/// The store's answer to a batch.
type Committed = std::result::Result<Vec<StepResult>, StoreError>;

/// A batch whose commit is on its way; its steps are acted on when it lands.
struct InFlight<F: Flow> {
    staged: Vec<Staged<F>>,
    placed: Vec<PlacedRecord>,
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
    placed: Option<PlacedRecord>,
    /// Consecutive steps that could not be persisted (for the retry backoff).
    failures: u32,
    /// A step's blobs are being written; inputs that would write wait in `held`.
    uploading: bool,
    held: VecDeque<Input<F>>,
    /// The last round that took a message for this instance (at most one per round).
    round: u64,
}

impl<F: Flow> Slot<F> {
    fn new(inst: Instance<F>, placed: Option<PlacedRecord>) -> Self {
        Self {
            inst,
            placed,
            failures: 0,
            uploading: false,
            held: VecDeque::new(),
            round: 0,
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
}

/// How far ahead the runner reads the timer index.
const LOOKAHEAD_MS: u64 = 30_000;
/// Timers read from the index at once.
const TIMER_PAGE: usize = 1024;

pub(crate) struct Runner<F: Flow> {
    flow: Arc<str>,
    slots: HashMap<Arc<str>, Slot<F>>,
    /// Callers of `finished()`, by instance (the instance may be out of memory meanwhile).
    waiters: HashMap<Arc<str>, Vec<oneshot::Sender<Result<Ended>>>>,
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
    outcomes: mpsc::UnboundedSender<OutcomeMsg>,
    limits: Limits,
    scratch: Scratch,
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
    spare: (Vec<Staged<F>>, Vec<PlacedRecord>),
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
    /// Multi-process mode: the shard this runner owns.
    owned: Option<Owned>,
    /// A write was refused because a newer owner holds the shard: stop.
    lost: bool,
}

fn ended_of(status: &Status) -> Option<Ended> {
    match status {
        Status::Finished => Some(Ended::Finished),
        Status::Failed { reason } => Some(Ended::Failed {
            reason: reason.clone(),
        }),
        _ => None,
    }
}

impl<F: Flow> Runner<F> {
    pub(crate) fn new(
        store: Arc<dyn InstanceStore>,
        placement: Arc<Placement>,
        retention: Retention,
        ports: Vec<crate::engine::queue::Port>,
        limits: Limits,
        events: Emitter,
    ) -> (Self, mpsc::UnboundedReceiver<OutcomeMsg>) {
        let (outcomes, orx) = mpsc::unbounded_channel();
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
            flow: F::NAME.into(),
            slots: HashMap::new(),
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
            outcomes,
            limits,
            scratch: Scratch::default(),
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
            owned: None,
            lost: false,
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
    pub(crate) fn outcome_port(&self) -> mpsc::UnboundedSender<OutcomeMsg> {
        self.outcomes.clone()
    }

    /// Whether a loaded instance's call in flight is sent again: always, except right
    /// after a clean handover of the shard (its calls are on the bus).
    fn redeliver_loaded(&self) -> bool {
        !self.owned.as_ref().is_some_and(|o| o.clean)
    }

    /// Acknowledges an outcome that came over the bus: it is applied or no longer needed.
    fn settle(&self, o: &OutcomeMsg) {
        if let (Some(r), Some(owned)) = (&o.receipt, &self.owned) {
            let _ = owned.acks.send(r.entry.clone());
        }
    }

    fn key(&self, id: &Arc<str>) -> InstanceKey {
        InstanceKey {
            flow: self.flow.clone(),
            id: id.clone(),
        }
    }

    fn quarantined(id: &str, reason: String) -> Error {
        Error::Quarantined {
            flow: F::NAME,
            id: id.to_string(),
            reason,
        }
    }

    /// Reads a stored record: its envelope, then its payloads from their tiers.
    fn open(
        &self,
        id: &Arc<str>,
        stored: &Stored,
    ) -> impl std::future::Future<Output = Result<(Record, PlacedRecord)>> + Send + 'static {
        let key = self.key(id);
        let placed = PlacedRecord::decode(&stored.bytes, &key, self.limits.decode_limit)
            .map_err(|e| Self::codec_error(id, e));
        let placement = self.placement.clone();
        async move {
            let placed = placed?;
            let record = placement.resolve(&key, &placed).await?;
            Ok((record, placed))
        }
    }

    /// Deletes blobs no record refers to any more, off the runner's path.
    fn collect(&self, trash: &[BlobRef]) {
        if trash.is_empty() {
            return;
        }
        let placement = self.placement.clone();
        let trash = trash.to_vec();
        tokio::spawn(async move {
            for (blob, e) in placement.delete_all(&trash).await {
                // Left for an operator: the record that dropped it is committed, so the
                // blob is garbage, never data.
                tracing::warn!(tier = %blob.tier, key = %blob.key, error = %e, "unreferenced blob not deleted");
            }
        });
    }

    /// Loads the instances with a call in flight, parks those of another version, sends
    /// their calls again (or parks them, per their driver's policy). Runs before the runner
    /// takes any request.
    ///
    /// An instance whose record or blobs cannot be read because the store or a tier is
    /// unreachable is loaded again in the background, with backoff, until it can be; one
    /// whose data is damaged is left as stored for an operator (and reported).
    pub(crate) async fn recover(&mut self) -> Result<usize> {
        self.scratch.now_ms = crate::clock::unix_millis();
        let active = match &self.owned {
            Some(o) => self.store.active_in(F::NAME, o.shard).await?,
            None => self.store.active(F::NAME).await?,
        };
        let n = active.len();
        for (id, stored) in active {
            match self.adopt(&id, &stored, false).await {
                Ok(Some(step)) => self.stage(Self::first(id, step)),
                Ok(None) => {}
                Err(e) => self.reload_later(id, 1, false, &e),
            }
            // Commits go in batches of at most `max_batch`, as in the running loop, one in
            // flight while the next is loaded.
            if self.building.staged.len() >= self.limits.max_batch {
                self.land_now().await;
                self.submit().await;
            }
        }
        self.flush().await;
        tracing::info!(flow = F::NAME, instances = n, "recovered");
        Ok(n)
    }

    /// Brings a stored instance into memory if it is live, and returns its first step:
    /// the one that parks it when another flow version wrote it, or the redelivery of its
    /// call in flight (always with `resend`; otherwise unless the shard was handed over
    /// cleanly).
    async fn adopt(
        &mut self,
        id: &Arc<str>,
        stored: &Stored,
        resend: bool,
    ) -> Result<Option<Step>> {
        let (record, placed) = self.open(id, stored).await?;
        self.collect(&placed.trash);
        if !record.status.is_active() {
            return Ok(None);
        }
        let (mut inst, park) = match self.rebuild(id, record.clone(), stored.version) {
            Ok(rebuilt) => rebuilt,
            Err(e) => return self.unreadable(id, &record, stored.version, e).map(Some),
        };
        let step = match park {
            Some(step) => Some(step),
            None if resend || self.redeliver_loaded() => self.redelivery(&mut inst),
            None => None,
        };
        self.slots.insert(id.clone(), Slot::new(inst, Some(placed)));
        self.touched.push(id.clone());
        Ok(step)
    }

    /// Stages the first step of a loaded instance: a redelivery is tried again if it cannot
    /// be persisted; a parking (another flow version) is written at the next start.
    fn first(id: Arc<str>, step: Step) -> Staged<F> {
        let ack = match step.draft.input {
            StepInput::Redeliver { .. } => Ack::Retry(Input::Redeliver { id: id.clone() }),
            _ => Ack::Quiet,
        };
        Staged { id, step, ack }
    }

    /// The policy of a call.
    fn policy(&self, link: u16, method: u16) -> Option<CallPolicy> {
        policy_in(&self.policies, link, method)
    }

    /// The step that sends an instance's call in flight again, or parks it when its
    /// driver's policy says so (a restart left unknown whether the call ran).
    fn redelivery(&mut self, inst: &mut Instance<F>) -> Option<Step> {
        // Not `self.policy`: the scratch buffer is borrowed mutably alongside.
        let policies = &self.policies;
        let park = |link, method| policy_in(policies, link, method).is_some_and(|p| p.park);
        inst.redeliver(park, &mut self.scratch)
    }

    /// An instance from its read record, and the step that parks it if another flow
    /// version wrote it.
    fn rebuild(
        &mut self,
        id: &Arc<str>,
        record: Record,
        version: u64,
    ) -> Result<(Instance<F>, Option<Step>)> {
        Instance::<F>::recover(
            self.key(id),
            record,
            version,
            self.limits.decode_limit,
            &mut self.scratch,
        )
        .map_err(|source| Error::Codec {
            flow: F::NAME,
            id: id.to_string(),
            what: "the state",
            source,
        })
    }

    /// The parking step of a live instance written by another flow version whose state
    /// does not decode here; any other failure to rebuild is returned as it is.
    fn unreadable(&self, id: &Arc<str>, record: &Record, version: u64, e: Error) -> Result<Step> {
        match e {
            Error::Codec { source, .. }
                if record.flow_version != F::VERSION && record.status.is_active() =>
            {
                Ok(Instance::<F>::park_unreadable(
                    self.key(id),
                    record,
                    version,
                    &source,
                    self.scratch.now_ms,
                ))
            }
            other => Err(other),
        }
    }

    /// Puts a live instance in memory; a call in flight is sent again (or the instance
    /// parked) by a redelivery step in the next round.
    fn install(&mut self, id: &Arc<str>, inst: Instance<F>, placed: PlacedRecord) {
        if inst.status().has_call() {
            self.requeue.push_back(Input::Redeliver { id: id.clone() });
        }
        self.slots.insert(id.clone(), Slot::new(inst, Some(placed)));
        self.touched.push(id.clone());
    }

    /// Marks an instance damaged in the store when it cannot be read for a reason retrying
    /// cannot cure (its record or a payload fails its check, a blob is gone), so that
    /// `Engine::parked` lists it for an operator. Best effort, off the runner.
    fn note_damage(&self, id: &Arc<str>, e: &Error) {
        use flowwire_storage::BlobError;
        let damaged = match e {
            // A record of a newer format is not damaged: a newer flowwire reads it.
            Error::Codec {
                source: flowwire_storage::CodecError::UnknownFormat { .. },
                ..
            } => false,
            Error::Codec { .. } | Error::Store(StoreError::Decode { .. }) => true,
            Error::Blob(b) => matches!(
                **b,
                BlobError::Missing { .. } | BlobError::Corrupt { .. } | BlobError::Truncated { .. }
            ),
            _ => false,
        };
        if !damaged {
            return;
        }
        let (store, key, why) = (self.store.clone(), self.key(id), e.to_string());
        let limit = self.limits.store_timeout;
        tokio::spawn(async move {
            let marked = tokio::time::timeout(limit, store.mark_damaged(&key, Some(&why))).await;
            if !matches!(marked, Ok(Ok(()))) {
                tracing::warn!(instance = %key, "could not mark the instance damaged");
            }
        });
    }

    /// Schedules another load of an instance that could not be read, if trying again can
    /// help; otherwise leaves it as stored (nothing is lost; an operator can inspect it).
    fn reload_later(&self, id: Arc<str>, attempt: u32, resend: bool, e: &Error) {
        if !e.is_transient() {
            tracing::error!(flow = F::NAME, id = %id, error = %e, "instance cannot be read; left as stored");
            self.note_damage(&id, e);
            return;
        }
        let delay = backoff(attempt);
        tracing::warn!(flow = F::NAME, id = %id, error = %e, retry_in = ?delay, "instance cannot be loaded yet");
        let inbox = self.inbox.clone();
        tokio::spawn(async move {
            tokio::time::sleep(delay).await;
            let _ = inbox.send(Internal::Reload {
                id,
                attempt,
                resend,
            });
        });
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
        }
    }

    /// When the timer service needs the runner next: the earliest timer held, or the end of
    /// the window read from the index (to read the next one).
    fn next_timer(&self) -> u64 {
        let first = self.timers.first().map_or(u64::MAX, |(due, _)| *due);
        first.min(self.horizon.saturating_add(1))
    }

    /// Moves the timers due by now into the backlog, and reads the next window of the
    /// timer index when this one has run out. Bounded: one page per call.
    async fn tick(&mut self, backlog: &mut VecDeque<Input<F>>) {
        let now = crate::clock::unix_millis();
        while let Some((due, _)) = self.timers.first() {
            if *due > now {
                break;
            }
            let Some((due_ms, id)) = self.timers.pop_first() else {
                break;
            };
            backlog.push_back(Input::Fire { id, due_ms });
        }
        if now <= self.horizon {
            return;
        }
        let until = now.saturating_add(LOOKAHEAD_MS);
        let limit = self.limits.store_timeout;
        let due = match &self.owned {
            Some(o) => self.store.due_in(F::NAME, o.shard, until, TIMER_PAGE),
            None => self.store.due(F::NAME, until, TIMER_PAGE),
        };
        let listed = tokio::time::timeout(limit, due).await;
        match listed {
            Ok(Ok(page)) => {
                let full = page.len() >= TIMER_PAGE;
                let last = page.last().map(|(_, due)| *due);
                for (id, due) in page {
                    self.timers.insert((due, id));
                }
                // A full page may have left out timers due at its last time: the next window
                // starts there (the set drops duplicates).
                self.horizon = match (full, last) {
                    (true, Some(last)) => last.saturating_sub(1).max(now),
                    _ => until,
                };
            }
            Ok(Err(e)) => {
                tracing::warn!(flow = F::NAME, error = %e, "timer index not readable; trying again in 1 s");
                self.horizon = now.saturating_add(1_000);
            }
            Err(_) => {
                tracing::warn!(
                    flow = F::NAME,
                    "timer index read timed out; trying again in 1 s"
                );
                self.horizon = now.saturating_add(1_000);
            }
        }
    }

    /// Repairs a timer index entry that does not match its record, off the runner's path.
    fn retime(&self, id: &Arc<str>, stale: u64, actual: Option<u64>) {
        let store = self.store.clone();
        let key = self.key(id);
        let limit = self.limits.store_timeout;
        tokio::spawn(async move {
            match tokio::time::timeout(limit, store.retime(&key, stale, actual)).await {
                Ok(Ok(())) => {}
                Ok(Err(e)) => {
                    tracing::warn!(instance = %key, error = %e, "stale timer entry not repaired");
                }
                Err(_) => tracing::warn!(instance = %key, "stale timer entry not repaired in time"),
            }
        });
    }

    /// Whether an instance took a message for the batch being built or the one in flight.
    fn in_a_batch(&self, slot: &Slot<F>, id: &Arc<str>) -> bool {
        slot.round == self.round
            || self.busy.contains(id)
            || (self.inflight.is_some()
                && (slot.round == self.flight_round || self.flight_busy.contains(id)))
    }

    /// Takes instances without a call in flight out of memory at the end of a round.
    fn evict_idle(&mut self) {
        // The list keeps its capacity from round to round.
        let mut touched = std::mem::take(&mut self.touched);
        for id in touched.drain(..) {
            if let Some(slot) = self.slots.get(&id)
                && !slot.inst.status().has_call()
                && !slot.uploading
                && slot.held.is_empty()
                && slot.placed.is_some()
                && !self.in_a_batch(slot, &id)
            {
                self.slots.remove(&id);
            }
        }
        self.touched = touched;
    }

    pub(crate) async fn run(
        mut self,
        mut rx: mpsc::Receiver<Msg<F>>,
        mut orx: mpsc::UnboundedReceiver<OutcomeMsg>,
    ) {
        let Some(mut inbox) = self.inbox_rx.take() else {
            return;
        };
        let mut backlog: VecDeque<Input<F>> = VecDeque::new();
        let mut shutdown: Option<oneshot::Sender<()>> = None;
        // Second messages for instances already in the batch being built.
        let mut deferred: VecDeque<Input<F>> = VecDeque::new();
        let max = self.limits.max_batch;
        loop {
            while let Some(i) = self.requeue.pop_back() {
                backlog.push_front(i);
            }
            // A full batch waits for the one in flight; so does a runner with nothing to take.
            let full = self.building.staged.len() >= max && self.inflight.is_some();
            if backlog.is_empty() || full {
                let wait = self
                    .next_timer()
                    .saturating_sub(crate::clock::unix_millis());
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
                    () = tokio::time::sleep(std::time::Duration::from_millis(wait)), if !full => {}
                }
            } else if self.inflight.is_some()
                && let Some(r) = poll_once(Self::landing(&mut self.inflight)).await
            {
                self.land(r).await;
            }
            let now = crate::clock::unix_millis();
            if now >= self.next_timer() {
                self.tick(&mut backlog).await;
            }
            self.scratch.now_ms = now;
            // Bounded: one report per upload or reload this runner started.
            while let Ok(i) = inbox.try_recv() {
                self.take_internal(i, &mut backlog);
            }
            while backlog.len() < max {
                match orx.try_recv() {
                    Ok(o) => backlog.push_back(Input::Outcome(o)),
                    Err(_) => break,
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
                // A newer owner holds the shard: everything held here is stale. Inputs
                // from the bus are not acknowledged, so the new owner gets them.
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
                        Some(Internal::Reload { .. } | Internal::Again(_)) => {}
                        None => break,
                    }
                }
                let _ = reply.send(());
                break;
            }
        }
    }

    /// Takes messages from the backlog into the batch being built, at most one per
    /// instance and `max_batch` in all. A message for an instance with a step in flight
    /// waits for its commit; a second one for an instance in this batch waits in
    /// `deferred` until the batch is sent; a shutdown stops the taking.
    async fn take(
        &mut self,
        backlog: &mut VecDeque<Input<F>>,
        deferred: &mut VecDeque<Input<F>>,
        shutdown: &mut Option<oneshot::Sender<()>>,
    ) {
        let max = self.limits.max_batch;
        while self.building.staged.len() < max {
            let Some(input) = backlog.pop_front() else {
                break;
            };
            if let Some(id) = input.serial_on() {
                // A probe need not wait for an upload: it reads the committed bytes.
                let probe = matches!(input, Input::Msg(Msg::Probe { .. }));
                let flying = self.inflight.is_some();
                // A resident instance is marked with the batch that took a message for it
                // (no set to hash into); any other goes in `busy` (an empty set answers
                // without hashing).
                let taken = match self.slots.get_mut(id) {
                    Some(slot) if slot.uploading && !probe => {
                        slot.held.push_back(input);
                        continue;
                    }
                    Some(slot)
                        if flying
                            && (slot.round == self.flight_round
                                || self.flight_busy.contains(id)) =>
                    {
                        self.waiting.push_back(input);
                        continue;
                    }
                    None if flying && self.flight_busy.contains(id) => {
                        self.waiting.push_back(input);
                        continue;
                    }
                    Some(slot) if slot.round == self.round || self.busy.contains(id) => true,
                    Some(slot) => {
                        slot.round = self.round;
                        false
                    }
                    None => !self.busy.insert(id.clone()),
                };
                if taken {
                    deferred.push_back(input);
                    continue;
                }
            }
            if let Input::Msg(Msg::Shutdown { reply }) = input {
                *shutdown = Some(reply);
                break;
            }
            if let Some(s) = self.handle(input).await {
                self.stage(s);
            }
        }
    }

    fn probe_panicked(id: &str, payload: &(dyn std::any::Any + Send)) -> Error {
        Error::ProbePanicked {
            flow: F::NAME,
            id: id.to_string(),
            reason: crate::guard::panic_message(payload),
        }
    }

    /// Runs a probe on a state decoded from its committed bytes, on the blocking pool (a
    /// large state must not stall the runner).
    fn probe_bytes(
        &self,
        id: Arc<str>,
        state: Bytes,
        ask: Ask<F>,
        reply: oneshot::Sender<Result<()>>,
    ) {
        let limit = self.limits.decode_limit;
        tokio::task::spawn_blocking(move || {
            let answer = codec::decode_raw::<F::State>(&state, limit)
                .map_err(|source| Error::Codec {
                    flow: F::NAME,
                    id: id.to_string(),
                    what: "the state",
                    source,
                })
                .and_then(|s| {
                    let flow = F::from_state(s);
                    catch_unwind(AssertUnwindSafe(|| ask(&flow)))
                        .map_err(|p| Self::probe_panicked(&id, &*p))
                });
            let _ = reply.send(answer);
        });
    }

    fn not_found(id: &str) -> Error {
        Error::NotFound {
            flow: F::NAME,
            id: id.to_string(),
        }
    }

    fn codec_error(id: &str, source: flowwire_storage::CodecError) -> Error {
        Error::Codec {
            flow: F::NAME,
            id: id.to_string(),
            what: "the record",
            source,
        }
    }

    /// The answer to an impulse an instance no longer takes: a retry of one it applied
    /// (say the `cancel` that ended it) is told so, as it would be while it ran.
    fn refuse(&self, id: &Arc<str>, impulse_id: &Arc<str>, refusal: Error) -> super::BoxFut<Error> {
        let store = self.store.clone();
        let key = self.key(id);
        let impulse_id = impulse_id.clone();
        Box::pin(async move {
            match store.impulse_applied(&key, &impulse_id).await {
                Ok(Some(step)) => Error::ImpulseAlreadyApplied {
                    flow: F::NAME,
                    id: key.id.to_string(),
                    impulse_id: impulse_id.to_string(),
                    step,
                },
                _ => refusal,
            }
        })
    }

    /// Why a request that needs a live instance cannot have one.
    fn not_live(id: &str, status: Status) -> Error {
        match status {
            Status::Quarantined { reason } => Self::quarantined(id, reason),
            other => Error::Ended {
                flow: F::NAME,
                id: id.to_string(),
                status: other.name(),
            },
        }
    }

    /// Brings an instance that is not in memory into memory if it is active.
    /// Returns its record when it is not active (ended or parked), `None` if unknown.
    ///
    /// A record of another flow version is reported as parked and not loaded: start-up
    /// recovery persists the parking, and the instance never runs on the wrong code.
    async fn fault_in(&mut self, id: &Arc<str>) -> Result<Option<Record>> {
        let key = self.key(id);
        let Some(stored) = self.store.load(&key).await? else {
            return Ok(None);
        };
        let (record, placed) = self.open(id, &stored).await?;
        if !record.status.is_active() {
            return Ok(Some(record));
        }
        let (inst, park) = match self.rebuild(id, record.clone(), stored.version) {
            Ok(rebuilt) => rebuilt,
            Err(e) => {
                let park = self.unreadable(id, &record, stored.version, e)?;
                return Ok(Some(park.draft.record));
            }
        };
        if let Some(park) = park {
            return Ok(Some(park.draft.record));
        }
        self.install(id, inst, placed);
        Ok(Some(record))
    }

    /// Brings an instance into memory whatever its status (for an operator); it leaves
    /// memory again after the round unless it then has a call in flight.
    async fn load_any(&mut self, id: &Arc<str>, op: &'static str) -> Result<()> {
        let key = self.key(id);
        let Some(stored) = self.store.load(&key).await? else {
            return Err(Self::not_found(id));
        };
        let (record, placed) = self.open(id, &stored).await?;
        let status = record.status.name();
        let (inst, park) = self.rebuild(id, record, stored.version)?;
        if park.is_some() {
            // Live (not parked yet), and written by another version: not for an operator
            // until it is parked.
            return Err(Error::NotParked {
                flow: F::NAME,
                id: id.to_string(),
                op,
                status,
            });
        }
        self.slots.insert(id.clone(), Slot::new(inst, Some(placed)));
        self.touched.push(id.clone());
        Ok(())
    }

    fn refused(id: &Arc<str>, op: &'static str, refused: Refused) -> Error {
        match refused {
            Refused::NotParked(status) => Error::NotParked {
                flow: F::NAME,
                id: id.to_string(),
                op,
                status,
            },
            Refused::PatchPanicked(message) => Error::PatchPanicked {
                flow: F::NAME,
                id: id.to_string(),
                message,
            },
            Refused::State(detail) => Error::Operation {
                flow: F::NAME,
                id: id.to_string(),
                op,
                detail,
            },
        }
    }

    /// Finds an instance for a request: `Ok(None)` when it is (now) in memory, its record
    /// when it ended or is parked, [`Error::NotFound`] when no such instance exists.
    async fn locate(&mut self, id: &Arc<str>) -> Result<Option<Record>> {
        if self.slots.contains_key(id) {
            return Ok(None);
        }
        let found = self.fault_in(id).await;
        if let Err(e) = &found {
            self.note_damage(id, e);
        }
        match found? {
            None => Err(Self::not_found(id)),
            Some(record) if record.status.is_active() => Ok(None),
            Some(record) => Ok(Some(record)),
        }
    }

    /// Brings into memory the instance of an outcome that arrived while it was not: its
    /// call may have been put in flight by a step this runner did not see (a previous owner
    /// of the shard, or a commit whose reply was lost). Returns whether the outcome can be
    /// applied now (handing it back). An outcome is never dropped unseen: one for an
    /// instance that ended or does not exist is settled; one whose instance cannot be read
    /// yet is tried again later (an outcome from the bus stays unacknowledged meanwhile).
    async fn fault_in_for(&mut self, o: OutcomeMsg) -> Option<OutcomeMsg> {
        match self.locate(&o.id).await {
            Ok(None) => {
                // Loading queued a resend of its call in flight; this outcome answers that
                // call (a fan-out's other branches are still resent).
                let answers = self.slots.get(&o.id).is_some_and(|slot| {
                    o.branch.is_none()
                        && slot.inst.record().fan.is_none()
                        && slot.inst.pending().is_some_and(|p| p.seq == o.seq)
                });
                if answers {
                    self.requeue
                        .retain(|i| !matches!(i, Input::Redeliver { id } if *id == o.id));
                }
                Some(o)
            }
            Ok(Some(_)) | Err(Error::NotFound { .. }) => {
                self.settle(&o);
                None
            }
            Err(e) if e.is_transient() => {
                let delay = backoff(4);
                tracing::warn!(flow = F::NAME, id = %o.id, error = %e, retry_in = ?delay, "outcome waits for its instance to load");
                let outcomes = self.outcomes.clone();
                tokio::spawn(async move {
                    tokio::time::sleep(delay).await;
                    let _ = outcomes.send(o);
                });
                None
            }
            Err(e) => {
                // Damaged: left as stored for an operator (and marked by `locate`); the
                // outcome is not acknowledged, so it is read again after a restart.
                tracing::error!(flow = F::NAME, id = %o.id, error = %e, "outcome not applied: its instance cannot be read");
                None
            }
        }
    }

    async fn handle(&mut self, input: Input<F>) -> Option<Staged<F>> {
        match input {
            Input::Outcome(o) => {
                let o = if self.slots.contains_key(&o.id) {
                    o
                } else {
                    self.fault_in_for(o).await?
                };
                let step = self.slots.get_mut(&o.id).and_then(|slot| {
                    slot.inst
                        .outcome(o.seq, o.branch, o.result.as_ref(), &mut self.scratch)
                });
                let Some(step) = step else {
                    // Not in flight any more (applied before, or abandoned).
                    self.settle(&o);
                    return None;
                };
                Some(Staged {
                    id: o.id.clone(),
                    step,
                    ack: Ack::Outcome(o),
                })
            }
            Input::Msg(Msg::Start { id, state, reply }) => {
                if self.slots.contains_key(&id) {
                    let _ = reply.send(Err(Error::AlreadyExists {
                        flow: F::NAME,
                        id: id.to_string(),
                    }));
                    return None;
                }
                let key = self.key(&id);
                let (inst, step) =
                    Instance::start(key, state, self.limits.decode_limit, &mut self.scratch);
                self.slots.insert(id.clone(), Slot::new(inst, None));
                Some(Staged {
                    id,
                    step,
                    ack: Ack::Start(reply),
                })
            }
            Input::Msg(Msg::Impulse {
                id,
                impulse_id,
                impulse,
                reply,
            }) => {
                if !self.slots.contains_key(&id) {
                    let key = self.key(&id);
                    match self.store.impulse_applied(&key, &impulse_id).await {
                        Ok(Some(step)) => {
                            let _ = reply.send(Err(Error::ImpulseAlreadyApplied {
                                flow: F::NAME,
                                id: id.to_string(),
                                impulse_id: impulse_id.to_string(),
                                step,
                            }));
                            return None;
                        }
                        Ok(None) => {}
                        Err(e) => {
                            let _ = reply.send(Err(e.into()));
                            return None;
                        }
                    }
                }
                match self.locate(&id).await {
                    Ok(None) => {}
                    Ok(Some(record)) => {
                        let refusal = Self::not_live(&id, record.status);
                        let _ = reply.send(Err(self.refuse(&id, &impulse_id, refusal).await));
                        return None;
                    }
                    Err(e) => {
                        let _ = reply.send(Err(e));
                        return None;
                    }
                }
                let slot = self.slots.get_mut(&id)?;
                let refusal =
                    match slot
                        .inst
                        .impulse(impulse_id.clone(), impulse, &mut self.scratch)
                    {
                        Ok(step) => {
                            return Some(Staged {
                                id,
                                step,
                                ack: Ack::Impulse(reply, impulse_id),
                            });
                        }
                        Err(Rejected::Ended(status)) => Error::Ended {
                            flow: F::NAME,
                            id: id.to_string(),
                            status,
                        },
                        Err(Rejected::Quarantined(reason)) => Self::quarantined(&id, reason),
                    };
                let _ = reply.send(Err(self.refuse(&id, &impulse_id, refusal).await));
                None
            }
            Input::Msg(Msg::Probe { id, ask, reply }) => {
                match self.locate(&id).await {
                    Ok(None) => match self.slots.get(&id) {
                        // The flow in memory is the committed one: no step of this round
                        // touched it (one message per instance a round) and none is uploading.
                        Some(slot) if !slot.uploading && slot.placed.is_some() => {
                            let flow = slot.inst.flow();
                            let ran = catch_unwind(AssertUnwindSafe(|| ask(flow)));
                            let _ = reply.send(ran.map_err(|p| Self::probe_panicked(&id, &*p)));
                        }
                        // A start not committed yet has no persisted state.
                        Some(slot) if slot.placed.is_none() => {
                            let _ = reply.send(Err(Self::not_found(&id)));
                        }
                        Some(slot) => {
                            self.probe_bytes(id.clone(), slot.inst.state_bytes(), ask, reply);
                        }
                        None => {
                            let _ = reply.send(Err(Self::not_found(&id)));
                        }
                    },
                    Ok(Some(record)) => self.probe_bytes(id, record.state, ask, reply),
                    Err(e) => {
                        let _ = reply.send(Err(e));
                    }
                }
                None
            }
            Input::Msg(Msg::State { id, reply }) => {
                let answer = match self.locate(&id).await {
                    // A start whose first step is not committed yet has no persisted state.
                    Ok(None) => self
                        .slots
                        .get(&id)
                        .filter(|slot| slot.placed.is_some())
                        .map(|slot| slot.inst.state_bytes())
                        .ok_or_else(|| Self::not_found(&id)),
                    Ok(Some(record)) => Ok(record.state),
                    Err(e) => Err(e),
                };
                let _ = reply.send(answer);
                None
            }
            Input::Msg(Msg::Exists { id, reply }) => {
                let _ = reply.send(self.locate(&id).await.map(|_| ()));
                None
            }
            Input::Msg(Msg::Finished { id, reply }) => {
                if let Some(e) = self.store.fault().filter(|e| !e.is_transient()) {
                    // Nothing will progress: a waiter would wait for ever.
                    let _ = reply.send(Err(Error::Store(e)));
                    return None;
                }
                match self.locate(&id).await {
                    Ok(None) => {}
                    Ok(Some(record)) => {
                        let answer = match ended_of(&record.status) {
                            Some(ended) => Ok(ended),
                            None => Err(Self::not_live(&id, record.status)),
                        };
                        let _ = reply.send(answer);
                        return None;
                    }
                    Err(e) => {
                        let _ = reply.send(Err(e));
                        return None;
                    }
                }
                if let Some(slot) = self.slots.get(&id) {
                    match slot.inst.status() {
                        Status::Quarantined { reason } => {
                            let _ = reply.send(Err(Self::quarantined(&id, reason.clone())));
                        }
                        _ => self.waiters.entry(id).or_default().push(reply),
                    }
                }
                None
            }
            Input::Fire { id, due_ms } => {
                match self.locate(&id).await {
                    Ok(None) => {}
                    // Ended or parked: its record holds no timer any more.
                    Ok(Some(_)) | Err(Error::NotFound { .. }) => {
                        self.retime(&id, due_ms, None);
                        return None;
                    }
                    Err(e) => {
                        tracing::warn!(flow = F::NAME, id = %id, error = %e, "timer not fired yet");
                        self.again(Input::Fire { id, due_ms }, 1);
                        return None;
                    }
                }
                let slot = self.slots.get_mut(&id)?;
                match slot.inst.fire(due_ms, &mut self.scratch) {
                    Some(step) => Some(Staged {
                        ack: Ack::Retry(Input::Fire {
                            id: id.clone(),
                            due_ms,
                        }),
                        id,
                        step,
                    }),
                    None => {
                        let actual = slot.inst.record().timer.map(|t| t.due_ms);
                        if actual != Some(due_ms) {
                            self.retime(&id, due_ms, actual);
                        }
                        None
                    }
                }
            }
            Input::Redeliver { id } => {
                let mut slot = self.slots.remove(&id)?;
                let step = self.redelivery(&mut slot.inst);
                self.slots.insert(id.clone(), slot);
                step.map(|step| Staged {
                    ack: Ack::Retry(Input::Redeliver { id: id.clone() }),
                    id,
                    step,
                })
            }
            Input::Reload {
                id,
                attempt,
                resend,
            } => {
                if self.slots.contains_key(&id) {
                    return None;
                }
                let key = self.key(&id);
                let loaded = match self.store.load(&key).await {
                    Ok(Some(stored)) => self.adopt(&id, &stored, resend).await,
                    Ok(None) => Ok(None),
                    Err(e) => Err(e.into()),
                };
                match loaded {
                    Ok(first) => {
                        if self.slots.contains_key(&id) {
                            tracing::info!(flow = F::NAME, id = %id, attempt, "instance loaded");
                        }
                        first.map(|step| Self::first(id, step))
                    }
                    Err(e) => {
                        self.reload_later(id, attempt.saturating_add(1), resend, &e);
                        None
                    }
                }
            }
            Input::Verify { id, attempt } => self.verify(id, attempt).await,
            Input::Msg(Msg::Resident { reply }) => {
                let _ = reply.send(self.slots.len());
                None
            }
            Input::Msg(Msg::Operate { id, op, reply }) => {
                if !self.slots.contains_key(&id)
                    && let Err(e) = self.load_any(&id, op.name()).await
                {
                    let _ = reply.send(Err(e));
                    return None;
                }
                let slot = self.slots.get_mut(&id)?;
                let name = op.name();
                match slot.inst.operate(op, &mut self.scratch) {
                    Ok(step) => Some(Staged {
                        id,
                        step,
                        ack: Ack::Operate(reply),
                    }),
                    Err(refused) => {
                        let _ = reply.send(Err(Self::refused(&id, name, refused)));
                        None
                    }
                }
            }
            Input::Msg(Msg::Shutdown { .. }) => None,
        }
    }

    /// Places a step's payloads and adds it to the batch being built. A step with blobs
    /// to write starts their upload and joins a later batch once they land; one whose
    /// payloads cannot be placed fails now.
    fn stage(&mut self, s: Staged<F>) {
        let prev = self
            .slots
            .get(&s.id)
            .and_then(|slot| slot.placed.as_ref().map(|p| (p, &slot.inst.record().state)));
        let scratch = &mut self.scratch;
        let sealed = self.placement.seal(
            &s.step.draft,
            prev,
            self.retention,
            &mut scratch.out,
            &mut scratch.arena,
        );
        match sealed {
            Ok(mut sealed) if sealed.puts.is_empty() => {
                sealed.write.fence = self.owned.as_ref().map(|o| o.token);
                let b = &mut self.building;
                b.writes.push(sealed.write);
                b.placed.push(sealed.placed);
                b.staged.push(s);
            }
            // Rare (a blob to write, a payload too large): not in this batch.
            Ok(mut sealed) => {
                sealed.write.fence = self.owned.as_ref().map(|o| o.token);
                self.upload(s, sealed);
            }
            Err(e) => self.failed(s, &Error::from(e)),
        }
    }

    /// A step whose blobs were written (or not): it joins the batch being built, and its
    /// instance's held messages wait for that batch's commit.
    fn landed(&mut self, u: Uploaded<F>) {
        let Uploaded {
            staged: s,
            sealed,
            result,
        } = u;
        self.uploading = self.uploading.saturating_sub(1);
        if let Some(slot) = self.slots.get_mut(&s.id) {
            slot.uploading = false;
            slot.round = self.round;
            self.requeue.extend(slot.held.drain(..));
        }
        match result {
            Ok(()) => {
                let b = &mut self.building;
                b.writes.push(sealed.write);
                b.placed.push(sealed.placed);
                b.staged.push(s);
            }
            Err(e) => self.failed(s, &e),
        }
    }

    /// Sends the batch being built to the store in one call, and starts the next batch.
    /// A store that answers at once has its results acted on now; otherwise the commit
    /// stays in flight (bounded by the store timeout) while the next batch is built.
    async fn submit(&mut self) {
        // One batch in flight at a time (the loop submits only when none is).
        self.land_now().await;
        if self.building.staged.is_empty() {
            // Messages taken without a step (probes, refusals) release their instances.
            self.round += 1;
            self.busy.clear();
            return;
        }
        // The vectors alternate between the two batches and keep their capacity; the
        // store takes the writes (a remote one sends them elsewhere): one allocation.
        let writes = mem::take(&mut self.building.writes);
        let staged = mem::replace(&mut self.building.staged, mem::take(&mut self.spare.0));
        let placed = mem::replace(&mut self.building.placed, mem::take(&mut self.spare.1));
        self.flight_round = self.round;
        self.round += 1;
        mem::swap(&mut self.busy, &mut self.flight_busy);
        self.busy.clear();
        if let Some(owned) = &self.owned
            && !owned.lease.holds()
        {
            // The lease may have run out, and a newer owner may be writing: nothing is
            // committed. Inputs from the bus are not acknowledged, so the next owner
            // takes them; the supervisor releases the shard.
            tracing::warn!(
                flow = F::NAME,
                shard = owned.shard,
                token = owned.token,
                "shard lease ran out before its renewal was confirmed; stopping"
            );
            self.lost = true;
            drop(writes);
            self.spare = (staged, placed);
            self.spare.0.clear();
            self.spare.1.clear();
            self.flight_busy.clear();
            return;
        }
        let mut commit = self.store.commit(writes);
        match poll_once(&mut commit).await {
            Some(result) => self.act(staged, placed, result).await,
            None => {
                let limit = self.limits.store_timeout;
                self.inflight = Some(InFlight {
                    staged,
                    placed,
                    commit: Box::pin(tokio::time::timeout(limit, commit)),
                });
            }
        }
    }

    /// Waits for the batch in flight to land (forever if there is none).
    async fn landing(
        inflight: &mut Option<InFlight<F>>,
    ) -> std::result::Result<Committed, tokio::time::error::Elapsed> {
        match inflight {
            Some(f) => f.commit.as_mut().await,
            None => std::future::pending().await,
        }
    }

    /// Acts on the landed batch in flight.
    async fn land(&mut self, r: std::result::Result<Committed, tokio::time::error::Elapsed>) {
        let Some(InFlight { staged, placed, .. }) = self.inflight.take() else {
            return;
        };
        let result = r.unwrap_or(Err(StoreError::Timeout(self.limits.store_timeout)));
        self.act(staged, placed, result).await;
    }

    /// Waits for the batch in flight, if any, and acts on it.
    async fn land_now(&mut self) {
        if self.inflight.is_some() {
            let r = Self::landing(&mut self.inflight).await;
            self.land(r).await;
        }
    }

    /// Commits everything taken: the batch in flight, then the one being built.
    async fn flush(&mut self) {
        self.land_now().await;
        self.submit().await;
        self.land_now().await;
    }

    /// Acts on each step of a committed batch (in batch order), and lets the messages that
    /// waited for it be taken again.
    async fn act(
        &mut self,
        mut staged: Vec<Staged<F>>,
        mut placed: Vec<PlacedRecord>,
        result: Committed,
    ) {
        match result {
            Ok(results) => {
                let mut results = results.into_iter();
                for (s, placed) in staged.drain(..).zip(placed.drain(..)) {
                    match results.next() {
                        Some(StepResult::Committed) => self.committed(s, placed),
                        Some(StepResult::Conflict { .. }) => self.conflicted(s).await,
                        Some(StepResult::ImpulseSeen { seq }) => self.seen(s, seq),
                        Some(StepResult::Fenced { token }) => {
                            // Nothing of it is kept: its caller sees the runner stop, and
                            // the new owner takes the input from the bus.
                            tracing::warn!(flow = F::NAME, id = %s.id, token, "shard lost to a newer owner; stopping");
                            self.lost = true;
                        }
                        None => {
                            // The store broke its contract: the step is not known to
                            // be committed.
                            let e = StoreError::Backend(
                                "the store answered fewer results than steps".into(),
                            );
                            self.failed(s, &Error::Store(e));
                        }
                    }
                }
            }
            Err(e) if e.is_transient() => {
                // The batch may have been applied all the same (a reply lost, a timeout on
                // this side): each instance is checked against the store once it answers.
                let e = Error::Store(e);
                tracing::error!(flow = F::NAME, error = %e, "commit failed or unanswered");
                for s in staged.drain(..) {
                    let id = s.id.clone();
                    self.failed(s, &e);
                    self.again(Input::Verify { id, attempt: 0 }, 0);
                }
            }
            Err(e) => {
                let e = Error::Store(e);
                tracing::error!(flow = F::NAME, error = %e, "commit failed");
                for s in staged.drain(..) {
                    self.failed(s, &e);
                }
            }
        }
        placed.clear();
        self.spare = (staged, placed);
        self.flight_busy.clear();
        self.requeue.extend(self.waiting.drain(..));
    }

    /// Writes a step's blobs on a task of its own (bounded by the store timeout) and
    /// reports back through the inbox. The instance holds its next inputs until then.
    fn upload(&mut self, s: Staged<F>, mut sealed: Sealed) {
        if let Some(slot) = self.slots.get_mut(&s.id) {
            slot.uploading = true;
        }
        self.uploading += 1;
        let placement = self.placement.clone();
        let inbox = self.inbox.clone();
        let limit = self.limits.store_timeout;
        // A start is refused before anything is placed if its id is taken (the commit's
        // `Expect::Absent` still decides a race; the blob keys are unique per write, so a
        // losing start's blobs can never replace the winner's).
        let taken = matches!(s.ack, Ack::Start(_)).then(|| self.store.clone());
        tokio::spawn(async move {
            let key = &sealed.write.key;
            let put = async {
                if let Some(store) = taken
                    && store.load(key).await?.is_some()
                {
                    return Err(Error::AlreadyExists {
                        flow: F::NAME,
                        id: key.id.to_string(),
                    });
                }
                placement
                    .put_all(key, &sealed.puts)
                    .await
                    .map_err(Error::from)
            };
            let result = match tokio::time::timeout(limit, put).await {
                Ok(r) => r,
                Err(_) => Err(Error::Store(StoreError::Timeout(limit))),
            };
            // The bytes are on their tier (or not); the step needs only the record now.
            drop(mem::take(&mut sealed.puts));
            let _ = inbox.send(Internal::Uploaded(Box::new(Uploaded {
                staged: s,
                sealed,
                result,
            })));
        });
    }

    fn committed(&mut self, s: Staged<F>, placed: PlacedRecord) {
        let Some(slot) = self.slots.get_mut(&s.id) else {
            // A step of an instance that is not in memory (parking a record another
            // version wrote): nothing to adopt.
            self.announce(&s);
            return;
        };
        let before = slot.inst.record().timer.map(|t| t.due_ms);
        slot.inst.commit(&s.step);
        slot.failures = 0;
        let trash = placed.trash.clone();
        slot.placed = Some(placed);
        self.collect(&trash);
        if !s.step.draft.record.status.has_call() {
            // It may leave memory at the end of the round (one with a call in flight stays).
            self.touched.push(s.id.clone());
        }
        let record = &s.step.draft.record;
        tracing::debug!(flow = F::NAME, id = %s.id, step = record.seq, input = ?s.step.draft.input, output = ?s.step.draft.output, "step");
        // The timer set follows the records: a moved or dropped timer leaves it, a timer
        // armed within the window read from the index joins it.
        let after = record.timer.map(|t| t.due_ms);
        if before != after {
            if let Some(old) = before {
                self.timers.remove(&(old, s.id.clone()));
            }
            if let Some(due) = after
                && due <= self.horizon
            {
                self.timers.insert((due, s.id.clone()));
            }
        }
        self.announce(&s);
        match s.ack {
            Ack::Start(reply) | Ack::Impulse(reply, _) => {
                let _ = reply.send(Ok(()));
            }
            Ack::Operate(reply) => {
                let _ = reply.send(Ok(s.step.draft.record.seq));
            }
            Ack::Outcome(o) => self.settle(&o),
            Ack::Retry(_) | Ack::Quiet => {}
        }
        for out in &s.step.dispatch {
            self.dispatch(&s.id, out);
        }
        let status = s.step.draft.record.status;
        if let Some(owned) = &self.owned
            && (status.is_terminal() || matches!(status, Status::Quarantined { .. }))
        {
            let _ = owned.ended.send(s.id.clone());
        }
        if let Some(ended) = ended_of(&status) {
            self.slots.remove(&s.id);
            for w in self.waiters.remove(&s.id).unwrap_or_default() {
                let _ = w.send(Ok(ended.clone()));
            }
        } else if let Status::Quarantined { reason } = status {
            tracing::error!(flow = F::NAME, id = %s.id, %reason, "instance quarantined");
            for w in self.waiters.remove(&s.id).unwrap_or_default() {
                let _ = w.send(Err(Self::quarantined(&s.id, reason.clone())));
            }
        }
    }

    /// Sends the lifecycle events of a committed step (only if anyone listens).
    fn announce(&self, s: &Staged<F>) {
        if !self.events.wanted() {
            return;
        }
        let d = &s.step.draft;
        let seq = d.record.seq;
        let send = |kind| self.events.send(F::NAME, &s.id, seq, kind);
        match &d.input {
            StepInput::Start => send(EventKind::Started),
            StepInput::Impulse { name, .. } => send(EventKind::Impulse { name: name.clone() }),
            StepInput::Outcome { call_seq, ok } => send(EventKind::Outcome {
                call_step: *call_seq,
                branch: None,
                ok: *ok,
            }),
            StepInput::BranchOutcome {
                call_seq,
                branch,
                ok,
            } => send(EventKind::Outcome {
                call_step: *call_seq,
                branch: Some(*branch),
                ok: *ok,
            }),
            StepInput::Timer { due_ms } => send(EventKind::Woke { due_ms: *due_ms }),
            StepInput::Resume => send(EventKind::Resumed),
            StepInput::Patch => send(EventKind::Patched),
            StepInput::Rewind { to } => send(EventKind::Rewound { to: *to }),
            _ => {}
        }
        if matches!(d.input, StepInput::Patch | StepInput::Rewind { .. }) {
            // The instance stays parked: it was reported when it was parked.
            return;
        }
        match &d.output {
            StepOutput::Drive { .. } | StepOutput::Fan { .. } => {
                for out in &s.step.dispatch {
                    let (driver, method) = Self::names(out.call.link, out.call.method);
                    send(EventKind::Drive {
                        driver,
                        method,
                        call_step: out.call.seq,
                        branch: out.branch,
                    });
                }
            }
            StepOutput::Sleep { due_ms } => send(EventKind::Sleeping { until_ms: *due_ms }),
            StepOutput::Wait => send(EventKind::Waiting { until_ms: None }),
            StepOutput::WaitUntil { due_ms } => send(EventKind::Waiting {
                until_ms: Some(*due_ms),
            }),
            StepOutput::Finish => send(EventKind::Finished),
            StepOutput::Fail { reason } => send(EventKind::Failed {
                reason: reason.clone(),
            }),
            StepOutput::Quarantine { reason } => send(EventKind::Quarantined {
                reason: reason.clone(),
            }),
            StepOutput::Compensate {
                call_seq,
                registered,
                link,
                method,
            } => {
                if !s.step.dispatch.is_empty() {
                    let (driver, method) = Self::names(*link, *method);
                    send(EventKind::Compensating {
                        driver,
                        method,
                        registered_step: *registered,
                        call_step: *call_seq,
                    });
                }
            }
        }
    }

    /// The driver and method names of a call.
    fn names(link: u16, method: u16) -> (&'static str, &'static str) {
        F::LINKS.get(usize::from(link)).map_or(("?", "?"), |l| {
            (
                l.driver.name,
                l.driver
                    .methods
                    .get(usize::from(method))
                    .map_or("?", |m| m.name),
            )
        })
    }

    /// Sends one of the runner's own inputs again after a backoff (its step could not be
    /// persisted).
    fn again(&self, input: Input<F>, failures: u32) {
        let delay = backoff(failures);
        let inbox = self.inbox.clone();
        tokio::spawn(async move {
            tokio::time::sleep(delay).await;
            let _ = inbox.send(Internal::Again(Box::new(input)));
        });
    }

    async fn conflicted(&mut self, s: Staged<F>) {
        match s.ack {
            Ack::Start(reply) => {
                self.slots.remove(&s.id);
                let _ = reply.send(Err(Error::AlreadyExists {
                    flow: F::NAME,
                    id: s.id.to_string(),
                }));
            }
            ack => {
                // Someone else wrote the record: the store is the truth, reload it.
                self.slots.remove(&s.id);
                let _ = self.fault_in(&s.id).await;
                let conflict = Error::Conflict {
                    flow: F::NAME,
                    id: s.id.to_string(),
                };
                match ack {
                    Ack::Impulse(reply, _) => {
                        let _ = reply.send(Err(conflict));
                    }
                    Ack::Operate(reply) => {
                        let _ = reply.send(Err(conflict));
                    }
                    // Applied again to the record as it now is: still in flight, it
                    // counts; applied already, it is dropped.
                    Ack::Outcome(o) => self.requeue.push_back(Input::Outcome(o)),
                    _ => {}
                }
            }
        }
    }

    /// Handles [`Input::Verify`]: the first step of an instance whose unanswered commit
    /// did land (the redelivery of the call it put in flight), if any.
    async fn verify(&mut self, id: Arc<str>, attempt: u32) -> Option<Staged<F>> {
        let stored = match self.store.load(&self.key(&id)).await {
            Ok(stored) => stored,
            Err(e) if e.is_transient() => {
                let attempt = attempt.saturating_add(1);
                self.again(Input::Verify { id, attempt }, attempt);
                return None;
            }
            Err(e) => {
                tracing::error!(flow = F::NAME, id = %id, error = %e, "instance not checked against the store");
                return None;
            }
        };
        let held = self.slots.get(&id).map(|slot| slot.inst.version());
        let found = stored.as_ref().map(|s| s.version);
        if held == found || (held.is_none() && stored.is_none()) {
            return None; // memory and store agree: the commit did not land
        }
        tracing::warn!(flow = F::NAME, id = %id, ?held, ?found, "an unanswered commit landed; the stored record replaces the one in memory");
        if let Some(slot) = self.slots.remove(&id) {
            self.requeue.extend(slot.held);
        }
        let stored = stored?;
        match self.adopt(&id, &stored, true).await {
            Ok(first) => first.map(|step| Self::first(id, step)),
            Err(e) => {
                self.reload_later(id, 1, true, &e);
                None
            }
        }
    }

    fn seen(&mut self, s: Staged<F>, step: u64) {
        if let Some(slot) = self.slots.get_mut(&s.id)
            && slot.inst.revert().is_err()
        {
            tracing::error!(flow = F::NAME, id = %s.id, "committed state no longer decodes");
        }
        if let Ack::Impulse(reply, impulse_id) = s.ack {
            let _ = reply.send(Err(Error::ImpulseAlreadyApplied {
                flow: F::NAME,
                id: s.id.to_string(),
                impulse_id: impulse_id.to_string(),
                step,
            }));
        }
    }

    /// A step that could not be persisted (a tier or the store failed): nothing of it is
    /// kept. A start or an impulse reports the error to its caller (who may retry with the
    /// same id); an outcome is applied again after a backoff, until it sticks — the
    /// instance waits, the others go on.
    fn failed(&mut self, s: Staged<F>, err: &Error) {
        match s.ack {
            Ack::Start(reply) => {
                self.slots.remove(&s.id);
                let _ = reply.send(Err(err.clone_for_caller()));
            }
            ack => {
                let Some(slot) = self.slots.get_mut(&s.id) else {
                    return;
                };
                let _ = slot.inst.revert();
                if let Error::Store(e) = err
                    && !e.is_transient()
                {
                    self.store_failed(&s.id, err);
                    // The store is damaged or stopped: retrying cannot help, and
                    // `Engine::health` reports it. Callers get the error; an outcome is not
                    // sent again (its call is redelivered when the store is opened again).
                    tracing::error!(flow = F::NAME, id = %s.id, error = %err, "step not persisted: the store failed for good");
                    match ack {
                        Ack::Impulse(reply, _) => {
                            let _ = reply.send(Err(err.clone_for_caller()));
                        }
                        Ack::Operate(reply) => {
                            let _ = reply.send(Err(err.clone_for_caller()));
                        }
                        _ => {}
                    }
                    return;
                }
                if matches!(err, Error::TooLarge { .. })
                    && matches!(ack, Ack::Outcome(_) | Ack::Retry(_))
                {
                    // The same input gives the same bytes: retrying cannot help. The
                    // instance is parked (its committed state fits), and the input is
                    // settled with that step.
                    let reason = format!(
                        "{err}; an operator can patch the state or raise the limit, then resume it"
                    );
                    tracing::error!(flow = F::NAME, id = %s.id, error = %err, "step too large; parking the instance");
                    let step = slot.inst.quarantine(reason, &mut self.scratch);
                    self.stage(Staged {
                        id: s.id,
                        step,
                        ack,
                    });
                    return;
                }
                slot.failures = slot.failures.saturating_add(1);
                let delay = backoff(slot.failures);
                tracing::warn!(flow = F::NAME, id = %s.id, error = %err, retry_in = ?delay, "step not persisted");
                match ack {
                    Ack::Impulse(reply, _) => {
                        let _ = reply.send(Err(err.clone_for_caller()));
                    }
                    Ack::Operate(reply) => {
                        let _ = reply.send(Err(err.clone_for_caller()));
                    }
                    Ack::Outcome(o) => {
                        let outcomes = self.outcomes.clone();
                        tokio::spawn(async move {
                            tokio::time::sleep(delay).await;
                            let _ = outcomes.send(o);
                        });
                    }
                    Ack::Retry(input) => {
                        let failures = slot.failures;
                        self.again(input, failures);
                    }
                    Ack::Start(_) | Ack::Quiet => {}
                }
            }
        }
    }

    /// The store failed for good: every `finished` waiter gets the error (nothing will
    /// progress), and an event says so, once.
    fn store_failed(&mut self, id: &Arc<str>, err: &Error) {
        for (_, waiters) in self.waiters.drain() {
            for w in waiters {
                let _ = w.send(Err(err.clone_for_caller()));
            }
        }
        if !self.store_down {
            self.store_down = true;
            self.events.send(
                F::NAME,
                id,
                0,
                EventKind::StoreFailed {
                    error: err.to_string(),
                },
            );
        }
    }

    fn job(&self, id: &Arc<str>, out: &Outgoing) -> Job {
        let p = &out.call;
        Job {
            flow: F::NAME,
            id: id.clone(),
            seq: p.seq,
            branch: out.branch,
            method: p.method,
            call: p.call.clone(),
            redelivered: p.redelivered,
            policy: self.policy(p.link, p.method).unwrap_or_else(|| {
                CallPolicy::resolve(Policy::NONE, Policy::NONE, self.limits.call_policy)
            }),
            names: Self::names(p.link, p.method),
            reply: self.outcomes.clone(),
            receipt: None,
        }
    }

    fn dispatch(&self, id: &Arc<str>, out: &Outgoing) {
        let link = out.call.link;
        let Some(port) = self.ports.get(usize::from(link)) else {
            tracing::error!(flow = F::NAME, id = %id, link, "call for an unknown link");
            return;
        };
        // A full queue must not stall the runner: hand the job to a task that waits.
        // A closed queue means the engine is shutting down; the call runs after restart.
        if let Err(crate::engine::queue::TrySendError::Full(job)) = port.try_send(self.job(id, out))
        {
            let port = port.clone();
            tokio::spawn(async move {
                let _ = port.send(job).await;
            });
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
