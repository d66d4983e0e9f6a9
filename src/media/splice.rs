//! Joins the timelines of successive upstreams into one for a relay's consumers.
//!
//! A relay that loses its upstream (an origin dies) subscribes again elsewhere while its
//! viewers stay connected. What the new upstream sends must continue what they already
//! have: no frame twice, no jump back in time, and a decodable picture.
//!
//! * **Same timeline** (the new upstream serves the same publish): timestamps are kept.
//!   The new upstream starts with its cached group, which usually begins before the last
//!   frame sent, so frames at or before it are dropped per track. Video resumes at the
//!   frame after the last one sent if that frame came through (proof the two runs touch),
//!   else at the next keyframe.
//! * **New timeline** (the publisher itself reconnected): video resumes at a keyframe and
//!   every track is shifted so the new timeline starts one frame interval after the last
//!   frame sent; audio before that keyframe is dropped so both tracks keep one offset (A/V
//!   sync as the publisher sent it).
//!
//! Sans-IO: frames in, frames (or nothing) out.

use super::{Frame, Timebase, TrackKind};

const NANOS: Timebase = Timebase(1_000_000_000);
/// Gap left between the old and a new timeline: one frame at 30 fps.
const SESSION_GAP_NS: i64 = 33_333_333;

#[derive(Debug, Default)]
pub struct Splicer {
    /// The timeline of the current upstream's input.
    input: Option<u64>,
    /// Added to input timestamps, in ns.
    offset_ns: i64,
    /// The last output dts per track (video, audio), in ns.
    last: [Option<i64>; 2],
    /// Whether this stream has video (only video needs a decodable resume point).
    has_video: bool,
    /// After a new upstream: video waits for a keyframe or a proven-contiguous frame.
    rejoining: Option<Rejoin>,
    /// The last output dts (ns) of the primary track (video, else audio), newest last, for
    /// proving that a second upstream's feed touches what was sent ([`Self::touches`]).
    recent: std::collections::VecDeque<i64>,
}

/// Primary-track frames remembered for [`Splicer::touches`]: a few seconds.
const RECENT: usize = 256;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Rejoin {
    /// Same timeline: `true` once the last video frame sent was seen again.
    Same { touching: bool },
    /// New timeline: the offset is fixed at its first video keyframe.
    New,
}

/// What [`Splicer::begin`] found.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Join {
    First,
    SameTimeline,
    NewTimeline,
}

impl Splicer {
    pub fn new() -> Splicer {
        Splicer::default()
    }

    /// A splicer whose output continues a timeline that last output `last` (ns; video,
    /// audio) from input timeline `timeline`: the next [`Self::begin`] of another timeline
    /// is a new one (a publisher coming back to a stream held for it).
    pub fn continuing(timeline: u64, last: [Option<i64>; 2]) -> Splicer {
        Splicer {
            input: Some(timeline),
            last,
            ..Splicer::default()
        }
    }

    /// A frame's dts in the unit [`Self::continuing`] takes (ns), and its track's index.
    pub fn position(f: &Frame) -> (usize, i64) {
        let t = match f.track() {
            TrackKind::Video => 0,
            TrackKind::Audio => 1,
        };
        (t, f.timebase.rescale(f.dts, NANOS))
    }

    /// A new upstream starts serving timeline `timeline`.
    pub fn begin(&mut self, timeline: u64, has_video: bool) -> Join {
        self.has_video = has_video;
        let join = match self.input {
            None => Join::First,
            Some(s) if s == timeline => Join::SameTimeline,
            Some(_) => Join::NewTimeline,
        };
        self.input = Some(timeline);
        self.rejoining = match join {
            Join::First => None,
            Join::SameTimeline => Some(Rejoin::Same { touching: false }),
            Join::NewTimeline => Some(Rejoin::New),
        };
        join
    }

    /// The timeline the output is on, for consumers that may later join another upstream
    /// (a relay's `SubscribeOk.timeline`): the input's timeline while timestamps pass
    /// unchanged; once they are shifted, another timeline, named by the input's and the
    /// shift (two relays that shift one input alike serve the same timestamps).
    pub fn timeline(&self) -> Option<u64> {
        let input = self.input?;
        Some(input.wrapping_add(self.offset_ns as u64))
    }

    /// The timeline of the current upstream's input.
    pub fn input_timeline(&self) -> Option<u64> {
        self.input
    }

    /// For make-before-break (a second upstream of the same timeline fed in parallel):
    /// whether the second feed, from frame `f` on, continues what was output without a
    /// gap: `f` is a primary-track frame already output (so every later frame of that feed
    /// follows it), or a keyframe newer than anything output.
    pub fn touches(&self, f: &Frame) -> bool {
        if self.rejoining.is_some() || f.track() != self.primary() {
            return false;
        }
        let shift = NANOS.rescale(self.offset_ns, f.timebase);
        let out = f.timebase.rescale(f.dts.saturating_add(shift), NANOS);
        let newer = self.last[self.index(f.track())].is_none_or(|l| out > l);
        (newer && (f.keyframe || !self.has_video)) || self.recent.contains(&out)
    }

    /// Moves to the second upstream [`Self::touches`] accepted: its frames already output
    /// are dropped, the rest pass.
    pub fn switch(&mut self) {
        self.rejoining = Some(Rejoin::Same { touching: true });
    }

    fn primary(&self) -> TrackKind {
        if self.has_video {
            TrackKind::Video
        } else {
            TrackKind::Audio
        }
    }

    fn index(&self, track: TrackKind) -> usize {
        match track {
            TrackKind::Video => 0,
            TrackKind::Audio => 1,
        }
    }

    /// Whether video is held back until a keyframe comes (worth asking upstream for one).
    pub fn waiting_for_keyframe(&self) -> bool {
        self.has_video && self.rejoining.is_some()
    }

    /// The frame to pass on, retimed, or `None` to drop it.
    pub fn frame(&mut self, mut f: Frame) -> Option<Frame> {
        let t = self.index(f.track());
        let video = t == 0;
        if let Some(Rejoin::New) = self.rejoining {
            let starts = if self.has_video {
                video && f.keyframe
            } else {
                true
            };
            if !starts {
                return None;
            }
            let newest = self.last.iter().flatten().max().copied();
            let dts_ns = f.timebase.rescale(f.dts, NANOS);
            // Timestamps come from peers: saturate rather than overflow on absurd ones.
            self.offset_ns = newest.map_or(0, |n| {
                n.saturating_add(SESSION_GAP_NS).saturating_sub(dts_ns)
            });
            self.rejoining = None;
        }
        let shift = NANOS.rescale(self.offset_ns, f.timebase);
        f.dts = f.dts.saturating_add(shift);
        f.pts = f.pts.saturating_add(shift);
        let out = f.timebase.rescale(f.dts, NANOS);
        if let Some(Rejoin::Same { touching }) = &mut self.rejoining {
            if video || !self.has_video {
                match self.last[t] {
                    Some(last) if out < last => return None,
                    Some(last) if out == last => {
                        *touching = true;
                        return None;
                    }
                    _ if *touching || f.keyframe => self.rejoining = None,
                    _ => return None,
                }
            }
        }
        if self.last[t].is_some_and(|last| out <= last) {
            return None;
        }
        self.last[t] = Some(out);
        if f.track() == self.primary() {
            if self.recent.len() == RECENT {
                self.recent.pop_front();
            }
            self.recent.push_back(out);
        }
        Some(f)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::media::Codec;
    use bytes::Bytes;

    fn v(ms: i64, key: bool) -> Frame {
        Frame {
            codec: Codec::H264,
            dts: ms * 90,
            pts: ms * 90,
            timebase: Timebase(90_000),
            keyframe: key,
            payload: Bytes::new(),
        }
    }

    fn a(ms: i64) -> Frame {
        Frame {
            codec: Codec::Aac,
            dts: ms * 48,
            pts: ms * 48,
            timebase: Timebase(48_000),
            keyframe: true,
            payload: Bytes::new(),
        }
    }

    fn ms(f: &Frame) -> i64 {
        f.dts_ms()
    }

    /// Runs frames through and returns what came out, as (kind, ms).
    fn run(s: &mut Splicer, frames: Vec<Frame>) -> Vec<(char, i64)> {
        frames
            .into_iter()
            .filter_map(|f| s.frame(f))
            .map(|f| {
                let k = match f.track() {
                    TrackKind::Video if f.keyframe => 'K',
                    TrackKind::Video => 'v',
                    TrackKind::Audio => 'a',
                };
                (k, ms(&f))
            })
            .collect()
    }

    #[test]
    fn a_second_feed_takes_over_where_it_touches_what_was_sent() {
        let mut s = Splicer::new();
        s.begin(1, true);
        run(
            &mut s,
            vec![v(0, true), a(5), v(33, false), a(26), v(66, false)],
        );
        // The second upstream's frames: sent ones touch; a newer delta frame proves nothing;
        // a newer keyframe can start anywhere.
        assert!(s.touches(&v(0, true)));
        assert!(s.touches(&v(33, false)));
        assert!(!s.touches(&v(100, false)));
        assert!(s.touches(&v(133, true)));
        assert!(!s.touches(&a(26)), "audio does not prove video continuity");
        // It touched at 33: from there on its frames are taken, without repeats.
        s.switch();
        let out = run(&mut s, vec![v(66, false), a(47), v(100, false), a(68)]);
        assert_eq!(out, vec![('a', 47), ('v', 100), ('a', 68)]);
        assert_eq!(s.timeline(), Some(1), "same timeline, no shift");
    }

    #[test]
    fn an_audio_only_second_feed_touches_on_audio() {
        let mut s = Splicer::new();
        s.begin(1, false);
        run(&mut s, vec![a(0), a(21), a(42)]);
        assert!(s.touches(&a(21)));
        assert!(s.touches(&a(64)), "every audio frame starts cleanly");
        s.switch();
        assert_eq!(run(&mut s, vec![a(21), a(42), a(64)]), vec![('a', 64)]);
    }

    #[test]
    fn first_upstream_passes_everything_unchanged() {
        let mut s = Splicer::new();
        assert_eq!(s.timeline(), None);
        assert_eq!(s.begin(1, true), Join::First);
        assert_eq!(s.timeline(), Some(1));
        let out = run(&mut s, vec![v(0, true), a(10), v(33, false), a(31)]);
        assert_eq!(out, vec![('K', 0), ('a', 10), ('v', 33), ('a', 31)]);
    }

    #[test]
    fn same_timeline_drops_what_was_sent_and_resumes_after_it() {
        let mut s = Splicer::new();
        s.begin(1, true);
        run(
            &mut s,
            vec![v(0, true), a(5), v(33, false), a(26), v(66, false)],
        );
        // The new upstream replays its group from the keyframe, then goes on.
        assert_eq!(s.begin(1, true), Join::SameTimeline);
        assert!(s.waiting_for_keyframe());
        let out = run(
            &mut s,
            vec![
                v(0, true),
                a(5),
                v(33, false),
                a(26),
                v(66, false),
                a(47),
                v(100, false),
            ],
        );
        assert_eq!(out, vec![('a', 47), ('v', 100)]);
        assert!(!s.waiting_for_keyframe());
    }

    #[test]
    fn same_timeline_with_a_hole_waits_for_the_next_keyframe() {
        let mut s = Splicer::new();
        s.begin(1, true);
        run(&mut s, vec![v(0, true), v(33, false)]);
        s.begin(1, true);
        // The new upstream's group starts later: 66 is missing, so 100 cannot decode.
        let out = run(
            &mut s,
            vec![
                v(100, false),
                a(110),
                v(133, false),
                v(166, true),
                v(200, false),
            ],
        );
        assert_eq!(out, vec![('a', 110), ('K', 166), ('v', 200)]);
    }

    #[test]
    fn new_timeline_continues_time_from_a_keyframe_with_both_tracks_shifted_alike() {
        let mut s = Splicer::new();
        s.begin(1, true);
        run(&mut s, vec![v(5000, true), a(5010), v(5033, false)]);
        assert_eq!(s.begin(2, true), Join::NewTimeline);
        // The reconnected publisher starts near zero; audio before its keyframe is dropped.
        let out = run(
            &mut s,
            vec![a(0), v(40, false), v(80, true), a(90), v(113, false)],
        );
        // Offset: 5033 + 33.3 - 80 → the keyframe lands at 5066.
        assert_eq!(out, vec![('K', 5066), ('a', 5076), ('v', 5099)]);
        // Shifted timestamps are a timeline of their own.
        assert_ne!(s.timeline(), Some(2));
    }

    #[test]
    fn audio_only_streams_rejoin_on_any_frame() {
        let mut s = Splicer::new();
        s.begin(1, false);
        run(&mut s, vec![a(0), a(21), a(42)]);
        s.begin(1, false);
        assert_eq!(run(&mut s, vec![a(21), a(42), a(64)]), vec![('a', 64)]);
        s.begin(7, false);
        assert_eq!(run(&mut s, vec![a(0), a(21)]), vec![('a', 97), ('a', 118)]);
    }

    #[test]
    fn output_never_goes_back_on_a_track() {
        let mut s = Splicer::new();
        s.begin(1, true);
        let out = run(
            &mut s,
            vec![v(0, true), v(33, false), v(20, false), a(10), a(5)],
        );
        assert_eq!(out, vec![('K', 0), ('v', 33), ('a', 10)]);
    }
}
