//! Multi-process throughput and latency: workflows/s and p50/p99 per workflow for 1
//! orchestrator and 1 worker process, and 2 and 2, on one local `redis-server` (started by
//! this binary on a loopback port) with its append-only file on — `appendfsync always`
//! (every write fsynced before its reply: the setting comparable with durable peers) and
//! `everysec` (fsynced once a second: up to a second of acknowledged steps lost in a power
//! cut) — at concurrency 1, 64 and 1024, three sustained runs of each (10 s each; 3 s in a
//! quick run), the setting and the CPU model beside each row.
//!
//! `cargo bench --bench scale --features flowwire-suite/redis` (`FLOWWIRE_BENCH_QUICK=1`
//! for a quick run; `FLOWWIRE_SCALE_CASE=always,1x1,64` for one case alone). A workflow is the `Relay` flow of `tests/harness/scale_flows.rs`:
//! start, two driver calls (answered at once), finish — three durable steps, each a Redis
//! commit by the shard's owner, the calls and outcomes over Redis Streams. This process is
//! the client: `concurrency` callers each start a workflow, wait for `finished()` (pushed
//! by the owner over pub/sub), read its end state, and start the next, until the run's
//! time is up; each workflow is timed from its start request to its state read. Beside
//! each row, what a workflow cost the server, from its own counters: commands, socket
//! reads (round trips), commit scripts and CPU time (`INFO stats`, `INFO commandstats`,
//! `INFO cpu`); and the CPU time per
//! workflow of the orchestrators, the workers and this client (`/proc/<pid>/stat`, user
//! and system): on a machine of few cores every process's CPU bounds the throughput, not
//! the server's alone.
//!
//! First, what a workflow's commits cost the server itself, on a fixed workload (commands,
//! and instructions counted under callgrind when valgrind is installed: see
//! `scale/commit_cost.rs`).
//!
//! With `FLOWWIRE_BENCH_RESTATE=1`, Restate 1.7 runs beside it as the durable peer
//! (`scripts/restate-peer serve`: installed from the npm registry on first use, on
//! loopback, its log's WAL fsynced on every write): at concurrency 1 and 64 of the
//! `appendfsync always`, 1 + 1 setup, each flowwire run is followed by a Restate run of the
//! same length with the same workflow (two journaled steps, its result returned to the
//! waiting caller), and the ratio of each pair is printed.

#[path = "../tests/support/servers.rs"]
mod servers;
mod support;

#[path = "../tests/harness/scale_flows.rs"]
mod scale_flows;

#[path = "scale/commit_cost.rs"]
mod commit_cost;

use std::io::{BufRead, BufReader};
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use tokio::time::Instant;

use flowwire::{Ended, Engine};
use scale_flows::{Relay, RelayState, bench_shared};
use support::{Mode, Samples, fmt_duration};

#[global_allocator]
static GLOBAL: support::Counting = support::Counting;

fn main() {
    let mode = Mode::current();
    // One thread, like the orchestrator and worker processes (see scale_harness.rs).
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("a tokio runtime");
    rt.block_on(run(mode));
}

/// A harness process (`scale_harness … bench`), killed when dropped.
struct Proc(Child);

impl Proc {
    fn start(role: &str, url: &str, prefix: &str, name: &str) -> Proc {
        let mut cmd = Command::new(env!("CARGO_BIN_EXE_scale_harness"));
        cmd.args([role, url, prefix, name, "bench"]);
        Proc(spawn_ready(&mut cmd, &format!("{role} {name}")))
    }

    /// The CPU time it has used so far.
    fn cpu(&self) -> Duration {
        cpu_time(self.0.id())
    }
}

/// The CPU time (user and system, all threads) process `pid` has used so far, from
/// `/proc/<pid>/stat` (zero where there is none to read).
fn cpu_time(pid: u32) -> Duration {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
    // The fields after the command name (which may hold spaces, in parentheses): the
    // 12th and 13th of them are utime and stime, in clock ticks.
    let fields: Vec<&str> = stat
        .rsplit_once(')')
        .map_or("", |(_, rest)| rest)
        .split_whitespace()
        .collect();
    let ticks: u64 = [11, 12]
        .iter()
        .filter_map(|&i| fields.get(i)?.parse::<u64>().ok())
        .sum();
    let hz = clock_ticks();
    Duration::from_secs(ticks / hz) + Duration::from_nanos((ticks % hz) * 1_000_000_000 / hz)
}

/// Clock ticks per second (`getconf CLK_TCK`; 100 where it cannot say).
fn clock_ticks() -> u64 {
    static TICKS: std::sync::OnceLock<u64> = std::sync::OnceLock::new();
    *TICKS.get_or_init(|| {
        Command::new("getconf")
            .arg("CLK_TCK")
            .output()
            .ok()
            .and_then(|o| String::from_utf8_lossy(&o.stdout).trim().parse().ok())
            .filter(|&t| t > 0)
            .unwrap_or(100)
    })
}

/// The CPU time the orchestrators, the workers and this process (the client) have used.
fn cpu_by_role(orchestrators: &[Proc], workers: &[Proc]) -> [Duration; 3] {
    [
        orchestrators.iter().map(Proc::cpu).sum(),
        workers.iter().map(Proc::cpu).sum(),
        cpu_time(std::process::id()),
    ]
}

/// Starts a process and waits until it prints `READY` on its standard output.
fn spawn_ready(cmd: &mut Command, what: &str) -> Child {
    let mut child = cmd
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit())
        .spawn()
        .unwrap_or_else(|e| panic!("{what} does not start: {e}"));
    let out = child.stdout.take().expect("piped stdout");
    let mut lines = BufReader::new(out).lines();
    loop {
        match lines.next() {
            Some(Ok(l)) if l == "READY" => break,
            Some(Ok(_)) => {}
            _ => panic!("{what} did not start"),
        }
    }
    child
}

impl Drop for Proc {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// One case to run alone, from `FLOWWIRE_SCALE_CASE=<fsync>,<orchestrators>x<workers>,
/// <concurrency>` (for example `always,1x1,64`): its three runs, without the commit-cost
/// case, for comparing two builds run after one another.
struct Only {
    fsync: String,
    setup: (usize, usize),
    concurrency: usize,
}

impl Only {
    fn from_env() -> Option<Only> {
        let spec = std::env::var("FLOWWIRE_SCALE_CASE").ok()?;
        let parsed = (|| {
            let mut parts = spec.split(',');
            let fsync = parts.next()?.trim().to_string();
            let (o, w) = parts.next()?.trim().split_once('x')?;
            let concurrency = parts.next()?.trim().parse().ok()?;
            let setup = (o.parse().ok()?, w.parse().ok()?);
            let known = ["always", "everysec"].contains(&fsync.as_str());
            (known && parts.next().is_none()).then_some(Only {
                fsync,
                setup,
                concurrency,
            })
        })();
        Some(parsed.unwrap_or_else(|| {
            panic!("FLOWWIRE_SCALE_CASE={spec:?}: expected <always|everysec>,<o>x<w>,<concurrency>")
        }))
    }
}

/// How long each run lasts: sustained runs, a few thousand workflows at the least.
fn run_time(mode: Mode) -> Duration {
    match mode {
        Mode::Test => Duration::from_millis(300),
        Mode::Quick => Duration::from_secs(3),
        Mode::Full => Duration::from_secs(10),
    }
}

/// Restate as the durable peer (`scripts/restate-peer serve`), stopped when dropped.
struct Restate(Child);

impl Restate {
    /// Starts the peer if `FLOWWIRE_BENCH_RESTATE=1` asks for it.
    fn wanted() -> Option<Restate> {
        if std::env::var_os("FLOWWIRE_BENCH_RESTATE").is_none_or(|v| v == "0") {
            return None;
        }
        let script = concat!(env!("CARGO_MANIFEST_DIR"), "/scripts/restate-peer");
        let mut cmd = Command::new(script);
        cmd.arg("serve");
        Some(Restate(spawn_ready(
            &mut cmd,
            "the Restate peer (scripts/restate-peer serve: it needs node, npm and curl)",
        )))
    }

    /// One sustained run of `concurrency` callers for `time`: workflows/s and the line
    /// its client printed.
    fn run(concurrency: usize, time: Duration) -> (f64, String) {
        let root = env!("CARGO_MANIFEST_DIR");
        let out = Command::new("node")
            .arg(format!("{root}/benches/restate/client.cjs"))
            .arg(concurrency.to_string())
            .arg(format!("{}", time.as_secs_f64()))
            .env("NODE_PATH", format!("{root}/target/restate/node_modules"))
            .output()
            .expect("node runs the Restate client");
        let line = String::from_utf8_lossy(&out.stdout).trim().to_string();
        assert!(
            out.status.success(),
            "the Restate client failed: {line} {}",
            String::from_utf8_lossy(&out.stderr)
        );
        // "… workflows in 10.0 s = 113/s, p50 …"
        let rate = line
            .split(" = ")
            .nth(1)
            .and_then(|r| r.split("/s").next())
            .and_then(|r| r.parse().ok())
            .unwrap_or_else(|| panic!("no rate in the Restate client's line {line:?}"));
        (rate, line)
    }
}

impl Drop for Restate {
    fn drop(&mut self) {
        // SIGTERM: the script stops the server and the service it started.
        let _ = Command::new("kill").arg(self.0.id().to_string()).status();
        let _ = self.0.wait();
    }
}

async fn run(mode: Mode) {
    support::print_machine();
    let cpu = support::cpu_model();
    let only = Only::from_env();
    if only.is_none() {
        commit_cost::run(mode, &cpu).await;
    }
    let fsyncs: &[&'static str] = if mode == Mode::Test {
        &["always"]
    } else {
        &["always", "everysec"]
    };
    println!(
        "{:>9} {:>4} {:>7} {:>5} {:>6} {:>12} {:>10} {:>10} {:>10} {:>9} {:>9} {:>10} {:>11} {:>10} {:>10} {:>10}",
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
        "reads/wf",
        "scripts/wf",
        "redis µs/wf",
        "orch µs/wf",
        "work µs/wf",
        "client µs/wf"
    );
    let restate = Restate::wanted();
    for &fsync in fsyncs {
        if only.as_ref().is_some_and(|o| o.fsync != fsync) {
            continue;
        }
        let redis = servers::Redis::start_with_fsync(fsync);
        let peer = restate.as_ref().filter(|_| fsync == "always");
        setups(mode, &redis.url(), fsync, &cpu, peer, only.as_ref()).await;
    }
}

/// Every setup and concurrency on one Redis (`appendfsync fsync`), three runs each; with
/// `restate`, a Restate run after each flowwire run at concurrency 1 and 64 of the 1 + 1
/// setup.
async fn setups(
    mode: Mode,
    url: &str,
    fsync: &str,
    cpu: &str,
    restate: Option<&Restate>,
    only: Option<&Only>,
) {
    let mut setups: &[(usize, usize)] = if mode == Mode::Test {
        &[(1, 1)]
    } else {
        &[(1, 1), (2, 2)]
    };
    let mut concurrencies: &[usize] = if mode == Mode::Test {
        &[1, 8]
    } else {
        &[1, 64, 1024]
    };
    if let Some(o) = only {
        setups = std::slice::from_ref(&o.setup);
        concurrencies = std::slice::from_ref(&o.concurrency);
    }
    let runs = if mode == Mode::Test { 1 } else { 3 };
    let url = url.to_string();
    for &(orchestrators, workers) in setups {
        let prefix = format!("bench-{fsync}-o{orchestrators}w{workers}");
        let orchestrator_procs: Vec<Proc> = (0..orchestrators)
            .map(|i| Proc::start("orchestrator", &url, &prefix, &format!("o{i}")))
            .collect();
        let worker_procs: Vec<Proc> = (0..workers)
            .map(|i| Proc::start("worker", &url, &prefix, &format!("w{i}")))
            .collect();
        let client = Engine::builder()
            .shared(bench_shared(&url, &prefix, None))
            .flow::<Relay>()
            .client()
            .request_timeout(Duration::from_mins(1))
            .start()
            .await
            .expect("the client joins");
        settle(&url, &prefix, orchestrators).await;
        warm(&client).await;
        for &c in concurrencies {
            let side = restate.is_some() && (orchestrators, workers) == (1, 1) && c <= 64;
            let mut rates = Vec::new();
            let mut ratios = Vec::new();
            for run in 0..runs {
                let before = server_counts(&url);
                let cpu_before = cpu_by_role(&orchestrator_procs, &worker_procs);
                let s = case(&client, &format!("c{c}-{run}"), c, run_time(mode)).await;
                let cpu_after = cpu_by_role(&orchestrator_procs, &worker_procs);
                let after = server_counts(&url);
                let n = s.len().max(1);
                #[allow(clippy::cast_precision_loss)]
                let per = |i: usize| (after[i].saturating_sub(before[i])) as f64 / n as f64;
                #[allow(clippy::cast_precision_loss)]
                let cpu_per = |i: usize| {
                    cpu_after[i].saturating_sub(cpu_before[i]).as_secs_f64() * 1e6 / n as f64
                };
                println!(
                    "{fsync:>9} {orchestrators:>4} {workers:>7} {c:>5} {n:>6} {:>12.0} {:>10} {:>10} {:>10} {:>9.1} {:>9.1} {:>10.2} {:>11.1} {:>10.1} {:>10.1} {:>10.1}  {cpu}",
                    s.per_second(),
                    fmt_duration(s.median()),
                    fmt_duration(s.p99()),
                    fmt_duration(s.quantile(1.0)),
                    per(0),
                    per(1),
                    per(3),
                    per(2),
                    cpu_per(0),
                    cpu_per(1),
                    cpu_per(2),
                );
                rates.push(s.per_second());
                if side {
                    let (restate_rate, line) = Restate::run(c, run_time(mode));
                    println!("{:>9} {line}", "");
                    ratios.push(s.per_second() / restate_rate);
                }
            }
            let (lo, hi) = range(&rates);
            println!(
                "appendfsync {fsync}, {orchestrators} orchestrator(s), {workers} worker(s), concurrency {c}: {lo:.0}–{hi:.0} workflows/s over {runs} run(s) of {:?}, {cpu}",
                run_time(mode)
            );
            if !ratios.is_empty() {
                let (lo, hi) = range(&ratios);
                println!(
                    "flowwire ÷ Restate 1.7 (its WAL fsynced per write), appendfsync {fsync}, concurrency {c}: {lo:.1}–{hi:.1} × over {} pair(s) of runs, {cpu}",
                    ratios.len()
                );
            }
        }
        client.shutdown().await;
        drop((orchestrator_procs, worker_procs));
    }
}

/// Redis's own counters, `[commands processed, reads processed, CPU time in µs, commit
/// scripts run]` (a read is one socket read of a client's requests: a round trip, however
/// many commands it pipelines; the CPU time is the server's, user and system, all its
/// threads; a commit script carries the steps of one round of an orchestrator's runners). Per
/// workflow they count what a step costs Redis, whatever the machine's speed (lease
/// renewals and heartbeats of the idle processes add a little): the CPU time is what bounds
/// the workflows one server carries, since its one thread runs every command.
#[allow(clippy::cast_possible_truncation, clippy::cast_sign_loss)] // counters, as floats
fn server_counts(url: &str) -> [u64; 4] {
    let port = url
        .trim_end_matches('/')
        .rsplit(':')
        .next()
        .unwrap_or("6379")
        .to_string();
    let out = Command::new("redis-cli")
        .args(["-p", &port, "INFO", "stats", "cpu", "commandstats"])
        .output()
        .expect("redis-cli runs (it comes with redis-server)");
    let text = String::from_utf8_lossy(&out.stdout);
    let field = |name: &str| -> f64 {
        text.lines()
            .find_map(|l| l.strip_prefix(name)?.strip_prefix(':'))
            .and_then(|v| v.trim().parse().ok())
            .unwrap_or(0.0)
    };
    let cpu_s = field("used_cpu_user") + field("used_cpu_sys");
    // `cmdstat_evalsha:calls=N,usec=…`
    let scripts = text
        .lines()
        .find_map(|l| l.strip_prefix("cmdstat_evalsha:calls="))
        .and_then(|v| v.split(',').next()?.parse().ok())
        .unwrap_or(0);
    [
        field("total_commands_processed") as u64,
        field("total_reads_processed") as u64,
        (cpu_s * 1e6) as u64,
        scripts,
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

/// The lowest and highest of some figures.
fn range(xs: &[f64]) -> (f64, f64) {
    let lo = xs.iter().copied().fold(f64::INFINITY, f64::min);
    let hi = xs.iter().copied().fold(0.0, f64::max);
    (lo, hi)
}

/// A few workflows first, so that no run times the processes' warm-up.
async fn warm(client: &Engine) {
    let mut tasks = tokio::task::JoinSet::new();
    for i in 0..64 {
        let client = client.clone();
        tasks.spawn(async move { relay(&client, &format!("warm-{i}")).await });
    }
    while let Some(done) = tasks.join_next().await {
        done.expect("a warm-up workflow panicked");
    }
}

/// `concurrency` callers run workflows one after the other until `time` is up; each is
/// timed from its start request to its end state read back.
async fn case(client: &Engine, tag: &str, concurrency: usize, time: Duration) -> Samples {
    let start = Instant::now();
    let deadline = start + time;
    let mut tasks = tokio::task::JoinSet::new();
    for caller in 0..concurrency {
        let client = client.clone();
        let tag = format!("{tag}-{caller}");
        tasks.spawn(async move {
            let mut latencies = Vec::new();
            for i in 0.. {
                if Instant::now() >= deadline {
                    break;
                }
                let t = Instant::now();
                relay(&client, &format!("{tag}-{i}")).await;
                latencies.push(t.elapsed());
            }
            latencies
        });
    }
    let mut latencies = Vec::new();
    while let Some(done) = tasks.join_next().await {
        latencies.extend(done.expect("a caller panicked"));
    }
    Samples::from_latencies(latencies, start.elapsed())
}

/// One workflow: started, waited for, its end state read (the peers return their result).
async fn relay(client: &Engine, id: &str) {
    let h = client
        .start::<Relay>(id, RelayState::default())
        .await
        .expect("started");
    let ended = tokio::time::timeout(Duration::from_mins(1), h.finished())
        .await
        .expect("finished within a minute")
        .expect("finished");
    assert_eq!(ended, Ended::Finished);
    let state = h.state().await.expect("the end state reads back");
    assert_eq!(state.hops, 2, "both calls were applied");
}
