#![allow(missing_docs)] // test-local flows and drivers
//! Multi-process mode on a real Redis, with several engines in one test process, each
//! playing its roles as separate processes would. Orchestrators share the shards, workers
//! take the calls from streams, a client starts instances and sends impulses through the bus; shards move on
//! when orchestrators join or leave, a worker's calls are taken over when it stops; a
//! cancellation sent by a client applies once, also when sent again after the shard moved;
//! a client waiting on an instance takes its end's record from the announcement, and
//! reads nothing to see the end of an instance it started;
//! through a rolling deploy, an orchestrator of the old flow version leaves the instances a
//! new one moved on as they are; child flows run across processes, and a parent's child
//! calls follow its shard when it moves.
//! The sharing test runs again on a 3-master Redis Cluster started by the test.
//! (Over 600 lines: one scenario per test, each starting the engines it needs; they share
//! the flows, the driver and the helpers, which splitting the file would copy.)
#![cfg(feature = "redis")]

use std::collections::{BTreeMap, BTreeSet};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::Duration;

use flowwire::prelude::*;
use flowwire::storage::{Ladder, StepInput, Tier};
use flowwire::{Error, Shared};

#[path = "support/servers.rs"]
mod servers;

#[derive(Debug, Clone, Serialize, Deserialize, thiserror::Error)]
#[error("depot closed")]
pub struct Closed;

#[driver(timeout = "20s", retries = 0)]
pub trait Depot {
    async fn pack(&self, parcel: String) -> Result<u32, Closed>;
    async fn deliver(&self, parcel: String) -> Result<(), Closed>;
}

/// Counts calls by idempotency key and the largest `redelivered` seen; hangs on the
/// first call of every parcel named `stuck-…` when `hang` is set (a worker that dies
/// while running it).
#[derive(Clone, Default)]
pub struct Counter {
    calls: Arc<Mutex<BTreeMap<String, u32>>>,
    redelivered: Arc<Mutex<BTreeMap<String, u32>>>,
    hang: bool,
}

#[driver]
impl Depot for Counter {
    async fn pack(&self, parcel: String) -> Result<u32, Closed> {
        let ctx = CallContext::current().expect("a context");
        let key = ctx.idempotency_key();
        *self.calls.lock().unwrap().entry(key.clone()).or_default() += 1;
        self.redelivered
            .lock()
            .unwrap()
            .insert(key, ctx.redelivered());
        if self.hang && parcel.starts_with("stuck-") {
            std::future::pending::<()>().await;
        }
        Ok(u32::try_from(parcel.len()).unwrap_or(0))
    }

    async fn deliver(&self, _parcel: String) -> Result<(), Closed> {
        let key = CallContext::current().expect("a context").idempotency_key();
        *self.calls.lock().unwrap().entry(key).or_default() += 1;
        Ok(())
    }
}

#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct ParcelState {
    id: String,
    weight: Option<u32>,
    address: Option<String>,
    rested: bool,
    delivered: bool,
}

/// Packs, waits for an address, rests (a durable timer), delivers.
#[flow]
pub struct Parcel {
    #[link]
    state: ParcelState,
    #[link]
    depot: impl Depot,
}

#[flow]
impl Parcel {
    #[wire]
    fn run(&mut self) -> Command<Self> {
        let s = &self.state;
        if s.weight.is_none() {
            return Command::drive(self.depot.pack(s.id.clone())).then(|f, r| {
                f.state.weight = Some(r?);
                Ok(())
            });
        }
        if s.address.is_none() {
            return Command::wait();
        }
        if !s.rested {
            return Command::sleep(Duration::from_millis(20)).then(|f| {
                f.state.rested = true;
                Ok(())
            });
        }
        if !s.delivered {
            return Command::drive(self.depot.deliver(s.id.clone())).then(|f, r| {
                r?;
                f.state.delivered = true;
                Ok(())
            });
        }
        Command::finish()
    }

    #[impulse]
    fn address(&mut self, to: String) {
        self.state.address = Some(to);
    }

    #[probe]
    fn weight(&self) -> Option<u32> {
        self.state.weight
    }
}

fn redis() -> &'static servers::Redis {
    static SERVER: OnceLock<servers::Redis> = OnceLock::new();
    SERVER.get_or_init(servers::Redis::start)
}

fn cluster() -> &'static servers::RedisCluster {
    static CLUSTER: OnceLock<servers::RedisCluster> = OnceLock::new();
    CLUSTER.get_or_init(servers::RedisCluster::start)
}

/// The deployment of a test: on the 3-master cluster when its prefix starts with
/// `cluster-`, else on one server.
/// Version 2 of the parcel, as a rolling deploy brings it: it reads version 1's states as
/// they are, and after the address it waits for a `done`.
#[flow(name = "Parcel", version = 2, migrate = same_state)]
pub struct ParcelTwo {
    #[link]
    state: ParcelState,
    #[link]
    depot: impl Depot,
}

fn same_state(s: ParcelState) -> ParcelState {
    s
}

#[flow]
impl ParcelTwo {
    #[wire]
    fn run(&mut self) -> Command<Self> {
        let s = &self.state;
        if s.weight.is_none() {
            return Command::drive(self.depot.pack(s.id.clone())).then(|f, r| {
                f.state.weight = Some(r?);
                Ok(())
            });
        }
        if s.delivered {
            return Command::finish();
        }
        Command::wait()
    }

    #[impulse]
    fn address(&mut self, to: String) {
        self.state.address = Some(to);
    }

    #[impulse]
    fn done(&mut self) {
        self.state.delivered = true;
    }
}

fn shared(prefix: &str) -> Shared {
    let on = if prefix.starts_with("cluster-") {
        let urls = cluster().urls();
        let seeds: Vec<&str> = urls.iter().map(String::as_str).collect();
        Shared::cluster(&seeds, prefix)
    } else {
        Shared::redis(&redis().url(), prefix)
    };
    on.unwrap()
        .shards(8)
        .lease_ttl(Duration::from_millis(900))
        .visibility_timeout(Duration::from_millis(900))
        .audit_writes()
}

async fn orchestrator(prefix: &str, name: &str) -> Engine {
    Engine::builder()
        .shared(shared(prefix).node_name(name))
        .flow::<Parcel>()
        .orchestrator()
        .start()
        .await
        .unwrap()
}

async fn worker(prefix: &str, name: &str, counter: Counter) -> Engine {
    Engine::builder()
        .shared(shared(prefix).node_name(name))
        .driver(counter)
        .worker()
        .start()
        .await
        .unwrap()
}

async fn client(prefix: &str) -> Engine {
    client_on(shared(prefix)).await
}

/// A client whose requests go through the request stream, not to their owner directly:
/// the `XADD` of its first request shows which connection is its (`client_commands`).
async fn client_via_streams(prefix: &str) -> Engine {
    client_on(shared(prefix).direct_handoffs(None)).await
}

async fn client_on(shared: Shared) -> Engine {
    Engine::builder()
        .shared(shared)
        .flow::<Parcel>()
        .client()
        .start()
        .await
        .unwrap()
}

fn state(id: &str) -> ParcelState {
    ParcelState {
        id: id.to_string(),
        ..ParcelState::default()
    }
}

/// Waits (up to 15 s) for the instance to end, and checks that it finished.
async fn finishes<F: flowwire::Flow>(h: &flowwire::Handle<F>) {
    let ended = tokio::time::timeout(Duration::from_secs(15), h.finished())
        .await
        .expect("finished in time")
        .unwrap();
    assert_eq!(ended, Ended::Finished);
}

/// The commands a `MONITOR` saw from the client's connection: the one a request to the
/// flow's owners (`XADD` to `<prefix>:req:…`) came on.
fn client_commands<'a>(seen: &'a str, prefix: &str) -> Vec<&'a str> {
    let from = |l: &str| {
        l.split_once(" [")
            .and_then(|(_, r)| r.split_once(']'))
            .map(|(c, _)| c.to_string())
    };
    let request = format!("\"XADD\" \"{prefix}:req:");
    let client = seen
        .lines()
        .find(|l| l.contains(&request))
        .and_then(from)
        .expect("a request of the client was watched");
    seen.lines()
        .filter(|l| from(l).as_deref() == Some(client.as_str()))
        .collect()
}

/// The instance's state, read with Redis frozen: from what the handle already holds.
async fn state_without_redis(h: &flowwire::Handle<Parcel>) -> ParcelState {
    redis().pause();
    let read = tokio::time::timeout(Duration::from_secs(5), h.state()).await;
    redis().resume();
    read.expect("the state is read without Redis").unwrap()
}

/// Waits (bounded) until `check` holds.
async fn eventually(what: &str, mut check: impl AsyncFnMut() -> bool) {
    for _ in 0..300 {
        if check().await {
            return;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    panic!("{what}: not within 15 s");
}

/// Who holds each shard of `Parcel`.
async fn owners(prefix: &str) -> BTreeSet<String> {
    let bus = shared(prefix).store().bus();
    let mut owners = BTreeSet::new();
    for shard in 0..bus.shards() {
        if let Some((node, _)) = bus.owner("Parcel", shard).await.unwrap() {
            owners.insert(node);
        }
    }
    owners
}

/// Every instance's steps were written once each, with fencing tokens that never went
/// back.
async fn audit(prefix: &str, ids: &[String]) {
    let store = shared(prefix).store();
    for id in ids {
        let key = flowwire::storage::InstanceKey::new("Parcel", id.as_str());
        let writes = store.writes(&key).await.unwrap();
        assert!(!writes.is_empty(), "{id}: no write audited");
        for pair in writes.windows(2) {
            assert!(
                pair[0].0 < pair[1].0,
                "{id}: a step written twice: {writes:?}"
            );
            assert!(
                pair[0].1 <= pair[1].1,
                "{id}: a token went back: {writes:?}"
            );
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn orchestrators_workers_and_a_client_share_the_work() {
    share_the_work("scale-share").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn orchestrators_workers_and_a_client_share_the_work_on_a_redis_cluster() {
    share_the_work("cluster-share").await;
}

/// Two orchestrators, two workers and a client run 40 parcels: each call runs once, each
/// impulse applies once, no step is written twice or under an older token.
async fn share_the_work(p: &str) {
    let counter = Counter::default();
    let a = orchestrator(p, "orch-a").await;
    let b = orchestrator(p, "orch-b").await;
    let w1 = worker(p, "worker-1", counter.clone()).await;
    let w2 = worker(p, "worker-2", counter.clone()).await;
    let c = client(p).await;
    eventually("both orchestrators hold shards", async || {
        owners(p).await.len() == 2
    })
    .await;

    let ids: Vec<String> = (0..40).map(|i| format!("parcel-{i}")).collect();
    for id in &ids {
        c.start::<Parcel>(id.as_str(), state(id)).await.unwrap();
    }
    // A start of an existing id is refused across processes too.
    let again = c.start::<Parcel>("parcel-0", state("parcel-0")).await;
    assert!(
        matches!(again, Err(Error::AlreadyExists { .. })),
        "{again:?}"
    );
    for id in &ids {
        let h = c.handle::<Parcel>(id.as_str()).await.unwrap();
        eventually("packed", async || {
            h.weight().await.unwrap() == Some(u32::try_from(id.len()).unwrap())
        })
        .await;
        h.address("home".into())
            .id(format!("{id}/address"))
            .await
            .unwrap();
        // The same impulse id again: applied once, whoever receives it.
        let dup = h
            .address("elsewhere".into())
            .id(format!("{id}/address"))
            .await;
        assert!(
            matches!(dup, Err(Error::ImpulseAlreadyApplied { .. })),
            "{dup:?}"
        );
    }
    for id in &ids {
        let h = c.handle::<Parcel>(id.as_str()).await.unwrap();
        finishes(&*h).await;
        assert_eq!(h.state().await.unwrap().address.as_deref(), Some("home"));
        // The client reads the history the orchestrators wrote: start, packed, address,
        // rested, delivered.
        let page = c.history::<Parcel>(id.as_str(), 0, 100).await.unwrap();
        let inputs: Vec<&str> = page
            .steps
            .iter()
            .map(|s| match s.input {
                StepInput::Start => "start",
                StepInput::Outcome { .. } => "outcome",
                StepInput::Impulse { .. } => "impulse",
                StepInput::Timer { .. } => "timer",
                _ => "other",
            })
            .collect();
        assert_eq!(
            inputs,
            ["start", "outcome", "impulse", "timer", "outcome"],
            "{id}"
        );
    }
    let calls = counter.calls.lock().unwrap().clone();
    assert_eq!(
        calls.len(),
        80,
        "a pack and a deliver per parcel: {calls:?}"
    );
    assert!(
        calls.values().all(|n| *n == 1),
        "each call ran once: {calls:?}"
    );
    audit(p, &ids).await;
    for e in [&c, &w1, &w2, &a, &b] {
        e.shutdown().await;
    }
}

/// A client that waited for an instance's end got its final state with the end, as in the
/// embedded engine: reading the result then needs no trip to Redis (frozen here).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_end_brings_its_state_to_the_client_that_waited_for_it() {
    let redis = servers::Redis::start();
    let on = |name: Option<&str>| {
        let s = Shared::redis(&redis.url(), "endstate").unwrap().shards(8);
        match name {
            Some(n) => s.node_name(n),
            None => s,
        }
    };
    let o = Engine::builder()
        .shared(on(Some("orch")))
        .flow::<Parcel>()
        .orchestrator()
        .start()
        .await
        .unwrap();
    let w = Engine::builder()
        .shared(on(Some("worker")))
        .driver(Counter::default())
        .worker()
        .start()
        .await
        .unwrap();
    let c = Engine::builder()
        .shared(on(None))
        .flow::<Parcel>()
        .client()
        .start()
        .await
        .unwrap();
    let h = c.start::<Parcel>("p-1", state("p-1")).await.unwrap();
    eventually("packed", async || h.weight().await.unwrap() == Some(3)).await;
    h.address("home".into()).await.unwrap();
    finishes(&*h).await;

    redis.pause();
    let read = tokio::time::timeout(Duration::from_secs(5), h.state()).await;
    redis.resume();
    let state = read.expect("the state is read without Redis").unwrap();
    assert_eq!(state.address.as_deref(), Some("home"));
    c.shutdown().await;
    w.shutdown().await;
    o.shutdown().await;
}

/// A client waiting when its instance ends takes the end's record from the announcement
/// (a small record rides along with it): after the read it makes before it starts
/// waiting, it reads the record no more.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_waiter_takes_the_end_from_its_announcement_without_reading_the_record_again() {
    let prefix = "announce";
    let o = orchestrator(prefix, "o").await;
    let w = worker(prefix, "w", Counter::default()).await;
    let c = client_via_streams(prefix).await;
    let h = c.start::<Parcel>("p-1", state("p-1")).await.unwrap();
    eventually("packed", async || h.weight().await.unwrap() == Some(3)).await;
    let waiting = c.handle::<Parcel>("p-1").await.unwrap();
    let waiter = tokio::spawn(async move { (waiting.finished().await, waiting) });
    // Its read before waiting is long done by then.
    tokio::time::sleep(Duration::from_millis(500)).await;
    let monitor = redis().monitor();
    h.address("home".into()).await.unwrap();
    let (ended, same) = tokio::time::timeout(Duration::from_secs(15), waiter)
        .await
        .expect("finished in time")
        .unwrap();
    let ended = ended.unwrap();
    let seen = monitor.stop();
    assert_eq!(ended, Ended::Finished);
    // The client's commands (the orchestrator reads the record too, on its own).
    let reads: Vec<&str> = client_commands(&seen, "announce")
        .into_iter()
        .filter(|l| l.contains("\"HMGET\" \"announce:{Parcel#") && l.contains(":r:p-1\""))
        .collect();
    assert!(
        seen.lines()
            .any(|l| l.contains("\"PUBLISH\" \"announce:ended:Parcel\"")),
        "the end was announced while watched"
    );
    assert!(reads.is_empty(), "the record was read again: {reads:?}");
    // And the result came with it.
    let state = state_without_redis(&same).await;
    assert_eq!(state.address.as_deref(), Some("home"));
    c.shutdown().await;
    w.shutdown().await;
    o.shutdown().await;
}

/// A client waiting on an instance it started itself (listening for ends since before the
/// start went out) reads nothing from the store to see it end: the start's reply says it
/// runs, and the announcement brings the end and the result.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_waiting_on_an_instance_it_started_reads_nothing_to_see_it_end() {
    let prefix = "started";
    let o = orchestrator(prefix, "o").await;
    let w = worker(prefix, "w", Counter::default()).await;
    let c = client_via_streams(prefix).await;
    let monitor = redis().monitor();
    let h = c.start::<Parcel>("p-1", state("p-1")).await.unwrap();
    let (ended, addressed) = tokio::join!(
        tokio::time::timeout(Duration::from_secs(15), h.finished()),
        h.address("home".into())
    );
    addressed.unwrap();
    let seen = monitor.stop();
    assert_eq!(ended.expect("finished in time").unwrap(), Ended::Finished);
    let reads: Vec<&str> = client_commands(&seen, "started")
        .into_iter()
        .filter(|l| l.contains("\"HMGET\"") || l.contains("\"HGET\""))
        .collect();
    assert!(reads.is_empty(), "the client read: {reads:?}");
    let state = state_without_redis(&h).await;
    assert_eq!(state.address.as_deref(), Some("home"));
    c.shutdown().await;
    w.shutdown().await;
    o.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_cancellation_from_a_client_applies_once_across_a_shard_move() {
    let p = "scale-cancel";
    let counter = Counter::default();
    let a = orchestrator(p, "orch-a").await;
    let w = worker(p, "worker-1", counter.clone()).await;
    let c = client(p).await;
    eventually("the orchestrator holds the shards", async || {
        owners(p).await.len() == 1
    })
    .await;
    let ids: Vec<String> = (0..6).map(|i| format!("cancel-{i}")).collect();
    for id in &ids {
        let h = c.start::<Parcel>(id.as_str(), state(id)).await.unwrap();
        eventually("packed", async || h.weight().await.unwrap().is_some()).await;
        Handle::cancel(&h, "returned to sender").await.unwrap();
        Handle::cancel(&h, "again").await.unwrap();
    }
    // The shards move to another orchestrator; the client cancels once more.
    a.shutdown().await;
    let b = orchestrator(p, "orch-b").await;
    for id in &ids {
        c.cancel::<Parcel>(id.as_str(), "and again").await.unwrap();
        let h = c.handle::<Parcel>(id.as_str()).await.unwrap();
        let ended = tokio::time::timeout(Duration::from_secs(15), h.finished())
            .await
            .expect("ended in time")
            .unwrap();
        assert_eq!(
            ended,
            Ended::Cancelled {
                reason: "returned to sender".into()
            }
        );
        let page = c.history::<Parcel>(id.as_str(), 0, 100).await.unwrap();
        let cancels = page
            .steps
            .iter()
            .filter(|s| matches!(s.input, StepInput::Cancel { .. }))
            .count();
        assert_eq!(cancels, 1, "{id}: cancelled once, though asked three times");
    }
    audit(p, &ids).await;
    for e in [&c, &w, &b] {
        e.shutdown().await;
    }
}

#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct CrateState {
    id: String,
    weights: Vec<u32>,
    done: bool,
}

/// A parent: ships three parcels as child flows, then finishes.
#[flow]
pub struct Crate {
    #[link]
    state: CrateState,
}

#[flow]
impl Crate {
    #[wire]
    fn run(&mut self) -> Command<Self> {
        if self.state.done {
            return Command::finish();
        }
        let id = &self.state.id;
        let parcels = (0..3).map(|i| {
            let child = format!("{id}-p{i}");
            flowwire::ChildStart::<Parcel>::new(child.clone(), state(&child))
        });
        Command::fan_out(parcels).all(
            |f, _, child| {
                let child = child?;
                f.state.weights.extend(child.state.weight);
                Ok(())
            },
            |f| {
                f.state.done = true;
                Ok(())
            },
        )
    }
}

async fn crate_orchestrator(prefix: &str, name: &str) -> Engine {
    Engine::builder()
        .shared(shared(prefix).node_name(name))
        .flow::<Crate>()
        .flow::<Parcel>()
        .orchestrator()
        .start()
        .await
        .unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn child_flows_run_across_processes_and_a_shard_move() {
    let p = "scale-children";
    let counter = Counter::default();
    let a = crate_orchestrator(p, "orch-a").await;
    let w = worker(p, "worker-1", counter.clone()).await;
    let c = Engine::builder()
        .shared(shared(p))
        .flow::<Crate>()
        .flow::<Parcel>()
        .client()
        .start()
        .await
        .unwrap();
    eventually("the orchestrator holds the shards", async || {
        owners(p).await.len() == 1
    })
    .await;
    let ids: Vec<String> = (0..4).map(|i| format!("crate-{i}")).collect();
    for id in &ids {
        let s = CrateState {
            id: id.clone(),
            ..CrateState::default()
        };
        c.start::<Crate>(id.as_str(), s).await.unwrap();
    }
    let children: Vec<String> = ids
        .iter()
        .flat_map(|id| (0..3).map(move |i| format!("{id}-p{i}")))
        .collect();
    for child in &children {
        eventually("the child packed", async || {
            match c.handle::<Parcel>(child.as_str()).await {
                Ok(h) => h.weight().await.unwrap().is_some(),
                Err(_) => false,
            }
        })
        .await;
    }
    // The shards move, cleanly, to another orchestrator while every child waits: the
    // parents' child calls are served there now.
    a.shutdown().await;
    let b = crate_orchestrator(p, "orch-b").await;
    for child in &children {
        let h = c.handle::<Parcel>(child.as_str()).await.unwrap();
        h.address("Main St".into()).await.unwrap();
    }
    for id in &ids {
        let h = c.handle::<Crate>(id.as_str()).await.unwrap();
        let ended = tokio::time::timeout(Duration::from_secs(15), h.finished())
            .await
            .expect("the parent ended in time")
            .unwrap();
        assert_eq!(ended, Ended::Finished, "{id}");
        let weights = h.state().await.unwrap().weights;
        assert_eq!(weights.len(), 3, "{id}: {weights:?}");
    }
    for child in &children {
        let page = c.history::<Parcel>(child.as_str(), 0, 100).await.unwrap();
        let starts = page
            .steps
            .iter()
            .filter(|s| matches!(s.input, StepInput::Start))
            .count();
        assert_eq!(starts, 1, "{child} was started once");
    }
    audit(p, &children).await;
    for e in [&c, &w, &b] {
        e.shutdown().await;
    }
}

/// An orchestrator of `F` (version 1 or 2 of the parcel) named `name`, once it holds every
/// shard.
async fn sole_orchestrator<F: flowwire::Flow>(prefix: &str, name: &str) -> Engine {
    let e = Engine::builder()
        .shared(shared(prefix).node_name(name))
        .flow::<F>()
        .orchestrator()
        .start()
        .await
        .unwrap();
    eventually("it holds every shard", async || {
        owners(prefix).await == BTreeSet::from([name.to_string()])
    })
    .await;
    e
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn through_a_rolling_deploy_an_old_orchestrator_leaves_migrated_instances_as_they_are() {
    let p = "scale-rolling";
    let counter = Counter::default();
    let w = worker(p, "worker", counter.clone()).await;
    let ids: Vec<String> = (0..4).map(|i| format!("roll-{i}")).collect();
    let v1 = sole_orchestrator::<Parcel>(p, "orch-v1").await;
    for id in &ids {
        let h = v1.start::<Parcel>(id.as_str(), state(id)).await.unwrap();
        eventually("packed", async || h.weight().await.unwrap().is_some()).await;
    }
    v1.shutdown().await;
    // Before the deploy, a process with the new code checks it, loading nothing: every
    // live instance would migrate, none would park.
    let check = Engine::builder()
        .shared(shared(p))
        .client()
        .start()
        .await
        .unwrap();
    let report = check.check_upgrade::<ParcelTwo>().await.unwrap();
    assert_eq!((report.checked, report.version), (4, 2), "{report:?}");
    assert!(report.is_safe() && report.newer.is_empty(), "{report:?}");
    // The new version takes over and moves every instance on (migrated, then a step).
    let v2 = sole_orchestrator::<ParcelTwo>(p, "orch-v2").await;
    for id in &ids {
        let h = v2.handle::<ParcelTwo>(id.as_str()).await.unwrap();
        h.address("home".into()).await.unwrap();
    }
    v2.shutdown().await;
    // The old code would leave all of them alone.
    let report = check.check_upgrade::<Parcel>().await.unwrap();
    let newer: Vec<&str> = report.newer.iter().map(|(id, _)| id.as_str()).collect();
    assert_eq!(newer, ids, "{report:?}");
    assert!(report.is_safe(), "{report:?}");
    check.shutdown().await;
    // A node of the old version holds the shards again (a deploy rolled back, or not done).
    let old = sole_orchestrator::<Parcel>(p, "orch-v1b").await;
    for id in &ids {
        let h = old.handle::<Parcel>(id.as_str()).await.unwrap();
        let r = h.address("elsewhere".into()).await;
        assert!(
            matches!(
                r,
                Err(Error::NewerVersion {
                    written: 2,
                    running: 1,
                    ..
                })
            ),
            "{id}: {r:?}"
        );
    }
    assert!(
        old.parked::<Parcel>(None, 10).await.unwrap().is_empty(),
        "none parked"
    );
    old.shutdown().await;
    // Version 2 again: every instance is where it left it.
    let v2 = sole_orchestrator::<ParcelTwo>(p, "orch-v2b").await;
    for id in &ids {
        let h = v2.handle::<ParcelTwo>(id.as_str()).await.unwrap();
        assert_eq!(h.state().await.unwrap().address.as_deref(), Some("home"));
        h.done().await.unwrap();
        finishes(&*h).await;
    }
    audit(p, &ids).await;
    v2.shutdown().await;
    w.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn shards_move_to_a_joining_orchestrator_and_back_from_a_leaving_one() {
    let p = "scale-rebalance";
    let counter = Counter::default();
    let a = orchestrator(p, "orch-a").await;
    let w = worker(p, "worker", counter.clone()).await;
    eventually("a holds every shard", async || {
        owners(p).await == BTreeSet::from(["orch-a".to_string()])
    })
    .await;
    let ids: Vec<String> = (0..24).map(|i| format!("p-{i}")).collect();
    for id in &ids {
        a.start::<Parcel>(id.as_str(), state(id)).await.unwrap();
    }
    for id in &ids {
        let h = a.handle::<Parcel>(id.as_str()).await.unwrap();
        eventually("packed", async || h.weight().await.unwrap().is_some()).await;
    }
    // b joins: a gives shards back until each holds its fair share.
    let b = orchestrator(p, "orch-b").await;
    eventually("both hold shards", async || owners(p).await.len() == 2).await;
    // a leaves: its shards are released cleanly and b takes them all.
    a.shutdown().await;
    eventually("b holds every shard", async || {
        owners(p).await == BTreeSet::from(["orch-b".to_string()])
    })
    .await;
    for id in &ids {
        let h = b.handle::<Parcel>(id.as_str()).await.unwrap();
        h.address("home".into()).await.unwrap();
        finishes(&*h).await;
    }
    let calls = counter.calls.lock().unwrap().clone();
    assert_eq!(calls.len(), 48, "{calls:?}");
    assert!(
        calls.values().all(|n| *n == 1),
        "clean handovers send no call again: {calls:?}"
    );
    audit(p, &ids).await;
    b.shutdown().await;
    w.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_call_whose_worker_stopped_is_taken_over_after_the_visibility_timeout() {
    let p = "scale-claim";
    let hung = Counter {
        hang: true,
        ..Counter::default()
    };
    let o = orchestrator(p, "orch").await;
    let w1 = worker(p, "worker-1", hung.clone()).await;
    o.start::<Parcel>("stuck-1", state("stuck-1"))
        .await
        .unwrap();
    eventually("the first worker runs the call", async || {
        !hung.calls.lock().unwrap().is_empty()
    })
    .await;
    // The worker goes away with the call unfinished and unacknowledged.
    w1.shutdown().await;
    let fresh = Counter::default();
    let w2 = worker(p, "worker-2", fresh.clone()).await;
    let h = o.handle::<Parcel>("stuck-1").await.unwrap();
    eventually("packed by the second worker", async || {
        h.weight().await.unwrap() == Some(7)
    })
    .await;
    let key = hung.calls.lock().unwrap().keys().next().cloned().unwrap();
    assert_eq!(fresh.calls.lock().unwrap().get(&key), Some(&1), "same key");
    assert_eq!(
        fresh.redelivered.lock().unwrap().get(&key),
        Some(&1),
        "the driver is told the call may have run"
    );
    o.shutdown().await;
    w2.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_multi_process_engine_refuses_node_local_tiers_and_needs_a_role() {
    let dir = tempfile::tempdir().unwrap();
    let err = Engine::builder()
        .shared(shared("scale-refuse"))
        .storage(
            Ladder::new()
                .inline_below(4 * 1024)
                .default_to(Tier::fs(dir.path().join("blobs"))),
        )
        .flow::<Parcel>()
        .orchestrator()
        .start()
        .await
        .unwrap_err();
    assert!(
        matches!(err, Error::NodeLocalTier { ref tier } if tier == "fs"),
        "{err}"
    );
    assert!(err.to_string().contains("Tier::shared_fs"), "{err}");
    // A mount every node sees is accepted.
    let ok = Engine::builder()
        .shared(shared("scale-refuse"))
        .storage(
            Ladder::new()
                .inline_below(4 * 1024)
                .default_to(Tier::shared_fs(dir.path().join("blobs"))),
        )
        .flow::<Parcel>()
        .client()
        .start()
        .await
        .unwrap();
    ok.shutdown().await;
    let err = Engine::builder()
        .shared(shared("scale-refuse"))
        .flow::<Parcel>()
        .start()
        .await
        .unwrap_err();
    assert!(matches!(err, Error::NoRole), "{err}");
    let err = Engine::builder()
        .shared(shared("scale-refuse"))
        .in_memory()
        .client()
        .start()
        .await
        .unwrap_err();
    assert!(matches!(err, Error::SharedStore), "{err}");
    let err = Engine::builder()
        .shared(shared("scale-refuse").shards(3))
        .client()
        .start()
        .await
        .unwrap_err();
    assert!(err.to_string().contains("uses 8"), "{err}");
}
