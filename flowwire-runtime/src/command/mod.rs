//! [`Command`]: what a wire returns.
//!
//! The files: `kind.rs` the command and its kinds; this one the constructors and timers;
//! `drive.rs` a driver call and its compensation; `fan.rs` fan-outs; `erase.rs` the
//! continuations' types and their erasure (the leaf the others use).

mod drive;
mod erase;
mod fan;
mod kind;

pub use drive::Drive;
pub use erase::{Continuation, Each, Outcome, UndoFrom};
pub(crate) use erase::{Delivered, Then, ThenError};
pub use fan::{FanOut, IntoBranch};
pub use kind::{Command, Wake};
pub(crate) use kind::{CommandKind, Join, Undo};

use std::fmt;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use flowwire_storage::TimeSpec;

use crate::board::Board;
use crate::child::{ChildCall, ChildReply, ChildStart};
use crate::driver::{Call, Reply};
use crate::failure::Failure;

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

    /// Starts child flow `G`'s instance `id` from `state` and waits, durably, for its end;
    /// continue with [`Drive::then`], whose outcome is the child's [`Child`](crate::Child):
    /// how it ended (finished, failed with its typed failure, or cancelled) and its last
    /// state. The short form of `Command::drive(ChildStart::<G>::new(id, state).call())`.
    ///
    /// The child is an instance like any other (reach it with `engine.handle::<G>(id)`);
    /// `G` must be registered on the engine. The call is kept in the parent's record, so a
    /// crash of either side loses nothing: after a restart the parent attaches to the
    /// child it started (a child is never started twice), and an ended child's end is
    /// delivered at once. While the child runs, the parent holds no driver worker; it stays
    /// in memory like any instance with a call in flight.
    ///
    /// When the parent is cancelled or fails while the child runs, the child is cancelled
    /// first (a durable compensation), unless it was started [`ChildStart::detached`]. A
    /// fan-out of children is a [`Command::fan_out`] of [`ChildStart`]s.
    ///
    /// ```
    /// use flowwire::prelude::*;
    ///
    /// #[derive(Debug, Default, Clone, Serialize, Deserialize)]
    /// pub struct Parcel { weight: u32, label: Option<String> }
    ///
    /// #[flow]
    /// pub struct Ship { #[link] state: Parcel }
    ///
    /// #[flow]
    /// impl Ship {
    ///     #[wire]
    ///     fn run(&mut self) -> Command<Self> {
    ///         if self.state.weight > 30 {
    ///             return Command::fail("too heavy");
    ///         }
    ///         self.state.label = Some(format!("{} kg", self.state.weight));
    ///         Command::finish()
    ///     }
    /// }
    ///
    /// #[derive(Debug, Default, Clone, Serialize, Deserialize)]
    /// pub struct Sale { id: u64, label: Option<String>, refused: Option<String> }
    ///
    /// #[flow]
    /// pub struct Order { #[link] state: Sale }
    ///
    /// #[flow]
    /// impl Order {
    ///     #[wire]
    ///     fn run(&mut self) -> Command<Self> {
    ///         if self.state.label.is_some() || self.state.refused.is_some() {
    ///             return Command::finish();
    ///         }
    ///         let parcel = Parcel { weight: 12, label: None };
    ///         Command::child::<Ship>(format!("ship-{}", self.state.id), parcel).then(|f, child| {
    ///             let child = child?;
    ///             match child.ended {
    ///                 Ended::Finished => f.state.label = child.state.label,
    ///                 other => f.state.refused = Some(format!("{other:?}")),
    ///             }
    ///             Ok(())
    ///         })
    ///     }
    /// }
    ///
    /// # #[tokio::main(flavor = "current_thread")]
    /// # async fn main() -> flowwire::Result<()> {
    /// let engine = Engine::builder().in_memory().flow::<Order>().flow::<Ship>().start().await?;
    /// let order = engine.start::<Order>("o-7", Sale { id: 7, ..Default::default() }).await?;
    /// assert_eq!(order.finished().await?, Ended::Finished);
    /// assert_eq!(order.state().await?.label.as_deref(), Some("12 kg"));
    /// assert_eq!(engine.handle::<Ship>("ship-7").await?.finished().await?, Ended::Finished);
    /// # Ok(()) }
    /// ```
    pub fn child<G: Board>(id: impl Into<String>, state: G::State) -> Drive<F, ChildReply<G>>
    where
        F::Call: From<ChildCall>,
    {
        Self::drive(ChildStart::<G>::new(id, state).call())
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
