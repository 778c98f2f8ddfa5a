#![allow(missing_docs)] // test-local flows
#![cfg(feature = "redis")]
//! Partitions between processes and their Redis, with a loopback TCP proxy per process
//! that the test freezes, cuts and heals (issue 23). Each test states what must hold when
//! the network misbehaves.

use std::time::Duration;

use flowwire::prelude::*;
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
