//! The only place the runtime reads the wall clock (enforced by `clippy.toml`).

use std::time::{SystemTime, UNIX_EPOCH};

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
