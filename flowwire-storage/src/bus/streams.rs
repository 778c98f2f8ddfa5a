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
        let reply: redis::Value = redis::cmd("XREADGROUP")
            .arg(&opts)
            .arg("STREAMS")
            .arg(streams)
            .arg(&ids)
            .query_async(&mut self.conn)
            .await
            .map_err(|e| backend(&e))?;
        read_reply(reply, streams)
    }
}

/// The entries of an `XREADGROUP` reply, moved out of it: a body's bytes are not copied.
/// (The client library's own reply type clones the whole reply first, then puts each
/// entry's fields in a map of their own: three copies of every body.) An entry without
/// a body (deleted since it was delivered) is skipped, as is a stream not asked for.
fn read_reply(reply: redis::Value, streams: &[String]) -> Result<Vec<Entry>, StoreError> {
    use redis::Value;
    let unexpected =
        |what: &str| StoreError::Backend(format!("redis: unexpected XREADGROUP reply: {what}"));
    // Per stream, its name and its entries: an array of pairs, or a map (RESP3).
    let rows: Vec<(Value, Value)> = match reply {
        Value::Nil => return Ok(Vec::new()),
        Value::Map(rows) => rows,
        Value::Array(rows) => rows
            .into_iter()
            .map(|row| match row {
                Value::Array(pair) => {
                    let mut pair = pair.into_iter();
                    match (pair.next(), pair.next(), pair.next()) {
                        (Some(key), Some(entries), None) => Ok((key, entries)),
                        _ => Err(unexpected("a stream's row is not [name, entries]")),
                    }
                }
                _ => Err(unexpected("a stream's row is not an array")),
            })
            .collect::<Result<_, _>>()?,
        _ => return Err(unexpected("not an array")),
    };
    let mut out = Vec::new();
    for (key, entries) in rows {
        let Some(key) = text(key) else {
            return Err(unexpected("a stream's name is not a string"));
        };
        let Some(stream) = streams.iter().position(|s| *s == key) else {
            continue;
        };
        let Value::Array(entries) = entries else {
            return Err(unexpected("a stream's entries are not an array"));
        };
        out.reserve(entries.len());
        for e in entries {
            let Value::Array(e) = e else {
                return Err(unexpected("an entry is not an array"));
            };
            let mut e = e.into_iter();
            let (Some(id), fields) = (e.next().and_then(text), e.next()) else {
                return Err(unexpected("an entry has no id"));
            };
            if let Some(body) = fields.and_then(body) {
                out.push(Entry { stream, id, body });
            }
        }
    }
    Ok(out)
}

/// A string reply's text.
fn text(v: redis::Value) -> Option<String> {
    match v {
        redis::Value::BulkString(b) => String::from_utf8(b).ok(),
        redis::Value::SimpleString(s) => Some(s),
        _ => None,
    }
}

/// The `m` field of an entry's fields (`[field, value, …]`, or a map in RESP3).
fn body(fields: redis::Value) -> Option<Bytes> {
    use redis::Value;
    let pairs: Vec<(Value, Value)> = match fields {
        Value::Map(pairs) => pairs,
        Value::Array(flat) => {
            let mut flat = flat.into_iter();
            std::iter::from_fn(|| Some((flat.next()?, flat.next()?))).collect()
        }
        _ => return None,
    };
    pairs
        .into_iter()
        .find_map(|(name, value)| match (name, value) {
            (Value::BulkString(n), Value::BulkString(b)) if n == b"m" => Some(Bytes::from(b)),
            (Value::SimpleString(n), Value::BulkString(b)) if n == "m" => Some(Bytes::from(b)),
            _ => None,
        })
}

#[cfg(test)]
mod tests {
    use redis::Value;

    use super::read_reply;

    fn bulk(s: &str) -> Value {
        Value::BulkString(s.as_bytes().to_vec())
    }

    fn entry(id: &str, fields: Value) -> Value {
        Value::Array(vec![bulk(id), fields])
    }

    #[test]
    fn a_reply_yields_each_body_of_the_streams_asked_for_in_order() {
        let streams = ["req".to_string(), "out".to_string()];
        let reply = Value::Array(vec![
            Value::Array(vec![
                bulk("out"),
                Value::Array(vec![
                    entry("1-0", Value::Array(vec![bulk("m"), bulk("first")])),
                    // Deleted after it was delivered: no fields.
                    entry("1-1", Value::Nil),
                    entry(
                        "1-2",
                        Value::Array(vec![bulk("x"), bulk("?"), bulk("m"), bulk("second")]),
                    ),
                ]),
            ]),
            Value::Array(vec![
                bulk("other"),
                Value::Array(vec![entry("2-0", Value::Nil)]),
            ]),
            Value::Array(vec![
                bulk("req"),
                Value::Array(vec![entry(
                    "3-0",
                    Value::Map(vec![(bulk("m"), bulk("third"))]),
                )]),
            ]),
        ]);
        let got: Vec<(usize, String, Vec<u8>)> = read_reply(reply, &streams)
            .unwrap()
            .into_iter()
            .map(|e| (e.stream, e.id, e.body.to_vec()))
            .collect();
        assert_eq!(
            got,
            vec![
                (1, "1-0".into(), b"first".to_vec()),
                (1, "1-2".into(), b"second".to_vec()),
                (0, "3-0".into(), b"third".to_vec()),
            ]
        );
        assert!(read_reply(Value::Nil, &streams).unwrap().is_empty());
    }

    /// Mutated replies, as the server's bytes: whatever the protocol parser makes of them,
    /// reading entries out of it never panics.
    #[test]
    fn fuzz_read_reply() {
        let streams = ["req".to_string(), "out".to_string()];
        let seeds = [
            b"*2\r\n*2\r\n$3\r\nreq\r\n*2\r\n*2\r\n$3\r\n1-0\r\n*2\r\n$1\r\nm\r\n$2\r\nhi\r\n*2\r\n$3\r\n1-1\r\n*-1\r\n*2\r\n$3\r\nout\r\n*1\r\n*2\r\n$3\r\n2-0\r\n*4\r\n$1\r\nx\r\n$0\r\n\r\n$1\r\nm\r\n$3\r\nyes\r\n".to_vec(),
            b"%1\r\n$3\r\nreq\r\n*1\r\n*2\r\n$3\r\n1-0\r\n%1\r\n$1\r\nm\r\n$2\r\nhi\r\n".to_vec(),
            b"*-1\r\n".to_vec(),
        ];
        let mut parsed = 0u64;
        crate::fuzz::run(
            "xreadgroup reply",
            &seeds,
            crate::fuzz::iterations(20_000),
            |input| {
                if let Ok(value) = redis::parse_redis_value(input) {
                    parsed += 1;
                    let _ = read_reply(value, &streams);
                }
            },
        );
        assert!(
            parsed > 0,
            "some mutated replies parse, so the reader saw them"
        );
        let value = redis::parse_redis_value(&seeds[0]).unwrap();
        assert_eq!(read_reply(value, &streams).unwrap().len(), 2);
    }

    #[test]
    fn a_malformed_reply_is_an_error_not_a_panic() {
        let streams = ["req".to_string()];
        for reply in [
            Value::Int(3),
            Value::Array(vec![Value::Int(1)]),
            Value::Array(vec![Value::Array(vec![bulk("req")])]),
            Value::Array(vec![Value::Array(vec![
                Value::Int(1),
                Value::Array(vec![]),
            ])]),
            Value::Array(vec![Value::Array(vec![bulk("req"), Value::Int(2)])]),
            Value::Array(vec![Value::Array(vec![
                bulk("req"),
                Value::Array(vec![Value::Int(2)]),
            ])]),
            Value::Array(vec![Value::Array(vec![
                bulk("req"),
                Value::Array(vec![Value::Array(vec![])]),
            ])]),
        ] {
            let e = read_reply(reply.clone(), &streams).unwrap_err();
            assert!(
                e.to_string().contains("unexpected XREADGROUP reply"),
                "{reply:?}: {e}"
            );
        }
    }
}
