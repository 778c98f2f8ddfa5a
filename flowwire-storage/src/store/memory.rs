//! The in-memory store: the reference backend, for tests and for in-memory engines.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::sync::{Arc, Mutex, PoisonError};

use bytes::Bytes;

use super::{BoxFuture, InstanceStore};
use crate::error::StoreError;
use crate::record::{Expect, InstanceKey, StepResult, StepWrite, Stored};

/// An instance store that keeps everything in memory. Nothing survives the process.
///
/// ```
/// use flowwire_storage::{InstanceStore, MemoryStore};
/// let store = MemoryStore::new();
/// # let _: &dyn InstanceStore = &store;
/// ```
#[derive(Debug, Default)]
pub struct MemoryStore {
    inner: Mutex<Inner>,
}

#[derive(Debug, Default)]
struct Inner {
    records: HashMap<InstanceKey, Stored>,
    active: BTreeSet<(Arc<str>, Arc<str>)>,
    parked: BTreeSet<(Arc<str>, Arc<str>)>,
    /// (flow, due, id), and the due of each (flow, id) to find its entry.
    timers: BTreeSet<(Arc<str>, u64, Arc<str>)>,
    timer_of: HashMap<(Arc<str>, Arc<str>), u64>,
    /// (flow, correlation key, id).
    correlated: BTreeSet<(Arc<str>, Arc<str>, Arc<str>)>,
    impulses: HashMap<(InstanceKey, Arc<str>), u64>,
    history: BTreeMap<(InstanceKey, u64), Bytes>,
}

impl Inner {
    fn set_timer(&mut self, ak: &(Arc<str>, Arc<str>), due: Option<u64>) {
        if let Some(old) = self.timer_of.remove(ak) {
            self.timers.remove(&(ak.0.clone(), old, ak.1.clone()));
        }
        if let Some(due) = due {
            self.timer_of.insert(ak.clone(), due);
            self.timers.insert((ak.0.clone(), due, ak.1.clone()));
        }
    }
}

impl MemoryStore {
    /// An empty store.
    pub fn new() -> Self {
        Self::default()
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Inner> {
        // A panic while holding the lock cannot leave a half-applied batch: every batch is
        // checked before any of it is applied.
        self.inner.lock().unwrap_or_else(PoisonError::into_inner)
    }
}

impl InstanceStore for MemoryStore {
    fn commit(&self, batch: Vec<StepWrite>) -> BoxFuture<'_, Result<Vec<StepResult>, StoreError>> {
        let mut inner = self.lock();
        let mut results = Vec::with_capacity(batch.len());
        for step in batch {
            let found = inner.records.get(&step.key).map(|s| s.version);
            let ok = match step.expect {
                Expect::Absent => found.is_none(),
                Expect::Version(v) => found == Some(v),
            };
            if !ok {
                results.push(StepResult::Conflict { found });
                continue;
            }
            if let Some(impulse) = &step.impulse {
                let k = (step.key.clone(), impulse.clone());
                if let Some(seq) = inner.impulses.get(&k) {
                    results.push(StepResult::ImpulseSeen { seq: *seq });
                    continue;
                }
                inner.impulses.insert(k, step.seq);
            }
            let ak = (step.key.flow.clone(), step.key.id.clone());
            if step.active {
                inner.active.insert(ak.clone());
            } else {
                inner.active.remove(&ak);
            }
            if step.parked {
                inner.parked.insert(ak.clone());
            } else {
                inner.parked.remove(&ak);
            }
            inner.set_timer(&ak, step.timer);
            if let Some(old) = step.uncorrelate {
                inner.correlated.remove(&(ak.0.clone(), old, ak.1.clone()));
            }
            if let Some(new) = step.correlation {
                inner.correlated.insert((ak.0.clone(), new, ak.1.clone()));
            }
            if let Some((seq, entry)) = step.history {
                inner.history.insert((step.key.clone(), seq), entry);
            }
            if let Some(below) = step.prune_below {
                let old: Vec<_> = inner
                    .history
                    .range((step.key.clone(), 0)..(step.key.clone(), below))
                    .map(|(k, _)| k.clone())
                    .collect();
                for k in old {
                    inner.history.remove(&k);
                }
            }
            inner.records.insert(
                step.key,
                Stored {
                    version: step.version,
                    bytes: step.record,
                },
            );
            results.push(StepResult::Committed);
        }
        Box::pin(std::future::ready(Ok(results)))
    }

    fn load<'a>(
        &'a self,
        key: &'a InstanceKey,
    ) -> BoxFuture<'a, Result<Option<Stored>, StoreError>> {
        let found = self.lock().records.get(key).cloned();
        Box::pin(std::future::ready(Ok(found)))
    }

    fn active<'a>(&'a self, flow: &'a str) -> BoxFuture<'a, Result<super::ActiveList, StoreError>> {
        let inner = self.lock();
        let out = inner
            .active
            .iter()
            .filter(|(f, _)| &**f == flow)
            .filter_map(|(f, id)| {
                let key = InstanceKey::new(f.clone(), id.clone());
                inner.records.get(&key).map(|s| (id.clone(), s.clone()))
            })
            .collect();
        Box::pin(std::future::ready(Ok(out)))
    }

    fn history<'a>(
        &'a self,
        key: &'a InstanceKey,
        from: u64,
        limit: usize,
    ) -> BoxFuture<'a, Result<Vec<(u64, Bytes)>, StoreError>> {
        let inner = self.lock();
        let out = inner
            .history
            .range((key.clone(), from)..=(key.clone(), u64::MAX))
            .take(limit)
            .map(|((_, seq), b)| (*seq, b.clone()))
            .collect();
        Box::pin(std::future::ready(Ok(out)))
    }

    fn impulse_applied<'a>(
        &'a self,
        key: &'a InstanceKey,
        impulse_id: &'a str,
    ) -> BoxFuture<'a, Result<Option<u64>, StoreError>> {
        let found = self
            .lock()
            .impulses
            .get(&(key.clone(), Arc::from(impulse_id)))
            .copied();
        Box::pin(std::future::ready(Ok(found)))
    }

    fn due<'a>(
        &'a self,
        flow: &'a str,
        until_ms: u64,
        limit: usize,
    ) -> BoxFuture<'a, Result<super::DueList, StoreError>> {
        let inner = self.lock();
        let f: Arc<str> = flow.into();
        let out = inner
            .timers
            .range((f.clone(), 0, Arc::from(""))..)
            .take_while(|(fl, due, _)| *fl == f && *due <= until_ms)
            .take(limit)
            .map(|(_, due, id)| (id.clone(), *due))
            .collect();
        Box::pin(std::future::ready(Ok(out)))
    }

    fn retime<'a>(
        &'a self,
        key: &'a InstanceKey,
        stale: u64,
        actual: Option<u64>,
    ) -> BoxFuture<'a, Result<(), StoreError>> {
        let mut inner = self.lock();
        let ak = (key.flow.clone(), key.id.clone());
        if inner.timer_of.get(&ak) == Some(&stale) {
            inner.set_timer(&ak, actual);
        }
        Box::pin(std::future::ready(Ok(())))
    }

    fn parked<'a>(
        &'a self,
        flow: &'a str,
        after: Option<&'a str>,
        limit: usize,
    ) -> BoxFuture<'a, Result<Vec<Arc<str>>, StoreError>> {
        let inner = self.lock();
        let f: Arc<str> = flow.into();
        let out = inner
            .parked
            .range((f.clone(), Arc::from(after.unwrap_or("")))..)
            .take_while(|(fl, _)| *fl == f)
            .filter(|(_, id)| after.is_none_or(|a| &**id > a))
            .take(limit)
            .map(|(_, id)| id.clone())
            .collect();
        Box::pin(std::future::ready(Ok(out)))
    }

    fn correlated<'a>(
        &'a self,
        flow: &'a str,
        key: &'a str,
        limit: usize,
    ) -> BoxFuture<'a, Result<Vec<Arc<str>>, StoreError>> {
        let inner = self.lock();
        let (f, k): (Arc<str>, Arc<str>) = (flow.into(), key.into());
        let out = inner
            .correlated
            .range((f.clone(), k.clone(), Arc::from(""))..)
            .take_while(|(fl, key, _)| *fl == f && *key == k)
            .take(limit)
            .map(|(_, _, id)| id.clone())
            .collect();
        Box::pin(std::future::ready(Ok(out)))
    }
}
