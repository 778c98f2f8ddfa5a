#![allow(missing_docs)] // test-local flows and drivers
//! The engine on a Redis Cluster: three masters on loopback, started by this test. Instances
//! spread over the slots; each step commits in its instance's slot, while the indexes
//! (calls in flight, timers, correlation keys) live in their flows' slots. A fan-out, a
//! durable timer, an impulse by correlation key, exactly-once impulses, history, and a
//! restart with calls in flight (recovered from the cluster's index and sent again) all
//! work as on one server. The store and tier conformance suites run on the cluster in
//! flowwire-storage/tests/tiers.rs.
#![cfg(feature = "redis")]

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use flowwire::Error;
use flowwire::prelude::*;
use flowwire::storage::store::RedisStore;

#[path = "support/servers.rs"]
mod servers;

#[derive(Debug, Clone, Serialize, Deserialize, thiserror::Error)]
#[error("carrier unavailable")]
pub struct Unavailable;

#[driver(timeout = "10s", retries = 0)]
pub trait Carrier {
    async fn move_leg(&self, shipment: String, leg: u32) -> Result<u32, Unavailable>;
}

/// Counts the calls by idempotency key; holds every call of a shipment named `late-…`
/// when `hold_late` is set (so a restart finds them in flight).
#[derive(Clone, Default)]
pub struct Fleet {
    calls: Arc<Mutex<BTreeMap<String, u32>>>,
    hold_late: bool,
}

#[driver]
impl Carrier for Fleet {
    async fn move_leg(&self, shipment: String, leg: u32) -> Result<u32, Unavailable> {
        let key = CallContext::current().expect("a context").idempotency_key();
        *self.calls.lock().unwrap().entry(key).or_default() += 1;
        if self.hold_late && shipment.starts_with("late-") {
            std::future::pending::<()>().await;
        }
        Ok(leg * 10)
    }
}

#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct ShipmentState {
    id: String,
    legs: Vec<Option<u32>>,
    moved: bool,
    rested: bool,
    confirmed_by: Option<String>,
}

/// Moves two legs at once, rests (a durable timer), waits for a confirmation by id.
#[flow]
pub struct Shipment {
    #[link]
    state: ShipmentState,
    #[link]
    carrier: impl Carrier,
}

#[flow]
impl Shipment {
    #[wire]
    fn run(&mut self) -> Command<Self> {
        let s = &self.state;
        if !s.moved {
            return Command::fan_out((0..2).map(|leg| self.carrier.move_leg(s.id.clone(), leg)))
                .all(
                    |f, i, r| {
                        f.state.legs.resize(2, None);
                        f.state.legs[i] = Some(r?);
                        Ok(())
                    },
                    |f| {
                        f.state.moved = true;
                        Ok(())
                    },
                );
        }
        if !s.rested {
            return Command::sleep(Duration::from_millis(50)).then(|f| {
                f.state.rested = true;
                Ok(())
            });
        }
        if s.confirmed_by.is_none() {
            return Command::wait();
        }
        Command::finish()
    }

    #[impulse]
    fn confirm(&mut self, by: String) {
        self.state.confirmed_by = Some(by);
    }

    #[probe]
    fn waiting(&self) -> bool {
        self.state.rested && self.state.confirmed_by.is_none()
    }

    #[correlate]
    fn shipment(&self) -> &str {
        &self.state.id
    }
}

async fn engine(urls: &[String], fleet: Fleet) -> Engine {
    let urls: Vec<&str> = urls.iter().map(String::as_str).collect();
    Engine::builder()
        .store(RedisStore::cluster(&urls, "fwcluster").unwrap())
        .flow::<Shipment>()
        .driver(fleet)
        // The held calls are still running when the first engine stops: they must be in
        // flight for the second, not time out during the stop's drain.
        .drain_timeout(Duration::from_millis(200))
        .start()
        .await
        .unwrap()
}

fn shipment(id: &str) -> ShipmentState {
    ShipmentState {
        id: id.into(),
        ..ShipmentState::default()
    }
}

/// Waits (bounded) until the instance rests and waits for its confirmation.
async fn until_waiting(engine: &Engine, id: &str) {
    let h = engine.handle::<Shipment>(id).await.unwrap();
    for _ in 0..400 {
        if h.waiting().await.unwrap() {
            return;
        }
        tokio::time::sleep(Duration::from_millis(25)).await;
    }
    panic!("{id} never came to wait");
}

const ON_TIME: usize = 24;
const LATE: usize = 6;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn flows_run_on_a_three_master_cluster_and_survive_an_engine_restart() {
    let cluster = servers::RedisCluster::start();
    let urls = cluster.urls();

    // First engine: the late shipments' calls are held, so they are in flight when it stops.
    let first = Fleet {
        hold_late: true,
        ..Fleet::default()
    };
    let a = engine(&urls, first.clone()).await;
    let ids: Vec<String> = (0..ON_TIME)
        .map(|i| format!("ship-{i}"))
        .chain((0..LATE).map(|i| format!("late-{i}")))
        .collect();
    for id in &ids {
        a.start::<Shipment>(id.as_str(), shipment(id))
            .await
            .unwrap();
    }
    for id in ids.iter().filter(|id| id.starts_with("ship-")) {
        until_waiting(&a, id).await;
    }
    a.shutdown().await;

    // Second engine: recovery finds the late shipments' calls in flight and sends them again.
    let second = Fleet::default();
    let b = engine(&urls, second.clone()).await;
    for id in ids.iter().filter(|id| id.starts_with("late-")) {
        until_waiting(&b, id).await;
    }
    for id in &ids {
        b.impulse_by_key::<Shipment>(id.as_str(), ShipmentImpulse::Confirm { by: "desk".into() })
            .await
            .unwrap();
    }
    for id in &ids {
        let h = b.handle::<Shipment>(id.as_str()).await.unwrap();
        assert_eq!(h.finished().await.unwrap(), Ended::Finished, "{id}");
        let s = h.state().await.unwrap();
        assert_eq!(s.legs, [Some(0), Some(10)], "{id}");
        assert_eq!(s.confirmed_by.as_deref(), Some("desk"), "{id}");
    }

    // Every branch ran once on the first engine; only the late ones ran again, each with
    // its key, on the second.
    let firsts = first.calls.lock().unwrap().clone();
    let seconds = second.calls.lock().unwrap().clone();
    assert_eq!(firsts.len(), 2 * ids.len());
    assert!(firsts.values().all(|&n| n == 1), "{firsts:?}");
    assert_eq!(seconds.len(), 2 * LATE, "{seconds:?}");
    for (key, n) in &seconds {
        assert!(key.starts_with("Shipment/late-"), "{key}");
        assert_eq!(*n, 1, "{key}");
        assert!(
            firsts.contains_key(key),
            "{key}: the same key as before the restart"
        );
    }

    // An ended instance leaves the key index; an impulse id is applied once.
    let again = b
        .impulse_by_key::<Shipment>("ship-0", ShipmentImpulse::Confirm { by: "x".into() })
        .await;
    assert!(
        matches!(again, Err(Error::NoInstanceForKey { .. })),
        "{again:?}"
    );
    let history = b.history::<Shipment>("late-0", 0, 100).await.unwrap();
    assert!(history.steps.len() >= 6, "{:?}", history.steps.len());
    b.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_impulse_id_is_applied_once_on_a_cluster() {
    let cluster = servers::RedisCluster::start();
    let e = engine(&cluster.urls(), Fleet::default()).await;
    let h = e.start::<Shipment>("once", shipment("once")).await.unwrap();
    until_waiting(&e, "once").await;
    h.confirm("a".into()).id("confirm-1").await.unwrap();
    let again = h.confirm("b".into()).id("confirm-1").await;
    assert!(
        matches!(
            again,
            Err(Error::ImpulseAlreadyApplied { .. } | Error::Ended { .. })
        ),
        "{again:?}"
    );
    assert_eq!(h.finished().await.unwrap(), Ended::Finished);
    assert_eq!(h.state().await.unwrap().confirmed_by.as_deref(), Some("a"));
    e.shutdown().await;
}
