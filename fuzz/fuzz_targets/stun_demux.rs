//! The WebRTC port's datagram router: `webrtc::demux::stun_local_ufrag` on arbitrary
//! datagrams and the `Routes` map learning addresses from them.
//!
//! Input: datagrams, each a source byte (which of 8 addresses sent it), a length byte and
//! the bytes. Two ufrags are registered; one is removed halfway.
//! Invariants: no panic; a ufrag found is a prefix of the USERNAME inside the packet; a
//! route goes only to a registered peer, and never to a removed one.
#![no_main]

use std::net::SocketAddr;

use libfuzzer_sys::fuzz_target;
use meshcast::webrtc::demux::{stun_local_ufrag, Routes};

fuzz_target!(|data: &[u8]| {
    let mut routes: Routes<u8> = Routes::default();
    routes.insert("abcd".into(), 1);
    routes.insert("wxyz".into(), 2);
    let mut r = data;
    let mut count = 0;
    while let [src, len, rest @ ..] = r {
        let n = (*len as usize).min(rest.len());
        let (packet, tail) = rest.split_at(n);
        r = tail;
        if let Some(ufrag) = stun_local_ufrag(packet) {
            assert!(!ufrag.contains(':'));
            // 20 header bytes and 4 of attribute header come before any value.
            let inside = ufrag.is_empty()
                || packet[24..]
                    .windows(ufrag.len())
                    .any(|w| w == ufrag.as_bytes());
            assert!(inside, "ufrag outside the attributes");
        }
        let from = SocketAddr::from(([10, 0, 0, src & 7], 5000 + (*src as u16 >> 3)));
        let peer = routes.route(from, packet);
        assert!(matches!(peer, None | Some(1) | Some(2)));
        count += 1;
        if count == 8 {
            routes.remove("wxyz");
        }
        if count > 8 {
            assert_ne!(peer, Some(2), "a removed peer is still routed");
        }
    }
});
