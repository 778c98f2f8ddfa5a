//! Child flows: what a parent's wire asks for ([`ChildStart`]), what its continuation gets
//! back ([`Child`], [`ChildError`]), and how a child call travels in the parent's record
//! ([`ChildCall`]). Low in the crate: the command builders, the core and the engine's
//! child service use it; it uses only the board, the driver call and [`Ended`].
//!
//! A child call is a call on a reserved link, [`CHILD_LINK`], that the engine serves itself
//! instead of a driver: it starts the child by its id (or attaches to it when the id exists,
//! which is what makes a restart never start it twice) and answers when the child ends.
//! Being a call, it inherits everything a call has: it is persisted with the step that
//! makes it, sent again after a restart, applied once, recorded in history, and a fan-out
//! of child calls is bounded by `.parallel(n)`.

use std::fmt;

use bytes::Bytes;
use flowwire_storage::CodecError;
use serde::{Deserialize, Serialize};

use crate::board::Board;
use crate::driver::Call;
use crate::ended::Ended;

/// The link number of the calls the engine serves itself: child flows. A flow's driver
/// links are numbered from 0 in field order, and a flow has far fewer than 65,535.
#[doc(hidden)]
pub const CHILD_LINK: u16 = u16::MAX;
/// The child link's method that starts (or attaches to) a child and answers at its end.
pub(crate) const START: u16 = 0;
/// The child link's method that cancels a child: the compensation a parent that fails or
/// is cancelled runs for each child still running.
pub(crate) const CANCEL: u16 = 1;

/// How a child flow ended, as its parent's continuation receives it.
///
/// The state is the child's last one, decoded as the child flow's current version.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Child<S> {
    /// The child's id.
    pub id: String,
    /// How it ended: finished, failed (with its typed failure, read with
    /// [`Ended::error`]) or cancelled.
    pub ended: Ended,
    /// Its last state.
    pub state: S,
}

/// What a child call returns: the child's end, or why the engine could not run it.
pub type ChildReply<G> = Result<Child<<G as Board>::State>, ChildError>;

/// Why the engine could not start or follow a child flow. Permanent: the same call gets
/// the same answer until the deployment changes.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, thiserror::Error)]
#[non_exhaustive]
pub enum ChildError {
    /// The child's flow is not registered on the engine that runs the parent.
    #[error(
        "flow `{flow}` is not registered on this engine: register it with `.flow::<{flow}>()` on the engine that runs the parent"
    )]
    NotRegistered {
        /// The child's flow.
        flow: String,
    },
    /// The child's state, as the parent gave it or as the child left it, cannot be read by
    /// the child flow's version this engine runs.
    #[error("the state of child `{flow}/{id}` cannot be read: {reason}")]
    Unreadable {
        /// The child's flow.
        flow: String,
        /// The child's id.
        id: String,
        /// What went wrong.
        reason: String,
    },
    /// The child is parked for an operator, so it cannot be cancelled: resume or rewind
    /// it, then resume the parent (its cancelling compensation is sent again).
    #[error(
        "child `{flow}/{id}` is parked for an operator and cannot be cancelled: {reason}; resume or rewind it, then resume the parent"
    )]
    Parked {
        /// The child's flow.
        flow: String,
        /// The child's id.
        id: String,
        /// Why the child is parked.
        reason: String,
    },
}

impl crate::driver::Transient for ChildError {
    fn is_transient(&self) -> bool {
        false
    }
}

/// A child flow for a parent to start: flow `G`'s instance `id`, from `state`. Give it to
/// [`Command::drive`](crate::Command::drive) with [`ChildStart::call`], or as a branch of a
/// [`Command::fan_out`](crate::Command::fan_out); [`Command::child`](crate::Command::child)
/// is the short form of the first.
///
/// The id names the child: when an instance with this id exists, the parent attaches to
/// it instead of starting another (after a restart, this is the child it started before).
/// Derive it from the parent's id, so that two parents never share a child.
///
/// By default a child still running when its parent is cancelled or fails is cancelled
/// too (before the parent's own compensations run); [`ChildStart::detached`] leaves it
/// running.
///
/// ```
/// use flowwire::prelude::*;
/// use flowwire::ChildStart;
///
/// #[derive(Debug, Default, Clone, Serialize, Deserialize)]
/// pub struct Part { rows: u32 }
///
/// #[flow]
/// pub struct Load { #[link] state: Part }
///
/// #[flow]
/// impl Load {
///     #[wire]
///     fn run(&mut self) -> Command<Self> {
///         self.state.rows = 100;
///         Command::finish()
///     }
/// }
///
/// #[derive(Debug, Default, Clone, Serialize, Deserialize)]
/// pub struct Backfill { parts: u32, loaded: Vec<u32>, done: bool }
///
/// #[flow]
/// pub struct Fill { #[link] state: Backfill }
///
/// #[flow]
/// impl Fill {
///     #[wire]
///     fn run(&mut self) -> Command<Self> {
///         if self.state.done {
///             return Command::finish();
///         }
///         // One child per partition, at most 4 running at once.
///         let parts = (0..self.state.parts).map(|p| ChildStart::<Load>::new(format!("part-{p}"), Part::default()));
///         Command::fan_out(parts).parallel(4).all(
///             |f, _, child| { f.state.loaded.push(child?.state.rows); Ok(()) },
///             |f| { f.state.done = true; Ok(()) },
///         )
///     }
/// }
///
/// # #[tokio::main(flavor = "current_thread")]
/// # async fn main() -> flowwire::Result<()> {
/// let engine = Engine::builder().in_memory().flow::<Fill>().flow::<Load>().start().await?;
/// let fill = engine.start::<Fill>("fill-1", Backfill { parts: 8, ..Default::default() }).await?;
/// assert_eq!(fill.finished().await?, Ended::Finished);
/// assert_eq!(fill.state().await?.loaded, vec![100; 8]);
/// # Ok(()) }
/// ```
#[must_use = "a child start does nothing until a wire returns it"]
pub struct ChildStart<G: Board> {
    id: String,
    state: G::State,
    detached: bool,
}

impl<G: Board> ChildStart<G> {
    /// Child `id` of flow `G`, to start from `state`.
    pub fn new(id: impl Into<String>, state: G::State) -> Self {
        Self {
            id: id.into(),
            state,
            detached: false,
        }
    }

    /// Leaves the child running when its parent is cancelled or fails (by default it is
    /// cancelled with it).
    pub fn detached(mut self) -> Self {
        self.detached = true;
        self
    }

    /// The call that starts the child: give it to [`Command::drive`](crate::Command::drive).
    /// The state is encoded now (a state that cannot be encoded parks the parent with the
    /// reason).
    pub fn call(self) -> Call<ChildCall, ChildReply<G>> {
        let mut state = Vec::new();
        let op = match flowwire_storage::codec::encode_raw(&self.state, &mut state) {
            Ok(()) => Ok(ChildOp::Start {
                flow: G::NAME.to_string(),
                version: G::VERSION,
                id: self.id,
                state: Bytes::from(state),
                detached: self.detached,
            }),
            Err(e) => Err(format!(
                "the state of child `{}/{}` could not be encoded: {e}",
                G::NAME,
                self.id
            )),
        };
        Call::new(ChildCall { op: Box::new(op) })
    }
}

impl<G: Board> fmt::Debug for ChildStart<G> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ChildStart")
            .field("flow", &G::NAME)
            .field("id", &self.id)
            .field("detached", &self.detached)
            .finish_non_exhaustive()
    }
}

/// A call about a child flow, as the flow's call enum carries it (its `__Child` variant,
/// generated by `#[flow]`). Built by [`ChildStart::call`]. Boxed: the call enum is as large
/// as its largest variant, and every drive of the flow moves it.
#[doc(hidden)]
pub struct ChildCall {
    op: Box<Result<ChildOp, String>>,
}

impl ChildCall {
    /// The child link's method.
    pub fn method(&self) -> u16 {
        match &*self.op {
            Ok(ChildOp::Cancel { .. }) => CANCEL,
            _ => START,
        }
    }

    /// Encodes the call as the parent's record keeps it.
    pub fn encode(&self, out: &mut Vec<u8>) -> Result<(), CodecError> {
        match &*self.op {
            Ok(op) => flowwire_storage::codec::encode_raw(op, out),
            Err(e) => Err(CodecError::Encode(e.clone())),
        }
    }
}

impl fmt::Debug for ChildCall {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match &*self.op {
            Ok(op) => op.fmt(f),
            Err(e) => f.debug_tuple("ChildCall").field(e).finish(),
        }
    }
}

/// A child call as it is persisted in the parent's record (postcard; the variant order and
/// fields are a stored format: add variants at the end only).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub(crate) enum ChildOp {
    /// Start child `flow/id` from `state` (written by `version` of that flow), or attach to
    /// it; answer when it ends.
    Start {
        flow: String,
        version: u32,
        id: String,
        state: Bytes,
        detached: bool,
    },
    /// Cancel child `flow/id` (a parent's compensation for a child still running).
    Cancel {
        flow: String,
        id: String,
        reason: String,
    },
}

impl ChildOp {
    /// Decodes a persisted child call.
    pub(crate) fn decode(bytes: &[u8], limit: usize) -> Result<ChildOp, CodecError> {
        flowwire_storage::codec::decode_raw(bytes, limit)
    }

    /// The cancelling call for a started child that is not detached.
    pub(crate) fn cancel_for(self, reason: &str) -> Option<ChildOp> {
        match self {
            ChildOp::Start {
                flow,
                id,
                detached: false,
                ..
            } => Some(ChildOp::Cancel {
                flow,
                id,
                reason: reason.to_string(),
            }),
            _ => None,
        }
    }

    pub(crate) fn encode(&self) -> Result<Vec<u8>, CodecError> {
        let mut out = Vec::new();
        flowwire_storage::codec::encode_raw(self, &mut out)?;
        Ok(out)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_started_child_that_is_not_detached_is_cancelled_with_the_reason() {
        let start = ChildOp::Start {
            flow: "Load".into(),
            version: 2,
            id: "part-1".into(),
            state: Bytes::from_static(b"\x01"),
            detached: false,
        };
        let bytes = start.encode().unwrap();
        let back = ChildOp::decode(&bytes, 1024).unwrap();
        assert_eq!(back, start);
        assert_eq!(
            back.cancel_for("parent cancelled"),
            Some(ChildOp::Cancel {
                flow: "Load".into(),
                id: "part-1".into(),
                reason: "parent cancelled".into()
            })
        );
    }

    #[test]
    fn a_detached_child_or_a_cancel_has_nothing_to_cancel() {
        let detached = ChildOp::Start {
            flow: "Load".into(),
            version: 1,
            id: "p".into(),
            state: Bytes::new(),
            detached: true,
        };
        assert_eq!(detached.cancel_for("x"), None);
        let cancel = ChildOp::Cancel {
            flow: "Load".into(),
            id: "p".into(),
            reason: "r".into(),
        };
        assert_eq!(cancel.cancel_for("x"), None);
    }

    #[test]
    fn a_truncated_child_call_is_refused() {
        let bytes = ChildOp::Cancel {
            flow: "Load".into(),
            id: "p".into(),
            reason: "r".into(),
        }
        .encode()
        .unwrap();
        for cut in 0..bytes.len() {
            assert!(
                ChildOp::decode(&bytes[..cut], 1024).is_err(),
                "cut at {cut}"
            );
        }
    }
}
