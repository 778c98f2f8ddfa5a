//! The Redis store's per-shard indexes (active instances, armed timers) are written by a
//! commit only where the step changes the instance's entry, as the record's own copy of
//! it says; every writer keeps that copy and the entry together.
#![cfg(feature = "redis")]

#[path = "../../tests/support/servers.rs"]
mod servers;

use std::sync::Arc;

use bytes::Bytes;
use flowwire_storage::InstanceStore;
use flowwire_storage::record::{Expect, InstanceKey, StepResult, StepWrite};
use flowwire_storage::store::RedisStore;

use servers::Redis;

fn step(
    key: &InstanceKey,
    expect: Expect,
    version: u64,
    active: bool,
    timer: Option<u64>,
) -> StepWrite {
    StepWrite {
        key: key.clone(),
        expect,
        version,
        seq: version,
        record: Bytes::from(format!("record {version}")),
        active,
        parked: false,
        timer,
        correlation: None,
        uncorrelate: None,
        ended_key: None,
        impulse: None,
        history: Some((version, Bytes::from_static(b"entry"))),
        prune_below: None,
        fence: None,
        acknowledges: None,
        sends: Vec::new(),
    }
}

async fn commit(store: &RedisStore, s: StepWrite) {
    assert_eq!(
        store.commit(vec![s]).await.unwrap(),
        vec![StepResult::Committed]
    );
}

/// How many times the server ran `command` (`INFO commandstats`), scripts' calls included.
fn calls(redis: &Redis, command: &str) -> u64 {
    let stats = redis.cli(&["INFO", "commandstats"]);
    stats
        .lines()
        .find_map(|l| l.strip_prefix(&format!("cmdstat_{command}:calls=")))
        .and_then(|rest| rest.split(',').next())
        .map_or(0, |n| n.parse().unwrap())
}

/// The key of the record of `id` (one per server: found by its suffix).
fn record_key(redis: &Redis, prefix: &str, id: &str) -> String {
    let found = redis.cli(&["KEYS", &format!("{prefix}:*:r:{id}")]);
    let keys: Vec<&str> = found.lines().filter(|l| !l.is_empty()).collect();
    assert_eq!(keys.len(), 1, "{found}");
    keys[0].to_string()
}

fn due(list: Vec<(Arc<str>, u64)>) -> Vec<(String, u64)> {
    list.into_iter()
        .map(|(id, d)| (id.to_string(), d))
        .collect()
}

#[tokio::test(flavor = "multi_thread")]
async fn a_steady_step_writes_neither_index_and_a_change_writes_its_own() {
    // A server of its own: its command counts are this test's alone.
    let redis = Redis::start();
    let store = RedisStore::open(&redis.url(), "steady").unwrap();
    let k = InstanceKey::new("orders", "o-1");
    commit(&store, step(&k, Expect::Absent, 1, true, None)).await;
    let counts = |r: &Redis| ["sadd", "srem", "zadd", "zrem"].map(|c| calls(r, c));
    let before = counts(&redis);
    // A call answered, the next one sent: still active, still no timer.
    commit(&store, step(&k, Expect::Version(1), 2, true, None)).await;
    commit(&store, step(&k, Expect::Version(2), 3, true, None)).await;
    let after = counts(&redis);
    // The history index is a sorted set too: one ZADD a step, nothing else.
    assert_eq!(
        [
            after[0] - before[0],
            after[1] - before[1],
            after[2] - before[2],
            after[3] - before[3]
        ],
        [0, 0, 2, 0],
        "SADD, SREM, ZADD, ZREM by two steady steps"
    );
    // Arming a timer and ending write exactly the entries they change.
    commit(&store, step(&k, Expect::Version(3), 4, true, Some(5_000))).await;
    assert_eq!(
        due(store.due("orders", 10_000, 10).await.unwrap()),
        vec![("o-1".into(), 5_000)]
    );
    commit(&store, step(&k, Expect::Version(4), 5, false, None)).await;
    let end = counts(&redis);
    assert_eq!(
        [
            end[0] - after[0],
            end[1] - after[1],
            end[2] - after[2],
            end[3] - after[3]
        ],
        [0, 1, 3, 1],
        "the timer armed (ZADD) then cleared (ZREM), the instance ended (SREM)"
    );
    assert!(store.active("orders").await.unwrap().is_empty());
    assert!(store.due("orders", 10_000, 10).await.unwrap().is_empty());
}

#[tokio::test(flavor = "multi_thread")]
async fn a_record_written_before_it_kept_its_timer_has_its_entries_written_on_its_next_step() {
    let redis = Redis::start();
    let store = RedisStore::open(&redis.url(), "legacy").unwrap();
    let k = InstanceKey::new("naps", "n-1");
    commit(&store, step(&k, Expect::Absent, 1, true, Some(700))).await;
    // As an earlier version wrote it: the same entries, no copy of the timer.
    redis.cli(&["HDEL", &record_key(&redis, "legacy", "n-1"), "t"]);
    commit(&store, step(&k, Expect::Version(1), 2, true, None)).await;
    assert!(
        store.due("naps", 10_000, 10).await.unwrap().is_empty(),
        "the cleared timer's entry is removed though the record did not say it had one"
    );
    commit(&store, step(&k, Expect::Version(2), 3, true, Some(900))).await;
    assert_eq!(
        due(store.due("naps", 10_000, 10).await.unwrap()),
        vec![("n-1".into(), 900)]
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn a_timer_entry_a_repair_removed_is_added_back_by_the_next_step_that_arms_it() {
    let redis = Redis::start();
    let store = RedisStore::open(&redis.url(), "repair").unwrap();
    let k = InstanceKey::new("naps", "r-1");
    commit(&store, step(&k, Expect::Absent, 1, false, Some(100))).await;
    store.retime(&k, 100, None).await.unwrap();
    assert!(store.due("naps", 1_000, 10).await.unwrap().is_empty());
    commit(&store, step(&k, Expect::Version(1), 2, false, Some(100))).await;
    assert_eq!(
        due(store.due("naps", 1_000, 10).await.unwrap()),
        vec![("r-1".into(), 100)],
        "the repair updated the record's copy of its entry"
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn an_active_entry_is_dropped_only_while_its_record_is_not_active() {
    let redis = Redis::start();
    let store = RedisStore::open(&redis.url(), "drop").unwrap();
    let (live, done) = (
        InstanceKey::new("orders", "live"),
        InstanceKey::new("orders", "done"),
    );
    commit(&store, step(&live, Expect::Absent, 1, true, None)).await;
    commit(&store, step(&done, Expect::Absent, 1, false, None)).await;
    // An entry its record disowns, in the active set of its shard (the hash tag of its
    // record's key).
    let record = record_key(&redis, "drop", "done");
    let tag = &record[record.find('{').unwrap()..=record.find('}').unwrap()];
    let set = format!("drop:active:{tag}");
    redis.cli(&["SADD", &set, "done"]);
    let listed: Vec<String> = store
        .active("orders")
        .await
        .unwrap()
        .into_iter()
        .map(|(id, _)| id.to_string())
        .collect();
    assert_eq!(listed, vec!["live".to_string()]);
    let members = redis.cli(&["SMEMBERS", &set]);
    assert!(
        !members.lines().any(|m| m == "done"),
        "the disowned entry was dropped: {members}"
    );
    assert_eq!(
        store.active("orders").await.unwrap().len(),
        1,
        "the live one kept"
    );
}
