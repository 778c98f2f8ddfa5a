//! How long a shard's lease surely holds, as the supervisor that renews it and the runner
//! that writes under it both see it: one deadline on this process's monotonic clock.
//!
//! A renewal (or the acquisition) that Redis confirms moves the deadline to the moment the
//! request was *sent* plus [`SAFE_SHARE`] of the lease's TTL: Redis starts the TTL when
//! it runs the script, which is after the send, so the deadline falls before Redis lets
//! the lease go as long as the two clocks advance at rates within 20 % of each other. A
//! renewal that fails, times out or whose reply is lost moves nothing. The runner commits
//! nothing once the deadline has passed.

// Only multi-process mode (feature `redis`) takes leases.
#![cfg_attr(not(feature = "redis"), allow(dead_code))]

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use tokio::time::Instant;

/// The share of a lease's TTL counted on, from the moment its renewal was sent.
pub(crate) const SAFE_SHARE: f32 = 0.8;

/// The bit of `LeaseDeadline::until` that marks a lease given up: no renewal moves it on.
const ENDED: u64 = 1 << 63;

/// The deadline of one lease (cheap to clone; clones share it).
#[derive(Debug, Clone)]
pub(crate) struct LeaseDeadline {
    /// The clock's origin: the deadline is kept as nanoseconds after it.
    base: Instant,
    /// The deadline, in nanoseconds after `base`, with [`ENDED`] set once the lease is
    /// given up (one word, so that a renewal and an end cannot interleave).
    until: Arc<AtomicU64>,
}

impl LeaseDeadline {
    /// A lease granted by a request sent at `sent`, for `ttl`.
    pub(crate) fn granted(sent: Instant, ttl: Duration) -> Self {
        let deadline = Self {
            base: sent,
            until: Arc::new(AtomicU64::new(0)),
        };
        deadline.renewed(sent, ttl);
        deadline
    }

    /// A renewal sent at `sent` was confirmed: the lease holds until `sent` plus the safe
    /// share of `ttl` (never earlier than it held already). A lease given up stays given
    /// up: a confirmation that arrives after its runner stopped moves nothing.
    pub(crate) fn renewed(&self, sent: Instant, ttl: Duration) {
        let until = sent + ttl.mul_f32(SAFE_SHARE);
        let nanos = u64::try_from(until.saturating_duration_since(self.base).as_nanos())
            .unwrap_or(u64::MAX)
            .min(ENDED - 1);
        let _ = self
            .until
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |cur| {
                (cur & ENDED == 0 && nanos > cur).then_some(nanos)
            });
    }

    /// The lease is given up (its runner stopped): it holds no longer than now, and no
    /// later renewal extends it.
    pub(crate) fn end(&self) {
        let now = u64::try_from(
            Instant::now()
                .saturating_duration_since(self.base)
                .as_nanos(),
        )
        .unwrap_or(u64::MAX)
        .min(ENDED - 1);
        let _ = self
            .until
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |cur| {
                Some((cur & !ENDED).min(now) | ENDED)
            });
    }

    /// When the request that took the lease was sent.
    pub(crate) fn since(&self) -> Instant {
        self.base
    }

    /// Until when the lease surely holds.
    pub(crate) fn until(&self) -> Instant {
        self.base + Duration::from_nanos(self.until.load(Ordering::Acquire) & !ENDED)
    }

    /// Whether the lease surely still holds now.
    pub(crate) fn holds(&self) -> bool {
        Instant::now() < self.until()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const TTL: Duration = Duration::from_secs(10);

    #[test]
    fn a_lease_holds_for_its_safe_share_from_the_send() {
        let now = Instant::now();
        let fresh = LeaseDeadline::granted(now, TTL);
        assert_eq!(fresh.until(), now + Duration::from_secs(8));
        assert!(fresh.holds());
        // Sent 8 s ago, whatever became of the reply: over.
        let old = LeaseDeadline::granted(now - Duration::from_secs(8), TTL);
        assert!(!old.holds(), "the lease ends 8 s after the send");
    }

    #[test]
    fn a_renewal_counts_from_its_send_and_never_shortens_the_lease() {
        let start = Instant::now();
        let lease = LeaseDeadline::granted(start, TTL);
        let sent = start + Duration::from_secs(3);
        lease.renewed(sent, TTL);
        assert_eq!(lease.until(), sent + Duration::from_secs(8));
        // A late confirmation of an older send moves nothing back.
        lease.renewed(start, TTL);
        assert_eq!(lease.until(), sent + Duration::from_secs(8));
    }

    #[test]
    fn a_renewal_confirmed_after_the_lease_ended_does_not_revive_it() {
        let start = Instant::now();
        let lease = LeaseDeadline::granted(start, TTL);
        lease.end();
        assert!(!lease.holds());
        let ended = lease.until();
        // The reply to a renewal sent before the runner stopped arrives after.
        lease.renewed(start + Duration::from_millis(1), TTL);
        assert_eq!(
            lease.until(),
            ended,
            "the span ends where the runner stopped"
        );
        assert!(!lease.holds());
    }
}
