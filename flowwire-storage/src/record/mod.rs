//! What the stores persist: instance records, history entries and the step writes that
//! carry them.
//!
//! A step of an instance is one [`StepWrite`]: the new record (compare-and-swap on its
//! version), the impulse id it applied (insert-if-absent, which is what makes impulses
//! exactly-once), and its history entry. A store commits a whole batch of step writes in
//! one durable transaction (group commit) and reports a [`StepResult`] for each.
//!
//! The files: `model.rs` the logical record; `placed.rs` the persisted record and its
//! older formats; `persisted.rs` what a writer keeps of it between steps; `history.rs` history entries; `step.rs` the step write a store commits.

mod direct;
mod history;
#[cfg(test)]
mod manifest_tests;
mod model;
mod persisted;
mod placed;
mod step;
#[cfg(test)]
mod tests;

pub use self::history::{HistoryEntry, StepInput, StepOutput};
pub(crate) use self::history::{HistoryEntryRef, PayloadRef};
pub use self::model::{
    Branch, BranchState, Cancel, Compensation, ErrorValue, Fan, LiveRecord, PendingCall, Record,
    Status, TimeSpec, Timer,
};
pub use self::persisted::Persisted;
pub(crate) use self::persisted::persisted_correlation;
pub use self::placed::{PlacedCall, PlacedRecord, Retired};
pub use self::step::{BusSend, Draft, Expect, StepResult, StepWrite, Stored};
pub use crate::key::{FlowName, InstanceKey};
