//! Proof of the cluster token in the backbone hello: HMAC-SHA256 challenge-response.
//!
//! Owns the exact bytes each side signs ([`transcript`]) and the constant-time check of the
//! other side's proof. Neither side ever sends the token: each contributes a fresh random
//! nonce, and each proves with `HMAC-SHA256(token, transcript(side, ...))`, so a proof is
//! bound to both nonces (no replay into another session), to its side (no reflection of the
//! peer's own proof), to both hellos' identities (no splicing of identities) and to the TLS
//! session it travels in (a keying-material export both ends compute: a man-in-the-middle
//! terminating TLS on each side cannot pass one side's proof on to the other). An empty
//! token proves nothing and accepts nothing ([`ClusterKey::new`] returns `None`).
//!
//! Sans-IO and clock-free: nonces and the channel binding come in from the caller (the
//! quinn driver draws nonces from the OS generator and exports the binding from the TLS
//! session). Uses `ring::hmac`, already in the tree through rustls.

use bytes::BufMut;
use ring::hmac;

use super::session::{PeerInfo, Side};

/// Bytes of each side's nonce.
pub const NONCE_LEN: usize = 32;
/// Bytes of a proof (an HMAC-SHA256 tag).
pub const PROOF_LEN: usize = 32;

pub type Nonce = [u8; NONCE_LEN];
pub type Proof = [u8; PROOF_LEN];
/// 32 bytes both ends of one TLS session derive alike ([`CHANNEL_BINDING_LABEL`]).
pub type ChannelBinding = [u8; 32];

/// The TLS exporter label of the channel binding (RFC 5705 / RFC 8446 §7.5), empty context.
pub const CHANNEL_BINDING_LABEL: &[u8] = b"EXPORTER-meshcast-backbone-hello";

/// First bytes of every signed transcript: the protocol and its version, so a proof made
/// for anything else (another protocol sharing the secret, another version) never matches.
const CONTEXT: &[u8] = b"meshcast backbone v5 proof";

/// The cluster token as an HMAC key. Its `Debug` never shows the secret.
pub struct ClusterKey(hmac::Key);

impl std::fmt::Debug for ClusterKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("ClusterKey(..)")
    }
}

impl ClusterKey {
    /// `None` for an empty token: a node without a token authenticates nobody.
    pub fn new(token: &str) -> Option<ClusterKey> {
        (!token.is_empty()).then(|| ClusterKey(hmac::Key::new(hmac::HMAC_SHA256, token.as_bytes())))
    }

    /// `prover`'s proof for the session with these nonces and identities.
    pub fn prove(&self, prover: Side, hello: &Handshake<'_>) -> Proof {
        let tag = hmac::sign(&self.0, &transcript(prover, hello));
        let mut out = [0u8; PROOF_LEN];
        // An HMAC-SHA256 tag is exactly PROOF_LEN bytes.
        out.copy_from_slice(tag.as_ref());
        out
    }

    /// Whether `proof` is `prover`'s proof for this session (constant-time comparison).
    pub fn verify(&self, prover: Side, hello: &Handshake<'_>, proof: &Proof) -> bool {
        hmac::verify(&self.0, &transcript(prover, hello), proof).is_ok()
    }
}

/// What both sides said in the hello exchange, which every proof covers.
pub struct Handshake<'a> {
    pub channel: &'a ChannelBinding,
    pub dialer: &'a PeerInfo,
    pub dialer_nonce: &'a Nonce,
    pub acceptor: &'a PeerInfo,
    pub acceptor_nonce: &'a Nonce,
}

/// The signed bytes (documented in `docs/backbone-protocol.md`):
/// `CONTEXT | u8 side (1 dialer, 2 acceptor) | channel binding | dialer nonce |
/// acceptor nonce | dialer (str id, u8 role, str region) | acceptor (str id, u8 role,
/// str region)`.
pub fn transcript(prover: Side, h: &Handshake<'_>) -> Vec<u8> {
    let mut out = Vec::with_capacity(CONTEXT.len() + 1 + 2 * NONCE_LEN + 64);
    out.put_slice(CONTEXT);
    out.put_u8(match prover {
        Side::Dialer => 1,
        Side::Acceptor => 2,
    });
    out.put_slice(h.channel);
    out.put_slice(h.dialer_nonce);
    out.put_slice(h.acceptor_nonce);
    for p in [h.dialer, h.acceptor] {
        put_str(&mut out, &p.node_id);
        out.put_u8(super::wire::role_to_u8(p.role));
        put_str(&mut out, &p.region);
    }
    out
}

/// As on the wire: u16 length, then the bytes (the wire truncates strings to 1024 bytes, so
/// a longer one signs as it was sent).
fn put_str(out: &mut Vec<u8>, s: &str) {
    let s = super::wire::truncate_utf8(s, super::wire::MAX_STRING);
    out.put_u16(s.len() as u16);
    out.put_slice(s.as_bytes());
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::Role;

    fn peer(id: &str, role: Role) -> PeerInfo {
        PeerInfo {
            node_id: id.into(),
            role,
            region: "eu".into(),
        }
    }

    #[test]
    fn the_transcript_has_exact_bytes() {
        let (d, a) = (peer("e", Role::Edge), peer("o", Role::Origin));
        let h = Handshake {
            channel: &[5; 32],
            dialer: &d,
            dialer_nonce: &[1; NONCE_LEN],
            acceptor: &a,
            acceptor_nonce: &[2; NONCE_LEN],
        };
        let mut expected = CONTEXT.to_vec();
        expected.push(2);
        expected.extend([5; 32]);
        expected.extend([1; NONCE_LEN]);
        expected.extend([2; NONCE_LEN]);
        expected.extend([0, 1, b'e', 2, 0, 2, b'e', b'u']);
        expected.extend([0, 1, b'o', 1, 0, 2, b'e', b'u']);
        assert_eq!(transcript(Side::Acceptor, &h), expected);
    }

    #[test]
    fn a_proof_is_bound_to_key_side_nonces_and_identities() {
        let (d, a) = (peer("e", Role::Edge), peer("o", Role::Origin));
        let h = Handshake {
            channel: &[5; 32],
            dialer: &d,
            dialer_nonce: &[1; NONCE_LEN],
            acceptor: &a,
            acceptor_nonce: &[2; NONCE_LEN],
        };
        let key = ClusterKey::new("a-token-of-16-bytes").unwrap();
        let proof = key.prove(Side::Dialer, &h);
        assert!(key.verify(Side::Dialer, &h, &proof));
        assert!(!key.verify(Side::Acceptor, &h, &proof), "reflected");
        let other = ClusterKey::new("another-token-16b").unwrap();
        assert!(!other.verify(Side::Dialer, &h, &proof), "wrong key");
        let fresh = Handshake {
            acceptor_nonce: &[3; NONCE_LEN],
            ..h
        };
        assert!(!key.verify(Side::Dialer, &fresh, &proof), "replayed");
        let relayed = Handshake {
            channel: &[6; 32],
            ..h
        };
        assert!(
            !key.verify(Side::Dialer, &relayed, &proof),
            "other TLS session"
        );
        let liar = peer("o2", Role::Origin);
        let spliced = Handshake {
            acceptor: &liar,
            ..fresh
        };
        assert!(!key.verify(Side::Dialer, &spliced, &proof));
        assert!(ClusterKey::new("").is_none());
        assert_eq!(format!("{key:?}"), "ClusterKey(..)");
    }
}
