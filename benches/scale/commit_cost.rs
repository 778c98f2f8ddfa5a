//! What a workflow's commits cost one Redis server, counted on the server itself: a fixed
//! workload of three-step workflows committed through `RedisStore`, shaped as the scale
//! bench's `Relay` makes them on one server (the start settles its request and sends a
//! call; the second step settles that call and sends the next; the last settles it and
//! publishes the end), `per_script` steps a commit.
//!
//! Commands per workflow come from `INFO commandstats`. With valgrind installed, the same
//! workload also runs on a `redis-server` under callgrind, twice (`small` and `large`
//! workflows, each on a fresh server), and the difference of the two totals over the
//! difference of their sizes is the server's **instructions per workflow**: start-up and
//! shutdown cancel out, and the count repeats to within 0.3 % from run to run, where the
//! CPU time of this VM moves by 15 %. (Kernel time, the fdatasyncs and the sockets, is not
//! counted.)

use std::process::Command;
use std::time::Duration;

use bytes::Bytes;
use flowwire::storage::InstanceStore;
use flowwire::storage::record::{BusSend, Expect, InstanceKey, StepResult, StepWrite};
use flowwire::storage::store::RedisStore;

use crate::servers::Redis;

/// Commands the server ran so far.
fn commands(server: &Redis) -> u64 {
    crate::server_counts(&server.url())[0]
}

fn step(
    key: &InstanceKey,
    expect: Expect,
    version: u64,
    active: bool,
    sends: Vec<BusSend>,
) -> StepWrite {
    StepWrite {
        key: key.clone(),
        expect,
        version,
        seq: version,
        record: Bytes::from(vec![7u8; 180]),
        active,
        parked: false,
        timer: None,
        correlation: None,
        uncorrelate: None,
        ended_key: None,
        impulse: None,
        history: Some((version, Bytes::from(vec![9u8; 120]))),
        prune_below: None,
        fence: Some(1),
        acknowledges: None,
        sends,
        checksums: flowwire::storage::codec::Checksums::Written,
    }
}

/// Commits `n` workflows on the server, `per_script` steps a commit; returns the commands
/// the commits took (the requests appended and the calls read for them are left out).
async fn workload(server: &Redis, n: usize, per_script: usize) -> u64 {
    let store = RedisStore::open(&server.url(), "cost").expect("the store");
    let bus = store.bus();
    let (requests, jobs) = (
        "cost:req:{Relay#0}".to_string(),
        "cost:jobs:{Pay}".to_string(),
    );
    bus.ensure_group(&requests, "orchestrators")
        .await
        .expect("a group");
    bus.ensure_group(&jobs, "workers").await.expect("a group");
    let mut reader = bus.reader().await.expect("a reader");
    let mut read = async |stream: &String, group: &str, n: usize| {
        let mut ids = Vec::with_capacity(n);
        while ids.len() < n {
            let got = reader
                .read(
                    std::slice::from_ref(stream),
                    group,
                    "bench",
                    1_000,
                    Duration::from_millis(100),
                )
                .await
                .expect("a read");
            ids.extend(got.into_iter().map(|e| e.id));
        }
        ids
    };
    let appended: Vec<(String, Bytes)> = (0..n)
        .map(|_| (requests.clone(), Bytes::from_static(b"request")))
        .collect();
    for chunk in appended.chunks(500) {
        bus.push(chunk).await.expect("requests appended");
    }
    let request_ids = read(&requests, "orchestrators", n).await;
    let keys: Vec<InstanceKey> = (0..n)
        .map(|i| InstanceKey::new("Relay", format!("wf-{i}").as_str()))
        .collect();
    let settle = |stream: &String, group: &str, entry: &String| BusSend::Settle {
        stream: stream.clone(),
        group: group.to_string(),
        entry: entry.clone(),
    };
    let call = || BusSend::Append {
        stream: jobs.clone(),
        body: Bytes::from(vec![1u8; 60]),
    };
    let mut made = 0;
    let mut settled = request_ids;
    for round in 0..3u64 {
        let before = commands(server);
        for chunk in (0..n).collect::<Vec<_>>().chunks(per_script) {
            let steps: Vec<StepWrite> = chunk
                .iter()
                .map(|&i| {
                    let k = &keys[i];
                    match round {
                        0 => step(
                            k,
                            Expect::Absent,
                            1,
                            true,
                            vec![call(), settle(&requests, "orchestrators", &settled[i])],
                        ),
                        1 => step(
                            k,
                            Expect::Version(1),
                            2,
                            true,
                            vec![call(), settle(&jobs, "workers", &settled[i])],
                        ),
                        _ => step(
                            k,
                            Expect::Version(2),
                            3,
                            false,
                            vec![
                                BusSend::Publish {
                                    channel: "cost:ended".into(),
                                    body: Bytes::from_static(b"end"),
                                },
                                settle(&jobs, "workers", &settled[i]),
                            ],
                        ),
                    }
                })
                .collect();
            let results = store.commit(steps).await.expect("a commit");
            assert!(
                results.iter().all(|r| *r == StepResult::Committed),
                "{results:?}"
            );
        }
        made += commands(server).saturating_sub(before + 1);
        if round < 2 {
            settled = read(&jobs, "workers", n).await;
        }
    }
    made
}

/// Runs the case and prints its rows.
pub async fn run(mode: crate::support::Mode, cpu: &str) {
    let (small, large) = match mode {
        crate::support::Mode::Test => (20, 40),
        crate::support::Mode::Quick => (200, 1_000),
        crate::support::Mode::Full => (200, 2_000),
    };
    let callgrind = mode != crate::support::Mode::Test
        && Command::new("valgrind")
            .arg("--version")
            .output()
            .is_ok_and(|o| o.status.success());
    println!(
        "{:>28} {:>10} {:>14} {:>22}",
        "commit cost, one Redis", "steps/script", "commands/wf", "instructions/wf"
    );
    for per_script in [2, 16] {
        let server = Redis::start_with_fsync("always");
        #[allow(clippy::cast_precision_loss)]
        let per_workflow = workload(&server, large, per_script).await as f64 / large as f64;
        drop(server);
        let instructions = if callgrind {
            let mut totals = Vec::new();
            for n in [small, large] {
                let mut server = Redis::start_counted();
                workload(&server, n, per_script).await;
                server.shutdown();
                totals.push(server.instructions());
            }
            match totals[..] {
                #[allow(clippy::cast_precision_loss)]
                [Some(a), Some(b)] => format!(
                    "{:.0} K",
                    (b.saturating_sub(a)) as f64 / (large - small) as f64 / 1e3
                ),
                _ => "(no count)".to_string(),
            }
        } else {
            "(no valgrind)".to_string()
        };
        println!(
            "{:>28} {per_script:>10} {per_workflow:>14.1} {instructions:>22}  {cpu}",
            "appendfsync always"
        );
    }
}
