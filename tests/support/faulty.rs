//! A store layer that injects failures into the commits of a real store (fault injection
//! as a layer, around the store it wraps; reads go straight through).

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};

use bytes::Bytes;
use flowwire::storage::store::{ActiveList, DamagedList, DueList};
use flowwire::storage::{
    BoxFuture, InstanceKey, InstanceStore, StepResult, StepWrite, StoreError, Stored,
};

/// Wraps a store; while `fail` holds an error, every commit fails with it (and the store
/// reports it as its fault).
#[derive(Clone)]
pub struct Faulty<S> {
    inner: S,
    fail: Arc<Mutex<Option<StoreError>>>,
    commits: Arc<AtomicUsize>,
}

impl<S: InstanceStore + Clone> Faulty<S> {
    pub fn new(inner: S) -> Self {
        Self {
            inner,
            fail: Arc::default(),
            commits: Arc::default(),
        }
    }

    /// Makes every commit from now on fail with `error` (`None`: succeed again).
    pub fn fail_with(&self, error: Option<StoreError>) {
        *self.fail.lock().unwrap() = error;
    }

    /// How many commits were asked for.
    pub fn commits(&self) -> usize {
        self.commits.load(Ordering::Relaxed)
    }
}

impl<S: InstanceStore + Clone> InstanceStore for Faulty<S> {
    fn commit(
        &self,
        batch: Vec<StepWrite>,
    ) -> BoxFuture<'static, Result<Vec<StepResult>, StoreError>> {
        self.commits.fetch_add(1, Ordering::Relaxed);
        match self.fail.lock().unwrap().clone() {
            Some(e) => Box::pin(async move { Err(e) }),
            None => self.inner.commit(batch),
        }
    }
    fn fault(&self) -> Option<StoreError> {
        self.fail
            .lock()
            .unwrap()
            .clone()
            .or_else(|| self.inner.fault())
    }
    fn load<'a>(
        &'a self,
        key: &'a InstanceKey,
    ) -> BoxFuture<'a, Result<Option<Stored>, StoreError>> {
        self.inner.load(key)
    }
    fn active<'a>(&'a self, flow: &'a str) -> BoxFuture<'a, Result<ActiveList, StoreError>> {
        self.inner.active(flow)
    }
    fn history<'a>(
        &'a self,
        key: &'a InstanceKey,
        from: u64,
        limit: usize,
    ) -> BoxFuture<'a, Result<Vec<(u64, Bytes)>, StoreError>> {
        self.inner.history(key, from, limit)
    }
    fn impulse_applied<'a>(
        &'a self,
        key: &'a InstanceKey,
        impulse_id: &'a str,
    ) -> BoxFuture<'a, Result<Option<u64>, StoreError>> {
        self.inner.impulse_applied(key, impulse_id)
    }
    fn due<'a>(
        &'a self,
        flow: &'a str,
        until_ms: u64,
        limit: usize,
    ) -> BoxFuture<'a, Result<DueList, StoreError>> {
        self.inner.due(flow, until_ms, limit)
    }
    fn retime<'a>(
        &'a self,
        key: &'a InstanceKey,
        stale: u64,
        actual: Option<u64>,
    ) -> BoxFuture<'a, Result<(), StoreError>> {
        self.inner.retime(key, stale, actual)
    }
    fn parked<'a>(
        &'a self,
        flow: &'a str,
        after: Option<&'a str>,
        limit: usize,
    ) -> BoxFuture<'a, Result<Vec<Arc<str>>, StoreError>> {
        self.inner.parked(flow, after, limit)
    }
    fn correlated<'a>(
        &'a self,
        flow: &'a str,
        key: &'a str,
        limit: usize,
    ) -> BoxFuture<'a, Result<Vec<Arc<str>>, StoreError>> {
        self.inner.correlated(flow, key, limit)
    }
    fn mark_damaged<'a>(
        &'a self,
        key: &'a InstanceKey,
        reason: Option<&'a str>,
    ) -> BoxFuture<'a, Result<(), StoreError>> {
        self.inner.mark_damaged(key, reason)
    }
    fn damaged<'a>(
        &'a self,
        flow: &'a str,
        after: Option<&'a str>,
        limit: usize,
    ) -> BoxFuture<'a, Result<DamagedList, StoreError>> {
        self.inner.damaged(flow, after, limit)
    }
    fn delete<'a>(&'a self, key: &'a InstanceKey) -> BoxFuture<'a, Result<(), StoreError>> {
        self.inner.delete(key)
    }
}
