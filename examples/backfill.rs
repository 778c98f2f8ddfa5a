//! A backfill over partitions with child flows: a parent copies a table partition by
//! partition, each partition a child flow of its own, four at a time.
//!
//! `cargo run --example backfill`
//!
//! Each partition is an instance (`Backfill/<table>-p<n>`) with its own retries, history and
//! failure: the parent learns how each ended and how many rows it copied. A partition whose
//! data is corrupt fails (a permanent error: not retried) and the backfill records it and
//! goes on. The second backfill is cancelled while its first partitions run: they are
//! cancelled with it, and the partitions still queued are never started.

use std::collections::BTreeMap;
use std::time::Duration;

use flowwire::prelude::*;
use flowwire::{ChildStart, Error, Transient};

/// Why a partition could not be copied.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, thiserror::Error)]
pub enum CopyError {
    /// The source is busy: worth another try.
    #[error("the source is busy")]
    Busy,
    /// The partition's data is corrupt: no retry helps.
    #[error("partition {0} is corrupt")]
    Corrupt(u32),
}

impl Transient for CopyError {
    fn is_transient(&self) -> bool {
        matches!(self, CopyError::Busy)
    }
}

/// The warehouse that holds the tables.
#[driver(timeout = "1h", retries = 3, backoff = "50ms")]
pub trait Warehouse {
    /// Copies one partition of a table; returns the rows copied.
    async fn copy(&self, table: String, partition: u32) -> Result<u64, CopyError>;
}

/// Partition 13 of every table is corrupt; the `events` table is slow (a copy takes an hour).
#[derive(Clone)]
pub struct Lake;

#[driver]
impl Warehouse for Lake {
    async fn copy(&self, table: String, partition: u32) -> Result<u64, CopyError> {
        if partition == 13 {
            return Err(CopyError::Corrupt(partition));
        }
        if table == "events" {
            tokio::time::sleep(Duration::from_hours(1)).await;
        }
        Ok(u64::from(partition) * 100 + 7)
    }
}

/// One partition to copy.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct Part {
    table: String,
    number: u32,
    rows: Option<u64>,
}

/// The child: copies its partition, then finishes (a corrupt partition fails it).
#[flow]
pub struct LoadPartition {
    #[link]
    state: Part,
    #[link]
    warehouse: impl Warehouse,
}

#[flow]
impl LoadPartition {
    #[wire]
    fn run(&mut self) -> Command<Self> {
        if self.state.rows.is_some() {
            return Command::finish();
        }
        let (table, p) = (self.state.table.clone(), self.state.number);
        Command::drive(self.warehouse.copy(table, p)).then(|f, rows| {
            f.state.rows = Some(rows?);
            Ok(())
        })
    }
}

/// The backfill of one table.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct Backfilling {
    table: String,
    partitions: u32,
    rows: BTreeMap<u32, u64>,
    failed: BTreeMap<u32, String>,
    done: bool,
}

/// The parent: one child per partition, four at a time.
#[flow]
pub struct Backfill {
    #[link]
    state: Backfilling,
}

#[flow]
impl Backfill {
    #[probe]
    fn copied(&self) -> u64 {
        self.state.rows.values().sum()
    }

    #[wire]
    fn run(&mut self) -> Command<Self> {
        if self.state.done {
            return Command::finish();
        }
        let table = &self.state.table;
        let children = (0..self.state.partitions).map(|partition| {
            let part = Part {
                table: table.clone(),
                number: partition,
                rows: None,
            };
            ChildStart::<LoadPartition>::new(format!("{table}-p{partition}"), part)
        });
        Command::fan_out(children).parallel(4).all(
            |f, _, child| {
                let child = child?;
                let p = child.state.number;
                match (child.ended, child.state.rows) {
                    (Ended::Finished, Some(rows)) => {
                        f.state.rows.insert(p, rows);
                    }
                    (Ended::Failed { reason, .. }, _) => {
                        f.state.failed.insert(p, reason);
                    }
                    (ended, _) => {
                        f.state.failed.insert(p, format!("{ended:?}"));
                    }
                }
                Ok(())
            },
            |f| {
                f.state.done = true;
                Ok(())
            },
        )
    }
}

/// Runs both backfills and checks how they ended.
#[tokio::main(flavor = "current_thread")]
pub async fn main() -> flowwire::Result<()> {
    let engine = Engine::builder()
        .in_memory()
        .flow::<Backfill>()
        .flow::<LoadPartition>()
        .driver(Lake)
        // A cancelled partition's copy in flight is not interrupted (its outcome will not be
        // applied): do not wait an hour for it at shutdown.
        .drain_timeout(Duration::from_millis(100))
        .start()
        .await?;

    // 1. Twenty partitions; one is corrupt.
    let orders = Backfilling {
        table: "orders".into(),
        partitions: 20,
        ..Backfilling::default()
    };
    let h = engine.start::<Backfill>("orders", orders).await?;
    assert_eq!(h.finished().await?, Ended::Finished);
    let s = h.state().await?;
    println!(
        "orders: {} partitions copied, {} rows; failed: {:?}",
        s.rows.len(),
        h.copied().await?,
        s.failed
    );
    assert_eq!(s.rows.len(), 19);
    assert_eq!(s.failed.keys().copied().collect::<Vec<_>>(), vec![13]);
    // Each partition is an instance of its own: its failure, typed, is there too.
    let corrupt = engine.handle::<LoadPartition>("orders-p13").await?;
    let ended = corrupt.finished().await?;
    assert_eq!(ended.error::<CopyError>(), Some(CopyError::Corrupt(13)));

    // 2. A slow table, cancelled while its first four partitions copy.
    let events = Backfilling {
        table: "events".into(),
        partitions: 10,
        ..Backfilling::default()
    };
    let h = engine.start::<Backfill>("events", events).await?;
    for p in 0..4 {
        while engine
            .handle::<LoadPartition>(format!("events-p{p}"))
            .await
            .is_err()
        {
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
    }
    h.cancel("the schema changed").await?;
    assert!(matches!(h.finished().await?, Ended::Cancelled { .. }));
    for p in 0..4 {
        let child = engine
            .handle::<LoadPartition>(format!("events-p{p}"))
            .await?;
        let Ended::Cancelled { reason } = child.finished().await? else {
            panic!("partition {p} was not cancelled");
        };
        if p == 0 {
            println!("events-p0: cancelled, {reason}");
        }
    }
    let queued = engine.handle::<LoadPartition>("events-p4").await;
    assert!(matches!(queued, Err(Error::NotFound { .. })));
    println!("events: cancelled with 4 partitions running; 6 were never started");
    engine.shutdown().await;
    Ok(())
}
