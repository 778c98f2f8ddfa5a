//! One lazily opened, self-reconnecting Redis connection — to a single server or to a Redis
//! Cluster — shared by the Redis store and tier.

use std::time::Duration;

use redis::aio::{ConnectionLike, ConnectionManager, ConnectionManagerConfig};
use redis::cluster::ClusterClient;
use redis::cluster_async::ClusterConnection;
use redis::{Cmd, RedisFuture, Value};
use tokio::sync::OnceCell;

/// What a link connects to.
#[derive(Clone)]
enum Target {
    Server(redis::Client),
    Cluster(Box<ClusterClient>),
}

/// A Redis server reached through a `ConnectionManager`, or a Redis Cluster through a
/// `ClusterConnection` (both reconnect by themselves, the cluster one follows slot moves;
/// every command has a response timeout, so no call hangs while a server is away).
#[derive(Clone)]
pub(crate) struct RedisLink {
    target: Target,
    /// The addresses given, for messages.
    nodes: String,
    conn: std::sync::Arc<OnceCell<Conn>>,
    timeout: Duration,
}

impl std::fmt::Debug for RedisLink {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RedisLink")
            .field("nodes", &self.nodes)
            .finish_non_exhaustive()
    }
}

impl RedisLink {
    /// Parses the URL of one server; connects on first use.
    pub(crate) fn open(url: &str, timeout: Duration) -> Result<Self, String> {
        let client = redis::Client::open(url).map_err(|e| format!("bad Redis URL {url:?}: {e}"))?;
        Ok(Self {
            target: Target::Server(client),
            nodes: url.to_string(),
            conn: std::sync::Arc::new(OnceCell::new()),
            timeout,
        })
    }

    /// Parses the URLs of some nodes of a Redis Cluster (the others are discovered);
    /// connects on first use.
    pub(crate) fn cluster(urls: &[&str], timeout: Duration) -> Result<Self, String> {
        if urls.is_empty() {
            return Err("a Redis Cluster needs at least one node URL".to_string());
        }
        let client = ClusterClient::builder(urls.iter().copied())
            .connection_timeout(timeout)
            .response_timeout(timeout)
            .retries(2)
            .build()
            .map_err(|e| format!("bad Redis Cluster node URLs {urls:?}: {e}"))?;
        Ok(Self {
            target: Target::Cluster(Box::new(client)),
            nodes: urls.join(","),
            conn: std::sync::Arc::new(OnceCell::new()),
            timeout,
        })
    }

    /// How long a command or a connection attempt may take.
    pub(crate) fn timeout(&self) -> Duration {
        self.timeout
    }

    /// Whether the link goes to a Redis Cluster (keys of different slots cannot meet in
    /// one script there).
    pub(crate) fn is_cluster(&self) -> bool {
        matches!(self.target, Target::Cluster(_))
    }

    /// The connection (a cheap clone of the shared one).
    pub(crate) async fn conn(&self) -> Result<Conn, redis::RedisError> {
        let conn = self.conn.get_or_try_init(|| self.connect()).await?;
        Ok(conn.clone())
    }

    /// A connection of its own, for commands that block (`XREADGROUP … BLOCK`): a blocked
    /// command holds its connection, so it must not hold the shared one.
    pub(crate) async fn dedicated(&self) -> Result<Conn, redis::RedisError> {
        self.connect().await
    }

    /// A subscriber connection. On a cluster it goes to the first node given: plain
    /// `PUBLISH` reaches every node of a cluster.
    pub(crate) async fn pubsub(&self) -> Result<redis::aio::PubSub, redis::RedisError> {
        let client = match &self.target {
            Target::Server(client) => client.clone(),
            Target::Cluster(_) => {
                let first = self.nodes.split(',').next().unwrap_or_default();
                redis::Client::open(first)?
            }
        };
        match tokio::time::timeout(self.timeout, client.get_async_pubsub()).await {
            Ok(r) => r,
            Err(_) => Err(redis::RedisError::from(std::io::Error::new(
                std::io::ErrorKind::TimedOut,
                format!("no Redis node of {} answered", self.nodes),
            ))),
        }
    }

    async fn connect(&self) -> Result<Conn, redis::RedisError> {
        match &self.target {
            Target::Server(client) => {
                let config = ConnectionManagerConfig::new()
                    .set_connection_timeout(Some(self.timeout))
                    .set_response_timeout(Some(self.timeout))
                    .set_number_of_retries(2)
                    .set_max_delay(Duration::from_millis(500));
                ConnectionManager::new_lazy_with_config(client.clone(), config).map(Conn::Server)
            }
            Target::Cluster(client) => {
                let connect = client.get_async_connection();
                match tokio::time::timeout(self.timeout, connect).await {
                    Ok(conn) => conn.map(|c| Conn::Cluster(Box::new(c))),
                    Err(_) => Err(redis::RedisError::from(std::io::Error::new(
                        std::io::ErrorKind::TimedOut,
                        format!("no Redis Cluster node of {} answered", self.nodes),
                    ))),
                }
            }
        }
    }
}

/// A connection to a server or to a cluster: commands go where their keys live.
#[derive(Clone)]
pub(crate) enum Conn {
    Server(ConnectionManager),
    Cluster(Box<ClusterConnection>),
}

impl Conn {
    /// Runs commands whose keys may live in different cluster slots, returning their
    /// replies in order: one pipeline on a single server (one round trip); on a cluster
    /// (whose pipelines must stay within one slot), one request each, all in flight at
    /// once. Fails with the first error.
    pub(crate) async fn batch(&mut self, cmds: Vec<Cmd>) -> redis::RedisResult<Vec<Value>> {
        if cmds.is_empty() {
            return Ok(Vec::new());
        }
        match self {
            Conn::Server(c) => {
                let mut pipe = redis::pipe();
                for cmd in cmds {
                    pipe.add_command(cmd);
                }
                pipe.query_async(c).await
            }
            Conn::Cluster(_) => self.each(&cmds).await.into_iter().collect(),
        }
    }

    /// Runs commands concurrently, one request each, and returns each one's result.
    pub(crate) async fn each(&self, cmds: &[Cmd]) -> Vec<redis::RedisResult<Value>> {
        let futs = cmds.iter().map(|cmd| {
            let mut c = self.clone();
            let fut: crate::join::BoxFuture<'_, redis::RedisResult<Value>> =
                Box::pin(async move { cmd.query_async(&mut c).await });
            fut
        });
        crate::join::join_all(futs).await
    }
}

impl ConnectionLike for Conn {
    fn req_packed_command<'a>(&'a mut self, cmd: &'a Cmd) -> RedisFuture<'a, Value> {
        match self {
            Conn::Server(c) => c.req_packed_command(cmd),
            Conn::Cluster(c) => c.req_packed_command(cmd),
        }
    }

    fn req_packed_commands<'a>(
        &'a mut self,
        pipeline: &'a redis::Pipeline,
        offset: usize,
        count: usize,
    ) -> RedisFuture<'a, Vec<Value>> {
        match self {
            Conn::Server(c) => c.req_packed_commands(pipeline, offset, count),
            Conn::Cluster(c) => c.req_packed_commands(pipeline, offset, count),
        }
    }

    fn get_db(&self) -> i64 {
        match self {
            Conn::Server(c) => c.get_db(),
            Conn::Cluster(c) => c.get_db(),
        }
    }
}
