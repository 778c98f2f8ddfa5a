//! Storage for flowwire: the persisted encoding and the instance stores.
//!
//! * [`codec`] — the versioned envelope every persisted value travels in (magic, codec,
//!   kind, format version, length, CRC-32), with `postcard` inside and a size limit on decode.
//! * [`record`] — what an instance record, a history entry and a step write contain.
//! * [`store`] — the [`InstanceStore`] trait (compare-and-swap on a record version, one
//!   atomic commit for a whole batch of steps) and its backends: [`MemoryStore`] for tests and
//!   [`RedbStore`], the crash-safe embedded default.
//!
//! Users normally reach this crate through the `flowwire` facade.

pub mod codec;
pub mod error;
pub mod record;
pub mod store;

pub use codec::{DEFAULT_DECODE_LIMIT, Kind};
pub use error::{CodecError, StoreError};
pub use record::{
    Expect, HistoryEntry, InstanceKey, PendingCall, Record, Status, StepInput, StepOutput,
    StepResult, StepWrite, Stored,
};
pub use store::{BoxFuture, InstanceStore, MemoryStore, RedbStore};
