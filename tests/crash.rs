//! Crash safety with real kills: an engine process over 500 order flows is `SIGKILLed` at
//! random moments at least 20 times and restarted on the same data directory; at the end
//! every flow must have finished with each outcome and impulse applied exactly once, and
//! every driver call executed at least once, with duplicates only across killed runs.

use std::collections::{BTreeMap, HashMap};
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::Duration;

#[path = "harness/order.rs"]
mod order;
#[path = "support/process.rs"]
mod process;

use order::{CrashOrder, Ledger, order_id};
use process::run_to_end;

const FLOWS: u32 = 500;
const KILLS: u32 = 20;

/// A small deterministic generator (seeded from the clock, printed for reruns).
struct Rng(u64);
impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0
    }
}

fn spawn(dir: &Path, ledger: &Path, run: &str) -> std::process::Child {
    Command::new(env!("CARGO_BIN_EXE_crash_harness"))
        .arg(dir.join("data"))
        .arg(ledger)
        .arg(FLOWS.to_string())
        .arg(run)
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit())
        .spawn()
        .expect("the harness starts")
}

#[test]
fn sigkilled_engine_finishes_every_flow_exactly_once() {
    let dir = tempfile::tempdir().unwrap();
    let ledger = dir.path().join("ledger.txt");
    #[allow(clippy::disallowed_methods)] // a seed for the kill schedule, not flow logic
    let seed = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_nanos() as u64
        | 1;
    eprintln!("kill schedule seed: {seed}");
    let mut rng = Rng(seed);
    let mut killed_runs = Vec::new();
    let mut kills = 0;
    let mut run = 0;
    while kills < KILLS {
        run += 1;
        assert!(
            run < 200,
            "the harness kept finishing before it could be killed"
        );
        let tag = format!("run{run}");
        let mut child = spawn(dir.path(), &ledger, &tag);
        std::thread::sleep(Duration::from_millis(60 + rng.next() % 340));
        if child.try_wait().unwrap().is_none() {
            child.kill().unwrap(); // SIGKILL on Unix
            child.wait().unwrap();
            kills += 1;
            killed_runs.push(tag);
        } else {
            let out = run_to_end(child);
            assert!(
                out.contains("DONE"),
                "run {run} ended without finishing:\n{out}"
            );
            break;
        }
    }
    // A last run with no kill must bring every flow to its end.
    let out = run_to_end(spawn(dir.path(), &ledger, "final"));
    assert!(
        out.contains("DONE"),
        "the final run did not finish every flow:\n{out}"
    );

    // Every flow finished, each outcome and impulse applied exactly once.
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    rt.block_on(async {
        let engine = flowwire::Engine::builder()
            .data_dir(dir.path().join("data"))
            .flow::<CrashOrder>()
            .driver(Ledger {
                path: ledger.clone(),
                run: "verify".into(),
            })
            .start()
            .await
            .unwrap();
        for n in 0..FLOWS {
            let h = engine.handle::<CrashOrder>(order_id(n)).await.unwrap();
            assert_eq!(
                h.finished().await.unwrap(),
                flowwire::Ended::Finished,
                "order {n}"
            );
            assert_eq!(
                h.counts().await.unwrap(),
                (1, 1, 1),
                "order {n}: (reserve, charge, approve) applied"
            );
        }
        engine.shutdown().await;
    });

    // Every call executed at least once; a key executed twice only across killed runs.
    let text = std::fs::read_to_string(&ledger).unwrap();
    let mut by_key: BTreeMap<String, Vec<String>> = BTreeMap::new();
    let mut per_flow: HashMap<String, (u32, u32)> = HashMap::new();
    for line in text.lines() {
        let mut parts = line.split(' ');
        let (run, method, key) = (
            parts.next().unwrap(),
            parts.next().unwrap(),
            parts.next().unwrap(),
        );
        assert_ne!(run, "verify", "no call runs once every flow has finished");
        let flow = key.split('/').nth(1).unwrap().to_string();
        let e = per_flow.entry(flow).or_default();
        if method == "reserve" {
            e.0 += 1;
        } else {
            e.1 += 1;
        }
        by_key
            .entry(key.to_string())
            .or_default()
            .push(run.to_string());
    }
    for n in 0..FLOWS {
        let (r, c) = per_flow.get(&order_id(n)).copied().unwrap_or_default();
        assert!(
            r >= 1 && c >= 1,
            "order {n}: reserve ran {r} times, charge {c} times"
        );
    }
    let mut duplicates = 0;
    for (key, runs) in &by_key {
        for w in runs.windows(2) {
            assert_ne!(w[0], w[1], "{key} ran twice in one process life ({})", w[0]);
            assert!(
                killed_runs.contains(&w[0]),
                "{key} ran again after {}, which was not killed",
                w[0]
            );
        }
        duplicates += runs.len() - 1;
    }
    eprintln!(
        "crash test: {FLOWS} flows, {kills} SIGKILLs, {} runs, {} driver executions, {} distinct calls, {duplicates} duplicates (all after a kill)",
        run + 1,
        text.lines().count(),
        by_key.len()
    );
}
