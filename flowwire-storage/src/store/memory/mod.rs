//! The in-memory store: the reference backend, for tests and for in-memory engines.
//!
//! Laid out for the step loop: everything is partitioned by flow, then by instance, so a
//! step touches one instance's entry through two hash lookups and never compares keys
//! longer than an id. What a step writes is copied into buffers the instance owns — its
//! record is rewritten in place, its history appended to one buffer — so a steady step
//! allocates nothing here, and nothing it keeps pins the caller's buffers.
//!
//! The store computes checksums when it hands values out
//! ([`InstanceStore::checksums_on_read`]): the engine's steps come with theirs left zero
//! ([`Checksums::OnRead`]), and each is stamped in the copy a read answers. Values written
//! with their checksums are kept and answered as they were given.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::{Arc, Mutex, PoisonError};

// Keyed by instance ids, looked up on every commit: foldhash, randomly seeded per process.
use foldhash::{HashMap, HashSet};

use bytes::Bytes;

mod history;

use history::{History, stamped};

use super::{BoxFuture, DamagedList, InstanceStore};
use crate::codec::{Checksums, Kind};
use crate::error::StoreError;
use crate::record::{Expect, FlowName, InstanceKey, StepResult, StepWrite, Stored};

/// An instance store that keeps everything in memory. Nothing survives the process.
///
/// ```
/// use flowwire::storage::{InstanceStore, MemoryStore};
/// let store = MemoryStore::new();
/// # let _: &dyn InstanceStore = &store;
/// ```
#[derive(Debug, Default)]
pub struct MemoryStore {
    inner: Mutex<Inner>,
}

#[derive(Debug, Default)]
struct Inner {
    flows: HashMap<FlowName, FlowData>,
}

/// One flow's instances and indexes.
#[derive(Debug, Default)]
struct FlowData {
    instances: HashMap<Arc<str>, Entry>,
    active: HashSet<Arc<str>>,
    /// Ordered: listed in pages.
    parked: BTreeSet<Arc<str>>,
    /// (due, id), earliest first.
    timers: BTreeSet<(u64, Arc<str>)>,
    /// (correlation key, id).
    correlated: BTreeSet<(Arc<str>, Arc<str>)>,
    /// (key, id) of the instances that ended carrying a correlation key.
    ended_keys: BTreeSet<(Arc<str>, Arc<str>)>,
    /// Damaged instances, with why.
    damaged: BTreeMap<Arc<str>, String>,
}

/// One instance.
#[derive(Debug, Default)]
struct Entry {
    version: u64,
    /// The record's bytes, rewritten in place by each step.
    record: Vec<u8>,
    /// Whether `record` was given with its checksum left for the store to compute.
    record_on_read: bool,
    timer: Option<u64>,
    /// Whether the instance is in the flow's active index, and in its parked index: a
    /// step touches an index only when its membership changes.
    active: bool,
    parked: bool,
    /// Applied impulses, by id.
    impulses: HashMap<Arc<str>, u64>,
    history: History,
}

impl FlowData {
    fn set_timer(&mut self, id: &Arc<str>, due: Option<u64>) {
        if let Some(entry) = self.instances.get_mut(id) {
            retime(&mut self.timers, id, &mut entry.timer, due);
        }
    }

    fn apply(&mut self, step: &StepWrite) -> StepResult {
        let FlowData {
            instances,
            active,
            parked,
            timers,
            correlated,
            ended_keys,
            ..
        } = self;
        let id = &step.key.id;
        // One lookup for a step of an instance stored (a second one only to add a new one);
        // the step's own id stands for the map's key in the indexes (the same string), so
        // neither is cloned unless an index takes it.
        let found = instances.get_mut(&**id);
        let ok = match (step.expect, &found) {
            (Expect::Absent, found) => found.is_none(),
            (Expect::Version(v), Some(e)) => e.version == v,
            (Expect::Version(_), None) => false,
        };
        if !ok {
            return StepResult::Conflict {
                found: found.map(|e| e.version),
            };
        }
        let entry = match found {
            Some(entry) => entry,
            None => instances.entry(id.clone()).or_default(),
        };
        if let Some(impulse) = &step.impulse {
            if let Some(seq) = entry.impulses.get(impulse) {
                return StepResult::ImpulseSeen { seq: *seq };
            }
            entry.impulses.insert(impulse.clone(), step.seq);
        }
        entry.version = step.version;
        entry.record.clear();
        entry.record.extend_from_slice(&step.record);
        entry.record_on_read = step.checksums == Checksums::OnRead;
        if entry.record.capacity() > 4 * 1024 && entry.record.capacity() > 4 * entry.record.len() {
            // A record that shrank a lot does not keep its largest size.
            entry.record.shrink_to_fit();
        }
        if let Some((seq, bytes)) = &step.history {
            entry.history.push(&step.key, *seq, bytes, step.checksums);
        }
        if let Some(below) = step.prune_below {
            entry.history.prune(below);
        }
        // The indexes change only when the instance's membership does: a steady step
        // (a call answered, the next one sent) touches none of them.
        if entry.active != step.active {
            entry.active = step.active;
            if step.active {
                active.insert(id.clone());
            } else {
                active.remove(id);
            }
        }
        if entry.parked != step.parked {
            entry.parked = step.parked;
            if step.parked {
                parked.insert(id.clone());
            } else {
                parked.remove(id);
            }
        }
        retime(timers, id, &mut entry.timer, step.timer);
        if let Some(old) = &step.uncorrelate {
            correlated.remove(&(old.clone(), id.clone()));
        }
        if let Some(ended) = &step.ended_key {
            ended_keys.insert((ended.clone(), id.clone()));
        }
        if let Some(new) = &step.correlation {
            correlated.insert((new.clone(), id.clone()));
        }
        StepResult::Committed
    }
}

/// Moves an instance's entry in the timer index from `timer` to `due` (nothing when they
/// are the same).
fn retime(
    timers: &mut BTreeSet<(u64, Arc<str>)>,
    id: &Arc<str>,
    timer: &mut Option<u64>,
    due: Option<u64>,
) {
    if *timer == due {
        return;
    }
    if let Some(old) = timer.take() {
        timers.remove(&(old, id.clone()));
    }
    if let Some(due) = due {
        *timer = Some(due);
        timers.insert((due, id.clone()));
    }
}

impl MemoryStore {
    /// An empty store.
    pub fn new() -> Self {
        Self::default()
    }

    /// What `read` finds in a flow's data (nothing for a flow never written).
    fn keyed(&self, flow: &str, read: impl FnOnce(&FlowData) -> Vec<Arc<str>>) -> Vec<Arc<str>> {
        self.lock().flows.get(flow).map(read).unwrap_or_default()
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Inner> {
        // A panic while holding the lock cannot leave a half-applied step: each step is
        // checked before any of it is applied.
        self.inner.lock().unwrap_or_else(PoisonError::into_inner)
    }
}

/// The ids a `(key, id)` index holds under `key`, in id order, at most `limit`.
fn under(index: &BTreeSet<(Arc<str>, Arc<str>)>, key: &str, limit: usize) -> Vec<Arc<str>> {
    let k: Arc<str> = key.into();
    index
        .range((k.clone(), Arc::from(""))..)
        .take_while(|(ck, _)| *ck == k)
        .take(limit)
        .map(|(_, id)| id.clone())
        .collect()
}

/// The stored form of instance `key`'s entry, as `load` answers it.
fn stored(e: &Entry, key: &InstanceKey) -> Stored {
    Stored {
        version: e.version,
        bytes: stamped(Kind::Record, &e.record, e.record_on_read, key),
    }
}

impl InstanceStore for MemoryStore {
    fn checksums_on_read(&self) -> bool {
        true
    }

    fn commit(
        &self,
        batch: Vec<StepWrite>,
    ) -> BoxFuture<'static, Result<Vec<StepResult>, StoreError>> {
        let mut inner = self.lock();
        let mut results = Vec::with_capacity(batch.len());
        // Applied where they lie (a write is about 300 bytes: moving each out of the
        // batch copied it twice), and dropped with the batch.
        let mut steps = batch.iter().peekable();
        while let Some(first) = steps.next() {
            // A runner's batch is one flow's: its steps after the first find the flow's
            // data without a lookup (their flow is the same name).
            let name = &first.key.flow;
            let flow = match inner.flows.get_mut(name) {
                Some(f) => f,
                None => inner.flows.entry(name.clone()).or_default(),
            };
            results.push(flow.apply(first));
            while let Some(step) = steps.next_if(|s| s.key.flow == *name) {
                results.push(flow.apply(step));
            }
        }
        drop(inner);
        drop(batch);
        Box::pin(std::future::ready(Ok(results)))
    }

    fn load<'a>(
        &'a self,
        key: &'a InstanceKey,
    ) -> BoxFuture<'a, Result<Option<Stored>, StoreError>> {
        let inner = self.lock();
        let found = inner
            .flows
            .get(&key.flow)
            .and_then(|f| f.instances.get(&key.id))
            .map(|e| stored(e, key));
        Box::pin(std::future::ready(Ok(found)))
    }

    fn records<'a>(
        &'a self,
        flow: &'a str,
    ) -> BoxFuture<'a, Result<super::ActiveList, StoreError>> {
        let inner = self.lock();
        let mut out: super::ActiveList = inner
            .flows
            .get_key_value(flow)
            .map(|(name, f)| {
                f.instances
                    .iter()
                    .map(|(id, e)| {
                        let key = InstanceKey::new(name.clone(), id.clone());
                        (id.clone(), stored(e, &key))
                    })
                    .collect()
            })
            .unwrap_or_default();
        out.sort_unstable_by(|a, b| a.0.cmp(&b.0));
        Box::pin(std::future::ready(Ok(out)))
    }

    fn active<'a>(&'a self, flow: &'a str) -> BoxFuture<'a, Result<super::ActiveList, StoreError>> {
        let inner = self.lock();
        let mut out: super::ActiveList = inner
            .flows
            .get_key_value(flow)
            .map(|(name, f)| {
                f.active
                    .iter()
                    .filter_map(|id| {
                        let e = f.instances.get(id)?;
                        let key = InstanceKey::new(name.clone(), id.clone());
                        Some((id.clone(), stored(e, &key)))
                    })
                    .collect()
            })
            .unwrap_or_default();
        out.sort_unstable_by(|a, b| a.0.cmp(&b.0));
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
            .flows
            .get(&key.flow)
            .and_then(|f| f.instances.get(&key.id))
            .map(|e| e.history.read(key, from, limit))
            .unwrap_or_default();
        Box::pin(std::future::ready(Ok(out)))
    }

    fn impulse_applied<'a>(
        &'a self,
        key: &'a InstanceKey,
        impulse_id: &'a str,
    ) -> BoxFuture<'a, Result<Option<u64>, StoreError>> {
        let inner = self.lock();
        let found = inner
            .flows
            .get(&key.flow)
            .and_then(|f| f.instances.get(&key.id))
            .and_then(|e| e.impulses.get(impulse_id).copied());
        Box::pin(std::future::ready(Ok(found)))
    }

    fn due<'a>(
        &'a self,
        flow: &'a str,
        until_ms: u64,
        limit: usize,
    ) -> BoxFuture<'a, Result<super::DueList, StoreError>> {
        let inner = self.lock();
        let out = inner
            .flows
            .get(flow)
            .map(|f| {
                f.timers
                    .iter()
                    .take_while(|(due, _)| *due <= until_ms)
                    .take(limit)
                    .map(|(due, id)| (id.clone(), *due))
                    .collect()
            })
            .unwrap_or_default();
        Box::pin(std::future::ready(Ok(out)))
    }

    fn retime<'a>(
        &'a self,
        key: &'a InstanceKey,
        stale: u64,
        actual: Option<u64>,
    ) -> BoxFuture<'a, Result<(), StoreError>> {
        let mut inner = self.lock();
        if let Some(f) = inner.flows.get_mut(&key.flow)
            && f.instances.get(&key.id).and_then(|e| e.timer) == Some(stale)
        {
            f.set_timer(&key.id, actual);
        }
        Box::pin(std::future::ready(Ok(())))
    }

    fn mark_damaged<'a>(
        &'a self,
        key: &'a InstanceKey,
        reason: Option<&'a str>,
    ) -> BoxFuture<'a, Result<(), StoreError>> {
        let mut inner = self.lock();
        let flow = inner.flows.entry(key.flow.clone()).or_default();
        match reason {
            Some(why) => {
                flow.damaged.insert(key.id.clone(), why.to_string());
            }
            None => {
                flow.damaged.remove(&key.id);
            }
        }
        Box::pin(std::future::ready(Ok(())))
    }

    fn damaged<'a>(
        &'a self,
        flow: &'a str,
        after: Option<&'a str>,
        limit: usize,
    ) -> BoxFuture<'a, Result<DamagedList, StoreError>> {
        let inner = self.lock();
        let out = inner
            .flows
            .get(flow)
            .map(|f| {
                let from: Arc<str> = after.unwrap_or("").into();
                f.damaged
                    .range(from..)
                    .filter(|(id, _)| after.is_none_or(|a| &***id > a))
                    .take(limit)
                    .map(|(id, why)| (id.clone(), why.clone()))
                    .collect()
            })
            .unwrap_or_default();
        Box::pin(std::future::ready(Ok(out)))
    }

    fn delete<'a>(&'a self, key: &'a InstanceKey) -> BoxFuture<'a, Result<(), StoreError>> {
        let mut inner = self.lock();
        if let Some(flow) = inner.flows.get_mut(&key.flow) {
            let id = &key.id;
            if let Some(entry) = flow.instances.remove(id)
                && let Some(due) = entry.timer
            {
                flow.timers.remove(&(due, id.clone()));
            }
            flow.active.remove(id);
            flow.parked.remove(id);
            flow.damaged.remove(id);
            flow.correlated.retain(|(_, i)| i != id);
            flow.ended_keys.retain(|(_, i)| i != id);
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
        let out = inner
            .flows
            .get(flow)
            .map(|f| {
                let from: Arc<str> = after.unwrap_or("").into();
                f.parked
                    .range(from..)
                    .filter(|id| after.is_none_or(|a| &***id > a))
                    .take(limit)
                    .cloned()
                    .collect()
            })
            .unwrap_or_default();
        Box::pin(std::future::ready(Ok(out)))
    }

    fn correlated<'a>(
        &'a self,
        flow: &'a str,
        key: &'a str,
        limit: usize,
    ) -> BoxFuture<'a, Result<Vec<Arc<str>>, StoreError>> {
        let out = self.keyed(flow, |f| under(&f.correlated, key, limit));
        Box::pin(std::future::ready(Ok(out)))
    }

    fn ended_with_key<'a>(
        &'a self,
        flow: &'a str,
        key: &'a str,
        limit: usize,
    ) -> BoxFuture<'a, Result<Vec<Arc<str>>, StoreError>> {
        let out = self.keyed(flow, |f| under(&f.ended_keys, key, limit));
        Box::pin(std::future::ready(Ok(out)))
    }
}
