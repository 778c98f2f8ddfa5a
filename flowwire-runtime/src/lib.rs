//! The flowwire runtime.
//!
//! * [`flow`] — the traits `#[flow]` implements ([`Board`], [`Flow`]) and the static metadata.
//! * [`driver`] — the traits `#[driver]` implements: [`Driver`] and [`Dispatch`] on the proxy,
//!   [`Implements`] on every implementation, the typed [`Call`] a proxy builds, [`DriveError`].
//! * [`command`] — [`Command`], what a wire returns, with its `fn`-pointer continuation.
//! * [`core`] — the sans-IO step core: an [`core::Instance`] takes an input (start, impulse,
//!   outcome) and returns the step to persist and the effects to perform after it commits.
//! * [`engine`] — the tokio shell: one runner per flow type owning its instances, group
//!   commits to the store, driver workers, [`Handle`]s.
//!
//! Users reach all of this through the `flowwire` facade.

mod board;
pub mod child;
pub mod clock;
/// The test kit for flow authors (feature `testing`): scripted drivers; the manual clock is
/// [`ManualClock`].
#[cfg(feature = "testing")]
pub mod testing {
    pub use crate::engine::script::Script;
}
pub use clock::{Clock, ManualClock, SystemClock};
pub mod command;
pub mod context;
pub mod core;
pub mod driver;
mod ended;
pub mod engine;
pub mod error;
pub mod events;
pub mod failure;
pub mod flow;
mod guard;
pub mod handle;
mod impulse;
pub mod meta;
mod operation;

pub use child::{Child, ChildError, ChildReply, ChildStart};
pub use command::{Command, Drive, Each, FanOut, IntoBranch, Timed, UndoFrom};
pub use context::CallContext;
pub use driver::{
    Call, Dispatch, DriveError, Driver, DriverCall, Fault, Implements, Reply, Transient, Verdict,
};
#[cfg(feature = "redis")]
pub use engine::Shared;

/// The multi-process items, present when this crate is built with `redis`. The facade
/// re-exports this module's contents, so that `flowwire::Shared` exists whenever the
/// runtime has it, whichever crate turned the feature on.
#[doc(hidden)]
pub mod multi {
    #[cfg(feature = "redis")]
    pub use crate::engine::Shared;
}
pub use engine::{Engine, EngineBuilder, Health, HeldLease};
pub use error::{Error, Result};
pub use events::{Event, EventKind, Events, Missed};
pub use failure::Failure;
pub use flow::{Board, CallSet, Flow, ImpulseSet, Impulses};
pub use handle::{Ended, Handle, ImpulseRequest};
pub use meta::{
    Ambiguous, ArgMeta, DriverMeta, FlowMeta, ImpulseMeta, LinkMeta, MethodMeta, Policy, ProbeMeta,
};
