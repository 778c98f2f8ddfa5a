//! Resident instances: loading them (start-up recovery, fault-in, reloads after a
//! failure, the check after a commit of unknown outcome), rebuilding them from records, and
//! taking idle ones out of memory.

use std::collections::VecDeque;
use std::sync::Arc;

use flowwire_storage::record::{Persisted, PlacedRecord};
use flowwire_storage::{
    BlobRef, InstanceKey, InstanceStore, Placement, Record, StepInput, StoreError, Stored,
};

use crate::core::{Instance, Step};
use crate::engine::job::OutcomeMsg;
use crate::error::{Error, Result};
use crate::flow::Flow;

use super::{Ack, Input, Internal, Runner, Slot, Staged, backoff, policy_in};

/// An instance read from the store: its stored envelope (for its version), its record with
/// the payloads resolved from their tiers, and the record as placed. `None`: no such
/// instance.
pub(super) type Read = Result<Option<(Stored, Record, PlacedRecord)>>;

/// Reads an instance — its envelope from the store, then its payloads from their tiers —
/// bounded by the store timeout. Needs nothing of the runner, so that it can run off the
/// runner's task (see [`Runner::fetch`]).
async fn read<F: Flow>(
    store: Arc<dyn InstanceStore>,
    placement: Arc<Placement>,
    key: InstanceKey,
    limit: usize,
    timeout: std::time::Duration,
) -> Read {
    let read = async {
        let Some(stored) = store.load(&key).await? else {
            return Ok(None);
        };
        let placed = PlacedRecord::decode(&stored.bytes, &key, limit)
            .map_err(|e| Runner::<F>::codec_error(&key.id, e))?;
        let record = placement.resolve(&key, &placed).await?;
        Ok(Some((stored, record, placed)))
    };
    tokio::time::timeout(timeout, read)
        .await
        .unwrap_or(Err(Error::Store(StoreError::Timeout(timeout))))
}

/// Awaits a store or tier read on the runner's task, bounded by the store timeout `limit`
/// (the rarer loads: start-up recovery, reloads, operators' loads, the check after an
/// unanswered commit; the common ones run off the task, see [`Runner::fetch`]).
pub(super) async fn bounded<T, E: Into<Error>>(
    limit: std::time::Duration,
    read: impl std::future::Future<Output = std::result::Result<T, E>>,
) -> Result<T> {
    match tokio::time::timeout(limit, read).await {
        Ok(r) => r.map_err(Into::into),
        Err(_) => Err(Error::Store(StoreError::Timeout(limit))),
    }
}

/// Reads under way at once, at most: more wait for one to end.
const MAX_FETCHES: usize = 256;

impl<F: Flow> Runner<F> {
    /// Starts reading an instance that is not in memory for `input`, on a task of its own
    /// bounded by the store timeout, so that a slow store or tier read (an S3 GET for a
    /// sleeping instance) stalls only the inputs for that instance. Inputs for it that
    /// come meanwhile wait behind this one, in order; when the read ends they are taken
    /// again, first in the next round, and the first of them finds the instance read
    /// (see [`Runner::fault_in`]).
    pub(super) fn fetch(&mut self, id: Arc<str>, input: Input<F>) {
        if let Some(held) = self.slots.loading_mut(&id) {
            held.push_back(input);
            return;
        }
        if self.slots.loading() >= MAX_FETCHES {
            self.fetch_wait.push_back(input);
            return;
        }
        self.slots.start_loading(id.clone(), input);
        let read = read::<F>(
            self.store.clone(),
            self.placement.clone(),
            self.key(&id),
            self.limits.decode_limit,
            self.limits.store_timeout,
        );
        let inbox = self.inbox.clone();
        tokio::spawn(async move {
            let read = read.await;
            let _ = inbox.send(Internal::Fetched {
                id,
                read: Box::new(read),
            });
        });
    }

    /// A read started by [`Runner::fetch`] ended: its inputs go to the front of the round,
    /// and the first of them that loads the instance takes the read.
    pub(super) fn fetched(&mut self, id: Arc<str>, read: Read, backlog: &mut VecDeque<Input<F>>) {
        let Some(held) = self.slots.end_loading(&id) else {
            return;
        };
        if !self.slots.contains_key(&id) {
            self.reads.insert(id, read);
        }
        for input in held.into_iter().rev() {
            backlog.push_front(input);
        }
        if let Some(input) = self.fetch_wait.pop_front() {
            backlog.push_front(input);
        }
    }

    /// Reads a stored record: its envelope, then its payloads from their tiers.
    pub(super) fn open(
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

    /// Loads the instances with a call in flight, parks those of another version, sends
    /// their calls again (or parks them, per their driver's policy). Runs before the runner
    /// takes any request.
    ///
    /// An instance whose record or blobs cannot be read because the store or a tier is
    /// unreachable is loaded again in the background, with backoff, until it can be; one
    /// whose data is damaged is left as stored for an operator (and reported).
    pub(crate) async fn recover(&mut self) -> Result<usize> {
        self.now_ms = self.limits.clock.now_ms();
        let active = match &self.owned {
            Some(o) => {
                bounded(
                    self.limits.store_timeout,
                    self.store.active_in(F::NAME, o.shard),
                )
                .await?
            }
            None => bounded(self.limits.store_timeout, self.store.active(F::NAME)).await?,
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
    pub(super) async fn adopt(
        &mut self,
        id: &Arc<str>,
        stored: &Stored,
        resend: bool,
    ) -> Result<Option<Step>> {
        let (record, placed) = bounded(self.limits.store_timeout, self.open(id, stored)).await?;
        collect(&self.placement, &placed.trash);
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
            None => {
                // A clean handover: driver calls wait on the bus, child calls were served
                // by the process that let the shard go, and are sent here again.
                for out in inst.child_calls() {
                    self.dispatch(id, None, out);
                }
                None
            }
        };
        self.slots
            .insert(id.clone(), Slot::new(inst, Some(Persisted::of(placed))));
        self.touched.push(id.clone());
        Ok(step)
    }

    /// Stages the first step of a loaded instance: a redelivery is tried again if it cannot
    /// be persisted; a parking (another flow version) is written at the next start.
    pub(super) fn first(id: Arc<str>, step: Step) -> Staged<F> {
        let ack = match step.draft.input {
            StepInput::Redeliver { .. } => Ack::Retry(Input::Redeliver { id: id.clone() }),
            _ => Ack::Quiet,
        };
        Staged {
            step,
            ack,
            via: None,
        }
    }

    /// The step that sends an instance's call in flight again, or parks it when its
    /// driver's policy says so (a restart left unknown whether the call ran).
    pub(super) fn redelivery(&mut self, inst: &mut Instance<F>) -> Option<Step> {
        // Not `self.policy`: the scratch buffer is borrowed mutably alongside.
        let policies = &self.policies;
        let park = |link, method| policy_in(policies, link, method).is_some_and(|p| p.park);
        inst.redeliver(park, self.now_ms, &mut self.scratch)
    }

    /// An instance from its read record, and the step that parks it if another flow
    /// version wrote it.
    pub(super) fn rebuild(
        &mut self,
        id: &Arc<str>,
        record: Record,
        version: u64,
    ) -> Result<(Instance<F>, Option<Step>)> {
        if record.flow_version > F::VERSION {
            // A newer engine wrote it: neither parked nor run here, left for one of its
            // version (during a rolling deploy, another node; after a rollback, none yet).
            return Err(Error::NewerVersion {
                flow: F::NAME,
                id: id.to_string(),
                written: record.flow_version,
                running: F::VERSION,
            });
        }
        Instance::<F>::recover(
            self.key(id),
            record,
            version,
            self.limits.decode_limit,
            self.now_ms,
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
    pub(super) fn unreadable(
        &self,
        id: &Arc<str>,
        record: &Record,
        version: u64,
        e: Error,
    ) -> Result<Step> {
        match e {
            Error::Codec { source, .. }
                if record.flow_version != F::VERSION && record.status.is_active() =>
            {
                Ok(Instance::<F>::park_unreadable(
                    self.key(id),
                    record,
                    version,
                    &source,
                    self.now_ms,
                ))
            }
            other => Err(other),
        }
    }

    /// Puts a live instance in memory; a call in flight is sent again (or the instance
    /// parked) by a redelivery step in the next round.
    pub(super) fn install(&mut self, id: &Arc<str>, inst: Instance<F>, placed: PlacedRecord) {
        if inst.record().has_call_out() {
            self.requeue.push_back(Input::Redeliver { id: id.clone() });
        }
        self.slots
            .insert(id.clone(), Slot::new(inst, Some(Persisted::of(placed))));
        self.touched.push(id.clone());
    }

    /// Marks an instance damaged in the store when it cannot be read for a reason retrying
    /// cannot cure (its record or a payload fails its check, a blob is gone), so that
    /// `Engine::parked` lists it for an operator. Best effort, off the runner.
    pub(super) fn note_damage(&self, id: &Arc<str>, e: &Error) {
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
    pub(super) fn reload_later(&self, id: Arc<str>, attempt: u32, resend: bool, e: &Error) {
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

    /// Whether an instance took a message for the batch being built or the one in flight.
    pub(super) fn in_a_batch(&self, slot: &Slot<F>, id: &Arc<str>) -> bool {
        slot.phase.round() == self.round
            || self.busy.contains(id)
            || (self.inflight.is_some()
                && (slot.phase.round() == self.flight_round || self.flight_busy.contains(id)))
    }

    /// Takes instances without a call in flight out of memory at the end of a round.
    pub(super) fn evict_idle(&mut self) {
        // The list keeps its capacity from round to round.
        let mut touched = std::mem::take(&mut self.touched);
        for id in touched.drain(..) {
            if let Some(slot) = self.slots.get(&id)
                && !slot.inst.record().has_call_out()
                && !slot.phase.uploading()
                && slot.held.is_empty()
                && slot.placed.is_some()
                && !self.in_a_batch(slot, &id)
            {
                self.slots.remove(&id);
            }
        }
        self.touched = touched;
    }

    /// Brings an instance that is not in memory into memory if it is active.
    /// Returns its record when it is not active (ended or parked), `None` if unknown.
    ///
    /// A record of another flow version is reported as parked and not loaded: start-up
    /// recovery persists the parking, and the instance never runs on the wrong code.
    ///
    /// Takes the read [`Runner::fetch`] made for it, if any; otherwise reads it here,
    /// bounded by the store timeout.
    pub(super) async fn fault_in(&mut self, id: &Arc<str>) -> Result<Option<Record>> {
        let read = match self.reads.remove(id) {
            Some(read) => read,
            None => {
                read::<F>(
                    self.store.clone(),
                    self.placement.clone(),
                    self.key(id),
                    self.limits.decode_limit,
                    self.limits.store_timeout,
                )
                .await
            }
        };
        let Some((stored, record, placed)) = read? else {
            return Ok(None);
        };
        if !record.status.is_active() {
            return Ok(Some(record));
        }
        let (inst, park) = match self.rebuild(id, record.clone(), stored.version) {
            Ok(rebuilt) => rebuilt,
            Err(e) => {
                let park = self.unreadable(id, &record, stored.version, e)?;
                return Ok(Some(park.draft.record.flat()));
            }
        };
        if let Some(park) = park {
            return Ok(Some(park.draft.record.flat()));
        }
        self.install(id, inst, placed);
        Ok(Some(record))
    }

    /// Brings an instance into memory whatever its status (for an operator); it leaves
    /// memory again after the round unless it then has a call in flight.
    pub(super) async fn load_any(&mut self, id: &Arc<str>, op: &'static str) -> Result<()> {
        let key = self.key(id);
        let Some(stored) = bounded(self.limits.store_timeout, self.store.load(&key)).await? else {
            return Err(Self::not_found(id));
        };
        let (record, placed) = bounded(self.limits.store_timeout, self.open(id, &stored)).await?;
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
        self.slots
            .insert(id.clone(), Slot::new(inst, Some(Persisted::of(placed))));
        self.touched.push(id.clone());
        Ok(())
    }

    /// Finds an instance for a request: `Ok(None)` when it is (now) in memory, its record
    /// when it ended or is parked, [`Error::NotFound`] when no such instance exists.
    pub(super) async fn locate(&mut self, id: &Arc<str>) -> Result<Option<Record>> {
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
    pub(super) async fn fault_in_for(&mut self, o: OutcomeMsg) -> Option<OutcomeMsg> {
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
            Ok(Some(record))
                if matches!(record.status, flowwire_storage::Status::Cancelled { .. })
                    && record
                        .cancel
                        .as_ref()
                        .is_some_and(|c| c.abandoned == Some(o.seq)) =>
            {
                // The late outcome of a call abandoned by the cancellation: recorded in the
                // ended instance's history (not applied), so it is loaded for that step.
                match self.load_any(&o.id, "record a late outcome").await {
                    Ok(()) => Some(o),
                    Err(e) => {
                        tracing::warn!(flow = F::NAME, id = %o.id, error = %e, "late outcome of a cancelled instance not recorded");
                        self.settle(&o);
                        None
                    }
                }
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

    /// Handles [`Input::Verify`]: the first step of an instance whose unanswered commit
    /// did land (the redelivery of the call it put in flight), if any.
    pub(super) async fn verify(&mut self, id: Arc<str>, attempt: u32) -> Option<Staged<F>> {
        let stored = match bounded(self.limits.store_timeout, self.store.load(&self.key(&id))).await
        {
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
}

/// Deletes blobs no record refers to any more, off the runner's path (nothing to do, and
/// no task, when `trash` is empty: most steps).
pub(super) fn collect(placement: &Arc<Placement>, trash: &[BlobRef]) {
    if trash.is_empty() {
        return;
    }
    let placement = placement.clone();
    let trash = trash.to_vec();
    tokio::spawn(async move {
        for (blob, e) in placement.delete_all(&trash).await {
            // Left for an operator: the record that dropped it is committed, so the
            // blob is garbage, never data.
            tracing::warn!(tier = %blob.tier, key = %blob.key, error = %e, "unreferenced blob not deleted");
        }
    });
}
