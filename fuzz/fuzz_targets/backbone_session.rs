//! The backbone control session (`backbone::session::ControlSession`), acceptor and dialer,
//! fed arbitrary bytes as a peer's control stream.
//!
//! Nonces and the channel binding are injected, so they are fixed here (the dialer's
//! `[1; 32]`, the acceptor's `[2; 32]`, a zero binding) and a seed recorded from a real
//! session (`examples/fuzz_seeds.rs`) carries a valid proof: from there the fuzzer explores
//! the ready state from raw bytes. Modes 2 and 3 start from a session already made ready by
//! a real peer, so the ready state is explored even without a seed.
//!
//! Input: one byte (bits 0-1: fresh acceptor, fresh dialer, ready acceptor, ready dialer;
//! bits 2-7: read size), then the peer's bytes. The ready dialer has asked for two streams
//! (ids 1 and 2); the acceptor accepts, rejects or ends what it is asked for.
//! Invariants: no panic; everything the session sends is well-formed control messages; a
//! session that returned an error stays closed.
#![no_main]

use libfuzzer_sys::fuzz_target;
use meshcast::backbone::session::{ControlSession, PeerInfo, SessionEvent};
use meshcast::backbone::wire::{self, ControlMessage, FrameDecoder};
use meshcast::config::Role;
use meshcast::media::StreamKey;

const TOKEN: &str = "a-cluster-token-of-32-characters";
const DIALER_NONCE: [u8; 32] = [1; 32];
const ACCEPTOR_NONCE: [u8; 32] = [2; 32];
const CHANNEL: [u8; 32] = [0; 32];

fn info(id: &str, role: Role) -> PeerInfo {
    PeerInfo {
        node_id: id.into(),
        role,
        region: "eu".into(),
    }
}

fn dialer() -> ControlSession {
    ControlSession::dialer(info("edge-1", Role::Edge), TOKEN, DIALER_NONCE, CHANNEL)
}

fn acceptor() -> ControlSession {
    ControlSession::acceptor(
        info("origin-a", Role::Origin),
        TOKEN,
        ACCEPTOR_NONCE,
        CHANNEL,
    )
}

/// A dialer and an acceptor after Hello, Challenge, Auth and Welcome.
fn ready_pair() -> (ControlSession, ControlSession) {
    let (mut d, mut a) = (dialer(), acceptor());
    for _ in 0..2 {
        let b = d.poll_transmit().unwrap(); // Hello, then Auth
        a.handle_input(&b).unwrap();
        let b = a.poll_transmit().unwrap(); // Challenge, then Welcome
        d.handle_input(&b).unwrap();
    }
    assert!(d.is_ready() && a.is_ready());
    (d, a)
}

fuzz_target!(|data: &[u8]| {
    let Some((&mode, bytes)) = data.split_first() else {
        return;
    };
    let mut s = match mode & 3 {
        0 => acceptor(),
        1 => dialer(),
        2 => ready_pair().1,
        _ => {
            let mut d = ready_pair().0;
            let key = StreamKey::new("live", "demo").unwrap(); // a valid key
            d.subscribe(key.clone()).unwrap(); // the dialer may subscribe
            d.subscribe(key).unwrap();
            d
        }
    };
    let mut sent = FrameDecoder::with_limit(wire::MAX_MESSAGE);
    drain(&mut s, &mut sent);
    let step = ((mode >> 2) as usize + 1) * 7;
    let mut n = 0u64;
    for read in bytes.chunks(step) {
        let events = match s.handle_input(read) {
            Ok(events) => events,
            Err(_) => {
                assert!(
                    s.handle_input(b"").is_err(),
                    "a failed session stays closed"
                );
                drain(&mut s, &mut sent);
                return;
            }
        };
        for ev in events {
            n += 1;
            match ev {
                SessionEvent::SubscribeRequested { id, .. } => match n % 3 {
                    0 => drop(s.accept(id, n)),
                    1 => drop(s.reject(id, 404, "no such stream")),
                    _ => {
                        let _ = s.accept(id, n);
                        let _ = s.done(id, 0, "ended");
                    }
                },
                SessionEvent::SubscribeAccepted { id, .. } => {
                    let _ = s.request_keyframe(id);
                    if n % 2 == 0 {
                        let _ = s.unsubscribe(id);
                    }
                }
                _ => {}
            }
        }
        drain(&mut s, &mut sent);
    }
});

/// Takes what the session sends and checks that it is whole, decodable control messages.
fn drain(s: &mut ControlSession, sent: &mut FrameDecoder) {
    while let Some(b) = s.poll_transmit() {
        sent.push(&b);
    }
    while let Some((t, body)) = sent
        .next_frame()
        .expect("the session sends framed messages")
    {
        ControlMessage::decode(t, body).expect("the session sends valid messages");
    }
    assert_eq!(sent.buffered(), 0, "the session sends whole messages");
}
