//! The media model: one type flows from every ingest to every output.
//!
//! Ingest protocols turn what they receive into [`Frame`]s (one coded access unit with explicit
//! timestamps and timebase, payload as `Bytes`) plus a [`StreamConfig`] (codec configuration
//! and metadata). Outputs and the backbone consume the same values; fan-out clones `Bytes`
//! handles, never payloads. This module does no I/O.

pub mod aac;
pub mod avc;
pub mod flv;
pub mod gop;
pub mod keyframe;
pub mod packet;

pub use packet::Packet;
pub mod splice;

use std::fmt;

use bytes::Bytes;
use serde::Serialize;

/// Which kind of track a frame belongs to.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum TrackKind {
    Video,
    Audio,
}

/// Codecs meshcast understands.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Codec {
    /// H.264; payload is AVCC (4-byte length-prefixed NAL units).
    H264,
    /// AAC; payload is one raw access unit (no ADTS header).
    Aac,
    /// Opus; payload is one Opus packet (WebRTC audio).
    Opus,
    /// VP8; payload is one frame (WebRTC video; cannot go over RTMP/FLV).
    Vp8,
}

impl Codec {
    pub fn track(self) -> TrackKind {
        match self {
            Codec::H264 | Codec::Vp8 => TrackKind::Video,
            Codec::Aac | Codec::Opus => TrackKind::Audio,
        }
    }

    pub fn wire_id(self) -> u8 {
        match self {
            Codec::H264 => 1,
            Codec::Aac => 2,
            Codec::Opus => 3,
            Codec::Vp8 => 4,
        }
    }

    pub fn from_wire_id(id: u8) -> Option<Codec> {
        match id {
            1 => Some(Codec::H264),
            2 => Some(Codec::Aac),
            3 => Some(Codec::Opus),
            4 => Some(Codec::Vp8),
            _ => None,
        }
    }

    /// Whether RTMP and FLV can carry this codec (FFmpeg 5.1's FLV takes H.264 and AAC).
    pub fn fits_flv(self) -> bool {
        matches!(self, Codec::H264 | Codec::Aac)
    }
}

/// Ticks per second of a timestamp.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct Timebase(pub u32);

impl Timebase {
    /// Milliseconds: what RTMP and FLV carry.
    pub const MILLIS: Timebase = Timebase(1000);

    /// Converts `value` ticks of this timebase to `to`, rounding toward negative infinity.
    pub fn rescale(self, value: i64, to: Timebase) -> i64 {
        if self == to || self.0 == 0 {
            return value;
        }
        let v = value as i128 * to.0 as i128;
        v.div_euclid(self.0 as i128) as i64
    }
}

/// One coded access unit of one track.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Frame {
    pub codec: Codec,
    /// Decode timestamp, in `timebase` ticks. Monotonic non-decreasing per track.
    pub dts: i64,
    /// Presentation timestamp; `pts >= dts`.
    pub pts: i64,
    pub timebase: Timebase,
    /// A random access point (IDR for H.264; every audio frame).
    pub keyframe: bool,
    pub payload: Bytes,
}

impl Frame {
    pub fn track(&self) -> TrackKind {
        self.codec.track()
    }

    pub fn dts_ms(&self) -> i64 {
        self.timebase.rescale(self.dts, Timebase::MILLIS)
    }

    pub fn pts_ms(&self) -> i64 {
        self.timebase.rescale(self.pts, Timebase::MILLIS)
    }

    /// Whether a viewer can start decoding the stream at this frame.
    pub fn is_video_keyframe(&self) -> bool {
        self.keyframe && self.track() == TrackKind::Video
    }

    /// Whether a consumer that skipped frames can resume here: at a video keyframe, or at
    /// any keyframe (every audio frame) when the stream has no video.
    pub fn resumes_at(&self, has_video: bool) -> bool {
        if has_video {
            self.is_video_keyframe()
        } else {
            self.keyframe
        }
    }
}

/// Codec configuration of a video track.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct VideoConfig {
    pub codec: Codec,
    /// AVCDecoderConfigurationRecord for H.264.
    pub record: Bytes,
    pub width: u32,
    pub height: u32,
}

/// Codec configuration of an audio track.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct AudioConfig {
    pub codec: Codec,
    /// AudioSpecificConfig for AAC.
    pub specific: Bytes,
    pub sample_rate: u32,
    pub channels: u8,
}

/// Descriptive metadata a publisher announced (RTMP `onMetaData`).
#[derive(Clone, Debug, Default, PartialEq)]
pub struct Metadata {
    pub frame_rate: Option<f64>,
    pub video_bitrate_kbps: Option<f64>,
    pub audio_bitrate_kbps: Option<f64>,
    pub encoder: Option<String>,
}

/// One simulcast layer of a stream: its video is published as the stream
/// [`StreamKey::layer`]`(rid)`.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct SimulcastLayer {
    pub rid: String,
    pub width: u32,
    pub height: u32,
}

impl SimulcastLayer {
    pub fn pixels(&self) -> u64 {
        self.width as u64 * self.height as u64
    }
}

/// Everything a late joiner needs before the first frame.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct StreamConfig {
    pub video: Option<VideoConfig>,
    pub audio: Option<AudioConfig>,
    pub metadata: Metadata,
    /// The publisher's simulcast layers, smallest first (empty without simulcast). The
    /// stream's own video is the largest; WebRTC viewers pick one by their bandwidth.
    pub simulcast: Vec<SimulcastLayer>,
}

/// Names a stream: `namespace/name` (RTMP app / stream key).
#[derive(Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct StreamKey {
    namespace: String,
    name: String,
}

/// Why a stream name was refused.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
#[error("invalid stream name `{0}`: use 1-128 characters of A-Z a-z 0-9 _ - . (not starting with .) for namespace and name")]
pub struct InvalidStreamKey(pub String);

impl StreamKey {
    pub fn new(namespace: &str, name: &str) -> Result<StreamKey, InvalidStreamKey> {
        if valid_part(namespace) && valid_part(name) {
            Ok(StreamKey {
                namespace: namespace.to_string(),
                name: name.to_string(),
            })
        } else {
            Err(InvalidStreamKey(format!("{namespace}/{name}")))
        }
    }

    /// Parses `namespace/name`.
    pub fn parse(s: &str) -> Result<StreamKey, InvalidStreamKey> {
        match s.split_once('/') {
            Some((ns, name)) => StreamKey::new(ns, name),
            None => Err(InvalidStreamKey(s.to_string())),
        }
    }

    /// A name this node gives a stream it derives from this one (e.g. `demo~opus`). The
    /// `~` cannot appear in names from outside, so derived names never collide with them.
    pub fn derived(&self, tag: &str) -> StreamKey {
        StreamKey {
            namespace: self.namespace.clone(),
            name: format!("{}~{}", self.name, tag),
        }
    }

    /// The stream carrying simulcast layer `rid` of this one (`demo~sim.h`). Layers are
    /// published like streams, so the backbone relays each one only where it is watched.
    pub fn layer(&self, rid: &str) -> StreamKey {
        self.derived(&format!("{LAYER_TAG}{rid}"))
    }

    /// The stream's WebRTC rendition (`demo~webrtc`): its video without B-frames, its audio
    /// in Opus. Made once, on the node the stream is published to, and relayed like a
    /// simulcast layer wherever it is watched.
    pub fn webrtc_rendition(&self) -> StreamKey {
        self.derived(RENDITION_TAG)
    }

    /// A room's mix in `layout` (`room/ROOM~mix.LAYOUT`): its participants as one stream.
    pub fn room_mix(room: &str, layout: &str) -> Result<StreamKey, InvalidStreamKey> {
        Ok(StreamKey::new(ROOM_NAMESPACE, room)?.derived(&format!("{MIX_TAG}{layout}")))
    }

    /// The room and layout of a room's mix name.
    pub fn as_room_mix(&self) -> Option<(&str, &str)> {
        if self.namespace != ROOM_NAMESPACE {
            return None;
        }
        let (room, tag) = self.name.split_once('~')?;
        Some((room, tag.strip_prefix(MIX_TAG)?))
    }

    /// Whether this names a stream's WebRTC rendition.
    pub fn is_webrtc_rendition(&self) -> bool {
        self.name
            .split_once('~')
            .is_some_and(|(_, tag)| tag == RENDITION_TAG)
    }

    /// The publisher's stream this one derives from (itself when it is one).
    pub fn base(&self) -> StreamKey {
        match self.name.split_once('~') {
            Some((base, _)) => StreamKey {
                namespace: self.namespace.clone(),
                name: base.to_string(),
            },
            None => self.clone(),
        }
    }

    /// Whether this names a stream this node derived (a bridge or a simulcast layer) rather
    /// than one a publisher named.
    pub fn is_derived(&self) -> bool {
        self.name.contains('~')
    }

    /// Parses `namespace/name` as sent between nodes: a publisher's name, a simulcast
    /// layer of one ([`layer`](Self::layer)) or its WebRTC rendition; other derived names
    /// stay node-local.
    pub fn parse_relayable(s: &str) -> Result<StreamKey, InvalidStreamKey> {
        let Some((base, rid)) = s.split_once('~') else {
            return StreamKey::parse(s);
        };
        if rid == RENDITION_TAG {
            return Ok(StreamKey::parse(base)?.webrtc_rendition());
        }
        let rid = rid
            .strip_prefix(LAYER_TAG)
            .filter(|r| valid_rid(r))
            .ok_or_else(|| InvalidStreamKey(s.to_string()))?;
        Ok(StreamKey::parse(base)?.layer(rid))
    }

    pub fn namespace(&self) -> &str {
        &self.namespace
    }

    pub fn name(&self) -> &str {
        &self.name
    }
}

const LAYER_TAG: &str = "sim.";
const MIX_TAG: &str = "mix.";
/// The namespace of rooms' streams (`room/ROOM.IDENTITY`, `room/ROOM~mix.LAYOUT`).
pub const ROOM_NAMESPACE: &str = "room";
const RENDITION_TAG: &str = "webrtc";

/// A simulcast layer id as carried in names: 1-16 of A-Z a-z 0-9 (RFC 8851 allows `-` and
/// `_` too; they are refused here to keep names simple).
pub fn valid_rid(rid: &str) -> bool {
    (1..=16).contains(&rid.len()) && rid.bytes().all(|b| b.is_ascii_alphanumeric())
}

fn valid_part(s: &str) -> bool {
    !s.is_empty()
        && s.len() <= 128
        && !s.starts_with('.')
        && s.bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'_' | b'-' | b'.'))
}

impl fmt::Display for StreamKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", self.namespace, self.name)
    }
}

impl Serialize for StreamKey {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_str(self)
    }
}

/// Unwraps 32-bit millisecond timestamps (RTMP) into a monotonic-friendly `i64` timeline.
#[derive(Debug, Default)]
pub struct TimestampUnwrapper {
    last: Option<u32>,
    value: i64,
}

impl TimestampUnwrapper {
    pub fn unwrap(&mut self, ts: u32) -> i64 {
        match self.last {
            None => self.value = ts as i64,
            // The signed 32-bit difference handles wrap-around and small backward steps alike.
            Some(last) => self.value += ts.wrapping_sub(last) as i32 as i64,
        }
        self.last = Some(ts);
        self.value
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rescale_between_timebases() {
        assert_eq!(Timebase(90_000).rescale(90_000, Timebase::MILLIS), 1000);
        assert_eq!(Timebase::MILLIS.rescale(40, Timebase(90_000)), 3600);
        assert_eq!(Timebase(90_000).rescale(-1, Timebase::MILLIS), -1);
    }

    #[test]
    fn stream_key_rejects_odd_names() {
        assert!(StreamKey::new("live", "demo").is_ok());
        assert!(StreamKey::new("live", "..").is_err());
        assert!(StreamKey::new("live", "a/b").is_err());
        assert!(StreamKey::new("", "x").is_err());
        assert!(StreamKey::new("live", "x y").is_err());
        assert_eq!(
            StreamKey::parse("live/demo").unwrap().to_string(),
            "live/demo"
        );
    }

    #[test]
    fn layer_keys_cross_nodes_but_other_derived_names_do_not() {
        let key = StreamKey::parse("live/cam").unwrap();
        let layer = key.layer("h");
        assert_eq!(layer.to_string(), "live/cam~sim.h");
        assert!(layer.is_derived() && !key.is_derived());
        assert_eq!(
            StreamKey::parse_relayable("live/cam~sim.h"),
            Ok(layer.clone())
        );
        assert_eq!(StreamKey::parse_relayable("live/cam"), Ok(key.clone()));
        let rendition = key.webrtc_rendition();
        assert!(rendition.is_webrtc_rendition() && !layer.is_webrtc_rendition());
        assert_eq!(rendition.base(), key);
        assert_eq!(StreamKey::parse_relayable("live/cam~webrtc"), Ok(rendition));
        for bad in [
            "live/cam~aac",
            "live/cam~webrtc2",
            "live/~webrtc",
            "live/cam~sim.",
            "live/cam~sim.a-b",
            "live/~sim.h",
        ] {
            assert!(StreamKey::parse_relayable(bad).is_err(), "{bad}");
        }
        assert!(StreamKey::parse("live/cam~sim.h").is_err());
    }

    #[test]
    fn unwrapper_crosses_32bit_wrap() {
        let mut u = TimestampUnwrapper::default();
        assert_eq!(u.unwrap(u32::MAX - 10), (u32::MAX - 10) as i64);
        assert_eq!(u.unwrap(5), u32::MAX as i64 + 6);
        assert_eq!(u.unwrap(3), u32::MAX as i64 + 4);
    }
}
