//! Every record of a flow ([`InstanceStore::records`](crate::store::InstanceStore::records)):
//! no index holds them all, so the record keys are listed — with `SCAN` on a server, and
//! with `CLUSTER GETKEYSINSLOT` on a cluster, where each shard's keys share one slot (its
//! hash tag), so a shard is listed from the one master that holds it.

use std::sync::Arc;

use bytes::Bytes;
use redis::cluster_routing::{Route, RoutingInfo, SingleNodeRoutingInfo, SlotAddr};

use crate::error::StoreError;
use crate::record::{InstanceKey, Stored};
use crate::redis_link::Conn;
use crate::store::ActiveList;

use super::{PAGE, RedisStore, backend, parse};

/// Keys asked per `SCAN` round trip.
const SCAN_COUNT: usize = 1_000;
/// Loops a `SCAN` may take before it is refused (a server that never ends its cursor).
const MAX_SCANS: usize = 10_000_000;

impl RedisStore {
    /// Every record of `flow`, in id order.
    pub(super) async fn all_records(&self, flow: &str) -> Result<ActiveList, StoreError> {
        let mut c = self.conn().await?;
        self.check_epoch(&mut c).await?;
        let mut ids = match &c {
            Conn::Server(_) => self.scan_ids(&mut c, flow).await?,
            Conn::Cluster(_) => self.slot_ids(&mut c, flow).await?,
        };
        ids.sort_unstable();
        ids.dedup();
        let mut out = Vec::with_capacity(ids.len());
        for page in ids.chunks(PAGE) {
            let cmds = page.iter().map(|id| {
                let [r, ..] = self.keys(&InstanceKey::new(flow, id.as_str()));
                let mut cmd = redis::cmd("HMGET");
                cmd.arg(r).arg("v").arg("b");
                cmd
            });
            let rows: Vec<(Option<u64>, Option<Vec<u8>>)> = parse(c.batch(cmds.collect()).await)?;
            for (id, row) in page.iter().zip(rows) {
                // Gone since it was listed (deleted): not a record any more.
                if let (Some(version), Some(bytes)) = row {
                    out.push((
                        Arc::from(id.as_str()),
                        Stored {
                            version,
                            bytes: Bytes::from(bytes),
                        },
                    ));
                }
            }
        }
        Ok(out)
    }

    /// The id of `key` if it is the record key of an instance of `flow`: the key this
    /// store would write for that id, and no other.
    fn record_id(&self, flow: &str, key: &str) -> Option<String> {
        let head = format!("{}:{{{flow}#", self.prefix);
        let rest = key.strip_prefix(&head)?;
        let (_, id) = rest.split_once("}:r:")?;
        let [canonical, ..] = self.keys(&InstanceKey::new(flow, id));
        (canonical == key).then(|| id.to_string())
    }

    /// A server: one `SCAN` over the keyspace for the flow's record keys.
    async fn scan_ids(&self, c: &mut Conn, flow: &str) -> Result<Vec<String>, StoreError> {
        let pattern = format!("{}:{{{}#*}}:r:*", glob(&self.prefix), glob(flow));
        let mut ids = Vec::new();
        let mut cursor = 0u64;
        for _ in 0..MAX_SCANS {
            let (next, keys): (u64, Vec<String>) = redis::cmd("SCAN")
                .arg(cursor)
                .arg("MATCH")
                .arg(&pattern)
                .arg("COUNT")
                .arg(SCAN_COUNT)
                .query_async(c)
                .await
                .map_err(|e| backend(&e))?;
            ids.extend(keys.iter().filter_map(|k| self.record_id(flow, k)));
            if next == 0 {
                return Ok(ids);
            }
            cursor = next;
        }
        Err(StoreError::Backend(format!(
            "the scan of flow `{flow}`'s records did not end after {MAX_SCANS} round trips"
        )))
    }

    /// A cluster: each shard's keys, from the master of its slot.
    async fn slot_ids(&self, c: &mut Conn, flow: &str) -> Result<Vec<String>, StoreError> {
        let Conn::Cluster(cluster) = c else {
            return Ok(Vec::new());
        };
        let mut ids = Vec::new();
        for shard in 0..self.shards {
            let slot = slot_of(&format!("{}:{{{flow}#{shard}}}:r:", self.prefix));
            let route = || {
                RoutingInfo::SingleNode(SingleNodeRoutingInfo::SpecificNode(Route::new(
                    slot,
                    SlotAddr::Master,
                )))
            };
            let mut count = redis::cmd("CLUSTER");
            count.arg("COUNTKEYSINSLOT").arg(slot);
            let n: u64 = redis::from_redis_value(
                cluster
                    .route_command(count, route())
                    .await
                    .map_err(|e| backend(&e))?,
            )
            .map_err(|e| StoreError::Backend(e.to_string()))?;
            // Keys written since the count are the next scan's: a record started now is
            // not a live instance the check would have missed before the deploy.
            let mut get = redis::cmd("CLUSTER");
            get.arg("GETKEYSINSLOT").arg(slot).arg(n.max(1));
            let keys: Vec<String> = redis::from_redis_value(
                cluster
                    .route_command(get, route())
                    .await
                    .map_err(|e| backend(&e))?,
            )
            .map_err(|e| StoreError::Backend(e.to_string()))?;
            ids.extend(keys.iter().filter_map(|k| self.record_id(flow, k)));
        }
        Ok(ids)
    }
}

/// `s` with Redis glob's special characters escaped.
fn glob(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for ch in s.chars() {
        if matches!(ch, '*' | '?' | '[' | ']' | '\\') {
            out.push('\\');
        }
        out.push(ch);
    }
    out
}

/// The cluster slot of a key: CRC16 (XMODEM) of its hash tag — the part between the first
/// `{` and the next `}`, when not empty — or of the whole key, modulo 16,384.
fn slot_of(key: &str) -> u16 {
    let bytes = key.as_bytes();
    let tagged = bytes.iter().position(|&b| b == b'{').and_then(|open| {
        let close = bytes[open + 1..].iter().position(|&b| b == b'}')?;
        (close > 0).then(|| &bytes[open + 1..open + 1 + close])
    });
    crc16(tagged.unwrap_or(bytes)) % 16_384
}

fn crc16(bytes: &[u8]) -> u16 {
    let mut crc = 0u16;
    for &b in bytes {
        crc ^= u16::from(b) << 8;
        for _ in 0..8 {
            crc = if crc & 0x8000 == 0 {
                crc << 1
            } else {
                (crc << 1) ^ 0x1021
            };
        }
    }
    crc
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn crc16_is_the_clusters_and_a_hash_tag_picks_the_slot() {
        // The check value of CRC16/XMODEM, which the Redis Cluster specification names.
        assert_eq!(crc16(b"123456789"), 0x31C3);
        // Slots the Redis documentation gives for `CLUSTER KEYSLOT`.
        assert_eq!(slot_of("somekey"), 11_058);
        assert_eq!(slot_of("foo{hash_tag}"), slot_of("hash_tag"));
        // Keys with the same tag share a slot; an empty tag hashes the whole key.
        assert_eq!(slot_of("a:{Order#3}:r:1"), slot_of("b:{Order#3}:hz:2"));
        assert_eq!(slot_of("x{}y"), crc16(b"x{}y") % 16_384);
    }

    #[test]
    fn glob_characters_are_escaped() {
        assert_eq!(glob("a*b?[c]\\"), "a\\*b\\?\\[c\\]\\\\");
    }
}
