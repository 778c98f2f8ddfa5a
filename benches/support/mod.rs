//! What every flowwire bench binary shares: a counting allocator, latency samples with
//! median and p99, the run mode, and a plain table.
//!
//! Modes:
//! * `cargo bench` passes `--bench`: the full run.
//! * `FLOWWIRE_BENCH_QUICK=1 cargo bench`: a smoke run with a tenth of the samples.
//! * `cargo test --all-targets` runs the binary without `--bench`: one sample of each case
//!   at small sizes, so the bench code is tested without the wait.
//! * `cargo bench --bench engine -- memory` runs only the cases whose names contain
//!   `memory` (as libtest filters tests); useful under a profiler.

#![allow(dead_code, unsafe_code)]
// A benchmark measures wall-clock time: that is its point.
#![allow(clippy::disallowed_methods)]

use std::alloc::{GlobalAlloc, Layout, System};
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

/// Counts allocations and allocated bytes on every thread (tier backends allocate on
/// tokio's and the blocking pool's threads too, so a per-thread count would undercount).
pub struct Counting;

static ALLOCS: AtomicU64 = AtomicU64::new(0);
static BYTES: AtomicU64 = AtomicU64::new(0);

// SAFETY: forwards every call to the system allocator; the counters are atomics, which
// never allocate.
unsafe impl GlobalAlloc for Counting {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        ALLOCS.fetch_add(1, Ordering::Relaxed);
        BYTES.fetch_add(layout.size() as u64, Ordering::Relaxed);
        unsafe { System.alloc(layout) }
    }
    unsafe fn alloc_zeroed(&self, layout: Layout) -> *mut u8 {
        ALLOCS.fetch_add(1, Ordering::Relaxed);
        BYTES.fetch_add(layout.size() as u64, Ordering::Relaxed);
        unsafe { System.alloc_zeroed(layout) }
    }
    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        unsafe { System.dealloc(ptr, layout) }
    }
    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        ALLOCS.fetch_add(1, Ordering::Relaxed);
        BYTES.fetch_add(new_size as u64, Ordering::Relaxed);
        unsafe { System.realloc(ptr, layout, new_size) }
    }
}

/// Allocations and bytes allocated so far, process-wide.
pub fn allocated() -> (u64, u64) {
    (
        ALLOCS.load(Ordering::Relaxed),
        BYTES.load(Ordering::Relaxed),
    )
}

/// The allocation counters at one point, to count what happens after it.
#[derive(Debug, Clone, Copy)]
pub struct Mark {
    allocs: u64,
    bytes: u64,
}

impl Mark {
    /// The counters now.
    pub fn now() -> Mark {
        let (allocs, bytes) = allocated();
        Mark { allocs, bytes }
    }

    /// Allocations and bytes allocated since the mark, per operation over `ops`.
    #[allow(clippy::cast_precision_loss)]
    pub fn per_op(self, ops: u64) -> (f64, f64) {
        let (allocs, bytes) = allocated();
        let per = |x: u64| x as f64 / ops.max(1) as f64;
        (per(allocs - self.allocs), per(bytes - self.bytes))
    }
}

/// How thoroughly to run.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Mode {
    /// `cargo bench`.
    Full,
    /// `FLOWWIRE_BENCH_QUICK=1 cargo bench`.
    Quick,
    /// Run by `cargo test`: prove the code runs.
    Test,
}

impl Mode {
    /// The mode of this run, from the arguments and the environment.
    pub fn current() -> Mode {
        if !std::env::args().any(|a| a == "--bench") {
            Mode::Test
        } else if std::env::var_os("FLOWWIRE_BENCH_QUICK").is_some_and(|v| v != "0") {
            Mode::Quick
        } else {
            Mode::Full
        }
    }

    /// Samples to take for a case that takes `full` in a full run.
    pub fn samples(self, full: usize) -> usize {
        match self {
            Mode::Full => full,
            Mode::Quick => (full / 10).max(3),
            Mode::Test => 1,
        }
    }
}

/// Whether the case `name` runs: every case unless filters were given on the command line
/// (arguments not starting with `-`), then those whose name contains one of them.
pub fn wanted(name: &str) -> bool {
    let mut filters = std::env::args()
        .skip(1)
        .filter(|a| !a.starts_with('-'))
        .peekable();
    filters.peek().is_none() || filters.any(|f| name.contains(f.as_str()))
}

/// Latencies of one case, sorted, plus what the case allocated.
#[derive(Debug, Clone)]
pub struct Samples {
    sorted: Vec<Duration>,
    /// Allocations per operation (all threads).
    pub allocs: f64,
    /// Bytes allocated per operation (all threads).
    pub alloc_bytes: f64,
    /// Wall time of the whole case.
    pub wall: Duration,
}

impl Samples {
    /// Latencies measured elsewhere (concurrent operations), over `wall`; no allocation
    /// counts.
    pub fn from_latencies(mut latencies: Vec<Duration>, wall: Duration) -> Samples {
        latencies.sort_unstable();
        Samples {
            sorted: latencies,
            allocs: 0.0,
            alloc_bytes: 0.0,
            wall,
        }
    }

    /// These samples with allocation figures per operation (from [`Mark::per_op`]).
    #[must_use]
    pub fn with_allocs(mut self, (allocs, bytes): (f64, f64)) -> Samples {
        self.allocs = allocs;
        self.alloc_bytes = bytes;
        self
    }

    /// The operations measured.
    pub fn len(&self) -> usize {
        self.sorted.len()
    }

    /// The `q` quantile (nearest rank).
    pub fn quantile(&self, q: f64) -> Duration {
        if self.sorted.is_empty() {
            return Duration::ZERO;
        }
        #[allow(clippy::cast_precision_loss, clippy::cast_sign_loss)]
        let rank = ((q * self.sorted.len() as f64).ceil() as usize).clamp(1, self.sorted.len());
        self.sorted[rank - 1]
    }

    /// The median.
    pub fn median(&self) -> Duration {
        self.quantile(0.5)
    }

    /// The 99th percentile.
    pub fn p99(&self) -> Duration {
        self.quantile(0.99)
    }

    /// Operations per second over the whole case.
    pub fn per_second(&self) -> f64 {
        #[allow(clippy::cast_precision_loss)]
        let n = self.sorted.len() as f64;
        n / self.wall.as_secs_f64().max(f64::MIN_POSITIVE)
    }
}

/// Runs `op` `n` times, one after the other, timing each and counting what they allocate.
pub async fn sample<F, Fut>(n: usize, mut op: F) -> Samples
where
    F: FnMut(usize) -> Fut,
    Fut: std::future::Future<Output = ()>,
{
    let mut latencies = Vec::with_capacity(n);
    let mark = Mark::now();
    let start = Instant::now();
    for i in 0..n {
        let t = Instant::now();
        op(i).await;
        latencies.push(t.elapsed());
    }
    let wall = start.elapsed();
    Samples::from_latencies(latencies, wall).with_allocs(mark.per_op(n as u64))
}

/// Runs `n` operations, `concurrency` at a time on tokio's workers, timing each from its
/// start to its end; counts what the whole case allocated, per operation.
pub async fn concurrent<F, Fut>(n: usize, concurrency: usize, op: F) -> Samples
where
    F: Fn(usize) -> Fut,
    Fut: std::future::Future<Output = ()> + Send + 'static,
{
    let gate = std::sync::Arc::new(tokio::sync::Semaphore::new(concurrency.max(1)));
    let mark = Mark::now();
    let start = Instant::now();
    let mut tasks = tokio::task::JoinSet::new();
    for i in 0..n {
        let permit = gate
            .clone()
            .acquire_owned()
            .await
            .expect("the gate stays open");
        let fut = op(i);
        tasks.spawn(async move {
            let _permit = permit;
            let t = Instant::now();
            fut.await;
            t.elapsed()
        });
    }
    let mut latencies = Vec::with_capacity(n);
    while let Some(done) = tasks.join_next().await {
        latencies.push(done.expect("an operation panicked"));
    }
    let wall = start.elapsed();
    Samples::from_latencies(latencies, wall).with_allocs(mark.per_op(n as u64))
}

/// A duration for a table: ns below 1 µs, µs below 10 ms, ms above.
pub fn fmt_duration(d: Duration) -> String {
    let us = d.as_secs_f64() * 1e6;
    if us < 1.0 {
        format!("{} ns", d.as_nanos())
    } else if us < 100.0 {
        format!("{us:.1} µs")
    } else if us < 10_000.0 {
        format!("{us:.0} µs")
    } else {
        format!("{:.1} ms", us / 1000.0)
    }
}

/// A byte count for a table.
pub fn fmt_bytes(n: f64) -> String {
    if n < 1024.0 {
        format!("{n:.0} B")
    } else if n < 1024.0 * 1024.0 {
        format!("{:.1} KiB", n / 1024.0)
    } else {
        format!("{:.1} MiB", n / (1024.0 * 1024.0))
    }
}

/// Peak resident set size of this process so far (`VmHWM`), in bytes.
pub fn peak_rss() -> Option<u64> {
    let status = std::fs::read_to_string("/proc/self/status").ok()?;
    let line = status.lines().find(|l| l.starts_with("VmHWM:"))?;
    let kib: u64 = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kib * 1024)
}

/// Current resident set size (`VmRSS`), in bytes.
pub fn rss() -> Option<u64> {
    let status = std::fs::read_to_string("/proc/self/status").ok()?;
    let line = status.lines().find(|l| l.starts_with("VmRSS:"))?;
    let kib: u64 = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kib * 1024)
}

/// Prints the machine line every result table starts with.
pub fn print_machine() {
    let cores = std::thread::available_parallelism().map_or(0, std::num::NonZero::get);
    println!("machine: {cores} cores, {}", cpu_model());
}

/// The CPU's model name, as `/proc/cpuinfo` gives it.
pub fn cpu_model() -> String {
    std::fs::read_to_string("/proc/cpuinfo")
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("model name"))
                .and_then(|l| l.split(':').nth(1))
                .map(|m| m.trim().to_string())
        })
        .unwrap_or_else(|| "unknown CPU".into())
}

/// Runs operations `concurrency` at a time until at least `min_n` have run and at least
/// `min_time` has passed (a sustained run: throughput over seconds, not a burst).
pub async fn sustained<F, Fut>(
    min_n: usize,
    min_time: Duration,
    concurrency: usize,
    op: F,
) -> Samples
where
    F: Fn(usize) -> Fut,
    Fut: std::future::Future<Output = ()> + Send + 'static,
{
    let gate = std::sync::Arc::new(tokio::sync::Semaphore::new(concurrency.max(1)));
    let mark = Mark::now();
    let start = Instant::now();
    let mut tasks = tokio::task::JoinSet::new();
    let mut latencies = Vec::with_capacity(min_n);
    let mut n = 0;
    while n < min_n || start.elapsed() < min_time {
        let permit = gate
            .clone()
            .acquire_owned()
            .await
            .expect("the gate stays open");
        let fut = op(n);
        n += 1;
        tasks.spawn(async move {
            let _permit = permit;
            let t = Instant::now();
            fut.await;
            t.elapsed()
        });
        // Collect as they end: a long run must not hold every task's slot.
        while let Some(done) = tasks.try_join_next() {
            latencies.push(done.expect("an operation panicked"));
        }
    }
    while let Some(done) = tasks.join_next().await {
        latencies.push(done.expect("an operation panicked"));
    }
    let wall = start.elapsed();
    Samples::from_latencies(latencies, wall).with_allocs(mark.per_op(n as u64))
}
