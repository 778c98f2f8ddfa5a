#![allow(missing_docs)] // test-local flows
//! Durable timers, through the public API: a sleep fires its continuation and then the
//! wire; a wait with a timeout ends by impulse or by time, never both; a time in the past
//! fires at once; a sleeping instance is not held in memory; timers survive a restart and
//! fire when the engine comes back after they were due.

use std::time::{Duration, SystemTime, UNIX_EPOCH};

use flowwire::prelude::*;
use flowwire::{EventKind, Events};

#[derive(Debug, Default, Clone, Serialize, Deserialize)]
pub struct NapState {
    nap_ms: u64,
    naps_wanted: u32,
    naps: u32,
    notes: u32,
}

/// Sleeps `naps_wanted` times, `nap_ms` each, then finishes.
#[flow]
pub struct Nap {
    #[link]
    state: NapState,
}

#[flow]
impl Nap {
    #[impulse]
    fn note(&mut self) {
        self.state.notes += 1;
    }

    #[probe]
    fn naps(&self) -> u32 {
        self.state.naps
    }

    #[wire]
    fn run(&mut self) -> Command<Self> {
        if self.state.naps < self.state.naps_wanted {
            Command::sleep(Duration::from_millis(self.state.nap_ms)).then(|f| {
                f.state.naps += 1;
                Ok(())
            })
        } else {
            Command::finish()
        }
    }
}

#[derive(Debug, Default, Clone, Serialize, Deserialize)]
pub struct ApprovalState {
    timeout_ms: u64,
    approved: bool,
    expired: bool,
}

/// Waits for approval with a timeout.
#[flow]
pub struct Approval {
    #[link]
    state: ApprovalState,
}

#[flow]
impl Approval {
    #[impulse]
    fn approve(&mut self) {
        self.state.approved = true;
    }

    #[wire]
    fn run(&mut self) -> Command<Self> {
        if self.state.approved {
            Command::finish()
        } else if self.state.expired {
            Command::fail("nobody approved in time")
        } else {
            Command::wait_timeout(Duration::from_millis(self.state.timeout_ms)).then(|f| {
                f.state.expired = true;
                Ok(())
            })
        }
    }
}

#[derive(Debug, Default, Clone, Serialize, Deserialize)]
pub struct DeadlineState {
    at_unix_ms: u64,
    fired: bool,
}

/// Sleeps until an absolute time.
#[flow]
pub struct Deadline {
    #[link]
    state: DeadlineState,
}

#[flow]
impl Deadline {
    #[wire]
    fn run(&mut self) -> Command<Self> {
        if self.state.fired {
            return Command::finish();
        }
        let at = UNIX_EPOCH + Duration::from_millis(self.state.at_unix_ms);
        Command::until(at).then(|f| {
            f.state.fired = true;
            Ok(())
        })
    }
}

async fn engine() -> Engine {
    Engine::builder()
        .in_memory()
        .flow::<Nap>()
        .flow::<Approval>()
        .flow::<Deadline>()
        .start()
        .await
        .unwrap()
}

/// The events of one instance until it ends (bounded by a generous deadline).
async fn events_of(events: &mut Events, id: &str) -> Vec<EventKind> {
    let mut out = Vec::new();
    let deadline = tokio::time::Instant::now() + Duration::from_secs(20);
    loop {
        let next = tokio::time::timeout_at(deadline, events.next()).await;
        let Ok(Some(Ok(e))) = next else {
            panic!("the instance did not end: {out:?}")
        };
        if &*e.id != id {
            continue;
        }
        let end = matches!(
            e.kind,
            EventKind::Finished | EventKind::Failed { .. } | EventKind::Quarantined { .. }
        );
        out.push(e.kind);
        if end {
            return out;
        }
    }
}

fn nap(nap_ms: u64, naps_wanted: u32) -> NapState {
    NapState {
        nap_ms,
        naps_wanted,
        ..NapState::default()
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_sleep_runs_its_continuation_when_it_fires_then_the_wire() {
    let engine = engine().await;
    let mut events = engine.events();
    let h = engine.start::<Nap>("twice", nap(30, 2)).await.unwrap();
    assert_eq!(h.finished().await.unwrap(), Ended::Finished);
    assert_eq!(
        h.naps().await.unwrap(),
        2,
        "each timer's continuation ran once"
    );
    let kinds = events_of(&mut events, "twice").await;
    let names: Vec<&str> = kinds
        .iter()
        .map(|k| match k {
            EventKind::Started => "started",
            EventKind::Sleeping { .. } => "sleeping",
            EventKind::Woke { .. } => "woke",
            EventKind::Finished => "finished",
            _ => "other",
        })
        .collect();
    assert_eq!(
        names,
        [
            "started", "sleeping", "woke", "sleeping", "woke", "finished"
        ]
    );
    let (EventKind::Sleeping { until_ms }, EventKind::Woke { due_ms }) = (&kinds[1], &kinds[2])
    else {
        unreachable!()
    };
    assert_eq!(
        until_ms, due_ms,
        "the timer fired for the time it was armed"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_sleeping_instance_lives_in_the_store_only() {
    let engine = engine().await;
    let h = engine
        .start::<Nap>("long", nap(3_600_000, 1))
        .await
        .unwrap();
    assert_eq!(
        engine.resident::<Nap>().await.unwrap(),
        0,
        "no memory for a sleeper"
    );
    assert_eq!(h.naps().await.unwrap(), 0, "probes still answer");
    h.note().await.unwrap();
    assert_eq!(h.state().await.unwrap().notes, 1, "impulses still apply");
    assert_eq!(engine.resident::<Nap>().await.unwrap(), 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_impulse_while_sleeping_keeps_the_timer_where_it_was() {
    let engine = engine().await;
    let mut events = engine.events();
    let h = engine.start::<Nap>("noted", nap(300, 1)).await.unwrap();
    h.note().await.unwrap();
    assert_eq!(h.finished().await.unwrap(), Ended::Finished);
    let sleeps: Vec<u64> = events_of(&mut events, "noted")
        .await
        .into_iter()
        .filter_map(|k| match k {
            EventKind::Sleeping { until_ms } => Some(until_ms),
            _ => None,
        })
        .collect();
    assert_eq!(sleeps.len(), 2, "the impulse's step re-announces the sleep");
    assert_eq!(sleeps[0], sleeps[1], "the same sleep is not re-armed");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_wait_times_out_when_no_impulse_comes() {
    let engine = engine().await;
    let state = ApprovalState {
        timeout_ms: 50,
        ..ApprovalState::default()
    };
    let h = engine.start::<Approval>("late", state).await.unwrap();
    assert_eq!(
        h.finished().await.unwrap(),
        Ended::Failed {
            reason: "nobody approved in time".into(),
            error: None
        }
    );
    let err = h.approve().await.unwrap_err();
    assert!(
        matches!(err, flowwire::Error::Ended { .. }),
        "too late: {err}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_impulse_before_the_timeout_wins_and_the_timeout_never_fires() {
    let engine = engine().await;
    let mut events = engine.events();
    let state = ApprovalState {
        timeout_ms: 200,
        ..ApprovalState::default()
    };
    let h = engine.start::<Approval>("quick", state).await.unwrap();
    h.approve().await.unwrap();
    assert_eq!(h.finished().await.unwrap(), Ended::Finished);
    let kinds = events_of(&mut events, "quick").await;
    assert!(
        matches!(kinds[1], EventKind::Waiting { until_ms: Some(_) }),
        "{kinds:?}"
    );
    // Past the timeout: nothing more happens to the instance.
    tokio::time::sleep(Duration::from_millis(400)).await;
    while let Some(Ok(e)) = events.try_next() {
        assert_ne!(
            &*e.id, "quick",
            "the timeout fired after the approval: {e:?}"
        );
    }
    assert!(!h.state().await.unwrap().expired);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_time_in_the_past_fires_at_once() {
    let engine = engine().await;
    let state = DeadlineState {
        at_unix_ms: 1_000,
        fired: false,
    };
    let h = engine.start::<Deadline>("1970", state).await.unwrap();
    assert_eq!(h.finished().await.unwrap(), Ended::Finished);
    assert!(h.state().await.unwrap().fired);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn timers_survive_a_restart_and_fire_when_the_engine_comes_back_late() {
    let dir = tempfile::tempdir().unwrap();
    let open = || async {
        Engine::builder()
            .data_dir(dir.path())
            .flow::<Nap>()
            .flow::<Deadline>()
            .start()
            .await
            .unwrap()
    };
    let engine = open().await;
    #[allow(clippy::disallowed_methods)] // a wall-clock deadline for the flow's state
    let soon = SystemTime::now().duration_since(UNIX_EPOCH).unwrap() + Duration::from_millis(200);
    for i in 0..20 {
        engine
            .start::<Nap>(format!("nap-{i}"), nap(100 + 10 * i, 1))
            .await
            .unwrap();
    }
    engine
        .start::<Deadline>(
            "soon",
            DeadlineState {
                at_unix_ms: u64::try_from(soon.as_millis()).unwrap(),
                fired: false,
            },
        )
        .await
        .unwrap();
    engine.shutdown().await;
    drop(engine);
    // Every timer comes due while no engine runs.
    tokio::time::sleep(Duration::from_millis(500)).await;
    let engine = open().await;
    for i in 0..20 {
        let h = engine.handle::<Nap>(format!("nap-{i}")).await.unwrap();
        let ended = tokio::time::timeout(Duration::from_secs(20), h.finished()).await;
        assert_eq!(ended.unwrap().unwrap(), Ended::Finished, "nap-{i}");
        assert_eq!(h.naps().await.unwrap(), 1, "nap-{i} woke exactly once");
    }
    let h = engine.handle::<Deadline>("soon").await.unwrap();
    let ended = tokio::time::timeout(Duration::from_secs(20), h.finished()).await;
    assert_eq!(ended.unwrap().unwrap(), Ended::Finished);
}
