//! Requests that begin or end an instance besides a start and the wire's own end:
//! start-or-impulse (the start, with an impulse, of an instance that does not exist yet)
//! and cancellation.

use std::sync::Arc;

use flowwire_storage::Status;
use tokio::sync::oneshot;

use crate::core::{CANCEL_ID, Instance, Rejected};
use crate::engine::msg::Via;
use crate::error::{Error, Result};
use crate::flow::Flow;

use super::resident::bounded;
use super::{Ack, Runner, Slot, Staged};

impl<F: Flow> Runner<F> {
    /// A start-or-impulse: the impulse applied to the live instance; or, when no instance
    /// has the id, the start with the impulse applied, in one step.
    pub(super) async fn on_start_or_impulse(
        &mut self,
        id: Arc<str>,
        state: F::State,
        impulse_id: Arc<str>,
        impulse: F::Impulse,
        reply: oneshot::Sender<Result<()>>,
        via: Via,
    ) -> Option<Staged<F>> {
        if !self.slots.contains_key(&id) {
            match self.locate(&id).await {
                Err(Error::NotFound { .. }) => {
                    let key = self.key(&id);
                    let (inst, step) = Instance::start_with(
                        key,
                        state,
                        impulse_id.clone(),
                        impulse,
                        self.limits.decode_limit,
                        self.now_ms,
                        &mut self.scratch,
                    );
                    self.slots.insert(id.clone(), Slot::new(inst, None));
                    return Some(Staged {
                        step,
                        ack: Ack::Impulse(reply, impulse_id),
                        via,
                    });
                }
                // Live and now in memory, or ended (the impulse path refuses it, or says
                // it was applied).
                Ok(_) => {}
                Err(e) => {
                    let _ = reply.send(Err(e));
                    return None;
                }
            }
        }
        self.on_impulse(id, impulse_id, impulse, reply, via).await
    }

    /// A cancellation: applied once (under the reserved impulse id), `Ok` when it was
    /// applied before; refused when the instance ended otherwise or is parked.
    pub(super) async fn on_cancel(
        &mut self,
        id: Arc<str>,
        reason: String,
        reply: oneshot::Sender<Result<()>>,
        via: Via,
    ) -> Option<Staged<F>> {
        let cancel_id: Arc<str> = Arc::from(CANCEL_ID);
        if !self.slots.contains_key(&id) {
            let key = self.key(&id);
            match bounded(
                self.limits.store_timeout,
                self.store.impulse_applied(&key, &cancel_id),
            )
            .await
            {
                Ok(Some(_)) => {
                    let _ = reply.send(Ok(()));
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
                let answer = match record.status {
                    Status::Cancelled { .. } => Ok(()),
                    status => Err(Self::not_live(&id, status)),
                };
                let _ = reply.send(answer);
                return None;
            }
            Err(e) => {
                let _ = reply.send(Err(e));
                return None;
            }
        }
        let slot = self.slots.get_mut(&id)?;
        let refusal = match slot.inst.cancel(reason, self.now_ms, &mut self.scratch) {
            Ok(step) => {
                return Some(Staged {
                    step,
                    ack: Ack::Impulse(reply, cancel_id),
                    via,
                });
            }
            Err(Rejected::Ended("cancelled")) => {
                let _ = reply.send(Ok(()));
                return None;
            }
            Err(Rejected::Ended(status)) => Error::Ended {
                flow: F::NAME,
                id: id.to_string(),
                status,
            },
            Err(Rejected::Quarantined(reason)) => Self::quarantined(&id, reason),
        };
        let _ = reply.send(Err(refusal));
        None
    }
}
