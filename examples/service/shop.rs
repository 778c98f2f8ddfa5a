//! The business process the service runs: an order that reserves stock, waits for an
//! approval, charges, and ships — and releases the stock if it is cancelled.
//!
//! The drivers stand for outside services (a warehouse, a bank); here they answer after a
//! few milliseconds and count their calls by idempotency key, so a call that ran twice
//! shows in the worker's log.

use std::time::Duration;

use flowwire::prelude::*;

/// Why the warehouse refused.
#[derive(Debug, Clone, Serialize, Deserialize, thiserror::Error)]
#[error("out of stock: {sku}")]
pub struct OutOfStock {
    /// The SKU asked for.
    pub sku: String,
}

/// Why the bank refused.
#[derive(Debug, Clone, Serialize, Deserialize, thiserror::Error)]
#[error("card declined")]
pub struct Declined;

/// The warehouse.
#[driver(timeout = "10s", retries = 3)]
pub trait Warehouse {
    /// Reserves stock; returns the reservation number.
    async fn reserve(&self, sku: String, qty: u32) -> Result<u64, OutOfStock>;
    /// Releases what was reserved for an order (the compensation of `reserve`).
    async fn release(&self, order: String) -> Result<(), OutOfStock>;
    /// Ships a reservation; returns the tracking number.
    async fn ship(&self, reservation: u64) -> Result<String, OutOfStock>;
}

/// The bank.
#[driver(timeout = "10s", retries = 3)]
pub trait Bank {
    /// Charges an amount; returns the charge number.
    async fn charge(&self, order: String, cents: u64) -> Result<u64, Declined>;
}

/// What a client sends to start an order (the body of `POST /orders/{id}`).
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct NewOrder {
    /// What to buy.
    pub sku: String,
    /// How many.
    pub qty: u32,
    /// The price, in cents.
    pub cents: u64,
}

/// Where an order stands (the answer of `GET /orders/{id}`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Stage {
    /// Waiting for the warehouse.
    Reserving,
    /// Stock is reserved; waiting for an approval.
    AwaitingApproval,
    /// Approved; being charged.
    Charging,
    /// Charged; being shipped.
    Shipping,
    /// Shipped, with this tracking number.
    Shipped(String),
    /// Cancelled (its reservation is released).
    Cancelled,
}

/// The persisted state of an order.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct OrderState {
    /// The order number (the instance id).
    pub id: String,
    /// What was ordered.
    pub sku: String,
    /// How many.
    pub qty: u32,
    /// The price, in cents.
    pub cents: u64,
    /// The warehouse's reservation.
    pub reservation: Option<u64>,
    /// Who approved.
    pub approved_by: Option<String>,
    /// The bank's charge.
    pub charge: Option<u64>,
    /// The tracking number.
    pub tracking: Option<String>,
    /// Cancelled by a client.
    pub cancelled: bool,
}

impl OrderState {
    /// The initial state of an order.
    pub fn new(id: &str, order: NewOrder) -> Self {
        OrderState {
            id: id.to_string(),
            sku: order.sku,
            qty: order.qty,
            cents: order.cents,
            ..OrderState::default()
        }
    }
}

/// An order.
#[flow(version = 1)]
pub struct Order {
    #[link]
    state: OrderState,
    #[link]
    warehouse: impl Warehouse,
    #[link]
    bank: impl Bank,
}

#[flow]
impl Order {
    #[wire]
    fn run(&mut self) -> Command<Self> {
        let s = &self.state;
        if s.cancelled && s.charge.is_none() {
            // Fails the order: the reservation's compensation (release) runs.
            return Command::fail("cancelled by the customer");
        }
        let Some(reservation) = s.reservation else {
            return Command::drive(self.warehouse.reserve(s.sku.clone(), s.qty))
                .compensate(self.warehouse.release(s.id.clone()))
                .then(|f, r| {
                    f.state.reservation = Some(r?);
                    Ok(())
                });
        };
        if s.approved_by.is_none() {
            return Command::wait();
        }
        if s.charge.is_none() {
            return Command::drive(self.bank.charge(s.id.clone(), s.cents)).then(|f, r| {
                f.state.charge = Some(r?);
                Ok(())
            });
        }
        if s.tracking.is_none() {
            return Command::drive(self.warehouse.ship(reservation)).then(|f, r| {
                f.state.tracking = Some(r?);
                Ok(())
            });
        }
        Command::finish()
    }

    /// A manager approves the order.
    #[impulse]
    fn approve(&mut self, by: String) {
        if self.state.approved_by.is_none() {
            self.state.approved_by = Some(by);
        }
    }

    /// The customer cancels (too late once charged).
    #[impulse]
    fn cancel(&mut self) {
        self.state.cancelled = true;
    }

    /// Where the order stands.
    #[probe]
    fn stage(&self) -> Stage {
        let s = &self.state;
        if s.cancelled && s.charge.is_none() {
            Stage::Cancelled
        } else if let Some(t) = &s.tracking {
            Stage::Shipped(t.clone())
        } else if s.charge.is_some() {
            Stage::Shipping
        } else if s.approved_by.is_some() {
            Stage::Charging
        } else if s.reservation.is_some() {
            Stage::AwaitingApproval
        } else {
            Stage::Reserving
        }
    }
}

/// How long the simulated services take to answer.
const LATENCY: Duration = Duration::from_millis(5);

fn log(call: &str) {
    let ctx = CallContext::current();
    let key = ctx
        .as_ref()
        .map_or_else(|| "?".into(), CallContext::idempotency_key);
    let again = ctx.map_or(0, |c| c.redelivered());
    println!("drive {call} key={key} redelivered={again}");
}

/// The warehouse service, simulated.
#[derive(Clone, Default)]
pub struct LocalWarehouse;

#[driver]
impl Warehouse for LocalWarehouse {
    async fn reserve(&self, sku: String, qty: u32) -> Result<u64, OutOfStock> {
        tokio::time::sleep(LATENCY).await;
        log("Warehouse::reserve");
        if qty == 0 {
            return Err(OutOfStock { sku });
        }
        Ok(u64::from(qty) * 1000 + sku.len() as u64)
    }

    async fn release(&self, _order: String) -> Result<(), OutOfStock> {
        tokio::time::sleep(LATENCY).await;
        log("Warehouse::release");
        Ok(())
    }

    async fn ship(&self, reservation: u64) -> Result<String, OutOfStock> {
        tokio::time::sleep(LATENCY).await;
        log("Warehouse::ship");
        Ok(format!("TRACK-{reservation}"))
    }
}

/// The bank, simulated.
#[derive(Clone, Default)]
pub struct LocalBank;

#[driver]
impl Bank for LocalBank {
    async fn charge(&self, _order: String, cents: u64) -> Result<u64, Declined> {
        tokio::time::sleep(LATENCY).await;
        log("Bank::charge");
        if cents == 0 {
            return Err(Declined);
        }
        Ok(cents)
    }
}
