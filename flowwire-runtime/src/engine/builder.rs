//! Building an engine: the builder's options, and `start`, which opens the store, recovers
//! every flow's instances and starts their runners and the driver pools.

use super::msg::Msg;
use super::runner::Runner;
use crate::driver::{Dispatch, Implements};
use crate::error::{Error, Result};
use crate::events::Emitter;
use crate::flow::Flow;
use crate::meta::Ambiguous;
use flowwire_storage::{InstanceStore, KIB, Ladder, MemoryStore, RedbStore, Retention, Tier};
use std::any::TypeId;
use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::Duration;
use tokio::sync::{mpsc, oneshot};

#[cfg(feature = "redis")]
use super::Shared;
use super::{
    BoxFut, DriverReg, Engine, EngineBuilder, FlowCtx, FlowEntry, FlowReg, Inner, Metadata,
    StoreChoice,
};

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
    /// use flowwire::Engine;
    /// use flowwire::storage::{Ladder, Tier, KIB, MB};
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
            kin: super::children::Kin::of::<F>(),
            #[cfg(feature = "redis")]
            shared: super::scale::start_flow::<F>,
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
    /// # async fn demo() -> flowwire::Result<()> {
    /// use flowwire::{Engine, Shared};
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
            spawn: Box::new(move |limits, drain| {
                super::worker::spawn_pool::<D, S>(svc, limits, drain)
            }),
        });
        self
    }

    /// Registers a scripted driver (feature `testing`): the test gives its replies, in
    /// place of an implementation. See [`Script`](crate::testing::Script).
    #[cfg(feature = "testing")]
    pub fn script<D: crate::Driver>(mut self, script: super::script::Script<D>) -> Self {
        self.drivers.push(DriverReg {
            driver: TypeId::of::<D>(),
            meta: &D::META,
            spawn: Box::new(move |limits, _drain| super::script::spawn(script, limits)),
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
    /// limit (16 KiB by default), so lower it when memory is tight. A store that commits
    /// at once (the in-memory one) has no sync to share: its rounds take at most 64 steps,
    /// which keeps each step's data in cache (8 % more steps a second on one core).
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
    /// use flowwire::Engine;
    /// let builder = Engine::builder().in_memory().drain_timeout(Duration::from_secs(30));
    /// # drop(builder);
    /// ```
    pub fn drain_timeout(mut self, d: Duration) -> Self {
        self.limits.drain_timeout = d;
        self
    }

    /// The clock flows run by: step times, timers and retry backoffs (the engine's own
    /// timeouts run on real time whatever the clock). Default [`SystemClock`](crate::SystemClock).
    /// Tests give a [`ManualClock`](crate::ManualClock) and move it by hand: a seven-day
    /// timer fires when the clock is advanced past it, at once.
    ///
    /// ```
    /// use std::sync::Arc;
    /// use flowwire::{Engine, ManualClock};
    /// let clock = Arc::new(ManualClock::new());
    /// let builder = Engine::builder().in_memory().clock(clock.clone());
    /// # drop(builder);
    /// ```
    pub fn clock(mut self, clock: impl crate::clock::Clock) -> Self {
        self.limits.clock = Arc::new(clock);
        self
    }

    /// Memory the embedded store (a [`data_dir`](Self::data_dir) engine's) keeps for its
    /// pages. Default 64 MiB ([`RedbStore::DEFAULT_CACHE`]); raise it when a large share
    /// of many instances is read often (timers, impulses), lower it on a small node.
    ///
    /// ```
    /// use flowwire::Engine;
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
            return super::scale::start(self, shared).await;
        }
        self.check_names()?;
        let mut data_dir = None;
        let store: Arc<dyn InstanceStore> = match self.store.ok_or(Error::NoStore)? {
            StoreChoice::DataDir(dir) => {
                // Durably: a store file's name in a directory a power cut can take is lost
                // with it.
                flowwire_storage::dirs::create(&dir).map_err(|source| Error::DataDir {
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
        let mut placement = ladder.validate(self.limits.decode_limit)?;
        if store.checksums_on_read() {
            // A store that keeps what it is given in memory computes checksums when it
            // hands values out: its steps are sealed without them.
            placement = placement.with_checksums(flowwire_storage::codec::Checksums::OnRead);
        }
        let placement = Arc::new(placement);
        tracing::info!(ladder = %placement.describe(), "storage");
        let events = Emitter::new(self.limits.event_capacity);
        let drain = Arc::new(super::worker::Drain::default());
        let mut ports = HashMap::new();
        let mut drivers = Vec::new();
        for d in self.drivers {
            ports.insert(d.driver, (d.spawn)(&self.limits, &drain));
            drivers.push(d.meta);
        }
        let (children, child_jobs) = super::children::ChildPort::new();
        let ctx = FlowCtx {
            store,
            children,
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
        let engine = Engine {
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
                member: super::health::Member::embedded(),
                drain,
            }),
        };
        engine.serve_children(child_jobs, &self.flows);
        Ok(engine)
    }

    pub(super) fn check_names(&self) -> Result<()> {
        let mut names = std::collections::HashSet::new();
        for f in &self.flows {
            if !names.insert(f.meta.name) {
                return Err(Error::DuplicateFlow { flow: f.meta.name });
            }
        }
        Ok(())
    }
}

pub(super) fn start_flow<F: Flow>(ctx: &FlowCtx) -> Result<BoxFut<Result<FlowEntry>>> {
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
    runner.children(ctx.children.clone());
    let reads: Arc<dyn crate::handle::SettledReads<F>> = Arc::new(super::direct::Reader::<F>::new(
        &ctx.store,
        ctx.placement.clone(),
        ctx.limits.store_timeout,
        ctx.limits.decode_limit,
    ));
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
            reads: Some(Box::new(reads)),
            task: Mutex::new(Some(task)),
            shutdown,
        })
    }))
}
