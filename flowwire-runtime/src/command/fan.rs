//! [`FanOut`]: several driver calls at once, and how they join.

use crate::board::Board;
use crate::child::{ChildCall, ChildReply, ChildStart};
use crate::driver::{Call, Reply};

use super::erase::{Each, Then};
use super::kind::{Command, CommandKind, Join, Wake};

/// One branch of a fan-out: a driver call, or a `(call, compensation)` pair.
///
/// Implemented for [`Call`], for `(Call, Call)` (the reply type of the first call is the
/// branch's) and for a child flow to start, [`ChildStart`].
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

impl<F: Board, G: Board> IntoBranch<F> for ChildStart<G>
where
    F::Call: From<ChildCall>,
{
    type Reply = ChildReply<G>;
    fn split(self) -> (F::Call, Option<F::Call>) {
        (F::Call::from(self.call().into_call()), None)
    }
}

/// A fan-out waiting for its continuation: `Command::fan_out(calls)`.
#[must_use = "a fan-out needs its continuations: add `.all(each, then)` or `.first(..)`"]
pub struct FanOut<F: Board, R> {
    pub(super) calls: Vec<(F::Call, Option<F::Call>)>,
    pub(super) parallel: u32,
    pub(super) _reply: std::marker::PhantomData<fn() -> R>,
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
