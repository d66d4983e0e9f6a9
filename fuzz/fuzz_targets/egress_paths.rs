//! Egress destinations and recording names from the network (the API) as strings:
//! `egress::spec::RtmpUrl::parse` (with `redacted` and `tc_url`), `PathTemplate::parse`,
//! `render` with a stream's names and `confine` under a recording root.
//!
//! Input: one byte (bit 0: a URL, or a template then a newline and a stream key), then the
//! string.
//! Invariants: no panic; a parsed URL has a host, an app and a key, and its redacted form
//! shows no more of the key than its first two characters; a rendered template is
//! relative and without `..`; a confined path stays under the root.
#![no_main]

#[path = "common/mod.rs"]
mod common;

use std::path::Component;
use std::time::{Duration, SystemTime};

use libfuzzer_sys::fuzz_target;
use meshcast::egress::spec::{PathTemplate, RtmpUrl};
use meshcast::media::StreamKey;

fuzz_target!(|data: &[u8]| {
    let Some((&mode, rest)) = data.split_first() else {
        return;
    };
    let Ok(s) = std::str::from_utf8(rest) else {
        return;
    };
    if mode & 1 == 0 {
        if let Ok(u) = RtmpUrl::parse(s) {
            assert!(!u.host.is_empty() && !u.app.is_empty() && !u.key.is_empty());
            // All the redacted form shows of the key: its first two characters.
            let red = u.redacted();
            let shown: String = u.key.chars().take(2).collect();
            assert_eq!(
                red.rsplit_once('/').map(|(_, tail)| tail),
                Some(format!("{shown}***").as_str()),
                "redacted URL shows more of the key"
            );
            let _ = u.tc_url();
        }
        return;
    }
    let (template, key) = s.split_once('\n').unwrap_or((s, "live/cam"));
    let Ok(t) = PathTemplate::parse(template) else {
        return;
    };
    // Any key a publisher may use, or a simulcast layer of one.
    let Ok(key) = StreamKey::parse_relayable(key) else {
        return;
    };
    let start = SystemTime::UNIX_EPOCH + Duration::from_secs((mode as u64) << 24);
    let rel = t.render(&key, start, mode as u32, "mp4");
    assert!(
        rel.components().all(|c| matches!(c, Component::Normal(_))),
        "template {template:?} renders to {rel:?}"
    );
    common::assert_confined("paths", &rel);
});
