//! # flowwire
//!
//! Durable, long-running business processes written as circuits.
//!
//! A **flow** is a struct (the board) whose fields are `#[link]`s: its persisted state and
//! the **drivers** it calls (traits for external services, marked `#[driver]`). Its `impl`
//! block has one `#[wire]` — a deterministic function the runtime loops, returning a
//! [`Command`] — plus `#[impulse]` methods (inputs applied exactly once) and `#[probe]`
//! methods (read-only queries). The [`Engine`] persists every step, survives crashes, and
//! runs driver calls on workers, at least once, with an idempotency key.
//!
//! ```
//! use flowwire::prelude::*;
//!
//! #[driver]
//! pub trait Greeter {
//!     async fn greet(&self, n: u32) -> Result<u32, GreetError>;
//! }
//!
//! #[derive(Debug, Serialize, Deserialize, thiserror::Error)]
//! #[error("greeting failed")]
//! pub struct GreetError;
//!
//! #[derive(Default, Serialize, Deserialize)]
//! pub struct Count { greeted: Option<u32>, approved: bool }
//!
//! #[flow]
//! pub struct Hello {
//!     #[link] state: Count,
//!     #[link] greeter: impl Greeter,
//! }
//!
//! #[flow]
//! impl Hello {
//!     #[impulse]
//!     fn approve(&mut self) { self.state.approved = true; }
//!
//!     #[probe]
//!     fn greeted(&self) -> Option<u32> { self.state.greeted }
//!
//!     #[wire]
//!     fn step(&mut self) -> Command<Self> {
//!         match (self.state.approved, self.state.greeted) {
//!             (false, _) => Command::wait(),
//!             (true, None) => Command::drive(self.greeter.greet(7))
//!                 .then(|f, r| { f.state.greeted = Some(r?); Ok(()) }),
//!             (true, Some(_)) => Command::finish(),
//!         }
//!     }
//! }
//!
//! struct Polite;
//!
//! #[driver]
//! impl Greeter for Polite {
//!     async fn greet(&self, n: u32) -> Result<u32, GreetError> { Ok(n * 6) }
//! }
//!
//! # #[tokio::main(flavor = "current_thread")]
//! # async fn main() -> Result<(), flowwire::Error> {
//! let engine = Engine::builder().in_memory().flow::<Hello>().driver(Polite).start().await?;
//! let hello = engine.start::<Hello>("h-1", Count::default()).await?;
//! hello.approve().await?;
//! assert_eq!(hello.finished().await?, Ended::Finished);
//! assert_eq!(hello.greeted().await?, Some(42));
//! # Ok(()) }
//! ```

pub use flowwire_macros::{correlate, driver, flow, impulse, probe, wire};
pub use flowwire_runtime::engine::{
    HistoryPage, HistoryStep, KeyedImpulse, MAX_PAGE, Metadata, Parked, StartOrImpulse,
    UpgradeReport, WouldPark,
};
// Multi-process mode (feature `redis`): `Shared`, where orchestrators, workers and clients
// meet; present whenever the runtime is built with `redis` (an empty glob otherwise).
#[doc(hidden)]
pub use flowwire_runtime::Verdict;
#[allow(unused_imports)]
pub use flowwire_runtime::multi::*;
pub use flowwire_runtime::{
    Ambiguous, ArgMeta, Board, Call, CallContext, Child, ChildError, ChildReply, ChildStart,
    Command, Drive, DriveError, Driver, DriverMeta, Each, Ended, Engine, EngineBuilder, Error,
    Event, EventKind, Events, Failure, FanOut, Fault, Flow, FlowMeta, Handle, Health, HeldLease,
    ImpulseMeta, ImpulseRequest, ImpulseSet, Impulses, IntoBranch, LinkMeta, MethodMeta, Missed,
    Policy, ProbeMeta, Result, Timed, Transient,
};
/// The traits the macros implement for a driver's calls and a flow's links: named in the
/// bounds of the items above, implemented by `#[driver]` and `#[flow]`, never by hand.
pub use flowwire_runtime::{CallSet, Dispatch, DriverCall, Implements, Reply};
pub use flowwire_runtime::{Clock, ManualClock, SystemClock};
/// A large field of a flow's state (a document, an image, a batch of rows) kept by
/// reference: a step that leaves it as it is neither copies, compares nor hashes it.
pub use flowwire_storage::Blob;

/// The sans-IO step core, for tests and tools that drive instances without an engine.
/// Not the user's API: it changes with the engine.
#[doc(hidden)]
pub use flowwire_runtime::core;

/// Storage: the size ladder and its tiers, the instance stores, and what a history and a
/// record hold. With the feature `conformance`, the suites a new backend must pass.
pub mod storage {
    pub use flowwire_storage::*;
    // The engine's own machinery, reachable for tests and tools, out of the user's docs
    // (an explicit import shadows the glob's).
    #[cfg(feature = "redis")]
    #[doc(hidden)]
    pub use flowwire_storage::bus;
    #[doc(hidden)]
    pub use flowwire_storage::{arena, codec, fuzz, join, layout, record};
}

/// The test kit for flow authors (feature `testing`): an engine on memory storage whose
/// clock the test moves, and drivers whose replies the test gives.
///
/// A seven-day approval is tested in milliseconds: the clock is advanced past the timer,
/// which fires at once; retry backoffs come due the same way.
///
/// ```
/// use std::time::Duration;
/// use flowwire::prelude::*;
/// use flowwire::testing::{self, Script};
///
/// # #[derive(Debug, Clone, Serialize, Deserialize, thiserror::Error)]
/// # #[error("mail is down")]
/// # pub struct MailDown;
/// #[driver]
/// pub trait Mail {
///     async fn remind(&self, who: String) -> Result<(), MailDown>;
/// }
///
/// #[derive(Debug, Default, Clone, Serialize, Deserialize)]
/// pub struct Request {
///     approved: bool,
///     timed_out: bool,
///     reminded: bool,
/// }
///
/// #[flow]
/// pub struct Approval {
///     #[link]
///     state: Request,
///     #[link]
///     mail: impl Mail,
/// }
///
/// #[flow]
/// impl Approval {
///     #[wire]
///     fn run(&mut self) -> Command<Self> {
///         let s = &self.state;
///         if s.approved || s.reminded {
///             return Command::finish();
///         }
///         if s.timed_out {
///             return Command::drive(self.mail.remind("maria".into()))
///                 .then(|f, r| { r?; f.state.reminded = true; Ok(()) });
///         }
///         // A week to answer, then a reminder.
///         Command::wait_timeout(Duration::from_hours(7 * 24))
///             .then(|f| { f.state.timed_out = true; Ok(()) })
///     }
///
///     #[impulse]
///     fn approve(&mut self) {
///         self.state.approved = true;
///     }
/// }
///
/// # #[tokio::main(flavor = "current_thread")]
/// # async fn main() -> flowwire::Result<()> {
/// let (builder, clock) = testing::engine();
/// let mail = Script::<MailProxy>::new();
/// mail.reply("remind", Ok::<(), MailDown>(()));
/// let engine = builder.flow::<Approval>().script(mail.clone()).start().await?;
/// let h = engine.start::<Approval>("a-1", Request::default()).await?;
/// clock.advance(Duration::from_hours(7 * 24)); // a week passes at once
/// assert_eq!(h.finished().await?, Ended::Finished);
/// assert!(matches!(&mail.calls()[..], [MailCall::Remind { who }] if who == "maria"));
/// # Ok(()) }
/// ```
#[cfg(feature = "testing")]
pub mod testing {
    use std::sync::Arc;

    pub use flowwire_runtime::ManualClock;
    pub use flowwire_runtime::testing::Script;

    /// An engine builder on memory storage, its clock a [`ManualClock`] at the wall
    /// clock's time, and that clock: add flows and drivers (or [`Script`]s), start it, and
    /// move time with [`ManualClock::advance`].
    pub fn engine() -> (crate::EngineBuilder, Arc<ManualClock>) {
        let clock = Arc::new(ManualClock::new());
        let builder = crate::Engine::builder().in_memory().clock(clock.clone());
        (builder, clock)
    }
}

/// Everything a flow author needs: `use flowwire::prelude::*;`.
pub mod prelude {
    pub use crate::{
        CallContext, Command, DriveError, Ended, Engine, Failure, Handle, correlate, driver, flow,
        impulse, probe, wire,
    };
    pub use serde::{Deserialize, Serialize};
}

/// Items the macros' generated code names. Not a public API: it changes without notice.
#[doc(hidden)]
pub mod __private {
    pub use ::core::any::TypeId;
    pub use ::std::vec::Vec;
    pub use flowwire_runtime::child::{CHILD_LINK, ChildCall};
    pub use flowwire_runtime::command::Command;
    pub use flowwire_runtime::driver::{Classify, classify};
    pub use flowwire_runtime::error::Error;
    pub use flowwire_runtime::{
        Ambiguous, ArgMeta, Board, Call, CallSet, Dispatch, Driver, DriverCall, DriverMeta, Flow,
        FlowMeta, Handle, Implements, ImpulseMeta, ImpulseRequest, ImpulseSet, Impulses, LinkMeta,
        MethodMeta, Policy, ProbeMeta, Reply, Verdict,
    };
    pub use flowwire_storage::CodecError;
    pub use flowwire_storage::codec::encode_raw;
    pub use serde;

    /// Decodes a state of a flow's previous version and upgrades it with the flow's
    /// `migrate` function.
    pub fn migrate_state<O: serde::de::DeserializeOwned, S>(
        upgrade: fn(O) -> S,
        old: &[u8],
        limit: usize,
    ) -> Result<S, CodecError> {
        let old: O = flowwire_storage::codec::decode_raw(old, limit)?;
        Ok(upgrade(old))
    }

    /// Writes a flow's correlation key (a `#[correlate]` method's result).
    pub fn write_key(out: &mut String, key: &impl ::core::fmt::Display) -> ::core::fmt::Result {
        use ::core::fmt::Write as _;
        write!(out, "{key}")
    }

    /// The state of a flow crosses crashes: it must serialize.
    #[diagnostic::on_unimplemented(
        message = "the state `{Self}` of a flow must implement `Serialize` and `Deserialize`",
        label = "add `#[derive(Serialize, Deserialize)]` to this type",
        note = "the state is persisted after every step"
    )]
    pub trait FlowState: serde::Serialize + serde::de::DeserializeOwned + Send + 'static {}
    impl<T: serde::Serialize + serde::de::DeserializeOwned + Send + 'static> FlowState for T {}

    /// A probe's result may cross a process boundary: it must serialize.
    #[diagnostic::on_unimplemented(
        message = "the probe result `{Self}` must implement `Serialize`",
        label = "probe results are answered as data"
    )]
    pub trait ProbeResult: serde::Serialize {}
    impl<T: serde::Serialize> ProbeResult for T {}

    /// Spanned assertion on a flow's state type.
    pub const fn assert_state<T: FlowState>() {}
    /// Spanned assertion on a driver method's result type.
    pub const fn assert_reply<T: Reply>() {}
    /// Spanned assertion on a probe's result type.
    pub const fn assert_probe<T: ProbeResult>() {}
}
