//! The client side of a multi-process engine: what a handle asks goes over the bus to the
//! owner of the instance's shard (starts, impulses), or is read from the store directly
//! (probes, state, whether it finished) — any process can serve its callers.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, Weak};
use std::time::Duration;

use bytes::Bytes;
use flowwire_storage::bus::RedisBus;
use flowwire_storage::codec;
use flowwire_storage::record::PlacedRecord;
use flowwire_storage::{InstanceKey, InstanceStore, Placement, Record, Status};
use tokio::sync::{mpsc, oneshot};

use super::messages::{Reply, Request, RequestKind};
use super::watch::{Since, Waiting, Watch, resubscribe};
use crate::ended::Ended;
use crate::engine::Limits;
use crate::engine::msg::Msg;
use crate::error::{Error, Result};
use crate::flow::Flow;

/// Callers waiting for replies from shard owners, matched by request number; fed by one
/// subscription to this process's reply channel.
pub(crate) struct Replies {
    pending: Mutex<HashMap<u64, oneshot::Sender<Reply>>>,
    next: AtomicU64,
    channel: String,
}

impl Replies {
    /// Subscribes to this process's channel (before any request can be sent, so no reply
    /// is published before someone listens), and keeps the subscription up.
    pub(crate) async fn start(bus: RedisBus, node: &str, limit: usize) -> Result<Arc<Replies>> {
        let channel = bus.replies(node);
        let sub = bus.listen(&channel).await?;
        let replies = Arc::new(Replies {
            pending: Mutex::new(HashMap::new()),
            next: AtomicU64::new(1),
            channel,
        });
        tokio::spawn(listen(Arc::downgrade(&replies), bus, sub, limit));
        Ok(replies)
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<u64, oneshot::Sender<Reply>>> {
        self.pending
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    fn register(&self) -> (u64, oneshot::Receiver<Reply>) {
        let req = self.next.fetch_add(1, Ordering::Relaxed);
        let (tx, rx) = oneshot::channel();
        self.lock().insert(req, tx);
        (req, rx)
    }

    fn forget(&self, req: u64) {
        self.lock().remove(&req);
    }
}

async fn listen(
    replies: Weak<Replies>,
    bus: RedisBus,
    mut sub: flowwire_storage::bus::Listener,
    limit: usize,
) {
    let mut failures = 0u32;
    loop {
        while let Some(body) = sub.next().await {
            failures = 0;
            let Some(replies) = replies.upgrade() else {
                return;
            };
            match codec::decode_raw::<Reply>(&body, limit) {
                Ok(reply) => {
                    let waiter = replies.lock().remove(&reply.req);
                    if let Some(w) = waiter {
                        let _ = w.send(reply);
                    }
                }
                Err(e) => tracing::warn!(error = %e, "undecodable reply dropped"),
            }
        }
        // The connection is gone: subscribe again. Callers waiting meanwhile time out and
        // may retry with the same ids (starts and impulses apply once).
        let Some(channel) = replies.upgrade().map(|r| r.channel.clone()) else {
            return;
        };
        match resubscribe(&bus, &channel, &mut failures, || {
            replies.strong_count() == 0
        })
        .await
        {
            Some(s) => sub = s,
            None => return,
        }
    }
}

/// What a router needs: the bus, the store and tiers for reads, this process's replies,
/// and (on one server with direct handoffs) the way to hand requests to their owners.
pub(crate) struct Remote {
    pub bus: RedisBus,
    pub store: Arc<dyn InstanceStore>,
    pub placement: Arc<Placement>,
    pub replies: Arc<Replies>,
    pub limits: Limits,
    pub direct: Option<Direct>,
}

/// Requests handed to their shard's owner directly, over the connection a worker's
/// outcomes take (`handoff.rs`), not appended to the shard's request stream: a stream
/// entry reaches the owner only after the `fdatasync` of the server's turn that appended
/// it (with `appendfsync always`), a wait on the disk for a message that needs no
/// durability — nothing is acknowledged before the step that applies it is committed.
///
/// The requests of concurrent callers are offered together: one exchange with each owner
/// for all those that came while the last one was under way. Each caller is answered as
/// soon as its owner's exchange ends, and the next requests do not wait for the last
/// exchange (up to `outlet::UNDER_WAY` batches under way): an owner that does not answer
/// (a paused process) holds up only the requests made to it, each for at most three seconds (a second for the owner's lane, one to
/// connect, one for the answer), after which they go through the stream.
#[derive(Clone)]
pub(crate) struct Direct {
    tx: mpsc::UnboundedSender<(String, Bytes, oneshot::Sender<bool>)>,
}

impl Direct {
    /// Starts offering through `outlet`; it stops once every copy is dropped (and the
    /// offers under way are answered).
    pub(crate) fn spawn(outlet: super::outlet::Outlet) -> (Direct, tokio::task::JoinHandle<()>) {
        /// The most requests offered in one exchange.
        const BATCH: usize = 256;
        let outlet = Arc::new(outlet);
        let (tx, mut rx) = mpsc::unbounded_channel::<(String, Bytes, oneshot::Sender<bool>)>();
        let task = tokio::spawn(async move {
            let mut batch = Vec::new();
            let mut under_way = tokio::task::JoinSet::new();
            loop {
                super::outlet::make_room(&mut under_way).await;
                if rx.recv_many(&mut batch, BATCH).await == 0 {
                    break;
                }
                let (offers, answers): (Vec<_>, Vec<_>) =
                    batch.drain(..).map(|(c, b, a)| ((c, b), Some(a))).unzip();
                let outlet = outlet.clone();
                under_way.spawn(async move {
                    let mut answers = answers;
                    outlet
                        .offer_each(&offers, |i, took| {
                            if let Some(answer) = answers.get_mut(i).and_then(Option::take) {
                                let _ = answer.send(took);
                            }
                        })
                        .await;
                });
            }
            while under_way.join_next().await.is_some() {}
        });
        (Direct { tx }, task)
    }

    /// Offers `body` (an encoded request) to the owner of the shard whose request stream
    /// is `stream`; whether it took it (`false`: append it to the stream).
    async fn offer(&self, stream: &str, body: &Bytes) -> bool {
        let (answer, took) = oneshot::channel();
        self.tx
            .send((stream.to_string(), body.clone(), answer))
            .is_ok()
            && took.await.unwrap_or(false)
    }
}

/// Serves a flow's handles in a multi-process engine; returns the port handles send to.
pub(crate) fn spawn_router<F: Flow>(
    remote: Arc<Remote>,
) -> (mpsc::Sender<Msg<F>>, tokio::task::JoinHandle<()>) {
    let (tx, mut rx) = mpsc::channel::<Msg<F>>(4096);
    let watch = Arc::new(Watch::default());
    let task = tokio::spawn(async move {
        while let Some(msg) = rx.recv().await {
            if let Msg::Shutdown { reply } = msg {
                let _ = reply.send(());
                return;
            }
            // Each request waits on the network on its own; the callers' timeouts bound them.
            tokio::spawn(serve(remote.clone(), watch.clone(), msg));
        }
    });
    (tx, task)
}

async fn serve<F: Flow>(remote: Arc<Remote>, watch: Arc<Watch>, msg: Msg<F>) {
    match msg {
        Msg::Start {
            id, state, reply, ..
        } => {
            let sent = encode(&state).map(|state| RequestKind::Start { state });
            // Listening before the start goes out: its end will be heard, so a caller
            // waiting on it here need not read the store first.
            let listening = watch
                .subscribe(&remote.bus, F::NAME, remote.limits.decode_limit)
                .await;
            if listening {
                watch.expect(&id);
            }
            let r = match sent {
                Ok(kind) => ask::<F>(&remote, &id, kind, "").await,
                Err(e) => Err(codec_error::<F>(&id, "the state", e)),
            };
            if r.is_err() {
                watch.forget(&id);
            }
            let _ = reply.send(r);
        }
        Msg::Impulse {
            id,
            impulse_id,
            impulse,
            reply,
            ..
        } => {
            let sent = encode(&impulse).map(|impulse| RequestKind::Impulse {
                impulse_id: impulse_id.to_string(),
                impulse,
            });
            let r = match sent {
                Ok(kind) => ask::<F>(&remote, &id, kind, &impulse_id).await,
                Err(e) => Err(codec_error::<F>(&id, "the impulse", e)),
            };
            let _ = reply.send(r);
        }
        Msg::StartOrImpulse {
            id,
            state,
            impulse_id,
            impulse,
            reply,
            ..
        } => {
            let sent = encode(&state).and_then(|state| {
                encode(&impulse).map(|impulse| RequestKind::StartOrImpulse {
                    state,
                    impulse_id: impulse_id.to_string(),
                    impulse,
                })
            });
            let r = match sent {
                Ok(kind) => ask::<F>(&remote, &id, kind, &impulse_id).await,
                Err(e) => Err(codec_error::<F>(&id, "the start or the impulse", e)),
            };
            let _ = reply.send(r);
        }
        Msg::Cancel {
            id, reason, reply, ..
        } => {
            let kind = RequestKind::Cancel { reason };
            let _ = reply.send(ask::<F>(&remote, &id, kind, crate::core::CANCEL_ID).await);
        }
        Msg::Probe { id, ask, reply } => {
            let state = read_state::<F>(&remote, &id).await;
            let limit = remote.limits.decode_limit;
            let answer = match state {
                Ok(state) => tokio::task::spawn_blocking(move || {
                    let s = codec::decode_raw::<F::State>(&state, limit)
                        .map_err(|e| codec_error::<F>(&id, "the state", e))?;
                    let flow = F::from_state(s);
                    crate::guard::guard(|| ask(&flow)).map_err(|reason| Error::ProbePanicked {
                        flow: F::NAME,
                        id: id.to_string(),
                        reason,
                    })
                })
                .await
                .unwrap_or(Err(Error::Shutdown)),
                Err(e) => Err(e),
            };
            let _ = reply.send(answer);
        }
        Msg::State { id, reply } => {
            let _ = reply.send(
                read_state::<F>(&remote, &id)
                    .await
                    .map(flowwire_storage::Rope::from),
            );
        }
        Msg::Exists { id, reply } => {
            let key =
                InstanceKey::new(flowwire_storage::FlowName::from_static(F::NAME), id.clone());
            let r = match remote.store.load(&key).await {
                Ok(Some(_)) => Ok(()),
                Ok(None) => Err(not_found::<F>(&id)),
                Err(e) => Err(e.into()),
            };
            let _ = reply.send(r);
        }
        Msg::Finished { id, reply } => finished::<F>(&remote, &watch, &id, reply).await,
        Msg::Operate { reply, .. } => {
            let _ = reply.send(Err(Error::NotAcrossProcesses {
                op: "an operator's operation",
            }));
        }
        Msg::Resident { reply } => {
            let _ = reply.send(0);
        }
        Msg::Shutdown { reply } => {
            let _ = reply.send(());
        }
    }
}

fn encode<T: serde::Serialize>(
    value: &T,
) -> std::result::Result<Bytes, flowwire_storage::CodecError> {
    let mut out = Vec::new();
    codec::encode_raw(value, &mut out)?;
    Ok(Bytes::from(out))
}

fn codec_error<F: Flow>(
    id: &str,
    what: &'static str,
    source: flowwire_storage::CodecError,
) -> Error {
    Error::Codec {
        flow: F::NAME,
        id: id.to_string(),
        what,
        source,
    }
}

fn not_found<F: Flow>(id: &str) -> Error {
    Error::NotFound {
        flow: F::NAME,
        id: id.to_string(),
    }
}

/// Sends a request to the owner of the instance's shard and waits for its reply, up to
/// the engine's request timeout (the request carries it: an owner that gets it later than
/// that after Redis appended it, on Redis's clock, drops it unapplied).
async fn ask<F: Flow>(
    remote: &Remote,
    id: &Arc<str>,
    kind: RequestKind,
    impulse_id: &str,
) -> Result<()> {
    let limit = remote.limits.request_timeout;
    let (req, rx) = remote.replies.register();
    let request = Request {
        req,
        reply_to: remote.replies.channel.clone(),
        timeout_ms: u64::try_from(limit.as_millis()).unwrap_or(u64::MAX),
        id: id.to_string(),
        kind,
    };
    let body = match encode(&request) {
        Ok(b) => b,
        Err(e) => {
            remote.replies.forget(req);
            return Err(codec_error::<F>(id, "the request", e));
        }
    };
    let stream = remote.bus.requests(F::NAME, remote.store.shard_of(id));
    let fut = async {
        // Handed to the owner directly where it can be, else appended to the stream. (An
        // owner that took it and died before the step that applies it was committed
        // leaves it unanswered: the caller times out, and may ask again with the same
        // id, as after any request its owner did not answer.)
        let taken = match &remote.direct {
            Some(direct) => direct.offer(&stream, &body).await,
            None => false,
        };
        if !taken {
            remote.bus.push(&[(stream, body)]).await?;
        }
        rx.await.map_err(|_| Error::Shutdown)
    };
    let reply = tokio::time::timeout(limit, fut).await;
    remote.replies.forget(req);
    match reply {
        Ok(Ok(reply)) => reply
            .result
            .map_err(|r| r.into_error(F::NAME, id, impulse_id)),
        Ok(Err(e)) => Err(e),
        Err(_) => Err(Error::Timeout {
            op: "the request to the instance's orchestrator",
            after: limit,
        }),
    }
}

/// The committed record of an instance, with its payloads read from their tiers.
async fn read<F: Flow>(remote: &Remote, id: &Arc<str>) -> Result<Record> {
    let key = InstanceKey::new(flowwire_storage::FlowName::from_static(F::NAME), id.clone());
    let limit = remote.limits.store_timeout;
    let load = tokio::time::timeout(limit, remote.store.load(&key))
        .await
        .map_err(|_| Error::Timeout {
            op: "reading the instance",
            after: limit,
        })??;
    let stored = load.ok_or_else(|| not_found::<F>(id))?;
    let placed =
        PlacedRecord::decode(&stored.bytes, &key, remote.limits.decode_limit).map_err(|e| {
            Error::Codec {
                flow: F::NAME,
                id: id.to_string(),
                what: "the record",
                source: e,
            }
        })?;
    Ok(remote.placement.resolve(&key, &placed).await?)
}

/// The instance's state as this flow version reads it (see `core::state_for_read`).
async fn read_state<F: Flow>(remote: &Remote, id: &Arc<str>) -> Result<Bytes> {
    let record = read::<F>(remote, id).await?;
    crate::core::state_for_read::<F>(&record, remote.limits.decode_limit)
        .map_err(|e| crate::engine::state_read_error::<F>(id, e))
}

/// Waits until the instance ends, whoever owns it: reads the record, then again whenever
/// the flow's owners announce the instance ended (pub/sub), and every second regardless
/// (an announcement can be lost with a connection). Without the subscription it reads
/// with a backoff (5 ms doubling to 250 ms). Stops when the caller stops waiting.
async fn finished<F: Flow>(
    remote: &Remote,
    watch: &Arc<Watch>,
    id: &Arc<str>,
    mut reply: oneshot::Sender<crate::engine::msg::EndedReply>,
) {
    let pushed = watch
        .subscribe(&remote.bus, F::NAME, remote.limits.decode_limit)
        .await;
    let (waiting, since) = watch.wait_on(id);
    let ended = wait_ended::<F>(remote, &waiting, pushed, since, id, &mut reply).await;
    watch.unregister(id, waiting);
    if let Some(ended) = ended {
        let _ = reply.send(ended.map(|(e, record)| {
            let state = record.and_then(|r| {
                crate::core::final_state::<F>(id, &e, &r, remote.limits.decode_limit)
            });
            (e, state)
        }));
    }
}

async fn wait_ended<F: Flow>(
    remote: &Remote,
    waiting: &Waiting,
    pushed: bool,
    since: Since,
    id: &Arc<str>,
    reply: &mut oneshot::Sender<crate::engine::msg::EndedReply>,
) -> Option<Result<(Ended, Option<Record>)>> {
    let key = InstanceKey::new(flowwire_storage::FlowName::from_static(F::NAME), id.clone());
    let mut delay = Duration::from_millis(5);
    // Started here while the watch listened, its end not yet heard: the first look is
    // for its announcement, not at the store.
    let mut unheard = matches!(since, Since::NotYet);
    loop {
        // Listening before reading: an announcement made meanwhile is not missed.
        let announced = waiting.notify.notified();
        tokio::pin!(announced);
        announced.as_mut().enable();
        if reply.is_closed() {
            return None;
        }
        let carried = waiting.take();
        let seen = waiting.seen();
        if carried.is_none() && std::mem::take(&mut unheard) && !seen {
            // Not read: the store holds nothing newer than "running" until the end is
            // announced. A wait of a second at most, then the store as usual.
            tokio::select! {
                () = announced => {}
                () = tokio::time::sleep(Duration::from_secs(1)) => {}
                () = reply.closed() => return None,
            }
            continue;
        }
        // The record an announcement carried is the one its step committed (decoded
        // against this instance's key like any read): no trip to the store for it.
        let stored = match carried {
            Some(bytes) => Ok(Some(bytes)),
            None => remote.store.load(&key).await.map(|s| s.map(|s| s.bytes)),
        };
        let placed = match stored {
            Ok(Some(bytes)) => PlacedRecord::decode(&bytes, &key, remote.limits.decode_limit)
                .map(Some)
                .map_err(|e| Error::Codec {
                    flow: F::NAME,
                    id: id.to_string(),
                    what: "the record",
                    source: e,
                }),
            Ok(None) => Ok(None),
            Err(e) => Err(e.into()),
        };
        // The record of an end no operator can undo comes back with it (its state is the
        // caller's result); a payload that cannot be read now only costs the caller a read.
        let with_state =
            async |placed: &PlacedRecord| remote.placement.resolve(&key, placed).await.ok();
        match placed {
            Ok(Some(p)) => match &p.record.status {
                Status::Finished => return Some(Ok((Ended::Finished, with_state(&p).await))),
                Status::Failed { reason } => {
                    let (reason, error) = (reason.clone(), p.record.error.clone());
                    return Some(Ok((Ended::Failed { reason, error }, None)));
                }
                Status::Cancelled { reason } => {
                    let reason = reason.clone();
                    return Some(Ok((Ended::Cancelled { reason }, with_state(&p).await)));
                }
                Status::Quarantined { reason } => {
                    return Some(Err(Error::Quarantined {
                        flow: F::NAME,
                        id: id.to_string(),
                        reason: reason.clone(),
                    }));
                }
                _ => {}
            },
            Ok(None) => return Some(Err(not_found::<F>(id))),
            Err(e) if !e.is_transient() => return Some(Err(e)),
            Err(_) => {}
        }
        let wait = if pushed {
            Duration::from_secs(1)
        } else {
            let d = delay;
            delay = (delay * 2).min(Duration::from_millis(250));
            d
        };
        tokio::select! {
            () = announced => {}
            () = tokio::time::sleep(wait) => {}
            () = reply.closed() => return None,
        }
    }
}
