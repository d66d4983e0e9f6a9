//! What WHIP and WHEP do with an SDP offer: the checks `create_whip`/`create_whep` make on
//! its text, then `webrtc::answer_offer` (str0m's `SdpOffer::from_sdp_string` and
//! `accept_offer` on an ICE-lite `Rtc` built as for a real peer), for each kind of peer.
//!
//! Input: one byte (the peer kind and whether TCP candidates are offered), then the offer.
//! Invariants: no panic escapes `answer_offer`; an accepted offer gives an answer str0m
//! itself parses back.
//!
//! str0m panics on some offers (see RESULTS.md); `answer_offer` contains them as the product
//! does, so this target replaces libFuzzer's abort-on-any-panic hook with one that prints
//! each new panic location once (`contained panic at ...` in the log) and lets
//! `catch_unwind` do its work. A panic that is not contained still aborts: libfuzzer-sys
//! aborts on any panic reaching it.
#![no_main]

use std::collections::HashSet;
use std::net::SocketAddr;
use std::sync::{Mutex, Once, OnceLock};

use libfuzzer_sys::fuzz_target;
use meshcast::webrtc::{answer_offer, dtls_certificate, PeerKind};

fuzz_target!(|data: &[u8]| {
    static CERT: OnceLock<str0m::config::DtlsCert> = OnceLock::new();
    let Some((&mode, rest)) = data.split_first() else {
        return;
    };
    let Ok(offer) = std::str::from_utf8(rest) else {
        return; // the HTTP handlers take the body as UTF-8 text
    };
    static HOOK: Once = Once::new();
    HOOK.call_once(|| {
        static SEEN: Mutex<Option<HashSet<String>>> = Mutex::new(None);
        std::panic::set_hook(Box::new(|info| {
            let at = info
                .location()
                .map(|l| format!("{}:{}", l.file(), l.line()))
                .unwrap_or_default();
            let mut seen = SEEN.lock().unwrap_or_else(|e| e.into_inner());
            if seen.get_or_insert_with(HashSet::new).insert(at.clone()) {
                eprintln!("contained panic at {at}: {info}");
            }
        }));
    });
    let cert = CERT.get_or_init(|| dtls_certificate().expect("a DTLS certificate"));
    let kind = match mode % 3 {
        0 => PeerKind::Publisher,
        1 => PeerKind::Viewer,
        _ => PeerKind::SimulcastViewer,
    };
    let lower = offer.to_ascii_lowercase();
    let wanted = match kind {
        PeerKind::Publisher => {
            lower.contains("h264/90000")
                || lower.contains("vp8/90000")
                || lower.contains("opus/48000")
        }
        _ => {
            lower.contains("m=video")
                && (lower.contains("h264/90000") || lower.contains("vp8/90000"))
        }
    };
    if !wanted {
        return;
    }
    let candidates: [SocketAddr; 2] = [
        "192.0.2.10:8189".parse().unwrap(),
        "[2001:db8::10]:8189".parse().unwrap(),
    ];
    if let Ok((_rtc, answer, ufrag)) =
        answer_offer(offer, kind, cert, &candidates, mode & 0x80 != 0)
    {
        assert!(!ufrag.is_empty());
        str0m::change::SdpAnswer::from_sdp_string(&answer).expect("our answer parses");
    }
});
