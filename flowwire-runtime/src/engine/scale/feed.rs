//! A shard's feed: what its runner takes from the shard's two streams (requests from
//! clients, outcomes from workers), decoded and handed over in stream order — first the
//! entries left pending (by an earlier owner, or by a read of this one that failed), then
//! new ones — and, on one Redis server, the outcomes workers hand over on the shard's
//! handoff channel.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use bytes::Bytes;
use flowwire_storage::bus::{Entry, RedisBus};
use flowwire_storage::codec;
use tokio::sync::{mpsc, oneshot};
use tokio::time::Instant;

use super::handoff::Inbox;
use super::joint::{Joint, PAGE};
use super::messages::{Handoff, OutcomeWire, Refusal, Reply, Request, RequestKind};
use super::server_time::{ServerTime, appended_ms};
use crate::engine::msg::{BusRequest, Msg, StreamEntry};
use crate::engine::outcomes::OutcomeTx;
use crate::error::Error;
use crate::flow::Flow;

/// The consumer group of the orchestrators on a shard's streams.
pub(crate) const GROUP: &str = flowwire_storage::bus::ORCHESTRATORS;

/// Acknowledges (and deletes) the entries a shard's owner is done with.
///
/// An acknowledgement that fails — its connection was cut, Redis paused past the
/// response timeout — is tried again with backoff for up to the store timeout, because
/// an entry left on this consumer's pending list is read by nobody while this owner keeps
/// the shard (a read of new entries never returns it). If it still fails, the pump is
/// asked to claim the shard's pending entries again: they are fed once more, applied at
/// most once (an outcome by its step, a request by its id or its start) and
/// acknowledged then.
#[derive(Clone)]
pub(crate) struct Acker {
    bus: RedisBus,
    limit: Duration,
    reclaim: Arc<AtomicBool>,
    /// Told when `reclaim` is set.
    wanted: Arc<tokio::sync::Notify>,
}

impl Acker {
    pub(crate) fn new(bus: RedisBus, limit: Duration) -> Acker {
        Acker {
            bus,
            limit,
            reclaim: Arc::new(AtomicBool::new(false)),
            wanted: Arc::new(tokio::sync::Notify::new()),
        }
    }

    /// Acknowledges `ids` of `stream`; `false` if it could not within the store timeout
    /// (the pump then claims them again).
    pub(crate) async fn ack(&self, stream: &str, ids: &[String]) -> bool {
        let start = Instant::now();
        let mut delay = Duration::from_millis(20);
        loop {
            match self.bus.ack(stream, GROUP, ids).await {
                Ok(()) => return true,
                Err(e) if start.elapsed() < self.limit => {
                    tracing::debug!(stream, error = %e, retry_in = ?delay, "entries not acknowledged yet");
                    tokio::time::sleep(delay).await;
                    delay = (delay * 2).min(Duration::from_secs(1));
                }
                Err(e) => {
                    tracing::warn!(stream, error = %e, "entries not acknowledged; they are claimed and fed again");
                    self.reclaim.store(true, Ordering::Release);
                    self.wanted.notify_one();
                    return false;
                }
            }
        }
    }

    /// Whether an acknowledgement was given up since the last call.
    fn must_reclaim(&self) -> bool {
        self.reclaim.swap(false, Ordering::AcqRel)
    }

    /// Resolves once an acknowledgement was given up (see [`Acker::must_reclaim`]).
    async fn reclaim_wanted(&self) {
        loop {
            if self.must_reclaim() {
                return;
            }
            self.wanted.notified().await;
        }
    }
}

/// Feeds a shard's runner from its streams: first what earlier owners left
/// unacknowledged, then new entries. After a read that failed — it may have timed out on
/// this side after Redis handed it entries, which then sit on this consumer's pending
/// list where a read of new entries never finds them — and after an acknowledgement given
/// up (see [`Acker`]), the pending entries are claimed again before new ones are read.
/// (An entry fed twice is harmless: an outcome applies once by its step, a request once
/// by its id or its start.)
///
/// Every `sweep` (half the lease), the entries pending on other consumers are claimed
/// and fed too: a reader of an earlier owner may take new entries after this one claimed
/// the shard's pending list (a blocked read registered before the shard changed hands
/// is still served), and those would otherwise wait for the next change of owner — an
/// outcome among them leaves its flow waiting, a request its caller.
///
/// With `handoff` (a channel), the outcomes handed over on it are fed too, for as long as
/// the pump runs; and with `inbox` too, the outcomes and the requests handed over
/// directly (`handoff.rs`).
#[allow(clippy::too_many_arguments)]
pub(crate) async fn pump<F: Flow>(
    bus: RedisBus,
    node: Arc<str>,
    (streams, handoff): ([String; 2], Option<String>),
    tx: mpsc::Sender<Msg<F>>,
    outcomes: OutcomeTx,
    limit: usize,
    server_time: ServerTime,
    acker: Acker,
    sweep: Duration,
    (joint, inbox): (Option<Arc<Joint>>, Option<Arc<Inbox>>),
) {
    let carries = handoff.is_some();
    let feed = Arc::new(Feed {
        streams: streams.clone(),
        tx,
        outcomes: outcomes.clone(),
        limit,
        server_time,
        carries,
        acker: acker.clone(),
    });
    let direct = feed.clone();
    let handed = async {
        match handoff {
            Some(channel) => {
                // Routed here for as long as the pump runs, and advertised for the workers
                // and the callers (by the pump itself: a pump stopped advertises nothing
                // late): outcomes under the handoff channel, requests under the request
                // stream's name.
                let _routes = inbox.as_ref().map(|inbox| {
                    (
                        inbox.route(channel.clone(), outcomes.clone()),
                        inbox.route_requests(
                            streams[0].clone(),
                            Arc::new(move |request, body| direct.direct(request, body)),
                        ),
                    )
                });
                let advertised = async {
                    if let Some(inbox) = &inbox {
                        advertise(&bus, &channel, inbox.endpoint()).await;
                        advertise(&bus, &streams[0], inbox.endpoint()).await;
                    }
                };
                tokio::join!(advertised, take_handoffs(&bus, &channel, &outcomes, limit));
            }
            None => std::future::pending().await,
        }
    };
    let read = async {
        match joint {
            Some(joint) => read_joined(&bus, &node, &joint, feed, &acker, sweep).await,
            None => read_streams(&bus, &node, &feed, &acker, sweep).await,
        }
    };
    tokio::select! {
        () = read => {}
        () = handed => {}
    }
}

/// Advertises where this process takes the shard's outcomes directly, trying again until
/// it could (meanwhile, and if it never can, workers publish them).
async fn advertise(bus: &RedisBus, channel: &str, endpoint: &str) {
    let mut failures = 0u32;
    while let Err(e) = bus.advertise(channel, endpoint).await {
        failures = failures.saturating_add(1);
        tracing::warn!(channel, error = %e, "direct handoff address not advertised yet");
        tokio::time::sleep(super::pause(failures)).await;
    }
}

/// Feeds the outcomes handed over on `channel` (listened to on the connection the
/// process's shards share, again when it is lost; a message lost meanwhile is written to
/// the stream by its worker).
async fn take_handoffs(bus: &RedisBus, channel: &str, outcomes: &OutcomeTx, limit: usize) {
    let mut failures = 0u32;
    loop {
        let mut sub = match bus.listen(channel).await {
            Ok(s) => s,
            Err(e) => {
                failures = failures.saturating_add(1);
                tracing::warn!(channel, error = %e, "handoff channel not subscribed yet");
                tokio::time::sleep(super::pause(failures)).await;
                continue;
            }
        };
        failures = 0;
        while let Some(body) = sub.next().await {
            match Handoff::open(&body, limit) {
                Ok(o) => {
                    let _ = outcomes.send(o);
                }
                // Its worker writes it to the stream when no commit settles its call.
                Err(e) => {
                    tracing::warn!(channel, error = %e, "handed-over outcome does not decode; left to its worker");
                }
            }
        }
    }
}

/// Feeds the shard's streams (see [`pump`]), read on a connection of its own.
async fn read_streams<F: Flow>(
    bus: &RedisBus,
    node: &Arc<str>,
    feed: &Feed<F>,
    acker: &Acker,
    sweep: Duration,
) {
    let streams = &feed.streams;
    let mut failures = 0u32;
    // Each reader starts by claiming the pending entries (the first one, and each one
    // after a failed read): no new entry is read before a claim succeeded.
    loop {
        let mut reader = match bus.reader().await {
            Ok(r) => r,
            Err(e) => {
                failures = failures.saturating_add(1);
                tracing::warn!(error = %e, "shard streams not readable yet");
                tokio::time::sleep(super::pause(failures)).await;
                continue;
            }
        };
        if let Err(e) = claim_pending(bus, node, streams, feed).await {
            failures = failures.saturating_add(1);
            tracing::warn!(error = %e, "entries left pending not claimed yet");
            tokio::time::sleep(super::pause(failures)).await;
            continue;
        }
        let mut next_sweep = Instant::now() + sweep;
        loop {
            match reader
                .read(streams, GROUP, node, PAGE, Duration::from_secs(1))
                .await
            {
                Ok(entries) => {
                    failures = 0;
                    for e in entries {
                        feed.take(e);
                    }
                    if acker.must_reclaim() {
                        break;
                    }
                    if Instant::now() >= next_sweep {
                        if let Err(e) = claim_others(bus, node, streams, feed).await {
                            failures = failures.saturating_add(1);
                            tracing::warn!(error = %e, "entries pending elsewhere not claimed");
                            tokio::time::sleep(super::pause(failures)).await;
                            break;
                        }
                        next_sweep = Instant::now() + sweep;
                    }
                }
                Err(e) => {
                    failures = failures.saturating_add(1);
                    tracing::warn!(error = %e, "shard streams not readable");
                    tokio::time::sleep(super::pause(failures)).await;
                    break;
                }
            }
        }
    }
}

/// Feeds the shard's streams read by the process's [`Joint`] (one server): claims the
/// entries left pending, has the joint read the new ones, and claims again after a read
/// or an acknowledgement that failed (see the joint's module docs); every `sweep`, claims
/// the entries pending on other consumers, as [`read_streams`] does.
async fn read_joined<F: Flow>(
    bus: &RedisBus,
    node: &Arc<str>,
    joint: &Arc<Joint>,
    feed: Arc<Feed<F>>,
    acker: &Acker,
    sweep: Duration,
) {
    let streams = feed.streams.clone();
    let take: super::joint::Take = {
        let feed = feed.clone();
        Arc::new(move |e| feed.take(e))
    };
    let joined = joint.join(streams.clone(), take);
    let mut failures = 0u32;
    loop {
        // Inactive here: no read of the joint covers the shard until the claim is done.
        joined.settle().await;
        if let Err(e) = claim_pending(bus, node, &streams, &feed).await {
            failures = failures.saturating_add(1);
            tracing::warn!(error = %e, "entries left pending not claimed yet");
            tokio::time::sleep(super::pause(failures)).await;
            continue;
        }
        joined.activate();
        let mut next_sweep = Instant::now() + sweep;
        loop {
            tokio::select! {
                () = joined.must_reclaim() => break,
                () = acker.reclaim_wanted() => {
                    joined.deactivate();
                    break;
                }
                () = tokio::time::sleep_until(next_sweep) => {
                    if let Err(e) = claim_others(bus, node, &streams, &feed).await {
                        failures = failures.saturating_add(1);
                        tracing::warn!(error = %e, "entries pending elsewhere not claimed");
                        tokio::time::sleep(super::pause(failures)).await;
                    } else {
                        failures = 0;
                    }
                    next_sweep = Instant::now() + sweep;
                }
            }
        }
    }
}

/// Claims and feeds every entry of the shard's streams that is delivered but not
/// acknowledged — left by an earlier owner, or by a read of this one that failed —
/// page by page, in stream order.
async fn claim_pending<F: Flow>(
    bus: &RedisBus,
    node: &Arc<str>,
    streams: &[String; 2],
    feed: &Feed<F>,
) -> Result<(), flowwire_storage::StoreError> {
    for (i, stream) in streams.iter().enumerate() {
        let mut from = "0-0".to_string();
        // Bounded: each page moves the cursor on; the loop ends at the stream's end.
        for _ in 0..100_000 {
            let (entries, next) = bus
                .claim(stream, GROUP, node, Duration::ZERO, &from, PAGE)
                .await?;
            for mut e in entries {
                e.stream = i;
                feed.take(e);
            }
            if next == "0-0" {
                break;
            }
            from = next;
        }
    }
    Ok(())
}

/// Claims and feeds the entries of the shard's streams pending on other consumers (see
/// [`pump`]), page by page, in stream order.
async fn claim_others<F: Flow>(
    bus: &RedisBus,
    node: &Arc<str>,
    streams: &[String; 2],
    feed: &Feed<F>,
) -> Result<(), flowwire_storage::StoreError> {
    for (i, stream) in streams.iter().enumerate() {
        let mut from = "-".to_string();
        // Bounded: each page moves the cursor on; the loop ends at the list's end.
        for _ in 0..100_000 {
            let (entries, next) = bus.claim_others(stream, GROUP, node, &from, PAGE).await?;
            for mut e in entries {
                tracing::info!(entry = %e.id, stream = %stream, "entry pending on an earlier owner's reader claimed");
                e.stream = i;
                feed.take(e);
            }
            match next {
                Some(next) => from = next,
                None => break,
            }
        }
    }
    Ok(())
}

/// Where a request came from.
enum Origin {
    /// Read from the shard's request stream.
    Stream(StreamEntry),
    /// Handed over directly by its caller: the request as encoded.
    Direct(Bytes),
}

struct Feed<F: Flow> {
    streams: [String; 2],
    tx: mpsc::Sender<Msg<F>>,
    outcomes: OutcomeTx,
    limit: usize,
    server_time: ServerTime,
    /// Whether the store's commits carry bus messages (one server): a request's step then
    /// replies to it and settles it.
    carries: bool,
    acker: Acker,
}

impl<F: Flow> Feed<F> {
    fn take(&self, e: Entry) {
        if e.stream == 1 {
            self.outcome(e);
        } else {
            self.request(e);
        }
    }

    /// Drops an entry that can never be applied (logged).
    fn discard(&self, stream: usize, id: String, why: &str) {
        tracing::error!(flow = F::NAME, entry = %id, why, "bus entry dropped");
        let acker = self.acker.clone();
        let stream = self.streams[stream].clone();
        tokio::spawn(async move {
            acker.ack(&stream, &[id]).await;
        });
    }

    fn outcome(&self, e: Entry) {
        match codec::decode_raw::<OutcomeWire>(&e.body, self.limit) {
            Ok(o) => {
                let _ = self.outcomes.send(o.received(e.id, None));
            }
            Err(err) => self.discard(1, e.id, &err.to_string()),
        }
    }

    fn request(&self, e: Entry) {
        let request = match codec::decode_raw::<Request>(&e.body, self.limit) {
            Ok(r) => r,
            Err(err) => return self.discard(0, e.id, &err.to_string()),
        };
        // Both ends on Redis's clock: when it appended the request, and now.
        let deadline = appended_ms(&e.id).map(|at| at.saturating_add(request.timeout_ms));
        let now = self.server_time.now_ms();
        let stream = self.streams[0].clone();
        if let (Some(deadline), Some(now)) = (deadline, now)
            && now > deadline
        {
            // The caller gave up: applying it now would surprise it.
            tracing::info!(flow = F::NAME, id = %request.id, late_ms = now - deadline, "request dropped: its caller gave up on it");
            let acker = self.acker.clone();
            tokio::spawn(async move {
                acker.ack(&stream, &[e.id]).await;
            });
            return;
        }
        self.apply(
            request,
            Origin::Stream(StreamEntry {
                stream,
                group: GROUP,
                id: e.id,
            }),
        );
    }

    /// A request its caller handed over directly (`handoff.rs`; `body` as it came):
    /// applied at once (it was sent just now), and replied to as one read from the stream
    /// is, with no entry to acknowledge. If the runner has stopped (the shard is being
    /// given away), it is appended to the stream for the next owner.
    pub(super) fn direct(&self, request: Request, body: Bytes) {
        self.apply(request, Origin::Direct(body));
    }

    /// Hands a request to the runner, and replies to it unless the step that applied it
    /// did (then its entry, if it has one, was acknowledged by that step too).
    fn apply(&self, request: Request, origin: Origin) {
        let (entry, direct) = match origin {
            Origin::Stream(entry) => (Some(entry), None),
            Origin::Direct(body) => (None, Some((self.streams[0].clone(), body))),
        };
        let acker = self.acker.clone();
        let tx = self.tx.clone();
        let limit = self.limit;
        // What the step that applies it needs to reply and settle it in its own commit
        // (only where commits carry bus messages).
        let applied = Reply {
            req: request.req,
            result: Ok(()),
        };
        let mut out = Vec::new();
        let settles = entry.as_ref().map(|e| (e.stream.clone(), e.id.clone()));
        let via = (self.carries && codec::encode_raw(&applied, &mut out).is_ok())
            .then(|| Arc::new(BusRequest::new(entry, request.reply_to.clone(), out.into())));
        tokio::spawn(async move {
            let id: Arc<str> = request.id.as_str().into();
            let (reply, answer) = oneshot::channel();
            let settled = via.clone();
            let msg = match request.kind {
                RequestKind::Start { state } => {
                    codec::decode_raw::<F::State>(&state, limit).map(|state| Msg::Start {
                        id,
                        state,
                        reply,
                        via,
                    })
                }
                RequestKind::Impulse {
                    impulse_id,
                    impulse,
                } => codec::decode_raw::<F::Impulse>(&impulse, limit).map(|impulse| Msg::Impulse {
                    id,
                    impulse_id: impulse_id.into(),
                    impulse,
                    reply,
                    via,
                }),
                RequestKind::Cancel { reason } => Ok(Msg::Cancel {
                    id,
                    reason,
                    reply,
                    via,
                }),
                RequestKind::StartOrImpulse {
                    state,
                    impulse_id,
                    impulse,
                } => codec::decode_raw::<F::State>(&state, limit).and_then(|state| {
                    codec::decode_raw::<F::Impulse>(&impulse, limit).map(|impulse| {
                        Msg::StartOrImpulse {
                            id,
                            state,
                            impulse_id: impulse_id.into(),
                            impulse,
                            reply,
                            via,
                        }
                    })
                }),
            };
            let result = match msg {
                Ok(msg) => {
                    if tx.send(msg).await.is_err() {
                        // The runner stopped: the next owner answers, one read from the
                        // stream as it is; one handed over is appended there for it.
                        if let Some((stream, body)) = direct
                            && let Err(err) = acker.bus.push(&[(stream, body)]).await
                        {
                            tracing::warn!(error = %err, "request not passed on; the caller times out");
                        }
                        return;
                    }
                    match answer.await {
                        // The step's commit replied and acknowledged it.
                        Ok(r) if r.is_ok() && settled.as_ref().is_some_and(|v| v.is_settled()) => {
                            return;
                        }
                        Ok(r) => r,
                        Err(_) => return,
                    }
                }
                Err(err) => Err(Error::Remote {
                    flow: F::NAME,
                    id: request.id.clone(),
                    message: format!("the request does not decode here: {err}"),
                }),
            };
            let reply = Reply {
                req: request.req,
                result: result.map_err(|e| Refusal::of(&e)),
            };
            let mut out = Vec::new();
            if codec::encode_raw(&reply, &mut out).is_ok()
                && let Err(err) = acker.bus.publish(&request.reply_to, &out).await
            {
                tracing::warn!(error = %err, "reply not published; the caller times out");
            }
            if let Some((stream, id)) = settles {
                acker.ack(&stream, &[id]).await;
            }
        });
    }
}
