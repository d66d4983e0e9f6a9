//! `[webrtc]`: the one UDP (and TCP) port every WHIP and WHEP peer uses, the addresses
//! offered to clients, and the ICE servers handed to them.

use std::net::{IpAddr, SocketAddr};

use serde::Deserialize;

use super::read::{addr_or_off, ip, Problem, Problems};

#[derive(Clone, Debug)]
pub struct WebRtcConfig {
    /// The one UDP address every WebRTC peer uses; `None` disables WHIP/WHEP.
    pub listen: Option<SocketAddr>,
    /// Public IPs to offer as host candidates (with the listen port). Empty: the listen IP
    /// (loopback when listening on all addresses).
    pub announce_ips: Vec<IpAddr>,
    /// STUN/TURN URLs handed to clients in `Link` headers.
    pub ice_servers: Vec<String>,
    /// Also take ICE over TCP on the listen port (the fallback where UDP is blocked).
    pub tcp: bool,
    /// What WHEP viewers of a stream with B-frames get.
    pub bframes: BframePolicy,
}

/// `webrtc.bframes`: browsers' WebRTC decoders do not reorder frames, so a stream with
/// B-frames (OBS's default) plays as a near-frozen picture unless it is re-encoded.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum BframePolicy {
    /// Viewers get the stream's WebRTC rendition: re-encoded without B-frames once, where
    /// it is published, while someone watches (`"transcode"`, the default).
    #[default]
    Transcode,
    /// The WHEP offer is refused, saying why and what to change (`"refuse"`).
    Refuse,
}

impl Default for WebRtcConfig {
    fn default() -> Self {
        WebRtcConfig {
            listen: Some(SocketAddr::from(([0, 0, 0, 0], 8000))),
            announce_ips: vec![],
            ice_servers: vec![],
            tcp: true,
            bframes: BframePolicy::default(),
        }
    }
}

#[derive(Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawWebRtc {
    listen: Option<String>,
    #[serde(default)]
    announce_ips: Vec<String>,
    #[serde(default)]
    ice_servers: Vec<String>,
    tcp: Option<bool>,
    bframes: Option<String>,
}

pub(super) fn parse(raw: RawWebRtc, problems: &mut Problems) -> WebRtcConfig {
    let d = WebRtcConfig::default();
    let listen = addr_or_off(raw.listen, d.listen, "webrtc.listen", problems);
    let mut announce_ips = Vec::new();
    for (i, text) in raw.announce_ips.iter().enumerate() {
        let key = format!("webrtc.announce_ips[{i}]");
        match ip(text, &key, problems) {
            Some(a) if a.is_unspecified() => problems.push(Problem::new(
                &key,
                "must be an address clients can reach, not 0.0.0.0 or ::",
            )),
            Some(a) => announce_ips.push(a),
            None => {}
        }
    }
    for (i, url) in raw.ice_servers.iter().enumerate() {
        if !["stun:", "stuns:", "turn:", "turns:"]
            .iter()
            .any(|p| url.starts_with(p))
        {
            problems.push(Problem::new(
                &format!("webrtc.ice_servers[{i}]"),
                format!("`{url}` is not a stun:, stuns:, turn: or turns: URL"),
            ));
        }
    }
    let bframes = match raw.bframes.as_deref() {
        None => d.bframes,
        Some("transcode") => BframePolicy::Transcode,
        Some("refuse") => BframePolicy::Refuse,
        Some(other) => {
            problems.push(Problem::new(
                "webrtc.bframes",
                format!("`{other}` is not \"transcode\" or \"refuse\""),
            ));
            d.bframes
        }
    };
    WebRtcConfig {
        listen,
        announce_ips,
        ice_servers: raw.ice_servers,
        tcp: raw.tcp.unwrap_or(d.tcp),
        bframes,
    }
}
