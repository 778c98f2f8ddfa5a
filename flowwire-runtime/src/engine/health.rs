//! What a running engine reports about itself, for a service's health endpoint.

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use flowwire_storage::InstanceKey;

use super::Engine;

/// The shards each flow's supervisor holds, per flow name (multi-process orchestrators).
pub(crate) type Held = Arc<Mutex<BTreeMap<&'static str, Vec<HeldShard>>>>;

/// A shard a supervisor holds, with its lease.
#[derive(Debug, Clone)]
pub(crate) struct HeldShard {
    pub shard: u16,
    pub token: u64,
    pub lease: super::lease::LeaseDeadline,
    /// Given up or lost since the last report (listed once more for its final span).
    pub released: bool,
}

/// A shard lease an orchestrator holds, as [`Health::leases`] reports it: the span of
/// time in which its runner may commit under the token, on this machine's wall clock.
/// A checker can compare the spans of several processes (on one machine): spans of one
/// shard under different tokens never overlap.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
#[non_exhaustive]
pub struct HeldLease {
    /// The flow.
    pub flow: &'static str,
    /// The shard.
    pub shard: u16,
    /// The lease's fencing token.
    pub token: u64,
    /// When the request that took the lease was sent (ms since the Unix epoch).
    pub since_unix_ms: u64,
    /// Until when the lease surely holds (ms since the Unix epoch): 80 % of its TTL after
    /// the last renewal Redis confirmed was sent, or when it was given up. The runner
    /// commits nothing after it.
    pub until_unix_ms: u64,
    /// The lease was given up or lost since the supervisor's last round: listed once more,
    /// with its final span, and not among [`Health::shards`].
    pub released: bool,
}

/// What an engine knows of its place in a deployment.
pub(crate) struct Member {
    /// This process's member name (multi-process mode).
    pub node: Option<Arc<str>>,
    /// The roles it plays.
    pub roles: Vec<&'static str>,
    /// The shards it holds (orchestrators).
    pub held: Held,
}

impl Member {
    /// An embedded engine: one process plays every role.
    pub(crate) fn embedded() -> Self {
        Member {
            node: None,
            roles: vec!["embedded"],
            held: Held::default(),
        }
    }
}

/// A snapshot of an engine's health: whether its store answers, the roles it plays and
/// (on an orchestrator) the shards it holds. Serializes to JSON for a health endpoint.
///
/// ```
/// # #[tokio::main(flavor = "current_thread")] async fn main() -> flowwire::Result<()> {
/// let engine = flowwire::Engine::builder().in_memory().start().await?;
/// let health = engine.health().await;
/// assert!(health.ok());
/// assert_eq!(health.roles, ["embedded"]);
/// # Ok(()) }
/// ```
#[derive(Debug, Clone, serde::Serialize)]
#[non_exhaustive]
pub struct Health {
    /// This process's member name in a multi-process deployment; `None` when embedded.
    pub node: Option<String>,
    /// `["embedded"]`, or the roles of a multi-process engine (`"orchestrator"`,
    /// `"worker"`, `"client"`).
    pub roles: Vec<&'static str>,
    /// How long the store took to answer a read, in microseconds; `None` if it did not
    /// answer within two seconds (or the engine's store timeout, if shorter; see
    /// [`Health::store_error`]).
    pub store_micros: Option<u64>,
    /// Why the store did not answer, or why it fails writes, if it does.
    pub store_error: Option<String>,
    /// `"ok"`; `"degraded"` while the store fails writes for a reason it recovers from by
    /// itself (a full disk, an unreachable server: steps are retried with backoff); or
    /// `"failed"` when it cannot recover without an operator (a damaged or stopped store:
    /// what depends on it has stopped).
    pub store_state: &'static str,
    /// The shards this orchestrator holds, per flow (empty for other roles).
    pub shards: BTreeMap<&'static str, Vec<u16>>,
    /// The leases behind [`Health::shards`], with their tokens and spans.
    pub leases: Vec<HeldLease>,
}

impl Health {
    /// `true` when the store answered and takes writes.
    pub fn ok(&self) -> bool {
        self.store_micros.is_some() && self.store_state == "ok"
    }

    /// The snapshot as JSON.
    pub fn to_json(&self) -> String {
        serde_json::to_string(self).unwrap_or_else(|e| format!("{{\"error\":\"{e}\"}}"))
    }
}

/// The record read to check the store: a key no flow can have (flow names are Rust
/// identifiers).
const PROBE: &str = "flowwire health";

impl Engine {
    /// Checks that the store answers (one read, bounded by two seconds) and reports
    /// the roles and shards of this process. Never fails: a store that does not answer is
    /// reported in [`Health::store_error`].
    pub async fn health(&self) -> Health {
        let member = &self.inner.member;
        let store = self
            .inner
            .store
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .clone();
        let mut fault = None;
        let (store_micros, mut store_error) = match store {
            None => (None, Some("the engine was shut down".to_string())),
            Some(store) => {
                fault = store.fault();
                let key = InstanceKey::new(PROBE, PROBE);
                let asked = tokio::time::Instant::now();
                let limit = self.inner.limits.store_timeout.min(Duration::from_secs(2));
                match tokio::time::timeout(limit, store.load(&key)).await {
                    Ok(Ok(_)) => (Some(micros(asked.elapsed())), None),
                    Ok(Err(e)) => (None, Some(e.to_string())),
                    Err(_) => (None, Some(format!("no answer within {limit:?}"))),
                }
            }
        };
        let store_state = match &fault {
            None if store_micros.is_some() => "ok",
            Some(e) if e.is_transient() => "degraded",
            None => "degraded",
            Some(_) => "failed",
        };
        if let Some(e) = fault {
            store_error.get_or_insert_with(|| e.to_string());
        }
        let held = member
            .held
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .clone();
        Health {
            store_state,
            node: member.node.as_deref().map(str::to_string),
            roles: member.roles.clone(),
            store_micros,
            store_error,
            shards: held
                .iter()
                .map(|(flow, shards)| {
                    let live = shards.iter().filter(|h| !h.released).map(|h| h.shard);
                    (*flow, live.collect())
                })
                .collect(),
            leases: self.leases(),
        }
    }

    /// The shard leases this orchestrator holds, with their tokens and spans (empty for
    /// other roles). No I/O: what the supervisors know now.
    ///
    /// ```
    /// # #[tokio::main(flavor = "current_thread")] async fn main() -> flowwire::Result<()> {
    /// let engine = flowwire::Engine::builder().in_memory().start().await?;
    /// assert!(engine.leases().is_empty(), "an embedded engine holds no shard lease");
    /// # Ok(()) }
    /// ```
    pub fn leases(&self) -> Vec<HeldLease> {
        let held = self
            .inner
            .member
            .held
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .clone();
        let (now, wall) = (tokio::time::Instant::now(), crate::clock::unix_millis());
        let unix = |at: tokio::time::Instant| {
            if at >= now {
                wall.saturating_add(millis(at - now))
            } else {
                wall.saturating_sub(millis(now - at))
            }
        };
        held.iter()
            .flat_map(|(flow, shards)| {
                shards.iter().map(|h| HeldLease {
                    flow,
                    shard: h.shard,
                    token: h.token,
                    since_unix_ms: unix(h.lease.since()),
                    until_unix_ms: unix(h.lease.until()),
                    released: h.released,
                })
            })
            .collect()
    }
}

fn millis(d: Duration) -> u64 {
    u64::try_from(d.as_millis()).unwrap_or(u64::MAX)
}

fn micros(d: Duration) -> u64 {
    u64::try_from(d.as_micros()).unwrap_or(u64::MAX)
}
