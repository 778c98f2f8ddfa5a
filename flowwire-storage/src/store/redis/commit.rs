//! A step's commit: the Lua scripts, the index entries a batch adds first, and the batch's
//! one round trip (or one request per script on a cluster).

use crate::error::StoreError;
use crate::record::{BusSend, Expect, StepResult, StepWrite};
use crate::redis_link::Conn;

use super::{RedisStore, backend, is_no_script, shard_key};

/// The commit script (one step of one instance).
pub const COMMIT: &str = r"
-- KEYS: record, impulses, history index, history entries, write audit, shard's token counter,
--       shard's active set, shard's timer set, shard's outcome stream, the epoch key (on a
--       cluster: any key of the slot, unread), then the key of each message to send
-- ARGV: expect ('' = absent), version, seq, record, active, impulse id ('' = none),
--       has history ('1'/'0'), history entry, prune below ('' = none), parked,
--       correlation key ('' = none), fencing token ('' = none), audit ('1'/'0'),
--       ended with key ('' = none), instance id, timer due in ms ('' = none),
--       outcome entry to acknowledge ('' = none), the orchestrators' group,
--       the data's epoch token ('' = not checked here), how many messages to send,
--       then each message's kind ('a' append to a stream, 'p' publish, 's' settle an
--       entry: acknowledge it in a group and delete it, its bytes '<group> <entry id>')
--       and bytes
-- Returns {0, 1 if the record was parked before} when written; {1, version} on a
-- conflict; {2, step} for an impulse id seen; {3, token} when fenced; {4, 0} when the
-- epoch key does not hold the token (the server lost or swapped the data).
if ARGV[19] ~= '' and redis.call('GET', KEYS[10]) ~= ARGV[19] then return {4, 0} end
-- The record's fencing token, version and parked flag, in one read.
local cur = redis.call('HMGET', KEYS[1], 'f', 'v', 'p')
local newest = 0
if ARGV[12] ~= '' then
  local mine = tonumber(ARGV[12])
  newest = tonumber(redis.call('GET', KEYS[6]) or '0')
  if newest > mine then return {3, newest} end
  local last = cur[1]
  if last and tonumber(last) > mine then return {3, tonumber(last)} end
end
local found = cur[2]
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
local was_parked = cur[3]
-- The record's fields in one write: with the fencing token and the end's key when given.
local fields = {'v', ARGV[2], 'b', ARGV[4], 'a', ARGV[5], 'p', ARGV[10], 'k', ARGV[11]}
if ARGV[12] ~= '' then
  fields[#fields + 1] = 'f'
  fields[#fields + 1] = ARGV[12]
end
if ARGV[14] ~= '' then
  fields[#fields + 1] = 'e'
  fields[#fields + 1] = ARGV[14]
end
redis.call('HSET', KEYS[1], unpack(fields))
-- The shard's indexes change with the step (the flow's others are in other slots).
if ARGV[5] == '0' then
  redis.call('SREM', KEYS[7], ARGV[15])
else
  redis.call('SADD', KEYS[7], ARGV[15])
end
if ARGV[16] == '' then
  redis.call('ZREM', KEYS[8], ARGV[15])
else
  redis.call('ZADD', KEYS[8], ARGV[16], ARGV[15])
end
-- The outcome this step applies is settled with it.
if ARGV[17] ~= '' then
  redis.call('XACK', KEYS[9], ARGV[18], ARGV[17])
  redis.call('XDEL', KEYS[9], ARGV[17])
end
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
-- What the step sends goes out with it, and only with it.
for i = 1, tonumber(ARGV[20]) do
  local kind, body = ARGV[19 + 2 * i], ARGV[20 + 2 * i]
  if kind == 'a' then
    redis.call('XADD', KEYS[10 + i], '*', 'm', body)
  elseif kind == 's' then
    local sp = string.find(body, ' ', 1, true)
    local entry = string.sub(body, sp + 1)
    redis.call('XACK', KEYS[10 + i], string.sub(body, 1, sp - 1), entry)
    redis.call('XDEL', KEYS[10 + i], entry)
  else
    redis.call('PUBLISH', KEYS[10 + i], body)
  end
end
if was_parked == '1' then return {0, 1} end
return {0, 0}
";

/// Repairs one timer entry: `KEYS[1]` the timer set; `ARGV`: id, stale due, actual due
/// (`''` = none). Changes nothing unless the entry is still at the stale time.
pub(super) const RETIME: &str = r"
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

impl RedisStore {
    /// The index entries a batch needs before it commits: those of the flow's sets, which
    /// live in other slots than the step's keys (see the module docs; the shard's active
    /// and timer sets change inside the script).
    pub(super) fn index_adds(&self, batch: &[StepWrite]) -> Vec<redis::Cmd> {
        let mut adds = Vec::new();
        for s in batch {
            let (flow, id) = (&*s.key.flow, &*s.key.id);
            if s.parked {
                adds.push(redis::Cmd::zadd(self.parked_key(flow), id, 0));
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

    /// The commit script of each step. `epoch`: the data's epoch token, checked by each
    /// script (one server: the key is reachable from every script); `None` on a cluster,
    /// where it is read before the batch.
    pub(super) fn scripts(&self, batch: &[StepWrite], epoch: Option<&str>) -> Vec<redis::Cmd> {
        let mut scripts = Vec::with_capacity(batch.len());
        let epoch_key = format!("{}:epoch", self.prefix);
        for s in batch {
            let keys = self.keys(&s.key);
            let shard = self.shard(&s.key.id);
            let token = shard_key(&self.prefix, "token", &s.key.flow, shard);
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
                .arg(10 + s.sends.len())
                .arg(&keys[..])
                .arg(&token)
                .arg(self.active_key(&s.key.flow, shard))
                .arg(self.timers_key(&s.key.flow, shard))
                .arg(shard_key(&self.prefix, "out", &s.key.flow, shard));
            // On a cluster the tenth key only keeps the script in its slot.
            script.arg(if epoch.is_some() { &epoch_key } else { &token });
            for send in &s.sends {
                script.arg(match send {
                    BusSend::Append { stream, .. } | BusSend::Settle { stream, .. } => {
                        stream.as_str()
                    }
                    BusSend::Publish { channel, .. } => channel.as_str(),
                });
            }
            script
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
                .arg(s.ended_key.as_deref().unwrap_or(""))
                .arg(&*s.key.id)
                .arg(s.timer.map(|due| due.to_string()).unwrap_or_default())
                .arg(s.acknowledges.as_deref().unwrap_or(""))
                .arg(crate::bus::ORCHESTRATORS)
                .arg(epoch.unwrap_or(""))
                .arg(s.sends.len());
            for send in &s.sends {
                match send {
                    BusSend::Append { body, .. } => script.arg("a").arg(&body[..]),
                    BusSend::Publish { body, .. } => script.arg("p").arg(&body[..]),
                    BusSend::Settle { group, entry, .. } => {
                        script.arg("s").arg(format!("{group} {entry}"))
                    }
                };
            }
            scripts.push(script);
        }
        scripts
    }

    /// Loads the commit script (on a cluster, on every master).
    pub(super) async fn load_script(c: &mut Conn) -> Result<(), StoreError> {
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
    pub(super) async fn add_and_commit(
        &self,
        c: &mut Conn,
        batch: &[StepWrite],
        epoch: Option<&str>,
    ) -> Result<Vec<redis::Value>, StoreError> {
        let no_script = |r: &redis::RedisResult<redis::Value>| r.as_ref().is_err_and(is_no_script);
        if matches!(c, Conn::Cluster(_)) {
            c.batch(self.index_adds(batch))
                .await
                .map_err(|e| backend(&e))?;
            let scripts = self.scripts(batch, None);
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
            all.extend(this.scripts(batch, epoch));
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

    pub(super) async fn commit_batch(
        &self,
        batch: &[StepWrite],
    ) -> Result<Vec<StepResult>, StoreError> {
        let mut c = self.conn().await?;
        // A wiped server must not take steps that build on records it no longer holds. On
        // one server, once the token is known, each script checks it (no round trip of
        // its own); on a cluster, and at first use, it is read before the batch.
        if let Some(lost) = self.lost() {
            return Err(lost);
        }
        let in_script = match &c {
            Conn::Server(_) => self.known_epoch(),
            Conn::Cluster(_) => None,
        };
        if in_script.is_none() {
            self.check_epoch(&mut c).await?;
        }
        let values = self
            .add_and_commit(&mut c, batch, in_script.as_deref())
            .await?;
        let mut replies = Vec::with_capacity(values.len());
        for v in values {
            let reply: (i64, i64) = redis::from_redis_value(v)
                .map_err(|e| StoreError::Backend(format!("redis: unexpected commit reply: {e}")))?;
            replies.push(reply);
        }
        if replies.iter().any(|(code, _)| *code == 4) {
            // The epoch key is gone or holds another token: read it to say which (and to
            // stop the store); the steps the scripts refused wrote nothing.
            self.check_epoch(&mut c).await?;
            return Err(StoreError::Lost {
                detail: format!(
                    "the key {}:epoch that marked its data changed during a commit",
                    self.prefix
                ),
            });
        }
        let mut results = Vec::with_capacity(batch.len());
        let mut removes = Vec::new();
        for (s, (code, n)) in batch.iter().zip(replies) {
            results.push(match code {
                0 => {
                    // The script left the shard's indexes itself; these live in the flow's
                    // slot, and are touched only when the step leaves them.
                    let (flow, id) = (&*s.key.flow, &*s.key.id);
                    if n == 1 && !s.parked {
                        removes.push(redis::Cmd::zrem(self.parked_key(flow), id));
                    }
                    if let Some(old) = &s.uncorrelate {
                        removes.push(redis::Cmd::srem(self.corr_key(flow, old), id));
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
        // Best effort: an entry left behind is filtered by its record's flags. Most batches
        // have none (no round trip).
        let _ = c.batch(removes).await;
        Ok(results)
    }
}
