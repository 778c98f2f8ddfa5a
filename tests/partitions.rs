#![allow(missing_docs)] // test-local flows
#![cfg(feature = "redis")]
//! Partitions between processes and their Redis, with a loopback TCP proxy per process
//! that the test freezes, cuts and heals (issue 23). Each test states what must hold when
//! the network misbehaves.
//!
//! (Over 600 lines: one partition scenario per test, sharing the proxy, the flows and the
//! helpers that start and stop processes; split in files, each would copy them.)

use std::time::Duration;

use flowwire::prelude::*;
use flowwire::storage::InstanceStore as _;
use flowwire::{Ended, Engine, Error, Shared};

#[path = "support/servers.rs"]
mod servers;

#[path = "support/proxy.rs"]
mod proxy;

#[derive(Debug, Default, Clone, Serialize, Deserialize)]
pub struct TallyState {
    count: u32,
}

/// Finishes after one `add`.
#[flow]
pub struct Tally {
    #[link]
    state: TallyState,
}

#[flow]
impl Tally {
    #[impulse]
    fn add(&mut self) {
        self.state.count += 1;
    }
    #[wire]
    fn run(&mut self) -> Command<Self> {
        if self.state.count > 0 {
            Command::finish()
        } else {
            Command::wait()
        }
    }
}

/// An orchestrator's stream read that times out on the client after Redis handed it an
/// entry leaves that entry on the orchestrator's own pending list: the orchestrator must
/// read it back, not only new entries, while it keeps the shard (a 30 s lease outlives a
/// 12 s stall here, so nobody takes the shard over).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_entry_delivered_during_a_stalled_read_is_read_again() {
    let redis = servers::Redis::start();
    let link = proxy::Proxy::start(redis.port).await;
    let shared = |url: &str| {
        Shared::redis(url, "stall")
            .unwrap()
            .lease_ttl(Duration::from_secs(30))
    };
    let orchestrator = Engine::builder()
        .shared(shared(&link.redis_url()))
        .flow::<Tally>()
        .orchestrator()
        .start()
        .await
        .unwrap();
    let client = Engine::builder()
        // Its requests go through the request stream, which this test is about (not
        // to the owner directly).
        .shared(shared(&redis.url()).direct_handoffs(None))
        .flow::<Tally>()
        .client()
        .request_timeout(Duration::from_mins(1))
        .start()
        .await
        .unwrap();
    let tally = client
        .start::<Tally>("t", TallyState::default())
        .await
        .unwrap();

    // The orchestrator's link stalls while its blocking read is out: Redis hands the
    // impulse to it, and the reply waits in the network past the client's read timeout.
    link.freeze();
    let sent = tokio::spawn(async move { tally.add().id("add-1").await });
    tokio::time::sleep(Duration::from_secs(12)).await;
    link.heal();

    let tally = client.handle::<Tally>("t").await.unwrap();
    let ended = tokio::time::timeout(Duration::from_secs(20), tally.finished())
        .await
        .expect("the impulse is applied once the link is back")
        .unwrap();
    assert_eq!(ended, Ended::Finished);
    let applied = sent.await.unwrap();
    assert!(applied.is_ok(), "{applied:?}");
    orchestrator.shutdown().await;
    client.shutdown().await;
}

/// A reader of an earlier owner can take a shard's new entry after the owner of now
/// claimed what was pending (Redis serves a read registered before the shard changed
/// hands). Here a reader the owner does not know (`ghost`, in the orchestrators' group)
/// takes an impulse while the owner's link is stalled and never acknowledges it: the owner
/// claims it from there within half a lease, applies it and answers the caller, without
/// the shard changing hands.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_entry_another_reader_took_is_claimed_and_applied() {
    let redis = servers::Redis::start();
    let link = proxy::Proxy::start(redis.port).await;
    let shared = |url: &str| {
        Shared::redis(url, "ghost")
            .unwrap()
            .shards(1)
            .lease_ttl(Duration::from_secs(8))
    };
    let orchestrator = Engine::builder()
        .shared(shared(&link.redis_url()))
        .flow::<Tally>()
        .orchestrator()
        .start()
        .await
        .unwrap();
    let client = Engine::builder()
        // Its requests go through the request stream, which this test is about (not
        // to the owner directly).
        .shared(shared(&redis.url()).direct_handoffs(None))
        .flow::<Tally>()
        .client()
        .request_timeout(Duration::from_secs(30))
        .start()
        .await
        .unwrap();
    let tally = client
        .start::<Tally>("t", TallyState::default())
        .await
        .unwrap();
    let granted = orchestrator.leases()[0].token;

    // The owner's blocking read runs out on the server while its link is stalled, so the
    // impulse is left for whoever reads next: the ghost.
    link.freeze();
    tokio::time::sleep(Duration::from_secs(2)).await;
    let sent = tokio::spawn(async move { tally.add().id("add-1").await });
    let bus = shared(&redis.url()).store().bus();
    let requests = [bus.requests("Tally", 0)];
    let mut ghost = bus.reader().await.unwrap();
    let mut stolen = Vec::new();
    for _ in 0..100 {
        stolen = ghost
            .read(
                &requests,
                "orchestrators",
                "ghost",
                10,
                Duration::from_millis(10),
            )
            .await
            .unwrap();
        if !stolen.is_empty() {
            break;
        }
    }
    assert_eq!(stolen.len(), 1, "the ghost took the impulse");
    link.heal();

    let applied = tokio::time::timeout(Duration::from_secs(20), sent)
        .await
        .expect("the impulse is answered")
        .unwrap();
    assert!(applied.is_ok(), "{applied:?}");
    let tally = client.handle::<Tally>("t").await.unwrap();
    assert_eq!(tally.finished().await.unwrap(), Ended::Finished);
    assert_eq!(
        orchestrator.leases()[0].token,
        granted,
        "the shard stayed with its owner"
    );
    assert_eq!(
        bus.backlog(&requests[0], "orchestrators").await.unwrap(),
        (0, 0),
        "the claimed entry was acknowledged"
    );
    orchestrator.shutdown().await;
    client.shutdown().await;
}

/// An acknowledgement lost with its connection (the owner's reads go on undisturbed on a
/// connection of their own) is tried again: the answered impulse does not stay on the
/// owner's pending list, where nobody would read it while the owner keeps the shard. (An
/// impulse that makes a step is settled by that step's commit on one server, so the lost
/// acknowledgement is that of an impulse answered without a step: one applied before.)
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_acknowledgement_lost_with_its_connection_is_sent_again() {
    let redis = servers::Redis::start();
    let link = proxy::Proxy::start(redis.port).await;
    let shared = |url: &str| Shared::redis(url, "lostack").unwrap().shards(1);
    let orchestrator = Engine::builder()
        .shared(shared(&link.redis_url()))
        .flow::<Tally>()
        .orchestrator()
        .start()
        .await
        .unwrap();
    let client = Engine::builder()
        // Its requests go through the request stream, which this test is about (not
        // to the owner directly).
        .shared(shared(&redis.url()).direct_handoffs(None))
        .flow::<Tally>()
        .client()
        .start()
        .await
        .unwrap();
    let tally = client
        .start::<Tally>("t", TallyState::default())
        .await
        .unwrap();
    let bus = shared(&redis.url()).store().bus();
    let requests = bus.requests("Tally", 0);
    let mut left = (1, 1);
    for _ in 0..100 {
        left = bus.backlog(&requests, "orchestrators").await.unwrap();
        if left == (0, 0) {
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert_eq!(left, (0, 0), "the start was acknowledged");

    link.close_on(&[b"XACK", requests.as_bytes()]);
    tally.add().id("add-1").await.unwrap();
    assert_eq!(tally.finished().await.unwrap(), Ended::Finished);
    for _ in 0..100 {
        left = bus.backlog(&requests, "orchestrators").await.unwrap();
        if left == (0, 0) {
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert_eq!(left, (0, 0), "the impulse was settled with its step");
    assert!(
        !link.fired(),
        "the applied impulse's entry was acknowledged by its step's commit, not on its own"
    );

    // The same impulse again is answered without a step; its entry's acknowledgement goes
    // out on its own, and is lost with its connection.
    let again = tally.add().id("add-1").await;
    assert!(
        matches!(again, Err(Error::ImpulseAlreadyApplied { .. })),
        "{again:?}"
    );
    for _ in 0..250 {
        left = bus.backlog(&requests, "orchestrators").await.unwrap();
        if link.fired() && left == (0, 0) {
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert!(
        link.fired(),
        "the retried impulse's acknowledgement was lost"
    );
    assert_eq!(
        left,
        (0, 0),
        "the impulse's entry is acknowledged (all, pending)"
    );
    orchestrator.shutdown().await;
    client.shutdown().await;
}

/// The deployment of the lease tests: one shard (so the two orchestrators contend for
/// it), a 2 s lease, and the store's write audit on.
fn one_shard(url: &str, prefix: &str) -> Shared {
    Shared::redis(url, prefix)
        .unwrap()
        .shards(1)
        .lease_ttl(Duration::from_secs(2))
        .audit_writes()
}

async fn orchestrator(url: &str, prefix: &str, node: &str) -> Engine {
    Engine::builder()
        .shared(one_shard(url, prefix).node_name(node))
        .flow::<Tally>()
        .orchestrator()
        .start()
        .await
        .unwrap()
}

/// Waits until the lease of `flow`'s shard is held under a token above `above`; returns it.
async fn granted_above(shared: &Shared, flow: &str, above: u64) -> u64 {
    let bus = shared.store().bus();
    for _ in 0..2_000 {
        if let Some((_, token)) = bus.owner(flow, 0).await.unwrap()
            && token > above
        {
            return token;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    panic!("no lease above token {above} was granted");
}

/// A commit sent by an owner just before its link stalled reaches Redis after another
/// orchestrator took the shard. The store refuses it: the newest token granted for the
/// *shard* is newer. (Fencing against the record's own last token lets it through, since
/// the new owner never wrote that record: the start it carries timed out for its caller,
/// so the new owner drops it.)
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_commit_that_arrives_after_the_shard_moved_on_is_refused() {
    let redis = servers::Redis::start();
    let link = proxy::Proxy::start(redis.port).await;
    let prefix = "fence";
    let shared = one_shard(&redis.url(), prefix);
    let a = orchestrator(&link.redis_url(), prefix, "a").await;
    let first = granted_above(&shared, "Tally", 0).await;
    let b = orchestrator(&redis.url(), prefix, "b").await;
    let client = Engine::builder()
        .shared(shared.clone())
        .flow::<Tally>()
        .client()
        .request_timeout(Duration::from_secs(1))
        .start()
        .await
        .unwrap();

    // `a` takes the start and sends its commit; the link stalls with the commit in it.
    link.freeze_on(&[b"EVALSHA", b"late-start"]);
    let started = client
        .start::<Tally>("late-start", TallyState::default())
        .await;
    assert!(
        started.is_err(),
        "the caller gives up on a start not answered"
    );
    let second = granted_above(&shared, "Tally", first).await;
    let store = shared.store();
    let key = flowwire::storage::InstanceKey::new("Tally", "late-start");
    assert!(
        store.audit(&key).await.unwrap().is_empty(),
        "nothing landed yet"
    );

    // The stale commit reaches Redis now.
    link.heal();
    tokio::time::sleep(Duration::from_secs(2)).await;
    let writes = store.audit(&key).await.unwrap();
    assert!(
        writes.iter().all(|w| w.token >= second),
        "a write under token {first} landed after token {second} was granted: {writes:?}"
    );
    assert!(
        store.load(&key).await.unwrap().is_none(),
        "the late start is not applied"
    );
    for engine in [a, b, client] {
        engine.shutdown().await;
    }
}

/// An orchestrator cut off from Redis stops running its shard when its lease may have run
/// out — counted from when it last *sent* a renewal that was confirmed — not when a
/// renewal finally fails (a client timeout later), so it has let go before anyone else
/// can take the shard.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_partitioned_owner_lets_go_before_its_lease_can_move_on() {
    let redis = servers::Redis::start();
    let link = proxy::Proxy::start(redis.port).await;
    let prefix = "letgo";
    let shared = one_shard(&redis.url(), prefix);
    let a = orchestrator(&link.redis_url(), prefix, "a").await;
    let first = granted_above(&shared, "Tally", 0).await;
    let b = orchestrator(&redis.url(), prefix, "b").await;

    link.freeze();
    let frozen = tokio::time::Instant::now();
    let watch_a = tokio::spawn(async move {
        loop {
            if a.health().await.shards.values().all(Vec::is_empty) {
                return (tokio::time::Instant::now(), a);
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    });
    granted_above(&shared, "Tally", first).await;
    let taken = tokio::time::Instant::now();
    let (let_go, a) = tokio::time::timeout(Duration::from_secs(30), watch_a)
        .await
        .expect("the cut-off owner lets go")
        .unwrap();
    assert!(
        let_go <= taken,
        "the old owner let go {:?} after the freeze, the new one took over after {:?}",
        let_go - frozen,
        taken - frozen
    );
    link.heal();
    a.shutdown().await;
    b.shutdown().await;
}

/// A server that lost its script cache (restarted, failed over, `SCRIPT FLUSH`) answers
/// `NOSCRIPT`: the lease scripts are loaded again and the renewal goes through.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_lease_is_renewed_after_the_server_forgot_its_scripts() {
    let redis = servers::Redis::start();
    let bus = one_shard(&redis.url(), "noscript").store().bus();
    let ttl = Duration::from_secs(5);
    let lease = bus.acquire("Tally", 0, "a", ttl).await.unwrap().unwrap();
    redis.cli(&["SCRIPT", "FLUSH"]);
    assert!(bus.renew("Tally", 0, "a", lease.token, ttl).await.unwrap());
    redis.cli(&["SCRIPT", "FLUSH"]);
    bus.release("Tally", 0, "a", lease.token, true)
        .await
        .unwrap();
    assert_eq!(bus.owner("Tally", 0).await.unwrap(), None);
}

/// Answers when the test opens the gate (a call in flight while the shard changes hands).
#[driver(timeout = "120s", retries = 0)]
pub trait Gate {
    async fn pass(&self) -> Result<(), String>;
}

#[derive(Clone)]
pub struct Gated(std::sync::Arc<tokio::sync::Semaphore>);

impl Gated {
    fn closed() -> Self {
        Self(std::sync::Arc::new(tokio::sync::Semaphore::new(0)))
    }
}

#[driver]
impl Gate for Gated {
    async fn pass(&self) -> Result<(), String> {
        let permit = self.0.acquire().await.map_err(|e| e.to_string())?;
        permit.forget();
        Ok(())
    }
}

#[derive(Debug, Default, Clone, Serialize, Deserialize)]
pub struct BulkyState {
    /// Large enough to live on the S3 tier.
    payload: Vec<u8>,
    passed: bool,
}

/// Calls the gate once, then finishes.
#[flow]
pub struct Bulky {
    #[link]
    state: BulkyState,
    #[link]
    gate: impl Gate,
}

#[flow]
impl Bulky {
    #[wire]
    fn run(&mut self) -> Command<Self> {
        if self.state.passed {
            Command::finish()
        } else {
            Command::drive(self.gate.pass()).then(|f, r| {
                f.state.passed = r.is_ok();
                Ok(())
            })
        }
    }
}

/// An outcome that reaches a shard's owner while the instance it answers is not in memory
/// (here: the owner took the shard over cleanly, and could not load the instance yet
/// because its state lives on an S3 tier that is away) is neither acknowledged nor
/// dropped: the owner loads the instance and applies it, or leaves it to be read again.
/// Before, it was acknowledged unseen, and the flow waited for ever (issue 23, item 2).
#[cfg(feature = "s3")]
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_outcome_for_an_instance_not_in_memory_is_applied_not_dropped() {
    use flowwire::storage::tier::{S3Config, S3Tier};
    use flowwire::storage::{KIB, Ladder, Tier};

    let redis = servers::Redis::start();
    let s3 = servers::S3::start();
    let config = S3Config::new("unseen")
        .endpoint(&s3.endpoint())
        .path_style(true)
        .credentials("test", "test")
        .attempt_timeout(Duration::from_secs(1))
        .max_attempts(2);
    S3Tier::new(config.clone())
        .create_bucket_if_missing()
        .await
        .unwrap();
    let ladder = || {
        Ladder::new()
            .inline_below(KIB)
            .default_to(Tier::s3(config.clone()).named("s3"))
    };
    let prefix = "unseen";
    let shared = |node: &str| one_shard(&redis.url(), prefix).node_name(node);
    let orchestrator = |node: &'static str| {
        Engine::builder()
            .shared(shared(node))
            .storage(ladder())
            .store_timeout(Duration::from_secs(5))
            .flow::<Bulky>()
            .orchestrator()
            .start()
    };
    let a = orchestrator("a").await.unwrap();
    let gate = Gated::closed();
    let worker = Engine::builder()
        .shared(shared("w"))
        .driver(gate.clone())
        .worker()
        .start()
        .await
        .unwrap();
    let client = Engine::builder()
        .shared(shared("c"))
        .flow::<Bulky>()
        .client()
        .start()
        .await
        .unwrap();
    let state = BulkyState {
        payload: vec![7; 8 * 1024],
        passed: false,
    };
    let bulky = client.start::<Bulky>("b", state).await.unwrap();

    // `a` hands the shard over cleanly with the call in flight; `b` takes it while S3 is
    // away, so the instance stays out of memory (its load is tried again later).
    a.shutdown().await;
    s3.freeze();
    let b = orchestrator("b").await.unwrap();
    granted_above(&one_shard(&redis.url(), prefix), "Bulky", 1).await;
    tokio::time::sleep(Duration::from_secs(3)).await;

    // The call answers now, while `b` does not hold the instance; then S3 comes back.
    gate.0.add_permits(1);
    tokio::time::sleep(Duration::from_secs(2)).await;
    s3.thaw();

    let ended = tokio::time::timeout(Duration::from_secs(30), bulky.finished())
        .await
        .expect("the outcome is applied once the instance loads")
        .unwrap();
    assert_eq!(ended, Ended::Finished);
    for engine in [b, worker, client] {
        engine.shutdown().await;
    }
}

#[path = "harness/scale_flows.rs"]
mod scale_flows;

/// Where Debian's `faketime` package puts libfaketime (`./scripts/test` installs it).
fn libfaketime() -> std::path::PathBuf {
    let found = ["x86_64-linux-gnu", "aarch64-linux-gnu"]
        .iter()
        .map(|arch| std::path::PathBuf::from(format!("/usr/lib/{arch}/faketime/libfaketime.so.1")))
        .find(|p| p.exists());
    found.expect(
        "libfaketime not found; install it: apt-get install -y faketime (./scripts/test does)",
    )
}

/// An orchestrator process started with its wall clock `offset` away from everyone
/// else's (libfaketime; the monotonic clock is left alone), ready to take requests.
struct Skewed(std::process::Child);

impl Skewed {
    fn start(url: &str, prefix: &str, offset: &str) -> Skewed {
        use std::io::BufRead;
        let mut child = std::process::Command::new(env!("CARGO_BIN_EXE_scale_harness"))
            .args(["orchestrator", url, prefix, "skewed"])
            .env("LD_PRELOAD", libfaketime())
            .env("FAKETIME", offset)
            .env("FAKETIME_DONT_FAKE_MONOTONIC", "1")
            .stdin(std::process::Stdio::null())
            .stdout(std::process::Stdio::piped())
            .stderr(std::process::Stdio::null())
            .spawn()
            .expect("the harness starts");
        let out = child.stdout.take().expect("piped");
        let mut out = std::io::BufReader::new(out);
        let mut line = String::new();
        out.read_line(&mut line)
            .expect("the harness says it is ready");
        assert_eq!(line.trim(), "READY");
        // The lease lines that follow are read and dropped (a closed pipe would stop it).
        std::thread::spawn(move || std::io::copy(&mut out, &mut std::io::sink()));
        Skewed(child)
    }
}

impl Drop for Skewed {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// A request's age is measured on Redis's clock (from when Redis appended it), never by
/// comparing the client's clock with the orchestrator's: an orchestrator whose clock runs
/// ahead of the client's by more than the request timeout still applies every request,
/// and so does one whose clock runs behind (before, the first dropped every request
/// silently as already expired).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn requests_are_applied_whatever_the_clocks_of_the_processes_say() {
    use scale_flows::{FrontDesk, Ticket, TicketState, shared};
    let redis = servers::Redis::start();
    let url = redis.url();
    for (prefix, offset) in [("ahead", "+90s"), ("behind", "-90s")] {
        let orchestrator = Skewed::start(&url, prefix, offset);
        let worker = Engine::builder()
            .shared(shared(&url, prefix, Some("w")))
            .driver(FrontDesk)
            .worker()
            .start()
            .await
            .unwrap();
        let client = Engine::builder()
            .shared(shared(&url, prefix, None))
            .flow::<Ticket>()
            .client()
            .request_timeout(Duration::from_secs(5))
            .start()
            .await
            .unwrap();
        for i in 0..4 {
            let id = format!("t-{i}");
            let state = TicketState {
                id: id.clone(),
                ..TicketState::default()
            };
            // The first request may wait for the orchestrator to take its shards.
            let mut started = client.start::<Ticket>(id.as_str(), state.clone()).await;
            for _ in 0..3 {
                if !matches!(started, Err(flowwire::Error::Timeout { .. })) {
                    break;
                }
                started = client.start::<Ticket>(id.as_str(), state.clone()).await;
            }
            let ticket = match started {
                Ok(t) => t,
                Err(flowwire::Error::AlreadyExists { .. }) => {
                    client.handle::<Ticket>(id.as_str()).await.unwrap()
                }
                Err(e) => panic!("{prefix}: {id} not started: {e}"),
            };
            ticket
                .confirm()
                .id(format!("{id}/confirm"))
                .await
                .unwrap_or_else(|e| panic!("{prefix}: {id} not confirmed: {e}"));
            let ended = tokio::time::timeout(Duration::from_secs(20), ticket.finished())
                .await
                .expect("the ticket finishes")
                .unwrap();
            assert_eq!(ended, Ended::Finished, "{prefix}: {id}");
        }
        drop(orchestrator);
        worker.shutdown().await;
        client.shutdown().await;
    }
}
