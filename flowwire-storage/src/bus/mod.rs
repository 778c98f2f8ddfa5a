//! The deployment's bus on Redis (multi-process mode): which orchestrators are alive, who
//! owns each shard (a lease with a fencing token), and the streams that carry requests,
//! driver calls and outcomes between processes.
//!
//! Keys (beside the store's, under the same prefix):
//!
//! | key | type | holds |
//! | --- | --- | --- |
//! | `P:members` | sorted set | live orchestrators, scored by when their heartbeat expires (server time, ms) |
//! | `P:shards` | string | the deployment's shard count (every process must agree) |
//! | `P:lease:{flow#s}` | hash, expiring | `o` owner, `t` fencing token |
//! | `P:token:{flow#s}` | counter | the last token handed out for the shard |
//! | `P:handover:{flow#s}` | string | the last token whose owner released the shard cleanly |
//! | `P:tokens:{flow#s}` | hash | token → owner (who held each token) |
//! | `P:req:{flow#s}` | stream | starts and impulses for the shard's owner |
//! | `P:out:{flow#s}` | stream | driver outcomes for the shard's owner |
//! | `P:jobs:{driver}` | stream | calls for the workers of one driver trait |
//! | `P:handoff:{flow#s}` | channel | outcomes a worker hands to a shard's owner directly (one server) |
//!
//! A shard's lease, counter, streams share its hash tag, so each lease script runs in one
//! Redis Cluster slot. Stream entries carry one field, `m`, holding bytes the runtime
//! encodes. An entry a worker settles is deleted with its acknowledgement; one a commit
//! settles is acknowledged, and the commits trim settled entries from the stream's front
//! in bulk (see the Redis store's commit), so streams hold work in progress and at most a
//! few hundred settled entries.

mod channels;
mod streams;

pub use self::channels::Listener;

use std::pin::Pin;
use std::time::Duration;

use bytes::Bytes;

use crate::error::StoreError;
use crate::redis_link::{Conn, RedisLink};
use crate::store::RedisStore;

fn backend(e: &redis::RedisError) -> StoreError {
    StoreError::unavailable("redis", e.clone())
}

/// Takes a free lease. KEYS: lease, counter, handover, token owners. ARGV: node, ttl ms.
/// Returns `{token, clean}` (`{0, 0}`: held by another).
const ACQUIRE: &str = r"
if redis.call('EXISTS', KEYS[1]) == 1 then return {0, 0} end
local t = redis.call('INCR', KEYS[2])
local h = redis.call('GET', KEYS[3])
local clean = 0
if h and tonumber(h) == t - 1 then clean = 1 end
redis.call('HSET', KEYS[1], 'o', ARGV[1], 't', t)
redis.call('PEXPIRE', KEYS[1], ARGV[2])
redis.call('HSET', KEYS[4], t, ARGV[1])
return {t, clean}
";

/// Extends a lease still held. KEYS: lease. ARGV: node, token, ttl ms. Returns 1 or 0.
const RENEW: &str = r"
if redis.call('HGET', KEYS[1], 'o') == ARGV[1] and redis.call('HGET', KEYS[1], 't') == ARGV[2] then
  redis.call('PEXPIRE', KEYS[1], ARGV[3])
  return 1
end
return 0
";

/// Gives a lease up. KEYS: lease, handover. ARGV: node, token, clean ('1'/'0').
const RELEASE: &str = r"
if redis.call('HGET', KEYS[1], 'o') == ARGV[1] and redis.call('HGET', KEYS[1], 't') == ARGV[2] then
  redis.call('DEL', KEYS[1])
  if ARGV[3] == '1' then redis.call('SET', KEYS[2], ARGV[2]) end
  return 1
end
return 0
";

/// Records a heartbeat and counts the live members. KEYS: members. ARGV: node, ttl ms.
/// Returns `{live, rank, server time in ms}`.
const HEARTBEAT: &str = r"
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
redis.call('ZREMRANGEBYSCORE', KEYS[1], '-inf', now)
redis.call('ZADD', KEYS[1], now + tonumber(ARGV[2]), ARGV[1])
return {redis.call('ZCARD', KEYS[1]), redis.call('ZRANK', KEYS[1], ARGV[1]), now}
";

/// A shard lease just taken.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Lease {
    /// The fencing token: higher than every token the shard had before.
    pub token: u64,
    /// Whether the previous owner released the shard cleanly (after its last commit and
    /// its last dispatch): then nothing it started is in doubt.
    pub clean: bool,
}

/// One stream entry read.
#[derive(Debug, Clone)]
pub struct Entry {
    /// Which of the streams read (index into the list given).
    pub stream: usize,
    /// The entry id (to acknowledge it).
    pub id: String,
    /// The bytes pushed.
    pub body: Bytes,
}

/// Where a live orchestrator stands among the members.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Membership {
    /// Live orchestrators (including this one).
    pub live: usize,
    /// This one's rank among them (0-based, by heartbeat expiry).
    pub rank: usize,
    /// Redis's clock when it ran the heartbeat (ms since the Unix epoch): processes
    /// measure time against it, never against each other's clocks.
    pub server_ms: u64,
}

/// The deployment's coordination on Redis (see the module docs). Get one from
/// [`RedisStore::bus`]; it shares the store's connection and key prefix.
///
/// ```no_run
/// # async fn demo() -> Result<(), flowwire::storage::StoreError> {
/// use std::time::Duration;
/// use flowwire::storage::store::RedisStore;
/// let bus = RedisStore::open("redis://127.0.0.1:6379/", "fw")?.with_shards(16).bus();
/// bus.agree_shards().await?;
/// if let Some(lease) = bus.acquire("Order", 3, "node-a", Duration::from_secs(10)).await? {
///     println!("shard 3 is ours under token {}", lease.token);
/// }
/// # Ok(()) }
/// ```
#[derive(Debug, Clone)]
pub struct RedisBus {
    link: RedisLink,
    prefix: String,
    shards: u16,
    /// The subscriber connection its clones' listeners share.
    channels: channels::Channels,
}

impl RedisStore {
    /// The bus of the deployment this store belongs to.
    pub fn bus(&self) -> RedisBus {
        let (link, prefix) = self.link();
        RedisBus {
            link: link.clone(),
            prefix: prefix.to_string(),
            shards: crate::store::InstanceStore::shards(self),
            channels: channels::Channels::new(link.clone()),
        }
    }
}

fn ms(d: Duration) -> u64 {
    u64::try_from(d.as_millis()).unwrap_or(u64::MAX).max(1)
}

/// The consumer group of the orchestrators on their shards' streams (requests and
/// outcomes); the commit script acknowledges outcomes in it.
pub const ORCHESTRATORS: &str = "orchestrators";

impl RedisBus {
    async fn conn(&self) -> Result<Conn, StoreError> {
        self.link.conn().await.map_err(|e| backend(&e))
    }

    fn shard_key(&self, what: &str, flow: &str, shard: u16) -> String {
        crate::store::redis::shard_key(&self.prefix, what, flow, shard)
    }

    /// The shard count of this deployment.
    pub fn shards(&self) -> u16 {
        self.shards
    }

    /// Records the shard count on first use, and checks that it matches the one recorded:
    /// instances are placed by `hash(id) % shards`, so processes that disagree would own
    /// the same instances under different leases.
    pub async fn agree_shards(&self) -> Result<(), StoreError> {
        let mut c = self.conn().await?;
        let key = format!("{}:shards", self.prefix);
        let _: Option<String> = redis::cmd("SET")
            .arg(&key)
            .arg(self.shards)
            .arg("NX")
            .query_async(&mut c)
            .await
            .map_err(|e| backend(&e))?;
        let found: Option<u16> = redis::cmd("GET")
            .arg(&key)
            .query_async(&mut c)
            .await
            .map_err(|e| backend(&e))?;
        match found {
            Some(n) if n == self.shards => Ok(()),
            other => Err(StoreError::Backend(format!(
                "this process splits flows into {} shards but the deployment under prefix {:?} uses {}; configure the same count everywhere",
                self.shards,
                self.prefix,
                other.map_or_else(|| "none".to_string(), |n| n.to_string()),
            ))),
        }
    }

    /// Says `node` is alive for `ttl` more (server time), drops members whose heartbeat
    /// ran out, and returns how many are live and where `node` ranks.
    pub async fn heartbeat(&self, node: &str, ttl: Duration) -> Result<Membership, StoreError> {
        let mut c = self.conn().await?;
        let (live, rank, server_ms): (usize, usize, u64) = redis::Script::new(HEARTBEAT)
            .key(format!("{}:members", self.prefix))
            .arg(node)
            .arg(ms(ttl))
            .invoke_async(&mut c)
            .await
            .map_err(|e| backend(&e))?;
        Ok(Membership {
            live,
            rank,
            server_ms,
        })
    }

    /// Removes `node` from the live members (it is leaving).
    pub async fn leave(&self, node: &str) -> Result<(), StoreError> {
        let mut c = self.conn().await?;
        redis::cmd("ZREM")
            .arg(format!("{}:members", self.prefix))
            .arg(node)
            .query_async::<()>(&mut c)
            .await
            .map_err(|e| backend(&e))
    }

    /// Takes the lease of a shard if no one holds it; `None` if another does.
    pub async fn acquire(
        &self,
        flow: &str,
        shard: u16,
        node: &str,
        ttl: Duration,
    ) -> Result<Option<Lease>, StoreError> {
        let mut c = self.conn().await?;
        let (token, clean): (u64, u8) = redis::Script::new(ACQUIRE)
            .key(self.shard_key("lease", flow, shard))
            .key(self.shard_key("token", flow, shard))
            .key(self.shard_key("handover", flow, shard))
            .key(self.shard_key("tokens", flow, shard))
            .arg(node)
            .arg(ms(ttl))
            .invoke_async(&mut c)
            .await
            .map_err(|e| backend(&e))?;
        Ok((token > 0).then_some(Lease {
            token,
            clean: clean == 1,
        }))
    }

    /// Extends a lease `node` holds under `token`; `false` if it no longer does.
    pub async fn renew(
        &self,
        flow: &str,
        shard: u16,
        node: &str,
        token: u64,
        ttl: Duration,
    ) -> Result<bool, StoreError> {
        let mut c = self.conn().await?;
        let held: u8 = redis::Script::new(RENEW)
            .key(self.shard_key("lease", flow, shard))
            .arg(node)
            .arg(token)
            .arg(ms(ttl))
            .invoke_async(&mut c)
            .await
            .map_err(|e| backend(&e))?;
        Ok(held == 1)
    }

    /// Gives up a lease `node` holds under `token`. `clean`: everything this owner
    /// committed was also dispatched, so the next owner need not send calls again.
    pub async fn release(
        &self,
        flow: &str,
        shard: u16,
        node: &str,
        token: u64,
        clean: bool,
    ) -> Result<(), StoreError> {
        let mut c = self.conn().await?;
        redis::Script::new(RELEASE)
            .key(self.shard_key("lease", flow, shard))
            .key(self.shard_key("handover", flow, shard))
            .arg(node)
            .arg(token)
            .arg(if clean { "1" } else { "0" })
            .invoke_async::<u8>(&mut c)
            .await
            .map_err(|e| backend(&e))?;
        Ok(())
    }

    /// Who holds a shard's lease now, with its token.
    pub async fn owner(&self, flow: &str, shard: u16) -> Result<Option<(String, u64)>, StoreError> {
        let mut c = self.conn().await?;
        let (o, t): (Option<String>, Option<u64>) = redis::cmd("HMGET")
            .arg(self.shard_key("lease", flow, shard))
            .arg("o")
            .arg("t")
            .query_async(&mut c)
            .await
            .map_err(|e| backend(&e))?;
        Ok(o.zip(t))
    }

    /// The stream of requests (starts, impulses) for a shard's owner.
    pub fn requests(&self, flow: &str, shard: u16) -> String {
        self.shard_key("req", flow, shard)
    }

    /// The stream of driver outcomes for a shard's owner.
    pub fn outcomes(&self, flow: &str, shard: u16) -> String {
        self.shard_key("out", flow, shard)
    }

    /// The channel a worker hands a call's outcome over on to a shard's owner, when the
    /// commit that applies the outcome settles the call (one server): nothing is written
    /// for it, and a worker whose outcome no owner took writes it to the outcome stream.
    pub fn handoffs(&self, flow: &str, shard: u16) -> String {
        self.shard_key("handoff", flow, shard)
    }

    /// Advertises `endpoint` as where the owner of the shard whose handoff channel is
    /// `channel` takes its outcomes directly (the runtime's direct handoffs: an address
    /// and a node's name); the shard's next owner overwrites it.
    pub async fn advertise(&self, channel: &str, endpoint: &str) -> Result<(), StoreError> {
        let mut c = self.conn().await?;
        redis::cmd("HSET")
            .arg(format!("{}:direct", self.prefix))
            .arg(channel)
            .arg(endpoint)
            .query_async::<()>(&mut c)
            .await
            .map_err(|e| backend(&e))
    }

    /// The endpoints advertised for `channels` (see [`RedisBus::advertise`]), in order.
    ///
    /// ```no_run
    /// # async fn demo() -> Result<(), flowwire::storage::StoreError> {
    /// use flowwire::storage::store::RedisStore;
    /// let bus = RedisStore::open("redis://127.0.0.1:6379/", "fw")?.bus();
    /// let channel = bus.handoffs("Order", 3);
    /// bus.advertise(&channel, "127.0.0.1:7400|node-a").await?;
    /// assert_eq!(bus.endpoints(&[channel]).await?, [Some("127.0.0.1:7400|node-a".to_string())]);
    /// # Ok(()) }
    /// ```
    pub async fn endpoints(&self, channels: &[String]) -> Result<Vec<Option<String>>, StoreError> {
        if channels.is_empty() {
            return Ok(Vec::new());
        }
        let mut c = self.conn().await?;
        redis::cmd("HMGET")
            .arg(format!("{}:direct", self.prefix))
            .arg(channels)
            .query_async(&mut c)
            .await
            .map_err(|e| backend(&e))
    }

    /// The stream of calls for the workers of a driver trait.
    pub fn jobs(&self, driver: &str) -> String {
        format!("{}:jobs:{{{driver}}}", self.prefix)
    }

    /// The channel a flow's shard owners announce ended instances on (their ids), for
    /// callers of `finished()` in any process.
    pub fn ended(&self, flow: &str) -> String {
        format!("{}:ended:{flow}", self.prefix)
    }

    /// The channel a process receives the replies to its requests on.
    pub fn replies(&self, node: &str) -> String {
        format!("{}:reply:{node}", self.prefix)
    }

    /// Publishes bytes on a channel (replies to a requesting process).
    pub async fn publish(&self, channel: &str, body: &[u8]) -> Result<(), StoreError> {
        let mut c = self.conn().await?;
        redis::cmd("PUBLISH")
            .arg(channel)
            .arg(body)
            .query_async::<i64>(&mut c)
            .await
            .map_err(|e| backend(&e))?;
        Ok(())
    }

    /// Publishes several messages on one channel, in one round trip.
    pub async fn publish_all(&self, channel: &str, bodies: &[&[u8]]) -> Result<(), StoreError> {
        if bodies.is_empty() {
            return Ok(());
        }
        let mut c = self.conn().await?;
        let mut pipe = redis::pipe();
        for body in bodies {
            pipe.cmd("PUBLISH").arg(channel).arg(*body).ignore();
        }
        pipe.query_async::<()>(&mut c)
            .await
            .map_err(|e| backend(&e))?;
        Ok(())
    }

    /// Publishes each `(channel, bytes)` message, in one round trip; returns how many
    /// subscribers received each (`0`: nobody listened, the message is gone).
    pub async fn publish_each(&self, messages: &[(String, Bytes)]) -> Result<Vec<u64>, StoreError> {
        if messages.is_empty() {
            return Ok(Vec::new());
        }
        let mut c = self.conn().await?;
        let mut pipe = redis::pipe();
        for (channel, body) in messages {
            pipe.cmd("PUBLISH").arg(channel).arg(&body[..]);
        }
        pipe.query_async(&mut c).await.map_err(|e| backend(&e))
    }

    /// Listens on a channel over the subscriber connection this bus and its clones share
    /// (one connection for many channels; see [`Listener`]).
    ///
    /// ```no_run
    /// # async fn demo() -> Result<(), flowwire::storage::StoreError> {
    /// use flowwire::storage::store::RedisStore;
    /// let bus = RedisStore::open("redis://127.0.0.1:6379/", "fw")?.bus();
    /// let mut replies = bus.listen(&bus.replies("node-a")).await?;
    /// while let Some(body) = replies.next().await {
    ///     println!("{} bytes", body.len());
    /// }
    /// // `None`: the connection was lost; listen again.
    /// # Ok(()) }
    /// ```
    pub async fn listen(&self, channel: &str) -> Result<Listener, StoreError> {
        self.channels.listen(channel).await
    }

    /// Subscribes to a channel, on a connection of its own.
    pub async fn subscribe(&self, channel: &str) -> Result<Subscription, StoreError> {
        let mut pubsub = self.link.pubsub().await.map_err(|e| backend(&e))?;
        pubsub.subscribe(channel).await.map_err(|e| backend(&e))?;
        Ok(Subscription {
            stream: pubsub.into_on_message(),
        })
    }
}

/// Reads streams through a consumer group, on a connection of its own.
pub struct StreamReader {
    conn: Conn,
}

impl std::fmt::Debug for StreamReader {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("StreamReader").finish_non_exhaustive()
    }
}

/// Messages published on a channel.
pub struct Subscription {
    stream: redis::aio::PubSubStream,
}

impl std::fmt::Debug for Subscription {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Subscription").finish_non_exhaustive()
    }
}

impl Subscription {
    /// The next message's bytes; `None` once the connection is gone (subscribe again).
    pub async fn next(&mut self) -> Option<Bytes> {
        use futures_core::Stream;
        let msg = std::future::poll_fn(|cx| Pin::new(&mut self.stream).poll_next(cx)).await?;
        Some(Bytes::copy_from_slice(msg.get_payload_bytes()))
    }
}
