//! Reads of instances that have ended (or are parked), straight from the store, by the
//! caller's task: no message to the runner, which holds only live instances and would
//! otherwise read them one request at a time. A handle reads here once it knows its
//! instance ended (its `finished()` said so, or `Engine::handle` found it so); a record
//! that turns out to be live again (a parked instance resumed) is the runner's to answer.

use std::sync::{Arc, Weak};
use std::time::Duration;

use bytes::Bytes;
use flowwire_storage::record::PlacedRecord;
use flowwire_storage::{InstanceKey, InstanceStore, Placement, Record};

use crate::error::{Error, Result};
use crate::flow::Flow;
use crate::handle::{BoxFut, SettledReads};

/// The embedded engine's [`SettledReads`] for flow `F`.
pub(crate) struct Reader<F> {
    /// Weak: a handle kept after `Engine::shutdown` must not keep the store (and its
    /// file lock) alive.
    store: Weak<dyn InstanceStore>,
    placement: Arc<Placement>,
    timeout: Duration,
    limit: usize,
    _flow: std::marker::PhantomData<fn() -> F>,
}

impl<F> Reader<F> {
    pub(crate) fn new(
        store: &Arc<dyn InstanceStore>,
        placement: Arc<Placement>,
        timeout: Duration,
        limit: usize,
    ) -> Self {
        Self {
            store: Arc::downgrade(store),
            placement,
            timeout,
            limit,
            _flow: std::marker::PhantomData,
        }
    }
}

impl<F: Flow> SettledReads<F> for Reader<F> {
    fn settled(&self, id: Arc<str>) -> BoxFut<Option<Record>> {
        let store = self.store.upgrade();
        let placement = self.placement.clone();
        let (timeout, limit) = (self.timeout, self.limit);
        Box::pin(async move {
            let store = store?;
            let key = InstanceKey::new(flowwire_storage::FlowName::from_static(F::NAME), id);
            let stored = tokio::time::timeout(timeout, store.load(&key))
                .await
                .ok()?
                .ok()??;
            drop(store);
            let placed = PlacedRecord::decode(&stored.bytes, &key, limit).ok()?;
            if placed.record.status.is_active() {
                return None;
            }
            tokio::time::timeout(timeout, placement.resolve(&key, &placed))
                .await
                .ok()?
                .ok()
        })
    }

    fn state(&self, id: &str, record: &Record) -> Result<Bytes> {
        crate::core::state_for_read::<F>(record, self.limit)
            .map_err(|e| super::state_read_error::<F>(id, e))
    }

    fn flow(&self, id: &str, state: &flowwire_storage::Rope) -> Result<F> {
        let state =
            flowwire_storage::rope::read::decode_rope(state, self.limit).map_err(|source| {
                Error::Codec {
                    flow: F::NAME,
                    id: id.to_string(),
                    what: "the state",
                    source,
                }
            })?;
        Ok(F::from_state(state))
    }
}
