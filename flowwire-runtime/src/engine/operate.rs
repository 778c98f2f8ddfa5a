//! The operator's API: list parked instances and why they are parked, patch a parked
//! instance's state, rewind it to a step of its history, and resume it.
//!
//! An instance is parked (quarantined) when running it further needs a human: its wire or
//! a continuation panicked, a call in flight at a crash belongs to a driver whose policy is
//! `ambiguous = "park"`, a compensation kept failing, or another flow version wrote it.
//! Operations go through the flow's runner like any step: each is one durable step, in
//! the instance's history, and announced on the event stream.

use std::sync::Arc;

use flowwire_storage::record::PlacedRecord;
use flowwire_storage::{InstanceKey, Status};
use serde::Serialize;
use tokio::sync::oneshot;

use super::Engine;
use super::history::MAX_PAGE;
use super::msg::Msg;
use crate::core::{Operation, call_name};
use crate::error::{Error, Result};
use crate::flow::Flow;

/// A parked instance, as an operator sees it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[non_exhaustive]
pub struct Parked {
    /// The instance id.
    pub id: String,
    /// Why it is parked, and what to do.
    pub reason: String,
    /// Its last step.
    pub step: u64,
    /// The flow version that wrote it.
    pub flow_version: u32,
    /// The call in flight (`Driver.method`), sent again when it is resumed.
    pub call: Option<String>,
    /// The fan-out branches in flight (`Driver.method #branch`), sent again when it is
    /// resumed.
    pub branches: Vec<String>,
    /// Why the flow was failing, when it was parked while running its compensations.
    pub failing: Option<String>,
}

impl Parked {
    /// A damaged instance as an operator sees it: why, and what to do.
    pub(super) fn damaged(id: &str, why: &str) -> Parked {
        Parked {
            id: id.to_string(),
            reason: format!(
                "damaged: {why}; give it a new state with `Engine::replace_state` (it is then parked for you to resume), or remove it with `Engine::delete`"
            ),
            step: 0,
            flow_version: 0,
            call: None,
            branches: Vec::new(),
            failing: None,
        }
    }
}

impl Engine {
    /// Parked instances of flow `F`, in id order, after `after`, at most `limit` (at most
    /// [`MAX_PAGE`]); pass the last id of a page as `after` for the next one.
    ///
    /// ```
    /// # async fn demo<F: flowwire::Flow>(engine: flowwire::Engine) -> flowwire::Result<()> {
    /// for p in engine.parked::<F>(None, 100).await? {
    ///     println!("{} at step {}: {}", p.id, p.step, p.reason);
    /// }
    /// # Ok(()) }
    /// ```
    pub async fn parked<F: Flow>(&self, after: Option<&str>, limit: usize) -> Result<Vec<Parked>> {
        self.sender::<F>()?;
        let store = self.store_for_reads()?;
        let ids = self
            .timed(store.parked(F::NAME, after, limit.clamp(1, MAX_PAGE)))
            .await?;
        let mut out = Vec::with_capacity(ids.len());
        for id in ids {
            match self.parked_one::<F>(&id).await {
                Ok(Some(p)) => out.push(p),
                Ok(None) => {}
                // A parked record that no longer reads is listed as damaged.
                Err(e) if !e.is_transient() => {
                    out.push(Parked::damaged(&id, &e.to_string()));
                }
                Err(e) => return Err(e),
            }
        }
        // Damaged instances too, in the same id order: a record that cannot be read says
        // nothing of itself, so the reason is the store's mark.
        let limit = limit.clamp(1, MAX_PAGE);
        for d in self.damaged_parked::<F>(after, limit).await? {
            if let Some(p) = out.iter_mut().find(|p| p.id == d.id) {
                *p = d;
            } else {
                out.push(d);
            }
        }
        out.sort_by(|a, b| a.id.cmp(&b.id));
        out.truncate(limit);
        Ok(out)
    }

    /// Why one instance is parked: `Ok(None)` when it is not parked, [`Error::NotFound`] when
    /// no instance has this id.
    ///
    /// ```
    /// # async fn demo<F: flowwire::Flow>(engine: flowwire::Engine) -> flowwire::Result<()> {
    /// if let Some(p) = engine.parked_instance::<F>("order-7").await? {
    ///     eprintln!("order-7 is parked: {}", p.reason);
    /// }
    /// # Ok(()) }
    /// ```
    pub async fn parked_instance<F: Flow>(
        &self,
        id: impl Into<Arc<str>>,
    ) -> Result<Option<Parked>> {
        self.sender::<F>()?;
        let id = id.into();
        match self.parked_one::<F>(&id).await? {
            Some(p) => Ok(Some(p)),
            None if self.exists::<F>(&id).await? => Ok(None),
            None => Err(Error::NotFound {
                flow: F::NAME,
                id: id.to_string(),
            }),
        }
    }

    async fn exists<F: Flow>(&self, id: &Arc<str>) -> Result<bool> {
        let store = self.store_for_reads()?;
        let key = InstanceKey::new(flowwire_storage::FlowName::from_static(F::NAME), id.clone());
        Ok(self.timed(store.load(&key)).await?.is_some())
    }

    async fn parked_one<F: Flow>(&self, id: &Arc<str>) -> Result<Option<Parked>> {
        let store = self.store_for_reads()?;
        let key = InstanceKey::new(flowwire_storage::FlowName::from_static(F::NAME), id.clone());
        let Some(stored) = self.timed(store.load(&key)).await? else {
            return Ok(None);
        };
        let placed = PlacedRecord::decode(&stored.bytes, &key, self.inner.limits.decode_limit)
            .map_err(|source| Error::Codec {
                flow: F::NAME,
                id: id.to_string(),
                what: "the record",
                source,
            })?;
        let placed = placed.record;
        let Status::Quarantined { reason } = placed.status else {
            return Ok(None);
        };
        Ok(Some(Parked {
            id: id.to_string(),
            reason,
            step: placed.seq,
            flow_version: placed.flow_version,
            call: placed
                .pending
                .as_ref()
                .map(|c| call_name::<F>(c.link, c.method)),
            branches: placed.fan.as_ref().map_or_else(Vec::new, |fan| {
                fan.in_flight()
                    .map(|(i, b)| format!("{} #{i}", call_name::<F>(b.link, b.method)))
                    .collect()
            }),
            failing: placed.failing,
        }))
    }

    /// Resumes a parked instance: its call in flight (or, for a failing flow, the
    /// compensation in flight) is sent again — with the same idempotency key, counted as
    /// redelivered; without one, the wire runs on the current state. Returns the step it
    /// wrote. A parked instance of another flow version runs on this engine's code from
    /// then on, if its state decodes.
    ///
    /// [`Error::NotParked`] when the instance is not parked.
    ///
    /// ```
    /// # async fn demo<F: flowwire::Flow>(engine: flowwire::Engine) -> flowwire::Result<()> {
    /// engine.resume::<F>("order-7").await?;
    /// # Ok(()) }
    /// ```
    pub async fn resume<F: Flow>(&self, id: impl Into<Arc<str>>) -> Result<u64> {
        self.operate::<F>(id.into(), Operation::Resume).await
    }

    /// Changes a parked instance's state with `patch`; the instance stays parked (check it
    /// with a probe or [`crate::Handle::state`], then [`Engine::resume`] it). Returns the
    /// step it wrote.
    ///
    /// A patch that panics writes nothing: [`Error::PatchPanicked`].
    ///
    /// ```
    /// # #[derive(serde::Serialize, serde::Deserialize)] struct S { retries: u32 }
    /// # async fn demo<F: flowwire::Flow<State = S>>(engine: flowwire::Engine) -> flowwire::Result<()> {
    /// engine.patch::<F>("order-7", |s| s.retries = 0).await?;
    /// engine.resume::<F>("order-7").await?;
    /// # Ok(()) }
    /// ```
    pub async fn patch<F: Flow>(
        &self,
        id: impl Into<Arc<str>>,
        patch: impl FnOnce(&mut F::State) + Send + 'static,
    ) -> Result<u64> {
        self.operate::<F>(id.into(), Operation::Patch(Box::new(patch)))
            .await
    }

    /// Puts back the state a parked or failed instance had right after `step` of its
    /// history; the instance is then parked, with no call in flight, until it is resumed
    /// (the wire then runs from that state). Returns the step it wrote. Compensations
    /// registered before the rewind stay registered: the calls they undo did happen.
    ///
    /// [`Error::NotInHistory`] when the history does not hold that step.
    ///
    /// ```
    /// # async fn demo<F: flowwire::Flow>(engine: flowwire::Engine) -> flowwire::Result<()> {
    /// engine.rewind::<F>("order-7", 3).await?;
    /// engine.resume::<F>("order-7").await?;
    /// # Ok(()) }
    /// ```
    pub async fn rewind<F: Flow>(&self, id: impl Into<Arc<str>>, step: u64) -> Result<u64> {
        self.sender::<F>()?;
        let id = id.into();
        let key = InstanceKey::new(flowwire_storage::FlowName::from_static(F::NAME), id.clone());
        let state = self.state_bytes_at(F::NAME, &key, step).await?;
        self.operate::<F>(id, Operation::Rewind { to: step, state })
            .await
    }

    async fn operate<F: Flow>(&self, id: Arc<str>, op: Operation<F>) -> Result<u64> {
        let name = op.name();
        let sender = self.sender::<F>()?;
        let (tx, rx) = oneshot::channel();
        let limit = self.inner.limits.request_timeout;
        let fut = async {
            sender
                .send(Msg::Operate { id, op, reply: tx })
                .await
                .map_err(|_| Error::Shutdown)?;
            rx.await.map_err(|_| Error::Shutdown)?
        };
        tokio::time::timeout(limit, fut)
            .await
            .map_err(|_| Error::Timeout {
                op: name,
                after: limit,
            })?
    }
}
