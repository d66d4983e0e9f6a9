//! The auth token path of every publish and play: `auth::split_query` on the RTMP stream
//! key, `auth::token_from_query` on its query (and on HTTP query strings), and
//! `auth::token::Keys::verify` on whatever string that gives.
//!
//! Input: the stream key or query string as a client sends it.
//! Invariants: no panic; `split_query` splits at the first `?` and loses nothing; a token
//! is accepted only if its signed part is one this node minted (the seed corpus holds one,
//! valid until 2100): no algorithm confusion, no unsigned token.
#![no_main]

use std::sync::OnceLock;

use libfuzzer_sys::fuzz_target;
use meshcast::auth::token::{Action, Claims, Keys, OneOrMany};

/// The secret the seed token was minted with.
const SECRET: &str = "fuzz-secret-of-at-least-32-bytes!";

fn keys() -> &'static (Keys, String) {
    static KEYS: OnceLock<(Keys, String)> = OnceLock::new();
    KEYS.get_or_init(|| {
        let keys = Keys::new(&[SECRET.to_string()], &[] as &[&str]).expect("HMAC keys");
        let minted = keys
            .mint(&Claims {
                act: OneOrMany::One(Action::Publish),
                streams: vec!["live/*".into()],
                exp: 4_102_444_800,
                nbf: None,
                iat: None,
                sub: Some("fuzz".into()),
                room: None,
                name: None,
                ns: None,
            })
            .expect("a token");
        (keys, minted)
    })
}

fuzz_target!(|data: &[u8]| {
    let Ok(s) = std::str::from_utf8(data) else {
        return;
    };
    let (keys, minted) = keys();
    let (name, query) = meshcast::auth::split_query(s);
    if s.contains('?') {
        assert_eq!(format!("{name}?{query}"), s);
        assert!(!name.contains('?'));
    } else {
        assert_eq!((name, query), (s, ""));
    }
    let mut tokens = vec![s.to_string()];
    tokens.extend(meshcast::auth::token_from_query(query));
    for t in tokens {
        if let Ok(claims) = keys.verify(&t) {
            let signed = |t: &str| t.rsplit_once('.').map(|(a, _)| a.to_string());
            assert_eq!(
                signed(&t),
                signed(minted),
                "accepted a token this node did not sign"
            );
            let _ = claims.covers("live/cam");
        }
    }
});
