//! Node configuration: TOML on disk → a validated, typed [`Config`].
//!
//! Parsing happens in two passes so that `meshcast check-config` can report *every* problem
//! at once: each section is deserialized on its own (a type error in `[rtmp]` does not hide
//! one in `[http]`), then the semantic rules (roles, addresses, peers) are checked over the
//! whole. Every problem names the file, the key and the reason. Nothing here does I/O beyond
//! reading the file.

use std::fmt;
use std::net::{IpAddr, SocketAddr};
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::de::DeserializeOwned;
use serde::Deserialize;

/// What a node does in the tree.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Deserialize, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Role {
    /// Takes publishers, joins the origin mesh, serves edges (and viewers).
    Origin,
    /// Serves viewers, pulling streams from its origins on demand.
    Edge,
    /// Origin and edge in one process; the default with no config file.
    Standalone,
}

impl Role {
    pub fn as_str(self) -> &'static str {
        match self {
            Role::Origin => "origin",
            Role::Edge => "edge",
            Role::Standalone => "standalone",
        }
    }

    /// Whether this node accepts publishers and belongs to the origin mesh.
    pub fn is_origin(self) -> bool {
        matches!(self, Role::Origin | Role::Standalone)
    }
}

/// A fully validated configuration.
#[derive(Clone, Debug)]
pub struct Config {
    pub node: NodeConfig,
    pub rtmp: RtmpConfig,
    pub http: HttpConfig,
    pub backbone: BackboneConfig,
    pub webrtc: WebRtcConfig,
    pub limits: Limits,
    /// Where recordings go (`[recording] root`).
    pub recording_root: PathBuf,
    /// Recordings stop for good when the disk has less free space than this.
    pub recording_min_free_bytes: u64,
    /// What old recordings are deleted (`[recording] max_age_hours`, `max_total_mb`).
    pub recording_retention: Retention,
    /// Static egress rules (`[[egress]]` or `[[egress.rule]]`).
    pub egress: Vec<crate::egress::EgressSpec>,
    /// Where egress may push (`[egress]` table).
    pub egress_policy: EgressPolicy,
    /// Tokens, the auth webhook, the metrics token (`[auth]`).
    pub auth: crate::auth::AuthConfig,
    /// Where publish/play events are POSTed (`[hooks] events`).
    pub events_hook: Option<String>,
}

/// Which finished recordings are deleted: older than `max_age`, then the oldest while the
/// total is above `max_total_bytes`. `None`: no such rule.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Retention {
    pub max_age: Option<Duration>,
    pub max_total_bytes: Option<u64>,
}

/// `[egress] destinations`, `allow_private_destinations`, `max_jobs`.
#[derive(Clone, Debug)]
pub struct EgressPolicy {
    /// Allowed RTMP destinations (`rtmp://*.cdn.example/*`); empty: any public address.
    pub destinations: Vec<String>,
    /// Let egress push to loopback, private and link-local addresses under `[auth]`.
    pub allow_private_destinations: bool,
    /// API-created and rule egress jobs at most.
    pub max_jobs: usize,
}

impl Default for EgressPolicy {
    fn default() -> Self {
        EgressPolicy {
            destinations: vec![],
            allow_private_destinations: false,
            max_jobs: 64,
        }
    }
}

#[derive(Clone, Debug)]
pub struct WebRtcConfig {
    /// The one UDP address every WebRTC peer uses; `None` disables WHIP/WHEP.
    pub listen: Option<SocketAddr>,
    /// Public IPs to offer as host candidates (with the listen port). Empty: the listen IP
    /// (loopback when listening on all addresses).
    pub announce_ips: Vec<std::net::IpAddr>,
    /// STUN/TURN URLs handed to clients in `Link` headers.
    pub ice_servers: Vec<String>,
    /// Also take ICE over TCP on the listen port (the fallback where UDP is blocked).
    pub tcp: bool,
}

#[derive(Clone, Debug)]
pub struct NodeConfig {
    pub id: String,
    pub region: String,
    pub role: Role,
    /// Viewers this node is sized for: routing counts a node this full as fully loaded.
    pub max_viewers: u32,
}

#[derive(Clone, Debug)]
pub struct RtmpConfig {
    /// `None` disables the RTMP listener.
    pub listen: Option<SocketAddr>,
    /// Outbound RTMP chunk size (bytes).
    pub chunk_size: u32,
    /// Merged write interval for players (SRS's `mw_latency`): fewer, larger writes per
    /// viewer at the cost of up to this much added latency. Zero writes every frame at once.
    pub merged_write: Duration,
    /// Base URL publishers and players are sent to (route API), e.g. `rtmp://eu1.example.com:1935`.
    pub public_url: Option<String>,
    /// A connection that is not playing and sends nothing this long is closed (a silent
    /// publisher frees its name).
    pub idle_timeout: Duration,
    /// Largest audio/video message a peer may announce.
    pub max_message_bytes: usize,
}

#[derive(Clone, Debug)]
pub struct HttpConfig {
    pub listen: Option<SocketAddr>,
    /// Base URL other nodes redirect clients to (route API, 307s), e.g. `https://eu1.example.com`.
    pub public_url: Option<String>,
    /// Concurrent HTTP connections (HTTP-FLV viewers included).
    pub max_connections: usize,
    /// A client must send a request's headers within this time (slowloris).
    pub header_timeout: Duration,
    /// A keep-alive connection with no request in flight is closed after this time.
    pub idle_timeout: Duration,
}

impl Config {
    /// This node's HTTP base URL as the route API hands it out.
    pub fn public_http_url(&self) -> String {
        public_url(self.http.public_url.as_ref(), self.http.listen, "http")
    }

    /// This node's RTMP base URL as the route API hands it out.
    pub fn public_rtmp_url(&self) -> String {
        public_url(self.rtmp.public_url.as_ref(), self.rtmp.listen, "rtmp")
    }
}

/// The configured public URL, else one made from the listen address (a wildcard address
/// becomes loopback: set `public_url` on multi-host clusters).
fn public_url(configured: Option<&String>, listen: Option<SocketAddr>, scheme: &str) -> String {
    if let Some(u) = configured {
        return u.trim_end_matches('/').to_string();
    }
    match listen {
        Some(a) if a.ip().is_unspecified() => format!("{scheme}://127.0.0.1:{}", a.port()),
        Some(a) => format!("{scheme}://{a}"),
        None => String::new(),
    }
}

const DEFAULT_LINK_TIMEOUT_MS: u64 = 700;
const DEFAULT_RTMP_IDLE_MS: u64 = 10_000;
const DEFAULT_MIN_FREE_MB: u64 = 256;
const DEFAULT_HTTP_HEADER_MS: u64 = 10_000;
const DEFAULT_HTTP_IDLE_MS: u64 = 60_000;
/// Shortest HS256 secret accepted (bytes).
const MIN_SECRET_BYTES: usize = 16;
const DEFAULT_REHOME_WINDOW_MS: u64 = 5000;
const DEFAULT_RETURN_AFTER_MS: u64 = 3000;

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
fn backbone_token_problem(
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

/// Queue sizes and timeouts that bound memory and decide when a consumer is too slow.
#[derive(Clone, Debug)]
pub struct Limits {
    /// Frames the per-stream fan-out ring holds; a consumer further behind skips to the next
    /// keyframe.
    pub stream_buffer_frames: usize,
    /// How many times a consumer may fall behind within a minute before it is disconnected.
    pub max_lag_events: u32,
    /// A single write to a viewer that blocks this long disconnects the viewer.
    pub viewer_write_timeout: Duration,
    /// Upper bound on the bytes a GOP cache holds; a longer GOP is not cached.
    pub gop_cache_max_bytes: usize,
    /// Concurrent RTMP connections accepted.
    pub max_rtmp_connections: usize,
    /// Kernel send buffer of each viewer socket (SO_SNDBUF). Bounds kernel memory per viewer
    /// and how long a stalled viewer takes to be noticed; 0 keeps the kernel's autotuning.
    pub viewer_send_buffer_bytes: usize,
    /// How long a viewer of a name nobody publishes yet waits for it before "not found".
    pub play_wait: Duration,
    /// How long a local stream whose publisher left is kept for it to come back (viewers,
    /// egress and other nodes' pulls carry on); 0 ends it at once.
    pub publisher_hold: Duration,
    /// Local publishes at most, node-wide and per namespace.
    pub max_streams: usize,
    pub max_streams_per_namespace: usize,
    /// Viewers (RTMP, HTTP-FLV, WHEP) at most, node-wide and per stream.
    pub max_viewers: usize,
    pub max_viewers_per_stream: usize,
    /// WHIP and WHEP sessions at most (connected or still connecting).
    pub max_webrtc_sessions: usize,
}

impl Default for Limits {
    fn default() -> Self {
        Limits {
            stream_buffer_frames: 1024,
            max_lag_events: 3,
            viewer_write_timeout: Duration::from_secs(10),
            gop_cache_max_bytes: 32 << 20,
            max_rtmp_connections: 20_000,
            viewer_send_buffer_bytes: 1 << 20,
            play_wait: Duration::from_secs(1),
            publisher_hold: Duration::from_secs(5),
            max_streams: 1000,
            max_streams_per_namespace: 1000,
            max_viewers: 20_000,
            max_viewers_per_stream: 20_000,
            max_webrtc_sessions: 5000,
        }
    }
}

impl Config {
    /// The configuration of a node started with no file: standalone on the default ports.
    pub fn standalone_default() -> Config {
        Config {
            node: NodeConfig {
                id: "standalone".into(),
                region: "local".into(),
                role: Role::Standalone,
                max_viewers: 1000,
            },
            rtmp: RtmpConfig {
                listen: Some(SocketAddr::from(([0, 0, 0, 0], 1935))),
                chunk_size: 4096,
                merged_write: Duration::from_millis(200),
                public_url: None,
                idle_timeout: Duration::from_millis(DEFAULT_RTMP_IDLE_MS),
                max_message_bytes: crate::rtmp::guard::GuardLimits::default().max_media_message,
            },
            http: HttpConfig {
                listen: Some(SocketAddr::from(([0, 0, 0, 0], 8080))),
                public_url: None,
                max_connections: 20_000,
                header_timeout: Duration::from_millis(DEFAULT_HTTP_HEADER_MS),
                idle_timeout: Duration::from_millis(DEFAULT_HTTP_IDLE_MS),
            },
            backbone: BackboneConfig {
                listen: Some(SocketAddr::from(([0, 0, 0, 0], 4433))),
                peers: vec![],
                origins: vec![],
                bind: None,
                token: String::new(),
                cert: None,
                key: None,
                ca: None,
                idle_grace: Duration::from_secs(5),
                link_timeout: Duration::from_millis(DEFAULT_LINK_TIMEOUT_MS),
                rehome_window: Duration::from_millis(DEFAULT_REHOME_WINDOW_MS),
                return_after: Duration::from_millis(DEFAULT_RETURN_AFTER_MS),
                congestion: Congestion::default(),
            },
            webrtc: WebRtcConfig {
                listen: Some(SocketAddr::from(([0, 0, 0, 0], 8000))),
                announce_ips: vec![],
                ice_servers: vec![],
                tcp: true,
            },
            limits: Limits::default(),
            recording_root: PathBuf::from("recordings"),
            recording_min_free_bytes: DEFAULT_MIN_FREE_MB << 20,
            recording_retention: Retention::default(),
            egress: vec![],
            egress_policy: EgressPolicy::default(),
            auth: crate::auth::AuthConfig::default(),
            events_hook: None,
        }
    }

    /// Reads and validates a config file.
    pub fn load(path: &Path) -> Result<Config, ConfigErrors> {
        let text = std::fs::read_to_string(path).map_err(|e| ConfigErrors {
            file: path.display().to_string(),
            problems: vec![Problem::new("", format!("cannot read file: {e}"))],
        })?;
        let base = path.parent().unwrap_or(Path::new("."));
        Config::parse(&text, &path.display().to_string(), base)
    }

    /// Parses config text; `file` names it in errors, relative paths resolve against `base`.
    pub fn parse(text: &str, file: &str, base: &Path) -> Result<Config, ConfigErrors> {
        let mut problems = Vec::new();
        let table: toml::Table = match text.parse() {
            Ok(t) => t,
            Err(e) => {
                return Err(ConfigErrors {
                    file: file.into(),
                    problems: vec![Problem::new("", format!("not valid TOML: {e}"))],
                })
            }
        };
        for key in table.keys() {
            if ![
                "node",
                "rtmp",
                "http",
                "backbone",
                "webrtc",
                "limits",
                "recording",
                "egress",
                "auth",
                "hooks",
            ]
            .contains(&key.as_str())
            {
                problems.push(Problem::new(
                    key,
                    "unknown section (expected node, rtmp, http, backbone, webrtc, limits, recording, auth, hooks or egress)",
                ));
            }
        }
        let node: RawNode = section(&table, "node", &mut problems);
        let rtmp: RawRtmp = section(&table, "rtmp", &mut problems);
        let http: RawHttp = section(&table, "http", &mut problems);
        let backbone: RawBackbone = section(&table, "backbone", &mut problems);
        let limits: RawLimits = section(&table, "limits", &mut problems);
        let webrtc: RawWebRtc = section(&table, "webrtc", &mut problems);
        let recording: RawRecording = section(&table, "recording", &mut problems);
        let recording_root = recording
            .root
            .map(|r| base.join(r))
            .unwrap_or_else(|| PathBuf::from("recordings"));
        for (key, v, max) in [
            ("recording.min_free_mb", recording.min_free_mb, 1u64 << 30),
            (
                "recording.max_age_hours",
                recording.max_age_hours,
                24 * 365 * 100,
            ),
            ("recording.max_total_mb", recording.max_total_mb, 1u64 << 40),
        ] {
            if v.is_some_and(|v| v > max) {
                problems.push(Problem::new(key, format!("must be at most {max}")));
            }
        }
        let (egress, egress_policy) = egress_section(&table, &mut problems);
        let raw_auth: RawAuth = section(&table, "auth", &mut problems);
        let hooks: RawHooks = section(&table, "hooks", &mut problems);
        let auth = auth_section(raw_auth, base, &mut problems);
        if let Some(url) = &hooks.events {
            if let Err(e) = crate::auth::webhook::HookUrl::parse(url) {
                problems.push(Problem::new("hooks.events", e));
            }
        }

        let defaults = Config::standalone_default();
        let role = node.role.unwrap_or(Role::Standalone);
        let id = node.id.unwrap_or_else(|| role.as_str().to_string());
        if id.is_empty() || id.len() > 64 || !id.chars().all(valid_name_char) {
            problems.push(Problem::new(
                "node.id",
                "must be 1-64 characters of A-Z a-z 0-9 _ - .",
            ));
        }
        let region = node.region.unwrap_or_else(|| "default".into());
        if region.is_empty() || region.len() > 64 || !region.chars().all(valid_name_char) {
            problems.push(Problem::new(
                "node.region",
                "must be 1-64 characters of A-Z a-z 0-9 _ - .",
            ));
        }

        let max_viewers = node.max_viewers.unwrap_or(1000);
        if max_viewers == 0 {
            problems.push(Problem::new("node.max_viewers", "must be at least 1"));
        }
        for (field, url, schemes) in [
            (
                "http.public_url",
                &http.public_url,
                &["http://", "https://"][..],
            ),
            ("rtmp.public_url", &rtmp.public_url, &["rtmp://"][..]),
        ] {
            if let Some(u) = url {
                if !schemes.iter().any(|s| u.starts_with(s)) || u.contains(char::is_whitespace) {
                    problems.push(Problem::new(
                        field,
                        format!("must be a URL starting with {}", schemes.join(" or ")),
                    ));
                }
            }
        }

        let rtmp_listen = addr_or_off(
            rtmp.listen,
            defaults.rtmp.listen,
            "rtmp.listen",
            &mut problems,
        );
        let chunk_size = rtmp.chunk_size.unwrap_or(defaults.rtmp.chunk_size);
        if !(128..=65536).contains(&chunk_size) {
            problems.push(Problem::new(
                "rtmp.chunk_size",
                "must be between 128 and 65536",
            ));
        }
        let merged_write_ms = rtmp.merged_write_ms.unwrap_or(200);
        if merged_write_ms > 1000 {
            problems.push(Problem::new(
                "rtmp.merged_write_ms",
                "must be at most 1000 (it adds that much latency)",
            ));
        }
        let rtmp_idle_ms = rtmp.idle_timeout_ms.unwrap_or(DEFAULT_RTMP_IDLE_MS);
        if !(1000..=600_000).contains(&rtmp_idle_ms) {
            problems.push(Problem::new(
                "rtmp.idle_timeout_ms",
                "must be between 1000 and 600000",
            ));
        }
        let max_message_bytes = rtmp
            .max_message_bytes
            .unwrap_or(defaults.rtmp.max_message_bytes);
        if !(65_536..=0xFF_FFFF).contains(&max_message_bytes) {
            problems.push(Problem::new(
                "rtmp.max_message_bytes",
                "must be between 65536 and 16777215",
            ));
        }
        let http_max_connections = http
            .max_connections
            .unwrap_or(defaults.http.max_connections);
        if http_max_connections == 0 {
            problems.push(Problem::new("http.max_connections", "must be at least 1"));
        }
        let header_timeout_ms = http.header_timeout_ms.unwrap_or(DEFAULT_HTTP_HEADER_MS);
        if !(100..=120_000).contains(&header_timeout_ms) {
            problems.push(Problem::new(
                "http.header_timeout_ms",
                "must be between 100 and 120000",
            ));
        }
        let http_idle_ms = http.idle_timeout_ms.unwrap_or(DEFAULT_HTTP_IDLE_MS);
        if !(1000..=3_600_000).contains(&http_idle_ms) {
            problems.push(Problem::new(
                "http.idle_timeout_ms",
                "must be between 1000 and 3600000",
            ));
        }
        let http_listen = addr_or_off(
            http.listen,
            defaults.http.listen,
            "http.listen",
            &mut problems,
        );

        let bb_default_listen = if role.is_origin() {
            defaults.backbone.listen
        } else {
            None
        };
        let bb_listen = addr_or_off(
            backbone.listen,
            bb_default_listen,
            "backbone.listen",
            &mut problems,
        );
        let peers = addrs(backbone.peers, "backbone.peers", &mut problems);
        let origins = addrs(backbone.origins, "backbone.origins", &mut problems);
        let bind = backbone
            .bind
            .as_deref()
            .and_then(|v| ip(v, "backbone.bind", &mut problems));
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
                if bb_listen.is_some() {
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
                if role == Role::Origin && bb_listen.is_none() {
                    problems.push(Problem::new(
                        "backbone.listen",
                        "an origin must listen for its peers and edges",
                    ));
                }
                if let Some(l) = bb_listen {
                    if peers.contains(&l) {
                        problems.push(Problem::new(
                            "backbone.peers",
                            format!("lists this node's own address {l}"),
                        ));
                    }
                }
            }
        }
        let token = backbone.token.unwrap_or_default();
        problems.extend(backbone_token_problem(
            role, &token, bb_listen, &peers, &origins,
        ));
        let resolve = |p: Option<String>| p.map(|p| base.join(p));
        let cert = resolve(backbone.cert);
        let key = resolve(backbone.key);
        let ca = resolve(backbone.ca);
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
        let idle_grace_ms = backbone.idle_grace_ms.unwrap_or(5000);
        if idle_grace_ms > 3_600_000 {
            problems.push(Problem::new(
                "backbone.idle_grace_ms",
                "must be at most one hour",
            ));
        }
        let link_timeout_ms = backbone.link_timeout_ms.unwrap_or(DEFAULT_LINK_TIMEOUT_MS);
        if !(300..=30_000).contains(&link_timeout_ms) {
            problems.push(Problem::new(
                "backbone.link_timeout_ms",
                "must be between 300 and 30000 (keep-alives go every 150 ms)",
            ));
        }
        let congestion = match backbone.congestion.as_deref() {
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
        let rehome_window_ms = backbone
            .rehome_window_ms
            .unwrap_or(DEFAULT_REHOME_WINDOW_MS);
        if rehome_window_ms > 600_000 {
            problems.push(Problem::new(
                "backbone.rehome_window_ms",
                "must be at most ten minutes",
            ));
        }
        let return_after_ms = backbone.return_after_ms.unwrap_or(DEFAULT_RETURN_AFTER_MS);
        if return_after_ms > 3_600_000 {
            problems.push(Problem::new(
                "backbone.return_after_ms",
                "must be at most an hour (0 turns returning off)",
            ));
        }

        let webrtc_listen = addr_or_off(
            webrtc.listen,
            defaults.webrtc.listen,
            "webrtc.listen",
            &mut problems,
        );
        let mut announce_ips = Vec::new();
        for (i, raw) in webrtc.announce_ips.iter().enumerate() {
            let key = format!("webrtc.announce_ips[{i}]");
            match ip(raw, &key, &mut problems) {
                Some(a) if a.is_unspecified() => problems.push(Problem::new(
                    &key,
                    "must be an address clients can reach, not 0.0.0.0 or ::",
                )),
                Some(a) => announce_ips.push(a),
                None => {}
            }
        }
        for (i, url) in webrtc.ice_servers.iter().enumerate() {
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

        let dl = Limits::default();
        let limits_out = Limits {
            stream_buffer_frames: limits
                .stream_buffer_frames
                .unwrap_or(dl.stream_buffer_frames),
            max_lag_events: limits.max_lag_events.unwrap_or(dl.max_lag_events),
            viewer_write_timeout: limits
                .viewer_write_timeout_ms
                .map(Duration::from_millis)
                .unwrap_or(dl.viewer_write_timeout),
            gop_cache_max_bytes: limits.gop_cache_max_bytes.unwrap_or(dl.gop_cache_max_bytes),
            max_rtmp_connections: limits
                .max_rtmp_connections
                .unwrap_or(dl.max_rtmp_connections),
            viewer_send_buffer_bytes: limits
                .viewer_send_buffer_bytes
                .unwrap_or(dl.viewer_send_buffer_bytes),
            play_wait: limits
                .play_wait_ms
                .map(Duration::from_millis)
                .unwrap_or(dl.play_wait),
            publisher_hold: limits
                .publisher_hold_ms
                .map(Duration::from_millis)
                .unwrap_or(dl.publisher_hold),
            max_streams: limits.max_streams.unwrap_or(dl.max_streams),
            max_streams_per_namespace: limits
                .max_streams_per_namespace
                .or(limits.max_streams)
                .unwrap_or(dl.max_streams_per_namespace),
            max_viewers: limits.max_viewers.unwrap_or(dl.max_viewers),
            max_viewers_per_stream: limits
                .max_viewers_per_stream
                .or(limits.max_viewers)
                .unwrap_or(dl.max_viewers_per_stream),
            max_webrtc_sessions: limits.max_webrtc_sessions.unwrap_or(dl.max_webrtc_sessions),
        };
        for (key, v) in [
            ("limits.max_streams", limits_out.max_streams),
            (
                "limits.max_streams_per_namespace",
                limits_out.max_streams_per_namespace,
            ),
            ("limits.max_viewers", limits_out.max_viewers),
            (
                "limits.max_viewers_per_stream",
                limits_out.max_viewers_per_stream,
            ),
            ("limits.max_webrtc_sessions", limits_out.max_webrtc_sessions),
        ] {
            if v == 0 || v > 10_000_000 {
                problems.push(Problem::new(key, "must be between 1 and 10000000"));
            }
        }
        if limits_out.publisher_hold > Duration::from_secs(300) {
            problems.push(Problem::new(
                "limits.publisher_hold_ms",
                "must be at most 300000 (0: end a stream when its publisher leaves)",
            ));
        }
        if limits_out.play_wait > Duration::from_secs(60) {
            problems.push(Problem::new(
                "limits.play_wait_ms",
                "must be at most 60000 (0: answer at once)",
            ));
        }
        if !(16..=65536).contains(&limits_out.stream_buffer_frames) {
            problems.push(Problem::new(
                "limits.stream_buffer_frames",
                "must be between 16 and 65536",
            ));
        }
        if limits_out.viewer_write_timeout < Duration::from_millis(100) {
            problems.push(Problem::new(
                "limits.viewer_write_timeout_ms",
                "must be at least 100",
            ));
        }
        if limits_out.max_rtmp_connections == 0 {
            problems.push(Problem::new(
                "limits.max_rtmp_connections",
                "must be at least 1",
            ));
        }

        let mut listens: Vec<(&str, SocketAddr)> = vec![];
        if let Some(a) = rtmp_listen {
            listens.push(("rtmp.listen", a));
        }
        if let Some(a) = http_listen {
            listens.push(("http.listen", a));
        }
        for (i, (name, a)) in listens.iter().enumerate() {
            for (other, b) in &listens[..i] {
                if a == b {
                    problems.push(Problem::new(
                        name,
                        format!("{a} is already used by {other}"),
                    ));
                }
            }
        }

        if !problems.is_empty() {
            return Err(ConfigErrors {
                file: file.into(),
                problems,
            });
        }
        Ok(Config {
            node: NodeConfig {
                id,
                region,
                role,
                max_viewers,
            },
            rtmp: RtmpConfig {
                listen: rtmp_listen,
                chunk_size,
                merged_write: Duration::from_millis(merged_write_ms),
                public_url: rtmp.public_url,
                idle_timeout: Duration::from_millis(rtmp_idle_ms),
                max_message_bytes,
            },
            http: HttpConfig {
                listen: http_listen,
                public_url: http.public_url,
                max_connections: http_max_connections,
                header_timeout: Duration::from_millis(header_timeout_ms),
                idle_timeout: Duration::from_millis(http_idle_ms),
            },
            backbone: BackboneConfig {
                listen: bb_listen,
                peers,
                origins,
                bind,
                token,
                cert,
                key,
                ca,
                idle_grace: Duration::from_millis(idle_grace_ms),
                link_timeout: Duration::from_millis(link_timeout_ms),
                rehome_window: Duration::from_millis(rehome_window_ms),
                return_after: Duration::from_millis(return_after_ms),
                congestion,
            },
            webrtc: WebRtcConfig {
                listen: webrtc_listen,
                announce_ips,
                ice_servers: webrtc.ice_servers,
                tcp: webrtc.tcp.unwrap_or(defaults.webrtc.tcp),
            },
            limits: limits_out,
            recording_root,
            recording_min_free_bytes: recording.min_free_mb.unwrap_or(DEFAULT_MIN_FREE_MB) << 20,
            recording_retention: Retention {
                max_age: recording
                    .max_age_hours
                    .filter(|h| *h > 0)
                    .map(|h| Duration::from_secs(h * 3600)),
                max_total_bytes: recording.max_total_mb.filter(|m| *m > 0).map(|m| m << 20),
            },
            egress,
            egress_policy,
            auth,
            events_hook: hooks.events,
        })
    }
}

/// `[egress]`: either an array of rules (`[[egress]]`), or a table with the destination
/// policy and its rules as `[[egress.rule]]`.
fn egress_section(
    table: &toml::Table,
    problems: &mut Vec<Problem>,
) -> (Vec<crate::egress::EgressSpec>, EgressPolicy) {
    let mut policy = EgressPolicy::default();
    let Some(value) = table.get("egress") else {
        return (vec![], policy);
    };
    if let Some(items) = value.as_array() {
        return (egress_rules(items, "egress", problems), policy);
    }
    let Some(t) = value.as_table() else {
        problems.push(Problem::new(
            "egress",
            "must be a table ([egress]) or an array of rules ([[egress]])",
        ));
        return (vec![], policy);
    };
    let mut rules = vec![];
    for (k, v) in t {
        match (k.as_str(), v) {
            ("rule", toml::Value::Array(items)) => {
                rules = egress_rules(items, "egress.rule", problems)
            }
            ("destinations", toml::Value::Array(items)) => {
                for (i, item) in items.iter().enumerate() {
                    match item.as_str() {
                        Some(p) if p.starts_with("rtmp://") && !p.contains(char::is_whitespace) => {
                            policy.destinations.push(p.to_string())
                        }
                        _ => problems.push(Problem::new(
                            &format!("egress.destinations[{i}]"),
                            "must be an rtmp:// URL pattern (`*` matches any run of characters)",
                        )),
                    }
                }
            }
            ("allow_private_destinations", toml::Value::Boolean(b)) => {
                policy.allow_private_destinations = *b
            }
            ("max_jobs", toml::Value::Integer(n)) if (1..=100_000).contains(n) => {
                policy.max_jobs = *n as usize
            }
            ("max_jobs", _) => problems.push(Problem::new(
                "egress.max_jobs",
                "must be a number between 1 and 100000",
            )),
            ("rule" | "destinations" | "allow_private_destinations", _) => problems.push(
                Problem::new(&format!("egress.{k}"), "has the wrong type"),
            ),
            _ => problems.push(Problem::new(
                &format!("egress.{k}"),
                "unknown key (expected destinations, allow_private_destinations, max_jobs or [[egress.rule]])",
            )),
        }
    }
    (rules, policy)
}

/// `[auth]`, validated (secrets long enough, public keys readable, webhook a URL).
fn auth_section(raw: RawAuth, base: &Path, problems: &mut Vec<Problem>) -> crate::auth::AuthConfig {
    for (i, s) in raw.secrets.iter().enumerate() {
        if s.len() < MIN_SECRET_BYTES {
            problems.push(Problem::new(
                &format!("auth.secrets[{i}]"),
                format!("is shorter than {MIN_SECRET_BYTES} bytes (use a long random string)"),
            ));
        }
    }
    let public_keys: Vec<PathBuf> = raw.public_keys.iter().map(|p| base.join(p)).collect();
    if let Err(e) = crate::auth::Keys::new(&[], &public_keys) {
        problems.push(Problem::new("auth.public_keys", e));
    }
    if let Some(url) = &raw.webhook {
        if let Err(e) = crate::auth::webhook::HookUrl::parse(url) {
            problems.push(Problem::new("auth.webhook", e));
        }
    }
    let timeout_ms = raw.webhook_timeout_ms.unwrap_or(2000);
    if !(50..=30_000).contains(&timeout_ms) {
        problems.push(Problem::new(
            "auth.webhook_timeout_ms",
            "must be between 50 and 30000",
        ));
    }
    let cache_ms = raw.webhook_cache_ms.unwrap_or(10_000);
    if cache_ms > 600_000 {
        problems.push(Problem::new(
            "auth.webhook_cache_ms",
            "must be at most 600000 (0: ask every time)",
        ));
    }
    if raw
        .metrics_token
        .as_ref()
        .is_some_and(|t| t.len() < MIN_SECRET_BYTES)
    {
        problems.push(Problem::new(
            "auth.metrics_token",
            format!("is shorter than {MIN_SECRET_BYTES} bytes"),
        ));
    }
    crate::auth::AuthConfig {
        secrets: raw.secrets,
        public_keys,
        webhook: raw.webhook,
        webhook_timeout: Duration::from_millis(timeout_ms),
        webhook_cache: Duration::from_millis(cache_ms),
        metrics_token: raw.metrics_token,
    }
}

/// Egress rules: each validated like an API request, problems named `{at}[i].field`.
fn egress_rules(
    items: &[toml::Value],
    at: &str,
    problems: &mut Vec<Problem>,
) -> Vec<crate::egress::EgressSpec> {
    let mut rules = Vec::new();
    for (i, item) in items.iter().enumerate() {
        let key = format!("{at}[{i}]");
        let req: crate::egress::EgressRequest = match item.clone().try_into() {
            Ok(r) => r,
            Err(e) => {
                problems.push(Problem::new(&key, e.message().trim()));
                continue;
            }
        };
        match req.validate(true) {
            Ok(spec) => rules.push(spec),
            Err(errors) => {
                for e in errors {
                    problems.push(Problem::new(&format!("{key}.{}", e.field), e.reason));
                }
            }
        }
    }
    rules
}

fn valid_name_char(c: char) -> bool {
    c.is_ascii_alphanumeric() || matches!(c, '_' | '-' | '.')
}

/// Deserializes one section on its own so its errors don't mask the others'.
fn section<T: DeserializeOwned + Default>(
    table: &toml::Table,
    name: &str,
    problems: &mut Vec<Problem>,
) -> T {
    let Some(value) = table.get(name) else {
        return T::default();
    };
    if !value.is_table() {
        problems.push(Problem::new(name, "must be a table ([section])"));
        return T::default();
    }
    match value.clone().try_into::<T>() {
        Ok(v) => v,
        Err(e) => {
            let msg = e.message().trim().to_string();
            // toml names the offending key inside the section when it knows it.
            let key = e
                .message()
                .split('`')
                .nth(1)
                .filter(|_| msg.contains("unknown field"))
                .map(|k| format!("{name}.{k}"))
                .unwrap_or_else(|| name.to_string());
            problems.push(Problem::new(&key, msg));
            T::default()
        }
    }
}

/// `"off"` or `""` disables a listener; otherwise the value must be `IP:PORT`.
fn addr_or_off(
    raw: Option<String>,
    default: Option<SocketAddr>,
    key: &str,
    problems: &mut Vec<Problem>,
) -> Option<SocketAddr> {
    match raw.as_deref() {
        None => default,
        Some("") | Some("off") => None,
        Some(s) => match s.parse() {
            Ok(a) => Some(a),
            Err(_) => {
                problems.push(Problem::new(
                    key,
                    format!("`{s}` is not an address of the form IP:PORT (or \"off\")"),
                ));
                None
            }
        },
    }
}

/// An IP address (no port), or a problem under `key`.
fn ip(raw: &str, key: &str, problems: &mut Vec<Problem>) -> Option<IpAddr> {
    let parsed = raw.parse().ok();
    if parsed.is_none() {
        problems.push(Problem::new(key, format!("`{raw}` is not an IP address")));
    }
    parsed
}

fn addrs(raw: Vec<String>, key: &str, problems: &mut Vec<Problem>) -> Vec<SocketAddr> {
    let mut out = Vec::new();
    for (i, s) in raw.iter().enumerate() {
        match s.parse::<SocketAddr>() {
            Ok(a) if out.contains(&a) => {
                problems.push(Problem::new(
                    &format!("{key}[{i}]"),
                    format!("{a} is listed twice"),
                ));
            }
            Ok(a) => out.push(a),
            Err(_) => problems.push(Problem::new(
                &format!("{key}[{i}]"),
                format!("`{s}` is not an address of the form IP:PORT"),
            )),
        }
    }
    out
}

#[derive(Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawNode {
    id: Option<String>,
    region: Option<String>,
    role: Option<Role>,
    max_viewers: Option<u32>,
}

#[derive(Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawRtmp {
    listen: Option<String>,
    chunk_size: Option<u32>,
    merged_write_ms: Option<u64>,
    public_url: Option<String>,
    idle_timeout_ms: Option<u64>,
    max_message_bytes: Option<usize>,
}

#[derive(Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawHttp {
    listen: Option<String>,
    public_url: Option<String>,
    max_connections: Option<usize>,
    header_timeout_ms: Option<u64>,
    idle_timeout_ms: Option<u64>,
}

#[derive(Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawAuth {
    #[serde(default)]
    secrets: Vec<String>,
    #[serde(default)]
    public_keys: Vec<String>,
    webhook: Option<String>,
    webhook_timeout_ms: Option<u64>,
    webhook_cache_ms: Option<u64>,
    metrics_token: Option<String>,
}

#[derive(Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawHooks {
    events: Option<String>,
}

#[derive(Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawBackbone {
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

#[derive(Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawWebRtc {
    listen: Option<String>,
    #[serde(default)]
    announce_ips: Vec<String>,
    #[serde(default)]
    ice_servers: Vec<String>,
    tcp: Option<bool>,
}

#[derive(Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawRecording {
    root: Option<String>,
    min_free_mb: Option<u64>,
    max_age_hours: Option<u64>,
    max_total_mb: Option<u64>,
}

#[derive(Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawLimits {
    stream_buffer_frames: Option<usize>,
    max_lag_events: Option<u32>,
    viewer_write_timeout_ms: Option<u64>,
    gop_cache_max_bytes: Option<usize>,
    max_rtmp_connections: Option<usize>,
    viewer_send_buffer_bytes: Option<usize>,
    play_wait_ms: Option<u64>,
    publisher_hold_ms: Option<u64>,
    max_streams: Option<usize>,
    max_streams_per_namespace: Option<usize>,
    max_viewers: Option<usize>,
    max_viewers_per_stream: Option<usize>,
    max_webrtc_sessions: Option<usize>,
}

/// One problem in a config file.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Problem {
    pub key: String,
    pub reason: String,
}

impl Problem {
    fn new(key: &str, reason: impl Into<String>) -> Problem {
        Problem {
            key: key.to_string(),
            reason: reason.into(),
        }
    }
}

/// Every problem found in one config file.
#[derive(Debug)]
pub struct ConfigErrors {
    pub file: String,
    pub problems: Vec<Problem>,
}

impl fmt::Display for ConfigErrors {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for (i, p) in self.problems.iter().enumerate() {
            if i > 0 {
                writeln!(f)?;
            }
            if p.key.is_empty() {
                write!(f, "{}: {}", self.file, p.reason)?;
            } else {
                write!(f, "{}: {}: {}", self.file, p.key, p.reason)?;
            }
        }
        Ok(())
    }
}

impl std::error::Error for ConfigErrors {}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(text: &str) -> Result<Config, ConfigErrors> {
        Config::parse(text, "test.toml", Path::new("."))
    }

    #[test]
    fn backbone_congestion_is_bbr_unless_cubic_is_asked_for() {
        assert_eq!(parse("").unwrap().backbone.congestion, Congestion::Bbr);
        let c = parse("[backbone]\ncongestion = \"cubic\"\n").unwrap();
        assert_eq!(c.backbone.congestion, Congestion::Cubic);
        let err = parse("[backbone]\ncongestion = \"reno\"\n")
            .unwrap_err()
            .to_string();
        assert!(err.contains("congestion") && err.contains("bbr"), "{err}");
    }

    #[test]
    fn an_edge_may_bind_its_outgoing_backbone_address() {
        let edge = "[node]\nrole = \"edge\"\n[backbone]\ntoken = \"0123456789abcdef\"\norigins = [\"10.0.0.1:4433\"]\n";
        let c = parse(&format!("{edge}bind = \"10.0.0.7\"\n")).unwrap();
        assert_eq!(c.backbone.bind, Some("10.0.0.7".parse().unwrap()));
        assert_eq!(parse(edge).unwrap().backbone.bind, None);
        for (bad, why) in [
            ("bind = \"10.0.0.7:1\"\n", "not an IP address"),
            ("bind = \"::1\"\n", "address families differ"),
        ] {
            let err = parse(&format!("{edge}{bad}")).unwrap_err().to_string();
            assert!(err.contains("backbone.bind") && err.contains(why), "{err}");
        }
        let err = parse("[backbone]\nbind = \"127.0.0.1\"\n")
            .unwrap_err()
            .to_string();
        assert!(err.contains("only edges bind"), "{err}");
    }

    #[test]
    fn empty_file_is_standalone_on_default_ports() {
        let c = parse("").unwrap();
        assert_eq!(c.node.role, Role::Standalone);
        assert_eq!(c.rtmp.listen.unwrap().port(), 1935);
        assert_eq!(c.http.listen.unwrap().port(), 8080);
        assert_eq!(c.backbone.listen.unwrap().port(), 4433);
    }

    #[test]
    fn reports_every_problem_with_key_and_reason() {
        let err = parse(
            r#"
            [node]
            role = "edge"
            id = "bad id!"
            [rtmp]
            listen = "nonsense"
            chunk_size = 5
            [http]
            listen = 8080
            [backbone]
            listen = "0.0.0.0:4433"
            peers = ["1.2.3.4:1"]
            [bogus]
            "#,
        )
        .unwrap_err();
        let keys: Vec<&str> = err.problems.iter().map(|p| p.key.as_str()).collect();
        for expected in [
            "bogus",
            "http",
            "node.id",
            "rtmp.listen",
            "rtmp.chunk_size",
            "backbone.origins",
            "backbone.peers",
            "backbone.listen",
        ] {
            assert!(keys.contains(&expected), "{expected} missing in {keys:?}");
        }
        let text = err.to_string();
        assert!(text.contains("test.toml: rtmp.chunk_size: must be between 128 and 65536"));
    }

    #[test]
    fn a_backbone_beyond_loopback_needs_a_token_of_16_bytes() {
        let origin = |token: &str, listen: &str, peers: &str| {
            parse(&format!(
                "[node]\nrole = \"origin\"\n[backbone]\ntoken = \"{token}\"\nlisten = \"{listen}\"\npeers = [{peers}]\n"
            ))
        };
        let edge = |token: &str, origin: &str| {
            parse(&format!(
                "[node]\nrole = \"edge\"\n[backbone]\ntoken = \"{token}\"\norigins = [\"{origin}\"]\n"
            ))
        };
        let refused = |r: Result<Config, ConfigErrors>, why: &str| {
            let err = r.unwrap_err();
            assert_eq!(err.problems[0].key, "backbone.token", "{err}");
            let text = err.to_string();
            assert!(text.contains(why) && text.contains("16 bytes"), "{text}");
        };
        let strong = "0123456789abcdef";
        refused(
            origin("", "0.0.0.0:4433", ""),
            "is empty and backbone.listen",
        );
        refused(
            origin("", "127.0.0.1:4433", "\"10.0.0.2:4433\""),
            "is empty",
        );
        refused(origin("short", "10.0.0.1:4433", ""), "is 5 bytes");
        refused(
            origin("short", "127.0.0.1:4433", "\"10.0.0.2:4433\""),
            "dials 10.0.0.2",
        );
        refused(edge("", "127.0.0.1:4433"), "can authenticate");
        refused(edge("0123456789abcde", "[2001:db8::1]:4433"), "is 15 bytes");
        assert!(origin(strong, "0.0.0.0:4433", "\"10.0.0.2:4433\"").is_ok());
        assert!(edge(strong, "10.0.0.1:4433").is_ok());
        // Loopback only (tests, one-machine examples): any non-empty token.
        assert!(origin("short", "127.0.0.1:4433", "\"127.0.0.2:4433\"").is_ok());
        assert!(edge("t", "[::1]:4433").is_ok());
        // Only listening, without a token: starts with its backbone closed.
        assert!(origin("", "127.0.0.1:4433", "").is_ok());
        let c = parse("[backbone]\nlisten = \"0.0.0.0:4433\"\n").unwrap();
        assert!(c.backbone.token.is_empty());
        assert!(
            backbone_token_problem(Role::Standalone, "", c.backbone.listen, &[], &[]).is_none()
        );
    }

    #[test]
    fn unknown_key_is_named() {
        let err = parse("[rtmp]\nlisten_addr = \"1.2.3.4:5\"\n").unwrap_err();
        assert_eq!(err.problems[0].key, "rtmp.listen_addr");
    }

    #[test]
    fn listener_can_be_turned_off() {
        let c = parse("[rtmp]\nlisten = \"off\"\n").unwrap();
        assert!(c.rtmp.listen.is_none());
    }
}
