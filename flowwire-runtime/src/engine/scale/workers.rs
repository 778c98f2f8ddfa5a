//! The worker role: per registered driver, a pump takes calls from the driver trait's
//! stream (consumer group `workers`) into the local pool, and a writer puts each outcome
//! on the stream of the instance's shard and only then acknowledges the call.
//!
//! * A pump takes only as many calls as its pool has free workers, so a busy worker does
//!   not hoard calls another could run.
//! * Calls in progress are touched every third of the visibility timeout. A call whose
//!   worker died stops being touched, and after the visibility timeout any worker claims
//!   it and runs it again, with the same idempotency key and `redelivered` one higher.
//! * An outcome written but not acknowledged (the worker died in between) makes the call
//!   run again; the second outcome is dropped by the owner, whose record no longer has
//!   the call in flight.
//! * On one Redis server (whose commits carry bus messages) an outcome is first *handed
//!   over*: published on the shard's handoff channel, with the call left pending, for
//!   the owner's commit that applies it to settle the call. Nothing is written for the
//!   outcome, and no fsynced turn of Redis waits for it. A worker checks its pending
//!   calls every quarter second: a handed-over call no commit settled within a second
//!   (the owner was gone, or lost the message) has its outcome written to the stream as
//!   above; one nobody received (no subscriber) is written at once.

use std::collections::{HashMap, HashSet};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::Duration;

use tokio::time::Instant;

use bytes::Bytes;
use flowwire_storage::bus::{Entry, RedisBus};
use flowwire_storage::codec;
use tokio::sync::Semaphore;
use tokio::task::JoinHandle;

use super::messages::{Handoff, JobMsg, OutcomeWire};
use crate::engine::Limits;
use crate::engine::job::{CallPolicy, Job, Receipt};
use crate::engine::outcomes::{OutcomeRx, OutcomeTx};
use crate::meta::DriverMeta;

/// The consumer group of the workers on a driver's stream.
pub(crate) const GROUP: &str = crate::engine::job::WORKERS;

/// What a driver's pump needs.
pub(crate) struct WorkerCtx {
    pub bus: RedisBus,
    pub node: Arc<str>,
    /// Whether outcomes are handed over (the store's commits settle calls: one server).
    pub handoff: bool,
    /// Sends outcomes to their owners directly (one server; see `handoff`).
    pub outlet: Option<super::outlet::Outlet>,
    /// Set when the engine stops: the writer finishes, and writes to the stream the
    /// outcomes handed over that no commit settled yet, without waiting (see [`writer`]).
    pub stopping: tokio::sync::watch::Sender<bool>,
    pub limits: Limits,
    pub visibility: Duration,
}

/// Starts the pump, writer, checker and keep-alive of one driver; the pool behind `port`
/// runs the calls. Returns the tasks aborted when the engine shuts down, and the one it
/// waits for: the writer, which ends once `stopping` is set and what it holds is out.
pub(crate) fn spawn(
    ctx: Arc<WorkerCtx>,
    meta: &'static DriverMeta,
    port: crate::engine::queue::Port,
) -> (Vec<JoinHandle<()>>, JoinHandle<()>) {
    let stream = ctx.bus.jobs(meta.name);
    let slots = Arc::new(Semaphore::new(ctx.limits.driver_concurrency.max(1)));
    let running: Arc<Mutex<HashSet<String>>> = Arc::default();
    let handed: Arc<Mutex<Handed>> = Arc::default();
    let (done_tx, done_rx) = crate::engine::outcomes::channel();
    let writer = tokio::spawn(writer(
        ctx.clone(),
        stream.clone(),
        done_rx,
        slots.clone(),
        (running.clone(), handed.clone()),
    ));
    let keeper = tokio::spawn(keep_alive(ctx.clone(), stream.clone(), running.clone()));
    let checker = tokio::spawn(handed_over(
        ctx.clone(),
        stream.clone(),
        running.clone(),
        handed,
    ));
    let pump = tokio::spawn(pump(ctx, meta, stream, port, done_tx, slots, running));
    (vec![pump, keeper, checker], writer)
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
}

/// The flow names calls come from, kept for the process's life (events and call contexts
/// take `&'static str`). Bounded: names beyond the first 4,096 are reported as `?`.
fn intern(name: &str) -> &'static str {
    static NAMES: OnceLock<Mutex<HashMap<String, &'static str>>> = OnceLock::new();
    let mut names = lock(NAMES.get_or_init(Mutex::default));
    if let Some(n) = names.get(name) {
        return n;
    }
    if names.len() >= 4096 {
        return "?";
    }
    let leaked: &'static str = Box::leak(name.to_string().into_boxed_str());
    names.insert(name.to_string(), leaked);
    leaked
}

async fn pump(
    ctx: Arc<WorkerCtx>,
    meta: &'static DriverMeta,
    stream: String,
    port: crate::engine::queue::Port,
    done: OutcomeTx,
    slots: Arc<Semaphore>,
    running: Arc<Mutex<HashSet<String>>>,
) {
    let mut failures = 0u32;
    let mut reader = None;
    let mut next_claim = tokio::time::Instant::now();
    // Where the next claim scans the group's pending list from. A claim looks at a bounded
    // number of pending entries (Redis scans ten per entry asked for), so a pass over a
    // long list of calls in progress takes several claims, each going on where the last
    // stopped; only a pass that reached the end waits half the visibility timeout.
    let mut claim_from = "0-0".to_string();
    loop {
        // Wait for a free worker, then take as many calls as there are free workers.
        let Ok(first) = slots.clone().acquire_owned().await else {
            return;
        };
        first.forget();
        let mut free = 1;
        while free < 64 {
            match slots.clone().try_acquire_owned() {
                Ok(p) => {
                    p.forget();
                    free += 1;
                }
                Err(_) => break,
            }
        }
        let result = async {
            if reader.is_none() {
                ctx.bus.ensure_group(&stream, GROUP).await?;
                reader = Some(ctx.bus.reader().await?);
            }
            let mut taken = Vec::new();
            if tokio::time::Instant::now() >= next_claim {
                // Calls whose worker stopped touching them: it died.
                let (claimed, next) = ctx
                    .bus
                    .claim(&stream, GROUP, &ctx.node, ctx.visibility, &claim_from, free)
                    .await?;
                if next == "0-0" {
                    next_claim = tokio::time::Instant::now() + ctx.visibility / 2;
                }
                claim_from = next;
                taken.extend(claimed.into_iter().map(|e| (e, true)));
            }
            if taken.len() < free
                && let Some(r) = reader.as_mut()
            {
                let fresh = r
                    .read(
                        std::slice::from_ref(&stream),
                        GROUP,
                        &ctx.node,
                        free - taken.len(),
                        Duration::from_secs(1),
                    )
                    .await?;
                taken.extend(fresh.into_iter().map(|e| (e, false)));
            }
            Ok::<_, flowwire_storage::StoreError>(taken)
        }
        .await;
        let taken = match result {
            Ok(t) => {
                failures = 0;
                t
            }
            Err(e) => {
                slots.add_permits(free);
                reader = None;
                failures = failures.saturating_add(1);
                tracing::warn!(driver = meta.name, error = %e, "calls not readable");
                tokio::time::sleep(super::pause(failures)).await;
                continue;
            }
        };
        slots.add_permits(free - taken.len().min(free));
        for (entry, claimed) in taken {
            let id = entry.id.clone();
            match job(&ctx, meta, entry, claimed, &done) {
                Some(job) => {
                    lock(&running).insert(id);
                    if port.send(job).await.is_err() {
                        return;
                    }
                }
                None => {
                    slots.add_permits(1);
                    let _ = ctx.bus.ack(&stream, GROUP, &[id]).await;
                }
            }
        }
    }
}

/// The call in a stream entry, ready for the pool; `None` (logged) if it cannot run here.
fn job(
    ctx: &WorkerCtx,
    meta: &'static DriverMeta,
    entry: Entry,
    claimed: bool,
    done: &OutcomeTx,
) -> Option<Job> {
    let msg = match codec::decode_raw::<JobMsg>(&entry.body, ctx.limits.decode_limit) {
        Ok(m) => m,
        Err(e) => {
            tracing::error!(driver = meta.name, entry = %entry.id, error = %e, "call does not decode; dropped");
            return None;
        }
    };
    let Some(method) = meta.methods.get(usize::from(msg.method)) else {
        tracing::error!(
            driver = meta.name,
            method = msg.method,
            "call of an unknown method; dropped"
        );
        return None;
    };
    Some(Job {
        flow: intern(&msg.flow),
        id: msg.id.as_str().into(),
        seq: msg.seq,
        branch: msg.branch,
        method: msg.method,
        call: msg.call,
        // A claimed call's worker died while it ran: it may have run.
        redelivered: msg.redelivered + u32::from(claimed),
        attempt: msg.attempt,
        policy: CallPolicy::resolve(method.policy, meta.policy, ctx.limits.call_policy),
        names: (meta.name, method.name),
        reply: done.clone(),
        receipt: Some(Box::new(Receipt {
            entry: entry.id,
            reply_to: ctx.bus.outcomes(&msg.flow, msg.shard),
            handoff: ctx.handoff.then(|| ctx.bus.handoffs(&msg.flow, msg.shard)),
            handed_from: None,
        })),
    })
}

/// Outcomes handed over, by their call's entry: the outcome stream and the outcome's
/// bytes (to write them if no commit settles the call), and when.
type Handed = HashMap<String, (String, Bytes, Instant)>;

/// How long a handed-over call may stay unsettled before its outcome is written.
const HANDOFF_WAIT: Duration = Duration::from_secs(1);

/// How often a worker looks for its handed-over calls that were settled.
const HANDOFF_CHECK: Duration = Duration::from_millis(250);

/// At most how many of its pending calls a worker lists in one check.
const PENDING_PAGE: usize = 4096;

/// Hands outcomes over (one server) or writes them to their shards' streams, then
/// acknowledges their calls. Each batch is delivered by a task of its own, so that an
/// owner slow to answer (a paused process: up to a second each for its lane, the
/// connection and the answer) holds up only the outcomes offered to it, not the batches
/// after them; at most `outlet::UNDER_WAY` are under way. When the engine stops, it
/// finishes the batches at hand, writes what is left in its queue (not handed over), waits
/// for every batch under way, then writes every handed-over outcome no commit settled yet
/// (a graceful stop re-runs no finished work), and ends.
async fn writer(
    ctx: Arc<WorkerCtx>,
    stream: String,
    mut done: OutcomeRx,
    slots: Arc<Semaphore>,
    (running, handed): (Arc<Mutex<HashSet<String>>>, Arc<Mutex<Handed>>),
) {
    let mut stopping = ctx.stopping.subscribe();
    let mut under_way = tokio::task::JoinSet::new();
    loop {
        super::outlet::make_room(&mut under_way).await;
        let stop = *stopping.borrow_and_update();
        let first = if stop {
            done.try_recv()
        } else {
            tokio::select! {
                o = done.recv() => o,
                _ = stopping.changed() => continue,
            }
        };
        let Some(first) = first else {
            break;
        };
        let mut batch = vec![first];
        while batch.len() < 256 {
            match done.try_recv() {
                Some(o) => batch.push(o),
                None => break,
            }
        }
        let (ctx, stream, slots) = (ctx.clone(), stream.clone(), slots.clone());
        let (running, handed) = (running.clone(), handed.clone());
        under_way.spawn(async move {
            // The batch's slots go back to the pump however its delivery ends, a panic
            // included: a worker whose deliveries failed must not run out of slots.
            let _back = SlotsBack {
                slots,
                taken: batch.len(),
            };
            deliver(&ctx, &stream, batch, stop, (&running, &handed)).await;
        });
    }
    while under_way.join_next().await.is_some() {}
    settle(&ctx, &stream, &running, &handed, true).await;
}

/// The pump's slots a batch of outcomes took, given back when it is dropped: when its
/// delivery ends, returns early, panics or is aborted.
struct SlotsBack {
    slots: Arc<Semaphore>,
    taken: usize,
}

impl Drop for SlotsBack {
    fn drop(&mut self) {
        self.slots.add_permits(self.taken);
    }
}

/// Delivers one batch of outcomes: each offered to its owner directly where it can be,
/// published on its shard's handoff channel where not (`stop`: neither, the engine is
/// stopping), and written to its shard's stream if nobody took it; handed-over ones are
/// kept in `handed` until a commit settles their calls.
async fn deliver(
    ctx: &WorkerCtx,
    stream: &str,
    batch: Vec<crate::engine::job::OutcomeMsg>,
    stop: bool,
    (running, handed): (&Mutex<HashSet<String>>, &Mutex<Handed>),
) {
    let mut entries: Vec<(String, Bytes)> = Vec::with_capacity(batch.len());
    let mut ids = Vec::with_capacity(batch.len());
    // (call's entry, outcome stream, outcome) of each outcome offered, and its message.
    let mut offered: Vec<(String, String, Bytes)> = Vec::new();
    let mut offers: Vec<(String, Bytes)> = Vec::new();
    for o in batch {
        let Some(receipt) = o.receipt else { continue };
        let wire = OutcomeWire {
            id: o.id.to_string(),
            seq: o.seq,
            branch: o.branch,
            result: o.result,
            retry_ms: o.retry_ms,
        };
        let mut out = Vec::new();
        if let Err(e) = codec::encode_raw(&wire, &mut out) {
            tracing::error!(error = %e, "outcome not encodable");
            continue;
        }
        let out = Bytes::from(out);
        let Receipt {
            entry,
            reply_to,
            handoff,
            ..
        } = *receipt;
        let offer = handoff.filter(|_| !stop).and_then(|channel| {
            let msg = Handoff {
                jobs: stream.to_owned(),
                entry: entry.clone(),
                outcome: out.clone(),
            };
            let mut bytes = Vec::new();
            codec::encode_raw(&msg, &mut bytes)
                .ok()
                .map(|()| (channel, Bytes::from(bytes)))
        });
        match offer {
            Some(offer) => {
                offers.push(offer);
                offered.push((entry, reply_to, out));
            }
            None => {
                entries.push((reply_to, out));
                ids.push(entry);
            }
        }
    }
    if !offers.is_empty() {
        // An outcome nobody received is written at once; so are all of them when
        // the publishing failed.
        // Directly to their owners where they can be; published where not.
        let direct = match &ctx.outlet {
            Some(outlet) => outlet.offer(&offers).await,
            None => vec![false; offers.len()],
        };
        let rest: Vec<(String, Bytes)> = offers
            .iter()
            .zip(&direct)
            .filter(|(_, taken)| !**taken)
            .map(|(o, _)| o.clone())
            .collect();
        let published = ctx.bus.publish_each(&rest).await.unwrap_or_else(|e| {
            tracing::debug!(error = %e, "outcomes not handed over; written instead");
            Vec::new()
        });
        let mut published = published.into_iter();
        let heard: Vec<u64> = direct
            .iter()
            .map(|&taken| {
                if taken {
                    1
                } else {
                    published.next().unwrap_or(0)
                }
            })
            .collect();
        let now = Instant::now();
        let mut h = lock(handed);
        for (i, (entry, reply_to, out)) in offered.into_iter().enumerate() {
            if heard.get(i).is_some_and(|&n| n > 0) {
                h.insert(entry, (reply_to, out, now));
            } else {
                entries.push((reply_to, out));
                ids.push(entry);
            }
        }
    }
    if !entries.is_empty() {
        write_outcomes(ctx, stream, &entries, &ids, running).await;
    }
}

/// Writes outcomes to their shards' streams, then acknowledges their calls (which leave
/// the calls in progress).
async fn write_outcomes(
    ctx: &WorkerCtx,
    stream: &str,
    entries: &[(String, Bytes)],
    ids: &[String],
    running: &Mutex<HashSet<String>>,
) {
    // The outcome is durable before (or with) its call's acknowledgement. If either
    // fails, the call stays pending, stops being touched, and runs again after the
    // visibility timeout.
    let written = ctx.bus.push_then_ack(entries, stream, GROUP, ids);
    if let Err(e) = written.await {
        tracing::warn!(error = %e, "outcomes not written; their calls run again later");
    }
    let mut running = lock(running);
    for id in ids {
        running.remove(id);
    }
}

/// Settles the handed-over calls, every quarter second (see [`settle`]).
async fn handed_over(
    ctx: Arc<WorkerCtx>,
    stream: String,
    running: Arc<Mutex<HashSet<String>>>,
    handed: Arc<Mutex<Handed>>,
) {
    loop {
        tokio::time::sleep(HANDOFF_CHECK).await;
        settle(&ctx, &stream, &running, &handed, false).await;
    }
}

/// One pass over the handed-over calls: this worker's pending calls are listed; a
/// handed-over call no longer among them was settled by its commit, and one still there
/// a second after it was handed over (at once on the `last` pass, when the engine stops)
/// has its outcome written to the stream.
async fn settle(
    ctx: &WorkerCtx,
    stream: &str,
    running: &Mutex<HashSet<String>>,
    handed: &Mutex<Handed>,
    last: bool,
) {
    if lock(handed).is_empty() {
        return;
    }
    let pending = match ctx
        .bus
        .pending_of(stream, GROUP, &ctx.node, PENDING_PAGE)
        .await
    {
        Ok(p) => p,
        // On the last pass every one is written: a copy of an outcome already applied is
        // settled by its owner as no longer needed.
        Err(_) if last => lock(handed).keys().cloned().collect(),
        Err(e) => {
            tracing::debug!(error = %e, "calls handed over not checked yet");
            return;
        }
    };
    // A call past the end of a full page is neither settled nor pending as far as this
    // page shows: it waits for the next check.
    let page_end = (pending.len() >= PENDING_PAGE)
        .then(|| pending.last().and_then(|id| entry_order(id)))
        .flatten();
    let pending: HashSet<String> = pending.into_iter().collect();
    let mut settled = Vec::new();
    // A late one stays on the list until it is written: a pass cut short (the checker is
    // stopped with the engine) leaves it for the writer's last pass.
    let mut late: Vec<(String, String, Bytes)> = Vec::new();
    lock(handed).retain(|entry, (reply_to, out, at)| {
        if pending.contains(entry) {
            if last || at.elapsed() >= HANDOFF_WAIT {
                late.push((entry.clone(), reply_to.clone(), out.clone()));
            }
            return true;
        }
        if page_end.is_some_and(|end| entry_order(entry).is_none_or(|e| e > end)) {
            return true;
        }
        settled.push(entry.clone());
        false
    });
    {
        let mut running = lock(running);
        for id in &settled {
            running.remove(id);
        }
    }
    if !late.is_empty() {
        tracing::debug!(
            calls = late.len(),
            "handed-over outcomes not applied; written to the stream"
        );
        let (ids, entries): (Vec<String>, Vec<(String, Bytes)>) = late
            .into_iter()
            .map(|(entry, reply_to, out)| (entry, (reply_to, out)))
            .unzip();
        write_outcomes(ctx, stream, &entries, &ids, running).await;
        let mut handed = lock(handed);
        for id in &ids {
            handed.remove(id);
        }
    }
}

/// A stream entry id (`<ms>-<seq>`) as a sortable pair.
fn entry_order(id: &str) -> Option<(u64, u64)> {
    let (ms, seq) = id.split_once('-')?;
    Some((ms.parse().ok()?, seq.parse().ok()?))
}

/// Touches the calls in progress so no other worker claims them.
async fn keep_alive(ctx: Arc<WorkerCtx>, stream: String, running: Arc<Mutex<HashSet<String>>>) {
    loop {
        tokio::time::sleep(ctx.visibility / 3).await;
        let ids: Vec<String> = lock(&running).iter().cloned().collect();
        for chunk in ids.chunks(256) {
            if let Err(e) = ctx.bus.touch(&stream, GROUP, &ctx.node, chunk).await {
                tracing::warn!(error = %e, "calls in progress not touched");
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;

    use tokio::sync::Semaphore;

    use super::SlotsBack;

    /// A batch whose delivery panics gives its slots back, as one delivered does: the pump
    /// does not lose a slot per failed delivery until it takes no more calls.
    #[tokio::test]
    async fn a_batch_gives_its_slots_back_when_its_delivery_panics() {
        let slots = Arc::new(Semaphore::new(0));
        let panicked = tokio::spawn({
            let slots = slots.clone();
            async move {
                let _back = SlotsBack { slots, taken: 3 };
                panic!("a delivery that fails");
            }
        })
        .await;
        assert!(panicked.is_err_and(|e| e.is_panic()));
        assert_eq!(slots.available_permits(), 3);
        let delivered = tokio::spawn({
            let slots = slots.clone();
            async move {
                let _back = SlotsBack { slots, taken: 2 };
            }
        })
        .await;
        assert!(delivered.is_ok());
        assert_eq!(slots.available_permits(), 5);
    }
}
