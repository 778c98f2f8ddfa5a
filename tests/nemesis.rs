#![allow(missing_docs)]
//! The partition test (issue 23): three orchestrator and three worker processes
//! (`scale_harness`), each reaching one Redis (append-only file, `fsync` always) through a
//! loopback TCP proxy of its own; this test process is the client. While it opens tickets
//! (start, then a confirmation), a nemesis picks a process at random, every round, and
//!
//! * freezes its link for up to 4 s (past the 1.5 s lease and the 2 s visibility timeout),
//! * cuts its link (its connections reset),
//! * stops it with SIGSTOP for up to 4 s, or
//! * kills it with SIGKILL and starts it again;
//!
//! and every fourth round stops redis-server itself for up to 1.5 s.
//!
//! Then the checker requires, of the run:
//!
//! * every ticket finished, its confirmation and each call's outcome applied once, no
//!   step written twice, tokens never going back along a record (`tests/harness/tickets.rs`);
//! * every history contiguous (steps 0, 1, 2, … with no gap);
//! * no write applied under a token older than the newest granted for its shard when it
//!   landed (the store's audit records both with every write);
//! * no two processes holding one shard at once, from their own logs: each orchestrator
//!   prints the span of every lease it holds (from the send of the request that took it to
//!   its deadline, on the one machine's wall clock), and spans of one shard under
//!   different tokens never overlap;
//! * no stream entry left, pending or not, once the work is done.
//!
//! Tickets are opened for as long as the nemesis runs, at least `FLOWWIRE_NEMESIS_FLOWS`
//! (default 300); `FLOWWIRE_NEMESIS_ROUNDS` (default 12) sets the rounds; the README's soak command runs it long. The seed is printed (and taken from
//! `FLOWWIRE_NEMESIS_SEED`), so a failing run can be repeated.
#![cfg(feature = "redis")]

use std::collections::BTreeMap;
use std::io::BufRead;
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use flowwire::Engine;
use flowwire::storage::{InstanceKey, StepInput};
use tokio::sync::Semaphore;

#[path = "support/servers.rs"]
mod servers;

#[path = "support/proxy.rs"]
mod proxy;

#[path = "harness/scale_flows.rs"]
mod scale_flows;

#[path = "harness/tickets.rs"]
mod tickets;

use scale_flows::{SHARDS, Ticket, shared};

const PREFIX: &str = "nemesis";

fn setting(name: &str, default: u64) -> u64 {
    std::env::var(name)
        .ok()
        .and_then(|n| n.parse().ok())
        .unwrap_or(default)
}

/// One lease span an orchestrator printed: `(shard, token) → (node, since, until)`, as its
/// last line for the token says.
type Spans = Arc<Mutex<BTreeMap<(u16, u64), (String, u64, u64)>>>;

/// A harness process behind its own proxy.
struct Member {
    role: &'static str,
    name: String,
    link: proxy::Proxy,
    child: Child,
}

impl Member {
    async fn start(redis_port: u16, role: &'static str, name: &str, spans: &Spans) -> Member {
        let link = proxy::Proxy::start(redis_port).await;
        let child = launch(&link.redis_url(), role, name, spans);
        Member {
            role,
            name: name.to_string(),
            link,
            child,
        }
    }

    fn pid(&self) -> u32 {
        self.child.id()
    }

    fn restart(&mut self, spans: &Spans) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        self.child = launch(&self.link.redis_url(), self.role, &self.name, spans);
    }
}

impl Drop for Member {
    fn drop(&mut self) {
        servers::signal(self.pid(), "-CONT");
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Harness processes started so far (each incarnation logs to a file of its own).
static LAUNCHES: std::sync::atomic::AtomicU32 = std::sync::atomic::AtomicU32::new(0);

/// Where the harness processes log (their stderr, one file per incarnation): kept when
/// the run fails, deleted when it passes.
fn logs() -> &'static std::path::Path {
    static DIR: std::sync::OnceLock<std::path::PathBuf> = std::sync::OnceLock::new();
    DIR.get_or_init(|| {
        tempfile::Builder::new()
            .prefix("flowwire-nemesis-")
            .tempdir()
            .expect("a log directory")
            .keep()
    })
}

/// Starts a harness process (a new incarnation has a new member name) and reads its lease
/// lines on a thread of their own.
fn launch(url: &str, role: &'static str, name: &str, spans: &Spans) -> Child {
    let log = std::fs::File::create(logs().join(format!(
        "{name}-{}.log",
        LAUNCHES.fetch_add(1, std::sync::atomic::Ordering::Relaxed)
    )))
    .expect("the log file is created");
    let mut child = Command::new(env!("CARGO_BIN_EXE_scale_harness"))
        .args([role, url, PREFIX, name])
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(log)
        .spawn()
        .expect("the harness starts");
    let out = child.stdout.take().expect("piped");
    let (spans, node) = (spans.clone(), format!("{name}-{}", child.id()));
    std::thread::spawn(move || {
        for line in std::io::BufReader::new(out).lines() {
            let Ok(line) = line else { break };
            let parts: Vec<&str> = line.split(' ').collect();
            if let ["LEASE", _flow, shard, token, since, until] = parts[..] {
                let (Ok(shard), Ok(token), Ok(since), Ok(until)) =
                    (shard.parse(), token.parse(), since.parse(), until.parse())
                else {
                    continue;
                };
                let mut spans = spans.lock().unwrap();
                let span = spans
                    .entry((shard, token))
                    .or_insert((node.clone(), since, until));
                assert_eq!(span.0, node, "token {token} of shard {shard} granted twice");
                // The last line is the whole span (a give-back ends it early).
                span.2 = until;
            }
        }
    });
    child
}

/// A small xorshift generator: the run is repeatable from its seed.
struct Dice(u64);

impl Dice {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0
    }
    fn below(&mut self, n: u64) -> u64 {
        self.next() % n.max(1)
    }
    fn millis(&mut self, from: u64, to: u64) -> Duration {
        Duration::from_millis(from + self.below(to - from))
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn processes_partitioned_paused_and_killed_keep_one_owner_per_shard_and_lose_nothing() {
    let redis = servers::Redis::start_durable();
    let url = redis.url();
    let spans = Spans::default();
    let mut members = Vec::new();
    for i in 0..3 {
        members.push(Member::start(redis.port, "orchestrator", &format!("orch-{i}"), &spans).await);
        members.push(Member::start(redis.port, "worker", &format!("worker-{i}"), &spans).await);
    }
    let client = Engine::builder()
        .shared(shared(&url, PREFIX, None))
        .flow::<Ticket>()
        .client()
        .request_timeout(Duration::from_secs(5))
        .start()
        .await
        .expect("the client joins");

    let flows = setting("FLOWWIRE_NEMESIS_FLOWS", 300);
    let rounds = setting("FLOWWIRE_NEMESIS_ROUNDS", 12);
    let seed = setting("FLOWWIRE_NEMESIS_SEED", u64::from(std::process::id())) | 1;
    println!(
        "nemesis: {flows} flows, {rounds} rounds, seed {seed}; the processes log to {}",
        logs().display()
    );
    // Tickets are opened for as long as the nemesis runs (and at least `flows` of them),
    // so that every fault meets work in progress.
    let calm = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let feeder = {
        let (client, calm) = (client.clone(), calm.clone());
        tokio::spawn(async move {
            let slots = Arc::new(Semaphore::new(16));
            let mut tasks = Vec::new();
            let mut ids = Vec::new();
            while ids.len() < usize::try_from(flows).unwrap_or(usize::MAX)
                || !calm.load(std::sync::atomic::Ordering::Relaxed)
            {
                let id = format!("t-{}", ids.len());
                ids.push(id.clone());
                let permit = slots.clone().acquire_owned().await.expect("open");
                let client = client.clone();
                tasks.push(tokio::spawn(async move {
                    tickets::open(client, id).await;
                    drop(permit);
                }));
            }
            for t in tasks {
                t.await.expect("a ticket opened");
            }
            ids
        })
    };

    let mut dice = Dice(seed);
    let mut done = BTreeMap::<&str, u32>::new();
    for round in 0..rounds {
        tokio::time::sleep(dice.millis(200, 800)).await;
        if round % 4 == 3 {
            redis.pause();
            tokio::time::sleep(dice.millis(200, 1_500)).await;
            redis.resume();
            *done.entry("redis paused").or_default() += 1;
            continue;
        }
        let m = &mut members[usize::try_from(dice.below(6)).unwrap_or(0)];
        match dice.below(4) {
            0 => {
                m.link.freeze();
                tokio::time::sleep(dice.millis(300, 4_000)).await;
                m.link.heal();
                *done.entry("link frozen").or_default() += 1;
            }
            1 => {
                m.link.cut();
                *done.entry("link cut").or_default() += 1;
            }
            2 => {
                servers::signal(m.pid(), "-STOP");
                tokio::time::sleep(dice.millis(300, 4_000)).await;
                servers::signal(m.pid(), "-CONT");
                *done.entry("process paused").or_default() += 1;
            }
            _ => {
                m.restart(&spans);
                *done.entry("process killed").or_default() += 1;
            }
        }
    }
    calm.store(true, std::sync::atomic::Ordering::Relaxed);
    println!("nemesis: {done:?}");
    let ids = tokio::time::timeout(Duration::from_mins(10), feeder)
        .await
        .expect("every ticket opened within 10 minutes")
        .expect("the feeder");

    // Checker.
    let store = shared(&url, PREFIX, None).store();
    for id in &ids {
        tickets::check(&client, &store, id).await;
        let history =
            tickets::retry(async || client.history::<Ticket>(id.as_str(), 0, 100).await).await;
        let first = history.steps.first().map_or(0, |s| s.seq);
        assert!(
            matches!(
                history.steps.first().map(|s| &s.input),
                Some(StepInput::Start)
            ),
            "{id}: the history starts with the start"
        );
        for (i, step) in history.steps.iter().enumerate() {
            assert_eq!(step.seq, first + i as u64, "{id}: a gap in the history");
        }
        for w in store
            .audit(&InstanceKey::new("Ticket", id.as_str()))
            .await
            .unwrap()
        {
            assert!(
                w.token >= w.newest,
                "{id}: step {} written under token {} after token {} was granted",
                w.step,
                w.token,
                w.newest
            );
        }
    }
    let spans = spans.lock().unwrap().clone();
    let mut by_shard: BTreeMap<u16, Vec<(u64, String, u64, u64)>> = BTreeMap::new();
    for ((shard, token), (node, since, until)) in &spans {
        by_shard
            .entry(*shard)
            .or_default()
            .push((*token, node.clone(), *since, *until));
    }
    for (shard, mut leases) in by_shard {
        leases.sort();
        for pair in leases.windows(2) {
            let ((t1, n1, _, until), (t2, n2, since, _)) = (&pair[0], &pair[1]);
            assert!(
                until <= since,
                "shard {shard}: {n1} held token {t1} until {until}, {n2} took token {t2} at {since}"
            );
        }
    }
    let bus = store.bus();
    let mut streams: Vec<(String, &str)> = (0..SHARDS)
        .flat_map(|s| {
            [
                (bus.requests("Ticket", s), "orchestrators"),
                (bus.outcomes("Ticket", s), "orchestrators"),
            ]
        })
        .collect();
    streams.push((bus.jobs("Desk"), "workers"));
    for (stream, group) in &streams {
        let mut left = (0, 0);
        for _ in 0..300 {
            left = bus.backlog(stream, group).await.unwrap();
            if left == (0, 0) {
                break;
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        assert_eq!(left, (0, 0), "{stream}: entries left (all, pending)");
    }
    println!(
        "nemesis: {} tickets checked; {} leases over {SHARDS} shards, none overlapping",
        ids.len(),
        spans.len()
    );
    client.shutdown().await;
    drop(members);
    let _ = std::fs::remove_dir_all(logs());
}
