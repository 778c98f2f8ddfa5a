//! The Redis store's commits go in rounds: the batches of callers that commit at the same
//! time (an orchestrator's shard runners) share the server's commit scripts, and each
//! caller gets its own answer, as if it had committed alone:
//! - each caller's results, in the order of its own steps;
//! - a step that fails on the server (a key of another type than the store writes there)
//!   fails its own caller's batch and no other, and stops no step after it.
#![cfg(feature = "redis")]

#[path = "../../tests/support/servers.rs"]
mod servers;

use bytes::Bytes;
use flowwire_storage::InstanceStore;
use flowwire_storage::record::{Expect, InstanceKey, StepResult, StepWrite};
use flowwire_storage::store::RedisStore;

use servers::Redis;

fn step(key: &InstanceKey, expect: Expect, version: u64) -> StepWrite {
    let record = Bytes::from(format!("{} at {version}", key.id));
    StepWrite {
        active: true,
        history: Some((version, Bytes::from_static(b"entry"))),
        ..StepWrite::new(key.clone(), expect, version, record)
    }
}

fn expect(version: u64) -> Expect {
    if version == 1 {
        Expect::Absent
    } else {
        Expect::Version(version - 1)
    }
}

/// How many commit scripts the server ran.
fn scripts(redis: &Redis) -> u64 {
    redis
        .cli(&["INFO", "commandstats"])
        .lines()
        .find_map(|l| l.strip_prefix("cmdstat_evalsha:calls="))
        .and_then(|rest| rest.split(',').next())
        .map_or(0, |n| n.parse().unwrap())
}

async fn version(store: &RedisStore, key: &InstanceKey) -> Option<u64> {
    store.load(key).await.unwrap().map(|s| s.version)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_batches_of_concurrent_callers_share_scripts_and_each_gets_its_own_results() {
    const CALLERS: u64 = 32;
    const STEPS: u64 = 10;
    let redis = Redis::start();
    let store = RedisStore::open(&redis.url(), "rounds").unwrap();
    let before = scripts(&redis);
    let mut callers = tokio::task::JoinSet::new();
    for c in 0..CALLERS {
        let store = store.clone();
        callers.spawn(async move {
            let own = InstanceKey::new("orders", format!("o-{c}"));
            let never = InstanceKey::new("orders", format!("never-{c}"));
            for v in 1..=STEPS {
                // Every other batch also holds a step that must conflict (its record does
                // not exist): the caller's results come back in its steps' order.
                let mut batch = vec![step(&own, expect(v), v)];
                if v % 2 == 0 {
                    batch.push(step(&never, Expect::Version(7), 8));
                }
                let want = if v % 2 == 0 {
                    vec![StepResult::Committed, StepResult::Conflict { found: None }]
                } else {
                    vec![StepResult::Committed]
                };
                assert_eq!(
                    store.commit(batch).await.unwrap(),
                    want,
                    "caller {c}, step {v}"
                );
            }
        });
    }
    while let Some(done) = callers.join_next().await {
        done.unwrap();
    }
    for c in 0..CALLERS {
        let own = InstanceKey::new("orders", format!("o-{c}"));
        assert_eq!(version(&store, &own).await, Some(STEPS));
        let stored = store.load(&own).await.unwrap().unwrap();
        assert_eq!(stored.bytes, format!("o-{c} at {STEPS}").as_bytes());
        assert_eq!(
            version(&store, &InstanceKey::new("orders", format!("never-{c}"))).await,
            None
        );
    }
    let batches = CALLERS * STEPS;
    let ran = scripts(&redis) - before;
    assert!(
        ran < batches,
        "{batches} batches committed at the same time share scripts: {ran} ran"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_step_that_fails_on_the_server_fails_its_own_batch_and_no_other() {
    let redis = Redis::start();
    let store = RedisStore::open(&redis.url(), "damaged").unwrap();
    // An instance whose record key holds a string: every command of its step fails there.
    let bad = InstanceKey::new("orders", "bad");
    assert_eq!(
        store
            .commit(vec![step(&bad, Expect::Absent, 1)])
            .await
            .unwrap(),
        [StepResult::Committed]
    );
    let found = redis.cli(&["KEYS", "damaged:*:r:bad"]);
    let key = found.lines().next().unwrap().to_string();
    redis.cli(&["DEL", &key]);
    redis.cli(&["SET", &key, "not a hash"]);

    // Alone: the batch fails, naming the instance, and the steps after the bad one in the
    // same script are written all the same.
    let (before, after) = (
        InstanceKey::new("orders", "before"),
        InstanceKey::new("orders", "after"),
    );
    let err = store
        .commit(vec![
            step(&before, Expect::Absent, 1),
            step(&bad, Expect::Version(1), 2),
            step(&after, Expect::Absent, 1),
        ])
        .await
        .unwrap_err();
    assert!(err.to_string().contains("\"bad\""), "{err}");
    assert!(err.is_transient(), "{err}");
    assert_eq!(version(&store, &before).await, Some(1));
    assert_eq!(version(&store, &after).await, Some(1));

    // Beside other callers' batches: only its own caller hears of it.
    let mut callers = tokio::task::JoinSet::new();
    for c in 0..16 {
        let store = store.clone();
        callers.spawn(async move {
            let own = InstanceKey::new("orders", format!("o-{c}"));
            for v in 1..=5 {
                assert_eq!(
                    store.commit(vec![step(&own, expect(v), v)]).await.unwrap(),
                    [StepResult::Committed],
                    "caller {c}, step {v}"
                );
            }
        });
    }
    for _ in 0..5 {
        assert!(
            store
                .commit(vec![step(&bad, Expect::Version(1), 2)])
                .await
                .is_err()
        );
    }
    while let Some(done) = callers.join_next().await {
        done.unwrap();
    }
    for c in 0..16 {
        let own = InstanceKey::new("orders", format!("o-{c}"));
        assert_eq!(version(&store, &own).await, Some(5));
    }
}
