#![allow(dead_code)] // shared by the harness and the test; each uses a part
//! The order flow the crash test runs, shared by the harness binary and the test.
//!
//! Every driver execution appends `run method key` to a ledger file, and every continuation
//! and impulse counts itself in the state, so the test can check at the end: outcomes and
//! impulses applied exactly once, calls executed at least once, duplicates only across kills.

use std::io::Write;
use std::path::PathBuf;
use std::time::Duration;

use flowwire::prelude::*;

/// Why a ledger driver failed (never, in practice).
#[derive(Debug, Serialize, Deserialize, thiserror::Error)]
#[error("ledger unavailable")]
pub struct LedgerError;

/// The two external services of an order, in one driver.
#[driver]
pub trait Shop {
    /// Reserves stock for order `n`.
    async fn reserve(&self, n: u32) -> Result<u64, LedgerError>;
    /// Charges order `n`.
    async fn charge(&self, n: u32) -> Result<u64, LedgerError>;
}

/// Counts of everything applied to one order.
#[derive(Debug, Default, Clone, Serialize, Deserialize)]
pub struct CrashState {
    /// The order number.
    pub n: u32,
    /// The reservation, once made.
    pub reservation: Option<u64>,
    /// The charge, once made.
    pub charge: Option<u64>,
    /// Times the reserve outcome was applied.
    pub reserve_applied: u32,
    /// Times the charge outcome was applied.
    pub charge_applied: u32,
    /// Times the approve impulse was applied.
    pub approvals: u32,
}

/// Reserve, wait for approval, charge, finish.
#[flow(name = "CrashOrder")]
pub struct CrashOrder {
    #[link]
    state: CrashState,
    #[link]
    shop: impl Shop,
}

#[flow]
impl CrashOrder {
    #[impulse]
    fn approve(&mut self) {
        self.state.approvals += 1;
    }

    #[probe]
    fn counts(&self) -> (u32, u32, u32) {
        (
            self.state.reserve_applied,
            self.state.charge_applied,
            self.state.approvals,
        )
    }

    #[wire]
    fn step(&mut self) -> Command<Self> {
        let n = self.state.n;
        if self.state.reservation.is_none() {
            return Command::drive(self.shop.reserve(n)).then(|f, r| {
                f.state.reservation = Some(r?);
                f.state.reserve_applied += 1;
                Ok(())
            });
        }
        if self.state.approvals == 0 {
            return Command::wait();
        }
        if self.state.charge.is_none() {
            return Command::drive(self.shop.charge(n)).then(|f, r| {
                f.state.charge = Some(r?);
                f.state.charge_applied += 1;
                Ok(())
            });
        }
        Command::finish()
    }
}

/// A `Shop` that records every execution in a ledger file and takes a few milliseconds.
pub struct Ledger {
    /// The ledger file.
    pub path: PathBuf,
    /// This process's run tag.
    pub run: String,
}

impl Ledger {
    fn record(&self, method: &str) -> Result<(), LedgerError> {
        let ctx = CallContext::current().ok_or(LedgerError)?;
        let line = format!("{} {} {}\n", self.run, method, ctx.idempotency_key());
        let mut f = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&self.path)
            .map_err(|_| LedgerError)?;
        // One write of one short line with O_APPEND: lines never interleave.
        f.write_all(line.as_bytes()).map_err(|_| LedgerError)
    }
}

fn pause(n: u32, salt: u32) -> Duration {
    Duration::from_millis(u64::from((n.wrapping_mul(2_654_435_761) ^ salt) % 20 + 5))
}

#[driver]
impl Shop for Ledger {
    async fn reserve(&self, n: u32) -> Result<u64, LedgerError> {
        tokio::time::sleep(pause(n, 1)).await;
        self.record("reserve")?;
        Ok(u64::from(n) + 1_000)
    }

    async fn charge(&self, n: u32) -> Result<u64, LedgerError> {
        tokio::time::sleep(pause(n, 7)).await;
        self.record("charge")?;
        Ok(u64::from(n) + 2_000)
    }
}

/// The id of order `n`.
pub fn order_id(n: u32) -> String {
    format!("order-{n}")
}
