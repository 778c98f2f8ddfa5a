//! The engine's profile (issue 6): what building a call costs, what one step costs in
//! memory, and what a durable order flow costs on the embedded store — latency (p50, p99),
//! throughput and allocations — with the raw fsync of the same disk for comparison.
//!
//! `cargo bench --bench engine` (`FLOWWIRE_BENCH_QUICK=1` for a smoke run). Cases:
//!
//! * `call+command`: build a driver call and its `Command` (the macros' proxies).
//! * `core step`: one in-memory step through the sans-IO core (outcome → continuation →
//!   wire → encoded record and history entry), one core.
//! * `fsync 4 KiB append` / `overwrite`: write and `fdatasync` 4 KiB in a file of the data
//!   directory's disk, appended (the file grows) or in place (what the log does).
//! * `memory order flow` / `durable order flow`: start, two driver calls answered at once,
//!   finish (three steps) on the in-memory and on the embedded (fsync'd) engine, timed
//!   from the start request to `finished()`: memory at concurrency 1, 64 and 1024, durable
//!   at 1 (a latency figure).
//! * `durable sustained` / `durable +result`: durable order flows at concurrency 64 and
//!   1024, each run at least 30,000 flows and 10 s on a fresh data directory, three runs,
//!   without and with the result read back (`state()` after `finished()`), the CPU model
//!   beside each row and the range over the runs after them.
//! * `start`, `impulse`, `probe`: one request each on the durable engine, one at a time.
//! * `memory flow, 1 core`: order flows at concurrency 1,024 on the in-memory engine, the
//!   engine, its drivers and the callers on one thread.
//! * `memory steps, 1 core` (select with `steps, 1 core`): waves of 1,024 instances each
//!   taking 1,000 driver-call steps on one thread, each run at least 10 s on a fresh
//!   engine, three runs, the CPU model beside each row and the range over the runs after.

#![allow(missing_docs)] // bench-local flows and drivers
// A benchmark measures wall-clock time: that is its point.
#![allow(clippy::disallowed_methods)]

mod support;

use std::io::Write;
use std::time::Instant;

use flowwire::core::{Instance, Scratch};
use flowwire::prelude::*;
use flowwire::storage::{InstanceKey, codec};
use support::{Mode, Samples, fmt_bytes, fmt_duration};

#[global_allocator]
static GLOBAL: support::Counting = support::Counting;

#[derive(Debug, Clone, Serialize, Deserialize, thiserror::Error)]
#[error("declined")]
pub struct Declined;

#[driver(timeout = "10s")]
pub trait Shop {
    async fn reserve(&self, sku: u32, qty: u32) -> Result<u64, Declined>;
    async fn charge(&self, cents: u64) -> Result<u64, Declined>;
}

/// Answers at once: the bench measures the engine.
#[derive(Clone)]
pub struct Counter;

#[driver]
impl Shop for Counter {
    async fn reserve(&self, sku: u32, qty: u32) -> Result<u64, Declined> {
        Ok(u64::from(sku) * u64::from(qty))
    }
    async fn charge(&self, cents: u64) -> Result<u64, Declined> {
        Ok(cents)
    }
}

#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct OrderState {
    reservation: Option<u64>,
    charge: Option<u64>,
    notes: u32,
    /// Waits for a note before finishing (the request-latency cases).
    hold: bool,
}

/// The order flow: reserve, charge, finish.
#[flow]
pub struct Order {
    #[link]
    state: OrderState,
    #[link]
    shop: impl Shop,
}

#[flow]
impl Order {
    #[wire]
    fn run(&mut self) -> Command<Self> {
        let s = &self.state;
        if s.reservation.is_none() {
            return Command::drive(self.shop.reserve(7, 2)).then(|f, r| {
                f.state.reservation = Some(r?);
                Ok(())
            });
        }
        if s.charge.is_none() {
            return Command::drive(self.shop.charge(9_995)).then(|f, r| {
                f.state.charge = Some(r?);
                Ok(())
            });
        }
        if s.hold {
            return Command::wait();
        }
        Command::finish()
    }

    #[impulse]
    fn note(&mut self) {
        self.state.notes += 1;
    }

    #[probe]
    fn notes(&self) -> u32 {
        self.state.notes
    }
}

/// The core step's flow: charges forever (the step loop with nothing else around it).
#[flow]
pub struct Loop {
    #[link]
    state: OrderState,
    #[link]
    shop: impl Shop,
}

#[flow]
impl Loop {
    #[wire]
    fn run(&mut self) -> Command<Self> {
        Command::drive(self.shop.charge(9_995)).then(|f, r| {
            f.state.charge = Some(r?);
            f.state.notes = f.state.notes.wrapping_add(1);
            Ok(())
        })
    }
}

#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct RunState {
    n: u32,
    limit: u32,
}

/// Charges `limit` times, then finishes: sustained steps with little else per step.
#[flow]
pub struct Run {
    #[link]
    state: RunState,
    #[link]
    shop: impl Shop,
}

#[flow]
impl Run {
    #[wire]
    fn run(&mut self) -> Command<Self> {
        if self.state.n >= self.state.limit {
            return Command::finish();
        }
        Command::drive(self.shop.charge(9_995)).then(|f, r| {
            r?;
            f.state.n += 1;
            Ok(())
        })
    }
}

fn main() {
    let mode = Mode::current();
    support::print_machine();
    println!(
        "{:<22} {:>5} {:>7} {:>10} {:>10} {:>12} {:>10} {:>11}",
        "case", "conc", "n", "median", "p99", "per second", "allocs/op", "alloc B/op"
    );
    if support::wanted("call+command") {
        call_and_command(mode);
    }
    if support::wanted("core step") {
        core_step(mode);
    }
    let tmp = tempfile::tempdir().expect("a temp dir");
    if support::wanted("fsync") {
        fsync(mode, tmp.path());
    }
    if support::wanted("flow, 1 core") || support::wanted("steps, 1 core") {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .expect("a tokio runtime");
        rt.block_on(one_core(mode));
    }
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .expect("a tokio runtime");
    rt.block_on(engines(mode, tmp.path()));
}

fn row(case: &str, conc: usize, s: &Samples) {
    println!(
        "{:<22} {:>5} {:>7} {:>10} {:>10} {:>12.0} {:>10.1} {:>11}",
        case,
        conc,
        s.len(),
        fmt_duration(s.median()),
        fmt_duration(s.p99()),
        s.per_second(),
        s.allocs,
        fmt_bytes(s.alloc_bytes)
    );
}

/// Times `op` in batches of `per` (one sample per batch, reported per operation): single
/// operations of a few nanoseconds are below the clock's resolution.
fn batched(n: usize, per: usize, mut op: impl FnMut()) -> Samples {
    let mut sorted = Vec::with_capacity(n);
    let (a0, b0) = support::allocated();
    let start = Instant::now();
    for _ in 0..n {
        let t = Instant::now();
        for _ in 0..per {
            op();
        }
        sorted.push(t.elapsed() / u32::try_from(per).unwrap_or(u32::MAX));
    }
    let wall = start.elapsed();
    let (a1, b1) = support::allocated();
    let ops = (n * per).max(1);
    #[allow(clippy::cast_precision_loss)]
    let per_op = |x: u64| x as f64 / ops as f64;
    let mut s = Samples::from_latencies(sorted, wall / u32::try_from(per).unwrap_or(u32::MAX));
    s.allocs = per_op(a1 - a0);
    s.alloc_bytes = per_op(b1 - b0);
    s
}

fn call_and_command(mode: Mode) {
    let proxy = ShopProxy;
    let s = batched(mode.samples(2_000), 1_000, || {
        let call = std::hint::black_box(proxy).charge(std::hint::black_box(9_995));
        let cmd = Command::<Order>::drive(call).then(|f, r| {
            f.state.charge = Some(r?);
            Ok(())
        });
        let _ = std::hint::black_box(cmd);
    });
    row("call+command", 1, &s);
}

fn core_step(mode: Mode) {
    let mut scratch = Scratch::default();
    let key = InstanceKey::new("Loop", "l-1");
    let (mut inst, first) =
        Instance::<Loop>::start(key, OrderState::default(), 1 << 20, 0, &mut scratch);
    inst.commit(&first);
    let mut reply = Vec::new();
    codec::encode_raw(&Ok::<u64, Declined>(9_995), &mut reply).expect("encodes");
    let reply = bytes::Bytes::from(reply);
    let s = batched(mode.samples(2_000), 500, || {
        let seq = inst.pending().map(|p| p.seq).expect("a call in flight");
        let step = inst
            .outcome(seq, None, Ok(&reply), 0, &mut scratch)
            .expect("awaited");
        inst.commit(&step);
    });
    row("core step", 1, &s);
}

/// The disk's two kinds of durable 4 KiB write: appended to a growing file (the file's
/// size changes, so `fdatasync` also writes its metadata), and overwritten in place in a
/// file of fixed size (the data block only) — what the write-ahead log does: its file is
/// preallocated and reused, so the durable targets are measured against the overwrite.
fn fsync(mode: Mode, dir: &std::path::Path) {
    use std::io::{Seek, SeekFrom};
    let mut f = std::fs::File::create(dir.join("fsync-append")).expect("a file");
    let block = [7u8; 4096];
    let s = batched(mode.samples(1_000), 1, || {
        f.write_all(&block).expect("written");
        f.sync_data().expect("synced");
    });
    row("fsync 4 KiB append", 1, &s);
    let mut f = std::fs::File::create(dir.join("fsync-overwrite")).expect("a file");
    f.write_all(&block).expect("written");
    f.sync_all().expect("synced");
    let s = batched(mode.samples(1_000), 1, || {
        f.seek(SeekFrom::Start(0)).expect("rewound");
        f.write_all(&block).expect("written");
        f.sync_data().expect("synced");
    });
    row("fsync 4 KiB overwrite", 1, &s);
}

/// An in-memory engine running flow `F` with the instant `Counter` driver.
async fn memory_engine<F: flowwire::Flow>() -> Engine {
    Engine::builder()
        .in_memory()
        .flow::<F>()
        .driver(Counter)
        .start()
        .await
        .expect("an in-memory engine")
}

async fn engines(mode: Mode, dir: &std::path::Path) {
    let memory = memory_engine::<Order>().await;
    let durable = Engine::builder()
        .data_dir(dir.join("data"))
        .flow::<Order>()
        .driver(Counter)
        .start()
        .await
        .expect("an embedded engine");
    for (name, engine) in [("memory", &memory), ("durable", &durable)] {
        if !support::wanted(&format!("{name} order flow")) {
            continue;
        }
        flows(engine, name, 64, 128, false).await; // warm-up
        // Durable throughput at 64 and 1,024 comes from sustained runs (below); the
        // sequential row is a latency figure.
        let concs: &[usize] = if name == "durable" {
            &[1]
        } else {
            &[1, 64, 1024]
        };
        for &conc in concs {
            let n = match mode {
                Mode::Test => conc.min(8),
                Mode::Quick => (conc * 2).max(200),
                Mode::Full => (conc * 8).max(2_000),
            };
            let s = flows(engine, name, conc, n, false).await;
            row(&format!("{name} order flow"), conc, &s);
        }
    }
    if support::wanted("durable sustained") {
        sustained(mode, dir).await;
    }
    if ["start", "impulse", "probe"]
        .into_iter()
        .any(support::wanted)
    {
        requests(mode, &durable).await;
    }
    memory.shutdown().await;
    durable.shutdown().await;
}

/// The in-memory engine on one core (tokio's current-thread runtime): the engine, its
/// driver pool and the callers share one thread, so flows/s × 3 is steps/s on one core.
async fn one_core(mode: Mode) {
    if support::wanted("flow, 1 core") {
        one_core_flows(mode).await;
    }
    if support::wanted("steps, 1 core") {
        one_core_steps(mode).await;
    }
}

/// Order flows at concurrency 1,024 on one core.
async fn one_core_flows(mode: Mode) {
    let memory = memory_engine::<Order>().await;
    flows(&memory, "1core", 64, 128, false).await; // warm-up
    let n = match mode {
        Mode::Test => 8,
        Mode::Quick => 20_000,
        Mode::Full => 200_000,
    };
    let s = flows(&memory, "1core", 1024, n, false).await;
    row("memory flow, 1 core", 1024, &s);
    memory.shutdown().await;
}

/// Sustained steps on one core: waves of 1,024 instances each taking `limit` driver-call
/// steps, until the run has lasted `min_time` (a full run: 10 s, three runs, each on a
/// fresh engine, the CPU model beside each row and the range over the runs after them).
///
/// A quick run is one full wave (about 1.5 s): with fewer steps an instance, start-up
/// dominates and the runner's rounds stay at 4–7 steps, where in the steady state they
/// are 32–63, so a profile of it (callgrind, perf) would not be the steady state's.
async fn one_core_steps(mode: Mode) {
    let (limit, min_time, runs): (u32, _, usize) = match mode {
        Mode::Test => (4, std::time::Duration::ZERO, 1),
        Mode::Quick => (1_000, std::time::Duration::ZERO, 1),
        Mode::Full => (1_000, std::time::Duration::from_secs(10), 3),
    };
    let cpu = support::cpu_model();
    let mut rates = Vec::with_capacity(runs);
    for run in 0..runs {
        let memory = memory_engine::<Run>().await;
        let mark = support::Mark::now();
        let t = Instant::now();
        let mut steps = 0u64;
        for wave in 0.. {
            let mut tasks = tokio::task::JoinSet::new();
            for i in 0..1024 {
                let h = memory
                    .start::<Run>(format!("run-{run}-{wave}-{i}"), RunState { n: 0, limit })
                    .await
                    .expect("started");
                tasks.spawn(async move { h.finished().await.expect("finished") });
            }
            while let Some(done) = tasks.join_next().await {
                assert_eq!(done.expect("a waiter"), Ended::Finished);
            }
            steps += 1024 * (u64::from(limit) + 1);
            if t.elapsed() >= min_time {
                break;
            }
        }
        let wall = t.elapsed();
        #[allow(clippy::cast_precision_loss)]
        let rate = steps as f64 / wall.as_secs_f64();
        let s = Samples::from_latencies(vec![wall / u32::try_from(steps).unwrap_or(1); 1], wall)
            .with_allocs(mark.per_op(steps));
        println!(
            "{:<22} {:>5} {:>7} {:>10} {:>10} {:>12.0} {:>10.2} {:>11}  {:.1} s, {cpu}",
            "memory steps, 1 core",
            1024,
            steps,
            fmt_duration(s.median()),
            "",
            rate,
            s.allocs,
            fmt_bytes(s.alloc_bytes),
            wall.as_secs_f64(),
        );
        rates.push(rate);
        memory.shutdown().await;
    }
    let lo = rates.iter().copied().fold(f64::INFINITY, f64::min);
    let hi = rates.iter().copied().fold(0.0, f64::max);
    println!(
        "memory steps/s on one core: {:.0}–{:.0} K over {runs} run(s), {cpu}",
        lo / 1e3,
        hi / 1e3
    );
}

/// Runs `n` order flows, `conc` at a time, each timed from its start to `finished()` (and,
/// with `read`, to its result read back, as a caller that wants it does).
async fn flows(engine: &Engine, tag: &str, conc: usize, n: usize, read: bool) -> Samples {
    static RUN: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);
    let run = RUN.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    support::concurrent(n, conc, |i| order(engine, format!("{tag}-{run}-{i}"), read)).await
}

/// One order flow, to its end (and its result, with `read`).
fn order(
    engine: &Engine,
    id: String,
    read: bool,
) -> impl std::future::Future<Output = ()> + Send + 'static {
    let engine = engine.clone();
    async move {
        let h = engine
            .start::<Order>(id, OrderState::default())
            .await
            .expect("started");
        let ended = h.finished().await.expect("finished");
        assert_eq!(ended, Ended::Finished);
        if read {
            let state = h.state().await.expect("its result");
            assert_eq!(state.charge, Some(9_995));
        }
    }
}

/// Durable order flows at concurrency 64 and 1,024 over sustained runs (at least 30,000
/// flows and 10 s each), three runs each, alternating runs without and with the result
/// read back; each run on a fresh data directory, so that no run inherits another's store.
async fn sustained(mode: Mode, dir: &std::path::Path) {
    let (min_n, min_time, runs) = match mode {
        Mode::Test => (8, std::time::Duration::ZERO, 1),
        Mode::Quick => (3_000, std::time::Duration::from_secs(1), 3),
        Mode::Full => (30_000, std::time::Duration::from_secs(10), 3),
    };
    let cpu = support::cpu_model();
    for conc in [64, 1024] {
        let mut rates = [Vec::new(), Vec::new()];
        for _ in 0..runs {
            for (read, case) in [(false, "durable sustained"), (true, "durable +result")] {
                let data = tempfile::tempdir_in(dir).expect("a data dir");
                let engine = Engine::builder()
                    .data_dir(data.path())
                    .flow::<Order>()
                    .driver(Counter)
                    .start()
                    .await
                    .expect("an embedded engine");
                flows(&engine, "warm", 64, 256, read).await;
                let s = support::sustained(min_n, min_time, conc, |i| {
                    order(&engine, format!("s-{i}"), read)
                })
                .await;
                engine.shutdown().await;
                println!(
                    "{:<22} {:>5} {:>7} {:>10} {:>10} {:>12.0} {:>10.1} {:>11}  {:.1} s, {cpu}",
                    case,
                    conc,
                    s.len(),
                    fmt_duration(s.median()),
                    fmt_duration(s.p99()),
                    s.per_second(),
                    s.allocs,
                    fmt_bytes(s.alloc_bytes),
                    s.wall.as_secs_f64(),
                );
                rates[usize::from(read)].push(s.per_second());
            }
        }
        let range = |r: &[f64]| {
            let lo = r.iter().copied().fold(f64::INFINITY, f64::min);
            let hi = r.iter().copied().fold(0.0, f64::max);
            format!("{:.1}–{:.1} K", lo / 1e3, hi / 1e3)
        };
        let ratio: Vec<String> = rates[0]
            .iter()
            .zip(&rates[1])
            .map(|(without, with)| format!("{:.0} %", with / without * 100.0))
            .collect();
        println!(
            "durable flows/s at {conc}: {} without reading the result, {} with it (per run: {}), over {runs} run(s), {cpu}",
            range(&rates[0]),
            range(&rates[1]),
            ratio.join(", ")
        );
    }
}

/// Start, impulse and probe latency on the durable engine, one request at a time.
async fn requests(mode: Mode, engine: &Engine) {
    let n = mode.samples(1_000);
    let held = OrderState {
        hold: true,
        ..OrderState::default()
    };
    let s = support::sample(n, |i| {
        let engine = engine.clone();
        let state = held.clone();
        async move {
            engine
                .start::<Order>(format!("req-{i}"), state)
                .await
                .expect("started");
        }
    })
    .await;
    row("start", 1, &s);
    let h = engine.handle::<Order>("req-0").await.expect("a handle");
    let s = support::sample(n, |_| {
        let h = &h;
        async move { h.note().await.expect("applied") }
    })
    .await;
    row("impulse", 1, &s);
    let s = support::sample(n, |_| {
        let h = &h;
        async move {
            std::hint::black_box(h.notes().await.expect("answered"));
        }
    })
    .await;
    row("probe", 1, &s);
}
