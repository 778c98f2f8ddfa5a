//! A step's write as a store receives it ([`StepWrite`]), its condition, its result, and
//! a stored record as read back.

use std::sync::Arc;

use bytes::Bytes;
use serde::{Deserialize, Serialize};

use crate::codec::Checksums;
use crate::key::InstanceKey;

use super::history::{StepInput, StepOutput};
use super::model::LiveRecord;

/// The condition a step write puts on the stored record.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum Expect {
    /// No record may exist (a start).
    Absent,
    /// The stored record must have this version.
    Version(u64),
}

/// One step of one instance before its payloads are placed: what the runtime's core hands
/// to [`Placement::seal`](crate::ladder::Placement::seal).
#[derive(Debug, Clone)]
pub struct Draft {
    /// The instance.
    pub key: InstanceKey,
    /// Compare-and-swap condition on the stored record.
    pub expect: Expect,
    /// The version the new record gets.
    pub version: u64,
    /// The new record (its state a rope: large blobs by reference).
    pub record: LiveRecord,
    /// The impulse id this step applies.
    pub impulse: Option<Arc<str>>,
    /// What came in.
    pub input: StepInput,
    /// What went out.
    pub output: StepOutput,
    /// The input's payload (encoded impulse or reply), for history.
    pub payload: Option<Bytes>,
    /// When the step was taken, in milliseconds since the Unix epoch.
    pub at_ms: u64,
}

/// One step of one instance, as handed to [`InstanceStore::commit`](crate::InstanceStore::commit).
///
/// Serializable: the embedded store logs batches of them (see its write-ahead log).
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct StepWrite {
    /// The instance.
    pub key: InstanceKey,
    /// Compare-and-swap condition on the stored record.
    pub expect: Expect,
    /// The version the new record gets.
    pub version: u64,
    /// The step's number (recorded with an applied impulse id).
    pub seq: u64,
    /// The encoded [`PlacedRecord`](crate::record::PlacedRecord) (in its envelope).
    pub record: Bytes,
    /// Whether the instance has a driver call in flight after the step (the store keeps an
    /// index of these "active" instances so that start-up recovery reads only them).
    pub active: bool,
    /// Whether the instance is parked after the step (the store keeps an index of parked
    /// instances for operators).
    pub parked: bool,
    /// The instance's armed timer after the step, when it is due (ms since the Unix
    /// epoch); the store keeps an index by due time.
    pub timer: Option<u64>,
    /// The instance's correlation key after the step (`None` once it ended); the store
    /// keeps an index from `(flow, key)` to instance ids.
    pub correlation: Option<Arc<str>>,
    /// The key the previous record was indexed under, when it differs from
    /// [`StepWrite::correlation`]: the store drops that entry.
    pub uncorrelate: Option<Arc<str>>,
    /// The correlation key of an instance that has ended, set by the steps of an ended
    /// instance: the store keeps it ([`InstanceStore::ended_with_key`](crate::InstanceStore::ended_with_key))
    /// until the instance is deleted, so that an impulse retried by key after the instance
    /// ended is told it was applied rather than that no instance has the key.
    pub ended_key: Option<Arc<str>>,
    /// The impulse id this step applied: the step commits only if the id was never
    /// applied to this instance before.
    pub impulse: Option<Arc<str>>,
    /// The step's history entry: its number and encoded [`HistoryEntry`](crate::record::HistoryEntry).
    pub history: Option<(u64, Bytes)>,
    /// Delete the instance's history entries before this step (history retention).
    pub prune_below: Option<u64>,
    /// The writer's fencing token (multi-process mode): a shared store refuses the step
    /// ([`StepResult::Fenced`]) if a higher token was granted for the instance's shard, or
    /// the record was last written with one, so an orchestrator that lost its lease cannot
    /// write after a newer owner took over. `None`: no check (one process owns every
    /// instance).
    pub fence: Option<u64>,
    /// Multi-process mode: the entry of the shard's outcome stream whose outcome this step
    /// applies. A shared store acknowledges it with the step, in the same atomic write,
    /// so an outcome is settled exactly when its step is durable. `None`
    /// elsewhere (other stores have no streams).
    pub acknowledges: Option<Arc<str>>,
    /// Multi-process mode: messages to put on the bus with the step — the driver calls it
    /// dispatches, the announcement that it ended its instance — when the store carries
    /// them ([`InstanceStore::carries_sends`](crate::InstanceStore::carries_sends)). Such a
    /// store sends them in the step's own atomic write: each is on the bus if and only if
    /// the step committed. Empty elsewhere; never logged by the embedded stores.
    #[serde(skip)]
    pub sends: Vec<BusSend>,
    /// When the checksums of [`StepWrite::record`] and [`StepWrite::history`] are
    /// computed: when they were encoded ([`Checksums::Written`], what every store is
    /// given), or when the store hands them out ([`Checksums::OnRead`], only for a store
    /// whose [`InstanceStore::checksums_on_read`](crate::InstanceStore::checksums_on_read)
    /// is true, which stamps them with [`codec::stamp_owned`](crate::codec::stamp_owned)).
    /// Never logged: a logged write is always one with its checksums written.
    #[serde(skip)]
    pub checksums: Checksums,
}

impl StepWrite {
    /// A step that writes `record` as version `version` of the instance `key` when the
    /// stored record meets `expect`, numbered `version`, and nothing else: no index entry
    /// (not active, not parked, no timer or correlation key), no impulse id, no history
    /// entry, no fencing token, no bus message. Set the other fields on it, with struct
    /// update syntax or one by one.
    ///
    /// ```
    /// use flowwire::storage::record::{Expect, InstanceKey, StepWrite};
    /// let key = InstanceKey::new("Order", "order-1");
    /// let first = StepWrite {
    ///     active: true,
    ///     history: Some((1, b"entry".as_slice().into())),
    ///     ..StepWrite::new(key, Expect::Absent, 1, b"record".as_slice().into())
    /// };
    /// assert_eq!((first.version, first.seq), (1, 1));
    /// assert!(first.timer.is_none() && first.sends.is_empty());
    /// ```
    #[must_use]
    pub fn new(key: InstanceKey, expect: Expect, version: u64, record: Bytes) -> Self {
        Self {
            key,
            expect,
            version,
            seq: version,
            record,
            active: false,
            parked: false,
            timer: None,
            correlation: None,
            uncorrelate: None,
            ended_key: None,
            impulse: None,
            history: None,
            prune_below: None,
            fence: None,
            acknowledges: None,
            sends: Vec::new(),
            checksums: Checksums::Written,
        }
    }
}

/// A message a [`StepWrite`] puts on the deployment's bus when it commits (see
/// [`StepWrite::sends`]).
///
/// ```
/// use flowwire::storage::record::BusSend;
/// let call = BusSend::Append { stream: "fw:jobs:{Payments}".into(), body: b"call".as_slice().into() };
/// let ended = BusSend::Publish { channel: "fw:ended:Order".into(), body: b"order-1".as_slice().into() };
/// let done = BusSend::Settle {
///     stream: "fw:req:{Order#3}".into(),
///     group: "orchestrators".into(),
///     entry: "1700000000000-0".into(),
/// };
/// assert_ne!(call, ended);
/// assert_ne!(ended, done);
/// ```
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum BusSend {
    /// An entry appended to a stream (its one field `m` holds the body).
    Append {
        /// The stream's key.
        stream: String,
        /// The entry's bytes.
        body: Bytes,
    },
    /// A message published on a channel (for whoever listens now; not kept).
    Publish {
        /// The channel.
        channel: String,
        /// The message's bytes.
        body: Bytes,
    },
    /// A stream entry the step settles: acknowledged in `group` with the step (a request
    /// the step applies, or the call whose outcome it applies: the entry is done with
    /// exactly when the step is durable). The store trims settled entries from the
    /// stream's front in bulk.
    Settle {
        /// The stream's key.
        stream: String,
        /// The consumer group that acknowledges it (no spaces).
        group: String,
        /// The entry's id.
        entry: String,
    },
}

/// The fate of one [`StepWrite`] in a committed batch.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum StepResult {
    /// Durably written.
    Committed,
    /// Not written: the stored record's version differs from the expectation.
    Conflict {
        /// The version found (`None`: no record).
        found: Option<u64>,
    },
    /// Not written: the impulse id was already applied, at the given step.
    ImpulseSeen {
        /// The step that applied it.
        seq: u64,
    },
    /// Not written: the record was last written under a higher fencing token (a newer
    /// owner); see [`StepWrite::fence`].
    Fenced {
        /// The token the record carries.
        token: u64,
    },
}

/// A record as read back from a store.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Stored {
    /// Its version (for compare-and-swap).
    pub version: u64,
    /// The encoded [`Record`](crate::Record).
    pub bytes: Bytes,
}
