//! The Redis tier: blobs as Redis strings under a prefix (for small and medium payloads
//! shared by every process of a deployment).

use std::time::Duration;

use bytes::Bytes;

use super::{BlobTier, TierError, check_key, concat};
use crate::join::BoxFuture;
use crate::redis_link::RedisLink;

/// Blobs in Redis, one string per blob, under `<prefix>:blob:<key>`.
///
/// Each key is its own Redis Cluster slot; a put is one `SET`, atomic on the server.
#[derive(Debug, Clone)]
pub struct RedisTier {
    link: RedisLink,
    prefix: String,
}

impl RedisTier {
    /// A tier on the Redis server at `url` (`redis://127.0.0.1:6379/`), connected on first use.
    pub fn open(url: &str, prefix: &str) -> Result<Self, TierError> {
        let link = RedisLink::open(url, Duration::from_secs(10))
            .map_err(|e| TierError::rejected("redis", e))?;
        Ok(Self {
            link,
            prefix: prefix.to_string(),
        })
    }

    /// A tier on a Redis Cluster, given the URLs of some of its nodes (the others are
    /// discovered), connected on first use.
    pub fn cluster(nodes: &[&str], prefix: &str) -> Result<Self, TierError> {
        let link = RedisLink::cluster(nodes, Duration::from_secs(10))
            .map_err(|e| TierError::rejected("redis", e))?;
        Ok(Self {
            link,
            prefix: prefix.to_string(),
        })
    }

    async fn conn(&self) -> Result<crate::redis_link::Conn, TierError> {
        self.link.conn().await.map_err(|e| redis_error(&e))
    }

    fn key(&self, key: &str) -> Result<String, TierError> {
        check_key(key)?;
        Ok(format!("{}:blob:{key}", self.prefix))
    }
}

pub(crate) fn redis_error(e: &redis::RedisError) -> TierError {
    // Connection loss, timeouts, a server still loading its data after a restart: all
    // transient from the engine's point of view.
    TierError::unavailable("redis", e)
}

impl BlobTier for RedisTier {
    fn put<'a>(&'a self, key: &'a str, parts: &'a [Bytes]) -> BoxFuture<'a, Result<(), TierError>> {
        Box::pin(async move {
            let key = self.key(key)?;
            let value = concat(parts);
            let mut c = self.conn().await?;
            redis::cmd("SET")
                .arg(&key)
                .arg(&value[..])
                .query_async::<()>(&mut c)
                .await
                .map_err(|e| redis_error(&e))
        })
    }

    fn get<'a>(
        &'a self,
        key: &'a str,
        _expect: Option<u64>,
    ) -> BoxFuture<'a, Result<Option<Bytes>, TierError>> {
        Box::pin(async move {
            let key = self.key(key)?;
            let mut c = self.conn().await?;
            let v: Option<Vec<u8>> = redis::cmd("GET")
                .arg(&key)
                .query_async(&mut c)
                .await
                .map_err(|e| redis_error(&e))?;
            Ok(v.map(Bytes::from))
        })
    }

    fn get_range<'a>(
        &'a self,
        key: &'a str,
        offset: u64,
        len: u64,
    ) -> BoxFuture<'a, Result<Option<Bytes>, TierError>> {
        Box::pin(async move {
            let key = self.key(key)?;
            let mut c = self.conn().await?;
            if len == 0 {
                let exists: bool = redis::cmd("EXISTS")
                    .arg(&key)
                    .query_async(&mut c)
                    .await
                    .map_err(|e| redis_error(&e))?;
                return Ok(exists.then(Bytes::new));
            }
            // `GETRANGE` ends inclusively and reads a missing key as empty: an empty answer
            // is told apart by `EXISTS`, in the same round trip.
            let last = offset.saturating_add(len - 1).min(i64::MAX as u64);
            let (v, exists): (Vec<u8>, bool) = redis::pipe()
                .cmd("GETRANGE")
                .arg(&key)
                .arg(offset.min(i64::MAX as u64))
                .arg(last)
                .cmd("EXISTS")
                .arg(&key)
                .query_async(&mut c)
                .await
                .map_err(|e| redis_error(&e))?;
            Ok(exists.then(|| Bytes::from(v)))
        })
    }

    fn delete<'a>(&'a self, key: &'a str) -> BoxFuture<'a, Result<(), TierError>> {
        Box::pin(async move {
            let key = self.key(key)?;
            let mut c = self.conn().await?;
            redis::cmd("DEL")
                .arg(&key)
                .query_async::<()>(&mut c)
                .await
                .map_err(|e| redis_error(&e))
        })
    }

    fn is_shared(&self) -> bool {
        true
    }
}
