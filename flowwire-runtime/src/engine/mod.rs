//! The engine: the tokio shell around the sans-IO core.

use std::any::{Any, TypeId};
use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use flowwire_storage::{
    InstanceStore, KIB, Ladder, MemoryStore, Placement, RedbStore, Retention, Tier,
};
use tokio::sync::{mpsc, oneshot};

use crate::driver::{Dispatch, Implements};
use crate::error::{Error, Result};
use crate::events::{Emitter, Events};
use crate::flow::{Board, Flow};
use crate::handle::Handle;
use crate::meta::{Ambiguous, DriverMeta, FlowMeta, Policy};

mod correlate;
mod damaged;
mod health;
mod history;
pub(crate) mod job;
pub(crate) mod lease;
pub(crate) mod msg;
mod operate;
pub(crate) mod queue;
pub(crate) mod runner;
#[cfg(feature = "redis")]
pub(crate) mod scale;
pub(crate) mod worker;

#[cfg(feature = "redis")]
pub use scale::Shared;

pub use correlate::KeyedImpulse;
pub use health::{Health, HeldLease};
pub use history::{HistoryPage, HistoryStep, MAX_PAGE};
use msg::Msg;
pub use operate::Parked;
use runner::Runner;

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
    #[cfg(feature = "redis")]
    shared: fn(&scale::Deployment) -> FlowEntry,
}

struct FlowEntry {
    sender: Box<dyn Any + Send + Sync>,
    task: Mutex<Option<tokio::task::JoinHandle<()>>>,
    shutdown: Box<dyn Fn() -> BoxFut<()> + Send + Sync>,
}

#[allow(clippy::type_complexity)] // a boxed spawn closure, named once here
struct DriverReg {
    driver: TypeId,
    meta: &'static DriverMeta,
    spawn: Box<dyn FnOnce(&Limits, &Emitter, &Arc<worker::Drain>) -> queue::Port + Send>,
}

/// Builds an [`Engine`]: where it stores instances, which flows it runs, which drivers
/// serve their calls.
///
/// Get one with [`Engine::builder`].
///
/// ```ignore
/// let engine = Engine::builder()
///     .data_dir("./flowwire-data")
///     .flow::<OrderCircuit>()
///     .driver(Warehouse::new())
///     .driver(Stripe::new())
///     .start()
///     .await?;
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

impl EngineBuilder {
    /// Persists instances in an embedded, crash-safe store under `path` (created if
    /// missing). This is the durable default.
    pub fn data_dir(mut self, path: impl Into<PathBuf>) -> Self {
        self.store = Some(StoreChoice::DataDir(path.into()));
        self
    }

    /// Keeps instances in memory only: nothing survives the process. For tests.
    pub fn in_memory(mut self) -> Self {
        self.store = Some(StoreChoice::Memory);
        self
    }

    /// Places payloads (state, call arguments, replies, impulses, history snapshots) by
    /// size on this ladder. Checked when the engine starts ([`Error::Ladder`] names the
    /// rule a wrong ladder breaks).
    ///
    /// Without it: an engine with a data directory keeps payloads below 16 KiB inline and
    /// the rest in files under `<data_dir>/blobs`; any other engine keeps everything inline.
    ///
    /// ```
    /// use flowwire_runtime::Engine;
    /// use flowwire_storage::{Ladder, Tier, KIB, MB};
    /// let builder = Engine::builder().data_dir("./data").storage(
    ///     Ladder::new()
    ///         .inline_below(4 * KIB)
    ///         .below(MB, Tier::fs("./data/fast"))
    ///         .default_to(Tier::embedded("./data/large.redb")),
    /// );
    /// # drop(builder);
    /// ```
    pub fn storage(mut self, ladder: Ladder) -> Self {
        self.ladder = Some(ladder);
        self
    }

    /// How much history each instance keeps. Default: all of it.
    pub fn history(mut self, retention: Retention) -> Self {
        self.retention = retention;
        self
    }

    /// Uses the given instance store.
    pub fn store(mut self, store: impl InstanceStore) -> Self {
        self.store = Some(StoreChoice::Custom(Arc::new(store)));
        self
    }

    /// Registers a flow type: its instances can be started, and active ones are resumed.
    pub fn flow<F: Flow>(mut self) -> Self {
        self.flows.push(FlowReg {
            tid: TypeId::of::<F>(),
            meta: F::META,
            start: start_flow::<F>,
            #[cfg(feature = "redis")]
            shared: scale::start_flow::<F>,
        });
        self
    }

    /// Makes this engine one process of a multi-process deployment meeting in `shared`'s
    /// Redis (or Redis Cluster): instances live there, and each process plays the roles
    /// chosen with [`EngineBuilder::orchestrator`], [`EngineBuilder::worker`] or
    /// [`EngineBuilder::client`]. Any process can start instances, send impulses and read
    /// probes, whoever runs them.
    ///
    /// The ladder's tiers must be ones every process reads (Redis, S3,
    /// [`Tier::shared_fs`]): a node-local tier is refused with [`Error::NodeLocalTier`].
    ///
    /// ```no_run
    /// # async fn demo() -> flowwire_runtime::Result<()> {
    /// use flowwire_runtime::{Engine, Shared};
    /// let shared = Shared::redis("redis://127.0.0.1:6379/", "shop")?;
    /// // A process that runs wires and drivers; more such processes share the work.
    /// let engine = Engine::builder().shared(shared).orchestrator().worker().start().await?;
    /// # Ok(()) }
    /// ```
    #[cfg(feature = "redis")]
    pub fn shared(mut self, shared: Shared) -> Self {
        self.shared = Some(shared);
        self
    }

    /// Multi-process mode: this process runs wires. It takes a fair share of every
    /// registered flow's shards (leases with fencing tokens) and gives shards back as
    /// other orchestrators join. It needs no driver implementations.
    #[cfg(feature = "redis")]
    pub fn orchestrator(mut self) -> Self {
        self.roles.orchestrator = true;
        self
    }

    /// Multi-process mode: this process runs the registered drivers' calls, taken from
    /// their streams. It needs no flows registered.
    #[cfg(feature = "redis")]
    pub fn worker(mut self) -> Self {
        self.roles.worker = true;
        self
    }

    /// Multi-process mode: this process only starts instances, sends impulses and reads
    /// probes, history and metadata (it runs neither wires nor drivers).
    #[cfg(feature = "redis")]
    pub fn client(mut self) -> Self {
        self.roles.client = true;
        self
    }

    /// Registers a driver implementation: it serves the calls of the driver trait it
    /// implements (its `impl Trait for Type` block carries `#[driver]`), on a pool of
    /// worker tasks.
    ///
    /// If the type implements several driver traits, name the one meant:
    /// `.driver::<PaymentProxy, _>(svc)`, once per trait.
    pub fn driver<D, S>(mut self, svc: S) -> Self
    where
        D: Dispatch<S>,
        S: Implements<D> + Send + Sync + 'static,
    {
        let svc = Arc::new(svc);
        self.drivers.push(DriverReg {
            driver: TypeId::of::<D>(),
            meta: &D::META,
            spawn: Box::new(move |limits, events, drain| {
                worker::spawn_pool::<D, S>(svc, limits, events, drain)
            }),
        });
        self
    }

    /// How long a client request (start, impulse, probe) may wait for the engine.
    /// Default 30 s.
    pub fn request_timeout(mut self, d: Duration) -> Self {
        self.limits.request_timeout = d;
        self
    }

    /// How long one store commit may take before it is reported as failed. Default 30 s.
    pub fn store_timeout(mut self, d: Duration) -> Self {
        self.limits.store_timeout = d;
        self
    }

    /// Per-attempt timeout of driver calls whose method and trait set none. Default 30 s.
    pub fn call_timeout(mut self, d: Duration) -> Self {
        self.limits.call_policy.timeout_ms =
            Some(u64::try_from(d.as_millis()).unwrap_or(u64::MAX).max(1));
        self
    }

    /// Retries of driver calls whose method and trait set none: attempts after the first,
    /// when an attempt times out or panics. Default 3.
    pub fn call_retries(mut self, n: u32) -> Self {
        self.limits.call_policy.retries = Some(n);
        self
    }

    /// The backoff between retries of driver calls whose method and trait set none: the
    /// first wait, doubling at each retry up to `max`, each with jitter (a random part of up
    /// to half). Default 50 ms to 5 s.
    pub fn call_backoff(mut self, first: Duration, max: Duration) -> Self {
        let ms = |d: Duration| u64::try_from(d.as_millis()).unwrap_or(u64::MAX);
        self.limits.call_policy.backoff_ms = Some(ms(first));
        self.limits.call_policy.max_backoff_ms = Some(ms(max.max(first)));
        self
    }

    /// What a restart does with the calls in flight of drivers whose method and trait
    /// declare nothing: send them again ([`Ambiguous::Retry`], the default) or park their
    /// instance for an operator ([`Ambiguous::Park`]).
    pub fn ambiguous(mut self, policy: Ambiguous) -> Self {
        self.limits.call_policy.ambiguous = Some(policy);
        self
    }

    /// How many lifecycle events the engine holds for subscribers that fall behind (each
    /// subscriber that misses more learns how many). Default 1024.
    pub fn event_capacity(mut self, n: usize) -> Self {
        self.limits.event_capacity = n.max(1);
        self
    }

    /// Worker tasks per registered driver (calls served at once). Default 64.
    pub fn driver_concurrency(mut self, n: usize) -> Self {
        self.limits.driver_concurrency = n.max(1);
        self
    }

    /// Most steps committed together in one store transaction. Default 2,048.
    ///
    /// Keep it above the number of instances that step at once: when a round cannot take
    /// every waiting step, the rest wait a whole commit, and the rounds convoy (on the
    /// embedded store, 1,024 flows at once ran at 14 K flows/s with 512 and 40–50 K with
    /// 2,048). A commit holds up to this many records, each at most the ladder's inline
    /// limit (16 KiB by default), so lower it when memory is tight.
    pub fn max_batch(mut self, n: usize) -> Self {
        self.limits.max_batch = n.max(1);
        self
    }

    /// How long [`Engine::shutdown`] waits for the driver calls running to finish (their
    /// outcomes are committed, so a graceful stop re-runs no finished work). Default 10 s;
    /// a call still running after it runs again, with the same idempotency key, after the
    /// restart.
    ///
    /// ```
    /// use std::time::Duration;
    /// use flowwire_runtime::Engine;
    /// let builder = Engine::builder().in_memory().drain_timeout(Duration::from_secs(30));
    /// # drop(builder);
    /// ```
    pub fn drain_timeout(mut self, d: Duration) -> Self {
        self.limits.drain_timeout = d;
        self
    }

    /// Memory the embedded store (a [`data_dir`](Self::data_dir) engine's) keeps for its
    /// pages. Default 64 MiB ([`RedbStore::DEFAULT_CACHE`]); raise it when a large share
    /// of many instances is read often (timers, impulses), lower it on a small node.
    ///
    /// ```
    /// use flowwire_runtime::Engine;
    /// let builder = Engine::builder().data_dir("./data").store_cache(256 << 20);
    /// # drop(builder);
    /// ```
    pub fn store_cache(mut self, bytes: usize) -> Self {
        self.limits.store_cache = bytes;
        self
    }

    /// Largest record or state the engine decodes. Default 64 MiB.
    pub fn decode_limit(mut self, bytes: usize) -> Self {
        self.limits.decode_limit = bytes;
        self
    }

    /// Opens the store, starts the driver workers, resumes every active instance, and
    /// returns the running engine. Must be called inside a tokio runtime.
    #[cfg_attr(not(feature = "redis"), allow(unused_mut))]
    pub async fn start(mut self) -> Result<Engine> {
        #[cfg(feature = "redis")]
        if let Some(shared) = self.shared.take() {
            return scale::start(self, shared).await;
        }
        self.check_names()?;
        let mut data_dir = None;
        let store: Arc<dyn InstanceStore> = match self.store.ok_or(Error::NoStore)? {
            StoreChoice::DataDir(dir) => {
                std::fs::create_dir_all(&dir).map_err(|source| Error::DataDir {
                    path: dir.clone(),
                    source,
                })?;
                let file = dir.join("instances.redb");
                let cache = self.limits.store_cache;
                let store =
                    tokio::task::spawn_blocking(move || RedbStore::open_with_cache(file, cache))
                        .await
                        .map_err(|e| {
                            Error::Store(flowwire_storage::StoreError::Backend(e.to_string()))
                        })??;
                data_dir = Some(dir);
                Arc::new(store)
            }
            StoreChoice::Memory => Arc::new(MemoryStore::new()),
            StoreChoice::Custom(s) => s,
        };
        let ladder = match (self.ladder, &data_dir) {
            (Some(l), _) => l,
            (None, Some(dir)) => Ladder::new()
                .inline_below(16 * KIB)
                .default_to(Tier::fs(dir.join("blobs"))),
            (None, None) => Ladder::inline_only(),
        };
        let placement = Arc::new(ladder.validate(self.limits.decode_limit)?);
        tracing::info!(ladder = %placement.describe(), "storage");
        let events = Emitter::new(self.limits.event_capacity);
        let drain = Arc::new(worker::Drain::default());
        let mut ports = HashMap::new();
        let mut drivers = Vec::new();
        for d in self.drivers {
            ports.insert(d.driver, (d.spawn)(&self.limits, &events, &drain));
            drivers.push(d.meta);
        }
        let ctx = FlowCtx {
            store,
            placement,
            retention: self.retention,
            ports,
            limits: self.limits.clone(),
            events: events.clone(),
        };
        let mut flows = HashMap::new();
        let mut pending = Vec::new();
        for f in &self.flows {
            pending.push((f.tid, (f.start)(&ctx)?));
        }
        for (tid, fut) in pending {
            flows.insert(tid, fut.await?);
        }
        Ok(Engine {
            inner: Arc::new(Inner {
                flows,
                store: Mutex::new(Some(ctx.store)),
                placement: ctx.placement,
                data_dir,
                limits: self.limits,
                metadata: Metadata {
                    flows: self.flows.iter().map(|f| f.meta).collect(),
                    drivers,
                },
                events,
                background: Mutex::new(Vec::new()),
                finish: None,
                member: health::Member::embedded(),
                drain,
            }),
        })
    }

    fn check_names(&self) -> Result<()> {
        let mut names = std::collections::HashSet::new();
        for f in &self.flows {
            if !names.insert(f.meta.name) {
                return Err(Error::DuplicateFlow { flow: f.meta.name });
            }
        }
        Ok(())
    }
}

fn start_flow<F: Flow>(ctx: &FlowCtx) -> Result<BoxFut<Result<FlowEntry>>> {
    let mut ports = Vec::new();
    for (i, link) in F::LINKS.iter().enumerate() {
        let tid = F::link_types()[i]();
        let port = ctx.ports.get(&tid).ok_or(Error::MissingDriver {
            flow: F::NAME,
            field: link.field,
            driver: link.driver.name,
        })?;
        ports.push(port.clone());
    }
    let (mut runner, orx) = Runner::<F>::new(
        ctx.store.clone(),
        ctx.placement.clone(),
        ctx.retention,
        ports,
        ctx.limits.clone(),
        ctx.events.clone(),
    );
    Ok(Box::pin(async move {
        runner.recover().await?;
        let (tx, rx) = mpsc::channel::<Msg<F>>(4096);
        let task = tokio::spawn(runner.run(rx, orx));
        let stx = tx.clone();
        let shutdown: Box<dyn Fn() -> BoxFut<()> + Send + Sync> = Box::new(move || {
            let stx = stx.clone();
            Box::pin(async move {
                let (reply, done) = oneshot::channel();
                if stx.send(Msg::Shutdown { reply }).await.is_ok() {
                    let _ = done.await;
                }
            })
        });
        Ok(FlowEntry {
            sender: Box::new(tx),
            task: Mutex::new(Some(task)),
            shutdown,
        })
    }))
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

    fn sender<F: Flow>(&self) -> Result<&mpsc::Sender<Msg<F>>> {
        self.inner
            .flows
            .get(&TypeId::of::<F>())
            .and_then(|e| e.sender.downcast_ref::<mpsc::Sender<Msg<F>>>())
            .ok_or(Error::UnknownFlow { flow: F::NAME })
    }

    fn raw_handle<F: Flow>(&self, id: Arc<str>) -> Result<Handle<F>> {
        Ok(Handle::new(
            id,
            self.sender::<F>()?.clone(),
            self.inner.limits.request_timeout,
            self.inner.limits.decode_limit,
        ))
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
            .request("start", |reply| Msg::Start { id, state, reply })
            .await?;
        Ok(F::Handle::from(handle))
    }

    /// A handle to an existing instance (running, ended or parked); [`Error::NotFound`] if
    /// no instance has this id.
    pub async fn handle<F: Flow>(&self, id: impl Into<Arc<str>>) -> Result<F::Handle> {
        let handle = self.raw_handle::<F>(id.into())?;
        let id = handle.id().into();
        handle
            .request("handle", |reply| Msg::Exists { id, reply })
            .await?;
        Ok(F::Handle::from(handle))
    }

    /// Where an instance's payloads live: its record's state and call argument, and the
    /// first `history` entries of its history — each with its tier, size and key. Reads the
    /// store only (no blob is fetched); [`Error::NotFound`] if no instance has this id.
    ///
    /// ```
    /// # use flowwire_runtime::Engine;
    /// # async fn show<F: flowwire_runtime::Flow>(engine: &Engine) -> flowwire_runtime::Result<()> {
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
        let key = flowwire_storage::InstanceKey::new(F::NAME, id.into());
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
    /// parked and ended instances live in the store only.
    ///
    /// ```
    /// # async fn demo<F: flowwire_runtime::Flow>(engine: flowwire_runtime::Engine) -> flowwire_runtime::Result<()> {
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
    /// # async fn demo(engine: flowwire_runtime::Engine) {
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
    /// # #[tokio::main(flavor = "current_thread")] async fn main() -> flowwire_runtime::Result<()> {
    /// let engine = flowwire_runtime::Engine::builder().in_memory().start().await?;
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
