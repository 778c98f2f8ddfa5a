//! History and time travel: page through an instance's steps and read its state at any
//! step the history keeps. Reads go to the store (and the tiers, for a state snapshot);
//! they never touch the flow's runner.

use std::sync::Arc;

use flowwire_storage::{HistoryEntry, InstanceKey, StepInput, StepOutput, StoreError};
use serde::Serialize;

use super::Engine;
use crate::error::{Error, Result};
use crate::flow::Flow;

/// The most steps one [`Engine::history`] call returns.
pub const MAX_PAGE: usize = 1_000;

/// One recorded step of an instance.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[non_exhaustive]
pub struct HistoryStep {
    /// The step's number (1 is the start).
    pub seq: u64,
    /// When it was taken, in milliseconds since the Unix epoch (0 for steps written before
    /// flowwire recorded step times).
    pub at_ms: u64,
    /// What came in: the start, an impulse, a driver outcome, a timer, an operator's action.
    pub input: StepInput,
    /// What went out: a call, a sleep, a wait, the end.
    pub output: StepOutput,
    /// The record version the step wrote.
    pub version: u64,
    /// Whether the history holds the state after this step ([`Engine::state_at`] can read it).
    pub has_state: bool,
}

/// A page of an instance's history.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[non_exhaustive]
pub struct HistoryPage {
    /// The steps, in order.
    pub steps: Vec<HistoryStep>,
    /// Where the next page starts, if there may be more steps.
    pub next: Option<u64>,
}

impl Engine {
    /// The store, for reads outside the runners (released at shutdown).
    pub(super) fn store_for_reads(&self) -> Result<Arc<dyn flowwire_storage::InstanceStore>> {
        self.inner
            .store
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .clone()
            .ok_or(Error::Shutdown)
    }

    /// A store read bounded by the store timeout.
    pub(super) async fn timed<T>(
        &self,
        fut: impl std::future::Future<Output = std::result::Result<T, StoreError>>,
    ) -> Result<T> {
        let limit = self.inner.limits.store_timeout;
        match tokio::time::timeout(limit, fut).await {
            Ok(r) => r.map_err(Error::from),
            Err(_) => Err(Error::Store(StoreError::Timeout(limit))),
        }
    }

    /// Up to `limit` (at most [`MAX_PAGE`]) steps of an instance's history, from step
    /// `from`; follow [`HistoryPage::next`] for the rest. How much history is kept is the
    /// engine's retention (`EngineBuilder::history`). [`Error::NotFound`] if no instance has
    /// this id.
    ///
    /// ```
    /// # async fn demo<F: flowwire::Flow>(engine: flowwire::Engine) -> flowwire::Result<()> {
    /// let mut from = Some(0);
    /// while let Some(start) = from {
    ///     let page = engine.history::<F>("order-1", start, 100).await?;
    ///     for step in &page.steps {
    ///         println!("{} {:?} -> {:?}", step.seq, step.input, step.output);
    ///     }
    ///     from = page.next;
    /// }
    /// # Ok(()) }
    /// ```
    pub async fn history<F: Flow>(
        &self,
        id: impl Into<Arc<str>>,
        from: u64,
        limit: usize,
    ) -> Result<HistoryPage> {
        self.sender::<F>()?;
        let store = self.store_for_reads()?;
        let key = InstanceKey::new(flowwire_storage::FlowName::from_static(F::NAME), id.into());
        if self.timed(store.load(&key)).await?.is_none() {
            return Err(Error::NotFound {
                flow: F::NAME,
                id: key.id.to_string(),
            });
        }
        let limit = limit.clamp(1, MAX_PAGE);
        let rows = self.timed(store.history(&key, from, limit)).await?;
        let full = rows.len() >= limit;
        let mut steps = Vec::with_capacity(rows.len());
        for (_, bytes) in rows {
            let e = self.decode_entry(F::NAME, &key, &bytes)?;
            steps.push(HistoryStep {
                seq: e.seq,
                at_ms: e.at_ms,
                input: e.input,
                output: e.output,
                version: e.version,
                has_state: e.state.is_some(),
            });
        }
        let next = if full {
            steps.last().map(|s| s.seq + 1)
        } else {
            None
        };
        Ok(HistoryPage { steps, next })
    }

    /// The instance's state right after step `step`, read from its history.
    ///
    /// [`Error::NotInHistory`] when the history does not hold that step (it never
    /// happened, or retention dropped it), naming the steps it holds.
    ///
    /// ```
    /// # async fn demo<F: flowwire::Flow>(engine: flowwire::Engine) -> flowwire::Result<()> {
    /// let before = engine.state_at::<F>("order-1", 2).await?;
    /// # let _ = before; Ok(()) }
    /// ```
    pub async fn state_at<F: Flow>(&self, id: impl Into<Arc<str>>, step: u64) -> Result<F::State> {
        self.sender::<F>()?;
        let key = InstanceKey::new(flowwire_storage::FlowName::from_static(F::NAME), id.into());
        let bytes = self.state_bytes_at(F::NAME, &key, step).await?;
        flowwire_storage::codec::decode_raw(&bytes, self.inner.limits.decode_limit).map_err(
            |source| Error::Codec {
                flow: F::NAME,
                id: key.id.to_string(),
                what: "the state in history",
                source,
            },
        )
    }

    /// The encoded state recorded at a step of an instance's history.
    pub(super) async fn state_bytes_at(
        &self,
        flow: &'static str,
        key: &InstanceKey,
        step: u64,
    ) -> Result<bytes::Bytes> {
        let store = self.store_for_reads()?;
        let Some(stored) = self.timed(store.load(key)).await? else {
            return Err(Error::NotFound {
                flow,
                id: key.id.to_string(),
            });
        };
        let rows = self.timed(store.history(key, step, 1)).await?;
        let entry = match rows.first() {
            Some((seq, bytes)) if *seq == step => Some(self.decode_entry(flow, key, bytes)?),
            _ => None,
        };
        let Some(payload) = entry.and_then(|e| e.state) else {
            let first = self.timed(store.history(key, 0, 1)).await?;
            let last = flowwire_storage::record::PlacedRecord::decode(
                &stored.bytes,
                key,
                self.inner.limits.decode_limit,
            )
            .map_or(0, |r| r.record.seq);
            let kept = match first.first() {
                Some((first, _)) => format!("steps {first} to {last}"),
                None => "no steps (history is off)".to_string(),
            };
            return Err(Error::NotInHistory {
                flow,
                id: key.id.to_string(),
                step,
                kept,
            });
        };
        let limit = self.inner.limits.store_timeout;
        let fetch = self.inner.placement.fetch(key, &payload);
        match tokio::time::timeout(limit, fetch).await {
            Ok(r) => Ok(r?),
            Err(_) => Err(Error::Store(StoreError::Timeout(limit))),
        }
    }

    fn decode_entry(
        &self,
        flow: &'static str,
        key: &InstanceKey,
        bytes: &[u8],
    ) -> Result<HistoryEntry> {
        HistoryEntry::decode(bytes, key, self.inner.limits.decode_limit).map_err(|source| {
            Error::Codec {
                flow,
                id: key.id.to_string(),
                what: "a history entry",
                source,
            }
        })
    }
}
