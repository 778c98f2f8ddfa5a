//! [`Ended`]: how an instance ended, as `finished()` reports it.

/// How an instance ended.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Ended {
    /// The wire returned `Command::finish()`.
    Finished,
    /// The wire returned `Command::fail(..)`, or a continuation returned `Err`.
    Failed {
        /// Why.
        reason: String,
    },
}
