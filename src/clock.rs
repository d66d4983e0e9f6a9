//! Wall-clock time for what leaves the node (API fields, hook events, node records). Every
//! decision inside the node runs on `Instant`s instead; this module imports nothing of ours.

use std::time::{SystemTime, UNIX_EPOCH};

/// Milliseconds since the Unix epoch (0 if the clock is before it).
pub fn unix_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64)
}

/// Seconds since the Unix epoch (0 if the clock is before it).
pub fn unix_s() -> u64 {
    unix_ms() / 1000
}
