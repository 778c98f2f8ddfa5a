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

#[macro_use]
#[path = "forward.rs"]
mod forward;

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
    forward_to_inner!();
}
