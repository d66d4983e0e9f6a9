//! Answering a WHIP or WHEP client's SDP offer (sans-IO): the codecs it must carry, the
//! ICE-lite, RTP-mode `Rtc` that answers it, and the errors that decide the HTTP answer.
//!
//! No socket and no task here: the `sdp_offer` fuzz target calls [`answer_offer`] directly.

use std::net::SocketAddr;
use std::time::Instant;

use str0m::bwe::Bitrate;
use str0m::change::SdpOffer;
use str0m::format::Codec as RtcCodec;
use str0m::media::Mid;
use str0m::net::TcpType;
use str0m::{Candidate, IceCreds, Rtc};
use tracing::warn;

use super::layers::INITIAL_ESTIMATE_BPS;
use crate::media::Codec;

/// Why an offer got no session. The API answers by kind: [`Self::MissingCodec`] is 406,
/// [`Self::TooManySessions`] 503, the rest 400.
#[derive(Debug, thiserror::Error)]
pub enum WebRtcError {
    #[error("bad SDP offer: {0}")]
    BadOffer(#[from] BadOffer),
    #[error("offer rejected: {0}")]
    Rejected(#[source] str0m::RtcError),
    #[error("the offer has no {0} media for this stream")]
    MissingCodec(&'static str),
    #[error("this node is at its WebRTC session limit ({0})")]
    TooManySessions(usize),
    #[error("this node is shutting down")]
    ShuttingDown,
}

/// An offer that cannot be read.
#[derive(Debug, thiserror::Error)]
pub enum BadOffer {
    #[error("{0}")]
    Sdp(#[source] str0m::error::SdpError),
    /// It made the SDP library panic (see [`answer_offer`]).
    #[error("the offer is inconsistent (refused)")]
    Inconsistent,
}

/// What a negotiated peer is, for the extensions and estimator it gets.
#[derive(Clone, Copy, Debug)]
pub enum PeerKind {
    Publisher,
    Viewer,
    /// A viewer of a simulcast stream: its layer follows its bandwidth estimate (TWCC).
    SimulcastViewer,
}

/// A viewer's offer must have a video m-line that can carry the stream's `video` codec.
pub(crate) fn check_viewer_codecs(offer: &str, video: Codec) -> Result<(), WebRtcError> {
    let wanted = match video {
        Codec::Vp8 => "vp8/90000",
        _ => "h264/90000",
    };
    let lower = offer.to_ascii_lowercase();
    if !lower.contains("m=video") || !lower.contains(wanted) {
        return Err(WebRtcError::MissingCodec(wanted));
    }
    Ok(())
}

/// A publisher's offer must carry something we ingest.
pub(crate) fn check_publisher_codecs(offer: &str) -> Result<(), WebRtcError> {
    let lower = offer.to_ascii_lowercase();
    if !["h264/90000", "vp8/90000", "opus/48000"]
        .iter()
        .any(|c| lower.contains(c))
    {
        return Err(WebRtcError::MissingCodec(
            "h264/90000, vp8/90000 or opus/48000",
        ));
    }
    Ok(())
}

/// A new DTLS certificate from the configured crypto provider (one per node).
pub fn dtls_certificate() -> Option<str0m::config::DtlsCert> {
    str0m::crypto::from_feature_flags()
        .dtls_provider
        .generate_certificate()
}

/// `answer_offer_unguarded` with str0m's panics contained: some offers make str0m's SDP
/// handling panic (payload types claimed twice across bundled m-lines trip an assertion in
/// its payload-type allocator, found by the `sdp_offer` fuzz target). The `Rtc` is built
/// and dropped in here, so, as [`crate::rtmp::feed_server`] does for rml_rtmp, a panic is
/// turned into a refused offer instead of unwinding through the HTTP handler.
pub fn answer_offer(
    offer: &str,
    kind: PeerKind,
    dtls_cert: &str0m::config::DtlsCert,
    candidates: &[SocketAddr],
    tcp: bool,
) -> Result<(Rtc, String, String), WebRtcError> {
    std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
        answer_offer_unguarded(offer, kind, dtls_cert, candidates, tcp)
    }))
    .unwrap_or_else(|_| {
        warn!("webrtc: an offer made the SDP library panic; refused");
        Err(BadOffer::Inconsistent.into())
    })
}

/// Answers an offer with a new ICE-lite, RTP-mode `Rtc` (H.264, VP8, Opus), with the
/// header extensions and estimator `kind` needs: only simulcast viewers get a bandwidth
/// estimate from their TWCC feedback (which also paces their video to it).
/// Returns the `Rtc`, the answer and the local ufrag.
fn answer_offer_unguarded(
    offer: &str,
    kind: PeerKind,
    dtls_cert: &str0m::config::DtlsCert,
    candidates: &[SocketAddr],
    tcp: bool,
) -> Result<(Rtc, String, String), WebRtcError> {
    let offer = SdpOffer::from_sdp_string(offer).map_err(BadOffer::Sdp)?;
    let ufrag = random_token(16);
    let mut builder = Rtc::builder();
    match kind {
        PeerKind::SimulcastViewer => {
            builder = builder.enable_bwe(Some(Bitrate::bps(INITIAL_ESTIMATE_BPS)));
        }
        // Nothing reads a plain viewer's bandwidth: without transport-cc every packet
        // it is sent is a header extension shorter and is not logged for feedback, and
        // the viewer sends no feedback to parse. The mid keeps BUNDLE demuxing simple.
        PeerKind::Viewer => {
            builder = builder
                .clear_extension_map()
                .set_extension(4, str0m::rtp::Extension::RtpMid);
        }
        // Publishers keep the standard extensions: their encoders adapt to our
        // transport-cc feedback, and simulcast needs rid.
        PeerKind::Publisher => {}
    }
    let mut builder = builder
        .set_ice_lite(true)
        .set_rtp_mode(true)
        .set_dtls_cert(dtls_cert.clone())
        .set_crypto_provider(super::dtls::crypto_provider())
        .clear_codecs()
        .enable_h264(true)
        .enable_vp8(true)
        .enable_opus(true, false)
        .set_local_ice_credentials(IceCreds {
            ufrag: ufrag.clone(),
            pass: random_token(24),
        });
    if !matches!(kind, PeerKind::Publisher) {
        // str0m's defaults stop at High; Chromium without hardware decoders offers High
        // 4:4:4 Predictive instead, whose decoders take High streams (see
        // `negotiated_video`).
        builder
            .codec_config()
            .add_h264(112.into(), Some(113.into()), true, 0xf4_00_1f);
    }
    let mut rtc = builder.build(Instant::now());
    for &addr in candidates {
        let tcp = tcp.then(|| {
            Candidate::builder()
                .tcp()
                .host(addr)
                .tcptype(TcpType::Passive)
                .build()
        });
        for c in std::iter::once(Candidate::host(addr, "udp")).chain(tcp) {
            match c {
                Ok(c) => {
                    rtc.add_local_candidate(c);
                }
                Err(e) => warn!("webrtc: bad candidate {addr}: {e}"),
            }
        }
    }
    let answer = rtc
        .sdp_api()
        .accept_offer(offer)
        .map_err(WebRtcError::Rejected)?;
    Ok((rtc, answer.to_sdp_string(), ufrag))
}

/// Random URL-safe token (ICE credentials, session ids).
pub fn random_token(len: usize) -> String {
    use rand::Rng;
    const ALPHABET: &[u8] = b"abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789";
    let mut rng = rand::rng();
    (0..len)
        .map(|_| ALPHABET[rng.random_range(0..ALPHABET.len())] as char)
        .collect()
}

/// The payloads of `codec` on an m-line that both sides can use, in the remote's order of
/// preference (H.264 only with packetization-mode 1).
fn offered(rtc: &Rtc, mid: Mid, codec: RtcCodec) -> Vec<str0m::format::PayloadParams> {
    let Some(media) = rtc.media(mid) else {
        return vec![];
    };
    let params = rtc.codec_config().params();
    media
        .remote_pts()
        .iter()
        .filter_map(|pt| {
            params.iter().find(|p| {
                p.pt() == *pt
                    && p.spec().codec == codec
                    && (codec != RtcCodec::H264 || p.spec().format.packetization_mode == Some(1))
            })
        })
        .copied()
        .collect()
}

/// The negotiated payload of `codec` on an m-line: the remote's first that both sides can
/// use (H.264 only with packetization-mode 1).
pub(crate) fn negotiated(
    rtc: &Rtc,
    mid: Mid,
    codec: RtcCodec,
) -> Option<str0m::format::PayloadParams> {
    offered(rtc, mid, codec).into_iter().next()
}

/// The video a viewer is sent: its codec and, for H.264, the profile (`profile_idc`, from
/// the stream's decoder configuration) the answer should name.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) struct VideoFormat {
    pub codec: Codec,
    pub h264_profile: Option<u8>,
}

impl VideoFormat {
    /// The format of a stream's video as configured (H.264 if it has none yet).
    pub fn of(video: Option<&crate::media::VideoConfig>) -> VideoFormat {
        let codec = video.map_or(Codec::H264, |v| v.codec);
        let h264_profile = video
            .filter(|v| v.codec == Codec::H264)
            .and_then(|v| v.record.get(1).copied());
        VideoFormat {
            codec,
            h264_profile,
        }
    }
}

/// The negotiated payload the viewer's video is sent with. For H.264: the offered payload
/// of the stream's own profile; else the least capable offered profile whose decoders must
/// also decode the stream's (a High stream to a browser that offers High 4:4:4 Predictive but
/// not High, as Chromium without hardware decoders does); else the first H.264 payload.
pub(crate) fn negotiated_video(
    rtc: &Rtc,
    mid: Mid,
    format: VideoFormat,
) -> Option<str0m::format::PayloadParams> {
    if format.codec == Codec::Vp8 {
        return negotiated(rtc, mid, RtcCodec::Vp8);
    }
    let h264 = offered(rtc, mid, RtcCodec::H264);
    // No profile-level-id means Baseline (RFC 6184: 42001f).
    let profile_of = |p: &str0m::format::PayloadParams| {
        (p.spec().format.profile_level_id.unwrap_or(0x42_00_1f) >> 16) as u8
    };
    let Some(want) = format.h264_profile else {
        return h264.first().copied();
    };
    h264.iter()
        .find(|p| profile_of(p) == want)
        .or_else(|| {
            h264.iter()
                .filter(|p| h264_decodes(profile_of(p), want))
                .min_by_key(|p| h264_rank(profile_of(p)))
        })
        .or(h264.first())
        .copied()
}

/// Where an H.264 profile sits in the chain of profiles whose decoders must decode the
/// profiles below (ITU-T H.264 A.2): Baseline < Main < High < High 10 < High 4:2:2 <
/// High 4:4:4 Predictive. Extended sits beside Main (it decodes Baseline only).
fn h264_rank(profile_idc: u8) -> u8 {
    match profile_idc {
        66 => 0,
        77 | 88 => 1,
        100 => 2,
        110 => 3,
        122 => 4,
        244 => 5,
        _ => u8::MAX,
    }
}

/// Whether a decoder of `offered` profile must decode a `stream` profile bitstream.
fn h264_decodes(offered: u8, stream: u8) -> bool {
    if offered == 88 || stream == 88 {
        return offered == stream || stream == 66;
    }
    h264_rank(offered) != u8::MAX && h264_rank(offered) >= h264_rank(stream)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_offer_that_makes_str0m_panic_is_refused_not_unwound() {
        // Found by fuzz/fuzz_targets/sdp_offer.rs: a payload type given two different H.264
        // formats on two bundled m-lines trips str0m's "Pt locked multiple times"
        // assertion inside accept_offer.
        let offer = [
        "v=0",
        "o=- 1 1 IN IP4 0.0.0.0",
        "s=-",
        "t=0 0",
        "a=group:BUNDLE v a",
        "m=video 9 UDP/TLS/RTP/SAVPF 123",
        "c=IN IP4 0.0.0.0",
        "a=mid:v",
        "a=sendrecv",
        "a=ice-ufrag:abcd",
        "a=ice-pwd:abcdefghijklmnopqrstuvwx",
        "a=fingerprint:sha-256 AA:AA:AA:AA:AA:AA:AA:AA:AA:AA:AA:AA:AA:AA:AA:AA:AA:AA:AA:AA:AA:AA:AA:AA:AA:AA:AA:AA:AA:AA:AA:AA",
        "a=setup:actpass",
        "a=rtpmap:123 H264/90000",
        "a=fmtp:123 level-asymmetry-allowed=1;packetization-mode=1;profile-level-id=42e01f",
        "m=audio 9 UDP/TLS/RTP/SAVPF 111",
        "c=IN IP4 0.0.0.0",
        "a=mid:a",
        "a=sendrecv",
        "a=ice-ufrag:abcd",
        "a=ice-pwd:abcdefghijklmnopqrstuvwx",
        "a=fingerprint:sha-256 AA:AA:AA:AA:AA:AA:AA:AA:AA:AA:AA:AA:AA:AA:AA:AA:AA:AA:AA:AA:AA:AA:AA:AA:AA:AA:AA:AA:AA:AA:AA:AA",
        "a=setup:actpass",
        "a=rtpmap:123 H264/90000",
        "a=fmtp:123 level-asymmetry-allowed=1;packetization-mode=1;profile-level-id=4d001f",
        "a=rtpmap:111 opus/48000/2",
        ]
        .map(|l| format!("{l}\r\n"))
        .concat();
        let cert = dtls_certificate().expect("a DTLS certificate");
        let addr: SocketAddr = "192.0.2.10:8189".parse().unwrap();
        for kind in [PeerKind::Publisher, PeerKind::Viewer] {
            let r = answer_offer(&offer, kind, &cert, &[addr], false);
            assert!(matches!(r, Err(WebRtcError::BadOffer(_))), "{kind:?}");
        }
    }

    #[test]
    fn h264_profiles_decode_the_ones_below_them() {
        assert!(h264_decodes(100, 100) && h264_decodes(244, 100) && h264_decodes(100, 77));
        assert!(h264_decodes(77, 66) && h264_decodes(88, 66));
        assert!(!h264_decodes(77, 100) && !h264_decodes(66, 77) && !h264_decodes(88, 77));
        assert!(!h264_decodes(100, 88) && !h264_decodes(1, 66));
    }

    #[test]
    fn offers_must_carry_a_codec_the_session_can_use() {
        let h264 = "m=video 9 UDP/TLS/RTP/SAVPF 96\r\na=rtpmap:96 H264/90000\r\n";
        let vp8 = "m=video 9 UDP/TLS/RTP/SAVPF 96\r\na=rtpmap:96 VP8/90000\r\n";
        let opus = "m=audio 9 UDP/TLS/RTP/SAVPF 111\r\na=rtpmap:111 opus/48000/2\r\n";
        assert!(check_viewer_codecs(h264, Codec::H264).is_ok());
        assert!(matches!(
            check_viewer_codecs(vp8, Codec::H264),
            Err(WebRtcError::MissingCodec("h264/90000"))
        ));
        assert!(check_viewer_codecs(vp8, Codec::Vp8).is_ok());
        assert!(
            check_viewer_codecs(opus, Codec::H264).is_err(),
            "viewers need video"
        );
        for offer in [h264, vp8, opus] {
            assert!(check_publisher_codecs(offer).is_ok());
        }
        assert!(check_publisher_codecs("m=video 9 RTP 96\r\na=rtpmap:96 AV1/90000\r\n").is_err());
    }
}
