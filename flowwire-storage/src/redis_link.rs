//! One lazily opened, self-reconnecting Redis connection, shared by the Redis store and tier.

use std::time::Duration;

use redis::aio::{ConnectionManager, ConnectionManagerConfig};
use tokio::sync::OnceCell;

/// A Redis server reached through a `ConnectionManager` (reconnects by itself; every
/// command has a response timeout, so no call hangs while the server is away).
#[derive(Clone)]
pub(crate) struct RedisLink {
    client: redis::Client,
    conn: std::sync::Arc<OnceCell<ConnectionManager>>,
    timeout: Duration,
}

impl std::fmt::Debug for RedisLink {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RedisLink")
            .field("server", &self.client.get_connection_info().addr())
            .finish_non_exhaustive()
    }
}

impl RedisLink {
    /// Parses the URL; connects on first use.
    pub(crate) fn open(url: &str, timeout: Duration) -> Result<Self, String> {
        let client = redis::Client::open(url).map_err(|e| format!("bad Redis URL {url:?}: {e}"))?;
        Ok(Self {
            client,
            conn: std::sync::Arc::new(OnceCell::new()),
            timeout,
        })
    }

    /// The connection (a cheap clone of the shared manager).
    pub(crate) async fn conn(&self) -> Result<ConnectionManager, redis::RedisError> {
        let conn = self
            .conn
            .get_or_try_init(|| async {
                let config = ConnectionManagerConfig::new()
                    .set_connection_timeout(Some(self.timeout))
                    .set_response_timeout(Some(self.timeout))
                    .set_number_of_retries(2)
                    .set_max_delay(Duration::from_millis(500));
                ConnectionManager::new_lazy_with_config(self.client.clone(), config)
            })
            .await?;
        Ok(conn.clone())
    }
}
