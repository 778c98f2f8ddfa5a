//! [`Command`]: what a wire returns.

use std::fmt;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use flowwire_storage::TimeSpec;

use crate::driver::{Call, DriveError, Fault, Reply};
use crate::failure::Failure;
use crate::flow::Board;

/// What the wire asks the runtime to do next.
///
/// Building a command allocates nothing when the call's arguments do not: the call is
/// stored inline and the continuation is a plain `fn` pointer.
///
/// ```ignore
/// Command::drive(self.payment.charge(9_995))
///     .then(|f, r| { f.state.charge = Some(r?); Ok(()) })
/// ```
#[must_use = "a wire's command is its return value"]
pub struct Command<F: Board> {
    pub(crate) kind: CommandKind<F>,
}

pub(crate) enum CommandKind<F: Board> {
    Drive {
        call: F::Call,
        then: Then<F>,
        undo: Option<F::Call>,
    },
    Wait,
    Timer {
        spec: TimeSpec,
        wait: bool,
        wake: Wake<F>,
    },
    Finish,
    Fail(Failure),
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
    /// ```ignore
    /// Command::sleep(Duration::from_secs(24 * 3600)).then(|f| { f.state.reminded = true; Ok(()) })
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
    /// ```ignore
    /// Command::wait_timeout(Duration::from_secs(3600)).then(|f| { f.state.expired = true; Ok(()) })
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

    /// A short name of the command, for traces.
    pub fn name(&self) -> &'static str {
        match self.kind {
            CommandKind::Drive { .. } => "drive",
            CommandKind::Wait => "wait",
            CommandKind::Timer { wait: false, .. } => "sleep",
            CommandKind::Timer { wait: true, .. } => "wait with a timeout",
            CommandKind::Finish => "finish",
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
    undo: Option<F::Call>,
    _reply: std::marker::PhantomData<fn() -> R>,
}

/// The outcome a continuation receives for a call returning `R`.
pub type Outcome<R> = Result<<R as Reply>::Ok, DriveError<<R as Reply>::Err>>;

/// A continuation: a non-capturing closure or a plain `fn`.
pub type Continuation<F, R> = fn(&mut F, Outcome<R>) -> Result<(), Failure>;

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
    /// ```ignore
    /// Command::drive(self.hotel.book(trip, nights))
    ///     .compensate(self.hotel.cancel(trip))
    ///     .then(|f, r| { f.state.hotel = Some(r?); Ok(()) })
    /// ```
    pub fn compensate<C>(mut self, undo: Call<C, impl Reply>) -> Self
    where
        F::Call: From<C>,
    {
        self.undo = Some(F::Call::from(undo.into_call()));
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
    run: fn(fn(), &mut F, Delivered<'_>, usize) -> Result<(), ThenError>,
}

impl<F> Clone for Then<F> {
    fn clone(&self) -> Self {
        *self
    }
}
impl<F> Copy for Then<F> {}

#[allow(unsafe_code)]
mod erase {
    use super::{Continuation, Delivered, DriveError, Then, ThenError};
    use crate::driver::Reply;
    use crate::flow::Board;

    impl<F: Board> Then<F> {
        pub(crate) fn new<R: Reply>(k: Continuation<F, R>) -> Self {
            // SAFETY: transmuting between function pointer types is sound; `raw` is only
            // ever called after `run::<F, R>` transmutes it back to this exact type.
            let raw = unsafe { std::mem::transmute::<Continuation<F, R>, fn()>(k) };
            Self {
                raw,
                run: run::<F, R>,
            }
        }

        pub(crate) fn call(
            self,
            flow: &mut F,
            delivered: Delivered<'_>,
            limit: usize,
        ) -> Result<(), ThenError> {
            (self.run)(self.raw, flow, delivered, limit)
        }
    }

    fn run<F: Board, R: Reply>(
        raw: fn(),
        flow: &mut F,
        delivered: Delivered<'_>,
        limit: usize,
    ) -> Result<(), ThenError> {
        // SAFETY: `raw` was made from a `Continuation<F, R>` in `Then::new::<R>`, which is
        // the only place that pairs it with `run::<F, R>`.
        let k = unsafe { std::mem::transmute::<fn(), Continuation<F, R>>(raw) };
        let outcome = match delivered {
            Delivered::Reply(bytes) => {
                match flowwire_storage::codec::decode_raw::<R>(bytes, limit) {
                    Ok(reply) => reply.into_result().map_err(DriveError::Driver),
                    Err(e) => return Err(ThenError::Decode(e.to_string())),
                }
            }
            Delivered::Fault(fault) => Err(DriveError::Runtime(fault.clone())),
        };
        k(flow, outcome).map_err(ThenError::Failed)
    }
}
