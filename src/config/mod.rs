//! Node configuration: TOML on disk → a validated, typed [`Config`].
//!
//! Parsing happens in two passes so that `meshcast check-config` can report *every* problem
//! at once: each section is deserialized on its own (a type error in `[rtmp]` does not hide
//! one in `[http]`), then the semantic rules (roles, addresses, peers) are checked over the
//! whole. Every problem names the file, the key and the reason. Nothing here does I/O beyond
//! reading the file and the key files it names.
//!
//! One file per section: its typed struct, its defaults (the section's `Default`, the only
//! place a default is written), its raw serde shape and its checks. `node` hands each
//! subsystem its own section. This module sits below everything but `media` and `metrics`:
//! it imports nothing else of ours.

mod auth;
mod backbone;
mod egress;
pub mod egress_spec;
mod http;
mod limits;
mod log;
mod namespace;
mod node;
mod read;
mod recording;
mod rooms;
mod rtmp;
mod webrtc;

#[cfg(test)]
mod tests;

use std::net::SocketAddr;
use std::path::Path;

pub use auth::{read_public_key, AuthConfig, HookUrl, HooksConfig, PublicKey, MIN_SECRET_BYTES};
pub use backbone::{BackboneConfig, Congestion, MIN_BACKBONE_TOKEN};
pub use egress::{EgressConfig, EgressPolicy};
pub use http::HttpConfig;
pub use limits::Limits;
pub use log::{LogConfig, LogFormat};
pub use namespace::{NamespaceConfig, NamespaceLimits, NamespacesConfig, MAX_NAMESPACES};
pub use node::{NodeConfig, Role, DEFAULT_REGION};
pub use read::{ConfigErrors, Problem};
pub use recording::{RecordingConfig, Retention, S3Config};
pub use rooms::{RoomsConfig, MAX_EMPTY_TIMEOUT_S, MAX_PARTICIPANTS_CAP};
pub use rtmp::{RtmpConfig, DEFAULT_MAX_MESSAGE_BYTES};
pub use webrtc::{BframePolicy, WebRtcConfig};

use read::section;

/// A fully validated configuration.
#[derive(Clone, Debug)]
pub struct Config {
    pub node: NodeConfig,
    pub rtmp: RtmpConfig,
    pub http: HttpConfig,
    pub backbone: BackboneConfig,
    pub webrtc: WebRtcConfig,
    pub limits: Limits,
    pub recording: RecordingConfig,
    pub egress: EgressConfig,
    /// Tokens, the auth webhook, the metrics token (`[auth]`).
    pub auth: AuthConfig,
    pub hooks: HooksConfig,
    /// Meetings and voice rooms (`[rooms]`).
    pub rooms: RoomsConfig,
    /// How the node logs (`[log]`).
    pub log: LogConfig,
    /// Tenants: `[namespaces]` and every `[[namespace]]`.
    pub namespaces: NamespacesConfig,
}

/// The sections a config file may have.
const SECTIONS: [&str; 14] = [
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
    "rooms",
    "log",
    "namespaces",
    "namespace",
];

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

impl Config {
    /// The configuration of a node started with no file: standalone on the default ports.
    pub fn standalone_default() -> Config {
        let node = NodeConfig::default();
        Config {
            backbone: BackboneConfig::default_for(node.role),
            node,
            rtmp: RtmpConfig::default(),
            http: HttpConfig::default(),
            webrtc: WebRtcConfig::default(),
            limits: Limits::default(),
            recording: RecordingConfig::default(),
            egress: EgressConfig::default(),
            auth: AuthConfig::default(),
            hooks: HooksConfig::default(),
            rooms: RoomsConfig::default(),
            log: LogConfig::default(),
            namespaces: NamespacesConfig::default(),
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
            if !SECTIONS.contains(&key.as_str()) {
                problems.push(Problem::new(
                    key,
                    "unknown section (expected node, rtmp, http, backbone, webrtc, limits, recording, auth, hooks, egress, rooms, log, namespaces or namespace)",
                ));
            }
        }
        let p = &mut problems;
        let node = node::parse(section(&table, "node", p), p);
        let rtmp = rtmp::parse(section(&table, "rtmp", p), p);
        let http = http::parse(section(&table, "http", p), p);
        let backbone = backbone::parse(section(&table, "backbone", p), node.role, base, p);
        let webrtc = webrtc::parse(section(&table, "webrtc", p), p);
        let limits = limits::parse(section(&table, "limits", p), p);
        let recording = recording::parse(section(&table, "recording", p), base, p);
        let egress = egress::parse(&table, p);
        let auth = auth::parse(section(&table, "auth", p), "auth", base, p);
        let hooks = auth::parse_hooks(section(&table, "hooks", p), p);
        let rooms = rooms::parse(section(&table, "rooms", p), p);
        let log = log::parse(section(&table, "log", p), p);
        let namespaces = namespace::parse(&table, section(&table, "namespaces", p), base, p);
        check_listeners_differ(&rtmp, &http, p);

        if !problems.is_empty() {
            return Err(ConfigErrors {
                file: file.into(),
                problems,
            });
        }
        Ok(Config {
            node,
            rtmp,
            http,
            backbone,
            webrtc,
            limits,
            recording,
            egress,
            auth,
            hooks,
            rooms,
            log,
            namespaces,
        })
    }
}

/// The TCP listeners must not share an address.
fn check_listeners_differ(rtmp: &RtmpConfig, http: &HttpConfig, problems: &mut Vec<Problem>) {
    if let (Some(a), Some(b)) = (rtmp.listen, http.listen) {
        if a == b {
            problems.push(Problem::new(
                "http.listen",
                format!("{b} is already used by rtmp.listen"),
            ));
        }
    }
}
