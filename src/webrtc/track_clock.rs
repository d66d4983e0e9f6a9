//! Where a publisher's RTP timestamps fall on its session's timeline (sans-IO).
//!
//! Each track's clock starts at its first packet's arrival time on the shared timeline,
//! then follows the track's own RTP timestamps. Simulcast layers, each with its own random
//! RTP base, are put on one timeline by the publisher's RTCP sender reports
//! ([`TrackClock::shift_to`]).

use std::time::{Instant, SystemTime};

/// Maps one track's RTP timestamps onto the session timeline.
pub(super) struct TrackClock {
    rate: u32,
    /// The last RTP timestamp and the presentation time it was given.
    last: Option<(u32, i64)>,
}

impl TrackClock {
    pub(super) fn new(rate: u32) -> Self {
        TrackClock { rate, last: None }
    }

    /// The presentation time, in `rate` ticks since the session's first packet. The first
    /// packet is placed at its arrival time on the shared timeline.
    pub(super) fn pts(&mut self, rtp: u32, arrival: Instant, t0: Instant) -> i64 {
        let pts = self.project(rtp).unwrap_or_else(|| {
            let since = arrival.saturating_duration_since(t0);
            (since.as_secs_f64() * self.rate as f64) as i64
        });
        self.last = Some((rtp, pts));
        pts
    }

    pub(super) fn started(&self) -> bool {
        self.last.is_some()
    }

    /// The presentation time of the last packet, once started.
    pub(super) fn last_pts(&self) -> Option<i64> {
        self.last.map(|(_, pts)| pts)
    }

    /// Where this clock would place `rtp` (of the same RTP clock), once started.
    pub(super) fn project(&self, rtp: u32) -> Option<i64> {
        let (last, pts) = self.last?;
        Some(pts + rtp.wrapping_sub(last) as i32 as i64)
    }

    /// Moves the timeline by `ticks`.
    pub(super) fn shift(&mut self, ticks: i64) {
        if let Some((_, pts)) = &mut self.last {
            *pts += ticks;
        }
    }

    /// How far this layer's timeline must move to agree with `reference`'s, from one
    /// RTCP sender report of each (`(NTP time, RTP timestamp)`), in ticks.
    ///
    /// Each simulcast layer's clock starts where its first frame arrived, so the layers
    /// are offset by however late each first frame was read (a starved task: hundreds of
    /// ms). A viewer switching layers waits until the new layer's time passes the old
    /// one's, so a layer that runs behind blocks switching to it (seen under CPU load:
    /// 20 s on h with q wanted). A browser gives each layer its own random RTP base, but
    /// its sender reports tie all of them to one NTP clock.
    pub(super) fn shift_to(
        &self,
        sr: (SystemTime, u32),
        reference: &TrackClock,
        ref_sr: (SystemTime, u32),
    ) -> Option<i64> {
        let ntp_gap = match sr.0.duration_since(ref_sr.0) {
            Ok(d) => d.as_secs_f64(),
            Err(e) => -e.duration().as_secs_f64(),
        };
        // `last` expressed on the reference's RTP clock.
        let (last, _) = self.last?;
        let since_sr = last.wrapping_sub(sr.1) as i32 as i64;
        let gap = (ntp_gap * self.rate as f64).round() as i64;
        let on_reference = ref_sr.1.wrapping_add((gap + since_sr) as i32 as u32);
        Some(reference.project(on_reference)? - self.project(last)?)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    const MS: i64 = 90;

    /// A clock started `late_ms` after t0 at `rtp`, having run `frames` frames of 30 fps.
    fn clock(rtp: u32, late_ms: u64, frames: u32) -> TrackClock {
        let t0 = Instant::now();
        let mut c = TrackClock::new(90_000);
        c.pts(rtp, t0 + Duration::from_millis(late_ms), t0);
        for i in 1..=frames {
            c.pts(rtp.wrapping_add(i * 3_000), t0, t0);
        }
        c
    }

    #[test]
    fn sender_reports_put_a_late_read_layer_on_the_first_layers_timeline() {
        let ntp = SystemTime::UNIX_EPOCH + Duration::from_secs(1_700_000_000);
        // q's first frame was captured at NTP `ntp` with RTP 1000 and read at once (pts 0);
        // h's first frame, the same capture with its own RTP base 7_000_000, was read
        // 300 ms late, so its clock starts 300 ms ahead.
        let q = clock(1_000, 0, 30);
        let mut h = clock(7_000_000, 300, 30);
        assert_eq!(
            h.project(7_000_000 + 90_000).unwrap() - q.project(1_000 + 90_000).unwrap(),
            300 * MS
        );
        // Reports taken at different instants, each on its own RTP base.
        let q_sr = (ntp + Duration::from_millis(500), 1_000 + 45_000);
        let h_sr = (ntp + Duration::from_millis(800), 7_000_000 + 72_000);
        let shift = h.shift_to(h_sr, &q, q_sr).unwrap();
        assert_eq!(shift, -300 * MS);
        h.shift(shift);
        assert_eq!(h.project(7_000_000 + 90_000), q.project(1_000 + 90_000));
    }

    #[test]
    fn sender_report_alignment_works_across_the_rtp_wrap_and_in_either_order() {
        let ntp = SystemTime::UNIX_EPOCH + Duration::from_secs(1_700_000_000);
        let q = clock(u32::MAX - 20_000, 0, 30);
        let h = clock(5, 120, 30);
        let q_sr = (
            ntp + Duration::from_secs(1),
            (u32::MAX - 20_000).wrapping_add(90_000),
        );
        let h_sr = (ntp, 5);
        assert_eq!(h.shift_to(h_sr, &q, q_sr), Some(-120 * MS));
        assert_eq!(q.shift_to(q_sr, &h, h_sr), Some(120 * MS));
        assert_eq!(
            TrackClock::new(90_000).shift_to(h_sr, &q, q_sr),
            None,
            "not started"
        );
    }
}
