//! The announcements of ended instances, as a client process hears them: one
//! subscription per flow, taken at the first wait, that wakes the callers of `finished()`
//! waiting on each announced id and hands them the record an announcement carries.

use std::collections::HashMap;
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
/// ended instances (one subscription per flow, taken at the first wait).
#[derive(Default)]
pub(crate) struct Watch {
    waiting: Mutex<HashMap<Arc<str>, Arc<Waiting>>>,
    subscribed: tokio::sync::OnceCell<()>,
}

/// The callers waiting on one instance: woken by its announcements, each of which may
/// carry the record its step wrote (read instead of the store's).
#[derive(Default)]
pub(super) struct Waiting {
    pub(super) notify: Notify,
    record: Mutex<Option<Bytes>>,
}

impl Waiting {
    /// The record the last announcement carried, once.
    pub(super) fn take(&self) -> Option<Bytes> {
        self.record
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .take()
    }
}

impl Watch {
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

    pub(super) fn register(&self, id: &Arc<str>) -> Arc<Waiting> {
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
            if let Some(w) = watch.lock().get(id) {
                if let Some(record) = record {
                    *w.record
                        .lock()
                        .unwrap_or_else(std::sync::PoisonError::into_inner) = Some(record);
                }
                w.notify.notify_waiters();
            }
        }
        match resubscribe(&bus, &channel, &mut failures, || watch.strong_count() == 0).await {
            Some(s) => sub = s,
            None => return,
        }
    }
}
