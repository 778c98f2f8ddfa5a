//! An operator's writes to the embedded store: marking an instance damaged, and deleting
//! one. Each is its own durable redb transaction, outside the log's batches (like
//! `retime`): rare, and durable when it returns.

use std::path::Path;
use std::sync::Arc;

use redb::{Database, ReadableDatabase, ReadableTable};

use super::apply::set_timer;
use super::schema::{
    ACTIVE, CORRELATED, DAMAGED, ENDED_KEYS, HISTORY, IMPULSES, PARKED, RECORDS, TIMER_OF, TIMERS,
    map_err,
};
use crate::error::StoreError;
use crate::record::InstanceKey;

/// Marks `key` damaged with `reason`, or clears the mark.
pub(super) fn mark_damaged(
    db: &Database,
    path: &Path,
    key: &InstanceKey,
    reason: Option<&str>,
) -> Result<(), StoreError> {
    let e = |err: redb::Error| map_err(path, err);
    let txn = db.begin_write().map_err(|x| e(x.into()))?;
    {
        let mut damaged = txn.open_table(DAMAGED).map_err(|x| e(x.into()))?;
        let k = (&*key.flow, &*key.id);
        match reason {
            Some(why) => damaged.insert(k, why).map(drop),
            None => damaged.remove(k).map(drop),
        }
        .map_err(|x| e(x.into()))?;
    }
    txn.commit().map_err(|x| e(x.into()))
}

/// The damaged instances of `flow` after `after`, at most `limit`.
pub(super) fn damaged(
    db: &Database,
    path: &Path,
    flow: &str,
    after: Option<&str>,
    limit: usize,
) -> Result<Vec<(Arc<str>, String)>, StoreError> {
    let e = |err: redb::Error| map_err(path, err);
    let txn = db.begin_read().map_err(|x| e(x.into()))?;
    let table = txn.open_table(DAMAGED).map_err(|x| e(x.into()))?;
    let mut out = Vec::new();
    for row in table
        .range((flow, after.unwrap_or(""))..)
        .map_err(|x| e(x.into()))?
    {
        let (k, v) = row.map_err(|x| e(x.into()))?;
        let (f, id) = k.value();
        if f != flow || out.len() >= limit {
            break;
        }
        if after == Some(id) {
            continue;
        }
        out.push((Arc::from(id), v.value().to_string()));
    }
    Ok(out)
}

/// Deletes every row of `key`: record, impulse ids, history, index entries, damaged mark.
pub(super) fn delete(db: &Database, path: &Path, key: &InstanceKey) -> Result<(), StoreError> {
    let e = |err: redb::Error| map_err(path, err);
    let (f, id) = (&*key.flow, &*key.id);
    let txn = db.begin_write().map_err(|x| e(x.into()))?;
    {
        let mut records = txn.open_table(RECORDS).map_err(|x| e(x.into()))?;
        records.remove((f, id)).map_err(|x| e(x.into()))?;
        for table in [ACTIVE, PARKED] {
            let mut t = txn.open_table(table).map_err(|x| e(x.into()))?;
            t.remove((f, id)).map_err(|x| e(x.into()))?;
        }
        let mut damaged = txn.open_table(DAMAGED).map_err(|x| e(x.into()))?;
        damaged.remove((f, id)).map_err(|x| e(x.into()))?;
        let mut impulses = txn.open_table(IMPULSES).map_err(|x| e(x.into()))?;
        let mut applied = Vec::new();
        for row in impulses.range((f, id, "")..).map_err(|x| e(x.into()))? {
            let (k, _) = row.map_err(|x| e(x.into()))?;
            let (kf, kid, imp) = k.value();
            if kf != f || kid != id {
                break;
            }
            applied.push(imp.to_string());
        }
        for imp in &applied {
            impulses
                .remove((f, id, imp.as_str()))
                .map_err(|x| e(x.into()))?;
        }
        let mut history = txn.open_table(HISTORY).map_err(|x| e(x.into()))?;
        history
            .retain_in((f, id, 0)..=(f, id, u64::MAX), |_, _| false)
            .map_err(|x| e(x.into()))?;
        let mut timers = txn.open_table(TIMERS).map_err(|x| e(x.into()))?;
        let mut timer_of = txn.open_table(TIMER_OF).map_err(|x| e(x.into()))?;
        set_timer(&mut timers, &mut timer_of, (f, id), None).map_err(e)?;
        // The correlation indexes are keyed by (flow, key, id): the key is in the record,
        // which may not be readable, so the flow's entries are scanned.
        for table in [CORRELATED, ENDED_KEYS] {
            let mut index = txn.open_table(table).map_err(|x| e(x.into()))?;
            let mut keys = Vec::new();
            for row in index.range((f, "", "")..).map_err(|x| e(x.into()))? {
                let (k, _) = row.map_err(|x| e(x.into()))?;
                let (kf, ck, kid) = k.value();
                if kf != f {
                    break;
                }
                if kid == id {
                    keys.push(ck.to_string());
                }
            }
            for ck in &keys {
                index
                    .remove((f, ck.as_str(), id))
                    .map_err(|x| e(x.into()))?;
            }
        }
    }
    txn.commit().map_err(|x| e(x.into()))
}
