//! Re-homing: what a pull does when its upstream goes away (sans-IO, explicit `now`).
//!
//! A pull's subscription ends in one of two ways ([`UpstreamEnd::of`]): the publisher ended
//! the stream ([`code::ENDED`]), and the pull ends with it; or the upstream went away with
//! the stream still live somewhere (its link died, it lost the name to another origin:
//! [`code::MOVED`], it dropped this subscriber as too slow), and the pull **re-homes**: it
//! looks for another upstream every [`REHOME_RETRY`] for up to `rehome_window`, keeping
//! the relay (and every viewer's connection) alive meanwhile. A publisher that comes back
//! to this node itself ends the search at once (the local takeover).
//!
//! A pull that never had an upstream does not wait: a first attempt that finds nobody to
//! ask ends the pull (the hub's play-wait already waited for an announce).
//!
//! The driver (`pull.rs`) and the cluster simulation (`tests/simulation.rs`) both run this
//! type.

use std::time::{Duration, Instant};

use super::wire::code;

/// How often a pull that lost its upstream looks for another.
pub const REHOME_RETRY: Duration = Duration::from_millis(100);

/// Why one upstream subscription of a pull ended (as far as re-homing cares).
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum UpstreamEnd {
    /// The publisher ended the stream: the pull ends.
    Ended(String),
    /// The upstream went away with the stream still live (maybe elsewhere): re-home.
    Lost(String),
}

impl UpstreamEnd {
    /// The end an upstream's SubscribeDone (`code`, `reason`) means.
    pub fn of(code: u16, reason: String) -> UpstreamEnd {
        if code == code::ENDED {
            UpstreamEnd::Ended(reason)
        } else {
            UpstreamEnd::Lost(reason)
        }
    }
}

/// What to do after an attempt found no upstream to subscribe to.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum NoUpstream {
    /// Look again at this time.
    RetryAt(Instant),
    /// The pull never had an upstream: end it now.
    NeverPulled,
    /// The re-homing window is over (the upstream was lost this long ago): end the pull.
    WindowOver(Duration),
}

/// One pull's re-homing state.
#[derive(Clone, Debug)]
pub struct Rehome {
    window: Duration,
    /// When the upstream was lost, while the pull looks for another.
    lost_since: Option<Instant>,
}

impl Rehome {
    pub fn new(window: Duration) -> Rehome {
        Rehome {
            window,
            lost_since: None,
        }
    }

    /// Whether the pull is looking for another upstream.
    pub fn is_lost(&self) -> bool {
        self.lost_since.is_some()
    }

    /// The upstream went away ([`UpstreamEnd::Lost`]): the search starts now.
    pub fn upstream_lost(&mut self, now: Instant) {
        self.lost_since = Some(now);
    }

    /// An attempt found no upstream (nobody to ask, or the one asked refused).
    pub fn no_upstream(&self, now: Instant) -> NoUpstream {
        let Some(since) = self.lost_since else {
            return NoUpstream::NeverPulled;
        };
        let lost_for = now.saturating_duration_since(since);
        if lost_for >= self.window {
            NoUpstream::WindowOver(lost_for)
        } else {
            NoUpstream::RetryAt(now + REHOME_RETRY)
        }
    }

    /// A subscription was accepted. `Some(how long the pull had no upstream)` when that was
    /// a re-home (count it), `None` for the pull's first upstream.
    pub fn subscribed(&mut self, now: Instant) -> Option<Duration> {
        self.lost_since
            .take()
            .map(|since| now.saturating_duration_since(since))
    }

    /// The publisher came back to this node and feeds the relay from now on: how long the
    /// pull had no upstream (zero if it had one).
    pub fn taken_over_locally(&mut self, now: Instant) -> Duration {
        self.subscribed(now).unwrap_or_default()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const WINDOW: Duration = Duration::from_secs(5);

    fn ms(t: Instant, n: u64) -> Instant {
        t + Duration::from_millis(n)
    }

    #[test]
    fn only_the_end_of_the_stream_ends_a_pull() {
        let end = |c| UpstreamEnd::of(c, "why".into());
        assert_eq!(end(code::ENDED), UpstreamEnd::Ended("why".into()));
        for c in [
            code::MOVED,
            code::TOO_SLOW,
            code::NOT_FOUND,
            code::TIMEOUT,
            0,
        ] {
            assert_eq!(end(c), UpstreamEnd::Lost("why".into()), "code {c}");
        }
    }

    #[test]
    fn a_pull_that_never_had_an_upstream_does_not_wait() {
        let r = Rehome::new(WINDOW);
        assert!(!r.is_lost());
        assert_eq!(r.no_upstream(Instant::now()), NoUpstream::NeverPulled);
    }

    #[test]
    fn a_lost_pull_retries_until_the_window_closes() {
        let t = Instant::now();
        let mut r = Rehome::new(WINDOW);
        r.upstream_lost(t);
        assert!(r.is_lost());
        assert_eq!(r.no_upstream(t), NoUpstream::RetryAt(ms(t, 100)));
        assert_eq!(r.no_upstream(ms(t, 4999)), NoUpstream::RetryAt(ms(t, 5099)));
        assert_eq!(r.no_upstream(ms(t, 5000)), NoUpstream::WindowOver(WINDOW));
    }

    #[test]
    fn a_rehome_reports_the_gap_and_a_later_loss_starts_a_new_window() {
        let t = Instant::now();
        let mut r = Rehome::new(WINDOW);
        assert_eq!(r.subscribed(t), None, "the first upstream is no re-home");
        r.upstream_lost(ms(t, 1000));
        assert_eq!(r.subscribed(ms(t, 1300)), Some(Duration::from_millis(300)));
        assert!(!r.is_lost());
        // Lost again much later: a full window again.
        r.upstream_lost(ms(t, 60_000));
        assert_eq!(
            r.no_upstream(ms(t, 64_000)),
            NoUpstream::RetryAt(ms(t, 64_100))
        );
    }

    #[test]
    fn a_local_takeover_ends_the_search() {
        let t = Instant::now();
        let mut r = Rehome::new(WINDOW);
        assert_eq!(r.taken_over_locally(t), Duration::ZERO);
        r.upstream_lost(t);
        assert_eq!(
            r.taken_over_locally(ms(t, 1200)),
            Duration::from_millis(1200)
        );
        assert!(!r.is_lost());
    }
}
