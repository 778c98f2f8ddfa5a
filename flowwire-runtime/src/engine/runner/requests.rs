//! What the runner does with each input: one arm per request kind (start, impulse,
//! outcome, probe, state, operator operation, timer, redelivery, reload), each returning
//! the step to stage, if any (an outcome stages its own, where it is made). The errors
//! they answer with are in `refusals`.

use std::sync::Arc;

use flowwire_storage::{Rope, Status};
use tokio::sync::oneshot;

use crate::core::{Instance, Operation, Rejected};
use crate::ended::Ended;
use crate::engine::job::OutcomeMsg;
use crate::engine::msg::{Ask, Msg, Via};
use crate::error::{Error, Result};
use crate::flow::Flow;
use crate::guard::guard;

use super::resident::bounded;
use super::{Ack, Input, Runner, Slot, Staged};

impl<F: Flow> Runner<F> {
    /// Runs a probe on a state decoded from its committed bytes, on the blocking pool (a
    /// large state must not stall the runner).
    pub(super) fn probe_bytes(
        &self,
        id: Arc<str>,
        state: Rope,
        ask: Ask<F>,
        reply: oneshot::Sender<Result<()>>,
    ) {
        let limit = self.limits.decode_limit;
        tokio::task::spawn_blocking(move || {
            let answer = flowwire_storage::rope::read::decode_rope::<F::State>(&state, limit)
                .map_err(|source| Error::Codec {
                    flow: F::NAME,
                    id: id.to_string(),
                    what: "the state",
                    source,
                })
                .and_then(|s| {
                    let flow = F::from_state(s);
                    guard(|| ask(&flow)).map_err(|m| Self::probe_panicked(&id, m))
                });
            let _ = reply.send(answer);
        });
    }

    /// Takes one input: each kind has its function below.
    pub(super) async fn handle(&mut self, input: Input<F>) -> Option<Staged<F>> {
        match input {
            Input::Outcome(o) => {
                // Staged where it is made: a step is several hundred bytes, and each
                // return through an async function moves it once more.
                self.on_outcome(o).await;
                None
            }
            Input::Msg(Msg::Start {
                id,
                state,
                reply,
                via,
            }) => self.on_start(id, state, reply, via),
            Input::Msg(Msg::Impulse {
                id,
                impulse_id,
                impulse,
                reply,
                via,
            }) => self.on_impulse(id, impulse_id, impulse, reply, via).await,
            Input::Msg(Msg::Cancel {
                id,
                reason,
                reply,
                via,
            }) => self.on_cancel(id, reason, reply, via).await,
            Input::Msg(Msg::StartOrImpulse {
                id,
                state,
                impulse_id,
                impulse,
                reply,
                via,
            }) => {
                self.on_start_or_impulse(id, state, impulse_id, impulse, reply, via)
                    .await
            }
            Input::Msg(Msg::Probe { id, ask, reply }) => self.on_probe(id, ask, reply).await,
            Input::Msg(Msg::State { id, reply }) => self.on_state(id, reply).await,
            Input::Msg(Msg::Exists { id, reply }) => self.on_exists(id, reply).await,
            Input::Msg(Msg::Finished { id, reply }) => self.on_finished(id, reply).await,
            Input::Fire { id, due_ms } => self.on_fire(id, due_ms).await,
            Input::Redeliver { id } => self.on_redeliver(id),
            Input::Reload {
                id,
                attempt,
                resend,
            } => self.on_reload(id, attempt, resend).await,
            Input::Verify { id, attempt } => self.verify(id, attempt).await,
            Input::Msg(Msg::Resident { reply }) => self.on_resident(reply),
            Input::Msg(Msg::Operate { id, op, reply }) => self.on_operate(id, op, reply).await,
            Input::Msg(Msg::Shutdown { .. }) => None,
        }
    }

    /// An outcome: applied to its instance (read first if it is not in memory) and its
    /// step staged, or settled when no call of the instance waits for it.
    async fn on_outcome(&mut self, o: OutcomeMsg) {
        let Err(o) = self.apply_outcome(o) else {
            return;
        };
        let Some(o) = self.fault_in_for(o).await else {
            return;
        };
        if let Err(o) = self.apply_outcome(o) {
            self.settle(&o);
        }
    }

    /// Applies an outcome to its resident instance and stages the step it makes (there,
    /// not returned: a step is several hundred bytes, and each return moves it), or
    /// settles it when no call of the instance waits for it. `Err` gives it back when the
    /// instance is not in memory.
    pub(super) fn apply_outcome(
        &mut self,
        mut o: OutcomeMsg,
    ) -> std::result::Result<(), OutcomeMsg> {
        let Some(slot) = self.slots.get_mut(&o.id) else {
            return Err(o);
        };
        let step = Self::outcome_step(slot, &mut o, self.now_ms, &mut self.scratch);
        self.stage_outcome(step, o);
        Ok(())
    }

    /// The step an outcome makes on its instance's slot, if any. (A function of the slot,
    /// not of the runner: the take loop applies an outcome with the slot it looked up.)
    pub(super) fn outcome_step(
        slot: &mut super::Slot<F>,
        o: &mut OutcomeMsg,
        now_ms: u64,
        scratch: &mut crate::core::Scratch,
    ) -> Option<crate::core::Step> {
        match o.retry_ms {
            // A failed attempt the call's policy retries: recorded, and the next one sent
            // when its backoff timer fires.
            Some(delay_ms) => slot.inst.retry(
                o.seq,
                o.branch,
                o.result.as_ref(),
                delay_ms,
                now_ms,
                scratch,
            ),
            // The reply's bytes move into the step (see `Staged::restore_reply`, effects.rs).
            None => slot
                .inst
                .take_outcome(o.seq, o.branch, &mut o.result, now_ms, scratch),
        }
    }

    /// Stages the step an outcome made, or settles the outcome when it made none (no call
    /// of the instance waits for it: applied before, or abandoned).
    pub(super) fn stage_outcome(&mut self, step: Option<crate::core::Step>, o: OutcomeMsg) {
        let Some(step) = step else {
            self.settle(&o);
            self.reuse_reply(o);
            return;
        };
        self.stage(Staged {
            step,
            ack: Ack::Outcome(o),
            via: None,
        });
    }

    /// A start: the instance's first step, unless the id is in memory already.
    fn on_start(
        &mut self,
        id: Arc<str>,
        state: F::State,
        reply: oneshot::Sender<Result<()>>,
        via: Via,
    ) -> Option<Staged<F>> {
        if self.slots.contains_key(&id) {
            let _ = reply.send(Err(Error::AlreadyExists {
                flow: F::NAME,
                id: id.to_string(),
            }));
            return None;
        }
        let key = self.key(&id);
        let (inst, step) = Instance::start(
            key,
            state,
            self.limits.decode_limit,
            self.now_ms,
            &mut self.scratch,
        );
        self.slots.insert(id.clone(), Slot::new(inst, None));
        Some(Staged {
            step,
            ack: Ack::Start(reply),
            via,
        })
    }

    /// An impulse: applied once by its id, or refused with why.
    pub(super) async fn on_impulse(
        &mut self,
        id: Arc<str>,
        impulse_id: Arc<str>,
        impulse: F::Impulse,
        reply: oneshot::Sender<Result<()>>,
        via: Via,
    ) -> Option<Staged<F>> {
        if !self.slots.contains_key(&id) {
            let key = self.key(&id);
            match bounded(
                self.limits.store_timeout,
                self.store.impulse_applied(&key, &impulse_id),
            )
            .await
            {
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
                    let _ = reply.send(Err(e));
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
                .impulse(impulse_id.clone(), impulse, self.now_ms, &mut self.scratch)
            {
                Ok(step) => {
                    return Some(Staged {
                        step,
                        ack: Ack::Impulse(reply, impulse_id),
                        via,
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

    /// A probe: run on the committed flow (in memory, or decoded off the runner).
    async fn on_probe(
        &mut self,
        id: Arc<str>,
        ask: Ask<F>,
        reply: oneshot::Sender<Result<()>>,
    ) -> Option<Staged<F>> {
        match self.locate(&id).await {
            Ok(None) => match self.slots.get(&id) {
                // The flow in memory is the committed one: no step of this round
                // touched it (one message per instance a round) and none is uploading.
                Some(slot) if !slot.phase.uploading() && slot.placed.is_some() => {
                    let flow = slot.inst.flow();
                    let ran = guard(|| ask(flow));
                    let _ = reply.send(ran.map_err(|m| Self::probe_panicked(&id, m)));
                }
                // A start not committed yet has no persisted state.
                Some(slot) if slot.placed.is_none() => {
                    let _ = reply.send(Err(Self::not_found(&id)));
                }
                Some(slot) => {
                    self.probe_bytes(id.clone(), slot.inst.record().state.clone(), ask, reply);
                }
                None => {
                    let _ = reply.send(Err(Self::not_found(&id)));
                }
            },
            Ok(Some(record)) => {
                match crate::core::state_for_read::<F>(&record, self.limits.decode_limit) {
                    Ok(state) => self.probe_bytes(id, state.into(), ask, reply),
                    Err(e) => {
                        let _ = reply.send(Err(crate::engine::state_read_error::<F>(&id, e)));
                    }
                }
            }
            Err(e) => {
                let _ = reply.send(Err(e));
            }
        }
        None
    }

    /// The committed state, encoded.
    async fn on_state(
        &mut self,
        id: Arc<str>,
        reply: oneshot::Sender<Result<Rope>>,
    ) -> Option<Staged<F>> {
        let answer = match self.locate(&id).await {
            // A start whose first step is not committed yet has no persisted state.
            Ok(None) => self
                .slots
                .get(&id)
                .filter(|slot| slot.placed.is_some())
                .map(|slot| slot.inst.record().state.clone())
                .ok_or_else(|| Self::not_found(&id)),
            Ok(Some(record)) => crate::core::state_for_read::<F>(&record, self.limits.decode_limit)
                .map(Rope::from)
                .map_err(|e| crate::engine::state_read_error::<F>(&id, e)),
            Err(e) => Err(e),
        };
        let _ = reply.send(answer);
        None
    }

    /// Whether the instance exists (loading it if it is live).
    async fn on_exists(
        &mut self,
        id: Arc<str>,
        reply: oneshot::Sender<Result<()>>,
    ) -> Option<Staged<F>> {
        let _ = reply.send(self.locate(&id).await.map(|_| ()));
        None
    }

    /// A `finished()` wait: answered now if the instance ended, else kept until it does.
    async fn on_finished(
        &mut self,
        id: Arc<str>,
        reply: oneshot::Sender<crate::engine::msg::EndedReply>,
    ) -> Option<Staged<F>> {
        if let Some(e) = self.store.fault().filter(|e| !e.is_transient()) {
            // Nothing will progress: a waiter would wait for ever.
            let _ = reply.send(Err(Error::Store(e)));
            return None;
        }
        match self.locate(&id).await {
            Ok(None) => {}
            Ok(Some(record)) => {
                let answer = match Ended::of(&record) {
                    Some(ended) => {
                        // Ended before this wait came: its final state goes with the end, as
                        // it does to a waiter.
                        let state = crate::core::final_state::<F>(
                            &id,
                            &ended,
                            &record,
                            self.limits.decode_limit,
                        );
                        Ok((ended, state))
                    }
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

    /// A due timer: fired, or the timer index repaired when the instance moved on.
    async fn on_fire(&mut self, id: Arc<str>, due_ms: u64) -> Option<Staged<F>> {
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
        match slot.inst.fire(due_ms, self.now_ms, &mut self.scratch) {
            Some(step) => Some(Staged {
                ack: Ack::Retry(Input::Fire {
                    id: id.clone(),
                    due_ms,
                }),
                step,
                via: None,
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

    /// The call in flight of a loaded instance, sent again (or the instance parked).
    fn on_redeliver(&mut self, id: Arc<str>) -> Option<Staged<F>> {
        let mut slot = self.slots.remove(&id)?;
        let step = self.redelivery(&mut slot.inst);
        self.slots.insert(id.clone(), slot);
        step.map(|step| Staged {
            ack: Ack::Retry(Input::Redeliver { id: id.clone() }),
            step,
            via: None,
        })
    }

    /// Another try at loading an instance that could not be read.
    async fn on_reload(&mut self, id: Arc<str>, attempt: u32, resend: bool) -> Option<Staged<F>> {
        if self.slots.contains_key(&id) {
            return None;
        }
        let key = self.key(&id);
        let loaded = match bounded(self.limits.store_timeout, self.store.load(&key)).await {
            Ok(Some(stored)) => self.adopt(&id, &stored, resend).await,
            Ok(None) => Ok(None),
            Err(e) => Err(e),
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

    /// How many instances are in memory.
    fn on_resident(&mut self, reply: oneshot::Sender<usize>) -> Option<Staged<F>> {
        let _ = reply.send(self.slots.len());
        None
    }

    /// An operator's operation on a parked (or failed) instance.
    async fn on_operate(
        &mut self,
        id: Arc<str>,
        op: Operation<F>,
        reply: oneshot::Sender<Result<u64>>,
    ) -> Option<Staged<F>> {
        if !self.slots.contains_key(&id)
            && let Err(e) = self.load_any(&id, op.name()).await
        {
            let _ = reply.send(Err(e));
            return None;
        }
        let slot = self.slots.get_mut(&id)?;
        let name = op.name();
        match slot.inst.operate(op, self.now_ms, &mut self.scratch) {
            Ok(step) => Some(Staged {
                step,
                ack: Ack::Operate(reply),
                via: None,
            }),
            Err(refused) => {
                let _ = reply.send(Err(Self::refused(&id, name, refused)));
                None
            }
        }
    }
}

impl<F: Flow> Input<F> {
    /// Whether handling this input loads its instance when it is not in memory (those
    /// reads run off the runner's task: `Runner::fetch`).
    pub(super) fn faults_in(&self) -> bool {
        matches!(
            self,
            Input::Msg(
                Msg::Impulse { .. }
                    | Msg::StartOrImpulse { .. }
                    | Msg::Cancel { .. }
                    | Msg::Probe { .. }
                    | Msg::State { .. }
                    | Msg::Exists { .. }
                    | Msg::Finished { .. }
            ) | Input::Fire { .. }
                | Input::Outcome(_)
        )
    }

    /// The instance an input is about, if any: while that instance is being read, every
    /// input about it waits behind the read (one that loaded it on its own would make it
    /// resident over the read and drop the inputs waiting for it).
    pub(super) fn instance(&self) -> Option<&Arc<str>> {
        match self {
            Input::Msg(Msg::Exists { id, .. } | Msg::Finished { id, .. }) => Some(id),
            other => other.serial_on(),
        }
    }

    /// The instance a message writes to or reads the committed flow of: at most one such
    /// message per instance in a round, after the steps of the rounds before are committed.
    pub(super) fn serial_on(&self) -> Option<&Arc<str>> {
        match self {
            Input::Msg(
                Msg::Start { id, .. }
                | Msg::Impulse { id, .. }
                | Msg::StartOrImpulse { id, .. }
                | Msg::Cancel { id, .. }
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
