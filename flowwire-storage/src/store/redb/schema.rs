//! The embedded store's tables, and how redb's errors read as the store's.

use std::path::Path;

use redb::{Database, TableDefinition};

use crate::error::StoreError;

pub(super) const RECORDS: TableDefinition<'_, (&str, &str), (u64, &[u8])> =
    TableDefinition::new("records");
pub(super) const ACTIVE: TableDefinition<'_, (&str, &str), ()> = TableDefinition::new("active");
pub(super) const IMPULSES: TableDefinition<'_, (&str, &str, &str), u64> =
    TableDefinition::new("impulses");
pub(super) const HISTORY: TableDefinition<'_, (&str, &str, u64), &[u8]> =
    TableDefinition::new("history");
pub(super) const PARKED: TableDefinition<'_, (&str, &str), ()> = TableDefinition::new("parked");
pub(super) const TIMERS: TableDefinition<'_, (&str, u64, &str), ()> =
    TableDefinition::new("timers");
pub(super) const TIMER_OF: TableDefinition<'_, (&str, &str), u64> =
    TableDefinition::new("timer_of");
pub(super) const CORRELATED: TableDefinition<'_, (&str, &str, &str), ()> =
    TableDefinition::new("correlated");
pub(super) const META: TableDefinition<'_, &str, u64> = TableDefinition::new("meta");
/// The `meta` row holding the number of the last batch committed.
pub(super) const BATCH: &str = "batch";

pub(super) fn create_tables(db: &Database, p: &Path) -> Result<(), StoreError> {
    let txn = db.begin_write().map_err(|e| map_err(p, e))?;
    txn.open_table(RECORDS).map_err(|e| map_err(p, e))?;
    txn.open_table(ACTIVE).map_err(|e| map_err(p, e))?;
    txn.open_table(IMPULSES).map_err(|e| map_err(p, e))?;
    txn.open_table(HISTORY).map_err(|e| map_err(p, e))?;
    txn.open_table(PARKED).map_err(|e| map_err(p, e))?;
    txn.open_table(TIMERS).map_err(|e| map_err(p, e))?;
    txn.open_table(TIMER_OF).map_err(|e| map_err(p, e))?;
    txn.open_table(CORRELATED).map_err(|e| map_err(p, e))?;
    txn.open_table(META).map_err(|e| map_err(p, e))?;
    txn.commit().map_err(|e| map_err(p, e))
}

pub(super) fn map_err(path: &Path, e: impl Into<redb::Error>) -> StoreError {
    match e.into() {
        redb::Error::Corrupted(detail) => StoreError::Corrupted {
            path: path.to_path_buf(),
            detail,
        },
        redb::Error::DatabaseAlreadyOpen => StoreError::Locked {
            path: path.to_path_buf(),
        },
        redb::Error::Io(io) if io.kind() == std::io::ErrorKind::InvalidData => {
            StoreError::Corrupted {
                path: path.to_path_buf(),
                detail: io.to_string(),
            }
        }
        other => StoreError::Backend(other.to_string()),
    }
}
