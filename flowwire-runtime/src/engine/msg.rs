//! What a handle, an operator call or the engine asks of a flow's runner: one message per
//! request, each with the channel its answer goes back on.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

use bytes::Bytes;
use tokio::sync::oneshot;

use crate::ended::Ended;
use crate::error::Result;
use crate::impulse::Impulses;
use crate::operation::Operation;

/// What a `finished()` wait gets: how the instance ended and, for one that finished or was
/// cancelled (ends no operator can undo), its final state as this version wrote it, so
/// that the caller reads its result without another trip.
pub(crate) type EndedReply = Result<(Ended, Option<flowwire_storage::Rope>)>;

/// A request that came over the bus (multi-process mode), as the step that applies it
/// settles it: on a store that carries sends (one Redis server), the commit publishes the
/// reply and acknowledges the request's entry in the step's own write, instead of two more
/// round trips after it.
pub(crate) struct BusRequest {
    /// The request's entry in the shard's request stream; `None` for a request its caller
    /// handed to the shard's owner directly (there is no entry to acknowledge).
    pub entry: Option<StreamEntry>,
    /// The caller's reply channel.
    pub reply_to: String,
    /// The reply that says the request was applied, encoded.
    pub applied: Bytes,
    settled: AtomicBool,
}

/// A request's entry in a shard's request stream.
pub(crate) struct StreamEntry {
    /// The shard's request stream, and the consumer group that acknowledges its entries.
    pub stream: String,
    pub group: &'static str,
    /// The entry's id.
    pub id: String,
}

// Made by the multi-process feed (feature `redis`); read by the runner everywhere.
#[cfg_attr(not(feature = "redis"), allow(dead_code))]
impl BusRequest {
    pub(crate) fn new(entry: Option<StreamEntry>, reply_to: String, applied: Bytes) -> Self {
        BusRequest {
            entry,
            reply_to,
            applied,
            settled: AtomicBool::new(false),
        }
    }

    /// Records that a committed step settled the request (set before the runner replies).
    pub(crate) fn mark_settled(&self) {
        self.settled.store(true, Ordering::Release);
    }

    /// Whether a committed step settled the request: its reply is out and its entry (if
    /// it has one) acknowledged, so the feed does neither.
    pub(crate) fn is_settled(&self) -> bool {
        self.settled.load(Ordering::Acquire)
    }
}

/// Where a request came from: `Some` over the bus, `None` from this process.
pub(crate) type Via = Option<Arc<BusRequest>>;

/// A probe: runs on the flow and sends its own result.
pub(crate) type Ask<F> = Box<dyn FnOnce(&F) + Send>;

/// A request to a runner.
/// A request to a flow's runner.
pub(crate) enum Msg<F: Impulses> {
    Start {
        id: Arc<str>,
        state: F::State,
        reply: oneshot::Sender<Result<()>>,
        via: Via,
    },
    Impulse {
        id: Arc<str>,
        impulse_id: Arc<str>,
        impulse: F::Impulse,
        reply: oneshot::Sender<Result<()>>,
        via: Via,
    },
    /// Applies an impulse to the live instance, or starts it with the impulse applied to its
    /// initial state when there is none (one step).
    StartOrImpulse {
        id: Arc<str>,
        state: F::State,
        impulse_id: Arc<str>,
        impulse: F::Impulse,
        reply: oneshot::Sender<Result<()>>,
        via: Via,
    },
    /// Cancels the instance (see `Instance::cancel`): `Ok` also when it was cancelled before.
    Cancel {
        id: Arc<str>,
        reason: String,
        reply: oneshot::Sender<Result<()>>,
        via: Via,
    },
    /// Runs a probe on the flow (which sends its own result) and then replies.
    Probe {
        id: Arc<str>,
        ask: Ask<F>,
        reply: oneshot::Sender<Result<()>>,
    },
    /// The committed state, encoded.
    State {
        id: Arc<str>,
        reply: oneshot::Sender<Result<flowwire_storage::Rope>>,
    },
    Finished {
        id: Arc<str>,
        reply: oneshot::Sender<EndedReply>,
    },
    Exists {
        id: Arc<str>,
        reply: oneshot::Sender<Result<()>>,
    },
    /// An operator's operation on a parked instance; replies with the step it wrote.
    Operate {
        id: Arc<str>,
        op: Operation<F>,
        reply: oneshot::Sender<Result<u64>>,
    },
    /// How many instances are in memory.
    Resident {
        reply: oneshot::Sender<usize>,
    },
    Shutdown {
        reply: oneshot::Sender<()>,
    },
}
