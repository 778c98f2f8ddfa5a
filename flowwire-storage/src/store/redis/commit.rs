//! A step's commit: the Lua scripts, the index entries a batch adds first, and the batch's
//! one round trip (or one request per script on a cluster).

use crate::error::StoreError;
use crate::record::{BusSend, Expect, StepResult, StepWrite};
use crate::redis_link::Conn;

use super::{RedisStore, backend, is_no_script};

/// The commit script: the steps of one batch (on a cluster, one step), each checked and
/// written on its own.
pub const COMMIT: &str = r"
-- KEYS[1]: the epoch key (on a cluster: any key of the slot, unread); then, per step:
--   record, impulses, write audit, shard's token counter, shard's active set, shard's
--   timer set, shard's outcome stream, then the key of each
--   message it sends; after the steps' keys, streams to trim (see `trim`)
-- ARGV[1]: the data's epoch token ('' = not checked here); ARGV[2]: audit ('1'/'0');
-- ARGV[3]: the orchestrators' group; ARGV[4]: how many steps; then, per step:
--   expect ('' = absent), version, seq, record, active, impulse id ('' = none),
--   has history ('1'/'0'), history entry, prune below ('' = none), parked,
--   correlation key ('' = none), fencing token ('' = none), ended with key ('' = none),
--   instance id, timer due in ms ('' = none), outcome entry to acknowledge ('' = none),
--   how many messages to send, then each message's kind ('a' append to a stream,
--   'p' publish, 's' settle an entry: acknowledge it in a group, its bytes
--   '<group> <entry id>') and bytes
-- Returns, per step, two numbers: 0 and 1 if the record was parked before, when written;
-- 1 and the version found on a conflict; 2 and the step for an impulse id seen; 3 and the
-- token when fenced. {4, 0} alone when the epoch key does not hold the token (the server
-- lost or swapped the data): nothing was written.
if ARGV[1] ~= '' and redis.call('GET', KEYS[1]) ~= ARGV[1] then return {4, 0} end
local audit, group = ARGV[2] == '1', ARGV[3]
-- The most history entries one step prunes (see `step`).
local PRUNE_MAX = 1024
-- The newest token granted per shard, read once per script (nothing changes it meanwhile).
local tokens = {}

-- Whether the number `x` is less than `y`, both in decimal as this store writes them (no
-- sign, no leading zeros): compared as strings, with no conversion.
local function lt(x, y)
  return #x < #y or (#x == #y and x < y)
end

-- Adds field `name` with `value` to a write of `fields` unless the record has it (`was`).
local function changed(fields, was, name, value)
  if was ~= value then
    fields[#fields + 1] = name
    fields[#fields + 1] = value
  end
end

-- One step: its keys from KEYS[k + 1], its arguments from ARGV[a + 1].
local function step(k, a)
  -- The record's fencing token, version, parked flag, and the shard's index entries it
  -- was written with (active flag, timer due), its correlation key, and the bounds of
  -- its history entries (lowest kept, highest written), in one read.
  local cur = redis.call('HMGET', KEYS[k + 1], 'f', 'v', 'p', 'a', 't', 'k', 'hl', 'hh')
  local newest = '0'
  if ARGV[a + 12] ~= '' then
    local mine = ARGV[a + 12]
    newest = tokens[KEYS[k + 4]]
    if not newest then
      newest = redis.call('GET', KEYS[k + 4]) or '0'
      tokens[KEYS[k + 4]] = newest
    end
    if lt(mine, newest) then return 3, tonumber(newest) end
    local last = cur[1]
    if last and lt(mine, last) then return 3, tonumber(last) end
  end
  local found = cur[2]
  if ARGV[a + 1] == '' then
    if found then return 1, tonumber(found) end
  elseif found ~= ARGV[a + 1] then
    if found then return 1, tonumber(found) end
    return 1, -1
  end
  if ARGV[a + 6] ~= '' then
    local seen = redis.call('HGET', KEYS[k + 2], ARGV[a + 6])
    if seen then return 2, tonumber(seen) end
    redis.call('HSET', KEYS[k + 2], ARGV[a + 6], ARGV[a + 3])
  end
  -- The record's fields in one write: its version and bytes, and of the others those the
  -- step changes (every argument of a write is parsed, handed to the command and
  -- appended to the append-only file again: a steady step writes 2 fields, not 7). A new
  -- record has none, so all are written.
  local fields = {'v', ARGV[a + 2], 'b', ARGV[a + 4]}
  changed(fields, cur[4], 'a', ARGV[a + 5])
  changed(fields, cur[3], 'p', ARGV[a + 10])
  changed(fields, cur[6], 'k', ARGV[a + 11])
  changed(fields, cur[5], 't', ARGV[a + 15])
  if ARGV[a + 12] ~= '' then changed(fields, cur[1], 'f', ARGV[a + 12]) end
  if ARGV[a + 13] ~= '' then
    fields[#fields + 1] = 'e'
    fields[#fields + 1] = ARGV[a + 13]
  end
  -- The history lives in the record's hash too, an entry per step under 'h<step>', with
  -- the bounds of the steps that may hold one: 'hl' the lowest kept, 'hh' the highest
  -- written (compared as decimal strings: a conversion to a number costs as much as a
  -- call into a command). Written with the record, in its one command (a separate index and
  -- hash cost two more commands per step). Pruning deletes from 'hl' up, at most
  -- PRUNE_MAX entries per step, so a retention shortened by far catches up over the next
  -- steps and no script runs long.
  local seq, lo, cut = ARGV[a + 3], cur[7], ARGV[a + 9]
  if lo and cut ~= '' and lt(lo, cut) then
    local from = tonumber(lo)
    local stop = math.min(tonumber(cut), from + PRUNE_MAX)
    local dead = {}
    for s = from, stop - 1 do dead[#dead + 1] = string.format('h%d', s) end
    redis.call('HDEL', KEYS[k + 1], unpack(dead))
    lo = string.format('%d', stop)
    fields[#fields + 1] = 'hl'
    fields[#fields + 1] = lo
  end
  if ARGV[a + 7] == '1' and (cut == '' or not lt(seq, cut)) and not (lo and lt(seq, lo)) then
    fields[#fields + 1] = 'h' .. seq
    fields[#fields + 1] = ARGV[a + 8]
    if not lo then
      fields[#fields + 1] = 'hl'
      fields[#fields + 1] = seq
    end
    if not cur[8] or lt(cur[8], seq) then
      fields[#fields + 1] = 'hh'
      fields[#fields + 1] = seq
    end
  end
  redis.call('HSET', KEYS[k + 1], unpack(fields))
  -- The shard's indexes change with the step (the flow's others are in other slots),
  -- where the record says the step changes its entry: a steady step (a call answered,
  -- the next one sent) touches neither, and a new record has none to remove (a deleted
  -- instance's went with its record). A record written before it kept its timer ('t'
  -- absent) has both written. Nothing else adds these entries, and what removes them
  -- (a deletion, dropping entries their record disowns) checks the record atomically.
  local was_active, was_due = cur[4], cur[5]
  if not found then was_active, was_due = '0', '' end
  if was_active ~= ARGV[a + 5] then
    if ARGV[a + 5] == '0' then
      redis.call('SREM', KEYS[k + 5], ARGV[a + 14])
    else
      redis.call('SADD', KEYS[k + 5], ARGV[a + 14])
    end
  end
  if was_due ~= ARGV[a + 15] then
    if ARGV[a + 15] == '' then
      redis.call('ZREM', KEYS[k + 6], ARGV[a + 14])
    else
      redis.call('ZADD', KEYS[k + 6], ARGV[a + 15], ARGV[a + 14])
    end
  end
  -- The outcome this step applies is settled with it. A settled entry is acknowledged,
  -- not deleted: deleting one entry from the middle of a stream costs more than all the
  -- rest of its settling, and settled entries are trimmed from the front in bulk.
  if ARGV[a + 16] ~= '' then
    redis.call('XACK', KEYS[k + 7], group, ARGV[a + 16])
  end
  if audit then redis.call('RPUSH', KEYS[k + 3], ARGV[a + 3] .. ':' .. ARGV[a + 12] .. ':' .. newest) end
  -- What the step sends goes out with it, and only with it.
  for i = 1, tonumber(ARGV[a + 17]) do
    local kind, body = ARGV[a + 16 + 2 * i], ARGV[a + 17 + 2 * i]
    if kind == 'a' then
      redis.call('XADD', KEYS[k + 7 + i], '*', 'm', body)
    elseif kind == 's' then
      local sp = string.find(body, ' ', 1, true)
      redis.call('XACK', KEYS[k + 7 + i], string.sub(body, 1, sp - 1), string.sub(body, sp + 1))
    else
      redis.call('PUBLISH', KEYS[k + 7 + i], body)
    end
  end
  if cur[3] == '1' then return 0, 1 end
  return 0, 0
end

-- A stream's id as two numbers, for comparing.
local function order(id)
  local dash = string.find(id, '-', 1, true)
  return tonumber(string.sub(id, 1, dash - 1)), tonumber(string.sub(id, dash + 1))
end

-- Trims from the front of a stream the entries every consumer group is done with: those
-- before the oldest entry pending in any group and before the first entry any group has
-- not been delivered. Reads and trims only (errors are ignored: a trim never fails the
-- commit it rides on).
local function trim(stream)
  local groups = redis.pcall('XINFO', 'GROUPS', stream)
  if type(groups) ~= 'table' or groups.err or #groups == 0 then return end
  local floor_ms, floor_seq
  for _, g in ipairs(groups) do
    local name, last
    for i = 1, #g - 1, 2 do
      if g[i] == 'name' then name = g[i + 1] elseif g[i] == 'last-delivered-id' then last = g[i + 1] end
    end
    if not name or not last then return end
    local ms, seq
    local oldest = redis.pcall('XPENDING', stream, name, '-', '+', 1)
    if type(oldest) ~= 'table' or oldest.err then return end
    if #oldest > 0 then
      ms, seq = order(oldest[1][1])
    else
      ms, seq = order(last)
      seq = seq + 1
    end
    if not floor_ms or ms < floor_ms or (ms == floor_ms and seq < floor_seq) then
      floor_ms, floor_seq = ms, seq
    end
  end
  redis.pcall('XTRIM', stream, 'MINID', '~', string.format('%d-%d', floor_ms, floor_seq))
end

local replies, k, a = {}, 1, 4
for s = 1, tonumber(ARGV[4]) do
  local sends = tonumber(ARGV[a + 17])
  local code, n = step(k, a)
  replies[2 * s - 1] = code
  replies[2 * s] = n
  k = k + 7 + sends
  a = a + 17 + 2 * sends
end
for t = k + 1, #KEYS do
  trim(KEYS[t])
end
return replies
";

/// Drops entries of a shard's active set whose record is gone or no longer active, each
/// checked and dropped in one atomic step (a commit that makes the instance active again
/// in between keeps its entry). `KEYS[1]`: the set, then each id's record; `ARGV`: the ids.
pub(super) const DROP_INACTIVE: &str = r"
for i = 1, #ARGV do
  if redis.call('HGET', KEYS[i + 1], 'a') ~= '1' then
    redis.call('SREM', KEYS[1], ARGV[i])
  end
end
return 0
";

/// Repairs one timer entry: `KEYS[1]` the timer set, `KEYS[2]` the instance's record;
/// `ARGV`: id, stale due, actual due (`''` = none). Changes nothing unless the entry is
/// still at the stale time. The record's copy of its entry (`t`, which tells a commit
/// whether the entry changes) follows it.
pub(super) const RETIME: &str = r"
local s = redis.call('ZSCORE', KEYS[1], ARGV[1])
if s and tonumber(s) == tonumber(ARGV[2]) then
  if ARGV[3] == '' then
    redis.call('ZREM', KEYS[1], ARGV[1])
  else
    redis.call('ZADD', KEYS[1], ARGV[3], ARGV[1])
  end
  if redis.call('EXISTS', KEYS[2]) == 1 then
    redis.call('HSET', KEYS[2], 't', ARGV[3])
  end
end
return 0
";

/// Steps written by one commit script on one server: a script runs alone on the server,
/// so a batch of a thousand steps is cut into scripts of about a millisecond each.
const STEPS_PER_SCRIPT: usize = 128;

/// Entries a commit settles in a stream before one of its scripts trims the stream: a
/// settled entry is acknowledged, not deleted (see [`COMMIT`]), so a stream keeps at most
/// about this many settled entries, plus those in its last node (trimming with `~` drops
/// whole nodes of up to 100 entries).
const TRIM_EVERY: u32 = 64;

/// How many entries this store's commits settled in each stream since its last trim.
#[derive(Debug, Default)]
pub(super) struct Settled(std::sync::Mutex<std::collections::HashMap<String, u32>>);

impl Settled {
    /// Counts the entries `steps` settle, stream by stream (`out_stream(i)`: the outcome
    /// stream of step `i`); returns the streams due for a trim (their counts start again).
    fn due<K: std::fmt::Display>(
        &self,
        steps: &[StepWrite],
        out_stream: impl Fn(usize) -> K,
    ) -> Vec<String> {
        use std::fmt::Write as _;
        let mut counts = self
            .0
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        let mut due = Vec::new();
        let mut settle = |stream: &str, due: &mut Vec<String>| {
            let n = match counts.get_mut(stream) {
                Some(n) => n,
                None => counts.entry(stream.to_string()).or_insert(0),
            };
            *n += 1;
            if *n >= TRIM_EVERY {
                *n = 0;
                due.push(stream.to_string());
            }
        };
        // One buffer for the outcome streams' names, written again for each step.
        let mut name = String::new();
        for (i, s) in steps.iter().enumerate() {
            if s.acknowledges.is_some() {
                name.clear();
                let _ = write!(name, "{}", out_stream(i));
                settle(&name, &mut due);
            }
            for send in &s.sends {
                if let BusSend::Settle { stream, .. } = send {
                    settle(stream, &mut due);
                }
            }
        }
        due.sort_unstable();
        due.dedup();
        due
    }
}

/// One step's arguments to [`COMMIT`], in the order its header lists them.
fn step_args(script: &mut redis::Cmd, s: &StepWrite) {
    // A number, or `''` for none.
    fn number(script: &mut redis::Cmd, n: Option<u64>) -> &mut redis::Cmd {
        match n {
            Some(n) => script.arg(n),
            None => script.arg(""),
        }
    }
    let expect = match s.expect {
        Expect::Absent => None,
        Expect::Version(v) => Some(v),
    };
    let (has_hist, hist) = match &s.history {
        Some((_, h)) => ("1", &h[..]),
        None => ("0", &[][..]),
    };
    number(script, expect)
        .arg(s.version)
        .arg(s.seq)
        .arg(&s.record[..])
        .arg(if s.active { "1" } else { "0" })
        .arg(s.impulse.as_deref().unwrap_or(""))
        .arg(has_hist)
        .arg(hist);
    number(script, s.prune_below)
        .arg(if s.parked { "1" } else { "0" })
        .arg(s.correlation.as_deref().unwrap_or(""));
    number(script, s.fence)
        .arg(s.ended_key.as_deref().unwrap_or(""))
        .arg(&*s.key.id);
    number(script, s.timer)
        .arg(s.acknowledges.as_deref().unwrap_or(""))
        .arg(s.sends.len());
    for send in &s.sends {
        match send {
            BusSend::Append { body, .. } => {
                script.arg("a").arg(&body[..]);
            }
            BusSend::Publish { body, .. } => {
                script.arg("p").arg(&body[..]);
            }
            BusSend::Settle { group, entry, .. } => {
                super::write_pieces(script.arg("s"), &[group, " ", entry]);
            }
        }
    }
}

/// The bytes a message adds to a script's arguments: its key and its bytes.
fn send_bytes(send: &BusSend) -> usize {
    match send {
        BusSend::Append { stream, body } => stream.len() + body.len() + 1,
        BusSend::Publish { channel, body } => channel.len() + body.len() + 1,
        BusSend::Settle {
            stream,
            group,
            entry,
        } => stream.len() + group.len() + entry.len() + 2,
    }
}

/// The key of the data's epoch token, written into a command's buffer.
struct EpochKey<'a>(&'a str);

impl redis::ToRedisArgs for EpochKey<'_> {
    fn write_redis_args<W: ?Sized + redis::RedisWrite>(&self, out: &mut W) {
        super::write_pieces(out, &[self.0, ":epoch"]);
    }
}

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

    /// The commit scripts of a batch, `per` steps a script: [`STEPS_PER_SCRIPT`] on one
    /// server, one on a cluster (the steps' keys live in their shards' slots). With `epoch`,
    /// each script checks the data's epoch token once (one server, once the token is
    /// known); without, it was read before the batch.
    ///
    /// Each script is written into one buffer sized for it up front, its keys formatted
    /// straight into it (seven per step: a string apiece, formatted again for each use,
    /// was a tenth of an orchestrator's time in a step).
    pub(super) fn scripts(
        &self,
        batch: &[StepWrite],
        epoch: Option<&str>,
        per: usize,
    ) -> Vec<redis::Cmd> {
        batch
            .chunks(per)
            .map(|steps| {
                let shards: Vec<u16> = steps.iter().map(|s| self.shard(&s.key.id)).collect();
                let out = |i: usize| self.shard_key("out", &steps[i].key.flow, shards[i]);
                let trims = self.settled.due(steps, out);
                let keys: usize = steps.iter().map(|s| 7 + s.sends.len()).sum();
                let (args, bytes) = steps.iter().fold((8 + keys + trims.len(), 0), |(n, b), s| {
                    let sends: usize = s.sends.iter().map(send_bytes).sum();
                    let own = 7 * (self.prefix.len() + s.key.flow.len() + s.key.id.len() + 16);
                    let history = s.history.as_ref().map_or(0, |(_, h)| h.len());
                    (
                        n + 17 + 2 * s.sends.len(),
                        b + own + s.record.len() + history + sends + 96,
                    )
                });
                let mut script = redis::Cmd::with_capacity(args, bytes + 128);
                script
                    .arg("EVALSHA")
                    .arg(&self.sha)
                    .arg(1 + keys + trims.len());
                match epoch {
                    Some(_) => script.arg(EpochKey(&self.prefix)),
                    // On a cluster the first key only keeps the script in its step's slot.
                    None => script.arg(self.shard_key("token", &steps[0].key.flow, shards[0])),
                };
                for (s, &shard) in steps.iter().zip(&shards) {
                    let flow = &*s.key.flow;
                    script
                        .arg(&self.own_keys(&s.key, shard)[..])
                        .arg(self.shard_key("token", flow, shard))
                        .arg(self.shard_key("active", flow, shard))
                        .arg(self.shard_key("timers", flow, shard))
                        .arg(self.shard_key("out", flow, shard));
                    for send in &s.sends {
                        script.arg(match send {
                            BusSend::Append { stream, .. } | BusSend::Settle { stream, .. } => {
                                stream.as_str()
                            }
                            BusSend::Publish { channel, .. } => channel.as_str(),
                        });
                    }
                }
                // In the script's slot: a step's outcome stream is in its shard's, and
                // only a single server carries sends.
                script.arg(&trims[..]);
                script
                    .arg(epoch.unwrap_or(""))
                    .arg(if self.audit { "1" } else { "0" })
                    .arg(crate::bus::ORCHESTRATORS)
                    .arg(steps.len());
                for s in steps {
                    step_args(&mut script, s);
                }
                script
            })
            .collect()
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
            let scripts = self.scripts(batch, None, 1);
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
            all.extend(this.scripts(batch, epoch, STEPS_PER_SCRIPT));
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
        let mut replies = Vec::with_capacity(batch.len());
        for v in values {
            let reply: Vec<i64> = redis::from_redis_value(v)
                .map_err(|e| StoreError::Backend(format!("redis: unexpected commit reply: {e}")))?;
            replies.extend(reply.chunks_exact(2).map(|p| (p[0], p[1])));
        }
        let lost = replies.iter().any(|(code, _)| *code == 4);
        if !lost && replies.len() != batch.len() {
            return Err(StoreError::Backend(format!(
                "redis: {} commit replies for {} steps",
                replies.len(),
                batch.len()
            )));
        }
        if lost {
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
