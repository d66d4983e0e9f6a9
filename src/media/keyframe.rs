//! Merging and rate-limiting keyframe requests at one hop (sans-IO, explicit `now`).
//!
//! Every hop (a WHIP publisher's peer, a backbone pull) owns one gate. However many viewers
//! or downstream nodes ask at once, at most one request per `interval` goes upstream; a
//! request that arrives too soon is remembered and sent when the interval has passed, so
//! none is lost and none is duplicated.

use std::time::{Duration, Instant};

/// The default spacing of keyframe requests sent upstream.
pub const KEYFRAME_REQUEST_INTERVAL: Duration = Duration::from_millis(500);

#[derive(Debug)]
pub struct KeyframeRequestGate {
    interval: Duration,
    last_sent: Option<Instant>,
    pending: bool,
}

impl KeyframeRequestGate {
    pub fn new(interval: Duration) -> Self {
        KeyframeRequestGate {
            interval,
            last_sent: None,
            pending: false,
        }
    }

    /// A keyframe was asked for; returns whether to send a request upstream now.
    pub fn request(&mut self, now: Instant) -> bool {
        self.pending = true;
        self.poll(now)
    }

    /// Sends a remembered request once the interval allows; returns whether to send now.
    pub fn poll(&mut self, now: Instant) -> bool {
        let allowed = self
            .last_sent
            .is_none_or(|t| now.duration_since(t) >= self.interval);
        if self.pending && allowed {
            self.pending = false;
            self.last_sent = Some(now);
            return true;
        }
        false
    }

    /// When [`poll`](Self::poll) can next send a remembered request.
    pub fn poll_timeout(&self) -> Option<Instant> {
        match (self.pending, self.last_sent) {
            (true, Some(t)) => Some(t + self.interval),
            _ => None,
        }
    }

    /// A keyframe arrived: requests waiting for one are satisfied.
    pub fn keyframe_seen(&mut self) {
        self.pending = false;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_burst_of_requests_sends_one_now_and_one_after_the_interval() {
        let t = Instant::now();
        let mut g = KeyframeRequestGate::new(Duration::from_millis(500));
        assert!(g.request(t), "first goes out at once");
        // 100 viewers (or edges) join within 10 ms.
        let sent = (1..=100)
            .filter(|i| g.request(t + Duration::from_micros(100 * i)))
            .count();
        assert_eq!(sent, 0, "merged");
        assert_eq!(g.poll_timeout(), Some(t + Duration::from_millis(500)));
        assert!(!g.poll(t + Duration::from_millis(499)));
        assert!(
            g.poll(t + Duration::from_millis(500)),
            "the merged request follows"
        );
        assert!(!g.poll(t + Duration::from_millis(2000)), "and only one");
        assert_eq!(g.poll_timeout(), None);
    }

    #[test]
    fn a_keyframe_satisfies_a_waiting_request() {
        let t = Instant::now();
        let mut g = KeyframeRequestGate::new(Duration::from_millis(500));
        assert!(g.request(t));
        assert!(!g.request(t + Duration::from_millis(10)));
        g.keyframe_seen();
        assert!(!g.poll(t + Duration::from_millis(600)));
    }

    #[test]
    fn spaced_requests_each_go_out() {
        let t = Instant::now();
        let mut g = KeyframeRequestGate::new(Duration::from_millis(500));
        for i in 0..5 {
            assert!(g.request(t + Duration::from_millis(600 * i)));
        }
    }
}
