//! [`Command`]: what a wire returns.

use std::fmt;

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
    Drive { call: F::Call, then: Then<F> },
    Wait,
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
            _reply: std::marker::PhantomData,
        }
    }

    /// Waits until an impulse arrives; the wire runs again after it is applied.
    pub fn wait() -> Self {
        Self {
            kind: CommandKind::Wait,
        }
    }

    /// Finishes the flow.
    pub fn finish() -> Self {
        Self {
            kind: CommandKind::Finish,
        }
    }

    /// Fails the flow with a reason.
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

/// A drive waiting for its continuation: `Command::drive(call).then(..)`.
#[must_use = "a drive needs its continuation: add `.then(|flow, outcome| ..)`"]
pub struct Drive<F: Board, R> {
    call: F::Call,
    _reply: std::marker::PhantomData<fn() -> R>,
}

/// The outcome a continuation receives for a call returning `R`.
pub type Outcome<R> = Result<<R as Reply>::Ok, DriveError<<R as Reply>::Err>>;

/// A continuation: a non-capturing closure or a plain `fn`.
pub type Continuation<F, R> = fn(&mut F, Outcome<R>) -> Result<(), Failure>;

impl<F: Board, R: Reply> Drive<F, R> {
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
