//! The order circuit of the design brief, end to end on the embedded durable store.
//!
//! `cargo run --example order_circuit` — prints a trace of two orders and where the data
//! lives. Run it twice: the second run finds the orders of the first in the store.

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
    /// The card was declined.
    Declined,
}

impl fmt::Display for PaymentError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("card declined")
    }
}
impl std::error::Error for PaymentError {}

/// The warehouse.
#[driver]
pub trait Inventory {
    /// Reserves stock.
    async fn reserve(&self, sku: Sku, qty: u32) -> Result<ReservationId, InventoryError>;
    /// Releases a reservation (the compensation of `reserve`).
    async fn release(&self, id: ReservationId) -> Result<(), InventoryError>;
}

/// The payment provider.
#[driver(timeout = "30s", retries = 5)]
pub trait Payment {
    /// Charges the card.
    async fn charge(&self, cents: u64) -> Result<ChargeId, PaymentError>;
}

/// The persisted state of an order.
#[derive(Debug, Default, Serialize, Deserialize)]
pub struct OrderState {
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
            (None, _) => {
                Command::drive(self.inventory.reserve(Sku::new("SKU-123"), 1)).then(|f, r| {
                    f.state.reservation = Some(r?);
                    Ok(())
                })
            }
            (Some(_), None) => Command::drive(self.payment.charge(9_995)).then(|f, r| {
                f.state.charge = Some(r?);
                Ok(())
            }),
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

#[driver]
impl Payment for Stripe {
    async fn charge(&self, cents: u64) -> Result<ChargeId, PaymentError> {
        tokio::time::sleep(Duration::from_millis(20)).await;
        println!("  drive    Payment::charge({cents})   key {}", key());
        Ok(ChargeId(42))
    }
}

async fn order(engine: &Engine, id: &str, cancel: bool) -> Result<(), flowwire::Error> {
    let order = match engine
        .start::<OrderCircuit>(id, OrderState::default())
        .await
    {
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

    order(&engine, "order-42", false).await?;
    order(&engine, "order-43", true).await?;

    let dir = engine
        .data_dir()
        .expect("the embedded store has a directory");
    let dir = dir.canonicalize().unwrap_or_else(|_| dir.to_path_buf());
    println!("data     {}", dir.join("instances.redb").display());
    engine.shutdown().await;
    Ok(())
}
