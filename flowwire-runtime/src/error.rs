//! The engine's error type.

use std::time::Duration;

use flowwire_storage::{CodecError, StoreError};

/// `Result` with the engine's [`Error`].
pub type Result<T, E = Error> = std::result::Result<T, E>;

/// What went wrong, and what to do about it.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    /// No instance has this id.
    #[error("no {flow} instance has the id {id:?}; check the id, or start it first")]
    NotFound {
        /// The flow.
        flow: &'static str,
        /// The id asked for.
        id: String,
    },
    /// An instance with this id exists already (running or ended). Starting is not
    /// idempotent: use `Engine::handle` to reach the existing instance.
    #[error(
        "a {flow} instance with the id {id:?} exists already; use `engine.handle::<{flow}>(id)` to reach it"
    )]
    AlreadyExists {
        /// The flow.
        flow: &'static str,
        /// The id.
        id: String,
    },
    /// The instance finished or failed; it takes no more impulses.
    #[error("the {flow} instance {id:?} has {status}; it takes no more impulses")]
    Ended {
        /// The flow.
        flow: &'static str,
        /// The id.
        id: String,
        /// `finished` or `failed`.
        status: &'static str,
    },
    /// The impulse id was applied to this instance before; it was not applied again.
    #[error(
        "impulse {impulse_id:?} was already applied to the {flow} instance {id:?} (at step {step}); it was not applied again"
    )]
    ImpulseAlreadyApplied {
        /// The flow.
        flow: &'static str,
        /// The instance id.
        id: String,
        /// The impulse id.
        impulse_id: String,
        /// The step that applied it.
        step: u64,
    },
    /// The instance is parked for an operator.
    #[error("the {flow} instance {id:?} is quarantined: {reason}")]
    Quarantined {
        /// The flow.
        flow: &'static str,
        /// The id.
        id: String,
        /// Why it was parked.
        reason: String,
    },
    /// The flow type was not registered on this engine.
    #[error(
        "the flow {flow} is not registered on this engine; add `.flow::<{flow}>()` to the builder"
    )]
    UnknownFlow {
        /// The flow.
        flow: &'static str,
    },
    /// A flow links a driver that no registered implementation serves.
    #[error(
        "the flow {flow} links the driver {driver} (field `{field}`), but no implementation was registered; add `.driver(..)` with a type implementing {driver}"
    )]
    MissingDriver {
        /// The flow.
        flow: &'static str,
        /// The field.
        field: &'static str,
        /// The driver trait.
        driver: &'static str,
    },
    /// The same flow name was registered twice.
    #[error("the flow name {flow} is registered twice; rename one with `#[flow(name = \"..\")]`")]
    DuplicateFlow {
        /// The flow.
        flow: &'static str,
    },
    /// The builder has no store.
    #[error(
        "no store configured: call `.data_dir(path)` for the durable embedded store or `.in_memory()` for tests"
    )]
    NoStore,
    /// A value could not be encoded or decoded.
    #[error("{what} of the {flow} instance {id:?} could not be encoded or decoded: {source}")]
    Codec {
        /// The flow.
        flow: &'static str,
        /// The id.
        id: String,
        /// Which value.
        what: &'static str,
        /// Why.
        #[source]
        source: CodecError,
    },
    /// The store failed.
    #[error(transparent)]
    Store(#[from] StoreError),
    /// A payload could not be placed on, or read back from, its tier (boxed: it names
    /// instance, tier and key, and keeps `Error` small).
    #[error(transparent)]
    Blob(Box<flowwire_storage::BlobError>),
    /// The storage ladder breaks a rule.
    #[error(transparent)]
    Ladder(#[from] flowwire_storage::LadderError),
    /// The data directory could not be prepared.
    #[error("the data directory {path} cannot be used: {source}")]
    DataDir {
        /// The directory.
        path: std::path::PathBuf,
        /// Why.
        #[source]
        source: std::io::Error,
    },
    /// The engine did not answer in time.
    #[error("{op} did not complete within {after:?}; the engine may be overloaded")]
    Timeout {
        /// The operation.
        op: &'static str,
        /// The limit.
        after: Duration,
    },
    /// Another writer changed the instance; the step was not applied. Retry the request.
    #[error(
        "the {flow} instance {id:?} was changed concurrently; the request was not applied, retry it"
    )]
    Conflict {
        /// The flow.
        flow: &'static str,
        /// The id.
        id: String,
    },
    /// A probe panicked (the instance is unaffected).
    #[error("the probe on {flow} instance {id:?} panicked: {reason}; fix the probe")]
    ProbePanicked {
        /// The flow.
        flow: &'static str,
        /// The id.
        id: String,
        /// The panic message.
        reason: String,
    },
    /// The history of the instance does not hold the step asked for.
    #[error(
        "step {step} is not in the history of the {flow} instance {id:?}, which holds {kept}; ask for a step it holds (retention is set with `EngineBuilder::history`)"
    )]
    NotInHistory {
        /// The flow.
        flow: &'static str,
        /// The id.
        id: String,
        /// The step asked for.
        step: u64,
        /// Which steps the history holds.
        kept: String,
    },
    /// An impulse given as JSON does not decode as one of the flow's impulses.
    #[error(
        "the impulse for the {flow} instance {id:?} does not decode as one of its impulses ({detail}); send `{{\"ImpulseName\": {{\"arg\": value}}}}`, as `Engine::metadata` lists them"
    )]
    BadImpulse {
        /// The flow.
        flow: &'static str,
        /// The id.
        id: String,
        /// What did not decode.
        detail: String,
    },
    /// No live instance of the flow has this correlation key.
    #[error(
        "no live {flow} instance has the correlation key {key:?}: none was started with it, or it ended (ended instances leave the key index)"
    )]
    NoInstanceForKey {
        /// The flow.
        flow: &'static str,
        /// The key.
        key: String,
    },
    /// Several live instances of the flow have this correlation key.
    #[error(
        "several live {flow} instances have the correlation key {key:?} ({}): address one by its id with `Engine::handle`",
        ids.join(", ")
    )]
    KeyAmbiguous {
        /// The flow.
        flow: &'static str,
        /// The key.
        key: String,
        /// Their ids (the first ten).
        ids: Vec<String>,
    },
    /// An operator's operation applies only to parked instances (a rewind also to failed
    /// ones).
    #[error(
        "cannot {op} the {flow} instance {id:?}: it is {status}; operators resume and patch parked instances, and rewind parked or failed ones"
    )]
    NotParked {
        /// The flow.
        flow: &'static str,
        /// The id.
        id: String,
        /// The operation.
        op: &'static str,
        /// Its status.
        status: &'static str,
    },
    /// The instance was written by a newer version of its flow than this engine runs (a
    /// rolling deploy in progress, or a rollback): it is left as stored, never parked or
    /// run here; an engine of its version serves it. Permanent for this engine.
    #[error(
        "the {flow} instance {id:?} was written by version {written} of the flow and this engine runs version {running}: it is left as stored for an engine of version {written} or later (is a deploy in progress?)"
    )]
    NewerVersion {
        /// The flow.
        flow: &'static str,
        /// The id.
        id: String,
        /// The version that wrote it.
        written: u32,
        /// The version this engine runs.
        running: u32,
    },
    /// The instance was written by an older version of its flow that this engine's version
    /// has no migration from: its state is not read as this version's.
    #[error(
        "the {flow} instance {id:?} was written by version {written} of the flow, and this engine's version {running} has no migration from it"
    )]
    NoMigration {
        /// The flow.
        flow: &'static str,
        /// The id.
        id: String,
        /// The version that wrote it.
        written: u32,
        /// The version this engine runs.
        running: u32,
    },
    /// An operator's patch panicked; nothing was written.
    #[error("the patch of the {flow} instance {id:?} panicked, so nothing was written: {message}")]
    PatchPanicked {
        /// The flow.
        flow: &'static str,
        /// The id.
        id: String,
        /// The panic message.
        message: String,
    },
    /// An operator's operation could not be applied to the instance's state.
    #[error("cannot {op} the {flow} instance {id:?}: {detail}")]
    Operation {
        /// The flow.
        flow: &'static str,
        /// The id.
        id: String,
        /// The operation.
        op: &'static str,
        /// What went wrong.
        detail: String,
    },
    /// A payload is larger than the engine reads back (its decode limit). Nothing was
    /// written: the write limit and the decode limit are one setting
    /// (`EngineBuilder::decode_limit`).
    #[error(
        "the {what} is {size} bytes, over the {limit}-byte limit of what the engine reads back, so nothing was written; keep it smaller, or raise `EngineBuilder::decode_limit`"
    )]
    TooLarge {
        /// Which payload: `state`, `driver call`, `input (impulse or driver reply)` or
        /// `record`.
        what: &'static str,
        /// Its size in bytes.
        size: u64,
        /// The limit in force.
        limit: usize,
    },
    /// The engine is shut down.
    #[error("the engine is shut down")]
    Shutdown,
    /// The orchestrator owning the instance (multi-process mode) refused the request for a
    /// reason that does not cross processes as a variant of its own.
    #[error("the orchestrator running {flow} instance {id:?} refused the request: {message}")]
    Remote {
        /// Flow name.
        flow: &'static str,
        /// Instance id.
        id: String,
        /// The orchestrator's error, as text.
        message: String,
    },
    /// A multi-process engine was given a tier only this machine sees: another
    /// orchestrator taking over an instance could not read its payloads.
    #[error(
        "the ladder's tier `{tier}` is node-local, but a multi-process engine needs tiers every orchestrator reads; use Redis or S3, or `Tier::shared_fs(path)` for a mount every node sees"
    )]
    NodeLocalTier {
        /// The tier's name.
        tier: String,
    },
    /// A multi-process engine was started without saying what this process does.
    #[error(
        "a multi-process engine needs a role: call `.orchestrator()`, `.worker()` (both are allowed), or `.client()`"
    )]
    NoRole,
    /// A multi-process engine keeps its instances in its Redis; another store was chosen too.
    #[error(
        "a multi-process engine stores instances in the Redis given to `.shared(..)`; remove `.data_dir(..)`, `.in_memory()` or `.store(..)`"
    )]
    SharedStore,
    /// An orchestrator could not listen where workers send it outcomes directly
    /// ([`Shared::direct_handoffs`](crate::Shared::direct_handoffs)).
    #[error(
        "the orchestrator cannot listen at {addr} for the outcomes workers send it directly: {source}; give `Shared::direct_handoffs` a free address of this host, or `None` to publish them through Redis"
    )]
    DirectHandoffs {
        /// The address asked for.
        addr: String,
        /// Why it could not listen there.
        #[source]
        source: std::io::Error,
    },
    /// An operation that a multi-process engine does not route between processes yet.
    #[error(
        "{op} is not available on a multi-process engine yet; run it on a single-process engine over the same store"
    )]
    NotAcrossProcesses {
        /// The operation.
        op: &'static str,
    },
}

impl Error {
    /// Whether trying again later can succeed: a store or tier that is unreachable or
    /// timed out, as opposed to damaged data or a wrong request.
    ///
    /// ```
    /// use flowwire::Error;
    /// use flowwire::storage::StoreError;
    /// use std::time::Duration;
    /// assert!(Error::Store(StoreError::Timeout(Duration::from_secs(1))).is_transient());
    /// assert!(!Error::Shutdown.is_transient());
    /// ```
    pub fn is_transient(&self) -> bool {
        match self {
            Error::Store(e) => e.is_transient(),
            Error::Blob(e) => e.is_transient(),
            _ => false,
        }
    }

    /// The same failure, for a second caller (errors of I/O origin are not `Clone`).
    pub(crate) fn clone_for_caller(&self) -> Error {
        match self {
            Error::Blob(e) => Error::Blob(e.clone()),
            Error::Store(e) => Error::Store(e.clone()),
            &Error::TooLarge { what, size, limit } => Error::TooLarge { what, size, limit },
            Error::AlreadyExists { flow, id } => Error::AlreadyExists {
                flow,
                id: id.clone(),
            },
            Error::Conflict { flow, id } => Error::Conflict {
                flow,
                id: id.clone(),
            },
            Error::Codec {
                flow,
                id,
                what,
                source,
            } => Error::Codec {
                flow,
                id: id.clone(),
                what,
                source: source.clone(),
            },
            other => Error::Store(StoreError::Backend(other.to_string())),
        }
    }
}

impl From<flowwire_storage::BlobError> for Error {
    fn from(e: flowwire_storage::BlobError) -> Self {
        match e {
            flowwire_storage::BlobError::OverLimit {
                what, len, limit, ..
            } => Error::TooLarge {
                what,
                size: len,
                limit,
            },
            e => Error::Blob(Box::new(e)),
        }
    }
}
