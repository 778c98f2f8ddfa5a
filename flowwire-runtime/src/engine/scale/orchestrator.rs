//! The orchestrator role: per flow, a supervisor holds leases on a fair share of the
//! shards and runs one [`Runner`] per shard it holds.
//!
//! * **Leases.** Every third of the lease's time the supervisor renews what it holds,
//!   counts the live orchestrators (heartbeats), gives back shards above its fair share
//!   (`ceil(shards / live)`) and takes free ones up to it. An orchestrator that joins gets
//!   shards as the others give theirs back; one that dies loses them when its leases run out.
//! * **Fencing.** A shard's runner writes with its lease's token, and the store refuses a
//!   write under a token older than the newest one granted for the shard (the runner then
//!   stops). A runner also commits nothing once its lease may have run out: the lease
//!   holds until 80 % of its TTL after the renewal Redis last confirmed was *sent*
//!   ([`LeaseDeadline`]); a renewal that fails or whose reply is lost moves nothing.
//! * **Handover.** Giving a shard back stops its runner after its last commit, waits until
//!   every call it committed is on the bus, and marks the release clean: the next owner
//!   then sends no call again. After a crash (a lease that ran out), the next owner sends
//!   the calls in flight again, with the same idempotency keys.
//! * **Inputs.** A pump per shard feeds the shard's request and outcome streams (what the
//!   previous owner left unacknowledged first), read for all the shards together on one
//!   server (`joint`). An outcome is acknowledged once its step is
//!   committed or it is no longer needed; a request once it is answered.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use flowwire_storage::bus::{Lease, RedisBus};
use flowwire_storage::{InstanceStore, Placement, Retention};
use tokio::sync::{mpsc, oneshot};
use tokio::task::JoinHandle;
use tokio::time::Instant;

use super::feed::{Acker, GROUP, pump};
use super::joint::PAGE;
use super::messages::{JobMsg, Outbox};
use super::server_time::ServerTime;
use crate::engine::Limits;
use crate::engine::health::HeldShard;
use crate::engine::job::Job;
use crate::engine::lease::LeaseDeadline;
use crate::engine::msg::Msg;
use crate::engine::runner::{Owned, Runner};
use crate::error::Result;
use crate::events::Emitter;
use crate::flow::Flow;

/// What every shard runner of this process shares.
pub(crate) struct Orchestra {
    /// Where the shards' runners send their child calls (served in this process).
    pub children: crate::engine::children::ChildPort,
    pub bus: RedisBus,
    pub node: Arc<str>,
    pub store: Arc<dyn InstanceStore>,
    pub placement: Arc<Placement>,
    pub retention: Retention,
    pub limits: Limits,
    pub events: Emitter,
    pub lease_ttl: Duration,
    /// The shards held, per flow, for [`crate::Engine::health`].
    pub held: crate::engine::health::Held,
    /// Redis's clock, read at every heartbeat (request deadlines are on it).
    pub server_time: ServerTime,
    /// On one server, the reader of every held shard's streams (`None`: each shard reads
    /// its own).
    pub joint: Option<Arc<super::joint::Joint>>,
    /// On one server, where workers send this process's shards their outcomes directly.
    pub inbox: Option<Arc<super::handoff::Inbox>>,
}

impl Orchestra {
    /// Reports the leases held now; those given up or lost since the last report stay
    /// listed, released, until the next one, so that their final spans are seen.
    fn hold<F: Flow>(&self, owned: &BTreeMap<u16, ShardRun<F>>) {
        let mut held = self
            .held
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        let before = held.remove(F::NAME).unwrap_or_default();
        let mut shards: Vec<HeldShard> = owned
            .iter()
            .map(|(shard, run)| HeldShard {
                shard: *shard,
                token: run.token,
                lease: run.lease.clone(),
                released: false,
            })
            .collect();
        shards.extend(
            before
                .into_iter()
                .filter(|h| !h.released && owned.get(&h.shard).is_none_or(|r| r.token != h.token))
                .map(|h| HeldShard {
                    released: true,
                    ..h
                }),
        );
        held.insert(F::NAME, shards);
    }
}

struct ShardRun<F: Flow> {
    token: u64,
    tx: mpsc::Sender<Msg<F>>,
    runner: JoinHandle<()>,
    pump: JoinHandle<()>,
    /// Ends once every call the runner dispatched is on the bus; `true` if all got there.
    sink: JoinHandle<bool>,
    /// Until when the lease surely holds (shared with the runner, which commits nothing
    /// after it).
    lease: LeaseDeadline,
}

/// Stops the supervisor: it gives its shards back cleanly, then answers.
pub(crate) type Stop = oneshot::Sender<oneshot::Sender<()>>;

/// Starts the supervisor of flow `F`.
pub(crate) fn spawn_supervisor<F: Flow>(o: Arc<Orchestra>) -> (Stop, JoinHandle<()>) {
    let (stop, mut stopped) = oneshot::channel::<oneshot::Sender<()>>();
    let task = tokio::spawn(async move {
        let mut owned: BTreeMap<u16, ShardRun<F>> = BTreeMap::new();
        let every = o.lease_ttl / 3;
        loop {
            round(&o, &mut owned).await;
            o.hold(&owned);
            tokio::select! {
                done = &mut stopped => {
                    for (shard, run) in std::mem::take(&mut owned) {
                        give_back(&o, F::NAME, shard, run).await;
                    }
                    o.hold(&owned);
                    if let Ok(done) = done {
                        let _ = done.send(());
                    }
                    return;
                }
                () = tokio::time::sleep(every) => {}
            }
        }
    });
    (stop, task)
}

/// One pass of the lease keeping (see the module docs).
async fn round<F: Flow>(o: &Orchestra, owned: &mut BTreeMap<u16, ShardRun<F>>) {
    let ttl = o.lease_ttl;
    // Runners that stopped by themselves (a newer owner wrote, or a panic).
    let stopped: Vec<u16> = owned
        .iter()
        .filter(|(_, r)| r.runner.is_finished())
        .map(|(s, _)| *s)
        .collect();
    for shard in stopped {
        if let Some(run) = owned.remove(&shard) {
            // Its span ends (the runner ended it when it stopped on its lease).
            run.lease.end();
            run.pump.abort();
            let _ = run.sink.await;
            let _ = o
                .bus
                .release(F::NAME, shard, &o.node, run.token, false)
                .await;
        }
    }
    // Every lease is renewed at once, each bounded by its own deadline: a stalled Redis
    // costs one deadline, not one per shard.
    let mut renewals = tokio::task::JoinSet::new();
    for (shard, run) in owned.iter() {
        let (bus, node, shard, token) = (o.bus.clone(), o.node.clone(), *shard, run.token);
        let until = run.lease.until();
        renewals.spawn(async move {
            let sent = Instant::now();
            let renewed =
                tokio::time::timeout_at(until, bus.renew(F::NAME, shard, &node, token, ttl)).await;
            (shard, sent, renewed)
        });
    }
    let mut lost = Vec::new();
    while let Some(joined) = renewals.join_next().await {
        let Ok((shard, sent, renewed)) = joined else {
            continue;
        };
        let Some(run) = owned.get(&shard) else {
            continue;
        };
        match renewed {
            Ok(Ok(true)) => run.lease.renewed(sent, ttl),
            Ok(Ok(false)) => lost.push(shard),
            Ok(Err(e)) => tracing::warn!(flow = F::NAME, shard, error = %e, "lease not renewed"),
            Err(_) => tracing::warn!(flow = F::NAME, shard, "lease renewal unanswered"),
        }
    }
    // A lease whose renewal failed or went unanswered is counted as gone once its deadline
    // passed (its runner already commits nothing after it).
    for (shard, run) in owned.iter() {
        if !run.lease.holds() && !lost.contains(shard) {
            lost.push(*shard);
        }
    }
    for shard in lost {
        if let Some(run) = owned.remove(&shard) {
            tracing::warn!(flow = F::NAME, shard, "shard lease lost; its runner stops");
            run.runner.abort();
            run.lease.end();
            run.pump.abort();
            let _ = run.sink.await;
        }
    }
    o.hold(owned);
    // Bounded like the round's cadence: a stalled Redis must not hold up the next renewal.
    let sent = Instant::now();
    let members = match tokio::time::timeout(ttl / 3, o.bus.heartbeat(&o.node, ttl)).await {
        Ok(Ok(m)) => {
            o.server_time.read(sent, m.server_ms);
            m
        }
        Ok(Err(e)) => {
            tracing::warn!(flow = F::NAME, error = %e, "heartbeat failed");
            return;
        }
        Err(_) => {
            tracing::warn!(flow = F::NAME, "heartbeat unanswered");
            return;
        }
    };
    let shards = o.bus.shards();
    let live = members.live.max(1);
    let fair = usize::from(shards).div_ceil(live);
    while owned.len() > fair {
        let Some((shard, run)) = owned.pop_last() else {
            break;
        };
        tracing::info!(flow = F::NAME, shard, live, "shard given back to rebalance");
        give_back(o, F::NAME, shard, run).await;
    }
    if owned.len() >= fair {
        return;
    }
    // Start where this member's share would begin, so members do not all race for the
    // same shards.
    let offset = (members.rank * usize::from(shards)) / live;
    for k in 0..usize::from(shards) {
        if owned.len() >= fair {
            break;
        }
        let shard = ((offset + k) % usize::from(shards)) as u16;
        if owned.contains_key(&shard) {
            continue;
        }
        let asked = Instant::now();
        // A lease taken whose reply is lost runs out by itself.
        let lease = match tokio::time::timeout(ttl / 3, o.bus.acquire(F::NAME, shard, &o.node, ttl))
            .await
        {
            Ok(Ok(Some(lease))) => lease,
            Ok(Ok(None)) => continue,
            Ok(Err(e)) => {
                tracing::warn!(flow = F::NAME, shard, error = %e, "lease not taken");
                break;
            }
            Err(_) => {
                tracing::warn!(flow = F::NAME, shard, "lease request unanswered");
                break;
            }
        };
        match start_shard::<F>(o, shard, lease, LeaseDeadline::granted(asked, ttl)).await {
            Ok(run) => {
                tracing::info!(
                    flow = F::NAME,
                    shard,
                    token = lease.token,
                    clean = lease.clean,
                    "shard taken"
                );
                owned.insert(shard, run);
            }
            Err(e) => {
                tracing::warn!(flow = F::NAME, shard, error = %e, "shard not started; lease given back");
                let _ = o
                    .bus
                    .release(F::NAME, shard, &o.node, lease.token, false)
                    .await;
            }
        }
    }
}

/// Stops a shard's runner after its last commit, waits for its dispatches to reach the
/// bus, and releases the lease (clean if they all did).
async fn give_back<F: Flow>(o: &Orchestra, flow: &'static str, shard: u16, run: ShardRun<F>) {
    let (reply, done) = oneshot::channel();
    let limit = o.limits.store_timeout;
    let stopped = async {
        if run.tx.send(Msg::Shutdown { reply }).await.is_ok() {
            let _ = done.await;
        }
    };
    let clean = tokio::time::timeout(limit, stopped).await.is_ok();
    if !clean {
        run.runner.abort();
    }
    run.pump.abort();
    drop(run.tx);
    let sent = matches!(tokio::time::timeout(limit, run.sink).await, Ok(Ok(true)));
    let clean = clean && sent;
    // The runner is stopped: the lease's span ends here, before the release lets another
    // orchestrator take the shard.
    run.lease.end();
    if let Err(e) = o.bus.release(flow, shard, &o.node, run.token, clean).await {
        tracing::warn!(flow, shard, error = %e, "lease not released; it runs out by itself");
    }
}

async fn start_shard<F: Flow>(
    o: &Orchestra,
    shard: u16,
    lease: Lease,
    deadline: LeaseDeadline,
) -> Result<ShardRun<F>> {
    let streams = [
        o.bus.requests(F::NAME, shard),
        o.bus.outcomes(F::NAME, shard),
    ];
    for s in &streams {
        o.bus.ensure_group(s, GROUP).await?;
    }
    let (jobs_tx, jobs_rx) = crate::engine::queue::channel(o.limits.driver_queue);
    let (acks_tx, acks_rx) = mpsc::unbounded_channel::<String>();
    let (ended_tx, ended_rx) = mpsc::unbounded_channel::<Arc<str>>();
    let ports = vec![jobs_tx; F::LINKS.len()];
    let (mut runner, orx) = Runner::<F>::new(
        o.store.clone(),
        o.placement.clone(),
        o.retention,
        ports,
        o.limits.clone(),
        o.events.clone(),
    );
    runner.children(o.children.clone());
    runner.own(Owned {
        shard,
        token: lease.token,
        lease: deadline.clone(),
        clean: lease.clean,
        acks: acks_tx,
        ended: ended_tx,
        outbox: o
            .store
            .carries_sends()
            .then(|| Outbox::new(o.bus.clone(), F::NAME, shard)),
    });
    let outcomes = runner.outcome_port();
    let acker = Acker::new(o.bus.clone(), o.limits.store_timeout);
    runner.recover().await?;
    let (tx, rx) = mpsc::channel::<Msg<F>>(4096);
    let runner = tokio::spawn(runner.run(rx, orx));
    let sink = tokio::spawn(sink(
        o.bus.clone(),
        F::NAME,
        shard,
        streams[1].clone(),
        jobs_rx,
        acks_rx,
        ended_rx,
        o.limits.store_timeout,
        acker.clone(),
    ));
    let handoff = o
        .store
        .carries_sends()
        .then(|| o.bus.handoffs(F::NAME, shard));
    let pump = tokio::spawn(pump::<F>(
        o.bus.clone(),
        o.node.clone(),
        (streams, handoff),
        tx.clone(),
        outcomes,
        o.limits.decode_limit,
        o.server_time.clone(),
        acker,
        o.lease_ttl / 2,
        (o.joint.clone(), o.inbox.clone()),
    ));
    Ok(ShardRun {
        token: lease.token,
        tx,
        runner,
        pump,
        sink,
        lease: deadline,
    })
}

/// Puts the runner's dispatched calls on their drivers' streams, acknowledges the
/// outcomes it is done with and announces the instances that ended, in batches. Ends when
/// the runner is gone; `true` if every call reached the bus.
#[allow(clippy::too_many_arguments)]
async fn sink(
    bus: RedisBus,
    flow: &'static str,
    shard: u16,
    outcomes: String,
    jobs: crate::engine::queue::Jobs,
    mut acks: mpsc::UnboundedReceiver<String>,
    mut ended: mpsc::UnboundedReceiver<Arc<str>>,
    limit: Duration,
    acker: Acker,
) -> bool {
    let mut all_sent = true;
    let (mut jobs_open, mut acks_open, mut ended_open) = (true, true, true);
    let channel = bus.ended(flow);
    while jobs_open || acks_open || ended_open {
        tokio::select! {
            job = jobs.recv(), if jobs_open => match job {
                Some(job) => {
                    let mut batch = vec![job];
                    while batch.len() < PAGE {
                        match jobs.try_recv() {
                            Some(j) => batch.push(j),
                            None => break,
                        }
                    }
                    let entries: Vec<(String, Bytes)> = batch
                        .iter()
                        .filter_map(|j| encode_job(&bus, flow, shard, j))
                        .collect();
                    if !push_with_retry(&bus, &entries, limit).await {
                        // Left for the next owner: a shard given back now is not clean.
                        all_sent = false;
                    }
                }
                None => jobs_open = false,
            },
            id = acks.recv(), if acks_open => match id {
                Some(id) => {
                    let mut ids = vec![id];
                    while ids.len() < PAGE {
                        match acks.try_recv() {
                            Ok(i) => ids.push(i),
                            Err(_) => break,
                        }
                    }
                    // Tried again, or claimed and fed again by the pump: an outcome
                    // fed twice applies once (it is no longer in flight).
                    acker.ack(&outcomes, &ids).await;
                }
                None => acks_open = false,
            },
            id = ended.recv(), if ended_open => match id {
                Some(id) => {
                    let mut ids = vec![id];
                    while ids.len() < PAGE {
                        match ended.try_recv() {
                            Ok(i) => ids.push(i),
                            Err(_) => break,
                        }
                    }
                    // A lost announcement costs a waiter its next read of the record
                    // (callers of `finished()` read it every second regardless).
                    let bodies: Vec<&[u8]> = ids.iter().map(|i| i.as_bytes()).collect();
                    if let Err(e) = bus.publish_all(&channel, &bodies).await {
                        tracing::warn!(flow, shard, error = %e, "ended instances not announced");
                    }
                }
                None => ended_open = false,
            },
        }
    }
    all_sent
}

/// Pushes entries, trying again with backoff for up to `limit` (the calls are committed:
/// they must get out).
async fn push_with_retry(bus: &RedisBus, entries: &[(String, Bytes)], limit: Duration) -> bool {
    let start = Instant::now();
    let mut delay = Duration::from_millis(20);
    loop {
        match bus.push(entries).await {
            Ok(()) => return true,
            Err(e) if start.elapsed() < limit => {
                tracing::warn!(error = %e, retry_in = ?delay, "calls not on the bus yet");
                tokio::time::sleep(delay).await;
                delay = (delay * 2).min(Duration::from_secs(2));
            }
            Err(e) => {
                tracing::error!(error = %e, "calls not on the bus; the next owner of the shard sends them again");
                return false;
            }
        }
    }
}

fn encode_job(bus: &RedisBus, flow: &str, shard: u16, job: &Job) -> Option<(String, Bytes)> {
    let msg = JobMsg {
        flow: flow.to_string(),
        shard,
        id: job.id.to_string(),
        seq: job.seq,
        branch: job.branch,
        method: job.method,
        redelivered: job.redelivered,
        attempt: job.attempt,
        call: job.call.clone(),
    };
    Some((bus.jobs(job.names.0), msg.encode()?))
}
