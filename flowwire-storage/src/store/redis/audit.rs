//! The write audit: every write of an instance recorded with its fencing token and the
//! newest token its shard had been granted, for crash and partition checkers.

use crate::error::StoreError;
use crate::record::InstanceKey;

use super::{RedisStore, backend};

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

impl RedisStore {
    /// Records every write of an instance as `step:token` in a list next to its record
    /// ([`RedisStore::writes`]): the proof, for crash tests and audits, that no step was
    /// written twice and that fencing tokens never went back. Costs one list push per step.
    #[must_use]
    pub fn audit_writes(mut self) -> Self {
        self.audit = true;
        // A round runs with the settings of the store that started it.
        self.lane = std::sync::Arc::default();
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
    /// # async fn demo() -> Result<(), flowwire::storage::StoreError> {
    /// use flowwire::storage::InstanceKey;
    /// use flowwire::storage::store::RedisStore;
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
}
