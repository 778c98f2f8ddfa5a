#![allow(missing_docs)] // test-local flows and drivers
//! The step core alone (issue 20), in the style of quinn-proto's tests: instances are driven
//! through the core's entry points — start, outcome, impulse, timer, restart from the last
//! committed record — with the time passed in, by plain `#[test]` functions: no engine, no
//! store, no async runtime, no clock. Each test states what the history must be.
//!
//! `Sim` plays the runner and the store: it commits every step the core returns (the
//! record the instance adopts is the one a store would hold), keeps the history, and
//! holds the calls sent until the test answers them.
//!
//! (Over 600 lines: one test per behaviour of the core, all on the same `Sim`, flows and
//! drivers; split in files, each would copy them.)

use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use flowwire::Flow;
use flowwire::core::{Instance, Operation, Outgoing, Rejected, Scratch, Step};
use flowwire::prelude::*;
use flowwire::storage::codec;
use flowwire::storage::{InstanceKey, Record, Status, StepInput, StepOutput};

const LIMIT: usize = 1 << 20;

/// One committed step, as the history keeps it.
#[derive(Debug, Clone, PartialEq)]
struct Entry {
    seq: u64,
    input: StepInput,
    output: StepOutput,
    at_ms: u64,
}

/// An instance, the record its store holds, its history and the calls it sent.
struct Sim<F: Flow> {
    inst: Instance<F>,
    scratch: Scratch,
    history: Vec<Entry>,
    /// Calls sent and not answered yet.
    sent: Vec<Outgoing>,
    now_ms: u64,
}

impl<F: Flow> Sim<F> {
    fn start(id: &str, state: F::State, now_ms: u64) -> Self {
        let mut scratch = Scratch::default();
        let key = InstanceKey::new(F::NAME, id);
        let (inst, step) = Instance::start(key, state, LIMIT, now_ms, &mut scratch);
        let mut sim = Self {
            inst,
            scratch,
            history: Vec::new(),
            sent: Vec::new(),
            now_ms,
        };
        sim.commit(step);
        sim
    }

    /// Commits a step: the instance adopts its record, the history gets its entry, its
    /// calls go out.
    fn commit(&mut self, step: Step) {
        self.inst.commit(&step);
        let d = &step.draft;
        self.history.push(Entry {
            seq: d.record.seq,
            input: d.input.clone(),
            output: d.output.clone(),
            at_ms: d.at_ms,
        });
        self.sent.extend(step.dispatch);
    }

    /// Answers the call sent at `seq` (branch `branch` of a fan-out) with `reply`: `true`
    /// if the instance took it (a step was committed).
    fn answer<T: serde::Serialize>(&mut self, seq: u64, branch: Option<u32>, reply: &T) -> bool {
        let mut out = Vec::new();
        codec::encode_raw(reply, &mut out).unwrap();
        let reply = bytes::Bytes::from(out);
        self.sent
            .retain(|o| !(o.call.seq == seq && o.branch == branch));
        let step = self
            .inst
            .outcome(seq, branch, Ok(&reply), self.now_ms, &mut self.scratch);
        step.map(|s| self.commit(s)).is_some()
    }

    /// Answers the call sent at `seq` with a failed attempt `reply` that its policy retries
    /// after `delay_ms`: `true` if the instance took it.
    fn fail_attempt<T: serde::Serialize>(
        &mut self,
        seq: u64,
        branch: Option<u32>,
        reply: &T,
        delay_ms: u64,
    ) -> bool {
        let mut out = Vec::new();
        codec::encode_raw(reply, &mut out).unwrap();
        let reply = bytes::Bytes::from(out);
        self.sent
            .retain(|o| !(o.call.seq == seq && o.branch == branch));
        let step = self.inst.retry(
            seq,
            branch,
            Ok(&reply),
            delay_ms,
            self.now_ms,
            &mut self.scratch,
        );
        step.map(|s| self.commit(s)).is_some()
    }

    fn impulse(&mut self, id: &str, impulse: F::Impulse) -> Result<(), Rejected> {
        let step = self
            .inst
            .impulse(id.into(), impulse, self.now_ms, &mut self.scratch)?;
        self.commit(step);
        Ok(())
    }

    /// Moves the clock on and fires the timer due then, if the instance has it armed.
    fn fire_at(&mut self, due_ms: u64) -> bool {
        self.now_ms = due_ms;
        let step = self.inst.fire(due_ms, self.now_ms, &mut self.scratch);
        step.map(|s| self.commit(s)).is_some()
    }

    /// A crash and a restart: the instance is rebuilt from the last committed record
    /// alone (its continuations are gone), and its call in flight is sent again.
    fn restart(&mut self) {
        let record = self.inst.record().flat();
        *self = rebuild::<F, F>(self, record);
    }

    /// Rebuilds the instance as flow `G` (another version of it) from `record`.
    fn restart_from<G: Flow>(&self, record: Record) -> Sim<G> {
        rebuild::<F, G>(self, record)
    }

    fn inputs(&self) -> Vec<StepInput> {
        self.history.iter().map(|e| e.input.clone()).collect()
    }

    fn outputs(&self) -> Vec<StepOutput> {
        self.history.iter().map(|e| e.output.clone()).collect()
    }

    fn state(&self) -> F::State {
        codec::decode_raw(&self.inst.record().state.flat(), LIMIT).unwrap()
    }
}

/// A `Sim<G>` rebuilt from `record`, with `from`'s history and time: the first step of
/// the rebuilt instance (a parking, or the redelivery of its call in flight) is committed.
fn rebuild<F: Flow, G: Flow>(from: &Sim<F>, record: Record) -> Sim<G> {
    let mut scratch = Scratch::default();
    let key = from.inst.key().clone();
    let version = from.inst.version();
    let (inst, first) =
        Instance::<G>::recover(key, record, version, LIMIT, from.now_ms, &mut scratch).unwrap();
    let mut sim = Sim {
        inst,
        scratch,
        history: from.history.clone(),
        sent: Vec::new(),
        now_ms: from.now_ms,
    };
    if let Some(step) = first {
        sim.commit(step);
    } else if let Some(step) = sim
        .inst
        .redeliver(|_, _| false, sim.now_ms, &mut sim.scratch)
    {
        sim.commit(step);
    }
    sim
}

// ---------------------------------------------------------------------------------------
// An order: reserve (undone by a release), wait for a confirmation, charge, finish.

#[derive(Debug, Clone, Serialize, Deserialize, thiserror::Error)]
#[error("declined")]
pub struct Declined;

#[driver]
pub trait Shop {
    async fn reserve(&self, item: u32) -> Result<u32, Declined>;
    async fn release(&self, seat: u32) -> Result<(), Declined>;
    async fn charge(&self, seat: u32) -> Result<(), Declined>;
}

#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct OrderState {
    item: u32,
    seat: Option<u32>,
    confirmed: bool,
    charged: bool,
}

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
        let Some(seat) = s.seat else {
            return Command::drive(self.shop.reserve(s.item))
                .compensate(self.shop.release(s.item))
                .then(|f, r| {
                    f.state.seat = Some(r?);
                    Ok(())
                });
        };
        if !s.confirmed {
            return Command::wait();
        }
        if !s.charged {
            return Command::drive(self.shop.charge(seat)).then(|f, r| {
                r?;
                f.state.charged = true;
                Ok(())
            });
        }
        Command::finish()
    }

    #[impulse]
    fn confirm(&mut self) {
        self.state.confirmed = true;
    }
}

fn order() -> OrderState {
    OrderState {
        item: 7,
        ..OrderState::default()
    }
}

#[test]
fn an_order_runs_drive_outcome_impulse_drive_outcome_to_its_end() {
    let mut o = Sim::<Order>::start("o", order(), 1_000);
    assert_eq!(o.sent.len(), 1, "the reservation goes out with the start");
    assert!(o.answer(1, None, &Ok::<u32, Declined>(42)));
    assert_eq!(o.inst.status(), &Status::Waiting);
    o.now_ms = 2_000;
    o.impulse("c-1", OrderImpulse::Confirm {}).unwrap();
    assert!(o.answer(3, None, &Ok::<(), Declined>(())));

    assert_eq!(
        o.inputs(),
        [
            StepInput::Start,
            StepInput::Outcome {
                call_seq: 1,
                ok: true
            },
            StepInput::Impulse {
                id: "c-1".into(),
                name: "confirm".into()
            },
            StepInput::Outcome {
                call_seq: 3,
                ok: true
            },
        ]
    );
    assert_eq!(
        o.outputs(),
        [
            StepOutput::Drive {
                call_seq: 1,
                link: 0,
                method: 0
            },
            StepOutput::Wait,
            StepOutput::Drive {
                call_seq: 3,
                link: 0,
                method: 2
            },
            StepOutput::Finish,
        ]
    );
    assert_eq!(
        o.history
            .iter()
            .map(|e| (e.seq, e.at_ms))
            .collect::<Vec<_>>(),
        [(1, 1_000), (2, 1_000), (3, 2_000), (4, 2_000)],
        "steps are numbered in order and stamped with the time each entry point was given"
    );
    assert_eq!(o.inst.status(), &Status::Finished);
    assert!(o.sent.is_empty());
}

#[test]
fn an_outcome_answered_twice_or_for_another_call_writes_nothing() {
    let mut o = Sim::<Order>::start("o", order(), 0);
    assert!(o.answer(1, None, &Ok::<u32, Declined>(42)));
    assert!(!o.answer(1, None, &Ok::<u32, Declined>(42)), "a duplicate");
    assert!(!o.answer(9, None, &Ok::<u32, Declined>(1)), "no such call");
    assert_eq!(o.history.len(), 2);
}

#[test]
fn an_outcome_taken_moves_its_reply_into_its_step_and_one_not_applied_keeps_it() {
    let mut o = Sim::<Order>::start("o", order(), 0);
    let mut out = Vec::new();
    codec::encode_raw(&Ok::<u32, Declined>(42), &mut out).unwrap();
    let sent = bytes::Bytes::from(out);

    let mut reply = Ok(sent.clone());
    let none = o.inst.take_outcome(9, None, &mut reply, 0, &mut o.scratch);
    assert!(none.is_none(), "no call was sent at step 9");
    assert_eq!(
        reply,
        Ok(sent.clone()),
        "an outcome not applied keeps its reply"
    );

    let step = o
        .inst
        .take_outcome(1, None, &mut reply, 0, &mut o.scratch)
        .expect("the reservation is awaited");
    assert_eq!(
        step.draft.payload.as_ref(),
        Some(&sent),
        "the step records the reply as its input's payload"
    );
    assert_eq!(
        reply,
        Ok(bytes::Bytes::new()),
        "and the outcome holds it no more"
    );
    o.commit(step);
    assert_eq!(o.inst.status(), &Status::Waiting, "the reply was applied");
}

#[test]
fn a_restart_from_the_last_record_sends_the_call_in_flight_again_and_goes_on() {
    let mut o = Sim::<Order>::start("o", order(), 0);
    o.restart();
    assert_eq!(
        o.history.last().map(|e| &e.input),
        Some(&StepInput::Redeliver { call_seq: 1 })
    );
    assert_eq!(o.sent.len(), 1, "the reservation is sent again");
    assert_eq!(o.sent[0].call.redelivered, 1);
    // Its continuation was lost with the crash; it is rederived from the wire.
    assert!(o.answer(1, None, &Ok::<u32, Declined>(42)));
    assert_eq!(o.state().seat, Some(42));
    o.restart();
    o.impulse("c-1", OrderImpulse::Confirm {}).unwrap();
    assert!(o.answer(4, None, &Ok::<(), Declined>(())));
    assert_eq!(o.inst.status(), &Status::Finished);
}

#[test]
fn a_failed_charge_runs_the_compensation_of_the_reservation_then_fails_the_flow() {
    let mut o = Sim::<Order>::start("o", order(), 0);
    assert!(o.answer(1, None, &Ok::<u32, Declined>(42)));
    o.impulse("c-1", OrderImpulse::Confirm {}).unwrap();
    assert!(o.answer(3, None, &Err::<(), Declined>(Declined)));
    assert_eq!(o.inst.status(), &Status::Compensating);
    assert!(matches!(
        o.history.last().map(|e| &e.output),
        Some(StepOutput::Compensate {
            registered: 1,
            method: 1,
            ..
        })
    ));
    let release = o.sent.last().unwrap().call.seq;
    // A restart while the compensation is in flight sends it again.
    o.restart();
    assert_eq!(o.inst.status(), &Status::Compensating);
    assert!(o.answer(release, None, &Ok::<(), Declined>(())));
    assert!(
        matches!(o.inst.status(), Status::Failed { reason } if reason.contains("declined")),
        "{:?}",
        o.inst.status()
    );
    assert!(matches!(
        o.history.last().map(|e| &e.output),
        Some(StepOutput::Fail { .. })
    ));
}

#[test]
fn an_impulse_after_the_end_is_rejected() {
    let mut o = Sim::<Order>::start("o", order(), 0);
    assert!(o.answer(1, None, &Ok::<u32, Declined>(1)));
    o.impulse("c-1", OrderImpulse::Confirm {}).unwrap();
    assert!(o.answer(3, None, &Ok::<(), Declined>(())));
    assert_eq!(
        o.impulse("c-2", OrderImpulse::Confirm {}),
        Err(Rejected::Ended("finished"))
    );
    assert_eq!(o.history.len(), 4);
}

// ---------------------------------------------------------------------------------------
// A report: pages fetched by a fan-out, joined after the last.

#[driver]
pub trait Press {
    async fn page(&self, section: u32) -> Result<String, Declined>;
}

#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct ReportState {
    sections: Vec<u32>,
    pages: Vec<Option<String>>,
    joined: bool,
}

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
        if self.state.joined {
            return Command::finish();
        }
        Command::fan_out(self.state.sections.iter().map(|s| self.press.page(*s)))
            .parallel(2)
            .all(
                |f, i, page| {
                    f.state.pages.resize(f.state.sections.len(), None);
                    f.state.pages[i] = Some(page?);
                    Ok(())
                },
                |f| {
                    f.state.joined = true;
                    Ok(())
                },
            )
    }
}

#[test]
fn a_fan_out_keeps_at_most_parallel_branches_out_and_joins_after_the_last_even_across_a_restart() {
    let mut r = Sim::<Report>::start(
        "r",
        ReportState {
            sections: vec![10, 20, 30],
            ..ReportState::default()
        },
        0,
    );
    let out: Vec<Option<u32>> = r.sent.iter().map(|o| o.branch).collect();
    assert_eq!(out, [Some(0), Some(1)], "two of three branches go out");
    assert!(r.answer(1, Some(1), &Ok::<String, Declined>("twenty".into())));
    assert_eq!(
        r.sent.iter().map(|o| o.branch).collect::<Vec<_>>(),
        [Some(0), Some(2)],
        "the third goes out when the second is back"
    );
    // A crash with two branches in flight: both are sent again, the one done is not.
    r.restart();
    let resent: Vec<Option<u32>> = r.sent.iter().map(|o| o.branch).collect();
    assert_eq!(resent, [Some(0), Some(2)]);
    assert!(r.answer(1, Some(2), &Ok::<String, Declined>("thirty".into())));
    assert!(r.answer(1, Some(0), &Ok::<String, Declined>("ten".into())));
    assert_eq!(r.inst.status(), &Status::Finished);
    assert_eq!(
        r.state().pages,
        [
            Some("ten".into()),
            Some("twenty".into()),
            Some("thirty".into())
        ]
    );
    let branch_steps = r
        .inputs()
        .iter()
        .filter(|i| matches!(i, StepInput::BranchOutcome { .. }))
        .count();
    assert_eq!(
        branch_steps, 3,
        "each branch's outcome is a step of its own"
    );
}

// ---------------------------------------------------------------------------------------
// Migrations: version 2 upgrades what version 1 wrote; version 3 does not read version 1.

#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct InvoiceV1 {
    cents: u64,
    paid: bool,
}

#[flow(name = "Invoice", version = 1)]
pub struct InvoiceOne {
    #[link]
    state: InvoiceV1,
}

#[flow]
impl InvoiceOne {
    #[wire]
    fn run(&mut self) -> Command<Self> {
        if self.state.paid {
            Command::finish()
        } else {
            Command::wait()
        }
    }
    #[impulse]
    fn pay(&mut self) {
        self.state.paid = true;
    }
}

#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct InvoiceV2 {
    cents: u64,
    currency: String,
    paid: bool,
}

fn upgrade(old: InvoiceV1) -> InvoiceV2 {
    InvoiceV2 {
        cents: old.cents,
        currency: "EUR".into(),
        paid: old.paid,
    }
}

#[flow(name = "Invoice", version = 2, migrate = upgrade)]
pub struct InvoiceTwo {
    #[link]
    state: InvoiceV2,
}

#[flow]
impl InvoiceTwo {
    #[wire]
    fn run(&mut self) -> Command<Self> {
        if self.state.paid {
            Command::finish()
        } else {
            Command::wait()
        }
    }
    #[impulse]
    fn pay(&mut self) {
        self.state.paid = true;
    }
}

fn from_two(old: InvoiceV2) -> InvoiceV2 {
    old
}

#[flow(name = "Invoice", version = 3, migrate = from_two)]
pub struct InvoiceThree {
    #[link]
    state: InvoiceV2,
}

#[flow]
impl InvoiceThree {
    #[wire]
    fn run(&mut self) -> Command<Self> {
        if self.state.paid {
            Command::finish()
        } else {
            Command::wait()
        }
    }
}

#[test]
fn a_record_of_the_previous_version_is_migrated_and_goes_on_under_the_new_one() {
    let one = Sim::<InvoiceOne>::start(
        "i",
        InvoiceV1 {
            cents: 500,
            paid: false,
        },
        0,
    );
    let record = one.inst.record().flat();
    assert_eq!(record.flow_version, 1);
    let mut two: Sim<InvoiceTwo> = one.restart_from(record);
    assert_eq!(
        two.history.len(),
        1,
        "a migration writes no step of its own"
    );
    assert_eq!(
        two.state(),
        InvoiceV2 {
            cents: 500,
            currency: "EUR".into(),
            paid: false
        }
    );
    two.impulse("p-1", InvoiceTwoImpulse::Pay {}).unwrap();
    assert_eq!(two.inst.record().flow_version, 2);
    assert_eq!(two.inst.status(), &Status::Finished);
}

#[test]
fn a_record_two_versions_behind_is_parked_naming_both() {
    let one = Sim::<InvoiceOne>::start("i", InvoiceV1::default(), 0);
    let record = one.inst.record().flat();
    // Version 3 cannot decode version 1's state as its own: the engine parks such a
    // record with `park_unreadable`; one whose state reads as it is parks at recovery.
    let key = one.inst.key().clone();
    let mut scratch = Scratch::default();
    let rebuilt = Instance::<InvoiceThree>::recover(key, record, 1, LIMIT, 0, &mut scratch);
    let reason = match rebuilt {
        Ok((_, Some(step))) => match &step.draft.record.status {
            Status::Quarantined { reason } => reason.clone(),
            other => panic!("parked, not {other:?}"),
        },
        Ok((_, None)) => panic!("run on code it was not written for"),
        Err(e) => {
            let step = Instance::<InvoiceThree>::park_unreadable(
                one.inst.key().clone(),
                &one.inst.record().flat(),
                1,
                &e,
                0,
            );
            match step.draft.record.status {
                Status::Quarantined { reason } => reason,
                other => panic!("parked, not {other:?}"),
            }
        }
    };
    assert!(
        reason.contains("version 1") && reason.contains("version 3"),
        "{reason}"
    );
}

// ---------------------------------------------------------------------------------------
// A wire that is not deterministic: what it returns depends on something outside the state.

static MOOD: AtomicBool = AtomicBool::new(false);

#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct MoodyState {
    done: bool,
}

#[flow]
pub struct Moody {
    #[link]
    state: MoodyState,
    #[link]
    shop: impl Shop,
}

#[flow]
impl Moody {
    #[wire]
    fn run(&mut self) -> Command<Self> {
        if self.state.done {
            return Command::finish();
        }
        // Reads a global: the wire's answer changes across a restart.
        let call = if MOOD.load(Ordering::SeqCst) {
            self.shop.charge(1)
        } else {
            self.shop.release(1)
        };
        Command::drive(call).then(|f, r| {
            r?;
            f.state.done = true;
            Ok(())
        })
    }
}

#[test]
fn a_wire_that_returns_another_call_after_a_restart_is_quarantined_not_run() {
    let mut m = Sim::<Moody>::start("m", MoodyState::default(), 0);
    assert!(matches!(
        m.history[0].output,
        StepOutput::Drive { method: 1, .. }
    ));
    m.restart();
    MOOD.store(true, Ordering::SeqCst);
    // The outcome of the call in flight meets a wire that now returns another call.
    assert!(m.answer(1, None, &Ok::<(), Declined>(())));
    MOOD.store(false, Ordering::SeqCst);
    match m.inst.status() {
        Status::Quarantined { reason } => {
            assert!(reason.contains("non-deterministic wire"), "{reason}");
        }
        other => panic!("quarantined, not {other:?}"),
    }
    assert!(!m.state().done, "the continuation did not run");
    // An operator resumes it: the call in flight is sent again.
    let step = m
        .inst
        .operate(Operation::Resume, m.now_ms, &mut m.scratch)
        .unwrap();
    m.commit(step);
    assert_eq!(m.inst.status(), &Status::Running);
    assert!(m.answer(1, None, &Ok::<(), Declined>(())));
    assert_eq!(m.inst.status(), &Status::Finished);
}

// ---------------------------------------------------------------------------------------
// A nap: a durable timer, armed relative to the time the step was given.

#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct NapState {
    woke: bool,
}

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
        Command::sleep(Duration::from_hours(1)).then(|f| {
            f.state.woke = true;
            Ok(())
        })
    }
}

#[test]
fn a_timer_is_armed_from_the_time_given_and_fires_once_across_a_restart() {
    let mut n = Sim::<Nap>::start("n", NapState::default(), 5_000);
    let due = 5_000 + 3_600_000;
    assert_eq!(n.history[0].output, StepOutput::Sleep { due_ms: due });
    assert_eq!(n.inst.record().timer.map(|t| t.due_ms), Some(due));
    assert!(!n.fire_at(due - 1), "only the timer armed fires");
    n.restart();
    assert!(
        n.fire_at(due),
        "its continuation is rederived after a restart"
    );
    assert!(!n.fire_at(due), "and fires once");
    assert_eq!(n.inst.status(), &Status::Finished);
    assert_eq!(
        n.history.last().map(|e| (&e.input, e.at_ms)),
        Some((&StepInput::Timer { due_ms: due }, due))
    );
}

#[test]
fn a_failed_attempt_waits_out_its_backoff_in_the_record_across_a_restart() {
    let mut o = Sim::<Order>::start("o", order(), 1_000);
    assert!(o.fail_attempt(1, None, &Err::<u32, Declined>(Declined), 500));
    assert!(
        !o.inst.record().has_call_out(),
        "nothing is out while it waits"
    );
    assert!(o.sent.is_empty());
    assert!(
        !o.fail_attempt(1, None, &Err::<u32, Declined>(Declined), 500),
        "a duplicate of the failed attempt writes nothing"
    );
    // A crash: the restart sends nothing; the wait and the count are in the record.
    o.restart();
    assert!(
        o.sent.is_empty(),
        "a restart does not cut the backoff short"
    );
    assert_eq!(o.inst.record().timer.map(|t| t.due_ms), Some(1_500));
    assert!(o.fire_at(1_500));
    assert_eq!(o.sent.len(), 1, "the timer sends the next attempt");
    assert_eq!(o.sent[0].call.attempts, 1, "one failed attempt before it");
    assert_eq!(o.sent[0].call.redelivered, 0);
    assert!(o.answer(1, None, &Ok::<u32, Declined>(42)));
    assert_eq!(o.state().seat, Some(42));
    assert_eq!(
        o.outputs()[..4],
        [
            StepOutput::Drive {
                call_seq: 1,
                link: 0,
                method: 0
            },
            StepOutput::Retry {
                call_seq: 1,
                branch: None,
                link: 0,
                method: 0,
                attempt: 1,
                due_ms: 1_500,
                fault: None
            },
            StepOutput::Drive {
                call_seq: 1,
                link: 0,
                method: 0
            },
            StepOutput::Wait,
        ]
    );
}

#[test]
fn an_impulse_during_a_backoff_keeps_the_call_and_its_timer() {
    let mut o = Sim::<Order>::start("o", order(), 0);
    assert!(o.fail_attempt(1, None, &Err::<u32, Declined>(Declined), 100));
    o.impulse("c-1", OrderImpulse::Confirm {}).unwrap();
    assert!(o.sent.is_empty(), "the call is kept, not sent");
    assert_eq!(o.inst.record().timer.map(|t| t.due_ms), Some(100));
    assert!(o.fire_at(100));
    assert_eq!(o.sent.len(), 1);
}

// ---------------------------------------------------------------------------------------
// A hold whose release is built from the reservation's reply.

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct Hold {
    id: String,
}

#[driver]
pub trait Stock {
    async fn hold(&self, item: u32) -> Result<Hold, Declined>;
    async fn release(&self, hold: String) -> Result<(), Declined>;
    async fn pay(&self, item: u32) -> Result<(), Declined>;
}

#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct HoldState {
    item: u32,
    hold: Option<Hold>,
}

#[flow]
pub struct Purchase {
    #[link]
    state: HoldState,
    #[link]
    stock: impl Stock,
}

#[flow]
impl Purchase {
    #[wire]
    fn run(&mut self) -> Command<Self> {
        if self.state.hold.is_none() {
            return Command::drive(self.stock.hold(self.state.item))
                .compensate_with(|hold| StockProxy.release(hold.id.clone()))
                .then(|f, r| {
                    f.state.hold = Some(r?);
                    Ok(())
                });
        }
        Command::drive(self.stock.pay(self.state.item)).then(|_, r| {
            r?;
            Ok(())
        })
    }
}

#[test]
fn a_compensation_built_from_a_reply_is_persisted_with_its_step_across_a_restart() {
    let mut p = Sim::<Purchase>::start(
        "p",
        HoldState {
            item: 3,
            hold: None,
        },
        0,
    );
    let hold = Hold { id: "H-77".into() };
    assert!(p.answer(1, None, &Ok::<Hold, Declined>(hold.clone())));
    let registered = &p.inst.record().compensations;
    assert_eq!(registered.len(), 1, "registered with the outcome's step");
    let undo: StockCall = codec::decode_raw(&registered[0].call, LIMIT).unwrap();
    assert!(
        matches!(&undo, StockCall::Release { hold } if hold == "H-77"),
        "built from the reply: {undo:?}"
    );
    // A crash: the continuation and the closure are gone; the record holds the call.
    p.restart();
    assert!(p.answer(2, None, &Err::<(), Declined>(Declined)));
    assert_eq!(p.inst.status(), &Status::Compensating);
    assert_eq!(p.sent.len(), 1);
    let sent: StockCall = codec::decode_raw(&p.sent[0].call.call, LIMIT).unwrap();
    assert!(
        matches!(&sent, StockCall::Release { hold } if hold == "H-77"),
        "{sent:?}"
    );
}

#[test]
fn a_typed_failure_is_kept_while_compensations_run_across_a_restart() {
    let mut o = Sim::<Order>::start("o", order(), 0);
    assert!(o.answer(1, None, &Ok::<u32, Declined>(42)));
    o.impulse("c-1", OrderImpulse::Confirm {}).unwrap();
    assert!(o.answer(3, None, &Err::<(), Declined>(Declined)));
    assert_eq!(o.inst.status(), &Status::Compensating);
    let kept = o
        .inst
        .record()
        .error
        .clone()
        .expect("the driver's error, typed");
    assert_eq!(kept.type_name, std::any::type_name::<Declined>());
    o.restart();
    let release = o.sent[0].call.seq;
    assert!(o.answer(release, None, &Ok::<(), Declined>(())));
    assert_eq!(
        o.inst.status(),
        &Status::Failed {
            reason: "driver error: declined".into()
        }
    );
    assert_eq!(o.inst.record().error.as_ref(), Some(&kept));
    assert_eq!(
        o.outputs().last(),
        Some(&StepOutput::Fail {
            reason: "driver error: declined".into(),
            error: Some(kept)
        })
    );
}
