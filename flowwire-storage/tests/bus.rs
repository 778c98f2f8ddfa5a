//! The multi-process bus on a real Redis (one server, and a three-master Redis Cluster):
//! shard leases with fencing tokens, fenced commits, streams with consumer groups, replies
//! by publish/subscribe (many channels on one connection), outcomes settled by the commits
//! that apply them.
//!
//! (Over 600 lines: one test per rule of the bus, sharing the servers they start; the bus's
//! parts are few enough that splitting them by file would split its rules from each other.)

#![cfg(feature = "redis")]

#[path = "../../tests/support/servers.rs"]
mod servers;

use std::sync::OnceLock;
use std::time::Duration;

use bytes::Bytes;
use flowwire_storage::InstanceStore;
use flowwire_storage::StoreError;
use flowwire_storage::bus::RedisBus;
use flowwire_storage::record::{BusSend, Expect, InstanceKey, StepResult, StepWrite};
use flowwire_storage::store::RedisStore;
use servers::{Redis, RedisCluster};

fn server() -> &'static Redis {
    static SERVER: OnceLock<Redis> = OnceLock::new();
    SERVER.get_or_init(Redis::start)
}

fn cluster() -> &'static RedisCluster {
    static CLUSTER: OnceLock<RedisCluster> = OnceLock::new();
    CLUSTER.get_or_init(RedisCluster::start)
}

fn on_server(prefix: &str) -> RedisStore {
    RedisStore::open(&server().url(), prefix).unwrap()
}

fn on_cluster(prefix: &str) -> RedisStore {
    let urls = cluster().urls();
    let urls: Vec<&str> = urls.iter().map(String::as_str).collect();
    RedisStore::cluster(&urls, prefix).unwrap()
}

fn write(key: &InstanceKey, expect: Expect, version: u64, fence: u64) -> StepWrite {
    StepWrite {
        key: key.clone(),
        expect,
        version,
        seq: version,
        record: Bytes::from_static(b"r"),
        active: false,
        parked: false,
        timer: None,
        correlation: None,
        uncorrelate: None,
        ended_key: None,
        impulse: None,
        history: None,
        prune_below: None,
        fence: Some(fence),
        acknowledges: None,
        sends: Vec::new(),
        checksums: flowwire_storage::codec::Checksums::Written,
    }
}

const TTL: Duration = Duration::from_secs(5);

/// A shard has one holder at a time; each new holder gets a higher token; a lease released
/// cleanly says so to the next holder, one that ran out does not.
async fn leases_hand_out_rising_tokens(bus: &RedisBus) {
    let a = bus
        .acquire("Order", 1, "a", TTL)
        .await
        .unwrap()
        .expect("free");
    assert!(!a.clean, "the first holder has no predecessor");
    assert_eq!(bus.acquire("Order", 1, "b", TTL).await.unwrap(), None);
    assert!(bus.renew("Order", 1, "a", a.token, TTL).await.unwrap());
    assert!(!bus.renew("Order", 1, "b", a.token, TTL).await.unwrap());
    assert_eq!(
        bus.owner("Order", 1).await.unwrap(),
        Some(("a".to_string(), a.token))
    );
    bus.release("Order", 1, "a", a.token, true).await.unwrap();
    let b = bus
        .acquire("Order", 1, "b", TTL)
        .await
        .unwrap()
        .expect("released");
    assert!(b.token > a.token);
    assert!(b.clean, "a released the shard cleanly");
    // b's lease runs out instead of being released: the next holder must not trust it.
    bus.release("Order", 1, "b", b.token, false).await.unwrap();
    let c = bus
        .acquire("Order", 1, "c", Duration::from_millis(200))
        .await
        .unwrap()
        .unwrap();
    assert!(c.token > b.token && !c.clean);
    assert!(
        !bus.renew("Order", 1, "a", a.token, TTL).await.unwrap(),
        "a's token is old"
    );
    tokio::time::sleep(Duration::from_millis(400)).await;
    assert_eq!(
        bus.owner("Order", 1).await.unwrap(),
        None,
        "c's lease expired"
    );
    assert!(!bus.renew("Order", 1, "c", c.token, TTL).await.unwrap());
    let d = bus.acquire("Order", 1, "d", TTL).await.unwrap().unwrap();
    assert!(d.token > c.token && !d.clean);
    // Other shards are independent.
    assert!(bus.acquire("Order", 2, "a", TTL).await.unwrap().is_some());
}

/// A record written under a token is never written again under a lower one; equal or
/// higher tokens pass, and the audit lists every write with its token.
async fn fenced_commits_refuse_an_older_owner(store: &RedisStore) {
    let key = InstanceKey::new("Order", "fenced");
    let r = store
        .commit(vec![write(&key, Expect::Absent, 1, 3)])
        .await
        .unwrap();
    assert_eq!(r, vec![StepResult::Committed]);
    let r = store
        .commit(vec![write(&key, Expect::Version(1), 2, 3)])
        .await
        .unwrap();
    assert_eq!(r, vec![StepResult::Committed]);
    // The new owner (token 4) writes; the old one (token 3) comes back from a pause.
    let r = store
        .commit(vec![write(&key, Expect::Version(2), 3, 4)])
        .await
        .unwrap();
    assert_eq!(r, vec![StepResult::Committed]);
    let r = store
        .commit(vec![write(&key, Expect::Version(3), 4, 3)])
        .await
        .unwrap();
    assert_eq!(r, vec![StepResult::Fenced { token: 4 }]);
    assert_eq!(store.load(&key).await.unwrap().unwrap().version, 3);
    assert_eq!(
        store.writes(&key).await.unwrap(),
        vec![(1, 3), (2, 3), (3, 4)]
    );
}

/// Entries are delivered once to a group, stay pending until acknowledged, and are taken
/// over by another consumer once idle long enough; acknowledged entries are deleted.
async fn streams_deliver_claim_and_acknowledge(bus: &RedisBus) {
    let stream = bus.jobs("Payment");
    bus.ensure_group(&stream, "workers").await.unwrap();
    bus.ensure_group(&stream, "workers").await.unwrap();
    let body = |i: u8| (stream.clone(), Bytes::from(vec![i; 3]));
    bus.push(&[body(1), body(2), body(3)]).await.unwrap();
    let mut reader = bus.reader().await.unwrap();
    let streams = [stream.clone()];
    let got = reader
        .read(&streams, "workers", "w1", 2, Duration::from_millis(100))
        .await
        .unwrap();
    assert_eq!(got.len(), 2);
    assert_eq!(got[0].body, Bytes::from(vec![1; 3]));
    let rest = reader
        .read(&streams, "workers", "w2", 10, Duration::from_millis(100))
        .await
        .unwrap();
    assert_eq!(rest.len(), 1, "each entry goes to one consumer");
    let none = reader
        .read(&streams, "workers", "w2", 10, Duration::from_millis(50))
        .await
        .unwrap();
    assert!(none.is_empty(), "a read waits at most its block time");
    // w1 acknowledges its first entry and dies with the second.
    bus.ack(&stream, "workers", &[got[0].id.clone()])
        .await
        .unwrap();
    let (early, _) = bus
        .claim(&stream, "workers", "w3", Duration::from_mins(1), "0-0", 10)
        .await
        .unwrap();
    assert!(early.is_empty(), "not idle long enough");
    // w2 is still at work: it says so, and keeps its entry.
    tokio::time::sleep(Duration::from_millis(150)).await;
    bus.touch(&stream, "workers", "w2", &[rest[0].id.clone()])
        .await
        .unwrap();
    let (claimed, next) = bus
        .claim(
            &stream,
            "workers",
            "w3",
            Duration::from_millis(100),
            "0-0",
            10,
        )
        .await
        .unwrap();
    assert_eq!(
        claimed.len(),
        1,
        "only w1's unacknowledged entry: {claimed:?}"
    );
    assert_eq!(claimed[0].id, got[1].id);
    assert_eq!(claimed[0].body, got[1].body);
    assert_eq!(next, "0-0");
    bus.ack(
        &stream,
        "workers",
        &[claimed[0].id.clone(), rest[0].id.clone()],
    )
    .await
    .unwrap();
    let (left, _) = bus
        .claim(&stream, "workers", "w3", Duration::ZERO, "0-0", 10)
        .await
        .unwrap();
    assert!(left.is_empty(), "everything was acknowledged");
}

/// A request and its outcome streams share the shard's slot, so one read covers both.
async fn one_read_covers_a_shards_streams(bus: &RedisBus) {
    let streams = [bus.requests("Order", 5), bus.outcomes("Order", 5)];
    for s in &streams {
        bus.ensure_group(s, "owner").await.unwrap();
    }
    bus.push(&[
        (streams[1].clone(), Bytes::from_static(b"outcome")),
        (streams[0].clone(), Bytes::from_static(b"start")),
    ])
    .await
    .unwrap();
    let mut reader = bus.reader().await.unwrap();
    let mut got = reader
        .read(&streams, "owner", "o1", 10, Duration::from_millis(100))
        .await
        .unwrap();
    got.sort_by_key(|e| e.stream);
    assert_eq!(got.len(), 2);
    assert_eq!((got[0].stream, &got[0].body[..]), (0, &b"start"[..]));
    assert_eq!((got[1].stream, &got[1].body[..]), (1, &b"outcome"[..]));
}

async fn replies_reach_the_subscriber(bus: &RedisBus) {
    let channel = bus.replies("client-1");
    let mut sub = bus.subscribe(&channel).await.unwrap();
    bus.publish(&channel, b"done").await.unwrap();
    let got = tokio::time::timeout(Duration::from_secs(5), sub.next())
        .await
        .unwrap();
    assert_eq!(got.as_deref(), Some(&b"done"[..]));
    // Ended instances are announced in batches, in order.
    let ended = bus.ended("Order");
    let mut sub = bus.subscribe(&ended).await.unwrap();
    bus.publish_all(&ended, &[b"o-1", b"o-2", b"o-3"])
        .await
        .unwrap();
    for want in ["o-1", "o-2", "o-3"] {
        let got = tokio::time::timeout(Duration::from_secs(5), sub.next())
            .await
            .unwrap();
        assert_eq!(got.as_deref(), Some(want.as_bytes()));
    }
}

/// The channels a bus listens on share one subscriber connection: each message reaches its
/// own channel's listener, a dropped listener's channel is unsubscribed (a publish on it
/// counts no receiver), and a lost connection ends every listener until it listens again.
async fn listeners_share_one_connection(bus: &RedisBus, url: &str) {
    let mut admin = redis::Client::open(url).unwrap().get_connection().unwrap();
    // Only connections opened after this one count (Redis numbers connections in order):
    // a subscriber an earlier test closed may still be on the server's list a moment.
    let since: u64 = redis::cmd("CLIENT").arg("ID").query(&mut admin).unwrap();
    let mut subscribers = || -> usize {
        let list: String = redis::cmd("CLIENT")
            .arg("LIST")
            .arg("TYPE")
            .arg("pubsub")
            .query(&mut admin)
            .unwrap();
        list.lines()
            .filter_map(|l| {
                l.strip_prefix("id=")?
                    .split(' ')
                    .next()?
                    .parse::<u64>()
                    .ok()
            })
            .filter(|&id| id > since)
            .count()
    };
    let before = subscribers();
    let channels: Vec<String> = (0..4).map(|s| bus.handoffs("Order", s)).collect();
    let mut listeners = Vec::new();
    for c in &channels {
        listeners.push(bus.listen(c).await.unwrap());
    }
    assert_eq!(subscribers(), before + 1, "four channels, one connection");
    let message = |c: &String, i: usize| (c.clone(), Bytes::from(format!("m{i}")));
    let all: Vec<_> = channels
        .iter()
        .enumerate()
        .map(|(i, c)| message(c, i))
        .collect();
    assert_eq!(bus.publish_each(&all).await.unwrap(), vec![1; 4]);
    for (i, l) in listeners.iter_mut().enumerate() {
        let got = tokio::time::timeout(Duration::from_secs(5), l.next())
            .await
            .unwrap();
        assert_eq!(
            got.as_deref(),
            Some(format!("m{i}").as_bytes()),
            "each to its own"
        );
    }

    // A dropped listener's channel is unsubscribed; the others stay.
    drop(listeners.remove(0));
    let first = [message(&channels[0], 9)];
    let deadline = tokio::time::Instant::now() + Duration::from_secs(5);
    while bus.publish_each(&first).await.unwrap() != vec![0] {
        assert!(
            tokio::time::Instant::now() < deadline,
            "still subscribed after its drop"
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    assert_eq!(
        bus.publish_each(&[message(&channels[1], 1)]).await.unwrap(),
        vec![1]
    );
    let got = tokio::time::timeout(Duration::from_secs(5), listeners[0].next())
        .await
        .unwrap();
    assert_eq!(got.as_deref(), Some(&b"m1"[..]));
    // Listened to again, on the same connection.
    let mut again = bus.listen(&channels[0]).await.unwrap();
    assert_eq!(subscribers(), before + 1);
    assert_eq!(bus.publish_each(&first).await.unwrap(), vec![1]);
    let got = tokio::time::timeout(Duration::from_secs(5), again.next())
        .await
        .unwrap();
    assert_eq!(got.as_deref(), Some(&b"m9"[..]));

    // A channel listened to twice: each listener gets each message, and the channel stays
    // subscribed until the last of them goes.
    let mut twice = bus.listen(&channels[3]).await.unwrap();
    let fourth = [message(&channels[3], 3)];
    assert_eq!(
        bus.publish_each(&fourth).await.unwrap(),
        vec![1],
        "one connection"
    );
    for l in [&mut listeners[2], &mut twice] {
        let got = tokio::time::timeout(Duration::from_secs(5), l.next())
            .await
            .unwrap();
        assert_eq!(got.as_deref(), Some(&b"m3"[..]));
    }
    drop(twice);
    tokio::time::sleep(Duration::from_millis(100)).await;
    assert_eq!(
        bus.publish_each(&fourth).await.unwrap(),
        vec![1],
        "still listened to"
    );
    let got = tokio::time::timeout(Duration::from_secs(5), listeners[2].next())
        .await
        .unwrap();
    assert_eq!(got.as_deref(), Some(&b"m3"[..]));

    // The connection is lost: every listener ends; listening again opens a new one.
    let killed: i64 = redis::cmd("CLIENT")
        .arg("KILL")
        .arg("TYPE")
        .arg("pubsub")
        .query(&mut admin)
        .unwrap();
    assert!(killed >= 1);
    for l in listeners.iter_mut().chain(std::iter::once(&mut again)) {
        let got = tokio::time::timeout(Duration::from_secs(5), l.next())
            .await
            .expect("a listener of a lost connection ends");
        assert_eq!(got, None);
    }
    let mut renewed = bus.listen(&channels[2]).await.unwrap();
    assert_eq!(
        bus.publish_each(&[message(&channels[2], 2)]).await.unwrap(),
        vec![1]
    );
    let got = tokio::time::timeout(Duration::from_secs(5), renewed.next())
        .await
        .unwrap();
    assert_eq!(got.as_deref(), Some(&b"m2"[..]));
}

/// The shared subscriber connection closes with the last clone of its bus and the last
/// listener: a process that stopped leaves no connection open behind it.
async fn the_shared_connection_closes_with_its_bus(store: RedisStore, url: &str) {
    let mut admin = redis::Client::open(url).unwrap().get_connection().unwrap();
    // Every connection's id and last command, subscribed or not: one that unsubscribed its
    // last channel is no longer listed as a subscriber, but may still be open.
    let mut clients = || -> Vec<(String, String)> {
        let list: String = redis::cmd("CLIENT").arg("LIST").query(&mut admin).unwrap();
        let field = |line: &str, name: &str| {
            line.split(' ')
                .find_map(|f| f.strip_prefix(name))
                .unwrap_or_default()
                .to_string()
        };
        list.lines()
            .map(|l| (field(l, "id="), field(l, "cmd=")))
            .collect()
    };
    let before: Vec<String> = clients().into_iter().map(|(id, _)| id).collect();
    let bus = store.bus();
    let listener = bus.clone().listen(&bus.handoffs("Order", 0)).await.unwrap();
    let ours: Vec<String> = clients()
        .into_iter()
        .filter(|(id, cmd)| !before.contains(id) && cmd == "subscribe")
        .map(|(id, _)| id)
        .collect();
    assert_eq!(ours.len(), 1, "one subscriber connection opened");
    drop((listener, bus, store));
    let deadline = tokio::time::Instant::now() + Duration::from_secs(5);
    while clients().iter().any(|(id, _)| *id == ours[0]) {
        assert!(
            tokio::time::Instant::now() < deadline,
            "the connection outlived its bus"
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

async fn processes_must_agree_on_the_shard_count(a: RedisStore, b: RedisStore) {
    a.with_shards(8).bus().agree_shards().await.unwrap();
    let err = b.with_shards(16).bus().agree_shards().await.unwrap_err();
    assert!(err.to_string().contains("16 shards"), "{err}");
    assert!(err.to_string().contains("uses 8"), "{err}");
}

async fn heartbeats_count_the_live(bus: &RedisBus) {
    let a = bus.heartbeat("a", TTL).await.unwrap();
    assert_eq!(a.live, 1);
    let b = bus
        .heartbeat("b", Duration::from_millis(200))
        .await
        .unwrap();
    assert_eq!(b.live, 2);
    tokio::time::sleep(Duration::from_millis(400)).await;
    let a = bus.heartbeat("a", TTL).await.unwrap();
    assert_eq!((a.live, a.rank), (1, 0), "b's heartbeat ran out");
    bus.leave("a").await.unwrap();
    assert_eq!(bus.heartbeat("c", TTL).await.unwrap().live, 1);
}

/// Appends `bodies` to `stream` and delivers them to consumer `o1` of the orchestrators'
/// group: the entries, pending now.
async fn delivered(
    bus: &flowwire_storage::bus::RedisBus,
    stream: &str,
    bodies: &[&'static [u8]],
) -> Vec<flowwire_storage::bus::Entry> {
    use flowwire_storage::bus::ORCHESTRATORS;
    bus.ensure_group(stream, ORCHESTRATORS).await.unwrap();
    for body in bodies {
        bus.push(&[(stream.to_string(), Bytes::from_static(body))])
            .await
            .unwrap();
    }
    let mut reader = bus.reader().await.unwrap();
    let got = reader
        .read(
            &[stream.to_string()],
            ORCHESTRATORS,
            "o1",
            10,
            Duration::from_millis(100),
        )
        .await
        .unwrap();
    assert_eq!(got.len(), bodies.len());
    got
}

/// A step that applies an outcome from its shard's stream acknowledges (and deletes) that
/// entry in its own write; a step refused (a conflict) leaves it pending.
async fn a_commit_settles_the_outcome_it_applies(store: &RedisStore) {
    use flowwire_storage::bus::ORCHESTRATORS;
    let bus = store.bus();
    let key = InstanceKey::new("Order", "o-1");
    let shard = store.shard_of("o-1");
    let stream = bus.outcomes("Order", shard);
    let got = delivered(&bus, &stream, &[b"outcome-1", b"outcome-2"]).await;
    assert_eq!(bus.backlog(&stream, ORCHESTRATORS).await.unwrap(), (2, 2));

    let mut first = write(&key, Expect::Absent, 1, 1);
    first.fence = None;
    first.acknowledges = Some(got[0].id.as_str().into());
    assert_eq!(
        store.commit(vec![first]).await.unwrap(),
        vec![StepResult::Committed]
    );
    assert_eq!(
        bus.backlog(&stream, ORCHESTRATORS).await.unwrap(),
        (1, 1),
        "the applied outcome is settled with its step"
    );
    // A stale step is refused, and its outcome stays pending for the owner to settle.
    let mut stale = write(&key, Expect::Absent, 1, 1);
    stale.fence = None;
    stale.acknowledges = Some(got[1].id.as_str().into());
    assert!(matches!(
        store.commit(vec![stale]).await.unwrap()[..],
        [StepResult::Conflict { .. }]
    ));
    assert_eq!(bus.backlog(&stream, ORCHESTRATORS).await.unwrap(), (1, 1));
}

/// On one server a step can settle a request it applies: the entry of the shard's request
/// stream is acknowledged and deleted in the step's own write, with the reply published in
/// it; a refused step leaves the request pending (its owner replies and settles it).
async fn a_commit_settles_the_request_it_applies(store: &RedisStore) {
    use flowwire_storage::bus::ORCHESTRATORS;
    let bus = store.bus();
    let key = InstanceKey::new("Order", "o-1");
    let requests = bus.requests("Order", store.shard_of("o-1"));
    let got = delivered(&bus, &requests, &[b"start", b"start again"]).await;
    let reply_to = "bus-settle-req:reply:caller".to_string();
    let mut replies = bus.subscribe(&reply_to).await.unwrap();
    let settling = |entry: &str, reply: &'static [u8]| {
        let mut w = write(&key, Expect::Absent, 1, 1);
        w.fence = None;
        w.sends = vec![
            BusSend::Publish {
                channel: reply_to.clone(),
                body: Bytes::from_static(reply),
            },
            BusSend::Settle {
                stream: requests.clone(),
                group: ORCHESTRATORS.to_string(),
                entry: entry.to_string(),
            },
        ];
        w
    };

    assert_eq!(
        store
            .commit(vec![settling(&got[0].id, b"started")])
            .await
            .unwrap(),
        vec![StepResult::Committed]
    );
    assert_eq!(
        bus.backlog(&requests, ORCHESTRATORS).await.unwrap(),
        (1, 1),
        "the applied request is settled with its step"
    );
    let reply = tokio::time::timeout(Duration::from_secs(5), replies.next())
        .await
        .expect("the reply within 5 s");
    assert_eq!(reply.as_deref(), Some(&b"started"[..]));

    assert!(matches!(
        store
            .commit(vec![settling(&got[1].id, b"refused")])
            .await
            .unwrap()[..],
        [StepResult::Conflict { .. }]
    ));
    assert_eq!(
        bus.backlog(&requests, ORCHESTRATORS).await.unwrap(),
        (1, 1),
        "a refused step leaves its request pending"
    );
    bus.publish(&reply_to, b"marker").await.unwrap();
    let next = tokio::time::timeout(Duration::from_secs(5), replies.next())
        .await
        .expect("the marker within 5 s");
    assert_eq!(
        next.as_deref(),
        Some(&b"marker"[..]),
        "a refused step published no reply"
    );
}

/// On one server a step's commit carries what the step sends (its driver calls, its end's
/// announcement): each is out if and only if the step is written. A refused step — a
/// conflict, an older owner, data the server lost — sends nothing.
async fn a_commit_carries_what_its_step_sends(store: &RedisStore, url: &str, prefix: &str) {
    assert!(store.carries_sends());
    let bus = store.bus();
    let key = InstanceKey::new("Order", "o-1");
    let jobs = bus.jobs("Payments");
    bus.ensure_group(&jobs, "workers").await.unwrap();
    let ended = bus.ended("Order");
    let mut sub = bus.subscribe(&ended).await.unwrap();
    let sending = |mut w: StepWrite, tag: &'static str| {
        w.sends = vec![
            BusSend::Append {
                stream: jobs.clone(),
                body: Bytes::from_static(b"charge"),
            },
            BusSend::Publish {
                channel: ended.clone(),
                body: Bytes::from(tag),
            },
        ];
        w
    };
    let next = async |sub: &mut flowwire_storage::bus::Subscription| {
        tokio::time::timeout(Duration::from_secs(5), sub.next())
            .await
            .expect("a message within 5 s")
    };

    let first = sending(write(&key, Expect::Absent, 1, 1), "committed");
    assert_eq!(
        store.commit(vec![first]).await.unwrap(),
        vec![StepResult::Committed]
    );
    assert_eq!(
        bus.backlog(&jobs, "workers").await.unwrap(),
        (1, 0),
        "the call is out"
    );
    assert_eq!(next(&mut sub).await.as_deref(), Some(&b"committed"[..]));

    // Refused steps: a conflict, then an owner older than the shard's newest token.
    let conflict = sending(write(&key, Expect::Absent, 1, 1), "conflict");
    assert!(matches!(
        store.commit(vec![conflict]).await.unwrap()[..],
        [StepResult::Conflict { .. }]
    ));
    let shard = store.shard_of("o-1");
    let newer = bus
        .acquire("Order", shard, "b", TTL)
        .await
        .unwrap()
        .expect("free");
    let fenced = sending(
        write(&key, Expect::Version(1), 2, newer.token - 1),
        "fenced",
    );
    assert!(matches!(
        store.commit(vec![fenced]).await.unwrap()[..],
        [StepResult::Fenced { .. }]
    ));
    // The server loses the key that marks the store's data (as a flush or a restart
    // without persistence would): the step is refused with why, and sends nothing.
    let client = redis::Client::open(url).unwrap();
    let mut c = client.get_multiplexed_async_connection().await.unwrap();
    redis::cmd("DEL")
        .arg(format!("{prefix}:epoch"))
        .query_async::<()>(&mut c)
        .await
        .unwrap();
    let lost = sending(write(&key, Expect::Version(1), 2, newer.token), "lost");
    let err = store.commit(vec![lost]).await.unwrap_err();
    assert!(matches!(err, StoreError::Lost { .. }), "{err}");
    assert!(
        err.to_string().contains(&format!("{prefix}:epoch")),
        "{err}"
    );

    assert_eq!(
        bus.backlog(&jobs, "workers").await.unwrap(),
        (1, 0),
        "no refused step put its call on the bus"
    );
    bus.publish(&ended, b"marker").await.unwrap();
    assert_eq!(
        next(&mut sub).await.as_deref(),
        Some(&b"marker"[..]),
        "no refused step announced anything"
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn the_bus_works_on_one_server() {
    leases_hand_out_rising_tokens(&on_server("bus-lease").bus()).await;
    fenced_commits_refuse_an_older_owner(&on_server("bus-fence").audit_writes()).await;
    streams_deliver_claim_and_acknowledge(&on_server("bus-stream").bus()).await;
    one_read_covers_a_shards_streams(&on_server("bus-shard").bus()).await;
    replies_reach_the_subscriber(&on_server("bus-reply").bus()).await;
    listeners_share_one_connection(&on_server("bus-listen").bus(), &server().url()).await;
    the_shared_connection_closes_with_its_bus(on_server("bus-listen-close"), &server().url()).await;
    processes_must_agree_on_the_shard_count(on_server("bus-count"), on_server("bus-count")).await;
    heartbeats_count_the_live(&on_server("bus-members").bus()).await;
    a_commit_settles_the_outcome_it_applies(&on_server("bus-settle")).await;
    a_commit_settles_the_request_it_applies(&on_server("bus-settle-req")).await;
    a_commit_carries_what_its_step_sends(&on_server("bus-sends"), &server().url(), "bus-sends")
        .await;
}

#[tokio::test(flavor = "multi_thread")]
async fn the_bus_works_on_a_three_master_cluster() {
    leases_hand_out_rising_tokens(&on_cluster("cbus-lease").bus()).await;
    fenced_commits_refuse_an_older_owner(&on_cluster("cbus-fence").audit_writes()).await;
    streams_deliver_claim_and_acknowledge(&on_cluster("cbus-stream").bus()).await;
    one_read_covers_a_shards_streams(&on_cluster("cbus-shard").bus()).await;
    replies_reach_the_subscriber(&on_cluster("cbus-reply").bus()).await;
    processes_must_agree_on_the_shard_count(on_cluster("cbus-count"), on_cluster("cbus-count"))
        .await;
    heartbeats_count_the_live(&on_cluster("cbus-members").bus()).await;
    a_commit_settles_the_outcome_it_applies(&on_cluster("cbus-settle").with_shards(4)).await;
    // A cluster keeps the bus's streams in other slots than a step's keys: the runtime
    // sends what a step sends, after its commit.
    assert!(!on_cluster("cbus-sends").carries_sends());
}
