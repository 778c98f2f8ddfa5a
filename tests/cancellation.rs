#![allow(missing_docs)] // test-local flows and drivers
//! Cancellation, through the public API: `Handle::cancel`, `Engine::cancel` and
//! `Engine::cancel_by_key` interrupt whatever an instance waits for — an impulse, a sleep,
//! a call in flight, a retry's backoff — run its registered compensations last first, and
//! end it as `Ended::Cancelled`. The late outcome of the call it abandoned is recorded in
//! history, never applied. A cancellation is applied once: cancelling again is `Ok` and
//! writes nothing. The kill test (a crash while the compensations of a cancellation run) is
//! in tests/kill.rs.

use std::sync::{Arc, Mutex};
use std::time::Duration;

use flowwire::prelude::*;
use flowwire::storage::{StepInput, StepOutput};
use flowwire::{Error, EventKind};
use tokio::sync::Semaphore;

#[derive(Debug, Clone, Serialize, Deserialize, thiserror::Error)]
#[error("refused: {0}")]
pub struct Refused(String);

#[driver(timeout = "20s", retries = 2, backoff = "10s", max_backoff = "10s")]
pub trait Desk {
    async fn hold(&self, seat: u32) -> Result<u32, Refused>;
    async fn release(&self, seat: u32) -> Result<(), Refused>;
    /// Waits for the test to open the gate; busy (a transient error) when told so.
    async fn pay(&self, cents: u64) -> Result<u64, Refused>;
}

#[derive(Clone)]
pub struct Office {
    log: Arc<Mutex<Vec<String>>>,
    gate: Arc<Semaphore>,
    busy: Arc<std::sync::atomic::AtomicBool>,
}

impl Default for Office {
    fn default() -> Self {
        Self {
            log: Arc::default(),
            gate: Arc::new(Semaphore::new(0)),
            busy: Arc::default(),
        }
    }
}

impl Office {
    fn log(&self) -> Vec<String> {
        self.log.lock().unwrap().clone()
    }
    fn note(&self, what: String) {
        self.log.lock().unwrap().push(what);
    }
    async fn until_logged(&self, what: &str) {
        for _ in 0..2_000 {
            if self.log().iter().any(|l| l == what) {
                return;
            }
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        panic!("{what} never happened: {:?}", self.log());
    }
}

#[driver]
impl Desk for Office {
    async fn hold(&self, seat: u32) -> Result<u32, Refused> {
        self.note(format!("hold({seat})"));
        Ok(seat)
    }
    async fn release(&self, seat: u32) -> Result<(), Refused> {
        self.note(format!("release({seat})"));
        Ok(())
    }
    async fn pay(&self, cents: u64) -> Result<u64, Refused> {
        self.note(format!("pay({cents})"));
        if self.busy.load(std::sync::atomic::Ordering::SeqCst) {
            return Err(Refused("busy".into()));
        }
        self.gate.acquire().await.unwrap().forget();
        self.note(format!("paid({cents})"));
        Ok(cents)
    }
}

/// What the booking does after holding two seats.
#[derive(Debug, Clone, Copy, Default, Serialize, Deserialize, PartialEq, Eq)]
pub enum Then {
    /// Waits for an impulse.
    #[default]
    Wait,
    /// Sleeps for an hour.
    Sleep,
    /// Pays (a call that waits for the test).
    Pay,
}

#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct BookingState {
    order: String,
    then: Then,
    held: Vec<u32>,
    paid: Option<u64>,
    done: bool,
}

#[flow]
pub struct Booking {
    #[link]
    state: BookingState,
    #[link]
    desk: impl Desk,
}

#[flow]
impl Booking {
    #[wire]
    fn run(&mut self) -> Command<Self> {
        let next = u32::try_from(self.state.held.len()).unwrap_or(u32::MAX);
        if next < 2 {
            return Command::drive(self.desk.hold(next))
                .compensate_with(|seat| DeskProxy.release(*seat))
                .then(|f, r| {
                    f.state.held.push(r?);
                    Ok(())
                });
        }
        if self.state.done {
            return Command::finish();
        }
        match self.state.then {
            Then::Wait => Command::wait(),
            Then::Sleep => Command::sleep(Duration::from_hours(1)).then(|f| {
                f.state.done = true;
                Ok(())
            }),
            Then::Pay if self.state.paid.is_none() => {
                Command::drive(self.desk.pay(500)).then(|f, r| {
                    f.state.paid = Some(r?);
                    Ok(())
                })
            }
            Then::Pay => Command::finish(),
        }
    }

    #[impulse]
    fn confirm(&mut self) {
        self.state.done = true;
    }

    #[correlate]
    fn order(&self) -> &str {
        &self.state.order
    }
}

async fn engine(office: &Office) -> Engine {
    Engine::builder()
        .in_memory()
        .flow::<Booking>()
        .driver(office.clone())
        .start()
        .await
        .unwrap()
}

fn booking(order: &str, then: Then) -> BookingState {
    BookingState {
        order: order.into(),
        then,
        ..BookingState::default()
    }
}

/// Waits (bounded) until the instance holds both seats.
async fn until_held(h: &BookingHandle) {
    for _ in 0..2_000 {
        if h.state().await.unwrap().held.len() == 2 {
            return;
        }
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    panic!("the seats were never held");
}

fn outputs(page: &flowwire::HistoryPage) -> Vec<StepOutput> {
    page.steps.iter().map(|s| s.output.clone()).collect()
}

#[tokio::test]
async fn a_waiting_instance_cancelled_runs_its_compensations_and_ends_cancelled() {
    let office = Office::default();
    let engine = engine(&office).await;
    let mut events = engine.events();
    let h = engine
        .start::<Booking>("b1", booking("o-1", Then::Wait))
        .await
        .unwrap();
    until_held(&h).await;
    Handle::cancel(&h, "the customer called it off")
        .await
        .unwrap();
    assert_eq!(
        h.finished().await.unwrap(),
        Ended::Cancelled {
            reason: "the customer called it off".into()
        }
    );
    assert_eq!(
        office.log(),
        ["hold(0)", "hold(1)", "release(1)", "release(0)"],
        "the seats are released last held first"
    );
    let page = engine.history::<Booking>("b1", 0, 100).await.unwrap();
    let cancel = page
        .steps
        .iter()
        .find(|s| matches!(s.input, StepInput::Cancel { .. }))
        .expect("the cancellation is a step");
    assert!(matches!(cancel.output, StepOutput::Compensate { .. }));
    assert_eq!(
        outputs(&page).last(),
        Some(&StepOutput::Cancelled {
            reason: "the customer called it off".into()
        })
    );
    let mut cancelled = false;
    while let Some(Ok(e)) = events.try_next() {
        cancelled |= matches!(e.kind, EventKind::Cancelled { .. });
    }
    assert!(cancelled, "a cancelled event");
    let err = h.confirm().await.unwrap_err();
    assert!(
        matches!(
            err,
            Error::Ended {
                status: "cancelled",
                ..
            }
        ),
        "{err}"
    );
}

#[tokio::test]
async fn cancelling_again_is_ok_and_writes_nothing() {
    let office = Office::default();
    let engine = engine(&office).await;
    let h = engine
        .start::<Booking>("b2", booking("o-2", Then::Wait))
        .await
        .unwrap();
    until_held(&h).await;
    Handle::cancel(&h, "first").await.unwrap();
    h.finished().await.unwrap();
    let before = engine.history::<Booking>("b2", 0, 100).await.unwrap();
    Handle::cancel(&h, "second").await.unwrap();
    engine.cancel::<Booking>("b2", "third").await.unwrap();
    let after = engine.history::<Booking>("b2", 0, 100).await.unwrap();
    assert_eq!(before, after, "no step written");
    assert_eq!(
        h.finished().await.unwrap(),
        Ended::Cancelled {
            reason: "first".into()
        }
    );
}

#[tokio::test]
async fn a_finished_instance_is_not_cancelled() {
    let office = Office::default();
    let engine = engine(&office).await;
    let h = engine
        .start::<Booking>("b3", booking("o-3", Then::Wait))
        .await
        .unwrap();
    until_held(&h).await;
    h.confirm().await.unwrap();
    assert_eq!(h.finished().await.unwrap(), Ended::Finished);
    let err = Handle::cancel(&h, "too late").await.unwrap_err();
    assert!(
        matches!(
            err,
            Error::Ended {
                status: "finished",
                ..
            }
        ),
        "{err}"
    );
    let err = engine.cancel::<Booking>("nobody", "x").await.unwrap_err();
    assert!(matches!(err, Error::NotFound { .. }), "{err}");
}

#[tokio::test]
async fn a_sleeping_instance_is_cancelled_at_once() {
    let office = Office::default();
    let engine = engine(&office).await;
    let h = engine
        .start::<Booking>("b4", booking("o-4", Then::Sleep))
        .await
        .unwrap();
    until_held(&h).await;
    engine
        .cancel_by_key::<Booking>("o-4", "not needed")
        .await
        .unwrap();
    let ended = tokio::time::timeout(Duration::from_secs(5), h.finished())
        .await
        .expect("not after the hour's sleep")
        .unwrap();
    assert_eq!(
        ended,
        Ended::Cancelled {
            reason: "not needed".into()
        }
    );
    let err = engine
        .cancel_by_key::<Booking>("o-4", "again")
        .await
        .unwrap_err();
    assert!(
        matches!(err, Error::NoInstanceForKey { .. }),
        "a cancelled instance leaves the key: {err}"
    );
}

#[tokio::test]
async fn the_late_outcome_of_a_call_in_flight_is_recorded_not_applied() {
    let office = Office::default();
    let engine = engine(&office).await;
    let h = engine
        .start::<Booking>("b5", booking("o-5", Then::Pay))
        .await
        .unwrap();
    office.until_logged("pay(500)").await;
    Handle::cancel(&h, "stop").await.unwrap();
    assert!(matches!(
        h.finished().await.unwrap(),
        Ended::Cancelled { .. }
    ));
    // The payment answers now.
    office.gate.add_permits(1);
    office.until_logged("paid(500)").await;
    let mut late = None;
    for _ in 0..2_000 {
        let page = engine.history::<Booking>("b5", 0, 100).await.unwrap();
        late = page
            .steps
            .iter()
            .find(|s| matches!(s.output, StepOutput::Abandoned { .. }))
            .cloned();
        if late.is_some() {
            break;
        }
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    let late = late.expect("the late outcome is recorded");
    assert!(
        matches!(late.input, StepInput::Outcome { ok: true, .. }),
        "{late:?}"
    );
    assert_eq!(
        h.state().await.unwrap().paid,
        None,
        "the continuation did not run"
    );
    assert!(matches!(
        h.finished().await.unwrap(),
        Ended::Cancelled { .. }
    ));
}

#[tokio::test]
async fn a_call_waiting_out_its_backoff_is_cancelled_without_its_next_attempt() {
    let office = Office::default();
    office.busy.store(true, std::sync::atomic::Ordering::SeqCst);
    let engine = engine(&office).await;
    let mut events = engine.events();
    let h = engine
        .start::<Booking>("b6", booking("o-6", Then::Pay))
        .await
        .unwrap();
    // The first attempt fails; the next is 5-10 s away.
    loop {
        let e = tokio::time::timeout(Duration::from_secs(5), events.next())
            .await
            .unwrap()
            .unwrap()
            .unwrap();
        if matches!(e.kind, EventKind::Retry { .. }) {
            break;
        }
    }
    Handle::cancel(&h, "never mind").await.unwrap();
    let ended = tokio::time::timeout(Duration::from_secs(5), h.finished())
        .await
        .expect("the backoff does not hold the cancellation")
        .unwrap();
    assert!(matches!(ended, Ended::Cancelled { .. }));
    assert_eq!(
        office.log(),
        ["hold(0)", "hold(1)", "pay(500)", "release(1)", "release(0)"]
    );
}
