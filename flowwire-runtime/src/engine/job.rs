//! What travels between a runner and the driver pools: one call to run ([`Job`]), its
//! outcome ([`OutcomeMsg`]), the bus receipt of either, and the call's resolved policy.
//! Low in the crate: the queue, the workers and the runners all speak it.

use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;

use crate::driver::Fault;
use crate::engine::outcomes::OutcomeTx;

/// A driver method's policy with every fallback applied.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct CallPolicy {
    pub timeout: Duration,
    pub retries: u32,
    pub backoff_ms: u64,
    pub max_backoff_ms: u64,
    pub park: bool,
}

impl CallPolicy {
    /// Method, then trait, then engine.
    pub(crate) fn resolve(
        method: crate::meta::Policy,
        driver: crate::meta::Policy,
        engine: crate::meta::Policy,
    ) -> Self {
        // Every field is set once the built-in defaults are under the rest.
        let p = method
            .or(driver)
            .or(engine)
            .or(crate::meta::Policy::DEFAULT);
        Self {
            timeout: Duration::from_millis(p.timeout_ms.unwrap_or_default()),
            retries: p.retries.unwrap_or_default(),
            backoff_ms: p.backoff_ms.unwrap_or_default(),
            max_backoff_ms: p.max_backoff_ms.unwrap_or_default(),
            park: p.ambiguous == Some(crate::meta::Ambiguous::Park),
        }
    }

    /// The wait after failed attempt `attempt` (1-based) before the next one, or `None` when
    /// the policy's retries are spent.
    pub(crate) fn retry_after(&self, attempt: u32) -> Option<Duration> {
        (attempt <= self.retries).then(|| self.backoff(attempt))
    }

    /// The wait before retry `attempt` (1-based): the first backoff doubling, capped, each
    /// delay between half and all of its step (jitter, so retries of many calls spread).
    pub(crate) fn backoff(&self, attempt: u32) -> Duration {
        let step = self
            .backoff_ms
            .saturating_mul(1u64 << attempt.saturating_sub(1).min(32))
            .min(self.max_backoff_ms);
        let jitter = u64::from(crate::clock::jitter()) % (step / 2 + 1);
        Duration::from_millis(step / 2 + jitter)
    }
}

/// The consumer group of the workers on a driver's stream.
pub(crate) const WORKERS: &str = "workers";

/// Where a call or an outcome came from on the multi-process bus, so that it is
/// acknowledged once it is done with: the stream entry, and (for a call) the outcome
/// stream its result goes to.
#[derive(Debug, Clone)]
#[cfg_attr(not(feature = "redis"), allow(dead_code))]
pub(crate) struct Receipt {
    pub entry: String,
    pub reply_to: String,
    /// A call's: the channel its outcome is handed to the shard's owner on, when the
    /// commit that applies it settles the call (one Redis server); `None`: the outcome
    /// goes to the outcome stream `reply_to`.
    pub handoff: Option<String>,
    /// An outcome's, when it was handed over: the call's stream, which holds `entry` (in
    /// the workers' group) until the commit that applies the outcome settles it.
    pub handed_from: Option<String>,
}

impl Receipt {
    /// An outcome's entry in its shard's outcome stream, which the commit that applies it
    /// acknowledges (`StepWrite::acknowledges`); `None` for one handed over.
    pub(crate) fn stream_entry(&self) -> Option<&str> {
        self.handed_from.is_none().then_some(self.entry.as_str())
    }

    /// The call's entry a handed-over outcome's commit settles, as a bus send.
    pub(crate) fn settles(&self) -> Option<flowwire_storage::record::BusSend> {
        self.handed_from
            .as_ref()
            .map(|stream| flowwire_storage::record::BusSend::Settle {
                stream: stream.clone(),
                group: WORKERS.to_string(),
                entry: self.entry.clone(),
            })
    }
}

/// One driver call to run.
pub(crate) struct Job {
    pub flow: &'static str,
    pub id: Arc<str>,
    pub seq: u64,
    /// The fan-out branch.
    pub branch: Option<u32>,
    pub method: u16,
    pub call: Bytes,
    /// Restarts that interrupted this call before.
    pub redelivered: u32,
    /// Which attempt this is, from 1 (the failed ones before it are in the record).
    pub attempt: u32,
    pub policy: CallPolicy,
    pub names: (&'static str, &'static str),
    pub reply: OutcomeTx,
    /// Set when the call came over the bus (multi-process mode).
    pub receipt: Option<Box<Receipt>>,
}

/// A call's outcome, on its way back to the runner.
pub(crate) struct OutcomeMsg {
    pub id: Arc<str>,
    pub seq: u64,
    pub branch: Option<u32>,
    pub result: Result<Bytes, Fault>,
    /// Set when the attempt failed and the call's policy retries it: the wait before the
    /// next attempt, in milliseconds. The runner records the failure and arms a durable
    /// timer for the next attempt; the continuation sees only the last one.
    pub retry_ms: Option<u64>,
    /// Set when the call or the outcome came over the bus (multi-process mode).
    pub receipt: Option<Box<Receipt>>,
    /// The job's handle on the channel this outcome travels on, carried back by the
    /// worker so that the runner gives it to its next job: a new handle costs two atomic
    /// count updates, and dropping one two more (see `Runner::job`). `None` when the
    /// worker kept it to send with, and for outcomes that did not come from a worker.
    pub back: Option<OutcomeTx>,
}

#[cfg(test)]
impl OutcomeMsg {
    /// An empty reply to step `seq` of instance `i`, from no worker (the channel's and the
    /// workers' tests).
    pub(crate) fn ok_for_test(seq: u64) -> Self {
        Self {
            id: Arc::from("i"),
            seq,
            branch: None,
            result: Ok(Bytes::new()),
            retry_ms: None,
            receipt: None,
            back: None,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::CallPolicy;
    use crate::meta::Policy;

    #[test]
    fn backoff_doubles_up_to_its_cap_with_jitter_below_each_step() {
        let p = CallPolicy::resolve(
            Policy {
                backoff_ms: Some(100),
                max_backoff_ms: Some(1_000),
                ..Policy::NONE
            },
            Policy::NONE,
            Policy::NONE,
        );
        for (attempt, step) in [
            (1, 100),
            (2, 200),
            (3, 400),
            (4, 800),
            (5, 1_000),
            (40, 1_000),
        ] {
            let d = p.backoff(attempt).as_millis() as u64;
            assert!(d >= step / 2 && d <= step, "attempt {attempt}: {d} ms");
        }
    }

    #[test]
    fn a_method_policy_overrides_its_trait_which_overrides_the_engine() {
        let engine = Policy {
            timeout_ms: Some(30_000),
            retries: Some(3),
            ..Policy::NONE
        };
        let driver = Policy {
            retries: Some(5),
            ..Policy::NONE
        };
        let method = Policy {
            timeout_ms: Some(10),
            ambiguous: Some(crate::meta::Ambiguous::Park),
            ..Policy::NONE
        };
        let p = CallPolicy::resolve(method, driver, engine);
        assert_eq!(p.timeout.as_millis(), 10);
        assert_eq!(p.retries, 5);
        assert!(p.park);
        assert!(!CallPolicy::resolve(Policy::NONE, driver, engine).park);
    }
}
