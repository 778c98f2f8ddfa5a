//! Storage for flowwire: the persisted encoding, the instance stores and the blob ladder.
//!
//! * [`codec`] — the versioned envelope every persisted value travels in (magic, codec,
//!   kind, format version, length, CRC-32), with `postcard` inside and a size limit on decode.
//! * [`record`] — what an instance record, a history entry and a step write contain.
//! * [`store`] — the [`InstanceStore`] trait (compare-and-swap on a record version, one
//!   commit for a whole batch of steps) and its backends: [`MemoryStore`] for tests,
//!   [`RedbStore`], the crash-safe embedded default, and `RedisStore` (feature `redis`).
//! * [`tier`] — the [`BlobTier`] trait and its backends (memory, embedded, fs, Redis, S3).
//! * [`ladder`] — the [`Ladder`]: which tier a payload goes to by its size, and the
//!   placement, checking and garbage collection of the blobs of every record.
//! * [`layout`] — where an instance's payloads live, for operators.
//! * [`blob`] — payload references and the framing every blob carries.
//! * `bus` (feature `redis`) — multi-process mode: membership, shard leases with fencing
//!   tokens, and the streams between orchestrators, workers and clients.
//!
//! Users normally reach this crate through the `flowwire` facade.

pub mod arena;
pub mod blob;
#[cfg(feature = "redis")]
pub mod bus;
pub mod chunk;
pub mod codec;
pub mod dirs;
pub mod error;
pub mod fuzz;
pub mod join;
mod key;
pub mod ladder;
pub mod layout;
pub mod record;
#[cfg(feature = "redis")]
mod redis_link;
pub mod rope;
pub mod store;
pub mod tier;

pub use blob::{BlobRef, Payload};
pub use codec::{DEFAULT_DECODE_LIMIT, Kind};
pub use error::{BlobError, CodecError, StoreError};
pub use ladder::{GIB, KB, KIB, Ladder, LadderError, MB, MIB, Placement, Retention};
pub use record::{
    Branch, BranchState, Cancel, Compensation, ErrorValue, Expect, Fan, FlowName, HistoryEntry,
    InstanceKey, LiveRecord, PendingCall, Record, Status, StepInput, StepOutput, StepResult,
    StepWrite, Stored, TimeSpec, Timer,
};
pub use rope::{Blob, Rope};
pub use store::{BoxFuture, InstanceStore, MemoryStore, RedbStore};
pub use tier::{BlobTier, Tier, TierError, TierExt};
