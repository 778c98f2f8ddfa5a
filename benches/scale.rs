//! Multi-process throughput and latency: workflows/s and p50/p99 per workflow for 1
//! orchestrator and 1 worker process, and 2 and 2, on one local `redis-server` (started by
//! this binary on a loopback port) with its append-only file on — `appendfsync always`
//! (every write fsynced before its reply: the setting comparable with durable peers) and
//! `everysec` (fsynced once a second: up to a second of acknowledged steps lost in a power
//! cut) — at concurrency 1, 64 and 1024, three runs of each, the setting and the CPU model
//! beside each row.
//!
//! `cargo bench --bench scale --features flowwire-suite/redis` (`FLOWWIRE_BENCH_QUICK=1`
//! for a smoke run). A workflow is the `Relay` flow of `tests/harness/scale_flows.rs`:
//! start, two driver calls (answered at once), finish — three durable steps, each a Redis
//! commit by the shard's owner, the calls and outcomes over Redis Streams. This process is
//! the client: it starts `concurrency` workflows at a time and measures each from the
//! start request to `finished()` reporting it (pushed by the owner over pub/sub).

#[path = "../tests/support/servers.rs"]
mod servers;
mod support;

#[path = "../tests/harness/scale_flows.rs"]
mod scale_flows;

use std::io::{BufRead, BufReader};
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use flowwire::{Ended, Engine};
use scale_flows::{Relay, RelayState, bench_shared};
use support::{Mode, Samples, fmt_duration};

#[global_allocator]
static GLOBAL: support::Counting = support::Counting;

fn main() {
    let mode = Mode::current();
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .expect("a tokio runtime");
    rt.block_on(run(mode));
}

/// A harness process (`scale_harness … bench`), killed when dropped.
struct Proc(Child);

impl Proc {
    fn start(role: &str, url: &str, prefix: &str, name: &str) -> Proc {
        let mut child = Command::new(env!("CARGO_BIN_EXE_scale_harness"))
            .args([role, url, prefix, name, "bench"])
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .spawn()
            .expect("the harness starts");
        let out = child.stdout.take().expect("piped stdout");
        let mut lines = BufReader::new(out).lines();
        loop {
            match lines.next() {
                Some(Ok(l)) if l == "READY" => break,
                Some(Ok(_)) => {}
                _ => panic!("{role} {name} did not start"),
            }
        }
        Proc(child)
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// Workflows per case: enough for a p99 at each concurrency.
fn workflows(mode: Mode, concurrency: usize) -> usize {
    match mode {
        Mode::Test => concurrency.min(8),
        Mode::Quick => (concurrency * 2).max(100),
        Mode::Full => (concurrency * 8).max(1_000),
    }
}

async fn run(mode: Mode) {
    support::print_machine();
    let cpu = support::cpu_model();
    let fsyncs: &[&'static str] = if mode == Mode::Test {
        &["always"]
    } else {
        &["always", "everysec"]
    };
    println!(
        "{:>9} {:>4} {:>7} {:>5} {:>6} {:>12} {:>10} {:>10} {:>10} {:>9} {:>9}",
        "fsync",
        "orch",
        "workers",
        "conc",
        "n",
        "workflows/s",
        "p50",
        "p99",
        "max",
        "cmds/wf",
        "reads/wf"
    );
    for &fsync in fsyncs {
        let redis = servers::Redis::start_with_fsync(fsync);
        setups(mode, &redis.url(), fsync, &cpu).await;
    }
}

/// Every setup and concurrency on one Redis (`appendfsync fsync`), three runs each.
async fn setups(mode: Mode, url: &str, fsync: &str, cpu: &str) {
    let setups: &[(usize, usize)] = if mode == Mode::Test {
        &[(1, 1)]
    } else {
        &[(1, 1), (2, 2)]
    };
    let concurrencies: &[usize] = if mode == Mode::Test {
        &[1, 8]
    } else {
        &[1, 64, 1024]
    };
    let runs = if mode == Mode::Test { 1 } else { 3 };
    let url = url.to_string();
    for &(orchestrators, workers) in setups {
        let prefix = format!("bench-{fsync}-o{orchestrators}w{workers}");
        let mut procs = Vec::new();
        for i in 0..orchestrators {
            procs.push(Proc::start("orchestrator", &url, &prefix, &format!("o{i}")));
        }
        for i in 0..workers {
            procs.push(Proc::start("worker", &url, &prefix, &format!("w{i}")));
        }
        let client = Engine::builder()
            .shared(bench_shared(&url, &prefix, None))
            .flow::<Relay>()
            .client()
            .request_timeout(Duration::from_mins(1))
            .start()
            .await
            .expect("the client joins");
        settle(&url, &prefix, orchestrators).await;
        case(&client, "warm", 16, 64).await;
        for &c in concurrencies {
            let n = workflows(mode, c);
            let mut rates = Vec::new();
            for run in 0..runs {
                let before = server_counts(&url);
                let s = case(&client, &format!("c{c}-{run}"), c, n).await;
                let after = server_counts(&url);
                #[allow(clippy::cast_precision_loss)]
                let per = |i: usize| (after[i].saturating_sub(before[i])) as f64 / n as f64;
                println!(
                    "{fsync:>9} {orchestrators:>4} {workers:>7} {c:>5} {n:>6} {:>12.0} {:>10} {:>10} {:>10} {:>9.1} {:>9.1}  {cpu}",
                    s.per_second(),
                    fmt_duration(s.median()),
                    fmt_duration(s.p99()),
                    fmt_duration(s.quantile(1.0)),
                    per(0),
                    per(1),
                );
                rates.push(s.per_second());
            }
            let lo = rates.iter().copied().fold(f64::INFINITY, f64::min);
            let hi = rates.iter().copied().fold(0.0, f64::max);
            println!(
                "appendfsync {fsync}, {orchestrators} orchestrator(s), {workers} worker(s), concurrency {c}: {lo:.0}–{hi:.0} workflows/s over {runs} run(s), {cpu}"
            );
        }
        client.shutdown().await;
        drop(procs);
    }
}

/// Redis's own counters, `[commands processed, reads processed]` (a read is one socket
/// read of a client's requests: a round trip, however many commands it pipelines). Per
/// workflow they count what a step costs Redis, whatever the machine's speed (lease
/// renewals and heartbeats of the idle processes add a little).
fn server_counts(url: &str) -> [u64; 2] {
    let port = url
        .trim_end_matches('/')
        .rsplit(':')
        .next()
        .unwrap_or("6379")
        .to_string();
    let out = Command::new("redis-cli")
        .args(["-p", &port, "INFO", "stats"])
        .output()
        .expect("redis-cli runs (it comes with redis-server)");
    let text = String::from_utf8_lossy(&out.stdout);
    let field = |name: &str| {
        text.lines()
            .find_map(|l| l.strip_prefix(name)?.strip_prefix(':'))
            .and_then(|v| v.trim().parse().ok())
            .unwrap_or(0)
    };
    [
        field("total_commands_processed"),
        field("total_reads_processed"),
    ]
}

/// Waits (up to 30 s) until the orchestrators hold every shard between them, each at
/// least one: measuring during a rebalance would time the handover, not the steps.
async fn settle(url: &str, prefix: &str, orchestrators: usize) {
    let bus = bench_shared(url, prefix, None).store().bus();
    for _ in 0..300 {
        let mut owners = std::collections::BTreeSet::new();
        let mut held = 0;
        for shard in 0..bus.shards() {
            if let Ok(Some((node, _))) = bus.owner("Relay", shard).await {
                owners.insert(node);
                held += 1;
            }
        }
        if held == bus.shards() && owners.len() == orchestrators {
            // One more lease round, so no shard is on its way back.
            tokio::time::sleep(Duration::from_secs(4)).await;
            return;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    panic!("the orchestrators did not share the shards within 30 s");
}

/// Runs `n` workflows, `concurrency` at a time; each is timed from its start request to
/// its `finished()` answer.
async fn case(client: &Engine, tag: &str, concurrency: usize, n: usize) -> Samples {
    support::concurrent(n, concurrency, |i| {
        let client = client.clone();
        let id = format!("{tag}-{i}");
        async move {
            let h = client
                .start::<Relay>(id.as_str(), RelayState::default())
                .await
                .expect("started");
            let ended = tokio::time::timeout(Duration::from_mins(1), h.finished())
                .await
                .expect("finished within a minute")
                .expect("finished");
            assert_eq!(ended, Ended::Finished);
        }
    })
    .await
}
