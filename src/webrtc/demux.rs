//! Routing datagrams on the shared WebRTC UDP port to their peer (sans-IO).
//!
//! A peer's first packet is a STUN binding request whose USERNAME is
//! `<our ufrag>:<their ufrag>`; the ufrag was chosen by us when the session was created, so it
//! names the peer. From then on the peer's address is known and routes it.

use std::collections::HashMap;
use std::net::SocketAddr;

/// The local ufrag from a STUN binding request, if `packet` is one.
pub fn stun_local_ufrag(packet: &[u8]) -> Option<&str> {
    // RFC 8489: 20-byte header, first two bits zero, magic cookie 0x2112A442.
    if packet.len() < 20 || packet[0] & 0xc0 != 0 || packet[4..8] != [0x21, 0x12, 0xa4, 0x42] {
        return None;
    }
    let msg_type = u16::from_be_bytes([packet[0], packet[1]]);
    if msg_type != 0x0001 {
        return None; // only binding requests open a route
    }
    let len = u16::from_be_bytes([packet[2], packet[3]]) as usize;
    let body = packet.get(20..20 + len)?;
    let mut pos = 0;
    while pos + 4 <= body.len() {
        let attr = u16::from_be_bytes([body[pos], body[pos + 1]]);
        let alen = u16::from_be_bytes([body[pos + 2], body[pos + 3]]) as usize;
        let value = body.get(pos + 4..pos + 4 + alen)?;
        if attr == 0x0006 {
            let username = std::str::from_utf8(value).ok()?;
            return username.split(':').next();
        }
        pos += 4 + alen.div_ceil(4) * 4;
    }
    None
}

/// Routes from ufrags and addresses to peers of type `P`.
#[derive(Debug)]
pub struct Routes<P> {
    by_ufrag: HashMap<String, P>,
    by_addr: HashMap<SocketAddr, String>,
}

impl<P: Clone> Default for Routes<P> {
    fn default() -> Self {
        Routes {
            by_ufrag: HashMap::new(),
            by_addr: HashMap::new(),
        }
    }
}

impl<P: Clone> Routes<P> {
    pub fn insert(&mut self, ufrag: String, peer: P) {
        self.by_ufrag.insert(ufrag, peer);
    }

    pub fn remove(&mut self, ufrag: &str) {
        self.by_ufrag.remove(ufrag);
        self.by_addr.retain(|_, u| u != ufrag);
    }

    /// The peer a datagram from `from` belongs to, learning the address from STUN.
    pub fn route(&mut self, from: SocketAddr, packet: &[u8]) -> Option<P> {
        if let Some(peer) = self.by_addr.get(&from).and_then(|u| self.by_ufrag.get(u)) {
            return Some(peer.clone());
        }
        let ufrag = stun_local_ufrag(packet)?;
        let peer = self.by_ufrag.get(ufrag)?.clone();
        self.by_addr.insert(from, ufrag.to_string());
        Some(peer)
    }

    pub fn len(&self) -> usize {
        self.by_ufrag.len()
    }

    pub fn is_empty(&self) -> bool {
        self.by_ufrag.is_empty()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn binding_request(username: &str) -> Vec<u8> {
        let mut attrs = vec![];
        // A PRIORITY attribute first, to walk past it.
        attrs.extend_from_slice(&[0x00, 0x24, 0, 4, 1, 2, 3, 4]);
        attrs.extend_from_slice(&0x0006u16.to_be_bytes());
        attrs.extend_from_slice(&(username.len() as u16).to_be_bytes());
        attrs.extend_from_slice(username.as_bytes());
        while attrs.len() % 4 != 0 {
            attrs.push(0);
        }
        let mut p = vec![0x00, 0x01];
        p.extend_from_slice(&(attrs.len() as u16).to_be_bytes());
        p.extend_from_slice(&[0x21, 0x12, 0xa4, 0x42]);
        p.extend_from_slice(&[7; 12]);
        p.extend_from_slice(&attrs);
        p
    }

    #[test]
    fn reads_local_ufrag_from_binding_request() {
        assert_eq!(
            stun_local_ufrag(&binding_request("srv1:cli2")),
            Some("srv1")
        );
    }

    #[test]
    fn ignores_non_stun_and_truncated() {
        assert_eq!(stun_local_ufrag(&[0x80; 40]), None); // RTP
        assert_eq!(stun_local_ufrag(&[22, 254, 253, 0]), None); // DTLS
        let p = binding_request("a:b");
        for cut in 0..p.len() - 4 {
            assert_eq!(stun_local_ufrag(&p[..cut]), None, "cut {cut}");
        }
    }

    #[test]
    fn learns_address_from_stun_then_routes_everything() {
        let mut r = Routes::default();
        r.insert("srv1".into(), 42u32);
        let from: SocketAddr = "127.0.0.1:5000".parse().unwrap();
        assert_eq!(
            r.route(from, &[0x80, 0, 0]),
            None,
            "unknown address, not STUN"
        );
        assert_eq!(r.route(from, &binding_request("srv1:x")), Some(42));
        assert_eq!(r.route(from, &[0x80, 0, 0]), Some(42), "known address");
        assert_eq!(r.route(from, &binding_request("other:x")), Some(42));
        r.remove("srv1");
        assert_eq!(r.route(from, &[0x80, 0, 0]), None);
        assert!(r.is_empty());
    }
}
