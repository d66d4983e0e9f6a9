//! Whether a peer is alive, from the count of datagrams its connection received (sans-IO).
//!
//! QUIC keep-alives ([`super::tls::KEEP_ALIVE`]) make a live peer answer several times per
//! link timeout even when no media flows, so silence means the peer or the path is gone:
//! a dead origin is noticed within the link timeout, not the QUIC idle timeout.

use std::time::{Duration, Instant};

/// Watches that datagrams keep arriving on a link ([`Silence::observe`]).
#[derive(Clone, Debug)]
pub struct Silence {
    datagrams: u64,
    since: Instant,
    timeout: Duration,
}

impl Silence {
    /// Starts watching a link that has received `datagrams` so far.
    pub fn new(datagrams: u64, now: Instant, timeout: Duration) -> Silence {
        Silence {
            datagrams,
            since: now,
            timeout,
        }
    }

    /// How long the link has been silent, once that reaches the timeout.
    pub fn observe(&mut self, datagrams: u64, now: Instant) -> Option<Duration> {
        if datagrams != self.datagrams {
            self.datagrams = datagrams;
            self.since = now;
            return None;
        }
        let silent = now.saturating_duration_since(self.since);
        (silent >= self.timeout).then_some(silent)
    }
}

/// Waits, up to a timeout, for a link to receive anything new: proof its peer is alive.
#[derive(Clone, Debug)]
pub struct AnswerWait {
    heard: u64,
    deadline: Instant,
}

/// What [`AnswerWait::observe`] concluded.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Answer {
    Alive,
    /// Nothing arrived in time, or the link closed.
    Gone,
    Waiting,
}

impl AnswerWait {
    pub fn new(heard: u64, now: Instant, timeout: Duration) -> AnswerWait {
        AnswerWait {
            heard,
            deadline: now + timeout,
        }
    }

    pub fn observe(&self, datagrams: u64, closed: bool, now: Instant) -> Answer {
        if closed || now >= self.deadline {
            Answer::Gone
        } else if datagrams > self.heard {
            Answer::Alive
        } else {
            Answer::Waiting
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn silence_is_measured_from_the_last_datagram() {
        let t0 = Instant::now();
        let ms = |n| t0 + Duration::from_millis(n);
        let mut s = Silence::new(10, t0, Duration::from_millis(700));
        assert_eq!(s.observe(10, ms(500)), None);
        // A keep-alive answer arrives: the clock restarts.
        assert_eq!(s.observe(11, ms(600)), None);
        assert_eq!(s.observe(11, ms(1250)), None);
        assert_eq!(s.observe(11, ms(1300)), Some(Duration::from_millis(700)));
    }

    #[test]
    fn a_peer_is_alive_once_anything_new_arrives_before_the_deadline() {
        let t0 = Instant::now();
        let ms = |n| t0 + Duration::from_millis(n);
        let w = AnswerWait::new(5, t0, Duration::from_millis(700));
        assert_eq!(w.observe(5, false, ms(100)), Answer::Waiting);
        assert_eq!(w.observe(6, false, ms(200)), Answer::Alive);
        assert_eq!(w.observe(5, false, ms(700)), Answer::Gone);
        assert_eq!(w.observe(9, true, ms(100)), Answer::Gone, "closed");
    }
}
