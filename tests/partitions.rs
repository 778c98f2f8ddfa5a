#![allow(missing_docs)] // test-local flows
#![cfg(feature = "redis")]
//! Partitions between processes and their Redis, with a loopback TCP proxy per process
//! that the test freezes, cuts and heals (issue 23). Each test states what must hold when
//! the network misbehaves.

use std::time::Duration;

use flowwire::prelude::*;
use flowwire::storage::InstanceStore as _;
use flowwire::{Ended, Engine, Shared};

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
        .shared(shared(&redis.url()))
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

/// Waits until the shard's lease is held under a token above `above`; returns it.
async fn granted_above(shared: &Shared, above: u64) -> u64 {
    let bus = shared.store().bus();
    for _ in 0..2_000 {
        if let Some((_, token)) = bus.owner("Tally", 0).await.unwrap()
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
    let first = granted_above(&shared, 0).await;
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
    let second = granted_above(&shared, first).await;
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
    let first = granted_above(&shared, 0).await;
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
    granted_above(&shared, first).await;
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
