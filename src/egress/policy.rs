//! Where API-created egress may push: the `[egress]` destination policy.
//!
//! An RTMP egress makes the node open a TCP connection wherever the URL points, so an
//! unchecked API would let its caller scan the node's own network. The policy:
//! * `destinations` (an allow-list of URL patterns, `*` matching any run of characters):
//!   when set, only matching URLs are taken;
//! * with `[auth]` on and no list, destinations that resolve to loopback, private,
//!   link-local, unspecified or this node's own addresses are refused, unless
//!   `allow_private_destinations` is set.
//!
//! The address check runs on every (re)connect against the address actually dialled
//! ([`DestinationPolicy::resolve`] returns it), so a name that resolves to a public address
//! at creation and a private one later (DNS rebinding) is still refused.

use std::net::{IpAddr, SocketAddr};

use crate::auth::token::pattern_matches;

/// Why the policy refused a destination (the API answers 403 with it; a push that meets it
/// on a reconnect retries later).
#[derive(Debug, thiserror::Error)]
pub enum PolicyError {
    #[error("the destination is not in [egress] destinations")]
    NotListed,
    #[error("destination address {0} is loopback, private, link-local or this node's own (set [egress] allow_private_destinations or list it in destinations)")]
    NotPublic(IpAddr),
    #[error("cannot resolve {host}: {source}")]
    Resolve {
        host: String,
        source: std::io::Error,
    },
    #[error("{0} did not resolve")]
    NoAddress(String),
}

#[derive(Clone, Debug, Default)]
pub struct DestinationPolicy {
    /// URL patterns allowed; empty: any (subject to the address rule).
    pub patterns: Vec<String>,
    /// Refuse non-public addresses.
    pub public_only: bool,
    /// This node's own addresses (its listeners and announced IPs).
    pub own: Vec<IpAddr>,
}

impl DestinationPolicy {
    /// Checks a URL against the allow-list. The host (with its port, 1935 when left out)
    /// and the path are matched apart, so a `*` in a host pattern cannot reach into the
    /// path (`rtmp://*.cdn.example/*` does not take `rtmp://evil.example/x?.cdn.example/`).
    pub fn check_url(&self, url: &str) -> Result<(), PolicyError> {
        if self.patterns.is_empty()
            || self
                .patterns
                .iter()
                .any(|p| match (split_url(p), split_url(url)) {
                    (Some((ph, pp)), Some((uh, up))) => {
                        pattern_matches(&ph, &uh) && !uh.contains('/') && pattern_matches(pp, up)
                    }
                    _ => false,
                })
        {
            Ok(())
        } else {
            Err(PolicyError::NotListed)
        }
    }

    /// Checks an address the node is about to dial.
    pub fn check_addr(&self, addr: SocketAddr) -> Result<(), PolicyError> {
        if !self.public_only {
            return Ok(());
        }
        let ip = addr.ip().to_canonical();
        if !is_public(ip) || self.own.contains(&ip) {
            return Err(PolicyError::NotPublic(ip));
        }
        Ok(())
    }

    /// Resolves `host:port` and returns the first address that passes
    /// [`check_addr`](Self::check_addr): the caller must dial exactly that address.
    pub async fn resolve(&self, host: &str, port: u16) -> Result<SocketAddr, PolicyError> {
        let addrs: Vec<SocketAddr> = tokio::net::lookup_host((host, port))
            .await
            .map_err(|source| PolicyError::Resolve {
                host: host.to_string(),
                source,
            })?
            .collect();
        let mut last = PolicyError::NoAddress(host.to_string());
        for a in addrs {
            match self.check_addr(a) {
                Ok(()) => return Ok(a),
                Err(e) => last = e,
            }
        }
        Err(last)
    }
}

/// `rtmp://host[:port]/rest` → (`host:port`, `rest`), the port 1935 when left out.
fn split_url(url: &str) -> Option<(String, &str)> {
    let rest = url.strip_prefix("rtmp://")?;
    let (authority, path) = rest.split_once('/').unwrap_or((rest, ""));
    if authority.contains(['?', '#', '@']) {
        return None;
    }
    let has_port = match authority.rsplit_once(':') {
        Some((_, port)) => !port.contains(']'),
        None => false,
    };
    let authority = if has_port {
        authority.to_ascii_lowercase()
    } else {
        format!("{}:1935", authority.to_ascii_lowercase())
    };
    Some((authority, path))
}

/// Whether an address is routable on the public internet (not loopback, private,
/// link-local, shared, documentation, multicast, broadcast or unspecified).
pub fn is_public(ip: IpAddr) -> bool {
    match ip {
        IpAddr::V4(v4) => {
            let o = v4.octets();
            !(v4.is_loopback()
                || v4.is_private()
                || v4.is_link_local()
                || v4.is_unspecified()
                || v4.is_broadcast()
                || v4.is_multicast()
                || v4.is_documentation()
                || o[0] == 0
                || (o[0] == 100 && (o[1] & 0xc0) == 64) // 100.64/10, carrier-grade NAT
                || (o[0] == 198 && (o[1] & 0xfe) == 18) // 198.18/15, benchmarking
                || o[0] >= 240)
        }
        IpAddr::V6(v6) => {
            let seg = v6.segments();
            !(v6.is_loopback()
                || v6.is_unspecified()
                || v6.is_multicast()
                || (seg[0] & 0xfe00) == 0xfc00 // unique local
                || (seg[0] & 0xffc0) == 0xfe80 // link-local
                || (seg[0] == 0x2001 && seg[1] == 0x0db8)) // documentation
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn private_and_own_addresses_are_refused_when_public_only() {
        let p = DestinationPolicy {
            patterns: vec![],
            public_only: true,
            own: vec!["203.0.113.9".parse().unwrap()],
        };
        for bad in [
            "127.0.0.1:22",
            "10.1.2.3:1935",
            "192.168.0.1:1935",
            "172.16.0.1:1935",
            "169.254.169.254:80",
            "0.0.0.0:1935",
            "[::1]:1935",
            "[fe80::1]:1935",
            "[fd00::1]:1935",
            "[::ffff:127.0.0.1]:1935",
            "100.64.0.1:1935",
        ] {
            assert!(p.check_addr(bad.parse().unwrap()).is_err(), "{bad}");
        }
        assert!(p.check_addr("8.8.8.8:1935".parse().unwrap()).is_ok());
        assert!(p.check_addr("[2606:4700::1]:1935".parse().unwrap()).is_ok());
        let open = DestinationPolicy::default();
        assert!(open.check_addr("127.0.0.1:22".parse().unwrap()).is_ok());
    }

    #[test]
    fn allow_list_matches_whole_urls() {
        let p = DestinationPolicy {
            patterns: vec!["rtmp://*.cdn.example/*".into()],
            ..Default::default()
        };
        assert!(p.check_url("rtmp://eu.cdn.example/live/KEY").is_ok());
        assert!(p.check_url("rtmp://eu.cdn.example:1935/live/KEY").is_ok());
        assert!(p.check_url("rtmp://eu.cdn.example:2000/live/KEY").is_err());
        assert!(p.check_url("rtmp://x@eu.cdn.example/live/KEY").is_err());
        assert!(p
            .check_url("rtmp://evil.example/live/x?.cdn.example/")
            .is_err());
        assert!(p.check_url("rtmp://127.0.0.1:22/x/y").is_err());
    }
}
