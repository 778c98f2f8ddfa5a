//! The embedded store's tables, and how redb's errors (and panics) read as the store's.

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
/// (flow, correlation key, id) of the instances that ended carrying that key.
pub(super) const ENDED_KEYS: TableDefinition<'_, (&str, &str, &str), ()> =
    TableDefinition::new("ended_keys");
pub(super) const DAMAGED: TableDefinition<'_, (&str, &str), &str> = TableDefinition::new("damaged");
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
    txn.open_table(ENDED_KEYS).map_err(|e| map_err(p, e))?;
    txn.open_table(META).map_err(|e| map_err(p, e))?;
    txn.open_table(DAMAGED).map_err(|e| map_err(p, e))?;
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
        // Bytes that do not parse, or a file that ends early: the file is damaged.
        redb::Error::Io(io)
            if matches!(
                io.kind(),
                std::io::ErrorKind::InvalidData | std::io::ErrorKind::UnexpectedEof
            ) =>
        {
            StoreError::Corrupted {
                path: path.to_path_buf(),
                detail: io.to_string(),
            }
        }
        redb::Error::Io(io) => StoreError::unavailable(format!("store {}", path.display()), io),
        // The file's own description of its tables does not match what it must be.
        e @ (redb::Error::TableTypeMismatch { .. }
        | redb::Error::TypeDefinitionChanged { .. }
        | redb::Error::TableIsMultimap(_)
        | redb::Error::TableIsNotMultimap(_)
        | redb::Error::UpgradeRequired(_)
        | redb::Error::ValueTooLarge(_)) => StoreError::Corrupted {
            path: path.to_path_buf(),
            detail: format!("its tables are not the ones flowwire wrote: {e}"),
        },
        // An earlier write failed half way: redb takes nothing more until reopened.
        e @ (redb::Error::PreviousIo | redb::Error::TransactionPoisoned) => StoreError::Stopped {
            path: path.to_path_buf(),
            detail: e.to_string(),
        },
        other => StoreError::Backend(format!("store {}: {other}", path.display())),
    }
}

/// Runs a call into redb, mapping a panic (redb panics on some damaged pages) to a
/// permanent [`StoreError::Corrupted`] naming the file.
pub(super) fn guard<T>(
    path: &Path,
    f: impl FnOnce() -> Result<T, StoreError>,
) -> Result<T, StoreError> {
    match std::panic::catch_unwind(std::panic::AssertUnwindSafe(f)) {
        Ok(r) => r,
        Err(panic) => {
            let what = panic
                .downcast_ref::<&str>()
                .map(|s| (*s).to_string())
                .or_else(|| panic.downcast_ref::<String>().cloned())
                .unwrap_or_else(|| "no message".into());
            Err(StoreError::Corrupted {
                path: path.to_path_buf(),
                detail: format!("redb panicked ({what}): the file is damaged"),
            })
        }
    }
}

#[cfg(test)]
mod tests {
    use std::io;
    use std::path::Path;

    use super::map_err;
    use crate::error::StoreError;

    /// Every redb error is classed: what retrying can cure is transient, the rest is not.
    #[test]
    fn redb_errors_are_classed_transient_or_permanent_and_keep_their_source() {
        let p = Path::new("s.redb");
        let full = map_err(p, redb::Error::Io(io::Error::from_raw_os_error(28)));
        assert!(full.is_transient(), "{full}");
        assert!(
            std::error::Error::source(&full).is_some(),
            "the I/O error is kept as the source"
        );
        for (e, permanent) in [
            (redb::Error::Corrupted("bad page".into()), "Corrupted"),
            (
                redb::Error::Io(io::Error::new(io::ErrorKind::InvalidData, "x")),
                "Corrupted",
            ),
            (
                redb::Error::Io(io::Error::from(io::ErrorKind::UnexpectedEof)),
                "Corrupted",
            ),
            (redb::Error::UpgradeRequired(1), "Corrupted"),
            (redb::Error::TableIsMultimap("records".into()), "Corrupted"),
            (redb::Error::DatabaseAlreadyOpen, "Locked"),
            (redb::Error::PreviousIo, "Stopped"),
            (redb::Error::TransactionPoisoned, "Stopped"),
        ] {
            let err = map_err(p, e);
            assert!(!err.is_transient(), "{err}");
            let class = match err {
                StoreError::Corrupted { .. } => "Corrupted",
                StoreError::Locked { .. } => "Locked",
                StoreError::Stopped { .. } => "Stopped",
                other => panic!("unexpected {other}"),
            };
            assert_eq!(class, permanent);
        }
    }
}
