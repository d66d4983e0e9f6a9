//! Which of a WHIP publisher's video encodings carries the stream's own video (sans-IO,
//! explicit `now`).
//!
//! Without simulcast, the only encoding does, from its first packet. With simulcast, each
//! layer is its own stream, and the stream itself carries the largest layer (for RTMP, FLV
//! and egress, which take one video). That choice waits until every announced layer has a
//! configuration, or [`LAYER_WAIT`] after the first one has (a browser starts its top
//! layers only as its bandwidth estimate grows), and is made at a keyframe of the chosen
//! layer so that the stream's video starts cleanly. A larger layer that starts later takes
//! over at its first keyframe.

use std::time::{Duration, Instant};

/// How long the stream waits for a simulcast publisher's other layers before choosing its
/// largest one so far.
pub const LAYER_WAIT: Duration = Duration::from_millis(1500);

/// One encoding as the choice sees it.
#[derive(Clone, Copy, Debug)]
pub(super) struct EncodingInfo<'a> {
    /// The simulcast layer's id (None without simulcast).
    pub rid: Option<&'a str>,
    /// Its picture size in pixels, once it has a decoder configuration.
    pub pixels: Option<u64>,
}

#[derive(Debug, Default)]
pub(super) struct PrimaryChoice {
    /// Rids the publisher announced (`a=simulcast:send`); empty without simulcast.
    rids: Vec<String>,
    /// The encoding whose video the stream itself carries (index, in order of arrival).
    primary: Option<usize>,
    first_layer_configured: Option<Instant>,
}

impl PrimaryChoice {
    /// The publisher announced simulcast layers.
    pub(super) fn announced(&mut self, rids: Vec<String>) {
        self.rids = rids;
    }

    pub(super) fn is_simulcast(&self) -> bool {
        !self.rids.is_empty()
    }

    pub(super) fn primary(&self) -> Option<usize> {
        self.primary
    }

    /// Encoding `idx` started; without simulcast it is the stream's video.
    pub(super) fn encoding_added(&mut self, idx: usize) {
        if !self.is_simulcast() {
            self.primary = Some(idx);
        }
    }

    /// A simulcast layer got its (first) decoder configuration.
    pub(super) fn layer_configured(&mut self, now: Instant) {
        self.first_layer_configured.get_or_insert(now);
    }

    /// At a keyframe of encoding `idx` (of `encodings`): true if it becomes the stream's
    /// video now.
    pub(super) fn keyframe(
        &mut self,
        now: Instant,
        idx: usize,
        encodings: &[EncodingInfo<'_>],
    ) -> bool {
        if !self.is_simulcast() || self.primary == Some(idx) {
            return false;
        }
        let largest = (0..encodings.len())
            .filter(|&i| encodings[i].pixels.is_some())
            .max_by_key(|&i| encodings[i].pixels);
        if largest != Some(idx) {
            return false;
        }
        if self.primary.is_none() {
            let all = self.rids.iter().all(|r| {
                encodings
                    .iter()
                    .any(|e| e.rid == Some(r.as_str()) && e.pixels.is_some())
            });
            let waited = self
                .first_layer_configured
                .is_some_and(|t| now.saturating_duration_since(t) >= LAYER_WAIT);
            if !all && !waited {
                return false;
            }
        }
        self.primary = Some(idx);
        true
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn enc(rid: &'static str, pixels: Option<u64>) -> EncodingInfo<'static> {
        EncodingInfo {
            rid: Some(rid),
            pixels,
        }
    }

    fn simulcast() -> PrimaryChoice {
        let mut c = PrimaryChoice::default();
        c.announced(vec!["q".into(), "h".into(), "f".into()]);
        c
    }

    #[test]
    fn without_simulcast_the_only_encoding_is_the_streams_video_at_once() {
        let mut c = PrimaryChoice::default();
        c.encoding_added(0);
        assert_eq!(c.primary(), Some(0));
        let only = [EncodingInfo {
            rid: None,
            pixels: Some(100),
        }];
        assert!(!c.keyframe(Instant::now(), 0, &only), "nothing to change");
    }

    #[test]
    fn the_largest_layer_is_chosen_once_all_are_configured() {
        let t = Instant::now();
        let mut c = simulcast();
        (0..3).for_each(|i| c.encoding_added(i));
        c.layer_configured(t);
        assert_eq!(c.primary(), None, "no choice before a keyframe");
        let two = [enc("q", Some(100)), enc("h", Some(400)), enc("f", None)];
        assert!(
            !c.keyframe(t, 1, &two),
            "f is announced but not configured yet"
        );
        let all = [
            enc("q", Some(100)),
            enc("h", Some(400)),
            enc("f", Some(1600)),
        ];
        assert!(!c.keyframe(t, 1, &all), "h is not the largest");
        assert!(c.keyframe(t, 2, &all));
        assert_eq!(c.primary(), Some(2));
        assert!(!c.keyframe(t, 2, &all), "chosen once");
    }

    #[test]
    fn without_the_other_layers_the_largest_so_far_is_chosen_after_the_wait() {
        let t = Instant::now();
        let mut c = simulcast();
        c.layer_configured(t);
        let some = [enc("q", Some(100)), enc("h", Some(400))];
        assert!(!c.keyframe(t + LAYER_WAIT / 2, 1, &some));
        assert!(c.keyframe(t + LAYER_WAIT, 1, &some));
        // f starts later: it takes over at its first keyframe, without waiting.
        let all = [
            enc("q", Some(100)),
            enc("h", Some(400)),
            enc("f", Some(1600)),
        ];
        assert!(
            !c.keyframe(t + LAYER_WAIT, 1, &all),
            "h is no longer the largest"
        );
        assert!(c.keyframe(t + LAYER_WAIT, 2, &all));
        assert_eq!(c.primary(), Some(2));
    }
}
