//! The flow and driver of the multi-process crash test (`tests/scale_kill.rs` and its
//! harness processes).

#![allow(dead_code, missing_docs)]

use flowwire::prelude::*;

#[derive(Debug, Clone, Serialize, Deserialize, thiserror::Error)]
#[error("desk closed")]
pub struct Closed;

#[driver(timeout = "10s", retries = 2)]
pub trait Desk {
    async fn reserve(&self, ticket: String) -> Result<u32, Closed>;
    async fn charge(&self, ticket: String, seat: u32) -> Result<(), Closed>;
}

/// A desk that answers after a short pause (so kills find calls in flight).
#[derive(Clone, Default)]
pub struct FrontDesk;

#[driver]
impl Desk for FrontDesk {
    async fn reserve(&self, ticket: String) -> Result<u32, Closed> {
        tokio::time::sleep(std::time::Duration::from_millis(2)).await;
        Ok(u32::try_from(ticket.len()).unwrap_or(0))
    }

    async fn charge(&self, _ticket: String, _seat: u32) -> Result<(), Closed> {
        tokio::time::sleep(std::time::Duration::from_millis(2)).await;
        Ok(())
    }
}

#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct TicketState {
    pub id: String,
    pub seat: Option<u32>,
    pub confirmed: u32,
    pub charged: bool,
}

/// Reserves a seat, waits for a confirmation, charges, finishes.
#[flow]
pub struct Ticket {
    #[link]
    state: TicketState,
    #[link]
    desk: impl Desk,
}

#[flow]
impl Ticket {
    #[wire]
    fn run(&mut self) -> Command<Self> {
        let s = &self.state;
        let Some(seat) = s.seat else {
            return Command::drive(self.desk.reserve(s.id.clone())).then(|f, r| {
                f.state.seat = Some(r?);
                Ok(())
            });
        };
        if s.confirmed == 0 {
            return Command::wait();
        }
        if !s.charged {
            return Command::drive(self.desk.charge(s.id.clone(), seat)).then(|f, r| {
                r?;
                f.state.charged = true;
                Ok(())
            });
        }
        Command::finish()
    }

    /// Counts confirmations: a second application of one impulse would show as 2.
    #[impulse]
    fn confirm(&mut self) {
        self.state.confirmed += 1;
    }
}

/// Answers at once (the multi-process bench measures the engine, not the driver).
#[driver(timeout = "10s", retries = 2)]
pub trait Hop {
    async fn hop(&self, n: u32) -> Result<u32, Closed>;
}

#[derive(Clone, Default)]
pub struct Hopper;

#[driver]
impl Hop for Hopper {
    async fn hop(&self, n: u32) -> Result<u32, Closed> {
        Ok(n + 1)
    }
}

#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct RelayState {
    pub hops: u32,
}

/// The bench's workflow: two calls, then finish (three durable steps with the start).
#[flow]
pub struct Relay {
    #[link]
    state: RelayState,
    #[link]
    hop: impl Hop,
}

#[flow]
impl Relay {
    #[wire]
    fn run(&mut self) -> Command<Self> {
        if self.state.hops >= 2 {
            return Command::finish();
        }
        Command::drive(self.hop.hop(self.state.hops)).then(|f, r| {
            f.state.hops = r?;
            Ok(())
        })
    }
}

pub const SHARDS: u16 = 8;

/// The bench's deployment: the default shard count and lease, no write audit.
pub fn bench_shared(url: &str, prefix: &str, node: Option<&str>) -> flowwire::Shared {
    let s = flowwire::Shared::redis(url, prefix).expect("a Redis URL");
    match node {
        Some(n) => s.node_name(n),
        None => s,
    }
}

/// The deployment every process of the test joins.
pub fn shared(url: &str, prefix: &str, node: Option<&str>) -> flowwire::Shared {
    let s = flowwire::Shared::redis(url, prefix)
        .expect("a Redis URL")
        .shards(SHARDS)
        .lease_ttl(std::time::Duration::from_millis(1500))
        .visibility_timeout(std::time::Duration::from_secs(2))
        .audit_writes();
    match node {
        Some(n) => s.node_name(n),
        None => s,
    }
}
