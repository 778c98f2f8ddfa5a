//! The engine: the tokio shell around the sans-IO core.

use std::any::{Any, TypeId};
use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use flowwire_storage::{InstanceStore, Ladder, Placement, RedbStore, Retention};
use tokio::sync::{mpsc, oneshot};

use crate::error::{Error, Result};
use crate::events::{Emitter, Events};
use crate::flow::{Board, Flow};
use crate::handle::Handle;
use crate::meta::{DriverMeta, FlowMeta, Policy};

mod builder;
pub(crate) mod children;
mod correlate;
mod damaged;
pub(crate) mod direct;
mod health;
mod history;
pub(crate) mod job;
pub(crate) mod lease;
pub(crate) mod msg;
mod operate;
pub(crate) mod outcomes;
pub(crate) mod queue;
pub(crate) mod runner;
#[cfg(feature = "redis")]
pub(crate) mod scale;
#[cfg(feature = "testing")]
pub(crate) mod script;
mod start_or_impulse;
mod upgrade;
pub(crate) mod worker;

#[cfg(feature = "redis")]
pub use scale::Shared;

pub use correlate::KeyedImpulse;
pub use health::{Health, HeldLease};
pub use history::{HistoryPage, HistoryStep, MAX_PAGE};
use msg::Msg;
pub use operate::Parked;
pub use start_or_impulse::StartOrImpulse;
pub use upgrade::{UpgradeReport, WouldPark};

/// Tunables shared by the runners and the workers.
#[derive(Debug, Clone)]
pub(crate) struct Limits {
    pub request_timeout: Duration,
    pub store_timeout: Duration,
    /// The engine's driver call policy (every field set).
    pub call_policy: Policy,
    pub event_capacity: usize,
    pub driver_concurrency: usize,
    pub driver_queue: usize,
    pub max_batch: usize,
    pub decode_limit: usize,
    /// The embedded store's page cache, in bytes.
    pub store_cache: usize,
    /// How long a graceful shutdown waits for the driver calls running.
    pub drain_timeout: Duration,
    /// What time it is for flows.
    pub clock: Arc<dyn crate::clock::Clock>,
}

impl Default for Limits {
    fn default() -> Self {
        Self {
            request_timeout: Duration::from_secs(30),
            store_timeout: Duration::from_secs(30),
            call_policy: Policy::DEFAULT,
            event_capacity: 1024,
            driver_concurrency: 64,
            driver_queue: 4096,
            max_batch: 2048,
            decode_limit: flowwire_storage::DEFAULT_DECODE_LIMIT,
            store_cache: RedbStore::DEFAULT_CACHE,
            drain_timeout: Duration::from_secs(10),
            clock: Arc::new(crate::clock::SystemClock),
        }
    }
}

enum StoreChoice {
    DataDir(PathBuf),
    Memory,
    Custom(Arc<dyn InstanceStore>),
}

type BoxFut<T> = Pin<Box<dyn std::future::Future<Output = T> + Send>>;

struct FlowCtx {
    store: Arc<dyn InstanceStore>,
    /// Where the runners send their child calls.
    children: children::ChildPort,
    placement: Arc<Placement>,
    retention: Retention,
    ports: HashMap<TypeId, queue::Port>,
    limits: Limits,
    events: Emitter,
}

type FlowStart = fn(&FlowCtx) -> Result<BoxFut<Result<FlowEntry>>>;

/// A registered flow: how to run it in one process, and in a multi-process deployment.
struct FlowReg {
    tid: TypeId,
    meta: &'static FlowMeta,
    start: FlowStart,
    /// Its operations as a child flow.
    kin: children::Kin,
    #[cfg(feature = "redis")]
    shared: fn(&scale::Deployment) -> FlowEntry,
}

struct FlowEntry {
    sender: Box<dyn Any + Send + Sync>,
    /// Reads of ended instances straight from the store, for handles: an
    /// `Arc<dyn crate::handle::SettledReads<F>>` (none in multi-process mode, where the router
    /// reads the store itself).
    reads: Option<Box<dyn Any + Send + Sync>>,
    task: Mutex<Option<tokio::task::JoinHandle<()>>>,
    shutdown: Box<dyn Fn() -> BoxFut<()> + Send + Sync>,
}

#[allow(clippy::type_complexity)] // a boxed spawn closure, named once here
struct DriverReg {
    driver: TypeId,
    meta: &'static DriverMeta,
    spawn: Box<dyn FnOnce(&Limits, &Arc<worker::Drain>) -> queue::Port + Send>,
}

/// Builds an [`Engine`]: where it stores instances, which flows it runs, which drivers
/// serve their calls.
///
/// Get one with [`Engine::builder`].
///
/// ```no_run
/// use flowwire::prelude::*;
///
/// # #[derive(Debug, Clone, Serialize, Deserialize, thiserror::Error)]
/// # #[error("out of stock")]
/// # pub struct OutOfStock;
/// #[driver]
/// pub trait Warehouse {
///     async fn reserve(&self, sku: String) -> Result<u64, OutOfStock>;
/// }
///
/// #[derive(Clone)]
/// pub struct Shelves;
///
/// #[driver]
/// impl Warehouse for Shelves {
///     async fn reserve(&self, sku: String) -> Result<u64, OutOfStock> {
///         Ok(sku.len() as u64)
///     }
/// }
///
/// #[derive(Debug, Default, Clone, Serialize, Deserialize)]
/// pub struct Basket {
///     sku: String,
///     reservation: Option<u64>,
/// }
///
/// #[flow]
/// pub struct OrderCircuit {
///     #[link]
///     state: Basket,
///     #[link]
///     warehouse: impl Warehouse,
/// }
///
/// #[flow]
/// impl OrderCircuit {
///     #[wire]
///     fn run(&mut self) -> Command<Self> {
///         if self.state.reservation.is_some() {
///             return Command::finish();
///         }
///         Command::drive(self.warehouse.reserve(self.state.sku.clone()))
///             .then(|f, r| { f.state.reservation = Some(r?); Ok(()) })
///     }
/// }
///
/// # #[tokio::main(flavor = "current_thread")]
/// # async fn main() -> flowwire::Result<()> {
/// let engine = Engine::builder()
///     .data_dir("./flowwire-data")
///     .flow::<OrderCircuit>()
///     .driver(Shelves)
///     .start()
///     .await?;
/// # engine.shutdown().await;
/// # Ok(()) }
/// ```
#[must_use = "a builder does nothing until `.start().await`"]
pub struct EngineBuilder {
    store: Option<StoreChoice>,
    ladder: Option<Ladder>,
    retention: Retention,
    flows: Vec<FlowReg>,
    drivers: Vec<DriverReg>,
    limits: Limits,
    #[cfg(feature = "redis")]
    shared: Option<Shared>,
    #[cfg(feature = "redis")]
    roles: scale::Roles,
}

impl std::fmt::Debug for EngineBuilder {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("EngineBuilder")
            .field(
                "flows",
                &self.flows.iter().map(|f| f.meta.name).collect::<Vec<_>>(),
            )
            .field("drivers", &self.drivers.len())
            .field("limits", &self.limits)
            .finish_non_exhaustive()
    }
}

struct Inner {
    flows: HashMap<TypeId, FlowEntry>,
    /// For reads outside the runners (layouts); released at shutdown with the runners'.
    store: Mutex<Option<Arc<dyn InstanceStore>>>,
    /// For reads of history snapshots.
    placement: Arc<Placement>,
    data_dir: Option<PathBuf>,
    limits: Limits,
    metadata: Metadata,
    events: Emitter,
    /// Tasks stopped at shutdown (multi-process mode: the workers' pumps).
    background: Mutex<Vec<tokio::task::JoinHandle<()>>>,
    /// Runs last at shutdown (multi-process mode: leave the members).
    finish: Option<Box<dyn Fn() -> BoxFut<()> + Send + Sync>>,
    /// Its place in a deployment, for [`Engine::health`].
    member: health::Member,
    /// Stops the driver pools gracefully at shutdown.
    drain: Arc<worker::Drain>,
}

/// Everything registered on an engine: its flows and drivers, from the macros' static
/// metadata. Serializes to JSON ([`Metadata::to_json`]) for tools and service endpoints.
#[derive(Debug, Clone, serde::Serialize)]
#[non_exhaustive]
pub struct Metadata {
    /// The registered flows, in registration order.
    pub flows: Vec<&'static FlowMeta>,
    /// The registered driver implementations' traits, in registration order.
    pub drivers: Vec<&'static DriverMeta>,
}

impl Metadata {
    /// The metadata as JSON.
    pub fn to_json(&self) -> String {
        // Serializing plain static data to a string cannot fail.
        serde_json::to_string(self).unwrap_or_else(|e| format!("{{\"error\":\"{e}\"}}"))
    }

    /// The metadata as a JSON value.
    pub fn to_value(&self) -> serde_json::Value {
        serde_json::to_value(self).unwrap_or(serde_json::Value::Null)
    }
}

/// A running engine: start instances, reach existing ones, shut down.
///
/// Get one from [`Engine::builder`]. Cloning is cheap; all clones drive the same engine.
#[derive(Clone)]
pub struct Engine {
    inner: Arc<Inner>,
}

impl std::fmt::Debug for Engine {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Engine")
            .field("data_dir", &self.inner.data_dir)
            .field("flows", &self.inner.flows.len())
            .finish_non_exhaustive()
    }
}

impl Engine {
    /// A builder with default limits and no store chosen yet.
    pub fn builder() -> EngineBuilder {
        EngineBuilder {
            store: None,
            ladder: None,
            retention: Retention::All,
            flows: Vec::new(),
            drivers: Vec::new(),
            limits: Limits::default(),
            #[cfg(feature = "redis")]
            shared: None,
            #[cfg(feature = "redis")]
            roles: scale::Roles::default(),
        }
    }

    /// The data directory of the embedded store, if the engine uses one.
    pub fn data_dir(&self) -> Option<&Path> {
        self.inner.data_dir.as_deref()
    }

    /// Starts the service that answers the runners' child calls, for the flows registered.
    fn serve_children(&self, jobs: mpsc::UnboundedReceiver<job::Job>, flows: &[FlowReg]) {
        let kin = flows.iter().map(|f| (f.meta.name, f.kin)).collect();
        let task = children::serve(jobs, Arc::downgrade(&self.inner), kin);
        self.inner
            .background
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .push(task);
    }

    fn sender<F: Flow>(&self) -> Result<&mpsc::Sender<Msg<F>>> {
        self.inner
            .flows
            .get(&TypeId::of::<F>())
            .and_then(|e| e.sender.downcast_ref::<mpsc::Sender<Msg<F>>>())
            .ok_or(Error::UnknownFlow { flow: F::NAME })
    }

    fn raw_handle<F: Flow>(&self, id: Arc<str>) -> Result<Handle<F>> {
        let handle = Handle::new(
            id,
            self.sender::<F>()?.clone(),
            self.inner.limits.request_timeout,
            self.inner.limits.decode_limit,
        );
        Ok(match self.settled_reads::<F>() {
            Some(reads) => handle.with_direct_reads(reads, false),
            None => handle,
        })
    }

    /// Flow `F`'s reads of ended instances from the store, if the engine has them.
    fn settled_reads<F: Flow>(&self) -> Option<Arc<dyn crate::handle::SettledReads<F>>> {
        self.inner
            .flows
            .get(&TypeId::of::<F>())?
            .reads
            .as_ref()?
            .downcast_ref::<Arc<dyn crate::handle::SettledReads<F>>>()
            .cloned()
    }

    /// Starts an instance with an initial state. The instance runs its first step (the
    /// wire's first command) durably before this returns.
    ///
    /// Starting an id that exists (running or ended) is [`Error::AlreadyExists`]; use
    /// [`Engine::handle`] to reach it. Dropping the returned future after the request was
    /// sent does not cancel the start.
    pub async fn start<F: Flow>(
        &self,
        id: impl Into<Arc<str>>,
        state: F::State,
    ) -> Result<F::Handle> {
        let handle = self.raw_handle::<F>(id.into())?;
        let id = handle.id().into();
        handle
            .request("start", |reply| Msg::Start {
                id,
                state,
                reply,
                via: None,
            })
            .await?;
        Ok(F::Handle::from(handle))
    }

    /// A handle to an existing instance (running, ended or parked); [`Error::NotFound`] if
    /// no instance has this id.
    pub async fn handle<F: Flow>(&self, id: impl Into<Arc<str>>) -> Result<F::Handle> {
        let handle = self.raw_handle::<F>(id.into())?;
        if let Some(reads) = self.settled_reads::<F>()
            && reads.settled(handle.id().into()).await.is_some()
        {
            // Ended or parked: found in the store, and read from there from now on.
            return Ok(F::Handle::from(handle.with_direct_reads(reads, true)));
        }
        let id = handle.id().into();
        handle
            .request("handle", |reply| Msg::Exists { id, reply })
            .await?;
        Ok(F::Handle::from(handle))
    }

    /// Cancels the instance `id` of flow `F`: see [`Handle::cancel`]. [`Error::NotFound`]
    /// if no instance has this id.
    ///
    /// ```
    /// # async fn demo<F: flowwire::Flow>(engine: flowwire::Engine) -> flowwire::Result<()> {
    /// engine.cancel::<F>("order-7", "out of stock for good").await?;
    /// # Ok(()) }
    /// ```
    pub async fn cancel<F: Flow>(
        &self,
        id: impl Into<Arc<str>>,
        reason: impl Into<String>,
    ) -> Result<()> {
        self.raw_handle::<F>(id.into())?.cancel(reason).await
    }

    /// Where an instance's payloads live: its record's state and call argument, and the
    /// first `history` entries of its history — each with its tier, size and key. Reads the
    /// store only (no blob is fetched); [`Error::NotFound`] if no instance has this id.
    ///
    /// ```
    /// # use flowwire::Engine;
    /// # async fn show<F: flowwire::Flow>(engine: &Engine) -> flowwire::Result<()> {
    /// let layout = engine.layout::<F>("order-1", 100).await?;
    /// println!("state: {}", layout.state); // e.g. "tier `nvme`, 3.5 MiB at `Order/order-1/4.s`"
    /// for step in &layout.steps {
    ///     if let Some(reply) = &step.payload {
    ///         println!("step {} came with {reply}", step.seq);
    ///     }
    /// }
    /// # Ok(()) }
    /// ```
    pub async fn layout<F: Flow>(
        &self,
        id: impl Into<Arc<str>>,
        history: usize,
    ) -> Result<flowwire_storage::layout::Layout> {
        self.sender::<F>()?;
        let store = self.store_for_reads()?;
        let key = flowwire_storage::InstanceKey::new(
            flowwire_storage::FlowName::from_static(F::NAME),
            id.into(),
        );
        let read = flowwire_storage::layout::Layout::read(
            &*store,
            &key,
            history,
            self.inner.limits.decode_limit,
        );
        self.timed(read).await?.ok_or_else(|| Error::NotFound {
            flow: F::NAME,
            id: key.id.to_string(),
        })
    }

    /// The metadata of a registered flow.
    pub fn flow_meta<F: Flow>(&self) -> &'static crate::meta::FlowMeta {
        F::META
    }

    /// How many instances of flow `F` the engine holds in memory now: those with a driver
    /// call in flight (and, briefly, those a request just touched). Sleeping, waiting,
    /// backing off (a call waiting out its retry's backoff), parked and ended instances live
    /// in the store only.
    ///
    /// ```
    /// # async fn demo<F: flowwire::Flow>(engine: flowwire::Engine) -> flowwire::Result<()> {
    /// println!("{} in memory", engine.resident::<F>().await?);
    /// # Ok(()) }
    /// ```
    pub async fn resident<F: Flow>(&self) -> Result<usize> {
        let (tx, rx) = oneshot::channel();
        let send = self.sender::<F>()?.send(Msg::Resident { reply: tx });
        let limit = self.inner.limits.request_timeout;
        let fut = async {
            send.await.map_err(|_| Error::Shutdown)?;
            rx.await.map_err(|_| Error::Shutdown)
        };
        tokio::time::timeout(limit, fut)
            .await
            .map_err(|_| Error::Timeout {
                op: "resident",
                after: limit,
            })?
    }

    /// Every registered flow and driver, with their impulses, probes, methods, argument
    /// and result types, versions and call policies.
    ///
    /// ```
    /// # async fn demo(engine: flowwire::Engine) {
    /// let json = engine.metadata().to_json();
    /// assert!(json.starts_with("{\"flows\":["));
    /// # }
    /// ```
    pub fn metadata(&self) -> &Metadata {
        &self.inner.metadata
    }

    /// Subscribes to the engine's lifecycle events, from now on. The stream is bounded:
    /// a subscriber that falls behind never slows the engine; it is told how many events
    /// it missed ([`crate::Missed`]).
    pub fn events(&self) -> Events {
        self.inner.events.subscribe()
    }

    /// Stops the engine gracefully, and releases the store (the data directory can be
    /// opened again once this returns):
    ///
    /// 1. the driver pools start no more calls (a call not started stays in its instance's
    ///    record and is sent when the engine restarts);
    /// 2. the calls already running finish, up to the drain timeout
    ///    ([`EngineBuilder::drain_timeout`], 10 s by default), and their outcomes are
    ///    committed — so a graceful stop re-runs no finished work;
    /// 3. every runner commits what it took and stops.
    ///
    /// A call still running when the timeout ends runs again, with the same idempotency
    /// key, after the restart. Later requests on this engine or its handles fail with
    /// [`Error::Shutdown`].
    ///
    /// ```
    /// # #[tokio::main(flavor = "current_thread")] async fn main() -> flowwire::Result<()> {
    /// let engine = flowwire::Engine::builder().in_memory().start().await?;
    /// engine.shutdown().await;
    /// # Ok(()) }
    /// ```
    pub async fn shutdown(&self) {
        if !self.inner.drain.stop(self.inner.limits.drain_timeout).await {
            tracing::warn!(timeout = ?self.inner.limits.drain_timeout, "driver calls still running at shutdown; they run again after the restart");
        }
        self.inner
            .store
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .take();
        for entry in self.inner.flows.values() {
            (entry.shutdown)().await;
            let task = entry
                .task
                .lock()
                .unwrap_or_else(std::sync::PoisonError::into_inner)
                .take();
            if let Some(task) = task {
                let _ = task.await;
            }
        }
        let background = std::mem::take(
            &mut *self
                .inner
                .background
                .lock()
                .unwrap_or_else(std::sync::PoisonError::into_inner),
        );
        for task in background {
            task.abort();
        }
        if let Some(finish) = &self.inner.finish {
            finish().await;
        }
        // Blocking store calls already handed to tokio's pool finish on their own; wait
        // for the last of them to drop its share of the store.
        tokio::task::yield_now().await;
    }
}

/// The state type of a flow.
pub type StateOf<F> = <F as Board>::State;

/// The error of a state that cannot be read as flow `F`'s current version's (see
/// `core::state_for_read`), for the runner's and a client's reads.
pub(crate) fn state_read_error<F: Flow>(id: &str, e: crate::core::StateRead) -> Error {
    use crate::core::StateRead;
    let id = id.to_string();
    match e {
        StateRead::Newer { written } => Error::NewerVersion {
            flow: F::NAME,
            id,
            written,
            running: F::VERSION,
        },
        StateRead::Unreachable { written } => Error::NoMigration {
            flow: F::NAME,
            id,
            written,
            running: F::VERSION,
        },
        StateRead::Codec(source) => Error::Codec {
            flow: F::NAME,
            id,
            what: "the state",
            source,
        },
    }
}
