//! What an operator can do with a damaged instance — one whose record or payloads cannot
//! be read (a checksum that fails, a blob missing from its tier): it is listed by
//! [`Engine::parked`] with what is wrong; [`Engine::replace_state`] gives it a new state
//! (parked, for the operator to check and resume) and [`Engine::delete`] removes it.
//!
//! The runner marks an instance damaged in the store the first time it cannot read it for
//! a reason retrying cannot cure; the record stays as it was, for inspection, until one of
//! these operations.

use std::sync::Arc;

use flowwire_storage::record::StepOutput;
use flowwire_storage::{Expect, InstanceKey, Retention, Status, StepInput, StepResult};

use super::Engine;
use super::operate::Parked;
use crate::core::{Instance, Scratch};
use crate::error::{Error, Result};
use crate::flow::Flow;

/// The reason a replaced instance is parked with.
const REPLACED: &str = "its state was replaced by an operator; check it and resume it";

impl Engine {
    /// The damaged instances of `F` after `after`, at most `limit`, as parked ones.
    pub(super) async fn damaged_parked<F: Flow>(
        &self,
        after: Option<&str>,
        limit: usize,
    ) -> Result<Vec<Parked>> {
        let store = self.store_for_reads()?;
        let marks = self.timed(store.damaged(F::NAME, after, limit)).await?;
        Ok(marks
            .into_iter()
            .map(|(id, why)| Parked::damaged(&id, &why))
            .collect())
    }

    /// Whether `id` is marked damaged (the marks are few: an operator clears them).
    async fn is_damaged<F: Flow>(&self, id: &str) -> Result<bool> {
        let store = self.store_for_reads()?;
        let marks = self.timed(store.damaged(F::NAME, None, usize::MAX)).await?;
        Ok(marks.iter().any(|(m, _)| &**m == id))
    }

    /// Deletes a damaged, parked or ended instance for good: its record, history, applied
    /// impulse ids and index entries (its blobs stay on their tiers). A live instance is
    /// refused ([`Error::NotParked`]); an unknown id is [`Error::NotFound`].
    ///
    /// ```
    /// # async fn demo<F: flowwire::Flow>(engine: flowwire::Engine) -> flowwire::Result<()> {
    /// for p in engine.parked::<F>(None, 100).await? {
    ///     if p.reason.starts_with("damaged") {
    ///         engine.delete::<F>(p.id.as_str()).await?;
    ///     }
    /// }
    /// # Ok(()) }
    /// ```
    pub async fn delete<F: Flow>(&self, id: impl Into<Arc<str>>) -> Result<()> {
        self.sender::<F>()?;
        let id: Arc<str> = id.into();
        let store = self.store_for_reads()?;
        let key = InstanceKey::new(flowwire_storage::FlowName::from_static(F::NAME), id.clone());
        if !self.is_damaged::<F>(&id).await? {
            let Some(stored) = self.timed(store.load(&key)).await? else {
                return Err(Error::NotFound {
                    flow: F::NAME,
                    id: id.to_string(),
                });
            };
            let placed = flowwire_storage::record::PlacedRecord::decode(
                &stored.bytes,
                &key,
                self.inner.limits.decode_limit,
            )
            .map_err(|source| Error::Codec {
                flow: F::NAME,
                id: id.to_string(),
                what: "the record",
                source,
            })?;
            let status = &placed.record.status;
            if status.is_active() && !matches!(status, Status::Quarantined { .. }) {
                return Err(Error::NotParked {
                    flow: F::NAME,
                    id: id.to_string(),
                    op: "delete",
                    status: status.name(),
                });
            }
        }
        self.timed(store.delete(&key)).await?;
        tracing::warn!(flow = F::NAME, id = %id, "instance deleted by an operator");
        Ok(())
    }

    /// Gives a damaged instance a new state: a new record (a step in its history) holding
    /// `state`, parked for the operator to check and [`resume`](Engine::resume); the
    /// damaged mark is cleared. An instance that is not marked damaged is refused
    /// ([`Error::NotParked`]; a readable parked one is changed with
    /// [`patch`](Engine::patch)).
    ///
    /// ```
    /// # async fn demo<F: flowwire::Flow>(engine: flowwire::Engine, state: F::State) -> flowwire::Result<()> {
    /// engine.replace_state::<F>("order-7", state).await?;
    /// engine.resume::<F>("order-7").await?;
    /// # Ok(()) }
    /// ```
    pub async fn replace_state<F: Flow>(
        &self,
        id: impl Into<Arc<str>>,
        state: F::State,
    ) -> Result<u64> {
        self.sender::<F>()?;
        let id: Arc<str> = id.into();
        if !self.is_damaged::<F>(&id).await? {
            return Err(Error::NotParked {
                flow: F::NAME,
                id: id.to_string(),
                op: "replace the state of",
                status: "not damaged",
            });
        }
        let store = self.store_for_reads()?;
        let key = InstanceKey::new(flowwire_storage::FlowName::from_static(F::NAME), id.clone());
        let version = self
            .timed(store.load(&key))
            .await?
            .map_or(0, |stored| stored.version);
        let mut scratch = Scratch::default();
        let (_, step) = Instance::<F>::start(
            key.clone(),
            state,
            self.inner.limits.decode_limit,
            self.inner.limits.clock.now_ms(),
            &mut scratch,
        );
        // The new record: the state given, parked, after every step the history holds.
        let mut draft = step.draft;
        let reason = REPLACED.to_string();
        draft.expect = if version == 0 {
            Expect::Absent
        } else {
            Expect::Version(version)
        };
        draft.version = version + 1;
        draft.record.seq = version + 1;
        draft.record.status = Status::Quarantined {
            reason: reason.clone(),
        };
        draft.record.pending = None;
        draft.record.timer = None;
        draft.record.fan = None;
        draft.record.compensations = Vec::new();
        draft.record.failing = None;
        draft.record.error = None;
        draft.input = StepInput::Patch;
        draft.output = StepOutput::Quarantine { reason };
        let sealed = self
            .inner
            .placement
            .seal(
                &draft,
                None,
                None,
                Retention::All,
                &mut scratch.out,
                &mut scratch.arena,
            )
            .map_err(Error::from)?;
        let limit = self.inner.limits.store_timeout;
        tokio::time::timeout(limit, self.inner.placement.put_all(&key, &sealed.puts))
            .await
            .map_err(|_| Error::Store(flowwire_storage::StoreError::Timeout(limit)))??;
        match self.timed(store.commit(vec![sealed.write])).await?.first() {
            Some(StepResult::Committed) => {}
            _ => {
                return Err(Error::Conflict {
                    flow: F::NAME,
                    id: id.to_string(),
                });
            }
        }
        self.timed(store.mark_damaged(&key, None)).await?;
        tracing::warn!(flow = F::NAME, id = %id, "damaged instance given a new state by an operator");
        Ok(version + 1)
    }
}
