//! [`Engine::check_upgrade`]: before a deploy, what the new code of a flow would do with
//! every live instance in the store.

use flowwire_storage::record::PlacedRecord;
use flowwire_storage::{InstanceKey, StoreError};

use crate::core::Upgrade;
use crate::error::{Error, Result};
use crate::flow::Flow;

use super::Engine;

/// What [`Engine::check_upgrade`] found: how many live instances of a flow it read, which
/// would be parked by this version's code (and why), and which a newer version wrote.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub struct UpgradeReport {
    /// The flow checked.
    pub flow: &'static str,
    /// The version of its code that was checked (this binary's).
    pub version: u32,
    /// Live instances read (running, waiting, sleeping, backing off or compensating).
    pub checked: usize,
    /// Those this version would park, with the reason it would give, in id order.
    pub would_park: Vec<WouldPark>,
    /// Those a newer version wrote (id and version): this version leaves them as they
    /// are, for a node of their version.
    pub newer: Vec<(String, u32)>,
}

impl UpgradeReport {
    /// Whether this version runs every live instance it would load: none would be parked.
    pub fn is_safe(&self) -> bool {
        self.would_park.is_empty()
    }
}

/// A live instance the checked version would park.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub struct WouldPark {
    /// The instance.
    pub id: String,
    /// The version that wrote its record (0 when the record itself cannot be read).
    pub written: u32,
    /// The reason it would be parked with (as the parked instance would show it).
    pub reason: String,
}

impl Engine {
    /// Checks, before a deploy, what this binary's version of flow `F` would do with every
    /// live instance in the store: decodes each record with this version's code (through
    /// its migrations when an older version wrote it) and rederives, from the wire, the
    /// continuation of the call, fan-out or timer it awaits — what an engine of this
    /// version does when it loads it. Nothing is written.
    ///
    /// `F` need not be registered: run it on an engine that does not run the flow (on the
    /// data directory while the old binary is stopped, or as a client of a deployment), so
    /// that nothing is loaded. Every record of the flow is listed and read into memory at
    /// once (`flowwire::storage::InstanceStore::records`: a full scan of the store, for a tool
    /// before a deploy, not a request path); each read is bounded by the store timeout.
    ///
    /// ```
    /// use flowwire::prelude::*;
    ///
    /// #[derive(Debug, Default, Clone, Serialize, Deserialize)]
    /// pub struct Ticket { paid: bool }
    ///
    /// #[flow(name = "Ticket", version = 2)]
    /// pub struct TicketTwo { #[link] state: Ticket }
    ///
    /// #[flow]
    /// impl TicketTwo {
    ///     #[wire]
    ///     fn run(&mut self) -> Command<Self> {
    ///         if self.state.paid { Command::finish() } else { Command::wait() }
    ///     }
    /// }
    ///
    /// # #[tokio::main(flavor = "current_thread")]
    /// # async fn main() -> flowwire::Result<()> {
    /// // An engine that does not run `TicketTwo`: nothing is loaded, nothing parked.
    /// let engine = Engine::builder().in_memory().start().await?;
    /// let report = engine.check_upgrade::<TicketTwo>().await?;
    /// for p in &report.would_park {
    ///     eprintln!("{} (written by version {}) would park: {}", p.id, p.written, p.reason);
    /// }
    /// assert!(report.is_safe());
    /// # Ok(()) }
    /// ```
    pub async fn check_upgrade<F: Flow>(&self) -> Result<UpgradeReport> {
        let store = self.store_for_reads()?;
        let limit = self.inner.limits.decode_limit;
        let mut report = UpgradeReport {
            flow: F::NAME,
            version: F::VERSION,
            checked: 0,
            would_park: Vec::new(),
            newer: Vec::new(),
        };
        // Every record: waiting and sleeping instances are in no index a check could use.
        let all = self.timed(store.records(F::NAME)).await?;
        for (id, stored) in all {
            let key =
                InstanceKey::new(flowwire_storage::FlowName::from_static(F::NAME), id.clone());
            let record = match PlacedRecord::decode(&stored.bytes, &key, limit) {
                Ok(placed) if !placed.record.status.is_active() => continue,
                Ok(placed) => {
                    let read = self.inner.placement.resolve(&key, &placed);
                    match tokio::time::timeout(self.inner.limits.store_timeout, read).await {
                        Ok(Ok(record)) => Ok(record),
                        Ok(Err(e)) if e.is_transient() => return Err(e.into()),
                        Ok(Err(e)) => Err(format!("its payloads cannot be read: {e}")),
                        Err(_) => {
                            let after = self.inner.limits.store_timeout;
                            return Err(Error::Store(StoreError::Timeout(after)));
                        }
                    }
                }
                Err(e) => Err(format!("its record does not decode: {e}")),
            };
            report.checked += 1;
            let record = match record {
                Ok(record) => record,
                Err(reason) => {
                    // A loading engine marks it damaged: it would not run either.
                    report.would_park.push(WouldPark {
                        id: id.to_string(),
                        written: 0,
                        reason,
                    });
                    continue;
                }
            };
            match crate::core::check_upgrade::<F>(key, record, limit) {
                Upgrade::Runs => {}
                Upgrade::Newer { written } => report.newer.push((id.to_string(), written)),
                Upgrade::Parks { written, reason } => report.would_park.push(WouldPark {
                    id: id.to_string(),
                    written,
                    reason,
                }),
            }
        }
        Ok(report)
    }
}
