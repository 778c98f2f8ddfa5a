//! [`Operation`]: what an operator does to a parked instance. Low in the crate: the
//! handle protocol carries it to the runner, and the core applies it.

use bytes::Bytes;

use crate::board::Board;

/// An operator's change to a parked instance's state.
pub type Patch<F> = Box<dyn FnOnce(&mut <F as Board>::State) + Send>;

/// What an operator does to a parked instance.
pub enum Operation<F: Board> {
    /// Runs it again: sends its call in flight again (or the compensation in flight, for a
    /// failing flow), or runs the wire.
    Resume,
    /// Changes its state with a closure (it stays parked).
    Patch(Patch<F>),
    /// Puts back the state recorded at a step of its history (it stays parked, with no
    /// call in flight and no failure).
    Rewind {
        /// The step.
        to: u64,
        /// The state recorded then, encoded.
        state: Bytes,
    },
}

impl<F: Board> Operation<F> {
    /// The operation's name, for messages.
    pub fn name(&self) -> &'static str {
        match self {
            Operation::Resume => "resume",
            Operation::Patch(_) => "patch",
            Operation::Rewind { .. } => "rewind",
        }
    }
}
