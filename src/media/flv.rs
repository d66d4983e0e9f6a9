//! FLV tag bodies (the payload of RTMP audio/video messages and of FLV file tags) and FLV
//! file framing. Parsing turns untrusted tag bodies into frames and codec configuration;
//! building goes the other way. No I/O.

use std::collections::HashMap;

use bytes::{BufMut, Bytes, BytesMut};
use rml_amf0::Amf0Value;

use super::packet::{Encoding, Packet};
use super::{Frame, StreamConfig, TrackKind};

/// The FLV tag body of a packet's frame (the RTMP message payload). It holds no absolute
/// time, so a re-timed packet keeps it; RTMP ingest seeds it with what it received.
pub static BODY: Encoding<Bytes> = Encoding::timeless("flv body");
/// The complete FLV file tag of a packet's frame, with PreviousTagSize.
pub static TAG: Encoding<Bytes> = Encoding::new("flv tag");

/// The FLV tag body of `p`, built once per packet.
pub fn body_of(p: &Packet) -> &Bytes {
    BODY.get(p, |p| frame_body(&p.frame))
}

/// The FLV file tag of `p`, built once per packet.
pub fn tag_of(p: &Packet) -> &Bytes {
    TAG.get(p, |p| {
        let tag_type = match p.frame.track() {
            TrackKind::Video => TAG_VIDEO,
            TrackKind::Audio => TAG_AUDIO,
        };
        tag(tag_type, p.frame.dts_ms() as u32, body_of(p))
    })
}

pub const TAG_AUDIO: u8 = 8;
pub const TAG_VIDEO: u8 = 9;
pub const TAG_SCRIPT: u8 = 18;

const VIDEO_CODEC_AVC: u8 = 7;
const AUDIO_FORMAT_AAC: u8 = 10;
/// AAC, "44 kHz", 16-bit, stereo: the fixed first byte FLV uses for every AAC tag.
const AAC_TAG_BYTE: u8 = 0xaf;

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum FlvError {
    #[error("FLV {0} tag body truncated")]
    Truncated(&'static str),
    #[error("unsupported FLV video codec id {0} (only H.264/AVC is supported)")]
    VideoCodec(u8),
    #[error("unsupported FLV audio format {0} (only AAC is supported)")]
    AudioFormat(u8),
    #[error("unknown AVC packet type {0}")]
    AvcPacketType(u8),
}

/// A parsed FLV video tag body.
#[derive(Debug, PartialEq, Eq)]
pub enum VideoTag {
    /// AVCDecoderConfigurationRecord.
    SequenceHeader(Bytes),
    /// One access unit (AVCC NAL units); `cts` = pts − dts in milliseconds.
    Frame {
        keyframe: bool,
        cts: i32,
        payload: Bytes,
    },
    EndOfSequence,
}

/// A parsed FLV audio tag body.
#[derive(Debug, PartialEq, Eq)]
pub enum AudioTag {
    /// AudioSpecificConfig.
    SequenceHeader(Bytes),
    Frame(Bytes),
}

pub fn parse_video_tag(body: &Bytes) -> Result<VideoTag, FlvError> {
    let first = *body.first().ok_or(FlvError::Truncated("video"))?;
    let codec = first & 0x0f;
    let frame_type = first >> 4;
    if first & 0x80 != 0 || codec != VIDEO_CODEC_AVC {
        // Bit 7 set is enhanced RTMP (HEVC, AV1 ... by FourCC).
        return Err(FlvError::VideoCodec(codec));
    }
    if body.len() < 5 {
        return Err(FlvError::Truncated("video"));
    }
    let cts = i32::from_be_bytes([body[2], body[3], body[4], 0]) >> 8;
    match body[1] {
        0 => Ok(VideoTag::SequenceHeader(body.slice(5..))),
        1 => Ok(VideoTag::Frame {
            keyframe: frame_type == 1,
            cts,
            payload: body.slice(5..),
        }),
        2 => Ok(VideoTag::EndOfSequence),
        t => Err(FlvError::AvcPacketType(t)),
    }
}

pub fn parse_audio_tag(body: &Bytes) -> Result<AudioTag, FlvError> {
    let first = *body.first().ok_or(FlvError::Truncated("audio"))?;
    let format = first >> 4;
    if format != AUDIO_FORMAT_AAC {
        return Err(FlvError::AudioFormat(format));
    }
    match body.get(1) {
        None => Err(FlvError::Truncated("audio")),
        Some(0) => Ok(AudioTag::SequenceHeader(body.slice(2..))),
        Some(_) => Ok(AudioTag::Frame(body.slice(2..))),
    }
}

pub fn video_sequence_header_body(record: &[u8]) -> Bytes {
    let mut b = BytesMut::with_capacity(5 + record.len());
    b.put_slice(&[0x17, 0, 0, 0, 0]);
    b.put_slice(record);
    b.freeze()
}

pub fn audio_sequence_header_body(specific: &[u8]) -> Bytes {
    let mut b = BytesMut::with_capacity(2 + specific.len());
    b.put_slice(&[AAC_TAG_BYTE, 0]);
    b.put_slice(specific);
    b.freeze()
}

/// The FLV tag body of a frame (H.264 or AAC; empty for codecs FLV cannot carry, which
/// callers skip with [`super::Codec::fits_flv`]).
pub fn frame_body(frame: &Frame) -> Bytes {
    match frame.codec {
        super::Codec::H264 => {
            let cts = (frame.pts_ms() - frame.dts_ms()).clamp(-(1 << 23), (1 << 23) - 1) as i32;
            let mut b = BytesMut::with_capacity(5 + frame.payload.len());
            b.put_u8(if frame.keyframe { 0x17 } else { 0x27 });
            b.put_u8(1);
            b.put_slice(&cts.to_be_bytes()[1..]);
            b.put_slice(&frame.payload);
            b.freeze()
        }
        super::Codec::Aac => {
            let mut b = BytesMut::with_capacity(2 + frame.payload.len());
            b.put_slice(&[AAC_TAG_BYTE, 1]);
            b.put_slice(&frame.payload);
            b.freeze()
        }
        super::Codec::Opus | super::Codec::Vp8 => Bytes::new(),
    }
}

/// AMF0 `onMetaData` body describing a stream (the RTMP data message and the FLV script tag).
pub fn metadata_body(config: &StreamConfig) -> Bytes {
    let mut props = HashMap::new();
    let mut num = |k: &str, v: f64| {
        props.insert(k.to_string(), Amf0Value::Number(v));
    };
    if let Some(v) = &config.video {
        num("width", v.width as f64);
        num("height", v.height as f64);
        num("videocodecid", VIDEO_CODEC_AVC as f64);
    }
    if let Some(a) = config.audio.as_ref().filter(|a| a.codec.fits_flv()) {
        num("audiocodecid", AUDIO_FORMAT_AAC as f64);
        num("audiosamplerate", a.sample_rate as f64);
        num("audiochannels", a.channels as f64);
    }
    if let Some(r) = config.metadata.frame_rate {
        num("framerate", r);
    }
    if let Some(r) = config.metadata.video_bitrate_kbps {
        num("videodatarate", r);
    }
    if let Some(r) = config.metadata.audio_bitrate_kbps {
        num("audiodatarate", r);
    }
    if let Some(a) = config.audio.as_ref().filter(|a| a.codec.fits_flv()) {
        props.insert("stereo".into(), Amf0Value::Boolean(a.channels >= 2));
    }
    props.insert(
        "encoder".into(),
        Amf0Value::Utf8String(format!("meshcast {}", env!("CARGO_PKG_VERSION"))),
    );
    let values = vec![
        Amf0Value::Utf8String("onMetaData".into()),
        Amf0Value::Object(props),
    ];
    // Serializing numbers, booleans and strings cannot fail.
    Bytes::from(rml_amf0::serialize(&values).unwrap_or_default())
}

/// The 9-byte FLV file header followed by the first (zero) PreviousTagSize.
pub fn file_header(has_audio: bool, has_video: bool) -> Bytes {
    let flags = (has_audio as u8) << 2 | has_video as u8;
    Bytes::from(vec![b'F', b'L', b'V', 1, flags, 0, 0, 0, 9, 0, 0, 0, 0])
}

/// One FLV tag with its trailing PreviousTagSize.
pub fn tag(tag_type: u8, timestamp_ms: u32, body: &[u8]) -> Bytes {
    let mut b = BytesMut::with_capacity(11 + body.len() + 4);
    b.put_u8(tag_type);
    b.put_uint(body.len() as u64 & 0xff_ffff, 3);
    b.put_uint((timestamp_ms & 0xff_ffff) as u64, 3);
    b.put_u8((timestamp_ms >> 24) as u8);
    b.put_uint(0, 3);
    b.put_slice(body);
    b.put_u32(11 + body.len() as u32);
    b.freeze()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::media::{Codec, Timebase};

    #[test]
    fn parses_avc_frame_with_negative_composition_time() {
        let body = Bytes::from_static(&[0x27, 1, 0xff, 0xff, 0xd8, 0, 0, 0, 1, 0x41]);
        assert_eq!(
            parse_video_tag(&body).unwrap(),
            VideoTag::Frame {
                keyframe: false,
                cts: -40,
                payload: Bytes::from_static(&[0, 0, 0, 1, 0x41])
            }
        );
    }

    #[test]
    fn frame_body_round_trips() {
        let frame = Frame {
            codec: Codec::H264,
            dts: 1000,
            pts: 1080,
            timebase: Timebase::MILLIS,
            keyframe: true,
            payload: Bytes::from_static(&[0, 0, 0, 1, 0x65]),
        };
        let body = frame_body(&frame);
        assert_eq!(&body[..5], &[0x17, 1, 0, 0, 80]);
        assert_eq!(
            parse_video_tag(&body).unwrap(),
            VideoTag::Frame {
                keyframe: true,
                cts: 80,
                payload: frame.payload.clone()
            }
        );
    }

    #[test]
    fn rejects_other_codecs_and_truncation() {
        assert_eq!(
            parse_video_tag(&Bytes::from_static(&[0x12, 0])),
            Err(FlvError::VideoCodec(2))
        );
        assert_eq!(
            parse_video_tag(&Bytes::from_static(&[0x90, 0, 0, 0, 0])),
            Err(FlvError::VideoCodec(0))
        );
        assert!(parse_video_tag(&Bytes::from_static(&[0x17, 1, 0])).is_err());
        assert!(parse_video_tag(&Bytes::new()).is_err());
        assert_eq!(
            parse_audio_tag(&Bytes::from_static(&[0x2f, 1])),
            Err(FlvError::AudioFormat(2))
        );
        assert_eq!(
            parse_audio_tag(&Bytes::from_static(&[0xaf, 0, 0x12, 0x10])).unwrap(),
            AudioTag::SequenceHeader(Bytes::from_static(&[0x12, 0x10]))
        );
    }

    #[test]
    fn tag_layout_matches_flv_spec() {
        let t = tag(TAG_VIDEO, 0x0123_4567, &[0xaa, 0xbb]);
        assert_eq!(
            &t[..],
            &[9, 0, 0, 2, 0x23, 0x45, 0x67, 0x01, 0, 0, 0, 0xaa, 0xbb, 0, 0, 0, 13]
        );
        assert_eq!(&file_header(true, true)[..5], b"FLV\x01\x05");
    }
}
