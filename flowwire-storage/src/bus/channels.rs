//! Several channels on one subscriber connection.
//!
//! An orchestrator listens on the handoff channel of every shard it owns (sixteen by
//! default). With a connection each, Redis wrote each turn's handoffs to as many sockets as
//! shards they were for: traced at concurrency 64, a third of its socket writes. Here the
//! channels of one [`RedisBus`](super::RedisBus) (and its clones) share one connection:
//! [`Channels::listen`] subscribes a channel on it and routes the channel's messages to
//! the [`Listener`] it returns; dropping the listener unsubscribes it.
//!
//! The rules a listener keeps from a connection of its own:
//! - [`Listener::next`] returns `None` once the connection is gone; listening again opens
//!   a new one (every listener of the old one sees `None` and listens again).
//! - A message published while no listener holds the channel is lost, as on a connection
//!   of its own: the handoff's sender writes it to the shard's stream when no commit
//!   settled it within a second.
//! - Subscribing and unsubscribing go out in order under one lock, so a channel listened
//!   to again before the old listener's unsubscription ran stays subscribed.
//! - A channel may have several listeners at once (a shard's new pump starting before the
//!   old one is dropped): each gets every message, and the channel is unsubscribed when
//!   the last one goes, rather than one listener ending another's.

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex as SyncMutex, MutexGuard, PoisonError};

use bytes::Bytes;
use tokio::sync::{Mutex, mpsc};

use super::backend;
use crate::error::StoreError;
use crate::redis_link::RedisLink;

/// Each channel's listeners: their numbers and where their messages go. (Usually one; a
/// channel listened to twice gets each message twice rather than one listener ending the
/// other.)
type Routes = HashMap<String, Vec<(u64, mpsc::UnboundedSender<Bytes>)>>;

/// One open subscriber connection.
struct Live {
    sink: redis::aio::PubSubSink,
    routes: Arc<SyncMutex<Routes>>,
    /// Set by the reader when the connection's messages end.
    closed: Arc<AtomicBool>,
    reader: tokio::task::JoinHandle<()>,
}

impl Live {
    /// Closes the connection: its reader stops (dropping the connection) and every
    /// listener's `next` returns `None`.
    fn close(&self) {
        self.closed.store(true, Ordering::Release);
        self.reader.abort();
        lock(&self.routes).clear();
    }
}

impl Drop for Live {
    /// The connection closes with its last holder (a new one replacing it, or the last
    /// clone of the bus gone): its reader would otherwise keep it open.
    fn drop(&mut self) {
        self.reader.abort();
    }
}

/// Channels that share one subscriber connection (see the module docs). Clones share it.
#[derive(Clone)]
pub(crate) struct Channels {
    link: RedisLink,
    live: Arc<Mutex<Option<Live>>>,
    next_id: Arc<AtomicU64>,
}

impl std::fmt::Debug for Channels {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Channels").finish_non_exhaustive()
    }
}

fn lock(routes: &SyncMutex<Routes>) -> MutexGuard<'_, Routes> {
    // A panic while the map was held leaves it whole (inserts and removes only).
    routes.lock().unwrap_or_else(PoisonError::into_inner)
}

/// Removes listener `id`'s route of `channel`; `true` if that left the channel without
/// listeners (time to unsubscribe it).
fn unroute(routes: &mut Routes, channel: &str, id: u64) -> bool {
    let Some(listeners) = routes.get_mut(channel) else {
        return false;
    };
    let before = listeners.len();
    listeners.retain(|(i, _)| *i != id);
    if listeners.len() == before || !listeners.is_empty() {
        return false;
    }
    routes.remove(channel);
    true
}

impl Channels {
    pub(crate) fn new(link: RedisLink) -> Self {
        Self {
            link,
            live: Arc::new(Mutex::new(None)),
            next_id: Arc::new(AtomicU64::new(0)),
        }
    }

    /// Subscribes `channel` on the shared connection (opened, or opened again, if need
    /// be). Bounded by the link's timeout; a subscription not confirmed in time closes the
    /// connection, as its state is then unknown.
    pub(crate) async fn listen(&self, channel: &str) -> Result<Listener, StoreError> {
        let timeout = self.link.timeout();
        let mut live = self.live.lock().await;
        let l = match live.take() {
            Some(l) if !l.closed.load(Ordering::Acquire) => live.insert(l),
            _ => live.insert(self.open().await?),
        };
        let (tx, rx) = mpsc::unbounded_channel();
        let id = self.next_id.fetch_add(1, Ordering::Relaxed);
        // The route is in place before the subscription: no message after it is missed.
        lock(&l.routes)
            .entry(channel.to_string())
            .or_default()
            .push((id, tx));
        let listener = Listener {
            rx,
            channel: channel.to_string(),
            id,
            hub: self.clone(),
        };
        let mut sink = l.sink.clone();
        match tokio::time::timeout(timeout, sink.subscribe(channel)).await {
            Ok(Ok(())) => Ok(listener),
            Ok(Err(e)) => {
                l.close();
                Err(backend(&e))
            }
            Err(_) => {
                l.close();
                Err(backend(&redis::RedisError::from(std::io::Error::new(
                    std::io::ErrorKind::TimedOut,
                    format!("the subscription to {channel} was not confirmed within {timeout:?}"),
                ))))
            }
        }
    }

    async fn open(&self) -> Result<Live, StoreError> {
        let (sink, mut stream) = self.link.pubsub().await.map_err(|e| backend(&e))?.split();
        let routes = Arc::new(SyncMutex::new(Routes::new()));
        let closed = Arc::new(AtomicBool::new(false));
        let reader = tokio::spawn({
            let (routes, closed) = (routes.clone(), closed.clone());
            async move {
                use futures_core::Stream;
                while let Some(msg) =
                    std::future::poll_fn(|cx| std::pin::Pin::new(&mut stream).poll_next(cx)).await
                {
                    let routes = lock(&routes);
                    let Some(to) = routes.get(msg.get_channel_name()) else {
                        // Nobody listens any more: lost, as any message of a channel
                        // nobody listens to.
                        continue;
                    };
                    let body = Bytes::copy_from_slice(msg.get_payload_bytes());
                    for (_, tx) in to {
                        // A listener dropped meanwhile: lost for it alike.
                        let _ = tx.send(body.clone());
                    }
                }
                closed.store(true, Ordering::Release);
                lock(&routes).clear();
            }
        });
        Ok(Live {
            sink,
            routes,
            closed,
            reader,
        })
    }

    /// Unsubscribes `channel` unless a listener took it again meanwhile.
    async fn forget(&self, channel: String) {
        let live = self.live.lock().await;
        let Some(l) = live.as_ref() else { return };
        if l.closed.load(Ordering::Acquire) || lock(&l.routes).contains_key(&channel) {
            return;
        }
        let mut sink = l.sink.clone();
        match tokio::time::timeout(self.link.timeout(), sink.unsubscribe(&channel)).await {
            Ok(Ok(())) => {}
            // Still subscribed, maybe: its messages would be counted as received and
            // dropped here. A new connection subscribes only what is listened to.
            _ => l.close(),
        }
    }
}

/// The messages of one channel of a shared connection; unsubscribes it when dropped.
pub struct Listener {
    rx: mpsc::UnboundedReceiver<Bytes>,
    channel: String,
    id: u64,
    hub: Channels,
}

impl std::fmt::Debug for Listener {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Listener")
            .field("channel", &self.channel)
            .finish_non_exhaustive()
    }
}

impl Listener {
    /// The next message's bytes; `None` once the connection is gone (listen again).
    pub async fn next(&mut self) -> Option<Bytes> {
        self.rx.recv().await
    }

    /// Unsubscribes on a task of the current runtime (none: the process is ending, and the
    /// connection with it). With `route`, this listener's route is removed there first.
    fn forget_later(&self, route: bool) {
        let Ok(rt) = tokio::runtime::Handle::try_current() else {
            return;
        };
        let (hub, channel, id) = (self.hub.clone(), self.channel.clone(), self.id);
        rt.spawn(async move {
            if route {
                let live = hub.live.lock().await;
                let last = live
                    .as_ref()
                    .is_some_and(|l| unroute(&mut lock(&l.routes), &channel, id));
                if !last {
                    return;
                }
            }
            hub.forget(channel).await;
        });
    }
}

impl Drop for Listener {
    fn drop(&mut self) {
        // Only this listener's own route goes; the unsubscription of a channel left
        // without listeners follows on a task (it waits for the connection's lock).
        let last = {
            let Ok(live) = self.hub.live.try_lock() else {
                return self.forget_later(true);
            };
            live.as_ref()
                .is_some_and(|l| unroute(&mut lock(&l.routes), &self.channel, self.id))
        };
        if last {
            self.forget_later(false);
        }
    }
}
