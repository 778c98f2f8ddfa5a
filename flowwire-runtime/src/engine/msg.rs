//! What a handle, an operator call or the engine asks of a flow's runner: one message per
//! request, each with the channel its answer goes back on.

use std::sync::Arc;

use tokio::sync::oneshot;

use crate::ended::Ended;
use crate::error::Result;
use crate::impulse::Impulses;
use crate::operation::Operation;

/// What a `finished()` wait gets: how the instance ended and, for one that finished or was
/// cancelled (ends no operator can undo), its final state as this version wrote it, so
/// that the caller reads its result without another trip.
pub(crate) type EndedReply = Result<(Ended, Option<flowwire_storage::Rope>)>;

/// A probe: runs on the flow and sends its own result.
pub(crate) type Ask<F> = Box<dyn FnOnce(&F) + Send>;

/// A request to a runner.
/// A request to a flow's runner.
pub(crate) enum Msg<F: Impulses> {
    Start {
        id: Arc<str>,
        state: F::State,
        reply: oneshot::Sender<Result<()>>,
    },
    Impulse {
        id: Arc<str>,
        impulse_id: Arc<str>,
        impulse: F::Impulse,
        reply: oneshot::Sender<Result<()>>,
    },
    /// Applies an impulse to the live instance, or starts it with the impulse applied to its
    /// initial state when there is none (one step).
    StartOrImpulse {
        id: Arc<str>,
        state: F::State,
        impulse_id: Arc<str>,
        impulse: F::Impulse,
        reply: oneshot::Sender<Result<()>>,
    },
    /// Cancels the instance (see `Instance::cancel`): `Ok` also when it was cancelled before.
    Cancel {
        id: Arc<str>,
        reason: String,
        reply: oneshot::Sender<Result<()>>,
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
