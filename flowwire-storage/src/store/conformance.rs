//! The instance-store conformance suite: public async cases every backend must pass.
//! (Long because it is a specification: each case reads top to bottom as one rule, and
//! the rules stay together so a new backend is held to all of them in one place.)
//!
//! Each case takes a fresh, empty store as `&dyn InstanceStore` and panics with a message
//! naming the broken rule. Run them all with [`run_all`].
//!
//! ```
//! # tokio::runtime::Builder::new_current_thread().build().unwrap().block_on(async {
//! use flowwire::storage::{MemoryStore, store::conformance};
//! conformance::run_all(|| Box::new(MemoryStore::new())).await;
//! # });
//! ```

use std::sync::Arc;

use bytes::Bytes;

use super::InstanceStore;
use crate::record::{Expect, InstanceKey, StepResult, StepWrite};

fn step(key: &InstanceKey, expect: Expect, version: u64, body: &'static [u8]) -> StepWrite {
    StepWrite {
        key: key.clone(),
        expect,
        version,
        seq: version,
        record: Bytes::from_static(body),
        active: true,
        parked: false,
        timer: None,
        correlation: None,
        uncorrelate: None,
        ended_key: None,
        impulse: None,
        history: Some((version, Bytes::from_static(body))),
        prune_below: None,
        fence: None,
        acknowledges: None,
        sends: Vec::new(),
        checksums: crate::codec::Checksums::Written,
    }
}

/// Runs every case, each on a fresh store from `make`.
pub async fn run_all(make: impl Fn() -> Box<dyn InstanceStore>) {
    create_then_compare_and_swap(&*make()).await;
    a_stale_version_is_a_conflict(&*make()).await;
    an_impulse_id_applies_once(&*make()).await;
    the_active_index_follows_the_records(&*make()).await;
    every_record_of_a_flow_is_listed_whatever_its_status(&*make()).await;
    history_pages_in_step_order(&*make()).await;
    one_batch_commits_many_instances_and_reports_each(&*make()).await;
    a_large_batch_reports_every_step_in_its_place(&*make()).await;
    history_is_pruned_below_a_step(&*make()).await;
    an_impulse_without_history_records_its_step(&*make()).await;
    timers_are_listed_by_due_time_and_follow_the_records(&*make()).await;
    a_stale_timer_entry_is_repaired_only_if_still_stale(&*make()).await;
    parked_instances_are_listed_in_pages(&*make()).await;
    correlation_keys_find_live_instances(&*make()).await;
    an_ended_instance_is_kept_under_its_key_until_deleted(&*make()).await;
    damaged_instances_are_marked_listed_and_deleted(&*make()).await;
}

/// A start writes a record that did not exist; later steps swap it by version.
pub async fn create_then_compare_and_swap(store: &dyn InstanceStore) {
    let k = InstanceKey::new("flow", "a");
    assert_eq!(
        store.load(&k).await.unwrap(),
        None,
        "a new store holds no record"
    );
    let r = store
        .commit(vec![step(&k, Expect::Absent, 1, b"one")])
        .await
        .unwrap();
    assert_eq!(
        r,
        vec![StepResult::Committed],
        "a start on an absent key commits"
    );
    let r = store
        .commit(vec![step(&k, Expect::Absent, 1, b"again")])
        .await
        .unwrap();
    assert_eq!(
        r,
        vec![StepResult::Conflict { found: Some(1) }],
        "a second start conflicts"
    );
    let r = store
        .commit(vec![step(&k, Expect::Version(1), 2, b"two")])
        .await
        .unwrap();
    assert_eq!(
        r,
        vec![StepResult::Committed],
        "a swap on the stored version commits"
    );
    let got = store.load(&k).await.unwrap().expect("record present");
    assert_eq!((got.version, &got.bytes[..]), (2, &b"two"[..]));
}

/// A step that expects an older version is refused and changes nothing.
pub async fn a_stale_version_is_a_conflict(store: &dyn InstanceStore) {
    let k = InstanceKey::new("flow", "b");
    store
        .commit(vec![step(&k, Expect::Absent, 1, b"one")])
        .await
        .unwrap();
    store
        .commit(vec![step(&k, Expect::Version(1), 2, b"two")])
        .await
        .unwrap();
    let r = store
        .commit(vec![step(&k, Expect::Version(1), 2, b"stale")])
        .await
        .unwrap();
    assert_eq!(r, vec![StepResult::Conflict { found: Some(2) }]);
    let r = store
        .commit(vec![step(
            &InstanceKey::new("flow", "none"),
            Expect::Version(1),
            2,
            b"x",
        )])
        .await
        .unwrap();
    assert_eq!(
        r,
        vec![StepResult::Conflict { found: None }],
        "a swap on a missing record conflicts"
    );
    assert_eq!(&store.load(&k).await.unwrap().unwrap().bytes[..], b"two");
}

/// An impulse id is applied once per instance; the same id on another instance is distinct.
pub async fn an_impulse_id_applies_once(store: &dyn InstanceStore) {
    let k = InstanceKey::new("flow", "c");
    store
        .commit(vec![step(&k, Expect::Absent, 1, b"one")])
        .await
        .unwrap();
    let mut s = step(&k, Expect::Version(1), 2, b"two");
    s.impulse = Some(Arc::from("imp-1"));
    assert_eq!(
        store.commit(vec![s]).await.unwrap(),
        vec![StepResult::Committed]
    );
    let mut s = step(&k, Expect::Version(2), 3, b"three");
    s.impulse = Some(Arc::from("imp-1"));
    assert_eq!(
        store.commit(vec![s]).await.unwrap(),
        vec![StepResult::ImpulseSeen { seq: 2 }],
        "a reused impulse id is refused and names the step that applied it"
    );
    assert_eq!(
        store.load(&k).await.unwrap().unwrap().version,
        2,
        "a refused step writes nothing"
    );
    assert_eq!(store.impulse_applied(&k, "imp-1").await.unwrap(), Some(2));
    assert_eq!(store.impulse_applied(&k, "imp-2").await.unwrap(), None);
    let other = InstanceKey::new("flow", "c2");
    assert_eq!(store.impulse_applied(&other, "imp-1").await.unwrap(), None);
}

/// Active instances are listed per flow; a terminal step removes the instance from the list.
pub async fn the_active_index_follows_the_records(store: &dyn InstanceStore) {
    let a = InstanceKey::new("orders", "1");
    let b = InstanceKey::new("orders", "2");
    let c = InstanceKey::new("other", "1");
    store
        .commit(vec![
            step(&a, Expect::Absent, 1, b"a"),
            step(&b, Expect::Absent, 1, b"b"),
            step(&c, Expect::Absent, 1, b"c"),
        ])
        .await
        .unwrap();
    let mut done = step(&a, Expect::Version(1), 2, b"a-done");
    done.active = false;
    store.commit(vec![done]).await.unwrap();
    let ids: Vec<_> = store
        .active("orders")
        .await
        .unwrap()
        .into_iter()
        .map(|(id, s)| (id.to_string(), s.bytes))
        .collect();
    assert_eq!(ids, vec![("2".to_string(), Bytes::from_static(b"b"))]);
    assert_eq!(store.active("other").await.unwrap().len(), 1);
    assert!(
        store.active("ord").await.unwrap().is_empty(),
        "a flow name prefix is not a match"
    );
}

/// `records` lists every instance of a flow, in the active index or not, in id order, and
/// no other flow's (not even one whose name the flow's begins with).
pub async fn every_record_of_a_flow_is_listed_whatever_its_status(store: &dyn InstanceStore) {
    let keys: Vec<InstanceKey> = ["b", "a:x", "c{1}"]
        .into_iter()
        .map(|id| InstanceKey::new("orders", id))
        .collect();
    let mut batch: Vec<StepWrite> = keys
        .iter()
        .map(|k| step(k, Expect::Absent, 1, b"v1"))
        .collect();
    batch.push(step(
        &InstanceKey::new("orders2", "z"),
        Expect::Absent,
        1,
        b"o",
    ));
    batch.push(step(
        &InstanceKey::new("order", "y"),
        Expect::Absent,
        1,
        b"o",
    ));
    store.commit(batch).await.unwrap();
    // One leaves the active index (it waits, or ended): still a record.
    let mut quiet = step(&keys[0], Expect::Version(1), 2, b"v2");
    quiet.active = false;
    store.commit(vec![quiet]).await.unwrap();
    let listed: Vec<(String, u64, Bytes)> = store
        .records("orders")
        .await
        .unwrap()
        .into_iter()
        .map(|(id, s)| (id.to_string(), s.version, s.bytes))
        .collect();
    assert_eq!(
        listed,
        vec![
            ("a:x".to_string(), 1, Bytes::from_static(b"v1")),
            ("b".to_string(), 2, Bytes::from_static(b"v2")),
            ("c{1}".to_string(), 1, Bytes::from_static(b"v1")),
        ],
        "every record of the flow, in id order, with its version"
    );
    store.delete(&keys[1]).await.unwrap();
    let ids: Vec<String> = store
        .records("orders")
        .await
        .unwrap()
        .into_iter()
        .map(|(id, _)| id.to_string())
        .collect();
    assert_eq!(ids, ["b", "c{1}"], "a deleted instance is not listed");
    assert!(store.records("nothing").await.unwrap().is_empty());
}

/// History entries come back in step order, from a given step, at most `limit` of them.
pub async fn history_pages_in_step_order(store: &dyn InstanceStore) {
    let k = InstanceKey::new("flow", "h");
    store
        .commit(vec![step(&k, Expect::Absent, 1, b"1")])
        .await
        .unwrap();
    for v in 2..=12u64 {
        store
            .commit(vec![step(&k, Expect::Version(v - 1), v, b"n")])
            .await
            .unwrap();
    }
    let page: Vec<u64> = store
        .history(&k, 5, 4)
        .await
        .unwrap()
        .into_iter()
        .map(|h| h.0)
        .collect();
    assert_eq!(page, vec![5, 6, 7, 8]);
    let tail = store.history(&k, 11, 100).await.unwrap();
    assert_eq!(tail.len(), 2);
    let other = InstanceKey::new("flow", "h2");
    assert!(store.history(&other, 0, 10).await.unwrap().is_empty());
}

/// One batch carries steps of many instances; each is checked on its own.
pub async fn one_batch_commits_many_instances_and_reports_each(store: &dyn InstanceStore) {
    let a = InstanceKey::new("flow", "x");
    let b = InstanceKey::new("flow", "y");
    store
        .commit(vec![step(&a, Expect::Absent, 1, b"a")])
        .await
        .unwrap();
    let r = store
        .commit(vec![
            step(&a, Expect::Absent, 1, b"dup"),
            step(&b, Expect::Absent, 1, b"b"),
            step(&a, Expect::Version(1), 2, b"a2"),
        ])
        .await
        .unwrap();
    assert_eq!(
        r,
        vec![
            StepResult::Conflict { found: Some(1) },
            StepResult::Committed,
            StepResult::Committed
        ]
    );
    assert_eq!(&store.load(&a).await.unwrap().unwrap().bytes[..], b"a2");
}

/// A batch longer than any backend's share of one request (the Redis store writes 128 steps
/// per script) reports each step in its place, and a step refused among them leaves its
/// neighbours to their own checks.
pub async fn a_large_batch_reports_every_step_in_its_place(store: &dyn InstanceStore) {
    let keys: Vec<InstanceKey> = (0..300)
        .map(|i| InstanceKey::new("flow", format!("big-{i}")))
        .collect();
    // Every seventh instance exists already: its start in the big batch is a conflict.
    let early = keys
        .iter()
        .step_by(7)
        .map(|k| step(k, Expect::Absent, 1, b"early"))
        .collect();
    store.commit(early).await.unwrap();
    let r = store
        .commit(
            keys.iter()
                .map(|k| step(k, Expect::Absent, 1, b"late"))
                .collect(),
        )
        .await
        .unwrap();
    let want: Vec<StepResult> = (0..300)
        .map(|i| {
            if i % 7 == 0 {
                StepResult::Conflict { found: Some(1) }
            } else {
                StepResult::Committed
            }
        })
        .collect();
    assert_eq!(r, want, "each step's result is reported in its place");
    for (i, k) in keys.iter().enumerate() {
        let stored = store.load(k).await.unwrap().expect("every instance exists");
        let wanted: &[u8] = if i % 7 == 0 { b"early" } else { b"late" };
        assert_eq!(
            &stored.bytes[..],
            wanted,
            "instance {i} holds its own bytes"
        );
    }
}

/// A step with `prune_below` deletes the instance's earlier history entries, and only those.
pub async fn history_is_pruned_below_a_step(store: &dyn InstanceStore) {
    let k = InstanceKey::new("flow", "p");
    let other = InstanceKey::new("flow", "p2");
    store
        .commit(vec![
            step(&k, Expect::Absent, 1, b"1"),
            step(&other, Expect::Absent, 1, b"1"),
        ])
        .await
        .unwrap();
    for v in 2..=6u64 {
        store
            .commit(vec![step(&k, Expect::Version(v - 1), v, b"n")])
            .await
            .unwrap();
    }
    let mut s = step(&k, Expect::Version(6), 7, b"n");
    s.prune_below = Some(5);
    assert_eq!(
        store.commit(vec![s]).await.unwrap(),
        vec![StepResult::Committed]
    );
    let left: Vec<u64> = store
        .history(&k, 0, 100)
        .await
        .unwrap()
        .into_iter()
        .map(|h| h.0)
        .collect();
    assert_eq!(
        left,
        vec![5, 6, 7],
        "entries before step 5 are pruned, the rest kept"
    );
    assert_eq!(
        store.history(&other, 0, 100).await.unwrap().len(),
        1,
        "pruning one instance leaves the others alone"
    );
}

/// A step that keeps no history still records which step applied an impulse.
pub async fn an_impulse_without_history_records_its_step(store: &dyn InstanceStore) {
    let k = InstanceKey::new("flow", "q");
    let mut s = step(&k, Expect::Absent, 1, b"1");
    s.history = None;
    store.commit(vec![s]).await.unwrap();
    let mut s = step(&k, Expect::Version(1), 2, b"2");
    s.history = None;
    s.seq = 9;
    s.impulse = Some(Arc::from("i"));
    store.commit(vec![s]).await.unwrap();
    assert_eq!(store.impulse_applied(&k, "i").await.unwrap(), Some(9));
    assert!(store.history(&k, 0, 10).await.unwrap().is_empty());
}

fn timed(key: &InstanceKey, expect: Expect, version: u64, due: Option<u64>) -> StepWrite {
    let mut s = step(key, expect, version, b"t");
    s.active = false;
    s.timer = due;
    s
}

/// Armed timers are listed earliest first up to a time; a step that moves or clears an
/// instance's timer moves or clears its entry.
pub async fn timers_are_listed_by_due_time_and_follow_the_records(store: &dyn InstanceStore) {
    let a = InstanceKey::new("naps", "a");
    let b = InstanceKey::new("naps", "b");
    let c = InstanceKey::new("naps", "c");
    let other = InstanceKey::new("other", "a");
    store
        .commit(vec![
            timed(&a, Expect::Absent, 1, Some(3_000)),
            timed(&b, Expect::Absent, 1, Some(1_000)),
            timed(&c, Expect::Absent, 1, None),
            timed(&other, Expect::Absent, 1, Some(10)),
        ])
        .await
        .unwrap();
    let due = |v: Vec<(Arc<str>, u64)>| -> Vec<(String, u64)> {
        v.into_iter().map(|(id, d)| (id.to_string(), d)).collect()
    };
    assert_eq!(
        due(store.due("naps", 5_000, 10).await.unwrap()),
        vec![("b".into(), 1_000), ("a".into(), 3_000)],
        "earliest first, other flows and unarmed instances left out"
    );
    assert_eq!(
        due(store.due("naps", 2_999, 10).await.unwrap()),
        vec![("b".into(), 1_000)],
        "only timers due by the given time"
    );
    assert_eq!(due(store.due("naps", 5_000, 1).await.unwrap()).len(), 1);
    store
        .commit(vec![
            timed(&a, Expect::Version(1), 2, Some(500)),
            timed(&b, Expect::Version(1), 2, None),
        ])
        .await
        .unwrap();
    assert_eq!(
        due(store.due("naps", 5_000, 10).await.unwrap()),
        vec![("a".into(), 500)],
        "a moved timer is listed at its new time once; a cleared one is gone"
    );
    let r = store
        .commit(vec![timed(&c, Expect::Version(7), 8, Some(1))])
        .await
        .unwrap();
    assert_eq!(r, vec![StepResult::Conflict { found: Some(1) }]);
    let listed = due(store.due("naps", 5_000, 10).await.unwrap());
    assert!(
        listed.contains(&("a".into(), 500)),
        "a step that conflicts moves no other timer: {listed:?}"
    );
    // A shared backend indexes before it commits, so the refused step may have left its
    // entry; the runtime finds it stale against the record and repairs it.
    for extra in listed.iter().filter(|(id, _)| id != "a") {
        assert_eq!(
            extra,
            &("c".to_string(), 1),
            "only the refused step's entry"
        );
        store
            .retime(&c, 1, None)
            .await
            .expect("a stale entry is repaired");
    }
    assert_eq!(
        due(store.due("naps", 5_000, 10).await.unwrap()),
        vec![("a".into(), 500)]
    );
}

/// `retime` removes an entry only while it is still at the stale time, and indexes the
/// record's actual timer.
pub async fn a_stale_timer_entry_is_repaired_only_if_still_stale(store: &dyn InstanceStore) {
    let a = InstanceKey::new("naps", "r");
    store
        .commit(vec![timed(&a, Expect::Absent, 1, Some(100))])
        .await
        .unwrap();
    store.retime(&a, 99, None).await.unwrap();
    assert_eq!(
        store.due("naps", 1_000, 10).await.unwrap().len(),
        1,
        "an entry not at the stale time is left alone"
    );
    store.retime(&a, 100, Some(700)).await.unwrap();
    let got = store.due("naps", 1_000, 10).await.unwrap();
    assert_eq!(got, vec![(Arc::from("r"), 700)]);
    store.retime(&a, 700, None).await.unwrap();
    assert!(store.due("naps", 1_000, 10).await.unwrap().is_empty());
}

/// Parked instances are listed per flow in id order, a page at a time; a step that
/// unparks an instance removes it.
pub async fn parked_instances_are_listed_in_pages(store: &dyn InstanceStore) {
    let mut batch = Vec::new();
    for id in ["p1", "p2", "p3", "p4"] {
        let mut s = step(&InstanceKey::new("jobs", id), Expect::Absent, 1, b"q");
        s.active = false;
        s.parked = true;
        batch.push(s);
    }
    let mut elsewhere = step(&InstanceKey::new("jobs2", "p0"), Expect::Absent, 1, b"q");
    elsewhere.parked = true;
    batch.push(elsewhere);
    store.commit(batch).await.unwrap();
    let ids = |v: Vec<Arc<str>>| -> Vec<String> { v.iter().map(ToString::to_string).collect() };
    assert_eq!(
        ids(store.parked("jobs", None, 2).await.unwrap()),
        vec!["p1", "p2"]
    );
    assert_eq!(
        ids(store.parked("jobs", Some("p2"), 10).await.unwrap()),
        vec!["p3", "p4"],
        "the next page starts after the last id seen"
    );
    let resumed = step(&InstanceKey::new("jobs", "p3"), Expect::Version(1), 2, b"r");
    store.commit(vec![resumed]).await.unwrap();
    assert_eq!(
        ids(store.parked("jobs", None, 10).await.unwrap()),
        vec!["p1", "p2", "p4"]
    );
    assert!(store.parked("job", None, 10).await.unwrap().is_empty());
}

/// The correlation index maps a flow's key to the instances indexed under it: a changed key
/// moves the entry, an ended instance (no key) leaves it, and other flows do not share it.
pub async fn correlation_keys_find_live_instances(store: &dyn InstanceStore) {
    let keyed = |id: &str, expect, version, key: Option<&str>, old: Option<&str>| {
        let mut s = step(&InstanceKey::new("orders", id), expect, version, b"k");
        s.correlation = key.map(Arc::from);
        s.uncorrelate = old.map(Arc::from);
        s
    };
    let mut other = step(&InstanceKey::new("refunds", "r1"), Expect::Absent, 1, b"k");
    other.correlation = Some(Arc::from("order-7"));
    store
        .commit(vec![
            keyed("a", Expect::Absent, 1, Some("order-7"), None),
            keyed("b", Expect::Absent, 1, Some("order-8"), None),
            other,
        ])
        .await
        .unwrap();
    let ids = |v: Vec<Arc<str>>| -> Vec<String> { v.iter().map(ToString::to_string).collect() };
    assert_eq!(
        ids(store.correlated("orders", "order-7", 10).await.unwrap()),
        vec!["a"],
        "a key finds the one instance of that flow indexed under it"
    );
    assert!(
        store
            .correlated("orders", "order-9", 10)
            .await
            .unwrap()
            .is_empty(),
        "an unknown key finds nothing"
    );
    store
        .commit(vec![keyed(
            "b",
            Expect::Version(1),
            2,
            Some("order-7"),
            Some("order-8"),
        )])
        .await
        .unwrap();
    assert_eq!(
        ids(store.correlated("orders", "order-7", 10).await.unwrap()),
        vec!["a", "b"],
        "a changed key moves the instance to it"
    );
    assert!(
        store
            .correlated("orders", "order-8", 10)
            .await
            .unwrap()
            .is_empty(),
        "and leaves the old key"
    );
    assert_eq!(
        store
            .correlated("orders", "order-7", 1)
            .await
            .unwrap()
            .len(),
        1,
        "the limit bounds the answer"
    );
    store
        .commit(vec![keyed(
            "a",
            Expect::Version(1),
            2,
            None,
            Some("order-7"),
        )])
        .await
        .unwrap();
    assert_eq!(
        ids(store.correlated("orders", "order-7", 10).await.unwrap()),
        vec!["b"],
        "an instance that ended is no longer found by its key"
    );
}

/// An instance that ended carrying a correlation key stays findable under it (for a
/// retried impulse to learn it was applied) until the instance is deleted; live instances
/// are not listed there, nor are other flows' or keys'.
pub async fn an_ended_instance_is_kept_under_its_key_until_deleted(store: &dyn InstanceStore) {
    let ids = |v: Vec<Arc<str>>| -> Vec<String> { v.iter().map(ToString::to_string).collect() };
    let mut live = step(&InstanceKey::new("orders", "live"), Expect::Absent, 1, b"l");
    live.correlation = Some(Arc::from("order-7"));
    let mut other = step(&InstanceKey::new("refunds", "r"), Expect::Absent, 1, b"r");
    other.ended_key = Some(Arc::from("order-7"));
    let mut started = step(&InstanceKey::new("orders", "done"), Expect::Absent, 1, b"d");
    started.correlation = Some(Arc::from("order-7"));
    store.commit(vec![live, other, started]).await.unwrap();
    assert!(
        store
            .ended_with_key("orders", "order-7", 10)
            .await
            .unwrap()
            .is_empty(),
        "live instances are not listed as ended"
    );
    let mut ended = step(
        &InstanceKey::new("orders", "done"),
        Expect::Version(1),
        2,
        b"e",
    );
    ended.uncorrelate = Some(Arc::from("order-7"));
    ended.ended_key = Some(Arc::from("order-7"));
    ended.impulse = Some(Arc::from("pay-1"));
    store.commit(vec![ended]).await.unwrap();
    assert_eq!(
        ids(store.ended_with_key("orders", "order-7", 10).await.unwrap()),
        vec!["done"],
        "the instance that ended with the key"
    );
    assert_eq!(
        ids(store.correlated("orders", "order-7", 10).await.unwrap()),
        vec!["live"],
        "and no longer among the live ones"
    );
    assert!(
        store
            .ended_with_key("orders", "order-8", 10)
            .await
            .unwrap()
            .is_empty()
    );
    store
        .delete(&InstanceKey::new("orders", "done"))
        .await
        .unwrap();
    assert!(
        store
            .ended_with_key("orders", "order-7", 10)
            .await
            .unwrap()
            .is_empty(),
        "a deleted instance is forgotten"
    );
    assert_eq!(
        ids(store
            .ended_with_key("refunds", "order-7", 10)
            .await
            .unwrap()),
        vec!["r"]
    );
}

/// A damaged mark is listed in id order with its reason and can be cleared; a delete
/// takes the record, the impulse ids, the history, every index entry and the mark, and
/// leaves the other instances as they were.
pub async fn damaged_instances_are_marked_listed_and_deleted(store: &dyn InstanceStore) {
    let keys: Vec<InstanceKey> = ["d1", "d2", "d3"]
        .iter()
        .map(|id| InstanceKey::new("flow", *id))
        .collect();
    for k in &keys {
        let mut s = step(k, Expect::Absent, 1, b"one");
        s.impulse = Some("imp".into());
        s.parked = true;
        s.timer = Some(1_000);
        s.correlation = Some("shared".into());
        store.commit(vec![s]).await.unwrap();
    }
    for k in &keys {
        store
            .mark_damaged(k, Some(&format!("{} is damaged", k.id)))
            .await
            .unwrap();
    }
    let listed = store.damaged("flow", None, 10).await.unwrap();
    let ids: Vec<&str> = listed.iter().map(|(id, _)| &**id).collect();
    assert_eq!(ids, ["d1", "d2", "d3"], "damaged instances in id order");
    assert_eq!(listed[0].1, "d1 is damaged", "with their reason");
    let page = store.damaged("flow", Some("d1"), 1).await.unwrap();
    assert_eq!(page.len(), 1, "a page after d1");
    assert_eq!(&*page[0].0, "d2");
    store.mark_damaged(&keys[0], None).await.unwrap();
    assert_eq!(
        store.damaged("flow", None, 10).await.unwrap().len(),
        2,
        "a cleared mark"
    );

    store.delete(&keys[1]).await.unwrap();
    let gone = &keys[1];
    assert_eq!(
        store.load(gone).await.unwrap(),
        None,
        "a deleted record is gone"
    );
    assert_eq!(
        store.impulse_applied(gone, "imp").await.unwrap(),
        None,
        "and its impulse ids"
    );
    assert!(
        store.history(gone, 0, 10).await.unwrap().is_empty(),
        "and its history"
    );
    assert!(
        !store
            .parked("flow", None, 10)
            .await
            .unwrap()
            .iter()
            .any(|id| &**id == "d2"),
        "and its parked entry"
    );
    assert!(
        !store
            .due("flow", 2_000, 10)
            .await
            .unwrap()
            .iter()
            .any(|(id, _)| &**id == "d2"),
        "and its timer"
    );
    assert!(
        !store
            .correlated("flow", "shared", 10)
            .await
            .unwrap()
            .iter()
            .any(|id| &**id == "d2"),
        "and its correlation entry"
    );
    let damaged = store.damaged("flow", None, 10).await.unwrap();
    assert_eq!(damaged.len(), 1, "and its damaged mark: {damaged:?}");
    assert!(
        store.load(&keys[2]).await.unwrap().is_some(),
        "another instance stays"
    );
    store.delete(gone).await.unwrap();
    // A start may use the id again.
    let again = store
        .commit(vec![step(gone, Expect::Absent, 1, b"new")])
        .await
        .unwrap();
    assert_eq!(again, vec![StepResult::Committed]);
}
