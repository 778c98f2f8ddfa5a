//! Applying a batch of steps to the tables, in one redb transaction.

use std::path::Path;

use redb::{Database, Durability, ReadableTable};

use super::schema::{
    ACTIVE, BATCH, CORRELATED, ENDED_KEYS, HISTORY, IMPULSES, META, PARKED, RECORDS, TIMER_OF,
    TIMERS, map_err,
};
use crate::error::StoreError;
use crate::record::{Expect, StepResult, StepWrite};

/// Applies batch number `seq` in a redb transaction (recording `seq` in it), left open:
/// nothing of it is visible until it commits, and dropping it aborts it.
pub(super) fn apply(
    db: &Database,
    path: &Path,
    batch: &[StepWrite],
    seq: u64,
    durability: Durability,
) -> Result<(redb::WriteTransaction, Vec<StepResult>), StoreError> {
    let e = |err: redb::Error| map_err(path, err);
    let mut txn = db.begin_write().map_err(|x| e(x.into()))?;
    txn.set_durability(durability)
        .map_err(|x| StoreError::Backend(format!("redb: {x}")))?;
    let mut results = Vec::with_capacity(batch.len());
    {
        let mut meta = txn.open_table(META).map_err(|x| e(x.into()))?;
        meta.insert(BATCH, seq).map_err(|x| e(x.into()))?;
        let mut records = txn.open_table(RECORDS).map_err(|x| e(x.into()))?;
        let mut active = txn.open_table(ACTIVE).map_err(|x| e(x.into()))?;
        let mut impulses = txn.open_table(IMPULSES).map_err(|x| e(x.into()))?;
        let mut history = txn.open_table(HISTORY).map_err(|x| e(x.into()))?;
        let mut parked = txn.open_table(PARKED).map_err(|x| e(x.into()))?;
        let mut timers = txn.open_table(TIMERS).map_err(|x| e(x.into()))?;
        let mut timer_of = txn.open_table(TIMER_OF).map_err(|x| e(x.into()))?;
        let mut correlated = txn.open_table(CORRELATED).map_err(|x| e(x.into()))?;
        // Opened only by a batch that ends a keyed instance: opening a table allocates,
        // and most batches end nothing.
        let mut ended_keys = None;
        for step in batch {
            let key = (&*step.key.flow, &*step.key.id);
            let found = records
                .get(key)
                .map_err(|x| e(x.into()))?
                .map(|g| g.value().0);
            let holds = match step.expect {
                Expect::Absent => found.is_none(),
                Expect::Version(v) => found == Some(v),
            };
            if !holds {
                results.push(StepResult::Conflict { found });
                continue;
            }
            if let Some(impulse) = &step.impulse {
                let ikey = (key.0, key.1, &**impulse);
                if let Some(seq) = impulses.get(ikey).map_err(|x| e(x.into()))? {
                    results.push(StepResult::ImpulseSeen { seq: seq.value() });
                    continue;
                }
                impulses.insert(ikey, step.seq).map_err(|x| e(x.into()))?;
            }
            records
                .insert(key, (step.version, &step.record[..]))
                .map_err(|x| e(x.into()))?;
            // Index tables are written only when their entry changes: a write, even of the
            // same value, copies the B-tree path to the root into the commit.
            set_member(&mut active, key, step.active).map_err(e)?;
            set_member(&mut parked, key, step.parked).map_err(e)?;
            set_timer(&mut timers, &mut timer_of, key, step.timer).map_err(e)?;
            if let Some(old) = &step.uncorrelate {
                correlated
                    .remove((key.0, &**old, key.1))
                    .map_err(|x| e(x.into()))?;
            }
            if let Some(new) = &step.correlation {
                correlated
                    .insert((key.0, &**new, key.1), ())
                    .map_err(|x| e(x.into()))?;
            }
            if let Some(ended) = &step.ended_key {
                let table = match &mut ended_keys {
                    Some(table) => table,
                    None => ended_keys.insert(txn.open_table(ENDED_KEYS).map_err(|x| e(x.into()))?),
                };
                table
                    .insert((key.0, &**ended, key.1), ())
                    .map_err(|x| e(x.into()))?;
            }
            if let Some((seq, entry)) = &step.history {
                history
                    .insert((key.0, key.1, *seq), &entry[..])
                    .map_err(|x| e(x.into()))?;
            }
            if let Some(below) = step.prune_below
                && history
                    .range((key.0, key.1, 0)..(key.0, key.1, below))
                    .map_err(|x| e(x.into()))?
                    .next()
                    .is_some()
            {
                history
                    .retain_in((key.0, key.1, 0)..(key.0, key.1, below), |_, _| false)
                    .map_err(|x| e(x.into()))?;
            }
            results.push(StepResult::Committed);
        }
    }
    Ok((txn, results))
}

pub(super) type Table<'t, K, V> = redb::Table<'t, K, V>;

/// Puts `key` in an index table or takes it out, writing only if that changes it.
fn set_member(
    table: &mut Table<'_, (&str, &str), ()>,
    key: (&str, &str),
    member: bool,
) -> Result<(), redb::Error> {
    let present = table.get(key)?.is_some();
    if member && !present {
        table.insert(key, ())?;
    } else if !member && present {
        table.remove(key)?;
    }
    Ok(())
}

/// Moves an instance's entry in the timer index to `due` (or removes it).
pub(super) fn set_timer(
    timers: &mut Table<'_, (&str, u64, &str), ()>,
    timer_of: &mut Table<'_, (&str, &str), u64>,
    key: (&str, &str),
    due: Option<u64>,
) -> Result<(), redb::Error> {
    let old = timer_of.get(key)?.map(|g| g.value());
    if old == due {
        return Ok(());
    }
    if let Some(old) = old {
        timers.remove((key.0, old, key.1))?;
    }
    match due {
        Some(due) => {
            timers.insert((key.0, due, key.1), ())?;
            timer_of.insert(key, due)?;
        }
        None => {
            timer_of.remove(key)?;
        }
    }
    Ok(())
}
