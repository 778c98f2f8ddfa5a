//! A step's commit: the arguments of the commit script (`scripts.rs`), the index entries
//! a batch adds first, and the batch's one round trip (or one request per script on a
//! cluster).

use crate::error::StoreError;
use crate::record::{BusSend, Expect, StepResult, StepWrite};
use crate::redis_link::Conn;

use super::scripts::COMMIT;
use super::{RedisStore, backend, is_no_script};

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

    /// Commits a batch: each step's result, or the error that stopped it on the server (see
    /// [`COMMIT`]); an error of the whole batch (the connection, the data lost) is the
    /// outer one.
    pub(super) async fn commit_steps(&self, batch: &[StepWrite]) -> Result<Vec<Step>, StoreError> {
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
        let mut lost = false;
        for v in values {
            match script_replies(v)? {
                Some(steps) => replies.extend(steps),
                None => lost = true,
            }
        }
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
        for (s, reply) in batch.iter().zip(replies) {
            results.push(match reply {
                Reply::Step(0, n) => {
                    // The script left the shard's indexes itself; these live in the flow's
                    // slot, and are touched only when the step leaves them.
                    let (flow, id) = (&*s.key.flow, &*s.key.id);
                    if n == 1 && !s.parked {
                        removes.push(redis::Cmd::zrem(self.parked_key(flow), id));
                    }
                    if let Some(old) = &s.uncorrelate {
                        removes.push(redis::Cmd::srem(self.corr_key(flow, old), id));
                    }
                    Ok(StepResult::Committed)
                }
                Reply::Step(1, n) => Ok(StepResult::Conflict {
                    found: u64::try_from(n).ok(),
                }),
                Reply::Step(3, n) => Ok(StepResult::Fenced {
                    token: u64::try_from(n).unwrap_or(0),
                }),
                Reply::Step(_, n) => Ok(StepResult::ImpulseSeen {
                    seq: u64::try_from(n).unwrap_or(0),
                }),
                Reply::Failed(error) => Err(StoreError::Backend(format!(
                    "redis: the commit of instance {:?} of flow {:?} failed on the server ({error}); \
                     the step may be written in part: its record is read again before the \
                     next one. A key of another type than the store writes is damage: see \
                     what wrote it",
                    &*s.key.id, &*s.key.flow
                ))),
            });
        }
        // Best effort: an entry left behind is filtered by its record's flags. Most batches
        // have none (no round trip).
        let _ = c.batch(removes).await;
        Ok(results)
    }

    /// Commits a batch: its steps' results, or the first error that stopped one of them.
    pub(super) async fn commit_batch(
        &self,
        batch: &[StepWrite],
    ) -> Result<Vec<StepResult>, StoreError> {
        self.commit_steps(batch).await?.into_iter().collect()
    }
}

/// One step's outcome in a batch: its result, or the error that stopped it on the server.
pub(super) type Step = Result<StepResult, StoreError>;

/// A commit script's answer for one step (see [`COMMIT`]).
enum Reply {
    /// Its code and number.
    Step(i64, i64),
    /// A command of the step failed, with the server's error.
    Failed(String),
}

/// The per-step answers of one commit script; `None` when it found the data's epoch token
/// changed (and wrote nothing).
fn script_replies(v: redis::Value) -> Result<Option<Vec<Reply>>, StoreError> {
    let unexpected = |what: &dyn std::fmt::Debug| {
        StoreError::Backend(format!("redis: unexpected commit reply: {what:?}"))
    };
    let redis::Value::Array(items) = v else {
        return Err(unexpected(&v));
    };
    let mut out = Vec::with_capacity(items.len() / 2);
    for pair in items.chunks(2) {
        let [code, n] = pair else {
            return Err(unexpected(&pair));
        };
        out.push(match (code, n) {
            (redis::Value::Int(4), _) => return Ok(None),
            (redis::Value::Int(5), redis::Value::BulkString(e)) => {
                Reply::Failed(String::from_utf8_lossy(e).into_owned())
            }
            (redis::Value::Int(code), redis::Value::Int(n)) => Reply::Step(*code, *n),
            _ => return Err(unexpected(&pair)),
        });
    }
    Ok(Some(out))
}
