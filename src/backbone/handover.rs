//! Return to the preferred origin, make-before-break (sans-IO, explicit `now`).
//!
//! An edge that re-homed to a less preferred origin moves back once a more preferred one
//! has been linked for `return_after` ([`super::select::PullSelection::preferred_over`]
//! finds it). The move never leaves a gap for viewers:
//!
//! 1. Every [`RETURN_CHECK`] the driver asks [`Handover::may_try`]; with a preferred
//!    upstream at hand it subscribes there too ([`Handover::trying`]).
//! 2. The answer ([`Handover::answered`]): the same publish (timeline) as the current
//!    feed makes the new feed a **candidate**, read alongside the current one; another
//!    publish, or a refusal, backs off for `return_after`.
//! 3. The candidate's items go to [`Handover::offer`]. Its latest audio and its
//!    configuration are held; once one of its frames provably continues what was sent
//!    ([`Splicer::touches`]) the move happens: the driver drops the old subscription and
//!    replays the held items and everything from the touching frame on.
//! 4. A candidate whose feed ends before it touches backs off ([`Handover::candidate_ended`]).

use std::collections::VecDeque;
use std::time::{Duration, Instant};

use super::group::GroupSequencer;
use super::wire::MediaItem;
use crate::media::splice::Splicer;
use crate::media::TrackKind;

/// How often an edge on a less preferred origin looks for a better one.
pub const RETURN_CHECK: Duration = Duration::from_millis(250);
/// Candidate audio frames kept for the move (newer ones than sent are replayed).
pub const HELD_AUDIO: usize = 64;

/// One pull's return to its preferred upstream.
#[derive(Debug)]
pub struct Handover {
    return_after: Duration,
    /// A group of a feed that makes no progress this long is abandoned.
    stall: Duration,
    state: State,
}

#[derive(Debug)]
enum State {
    /// No attempt under way; none before `not_before` (after one that failed).
    Idle { not_before: Option<Instant> },
    /// A subscribe to the preferred upstream is out.
    Subscribing,
    /// The preferred upstream's feed, read alongside the current one until it touches.
    Candidate(Candidate),
}

#[derive(Debug)]
struct Candidate {
    seq: GroupSequencer,
    /// Its latest audio frames, and its configuration.
    held: VecDeque<MediaItem>,
    /// From the touching frame on, everything is kept.
    from_touch: Vec<MediaItem>,
}

/// The move to the candidate: its sequencer (with its groups in flight) and the items to
/// push to the relay now.
#[derive(Debug)]
pub struct Move {
    pub seq: GroupSequencer,
    pub replay: Vec<MediaItem>,
}

impl Handover {
    pub fn new(return_after: Duration, stall: Duration) -> Handover {
        Handover {
            return_after,
            stall,
            state: State::Idle { not_before: None },
        }
    }

    /// Whether a new attempt may start now (none under way, no back-off running).
    pub fn may_try(&self, now: Instant) -> bool {
        matches!(self.state, State::Idle { not_before } if not_before.is_none_or(|t| now >= t))
    }

    /// The driver subscribed to the preferred upstream.
    pub fn trying(&mut self) {
        self.state = State::Subscribing;
    }

    /// The preferred upstream answered: `Some(timeline)` it serves, or `None` (refused, no
    /// answer, link gone). `current` is the timeline the relay is fed from. `true`: read
    /// the new feed as the candidate; `false`: drop it (unsubscribe if it was accepted).
    pub fn answered(&mut self, now: Instant, timeline: Option<u64>, current: Option<u64>) -> bool {
        if !matches!(self.state, State::Subscribing) {
            return false;
        }
        match timeline {
            Some(s) if Some(s) == current => {
                self.state = State::Candidate(Candidate {
                    seq: GroupSequencer::new(self.stall),
                    held: VecDeque::new(),
                    from_touch: Vec::new(),
                });
                true
            }
            // Another publish there: not the same stream to splice into; or no answer.
            _ => {
                self.back_off(now);
                false
            }
        }
    }

    /// Whether a candidate feed is being read.
    pub fn has_candidate(&self) -> bool {
        matches!(self.state, State::Candidate(_))
    }

    /// The candidate's group sequencer, to put its feed's items in order.
    pub fn candidate_groups(&mut self) -> Option<&mut GroupSequencer> {
        match &mut self.state {
            State::Candidate(c) => Some(&mut c.seq),
            _ => None,
        }
    }

    /// When the candidate's sequencer next wants [`GroupSequencer::handle_timeout`].
    pub fn poll_timeout(&self) -> Option<Instant> {
        match &self.state {
            State::Candidate(c) => c.seq.poll_timeout(),
            _ => None,
        }
    }

    /// The candidate's feed ended before it touched: try again after `return_after`.
    pub fn candidate_ended(&mut self, now: Instant) {
        self.back_off(now);
    }

    /// Takes the candidate's ordered items. `Some` once the candidate touches what was
    /// sent: move over now.
    pub fn offer(&mut self, items: Vec<MediaItem>, splice: &Splicer) -> Option<Move> {
        let State::Candidate(c) = &mut self.state else {
            return None;
        };
        for item in items {
            if !c.from_touch.is_empty() {
                c.from_touch.push(item);
                continue;
            }
            match &item {
                MediaItem::Frame(f) if splice.touches(f) => c.from_touch.push(item),
                MediaItem::Frame(f) if f.track() == TrackKind::Audio => {
                    if c.held.len() == HELD_AUDIO {
                        c.held.pop_front();
                    }
                    c.held.push_back(item);
                }
                MediaItem::Config(_) | MediaItem::Publishes(_) => c.held.push_back(item),
                MediaItem::Frame(_) => {}
            }
        }
        if c.from_touch.is_empty() {
            return None;
        }
        let State::Candidate(mut c) =
            std::mem::replace(&mut self.state, State::Idle { not_before: None })
        else {
            unreachable!("matched a candidate above")
        };
        let mut replay: Vec<MediaItem> = c.held.drain(..).collect();
        replay.append(&mut c.from_touch);
        Some(Move { seq: c.seq, replay })
    }

    fn back_off(&mut self, now: Instant) {
        self.state = State::Idle {
            not_before: Some(now + self.return_after),
        };
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::media::{Codec, Frame, StreamConfig, Timebase};

    const AFTER: Duration = Duration::from_secs(3);
    const STALL: Duration = Duration::from_millis(500);

    fn frame(codec: Codec, dts: i64, keyframe: bool) -> MediaItem {
        MediaItem::Frame(Frame {
            codec,
            dts,
            pts: dts,
            timebase: Timebase(1000),
            keyframe,
            payload: bytes::Bytes::from_static(b"x"),
        })
    }

    /// A splicer that has sent video up to dts 100 and audio up to 90 of timeline 7.
    fn sent() -> Splicer {
        let mut s = Splicer::new();
        s.begin(7, true);
        for item in [
            frame(Codec::H264, 0, true),
            frame(Codec::Aac, 0, false),
            frame(Codec::H264, 33, false),
            frame(Codec::H264, 66, false),
            frame(Codec::Aac, 90, false),
            frame(Codec::H264, 100, false),
        ] {
            let MediaItem::Frame(f) = item else {
                unreachable!()
            };
            s.frame(f);
        }
        s
    }

    fn candidate(now: Instant) -> Handover {
        let mut h = Handover::new(AFTER, STALL);
        assert!(h.may_try(now));
        h.trying();
        assert!(h.answered(now, Some(7), Some(7)));
        h
    }

    #[test]
    fn one_attempt_at_a_time_and_a_failed_one_backs_off() {
        let t = Instant::now();
        let mut h = Handover::new(AFTER, STALL);
        h.trying();
        assert!(!h.may_try(t), "a subscribe is out");
        assert!(!h.answered(t, None, Some(7)), "refused");
        assert!(!h.may_try(t + AFTER - Duration::from_millis(1)));
        assert!(h.may_try(t + AFTER));
    }

    #[test]
    fn another_publish_on_the_preferred_origin_is_not_spliced_into() {
        let t = Instant::now();
        let mut h = Handover::new(AFTER, STALL);
        h.trying();
        assert!(!h.answered(t, Some(8), Some(7)));
        assert!(!h.has_candidate());
        assert!(!h.may_try(t));
        // A late answer with nothing asked is dropped too.
        assert!(!h.answered(t, Some(7), Some(7)));
    }

    #[test]
    fn the_candidate_moves_over_once_it_touches_and_replays_from_there() {
        let t = Instant::now();
        let mut h = candidate(t);
        assert!(h.has_candidate());
        assert!(h.candidate_groups().is_some());
        let splice = sent();
        // Older video than what was sent and not one of its frames: no touch yet.
        let config = MediaItem::Config(StreamConfig::default());
        let items = vec![
            config.clone(),
            frame(Codec::Aac, 80, false),
            frame(Codec::H264, 50, false),
        ];
        assert!(h.offer(items, &splice).is_none());
        // Frame 66 was sent: the candidate touches there.
        let items = vec![
            frame(Codec::H264, 66, false),
            frame(Codec::Aac, 95, false),
            frame(Codec::H264, 100, false),
        ];
        let m = h.offer(items, &splice).expect("touches");
        assert_eq!(
            m.replay.len(),
            5,
            "config + held audio + three from the touch"
        );
        assert_eq!(m.replay[0], config);
        assert_eq!(m.replay[2], frame(Codec::H264, 66, false));
        assert!(!h.has_candidate());
        assert!(h.may_try(t), "no back-off after a move");
    }

    #[test]
    fn held_audio_is_bounded_while_the_candidate_does_not_touch() {
        let t = Instant::now();
        let mut h = candidate(t);
        let splice = sent();
        let audio: Vec<MediaItem> = (0..200).map(|i| frame(Codec::Aac, i, false)).collect();
        assert!(h.offer(audio, &splice).is_none());
        let m = h
            .offer(vec![frame(Codec::H264, 500, true)], &splice)
            .expect("a newer keyframe touches");
        assert_eq!(m.replay.len(), HELD_AUDIO + 1);
        assert_eq!(
            m.replay[0],
            frame(Codec::Aac, 200 - HELD_AUDIO as i64, false)
        );
    }

    #[test]
    fn a_candidate_that_ends_before_touching_backs_off() {
        let t = Instant::now();
        let mut h = candidate(t);
        h.candidate_ended(t);
        assert!(!h.has_candidate());
        assert_eq!(h.poll_timeout(), None);
        assert!(!h.may_try(t + Duration::from_secs(1)));
        assert!(h.may_try(t + AFTER));
    }
}
