//! `[rtmp]`: the RTMP listener (publishers and players).

use std::net::SocketAddr;
use std::time::Duration;

use serde::Deserialize;

use super::read::{addr_or_off, check_public_url, millis, Problem, Problems};

#[derive(Clone, Debug)]
pub struct RtmpConfig {
    /// `None` disables the RTMP listener.
    pub listen: Option<SocketAddr>,
    /// Outbound RTMP chunk size (bytes).
    pub chunk_size: u32,
    /// Merged write interval for players (SRS's `mw_latency`): fewer, larger writes per
    /// viewer at the cost of up to this much added latency. Zero writes every frame at once.
    pub merged_write: Duration,
    /// Base URL publishers and players are sent to (route API), e.g. `rtmp://eu1.example.com:1935`.
    pub public_url: Option<String>,
    /// A connection that is not playing and sends nothing this long is closed (a silent
    /// publisher frees its name).
    pub idle_timeout: Duration,
    /// Largest audio/video message a peer may announce.
    pub max_message_bytes: usize,
}

/// Largest audio/video message a peer may announce unless `rtmp.max_message_bytes` says
/// otherwise (8 MiB: a 4K keyframe fits many times over).
pub const DEFAULT_MAX_MESSAGE_BYTES: usize = 8 << 20;

impl Default for RtmpConfig {
    fn default() -> Self {
        RtmpConfig {
            listen: Some(SocketAddr::from(([0, 0, 0, 0], 1935))),
            chunk_size: 4096,
            merged_write: Duration::from_millis(200),
            public_url: None,
            idle_timeout: Duration::from_secs(10),
            max_message_bytes: DEFAULT_MAX_MESSAGE_BYTES,
        }
    }
}

#[derive(Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawRtmp {
    listen: Option<String>,
    chunk_size: Option<u32>,
    merged_write_ms: Option<u64>,
    public_url: Option<String>,
    idle_timeout_ms: Option<u64>,
    max_message_bytes: Option<usize>,
}

pub(super) fn parse(raw: RawRtmp, problems: &mut Problems) -> RtmpConfig {
    check_public_url(
        raw.public_url.as_ref(),
        "rtmp.public_url",
        &["rtmp://"],
        problems,
    );
    let d = RtmpConfig::default();
    let listen = addr_or_off(raw.listen, d.listen, "rtmp.listen", problems);
    let chunk_size = raw.chunk_size.unwrap_or(d.chunk_size);
    if !(128..=65536).contains(&chunk_size) {
        problems.push(Problem::new(
            "rtmp.chunk_size",
            "must be between 128 and 65536",
        ));
    }
    let merged_write = millis(
        raw.merged_write_ms,
        d.merged_write,
        "rtmp.merged_write_ms",
        0..=1000,
        "must be at most 1000 (it adds that much latency)",
        problems,
    );
    let idle_timeout = millis(
        raw.idle_timeout_ms,
        d.idle_timeout,
        "rtmp.idle_timeout_ms",
        1000..=600_000,
        "must be between 1000 and 600000",
        problems,
    );
    let max_message_bytes = raw.max_message_bytes.unwrap_or(d.max_message_bytes);
    if !(65_536..=0xFF_FFFF).contains(&max_message_bytes) {
        problems.push(Problem::new(
            "rtmp.max_message_bytes",
            "must be between 65536 and 16777215",
        ));
    }
    RtmpConfig {
        listen,
        chunk_size,
        merged_write,
        public_url: raw.public_url,
        idle_timeout,
        max_message_bytes,
    }
}
