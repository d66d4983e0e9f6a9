//! One live stream's shared state, and its snapshot for the API.

use std::sync::atomic::{AtomicBool, AtomicU64, AtomicU8, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Instant;

use parking_lot::Mutex;
use serde::Serialize;
use tokio::sync::{broadcast, watch, Notify};

use super::{Source, Status, StreamEvent};
use crate::media::gop::GopCache;
use crate::media::{Codec, Packet, SimulcastLayer, StreamConfig, StreamKey};

pub(super) struct StreamState {
    pub(super) config: Arc<StreamConfig>,
    pub(super) gop: GopCache<Arc<Packet>>,
    pub(super) tx: Option<broadcast::Sender<StreamEvent>>,
    /// The newest dts sent per track (ns; video, audio): where a returning publisher's
    /// timeline is spliced on.
    pub(super) last_ns: [Option<i64>; 2],
    /// While the local publisher is gone and the stream is held for it
    /// (`limits.publisher_hold`): the publish count when it left.
    pub(super) held: Option<u64>,
}

/// One live stream on this node.
pub struct Stream {
    pub(super) key: StreamKey,
    pub(super) source: Mutex<Source>,
    pub(super) state: Mutex<StreamState>,
    pub(super) status: watch::Sender<Status>,
    pub(super) subscribers: AtomicUsize,
    pub(super) idle: Notify,
    /// Consumers asking for a keyframe; merged (one permit) until the owner looks.
    pub(super) keyframe_wanted: Notify,
    /// Counts those requests (`meshcast_keyframe_requests_received_total`).
    pub(super) keyframe_requests: prometheus_client::metrics::counter::Counter,
    pub(super) frames_in: AtomicU64,
    pub(super) bytes_in: AtomicU64,
    /// Whether a video frame was presented after a later-decoded one (pts ≠ dts): the
    /// stream has B-frames, which WebRTC viewers' decoders do not take.
    pub(super) bframes: AtomicBool,
    /// Whether enough video frames were fanned out to know `bframes` without looking at
    /// frames (set once, by the publisher).
    pub(super) order_settled: AtomicBool,
    /// The loudest audio level its publisher reported since it was last read (RFC 6464,
    /// -dBov: 0 loudest, 127 silence or unknown).
    pub(super) audio_level: AtomicU8,
    pub(super) started: Instant,
    /// When the stream started, in unix milliseconds (ranks rival publishers of one name).
    pub(super) started_ms: u64,
    /// Set when a local publisher is told to stop because the name belongs to another
    /// node: why.
    pub(super) evicted: watch::Sender<Option<String>>,
    /// Identity of the timeline consumers get: random per local publish; a relay serves its
    /// upstream's (see `media::splice`). A publisher coming back to its held stream is
    /// spliced onto it, so its timeline stays.
    pub(super) timeline: AtomicU64,
    /// How many publishers this stream has had (more than one after a publisher came back
    /// within the hold).
    pub(super) publishes: AtomicU64,
}

impl Stream {
    /// The loudest audio level since the last call (-dBov; 127: silence or none
    /// reported), and a new window begins.
    pub fn take_audio_level(&self) -> u8 {
        self.audio_level.swap(127, Ordering::Relaxed)
    }

    pub fn timeline(&self) -> u64 {
        self.timeline.load(Ordering::Acquire)
    }

    pub fn key(&self) -> &StreamKey {
        &self.key
    }

    pub fn source(&self) -> Source {
        self.source.lock().clone()
    }

    pub fn is_local(&self) -> bool {
        *self.source.lock() == Source::Local
    }

    /// The stream's average bitrate (all tracks, bits per second) since it started; `None`
    /// in its first second.
    pub fn bitrate_bps(&self) -> Option<u64> {
        let secs = self.started.elapsed().as_secs_f64();
        (secs >= 1.0).then(|| (self.bytes_in.load(Ordering::Relaxed) as f64 * 8.0 / secs) as u64)
    }

    pub fn subscribers(&self) -> usize {
        self.subscribers.load(Ordering::Acquire)
    }

    pub(super) fn want_keyframe(&self) {
        self.keyframe_requests.inc();
        self.keyframe_wanted.notify_one();
    }

    /// When the stream started, in unix milliseconds.
    pub fn started_ms(&self) -> u64 {
        self.started_ms
    }

    /// Why the stream's publisher was evicted, if it was.
    pub fn evicted(&self) -> Option<String> {
        self.evicted.borrow().clone()
    }

    /// How many publishers this stream has had.
    pub fn publishes(&self) -> u64 {
        self.publishes.load(Ordering::Acquire)
    }

    /// Whether its publisher left and it is held for it to come back.
    pub fn held(&self) -> bool {
        self.state.lock().held.is_some()
    }
}

/// A snapshot of a stream for the API.
#[derive(Clone, Debug, Serialize)]
pub struct StreamInfo {
    pub stream: StreamKey,
    pub source: Source,
    pub subscribers: usize,
    pub video: Option<TrackInfo>,
    pub audio: Option<TrackInfo>,
    pub frames_in: u64,
    pub bytes_in: u64,
    pub uptime_ms: u64,
    pub gop_cache_frames: usize,
    /// Simulcast layers (each also listed as the stream `name~sim.RID`), smallest first.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub simulcast: Vec<SimulcastLayer>,
    /// The publisher left and the stream is held for it (`limits.publisher_hold_ms`).
    #[serde(skip_serializing_if = "std::ops::Not::not")]
    pub waiting_for_publisher: bool,
    /// Publishers the stream has had: more than 1 when one came back within the hold.
    pub publishes: u64,
    /// Its video has B-frames (frames out of decode order).
    pub bframes: bool,
}

#[derive(Clone, Debug, Serialize)]
pub struct TrackInfo {
    pub codec: Codec,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub width: Option<u32>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub height: Option<u32>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub sample_rate: Option<u32>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub channels: Option<u8>,
    /// Video: whether the stream has B-frames (seen at ingest as pts ≠ dts).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub bframes: Option<bool>,
}
