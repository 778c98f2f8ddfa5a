//! The [`InstanceStore`] implementation: reads, listings by index, operator writes; the
//! commit itself is in `commit.rs`.

use std::sync::Arc;

use bytes::Bytes;

use crate::error::StoreError;
use crate::record::{InstanceKey, StepResult, StepWrite, Stored};
use crate::redis_link::Conn;
use crate::store::{ActiveList, BoxFuture, DamagedList, InstanceStore};

use super::{PAGE, RecordRow, RedisStore, backend, parse};

impl RedisStore {
    /// The ids a per-key set index holds under `key` whose record still says so (its hash
    /// field `field` is `key`), in id order, at most `limit`; entries their record
    /// disowns are dropped on the way (the indexes are conservative).
    async fn keyed(
        &self,
        set: String,
        field: &str,
        flow: &str,
        key: &str,
        limit: usize,
    ) -> Result<Vec<Arc<str>>, StoreError> {
        let mut c = self.conn().await?;
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
                redis::Cmd::hget(r, field)
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
        drop_stale(&mut c, &set, &stale).await;
        Ok(out)
    }

    /// The active instances of one shard (stale index entries are dropped on the way).
    pub(super) async fn active_shard(
        &self,
        flow: &str,
        shard: u16,
    ) -> Result<ActiveList, StoreError> {
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
            self.drop_inactive(&mut c, flow, &set, &stale).await;
            Ok(out)
        }
    }

    /// Drops entries of a shard's active set whose record is not active, best effort (an
    /// entry left is filtered again by the next reader), each checked against its record
    /// in the same atomic step: commits touch the set only when a record's active flag
    /// changes, so an entry dropped after its instance became active again would be
    /// missing until it changes again.
    async fn drop_inactive(&self, c: &mut Conn, flow: &str, set: &str, stale: &[String]) {
        static SCRIPT: std::sync::LazyLock<redis::Script> =
            std::sync::LazyLock::new(|| redis::Script::new(super::scripts::DROP_INACTIVE));
        for page in stale.chunks(PAGE) {
            let mut script = SCRIPT.prepare_invoke();
            script.key(set);
            for id in page {
                let [r, ..] = self.keys(&InstanceKey::new(flow, id.as_str()));
                script.key(r);
            }
            script.arg(page);
            let _ = script.invoke_async::<i64>(c).await;
        }
    }

    /// The armed timers of one shard due by `until_ms`, earliest first, at most `limit`.
    pub(super) async fn due_shard(
        &self,
        flow: &str,
        shard: u16,
        until_ms: u64,
        limit: usize,
    ) -> Result<crate::store::DueList, StoreError> {
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
    fn records<'a>(&'a self, flow: &'a str) -> BoxFuture<'a, Result<ActiveList, StoreError>> {
        Box::pin(self.all_records(flow))
    }

    fn commit(
        &self,
        batch: Vec<StepWrite>,
    ) -> BoxFuture<'static, Result<Vec<StepResult>, StoreError>> {
        // The commit outlives the borrow of the store (see the trait): it holds a clone.
        // Batches of the store's callers go together, a round at a time (`lane.rs`).
        Box::pin(self.clone().commit_in_lane(batch))
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
            // The record and its shard's index entries go together (one slot): commits
            // touch those entries only when the record's own copy of them changes, so an
            // entry removed after a new instance of the id wrote its record would stay
            // missing.
            redis::pipe()
                .atomic()
                .del(&keys[..])
                .ignore()
                .srem(self.active_key(flow, shard), id)
                .ignore()
                .zrem(self.timers_key(flow, shard), id)
                .ignore()
                .query_async::<()>(&mut c)
                .await
                .map_err(|e| backend(&e))?;
            let mut cmds = vec![
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

    /// On one server, yes: the commit script appends and publishes them. A cluster keeps
    /// the bus's streams in other slots than a step's keys, so there the runtime sends them.
    fn carries_sends(&self) -> bool {
        !self.link.is_cluster()
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
    ) -> BoxFuture<'a, Result<crate::store::DueList, StoreError>> {
        Box::pin(self.due_shard(flow, shard, until_ms, limit))
    }

    fn history<'a>(
        &'a self,
        key: &'a InstanceKey,
        from: u64,
        limit: usize,
    ) -> BoxFuture<'a, Result<Vec<(u64, Bytes)>, StoreError>> {
        static SCRIPT: std::sync::LazyLock<redis::Script> =
            std::sync::LazyLock::new(|| redis::Script::new(super::scripts::HISTORY));
        Box::pin(async move {
            let mut c = self.conn().await?;
            let [r, ..] = self.keys(key);
            let script = &*SCRIPT;
            let mut out = Vec::new();
            let mut next = from;
            // Bounded: each script reads forward from `next` and moves it on by at least
            // one step, up to the highest step written.
            while out.len() < limit {
                let want = (limit - out.len()).min(HISTORY_PAGE);
                let (moved, entries): (u64, Vec<redis::Value>) = script
                    .key(&r)
                    .arg(next)
                    .arg(want)
                    .arg(HISTORY_PROBES)
                    .invoke_async(&mut c)
                    .await
                    .map_err(|e| backend(&e))?;
                let unexpected =
                    |e| StoreError::Backend(format!("redis: unexpected history reply: {e}"));
                let mut entries = entries.into_iter();
                while let (Some(step), Some(bytes)) = (entries.next(), entries.next()) {
                    let step: u64 = redis::from_redis_value(step).map_err(unexpected)?;
                    let bytes: Vec<u8> = redis::from_redis_value(bytes).map_err(unexpected)?;
                    out.push((step, Bytes::from(bytes)));
                }
                if moved <= next {
                    break;
                }
                next = moved;
            }
            out.truncate(limit);
            Ok(out)
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
    ) -> BoxFuture<'a, Result<crate::store::DueList, StoreError>> {
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
            redis::Script::new(super::scripts::RETIME)
                .key(self.timers_key(&key.flow, self.shard(&key.id)))
                .key(&self.keys(key)[0])
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
        Box::pin(self.keyed(self.corr_key(flow, key), "k", flow, key, limit))
    }

    fn ended_with_key<'a>(
        &'a self,
        flow: &'a str,
        key: &'a str,
        limit: usize,
    ) -> BoxFuture<'a, Result<Vec<Arc<str>>, StoreError>> {
        Box::pin(self.keyed(self.ended_key(flow, key), "e", flow, key, limit))
    }
}

/// The most entries one [`HISTORY`](super::scripts::HISTORY) script returns.
const HISTORY_PAGE: usize = 256;

/// The most steps one [`HISTORY`](super::scripts::HISTORY) script looks at (entries or gaps): a script runs alone
/// on the server.
const HISTORY_PROBES: u64 = 4096;

/// Drops index entries their records disown, best effort (an entry left is filtered again
/// by the next reader).
async fn drop_stale(c: &mut Conn, set: &str, stale: &[String]) {
    if !stale.is_empty() {
        let _ = redis::cmd("SREM")
            .arg(set)
            .arg(stale)
            .query_async::<()>(c)
            .await;
    }
}
