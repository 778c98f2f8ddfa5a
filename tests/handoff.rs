//! Outcomes handed over (multi-process mode on one Redis server): a worker publishes a
//! call's outcome to the shard's owner, whose commit applying it settles the call, so
//! nothing is written for the outcome itself; an outcome no commit settles within a second
//! is written to the shard's outcome stream, and applied from there. Where the owner
//! listens for them, a worker sends its outcomes there directly instead, and publishes
//! what the owner cannot be reached for or refuses (it gave the shard away). An
//! orchestrator reads the streams of all the shards it holds on one connection. A caller
//! hands its requests to the owner directly too, where it listens, and appends to the
//! request stream what the owner cannot take. An owner that does not answer holds up only
//! what is offered to it, requests and outcomes alike.
//! (Over 600 lines: one scenario per test; they share the flow, the gated driver and the
//! helpers that ask Redis what it holds and publishes, which splitting the file would copy.)

#![allow(missing_docs)] // test-local flows
#![cfg(feature = "redis")]

use std::sync::Arc;
use std::time::Duration;

use flowwire::prelude::*;
use flowwire::{Ended, Engine, Shared};

#[path = "support/servers.rs"]
mod servers;

#[derive(Debug, Serialize, Deserialize, thiserror::Error)]
#[error("closed")]
pub struct Closed;

#[driver]
pub trait Gate {
    async fn pass(&self, n: u32) -> Result<u32, Closed>;
}

/// A gate that lets a call through per permit.
#[derive(Clone)]
pub struct Gated(Arc<tokio::sync::Semaphore>);

#[driver]
impl Gate for Gated {
    async fn pass(&self, n: u32) -> Result<u32, Closed> {
        let permit = self.0.acquire().await.map_err(|_| Closed)?;
        permit.forget();
        Ok(n + 1)
    }
}

#[derive(Debug, Default, Clone, Serialize, Deserialize)]
pub struct TripState {
    calls: u32,
    sum: u32,
}

/// Two calls through the gate, then the end.
#[flow]
pub struct Trip {
    #[link]
    state: TripState,
    #[link]
    gate: impl Gate,
}

#[flow]
impl Trip {
    #[wire]
    fn run(&mut self) -> Command<Self> {
        if self.state.calls == 2 {
            return Command::finish();
        }
        Command::drive(self.gate.pass(self.state.calls)).then(|f, r| {
            f.state.sum += r?;
            f.state.calls += 1;
            Ok(())
        })
    }
}

fn shared(url: &str, prefix: &str, node: &str) -> Shared {
    Shared::redis(url, prefix)
        .unwrap()
        .shards(1)
        .lease_ttl(Duration::from_secs(2))
        .node_name(node)
}

/// What Redis says of a stream: (entries ever added, entries in it).
async fn stream_info(url: &str, key: &str) -> (u64, u64) {
    let client = redis::Client::open(url).unwrap();
    let mut c = client.get_multiplexed_async_connection().await.unwrap();
    let info: std::collections::HashMap<String, redis::Value> = redis::cmd("XINFO")
        .arg("STREAM")
        .arg(key)
        .query_async(&mut c)
        .await
        .unwrap();
    let num = |k: &str| match info.get(k) {
        Some(redis::Value::Int(n)) => u64::try_from(*n).unwrap(),
        other => panic!("XINFO STREAM {key}: {k} is {other:?}"),
    };
    (num("entries-added"), num("length"))
}

/// Waits until `channel` has a subscriber (the owner subscribes to its shard's handoff
/// channel once it holds the shard).
async fn subscribed(url: &str, channel: &str) {
    let client = redis::Client::open(url).unwrap();
    let mut c = client.get_multiplexed_async_connection().await.unwrap();
    for _ in 0..500 {
        let (_, n): (String, u64) = redis::cmd("PUBSUB")
            .arg("NUMSUB")
            .arg(channel)
            .query_async(&mut c)
            .await
            .unwrap();
        if n > 0 {
            return;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    panic!("nobody subscribed to {channel} within 10 s");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn outcomes_are_handed_over_and_settled_by_the_commits_that_apply_them() {
    let redis = servers::Redis::start();
    let prefix = "handed";
    let gate = Gated(Arc::new(tokio::sync::Semaphore::new(1_000)));
    let orchestrator = Engine::builder()
        .shared(shared(&redis.url(), prefix, "o"))
        .flow::<Trip>()
        .orchestrator()
        .start()
        .await
        .unwrap();
    let worker = Engine::builder()
        .shared(shared(&redis.url(), prefix, "w"))
        .driver(gate)
        .worker()
        .start()
        .await
        .unwrap();
    let client = Engine::builder()
        .shared(shared(&redis.url(), prefix, "c"))
        .flow::<Trip>()
        .client()
        .start()
        .await
        .unwrap();

    let bus = shared(&redis.url(), prefix, "t").store().bus();
    subscribed(&redis.url(), &bus.handoffs("Trip", 0)).await;
    for i in 0..20 {
        let trip = client
            .start::<Trip>(format!("t-{i}"), TripState::default())
            .await
            .unwrap();
        assert_eq!(trip.finished().await.unwrap(), Ended::Finished);
        let state = trip.state().await.unwrap();
        assert_eq!(
            (state.calls, state.sum),
            (2, 3),
            "each outcome applied once"
        );
    }

    assert_eq!(
        stream_info(&redis.url(), &bus.outcomes("Trip", 0)).await,
        (0, 0),
        "no outcome was written to the stream: all 40 were handed over"
    );
    assert_eq!(
        bus.backlog(&bus.jobs("Gate"), "workers").await.unwrap(),
        (0, 0),
        "every call was settled (acknowledged and deleted) by its outcome's commit"
    );
    for engine in [client, worker, orchestrator] {
        engine.shutdown().await;
    }
}

/// A trip whose first call's outcome was handed over to a listener that applies nothing:
/// the owner left with the call in flight, and the ghost took the owner's place on the
/// shard's handoff channel.
struct Ghosted {
    client: Engine,
    worker: Engine,
    gate: Gated,
    trip: <Trip as flowwire::Flow>::Handle,
    bus: flowwire::storage::bus::RedisBus,
    ghost: flowwire::storage::bus::Subscription,
}

async fn ghosted(url: &str, prefix: &str) -> Ghosted {
    let first = Engine::builder()
        .shared(shared(url, prefix, "a"))
        .flow::<Trip>()
        .orchestrator()
        .start()
        .await
        .unwrap();
    let gate = Gated(Arc::new(tokio::sync::Semaphore::new(0)));
    let worker = Engine::builder()
        .shared(shared(url, prefix, "w"))
        .driver(gate.clone())
        .worker()
        .start()
        .await
        .unwrap();
    let client = Engine::builder()
        .shared(shared(url, prefix, "c"))
        .flow::<Trip>()
        .client()
        .start()
        .await
        .unwrap();
    let trip = client
        .start::<Trip>("t", TripState::default())
        .await
        .unwrap();

    first.shutdown().await;
    let bus = shared(url, prefix, "t").store().bus();
    let mut ghost = bus.subscribe(&bus.handoffs("Trip", 0)).await.unwrap();
    gate.0.add_permits(1);
    let heard = tokio::time::timeout(Duration::from_secs(10), ghost.next())
        .await
        .expect("the outcome is handed over within 10 s");
    assert!(heard.is_some(), "the ghost heard the outcome");
    Ghosted {
        client,
        worker,
        gate,
        trip,
        bus,
        ghost,
    }
}

/// Starts the next owner of the shard.
async fn next_owner(url: &str, prefix: &str) -> Engine {
    Engine::builder()
        .shared(shared(url, prefix, "b"))
        .flow::<Trip>()
        .orchestrator()
        .start()
        .await
        .unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_outcome_no_commit_settles_is_written_to_the_stream_and_applied() {
    let redis = servers::Redis::start();
    let prefix = "unheard";
    let Ghosted {
        client,
        worker,
        gate,
        trip,
        bus,
        ghost,
    } = ghosted(&redis.url(), prefix).await;

    // No commit settles the call: a second later its worker writes the outcome to the
    // shard's outcome stream, where the next owner finds it.
    let outcomes = bus.outcomes("Trip", 0);
    let mut written = (0, 0);
    for _ in 0..150 {
        written = stream_info(&redis.url(), &outcomes).await;
        if written.0 == 1 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert_eq!(written, (1, 1), "the unsettled outcome was written once");
    drop(ghost);

    gate.0.add_permits(1);
    let second = next_owner(&redis.url(), prefix).await;
    let ended = tokio::time::timeout(Duration::from_secs(20), trip.finished())
        .await
        .expect("the flow ends once the next owner reads the outcome")
        .unwrap();
    assert_eq!(ended, Ended::Finished);
    let state = trip.state().await.unwrap();
    assert_eq!(
        (state.calls, state.sum),
        (2, 3),
        "each outcome applied once"
    );
    assert_eq!(
        bus.backlog(&bus.jobs("Gate"), "workers").await.unwrap(),
        (0, 0),
        "both calls are settled"
    );
    for engine in [client, worker, second] {
        engine.shutdown().await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_worker_stopped_gracefully_writes_the_outcomes_no_commit_settled_yet() {
    let redis = servers::Redis::start();
    let prefix = "stopped";
    let Ghosted {
        client,
        worker,
        trip,
        bus,
        ghost,
        ..
    } = ghosted(&redis.url(), prefix).await;

    // A graceful stop re-runs no finished work: the outcome no commit settled is on the
    // stream when the worker's shutdown returns (it does not wait out the second).
    worker.shutdown().await;
    assert_eq!(
        stream_info(&redis.url(), &bus.outcomes("Trip", 0)).await,
        (1, 1),
        "the outcome was written at the stop"
    );
    drop(ghost);

    let second = next_owner(&redis.url(), prefix).await;
    // One permit: were the first call run again, the second would never pass.
    let worker = Engine::builder()
        .shared(shared(&redis.url(), prefix, "w2"))
        .driver(Gated(Arc::new(tokio::sync::Semaphore::new(1))))
        .worker()
        .start()
        .await
        .unwrap();
    let ended = tokio::time::timeout(Duration::from_secs(20), trip.finished())
        .await
        .expect("the flow ends")
        .unwrap();
    assert_eq!(ended, Ended::Finished);
    let state = trip.state().await.unwrap();
    assert_eq!((state.calls, state.sum), (2, 3), "each call ran once");
    for engine in [client, worker, second] {
        engine.shutdown().await;
    }
}

/// Waits (up to 20 s) for `trip` to finish with both its calls applied once.
async fn ends_with_each_call_once(trip: &<Trip as flowwire::Flow>::Handle) {
    let ended = tokio::time::timeout(Duration::from_secs(20), trip.finished())
        .await
        .expect("the trip finishes")
        .unwrap();
    assert_eq!(ended, Ended::Finished);
    let state = trip.state().await.unwrap();
    assert_eq!(
        (state.calls, state.sum),
        (2, 3),
        "each outcome applied once"
    );
}

/// An orchestrator of trips in the deployment `shared` describes.
async fn trip_orchestrator(shared: Shared) -> Engine {
    Engine::builder()
        .shared(shared)
        .flow::<Trip>()
        .orchestrator()
        .start()
        .await
        .unwrap()
}

/// A worker of the deployment whose calls pass `gate`.
async fn gate_worker(shared: Shared, gate: Gated) -> Engine {
    Engine::builder()
        .shared(shared)
        .driver(gate)
        .worker()
        .start()
        .await
        .unwrap()
}

/// A client of the deployment that starts trips.
async fn trip_client(shared: Shared) -> Engine {
    Engine::builder()
        .shared(shared)
        .flow::<Trip>()
        .client()
        .start()
        .await
        .unwrap()
}

/// The connections whose last command was a stream read: the readers waiting for entries.
async fn stream_readers(url: &str) -> usize {
    let client = redis::Client::open(url).unwrap();
    let mut c = client.get_multiplexed_async_connection().await.unwrap();
    let list: String = redis::cmd("CLIENT")
        .arg("LIST")
        .query_async(&mut c)
        .await
        .unwrap();
    list.lines()
        .filter(|l| l.split(' ').any(|f| f == "cmd=xreadgroup"))
        .count()
}

/// An orchestrator process reads the request and outcome streams of every shard it holds
/// in one `XREADGROUP` on one connection (eight shards here, not eight readers), and hands
/// each entry to its own shard: the instances started on all of them finish, each call
/// applied once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_reader_serves_every_shard_an_orchestrator_holds() {
    let redis = servers::Redis::start();
    let prefix = "joint";
    let sharded = |node: &str| shared(&redis.url(), prefix, node).shards(8);
    let orchestrator = trip_orchestrator(sharded("o")).await;
    let bus = sharded("t").store().bus();
    for shard in 0..8 {
        subscribed(&redis.url(), &bus.handoffs("Trip", shard)).await;
    }
    // The shards' runners are up; their reads go out on the one connection.
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert_eq!(
        stream_readers(&redis.url()).await,
        1,
        "one stream reader for the eight shards"
    );

    let worker = gate_worker(
        sharded("w"),
        Gated(Arc::new(tokio::sync::Semaphore::new(1_000))),
    )
    .await;
    let client = trip_client(sharded("c")).await;
    let mut trips = Vec::new();
    for i in 0..32 {
        trips.push(
            client
                .start::<Trip>(format!("j-{i}"), TripState::default())
                .await
                .unwrap(),
        );
    }
    let mut shards = std::collections::BTreeSet::new();
    for trip in trips {
        shards.insert(flowwire::storage::store::shard_of(trip.id(), 8));
        ends_with_each_call_once(&trip).await;
    }
    assert!(
        shards.len() > 4,
        "the instances spread over the shards: {shards:?}"
    );
    for engine in [client, worker, orchestrator] {
        engine.shutdown().await;
    }
}

/// Counts the messages published on the deployment's handoff channels from now on (a
/// subscriber of its own, on a thread, until the server goes away).
fn handoffs_published(url: &str, prefix: &str) -> Arc<std::sync::atomic::AtomicUsize> {
    let seen = Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let mut conn = redis::Client::open(url).unwrap().get_connection().unwrap();
    let pattern = format!("{prefix}:handoff*");
    let (ready, subscribed) = std::sync::mpsc::channel();
    let counter = seen.clone();
    std::thread::spawn(move || {
        let mut pubsub = conn.as_pubsub();
        pubsub.psubscribe(&pattern).unwrap();
        ready.send(()).unwrap();
        while pubsub.get_message().is_ok() {
            counter.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
        }
    });
    subscribed.recv().unwrap();
    seen
}

/// Runs `n` trips from `client`, each to its end with both calls applied once.
async fn trips(client: &Engine, tag: &str, n: usize) {
    for i in 0..n {
        let trip = client
            .start::<Trip>(format!("{tag}-{i}"), TripState::default())
            .await
            .unwrap();
        ends_with_each_call_once(&trip).await;
    }
}

/// A worker sends each outcome to the shard's owner over a connection of its own, at the
/// address the owner advertised: nothing is published through Redis for it, and nothing
/// is written to the outcome stream.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn outcomes_go_to_their_owner_directly_not_through_redis() {
    let redis = servers::Redis::start();
    let prefix = "direct";
    let orchestrator = trip_orchestrator(shared(&redis.url(), prefix, "o")).await;
    let worker = gate_worker(
        shared(&redis.url(), prefix, "w"),
        Gated(Arc::new(tokio::sync::Semaphore::new(1_000))),
    )
    .await;
    let client = trip_client(shared(&redis.url(), prefix, "c")).await;
    let bus = shared(&redis.url(), prefix, "t").store().bus();
    subscribed(&redis.url(), &bus.handoffs("Trip", 0)).await;
    // The owner advertises its address once it holds the shard.
    advertised(&bus, &bus.handoffs("Trip", 0)).await;
    let published = handoffs_published(&redis.url(), prefix);

    trips(&client, "d", 10).await;
    assert_eq!(
        published.load(std::sync::atomic::Ordering::SeqCst),
        0,
        "all 20 outcomes went to the owner directly"
    );
    assert_eq!(
        stream_info(&redis.url(), &bus.outcomes("Trip", 0)).await,
        (0, 0),
        "none was written to the outcome stream"
    );
    for engine in [client, worker, orchestrator] {
        engine.shutdown().await;
    }
}

/// Where the owner cannot be reached directly — it listens nowhere (`direct_handoffs(None)`)
/// and the address advertised is dead — the worker publishes the outcomes as before, and
/// each is applied once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_owner_that_cannot_be_reached_directly_gets_its_outcomes_published() {
    let redis = servers::Redis::start();
    let prefix = "undirect";
    let bus = shared(&redis.url(), prefix, "t").store().bus();
    advertise_dead(&bus, &bus.handoffs("Trip", 0)).await;
    let orchestrator =
        trip_orchestrator(shared(&redis.url(), prefix, "o").direct_handoffs(None)).await;
    let worker = gate_worker(
        shared(&redis.url(), prefix, "w"),
        Gated(Arc::new(tokio::sync::Semaphore::new(1_000))),
    )
    .await;
    let client = trip_client(shared(&redis.url(), prefix, "c")).await;
    subscribed(&redis.url(), &bus.handoffs("Trip", 0)).await;
    let published = handoffs_published(&redis.url(), prefix);

    trips(&client, "u", 5).await;
    assert_eq!(
        published.load(std::sync::atomic::Ordering::SeqCst),
        10,
        "the 10 outcomes were published"
    );
    for engine in [client, worker, orchestrator] {
        engine.shutdown().await;
    }
}

/// Advertises under `name` (a handoff channel or a request stream) an address nobody
/// listens at: a port just freed.
async fn advertise_dead(bus: &flowwire::storage::bus::RedisBus, name: &str) {
    let dead = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap();
    bus.advertise(name, &format!("{dead}|o")).await.unwrap();
}

/// How many entries were ever appended to a stream (none if it does not exist).
async fn appended(url: &str, key: &str) -> u64 {
    let client = redis::Client::open(url).unwrap();
    let mut c = client.get_multiplexed_async_connection().await.unwrap();
    let exists: u64 = redis::cmd("EXISTS")
        .arg(key)
        .query_async(&mut c)
        .await
        .unwrap();
    if exists == 0 {
        return 0;
    }
    stream_info(url, key).await.0
}

/// Waits until an address is advertised under `name` (a handoff channel or a request
/// stream).
async fn advertised(bus: &flowwire::storage::bus::RedisBus, name: &str) {
    for _ in 0..500 {
        if bus.endpoints(&[name.to_string()]).await.unwrap()[0].is_some() {
            return;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    panic!("no address advertised under {name} within 10 s");
}

/// A caller hands its requests to the shard's owner directly, at the address the owner
/// advertised under the shard's request stream: starts, a refused start and a
/// cancellation are each answered as through the stream, and nothing is appended to it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn requests_go_to_their_owner_directly_not_through_the_request_stream() {
    let redis = servers::Redis::start();
    let prefix = "directreq";
    let orchestrator = trip_orchestrator(shared(&redis.url(), prefix, "o")).await;
    // Permits for the ten trips' twenty calls: the next trip waits at the gate.
    let worker = gate_worker(
        shared(&redis.url(), prefix, "w"),
        Gated(Arc::new(tokio::sync::Semaphore::new(20))),
    )
    .await;
    let client = trip_client(shared(&redis.url(), prefix, "c")).await;
    let bus = shared(&redis.url(), prefix, "t").store().bus();
    let requests = bus.requests("Trip", 0);
    advertised(&bus, &requests).await;

    trips(&client, "r", 10).await;
    let held = client
        .start::<Trip>("held", TripState::default())
        .await
        .unwrap();
    let again = client.start::<Trip>("held", TripState::default()).await;
    assert!(
        matches!(again, Err(flowwire::Error::AlreadyExists { .. })),
        "a second start of an id is refused: {again:?}"
    );
    client.cancel::<Trip>("held", "no more").await.unwrap();
    let ended = tokio::time::timeout(Duration::from_secs(20), held.finished())
        .await
        .expect("the held trip ends")
        .unwrap();
    assert!(
        matches!(ended, Ended::Cancelled { .. }),
        "cancelled: {ended:?}"
    );
    assert_eq!(
        appended(&redis.url(), &requests).await,
        0,
        "no request was appended to the request stream"
    );
    for engine in [client, worker, orchestrator] {
        engine.shutdown().await;
    }
}

/// Where the owner cannot take a request directly — it listens nowhere and the address
/// advertised under the request stream is dead — the caller appends it to the stream, and
/// each is applied once from there.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_request_its_owner_cannot_take_directly_goes_through_the_stream() {
    let redis = servers::Redis::start();
    let prefix = "undirectreq";
    let bus = shared(&redis.url(), prefix, "t").store().bus();
    let requests = bus.requests("Trip", 0);
    advertise_dead(&bus, &requests).await;
    let orchestrator =
        trip_orchestrator(shared(&redis.url(), prefix, "o").direct_handoffs(None)).await;
    let worker = gate_worker(
        shared(&redis.url(), prefix, "w"),
        Gated(Arc::new(tokio::sync::Semaphore::new(1_000))),
    )
    .await;
    let client = trip_client(shared(&redis.url(), prefix, "c")).await;

    trips(&client, "s", 5).await;
    assert_eq!(
        appended(&redis.url(), &requests).await,
        5,
        "the five starts were appended to the request stream"
    );
    for engine in [client, worker, orchestrator] {
        engine.shutdown().await;
    }
}

/// Ids of `n` instances in each of two shards.
fn ids_in_two_shards(tag: &str, n: usize) -> Vec<String> {
    let mut per_shard = [0usize; 2];
    let mut ids = Vec::new();
    for i in 0.. {
        let id = format!("{tag}-{i}");
        let shard = usize::from(flowwire::storage::store::shard_of(&id, 2));
        if per_shard[shard] < n {
            per_shard[shard] += 1;
            ids.push(id);
        }
        if per_shard == [n, n] {
            break;
        }
    }
    ids
}

/// An id of shard `shard` of two, made from `tag`.
fn id_in_shard(tag: &str, shard: u16) -> String {
    ids_in_two_shards(tag, 1)
        .into_iter()
        .find(|id| flowwire::storage::store::shard_of(id, 2) == shard)
        .unwrap()
}

/// Advertises under `name` (a handoff channel or a request stream) the address of an owner
/// that does not answer: its connections are taken and nothing is said on them, as a
/// stopped process's are.
async fn silent_owner(
    bus: &flowwire::storage::bus::RedisBus,
    name: &str,
) -> tokio::net::TcpListener {
    let silent = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    bus.advertise(name, &format!("{}|o", silent.local_addr().unwrap()))
        .await
        .unwrap();
    silent
}

/// A worker keeps the address an owner advertised. When that owner gives the shard to
/// another orchestrator, it refuses the outcomes it is offered for it (it no longer routes
/// the shard); the worker publishes them, and the new owner applies each once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_outcome_offered_to_a_former_owner_is_published_to_the_new_one() {
    let redis = servers::Redis::start();
    let prefix = "moved";
    let two = |node: &str| shared(&redis.url(), prefix, node).shards(2);
    let a = trip_orchestrator(two("a")).await;
    let gate = Gated(Arc::new(tokio::sync::Semaphore::new(0)));
    let worker = gate_worker(two("w"), gate.clone()).await;
    let client = trip_client(two("c")).await;
    let bus = two("t").store().bus();
    for shard in 0..2 {
        subscribed(&redis.url(), &bus.handoffs("Trip", shard)).await;
    }
    // A trip on each shard, so the worker has looked up and keeps `a`'s address for both.
    gate.0.add_permits(4);
    for id in ids_in_two_shards("warm", 1) {
        let trip = client
            .start::<Trip>(id, TripState::default())
            .await
            .unwrap();
        assert_eq!(trip.finished().await.unwrap(), Ended::Finished);
    }

    // Trips on both shards wait at the gate while `b` joins and `a` gives one shard back.
    let mut trips = Vec::new();
    for id in ids_in_two_shards("moved", 3) {
        trips.push(
            client
                .start::<Trip>(id, TripState::default())
                .await
                .unwrap(),
        );
    }
    let b = trip_orchestrator(two("b")).await;
    let mut owners = std::collections::BTreeSet::new();
    for _ in 0..500 {
        owners.clear();
        for shard in 0..2 {
            if let Some((node, _)) = bus.owner("Trip", shard).await.unwrap() {
                owners.insert(node);
            }
        }
        if owners.len() == 2 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert_eq!(owners.len(), 2, "b took a shard");
    let published = handoffs_published(&redis.url(), prefix);

    gate.0.add_permits(1_000);
    for trip in trips {
        ends_with_each_call_once(&trip).await;
    }
    assert!(
        published.load(std::sync::atomic::Ordering::SeqCst) > 0,
        "the outcomes `a` refused were published"
    );
    for engine in [client, worker, b, a] {
        engine.shutdown().await;
    }
}

/// A caller keeps the address an owner advertised under a shard's request stream. When
/// that owner gives the shard to another orchestrator, it refuses the requests it is
/// offered for it; the caller appends them to the stream, and the new owner applies each
/// once (and the caller looks the new owner's address up for the next).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_request_offered_to_a_former_owner_goes_through_the_stream_to_the_new_one() {
    let redis = servers::Redis::start();
    let prefix = "movedreq";
    let two = |node: &str| shared(&redis.url(), prefix, node).shards(2);
    let a = trip_orchestrator(two("a")).await;
    let worker = gate_worker(
        two("w"),
        Gated(Arc::new(tokio::sync::Semaphore::new(1_000))),
    )
    .await;
    let client = trip_client(two("c")).await;
    let bus = two("t").store().bus();
    for shard in 0..2 {
        advertised(&bus, &bus.requests("Trip", shard)).await;
    }
    // A trip on each shard, so the client has looked up and keeps `a`'s address for both.
    for id in ids_in_two_shards("warm", 1) {
        let trip = client
            .start::<Trip>(id, TripState::default())
            .await
            .unwrap();
        ends_with_each_call_once(&trip).await;
    }
    for shard in 0..2 {
        assert_eq!(
            appended(&redis.url(), &bus.requests("Trip", shard)).await,
            0,
            "the first starts went to `a` directly"
        );
    }

    let b = trip_orchestrator(two("b")).await;
    let mut moved = None;
    for _ in 0..500 {
        for shard in 0..2 {
            if let Some((node, _)) = bus.owner("Trip", shard).await.unwrap()
                && node == "b"
            {
                moved = Some(shard);
            }
        }
        if moved.is_some() {
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let moved = moved.expect("b took a shard");
    let mut trips = Vec::new();
    for id in ids_in_two_shards("moved", 3) {
        trips.push(
            client
                .start::<Trip>(id, TripState::default())
                .await
                .unwrap(),
        );
    }
    for trip in trips {
        ends_with_each_call_once(&trip).await;
    }
    let through_stream = appended(&redis.url(), &bus.requests("Trip", moved)).await;
    assert!(
        (1..=3).contains(&through_stream),
        "the start `a` refused went through the stream, the next to `b` directly ({through_stream} appended)"
    );
    for engine in [client, worker, b, a] {
        engine.shutdown().await;
    }
}

/// A caller whose requests go to two owners, one of which does not answer (its address
/// takes connections and says nothing, as a stopped process's does): the request to the
/// other owner is answered while the silent one is still waited for, and the silent
/// one's request goes through the stream once the wait is over.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_owner_that_does_not_answer_holds_up_only_the_requests_made_to_it() {
    let redis = servers::Redis::start();
    let prefix = "pausedreq";
    let two = |node: &str| shared(&redis.url(), prefix, node).shards(2);
    let orchestrator = trip_orchestrator(two("o")).await;
    let worker = gate_worker(
        two("w"),
        Gated(Arc::new(tokio::sync::Semaphore::new(1_000))),
    )
    .await;
    let client = trip_client(two("c")).await;
    let bus = two("t").store().bus();
    for shard in 0..2 {
        advertised(&bus, &bus.requests("Trip", shard)).await;
    }
    // Shard 1's owner, as the client will find it: connections are taken, nothing is said.
    let silent = silent_owner(&bus, &bus.requests("Trip", 1)).await;
    let in_shard = |shard: u16| id_in_shard("paused", shard);
    let (to_silent, to_answering) = (in_shard(1), in_shard(0));

    let held = tokio::spawn({
        let client = client.clone();
        async move { client.start::<Trip>(to_silent, TripState::default()).await }
    });
    let (conn, _) = tokio::time::timeout(Duration::from_secs(10), silent.accept())
        .await
        .expect("the client connects to the silent owner")
        .unwrap();
    let answered = tokio::time::timeout(
        Duration::from_secs(10),
        client.start::<Trip>(to_answering, TripState::default()),
    )
    .await
    .expect("the start for the answering owner returns")
    .unwrap();
    let mut probe = [0u8; 1];
    assert!(
        matches!(conn.try_read(&mut probe), Err(e) if e.kind() == std::io::ErrorKind::WouldBlock),
        "the start for the answering owner returned while the silent owner was still waited for"
    );
    let held = tokio::time::timeout(Duration::from_secs(10), held)
        .await
        .expect("the start for the silent owner returns")
        .unwrap()
        .unwrap();
    for trip in [answered, held] {
        ends_with_each_call_once(&trip).await;
    }
    assert_eq!(
        (
            appended(&redis.url(), &bus.requests("Trip", 0)).await,
            appended(&redis.url(), &bus.requests("Trip", 1)).await,
        ),
        (0, 1),
        "the start for the silent owner went through its stream, the other directly"
    );
    drop(conn);
    for engine in [client, worker, orchestrator] {
        engine.shutdown().await;
    }
}

/// A worker whose outcomes go to two owners, one of which does not answer (its address
/// takes connections and says nothing): while the silent owner is still waited for, the
/// outcomes the worker has for the other owner after it are delivered, and that owner's
/// trip ends; the silent owner's outcomes are published once the wait is over, and its
/// trip ends too, each call applied once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_owner_that_does_not_answer_holds_up_only_the_outcomes_offered_to_it() {
    let redis = servers::Redis::start();
    let prefix = "pausedout";
    let two = |node: &str| shared(&redis.url(), prefix, node).shards(2);
    let orchestrator = trip_orchestrator(two("o")).await;
    let gate = Gated(Arc::new(tokio::sync::Semaphore::new(0)));
    let worker = gate_worker(two("w"), gate.clone()).await;
    let client = trip_client(two("c")).await;
    let bus = two("t").store().bus();
    for shard in 0..2 {
        subscribed(&redis.url(), &bus.handoffs("Trip", shard)).await;
        advertised(&bus, &bus.handoffs("Trip", shard)).await;
    }
    // Shard 1's owner, as the worker will find it: connections are taken, nothing is said.
    let silent = silent_owner(&bus, &bus.handoffs("Trip", 1)).await;
    let in_shard = |shard: u16| id_in_shard("pausedout", shard);

    // The first call of the trip on shard 1 passes the gate alone: its outcome is offered
    // to the silent owner.
    let held = client
        .start::<Trip>(in_shard(1), TripState::default())
        .await
        .unwrap();
    gate.0.add_permits(1);
    let (conn, _) = tokio::time::timeout(Duration::from_secs(10), silent.accept())
        .await
        .expect("the worker connects to the silent owner")
        .unwrap();
    // Then a trip on shard 0: its outcomes come after, in batches of their own.
    let answered = client
        .start::<Trip>(in_shard(0), TripState::default())
        .await
        .unwrap();
    gate.0.add_permits(1_000);
    let ended = tokio::time::timeout(Duration::from_secs(10), answered.finished())
        .await
        .expect("the trip on the answering owner's shard ends")
        .unwrap();
    assert_eq!(ended, Ended::Finished);
    let mut probe = [0u8; 1];
    assert!(
        matches!(conn.try_read(&mut probe), Err(e) if e.kind() == std::io::ErrorKind::WouldBlock),
        "the trip on the answering owner's shard ended while the silent owner was still waited for"
    );
    for trip in [answered, held] {
        ends_with_each_call_once(&trip).await;
    }
    drop(conn);
    for engine in [client, worker, orchestrator] {
        engine.shutdown().await;
    }
}
