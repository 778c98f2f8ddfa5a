//! The Redis store: instance records shared by every process of a deployment.
//!
//! Keys, per instance. They carry the hash tag of the instance's *shard* (`{flow#s}`, where
//! `s = hash(id) % shards`), the tag of the shard's lease and fencing-token counter on the
//! bus (`crate::bus`): one Lua script can check the shard's newest token and write the
//! instance's keys atomically, on one server or in one Redis Cluster slot.
//!
//! | key | type | holds |
//! | --- | --- | --- |
//! | `P:{flow#s}:r:id` | hash | `v` version, `b` encoded record, `a` active flag, `p` parked flag, `t` its timer entry's due time, `k` correlation key, `e` the key it ended with, `f` last fencing token; the history: `h<step>` each step's encoded history entry, `hl` the lowest step that may hold one, `hh` the highest written |
//! | `P:{flow#s}:i:id` | hash | impulse id → step that applied it |
//! | `P:{flow#s}:w:id` | list | `step:token:newest` per write, when writes are audited ([`RedisStore::audit_writes`]) |
//! | `P:token:{flow#s}` | counter | the newest fencing token granted for the shard (written by the bus) |
//! | `P:epoch` | string | `layout3:` and a random token: the data's identity and key layout |
//! | `P:active:{flow#shard}` | set | ids of (possibly) active instances of a shard |
//! | `P:timers:{flow#shard}` | sorted set | id scored by its timer's due time (ms), per shard |
//! | `P:parked:{flow}` | sorted set | ids of (possibly) parked instances, all scored 0 (listed by id) |
//! | `P:corr:{flow}:key` | set | ids of (possibly) live instances with that correlation key |
//! | `P:retired:{flow}:key` | set | ids of (possibly) ended instances that carried that key (record field `e`) |
//!
//! A batch of steps is one `EVALSHA` of [`COMMIT`] (per 128 steps) after the index entries
//! it adds, all in one pipeline (one round trip). The script checks the data's epoch token
//! once, then each step on its own: the fencing check (multi-process mode: a step written
//! under a token older than the newest one granted for its shard is refused, as is one older
//! than the token its record was last written under), compare-and-swap on the version,
//! insert-if-absent of the impulse id, the record, the shard's active and timer indexes, the
//! acknowledgement of the outcome it applies, the history entry and the pruning, and the
//! messages the step puts on the bus (its driver calls, the announcement that it ended:
//! [`StepWrite::sends`](crate::record::StepWrite::sends)), all or nothing. A step refused
//! (a conflict, an impulse seen, fenced) writes nothing and leaves the others of its batch
//! to their own checks. One script for many steps rather than one each: the per-call cost of
//! a script (its lookup, its tables, its replication wrapper) was most of Redis's time in a
//! step. (A cluster keeps the epoch key, the bus's streams and each shard in other slots:
//! there the epoch is read before the batch, each step is a script of its own, and the
//! runtime sends the messages.)
//!
//! The parked, correlation and retired sets live in the flow's slot, not the shard's, so
//! they cannot be in the script. They are kept *conservative*: an entry is added before
//! the step that needs it is committed and removed after the step that drops it, so a crash
//! in between leaves an extra entry, never a missing one. Extra ids are filtered out by the
//! record's own fields (and dropped when found).
//!
//! The files: this one holds the store, its keys and the data's epoch; `scripts.rs` the
//! Lua the server runs; `commit.rs` the commit script's arguments and a batch's round
//! trip; `lane.rs` the rounds that take the batches of all the store's callers together
//! (one orchestrator's shard runners: one commit on its way at a time); `instances.rs` the reads, listings and operator writes (the
//! [`InstanceStore`](crate::InstanceStore) implementation); `audit.rs` the write audit.

mod audit;
mod commit;
mod instances;
mod lane;
mod scan;
mod scripts;

use std::time::Duration;

use crate::error::StoreError;
use crate::record::InstanceKey;
use crate::redis_link::{Conn, RedisLink};

pub use self::audit::AuditedWrite;
pub use self::scripts::COMMIT;

/// The key of one of a shard's keys of `what` (its lease, token counter, streams, active
/// and timer indexes), tagged `{flow#shard}` like the keys of the shard's instances.
pub(crate) fn shard_key(prefix: &str, what: &str, flow: &str, shard: u16) -> String {
    ShardKey {
        prefix,
        what,
        flow,
        shard,
    }
    .to_string()
}

/// A shard's key of `what` (see [`shard_key`]), written where it goes: into a command's
/// own buffer as its argument, with no string of its own (a commit names four per step).
#[derive(Clone, Copy)]
pub(super) struct ShardKey<'a> {
    pub prefix: &'a str,
    pub what: &'a str,
    pub flow: &'a str,
    pub shard: u16,
}

impl std::fmt::Display for ShardKey<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let Self {
            prefix,
            what,
            flow,
            shard,
        } = self;
        write!(f, "{prefix}:{what}:{{{flow}#{shard}}}")
    }
}

impl redis::ToRedisArgs for ShardKey<'_> {
    fn write_redis_args<W: ?Sized + redis::RedisWrite>(&self, out: &mut W) {
        // Piece by piece: the formatting machinery cost more than the copying.
        let mut shard = [0; 5];
        write_pieces(
            out,
            &[
                self.prefix,
                ":",
                self.what,
                ":{",
                self.flow,
                "#",
                decimal(self.shard, &mut shard),
                "}",
            ],
        );
    }
}

/// Writes `pieces` as one argument of a command.
pub(super) fn write_pieces<W: ?Sized + redis::RedisWrite>(out: &mut W, pieces: &[&str]) {
    use std::io::Write as _;
    let mut w = out.writer_for_next_arg();
    for p in pieces {
        // Into the command's own buffer: it cannot fail.
        let _ = w.write_all(p.as_bytes());
    }
}

/// `n` in decimal, in `buf`.
fn decimal(n: u16, buf: &mut [u8; 5]) -> &str {
    let mut at = buf.len();
    let mut n = n;
    loop {
        at -= 1;
        buf[at] = b'0' + u8::try_from(n % 10).unwrap_or(0);
        n /= 10;
        if n == 0 {
            break;
        }
    }
    std::str::from_utf8(&buf[at..]).unwrap_or("0")
}

/// One of an instance's keys, `what` being `r` (its record), `i` (its impulses) or `w`
/// (its write audit), tagged with its shard; written into a command's buffer like a
/// [`ShardKey`].
#[derive(Clone, Copy)]
pub(super) struct OwnKey<'a> {
    pub prefix: &'a str,
    pub flow: &'a str,
    pub shard: u16,
    pub what: &'a str,
    pub id: &'a str,
}

impl std::fmt::Display for OwnKey<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let Self {
            prefix,
            flow,
            shard,
            what,
            id,
        } = self;
        write!(f, "{prefix}:{{{flow}#{shard}}}:{what}:{id}")
    }
}

impl redis::ToRedisArgs for OwnKey<'_> {
    fn write_redis_args<W: ?Sized + redis::RedisWrite>(&self, out: &mut W) {
        let mut shard = [0; 5];
        write_pieces(
            out,
            &[
                self.prefix,
                ":{",
                self.flow,
                "#",
                decimal(self.shard, &mut shard),
                "}:",
                self.what,
                ":",
                self.id,
            ],
        );
    }
}

/// The key layout this build writes, recorded in the epoch token (`layout3:…`); data of
/// another layout is refused, not read as empty. Layout 1 tagged each instance's keys with
/// its own id, so that a commit could not read its shard's fencing token on a cluster.
/// Layout 2 kept an instance's history in a sorted set of step numbers and a hash of
/// entries beside its record: two more commands per step than layout 3, which keeps the
/// entries in the record's hash.
const LAYOUT: &str = "layout3:";

/// A record hash as read back: version, bytes, active flag.
type RecordRow = (Option<u64>, Option<Vec<u8>>, Option<String>);

/// Ids read per round trip when listing active instances.
const PAGE: usize = 256;

/// Instance records in Redis (or Redis Cluster: every instance's keys share a hash tag).
///
/// ```no_run
/// # async fn demo() -> Result<(), flowwire::storage::StoreError> {
/// use flowwire::storage::store::RedisStore;
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
    /// Entries settled per stream since its last trim (shared by clones).
    settled: std::sync::Arc<commit::Settled>,
    /// The callers' batches waiting for the next commit round (shared by clones).
    lane: std::sync::Arc<lane::Lane>,
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
    /// # async fn demo() -> Result<(), flowwire::storage::StoreError> {
    /// use flowwire::storage::store::RedisStore;
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
            settled: std::sync::Arc::default(),
            lane: std::sync::Arc::default(),
        }
    }

    pub(super) fn lost(&self) -> Option<StoreError> {
        self.epoch.lost.get().map(|detail| StoreError::Lost {
            detail: detail.clone(),
        })
    }

    /// The data's epoch token, once read or written by [`Self::check_epoch`].
    pub(super) fn known_epoch(&self) -> Option<String> {
        self.epoch
            .known
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .clone()
    }

    /// Checks that the server still holds this store's data: at first use the epoch token
    /// is read (or written, for a new prefix); after that it must be there unchanged.
    pub(super) async fn check_epoch(&self, c: &mut Conn) -> Result<(), StoreError> {
        use std::hash::BuildHasher as _;
        if let Some(lost) = self.lost() {
            return Err(lost);
        }
        let key = format!("{}:epoch", self.prefix);
        match self.known_epoch() {
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
        // A round runs with the settings of the store that started it.
        self.lane = std::sync::Arc::default();
        self
    }

    /// The link and key prefix, for the deployment's bus (leases, streams).
    pub(crate) fn link(&self) -> (&RedisLink, &str) {
        (&self.link, &self.prefix)
    }

    /// An instance's keys (record with its history, impulses, write audit), tagged with
    /// its shard.
    pub(super) fn keys(&self, key: &InstanceKey) -> [String; 3] {
        self.own_keys(key, self.shard(&key.id))
            .map(|k| k.to_string())
    }

    /// [`Self::keys`], unwritten: for a command's arguments.
    pub(super) fn own_keys<'a>(&'a self, key: &'a InstanceKey, shard: u16) -> [OwnKey<'a>; 3] {
        ["r", "i", "w"].map(|what| OwnKey {
            prefix: &self.prefix,
            flow: &key.flow,
            shard,
            what,
            id: &key.id,
        })
    }

    /// A shard's key of `what`, unwritten: for a command's arguments.
    pub(super) fn shard_key<'a>(
        &'a self,
        what: &'a str,
        flow: &'a str,
        shard: u16,
    ) -> ShardKey<'a> {
        ShardKey {
            prefix: &self.prefix,
            what,
            flow,
            shard,
        }
    }

    pub(super) fn shard(&self, id: &str) -> u16 {
        super::shard_of(id, self.shards)
    }

    pub(super) fn active_key(&self, flow: &str, shard: u16) -> String {
        shard_key(&self.prefix, "active", flow, shard)
    }

    pub(super) fn timers_key(&self, flow: &str, shard: u16) -> String {
        shard_key(&self.prefix, "timers", flow, shard)
    }

    pub(super) fn parked_key(&self, flow: &str) -> String {
        format!("{}:parked:{{{flow}}}", self.prefix)
    }

    pub(super) fn damaged_key(&self, flow: &str) -> String {
        format!("{}:damaged:{{{flow}}}", self.prefix)
    }

    pub(super) fn ended_key(&self, flow: &str, key: &str) -> String {
        format!("{}:retired:{{{flow}}}:{key}", self.prefix)
    }

    pub(super) fn corr_key(&self, flow: &str, key: &str) -> String {
        format!("{}:corr:{{{flow}}}:{key}", self.prefix)
    }

    pub(super) async fn conn(&self) -> Result<Conn, StoreError> {
        self.link.conn().await.map_err(|e| backend(&e))
    }
}

#[cfg(test)]
mod tests {
    use redis::ToRedisArgs as _;

    use super::{OwnKey, ShardKey};

    #[test]
    fn a_key_written_as_an_argument_is_the_key_it_displays() {
        for shard in [0, 7, 10, 99, 4095, u16::MAX] {
            let k = ShardKey {
                prefix: "fw",
                what: "out",
                flow: "Order",
                shard,
            };
            assert_eq!(k.to_redis_args(), vec![k.to_string().into_bytes()]);
            assert_eq!(k.to_string(), format!("fw:out:{{Order#{shard}}}"));
            let k = OwnKey {
                prefix: "fw",
                flow: "Order",
                shard,
                what: "r",
                id: "o-1:ü",
            };
            assert_eq!(k.to_redis_args(), vec![k.to_string().into_bytes()]);
            assert_eq!(k.to_string(), format!("fw:{{Order#{shard}}}:r:o-1:ü"));
        }
    }
}
