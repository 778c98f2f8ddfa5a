//! Tier put/get latency (median, p99), throughput and allocations per operation, at
//! 1 KB, 64 KB, 1 MB and 16 MB, on every tier: memory, embedded (redb), fs, and — with
//! the `redis` and `s3` features — a real `redis-server` and moto's S3 server, each started
//! by this binary on a loopback port.
//!
//! `cargo bench --bench tiers --features flowwire-suite/redis,flowwire-suite/s3`
//! (`FLOWWIRE_BENCH_QUICK=1` for a smoke run). Each operation is awaited before the next
//! starts: the latencies are those of one caller; MB/s is the payload size over the median.

#[path = "../tests/support/servers.rs"]
mod servers;
mod support;

use bytes::Bytes;
use flowwire::storage::{KB, MB, Tier};
use support::{Mode, Samples, fmt_bytes, fmt_duration};

#[global_allocator]
static GLOBAL: support::Counting = support::Counting;

/// Keys written in turn (puts overwrite): bounds the memory a tier holds.
const RING: usize = 8;

fn main() {
    let mode = Mode::current();
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .expect("a tokio runtime");
    rt.block_on(run(mode));
}

/// Sizes, with the samples taken at each in a full run.
fn sizes(mode: Mode) -> Vec<(usize, usize)> {
    let all = vec![(KB, 1000), (64 * KB, 300), (MB, 100), (16 * MB, 20)];
    if mode == Mode::Test {
        all.into_iter().take(2).collect()
    } else {
        all
    }
}

async fn run(mode: Mode) {
    support::print_machine();
    let tmp = tempfile::tempdir().expect("a temp dir");
    #[cfg_attr(not(any(feature = "redis", feature = "s3")), allow(unused_mut))]
    let mut tiers: Vec<Tier> = vec![
        Tier::memory().named("memory"),
        Tier::embedded(tmp.path().join("embedded.redb")).named("embedded"),
        Tier::fs(tmp.path().join("fs")).named("fs"),
    ];
    #[cfg(feature = "redis")]
    let redis = servers::Redis::start();
    #[cfg(feature = "redis")]
    tiers.push(
        Tier::redis(&redis.url(), "bench")
            .expect("a Redis URL")
            .named("redis"),
    );
    #[cfg(feature = "s3")]
    let s3 = servers::S3::start();
    #[cfg(feature = "s3")]
    {
        use flowwire::storage::tier::{S3Config, S3Tier};
        let config = S3Config::new("bench")
            .endpoint(&s3.endpoint())
            .path_style(true)
            .credentials("bench", "bench");
        S3Tier::new(config.clone())
            .create_bucket_if_missing()
            .await
            .expect("the bench bucket");
        tiers.push(Tier::s3(config).named("s3"));
    }
    println!(
        "{:<9} {:>7} {:<4} {:>5} {:>10} {:>10} {:>10} {:>11} {:>11}",
        "tier", "size", "op", "n", "median", "p99", "MB/s", "allocs/op", "alloc B/op"
    );
    for tier in &tiers {
        for &(size, full) in &sizes(mode) {
            let n = mode.samples(full);
            let (put, get) = bench_case(tier, size, n).await;
            row(tier.name(), size, "put", &put);
            row(tier.name(), size, "get", &get);
        }
    }
}

fn row(tier: &str, size: usize, op: &str, s: &Samples) {
    #[allow(clippy::cast_precision_loss)]
    let mbps = size as f64 / 1e6 / s.median().as_secs_f64().max(f64::MIN_POSITIVE);
    let size = if size.is_multiple_of(MB) {
        format!("{} MB", size / MB)
    } else {
        format!("{} KB", size / KB)
    };
    println!(
        "{:<9} {:>7} {:<4} {:>5} {:>10} {:>10} {:>10.1} {:>11.1} {:>11}",
        tier,
        size,
        op,
        s.len(),
        fmt_duration(s.median()),
        fmt_duration(s.p99()),
        mbps,
        s.allocs,
        fmt_bytes(s.alloc_bytes),
    );
}

/// `n` puts, then `n` gets (each checked), of one size on one tier.
async fn bench_case(tier: &Tier, size: usize, n: usize) -> (Samples, Samples) {
    let backend = tier.backend();
    let data = Bytes::from((0..size).map(|i| (i % 251) as u8).collect::<Vec<u8>>());
    let keys: Vec<String> = (0..RING).map(|i| format!("bench/{size}/{i}")).collect();
    let parts = [data.clone()];
    let put = support::sample(n, |i| {
        let key = &keys[i % RING];
        let parts = &parts;
        async move {
            backend.put(key, parts).await.expect("put");
        }
    })
    .await;
    let expect = size as u64;
    let get = support::sample(n, |i| {
        let key = &keys[i % RING.min(n)];
        async move {
            let got = backend.get(key, Some(expect)).await.expect("get");
            assert_eq!(got.map(|b| b.len()), Some(size), "{key}");
        }
    })
    .await;
    for key in &keys {
        backend.delete(key).await.expect("delete");
    }
    (put, get)
}
