//! A publisher's bitrate bound (`[[namespace]] limits.max_bitrate_kbps`): the bytes it
//! pushes are counted over fixed windows, and a window whose budget is spent ends the
//! publish. Sans-IO: the caller passes the time.

use std::time::{Duration, Instant};

/// How long the average is taken over: long enough for a keyframe burst, short enough to
/// stop a flood before it costs much.
pub(super) const WINDOW: Duration = Duration::from_secs(4);

/// Counts one publisher's bytes against its limit.
#[derive(Debug)]
pub(super) struct RateGuard {
    limit_kbps: u64,
    /// The bytes a whole window may carry.
    budget: u64,
    window_start: Option<Instant>,
    bytes: u64,
    tripped: bool,
}

impl RateGuard {
    pub(super) fn new(limit_kbps: u64) -> RateGuard {
        RateGuard {
            limit_kbps,
            budget: limit_kbps
                .saturating_mul(1000 / 8)
                .saturating_mul(WINDOW.as_secs()),
            window_start: None,
            bytes: 0,
            tripped: false,
        }
    }

    /// Counts `len` bytes pushed at `now`; `Some(reason)` the first time the publisher has
    /// sent more in one window than the limit allows over the whole window.
    pub(super) fn add(&mut self, len: usize, now: Instant) -> Option<String> {
        if self.tripped {
            return None;
        }
        let start = *self.window_start.get_or_insert(now);
        if now.duration_since(start) >= WINDOW {
            self.window_start = Some(now);
            self.bytes = 0;
        }
        self.bytes = self.bytes.saturating_add(len as u64);
        if self.bytes <= self.budget {
            return None;
        }
        self.tripped = true;
        Some(format!(
            "the publisher sends more than its namespace's {} kbit/s (averaged over {} s)",
            self.limit_kbps,
            WINDOW.as_secs()
        ))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_stream_under_its_limit_passes_and_one_over_it_trips_once() {
        let t0 = Instant::now();
        // 1000 kbit/s: 125 kB a second, 500 kB a window.
        let mut g = RateGuard::new(1000);
        // A 200 kB keyframe, then 100 kB/s for 12 s: under the limit.
        assert_eq!(g.add(200_000, t0), None);
        for s in 1..=12 {
            assert_eq!(g.add(100_000, t0 + Duration::from_secs(s)), None, "{s}");
        }
        // 200 kB a second from then on: the window's budget is spent within it.
        let t = t0 + Duration::from_secs(13);
        let tripped: Vec<_> = (0..4)
            .filter_map(|s| g.add(200_000, t + Duration::from_secs(s)))
            .collect();
        assert_eq!(tripped.len(), 1, "{tripped:?}");
        assert!(tripped[0].contains("1000 kbit/s"), "{}", tripped[0]);
        assert_eq!(g.add(10_000_000, t + Duration::from_secs(5)), None);
    }
}
