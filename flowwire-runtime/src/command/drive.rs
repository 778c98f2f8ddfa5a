//! [`Drive`]: a driver call on its way to its continuation, with the compensation it
//! registers.

use crate::board::Board;
use crate::driver::{Call, Reply};

use super::erase::{Continuation, Then, UndoFrom, UndoWith};
use super::kind::{Command, CommandKind, Undo};

/// A drive waiting for its continuation: `Command::drive(call).then(..)`.
#[must_use = "a drive needs its continuation: add `.then(|flow, outcome| ..)`"]
pub struct Drive<F: Board, R> {
    pub(super) call: F::Call,
    pub(super) undo: Option<Undo<F>>,
    pub(super) _reply: std::marker::PhantomData<fn() -> R>,
}

impl<F: Board, R: Reply> Drive<F, R> {
    /// Registers the call that undoes this one, should the flow fail later: a saga step.
    ///
    /// The compensation is registered only when this call succeeds (the driver returns
    /// `Ok`); it is built now, from the state the drive is built from, so it carries what
    /// it needs (an id, an amount). When the flow fails — [`Command::fail`], or a
    /// continuation returning `Err` — the registered compensations run in reverse order,
    /// durably: a crash while they run resumes them, and each runs to a successful outcome
    /// at least once. A compensation is a driver call like any other: its driver's policy
    /// (timeouts, retries, the ambiguous window) applies, and its idempotency key is stable.
    ///
    /// ```
    /// use flowwire::prelude::*;
    ///
    /// # #[derive(Debug, Clone, Serialize, Deserialize, thiserror::Error)]
    /// # #[error("fully booked")]
    /// # pub struct Full;
    /// #[driver]
    /// pub trait Hotel {
    ///     async fn book(&self, trip: u64, nights: u32) -> Result<String, Full>;
    ///     async fn cancel(&self, trip: u64) -> Result<(), Full>;
    /// }
    ///
    /// #[derive(Debug, Default, Clone, Serialize, Deserialize)]
    /// pub struct Trip {
    ///     id: u64,
    ///     nights: u32,
    ///     hotel: Option<String>,
    /// }
    ///
    /// #[flow]
    /// pub struct Travel {
    ///     #[link]
    ///     state: Trip,
    ///     #[link]
    ///     hotel: impl Hotel,
    /// }
    ///
    /// #[flow]
    /// impl Travel {
    ///     #[wire]
    ///     fn run(&mut self) -> Command<Self> {
    ///         let (trip, nights) = (self.state.id, self.state.nights);
    ///         if self.state.hotel.is_some() {
    ///             return Command::finish();
    ///         }
    ///         Command::drive(self.hotel.book(trip, nights))
    ///             .compensate(self.hotel.cancel(trip))
    ///             .then(|f, r| { f.state.hotel = Some(r?); Ok(()) })
    ///     }
    /// }
    /// ```
    pub fn compensate<C>(mut self, undo: Call<C, impl Reply>) -> Self
    where
        F::Call: From<C>,
    {
        self.undo = Some(Undo::Call(F::Call::from(undo.into_call())));
        self
    }

    /// Registers the call that undoes this one, built from its reply once it succeeds: a
    /// saga step whose undo needs what the call returned (a reservation's id, a charge's
    /// reference).
    ///
    /// `undo` receives the call's `Ok` value and returns the compensating call, built on
    /// the driver's proxy, a unit value named after its trait (`InventoryProxy` for
    /// `Inventory`). Like a continuation it must not capture anything (it is a `fn` pointer,
    /// rederived from the wire after a restart). It runs when the
    /// outcome is applied, before the continuation, and the call it builds is persisted
    /// with that step, so it is never built again: a crash, a retry of the compensation or
    /// a later change of the state does not change it. A panic in it parks the instance.
    /// Everything else is as for [`Drive::compensate`].
    ///
    /// ```
    /// use flowwire::prelude::*;
    ///
    /// #[derive(Debug, Clone, Serialize, Deserialize)]
    /// pub struct Reservation {
    ///     id: String,
    ///     seats: u32,
    /// }
    ///
    /// # #[derive(Debug, Clone, Serialize, Deserialize, thiserror::Error)]
    /// # #[error("sold out")]
    /// # pub struct SoldOut;
    /// #[driver]
    /// pub trait Inventory {
    ///     async fn reserve(&self, item: u64, seats: u32) -> Result<Reservation, SoldOut>;
    ///     async fn release(&self, reservation: String) -> Result<(), SoldOut>;
    /// }
    ///
    /// #[derive(Debug, Default, Clone, Serialize, Deserialize)]
    /// pub struct Booking {
    ///     item: u64,
    ///     reservation: Option<Reservation>,
    /// }
    ///
    /// #[flow]
    /// pub struct Book {
    ///     #[link]
    ///     state: Booking,
    ///     #[link]
    ///     inventory: impl Inventory,
    /// }
    ///
    /// #[flow]
    /// impl Book {
    ///     #[wire]
    ///     fn run(&mut self) -> Command<Self> {
    ///         if self.state.reservation.is_some() {
    ///             return Command::finish();
    ///         }
    ///         Command::drive(self.inventory.reserve(self.state.item, 2))
    ///             .compensate_with(|r| InventoryProxy.release(r.id.clone()))
    ///             .then(|f, r| { f.state.reservation = Some(r?); Ok(()) })
    ///     }
    /// }
    /// ```
    pub fn compensate_with<C, U: Reply>(mut self, undo: UndoFrom<R, C, U>) -> Self
    where
        F::Call: From<C>,
    {
        self.undo = Some(Undo::With(UndoWith::new::<R, C, U>(undo)));
        self
    }

    /// Sets what happens with the call's outcome: the driver's own `Result`, or the
    /// runtime's [`Fault`](crate::Fault) when the call timed out or panicked on every attempt.
    /// Returning `Err` fails the flow.
    ///
    /// The continuation must not capture anything (it is a `fn` pointer): it is re-derived
    /// from the wire after a restart, so it may only depend on the state and the outcome.
    pub fn then(self, k: Continuation<F, R>) -> Command<F> {
        Command {
            kind: CommandKind::Drive {
                call: self.call,
                then: Then::new::<R>(k),
                undo: self.undo,
            },
        }
    }
}
