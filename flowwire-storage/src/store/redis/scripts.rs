//! The Lua scripts the server runs for the store: a batch's commit ([`COMMIT`]), the
//! repairs of a shard's indexes ([`DROP_INACTIVE`], [`RETIME`]) and history reads
//! ([`HISTORY`]). Kept apart from the Rust that builds their arguments (`commit.rs`,
//! `instances.rs`), which follows the argument lists each script's header gives.

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
-- Returns, per step, two values: 0 and 1 if the record was parked before, when written;
-- 1 and the version found on a conflict; 2 and the step for an impulse id seen; 3 and the
-- token when fenced; 5 and the server's error when a command of the step failed (a key of
-- another type than the store writes there): the step may be written in part, and the
-- other steps go on. {4, 0} alone when the epoch key does not hold the token (the server
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
  -- A step that fails stops itself, not the steps after it: a script's batch may hold
  -- the batches of several callers (see `lane.rs`), each with its own answer.
  local ok, code, n = pcall(step, k, a)
  if not ok then
    if type(code) == 'table' and code.err then code = code.err end
    code, n = 5, tostring(code)
  end
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

/// Reads an instance's history from its record's hash (see [`COMMIT`]):
/// `KEYS[1]` the record; `ARGV`: the first step wanted, how many entries at most, how many
/// steps to look at at most (a history may have gaps: steps taken with none kept). Returns
/// the step to go on from (past the highest written when done) and the entries found, in
/// step order, flat: step, bytes, step, bytes…. (`instances.rs` sets the bounds.)
pub(super) const HISTORY: &str = r"
local bounds = redis.call('HMGET', KEYS[1], 'hl', 'hh')
if not bounds[1] or not bounds[2] then return {0, {}} end
local s = math.max(tonumber(ARGV[1]), tonumber(bounds[1]))
local stop, want, probes = tonumber(bounds[2]) + 1, tonumber(ARGV[2]), tonumber(ARGV[3])
local out = {}
while s < stop and #out < 2 * want and probes > 0 do
  local n = math.min(stop - s, want - #out / 2, probes, 256)
  local names = {}
  for i = 0, n - 1 do names[i + 1] = string.format('h%d', s + i) end
  local found = redis.call('HMGET', KEYS[1], unpack(names))
  for i = 1, n do
    if found[i] then
      out[#out + 1] = s + i - 1
      out[#out + 1] = found[i]
    end
  end
  s, probes = s + n, probes - n
end
if s >= stop then s = stop end
return {s, out}
";
