//! `[limits]`: the bounds on what peers can grow: queues, timeouts, streams, viewers and
//! WebRTC sessions.

use std::time::Duration;

use serde::Deserialize;

use super::read::{Problem, Problems};

/// Queue sizes and timeouts that bound memory and decide when a consumer is too slow.
#[derive(Clone, Debug)]
pub struct Limits {
    /// Frames the per-stream fan-out ring holds; a consumer further behind skips to the next
    /// keyframe.
    pub stream_buffer_frames: usize,
    /// How many times a consumer may fall behind within a minute before it is disconnected.
    pub max_lag_events: u32,
    /// A single write to a viewer that blocks this long disconnects the viewer.
    pub viewer_write_timeout: Duration,
    /// Upper bound on the bytes a GOP cache holds; a longer GOP is not cached.
    pub gop_cache_max_bytes: usize,
    /// Concurrent RTMP connections accepted.
    pub max_rtmp_connections: usize,
    /// Kernel send buffer of each viewer socket (SO_SNDBUF). Bounds kernel memory per viewer
    /// and how long a stalled viewer takes to be noticed; 0 keeps the kernel's autotuning.
    pub viewer_send_buffer_bytes: usize,
    /// How long a viewer of a name nobody publishes yet waits for it before "not found".
    pub play_wait: Duration,
    /// How long a local stream whose publisher left is kept for it to come back (viewers,
    /// egress and other nodes' pulls carry on); 0 ends it at once.
    pub publisher_hold: Duration,
    /// Local publishes at most, node-wide and per namespace.
    pub max_streams: usize,
    pub max_streams_per_namespace: usize,
    /// Viewers (RTMP, HTTP-FLV, WHEP) at most, node-wide and per stream.
    pub max_viewers: usize,
    pub max_viewers_per_stream: usize,
    /// WHIP and WHEP sessions at most (connected or still connecting).
    pub max_webrtc_sessions: usize,
}

impl Default for Limits {
    fn default() -> Self {
        Limits {
            stream_buffer_frames: 1024,
            max_lag_events: 3,
            viewer_write_timeout: Duration::from_secs(10),
            gop_cache_max_bytes: 32 << 20,
            max_rtmp_connections: 20_000,
            viewer_send_buffer_bytes: 1 << 20,
            play_wait: Duration::from_secs(1),
            publisher_hold: Duration::from_secs(5),
            max_streams: 1000,
            max_streams_per_namespace: 1000,
            max_viewers: 20_000,
            max_viewers_per_stream: 20_000,
            max_webrtc_sessions: 5000,
        }
    }
}

#[derive(Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawLimits {
    stream_buffer_frames: Option<usize>,
    max_lag_events: Option<u32>,
    viewer_write_timeout_ms: Option<u64>,
    gop_cache_max_bytes: Option<usize>,
    max_rtmp_connections: Option<usize>,
    viewer_send_buffer_bytes: Option<usize>,
    play_wait_ms: Option<u64>,
    publisher_hold_ms: Option<u64>,
    max_streams: Option<usize>,
    max_streams_per_namespace: Option<usize>,
    max_viewers: Option<usize>,
    max_viewers_per_stream: Option<usize>,
    max_webrtc_sessions: Option<usize>,
}

pub(super) fn parse(raw: RawLimits, problems: &mut Problems) -> Limits {
    let dl = Limits::default();
    let limits_out = Limits {
        stream_buffer_frames: raw.stream_buffer_frames.unwrap_or(dl.stream_buffer_frames),
        max_lag_events: raw.max_lag_events.unwrap_or(dl.max_lag_events),
        viewer_write_timeout: raw
            .viewer_write_timeout_ms
            .map(Duration::from_millis)
            .unwrap_or(dl.viewer_write_timeout),
        gop_cache_max_bytes: raw.gop_cache_max_bytes.unwrap_or(dl.gop_cache_max_bytes),
        max_rtmp_connections: raw.max_rtmp_connections.unwrap_or(dl.max_rtmp_connections),
        viewer_send_buffer_bytes: raw
            .viewer_send_buffer_bytes
            .unwrap_or(dl.viewer_send_buffer_bytes),
        play_wait: raw
            .play_wait_ms
            .map(Duration::from_millis)
            .unwrap_or(dl.play_wait),
        publisher_hold: raw
            .publisher_hold_ms
            .map(Duration::from_millis)
            .unwrap_or(dl.publisher_hold),
        max_streams: raw.max_streams.unwrap_or(dl.max_streams),
        max_streams_per_namespace: raw
            .max_streams_per_namespace
            .or(raw.max_streams)
            .unwrap_or(dl.max_streams_per_namespace),
        max_viewers: raw.max_viewers.unwrap_or(dl.max_viewers),
        max_viewers_per_stream: raw
            .max_viewers_per_stream
            .or(raw.max_viewers)
            .unwrap_or(dl.max_viewers_per_stream),
        max_webrtc_sessions: raw.max_webrtc_sessions.unwrap_or(dl.max_webrtc_sessions),
    };
    for (key, v) in [
        ("limits.max_streams", limits_out.max_streams),
        (
            "limits.max_streams_per_namespace",
            limits_out.max_streams_per_namespace,
        ),
        ("limits.max_viewers", limits_out.max_viewers),
        (
            "limits.max_viewers_per_stream",
            limits_out.max_viewers_per_stream,
        ),
        ("limits.max_webrtc_sessions", limits_out.max_webrtc_sessions),
    ] {
        if v == 0 || v > 10_000_000 {
            problems.push(Problem::new(key, "must be between 1 and 10000000"));
        }
    }
    if limits_out.publisher_hold > Duration::from_secs(300) {
        problems.push(Problem::new(
            "limits.publisher_hold_ms",
            "must be at most 300000 (0: end a stream when its publisher leaves)",
        ));
    }
    if limits_out.play_wait > Duration::from_secs(60) {
        problems.push(Problem::new(
            "limits.play_wait_ms",
            "must be at most 60000 (0: answer at once)",
        ));
    }
    if !(16..=65536).contains(&limits_out.stream_buffer_frames) {
        problems.push(Problem::new(
            "limits.stream_buffer_frames",
            "must be between 16 and 65536",
        ));
    }
    if limits_out.viewer_write_timeout < Duration::from_millis(100) {
        problems.push(Problem::new(
            "limits.viewer_write_timeout_ms",
            "must be at least 100",
        ));
    }
    if limits_out.max_rtmp_connections == 0 {
        problems.push(Problem::new(
            "limits.max_rtmp_connections",
            "must be at least 1",
        ));
    }
    limits_out
}
