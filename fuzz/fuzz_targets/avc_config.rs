//! H.264 parameters from the network: `media::avc::parse_decoder_config` (the
//! AVCDecoderConfigurationRecord of an RTMP sequence header) and `avc::sps_picture_size`
//! (also reached by in-band SPS from WebRTC publishers).
//!
//! Input: one byte (bit 0: a whole record, or one SPS NAL unit), then the bytes.
//! Invariants: no panic; a parsed record's parameter sets lie inside it, and its size is
//! the size of its first SPS.
#![no_main]

use bytes::Bytes;
use libfuzzer_sys::fuzz_target;
use meshcast::media::avc;

fuzz_target!(|data: &[u8]| {
    let Some((&which, rest)) = data.split_first() else {
        return;
    };
    if which & 1 == 0 {
        let record = Bytes::copy_from_slice(rest);
        if let Ok(c) = avc::parse_decoder_config(&record) {
            let total: usize = c.sps.iter().chain(&c.pps).map(|s| s.len()).sum();
            assert!(total <= record.len());
            assert_eq!(avc::sps_picture_size(&c.sps[0]), Ok((c.width, c.height)));
        }
    } else {
        let _ = avc::sps_picture_size(rest);
        // Annex B splitting (transcoder output) of the same kind of bytes.
        for nal in avc::annexb_nalus(rest) {
            assert!(nal.len() <= rest.len());
        }
    }
});
