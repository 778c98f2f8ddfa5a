//! A store layer that injects failures into the commits of a real store (fault injection
//! as a layer, around the store it wraps; reads go straight through).

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};

use flowwire::storage::{BoxFuture, InstanceStore, StepResult, StepWrite, StoreError};

/// Wraps a store; while `fail` holds an error, every commit fails with it (and the store
/// reports it as its fault).
#[derive(Clone)]
pub struct Faulty<S> {
    inner: S,
    fail: Arc<Mutex<Option<StoreError>>>,
    /// The next commit lands in the inner store, then answers this error (its reply lost).
    lose_reply: Arc<Mutex<Option<StoreError>>>,
    commits: Arc<AtomicUsize>,
}

impl<S: InstanceStore + Clone> Faulty<S> {
    pub fn new(inner: S) -> Self {
        Self {
            inner,
            fail: Arc::default(),
            lose_reply: Arc::default(),
            commits: Arc::default(),
        }
    }

    /// Makes every commit from now on fail with `error` (`None`: succeed again).
    pub fn fail_with(&self, error: Option<StoreError>) {
        *self.fail.lock().unwrap() = error;
    }

    /// Lets the next commit land in the store it wraps, then answers `error` instead of
    /// its results: a commit that timed out on the caller's side after it was applied.
    pub fn lose_next_reply(&self, error: StoreError) {
        *self.lose_reply.lock().unwrap() = Some(error);
    }

    /// How many commits were asked for.
    pub fn commits(&self) -> usize {
        self.commits.load(Ordering::Relaxed)
    }
}

#[macro_use]
#[path = "forward.rs"]
mod forward;

impl<S: InstanceStore + Clone> InstanceStore for Faulty<S> {
    fn commit(
        &self,
        batch: Vec<StepWrite>,
    ) -> BoxFuture<'static, Result<Vec<StepResult>, StoreError>> {
        self.commits.fetch_add(1, Ordering::Relaxed);
        if let Some(e) = self.fail.lock().unwrap().clone() {
            return Box::pin(async move { Err(e) });
        }
        let landing = self.inner.commit(batch);
        match self.lose_reply.lock().unwrap().take() {
            Some(e) => Box::pin(async move {
                landing.await?;
                Err(e)
            }),
            None => landing,
        }
    }
    fn fault(&self) -> Option<StoreError> {
        self.fail
            .lock()
            .unwrap()
            .clone()
            .or_else(|| self.inner.fault())
    }
    forward_to_inner!();
}
