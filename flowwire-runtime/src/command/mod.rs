//! [`Command`]: what a wire returns.

mod erase;

use std::fmt;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use flowwire_storage::TimeSpec;

use crate::board::Board;
use crate::driver::{Call, DriveError, Fault, Reply};
use crate::failure::Failure;

/// What the wire asks the runtime to do next.
///
/// Building a command allocates nothing when the call's arguments do not: the call is
/// stored inline and the continuation is a plain `fn` pointer.
///
/// ```
/// use flowwire::prelude::*;
///
/// #[derive(Debug, Clone, Serialize, Deserialize, thiserror::Error)]
/// #[error("card declined")]
/// pub struct Declined;
///
/// #[driver]
/// pub trait Payment {
///     async fn charge(&self, cents: u64) -> Result<String, Declined>;
/// }
///
/// #[derive(Debug, Default, Clone, Serialize, Deserialize)]
/// pub struct Checkout {
///     charge: Option<String>,
/// }
///
/// #[flow]
/// pub struct Order {
///     #[link]
///     state: Checkout,
///     #[link]
///     payment: impl Payment,
/// }
///
/// #[flow]
/// impl Order {
///     #[wire]
///     fn run(&mut self) -> Command<Self> {
///         if self.state.charge.is_some() {
///             return Command::finish();
///         }
///         Command::drive(self.payment.charge(9_995))
///             .then(|f, r| { f.state.charge = Some(r?); Ok(()) })
///     }
/// }
/// ```
#[must_use = "a wire's command is its return value"]
pub struct Command<F: Board> {
    pub(crate) kind: CommandKind<F>,
}

pub(crate) enum CommandKind<F: Board> {
    Drive {
        call: F::Call,
        then: Then<F>,
        undo: Option<Undo<F>>,
    },
    Wait,
    Timer {
        spec: TimeSpec,
        wait: bool,
        wake: Wake<F>,
    },
    Fan {
        calls: Vec<(F::Call, Option<F::Call>)>,
        parallel: u32,
        join: Join<F>,
    },
    Finish,
    Fail(Failure),
}

/// The compensation a drive registers when its call succeeds.
pub(crate) enum Undo<F: Board> {
    /// Built with the drive: [`Drive::compensate`].
    Call(F::Call),
    /// Built from the reply once the call succeeded: [`Drive::compensate_with`].
    With(UndoWith<F>),
}

/// How a fan-out joins, with its continuations.
pub(crate) enum Join<F> {
    /// Every outcome goes to `each`; `then` runs after the last.
    All { each: Then<F>, then: Wake<F> },
    /// The first success (or, when every branch failed, the last failure) goes to `first`.
    First(Then<F>),
}

impl<F> Clone for Join<F> {
    fn clone(&self) -> Self {
        *self
    }
}
impl<F> Copy for Join<F> {}

impl<F> Join<F> {
    pub(crate) fn is_first(&self) -> bool {
        matches!(self, Join::First(_))
    }
}

impl<F: Board> Command<F> {
    /// Calls a driver; continue with [`Drive::then`].
    pub fn drive<C, R>(call: Call<C, R>) -> Drive<F, R>
    where
        F::Call: From<C>,
        R: Reply,
    {
        Drive {
            call: F::Call::from(call.into_call()),
            undo: None,
            _reply: std::marker::PhantomData,
        }
    }

    /// Calls several drivers at once: a fan-out. Continue with [`FanOut::all`] (every
    /// outcome, then a join) or with [`FanOut::first`] (the first success); bound how many calls are in flight with [`FanOut::parallel`].
    ///
    /// Each item is a call, or a `(call, compensation)` pair for a saga step (see
    /// [`Drive::compensate`]); all calls of a fan-out return the same type. The calls are
    /// encoded and kept in the record when the fan-out is issued (at most 1,024; pass ids,
    /// not data), and each branch has its own idempotency key, `flow/instance/step.branch`.
    /// While the fan-out runs the wire is not run; after a restart or an impulse it must
    /// return a fan-out with the same number of branches calling the same methods (their
    /// arguments are taken from the record, so they may be built from a state the
    /// continuations changed).
    ///
    /// ```
    /// use flowwire::prelude::*;
    ///
    /// # #[derive(Debug, Clone, Serialize, Deserialize, thiserror::Error)]
    /// # #[error("no such section")]
    /// # pub struct Missing;
    /// #[driver]
    /// pub trait Render {
    ///     async fn page(&self, section: u32) -> Result<String, Missing>;
    /// }
    ///
    /// #[derive(Debug, Default, Clone, Serialize, Deserialize)]
    /// pub struct Book {
    ///     sections: Vec<u32>,
    ///     pages: Vec<Option<String>>,
    ///     assembled: bool,
    /// }
    ///
    /// #[flow]
    /// pub struct Printing {
    ///     #[link]
    ///     state: Book,
    ///     #[link]
    ///     render: impl Render,
    /// }
    ///
    /// #[flow]
    /// impl Printing {
    ///     #[wire]
    ///     fn run(&mut self) -> Command<Self> {
    ///         if self.state.assembled {
    ///             return Command::finish();
    ///         }
    ///         Command::fan_out(self.state.sections.iter().map(|s| self.render.page(*s)))
    ///             .parallel(4)
    ///             .all(
    ///                 |f, i, page| {
    ///                     f.state.pages.resize(f.state.sections.len(), None);
    ///                     f.state.pages[i] = Some(page?);
    ///                     Ok(())
    ///                 },
    ///                 |f| { f.state.assembled = true; Ok(()) },
    ///             )
    ///     }
    /// }
    /// ```
    pub fn fan_out<B>(branches: impl IntoIterator<Item = B>) -> FanOut<F, B::Reply>
    where
        B: IntoBranch<F>,
    {
        FanOut {
            calls: branches.into_iter().map(IntoBranch::split).collect(),
            parallel: u32::MAX,
            _reply: std::marker::PhantomData,
        }
    }

    /// Waits until an impulse arrives; the wire runs again after it is applied.
    ///
    /// A waiting instance costs only its record: it is not held in memory.
    pub fn wait() -> Self {
        Self {
            kind: CommandKind::Wait,
        }
    }

    /// Sleeps for `d`, durably: the timer survives restarts, and an engine that was down
    /// when it was due fires it as soon as it is back. Continue with [`Timed::then`],
    /// which runs when the timer fires; then the wire runs again.
    ///
    /// The time is counted from the step that arms the timer. If the wire returns the same
    /// sleep again after an impulse, the timer keeps its time (it is not re-armed). A sleeping
    /// instance costs only its record. Impulses are applied while it sleeps.
    ///
    /// ```
    /// use std::time::Duration;
    /// use flowwire::prelude::*;
    ///
    /// #[derive(Debug, Default, Clone, Serialize, Deserialize)]
    /// pub struct Reminder {
    ///     reminded: bool,
    /// }
    ///
    /// #[flow]
    /// pub struct Remind {
    ///     #[link]
    ///     state: Reminder,
    /// }
    ///
    /// #[flow]
    /// impl Remind {
    ///     #[wire]
    ///     fn run(&mut self) -> Command<Self> {
    ///         if self.state.reminded {
    ///             return Command::finish();
    ///         }
    ///         Command::sleep(Duration::from_hours(24)).then(|f| { f.state.reminded = true; Ok(()) })
    ///     }
    /// }
    /// ```
    pub fn sleep(d: Duration) -> Timed<F> {
        Timed::new(TimeSpec::After(millis(d)), false)
    }

    /// Sleeps until `t` (a time in the past fires at once). See [`Command::sleep`].
    pub fn until(t: SystemTime) -> Timed<F> {
        Timed::new(TimeSpec::At(unix_millis(t)), false)
    }

    /// Waits for an impulse for at most `d`. An impulse that arrives first is applied and
    /// the wire runs again (the continuation does not run); when the time runs out first,
    /// [`Timed::then`]'s continuation runs, then the wire.
    ///
    /// ```
    /// use std::time::Duration;
    /// use flowwire::prelude::*;
    ///
    /// #[derive(Debug, Default, Clone, Serialize, Deserialize)]
    /// pub struct Reminder {
    ///     expired: bool,
    /// }
    ///
    /// #[flow]
    /// pub struct Remind {
    ///     #[link]
    ///     state: Reminder,
    /// }
    ///
    /// #[flow]
    /// impl Remind {
    ///     #[wire]
    ///     fn run(&mut self) -> Command<Self> {
    ///         if self.state.expired {
    ///             return Command::finish();
    ///         }
    ///         Command::wait_timeout(Duration::from_hours(1)).then(|f| { f.state.expired = true; Ok(()) })
    ///     }
    /// }
    /// ```
    pub fn wait_timeout(d: Duration) -> Timed<F> {
        Timed::new(TimeSpec::After(millis(d)), true)
    }

    /// Waits for an impulse until `t`. See [`Command::wait_timeout`].
    pub fn wait_until(t: SystemTime) -> Timed<F> {
        Timed::new(TimeSpec::At(unix_millis(t)), true)
    }

    /// Finishes the flow.
    pub fn finish() -> Self {
        Self {
            kind: CommandKind::Finish,
        }
    }

    /// Fails the flow with a reason.
    ///
    /// When drives registered compensations ([`Drive::compensate`]), the flow first runs
    /// them, last registered first, each to a successful outcome (with its driver's retry
    /// policy; a compensation that still fails parks the instance for an operator, and
    /// resuming it sends that compensation again). The flow ends failed after the last one.
    /// A continuation or a timer's continuation that returns `Err` fails the flow the
    /// same way.
    pub fn fail(reason: impl fmt::Display) -> Self {
        Self {
            kind: CommandKind::Fail(Failure::msg(reason)),
        }
    }

    /// Fails the flow with a typed error: as [`Command::fail`], and the caller gets the
    /// value back with [`Ended::error`](crate::Ended::error) (it is also in the history's
    /// last step and in the `failed` event).
    ///
    /// ```
    /// use flowwire::prelude::*;
    ///
    /// #[derive(Debug, Clone, PartialEq, Serialize, Deserialize, thiserror::Error)]
    /// pub enum SignupError {
    ///     #[error("the email {0} is taken")]
    ///     EmailTaken(String),
    /// }
    ///
    /// #[derive(Debug, Default, Clone, Serialize, Deserialize)]
    /// pub struct Form {
    ///     email: String,
    ///     taken: bool,
    /// }
    ///
    /// #[flow]
    /// pub struct Signup {
    ///     #[link]
    ///     state: Form,
    /// }
    ///
    /// #[flow]
    /// impl Signup {
    ///     #[wire]
    ///     fn run(&mut self) -> Command<Self> {
    ///         if self.state.taken {
    ///             return Command::fail_with(SignupError::EmailTaken(self.state.email.clone()));
    ///         }
    ///         Command::finish()
    ///     }
    /// }
    ///
    /// # #[tokio::main(flavor = "current_thread")]
    /// # async fn main() -> flowwire::Result<()> {
    /// let engine = Engine::builder().in_memory().flow::<Signup>().start().await?;
    /// let form = Form { email: "ann@example.com".into(), taken: true };
    /// let ended = engine.start::<Signup>("s-1", form).await?.finished().await?;
    /// assert_eq!(
    ///     ended.error::<SignupError>(),
    ///     Some(SignupError::EmailTaken("ann@example.com".into()))
    /// );
    /// # Ok(()) }
    /// ```
    pub fn fail_with<E: serde::Serialize + fmt::Display>(error: E) -> Self {
        Self {
            kind: CommandKind::Fail(Failure::typed(&error)),
        }
    }

    /// A short name of the command, for traces.
    pub fn name(&self) -> &'static str {
        match self.kind {
            CommandKind::Drive { .. } => "drive",
            CommandKind::Wait => "wait",
            CommandKind::Timer { wait: false, .. } => "sleep",
            CommandKind::Timer { wait: true, .. } => "wait with a timeout",
            CommandKind::Finish => "finish",
            CommandKind::Fan {
                join: Join::All { .. },
                ..
            } => "fan-out (all)",
            CommandKind::Fan {
                join: Join::First(_),
                ..
            } => "fan-out (first)",
            CommandKind::Fail(_) => "fail",
        }
    }
}

impl<F: Board> fmt::Debug for Command<F> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

/// Milliseconds of a duration, rounded up (a timer never fires early), saturating.
fn millis(d: Duration) -> u64 {
    let ms = d.as_millis() + u128::from(!d.subsec_nanos().is_multiple_of(1_000_000));
    u64::try_from(ms).unwrap_or(u64::MAX)
}

/// Milliseconds since the Unix epoch (0 for earlier times: they fire at once).
fn unix_millis(t: SystemTime) -> u64 {
    t.duration_since(UNIX_EPOCH)
        .map_or(0, |d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX))
}

/// What runs when a timer fires: a non-capturing closure or a plain `fn`.
pub type Wake<F> = fn(&mut F) -> Result<(), Failure>;

/// A timer waiting for its continuation: `Command::sleep(d).then(..)`.
#[must_use = "a timer needs its continuation: add `.then(|flow| ..)`"]
pub struct Timed<F: Board> {
    spec: TimeSpec,
    wait: bool,
    _flow: std::marker::PhantomData<fn(F)>,
}

impl<F: Board> Timed<F> {
    fn new(spec: TimeSpec, wait: bool) -> Self {
        Self {
            spec,
            wait,
            _flow: std::marker::PhantomData,
        }
    }

    /// Sets what happens when the timer fires (before the wire runs again). Returning `Err`
    /// fails the flow. Like a drive's continuation it must not capture anything.
    pub fn then(self, wake: Wake<F>) -> Command<F> {
        Command {
            kind: CommandKind::Timer {
                spec: self.spec,
                wait: self.wait,
                wake,
            },
        }
    }
}

/// A drive waiting for its continuation: `Command::drive(call).then(..)`.
#[must_use = "a drive needs its continuation: add `.then(|flow, outcome| ..)`"]
pub struct Drive<F: Board, R> {
    call: F::Call,
    undo: Option<Undo<F>>,
    _reply: std::marker::PhantomData<fn() -> R>,
}

/// The outcome a continuation receives for a call returning `R`.
pub type Outcome<R> = Result<<R as Reply>::Ok, DriveError<<R as Reply>::Err>>;

/// A continuation: a non-capturing closure or a plain `fn`.
pub type Continuation<F, R> = fn(&mut F, Outcome<R>) -> Result<(), Failure>;

/// A compensation built from the reply of the call it undoes ([`Drive::compensate_with`]):
/// a non-capturing closure or a plain `fn` from the call's `Ok` value to the undoing call.
pub type UndoFrom<R, C, U> = fn(&<R as Reply>::Ok) -> Call<C, U>;

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
    /// runtime's [`Fault`] when the call timed out or panicked on every attempt.
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

/// One branch of a fan-out: a driver call, or a `(call, compensation)` pair.
///
/// Implemented for [`Call`] and for `(Call, Call)`; the reply type of the first call is the
/// branch's.
pub trait IntoBranch<F: Board> {
    /// What the branch's call returns.
    type Reply: Reply;
    /// The call and its compensation, as the flow's call enum.
    #[doc(hidden)]
    fn split(self) -> (F::Call, Option<F::Call>);
}

impl<F: Board, C, R: Reply> IntoBranch<F> for Call<C, R>
where
    F::Call: From<C>,
{
    type Reply = R;
    fn split(self) -> (F::Call, Option<F::Call>) {
        (F::Call::from(self.into_call()), None)
    }
}

impl<F: Board, C, R: Reply, U, S> IntoBranch<F> for (Call<C, R>, Call<U, S>)
where
    F::Call: From<C> + From<U>,
{
    type Reply = R;
    fn split(self) -> (F::Call, Option<F::Call>) {
        (
            F::Call::from(self.0.into_call()),
            Some(F::Call::from(self.1.into_call())),
        )
    }
}

/// A branch's continuation: the flow, the branch's index (its position in the fan-out) and
/// its outcome. A non-capturing closure or a plain `fn`.
pub type Each<F, R> = fn(&mut F, usize, Outcome<R>) -> Result<(), Failure>;

/// A fan-out waiting for its continuation: `Command::fan_out(calls)`.
#[must_use = "a fan-out needs its continuations: add `.all(each, then)` or `.first(..)`"]
pub struct FanOut<F: Board, R> {
    calls: Vec<(F::Call, Option<F::Call>)>,
    parallel: u32,
    _reply: std::marker::PhantomData<fn() -> R>,
}

impl<F: Board, R: Reply> FanOut<F, R> {
    /// Sends at most `n` calls at once (0 counts as 1); the next is sent when one's outcome
    /// is applied. Without it every call is sent at once.
    pub fn parallel(mut self, n: usize) -> Self {
        self.parallel = u32::try_from(n.max(1)).unwrap_or(u32::MAX);
        self
    }

    /// Continues when every branch is done: `each` receives each branch's outcome as it
    /// arrives (with the branch's index), applied as its own durable step; `then` runs
    /// once after the last (at once for a fan-out with no calls), then the wire runs
    /// again. Either returning `Err` fails the flow: the other branches are abandoned
    /// (their outcomes are ignored and queued calls are not sent), and the compensations
    /// registered so far run.
    pub fn all(self, each: Each<F, R>, then: Wake<F>) -> Command<F> {
        Command {
            kind: CommandKind::Fan {
                calls: self.calls,
                parallel: self.parallel,
                join: Join::All {
                    each: Then::each::<R>(each),
                    then,
                },
            },
        }
    }

    /// Continues with the first branch that succeeds: `first` receives its index and value,
    /// the other branches are abandoned (calls in flight may still run; their outcomes are
    /// ignored, and their compensations are not registered) and the wire runs again. When
    /// every branch fails, `first` receives the last failure. With `.parallel(1)` the calls
    /// are tried one after the other until one succeeds.
    ///
    /// A fan-out with no calls has no outcome to continue with: the instance is parked.
    pub fn first(self, first: Each<F, R>) -> Command<F> {
        Command {
            kind: CommandKind::Fan {
                calls: self.calls,
                parallel: self.parallel,
                join: Join::First(Then::each::<R>(first)),
            },
        }
    }
}

/// What reached the continuation: the encoded reply or the runtime's fault.
pub(crate) enum Delivered<'a> {
    Reply(&'a [u8]),
    Fault(&'a Fault),
}

/// What running a continuation produced, besides a changed state.
pub(crate) enum ThenError {
    /// The continuation returned `Err`: the flow fails.
    Failed(Failure),
    /// The reply did not decode as the method's result type.
    Decode(String),
}

/// A continuation with its result type erased, so every drive of a flow fits one type.
#[allow(clippy::type_complexity)] // a fn pointer signature, named once here
pub(crate) struct Then<F> {
    raw: fn(),
    run: fn(fn(), &mut F, Delivered<'_>, usize, usize) -> Result<(), ThenError>,
}

/// A compensation built from a reply ([`UndoFrom`]), with its types erased, so every drive
/// of a flow fits one type.
#[allow(clippy::type_complexity)] // a fn pointer signature, named once here
pub(crate) struct UndoWith<F: Board> {
    raw: fn(),
    run: fn(fn(), &[u8], usize) -> Result<Option<F::Call>, String>,
}

impl<F: Board> Clone for UndoWith<F> {
    fn clone(&self) -> Self {
        *self
    }
}
impl<F: Board> Copy for UndoWith<F> {}

impl<F> Clone for Then<F> {
    fn clone(&self) -> Self {
        *self
    }
}
impl<F> Copy for Then<F> {}
