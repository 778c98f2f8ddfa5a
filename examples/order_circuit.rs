//! The order circuit of the design brief, end to end on the embedded durable store.
//!
//! `cargo run --example order_circuit` — prints a trace of three orders and where the data
//! lives. Run it twice: the second run finds the orders of the first in the store.
//!
//! The payment gateway is busy on the first attempt of every charge: the error is retried
//! after a durable backoff. A declined card is a permanent error: the flow fails at once,
//! and the reservation is released by the id the warehouse returned.

use std::fmt;
use std::time::Duration;

use flowwire::prelude::*;

/// A stock-keeping unit: a short string stored inline (no heap allocation).
#[derive(Clone, Copy, PartialEq, Eq)]
pub struct Sku {
    len: u8,
    bytes: [u8; 23],
}

impl Sku {
    /// A SKU of at most 23 bytes (longer input is cut at a character boundary).
    pub fn new(s: &str) -> Self {
        let mut end = s.len().min(23);
        while !s.is_char_boundary(end) {
            end -= 1;
        }
        let mut bytes = [0; 23];
        bytes[..end].copy_from_slice(&s.as_bytes()[..end]);
        Self {
            len: end as u8,
            bytes,
        }
    }

    /// The SKU as text.
    pub fn as_str(&self) -> &str {
        std::str::from_utf8(&self.bytes[..usize::from(self.len)]).unwrap_or("")
    }
}

impl fmt::Debug for Sku {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl Serialize for Sku {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(self.as_str())
    }
}

impl<'de> Deserialize<'de> for Sku {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let s = <&str>::deserialize(d)?;
        if s.len() > 23 {
            return Err(serde::de::Error::invalid_length(
                s.len(),
                &"at most 23 bytes",
            ));
        }
        Ok(Sku::new(s))
    }
}

/// A stock reservation.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct ReservationId(u64);

/// A card charge.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct ChargeId(u64);

/// Why the warehouse refused.
#[derive(Debug, Serialize, Deserialize)]
pub enum InventoryError {
    /// Nothing left.
    OutOfStock,
}

impl fmt::Display for InventoryError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("out of stock")
    }
}
impl std::error::Error for InventoryError {}

/// Why the payment provider refused.
#[derive(Debug, Serialize, Deserialize)]
pub enum PaymentError {
    /// The gateway is busy: trying again later may succeed.
    Busy,
    /// The card was declined: it stays declined.
    Declined,
}

impl fmt::Display for PaymentError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            PaymentError::Busy => "the gateway is busy",
            PaymentError::Declined => "card declined",
        })
    }
}
impl std::error::Error for PaymentError {}

/// A declined card is not retried; a busy gateway is (under the driver's policy).
impl flowwire::Transient for PaymentError {
    fn is_transient(&self) -> bool {
        matches!(self, PaymentError::Busy)
    }
}

/// The warehouse.
#[driver]
pub trait Inventory {
    /// Reserves stock.
    async fn reserve(&self, sku: Sku, qty: u32) -> Result<ReservationId, InventoryError>;
    /// Releases a reservation (the compensation of `reserve`).
    async fn release(&self, id: ReservationId) -> Result<(), InventoryError>;
}

/// The payment provider: three retries of a failed charge, 50 ms apart at first.
#[driver(timeout = "30s", retries = 3, backoff = "50ms")]
pub trait Payment {
    /// Charges the card.
    async fn charge(&self, cents: u64) -> Result<ChargeId, PaymentError>;
}

/// The persisted state of an order.
#[derive(Debug, Default, Serialize, Deserialize)]
pub struct OrderState {
    cents: u64,
    cancelled: bool,
    reservation: Option<ReservationId>,
    charge: Option<ChargeId>,
}

/// The order board.
#[flow(version = 1)]
pub struct OrderCircuit {
    #[link]
    state: OrderState,
    #[link]
    inventory: impl Inventory,
    #[link]
    payment: impl Payment,
}

#[flow]
impl OrderCircuit {
    #[impulse]
    fn cancel(&mut self) {
        self.state.cancelled = true;
    }

    #[probe]
    fn is_paid(&self) -> bool {
        self.state.charge.is_some()
    }

    #[wire]
    fn execute(&mut self) -> Command<Self> {
        if self.state.cancelled {
            return Command::finish();
        }
        match (self.state.reservation, self.state.charge) {
            (None, _) => Command::drive(self.inventory.reserve(Sku::new("SKU-123"), 1))
                // Undone, if the order fails later, by the id the warehouse returns.
                .compensate_with(|id| InventoryProxy.release(*id))
                .then(|f, r| {
                    f.state.reservation = Some(r?);
                    Ok(())
                }),
            (Some(_), None) => {
                Command::drive(self.payment.charge(self.state.cents)).then(|f, r| {
                    f.state.charge = Some(r?);
                    Ok(())
                })
            }
            _ => Command::finish(),
        }
    }
}

fn key() -> String {
    CallContext::current().map_or_else(|| "?".into(), |c| c.idempotency_key())
}

/// The warehouse service (here: in-process, with a little latency).
struct Warehouse;

#[driver]
impl Inventory for Warehouse {
    async fn reserve(&self, sku: Sku, qty: u32) -> Result<ReservationId, InventoryError> {
        tokio::time::sleep(Duration::from_millis(20)).await;
        println!(
            "  drive    Inventory::reserve({sku:?}, {qty})   key {}",
            key()
        );
        Ok(ReservationId(7))
    }

    async fn release(&self, id: ReservationId) -> Result<(), InventoryError> {
        println!("  drive    Inventory::release({id:?})   key {}", key());
        Ok(())
    }
}

/// The payment provider.
struct Stripe;

/// The amount this demo's card issuer declines.
const DECLINED_CENTS: u64 = 66_600;

#[driver]
impl Payment for Stripe {
    async fn charge(&self, cents: u64) -> Result<ChargeId, PaymentError> {
        tokio::time::sleep(Duration::from_millis(20)).await;
        let attempt = CallContext::current().map_or(1, |c| c.attempt());
        println!(
            "  drive    Payment::charge({cents})   key {}   attempt {attempt}",
            key()
        );
        if attempt == 1 {
            return Err(PaymentError::Busy);
        }
        if cents == DECLINED_CENTS {
            return Err(PaymentError::Declined);
        }
        Ok(ChargeId(42))
    }
}

async fn order(engine: &Engine, id: &str, cents: u64, cancel: bool) -> Result<(), flowwire::Error> {
    let state = OrderState {
        cents,
        ..OrderState::default()
    };
    let order = match engine.start::<OrderCircuit>(id, state).await {
        Ok(order) => {
            println!("started  {id}");
            order
        }
        Err(flowwire::Error::AlreadyExists { .. }) => {
            println!("found    {id} (from an earlier run, in the store)");
            engine.handle::<OrderCircuit>(id).await?
        }
        Err(e) => return Err(e),
    };
    if cancel {
        match order.cancel().id(format!("{id}-cancel")).await {
            Ok(()) => println!("  impulse cancel applied"),
            Err(e) => println!("  impulse cancel not applied: {e}"),
        }
    }
    let ended = tokio::time::timeout(Duration::from_secs(30), order.finished())
        .await
        .map_err(|_| flowwire::Error::Timeout {
            op: "finished",
            after: Duration::from_secs(30),
        })??;
    let state = order.state().await?;
    println!(
        "  outcome  reservation {:?}, charge {:?}, cancelled {}",
        state.reservation, state.charge, state.cancelled
    );
    println!("finished {id}: {ended:?}, paid: {}", order.is_paid().await?);
    Ok(())
}

#[tokio::main]
async fn main() -> Result<(), flowwire::Error> {
    let engine = Engine::builder()
        .data_dir("./flowwire-data")
        .flow::<OrderCircuit>()
        .driver(Warehouse)
        .driver(Stripe)
        .start()
        .await?;

    order(&engine, "order-42", 9_995, false).await?;
    order(&engine, "order-43", 9_995, true).await?;
    order(&engine, "order-44", DECLINED_CENTS, false).await?;

    let dir = engine
        .data_dir()
        .expect("the embedded store has a directory");
    let dir = dir.canonicalize().unwrap_or_else(|_| dir.to_path_buf());
    println!("data     {}", dir.join("instances.redb").display());
    engine.shutdown().await;
    Ok(())
}
