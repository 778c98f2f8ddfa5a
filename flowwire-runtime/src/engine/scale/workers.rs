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

use std::collections::{HashMap, HashSet};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::Duration;

use bytes::Bytes;
use flowwire_storage::bus::{Entry, RedisBus};
use flowwire_storage::codec;
use tokio::sync::{Semaphore, mpsc};
use tokio::task::JoinHandle;

use super::messages::{JobMsg, OutcomeWire};
use crate::engine::Limits;
use crate::engine::job::{CallPolicy, Job, OutcomeMsg, Receipt};
use crate::meta::DriverMeta;

/// The consumer group of the workers on a driver's stream.
pub(crate) const GROUP: &str = "workers";

/// What a driver's pump needs.
pub(crate) struct WorkerCtx {
    pub bus: RedisBus,
    pub node: Arc<str>,
    pub limits: Limits,
    pub visibility: Duration,
}

/// Starts the pump, writer and keep-alive of one driver; the pool behind `port` runs the
/// calls. Returns the tasks (aborted when the engine shuts down).
pub(crate) fn spawn(
    ctx: Arc<WorkerCtx>,
    meta: &'static DriverMeta,
    port: crate::engine::queue::Port,
) -> Vec<JoinHandle<()>> {
    let stream = ctx.bus.jobs(meta.name);
    let slots = Arc::new(Semaphore::new(ctx.limits.driver_concurrency.max(1)));
    let running: Arc<Mutex<HashSet<String>>> = Arc::default();
    let (done_tx, done_rx) = mpsc::unbounded_channel::<OutcomeMsg>();
    let writer = tokio::spawn(writer(
        ctx.clone(),
        stream.clone(),
        done_rx,
        slots.clone(),
        running.clone(),
    ));
    let keeper = tokio::spawn(keep_alive(ctx.clone(), stream.clone(), running.clone()));
    let pump = tokio::spawn(pump(ctx, meta, stream, port, done_tx, slots, running));
    vec![pump, writer, keeper]
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
    done: mpsc::UnboundedSender<OutcomeMsg>,
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
    done: &mpsc::UnboundedSender<OutcomeMsg>,
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
        })),
    })
}

/// Writes outcomes to their shards' streams, then acknowledges their calls.
async fn writer(
    ctx: Arc<WorkerCtx>,
    stream: String,
    mut done: mpsc::UnboundedReceiver<OutcomeMsg>,
    slots: Arc<Semaphore>,
    running: Arc<Mutex<HashSet<String>>>,
) {
    while let Some(first) = done.recv().await {
        let mut batch = vec![first];
        while batch.len() < 256 {
            match done.try_recv() {
                Ok(o) => batch.push(o),
                Err(_) => break,
            }
        }
        let taken = batch.len();
        let mut entries: Vec<(String, Bytes)> = Vec::with_capacity(batch.len());
        let mut ids = Vec::with_capacity(batch.len());
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
            entries.push((receipt.reply_to, Bytes::from(out)));
            ids.push(receipt.entry);
        }
        // The outcome is durable before (or with) its call's acknowledgement. If either
        // fails, the call stays pending, stops being touched, and runs again after the
        // visibility timeout.
        let written = ctx.bus.push_then_ack(&entries, &stream, GROUP, &ids);
        if let Err(e) = written.await {
            tracing::warn!(error = %e, "outcomes not written; their calls run again later");
        }
        {
            let mut running = lock(&running);
            for id in &ids {
                running.remove(id);
            }
        }
        slots.add_permits(taken);
    }
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
