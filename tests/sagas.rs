#![allow(missing_docs)] // test-local flows and drivers
//! Sagas, through the public API: a drive may register the call that undoes it; when the
//! flow fails — `Command::fail`, or a continuation returning `Err` — the compensations of
//! the drives that succeeded run, last registered first, each to a successful outcome (with
//! its driver's retry policy), and the flow ends failed with its own reason. A compensation
//! that still fails parks the instance; resuming it sends that compensation again. A
//! failure can be typed: a driver's error passed on with `?`, or `Command::fail_with`; the
//! caller gets the value back with `Ended::error`, and history and events carry it. The kill
//! test (a crash while compensations run) is in tests/kill.rs.

use std::sync::{Arc, Mutex};

use flowwire::prelude::*;
use flowwire::storage::{StepInput, StepOutput};
use flowwire::{Error, EventKind};

#[derive(Debug, Clone, Serialize, Deserialize, thiserror::Error)]
#[error("refused: {0}")]
pub struct Refused(String);

/// A refusal is final: the agency's answer does not change by asking again, so it is not
/// retried (panics and timeouts are, under the driver's policy).
impl flowwire::Transient for Refused {
    fn is_transient(&self) -> bool {
        false
    }
}

#[driver(retries = 2, backoff = "5ms", max_backoff = "10ms", timeout = "2s")]
pub trait Travel {
    async fn book_flight(&self, trip: u32) -> Result<String, Refused>;
    async fn cancel_flight(&self, trip: u32) -> Result<(), Refused>;
    async fn book_hotel(&self, trip: u32) -> Result<String, Refused>;
    async fn cancel_hotel(&self, trip: u32) -> Result<(), Refused>;
    async fn book_car(&self, trip: u32) -> Result<String, Refused>;
    async fn cancel_car(&self, trip: u32) -> Result<(), Refused>;
    /// Releases a hotel booking by the reference `book_hotel` returned.
    async fn release_room(&self, booking: String) -> Result<(), Refused>;
}

/// How the agency behaves, and what it did.
#[derive(Default)]
pub struct Desk {
    /// `book_car` refuses.
    refuse_car: bool,
    /// `cancel_hotel` panics on this many attempts of each call.
    hotel_cancel_panics: u32,
    /// `cancel_hotel` refuses while this is set.
    hotel_cancel_refuses: bool,
    /// What ran, in order: `method` for a success, `method!` for a refusal or panic.
    log: Vec<String>,
}

#[derive(Clone, Default)]
pub struct Agency(Arc<Mutex<Desk>>);

impl Agency {
    fn set(&self, f: impl FnOnce(&mut Desk)) {
        f(&mut self.0.lock().unwrap());
    }
    fn log(&self) -> Vec<String> {
        self.0.lock().unwrap().log.clone()
    }
    fn note(&self, what: &str, ok: bool) {
        let entry = if ok {
            what.to_string()
        } else {
            format!("{what}!")
        };
        self.0.lock().unwrap().log.push(entry);
    }
}

#[driver]
impl Travel for Agency {
    async fn book_flight(&self, trip: u32) -> Result<String, Refused> {
        self.note("book_flight", true);
        Ok(format!("FL-{trip}"))
    }
    async fn cancel_flight(&self, _trip: u32) -> Result<(), Refused> {
        self.note("cancel_flight", true);
        Ok(())
    }
    async fn book_hotel(&self, trip: u32) -> Result<String, Refused> {
        self.note("book_hotel", true);
        Ok(format!("HT-{trip}"))
    }
    async fn cancel_hotel(&self, _trip: u32) -> Result<(), Refused> {
        let attempt = CallContext::current().expect("a context").attempt();
        let (panics, refuses) = {
            let d = self.0.lock().unwrap();
            (attempt <= d.hotel_cancel_panics, d.hotel_cancel_refuses)
        };
        self.note("cancel_hotel", !panics && !refuses);
        assert!(!panics, "the hotel's system is down");
        if refuses {
            return Err(Refused("the booking is locked".into()));
        }
        Ok(())
    }
    async fn book_car(&self, trip: u32) -> Result<String, Refused> {
        let refuse = self.0.lock().unwrap().refuse_car;
        self.note("book_car", !refuse);
        if refuse {
            return Err(Refused("no cars left".into()));
        }
        Ok(format!("CR-{trip}"))
    }
    async fn cancel_car(&self, _trip: u32) -> Result<(), Refused> {
        self.note("cancel_car", true);
        Ok(())
    }
    async fn release_room(&self, booking: String) -> Result<(), Refused> {
        self.note(&format!("release_room({booking})"), true);
        Ok(())
    }
}

#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct TripState {
    trip: u32,
    /// The wire gives up (`Command::fail`) once the hotel is booked.
    give_up_after_hotel: bool,
    /// The wire waits once the hotel is booked (for a `give_up` impulse).
    hold_after_hotel: bool,
    flight: Option<String>,
    hotel: Option<String>,
    car: Option<String>,
    notes: Vec<String>,
}

#[flow]
pub struct Trip {
    #[link]
    state: TripState,
    #[link]
    travel: impl Travel,
}

#[flow]
impl Trip {
    #[wire]
    fn run(&mut self) -> Command<Self> {
        let trip = self.state.trip;
        if self.state.flight.is_none() {
            return Command::drive(self.travel.book_flight(trip))
                .compensate(self.travel.cancel_flight(trip))
                .then(|f, r| {
                    f.state.flight = Some(r?);
                    Ok(())
                });
        }
        if self.state.hotel.is_none() {
            return Command::drive(self.travel.book_hotel(trip))
                .compensate(self.travel.cancel_hotel(trip))
                .then(|f, r| {
                    f.state.hotel = Some(r?);
                    Ok(())
                });
        }
        if self.state.give_up_after_hotel {
            return Command::fail("the traveller cancelled");
        }
        if self.state.hold_after_hotel {
            return Command::wait();
        }
        if self.state.car.is_none() {
            return Command::drive(self.travel.book_car(trip))
                .compensate(self.travel.cancel_car(trip))
                .then(|f, r| {
                    f.state.car = Some(r?);
                    Ok(())
                });
        }
        Command::finish()
    }

    #[impulse]
    fn note(&mut self, text: String) {
        self.state.notes.push(text);
    }

    #[impulse]
    fn give_up(&mut self) {
        self.state.give_up_after_hotel = true;
    }
}

/// Books a hotel, whose undo is built from the booking's reference, then a car.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct StayState {
    trip: u32,
    booking: Option<String>,
    car: Option<String>,
}

#[flow]
pub struct Stay {
    #[link]
    state: StayState,
    #[link]
    travel: impl Travel,
}

#[flow]
impl Stay {
    #[wire]
    fn run(&mut self) -> Command<Self> {
        let trip = self.state.trip;
        if self.state.booking.is_none() {
            return Command::drive(self.travel.book_hotel(trip))
                .compensate_with(|booking| TravelProxy.release_room(booking.clone()))
                .then(|f, r| {
                    f.state.booking = Some(r?);
                    Ok(())
                });
        }
        if self.state.car.is_none() {
            return Command::drive(self.travel.book_car(trip)).then(|f, r| {
                f.state.car = Some(r?);
                Ok(())
            });
        }
        Command::finish()
    }
}

async fn engine(agency: &Agency) -> Engine {
    Engine::builder()
        .in_memory()
        .flow::<Trip>()
        .flow::<Stay>()
        .driver(agency.clone())
        .start()
        .await
        .unwrap()
}

fn trip(n: u32) -> TripState {
    TripState {
        trip: n,
        ..TripState::default()
    }
}

/// The compensation events of an instance, as `(method, registered step, call step)`.
fn compensations(events: &mut flowwire::Events) -> Vec<(&'static str, u64, u64)> {
    let mut out = Vec::new();
    while let Some(Ok(e)) = events.try_next() {
        if let EventKind::Compensating {
            method,
            registered_step,
            call_step,
            ..
        } = e.kind
        {
            out.push((method, registered_step, call_step));
        }
    }
    out
}

#[tokio::test]
async fn a_failing_continuation_undoes_the_drives_that_succeeded_last_first() {
    let agency = Agency::default();
    agency.set(|d| d.refuse_car = true);
    let engine = engine(&agency).await;
    let mut events = engine.events();
    let h = engine.start::<Trip>("t1", trip(1)).await.unwrap();

    let ended = h.finished().await.unwrap();
    assert!(
        matches!(&ended, Ended::Failed { reason, .. } if reason.contains("no cars left")),
        "the flow ends failed with the continuation's reason: {ended:?}"
    );
    assert_eq!(
        agency.log(),
        [
            "book_flight",
            "book_hotel",
            "book_car!",
            "cancel_hotel",
            "cancel_flight"
        ],
        "the car was never booked, so only the hotel and the flight are undone, hotel first"
    );
    // Step 1 drove the flight, 2 applied its outcome (registering its compensation) and
    // drove the hotel, 3 registered the hotel's and drove the car, 4 failed.
    assert_eq!(
        compensations(&mut events),
        [("cancel_hotel", 2, 4), ("cancel_flight", 1, 5)],
        "each compensation names the drive that registered it"
    );
    let history = engine.history::<Trip>("t1", 0, 100).await.unwrap();
    let last = history.steps.last().unwrap();
    assert_eq!(
        last.input,
        StepInput::Outcome {
            call_seq: 5,
            ok: true
        }
    );
    assert!(matches!(&last.output, StepOutput::Fail { reason, .. } if reason.contains("no cars")));
}

#[tokio::test]
async fn command_fail_runs_the_registered_compensations() {
    let agency = Agency::default();
    let engine = engine(&agency).await;
    let state = TripState {
        give_up_after_hotel: true,
        ..trip(2)
    };
    let h = engine.start::<Trip>("t2", state).await.unwrap();
    assert_eq!(
        h.finished().await.unwrap(),
        Ended::Failed {
            reason: "the traveller cancelled".into(),
            error: None
        }
    );
    assert_eq!(
        agency.log(),
        ["book_flight", "book_hotel", "cancel_hotel", "cancel_flight"]
    );
    let state = h.state().await.unwrap();
    assert_eq!(
        (state.flight.as_deref(), state.hotel.as_deref()),
        (Some("FL-2"), Some("HT-2")),
        "compensating does not change the state: it records what was done and undone"
    );
}

#[tokio::test]
async fn a_flow_that_finishes_compensates_nothing() {
    let agency = Agency::default();
    let engine = engine(&agency).await;
    let h = engine.start::<Trip>("t3", trip(3)).await.unwrap();
    assert_eq!(h.finished().await.unwrap(), Ended::Finished);
    assert_eq!(agency.log(), ["book_flight", "book_hotel", "book_car"]);
}

#[tokio::test]
async fn a_compensation_is_retried_under_its_drivers_policy() {
    let agency = Agency::default();
    agency.set(|d| d.hotel_cancel_panics = 2);
    let engine = engine(&agency).await;
    let state = TripState {
        give_up_after_hotel: true,
        ..trip(4)
    };
    let h = engine.start::<Trip>("t4", state).await.unwrap();
    assert!(matches!(h.finished().await.unwrap(), Ended::Failed { .. }));
    assert_eq!(
        agency.log(),
        [
            "book_flight",
            "book_hotel",
            "cancel_hotel!",
            "cancel_hotel!",
            "cancel_hotel",
            "cancel_flight"
        ],
        "two failed attempts are retried (retries = 2), then the saga goes on"
    );
}

#[tokio::test]
async fn a_compensation_that_keeps_failing_parks_the_instance_and_resume_sends_it_again() {
    let agency = Agency::default();
    agency.set(|d| d.hotel_cancel_refuses = true);
    let engine = engine(&agency).await;
    let state = TripState {
        give_up_after_hotel: true,
        ..trip(5)
    };
    let h = engine.start::<Trip>("t5", state).await.unwrap();
    let parked = h.finished().await;
    let Err(Error::Quarantined { reason, .. }) = parked else {
        panic!("a failed compensation parks the instance: {parked:?}")
    };
    assert!(
        reason.contains("Travel.cancel_hotel")
            && reason.contains("the traveller cancelled")
            && reason.contains("resume"),
        "the reason names the compensation, the flow's failure and what to do: {reason}"
    );
    assert_eq!(
        agency.log(),
        ["book_flight", "book_hotel", "cancel_hotel!"],
        "a driver's own error is not retried, and the saga stops there"
    );

    agency.set(|d| d.hotel_cancel_refuses = false);
    engine.resume::<Trip>("t5").await.unwrap();
    let h = engine.handle::<Trip>("t5").await.unwrap();
    assert_eq!(
        h.finished().await.unwrap(),
        Ended::Failed {
            reason: "the traveller cancelled".into(),
            error: None
        },
        "resumed, the saga finishes with the flow's own reason"
    );
    assert_eq!(
        agency.log()[3..],
        ["cancel_hotel", "cancel_flight"],
        "the compensation was sent again, then the next one"
    );
}

#[tokio::test]
async fn a_failed_saga_takes_no_impulse() {
    let agency = Agency::default();
    let engine = engine(&agency).await;
    let state = TripState {
        give_up_after_hotel: true,
        ..trip(6)
    };
    let h = engine.start::<Trip>("t6", state).await.unwrap();
    h.finished().await.unwrap();
    let refused = h.note("too late".into()).await;
    assert!(
        matches!(refused, Err(Error::Ended { .. })),
        "a failed flow takes no impulse: {refused:?}"
    );
}

#[tokio::test]
async fn an_impulse_that_fails_the_flow_is_recorded_as_applied() {
    let agency = Agency::default();
    let engine = engine(&agency).await;
    let state = TripState {
        hold_after_hotel: true,
        ..trip(7)
    };
    let h = engine.start::<Trip>("t7", state).await.unwrap();
    for _ in 0..1_000 {
        if h.state().await.unwrap().hotel.is_some() {
            break;
        }
        tokio::time::sleep(std::time::Duration::from_millis(5)).await;
    }
    h.give_up().id("give-up-1").await.unwrap();
    assert_eq!(
        h.finished().await.unwrap(),
        Ended::Failed {
            reason: "the traveller cancelled".into(),
            error: None
        }
    );
    assert_eq!(
        agency.log(),
        ["book_flight", "book_hotel", "cancel_hotel", "cancel_flight"]
    );
    // A client that did not hear the answer sends it again: told it was applied.
    let again = h.give_up().id("give-up-1").await;
    assert!(
        matches!(&again, Err(Error::ImpulseAlreadyApplied { impulse_id, .. }) if impulse_id == "give-up-1"),
        "{again:?}"
    );
}

#[tokio::test]
async fn a_compensation_built_from_the_reply_undoes_what_the_call_returned() {
    let agency = Agency::default();
    agency.set(|d| d.refuse_car = true);
    let engine = engine(&agency).await;
    let state = StayState {
        trip: 5,
        ..StayState::default()
    };
    let h = engine.start::<Stay>("s1", state).await.unwrap();
    let ended = h.finished().await.unwrap();
    assert!(
        matches!(&ended, Ended::Failed { reason, .. } if reason.contains("no cars left")),
        "{ended:?}"
    );
    assert_eq!(
        agency.log(),
        ["book_hotel", "book_car!", "release_room(HT-5)"],
        "the release names the booking the hotel returned"
    );
}

#[tokio::test]
async fn a_drivers_error_passed_on_with_a_question_mark_fails_the_flow_typed() {
    let agency = Agency::default();
    agency.set(|d| d.refuse_car = true);
    let engine = engine(&agency).await;
    let mut events = engine.events();
    let state = StayState {
        trip: 6,
        ..StayState::default()
    };
    let h = engine.start::<Stay>("s2", state).await.unwrap();
    let ended = h.finished().await.unwrap();
    let refused = ended.error::<Refused>().expect("the driver's error, typed");
    assert_eq!(refused.0, "no cars left");
    assert!(
        ended.error::<String>().is_none(),
        "a value is read only as the type it was written from"
    );
    // Kept while the compensation ran, then in the last step and its event.
    let page = engine.history::<Stay>("s2", 0, 100).await.unwrap();
    let StepOutput::Fail { reason, error } = &page.steps.last().unwrap().output else {
        panic!("the last step fails the flow: {page:?}");
    };
    assert_eq!(reason, "driver error: refused: no cars left");
    let error = error.as_ref().expect("history keeps the typed value");
    assert_eq!(error.type_name, std::any::type_name::<Refused>());
    let mut failed = None;
    while let Some(Ok(e)) = events.try_next() {
        if let EventKind::Failed { error, .. } = e.kind {
            failed = error;
        }
    }
    assert_eq!(failed.as_ref(), Some(error), "the event carries it too");
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, thiserror::Error)]
pub enum TripError {
    #[error("trip {0} is over budget")]
    OverBudget(u32),
}

/// Fails with a typed error of its own once the hotel is booked (undone first).
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct BudgetState {
    trip: u32,
    hotel: Option<String>,
}

#[flow]
pub struct Budget {
    #[link]
    state: BudgetState,
    #[link]
    travel: impl Travel,
}

#[flow]
impl Budget {
    #[wire]
    fn run(&mut self) -> Command<Self> {
        let trip = self.state.trip;
        if self.state.hotel.is_none() {
            return Command::drive(self.travel.book_hotel(trip))
                .compensate(self.travel.cancel_hotel(trip))
                .then(|f, r| {
                    f.state.hotel = Some(r?);
                    Ok(())
                });
        }
        Command::fail_with(TripError::OverBudget(trip))
    }
}

#[tokio::test]
async fn a_flow_fails_with_its_own_typed_error_after_its_compensations() {
    let agency = Agency::default();
    let engine = Engine::builder()
        .in_memory()
        .flow::<Budget>()
        .driver(agency.clone())
        .start()
        .await
        .unwrap();
    let state = BudgetState {
        trip: 8,
        hotel: None,
    };
    let h = engine.start::<Budget>("b1", state).await.unwrap();
    let ended = h.finished().await.unwrap();
    assert_eq!(ended.error::<TripError>(), Some(TripError::OverBudget(8)));
    assert!(
        matches!(&ended, Ended::Failed { reason, .. } if reason == "trip 8 is over budget"),
        "the message is kept: {ended:?}"
    );
    assert_eq!(agency.log(), ["book_hotel", "cancel_hotel"]);
}
