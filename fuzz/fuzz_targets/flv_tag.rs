//! FLV tag bodies (the payload of RTMP audio/video messages): `media::flv::parse_video_tag`
//! and `parse_audio_tag`, with the configuration records they carry handed on as the ingest
//! does (`avc::parse_decoder_config`, `aac::parse_audio_specific_config`).
//!
//! Input: one byte (bit 0: audio or video), then the tag body.
//! Invariants: no panic; a parsed tag's payload is a suffix of the body.
#![no_main]

use bytes::Bytes;
use libfuzzer_sys::fuzz_target;
use meshcast::media::{aac, avc, flv};

fuzz_target!(|data: &[u8]| {
    let Some((&which, body)) = data.split_first() else {
        return;
    };
    let body = Bytes::copy_from_slice(body);
    if which & 1 == 0 {
        match flv::parse_video_tag(&body) {
            Ok(flv::VideoTag::SequenceHeader(record)) => {
                assert!(body.ends_with(&record));
                let _ = avc::parse_decoder_config(&record);
            }
            Ok(flv::VideoTag::Frame { payload, .. }) => assert!(body.ends_with(&payload)),
            Ok(flv::VideoTag::EndOfSequence) | Err(_) => {}
        }
    } else {
        match flv::parse_audio_tag(&body) {
            Ok(flv::AudioTag::SequenceHeader(specific)) => {
                assert!(body.ends_with(&specific));
                let _ = aac::parse_audio_specific_config(&specific);
            }
            Ok(flv::AudioTag::Frame(payload)) => assert!(body.ends_with(&payload)),
            Err(_) => {}
        }
    }
});
