//! What the Redis store's commit writes beside a step's record:
//! - the shard's indexes (active instances, armed timers), only where the step changes
//!   the instance's entry, as the record's own copy of it says; every writer keeps that
//!   copy and the entry together;
//! - the stream entries a step settles, acknowledged with it and trimmed from the front of
//!   their stream in bulk, never one a group has not acknowledged;
//! - the history, in the record's own hash: read back in step order across gaps of any
//!   length, pruned by at most a bounded number of entries per step.
#![cfg(feature = "redis")]

#[path = "../../tests/support/servers.rs"]
mod servers;

use std::sync::Arc;

use bytes::Bytes;
use flowwire_storage::InstanceStore;
use flowwire_storage::record::{BusSend, Expect, InstanceKey, StepResult, StepWrite};
use flowwire_storage::store::RedisStore;

use servers::Redis;

fn step(
    key: &InstanceKey,
    expect: Expect,
    version: u64,
    active: bool,
    timer: Option<u64>,
) -> StepWrite {
    let record = Bytes::from(format!("record {version}"));
    StepWrite {
        active,
        timer,
        history: Some((version, Bytes::from_static(b"entry"))),
        ..StepWrite::new(key.clone(), expect, version, record)
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
    let counts = |r: &Redis| ["sadd", "srem", "zadd", "zrem", "hset"].map(|c| calls(r, c));
    // The calls of each command between two counts.
    let made =
        |from: [u64; 5], to: [u64; 5]| -> [u64; 5] { std::array::from_fn(|i| to[i] - from[i]) };
    let fresh = counts(&redis);
    commit(&store, step(&k, Expect::Absent, 1, true, None)).await;
    let before = counts(&redis);
    assert_eq!(
        made(fresh, before),
        [1, 0, 0, 0, 1],
        "a new instance adds its active entry, removes nothing, and writes its record and \
         its history entry in one HSET"
    );
    // A call answered, the next one sent: still active, still no timer.
    commit(&store, step(&k, Expect::Version(1), 2, true, None)).await;
    commit(&store, step(&k, Expect::Version(2), 3, true, None)).await;
    let after = counts(&redis);
    // The history is in the record's hash: one HSET a step, nothing else.
    assert_eq!(
        made(before, after),
        [0, 0, 0, 0, 2],
        "SADD, SREM, ZADD, ZREM, HSET by two steady steps"
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
        made(after, end),
        [0, 1, 1, 1, 2],
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

/// Appends `n` entries to `stream` (read by `groups`, created first), returning their ids.
fn fill(redis: &Redis, stream: &str, groups: &[&str], n: usize) -> Vec<String> {
    for g in groups {
        redis.cli(&["XGROUP", "CREATE", stream, g, "0", "MKSTREAM"]);
    }
    (0..n)
        .map(|i| {
            redis
                .cli(&["XADD", stream, "*", "m", &format!("entry {i}")])
                .trim()
                .to_string()
        })
        .collect()
}

/// Delivers up to `n` entries of `stream` to a consumer of `group`.
fn deliver(redis: &Redis, stream: &str, group: &str, n: usize) {
    redis.cli(&[
        "XREADGROUP",
        "GROUP",
        group,
        "c",
        "COUNT",
        &n.to_string(),
        "STREAMS",
        stream,
        ">",
    ]);
}

/// Commits one new instance a step, each settling one entry of `stream` for `group`.
async fn settle(store: &RedisStore, flow: &str, stream: &str, group: &str, entries: &[String]) {
    for chunk in entries.chunks(10) {
        let steps: Vec<StepWrite> = chunk
            .iter()
            .map(|entry| {
                let mut s = step(
                    &InstanceKey::new(flow, format!("i-{entry}").as_str()),
                    Expect::Absent,
                    1,
                    true,
                    None,
                );
                s.sends = vec![BusSend::Settle {
                    stream: stream.to_string(),
                    group: group.to_string(),
                    entry: entry.clone(),
                }];
                s
            })
            .collect();
        let n = steps.len();
        assert_eq!(
            store.commit(steps).await.unwrap(),
            vec![StepResult::Committed; n]
        );
    }
}

fn len(redis: &Redis, stream: &str) -> usize {
    redis.cli(&["XLEN", stream]).trim().parse().unwrap()
}

#[tokio::test(flavor = "multi_thread")]
async fn settled_entries_are_trimmed_in_bulk_and_every_unsettled_one_is_kept() {
    let redis = Redis::start();
    let store = RedisStore::open(&redis.url(), "trim").unwrap();
    let bus = store.bus();
    let stream = "trim:req:{Order#0}";
    let ids = fill(&redis, stream, &["orchestrators"], 300);
    // 250 delivered, of which the first 200 are settled; 50 never delivered.
    deliver(&redis, stream, "orchestrators", 250);
    settle(&store, "Order", stream, "orchestrators", &ids[..200]).await;
    assert_eq!(
        bus.backlog(stream, "orchestrators").await.unwrap(),
        (100, 50),
        "50 delivered and not settled, 50 waiting"
    );
    // Trimmed a node (100 entries by default) at a time, and only below the oldest
    // pending entry: what is left starts at or before it.
    let left = len(&redis, stream);
    assert!((100..=200).contains(&left), "{left} entries left of 300");
    let kept = redis.cli(&["XRANGE", stream, &ids[200], "+"]);
    let kept = kept.lines().filter(|l| l.starts_with("entry ")).count();
    assert_eq!(kept, 100, "every entry from the oldest unsettled one on");
    // The rest settled: a deployment at rest holds nothing for the group.
    deliver(&redis, stream, "orchestrators", 50);
    settle(&store, "Order", stream, "orchestrators", &ids[200..]).await;
    assert_eq!(bus.backlog(stream, "orchestrators").await.unwrap(), (0, 0));
}

#[tokio::test(flavor = "multi_thread")]
async fn a_trim_keeps_the_entries_another_group_has_not_read() {
    let redis = Redis::start();
    let store = RedisStore::open(&redis.url(), "groups").unwrap();
    let stream = "groups:req:{Order#0}";
    let ids = fill(&redis, stream, &["orchestrators", "audit"], 300);
    deliver(&redis, stream, "orchestrators", 300);
    settle(&store, "Order", stream, "orchestrators", &ids).await;
    assert_eq!(
        len(&redis, stream),
        300,
        "the second group has read none of them"
    );
    deliver(&redis, stream, "audit", 300);
    redis.cli(&["XACK", stream, "audit", &ids[0]]);
    redis.cli(&["XACK", stream, "audit", &ids[1]]);
    // The next trim is the next 64 settles away; the oldest pending entry of the second
    // group, the third, bounds it.
    let more = fill(&redis, stream, &[], 64);
    deliver(&redis, stream, "orchestrators", 64);
    settle(&store, "Order", stream, "orchestrators", &more).await;
    let first = redis.cli(&["XRANGE", stream, "-", "+", "COUNT", "1"]);
    assert!(
        first.lines().next().is_some_and(|id| id <= ids[2].as_str()),
        "the first entry kept is at or before the oldest one pending: {first}"
    );
}

/// A small deterministic generator (xorshift64*), so a failing sequence can be replayed.
struct Rng(u64);

impl Rng {
    fn below(&mut self, n: u64) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_F491_4F6C_DD1D) % n.max(1)
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn over_random_appends_deliveries_and_settles_no_entry_a_group_still_needs_is_trimmed() {
    use std::collections::{BTreeMap, BTreeSet};
    let redis = Redis::start();
    let store = RedisStore::open(&redis.url(), "model").unwrap();
    let bus = store.bus();
    let stream = "model:req:{Order#0}".to_string();
    let groups = ["orchestrators", "audit"];
    for g in groups {
        redis.cli(&["XGROUP", "CREATE", &stream, g, "0", "MKSTREAM"]);
    }
    let mut reader = bus.reader().await.unwrap();
    let mut rng = Rng(0x9E37_79B9_7F4A_7C15);
    // The model: every entry appended, and per group what it was delivered and acknowledged.
    let mut appended: Vec<String> = Vec::new();
    let mut delivered: BTreeMap<&str, Vec<String>> = BTreeMap::new();
    let mut acked: BTreeMap<&str, BTreeSet<String>> = BTreeMap::new();
    let mut settles = 0;
    for op in 0..400 {
        // Until op 300, about one entry in eleven is not acknowledged (its consumer is
        // gone), so old pending entries sit in the stream's first nodes while the groups
        // read on; then they are, and the trims can reach past them.
        let stuck = |id: &str| op < 300 && id.bytes().map(u32::from).sum::<u32>() % 11 == 0;
        match rng.below(4) {
            0 => {
                for _ in 0..=rng.below(12) {
                    // Ids of our own, not the clock's: the run, and which entries stick,
                    // are the same every time.
                    let id = format!("{}-1", appended.len() + 1);
                    redis.cli(&["XADD", &stream, &id, "m", "x"]);
                    appended.push(id);
                }
            }
            1 => {
                let g = groups[rng.below(2) as usize];
                let count = 1 + rng.below(10) as usize;
                let got = reader
                    .read(
                        std::slice::from_ref(&stream),
                        g,
                        "c",
                        count,
                        std::time::Duration::from_millis(1),
                    )
                    .await
                    .unwrap();
                delivered
                    .entry(g)
                    .or_default()
                    .extend(got.into_iter().map(|e| e.id));
            }
            2 => {
                // The commits settle some of what the first group was delivered.
                let pending: Vec<String> = delivered
                    .get("orchestrators")
                    .into_iter()
                    .flatten()
                    .filter(|id| !acked.get("orchestrators").is_some_and(|a| a.contains(*id)))
                    .cloned()
                    .collect();
                let take: Vec<String> = pending
                    .into_iter()
                    .filter(|id| !stuck(id) && rng.below(3) > 0)
                    .take(40)
                    .collect();
                if take.is_empty() {
                    continue;
                }
                settle(&store, "Order", &stream, "orchestrators", &take).await;
                settles += take.len();
                acked.entry("orchestrators").or_default().extend(take);
            }
            _ => {
                // The second group acknowledges some of its own, outside any commit.
                let mine: Vec<String> = delivered
                    .get("audit")
                    .into_iter()
                    .flatten()
                    .cloned()
                    .collect();
                for id in mine
                    .into_iter()
                    .filter(|id| !stuck(id) && rng.below(2) == 0)
                {
                    redis.cli(&["XACK", &stream, "audit", &id]);
                    acked.entry("audit").or_default().insert(id);
                }
            }
        }
        // Every entry some group has not acknowledged is still in the stream.
        let held: BTreeSet<String> = redis
            .cli(&["XRANGE", &stream, "-", "+"])
            .lines()
            .filter(|l| l.contains('-') && !l.starts_with('m') && !l.starts_with('x'))
            .map(str::to_string)
            .collect();
        for id in &appended {
            let done = groups
                .iter()
                .all(|g| acked.get(g).is_some_and(|a| a.contains(id)));
            assert!(
                done || held.contains(id),
                "op {op}: entry {id} was trimmed before every group was done with it"
            );
        }
        let unacked = appended
            .iter()
            .filter(|id| !acked.get("orchestrators").is_some_and(|a| a.contains(*id)))
            .count();
        let (left, _) = bus.backlog(&stream, "orchestrators").await.unwrap();
        assert_eq!(
            left, unacked as u64,
            "op {op}: the backlog counts what the group has not acknowledged"
        );
    }
    assert!(
        settles >= 128,
        "the run trimmed at least twice ({settles} settles)"
    );
    assert!(
        len(&redis, &stream) < appended.len(),
        "something was trimmed: {} of {} left",
        len(&redis, &stream),
        appended.len()
    );
}

/// The steps of the history entries `store` reads for `k` from `from`, at most `limit`.
async fn history_steps(store: &RedisStore, k: &InstanceKey, from: u64, limit: usize) -> Vec<u64> {
    let entries = store.history(k, from, limit).await.unwrap();
    for (step, bytes) in &entries {
        assert_eq!(
            &bytes[..],
            format!("entry {step}").as_bytes(),
            "each entry is its own step's"
        );
    }
    entries.into_iter().map(|(step, _)| step).collect()
}

/// A step of `k` at `version`, numbered `seq`, keeping a history entry of its own unless
/// `history` is false.
fn numbered(k: &InstanceKey, version: u64, seq: u64, history: bool) -> StepWrite {
    let expect = if version == 1 {
        Expect::Absent
    } else {
        Expect::Version(version - 1)
    };
    let mut s = step(k, expect, version, true, None);
    s.seq = seq;
    s.history = history.then(|| (seq, Bytes::from(format!("entry {seq}"))));
    s
}

#[tokio::test(flavor = "multi_thread")]
async fn a_history_with_gaps_longer_than_one_read_reads_back_in_step_order() {
    let redis = Redis::start();
    let store = RedisStore::open(&redis.url(), "gaps").unwrap();
    let k = InstanceKey::new("orders", "o-1");
    // Steps 1-3 keep history, 4-6 do not (a retention of none), then the steps jump to
    // 20,000 (farther than one read looks), and a last gap of one.
    let steps = [
        (1, true),
        (2, true),
        (3, true),
        (4, false),
        (5, false),
        (6, false),
        (20_000, true),
        (20_001, true),
        (20_003, true),
    ];
    for (version, (seq, keep)) in (1..).zip(steps) {
        commit(&store, numbered(&k, version, seq, keep)).await;
    }
    let all = vec![1, 2, 3, 20_000, 20_001, 20_003];
    assert_eq!(history_steps(&store, &k, 0, 100).await, all);
    assert_eq!(history_steps(&store, &k, 2, 2).await, vec![2, 3]);
    assert_eq!(
        history_steps(&store, &k, 4, 2).await,
        vec![20_000, 20_001],
        "a page starting in a gap skips it"
    );
    assert_eq!(history_steps(&store, &k, 20_002, 10).await, vec![20_003]);
    assert!(history_steps(&store, &k, 20_004, 10).await.is_empty());
    // Paged one entry at a time, from each last step + 1, the pages add up to the whole.
    let mut paged = Vec::new();
    let mut from = 0;
    while let [step] = history_steps(&store, &k, from, 1).await[..] {
        paged.push(step);
        from = step + 1;
    }
    assert_eq!(paged, all);
}

#[tokio::test(flavor = "multi_thread")]
async fn a_retention_shortened_by_far_prunes_a_bounded_number_of_entries_per_step() {
    let redis = Redis::start();
    let store = RedisStore::open(&redis.url(), "prune").unwrap();
    let k = InstanceKey::new("orders", "o-1");
    for v in 1..=3_000 {
        commit(&store, numbered(&k, v, v, true)).await;
    }
    let fields = |r: &Redis, key: &str| -> u64 { r.cli(&["HLEN", key]).trim().parse().unwrap() };
    let key = record_key(&redis, "prune", "o-1");
    // Version, bytes, active flag, parked flag, correlation, timer, the two bounds and
    // 3,000 entries.
    assert_eq!(fields(&redis, &key), 8 + 3_000);
    // From here on, the last 10 steps are kept: step 3,001 may drop 2,991 entries, but
    // drops the oldest 1,024 only, and the next steps go on where it stopped.
    let pruned = |s: StepWrite, below: u64| {
        let mut s = s;
        s.prune_below = Some(below);
        s
    };
    commit(&store, pruned(numbered(&k, 3_001, 3_001, true), 2_992)).await;
    assert_eq!(history_steps(&store, &k, 0, 1).await, vec![1_025]);
    assert_eq!(fields(&redis, &key), 8 + 3_001 - 1_024);
    commit(&store, pruned(numbered(&k, 3_002, 3_002, true), 2_993)).await;
    assert_eq!(history_steps(&store, &k, 0, 1).await, vec![2_049]);
    commit(&store, pruned(numbered(&k, 3_003, 3_003, true), 2_994)).await;
    assert_eq!(
        history_steps(&store, &k, 0, 100).await,
        (2_994..=3_003).collect::<Vec<_>>(),
        "caught up: the last 10 steps are left"
    );
    assert_eq!(fields(&redis, &key), 8 + 10);
    // A steady retention prunes the one entry that falls out.
    commit(&store, pruned(numbered(&k, 3_004, 3_004, true), 2_995)).await;
    assert_eq!(
        history_steps(&store, &k, 0, 100).await,
        (2_995..=3_004).collect::<Vec<_>>()
    );
    // Deleting the instance deletes its history with its record.
    store.delete(&k).await.unwrap();
    assert!(history_steps(&store, &k, 0, 100).await.is_empty());
    assert_eq!(redis.cli(&["EXISTS", &key]).trim(), "0");
}

#[tokio::test(flavor = "multi_thread")]
async fn data_written_with_the_history_beside_the_record_is_refused_not_read_as_empty() {
    let redis = Redis::start();
    // What a store of layout 2 (an instance's history in a sorted set and a hash of its
    // own) marked its data with.
    redis.cli(&["SET", "two:epoch", "layout2:00c0ffee00c0ffee"]);
    let store = RedisStore::open(&redis.url(), "two").unwrap();
    let k = InstanceKey::new("orders", "o-1");
    let e = store
        .commit(vec![step(&k, Expect::Absent, 1, true, None)])
        .await
        .unwrap_err();
    assert!(
        matches!(e, flowwire_storage::StoreError::Incompatible { .. }),
        "{e:?}"
    );
    assert!(!e.is_transient());
    assert!(e.to_string().contains("this build writes layout3"), "{e}");
    assert_eq!(redis.cli(&["DBSIZE"]).trim(), "1", "nothing was written");
}
