//! What a command is made of: [`Command`] and its kinds, and the erased continuations it
//! carries. A leaf: the builders (`mod.rs`, `drive.rs`, `fan.rs`) and the erasure
//! (`erase.rs`) use it.

use flowwire_storage::TimeSpec;

use crate::board::Board;
use crate::failure::Failure;

use super::erase::{Then, UndoWith};

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
    /// Built with the drive: [`Drive::compensate`](super::Drive::compensate).
    Call(F::Call),
    /// Built from the reply once the call succeeded:
    /// [`Drive::compensate_with`](super::Drive::compensate_with).
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

/// What runs when a timer fires: a non-capturing closure or a plain `fn`.
pub type Wake<F> = fn(&mut F) -> Result<(), Failure>;
