//! `[namespaces]` and `[[namespace]]`: the first path segment of a stream name (the RTMP
//! app) as a tenant. Each declared namespace may have its own auth keys or webhook (which
//! replace the node's for its streams), its own limits, egress rules and recording root,
//! and may be kept from other regions. With `strict = true`, a namespace not declared is
//! refused.
//!
//! ```toml
//! [namespaces]
//! strict = true
//!
//! [[namespace]]
//! name = "tenant-a"
//! relay = false                       # not served to nodes of other regions
//! recording_root = "/srv/rec/tenant-a"
//! auth = { secrets = ["..."] }        # or webhook = "http://..."
//! limits = { max_streams = 10, max_viewers = 500, max_bitrate_kbps = 6000 }
//! [[namespace.egress]]
//! stream = "*"                        # a name in this namespace (or `tenant-a/*`)
//! kind = "record"
//! ```

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use serde::Deserialize;

use super::auth::{self, AuthConfig, RawAuth};
use super::egress;
use super::egress_spec::{EgressSpec, StreamMatch};
use super::read::{Problem, Problems};
// The namespace rooms live in: `[rooms]` governs it; it cannot be declared.
use crate::media::ROOM_NAMESPACE;

/// Namespaces one node may declare at most.
pub const MAX_NAMESPACES: usize = 1024;

/// `[namespaces]` and every `[[namespace]]`, validated.
#[derive(Clone, Debug, Default)]
pub struct NamespacesConfig {
    /// Refuse publish, play and API calls for a namespace not declared here.
    pub strict: bool,
    /// The declared namespaces, by name.
    pub declared: BTreeMap<String, NamespaceConfig>,
}

/// One `[[namespace]]`.
#[derive(Clone, Debug)]
pub struct NamespaceConfig {
    pub name: String,
    /// Its own keys and webhook, in place of `[auth]`'s (None: the node's apply).
    pub auth: Option<AuthConfig>,
    pub limits: NamespaceLimits,
    /// Its egress rules, each confined to this namespace's streams.
    pub egress: Vec<EgressSpec>,
    /// Where its recordings go (None: `recording.root`).
    pub recording_root: Option<PathBuf>,
    /// Whether nodes of other regions may pull its streams.
    pub relay: bool,
}

/// A namespace's limits; `None` leaves the node's `[limits]` in charge.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct NamespaceLimits {
    /// Streams published in this namespace on one node.
    pub max_streams: Option<usize>,
    /// Viewers of this namespace's streams on one node.
    pub max_viewers: Option<usize>,
    /// What one publisher may send, averaged over a few seconds (kbit/s).
    pub max_bitrate_kbps: Option<u64>,
}

impl NamespacesConfig {
    /// The namespace's declaration, if it has one.
    pub fn get(&self, namespace: &str) -> Option<&NamespaceConfig> {
        self.declared.get(namespace)
    }

    /// Whether streams of `namespace` are served here: always without `strict`, else only
    /// declared ones (and rooms').
    pub fn admits(&self, namespace: &str) -> bool {
        !self.strict || namespace == ROOM_NAMESPACE || self.declared.contains_key(namespace)
    }

    /// Whether nodes of other regions may pull `namespace`'s streams.
    pub fn relays(&self, namespace: &str) -> bool {
        self.get(namespace).is_none_or(|n| n.relay)
    }

    /// Every namespace's egress rules.
    pub fn egress_rules(&self) -> impl Iterator<Item = &EgressSpec> {
        self.declared.values().flat_map(|n| n.egress.iter())
    }
}

#[derive(Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawNamespaces {
    #[serde(default)]
    strict: bool,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawNamespace {
    name: String,
    auth: Option<RawAuth>,
    #[serde(default)]
    limits: RawLimits,
    #[serde(default)]
    egress: Vec<toml::Value>,
    recording_root: Option<String>,
    #[serde(default = "yes")]
    relay: bool,
}

fn yes() -> bool {
    true
}

#[derive(Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawLimits {
    max_streams: Option<usize>,
    max_viewers: Option<usize>,
    max_bitrate_kbps: Option<u64>,
}

/// `[namespaces]` and `[[namespace]]` from the whole file.
pub(super) fn parse(
    table: &toml::Table,
    raw: RawNamespaces,
    base: &Path,
    problems: &mut Problems,
) -> NamespacesConfig {
    let mut out = NamespacesConfig {
        strict: raw.strict,
        declared: BTreeMap::new(),
    };
    let Some(value) = table.get("namespace") else {
        if out.strict {
            problems.push(Problem::new(
                "namespaces.strict",
                "is true but no [[namespace]] is declared: every stream would be refused",
            ));
        }
        return out;
    };
    let Some(items) = value.as_array() else {
        problems.push(Problem::new(
            "namespace",
            "must be an array of tables ([[namespace]])",
        ));
        return out;
    };
    if items.len() > MAX_NAMESPACES {
        problems.push(Problem::new(
            "namespace",
            format!("at most {MAX_NAMESPACES} namespaces may be declared"),
        ));
    }
    for (i, item) in items.iter().enumerate().take(MAX_NAMESPACES) {
        let at = format!("namespace[{i}]");
        let raw: RawNamespace = match item.clone().try_into() {
            Ok(r) => r,
            Err(e) => {
                problems.push(Problem::new(&at, e.message().trim()));
                continue;
            }
        };
        if let Some(ns) = one(raw, &at, base, problems) {
            if out.declared.contains_key(&ns.name) {
                problems.push(Problem::new(
                    &format!("{at}.name"),
                    format!("`{}` is declared twice", ns.name),
                ));
            }
            out.declared.insert(ns.name.clone(), ns);
        }
    }
    out
}

/// One `[[namespace]]`, validated.
fn one(
    raw: RawNamespace,
    at: &str,
    base: &Path,
    problems: &mut Problems,
) -> Option<NamespaceConfig> {
    let name = raw.name;
    if crate::media::StreamKey::new(&name, "x").is_err() {
        problems.push(Problem::new(
            &format!("{at}.name"),
            "must be 1-128 characters of A-Z a-z 0-9 _ - . (not starting with .)",
        ));
        return None;
    }
    if name == ROOM_NAMESPACE {
        problems.push(Problem::new(
            &format!("{at}.name"),
            "`room` holds the rooms' streams and is configured by [rooms]",
        ));
        return None;
    }
    let auth = raw.auth.map(|a| {
        let auth_at = format!("{at}.auth");
        let c = auth::parse(a, &auth_at, base, problems);
        if c.metrics_token.is_some() {
            problems.push(Problem::new(
                &format!("{auth_at}.metrics_token"),
                "is node-wide: set it in [auth]",
            ));
        }
        if !c.is_on() {
            problems.push(Problem::new(
                &auth_at,
                "names no secrets, public_keys or webhook (leave it out to use [auth])",
            ));
        }
        c
    });
    let limits = NamespaceLimits {
        max_streams: raw.limits.max_streams,
        max_viewers: raw.limits.max_viewers,
        max_bitrate_kbps: raw.limits.max_bitrate_kbps,
    };
    for (key, v, max) in [
        (
            "max_streams",
            limits.max_streams.map(|v| v as u64),
            10_000_000,
        ),
        (
            "max_viewers",
            limits.max_viewers.map(|v| v as u64),
            10_000_000,
        ),
        ("max_bitrate_kbps", limits.max_bitrate_kbps, 10_000_000),
    ] {
        if v.is_some_and(|v| v == 0 || v > max) {
            problems.push(Problem::new(
                &format!("{at}.limits.{key}"),
                format!("must be between 1 and {max}"),
            ));
        }
    }
    let egress = namespace_rules(&name, &raw.egress, &format!("{at}.egress"), problems);
    Some(NamespaceConfig {
        recording_root: raw.recording_root.map(|r| base.join(r)),
        name,
        auth,
        limits,
        egress,
        relay: raw.relay,
    })
}

/// A namespace's egress rules: `stream` is a name in the namespace (`*` when left out) or
/// a full `namespace/name` of this namespace; a rule cannot reach another's streams.
fn namespace_rules(
    ns: &str,
    items: &[toml::Value],
    at: &str,
    problems: &mut Problems,
) -> Vec<EgressSpec> {
    let mut qualified = Vec::with_capacity(items.len());
    for item in items {
        let mut item = item.clone();
        if let Some(t) = item.as_table_mut() {
            let stream = match t.get("stream") {
                None => format!("{ns}/*"),
                Some(toml::Value::String(s)) if !s.contains('/') => format!("{ns}/{s}"),
                Some(v) => v.as_str().unwrap_or_default().to_string(),
            };
            t.insert("stream".into(), toml::Value::String(stream));
        }
        qualified.push(item);
    }
    let mut rules = egress::rules(&qualified, at, problems);
    rules.retain(|r| {
        let inside = match &r.stream {
            StreamMatch::Exact(k) => k.namespace() == ns,
            StreamMatch::Pattern { namespace, .. } => namespace == ns,
        };
        if !inside {
            problems.push(Problem::new(
                &format!("{at}.stream"),
                format!("a rule of namespace {ns} takes only {ns}/... streams"),
            ));
        }
        inside
    });
    rules
}

#[cfg(test)]
mod tests {
    use crate::config::{Config, ConfigErrors};
    use std::path::Path;

    fn parse(text: &str) -> Result<Config, ConfigErrors> {
        Config::parse(text, "test.toml", Path::new("/etc/meshcast"))
    }

    #[test]
    fn a_namespace_has_its_own_auth_limits_egress_root_and_relay() {
        let c = parse(
            r#"
[namespaces]
strict = true

[[namespace]]
name = "tenant-a"
relay = false
recording_root = "rec/a"
auth = { secrets = ["a-secret-of-some-length"] }
limits = { max_streams = 2, max_viewers = 10, max_bitrate_kbps = 3000 }
[[namespace.egress]]
kind = "record"
[[namespace.egress]]
stream = "main"
kind = "rtmp"
url = "rtmp://cdn.example/live/{stream}"

[[namespace]]
name = "open"
"#,
        )
        .unwrap();
        let ns = &c.namespaces;
        assert!(ns.strict);
        let a = ns.get("tenant-a").unwrap();
        assert!(!a.relay && ns.relays("open") && ns.relays("undeclared"));
        assert!(!ns.relays("tenant-a"));
        assert_eq!(
            a.recording_root.as_deref(),
            Some(Path::new("/etc/meshcast/rec/a"))
        );
        assert_eq!(a.auth.as_ref().unwrap().secrets.len(), 1);
        assert_eq!(a.limits.max_bitrate_kbps, Some(3000));
        let streams: Vec<String> = ns
            .egress_rules()
            .map(|r| format!("{:?}", r.stream))
            .collect();
        assert_eq!(streams.len(), 2, "{streams:?}");
        assert!(
            streams[0].contains("tenant-a") && streams[0].contains('*'),
            "{streams:?}"
        );
        assert!(
            streams[1].contains("tenant-a") && streams[1].contains("main"),
            "{streams:?}"
        );
        assert!(ns.get("open").unwrap().auth.is_none());
        assert!(ns.admits("tenant-a") && ns.admits("room") && !ns.admits("other"));
        // Without strict, anything is admitted.
        assert!(parse("").unwrap().namespaces.admits("anything"));
    }

    #[test]
    fn bad_namespaces_are_each_reported() {
        let err = parse(
            r#"
[[namespace]]
name = "a"
[[namespace]]
name = "a"
[[namespace]]
name = "room"
[[namespace]]
name = "no/slash"
[[namespace]]
name = "b"
auth = { metrics_token = "0123456789abcdef0123" }
limits = { max_streams = 0 }
[[namespace.egress]]
stream = "other/x"
kind = "record"
[[namespace]]
name = "c"
colour = "blue"
"#,
        )
        .unwrap_err()
        .to_string();
        for want in [
            "namespace[1].name: `a` is declared twice",
            "namespace[2].name: `room` holds the rooms' streams",
            "namespace[3].name: must be 1-128",
            "namespace[4].auth.metrics_token: is node-wide",
            "namespace[4].auth: names no secrets",
            "namespace[4].limits.max_streams: must be between 1",
            "namespace[4].egress.stream: a rule of namespace b takes only b/... streams",
            "namespace[5]: unknown field `colour`",
        ] {
            assert!(err.contains(want), "missing {want:?} in:\n{err}");
        }
        let err = parse("[namespaces]\nstrict = true\n")
            .unwrap_err()
            .to_string();
        assert!(err.contains("namespaces.strict"), "{err}");
    }
}
