//! `[backbone]`: the QUIC links between nodes: where this node listens, whom it dials,
//! how links are authenticated (token, certificates), and the timings of pulls over them.

use std::net::{IpAddr, SocketAddr};
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::Deserialize;

use super::node::Role;
use super::read::{addr_or_off, addrs, ip, millis, Problem, Problems};

/// The UDP port origins listen on unless told otherwise.
pub const DEFAULT_PORT: u16 = 4433;

#[derive(Clone, Debug)]
pub struct BackboneConfig {
    /// UDP address the QUIC endpoint listens on (origins and standalone nodes).
    pub listen: Option<SocketAddr>,
    /// Other origins of the mesh (origins only).
    pub peers: Vec<SocketAddr>,
    /// Upstream origins in preference order (edges only).
    pub origins: Vec<SocketAddr>,
    /// Edges: the local IP their QUIC connections to origins are sent from (a host with
    /// several addresses picks its interface). `None`: any address of the first origin's
    /// family.
    pub bind: Option<IpAddr>,
    /// Shared cluster secret; each side of a link proves it knows it without sending it.
    /// Empty: the node authenticates nobody (see [`backbone_token_problem`]).
    pub token: String,
    /// PEM files. With `ca` set, peers' certificates are verified against it; without it
    /// nodes generate a self-signed certificate and authenticate each other by `token` only.
    pub cert: Option<PathBuf>,
    pub key: Option<PathBuf>,
    pub ca: Option<PathBuf>,
    /// How long a node keeps pulling a stream after its last viewer left.
    pub idle_grace: Duration,
    /// A link on which nothing at all arrived this long is declared dead and closed (QUIC
    /// keep-alives arrive several times within it), so pulls move to another upstream.
    pub link_timeout: Duration,
    /// How long a pull that lost its upstream keeps looking for another before it ends the
    /// stream for its viewers.
    pub rehome_window: Duration,
    /// An edge pulling from a less preferred origin moves back to a more preferred one once
    /// that has been linked this long (hold-down against flapping); zero: never.
    pub return_after: Duration,
    /// The links' QUIC congestion controller.
    pub congestion: Congestion,
}

/// Shortest `backbone.token` accepted when the backbone reaches beyond loopback: a
/// man-in-the-middle (no CA configured) who captures a proof could try tokens offline.
pub const MIN_BACKBONE_TOKEN: usize = 16;

/// The token policy. A node whose backbone listens on, or dials, a non-loopback address
/// needs a token of [`MIN_BACKBONE_TOKEN`] bytes or more; a node that dials anything needs
/// one at all (an empty token authenticates nobody, so its links could never come up). A
/// standalone node that only listens may start without one (the default, `meshcast run`
/// with no config), as may any node listening on loopback only: its backbone is then
/// closed, refusing every connection.
pub(super) fn backbone_token_problem(
    role: Role,
    token: &str,
    listen: Option<SocketAddr>,
    peers: &[SocketAddr],
    origins: &[SocketAddr],
) -> Option<Problem> {
    let dials: Vec<SocketAddr> = peers.iter().chain(origins).copied().collect();
    let exposed = listen
        .into_iter()
        .chain(dials.iter().copied())
        .find(|a| !a.ip().is_loopback());
    let advice = "set a random secret of 16 bytes or more, the same on every node (e.g. `openssl rand -hex 16`)";
    let why = |a: SocketAddr| match listen {
        Some(l) if l == a => format!("backbone.listen {a} is not a loopback address"),
        _ => format!("this node dials {a}, not a loopback address"),
    };
    if token.is_empty() {
        if let Some(first) = dials.first() {
            return Some(Problem::new(
                "backbone.token",
                format!(
                    "is empty, so no backbone link (to {first}, ...) can authenticate: {advice}"
                ),
            ));
        }
        return match exposed {
            // Only listening, no token: the backbone stays closed (logged at start). That
            // is the default standalone node, which must start without a config.
            Some(a) if role != Role::Standalone => Some(Problem::new(
                "backbone.token",
                format!("is empty and {}: {advice}", why(a)),
            )),
            _ => None,
        };
    }
    match exposed {
        Some(a) if token.len() < MIN_BACKBONE_TOKEN => Some(Problem::new(
            "backbone.token",
            format!("is {} bytes and {}: {advice}", token.len(), why(a)),
        )),
        _ => None,
    }
}

impl BackboneConfig {
    /// The defaults of a node in `role`: origins (and standalone nodes) listen, edges don't.
    pub fn default_for(role: Role) -> BackboneConfig {
        BackboneConfig {
            listen: role
                .is_origin()
                .then(|| SocketAddr::from(([0, 0, 0, 0], DEFAULT_PORT))),
            peers: vec![],
            origins: vec![],
            bind: None,
            token: String::new(),
            cert: None,
            key: None,
            ca: None,
            idle_grace: Duration::from_secs(5),
            link_timeout: Duration::from_millis(700),
            rehome_window: Duration::from_secs(5),
            return_after: Duration::from_secs(3),
            congestion: Congestion::default(),
        }
    }
}

/// QUIC congestion control on backbone links (`backbone.congestion`).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum Congestion {
    /// Model-based: random loss does not cut the rate. Measured: a 1.5 Mb/s stream over a
    /// 150 ms RTT, 2% loss link plays at full frame rate (Cubic: ~15%).
    #[default]
    Bbr,
    /// Loss-based (quinn's default).
    Cubic,
}

#[derive(Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawBackbone {
    listen: Option<String>,
    #[serde(default)]
    peers: Vec<String>,
    #[serde(default)]
    origins: Vec<String>,
    bind: Option<String>,
    token: Option<String>,
    cert: Option<String>,
    key: Option<String>,
    ca: Option<String>,
    idle_grace_ms: Option<u64>,
    link_timeout_ms: Option<u64>,
    rehome_window_ms: Option<u64>,
    return_after_ms: Option<u64>,
    congestion: Option<String>,
}

pub(super) fn parse(
    raw: RawBackbone,
    role: Role,
    base: &Path,
    problems: &mut Problems,
) -> BackboneConfig {
    let d = BackboneConfig::default_for(role);
    let listen = addr_or_off(raw.listen, d.listen, "backbone.listen", problems);
    let peers = addrs(raw.peers, "backbone.peers", problems);
    let origins = addrs(raw.origins, "backbone.origins", problems);
    let bind = raw
        .bind
        .as_deref()
        .and_then(|v| ip(v, "backbone.bind", problems));
    if let Some(ip) = bind {
        if role != Role::Edge {
            problems.push(Problem::new(
                "backbone.bind",
                "only edges bind their outgoing connections; an origin sends from backbone.listen",
            ));
        } else if origins.iter().any(|o| o.is_ipv4() != ip.is_ipv4()) {
            problems.push(Problem::new(
                "backbone.bind",
                format!("{ip} cannot reach every origin: their address families differ"),
            ));
        }
    }
    check_topology(role, listen, &peers, &origins, problems);
    let token = raw.token.unwrap_or_default();
    problems.extend(backbone_token_problem(
        role, &token, listen, &peers, &origins,
    ));
    let resolve = |p: Option<String>| p.map(|p| base.join(p));
    let cert = resolve(raw.cert);
    let key = resolve(raw.key);
    let ca = resolve(raw.ca);
    if cert.is_some() != key.is_some() {
        problems.push(Problem::new(
            "backbone.cert",
            "cert and key must be given together",
        ));
    }
    for (name, path) in [
        ("backbone.cert", &cert),
        ("backbone.key", &key),
        ("backbone.ca", &ca),
    ] {
        if let Some(p) = path {
            if !p.is_file() {
                problems.push(Problem::new(
                    name,
                    format!("file {} does not exist", p.display()),
                ));
            }
        }
    }
    let idle_grace = millis(
        raw.idle_grace_ms,
        d.idle_grace,
        "backbone.idle_grace_ms",
        0..=3_600_000,
        "must be at most one hour",
        problems,
    );
    let link_timeout = millis(
        raw.link_timeout_ms,
        d.link_timeout,
        "backbone.link_timeout_ms",
        300..=30_000,
        "must be between 300 and 30000 (keep-alives go every 150 ms)",
        problems,
    );
    let congestion = match raw.congestion.as_deref() {
        None | Some("bbr") => Congestion::Bbr,
        Some("cubic") => Congestion::Cubic,
        Some(_) => {
            problems.push(Problem::new(
                "backbone.congestion",
                "must be \"bbr\" or \"cubic\"",
            ));
            Congestion::default()
        }
    };
    let rehome_window = millis(
        raw.rehome_window_ms,
        d.rehome_window,
        "backbone.rehome_window_ms",
        0..=600_000,
        "must be at most ten minutes",
        problems,
    );
    let return_after = millis(
        raw.return_after_ms,
        d.return_after,
        "backbone.return_after_ms",
        0..=3_600_000,
        "must be at most an hour (0 turns returning off)",
        problems,
    );
    BackboneConfig {
        listen,
        peers,
        origins,
        bind,
        token,
        cert,
        key,
        ca,
        idle_grace,
        link_timeout,
        rehome_window,
        return_after,
        congestion,
    }
}

/// Who dials whom: edges list origins and do not listen; origins list peers (never
/// themselves) and listen.
fn check_topology(
    role: Role,
    listen: Option<SocketAddr>,
    peers: &[SocketAddr],
    origins: &[SocketAddr],
    problems: &mut Problems,
) {
    match role {
        Role::Edge => {
            if origins.is_empty() {
                problems.push(Problem::new(
                    "backbone.origins",
                    "an edge needs at least one origin address to pull from",
                ));
            }
            if !peers.is_empty() {
                problems.push(Problem::new(
                    "backbone.peers",
                    "only origins have mesh peers; an edge lists its upstreams in backbone.origins",
                ));
            }
            if listen.is_some() {
                problems.push(Problem::new(
                    "backbone.listen",
                    "an edge does not accept backbone connections",
                ));
            }
        }
        Role::Origin | Role::Standalone => {
            if !origins.is_empty() {
                problems.push(Problem::new(
                    "backbone.origins",
                    "only edges have upstream origins; origins list each other in backbone.peers",
                ));
            }
            if role == Role::Origin && listen.is_none() {
                problems.push(Problem::new(
                    "backbone.listen",
                    "an origin must listen for its peers and edges",
                ));
            }
            if let Some(l) = listen {
                if peers.contains(&l) {
                    problems.push(Problem::new(
                        "backbone.peers",
                        format!("lists this node's own address {l}"),
                    ));
                }
            }
        }
    }
}
