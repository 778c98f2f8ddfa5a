//! Redis's clock as this process sees it, so that processes never compare their own wall
//! clocks: a request's age is counted from when Redis appended it (its stream entry id)
//! to Redis's time now, estimated from the last heartbeat's reading of `TIME` plus the
//! time elapsed since on this process's monotonic clock.

use std::sync::{Arc, Mutex, PoisonError};

use tokio::time::Instant;

/// The last reading of Redis's clock (shared by a supervisor and its shards' feeds).
#[derive(Debug, Clone, Default)]
pub(crate) struct ServerTime {
    reading: Arc<Mutex<Option<(Instant, u64)>>>,
}

impl ServerTime {
    /// Records that Redis's clock read `server_ms` in a reply to a request sent at `sent`.
    /// Counting from the send puts the estimate at or ahead of Redis's time, by at most a
    /// round trip: a request is then dropped a little early, never applied late.
    pub(crate) fn read(&self, sent: Instant, server_ms: u64) {
        *self.reading.lock().unwrap_or_else(PoisonError::into_inner) = Some((sent, server_ms));
    }

    /// Redis's time now (ms since the Unix epoch, on Redis's clock); `None` before the
    /// first reading.
    pub(crate) fn now_ms(&self) -> Option<u64> {
        let (at, ms) = (*self.reading.lock().unwrap_or_else(PoisonError::into_inner))?;
        let elapsed = u64::try_from(at.elapsed().as_millis()).unwrap_or(u64::MAX);
        Some(ms.saturating_add(elapsed))
    }
}

/// When Redis appended a stream entry (ms since the Unix epoch, on Redis's clock), from
/// its id (`<ms>-<seq>`).
pub(crate) fn appended_ms(entry_id: &str) -> Option<u64> {
    entry_id.split_once('-')?.0.parse().ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_entry_id_gives_when_redis_appended_it() {
        assert_eq!(appended_ms("1700000000123-4"), Some(1_700_000_000_123));
        assert_eq!(appended_ms("garbage"), None);
        assert_eq!(appended_ms("x-1"), None);
    }

    #[test]
    fn the_server_time_moves_on_with_the_monotonic_clock() {
        let time = ServerTime::default();
        assert_eq!(time.now_ms(), None);
        let sent = Instant::now() - std::time::Duration::from_secs(2);
        time.read(sent, 1_000_000);
        let now = time.now_ms().unwrap();
        assert!((1_002_000..1_003_000).contains(&now), "{now}");
    }
}
