//! Time: the [`Clock`] the engine reads for everything a flow sees (step times, timers,
//! backoffs), and the only place the runtime reads the wall clock (enforced by
//! `clippy.toml`).
//!
//! The engine's own deadlines — request and store timeouts, driver call timeouts, leases —
//! run on real time whatever the clock: a test that moves its clock by a week does not time
//! its requests out.

use std::fmt;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use tokio::sync::Notify;

/// Nanoseconds since the Unix epoch (0 if the clock is before it).
#[allow(clippy::disallowed_methods)]
pub fn unix_nanos() -> u128 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_nanos())
}

/// A few bits of entropy for backoff jitter (the clock's low bits; not for cryptography).
pub fn jitter() -> u32 {
    let n = unix_nanos();
    (n ^ (n >> 32)) as u32
}

/// Milliseconds since the Unix epoch (0 if the clock is before it).
pub fn unix_millis() -> u64 {
    u64::try_from(unix_nanos() / 1_000_000).unwrap_or(u64::MAX)
}

/// What time it is for flows: every step is stamped with it, timers and retry backoffs
/// come due by it. The engine reads [`SystemClock`] unless given another with
/// `EngineBuilder::clock`; tests give it a [`ManualClock`] to run a week in a millisecond.
///
/// ```
/// use std::time::Duration;
/// use flowwire::{Clock, ManualClock};
///
/// let clock = ManualClock::new();
/// let t0 = clock.now_ms();
/// clock.advance(Duration::from_secs(7 * 24 * 3600));
/// assert_eq!(clock.now_ms() - t0, 7 * 24 * 3_600_000);
/// ```
pub trait Clock: Send + Sync + fmt::Debug + 'static {
    /// Now, in milliseconds since the Unix epoch.
    fn now_ms(&self) -> u64;

    /// How the engine learns that the time moved, for a clock that does not move with real
    /// time: the [`Notify`] it signals (`notify_waiters`) each time it moves. `None` (the
    /// default): the clock moves with real time, and the engine sleeps until what it waits
    /// for comes due.
    fn moved(&self) -> Option<&Notify> {
        None
    }
}

/// The wall clock: the default.
#[derive(Debug, Clone, Copy, Default)]
pub struct SystemClock;

impl Clock for SystemClock {
    fn now_ms(&self) -> u64 {
        unix_millis()
    }
}

/// A clock moved by hand, for tests: it starts at the wall clock's time (or the one given)
/// and stands still until [`ManualClock::advance`] moves it; timers and retry backoffs that
/// come due fire at once.
///
/// ```
/// # use std::sync::Arc;
/// use flowwire::{Clock, ManualClock};
/// let clock = Arc::new(ManualClock::at(1_700_000_000_000));
/// // Engine::builder().clock(clock.clone()) ...
/// assert_eq!(clock.now_ms(), 1_700_000_000_000);
/// ```
#[derive(Debug, Default)]
pub struct ManualClock {
    now: AtomicU64,
    moved: Notify,
}

impl ManualClock {
    /// A clock at the wall clock's time now.
    pub fn new() -> Self {
        Self::at(unix_millis())
    }

    /// A clock at `ms` milliseconds since the Unix epoch.
    pub fn at(ms: u64) -> Self {
        Self {
            now: AtomicU64::new(ms),
            moved: Notify::new(),
        }
    }

    /// Moves the clock on by `d`: every timer and backoff due by then fires.
    pub fn advance(&self, d: Duration) {
        let ms = u64::try_from(d.as_millis()).unwrap_or(u64::MAX);
        self.now.fetch_add(ms, Ordering::SeqCst);
        self.moved.notify_waiters();
    }

    /// Sets the clock to `ms` milliseconds since the Unix epoch (it may go back: a flow
    /// must not assume it never does).
    pub fn set(&self, ms: u64) {
        self.now.store(ms, Ordering::SeqCst);
        self.moved.notify_waiters();
    }
}

impl Clock for ManualClock {
    fn now_ms(&self) -> u64 {
        self.now.load(Ordering::SeqCst)
    }

    fn moved(&self) -> Option<&Notify> {
        Some(&self.moved)
    }
}

impl<C: Clock> Clock for std::sync::Arc<C> {
    fn now_ms(&self) -> u64 {
        (**self).now_ms()
    }

    fn moved(&self) -> Option<&Notify> {
        (**self).moved()
    }
}

/// Waits until `clock` reaches `at_ms`. Cancel-safe; allocates nothing.
pub(crate) async fn sleep_until(clock: &dyn Clock, at_ms: u64) {
    match clock.moved() {
        None => {
            let wait = at_ms.saturating_sub(clock.now_ms());
            tokio::time::sleep(Duration::from_millis(wait)).await;
        }
        Some(moved) => loop {
            let signal = moved.notified();
            let mut signal = std::pin::pin!(signal);
            signal.as_mut().enable();
            if clock.now_ms() >= at_ms {
                return;
            }
            signal.await;
        },
    }
}
