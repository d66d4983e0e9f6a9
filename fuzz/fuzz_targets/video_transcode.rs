//! H.264 from publishers into the WebRTC rendition: `transcode::VideoTranscoder` (FFmpeg's
//! H.264 decoder given the stream's AVCDecoderConfigurationRecord as extradata, then
//! libx264). The record and the frames are what an RTMP publisher sends.
//!
//! Input: a flags byte (bit 0: High rather than Main for the size hint), a 2-byte length
//! and the record, then frames, each a byte (bit 0: keyframe; bits 1-7: composition offset
//! in frames) and a 2-byte length and the AVCC payload.
//! Invariants: no panic; whatever comes out is H.264 in order, with dts = pts.
#![no_main]

use bytes::Bytes;
use libfuzzer_sys::fuzz_target;
use meshcast::media::{Codec, Frame, Timebase, VideoConfig};
use meshcast::transcode::VideoTranscoder;

fn take<'a>(data: &mut &'a [u8]) -> Option<&'a [u8]> {
    let (len, rest) = data.split_first_chunk::<2>()?;
    let len = u16::from_be_bytes(*len) as usize;
    let taken = rest.get(..len)?;
    *data = &rest[len..];
    Some(taken)
}

fuzz_target!(|data: &[u8]| {
    let mut data = data;
    let Some((_, rest)) = data.split_first() else {
        return;
    };
    data = rest;
    let Some(record) = take(&mut data) else {
        return;
    };
    let config = VideoConfig {
        codec: Codec::H264,
        record: Bytes::copy_from_slice(record),
        width: 160,
        height: 96,
    };
    let Ok(mut t) = VideoTranscoder::new(&config, Some(200_000)) else {
        return;
    };
    let mut last = i64::MIN;
    // Bounded: a few dozen frames per input keep each run short.
    for i in 0..48i64 {
        let Some((&flags, rest)) = data.split_first() else {
            break;
        };
        data = rest;
        let Some(payload) = take(&mut data) else {
            break;
        };
        let dts = i * 33;
        let frame = Frame {
            codec: Codec::H264,
            dts,
            pts: dts + (flags >> 1) as i64 * 33,
            timebase: Timebase::MILLIS,
            keyframe: flags & 1 == 1,
            payload: Bytes::copy_from_slice(payload),
        };
        if let Ok(out) = t.push(&frame) {
            for f in out {
                assert_eq!(f.codec, Codec::H264);
                assert_eq!(f.dts, f.pts);
                assert!(f.dts > last, "output in order");
                last = f.dts;
            }
        }
        if i == 20 {
            t.force_keyframe();
        }
    }
});
