//! The bus's streams: consumer groups, appending, acknowledging, claiming what other
//! consumers left pending, and reading (`StreamReader`).

use std::time::Duration;

use bytes::Bytes;

use super::{Entry, RedisBus, StreamReader, backend};
use crate::error::StoreError;

/// `KEYS`: the streams to append to, then the stream of the calls; `ARGV`: how many
/// entries, the group, the entries' bodies, the ids to acknowledge.
const PUSH_THEN_ACK: &str = r"
local n = tonumber(ARGV[1])
for i = 1, n do
  redis.call('XADD', KEYS[i], '*', 'm', ARGV[2 + i])
end
local ids = {}
for i = n + 3, #ARGV do
  ids[#ids + 1] = ARGV[i]
end
if #ids > 0 then
  redis.call('XACK', KEYS[n + 1], ARGV[2], unpack(ids))
  redis.call('XDEL', KEYS[n + 1], unpack(ids))
end
return 0
";

static PUSH_THEN_ACK_SCRIPT: std::sync::LazyLock<redis::Script> =
    std::sync::LazyLock::new(|| redis::Script::new(PUSH_THEN_ACK));

/// The most entries [`RedisBus::backlog`] counts that were not delivered yet.
const BACKLOG_COUNTED: u64 = 100_000;

/// `KEYS[1]`: a stream; `ARGV`: a group, the most waiting entries to count. Returns the
/// entries the group did not acknowledge (pending, and after its last delivered one) and
/// the pending ones, read in one atomic step. The waiting ones are the group's `lag` when
/// the server knows it (it does not after some deletions), else counted.
const BACKLOG: &str = r"
if redis.call('EXISTS', KEYS[1]) == 0 then return {0, 0} end
local last, lag
for _, g in ipairs(redis.call('XINFO', 'GROUPS', KEYS[1])) do
  local name, lid, behind
  for i = 1, #g - 1, 2 do
    if g[i] == 'name' then name = g[i + 1]
    elseif g[i] == 'last-delivered-id' then lid = g[i + 1]
    elseif g[i] == 'lag' then behind = g[i + 1] end
  end
  if name == ARGV[1] then last, lag = lid, behind end
end
if not last then return {redis.call('XLEN', KEYS[1]), 0} end
local pending = redis.call('XPENDING', KEYS[1], ARGV[1])[1]
if type(lag) ~= 'number' then
  lag = #redis.call('XRANGE', KEYS[1], '(' .. last, '+', 'COUNT', ARGV[2])
end
return {pending + lag, pending}
";

static BACKLOG_SCRIPT: std::sync::LazyLock<redis::Script> =
    std::sync::LazyLock::new(|| redis::Script::new(BACKLOG));

impl RedisBus {
    /// Creates a consumer group reading a stream from its start (and the stream), unless
    /// it exists.
    pub async fn ensure_group(&self, stream: &str, group: &str) -> Result<(), StoreError> {
        let mut c = self.conn().await?;
        let r: redis::RedisResult<()> = redis::cmd("XGROUP")
            .arg("CREATE")
            .arg(stream)
            .arg(group)
            .arg("0")
            .arg("MKSTREAM")
            .query_async(&mut c)
            .await;
        match r {
            Err(e) if e.code() != Some("BUSYGROUP") => Err(backend(&e)),
            _ => Ok(()),
        }
    }

    /// Appends entries (stream, bytes), in order per stream. One round trip on a single
    /// server; concurrent requests on a cluster.
    pub async fn push(&self, entries: &[(String, Bytes)]) -> Result<(), StoreError> {
        if entries.is_empty() {
            return Ok(());
        }
        let mut c = self.conn().await?;
        let cmds = entries
            .iter()
            .map(|(stream, body)| {
                let mut cmd = redis::cmd("XADD");
                cmd.arg(stream).arg("*").arg("m").arg(&body[..]);
                cmd
            })
            .collect();
        c.batch(cmds).await.map_err(|e| backend(&e))?;
        Ok(())
    }

    /// Appends `entries` (stream, bytes), then acknowledges and deletes `ids` of `stream`
    /// — a worker's outcomes, then the calls they answer. On one server this is one script,
    /// so one round trip and one turn of Redis's event loop (one `fsync` with `appendfsync
    /// always`), and the calls are acknowledged only if every outcome was appended (an error
    /// stops the script before its acknowledgement). On a cluster, whose streams live in
    /// other slots than the calls', it is [`push`](Self::push) then [`ack`](Self::ack).
    pub async fn push_then_ack(
        &self,
        entries: &[(String, Bytes)],
        stream: &str,
        group: &str,
        ids: &[String],
    ) -> Result<(), StoreError> {
        let mut c = self.conn().await?;
        if !matches!(c, crate::redis_link::Conn::Server(_)) {
            self.push(entries).await?;
            return self.ack(stream, group, ids).await;
        }
        let mut call = PUSH_THEN_ACK_SCRIPT.prepare_invoke();
        for (s, _) in entries {
            call.key(s.as_str());
        }
        call.key(stream).arg(entries.len()).arg(group);
        for (_, body) in entries {
            call.arg(&body[..]);
        }
        call.arg(ids);
        call.invoke_async::<()>(&mut c)
            .await
            .map_err(|e| backend(&e))
    }

    /// Acknowledges entries of a stream and deletes them.
    pub async fn ack(&self, stream: &str, group: &str, ids: &[String]) -> Result<(), StoreError> {
        if ids.is_empty() {
            return Ok(());
        }
        let mut c = self.conn().await?;
        let mut pipe = redis::pipe();
        pipe.cmd("XACK").arg(stream).arg(group).arg(ids).ignore();
        pipe.cmd("XDEL").arg(stream).arg(ids).ignore();
        pipe.query_async::<()>(&mut c)
            .await
            .map_err(|e| backend(&e))
    }

    /// What a stream still holds for `group`: `(entries not acknowledged, of them delivered
    /// to a consumer)`, counting at most 100,000 entries not delivered yet. Settled entries
    /// are trimmed in bulk, not one by one (a stream may keep a few the group acknowledged,
    /// which are not counted), so a deployment at rest answers `(0, 0)` for every stream.
    /// A stream the group does not read yet answers its length.
    pub async fn backlog(&self, stream: &str, group: &str) -> Result<(u64, u64), StoreError> {
        let mut c = self.conn().await?;
        let (left, pending): (u64, u64) = BACKLOG_SCRIPT
            .key(stream)
            .arg(group)
            .arg(BACKLOG_COUNTED)
            .invoke_async(&mut c)
            .await
            .map_err(|e| backend(&e))?;
        Ok((left, pending))
    }

    /// Takes over up to `count` entries of a stream that were delivered to some consumer
    /// of `group` at least `min_idle` ago and not acknowledged (their consumer died or lost
    /// its shard): they are delivered to `consumer` now. Starts at `from` (`"0-0"` first);
    /// returns the entries and where the next page starts (`"0-0"`: none left).
    pub async fn claim(
        &self,
        stream: &str,
        group: &str,
        consumer: &str,
        min_idle: Duration,
        from: &str,
        count: usize,
    ) -> Result<(Vec<Entry>, String), StoreError> {
        let mut c = self.conn().await?;
        let reply: redis::streams::StreamAutoClaimReply = redis::cmd("XAUTOCLAIM")
            .arg(stream)
            .arg(group)
            .arg(consumer)
            .arg(u64::try_from(min_idle.as_millis()).unwrap_or(u64::MAX))
            .arg(from)
            .arg("COUNT")
            .arg(count.max(1))
            .query_async(&mut c)
            .await
            .map_err(|e| backend(&e))?;
        let entries = reply
            .claimed
            .into_iter()
            .filter_map(|e| entry(0, e))
            .collect();
        Ok((entries, reply.next_stream_id))
    }

    /// Takes over the entries of a stream that are pending on a consumer of `group` other
    /// than `consumer`, one page of the pending list (`count` entries, from `from`: `"-"`
    /// first) at a time: they are delivered to `consumer` now. Returns the entries and
    /// where the next page starts (`None`: the list's end).
    ///
    /// A shard's owner calls this now and then: a reader of an earlier owner can still
    /// take new entries after the shard changed hands (its blocked read was registered
    /// before), and nobody reads them again otherwise. The owner's own pending entries are
    /// left alone (they are being applied).
    pub async fn claim_others(
        &self,
        stream: &str,
        group: &str,
        consumer: &str,
        from: &str,
        count: usize,
    ) -> Result<(Vec<Entry>, Option<String>), StoreError> {
        let mut c = self.conn().await?;
        let count = count.max(1);
        let page: redis::streams::StreamPendingCountReply = redis::cmd("XPENDING")
            .arg(stream)
            .arg(group)
            .arg(from)
            .arg("+")
            .arg(count)
            .query_async(&mut c)
            .await
            .map_err(|e| backend(&e))?;
        let next = match page.ids.last() {
            Some(last) if page.ids.len() >= count => Some(format!("({}", last.id)),
            _ => None,
        };
        let theirs: Vec<&str> = page
            .ids
            .iter()
            .filter(|p| p.consumer != consumer)
            .map(|p| p.id.as_str())
            .collect();
        if theirs.is_empty() {
            return Ok((Vec::new(), next));
        }
        let claimed: redis::streams::StreamClaimReply = redis::cmd("XCLAIM")
            .arg(stream)
            .arg(group)
            .arg(consumer)
            .arg(0)
            .arg(&theirs)
            .query_async(&mut c)
            .await
            .map_err(|e| backend(&e))?;
        let entries = claimed
            .ids
            .into_iter()
            .filter_map(|e| entry(0, e))
            .collect();
        Ok((entries, next))
    }

    /// The ids of the entries of a stream pending on `consumer` of `group` (delivered to
    /// it, not acknowledged), oldest first, at most `count`; the list is whole when it is
    /// shorter than `count`.
    pub async fn pending_of(
        &self,
        stream: &str,
        group: &str,
        consumer: &str,
        count: usize,
    ) -> Result<Vec<String>, StoreError> {
        let mut c = self.conn().await?;
        let page: redis::streams::StreamPendingCountReply = redis::cmd("XPENDING")
            .arg(stream)
            .arg(group)
            .arg("-")
            .arg("+")
            .arg(count.max(1))
            .arg(consumer)
            .query_async(&mut c)
            .await
            .map_err(|e| backend(&e))?;
        Ok(page.ids.into_iter().map(|p| p.id).collect())
    }

    /// Tells the group that `consumer` is still working on these entries (resets their
    /// idle time, so they are not claimed by another).
    pub async fn touch(
        &self,
        stream: &str,
        group: &str,
        consumer: &str,
        ids: &[String],
    ) -> Result<(), StoreError> {
        if ids.is_empty() {
            return Ok(());
        }
        let mut c = self.conn().await?;
        redis::cmd("XCLAIM")
            .arg(stream)
            .arg(group)
            .arg(consumer)
            .arg(0)
            .arg(ids)
            .arg("JUSTID")
            .query_async::<redis::Value>(&mut c)
            .await
            .map_err(|e| backend(&e))?;
        Ok(())
    }

    /// A reader on a connection of its own (its reads block).
    pub async fn reader(&self) -> Result<StreamReader, StoreError> {
        Ok(StreamReader {
            conn: self.link.dedicated().await.map_err(|e| backend(&e))?,
        })
    }
}

fn entry(stream: usize, e: redis::streams::StreamId) -> Option<Entry> {
    let body = match e.map.get("m")? {
        redis::Value::BulkString(b) => Bytes::copy_from_slice(b),
        _ => return None,
    };
    Some(Entry {
        stream,
        id: e.id,
        body,
    })
}

impl StreamReader {
    /// Reads up to `count` new entries per stream for `consumer` of `group`, waiting up to
    /// `block` for the first. The streams must share a hash tag on a cluster.
    pub async fn read(
        &mut self,
        streams: &[String],
        group: &str,
        consumer: &str,
        count: usize,
        block: Duration,
    ) -> Result<Vec<Entry>, StoreError> {
        let opts = redis::streams::StreamReadOptions::default()
            .group(group, consumer)
            .count(count.max(1))
            .block(usize::try_from(block.as_millis()).unwrap_or(usize::MAX));
        let ids = vec![">"; streams.len()];
        let reply: Option<redis::streams::StreamReadReply> = redis::cmd("XREADGROUP")
            .arg(&opts)
            .arg("STREAMS")
            .arg(streams)
            .arg(&ids)
            .query_async(&mut self.conn)
            .await
            .map_err(|e| backend(&e))?;
        let mut out = Vec::new();
        for key in reply.map(|r| r.keys).unwrap_or_default() {
            let Some(i) = streams.iter().position(|s| *s == key.key) else {
                continue;
            };
            out.extend(key.ids.into_iter().filter_map(|e| entry(i, e)));
        }
        Ok(out)
    }
}
