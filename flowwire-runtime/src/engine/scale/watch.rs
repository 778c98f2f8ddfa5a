//! The announcements of ended instances, as a client process hears them: one
//! subscription per flow, taken at the first wait, that wakes the callers of `finished()`
//! waiting on each announced id and hands them the record an announcement carries.

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, Weak};

use bytes::Bytes;
use flowwire_storage::bus::RedisBus;
use tokio::sync::Notify;

/// Listens on `channel` again after its connection was lost, waiting longer after each
/// failure (`failures` counts them); `None` once `gone()` says nobody listens any more.
pub(super) async fn resubscribe(
    bus: &RedisBus,
    channel: &str,
    failures: &mut u32,
    gone: impl Fn() -> bool,
) -> Option<flowwire_storage::bus::Listener> {
    loop {
        *failures = failures.saturating_add(1);
        let delay = super::pause(*failures);
        tokio::time::sleep(delay).await;
        if gone() {
            return None;
        }
        match bus.listen(channel).await {
            Ok(s) => return Some(s),
            Err(e) => tracing::warn!(channel, error = %e, retry_in = ?delay, "not subscribed"),
        }
    }
}

/// The callers of `finished()` in this process, woken by the owners' announcements of
/// ended instances (one subscription per flow, taken at the first wait or start).
#[derive(Default)]
pub(crate) struct Watch {
    waiting: Mutex<HashMap<Arc<str>, Arc<Waiting>>>,
    subscribed: tokio::sync::OnceCell<()>,
    /// Counts the subscription's lost connections: an announcement made while one was
    /// down went unheard.
    generation: AtomicU64,
    /// Instances this process is starting or started while subscribed, by id: the
    /// generation then, and what was heard of their end since (see [`Since`]).
    started: Mutex<HashMap<Arc<str>, Started>>,
}

/// An instance started while the watch listened.
struct Started {
    generation: u64,
    /// What was heard of its end since ([`Since::NotYet`] or [`Since::Heard`]).
    end: Since,
}

/// The most started instances the watch remembers: past it, it forgets them all, and
/// their waiters read the store first as any other's do.
const STARTED_MAX: usize = 4096;

/// What the watch knows of the end of an instance a caller starts to wait on.
pub(super) enum Since {
    /// Nothing: the store must be read first (the end may have been announced unheard).
    Unknown,
    /// The instance was started by this process while the watch listened, without a break
    /// since, and its end was not announced yet: whenever it is, it will be heard.
    NotYet,
    /// Its end was announced, with the record it carried if any.
    Heard(Option<Bytes>),
}

/// The callers waiting on one instance: woken by its announcements, each of which may
/// carry the record its step wrote (read instead of the store's).
#[derive(Default)]
pub(super) struct Waiting {
    pub(super) notify: Notify,
    record: Mutex<Option<Bytes>>,
    /// An announcement came (set before the callers are woken: one that came before a
    /// caller listened is not lost).
    seen: AtomicBool,
}

impl Waiting {
    /// The record the last announcement carried, once.
    pub(super) fn take(&self) -> Option<Bytes> {
        self.record
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .take()
    }

    /// Whether an announcement came since the last call.
    pub(super) fn seen(&self) -> bool {
        self.seen.swap(false, Ordering::AcqRel)
    }

    /// Takes what an announcement heard before the caller registered brought.
    fn heard(&self, record: Option<Bytes>) {
        if let Some(record) = record {
            *self
                .record
                .lock()
                .unwrap_or_else(std::sync::PoisonError::into_inner) = Some(record);
        }
        self.seen.store(true, Ordering::Release);
    }
}

impl Watch {
    fn started(&self) -> std::sync::MutexGuard<'_, HashMap<Arc<str>, Started>> {
        self.started
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// Notes that this process is about to start `id`, the watch listening: a caller that
    /// waits on it later need not read the store first. (Before the start is sent, so its
    /// end cannot be announced before it is expected.)
    pub(super) fn expect(&self, id: &Arc<str>) {
        let generation = self.generation.load(Ordering::Acquire);
        let mut started = self.started();
        if started.len() >= STARTED_MAX {
            started.clear();
        }
        started.insert(
            id.clone(),
            Started {
                generation,
                end: Since::NotYet,
            },
        );
    }

    /// Forgets a start that did not happen.
    pub(super) fn forget(&self, id: &str) {
        self.started().remove(id);
    }

    /// Registers a caller waiting on `id`, and says what the watch knows of its end.
    pub(super) fn wait_on(&self, id: &Arc<str>) -> (Arc<Waiting>, Since) {
        let waiting = self.register(id);
        // After registering: an announcement from now on reaches the caller.
        let since = match self.started().remove(&**id) {
            Some(s) if s.generation == self.generation.load(Ordering::Acquire) => s.end,
            _ => Since::Unknown,
        };
        if let Since::Heard(record) = &since {
            waiting.heard(record.clone());
        }
        (waiting, since)
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<Arc<str>, Arc<Waiting>>> {
        self.waiting
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// Subscribes to the flow's announcements unless done; `false` if Redis refused (the
    /// caller then polls, and the next wait tries again).
    pub(super) async fn subscribe(
        self: &Arc<Self>,
        bus: &RedisBus,
        flow: &'static str,
        limit: usize,
    ) -> bool {
        let watch = Arc::downgrade(self);
        self.subscribed
            .get_or_try_init(|| async {
                let channel = bus.ended(flow);
                let sub = bus.listen(&channel).await?;
                tokio::spawn(announcements(watch, bus.clone(), channel, sub, limit));
                Ok::<(), flowwire_storage::StoreError>(())
            })
            .await
            .is_ok()
    }

    fn register(&self, id: &Arc<str>) -> Arc<Waiting> {
        self.lock().entry(id.clone()).or_default().clone()
    }

    pub(super) fn unregister(&self, id: &Arc<str>, notify: Arc<Waiting>) {
        let mut waiting = self.lock();
        drop(notify);
        if waiting.get(id).is_some_and(|n| Arc::strong_count(n) == 1) {
            waiting.remove(id);
        }
    }
}

/// Wakes the waiters of each announced id; subscribes again after a lost connection.
async fn announcements(
    watch: Weak<Watch>,
    bus: RedisBus,
    channel: String,
    mut sub: flowwire_storage::bus::Listener,
    limit: usize,
) {
    let mut failures = 0u32;
    loop {
        while let Some(body) = sub.next().await {
            failures = 0;
            let Some(watch) = watch.upgrade() else {
                return;
            };
            if body.len() > limit {
                continue;
            }
            let Some((id, record)) = super::messages::parse_announcement(&body) else {
                continue;
            };
            if let Some(s) = watch.started().get_mut(id) {
                s.end = Since::Heard(record.clone());
            }
            if let Some(w) = watch.lock().get(id) {
                w.heard(record);
                w.notify.notify_waiters();
            }
        }
        // Announcements made until the subscription is back go unheard.
        if let Some(watch) = watch.upgrade() {
            watch.generation.fetch_add(1, Ordering::AcqRel);
        }
        match resubscribe(&bus, &channel, &mut failures, || watch.strong_count() == 0).await {
            Some(s) => sub = s,
            None => return,
        }
    }
}
