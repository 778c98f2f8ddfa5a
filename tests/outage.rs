#![allow(missing_docs)] // test-local flows and drivers (and nothing without the features)
#![cfg(all(feature = "redis", feature = "s3"))]
//! Server outages, with the real servers: `redis-server` killed (SIGKILL) and restarted
//! with its append-only file, moto's S3 server frozen (SIGSTOP) and thawed.
//!
//! The promise: a step whose payload lives on a server that is away is retried with
//! backoff; its instance waits; the engine keeps serving every other instance; when the
//! server is back the instance goes on, and nothing is lost — including across an engine
//! restart during the outage.

#[path = "support/servers.rs"]
mod servers;

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use flowwire::prelude::*;
use flowwire::storage::store::RedisStore;
use flowwire::storage::tier::{S3Config, S3Tier};
use flowwire::storage::{KIB, Ladder, Tier};
use flowwire::{Ended, Engine};
use servers::{Redis, S3};
use tokio::sync::watch;

#[derive(Debug, Serialize, Deserialize, thiserror::Error)]
#[error("lost in transit")]
pub struct Lost;

#[driver(timeout = "120s")]
pub trait Courier {
    /// Carries a parcel and hands it back, once its lane's gate is open.
    async fn carry(&self, lane: usize, data: Vec<u8>) -> Result<Vec<u8>, Lost>;
}

#[derive(Debug, Default, Clone, Serialize, Deserialize)]
pub struct ParcelState {
    lane: usize,
    data: Vec<u8>,
    rounds: u32,
}

/// Carries its data three times, each round a durable step of the data's size.
#[flow]
pub struct Parcel {
    #[link]
    state: ParcelState,
    #[link]
    courier: impl Courier,
}

const ROUNDS: u32 = 3;

#[flow]
impl Parcel {
    #[probe]
    fn rounds(&self) -> u32 {
        self.state.rounds
    }
    #[wire]
    fn run(&mut self) -> Command<Self> {
        if self.state.rounds == ROUNDS {
            return Command::finish();
        }
        Command::drive(self.courier.carry(self.state.lane, self.state.data.clone())).then(|f, r| {
            f.state.data = r?;
            f.state.rounds += 1;
            Ok(())
        })
    }
}

/// Lane 0 is always open; the others open when the test says so.
const FREE: usize = 0;
const ON_REDIS: usize = 1;
const ON_S3: usize = 2;

#[derive(Clone)]
struct Gated {
    gates: Arc<[watch::Sender<bool>; 3]>,
    /// Calls served, per lane.
    carried: Arc<[AtomicUsize; 3]>,
}

impl Gated {
    fn new() -> Self {
        Self {
            gates: Arc::new([
                watch::Sender::new(true),
                watch::Sender::new(false),
                watch::Sender::new(false),
            ]),
            carried: Arc::default(),
        }
    }

    fn carried(&self, lane: usize) -> usize {
        self.carried[lane].load(Ordering::SeqCst)
    }

    fn open(&self, lane: usize) {
        self.gates[lane].send_replace(true);
    }
}

#[driver]
impl Courier for Gated {
    async fn carry(&self, lane: usize, data: Vec<u8>) -> Result<Vec<u8>, Lost> {
        let mut gate = self.gates.get(lane).ok_or(Lost)?.subscribe();
        gate.wait_for(|open| *open).await.map_err(|_| Lost)?;
        self.carried[lane].fetch_add(1, Ordering::SeqCst);
        Ok(data)
    }
}

fn parcel(lane: usize, len: usize) -> ParcelState {
    ParcelState {
        lane,
        data: (0..len).map(|i| (i % 251) as u8).collect(),
        rounds: 0,
    }
}

/// Waits (bounded) for an instance to finish after its three rounds.
async fn finishes(engine: &Engine, id: &str, within: Duration) {
    let handle = engine.handle::<Parcel>(id).await.unwrap();
    let ended = tokio::time::timeout(within, handle.finished())
        .await
        .unwrap_or_else(|_| panic!("{id} did not finish within {within:?}"))
        .unwrap();
    assert_eq!(ended, Ended::Finished, "{id}");
}

/// Starts `{prefix}0` … `{prefix}{n-1}` on `lane` with `len` bytes each; each start is
/// durable (its blobs on their tier) when this returns.
async fn start_all(engine: &Engine, prefix: &str, n: usize, lane: usize, len: usize) {
    for i in 0..n {
        engine
            .start::<Parcel>(format!("{prefix}{i}"), parcel(lane, len))
            .await
            .unwrap();
    }
}

/// Waits (bounded) for `{prefix}0` … `{prefix}{n-1}` to finish.
async fn all_finish(engine: &Engine, prefix: &str, n: usize, within: Duration) {
    for i in 0..n {
        finishes(engine, &format!("{prefix}{i}"), within).await;
    }
}

/// Starts `n` instances on the always-open lane and checks they all finish — the engine
/// serves them whatever the state of the servers.
async fn small_ones_run(engine: &Engine, prefix: &str, n: usize) {
    start_all(engine, prefix, n, FREE, 100).await;
    all_finish(engine, prefix, n, Duration::from_secs(20)).await;
}

/// The rounds done, as the engine has them committed.
async fn rounds(engine: &Engine, id: &str) -> u32 {
    engine
        .handle::<Parcel>(id)
        .await
        .unwrap()
        .rounds()
        .await
        .unwrap()
}

/// A server the test can take away and bring back.
trait Outage {
    fn begin(&mut self);
    fn end(&mut self);
}

impl Outage for Redis {
    fn begin(&mut self) {
        self.kill();
    }
    fn end(&mut self) {
        self.restart();
    }
}

struct FrozenS3<'a>(&'a S3);

impl Outage for FrozenS3<'_> {
    fn begin(&mut self) {
        self.0.freeze();
    }
    fn end(&mut self) {
        self.0.thaw();
    }
}

/// With the server away, the replies of lane `lane` arrive: those `n` instances (`{prefix}0`…)
/// cannot write their steps and stay at round 0 while fresh instances on the free lane run
/// to the end; with the server back, the held instances finish.
async fn held_until_back(
    engine: &Engine,
    gated: &Gated,
    lane: usize,
    prefix: &str,
    n: usize,
    server: &mut dyn Outage,
) {
    server.begin();
    gated.open(lane);
    small_ones_run(engine, &format!("during-{prefix}-outage-"), 20).await;
    for i in 0..n {
        let id = format!("{prefix}{i}");
        assert_eq!(
            rounds(engine, &id).await,
            0,
            "{id} advanced while its server was away"
        );
    }
    server.end();
    all_finish(engine, prefix, n, Duration::from_secs(30)).await;
}

fn s3_config(server: &S3, bucket: &str) -> S3Config {
    S3Config::new(bucket)
        .endpoint(&server.endpoint())
        .path_style(true)
        .credentials("test", "test")
        .attempt_timeout(Duration::from_secs(1))
        .max_attempts(2)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_tier_outage_holds_only_the_instances_whose_payloads_live_there() {
    let mut redis = Redis::start_durable();
    let s3 = S3::start();
    S3Tier::new(s3_config(&s3, "outage"))
        .create_bucket_if_missing()
        .await
        .unwrap();
    let tmp = tempfile::tempdir().unwrap();
    let gated = Gated::new();
    let engine = Engine::builder()
        .data_dir(tmp.path())
        .storage(
            Ladder::new()
                .inline_below(4 * KIB)
                .below(
                    256 * KIB,
                    Tier::redis(&redis.url(), "blobs").unwrap().named("redis"),
                )
                .default_to(Tier::s3(s3_config(&s3, "outage")).named("s3")),
        )
        .store_timeout(Duration::from_secs(5))
        .flow::<Parcel>()
        .driver(gated.clone())
        .start()
        .await
        .unwrap();

    // 64 KB parcels live on Redis, 1 MB parcels on S3; their first step (and call
    // argument) is durable there before `start` returns.
    start_all(&engine, "r", 4, ON_REDIS, 64 * 1024).await;
    start_all(&engine, "s", 2, ON_S3, 1 << 20).await;

    // Redis goes away (SIGKILL; back with its append-only file), then S3 hangs (a frozen
    // server: connections open, no answers). Each time the parcels on it wait, the others
    // run, and the waiting ones finish once it is back.
    held_until_back(&engine, &gated, ON_REDIS, "r", 4, &mut redis).await;
    held_until_back(&engine, &gated, ON_S3, "s", 2, &mut FrozenS3(&s3)).await;
    engine.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_instance_unreadable_at_start_up_is_loaded_once_its_tier_is_back() {
    let mut redis = Redis::start_durable();
    let tmp = tempfile::tempdir().unwrap();
    let url = redis.url();
    let ladder = || {
        Ladder::new()
            .inline_below(4 * KIB)
            .default_to(Tier::redis(&url, "blobs").unwrap().named("redis"))
    };
    let engine = Engine::builder()
        .data_dir(tmp.path())
        .storage(ladder())
        .flow::<Parcel>()
        .driver(Gated::new())
        .start()
        .await
        .unwrap();
    start_all(&engine, "big", 3, ON_REDIS, 64 * 1024).await;
    engine.shutdown().await;
    drop(engine);

    // The engine comes back while Redis is away: it starts, serves the instances it can
    // read, and reports the others' reads as transient errors.
    redis.kill();
    let gated = Gated::new();
    gated.open(ON_REDIS);
    let engine = Engine::builder()
        .data_dir(tmp.path())
        .storage(ladder())
        .flow::<Parcel>()
        .driver(gated.clone())
        .start()
        .await
        .unwrap();
    small_ones_run(&engine, "meanwhile-", 10).await;
    let err = engine.handle::<Parcel>("big0").await.unwrap_err();
    assert!(err.is_transient(), "{err}");

    // Redis returns: the background reload finds the instances and re-sends their calls in
    // flight — nothing asks for them meanwhile — and they run their rounds and finish.
    redis.restart();
    for _ in 0..300 {
        if gated.carried(ON_REDIS) == 3 * ROUNDS as usize {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert_eq!(gated.carried(ON_REDIS), 3 * ROUNDS as usize);
    all_finish(&engine, "big", 3, Duration::from_secs(30)).await;
    engine.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_redis_store_going_away_pauses_steps_that_resume_when_it_returns() {
    let mut redis = Redis::start_durable();
    let gated = Gated::new();
    let engine = Engine::builder()
        .store(RedisStore::open(&redis.url(), "fw").unwrap())
        .store_timeout(Duration::from_secs(5))
        .flow::<Parcel>()
        .driver(gated.clone())
        .start()
        .await
        .unwrap();
    start_all(&engine, "p", 5, ON_REDIS, 100).await;

    redis.kill();
    gated.open(ON_REDIS);
    // A new start cannot be made durable: its caller learns why, and may retry.
    let err = engine
        .start::<Parcel>("refused", parcel(FREE, 10))
        .await
        .unwrap_err();
    assert!(err.is_transient(), "{err}");
    for i in 0..5 {
        assert_eq!(rounds(&engine, &format!("p{i}")).await, 0);
    }

    // Back with everything it acknowledged (append-only file, fsync always).
    redis.restart();
    all_finish(&engine, "p", 5, Duration::from_secs(30)).await;
    assert_eq!(rounds(&engine, "p0").await, ROUNDS);
    // The refused start left nothing behind: the id is free.
    engine
        .start::<Parcel>("refused", parcel(FREE, 10))
        .await
        .unwrap();
    finishes(&engine, "refused", Duration::from_secs(20)).await;
    engine.shutdown().await;
}

#[derive(Debug, Default, Clone, Serialize, Deserialize)]
pub struct ShelfState {
    data: Vec<u8>,
    taken: u32,
}

/// Waits on its shelf (out of memory) until it is taken once.
#[flow]
pub struct Shelf {
    #[link]
    state: ShelfState,
}

#[flow]
impl Shelf {
    #[impulse]
    fn take(&mut self) {
        self.state.taken += 1;
    }
    #[wire]
    fn run(&mut self) -> Command<Self> {
        if self.state.taken > 0 {
            Command::finish()
        } else {
            Command::wait()
        }
    }
}

/// An impulse for a waiting instance whose state lives on a server that hangs (a frozen
/// S3) waits for that server alone: the instance is read off the runner's task, and an
/// impulse for another waiting instance is applied meanwhile. Before, the runner read the
/// first instance inline and held every instance of the flow behind one S3 GET.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_slow_read_of_one_instance_holds_no_other() {
    let s3 = S3::start();
    // One attempt with a long timeout: the read hangs for as long as the server does.
    let config = S3Config::new("shelves")
        .endpoint(&s3.endpoint())
        .path_style(true)
        .credentials("test", "test")
        .attempt_timeout(Duration::from_secs(30))
        .max_attempts(1);
    S3Tier::new(config.clone())
        .create_bucket_if_missing()
        .await
        .unwrap();
    let engine = Engine::builder()
        .in_memory()
        .storage(
            Ladder::new()
                .inline_below(4 * KIB)
                .default_to(Tier::s3(config).named("s3")),
        )
        .store_timeout(Duration::from_mins(1))
        .flow::<Shelf>()
        .start()
        .await
        .unwrap();
    let on_s3 = ShelfState {
        data: vec![3; 64 * 1024],
        taken: 0,
    };
    let big = engine.start::<Shelf>("big", on_s3).await.unwrap();
    let small = engine
        .start::<Shelf>("small", ShelfState::default())
        .await
        .unwrap();

    s3.freeze();
    let big_taken = tokio::spawn(async move { big.take().await });
    // The runner takes the first impulse (and starts reading `big`) before the second.
    tokio::time::sleep(Duration::from_millis(300)).await;
    let small_taken = tokio::time::timeout(Duration::from_secs(10), small.take()).await;
    let big_waits = !big_taken.is_finished();
    s3.thaw();
    assert!(
        matches!(small_taken, Ok(Ok(()))),
        "the impulse for the instance in memory's reach was applied: {small_taken:?}"
    );
    assert!(
        big_waits,
        "the impulse for the instance on S3 waited for S3"
    );
    let big_taken = tokio::time::timeout(Duration::from_secs(30), big_taken)
        .await
        .expect("applied once S3 is back")
        .unwrap();
    assert!(big_taken.is_ok(), "{big_taken:?}");
    for id in ["big", "small"] {
        let h = engine.handle::<Shelf>(id).await.unwrap();
        assert_eq!(h.finished().await.unwrap(), Ended::Finished, "{id}");
    }
    engine.shutdown().await;
}
