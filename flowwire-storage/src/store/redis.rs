//! The Redis store: instance records shared by every process of a deployment.
//!
//! Keys, per instance. They carry the hash tag of the instance's *shard* (`{flow#s}`, where
//! `s = hash(id) % shards`), the tag of the shard's lease and fencing-token counter on the
//! bus (`crate::bus`): one Lua script can check the shard's newest token and write the
//! instance's keys atomically, on one server or in one Redis Cluster slot.
//!
//! | key | type | holds |
//! | --- | --- | --- |
//! | `P:{flow#s}:r:id` | hash | `v` version, `b` encoded record, `a` active flag, `p` parked flag, `k` correlation key, `e` the key it ended with, `f` last fencing token |
//! | `P:{flow#s}:i:id` | hash | impulse id → step that applied it |
//! | `P:{flow#s}:hz:id` | sorted set | history step numbers |
//! | `P:{flow#s}:hh:id` | hash | step number → encoded history entry |
//! | `P:{flow#s}:w:id` | list | `step:token:newest` per write, when writes are audited ([`RedisStore::audit_writes`]) |
//! | `P:token:{flow#s}` | counter | the newest fencing token granted for the shard (written by the bus) |
//! | `P:epoch` | string | `layout2:` and a random token: the data's identity and key layout |
//! | `P:active:{flow#shard}` | set | ids of (possibly) active instances of a shard |
//! | `P:timers:{flow#shard}` | sorted set | id scored by its timer's due time (ms), per shard |
//! | `P:parked:{flow}` | sorted set | ids of (possibly) parked instances, all scored 0 (listed by id) |
//! | `P:corr:{flow}:key` | set | ids of (possibly) live instances with that correlation key |
//! | `P:retired:{flow}:key` | set | ids of (possibly) ended instances that carried that key (record field `e`) |
//!
//! A step is one `EVALSHA` of [`COMMIT`]: the fencing check (multi-process mode: a step
//! written under a token older than the newest one granted for its shard is refused, as is
//! one older than the token its record was last written under), compare-and-swap on the version, insert-if-absent of the impulse id, the record, the history entry and the pruning, all or nothing. A batch
//! is one pipeline of those scripts (one round trip); each step is atomic on its own.
//!
//! The active, timer, parked and correlation sets live in other slots, so they cannot be in the script.
//! They are kept *conservative*: an entry is added before the step that needs it is
//! committed and removed after the step that drops it, so a crash in between leaves an
//! extra entry, never a missing one. Extra active, parked and correlated ids are filtered
//! out by the record's own fields (and dropped when found); an extra timer entry is found by the runtime when it fires (the
//! record says otherwise) and repaired with [`InstanceStore::retime`].

use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;

use super::{ActiveList, BoxFuture, DamagedList, InstanceStore};
use crate::error::StoreError;
use crate::record::{Expect, InstanceKey, StepResult, StepWrite, Stored};
use crate::redis_link::{Conn, RedisLink};

/// The commit script (one step of one instance).
pub const COMMIT: &str = r"
-- KEYS: record, impulses, history index, history entries, write audit, shard's token counter
-- ARGV: expect ('' = absent), version, seq, record, active, impulse id ('' = none),
--       has history ('1'/'0'), history entry, prune below ('' = none), parked,
--       correlation key ('' = none), fencing token ('' = none), audit ('1'/'0'),
--       ended with key ('' = none)
local newest = 0
if ARGV[12] ~= '' then
  local mine = tonumber(ARGV[12])
  newest = tonumber(redis.call('GET', KEYS[6]) or '0')
  if newest > mine then return {3, newest} end
  local last = redis.call('HGET', KEYS[1], 'f')
  if last and tonumber(last) > mine then return {3, tonumber(last)} end
end
local found = redis.call('HGET', KEYS[1], 'v')
if ARGV[1] == '' then
  if found then return {1, tonumber(found)} end
elseif found ~= ARGV[1] then
  if found then return {1, tonumber(found)} end
  return {1, -1}
end
if ARGV[6] ~= '' then
  local seen = redis.call('HGET', KEYS[2], ARGV[6])
  if seen then return {2, tonumber(seen)} end
  redis.call('HSET', KEYS[2], ARGV[6], ARGV[3])
end
redis.call('HSET', KEYS[1], 'v', ARGV[2], 'b', ARGV[4], 'a', ARGV[5], 'p', ARGV[10], 'k', ARGV[11])
if ARGV[12] ~= '' then redis.call('HSET', KEYS[1], 'f', ARGV[12]) end
if ARGV[14] ~= '' then redis.call('HSET', KEYS[1], 'e', ARGV[14]) end
if ARGV[13] == '1' then redis.call('RPUSH', KEYS[5], ARGV[3] .. ':' .. ARGV[12] .. ':' .. newest) end
if ARGV[7] == '1' then
  redis.call('ZADD', KEYS[3], ARGV[3], ARGV[3])
  redis.call('HSET', KEYS[4], ARGV[3], ARGV[8])
end
if ARGV[9] ~= '' then
  local bound = '(' .. ARGV[9]
  while true do
    local old = redis.call('ZRANGEBYSCORE', KEYS[3], '-inf', bound, 'LIMIT', 0, 500)
    if #old == 0 then break end
    redis.call('HDEL', KEYS[4], unpack(old))
    redis.call('ZREM', KEYS[3], unpack(old))
  end
end
return {0, 0}
";

/// Repairs one timer entry: `KEYS[1]` the timer set; `ARGV`: id, stale due, actual due
/// (`''` = none). Changes nothing unless the entry is still at the stale time.
const RETIME: &str = r"
local s = redis.call('ZSCORE', KEYS[1], ARGV[1])
if s and tonumber(s) == tonumber(ARGV[2]) then
  if ARGV[3] == '' then
    redis.call('ZREM', KEYS[1], ARGV[1])
  else
    redis.call('ZADD', KEYS[1], ARGV[3], ARGV[1])
  end
end
return 0
";

/// The key of one of a shard's keys of `what` (its lease, token counter, streams, active
/// and timer indexes), tagged `{flow#shard}` like the keys of the shard's instances.
pub(crate) fn shard_key(prefix: &str, what: &str, flow: &str, shard: u16) -> String {
    format!("{prefix}:{what}:{{{flow}#{shard}}}")
}

/// The key layout this build writes, recorded in the epoch token (`layout2:…`). Layout 1
/// tagged each instance's keys with its own id, so that a commit could not read its
/// shard's fencing token on a cluster; its data is refused, not read as empty.
const LAYOUT: &str = "layout2:";

/// One write of an instance as the store's audit recorded it
/// ([`RedisStore::audit_writes`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct AuditedWrite {
    /// The step written.
    pub step: u64,
    /// The fencing token it carried (0: none, single-process mode).
    pub token: u64,
    /// The newest token granted for the instance's shard when it was applied (0: none
    /// granted, or the write carried no token). A write with `token < newest` came from an
    /// owner that had lost the shard; the commit script refuses those.
    pub newest: u64,
}

impl AuditedWrite {
    fn parse(row: &str) -> Option<Self> {
        let mut parts = row.split(':');
        let step = parts.next()?.parse().ok()?;
        let token = parts.next().and_then(|t| t.parse().ok()).unwrap_or(0);
        let newest = parts.next().and_then(|t| t.parse().ok()).unwrap_or(0);
        Some(Self {
            step,
            token,
            newest,
        })
    }
}

/// A record hash as read back: version, bytes, active flag.
type RecordRow = (Option<u64>, Option<Vec<u8>>, Option<String>);

/// Ids read per round trip when listing active instances.
const PAGE: usize = 256;

/// Instance records in Redis (or Redis Cluster: every instance's keys share a hash tag).
///
/// ```no_run
/// # async fn demo() -> Result<(), flowwire_storage::StoreError> {
/// use flowwire_storage::store::RedisStore;
/// let store = RedisStore::open("redis://127.0.0.1:6379/", "fw")?;
/// # Ok(()) }
/// ```
#[derive(Debug, Clone)]
pub struct RedisStore {
    link: RedisLink,
    prefix: String,
    sha: String,
    shards: u16,
    audit: bool,
    epoch: std::sync::Arc<Epoch>,
}

/// The identity of the data a store writes to: a random token the first store to use the
/// prefix writes under `<prefix>:epoch`, which every later use finds. A server that comes
/// back without it (restarted without persistence, or flushed) lost the store's data.
#[derive(Debug, Default)]
struct Epoch {
    /// The token found (or written) at this store's first use.
    known: std::sync::Mutex<Option<String>>,
    /// Set once the token was found missing or changed.
    lost: std::sync::OnceLock<String>,
}

fn backend(e: &redis::RedisError) -> StoreError {
    StoreError::unavailable("redis", e.clone())
}

/// Whether a server answered that it does not have the script (its cache was lost).
fn is_no_script(e: &redis::RedisError) -> bool {
    e.kind() == redis::ErrorKind::Server(redis::ServerErrorKind::NoScript)
}

/// The replies of a batch, each converted to `T`.
fn parse<T: redis::FromRedisValue>(
    replies: redis::RedisResult<Vec<redis::Value>>,
) -> Result<Vec<T>, StoreError> {
    replies
        .map_err(|e| backend(&e))?
        .into_iter()
        .map(|v| {
            redis::from_redis_value(v)
                .map_err(|e| StoreError::Backend(format!("redis: unexpected reply: {e}")))
        })
        .collect()
}

impl RedisStore {
    /// A store on the Redis server at `url`, with every key under `prefix` (no `{` or `}`).
    /// Connects on first use; reconnects by itself after the server comes back.
    pub fn open(url: &str, prefix: &str) -> Result<Self, StoreError> {
        Self::check_prefix(prefix)?;
        let link = RedisLink::open(url, Duration::from_secs(10)).map_err(StoreError::Backend)?;
        Ok(Self::on(link, prefix))
    }

    /// A store on a Redis Cluster, given the URLs of some of its nodes (the others are
    /// discovered), with every key under `prefix`. Each instance's keys share a hash tag,
    /// so its step commits atomically in one slot; the indexes are per flow.
    ///
    /// ```no_run
    /// # async fn demo() -> Result<(), flowwire_storage::StoreError> {
    /// use flowwire_storage::store::RedisStore;
    /// let store = RedisStore::cluster(
    ///     &["redis://127.0.0.1:7001/", "redis://127.0.0.1:7002/"],
    ///     "fw",
    /// )?;
    /// # Ok(()) }
    /// ```
    pub fn cluster(nodes: &[&str], prefix: &str) -> Result<Self, StoreError> {
        Self::check_prefix(prefix)?;
        let link =
            RedisLink::cluster(nodes, Duration::from_secs(10)).map_err(StoreError::Backend)?;
        Ok(Self::on(link, prefix))
    }

    fn check_prefix(prefix: &str) -> Result<(), StoreError> {
        if prefix.contains(['{', '}']) {
            return Err(StoreError::Backend(format!(
                "the Redis key prefix {prefix:?} must not contain `{{` or `}}` (they mark Redis Cluster hash tags)"
            )));
        }
        Ok(())
    }

    fn on(link: RedisLink, prefix: &str) -> Self {
        Self {
            link,
            prefix: prefix.to_string(),
            sha: redis::Script::new(COMMIT).get_hash().to_string(),
            shards: 1,
            audit: false,
            epoch: std::sync::Arc::default(),
        }
    }

    fn lost(&self) -> Option<StoreError> {
        self.epoch.lost.get().map(|detail| StoreError::Lost {
            detail: detail.clone(),
        })
    }

    /// Checks that the server still holds this store's data: at first use the epoch token
    /// is read (or written, for a new prefix); after that it must be there unchanged.
    async fn check_epoch(&self, c: &mut Conn) -> Result<(), StoreError> {
        use std::hash::BuildHasher as _;
        if let Some(lost) = self.lost() {
            return Err(lost);
        }
        let key = format!("{}:epoch", self.prefix);
        let known = self
            .epoch
            .known
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .clone();
        match known {
            None => {
                let token = format!(
                    "{LAYOUT}{:016x}",
                    std::hash::RandomState::new().hash_one(std::process::id())
                );
                let found: Option<String> = redis::cmd("SET")
                    .arg(&key)
                    .arg(&token)
                    .arg("NX")
                    .arg("GET")
                    .query_async(c)
                    .await
                    .map_err(|e| backend(&e))?;
                if let Some(found) = found.as_deref()
                    && !found.starts_with(LAYOUT)
                {
                    return Err(StoreError::Incompatible {
                        detail: format!(
                            "the data under the Redis key prefix {:?} was written with an older key layout (epoch {found:?}); this build writes {}",
                            self.prefix,
                            LAYOUT.trim_end_matches(':'),
                        ),
                    });
                }
                *self
                    .epoch
                    .known
                    .lock()
                    .unwrap_or_else(std::sync::PoisonError::into_inner) =
                    Some(found.unwrap_or(token));
                Ok(())
            }
            Some(known) => {
                let found: Option<String> = redis::cmd("GET")
                    .arg(&key)
                    .query_async(c)
                    .await
                    .map_err(|e| backend(&e))?;
                if found.as_deref() == Some(known.as_str()) {
                    return Ok(());
                }
                let detail = match found {
                    None => format!("the key {key} that marked its data is gone"),
                    Some(other) => format!("the key {key} marks other data ({other}, not {known})"),
                };
                tracing::error!(prefix = %self.prefix, %detail, "the Redis store lost its data");
                let _ = self.epoch.lost.set(detail);
                Err(self.lost().expect("just set"))
            }
        }
    }

    /// Splits each flow's instances into `n` shards (1 to 4096; default 1): the active and
    /// timer indexes are kept per shard, so that the orchestrator owning a shard reads only
    /// its own. Every process of a deployment must use the same count (the engine checks it
    /// in multi-process mode).
    #[must_use]
    pub fn with_shards(mut self, n: u16) -> Self {
        self.shards = n.clamp(1, 4096);
        self
    }

    /// Records every write of an instance as `step:token` in a list next to its record
    /// ([`RedisStore::writes`]): the proof, for crash tests and audits, that no step was
    /// written twice and that fencing tokens never went back. Costs one list push per step.
    #[must_use]
    pub fn audit_writes(mut self) -> Self {
        self.audit = true;
        self
    }

    /// The audited writes of an instance, in order: `(step, fencing token)` (token 0: the
    /// write carried none). Empty unless [`RedisStore::audit_writes`] was set.
    pub async fn writes(&self, key: &InstanceKey) -> Result<Vec<(u64, u64)>, StoreError> {
        Ok(self
            .audit(key)
            .await?
            .into_iter()
            .map(|w| (w.step, w.token))
            .collect())
    }

    /// The audited writes of an instance, in order, each with the newest token its shard
    /// had been granted when the write was applied. Empty unless
    /// [`RedisStore::audit_writes`] was set.
    ///
    /// ```no_run
    /// # async fn demo() -> Result<(), flowwire_storage::StoreError> {
    /// use flowwire_storage::InstanceKey;
    /// use flowwire_storage::store::RedisStore;
    /// let store = RedisStore::open("redis://127.0.0.1:6379/", "fw")?.audit_writes();
    /// for w in store.audit(&InstanceKey::new("Order", "o-1")).await? {
    ///     assert!(w.token >= w.newest, "step {} written by a stale owner", w.step);
    /// }
    /// # Ok(()) }
    /// ```
    pub async fn audit(&self, key: &InstanceKey) -> Result<Vec<AuditedWrite>, StoreError> {
        let mut c = self.conn().await?;
        let [.., w] = self.keys(key);
        let rows: Vec<String> = redis::cmd("LRANGE")
            .arg(&w)
            .arg(0)
            .arg(-1)
            .query_async(&mut c)
            .await
            .map_err(|e| backend(&e))?;
        Ok(rows.iter().filter_map(|r| AuditedWrite::parse(r)).collect())
    }

    /// The link and key prefix, for the deployment's bus (leases, streams).
    pub(crate) fn link(&self) -> (&RedisLink, &str) {
        (&self.link, &self.prefix)
    }

    /// An instance's keys (record, impulses, history index, history entries, write audit),
    /// tagged with its shard.
    fn keys(&self, key: &InstanceKey) -> [String; 5] {
        let shard = self.shard(&key.id);
        let (prefix, flow, id) = (&self.prefix, &key.flow, &key.id);
        [
            format!("{prefix}:{{{flow}#{shard}}}:r:{id}"),
            format!("{prefix}:{{{flow}#{shard}}}:i:{id}"),
            format!("{prefix}:{{{flow}#{shard}}}:hz:{id}"),
            format!("{prefix}:{{{flow}#{shard}}}:hh:{id}"),
            format!("{prefix}:{{{flow}#{shard}}}:w:{id}"),
        ]
    }

    fn shard(&self, id: &str) -> u16 {
        super::shard_of(id, self.shards)
    }

    fn active_key(&self, flow: &str, shard: u16) -> String {
        shard_key(&self.prefix, "active", flow, shard)
    }

    fn timers_key(&self, flow: &str, shard: u16) -> String {
        shard_key(&self.prefix, "timers", flow, shard)
    }

    fn parked_key(&self, flow: &str) -> String {
        format!("{}:parked:{{{flow}}}", self.prefix)
    }

    fn damaged_key(&self, flow: &str) -> String {
        format!("{}:damaged:{{{flow}}}", self.prefix)
    }

    fn ended_key(&self, flow: &str, key: &str) -> String {
        format!("{}:retired:{{{flow}}}:{key}", self.prefix)
    }

    fn corr_key(&self, flow: &str, key: &str) -> String {
        format!("{}:corr:{{{flow}}}:{key}", self.prefix)
    }

    async fn conn(&self) -> Result<Conn, StoreError> {
        self.link.conn().await.map_err(|e| backend(&e))
    }

    /// The index entries a batch needs before it commits (see the module docs).
    fn index_adds(&self, batch: &[StepWrite]) -> Vec<redis::Cmd> {
        let mut adds = Vec::new();
        for s in batch {
            let (flow, id) = (&*s.key.flow, &*s.key.id);
            let shard = self.shard(id);
            if s.active {
                adds.push(redis::Cmd::sadd(self.active_key(flow, shard), id));
            }
            if s.parked {
                adds.push(redis::Cmd::zadd(self.parked_key(flow), id, 0));
            }
            if let Some(due) = s.timer {
                adds.push(redis::Cmd::zadd(self.timers_key(flow, shard), id, due));
            }
            if let Some(k) = &s.correlation {
                adds.push(redis::Cmd::sadd(self.corr_key(flow, k), id));
            }
            if let Some(k) = &s.ended_key {
                adds.push(redis::Cmd::sadd(self.ended_key(flow, k), id));
            }
        }
        adds
    }

    /// The commit script of each step.
    fn scripts(&self, batch: &[StepWrite]) -> Vec<redis::Cmd> {
        let mut scripts = Vec::with_capacity(batch.len());
        for s in batch {
            let keys = self.keys(&s.key);
            let token = shard_key(&self.prefix, "token", &s.key.flow, self.shard(&s.key.id));
            let expect = match s.expect {
                Expect::Absent => String::new(),
                Expect::Version(v) => v.to_string(),
            };
            let (has_hist, hist) = match &s.history {
                Some((_, h)) => ("1", &h[..]),
                None => ("0", &[][..]),
            };
            let mut script = redis::cmd("EVALSHA");
            script
                .arg(&self.sha)
                .arg(6)
                .arg(&keys[..])
                .arg(&token)
                .arg(expect)
                .arg(s.version)
                .arg(s.seq)
                .arg(&s.record[..])
                .arg(if s.active { "1" } else { "0" })
                .arg(s.impulse.as_deref().unwrap_or(""))
                .arg(has_hist)
                .arg(hist)
                .arg(s.prune_below.map(|p| p.to_string()).unwrap_or_default())
                .arg(if s.parked { "1" } else { "0" })
                .arg(s.correlation.as_deref().unwrap_or(""))
                .arg(s.fence.map(|f| f.to_string()).unwrap_or_default())
                .arg(if self.audit { "1" } else { "0" })
                .arg(s.ended_key.as_deref().unwrap_or(""));
            scripts.push(script);
        }
        scripts
    }

    /// Loads the commit script (on a cluster, on every master).
    async fn load_script(c: &mut Conn) -> Result<(), StoreError> {
        redis::Script::new(COMMIT)
            .prepare_invoke()
            .load_async(c)
            .await
            .map(|_| ())
            .map_err(|e| backend(&e))
    }

    /// Adds the index entries, then runs the commit scripts; returns the scripts' replies.
    ///
    /// On one server both go in one pipeline (one round trip, in order). A server that
    /// restarted and lost its script cache answers `NOSCRIPT` to every script of the
    /// pipeline (none ran), so the whole batch is sent again after loading it. On a cluster
    /// the index entries land before any script is sent, and only the scripts that met a
    /// node without the script are sent again: the others may have committed.
    async fn add_and_commit(
        &self,
        c: &mut Conn,
        batch: &[StepWrite],
    ) -> Result<Vec<redis::Value>, StoreError> {
        let no_script = |r: &redis::RedisResult<redis::Value>| r.as_ref().is_err_and(is_no_script);
        if matches!(c, Conn::Cluster(_)) {
            c.batch(self.index_adds(batch))
                .await
                .map_err(|e| backend(&e))?;
            let scripts = self.scripts(batch);
            let mut results = c.each(&scripts).await;
            if results.iter().any(no_script) {
                Self::load_script(c).await?;
                for (r, script) in results.iter_mut().zip(&scripts) {
                    if no_script(r) {
                        *r = script.query_async(c).await;
                    }
                }
            }
            return results
                .into_iter()
                .collect::<redis::RedisResult<Vec<_>>>()
                .map_err(|e| backend(&e));
        }
        let all = |this: &Self| {
            let mut all = this.index_adds(batch);
            let n = all.len();
            all.extend(this.scripts(batch));
            (all, n)
        };
        let (cmds, n) = all(self);
        let mut replies = match c.batch(cmds).await {
            Ok(r) => r,
            Err(e) if is_no_script(&e) => {
                Self::load_script(c).await?;
                let (cmds, _) = all(self);
                c.batch(cmds).await.map_err(|e| backend(&e))?
            }
            Err(e) => return Err(backend(&e)),
        };
        Ok(replies.split_off(n))
    }

    async fn commit_batch(&self, batch: &[StepWrite]) -> Result<Vec<StepResult>, StoreError> {
        let mut c = self.conn().await?;
        // A wiped server must not take steps that build on records it no longer holds.
        self.check_epoch(&mut c).await?;
        let values = self.add_and_commit(&mut c, batch).await?;
        let mut replies = Vec::with_capacity(values.len());
        for v in values {
            let reply: (i64, i64) = redis::from_redis_value(v)
                .map_err(|e| StoreError::Backend(format!("redis: unexpected commit reply: {e}")))?;
            replies.push(reply);
        }
        let mut results = Vec::with_capacity(batch.len());
        let mut removes = Vec::new();
        for (s, (code, n)) in batch.iter().zip(replies) {
            results.push(match code {
                0 => {
                    let (flow, id) = (&*s.key.flow, &*s.key.id);
                    let shard = self.shard(id);
                    if !s.active {
                        removes.push(redis::Cmd::srem(self.active_key(flow, shard), id));
                    }
                    if !s.parked {
                        removes.push(redis::Cmd::zrem(self.parked_key(flow), id));
                    }
                    if let Some(old) = &s.uncorrelate {
                        removes.push(redis::Cmd::srem(self.corr_key(flow, old), id));
                    }
                    if s.timer.is_none() {
                        removes.push(redis::Cmd::zrem(self.timers_key(flow, shard), id));
                    }
                    StepResult::Committed
                }
                1 => StepResult::Conflict {
                    found: u64::try_from(n).ok(),
                },
                3 => StepResult::Fenced {
                    token: u64::try_from(n).unwrap_or(0),
                },
                _ => StepResult::ImpulseSeen {
                    seq: u64::try_from(n).unwrap_or(0),
                },
            });
        }
        // Best effort: an entry left behind is filtered by its record's flags, or repaired
        // when its timer fires.
        let _ = c.batch(removes).await;
        Ok(results)
    }

    /// The active instances of one shard (stale index entries are dropped on the way).
    async fn active_shard(&self, flow: &str, shard: u16) -> Result<ActiveList, StoreError> {
        {
            let mut c = self.conn().await?;
            // Recovery starts here: data of another layout, or lost data, is refused
            // before anything is read as empty.
            self.check_epoch(&mut c).await?;
            let set = self.active_key(flow, shard);
            let ids: Vec<String> = redis::cmd("SMEMBERS")
                .arg(&set)
                .query_async(&mut c)
                .await
                .map_err(|e| backend(&e))?;
            let mut out = Vec::new();
            let mut stale = Vec::new();
            for page in ids.chunks(PAGE) {
                let cmds = page.iter().map(|id| {
                    let [r, ..] = self.keys(&InstanceKey::new(flow, id.as_str()));
                    let mut cmd = redis::cmd("HMGET");
                    cmd.arg(r).arg("v").arg("b").arg("a");
                    cmd
                });
                let rows: Vec<RecordRow> = parse(c.batch(cmds.collect()).await)?;
                for (id, row) in page.iter().zip(rows) {
                    match row {
                        (Some(version), Some(bytes), Some(a)) if a == "1" => out.push((
                            id.as_str().into(),
                            Stored {
                                version,
                                bytes: Bytes::from(bytes),
                            },
                        )),
                        _ => stale.push(id.clone()),
                    }
                }
            }
            if !stale.is_empty() {
                let _ = redis::cmd("SREM")
                    .arg(&set)
                    .arg(&stale)
                    .query_async::<()>(&mut c)
                    .await;
            }
            Ok(out)
        }
    }

    /// The armed timers of one shard due by `until_ms`, earliest first, at most `limit`.
    async fn due_shard(
        &self,
        flow: &str,
        shard: u16,
        until_ms: u64,
        limit: usize,
    ) -> Result<super::DueList, StoreError> {
        let mut c = self.conn().await?;
        let rows: Vec<(String, u64)> = redis::cmd("ZRANGEBYSCORE")
            .arg(self.timers_key(flow, shard))
            .arg("-inf")
            .arg(until_ms)
            .arg("WITHSCORES")
            .arg("LIMIT")
            .arg(0)
            .arg(limit)
            .query_async(&mut c)
            .await
            .map_err(|e| backend(&e))?;
        Ok(rows.into_iter().map(|(id, d)| (id.into(), d)).collect())
    }
}

impl InstanceStore for RedisStore {
    fn commit(
        &self,
        batch: Vec<StepWrite>,
    ) -> BoxFuture<'static, Result<Vec<StepResult>, StoreError>> {
        // The commit outlives the borrow of the store (see the trait): it holds a clone.
        let this = self.clone();
        Box::pin(async move { this.commit_batch(&batch).await })
    }

    fn fault(&self) -> Option<StoreError> {
        self.lost()
    }

    fn mark_damaged<'a>(
        &'a self,
        key: &'a InstanceKey,
        reason: Option<&'a str>,
    ) -> BoxFuture<'a, Result<(), StoreError>> {
        Box::pin(async move {
            let mut c = self.conn().await?;
            let hash = self.damaged_key(&key.flow);
            let cmd = match reason {
                Some(why) => redis::Cmd::hset(hash, &*key.id, why),
                None => redis::Cmd::hdel(hash, &*key.id),
            };
            cmd.query_async::<()>(&mut c).await.map_err(|e| backend(&e))
        })
    }

    fn damaged<'a>(
        &'a self,
        flow: &'a str,
        after: Option<&'a str>,
        limit: usize,
    ) -> BoxFuture<'a, Result<DamagedList, StoreError>> {
        Box::pin(async move {
            let mut c = self.conn().await?;
            // Damaged instances are few (an operator clears them): read them all, page here.
            let all: std::collections::BTreeMap<String, String> =
                redis::Cmd::hgetall(self.damaged_key(flow))
                    .query_async(&mut c)
                    .await
                    .map_err(|e| backend(&e))?;
            Ok(all
                .into_iter()
                .filter(|(id, _)| after.is_none_or(|a| id.as_str() > a))
                .take(limit)
                .map(|(id, why)| (Arc::from(id), why))
                .collect())
        })
    }

    fn delete<'a>(&'a self, key: &'a InstanceKey) -> BoxFuture<'a, Result<(), StoreError>> {
        Box::pin(async move {
            let mut c = self.conn().await?;
            let (flow, id) = (&*key.flow, &*key.id);
            let keys = self.keys(key);
            // The correlation keys, from the record's own fields (the record itself may not
            // decode); the indexes are filtered by their records anyway.
            let (corr, ended): (Option<String>, Option<String>) = redis::cmd("HMGET")
                .arg(&keys[0])
                .arg("k")
                .arg("e")
                .query_async(&mut c)
                .await
                .map_err(|e| backend(&e))?;
            let shard = self.shard(id);
            let mut cmds = vec![
                redis::Cmd::del(&keys[..]),
                redis::Cmd::srem(self.active_key(flow, shard), id),
                redis::Cmd::zrem(self.timers_key(flow, shard), id),
                redis::Cmd::zrem(self.parked_key(flow), id),
                redis::Cmd::hdel(self.damaged_key(flow), id),
            ];
            if let Some(k) = corr.filter(|k| !k.is_empty()) {
                cmds.push(redis::Cmd::srem(self.corr_key(flow, &k), id));
            }
            if let Some(k) = ended.filter(|k| !k.is_empty()) {
                cmds.push(redis::Cmd::srem(self.ended_key(flow, &k), id));
            }
            for cmd in cmds {
                cmd.query_async::<()>(&mut c)
                    .await
                    .map_err(|e| backend(&e))?;
            }
            Ok(())
        })
    }

    fn load<'a>(
        &'a self,
        key: &'a InstanceKey,
    ) -> BoxFuture<'a, Result<Option<Stored>, StoreError>> {
        Box::pin(async move {
            let mut c = self.conn().await?;
            let [r, ..] = self.keys(key);
            let (v, b): (Option<u64>, Option<Vec<u8>>) = redis::cmd("HMGET")
                .arg(&r)
                .arg("v")
                .arg("b")
                .query_async(&mut c)
                .await
                .map_err(|e| backend(&e))?;
            let found = v.zip(b).map(|(version, bytes)| Stored {
                version,
                bytes: Bytes::from(bytes),
            });
            if found.is_none() {
                // "No such instance" from a server that lost its data is not an answer.
                self.check_epoch(&mut c).await?;
            }
            Ok(found)
        })
    }

    fn active<'a>(&'a self, flow: &'a str) -> BoxFuture<'a, Result<ActiveList, StoreError>> {
        Box::pin(async move {
            let mut out = Vec::new();
            for shard in 0..self.shards {
                out.extend(self.active_shard(flow, shard).await?);
            }
            Ok(out)
        })
    }

    fn shards(&self) -> u16 {
        self.shards
    }

    fn active_in<'a>(
        &'a self,
        flow: &'a str,
        shard: u16,
    ) -> BoxFuture<'a, Result<ActiveList, StoreError>> {
        Box::pin(self.active_shard(flow, shard))
    }

    fn due_in<'a>(
        &'a self,
        flow: &'a str,
        shard: u16,
        until_ms: u64,
        limit: usize,
    ) -> BoxFuture<'a, Result<super::DueList, StoreError>> {
        Box::pin(self.due_shard(flow, shard, until_ms, limit))
    }

    fn history<'a>(
        &'a self,
        key: &'a InstanceKey,
        from: u64,
        limit: usize,
    ) -> BoxFuture<'a, Result<Vec<(u64, Bytes)>, StoreError>> {
        Box::pin(async move {
            let mut c = self.conn().await?;
            let [_, _, hz, hh, _] = self.keys(key);
            let seqs: Vec<u64> = redis::cmd("ZRANGEBYSCORE")
                .arg(&hz)
                .arg(from)
                .arg("+inf")
                .arg("LIMIT")
                .arg(0)
                .arg(limit)
                .query_async(&mut c)
                .await
                .map_err(|e| backend(&e))?;
            if seqs.is_empty() {
                return Ok(Vec::new());
            }
            let entries: Vec<Option<Vec<u8>>> = redis::cmd("HMGET")
                .arg(&hh)
                .arg(&seqs)
                .query_async(&mut c)
                .await
                .map_err(|e| backend(&e))?;
            Ok(seqs
                .into_iter()
                .zip(entries)
                .filter_map(|(s, e)| e.map(|e| (s, Bytes::from(e))))
                .collect())
        })
    }

    fn impulse_applied<'a>(
        &'a self,
        key: &'a InstanceKey,
        impulse_id: &'a str,
    ) -> BoxFuture<'a, Result<Option<u64>, StoreError>> {
        Box::pin(async move {
            let mut c = self.conn().await?;
            let [_, i, ..] = self.keys(key);
            redis::cmd("HGET")
                .arg(&i)
                .arg(impulse_id)
                .query_async(&mut c)
                .await
                .map_err(|e| backend(&e))
        })
    }

    fn due<'a>(
        &'a self,
        flow: &'a str,
        until_ms: u64,
        limit: usize,
    ) -> BoxFuture<'a, Result<super::DueList, StoreError>> {
        Box::pin(async move {
            let mut all = Vec::new();
            for shard in 0..self.shards {
                all.extend(self.due_shard(flow, shard, until_ms, limit).await?);
            }
            all.sort_unstable_by_key(|(_, due)| *due);
            all.truncate(limit);
            Ok(all)
        })
    }

    fn retime<'a>(
        &'a self,
        key: &'a InstanceKey,
        stale: u64,
        actual: Option<u64>,
    ) -> BoxFuture<'a, Result<(), StoreError>> {
        Box::pin(async move {
            let mut c = self.conn().await?;
            redis::Script::new(RETIME)
                .key(self.timers_key(&key.flow, self.shard(&key.id)))
                .arg(&*key.id)
                .arg(stale)
                .arg(actual.map(|a| a.to_string()).unwrap_or_default())
                .invoke_async::<i64>(&mut c)
                .await
                .map_err(|e| backend(&e))?;
            Ok(())
        })
    }

    fn parked<'a>(
        &'a self,
        flow: &'a str,
        after: Option<&'a str>,
        limit: usize,
    ) -> BoxFuture<'a, Result<Vec<Arc<str>>, StoreError>> {
        Box::pin(async move {
            let mut c = self.conn().await?;
            let set = self.parked_key(flow);
            let mut out: Vec<Arc<str>> = Vec::new();
            let mut from = after.map_or_else(|| "-".to_string(), |a| format!("({a}"));
            // Bounded: each round reads a page of the set, and stops at its end.
            for _ in 0..1_000 {
                let ids: Vec<String> = redis::cmd("ZRANGEBYLEX")
                    .arg(&set)
                    .arg(&from)
                    .arg("+")
                    .arg("LIMIT")
                    .arg(0)
                    .arg(limit.max(1))
                    .query_async(&mut c)
                    .await
                    .map_err(|e| backend(&e))?;
                let Some(last) = ids.last() else { break };
                from = format!("({last}");
                let cmds = ids.iter().map(|id| {
                    let [r, ..] = self.keys(&InstanceKey::new(flow, id.as_str()));
                    redis::Cmd::hget(r, "p")
                });
                let flags: Vec<Option<String>> = parse(c.batch(cmds.collect()).await)?;
                let full = ids.len() < limit.max(1);
                for (id, p) in ids.into_iter().zip(flags) {
                    if p.as_deref() == Some("1") && out.len() < limit {
                        out.push(id.into());
                    }
                }
                if out.len() >= limit || full {
                    break;
                }
            }
            Ok(out)
        })
    }

    fn correlated<'a>(
        &'a self,
        flow: &'a str,
        key: &'a str,
        limit: usize,
    ) -> BoxFuture<'a, Result<Vec<Arc<str>>, StoreError>> {
        Box::pin(async move {
            let mut c = self.conn().await?;
            let set = self.corr_key(flow, key);
            let mut ids: Vec<String> = redis::cmd("SMEMBERS")
                .arg(&set)
                .query_async(&mut c)
                .await
                .map_err(|e| backend(&e))?;
            ids.sort_unstable();
            let mut out: Vec<Arc<str>> = Vec::new();
            let mut stale = Vec::new();
            for page in ids.chunks(PAGE) {
                let cmds = page.iter().map(|id| {
                    let [r, ..] = self.keys(&InstanceKey::new(flow, id.as_str()));
                    redis::Cmd::hget(r, "k")
                });
                let keys: Vec<Option<String>> = parse(c.batch(cmds.collect()).await)?;
                for (id, k) in page.iter().zip(keys) {
                    if k.as_deref() == Some(key) {
                        if out.len() < limit {
                            out.push(id.as_str().into());
                        }
                    } else {
                        stale.push(id.clone());
                    }
                }
            }
            if !stale.is_empty() {
                let _ = redis::cmd("SREM")
                    .arg(&set)
                    .arg(&stale)
                    .query_async::<()>(&mut c)
                    .await;
            }
            Ok(out)
        })
    }

    fn ended_with_key<'a>(
        &'a self,
        flow: &'a str,
        key: &'a str,
        limit: usize,
    ) -> BoxFuture<'a, Result<Vec<Arc<str>>, StoreError>> {
        Box::pin(async move {
            let mut c = self.conn().await?;
            let set = self.ended_key(flow, key);
            let mut ids: Vec<String> = redis::cmd("SMEMBERS")
                .arg(&set)
                .query_async(&mut c)
                .await
                .map_err(|e| backend(&e))?;
            ids.sort_unstable();
            let mut out: Vec<Arc<str>> = Vec::new();
            let mut stale = Vec::new();
            for page in ids.chunks(PAGE) {
                let cmds = page.iter().map(|id| {
                    let [r, ..] = self.keys(&InstanceKey::new(flow, id.as_str()));
                    redis::Cmd::hget(r, "e")
                });
                let keys: Vec<Option<String>> = parse(c.batch(cmds.collect()).await)?;
                for (id, k) in page.iter().zip(keys) {
                    if k.as_deref() == Some(key) {
                        if out.len() < limit {
                            out.push(id.as_str().into());
                        }
                    } else {
                        stale.push(id.clone());
                    }
                }
            }
            if !stale.is_empty() {
                let _ = redis::cmd("SREM")
                    .arg(&set)
                    .arg(&stale)
                    .query_async::<()>(&mut c)
                    .await;
            }
            Ok(out)
        })
    }
}
