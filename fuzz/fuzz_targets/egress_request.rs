//! The egress spec an API client (JSON body of `POST /api/egress`) or a config rule sends:
//! `serde_json` into `egress::EgressRequest`, then `validate`, then what a valid spec is used
//! for: `for_stream` on concrete streams and, for recordings, the template rendered and
//! confined under a recording root.
//!
//! Input: one byte (bit 0: from a config rule or the API), then the JSON.
//! Invariants: no panic; a valid RTMP spec's URL still parses with a real stream's names in
//! it; a valid size segment is at least one MiB; a confined path stays under the root.
#![no_main]

#[path = "common/mod.rs"]
mod common;

use std::time::{Duration, SystemTime};

use libfuzzer_sys::fuzz_target;
use meshcast::egress::spec::RtmpUrl;
use meshcast::egress::{EgressRequest, Target};
use meshcast::media::StreamKey;

fuzz_target!(|data: &[u8]| {
    let Some((&mode, json)) = data.split_first() else {
        return;
    };
    let Ok(req) = serde_json::from_slice::<EgressRequest>(json) else {
        return;
    };
    let Ok(spec) = req.validate(mode & 1 != 0) else {
        return;
    };
    for key in ["live/cam", "a-b/c_d.e"] {
        let key = StreamKey::parse(key).unwrap(); // valid keys
        let one = spec.for_stream(&key);
        match &one.target {
            Target::Rtmp(url) => {
                RtmpUrl::parse(url).expect("a validated URL parses for a real stream");
            }
            Target::Record {
                format,
                template,
                segment,
                segment_bytes,
                ..
            } => {
                if let Some(b) = segment_bytes {
                    assert!(*b >= 1 << 20, "segment of {b} bytes");
                }
                if let Some(d) = segment {
                    // The recorder compares it in i64 milliseconds.
                    assert!(d.as_millis() <= i64::MAX as u128, "segment of {d:?}");
                }
                let start = SystemTime::UNIX_EPOCH + Duration::from_secs(1_800_000_000);
                let rel = template.render(&key, start, 3, format.extension());
                common::assert_confined("root", &rel);
            }
        }
    }
});
