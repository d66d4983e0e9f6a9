//! Output timestamps for sinks, sans-IO: they start near zero and stay monotonic across
//! publisher reconnects, with one offset per subscription applied to audio and video alike,
//! so their relation (A/V sync) is exactly the input's.

use crate::media::TrackKind;

/// Gap inserted between the last frame before a publisher reconnect and the first after.
const RECONNECT_GAP_MS: i64 = 40;

/// Output timestamps: zero-based, monotonic per track, continuous across new subscriptions.
#[derive(Default)]
pub struct Retimer {
    offset: Option<i64>,
    last_out: Option<i64>,
    last_track: [Option<i64>; 2],
}

impl Retimer {
    /// The next frame starts a new input timeline (a new subscription).
    pub fn new_session(&mut self) {
        self.offset = None;
    }

    /// Output (dts, pts) in ms, or `None` for a frame that would go backwards on its track.
    pub fn map(&mut self, dts_ms: i64, pts_ms: i64, track: TrackKind) -> Option<(i64, i64)> {
        let last_out = self.last_out;
        let offset = *self.offset.get_or_insert_with(|| match last_out {
            Some(l) => l + RECONNECT_GAP_MS - dts_ms,
            None => -dts_ms,
        });
        let out = dts_ms + offset;
        let t = match track {
            TrackKind::Video => 0,
            TrackKind::Audio => 1,
        };
        if out < 0 || self.last_track[t].is_some_and(|l| out < l) {
            return None;
        }
        self.last_track[t] = Some(out);
        self.last_out = Some(self.last_out.map_or(out, |l| l.max(out)));
        Some((out, pts_ms + offset))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn retimer_keeps_av_relation_across_sessions() {
        let mut r = Retimer::default();
        // First publish starts at 5000 ms (a mid-stream join): output starts at 0.
        assert_eq!(r.map(5000, 5066, TrackKind::Video), Some((0, 66)));
        assert_eq!(r.map(5010, 5010, TrackKind::Audio), Some((10, 10)));
        assert_eq!(r.map(5033, 5100, TrackKind::Video), Some((33, 100)));
        // Publisher reconnects; its clock restarts at 0.
        r.new_session();
        assert_eq!(
            r.map(0, 0, TrackKind::Video),
            Some((33 + RECONNECT_GAP_MS, 33 + RECONNECT_GAP_MS))
        );
        // Audio 20 ms after video in the input stays 20 ms after in the output.
        let (a, _) = r.map(20, 20, TrackKind::Audio).unwrap();
        assert_eq!(a, 33 + RECONNECT_GAP_MS + 20);
        // A frame that would go backwards on its track is dropped.
        assert_eq!(r.map(-100, -100, TrackKind::Audio), None);
    }
}
