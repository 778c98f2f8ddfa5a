//! A shard's feed: what its runner takes from the shard's two streams (requests from
//! clients, outcomes from workers), decoded and handed over in stream order — first the
//! entries left pending (by an earlier owner, or by a read of this one that failed), then
//! new ones.

use std::sync::Arc;
use std::time::Duration;

use flowwire_storage::bus::{Entry, RedisBus};
use flowwire_storage::codec;
use tokio::sync::{mpsc, oneshot};

use super::messages::{OutcomeWire, Refusal, Reply, Request, RequestKind};
use super::server_time::{ServerTime, appended_ms};
use crate::engine::job::{OutcomeMsg, Receipt};
use crate::engine::msg::Msg;
use crate::error::Error;
use crate::flow::Flow;

/// The consumer group of the orchestrators on a shard's streams.
pub(crate) const GROUP: &str = "orchestrators";
/// Entries taken from a stream at once.
pub(crate) const PAGE: usize = 256;

/// Feeds a shard's runner from its streams: first what earlier owners left
/// unacknowledged, then new entries. After a read that failed — it may have timed out on
/// this side after Redis handed it entries, which then sit on this consumer's pending
/// list where a read of new entries never finds them — the pending entries are claimed
/// again before new ones are read. (An entry fed twice is harmless: an outcome applies
/// once by its step, a request once by its id or its start.)
pub(crate) async fn pump<F: Flow>(
    bus: RedisBus,
    node: Arc<str>,
    streams: [String; 2],
    tx: mpsc::Sender<Msg<F>>,
    outcomes: mpsc::UnboundedSender<OutcomeMsg>,
    limit: usize,
    server_time: ServerTime,
) {
    let feed = Feed {
        bus: bus.clone(),
        streams: streams.clone(),
        tx,
        outcomes,
        limit,
        server_time,
    };
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
        if let Err(e) = claim_pending(&bus, &node, &streams, &feed).await {
            failures = failures.saturating_add(1);
            tracing::warn!(error = %e, "entries left pending not claimed yet");
            tokio::time::sleep(super::pause(failures)).await;
            continue;
        }
        loop {
            match reader
                .read(&streams, GROUP, &node, PAGE, Duration::from_secs(1))
                .await
            {
                Ok(entries) => {
                    failures = 0;
                    for e in entries {
                        feed.take(e);
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

struct Feed<F: Flow> {
    bus: RedisBus,
    streams: [String; 2],
    tx: mpsc::Sender<Msg<F>>,
    outcomes: mpsc::UnboundedSender<OutcomeMsg>,
    limit: usize,
    server_time: ServerTime,
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
        let bus = self.bus.clone();
        let stream = self.streams[stream].clone();
        tokio::spawn(async move {
            let _ = bus.ack(&stream, GROUP, &[id]).await;
        });
    }

    fn outcome(&self, e: Entry) {
        match codec::decode_raw::<OutcomeWire>(&e.body, self.limit) {
            Ok(o) => {
                let _ = self.outcomes.send(OutcomeMsg {
                    id: o.id.into(),
                    seq: o.seq,
                    branch: o.branch,
                    result: o.result,
                    receipt: Some(Box::new(Receipt {
                        entry: e.id,
                        reply_to: String::new(),
                    })),
                });
            }
            Err(err) => self.discard(1, e.id, &err.to_string()),
        }
    }

    fn request(&self, e: Entry) {
        let request = match codec::decode_raw::<Request>(&e.body, self.limit) {
            Ok(r) => r,
            Err(err) => return self.discard(0, e.id, &err.to_string()),
        };
        let bus = self.bus.clone();
        let stream = self.streams[0].clone();
        let tx = self.tx.clone();
        let limit = self.limit;
        // Both ends on Redis's clock: when it appended the request, and now.
        let deadline = appended_ms(&e.id).map(|at| at.saturating_add(request.timeout_ms));
        let now = self.server_time.now_ms();
        tokio::spawn(async move {
            if let (Some(deadline), Some(now)) = (deadline, now)
                && now > deadline
            {
                // The caller gave up: applying it now would surprise it.
                tracing::info!(flow = F::NAME, id = %request.id, late_ms = now - deadline, "request dropped: its caller gave up on it");
                let _ = bus.ack(&stream, GROUP, &[e.id]).await;
                return;
            }
            let id: Arc<str> = request.id.as_str().into();
            let (reply, answer) = oneshot::channel();
            let msg = match request.kind {
                RequestKind::Start { state } => codec::decode_raw::<F::State>(&state, limit)
                    .map(|state| Msg::Start { id, state, reply }),
                RequestKind::Impulse {
                    impulse_id,
                    impulse,
                } => codec::decode_raw::<F::Impulse>(&impulse, limit).map(|impulse| Msg::Impulse {
                    id,
                    impulse_id: impulse_id.into(),
                    impulse,
                    reply,
                }),
            };
            let result = match msg {
                Ok(msg) => {
                    if tx.send(msg).await.is_err() {
                        return; // the runner stopped: the next owner answers
                    }
                    match answer.await {
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
                && let Err(err) = bus.publish(&request.reply_to, &out).await
            {
                tracing::warn!(error = %err, "reply not published; the caller times out");
            }
            let _ = bus.ack(&stream, GROUP, &[e.id]).await;
        });
    }
}
