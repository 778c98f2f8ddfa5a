#![allow(missing_docs)] // test-local flows and drivers
//! Fan-out and join, through the public API: `Command::fan_out(calls)` sends several driver
//! calls at once (at most `.parallel(n)` in flight); `.all(each, then)` applies every
//! outcome as its own step and joins after the last; `.first(..)` continues with the first
//! success and abandons the rest. Each branch has its own idempotency key; branches may
//! register compensations; impulses are applied while branches are in flight. The kill
//! test (a crash with branches in flight) is in tests/kill.rs.
//!
//! (Over 600 lines: one test per rule of fan-out and join, sharing the flows and the
//! recording driver; split in files, each would copy them.)

use std::collections::BTreeSet;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use flowwire::prelude::*;
use flowwire::storage::{StepInput, StepOutput};
use flowwire::{Error, EventKind};
use tokio::sync::Semaphore;

#[derive(Debug, Clone, Serialize, Deserialize, thiserror::Error)]
#[error("refused: {0}")]
pub struct Refused(String);

#[driver(timeout = "20s", retries = 0)]
pub trait Press {
    async fn page(&self, section: u32) -> Result<String, Refused>;
    async fn mirror(&self, mirror: u32) -> Result<String, Refused>;
    async fn reserve(&self, seat: u32) -> Result<u32, Refused>;
    async fn release(&self, seat: u32) -> Result<(), Refused>;
}

/// How the press behaves, and what it saw.
#[derive(Default)]
pub struct Desk {
    /// Arguments `mirror` and `reserve` refuse.
    refuse: BTreeSet<u32>,
    /// Calls started (each takes a permit before it returns, when gated).
    started: u32,
    /// Calls in flight now, and the most ever.
    in_flight: u32,
    most: u32,
    /// What ran: `method(arg)` with its idempotency key and branch.
    log: Vec<(String, String, Option<u32>)>,
}

#[derive(Clone, Default)]
pub struct Shop {
    desk: Arc<Mutex<Desk>>,
    /// When set, every call waits for a permit before it returns.
    gate: Option<Arc<Semaphore>>,
}

impl Shop {
    fn gated() -> Self {
        Self {
            gate: Some(Arc::new(Semaphore::new(0))),
            ..Self::default()
        }
    }
    fn refusing(args: &[u32]) -> Self {
        let shop = Self::default();
        shop.desk.lock().unwrap().refuse = args.iter().copied().collect();
        shop
    }
    fn calls(&self) -> Vec<String> {
        let d = self.desk.lock().unwrap();
        d.log.iter().map(|(c, _, _)| c.clone()).collect()
    }
    fn started(&self) -> u32 {
        self.desk.lock().unwrap().started
    }
    fn release_calls(&self, n: usize) {
        self.gate.as_ref().unwrap().add_permits(n);
    }
    /// Waits (bounded) until `n` calls have started.
    async fn until_started(&self, n: u32) {
        for _ in 0..2_000 {
            if self.started() >= n {
                return;
            }
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        panic!("{n} calls never started (started: {})", self.started());
    }
    async fn serve(&self, what: String, arg: u32) -> bool {
        let ctx = CallContext::current().expect("a call context");
        {
            let mut d = self.desk.lock().unwrap();
            d.started += 1;
            d.in_flight += 1;
            d.most = d.most.max(d.in_flight);
            d.log.push((what, ctx.idempotency_key(), ctx.branch()));
        }
        if let Some(gate) = &self.gate {
            gate.acquire().await.unwrap().forget();
        }
        let mut d = self.desk.lock().unwrap();
        d.in_flight -= 1;
        !d.refuse.contains(&arg)
    }
}

#[driver]
impl Press for Shop {
    async fn page(&self, section: u32) -> Result<String, Refused> {
        self.serve(format!("page({section})"), section).await;
        Ok(format!("<p>{section}</p>"))
    }
    async fn mirror(&self, mirror: u32) -> Result<String, Refused> {
        if self.serve(format!("mirror({mirror})"), mirror).await {
            Ok(format!("file from mirror {mirror}"))
        } else {
            Err(Refused(format!("mirror {mirror} is down")))
        }
    }
    async fn reserve(&self, seat: u32) -> Result<u32, Refused> {
        if self.serve(format!("reserve({seat})"), seat).await {
            Ok(seat)
        } else {
            Err(Refused(format!("seat {seat} is taken")))
        }
    }
    async fn release(&self, seat: u32) -> Result<(), Refused> {
        self.serve(format!("release({seat})"), seat).await;
        Ok(())
    }
}

#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct ReportState {
    sections: Vec<u32>,
    parallel: usize,
    pages: Vec<Option<String>>,
    joins: u32,
    notes: Vec<String>,
    /// The continuation panics on this branch's outcome.
    fragile: Option<usize>,
}

/// Renders every section (at most `parallel` at once), then assembles.
#[flow]
pub struct Report {
    #[link]
    state: ReportState,
    #[link]
    press: impl Press,
}

#[flow]
impl Report {
    #[wire]
    fn run(&mut self) -> Command<Self> {
        if self.state.joins > 0 {
            return Command::finish();
        }
        Command::fan_out(self.state.sections.iter().map(|s| self.press.page(*s)))
            .parallel(self.state.parallel)
            .all(
                |f, i, page| {
                    assert!(f.state.fragile != Some(i), "page {i} is torn");
                    f.state.pages.resize(f.state.sections.len(), None);
                    f.state.pages[i] = Some(page?);
                    Ok(())
                },
                |f| {
                    f.state.joins += 1;
                    Ok(())
                },
            )
    }

    #[impulse]
    fn note(&mut self, text: String) {
        self.state.notes.push(text);
    }
}

#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct FetchState {
    mirrors: Vec<u32>,
    parallel: usize,
    winner: Option<(usize, Result<String, String>)>,
}

/// Fetches a file from the first mirror that answers.
#[flow]
pub struct Fetch {
    #[link]
    state: FetchState,
    #[link]
    press: impl Press,
}

#[flow]
impl Fetch {
    #[wire]
    fn run(&mut self) -> Command<Self> {
        if self.state.winner.is_some() {
            return Command::finish();
        }
        Command::fan_out(self.state.mirrors.iter().map(|m| self.press.mirror(*m)))
            .parallel(self.state.parallel)
            .first(|f, i, file| {
                f.state.winner = Some((i, file.map_err(|e| e.to_string())));
                Ok(())
            })
    }
}

#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct SeatsState {
    seats: Vec<u32>,
    reserved: Vec<u32>,
    done: bool,
}

/// Reserves every seat, one at a time; a refusal fails the flow, which releases the seats
/// reserved so far.
#[flow]
pub struct Seats {
    #[link]
    state: SeatsState,
    #[link]
    press: impl Press,
}

#[flow]
impl Seats {
    #[wire]
    fn run(&mut self) -> Command<Self> {
        if self.state.done {
            return Command::finish();
        }
        let press = &self.press;
        Command::fan_out(
            self.state
                .seats
                .iter()
                .map(|s| (press.reserve(*s), press.release(*s))),
        )
        .parallel(1)
        .all(
            |f, _, seat| {
                f.state.reserved.push(seat?);
                Ok(())
            },
            |f| {
                f.state.done = true;
                Ok(())
            },
        )
    }
}

async fn engine(shop: &Shop) -> Engine {
    Engine::builder()
        .in_memory()
        .flow::<Report>()
        .flow::<Fetch>()
        .flow::<Seats>()
        .driver(shop.clone())
        .start()
        .await
        .unwrap()
}

fn report(sections: u32, parallel: usize) -> ReportState {
    ReportState {
        sections: (0..sections).collect(),
        parallel,
        ..ReportState::default()
    }
}

#[tokio::test]
async fn all_applies_every_outcome_in_its_slot_and_joins_once() {
    let shop = Shop::default();
    let engine = engine(&shop).await;
    let h = engine.start::<Report>("r1", report(5, 8)).await.unwrap();
    assert_eq!(h.finished().await.unwrap(), Ended::Finished);

    let state = h.state().await.unwrap();
    let pages: Vec<String> = state.pages.into_iter().map(Option::unwrap).collect();
    assert_eq!(
        pages,
        (0..5).map(|s| format!("<p>{s}</p>")).collect::<Vec<_>>(),
        "each outcome lands at its branch's index, whatever order they came back in"
    );
    assert_eq!(state.joins, 1, "the join runs once, after the last outcome");
    let mut calls = shop.calls();
    calls.sort();
    assert_eq!(
        calls,
        (0..5).map(|s| format!("page({s})")).collect::<Vec<_>>()
    );

    // Step 1 issued the fan-out; steps 2..=6 applied one outcome each; the last joined and
    // finished.
    let history = engine.history::<Report>("r1", 0, 100).await.unwrap();
    let steps = &history.steps;
    assert_eq!(
        steps[0].output,
        StepOutput::Fan {
            call_seq: 1,
            done: 0,
            branches: 5
        }
    );
    let branches: BTreeSet<u32> = steps[1..]
        .iter()
        .map(|s| match s.input {
            StepInput::BranchOutcome {
                call_seq: 1,
                branch,
                ok: true,
            } => branch,
            ref other => panic!("a branch outcome, not {other:?}"),
        })
        .collect();
    assert_eq!(branches, (0..5).collect());
    assert_eq!(steps.len(), 6);
    assert_eq!(steps[5].output, StepOutput::Finish);
}

#[tokio::test]
async fn each_branch_has_its_own_idempotency_key() {
    let shop = Shop::default();
    let engine = engine(&shop).await;
    let h = engine.start::<Report>("r2", report(3, 8)).await.unwrap();
    h.finished().await.unwrap();
    let mut keys: Vec<(String, Option<u32>)> = shop
        .desk
        .lock()
        .unwrap()
        .log
        .iter()
        .map(|(_, k, b)| (k.clone(), *b))
        .collect();
    keys.sort();
    assert_eq!(
        keys,
        [
            ("Report/r2/1.0".to_string(), Some(0)),
            ("Report/r2/1.1".to_string(), Some(1)),
            ("Report/r2/1.2".to_string(), Some(2)),
        ],
        "`flow/instance/step.branch`: stable per branch, distinct across branches"
    );
}

#[tokio::test]
async fn at_most_parallel_calls_are_in_flight_and_the_next_goes_when_one_is_done() {
    let shop = Shop::gated();
    let engine = engine(&shop).await;
    let mut events = engine.events();
    let h = engine.start::<Report>("r3", report(6, 2)).await.unwrap();

    shop.until_started(2).await;
    // No outcome was applied yet, so nothing else can have been sent.
    let sent = |events: &mut flowwire::Events| {
        let mut out = Vec::new();
        while let Some(Ok(e)) = events.try_next() {
            if let EventKind::Drive { branch, .. } = e.kind {
                out.push(branch.unwrap());
            }
        }
        out
    };
    assert_eq!(
        sent(&mut events),
        [0, 1],
        "the first two branches go at once"
    );
    assert_eq!(shop.started(), 2);

    shop.release_calls(1);
    shop.until_started(3).await;
    shop.release_calls(16);
    assert_eq!(h.finished().await.unwrap(), Ended::Finished);
    assert_eq!(shop.started(), 6);
    assert_eq!(
        shop.desk.lock().unwrap().most,
        2,
        "never more than two calls in flight"
    );
    let state = h.state().await.unwrap();
    assert!(state.pages.iter().all(Option::is_some));
}

#[tokio::test]
async fn an_impulse_during_a_fan_out_is_applied_and_keeps_the_branches_in_flight() {
    let shop = Shop::gated();
    let engine = engine(&shop).await;
    let h = engine.start::<Report>("r4", report(3, 8)).await.unwrap();
    shop.until_started(3).await;

    h.impulse(ReportImpulse::Note {
        text: "rush".into(),
    })
    .await
    .unwrap();
    shop.release_calls(3);
    assert_eq!(h.finished().await.unwrap(), Ended::Finished);

    let state = h.state().await.unwrap();
    assert_eq!(state.notes, ["rush"]);
    assert!(state.pages.iter().all(Option::is_some));
    assert_eq!(
        shop.started(),
        3,
        "the wire returned the same fan-out after the impulse: nothing was sent again"
    );
}

#[tokio::test]
async fn first_continues_with_the_first_success_and_sends_no_more() {
    // One at a time: mirror 7 is down, 8 answers, 9 is never asked.
    let shop = Shop::refusing(&[7]);
    let engine = engine(&shop).await;
    let state = FetchState {
        mirrors: vec![7, 8, 9],
        parallel: 1,
        ..FetchState::default()
    };
    let h = engine.start::<Fetch>("f1", state).await.unwrap();
    assert_eq!(h.finished().await.unwrap(), Ended::Finished);
    assert_eq!(
        h.state().await.unwrap().winner,
        Some((1, Ok("file from mirror 8".to_string())))
    );
    assert_eq!(shop.calls(), ["mirror(7)", "mirror(8)"]);
}

#[tokio::test]
async fn first_receives_the_last_failure_when_every_branch_fails() {
    let shop = Shop::refusing(&[1, 2]);
    let engine = engine(&shop).await;
    let state = FetchState {
        mirrors: vec![1, 2],
        parallel: 1,
        ..FetchState::default()
    };
    let h = engine.start::<Fetch>("f2", state).await.unwrap();
    assert_eq!(h.finished().await.unwrap(), Ended::Finished);
    let (index, result) = h.state().await.unwrap().winner.unwrap();
    assert_eq!(index, 1);
    assert!(
        result
            .as_ref()
            .is_err_and(|e| e.contains("mirror 2 is down")),
        "{result:?}"
    );
}

#[tokio::test]
async fn a_failing_branch_fails_the_flow_and_undoes_the_branches_that_succeeded() {
    let shop = Shop::refusing(&[12]);
    let engine = engine(&shop).await;
    let state = SeatsState {
        seats: vec![10, 11, 12, 13],
        ..SeatsState::default()
    };
    let h = engine.start::<Seats>("s1", state).await.unwrap();
    let ended = h.finished().await.unwrap();
    assert!(
        matches!(&ended, Ended::Failed { reason, .. } if reason.contains("seat 12 is taken")),
        "{ended:?}"
    );
    assert_eq!(
        shop.calls(),
        [
            "reserve(10)",
            "reserve(11)",
            "reserve(12)",
            "release(11)",
            "release(10)"
        ],
        "seat 13 was never reserved; the seats reserved are released last first"
    );
}

#[tokio::test]
async fn a_fan_out_without_calls_joins_at_once() {
    let shop = Shop::default();
    let engine = engine(&shop).await;
    let h = engine.start::<Report>("r5", report(0, 4)).await.unwrap();
    assert_eq!(h.finished().await.unwrap(), Ended::Finished);
    assert_eq!(h.state().await.unwrap().joins, 1);
    assert!(shop.calls().is_empty());
}

#[tokio::test]
async fn first_over_no_calls_parks_the_instance_with_a_reason() {
    let shop = Shop::default();
    let engine = engine(&shop).await;
    let h = engine
        .start::<Fetch>("f3", FetchState::default())
        .await
        .unwrap();
    let err = h.finished().await.unwrap_err();
    assert!(
        matches!(&err, Error::Quarantined { reason, .. } if reason.contains("without calls")),
        "{err}"
    );
}

#[tokio::test]
async fn a_fan_out_above_the_branch_bound_parks_the_instance_with_a_reason() {
    let shop = Shop::default();
    let engine = engine(&shop).await;
    let h = engine
        .start::<Report>("r6", report(1_025, 8))
        .await
        .unwrap();
    let err = h.finished().await.unwrap_err();
    assert!(
        matches!(&err, Error::Quarantined { reason, .. } if reason.contains("1025 calls") && reason.contains("at most 1024")),
        "{err}"
    );
    assert!(shop.calls().is_empty(), "nothing was sent");
}

#[tokio::test]
async fn a_panicking_branch_continuation_parks_and_resume_sends_that_branch_again() {
    let shop = Shop::default();
    let engine = engine(&shop).await;
    let state = ReportState {
        fragile: Some(1),
        ..report(3, 1)
    };
    let h = engine.start::<Report>("r7", state).await.unwrap();
    let err = h.finished().await.unwrap_err();
    assert!(
        matches!(&err, Error::Quarantined { reason, .. } if reason.contains("branch 1") && reason.contains("page 1 is torn")),
        "{err}"
    );
    let parked = engine
        .parked_instance::<Report>("r7")
        .await
        .unwrap()
        .unwrap();
    assert_eq!(parked.branches, ["Press.page #1"], "{parked:?}");

    engine
        .patch::<Report>("r7", |s| s.fragile = None)
        .await
        .unwrap();
    engine.resume::<Report>("r7").await.unwrap();
    assert_eq!(h.finished().await.unwrap(), Ended::Finished);
    assert_eq!(
        shop.calls(),
        ["page(0)", "page(1)", "page(1)", "page(2)"],
        "only the branch whose outcome was not applied is sent again"
    );
    let keys: Vec<String> = shop
        .desk
        .lock()
        .unwrap()
        .log
        .iter()
        .map(|(_, k, _)| k.clone())
        .collect();
    assert_eq!(keys[1], keys[2], "with its own key");
}

/// Busy on the first `busy` attempts of each call (a transient error), then answers.
#[driver(retries = 3, backoff = "20ms", max_backoff = "20ms", timeout = "5s")]
pub trait Depot {
    async fn ship(&self, parcel: u32, busy: u32) -> Result<u32, Refused>;
}

/// One call the depot saw: (parcel, attempt, branch).
type Shipped = (u32, u32, Option<u32>);

/// What the depot saw, in order.
#[derive(Clone, Default)]
pub struct Dock(Arc<Mutex<Vec<Shipped>>>);

#[driver]
impl Depot for Dock {
    async fn ship(&self, parcel: u32, busy: u32) -> Result<u32, Refused> {
        let ctx = CallContext::current().expect("a call context");
        self.0
            .lock()
            .unwrap()
            .push((parcel, ctx.attempt(), ctx.branch()));
        if ctx.attempt() <= busy {
            return Err(Refused("the depot is busy".into()));
        }
        Ok(parcel)
    }
}

#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct ShipState {
    /// How many attempts each parcel's depot is busy for.
    busy: Vec<u32>,
    parallel: usize,
    shipped: Vec<u32>,
    done: bool,
}

/// Ships every parcel, `parallel` at a time.
#[flow]
pub struct Shipment {
    #[link]
    state: ShipState,
    #[link]
    depot: impl Depot,
}

#[flow]
impl Shipment {
    #[wire]
    fn run(&mut self) -> Command<Self> {
        if self.state.done {
            return Command::finish();
        }
        let depot = self.depot;
        Command::fan_out(
            (0u32..)
                .zip(&self.state.busy)
                .map(|(p, busy)| depot.ship(p, *busy)),
        )
        .parallel(self.state.parallel)
        .all(
            |f, _, r| {
                f.state
                    .shipped
                    .push(r.map_err(|e| Failure::msg(e.to_string()))?);
                Ok(())
            },
            |f| {
                f.state.done = true;
                Ok(())
            },
        )
    }
}

#[tokio::test]
async fn a_failed_branch_is_retried_after_its_backoff_keeping_its_place_under_the_bound() {
    let dock = Dock::default();
    let engine = Engine::builder()
        .in_memory()
        .flow::<Shipment>()
        .driver(dock.clone())
        .start()
        .await
        .unwrap();
    let state = ShipState {
        busy: vec![2, 0, 0],
        parallel: 2,
        ..ShipState::default()
    };
    let h = engine.start::<Shipment>("s1", state).await.unwrap();
    assert_eq!(h.finished().await.unwrap(), Ended::Finished);
    let mut shipped = h.state().await.unwrap().shipped;
    shipped.sort_unstable();
    assert_eq!(shipped, [0, 1, 2]);
    let seen = dock.0.lock().unwrap().clone();
    let parcel0: Vec<(u32, Option<u32>)> = seen
        .iter()
        .filter(|s| s.0 == 0)
        .map(|s| (s.1, s.2))
        .collect();
    assert_eq!(
        parcel0,
        [(1, Some(0)), (2, Some(0)), (3, Some(0))],
        "branch 0: attempts 1 and 2 failed, 3 shipped"
    );
    let page = engine.history::<Shipment>("s1", 0, 100).await.unwrap();
    let retries: Vec<(Option<u32>, u32)> = page
        .steps
        .iter()
        .filter_map(|s| match s.output {
            StepOutput::Retry {
                branch, attempt, ..
            } => Some((branch, attempt)),
            _ => None,
        })
        .collect();
    assert_eq!(retries, [(Some(0), 1), (Some(0), 2)]);
}

#[tokio::test]
async fn a_branch_waiting_out_its_backoff_keeps_its_slot() {
    let dock = Dock::default();
    let engine = Engine::builder()
        .in_memory()
        .flow::<Shipment>()
        .driver(dock.clone())
        .start()
        .await
        .unwrap();
    let state = ShipState {
        busy: vec![1, 0],
        parallel: 1,
        ..ShipState::default()
    };
    let h = engine.start::<Shipment>("s2", state).await.unwrap();
    assert_eq!(h.finished().await.unwrap(), Ended::Finished);
    let seen: Vec<(u32, u32)> = dock.0.lock().unwrap().iter().map(|s| (s.0, s.1)).collect();
    assert_eq!(
        seen,
        [(0, 1), (0, 2), (1, 1)],
        "with one slot, parcel 1 waits for parcel 0's retry (parcel, attempt)"
    );
}
