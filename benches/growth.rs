//! How the engine behaves as it grows (issue 6): a million sleeping instances on one node
//! (resident memory, and how late the timers of others fire meanwhile), the cost of a step
//! with 1 K and with 1 M instances in the store, with 10 and with 100 K history entries,
//! and with a 2 MB state on the storage ladder.
//!
//! `cargo bench --bench growth` (`FLOWWIRE_BENCH_QUICK=1`: 100 K instances, 10 K history
//! entries). Filters select cases as in libtest: `cargo bench --bench growth -- history`.
//!
//! A step's cost is measured from inside: the driver of a looping instance notes the time
//! of each call, and the gap between two calls is one whole step — the outcome's way
//! back, the step, its commit, and the next call's dispatch. Each figure is on the
//! in-memory engine (the CPU's share) and on the embedded durable engine (every commit
//! fsync'd), one instance stepping alone.

#![allow(missing_docs)] // bench-local flows and drivers
// A benchmark measures wall-clock time: that is its point.
#![allow(clippy::disallowed_methods)]
// Figures for a table: a count above 2^52 is not a concern.
#![allow(clippy::cast_precision_loss)]

mod support;

use std::sync::{Arc, Mutex, PoisonError};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use bytes::Bytes;
use flowwire::prelude::*;
use support::{Mark, Mode, Samples, fmt_bytes, fmt_duration};

#[global_allocator]
static GLOBAL: support::Counting = support::Counting;

#[derive(Debug, Clone, Serialize, Deserialize, thiserror::Error)]
#[error("declined")]
pub struct Declined;

#[driver(timeout = "10s")]
pub trait Metronome {
    async fn tick(&self, n: u64) -> Result<u64, Declined>;
}

/// Notes when each call arrives.
#[derive(Clone, Default)]
pub struct Ticks(Arc<Mutex<Vec<Instant>>>);

impl Ticks {
    fn take(&self) -> Vec<Instant> {
        std::mem::take(&mut *self.0.lock().unwrap_or_else(PoisonError::into_inner))
    }
}

#[driver]
impl Metronome for Ticks {
    async fn tick(&self, n: u64) -> Result<u64, Declined> {
        self.0
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .push(Instant::now());
        Ok(n)
    }
}

#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct StepsState {
    n: u64,
    limit: u64,
    /// A payload the continuation rewrites a byte of on every step (the 2 MB case).
    blob: Bytes,
}

/// Calls `tick` `limit` times, one step per outcome, then finishes.
#[flow]
pub struct Steps {
    #[link]
    state: StepsState,
    #[link]
    clock: impl Metronome,
}

#[flow]
impl Steps {
    #[wire]
    fn run(&mut self) -> Command<Self> {
        if self.state.n >= self.state.limit {
            return Command::finish();
        }
        Command::drive(self.clock.tick(self.state.n)).then(|f, r| {
            f.state.n = r? + 1;
            if !f.state.blob.is_empty() {
                let mut blob = f.state.blob.to_vec();
                let at = usize::try_from(f.state.n).unwrap_or(0) % blob.len();
                blob[at] = blob[at].wrapping_add(1);
                f.state.blob = Bytes::from(blob);
            }
            Ok(())
        })
    }
}

#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct NapState {
    due_ms: u64,
    woke: bool,
}

/// Sleeps until `due_ms`, then finishes.
#[flow]
pub struct Nap {
    #[link]
    state: NapState,
}

#[flow]
impl Nap {
    #[wire]
    fn run(&mut self) -> Command<Self> {
        if self.state.woke {
            return Command::finish();
        }
        Command::until(UNIX_EPOCH + Duration::from_millis(self.state.due_ms)).then(|f| {
            f.state.woke = true;
            Ok(())
        })
    }
}

fn main() {
    let mode = Mode::current();
    support::print_machine();
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .expect("a tokio runtime");
    rt.block_on(run(mode));
}

async fn run(mode: Mode) {
    let tmp = tempfile::tempdir().expect("a temp dir");
    let history = match mode {
        Mode::Full => 100_000,
        Mode::Quick => 10_000,
        Mode::Test => 200,
    };
    let population = match mode {
        Mode::Full => 1_000_000,
        Mode::Quick => 100_000,
        Mode::Test => 500,
    };
    println!(
        "{:<34} {:>8} {:>10} {:>10} {:>10} {:>11}",
        "case", "n", "median", "p99", "allocs/op", "alloc B/op"
    );
    // The durable engine first: its resident memory is then not the in-memory engine's
    // leftovers (freed memory the allocator keeps).
    for durable in [true, false] {
        let kind = if durable { "durable" } else { "memory" };
        if support::wanted(&format!("{kind} history")) {
            history_growth(kind, &tmp.path().join(format!("h-{kind}")), history).await;
        }
        if support::wanted(&format!("{kind} instances")) {
            instance_growth(
                mode,
                kind,
                &tmp.path().join(format!("i-{kind}")),
                population,
            )
            .await;
        }
    }
    if support::wanted("2 MB") {
        big_state(mode, &tmp.path().join("big")).await;
    }
}

async fn engine(kind: &str, dir: &std::path::Path, ticks: &Ticks) -> Engine {
    let builder = if kind == "durable" {
        Engine::builder().data_dir(dir)
    } else {
        Engine::builder().in_memory()
    };
    builder
        .flow::<Steps>()
        .flow::<Nap>()
        .driver(ticks.clone())
        .start()
        .await
        .expect("an engine")
}

fn row(case: &str, s: &Samples) {
    println!(
        "{:<34} {:>8} {:>10} {:>10} {:>10.1} {:>11}",
        case,
        s.len(),
        fmt_duration(s.median()),
        fmt_duration(s.p99()),
        s.allocs,
        fmt_bytes(s.alloc_bytes)
    );
}

/// Runs one `Steps` instance for `steps` steps; returns the gap between consecutive
/// calls (one step each) and what the run allocated per step.
async fn stepping(
    engine: &Engine,
    ticks: &Ticks,
    id: &str,
    steps: u64,
    blob: Bytes,
) -> Vec<Duration> {
    ticks.take();
    let h = engine
        .start::<Steps>(
            id,
            StepsState {
                n: 0,
                limit: steps,
                blob,
            },
        )
        .await
        .expect("started");
    assert_eq!(h.finished().await.expect("finished"), Ended::Finished);
    let at = ticks.take();
    at.windows(2).map(|w| w[1] - w[0]).collect()
}

/// Step gaps as samples (their sum as the wall time), with allocations per step.
fn samples(gaps: &[Duration], per_step: (f64, f64)) -> Samples {
    Samples::from_latencies(gaps.to_vec(), gaps.iter().sum()).with_allocs(per_step)
}

/// One instance takes `history` steps: the cost of its steps 10–1,000 against the cost of
/// its last 1,000 (with ~`history` entries behind each).
async fn history_growth(kind: &str, dir: &std::path::Path, history: u64) {
    let ticks = Ticks::default();
    let engine = engine(kind, dir, &ticks).await;
    let mark = Mark::now();
    let gaps = stepping(&engine, &ticks, "long", history, Bytes::new()).await;
    let allocs = mark.per_op(history);
    let window = 1_000.min(gaps.len() / 2);
    let early = samples(&gaps[10.min(gaps.len())..window.max(10)], allocs);
    let late = samples(&gaps[gaps.len() - window..], allocs);
    row(&format!("{kind} step, history 10–{window}"), &early);
    row(&format!("{kind} step, history {history}"), &late);
    ratio(&format!("{kind} history growth"), &early, &late);
    engine.shutdown().await;
}

fn ratio(case: &str, small: &Samples, large: &Samples) {
    let r = large.median().as_nanos() as f64 / small.median().as_nanos().max(1) as f64;
    println!("{case:<34} median ratio {r:.2} (target ≤ 1.20)");
}

/// The step cost with 1 K instances in the store, then with `population` sleeping ones; with
/// them asleep, the resident memory and how late 1,000 short timers fire.
async fn instance_growth(mode: Mode, kind: &str, dir: &std::path::Path, population: usize) {
    let ticks = Ticks::default();
    let engine = engine(kind, dir, &ticks).await;
    let steps = match mode {
        Mode::Test => 50,
        Mode::Quick | Mode::Full => 5_000,
    };
    let day = unix_ms() + 86_400_000;
    populate(&engine, "small", 1_000, day).await;
    let mark = Mark::now();
    let gaps = stepping(&engine, &ticks, "at-1k", steps, Bytes::new()).await;
    let small = samples(&gaps, mark.per_op(steps));
    row(&format!("{kind} step, 1 K instances"), &small);

    let rss0 = support::rss().unwrap_or(0);
    let t = Instant::now();
    populate(&engine, "big", population, day).await;
    let took = t.elapsed();
    let rss1 = support::rss().unwrap_or(0);
    let rate = population as f64 / took.as_secs_f64();
    println!(
        "{:<34} {population} started in {:.1} s ({rate:.0}/s); RSS {} → {} ({} per instance)",
        format!("{kind} sleeping instances"),
        took.as_secs_f64(),
        fmt_bytes(rss0 as f64),
        fmt_bytes(rss1 as f64),
        fmt_bytes(rss1.saturating_sub(rss0) as f64 / population as f64),
    );
    let mark = Mark::now();
    let gaps = stepping(&engine, &ticks, "at-big", steps, Bytes::new()).await;
    let large = samples(&gaps, mark.per_op(steps));
    row(&format!("{kind} step, {population} instances"), &large);
    ratio(&format!("{kind} instance growth"), &small, &large);

    let lags = timer_lag(&engine, mode).await;
    row(&format!("{kind} timer lag, {population} asleep"), &lags);
    println!(
        "{:<34} {}",
        format!("{kind} RSS at the end"),
        fmt_bytes(support::rss().unwrap_or(0) as f64)
    );
    engine.shutdown().await;
}

fn unix_ms() -> u64 {
    u64::try_from(
        SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .unwrap_or_default()
            .as_millis(),
    )
    .unwrap_or(u64::MAX)
}

/// Starts `n` `Nap` instances sleeping until `due_ms`, 1,024 at a time.
async fn populate(engine: &Engine, tag: &str, n: usize, due_ms: u64) {
    let gate = Arc::new(tokio::sync::Semaphore::new(1024));
    let mut tasks = tokio::task::JoinSet::new();
    for i in 0..n {
        let permit = gate.clone().acquire_owned().await.expect("open");
        let engine = engine.clone();
        let id = format!("{tag}-{i}");
        tasks.spawn(async move {
            let _permit = permit;
            engine
                .start::<Nap>(
                    id,
                    NapState {
                        due_ms,
                        woke: false,
                    },
                )
                .await
                .expect("started");
        });
        // Reap as we go: the set stays at the concurrency.
        while let Some(done) = tasks.try_join_next() {
            done.expect("a start panicked");
        }
    }
    while let Some(done) = tasks.join_next().await {
        done.expect("a start panicked");
    }
}

/// 1,000 instances sleep until times spread over the next 2 s (from 1 s ahead); each lag is
/// from its due time until its caller hears it finished.
async fn timer_lag(engine: &Engine, mode: Mode) -> Samples {
    let n: u64 = if mode == Mode::Test { 20 } else { 1_000 };
    let base = unix_ms() + 1_000;
    let mut tasks = tokio::task::JoinSet::new();
    for i in 0..n {
        let due_ms = base + i * 2_000 / n;
        let h = engine
            .start::<Nap>(
                format!("lag-{base}-{i}"),
                NapState {
                    due_ms,
                    woke: false,
                },
            )
            .await
            .expect("started");
        tasks.spawn(async move {
            assert_eq!(h.finished().await.expect("finished"), Ended::Finished);
            Duration::from_millis(unix_ms().saturating_sub(due_ms))
        });
    }
    let mark = Mark::now();
    let mut lags = Vec::new();
    while let Some(lag) = tasks.join_next().await {
        lags.push(lag.expect("a waiter panicked"));
    }
    Samples::from_latencies(lags, Duration::from_secs(3)).with_allocs(mark.per_op(n))
}

/// A 2 MB state rewritten on every step, on the embedded engine's default ladder (inline
/// below 16 KiB, files above).
async fn big_state(mode: Mode, dir: &std::path::Path) {
    let ticks = Ticks::default();
    let engine = engine("durable", dir, &ticks).await;
    let steps = match mode {
        Mode::Full => 200,
        Mode::Quick => 50,
        Mode::Test => 5,
    };
    let blob: Bytes = (0..2_000_000u32)
        .map(|i| (i % 251) as u8)
        .collect::<Vec<u8>>()
        .into();
    let mark = Mark::now();
    let gaps = stepping(&engine, &ticks, "big", steps, blob).await;
    let s = samples(&gaps, mark.per_op(steps));
    row("durable step, 2 MB state (files)", &s);
    engine.shutdown().await;
}
