//! Multi-process mode: orchestrators (which run wires), workers (which run drivers) and
//! clients (which start instances and send impulses), in one process or many, meeting in
//! one Redis or Redis Cluster.
//!
//! * [`orchestrator`] — shard leases with fencing tokens, one runner per shard held.
//! * [`workers`] — driver calls from streams, outcomes back to the shards' streams.
//! * [`client`] — what handles ask, sent to the owning shard or read from the store.
//! * [`messages`] — what travels between them.
//! * `joint` — on one Redis server, one stream reader for all the shards a process holds.
//! * `handoff` — on one Redis server, outcomes sent from worker to owner over TCP.

use std::sync::Arc;
use std::time::Duration;

use flowwire_storage::store::RedisStore;

use crate::error::Result;

pub(crate) mod client;
mod feed;
mod handoff;
mod joint;
pub(crate) mod messages;
pub(crate) mod orchestrator;
mod outlet;
mod server_time;
mod watch;
pub(crate) mod workers;

/// Where the processes of a multi-process deployment meet: one Redis or Redis Cluster,
/// holding the instances, the shard leases and the streams between processes. Give it to
/// [`EngineBuilder::shared`](crate::EngineBuilder::shared), with the roles this process
/// plays.
///
/// ```no_run
/// # async fn demo() -> flowwire::Result<()> {
/// use std::time::Duration;
/// use flowwire::{Engine, Shared};
/// let shared = Shared::redis("redis://127.0.0.1:6379/", "shop")?
///     .shards(32)
///     .lease_ttl(Duration::from_secs(10));
/// let engine = Engine::builder().shared(shared).orchestrator().start().await?;
/// # Ok(()) }
/// ```
#[derive(Debug, Clone)]
pub struct Shared {
    pub(crate) store: RedisStore,
    pub(crate) shards: u16,
    pub(crate) lease_ttl: Duration,
    pub(crate) visibility: Duration,
    pub(crate) node: Option<String>,
    pub(crate) audit: bool,
    pub(crate) direct: Option<std::net::SocketAddr>,
}

impl Shared {
    /// A deployment on one Redis server, every key under `prefix`.
    pub fn redis(url: &str, prefix: &str) -> Result<Shared> {
        Ok(Self::on(RedisStore::open(url, prefix)?))
    }

    /// A deployment on a Redis Cluster (some of its nodes' URLs; the others are found),
    /// every key under `prefix`.
    pub fn cluster(nodes: &[&str], prefix: &str) -> Result<Shared> {
        Ok(Self::on(RedisStore::cluster(nodes, prefix)?))
    }

    fn on(store: RedisStore) -> Shared {
        Shared {
            store,
            shards: 16,
            lease_ttl: Duration::from_secs(10),
            visibility: Duration::from_mins(1),
            node: None,
            audit: false,
            direct: Some(std::net::SocketAddr::from(([127, 0, 0, 1], 0))),
        }
    }

    /// Where an orchestrator process takes the outcomes workers send its shards directly,
    /// and the requests callers send them (starts, impulses, cancellations), on one Redis
    /// server (default: a free port on loopback, `127.0.0.1:0`, for processes on the same
    /// host). A worker or a caller looks the address up under the shard and sends there,
    /// instead of going through Redis, where each message would wait for the server's next
    /// `fdatasync`; what the owner does not take goes through Redis, as with `None`. In a
    /// worker's or a client's process, `None` sends everything through Redis.
    ///
    /// Nothing acknowledged changes: a caller is answered once the step that applies its
    /// request is committed. A request its owner took and died with before that commit is
    /// not answered (the caller times out and may ask again with the same id, which
    /// applies it once), where one appended to the request stream would be applied by the
    /// shard's next owner.
    ///
    /// Processes on other hosts need an address they reach: bind one of this host's (not
    /// `0.0.0.0`), where only the deployment's processes reach it. A process that cannot
    /// listen there does not start ([`Error::DirectHandoffs`](crate::Error::DirectHandoffs)).
    ///
    /// ```no_run
    /// # async fn demo() -> flowwire::Result<()> {
    /// use flowwire::{Engine, Shared};
    /// let shared = Shared::redis("redis://10.0.0.5:6379/", "shop")?
    ///     .direct_handoffs(Some("10.0.0.7:7400".parse().unwrap()));
    /// let engine = Engine::builder().shared(shared).orchestrator().start().await?;
    /// # Ok(()) }
    /// ```
    #[must_use]
    pub fn direct_handoffs(mut self, bind: Option<std::net::SocketAddr>) -> Self {
        self.direct = bind;
        self
    }

    /// How many shards each flow's instances are split into (1 to 4,096; default 16): the
    /// unit of ownership, so the most orchestrators that share a flow's work. Every process
    /// of a deployment must use the same count; a process that does not is refused at
    /// start.
    #[must_use]
    pub fn shards(mut self, n: u16) -> Self {
        self.shards = n.clamp(1, 4096);
        self
    }

    /// How long a shard's lease lasts without renewal (default 10 s; renewed every third
    /// of it). A crashed orchestrator's shards are taken over after at most this long.
    #[must_use]
    pub fn lease_ttl(mut self, ttl: Duration) -> Self {
        self.lease_ttl = ttl.max(Duration::from_millis(300));
        self
    }

    /// How long a call may go untouched before another worker takes it over (default
    /// 60 s). Workers touch the calls they run every third of it, so a slow call is not
    /// taken away; a crashed worker's calls run again after at most this long.
    #[must_use]
    pub fn visibility_timeout(mut self, d: Duration) -> Self {
        self.visibility = d.max(Duration::from_millis(300));
        self
    }

    /// This process's name among the members (default: its pid and start time). Must be
    /// unique per running process.
    #[must_use]
    pub fn node_name(mut self, name: &str) -> Self {
        self.node = Some(name.to_string());
        self
    }

    /// Records every write of an instance with its fencing token
    /// ([`RedisStore::audit_writes`]): for crash tests and audits; costs one list push per
    /// step.
    #[must_use]
    pub fn audit_writes(mut self) -> Self {
        self.audit = true;
        self
    }

    /// The store, as every process of the deployment sees it (with this deployment's
    /// shard count): for reads and audits.
    pub fn store(&self) -> RedisStore {
        let store = self.store.clone().with_shards(self.shards);
        if self.audit {
            store.audit_writes()
        } else {
            store
        }
    }

    pub(crate) fn node(&self) -> String {
        self.node.clone().unwrap_or_else(|| {
            format!(
                "node-{}-{:x}",
                std::process::id(),
                crate::clock::unix_nanos() % (1 << 48)
            )
        })
    }
}

/// The roles a process of a multi-process deployment plays.
#[derive(Debug, Clone, Copy, Default)]
pub(crate) struct Roles {
    pub orchestrator: bool,
    pub worker: bool,
    pub client: bool,
}

impl Roles {
    pub(crate) fn any(self) -> bool {
        self.orchestrator || self.worker || self.client
    }
}

/// What the engine keeps of a multi-process deployment.
pub(crate) struct Deployment {
    pub remote: Arc<client::Remote>,
    pub orchestra: Option<Arc<orchestrator::Orchestra>>,
}

/// Starts a multi-process engine (see [`EngineBuilder::shared`](crate::EngineBuilder::shared)).
pub(super) async fn start(b: super::EngineBuilder, shared: Shared) -> Result<super::Engine> {
    use crate::error::Error;
    use flowwire_storage::{InstanceStore, Ladder};

    if b.store.is_some() {
        return Err(Error::SharedStore);
    }
    if !b.roles.any() {
        return Err(Error::NoRole);
    }
    b.check_names()?;
    let redis = shared.store();
    let bus = redis.bus();
    bus.agree_shards().await?;
    let store: Arc<dyn InstanceStore> = Arc::new(redis);
    let placement = Arc::new(
        b.ladder
            .unwrap_or_else(Ladder::inline_only)
            .validate(b.limits.decode_limit)?,
    );
    if let Some(tier) = placement.tiers().find(|t| !t.is_shared()) {
        return Err(Error::NodeLocalTier {
            tier: tier.name().to_string(),
        });
    }
    let events = crate::events::Emitter::new(b.limits.event_capacity);
    let node: Arc<str> = shared.node().into();
    let replies = client::Replies::start(bus.clone(), &node, b.limits.decode_limit).await?;
    let held = super::health::Held::default();
    let (children, child_jobs) = super::children::ChildPort::new();
    // On one server, the commits carry bus messages, and the shards of a process are read
    // together (`joint`) and take their outcomes and requests directly (`handoff`).
    let one_server = store.carries_sends();
    let mut background = Vec::new();
    let direct = (shared.direct.is_some() && one_server).then(|| {
        let outlet = outlet::Outlet::new(bus.clone(), b.limits.decode_limit);
        let (direct, task) = client::Direct::spawn(outlet);
        background.push(task);
        direct
    });
    let remote = Arc::new(client::Remote {
        bus: bus.clone(),
        store: store.clone(),
        placement: placement.clone(),
        replies,
        limits: b.limits.clone(),
        direct,
    });
    let inbox = match shared.direct.filter(|_| b.roles.orchestrator && one_server) {
        Some(addr) => match handoff::Inbox::bind(addr, node.clone(), b.limits.decode_limit).await {
            Ok((inbox, task)) => {
                background.push(task);
                Some(inbox)
            }
            Err(source) => {
                return Err(Error::DirectHandoffs {
                    addr: addr.to_string(),
                    source,
                });
            }
        },
        None => None,
    };
    let orchestra = b.roles.orchestrator.then(|| {
        Arc::new(orchestrator::Orchestra {
            children,
            bus: bus.clone(),
            node: node.clone(),
            store: store.clone(),
            placement: placement.clone(),
            retention: b.retention,
            limits: b.limits.clone(),
            events: events.clone(),
            lease_ttl: shared.lease_ttl,
            held: held.clone(),
            server_time: server_time::ServerTime::default(),
            joint: one_server.then(|| joint::Joint::new(bus.clone(), node.clone())),
            inbox,
        })
    });
    let mut drivers = Vec::new();
    let drain = Arc::new(super::worker::Drain::default());
    let workers = Arc::new(workers::WorkerCtx {
        bus: bus.clone(),
        node: node.clone(),
        handoff: one_server,
        outlet: (shared.direct.is_some() && one_server)
            .then(|| outlet::Outlet::new(bus.clone(), b.limits.decode_limit)),
        stopping: tokio::sync::watch::Sender::new(false),
        limits: b.limits.clone(),
        visibility: shared.visibility,
    });
    let mut settlers = Vec::new();
    for d in b.drivers {
        drivers.push(d.meta);
        if b.roles.worker {
            let port = (d.spawn)(&b.limits, &drain);
            let (tasks, settler) = workers::spawn(workers.clone(), d.meta, port);
            background.extend(tasks);
            settlers.push(settler);
        }
    }
    let settlers = std::sync::Mutex::new(settlers);
    let settle_limit = b.limits.store_timeout;
    let deployment = Deployment { remote, orchestra };
    let mut flows = std::collections::HashMap::new();
    for f in &b.flows {
        flows.insert(f.tid, (f.shared)(&deployment));
    }
    tracing::info!(node = %node, shards = bus.shards(), orchestrator = b.roles.orchestrator, worker = b.roles.worker, "joined the deployment");
    let roles = [
        (b.roles.orchestrator, "orchestrator"),
        (b.roles.worker, "worker"),
        (b.roles.client, "client"),
    ]
    .into_iter()
    .filter_map(|(on, name)| on.then_some(name))
    .collect();
    let member = super::health::Member {
        node: Some(node.clone()),
        roles,
        held,
    };
    let leave_bus = bus.clone();
    let leave_node = node.clone();
    let engine = super::Engine {
        inner: Arc::new(super::Inner {
            flows,
            store: std::sync::Mutex::new(Some(store)),
            placement,
            data_dir: None,
            limits: b.limits,
            metadata: super::Metadata {
                flows: b.flows.iter().map(|f| f.meta).collect(),
                drivers,
            },
            events,
            background: std::sync::Mutex::new(background),
            finish: Some(Box::new(move || {
                let bus = leave_bus.clone();
                let node = leave_node.clone();
                // The outcomes handed over that no commit settled yet are written out
                // (bounded by the store timeout), then this process leaves.
                workers.stopping.send_replace(true);
                let settlers = std::mem::take(
                    &mut *settlers
                        .lock()
                        .unwrap_or_else(std::sync::PoisonError::into_inner),
                );
                Box::pin(async move {
                    for settler in settlers {
                        if tokio::time::timeout(settle_limit, settler).await.is_err() {
                            tracing::warn!(
                                "outcomes handed over not all written at shutdown; their calls run again later"
                            );
                        }
                    }
                    let _ = bus.leave(&node).await;
                })
            })),
            member,
            drain,
        }),
    };
    engine.serve_children(child_jobs, &b.flows);
    Ok(engine)
}

/// A flow's entry in a multi-process engine: its handles go through a router; on an
/// orchestrator, a supervisor runs its shards.
pub(super) fn start_flow<F: crate::flow::Flow>(d: &Deployment) -> super::FlowEntry {
    use tokio::sync::oneshot;

    // Ended instances are read straight from the shared store, as the embedded engine
    // reads them: a handle that saw its instance end reads its state there (or keeps the
    // one `finished()` handed back), with no message to the router.
    let reads: Arc<dyn crate::handle::SettledReads<F>> = Arc::new(super::direct::Reader::<F>::new(
        &d.remote.store,
        d.remote.placement.clone(),
        d.remote.limits.store_timeout,
        d.remote.limits.decode_limit,
    ));
    let (tx, router) = client::spawn_router::<F>(d.remote.clone());
    let stop = d
        .orchestra
        .as_ref()
        .map(|o| orchestrator::spawn_supervisor::<F>(o.clone()).0);
    let stop = Arc::new(std::sync::Mutex::new(stop));
    let stx = tx.clone();
    let shutdown: Box<dyn Fn() -> super::BoxFut<()> + Send + Sync> = Box::new(move || {
        let stop = stop
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .take();
        let stx = stx.clone();
        Box::pin(async move {
            if let Some(stop) = stop {
                let (done, finished) = oneshot::channel();
                if stop.send(done).is_ok() {
                    let _ = finished.await;
                }
            }
            let (reply, done) = oneshot::channel();
            if stx.send(super::msg::Msg::Shutdown { reply }).await.is_ok() {
                let _ = done.await;
            }
        })
    });
    super::FlowEntry {
        sender: Box::new(tx),
        reads: Some(Box::new(reads)),
        task: std::sync::Mutex::new(Some(router)),
        shutdown,
    }
}

/// The wait after `failures` consecutive failures to reach Redis: 100 ms doubling to
/// 3.2 s (reconnect loops of the pumps and the reply listener).
pub(crate) fn pause(failures: u32) -> Duration {
    Duration::from_millis(50u64 << failures.min(6))
}
