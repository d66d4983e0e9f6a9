//! What a relay is told of its upstream's ordered items (sans-IO).
//!
//! A pull feeds its relay the items [`super::group::GroupSequencer`] puts in order, through
//! the [`Splicer`] that keeps the consumers' timeline continuous across upstreams:
//!
//! * the first configuration names the timeline the relay serves and makes it live (its
//!   consumers wait for live, so they see the name before any frame);
//! * frames before that configuration are dropped (nothing to decode them with);
//! * a frame the splicer lets through may start a new timeline (a new session's shift is
//!   fixed at its first keyframe): the relay is told before the frame.

use crate::media::splice::Splicer;
use crate::media::{Frame, StreamConfig};

use super::wire::MediaItem;

/// What one pump has told its relay so far.
#[derive(Debug, Default)]
pub struct Intake {
    configured: bool,
    /// The timeline the relay serves (see [`Splicer::timeline`]).
    served: Option<u64>,
}

/// What to tell the relay about one item.
#[derive(Debug, PartialEq)]
pub enum Tell {
    /// Set the configuration; with `go_live`, name the timeline and go live first time.
    Config {
        config: StreamConfig,
        go_live: Option<u64>,
    },
    /// Push the frame; with `timeline`, name the new timeline first.
    Frame {
        frame: Frame,
        timeline: Option<u64>,
    },
    Publishes(u64),
    Nothing,
}

impl Intake {
    /// Whether the relay has its first configuration (and is live).
    pub fn configured(&self) -> bool {
        self.configured
    }

    pub fn item(&mut self, item: MediaItem, splice: &mut Splicer) -> Tell {
        match item {
            MediaItem::Config(config) => {
                let go_live = (!self.configured).then(|| {
                    self.configured = true;
                    self.served = splice.timeline();
                    self.served.unwrap_or_default()
                });
                Tell::Config { config, go_live }
            }
            MediaItem::Frame(f) if self.configured => {
                let Some(frame) = splice.frame(f) else {
                    return Tell::Nothing;
                };
                let timeline = (splice.timeline() != self.served).then(|| {
                    self.served = splice.timeline();
                    self.served.unwrap_or_default()
                });
                Tell::Frame { frame, timeline }
            }
            MediaItem::Frame(_) => Tell::Nothing,
            MediaItem::Publishes(n) => Tell::Publishes(n),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::media::{Codec, Timebase};

    fn frame(dts: i64, keyframe: bool) -> Frame {
        Frame {
            codec: Codec::H264,
            dts,
            pts: dts,
            timebase: Timebase(1000),
            keyframe,
            payload: bytes::Bytes::from_static(b"x"),
        }
    }

    #[test]
    fn frames_before_the_first_configuration_are_dropped_and_it_goes_live_once() {
        let mut splice = Splicer::new();
        splice.begin(7, true);
        let mut intake = Intake::default();
        assert_eq!(
            intake.item(MediaItem::Frame(frame(0, true)), &mut splice),
            Tell::Nothing
        );
        assert!(!intake.configured());
        let config = StreamConfig::default();
        assert_eq!(
            intake.item(MediaItem::Config(config.clone()), &mut splice),
            Tell::Config {
                config: config.clone(),
                go_live: Some(7)
            }
        );
        assert_eq!(
            intake.item(MediaItem::Config(config.clone()), &mut splice),
            Tell::Config {
                config,
                go_live: None
            },
            "a later configuration only updates"
        );
        assert_eq!(
            intake.item(MediaItem::Frame(frame(0, true)), &mut splice),
            Tell::Frame {
                frame: frame(0, true),
                timeline: None
            }
        );
        assert_eq!(
            intake.item(MediaItem::Publishes(2), &mut splice),
            Tell::Publishes(2)
        );
    }

    #[test]
    fn a_new_session_names_its_shifted_timeline_at_its_first_keyframe() {
        let mut splice = Splicer::new();
        splice.begin(7, true);
        let mut intake = Intake::default();
        intake.item(MediaItem::Config(StreamConfig::default()), &mut splice);
        intake.item(MediaItem::Frame(frame(1000, true)), &mut splice);
        // The publisher came back as session 8, its clock starting at 0.
        splice.begin(8, true);
        assert_eq!(
            intake.item(MediaItem::Frame(frame(0, false)), &mut splice),
            Tell::Nothing
        );
        let Tell::Frame { frame: f, timeline } =
            intake.item(MediaItem::Frame(frame(0, true)), &mut splice)
        else {
            panic!("the keyframe passes");
        };
        assert!(f.dts > 1000, "shifted after what was sent");
        assert_eq!(timeline, splice.timeline());
        assert_ne!(timeline, Some(7));
    }
}
