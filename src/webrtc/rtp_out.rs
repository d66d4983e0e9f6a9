//! A WHEP viewer's outgoing RTP: a frame's payloads, made once per node and shared by every
//! viewer, and per viewer its numbering, its timestamps and the writes into str0m.

use std::sync::Arc;
use std::time::{Duration, Instant};

use str0m::media::Mid;
use str0m::rtp::{RtpWrite, SeqNo, Ssrc};
use str0m::Rtc;

use super::{h264, vp8};
use crate::media::packet::{Encoding, Packet};
use crate::media::{avc, Codec, StreamConfig};

/// RTP payload bytes per packet (leaves room for RTP header, extensions and SRTP tag).
const RTP_MTU: usize = 1100;
/// Packets each viewer stream keeps for NACK resends.
const RTX_CACHE_PACKETS: usize = 128;

/// A frame's RTP payloads, shared by every viewer.
pub(super) static RTP_PAYLOADS: Encoding<Vec<Arc<[u8]>>> = Encoding::new("rtp payloads");

/// A frame's RTP payloads, per codec (built once per frame per node).
pub(super) fn packetize(p: &Packet, config: &StreamConfig) -> Vec<Arc<[u8]>> {
    match p.frame.codec {
        Codec::H264 => {
            let (sps, pps) = config
                .video
                .as_ref()
                .and_then(|v| avc::parse_decoder_config(&v.record).ok())
                .map(|c| (c.sps.first().cloned(), c.pps.first().cloned()))
                .unwrap_or((None, None));
            h264::packetize(
                &p.frame.payload,
                sps.as_deref().unwrap_or(&[]),
                pps.as_deref().unwrap_or(&[]),
                RTP_MTU,
            )
        }
        Codec::Vp8 => vp8::packetize(&p.frame.payload, RTP_MTU),
        Codec::Opus => vec![Arc::from(&p.frame.payload[..])],
        Codec::Aac => vec![],
    }
}

/// Resends cover what a NACK can still save at live latency: the last second, at most
/// [`RTX_CACHE_PACKETS`] packets. (str0m's default, 1024 packets / 3 s per stream, was most of
/// a viewer's memory.) No cap on the resent share: the cap's byte history (an entry per
/// packet sent in the last second) cost ~20 KB per viewer, and resends are already bounded
/// by this cache.
///
/// Returns the SSRC of `mid`'s send stream, by which its packets are written (a hash
/// lookup; finding the stream by mid compares strings, ~2% of a viewer's CPU).
pub(super) fn bound_rtx_cache(rtc: &mut Rtc, mid: Mid) -> Option<Ssrc> {
    let mut api = rtc.direct_api();
    let tx = api.stream_tx_by_mid(mid, None)?;
    tx.set_rtx_cache(RTX_CACHE_PACKETS, Duration::from_secs(1), None);
    Some(tx.ssrc())
}

/// Writes consecutive RTP payloads of a frame on `track`, numbered from `seq`; the marker
/// goes on the last one if `ends_frame`.
pub(super) fn write_packets(
    rtc: &mut Rtc,
    track: TrackOut,
    seq: u64,
    time: u32,
    payloads: &[Arc<[u8]>],
    ends_frame: bool,
) {
    let mut api = rtc.direct_api();
    let Some(tx) = api.stream_tx(&track.ssrc) else {
        return;
    };
    let now = Instant::now();
    let last = payloads.len().saturating_sub(1);
    for (i, payload) in payloads.iter().enumerate() {
        tx.write_rtp(
            RtpWrite::new(
                track.pt,
                SeqNo::from(seq + i as u64),
                time,
                now,
                payload.clone(),
            )
            .marker(ends_frame && i == last)
            .nackable(track.nack),
        );
    }
}

/// Per-viewer RTP numbering: random starts, then continuous whatever the source does.
pub(super) struct RtpState {
    pub(super) seq: u64,
    ts_offset: u32,
    first_pts: Option<i64>,
}

impl RtpState {
    pub(super) fn new() -> Self {
        use rand::Rng;
        let mut rng = rand::rng();
        RtpState {
            seq: rng.random_range(0..30_000),
            ts_offset: rng.random(),
            first_pts: None,
        }
    }

    /// The RTP timestamp of a frame presented at `pts` (in the track's RTP clock): relative
    /// to the viewer's first frame, from a random base. B-frames before the first frame wrap
    /// correctly.
    pub(super) fn timestamp(&mut self, pts: i64) -> u32 {
        let first = *self.first_pts.get_or_insert(pts);
        ((pts - first) as u32).wrapping_add(self.ts_offset)
    }

    /// Makes the times of the frames to come later by `by` (in the track's RTP clock).
    pub(super) fn shift(&mut self, by: u32) {
        self.ts_offset = self.ts_offset.wrapping_add(by);
    }
}

/// A negotiated outgoing track.
#[derive(Clone, Copy)]
pub(super) struct TrackOut {
    /// The send stream's SSRC.
    ssrc: Ssrc,
    pt: str0m::media::Pt,
    /// Whether the viewer NACKs this payload (video; browsers and str0m do not NACK Opus):
    /// only then are its packets kept for resending.
    nack: bool,
}

impl TrackOut {
    pub(super) fn new(ssrc: Ssrc, params: &str0m::format::PayloadParams) -> TrackOut {
        TrackOut {
            ssrc,
            pt: params.pt(),
            nack: params.fb_nack(),
        }
    }
}
