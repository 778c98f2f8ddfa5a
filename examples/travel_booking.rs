//! A travel booking saga: each booking registers the call that undoes it.
//!
//! `cargo run --example travel_booking` — a trip books a flight, a hotel and a car. Each
//! drive names its compensation (`.compensate(..)`), registered when the booking succeeds.
//! When a later step fails, the registered compensations run, last registered first, each
//! to a successful outcome (with its driver's retry policy, across crashes), and the flow
//! ends failed with its own reason. The second trip finds no car: its hotel and its flight
//! are cancelled, in that order. The event stream shows the compensations as they go.

use std::sync::Mutex;

use flowwire::prelude::*;
use flowwire::{EventKind, Events};

/// Why a supplier refused.
#[derive(Debug, Clone, Serialize, Deserialize, thiserror::Error)]
#[error("{0}")]
pub struct Unavailable(String);

/// A supplier's refusal is its answer: not retried. (Timeouts and panics still are, under
/// the driver's policy.)
impl flowwire::Transient for Unavailable {
    fn is_transient(&self) -> bool {
        false
    }
}

/// The travel suppliers: book, and cancel a booking by its reference.
#[driver(timeout = "10s", retries = 3, backoff = "50ms")]
pub trait Suppliers {
    /// Books a seat on a flight; returns the booking reference.
    async fn book_flight(&self, trip: String, flight: String) -> Result<String, Unavailable>;
    /// Cancels a flight booking.
    async fn cancel_flight(&self, trip: String) -> Result<(), Unavailable>;
    /// Books a hotel room.
    async fn book_hotel(&self, trip: String, nights: u32) -> Result<String, Unavailable>;
    /// Cancels a hotel booking.
    async fn cancel_hotel(&self, trip: String) -> Result<(), Unavailable>;
    /// Rents a car.
    async fn rent_car(&self, trip: String, city: String) -> Result<String, Unavailable>;
    /// Cancels a car rental.
    async fn cancel_car(&self, trip: String) -> Result<(), Unavailable>;
}

/// A trip and what is booked so far.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct TripState {
    /// The trip's reference (the suppliers' idempotency handle for cancellations).
    pub trip: String,
    /// Where to.
    pub city: String,
    /// Which flight.
    pub flight_no: String,
    /// How many nights.
    pub nights: u32,
    /// The flight booking.
    pub flight: Option<String>,
    /// The hotel booking.
    pub hotel: Option<String>,
    /// The car rental.
    pub car: Option<String>,
}

/// The booking board.
#[flow]
pub struct Booking {
    #[link]
    state: TripState,
    #[link]
    suppliers: impl Suppliers,
}

#[flow]
impl Booking {
    #[wire]
    fn run(&mut self) -> Command<Self> {
        let s = &self.state;
        let trip = s.trip.clone();
        if s.flight.is_none() {
            return Command::drive(
                self.suppliers
                    .book_flight(trip.clone(), s.flight_no.clone()),
            )
            .compensate(self.suppliers.cancel_flight(trip))
            .then(|f, r| {
                f.state.flight = Some(r?);
                Ok(())
            });
        }
        if s.hotel.is_none() {
            return Command::drive(self.suppliers.book_hotel(trip.clone(), s.nights))
                .compensate(self.suppliers.cancel_hotel(trip))
                .then(|f, r| {
                    f.state.hotel = Some(r?);
                    Ok(())
                });
        }
        if s.car.is_none() {
            // A refusal here returns `Err` from the continuation: the flow fails, and the
            // hotel and the flight are cancelled.
            return Command::drive(self.suppliers.rent_car(trip.clone(), s.city.clone()))
                .compensate(self.suppliers.cancel_car(trip))
                .then(|f, r| {
                    f.state.car = Some(r?);
                    Ok(())
                });
        }
        Command::finish()
    }
}

/// The suppliers (here: in-process, with no cars left in Oslo). Keeps a log of what ran.
#[derive(Default)]
struct Agency {
    log: Mutex<Vec<String>>,
}

impl Agency {
    fn note(&self, what: String) {
        println!("  supplier  {what}");
        self.log.lock().expect("log").push(what);
    }
}

#[driver]
impl Suppliers for std::sync::Arc<Agency> {
    async fn book_flight(&self, trip: String, flight: String) -> Result<String, Unavailable> {
        self.note(format!("book flight {flight} for {trip}"));
        Ok(format!("FL-{trip}"))
    }
    async fn cancel_flight(&self, trip: String) -> Result<(), Unavailable> {
        self.note(format!("cancel flight of {trip}"));
        Ok(())
    }
    async fn book_hotel(&self, trip: String, nights: u32) -> Result<String, Unavailable> {
        self.note(format!("book hotel for {trip}, {nights} nights"));
        Ok(format!("HT-{trip}"))
    }
    async fn cancel_hotel(&self, trip: String) -> Result<(), Unavailable> {
        self.note(format!("cancel hotel of {trip}"));
        Ok(())
    }
    async fn rent_car(&self, trip: String, city: String) -> Result<String, Unavailable> {
        if city == "Oslo" {
            self.note(format!("no car for {trip} in {city}"));
            return Err(Unavailable(format!("no cars left in {city}")));
        }
        self.note(format!("rent car for {trip} in {city}"));
        Ok(format!("CR-{trip}"))
    }
    async fn cancel_car(&self, trip: String) -> Result<(), Unavailable> {
        self.note(format!("cancel car of {trip}"));
        Ok(())
    }
}

fn trip(trip: &str, city: &str) -> TripState {
    TripState {
        trip: trip.into(),
        city: city.into(),
        flight_no: "SK 4041".into(),
        nights: 3,
        ..TripState::default()
    }
}

/// Prints the compensation events waiting on the stream.
fn show_compensations(events: &mut Events) {
    while let Some(Ok(e)) = events.try_next() {
        if let EventKind::Compensating {
            method,
            registered_step,
            ..
        } = e.kind
        {
            println!(
                "  event     {} compensating: {method} (registered at step {registered_step})",
                e.id
            );
        }
    }
}

#[tokio::main]
async fn main() -> Result<(), Box<dyn std::error::Error>> {
    let dir = tempfile::tempdir()?;
    let agency = std::sync::Arc::new(Agency::default());
    let engine = Engine::builder()
        .data_dir(dir.path())
        .flow::<Booking>()
        .driver(agency.clone())
        .start()
        .await?;
    let mut events = engine.events();

    println!("T-1 to Bergen");
    let t1 = engine
        .start::<Booking>("T-1", trip("T-1", "Bergen"))
        .await?;
    let ended = t1.finished().await?;
    println!("  ended     {ended:?}");
    assert_eq!(ended, Ended::Finished);

    println!("T-2 to Oslo");
    let t2 = engine.start::<Booking>("T-2", trip("T-2", "Oslo")).await?;
    let ended = t2.finished().await?;
    show_compensations(&mut events);
    println!("  ended     {ended:?}");
    assert!(
        matches!(&ended, Ended::Failed { reason, .. } if reason == "driver error: no cars left in Oslo"),
        "{ended:?}"
    );
    // The supplier's refusal comes back typed: a caller matches on it, not on the text.
    let refusal = ended
        .error::<Unavailable>()
        .expect("the supplier's error, typed");
    println!("  refusal   {refusal:?}");
    assert_eq!(refusal.0, "no cars left in Oslo");
    let log = agency.log.lock().expect("log").clone();
    assert_eq!(
        log[log.len() - 3..],
        [
            "no car for T-2 in Oslo",
            "cancel hotel of T-2",
            "cancel flight of T-2"
        ],
        "the hotel and the flight are undone, last booked first"
    );

    engine.shutdown().await;
    Ok(())
}
