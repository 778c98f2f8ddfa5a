//! The durability promises with real kills: an engine process is `SIGKILLed` at the worst
//! moments and restarted on the same data directory.
//!
//! * **Timers**: 40 instances sleep three times each while the engine is killed again and
//!   again, and restarted only after a pause in which their timers come due. In the end
//!   every timer armed fired exactly once, never before its time, in order (read from each
//!   instance's history in the store).
//! * **The ambiguous window**: the engine is killed while every driver call hangs in
//!   flight. After the restart, the `Mail` calls (policy `retry`) are sent again with the
//!   same idempotency key and `redelivered() == 1`; the `Vault` calls (policy `park`) are
//!   not sent again: their instances are parked for an operator, with a reason that says so;
//!   the operator's resume sends each once more.
//! * **Compensations**: sagas fail and start undoing their reservations; the engine is
//!   killed twice while the first compensation of each is in flight. After the last
//!   restart every compensation has run to completion, last registered first, the one in
//!   flight at the kills sent again each time with the same idempotency key.
//! * **Cancellations**: instances holding three seats are cancelled and start releasing
//!   them; the engine is killed while the first release of each is in flight, and the
//!   restarted engine is asked to cancel each again. Every instance was cancelled once (one
//!   cancellation step), its releases ran last first to completion, and it ended cancelled.
//! * **Start-or-impulse**: numbers go to five instances by start-or-impulse, each under its
//!   own impulse id; the engine is killed midway, restarted, and sent every number again.
//!   Each instance was started once (its first step `StartWith`) and holds every number
//!   sent to it exactly once.
//! * **Retries**: every flow's first attempt fails and its retry waits out a 0.75–1.5 s
//!   backoff; the engine is killed during it and restarted at once. The next attempts are
//!   sent only when their backoff is over (never at the restart), numbered 2 and 3 (the
//!   count is in the record), with the same key and never counted as redelivered.

use std::collections::BTreeMap;
use std::path::Path;
use std::time::Duration;

#[path = "support/process.rs"]
mod process;

use process::{await_line, kill, kill_harness as harness, run_to_end};

use flowwire::storage::{
    HistoryEntry, InstanceKey, InstanceStore, RedbStore, StepInput, StepOutput,
};

const NAPS: u32 = 40;
const TIMER_KILLS: u32 = 8;
const CALLS: u32 = 10;
const TRIPS: u32 = 10;
const FANS: u32 = 10;
const BROODS: u32 = 10;
const RETRIES: u32 = 10;
const HOLDS: u32 = 10;
const NOTES: u32 = 200;

async fn history(dir: &Path, flow: &str, id: &str) -> Vec<HistoryEntry> {
    let store = RedbStore::open(dir.join("instances.redb")).unwrap();
    let key = InstanceKey::new(flow, id);
    store
        .history(&key, 0, 1_000)
        .await
        .unwrap()
        .into_iter()
        .map(|(_, bytes)| HistoryEntry::decode(&bytes, &key, 1 << 20).unwrap())
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_timer_fires_exactly_once_across_kills_and_late_restarts() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data");
    let data_s = data.to_str().unwrap().to_string();
    let n = NAPS.to_string();
    for k in 0..TIMER_KILLS {
        let mut child = harness(&["timers", &data_s, &n]);
        let _out = await_line(&mut child, "READY");
        // Kill at varying points: during starts, during sleeps, during a batch of fires.
        std::thread::sleep(Duration::from_millis(50 + u64::from(k) * 90));
        kill(child);
        // Down long enough for some timers to come due: they must fire on restart.
        std::thread::sleep(Duration::from_millis(300));
    }
    let out = run_to_end(harness(&["timers", &data_s, &n]));
    assert!(out.contains("DONE"), "{out}");

    for i in 0..NAPS {
        let id = format!("nap-{i}");
        let entries = history(&data, "KillNap", &id).await;
        let mut armed = Vec::new();
        let mut fired = Vec::new();
        for e in &entries {
            match e.output {
                StepOutput::Sleep { due_ms } => armed.push(due_ms),
                StepOutput::Finish => {}
                ref other => panic!("{id}: unexpected step output {other:?}"),
            }
            if let StepInput::Timer { due_ms } = e.input {
                assert!(
                    e.at_ms >= due_ms,
                    "{id}: fired at {} before its time {due_ms}",
                    e.at_ms
                );
                fired.push(due_ms);
            }
        }
        assert_eq!(armed.len(), 3, "{id}: three sleeps armed: {entries:#?}");
        assert_eq!(armed, fired, "{id}: each armed timer fired once, in order");
        assert_eq!(entries.last().unwrap().output, StepOutput::Finish);
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_call_in_flight_at_a_kill_is_sent_again_or_parked_per_its_policy() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data");
    let data_s = data.to_str().unwrap().to_string();
    let ledger = dir.path().join("ledger.txt");
    let ledger_s = ledger.to_str().unwrap().to_string();
    let n = CALLS.to_string();

    let mut child = harness(&["calls", &data_s, &ledger_s, "hang", &n]);
    let _out = await_line(&mut child, "READY");
    // Every call is noted (and hangs) before the kill.
    for _ in 0..600 {
        let lines = std::fs::read_to_string(&ledger).unwrap_or_default();
        if lines.lines().count() >= 2 * CALLS as usize {
            break;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    kill(child);

    let out = run_to_end(harness(&["calls", &data_s, &ledger_s, "after", &n]));
    assert!(out.contains("DONE"), "{out}");
    // The operator resumes the parked transfers: each is sent again, once.
    let out = run_to_end(harness(&["calls", &data_s, &ledger_s, "resume", &n]));
    assert!(out.contains("DONE"), "{out}");

    // key -> [(run, redelivered)]
    let mut seen: BTreeMap<String, Vec<(String, u32)>> = BTreeMap::new();
    for line in std::fs::read_to_string(&ledger).unwrap().lines() {
        let parts: Vec<&str> = line.split(' ').collect();
        let [run, _method, key, redelivered] = parts[..] else {
            panic!("bad ledger line {line:?}")
        };
        seen.entry(key.to_string())
            .or_default()
            .push((run.to_string(), redelivered.parse().unwrap()));
    }
    for i in 0..CALLS {
        let mail = seen
            .get(&format!("KillPay/mail-{i}/1"))
            .expect("the mail call ran");
        assert_eq!(
            mail,
            &[("hang".into(), 0), ("after".into(), 1)],
            "mail-{i}: sent again once, same key, counted as redelivered"
        );
        let transfer = seen
            .get(&format!("KillPay/transfer-{i}/1"))
            .expect("the transfer ran");
        assert_eq!(
            transfer,
            &[("hang".into(), 0), ("resume".into(), 1)],
            "transfer-{i}: never sent again without an operator; sent once more when resumed"
        );
        let entries = history(&data, "KillPay", &format!("transfer-{i}")).await;
        let parked = &entries[1];
        assert_eq!(parked.input, StepInput::Redeliver { call_seq: 1 });
        assert!(
            matches!(&parked.output, StepOutput::Quarantine { reason } if reason.contains("may or may not have run")),
            "{parked:?}"
        );
        assert_eq!(entries[2].input, StepInput::Resume);
        assert_eq!(entries.last().unwrap().output, StepOutput::Finish);
    }
}

/// Ledger lines as `(run, method, key, redelivered)`.
fn ledger_lines(path: &Path) -> Vec<(String, String, String, u32)> {
    std::fs::read_to_string(path)
        .unwrap_or_default()
        .lines()
        .map(|line| {
            let parts: Vec<&str> = line.split(' ').collect();
            let [run, method, key, redelivered] = parts[..] else {
                panic!("bad ledger line {line:?}")
            };
            (
                run.to_string(),
                method.to_string(),
                key.to_string(),
                redelivered.parse().unwrap(),
            )
        })
        .collect()
}

/// Waits until the ledger holds `n` calls of `method` noted in run `run`.
fn await_noted(path: &Path, run: &str, method: &str, n: usize) {
    for _ in 0..600 {
        let noted = ledger_lines(path)
            .iter()
            .filter(|(r, m, ..)| r == run && m == method)
            .count();
        if noted >= n {
            return;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    panic!("{n} {method} calls of run {run} were not noted in time");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn compensations_in_flight_at_kills_run_to_completion_last_first() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data");
    let data_s = data.to_str().unwrap().to_string();
    let ledger = dir.path().join("ledger.txt");
    let ledger_s = ledger.to_str().unwrap().to_string();
    let n = TRIPS.to_string();

    for run in ["undo-hang-1", "undo-hang-2"] {
        let mut child = harness(&["trips", &data_s, &ledger_s, run, &n]);
        let _out = await_line(&mut child, "READY");
        await_noted(&ledger, run, "release", TRIPS as usize);
        kill(child);
    }
    let out = run_to_end(harness(&["trips", &data_s, &ledger_s, "after", &n]));
    assert!(out.contains("DONE"), "{out}");

    let lines = ledger_lines(&ledger);
    for i in 0..TRIPS {
        let key = |seq: u64| format!("KillTrip/trip-{i}/{seq}");
        let calls = |method: &str| -> Vec<(String, String, u32)> {
            lines
                .iter()
                .filter(|(_, m, k, _)| m == method && k.starts_with(&key(0)[..key(0).len() - 1]))
                .map(|(r, _, k, d)| (r.clone(), k.clone(), *d))
                .collect()
        };
        let hang = |run: &str, seq, d| (run.to_string(), key(seq), d);
        assert_eq!(
            calls("reserve"),
            [
                hang("undo-hang-1", 1, 0),
                hang("undo-hang-1", 2, 0),
                hang("undo-hang-1", 3, 0)
            ],
            "trip-{i}: three seats reserved once each"
        );
        // Step 4 failed the flow and sent the last reservation's release; the two restarts
        // sent it again (steps 5 and 6, same key); then steps 7 and 8 sent the others.
        assert_eq!(
            calls("release"),
            [
                hang("undo-hang-1", 4, 0),
                hang("undo-hang-2", 4, 1),
                hang("after", 4, 2),
                hang("after", 7, 0),
                hang("after", 8, 0)
            ],
            "trip-{i}: the release in flight at each kill was sent again with the same key; every release completed in the last run"
        );
        let entries = history(&data, "KillTrip", &format!("trip-{i}")).await;
        let undone: Vec<u64> = entries
            .iter()
            .filter_map(|e| match e.output {
                StepOutput::Compensate { registered, .. } => Some(registered),
                _ => None,
            })
            .collect();
        assert_eq!(
            undone,
            [3, 3, 3, 2, 1],
            "trip-{i}: compensations ran last registered first (the first one sent three times)"
        );
        assert_eq!(
            entries.last().unwrap().output,
            StepOutput::Fail {
                reason: "the trip was called off".into(),
                error: None
            }
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn children_running_at_kills_are_attached_again_and_never_started_twice() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data");
    let data_s = data.to_str().unwrap().to_string();
    let ledger = dir.path().join("ledger.txt");
    let ledger_s = ledger.to_str().unwrap().to_string();
    let n = BROODS.to_string();

    // Two children at a time: c0 and c1 start; c0 ends, so c2 starts; c2 ends, so c3 starts.
    // The odd children hang in their print: at the first kill c0 and c2 have ended, c1 and c3
    // run (each with its call in flight). The second run sends both calls again (and the
    // parents' child calls: they attach), and they hang again.
    let noted = [4 * BROODS as usize, 2 * BROODS as usize];
    for (run, noted) in ["brood-hang-1", "brood-hang-2"].into_iter().zip(noted) {
        let mut child = harness(&["broods", &data_s, &ledger_s, run, &n]);
        let _out = await_line(&mut child, "READY");
        await_noted(&ledger, run, "print", noted);
        kill(child);
    }
    let out = run_to_end(harness(&["broods", &data_s, &ledger_s, "after", &n]));
    assert!(out.contains("DONE"), "{out}");

    let lines = ledger_lines(&ledger);
    for i in 0..BROODS {
        for c in 0..4 {
            let id = format!("brood-{i}-c{c}");
            let entries = history(&data, "KillChick", &id).await;
            let starts = entries
                .iter()
                .filter(|e| matches!(e.input, StepInput::Start))
                .count();
            assert_eq!(starts, 1, "{id} was started once: {entries:?}");
            let mut prints: Vec<(String, u32)> = lines
                .iter()
                .filter(|(_, m, k, _)| m == "print" && k.starts_with(&format!("KillChick/{id}/")))
                .map(|(r, _, _, d)| (r.clone(), *d))
                .collect();
            prints.sort();
            let expected: Vec<(String, u32)> = if c % 2 == 1 {
                vec![
                    ("after".into(), 2),
                    ("brood-hang-1".into(), 0),
                    ("brood-hang-2".into(), 1),
                ]
            } else {
                vec![("brood-hang-1".into(), 0)]
            };
            assert_eq!(
                prints, expected,
                "{id}: its print, sent again at each restart while it ran"
            );
        }
        let entries = history(&data, "KillBrood", &format!("brood-{i}")).await;
        let attached = entries
            .iter()
            .filter(|e| matches!(e.input, StepInput::Redeliver { .. }))
            .count();
        assert_eq!(
            attached, 2,
            "brood-{i}: its child calls were sent again at each restart"
        );
        assert_eq!(entries.last().unwrap().output, StepOutput::Finish);
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fan_out_branches_in_flight_at_kills_are_sent_again_and_done_ones_are_not() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data");
    let data_s = data.to_str().unwrap().to_string();
    let ledger = dir.path().join("ledger.txt");
    let ledger_s = ledger.to_str().unwrap().to_string();
    let n = FANS.to_string();

    // Two at a time: pages 0 and 1 go first; 0 returns, so 2 goes; 2 returns, so 3 goes.
    // The odd pages hang: at the first kill 0 and 2 are done, 1 and 3 in flight. The second
    // run sends 1 and 3 again, and they hang again.
    let noted = [4 * FANS as usize, 2 * FANS as usize];
    for (run, noted) in ["fan-hang-1", "fan-hang-2"].into_iter().zip(noted) {
        let mut child = harness(&["fans", &data_s, &ledger_s, run, &n]);
        let _out = await_line(&mut child, "READY");
        await_noted(&ledger, run, "print", noted);
        kill(child);
    }
    let out = run_to_end(harness(&["fans", &data_s, &ledger_s, "after", &n]));
    assert!(out.contains("DONE"), "{out}");

    let lines = ledger_lines(&ledger);
    for i in 0..FANS {
        let prefix = format!("KillFan/fan-{i}/");
        let mut prints: Vec<(String, String, u32)> = lines
            .iter()
            .filter(|(_, m, k, _)| m == "print" && k.starts_with(&prefix))
            .map(|(r, _, k, d)| (r.clone(), k[prefix.len()..].to_string(), *d))
            .collect();
        prints.sort();
        let sent = |run: &str, branch: &str, d| (run.to_string(), branch.to_string(), d);
        assert_eq!(
            prints,
            [
                sent("after", "1.1", 2),
                sent("after", "1.3", 2),
                sent("fan-hang-1", "1.0", 0),
                sent("fan-hang-1", "1.1", 0),
                sent("fan-hang-1", "1.2", 0),
                sent("fan-hang-1", "1.3", 0),
                sent("fan-hang-2", "1.1", 1),
                sent("fan-hang-2", "1.3", 1),
            ],
            "fan-{i}: the branches in flight at each kill were sent again with their keys; the done ones never"
        );
        let entries = history(&data, "KillFan", &format!("fan-{i}")).await;
        let mut applied: Vec<u32> = entries
            .iter()
            .filter_map(|e| match e.input {
                StepInput::BranchOutcome { branch, .. } => Some(branch),
                _ => None,
            })
            .collect();
        applied.sort_unstable();
        assert_eq!(
            applied,
            [0, 1, 2, 3],
            "fan-{i}: each branch's outcome applied exactly once"
        );
        let redelivered = entries
            .iter()
            .filter(|e| e.input == StepInput::Redeliver { call_seq: 1 })
            .count();
        assert_eq!(redelivered, 2, "fan-{i}: one redelivery step per restart");
        assert_eq!(entries.last().unwrap().output, StepOutput::Finish);
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_retry_waiting_out_its_backoff_at_a_kill_keeps_its_time_and_attempt_count() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data");
    let data_s = data.to_str().unwrap().to_string();
    let ledger = dir.path().join("ledger.txt");
    let ledger_s = ledger.to_str().unwrap().to_string();
    let n = RETRIES.to_string();

    let mut child = harness(&["retries", &data_s, &ledger_s, "backoff-kill", &n]);
    let _out = await_line(&mut child, "BACKING_OFF");
    kill(child);
    let out = run_to_end(harness(&["retries", &data_s, &ledger_s, "after", &n]));
    assert!(out.contains("DONE"), "{out}");

    let lines = ledger_lines(&ledger);
    for i in 0..RETRIES {
        let key = format!("KillRetry/retry-{i}/1");
        let calls: Vec<(String, String, u32)> = lines
            .iter()
            .filter(|(_, _, k, _)| *k == key)
            .map(|(r, m, _, d)| (r.clone(), m.clone(), *d))
            .collect();
        let call = |run: &str, m: &str| (run.to_string(), m.to_string(), 0);
        assert_eq!(
            calls,
            [
                call("backoff-kill", "charge#1"),
                call("after", "charge#2"),
                call("after", "charge#3")
            ],
            "retry-{i}: one attempt before the kill, the next two after it, numbered on"
        );
        let entries = history(&data, "KillRetry", &format!("retry-{i}")).await;
        let mut due = Vec::new();
        let mut sent = Vec::new();
        for e in &entries {
            if let StepOutput::Retry {
                attempt, due_ms, ..
            } = e.output
            {
                due.push((attempt, due_ms));
            }
            if let StepInput::Timer { due_ms } = e.input {
                assert!(
                    e.at_ms >= due_ms,
                    "retry-{i}: attempt sent at {} before its backoff ended at {due_ms}",
                    e.at_ms
                );
                assert!(
                    matches!(e.output, StepOutput::Drive { call_seq: 1, .. }),
                    "retry-{i}: the timer sends the call again: {:?}",
                    e.output
                );
                sent.push(due_ms);
            }
        }
        let attempts: Vec<u32> = due.iter().map(|d| d.0).collect();
        assert_eq!(attempts, [1, 2], "retry-{i}: two failed attempts recorded");
        let due: Vec<u64> = due.iter().map(|d| d.1).collect();
        assert_eq!(sent, due, "retry-{i}: each backoff timer fired once");
        assert_eq!(entries.last().unwrap().output, StepOutput::Finish);
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_cancellation_at_a_kill_is_applied_once_and_its_compensations_complete() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data");
    let data_s = data.to_str().unwrap().to_string();
    let ledger = dir.path().join("ledger.txt");
    let ledger_s = ledger.to_str().unwrap().to_string();
    let n = HOLDS.to_string();

    let mut child = harness(&["cancels", &data_s, &ledger_s, "undo-hang-1", &n]);
    let _out = await_line(&mut child, "READY");
    await_noted(&ledger, "undo-hang-1", "release", HOLDS as usize);
    kill(child);
    let out = run_to_end(harness(&["cancels", &data_s, &ledger_s, "after", &n]));
    assert!(out.contains("DONE"), "{out}");

    let lines = ledger_lines(&ledger);
    for i in 0..HOLDS {
        let prefix = format!("KillHold/hold-{i}/");
        let releases: Vec<(String, String, u32)> = lines
            .iter()
            .filter(|(_, m, k, _)| m == "release" && k.starts_with(&prefix))
            .map(|(r, _, k, d)| (r.clone(), k[prefix.len()..].to_string(), *d))
            .collect();
        let release = |run: &str, seq: &str, d| (run.to_string(), seq.to_string(), d);
        // Steps 1 to 3 reserved, 4 waited; step 5 cancelled and sent the last seat's
        // release; the restart sent it again (step 6, same key), then steps 7 and 8 released
        // the others.
        assert_eq!(
            releases,
            [
                release("undo-hang-1", "5", 0),
                release("after", "5", 1),
                release("after", "7", 0),
                release("after", "8", 0)
            ],
            "hold-{i}: the release in flight at the kill was sent again with the same key"
        );
        let entries = history(&data, "KillHold", &format!("hold-{i}")).await;
        let cancels = entries
            .iter()
            .filter(|e| matches!(e.input, StepInput::Cancel { .. }))
            .count();
        assert_eq!(cancels, 1, "hold-{i}: cancelled once, though asked twice");
        assert_eq!(
            entries.last().unwrap().output,
            StepOutput::Cancelled {
                reason: "called off".into()
            }
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn start_or_impulse_across_a_kill_starts_each_instance_once_and_applies_each_impulse_once() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data");
    let data_s = data.to_str().unwrap().to_string();
    let n = NOTES.to_string();
    let mut child = harness(&["notes", &data_s, &n]);
    // Killed midway: after the first 50 are sent, before the last.
    let mut out = await_line(&mut child, "SENT 50");
    kill(child);
    let mut rest = String::new();
    std::io::Read::read_to_string(&mut out, &mut rest).unwrap();
    assert!(!rest.contains("SENT 200"), "killed before the end: {rest}");
    let out = run_to_end(harness(&["notes", &data_s, &n]));
    assert!(out.contains("DONE"), "{out}");

    for k in 0..5u32 {
        let id = format!("notes-{k}");
        let entries = history(&data, "KillNotes", &id).await;
        assert!(
            matches!(entries[0].input, StepInput::StartWith { .. }),
            "{id}: started with its first number: {:?}",
            entries[0].input
        );
        let starts = entries
            .iter()
            .filter(|e| matches!(e.input, StepInput::Start | StepInput::StartWith { .. }))
            .count();
        assert_eq!(starts, 1, "{id}: started once");
        let mut ids: Vec<String> = entries
            .iter()
            .filter_map(|e| match &e.input {
                StepInput::StartWith { id, .. } | StepInput::Impulse { id, .. } => Some(id.clone()),
                _ => None,
            })
            .collect();
        ids.sort();
        let mut expected: Vec<String> = (0..NOTES)
            .filter(|i| i % 5 == k)
            .map(|i| format!("req-{i}"))
            .collect();
        expected.sort();
        assert_eq!(ids, expected, "{id}: every number applied exactly once");
    }
}
