//! What opening the embedded store costs: a store of `n` instances (one record, one
//! history entry and one impulse id each, as a first step writes them), closed cleanly,
//! then opened again and again. Opening checks every page of the redb file (its integrity
//! check) and reads the log, so the cost grows with the file.
//!
//! `cargo bench --bench open` (`-- 100000` for one size).

#![allow(missing_docs)]
// A benchmark measures wall-clock time: that is its point.
#![allow(clippy::disallowed_methods, clippy::cast_precision_loss)]

#[path = "support/mod.rs"]
mod support;

use std::time::Instant;

use bytes::Bytes;
use flowwire::storage::{Expect, InstanceKey, InstanceStore, RedbStore, StepWrite};
use support::{Mode, Samples, fmt_bytes, fmt_duration};

#[global_allocator]
static ALLOC: support::Counting = support::Counting;

fn step(i: u64) -> StepWrite {
    let key = InstanceKey::new("Order", format!("order-{i:08}"));
    StepWrite {
        expect: Expect::Absent,
        version: 1,
        seq: 1,
        record: Bytes::from(vec![(i % 251) as u8; 200]),
        active: false,
        parked: false,
        timer: None,
        correlation: None,
        uncorrelate: None,
        ended_key: None,
        impulse: Some(format!("start-{i}").into()),
        history: Some((1, Bytes::from(vec![7u8; 120]))),
        prune_below: None,
        fence: None,
        acknowledges: None,
        sends: Vec::new(),
        checksums: flowwire::storage::codec::Checksums::Written,
        key,
    }
}

fn main() {
    support::print_machine();
    let mode = Mode::current();
    let sizes: &[u64] = match mode {
        Mode::Test => &[1_000],
        Mode::Quick => &[10_000],
        Mode::Full => &[10_000, 100_000, 1_000_000],
    };
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    println!(
        "{:<16} {:>9} {:>6} {:>10} {:>10} {:>12}",
        "case", "file", "n", "median", "p99", "MB/s checked"
    );
    for &n in sizes {
        let name = format!("open {n}");
        if !support::wanted(&name) {
            continue;
        }
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("instances.redb");
        rt.block_on(async {
            let store = RedbStore::open(&path).unwrap();
            for chunk in (0..n).collect::<Vec<_>>().chunks(1_000) {
                store
                    .commit(chunk.iter().map(|&i| step(i)).collect())
                    .await
                    .unwrap();
            }
        });
        let size = std::fs::metadata(&path).unwrap().len();
        let mut latencies = Vec::new();
        let wall = Instant::now();
        for _ in 0..mode.samples(10) {
            let t = Instant::now();
            let store = RedbStore::open(&path).unwrap();
            latencies.push(t.elapsed());
            drop(store);
        }
        let samples = Samples::from_latencies(latencies, wall.elapsed());
        let mb = size as f64 / 1e6;
        println!(
            "{name:<16} {:>9} {:>6} {:>10} {:>10} {:>12.0}",
            fmt_bytes(size as f64),
            samples.len(),
            fmt_duration(samples.median()),
            fmt_duration(samples.p99()),
            mb / samples.median().as_secs_f64(),
        );
    }
}
