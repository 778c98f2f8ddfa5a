//! The instance store: one trait, several backends, one conformance suite.
//!
//! A store holds, per instance, the record (with a version for compare-and-swap), the ids
//! of the impulses applied to it, and the history entries; and four indexes: instances
//! with a call in flight (loaded at start-up), armed timers by due time, parked instances,
//! and live instances by correlation key.
//! [`InstanceStore::commit`] writes a whole batch of steps — of many instances — in one
//! durable transaction, checking each step's conditions inside it; that is what lets the
//! runtime turn many steps into one fsync (group commit).

use std::sync::Arc;

use bytes::Bytes;

use crate::error::StoreError;
use crate::record::{InstanceKey, StepResult, StepWrite, Stored};

mod disk;
mod memory;
mod redb;
#[cfg(feature = "redis")]
pub(crate) mod redis;
mod wal;

pub use self::memory::MemoryStore;
pub use self::redb::RedbStore;
#[cfg(feature = "redis")]
pub use self::redis::{AuditedWrite, RedisStore};

pub use crate::join::BoxFuture;

/// The active instances of a flow: ids with their records.
pub type ActiveList = Vec<(Arc<str>, Stored)>;

/// Damaged instances with why, in id order (see [`InstanceStore::damaged`]).
pub type DamagedList = Vec<(Arc<str>, String)>;

/// Timers of a flow: instance ids with the time they are due (ms since the Unix epoch).
pub type DueList = Vec<(Arc<str>, u64)>;

/// Durable storage of instance records, applied impulse ids and history.
///
/// Every method is cancel-safe in the sense that matters: a dropped future either commits
/// the whole batch or nothing, never part of it.
pub trait InstanceStore: Send + Sync + 'static {
    /// Commits a batch of steps durably. Each step is atomic: its conditions are checked and
    /// its whole write (record, impulse id, history entry, pruning) is applied, or it is
    /// reported and skipped. Results are in batch order. Embedded backends commit the whole
    /// batch in one transaction; a shared backend may have applied some steps of a batch
    /// whose call failed (their retry then reports a conflict, and the runtime reloads).
    ///
    /// A batch holds at most one step per instance.
    ///
    /// The future does not borrow the store: the runtime keeps one batch's commit in
    /// flight while it prepares the next, and polls it from the loop that owns the store.
    /// A store whose commit completes at once (the in-memory one) should do its work
    /// before returning, so that the first poll answers.
    fn commit(
        &self,
        batch: Vec<StepWrite>,
    ) -> BoxFuture<'static, Result<Vec<StepResult>, StoreError>>;

    /// Reads an instance's record.
    fn load<'a>(
        &'a self,
        key: &'a InstanceKey,
    ) -> BoxFuture<'a, Result<Option<Stored>, StoreError>>;

    /// Lists the active instances of a flow (those with a driver call in flight: the
    /// [`StepWrite::active`] index), with their records.
    fn active<'a>(&'a self, flow: &'a str) -> BoxFuture<'a, Result<ActiveList, StoreError>>;

    /// Every record of a flow, whatever its instance's status, in id order: a full scan
    /// (the indexes list only what some part of the engine must find), for tools that must
    /// see every instance, such as `Engine::check_upgrade`; never on the engine's path.
    ///
    /// The default answers [`StoreError::Backend`], saying the store cannot list them.
    fn records<'a>(&'a self, flow: &'a str) -> BoxFuture<'a, Result<ActiveList, StoreError>> {
        Box::pin(std::future::ready(Err(StoreError::Backend(format!(
            "this store cannot list every record of flow `{flow}`: it does not implement `InstanceStore::records`"
        )))))
    }

    /// Reads up to `limit` history entries of an instance, starting at step `from`.
    fn history<'a>(
        &'a self,
        key: &'a InstanceKey,
        from: u64,
        limit: usize,
    ) -> BoxFuture<'a, Result<Vec<(u64, Bytes)>, StoreError>>;

    /// The step that applied an impulse id to an instance, if it was applied.
    fn impulse_applied<'a>(
        &'a self,
        key: &'a InstanceKey,
        impulse_id: &'a str,
    ) -> BoxFuture<'a, Result<Option<u64>, StoreError>>;

    /// The armed timers of a flow due at or before `until_ms`, earliest first, at most
    /// `limit` (the timer index written by [`StepWrite::timer`]).
    ///
    /// A shared backend may list an entry its record no longer has (the index sits apart
    /// from the record); the runtime checks the record and repairs the entry with
    /// [`InstanceStore::retime`].
    fn due<'a>(
        &'a self,
        flow: &'a str,
        until_ms: u64,
        limit: usize,
    ) -> BoxFuture<'a, Result<DueList, StoreError>>;

    /// Marks an instance whose record or payloads cannot be read as damaged, saying why
    /// (`None` clears the mark). The record stays as it is, for an operator to inspect;
    /// [`InstanceStore::damaged`] lists the marks.
    fn mark_damaged<'a>(
        &'a self,
        key: &'a InstanceKey,
        reason: Option<&'a str>,
    ) -> BoxFuture<'a, Result<(), StoreError>>;

    /// The damaged instances of a flow with why, in id order after `after`, at most
    /// `limit`.
    fn damaged<'a>(
        &'a self,
        flow: &'a str,
        after: Option<&'a str>,
        limit: usize,
    ) -> BoxFuture<'a, Result<DamagedList, StoreError>>;

    /// Deletes an instance for good: its record, its applied impulse ids, its history, its
    /// entries in the indexes, its damaged mark. Deleting an absent instance does nothing.
    fn delete<'a>(&'a self, key: &'a InstanceKey) -> BoxFuture<'a, Result<(), StoreError>>;

    /// What makes the store fail writes now, if anything: a transient condition it
    /// expects to recover from by itself (a full disk, an unreachable server) or a
    /// permanent one (a damaged or stopped store). Answers at once, without I/O: it is what
    /// `Engine::health` reports beside its own read. `None` by default.
    fn fault(&self) -> Option<StoreError> {
        None
    }

    /// Whether the store computes the checksums of the records and history entries it is
    /// given when it hands them out rather than being given them computed: a store that
    /// keeps them in this process's memory, where nothing at rest needs one (see
    /// [`codec::Checksums`](crate::codec::Checksums)). When it does, the engine seals its
    /// steps with [`Checksums::OnRead`](crate::codec::Checksums::OnRead), and the store
    /// stamps each value of such a step ([`codec::stamp_owned`](crate::codec::stamp_owned))
    /// before it answers it from [`load`](Self::load), [`records`](Self::records),
    /// [`active`](Self::active) or [`history`](Self::history), so that what it hands out is
    /// what it would have been given. `false` by default: every other store is given
    /// every step with its checksums written, as [`StepWrite::checksums`] says.
    fn checksums_on_read(&self) -> bool {
        false
    }

    /// Whether the store puts a step's [`StepWrite::sends`] on the bus in the step's own
    /// atomic write (each message is out if and only if its step committed). When it does
    /// not (the default), the runtime sends them itself after the commit.
    fn carries_sends(&self) -> bool {
        false
    }

    /// How many shards the store splits each flow's instances into (multi-process mode:
    /// each shard is owned by one orchestrator at a time). Embedded stores have one.
    fn shards(&self) -> u16 {
        1
    }

    /// The shard an instance belongs to: a stable hash of its id (see [`shard_of`]).
    fn shard_of(&self, id: &str) -> u16 {
        shard_of(id, self.shards())
    }

    /// The active instances of one shard of a flow (see [`InstanceStore::active`]).
    fn active_in<'a>(
        &'a self,
        flow: &'a str,
        shard: u16,
    ) -> BoxFuture<'a, Result<ActiveList, StoreError>> {
        let _ = shard;
        self.active(flow)
    }

    /// The armed timers of one shard of a flow (see [`InstanceStore::due`]).
    fn due_in<'a>(
        &'a self,
        flow: &'a str,
        shard: u16,
        until_ms: u64,
        limit: usize,
    ) -> BoxFuture<'a, Result<DueList, StoreError>> {
        let _ = shard;
        self.due(flow, until_ms, limit)
    }

    /// Repairs the timer index of an instance whose entry due at `stale` does not match its
    /// record: removes that entry (if it is still at `stale`) and indexes `actual`.
    fn retime<'a>(
        &'a self,
        key: &'a InstanceKey,
        stale: u64,
        actual: Option<u64>,
    ) -> BoxFuture<'a, Result<(), StoreError>>;

    /// The parked (quarantined) instances of a flow, in id order, after `after`, at most
    /// `limit`.
    fn parked<'a>(
        &'a self,
        flow: &'a str,
        after: Option<&'a str>,
        limit: usize,
    ) -> BoxFuture<'a, Result<Vec<Arc<str>>, StoreError>>;

    /// The instances of a flow indexed under a correlation key (written by
    /// [`StepWrite::correlation`]), in id order, at most `limit`. Ended instances are not
    /// listed.
    fn correlated<'a>(
        &'a self,
        flow: &'a str,
        key: &'a str,
        limit: usize,
    ) -> BoxFuture<'a, Result<Vec<Arc<str>>, StoreError>>;

    /// The instances of a flow that ended while they carried a correlation key (written
    /// by [`StepWrite::ended_key`]), in id order, at most `limit`; kept until the instance
    /// is deleted. What a retry by key needs to learn whether its impulse was applied.
    fn ended_with_key<'a>(
        &'a self,
        flow: &'a str,
        key: &'a str,
        limit: usize,
    ) -> BoxFuture<'a, Result<Vec<Arc<str>>, StoreError>>;
}

impl<S: InstanceStore + ?Sized> InstanceStore for Arc<S> {
    fn records<'a>(&'a self, flow: &'a str) -> BoxFuture<'a, Result<ActiveList, StoreError>> {
        (**self).records(flow)
    }
    fn ended_with_key<'a>(
        &'a self,
        flow: &'a str,
        key: &'a str,
        limit: usize,
    ) -> BoxFuture<'a, Result<Vec<Arc<str>>, StoreError>> {
        (**self).ended_with_key(flow, key, limit)
    }
    fn fault(&self) -> Option<StoreError> {
        (**self).fault()
    }
    fn mark_damaged<'a>(
        &'a self,
        key: &'a InstanceKey,
        reason: Option<&'a str>,
    ) -> BoxFuture<'a, Result<(), StoreError>> {
        (**self).mark_damaged(key, reason)
    }
    fn damaged<'a>(
        &'a self,
        flow: &'a str,
        after: Option<&'a str>,
        limit: usize,
    ) -> BoxFuture<'a, Result<DamagedList, StoreError>> {
        (**self).damaged(flow, after, limit)
    }
    fn delete<'a>(&'a self, key: &'a InstanceKey) -> BoxFuture<'a, Result<(), StoreError>> {
        (**self).delete(key)
    }
    fn commit(
        &self,
        batch: Vec<StepWrite>,
    ) -> BoxFuture<'static, Result<Vec<StepResult>, StoreError>> {
        (**self).commit(batch)
    }
    fn load<'a>(
        &'a self,
        key: &'a InstanceKey,
    ) -> BoxFuture<'a, Result<Option<Stored>, StoreError>> {
        (**self).load(key)
    }
    fn active<'a>(&'a self, flow: &'a str) -> BoxFuture<'a, Result<ActiveList, StoreError>> {
        (**self).active(flow)
    }
    fn history<'a>(
        &'a self,
        key: &'a InstanceKey,
        from: u64,
        limit: usize,
    ) -> BoxFuture<'a, Result<Vec<(u64, Bytes)>, StoreError>> {
        (**self).history(key, from, limit)
    }
    fn impulse_applied<'a>(
        &'a self,
        key: &'a InstanceKey,
        impulse_id: &'a str,
    ) -> BoxFuture<'a, Result<Option<u64>, StoreError>> {
        (**self).impulse_applied(key, impulse_id)
    }
    fn due<'a>(
        &'a self,
        flow: &'a str,
        until_ms: u64,
        limit: usize,
    ) -> BoxFuture<'a, Result<DueList, StoreError>> {
        (**self).due(flow, until_ms, limit)
    }
    fn retime<'a>(
        &'a self,
        key: &'a InstanceKey,
        stale: u64,
        actual: Option<u64>,
    ) -> BoxFuture<'a, Result<(), StoreError>> {
        (**self).retime(key, stale, actual)
    }
    fn carries_sends(&self) -> bool {
        (**self).carries_sends()
    }
    fn checksums_on_read(&self) -> bool {
        (**self).checksums_on_read()
    }

    fn shards(&self) -> u16 {
        (**self).shards()
    }
    fn active_in<'a>(
        &'a self,
        flow: &'a str,
        shard: u16,
    ) -> BoxFuture<'a, Result<ActiveList, StoreError>> {
        (**self).active_in(flow, shard)
    }
    fn due_in<'a>(
        &'a self,
        flow: &'a str,
        shard: u16,
        until_ms: u64,
        limit: usize,
    ) -> BoxFuture<'a, Result<DueList, StoreError>> {
        (**self).due_in(flow, shard, until_ms, limit)
    }
    fn parked<'a>(
        &'a self,
        flow: &'a str,
        after: Option<&'a str>,
        limit: usize,
    ) -> BoxFuture<'a, Result<Vec<Arc<str>>, StoreError>> {
        (**self).parked(flow, after, limit)
    }
    fn correlated<'a>(
        &'a self,
        flow: &'a str,
        key: &'a str,
        limit: usize,
    ) -> BoxFuture<'a, Result<Vec<Arc<str>>, StoreError>> {
        (**self).correlated(flow, key, limit)
    }
}

/// The shard of an instance id among `shards`: CRC-32 of the id, modulo the count. Stable
/// across processes, versions and platforms (every process of a deployment must agree).
///
/// ```
/// use flowwire::storage::store::shard_of;
/// assert_eq!(shard_of("order-1", 1), 0);
/// assert!(shard_of("order-1", 16) < 16);
/// assert_eq!(shard_of("order-1", 16), shard_of("order-1", 16));
/// ```
pub fn shard_of(id: &str, shards: u16) -> u16 {
    (crc32fast::hash(id.as_bytes()) % u32::from(shards.max(1))) as u16
}

#[cfg(any(test, feature = "conformance"))]
pub mod conformance;
