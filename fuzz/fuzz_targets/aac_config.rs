//! `media::aac::parse_audio_specific_config`: the AAC AudioSpecificConfig of an RTMP audio
//! sequence header.
//!
//! Invariants: no panic; a standard frequency index gives a standard rate.
#![no_main]

use libfuzzer_sys::fuzz_target;
use meshcast::media::aac;

fuzz_target!(|data: &[u8]| {
    if let Ok(c) = aac::parse_audio_specific_config(data) {
        assert!(c.object_type < 32);
    }
});
