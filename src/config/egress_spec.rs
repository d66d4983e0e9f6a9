//! What an egress is asked to do, validated: from a config rule (`[[egress]]`) or an API
//! request (`POST /api/v1/egress`), both the same JSON/TOML shape.
//!
//! Validation is strict because two of the fields end up in places outside meshcast: an RTMP
//! URL we connect to, and a file path we create. File names come from a template whose
//! placeholders are filled with already-validated stream names; the template itself may not
//! be absolute, may not contain `..` or empty components, and may use only a small set of
//! characters, so every recording path stays under the configured root.

use std::path::{Component, Path, PathBuf};
use std::time::{Duration, SystemTime};

use serde::{Deserialize, Serialize};

use crate::media::{Codec, StreamKey};

/// The request shape shared by config rules and the API.
#[derive(Clone, Debug, Default, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct EgressRequest {
    /// `namespace/name`; config rules may use `*` in either part (`live/*`).
    #[serde(default)]
    pub stream: String,
    /// Instead of `stream`: a room, as one stream (its participants mixed; API only).
    pub room: Option<String>,
    /// With `room`: `grid` (the default: up to four participants) or `speaker`.
    pub layout: Option<String>,
    /// `rtmp` or `record`.
    pub kind: String,
    /// RTMP destination: `rtmp://host[:port]/app/key`; `{ns}` and `{stream}` are replaced.
    pub url: Option<String>,
    /// Recording container: `mp4` (fragmented, the default), `flv` or `mkv`.
    pub format: Option<String>,
    /// Recording file name under the recording root.
    pub template: Option<String>,
    /// Start a new file after this many seconds (at the next keyframe); 0 = never.
    pub segment_seconds: Option<u64>,
    /// Start a new file after this many megabytes (at the next keyframe); 0 = never.
    pub segment_mb: Option<u64>,
    /// When the publisher comes back: `continue` the same file/connection or start a `new_segment`.
    pub on_reconnect: Option<String>,
    /// Re-encode video the destination cannot carry (VP8 → H.264) instead of refusing.
    pub transcode_video: Option<bool>,
    /// Config rules: how long an egress waits for its stream to come back before finishing.
    pub wait_seconds: Option<u64>,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum RecordFormat {
    Mp4,
    Flv,
    Mkv,
}

impl RecordFormat {
    /// FFmpeg's muxer name.
    pub fn muxer(self) -> &'static str {
        match self {
            RecordFormat::Mp4 => "mp4",
            RecordFormat::Flv => "flv",
            RecordFormat::Mkv => "matroska",
        }
    }

    pub fn extension(self) -> &'static str {
        match self {
            RecordFormat::Mp4 => "mp4",
            RecordFormat::Flv => "flv",
            RecordFormat::Mkv => "mkv",
        }
    }

    /// Whether the container takes this video codec as it is.
    pub fn takes_video(self, codec: Codec) -> bool {
        match self {
            RecordFormat::Mkv => matches!(codec, Codec::H264 | Codec::Vp8),
            RecordFormat::Mp4 | RecordFormat::Flv => codec == Codec::H264,
        }
    }

    /// Whether the container takes Opus audio as it is (Matroska); the others get AAC,
    /// bridged when the stream's audio is Opus.
    pub fn takes_opus(self) -> bool {
        self == RecordFormat::Mkv
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum ReconnectPolicy {
    /// Keep writing into the same file / RTMP connection, timestamps continuing.
    Continue,
    /// Close the file (or RTMP publish) and start the next one.
    NewSegment,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct RtmpUrl {
    pub host: String,
    pub port: u16,
    pub app: String,
    pub key: String,
}

impl RtmpUrl {
    /// `rtmp://host[:port]/app[/...]/key[?query]`: the last path segment (with any query) is
    /// the stream key, everything before it the application, as FFmpeg splits it.
    pub fn parse(s: &str) -> Result<RtmpUrl, String> {
        let uri: hyper::Uri = s.parse().map_err(|e| format!("`{s}` is not a URL: {e}"))?;
        match uri.scheme_str() {
            Some("rtmp") => {}
            Some("rtmps") => return Err("rtmps:// (RTMP over TLS) is not supported yet".into()),
            _ => return Err(format!("`{s}` is not an rtmp:// URL")),
        }
        let host = uri.host().unwrap_or("");
        // A bracketed host is an IPv6 literal and nothing else: `[]` is no host, and
        // `[name]` must not turn into a DNS name.
        let host = match host.strip_prefix('[') {
            Some(inner) => inner
                .strip_suffix(']')
                .filter(|ip| ip.parse::<std::net::Ipv6Addr>().is_ok())
                .ok_or_else(|| format!("`{s}` has a bracketed host that is not an IPv6 address"))?,
            None => host,
        };
        if host.is_empty() {
            return Err(format!("`{s}` has no host"));
        }
        let host = host.to_string();
        let port = uri.port_u16().unwrap_or(1935);
        let pq = uri.path_and_query().map(|p| p.as_str()).unwrap_or("");
        let pq = pq.trim_start_matches('/');
        let (path, query) = match pq.split_once('?') {
            Some((p, q)) => (p, Some(q)),
            None => (pq, None),
        };
        let (app, key) = path
            .rsplit_once('/')
            .filter(|(a, k)| !a.is_empty() && !k.is_empty())
            .ok_or_else(|| {
                format!("`{s}` needs an application and a stream key: rtmp://host/app/key")
            })?;
        let key = match query {
            Some(q) => format!("{key}?{q}"),
            None => key.to_string(),
        };
        Ok(RtmpUrl {
            host,
            port,
            app: app.to_string(),
            key,
        })
    }

    /// The URL with its stream key hidden (keys are credentials at most CDNs).
    pub fn redacted(&self) -> String {
        let shown: String = self.key.chars().take(2).collect();
        format!("rtmp://{}/{}/{shown}***", self.authority(), self.app)
    }

    /// `tcUrl` of the connect command.
    pub fn tc_url(&self) -> String {
        format!("rtmp://{}/{}", self.authority(), self.app)
    }

    /// `host:port`, an IPv6 host in brackets again.
    fn authority(&self) -> String {
        if self.host.contains(':') {
            format!("[{}]:{}", self.host, self.port)
        } else {
            format!("{}:{}", self.host, self.port)
        }
    }
}

/// A recording file-name template, checked to stay under the recording root.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PathTemplate(String);

const PLACEHOLDERS: [&str; 5] = ["{ns}", "{stream}", "{start_time}", "{seq}", "{ext}"];

impl PathTemplate {
    pub fn parse(s: &str) -> Result<PathTemplate, String> {
        if s.is_empty() || s.len() > 512 {
            return Err("must be 1-512 characters".into());
        }
        if s.starts_with('/') || s.starts_with('\\') || Path::new(s).is_absolute() {
            return Err(format!(
                "`{s}` is absolute; templates are relative to the recording root"
            ));
        }
        if let Some(c) = s
            .chars()
            .find(|c| !(c.is_ascii_alphanumeric() || "_-./{}".contains(*c)))
        {
            return Err(format!(
                "`{s}` contains {c:?}; use A-Z a-z 0-9 _ - . / and placeholders"
            ));
        }
        for part in s.split('/') {
            if part.is_empty() || part == "." || part == ".." || part.starts_with('.') {
                return Err(format!(
                    "`{s}` has an empty, `.`, `..` or hidden path component"
                ));
            }
        }
        // Every brace must belong to a known placeholder.
        let stripped = PLACEHOLDERS
            .iter()
            .fold(s.to_string(), |acc, p| acc.replace(p, ""));
        if stripped.contains(['{', '}']) {
            return Err(format!(
                "`{s}`: unknown or unclosed placeholder; use {}",
                PLACEHOLDERS.join(" ")
            ));
        }
        Ok(PathTemplate(s.to_string()))
    }

    /// The relative path for one file. `seq` counts the files of this egress from 0.
    pub fn render(&self, key: &StreamKey, start: SystemTime, seq: u32, ext: &str) -> PathBuf {
        let stamp = time::OffsetDateTime::from(start);
        let start_time = format!(
            "{:04}{:02}{:02}T{:02}{:02}{:02}Z",
            stamp.year(),
            u8::from(stamp.month()),
            stamp.day(),
            stamp.hour(),
            stamp.minute(),
            stamp.second()
        );
        let s = self
            .0
            .replace("{ns}", key.namespace())
            .replace("{stream}", key.name())
            .replace("{start_time}", &start_time)
            .replace("{seq}", &seq.to_string())
            .replace("{ext}", ext);
        PathBuf::from(s)
    }
}

/// Joins `relative` (a rendered template) to `root`, refusing anything that would leave it.
/// Checked on the rendered path too (belt and braces: names are validated, templates are
/// validated) and against symlinks by canonicalizing the existing parent.
pub fn confine(root: &Path, relative: &Path) -> Result<PathBuf, String> {
    if relative.is_absolute()
        || relative
            .components()
            .any(|c| !matches!(c, Component::Normal(_)))
    {
        return Err(format!(
            "{} would leave the recording root",
            relative.display()
        ));
    }
    let path = root.join(relative);
    let parent = path.parent().unwrap_or(root);
    std::fs::create_dir_all(parent)
        .map_err(|e| format!("cannot create {}: {e}", parent.display()))?;
    let real_root = root
        .canonicalize()
        .map_err(|e| format!("recording root {}: {e}", root.display()))?;
    let real_parent = parent
        .canonicalize()
        .map_err(|e| format!("{}: {e}", parent.display()))?;
    if !real_parent.starts_with(&real_root) {
        return Err(format!(
            "{} resolves outside the recording root",
            relative.display()
        ));
    }
    Ok(path)
}

/// Which streams a spec applies to: one exact key, or a pattern (config rules).
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum StreamMatch {
    Exact(StreamKey),
    Pattern { namespace: String, name: String },
}

impl StreamMatch {
    fn parse(s: &str, allow_pattern: bool) -> Result<StreamMatch, String> {
        if !s.contains('*') {
            return StreamKey::parse(s)
                .map(StreamMatch::Exact)
                .map_err(|e| e.to_string());
        }
        if !allow_pattern {
            return Err("an API egress names one stream (`namespace/name`), no `*`".into());
        }
        let (ns, name) = s
            .split_once('/')
            .ok_or_else(|| format!("`{s}` is not `namespace/name`"))?;
        // A pattern with its `*`s taken out must still be a valid name (or nothing).
        for part in [ns, name] {
            let literal = part.replace('*', "");
            if !literal.is_empty() && StreamKey::new(&literal, "x").is_err() {
                return Err(format!("`{s}` is not a valid stream pattern"));
            }
        }
        Ok(StreamMatch::Pattern {
            namespace: ns.to_string(),
            name: name.to_string(),
        })
    }

    pub fn matches(&self, key: &StreamKey) -> bool {
        match self {
            StreamMatch::Exact(k) => k == key,
            StreamMatch::Pattern { namespace, name } => {
                wildcard(namespace, key.namespace()) && wildcard(name, key.name())
            }
        }
    }
}

/// `*` matches any run of characters.
fn wildcard(pattern: &str, s: &str) -> bool {
    let parts: Vec<&str> = pattern.split('*').collect();
    if parts.len() == 1 {
        return pattern == s;
    }
    let (first, last) = (parts[0], parts[parts.len() - 1]);
    if !s.starts_with(first) || s.len() < first.len() + last.len() || !s.ends_with(last) {
        return false;
    }
    let mut rest = &s[first.len()..s.len() - last.len()];
    for mid in &parts[1..parts.len() - 1] {
        match rest.find(mid) {
            Some(i) => rest = &rest[i + mid.len()..],
            None => return false,
        }
    }
    true
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Target {
    /// `url` may still hold `{ns}`/`{stream}` for pattern rules; see [`EgressSpec::for_stream`].
    Rtmp(String),
    Record {
        format: RecordFormat,
        template: PathTemplate,
        segment: Option<Duration>,
        segment_bytes: Option<u64>,
    },
}

/// A validated egress request.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct EgressSpec {
    pub stream: StreamMatch,
    pub target: Target,
    pub on_reconnect: ReconnectPolicy,
    pub transcode_video: bool,
    /// How long the stream may be gone before the egress finishes; `None`: wait forever.
    pub wait: Option<Duration>,
}

/// One problem with a request: which field and why.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct FieldError {
    pub field: String,
    pub reason: String,
}

/// Longest segment a recording may ask for: a year.
pub const MAX_SEGMENT_SECONDS: u64 = 365 * 24 * 3600;
/// Largest segment a recording may ask for, in MiB: a pebibyte.
pub const MAX_SEGMENT_MB: u64 = 1 << 30;

impl EgressRequest {
    /// Validates the request. Config rules may use stream patterns and finish after
    /// `wait_seconds` (default 30) without their stream; API egresses name one stream and
    /// wait for it until deleted.
    pub fn validate(&self, from_config: bool) -> Result<EgressSpec, Vec<FieldError>> {
        let mut errors = Vec::new();
        let mut err = |field: &str, reason: String| {
            errors.push(FieldError {
                field: field.into(),
                reason,
            })
        };
        let stream = match (&self.room, self.layout.as_deref()) {
            (Some(_), _) if from_config => {
                err("room", "a room egress is made through the API".into());
                None
            }
            (Some(_), _) if !self.stream.is_empty() => {
                err("stream", "give either a stream or a room".into());
                None
            }
            (Some(room), layout) => match layout.unwrap_or("grid") {
                l @ ("grid" | "speaker") => match StreamKey::room_mix(room, l) {
                    Ok(k) => Some(StreamMatch::Exact(k)),
                    Err(_) => {
                        err("room", "not a room id".into());
                        None
                    }
                },
                other => {
                    err("layout", format!("`{other}`: must be grid or speaker"));
                    None
                }
            },
            (None, Some(_)) => {
                err("layout", "only with a room".into());
                None
            }
            (None, None) => match StreamMatch::parse(&self.stream, from_config) {
                Ok(s) => Some(s),
                Err(e) => {
                    err("stream", e);
                    None
                }
            },
        };
        let record_only = [
            ("format", self.format.is_some()),
            ("template", self.template.is_some()),
            ("segment_seconds", self.segment_seconds.is_some()),
            ("segment_mb", self.segment_mb.is_some()),
        ];
        let target = match self.kind.as_str() {
            "rtmp" => {
                for (field, set) in record_only {
                    if set {
                        err(field, "only for kind = \"record\"".into());
                    }
                }
                match &self.url {
                    None => {
                        err("url", "an rtmp egress needs a url".into());
                        None
                    }
                    Some(u) => {
                        let probe = u.replace("{ns}", "ns").replace("{stream}", "stream");
                        match RtmpUrl::parse(&probe) {
                            Ok(_) => Some(Target::Rtmp(u.clone())),
                            Err(e) => {
                                err("url", e);
                                None
                            }
                        }
                    }
                }
            }
            "record" => {
                if self.url.is_some() {
                    err("url", "only for kind = \"rtmp\"".into());
                }
                let format = match self.format.as_deref().unwrap_or("mp4") {
                    "mp4" | "fmp4" => Some(RecordFormat::Mp4),
                    "flv" => Some(RecordFormat::Flv),
                    "mkv" | "matroska" => Some(RecordFormat::Mkv),
                    other => {
                        err("format", format!("`{other}`: use mp4, flv or mkv"));
                        None
                    }
                };
                let template = match PathTemplate::parse(
                    self.template
                        .as_deref()
                        .unwrap_or("{ns}/{stream}/{start_time}.{ext}"),
                ) {
                    Ok(t) => Some(t),
                    Err(e) => {
                        err("template", e);
                        None
                    }
                };
                // Bounded so that the sizes and times derived from them cannot wrap: a
                // wrapped limit (`m << 20` reaching 0) would rotate at every keyframe.
                for (field, value, max) in [
                    ("segment_seconds", self.segment_seconds, MAX_SEGMENT_SECONDS),
                    ("segment_mb", self.segment_mb, MAX_SEGMENT_MB),
                ] {
                    if value.is_some_and(|v| v > max) {
                        err(field, format!("at most {max}"));
                    }
                }
                match (format, template) {
                    (Some(format), Some(template)) => Some(Target::Record {
                        format,
                        template,
                        segment: self
                            .segment_seconds
                            .filter(|s| (1..=MAX_SEGMENT_SECONDS).contains(s))
                            .map(Duration::from_secs),
                        segment_bytes: self
                            .segment_mb
                            .filter(|m| (1..=MAX_SEGMENT_MB).contains(m))
                            .map(|m| m << 20),
                    }),
                    _ => None,
                }
            }
            other => {
                err("kind", format!("`{other}`: use \"rtmp\" or \"record\""));
                None
            }
        };
        let on_reconnect = match self.on_reconnect.as_deref().unwrap_or("continue") {
            "continue" => ReconnectPolicy::Continue,
            "new_segment" => ReconnectPolicy::NewSegment,
            other => {
                err(
                    "on_reconnect",
                    format!("`{other}`: use \"continue\" or \"new_segment\""),
                );
                ReconnectPolicy::Continue
            }
        };
        if !from_config && self.wait_seconds.is_some() {
            err(
                "wait_seconds",
                "only for config rules; an API egress runs until deleted".into(),
            );
        }
        match (stream, target) {
            (Some(stream), Some(target)) if errors.is_empty() => Ok(EgressSpec {
                stream,
                target,
                on_reconnect,
                transcode_video: self.transcode_video.unwrap_or(false),
                wait: from_config.then(|| Duration::from_secs(self.wait_seconds.unwrap_or(30))),
            }),
            _ => Err(errors),
        }
    }
}

impl EgressSpec {
    /// The spec for one concrete stream (placeholders in the RTMP URL filled in).
    pub fn for_stream(&self, key: &StreamKey) -> EgressSpec {
        let mut spec = self.clone();
        spec.stream = StreamMatch::Exact(key.clone());
        if let Target::Rtmp(url) = &self.target {
            spec.target = Target::Rtmp(
                url.replace("{ns}", key.namespace())
                    .replace("{stream}", key.name()),
            );
        }
        spec
    }

    pub fn kind(&self) -> &'static str {
        match self.target {
            Target::Rtmp(_) => "rtmp",
            Target::Record { .. } => "record",
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_bracketed_host_must_be_an_ipv6_address() {
        // Found by fuzz/fuzz_targets/egress_paths.rs: `[]` passed the empty-host check
        // before its brackets were trimmed, leaving an empty host.
        assert!(RtmpUrl::parse("rtmp://[]p:/3:1/ec").is_err());
        assert!(RtmpUrl::parse("rtmp://[]/app/key").is_err());
        assert!(RtmpUrl::parse("rtmp://[cdn.example]/app/key").is_err());
        let u = RtmpUrl::parse("rtmp://[2001:db8::1]:1936/live/key").unwrap();
        assert_eq!((u.host.as_str(), u.port), ("2001:db8::1", 1936));
        assert_eq!(u.tc_url(), "rtmp://[2001:db8::1]:1936/live");
        assert_eq!(u.redacted(), "rtmp://[2001:db8::1]:1936/live/ke***");
    }

    #[test]
    fn segment_limits_that_would_wrap_are_refused_not_turned_into_tiny_segments() {
        // Found by fuzz/fuzz_targets/egress_request.rs: 2^44 MiB shifted into bytes wrapped
        // to 0, and a recording asking for huge segments rotated at every keyframe.
        let json = r#"{"stream":"live/a","kind":"record","segment_mb":17592186044416}"#;
        let r: EgressRequest = serde_json::from_str(json).unwrap();
        let errors = r.validate(false).unwrap_err();
        assert_eq!(errors[0].field, "segment_mb");
        let mut r = req("live/a", "record");
        r.segment_seconds = Some(u64::MAX / 1000 + 1);
        assert_eq!(r.validate(false).unwrap_err()[0].field, "segment_seconds");
        r.segment_seconds = Some(MAX_SEGMENT_SECONDS);
        r.segment_mb = Some(MAX_SEGMENT_MB);
        match r.validate(false).unwrap().target {
            Target::Record {
                segment,
                segment_bytes,
                ..
            } => {
                assert_eq!(segment, Some(Duration::from_secs(MAX_SEGMENT_SECONDS)));
                assert_eq!(segment_bytes, Some(1 << 50));
            }
            Target::Rtmp(_) => unreachable!("a record request"),
        }
    }

    fn req(stream: &str, kind: &str) -> EgressRequest {
        EgressRequest {
            stream: stream.into(),
            kind: kind.into(),
            ..Default::default()
        }
    }

    #[test]
    fn rtmp_urls_split_like_ffmpeg() {
        let u = RtmpUrl::parse("rtmp://a.rtmp.example.com/live2/abcd-efgh").unwrap();
        assert_eq!((u.host.as_str(), u.port), ("a.rtmp.example.com", 1935));
        assert_eq!((u.app.as_str(), u.key.as_str()), ("live2", "abcd-efgh"));
        assert_eq!(u.redacted(), "rtmp://a.rtmp.example.com:1935/live2/ab***");
        let u = RtmpUrl::parse("rtmp://127.0.0.1:1940/app/inst/key?token=1").unwrap();
        assert_eq!(
            (u.app.as_str(), u.key.as_str()),
            ("app/inst", "key?token=1")
        );
        assert_eq!(u.tc_url(), "rtmp://127.0.0.1:1940/app/inst");
        assert!(RtmpUrl::parse("rtmp://host/onlyapp").is_err());
        assert!(RtmpUrl::parse("http://host/app/key").is_err());
        assert!(RtmpUrl::parse("rtmps://host/app/key")
            .unwrap_err()
            .contains("not supported"));
    }

    #[test]
    fn templates_stay_under_the_root() {
        for bad in [
            "/etc/passwd",
            "../x.mp4",
            "a/../../x.mp4",
            "a//b.mp4",
            "./a.mp4",
            ".hidden/a.mp4",
            "a/b\\c.mp4",
            "a b.mp4",
            "a/\u{0}.mp4",
            "{nope}.mp4",
            "{ns.mp4",
            "a}.mp4",
            "",
        ] {
            assert!(PathTemplate::parse(bad).is_err(), "{bad:?} accepted");
        }
        let t = PathTemplate::parse("{ns}/{stream}/{start_time}-{seq}.{ext}").unwrap();
        let key = StreamKey::parse("live/cam").unwrap();
        let at = SystemTime::UNIX_EPOCH + Duration::from_secs(1_795_000_000);
        assert_eq!(
            t.render(&key, at, 3, "mp4"),
            PathBuf::from("live/cam/20261118T110640Z-3.mp4")
        );
    }

    #[test]
    fn confine_refuses_escapes_and_symlinks() {
        let dir = std::env::temp_dir().join(format!("meshcast-confine-{}", std::process::id()));
        let root = dir.join("root");
        std::fs::create_dir_all(&root).unwrap();
        assert!(confine(&root, Path::new("a/b.mp4")).is_ok());
        assert!(confine(&root, Path::new("../b.mp4")).is_err());
        assert!(confine(&root, Path::new("/tmp/b.mp4")).is_err());
        std::os::unix::fs::symlink(&dir, root.join("link")).unwrap();
        assert!(confine(&root, Path::new("link/b.mp4"))
            .unwrap_err()
            .contains("outside"));
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn requests_are_checked_field_by_field() {
        let mut r = req("live/cam", "rtmp");
        r.url = Some("rtmp://127.0.0.1/live/cam".into());
        let spec = r.validate(false).unwrap();
        assert_eq!(spec.wait, None);
        assert_eq!(spec.kind(), "rtmp");

        let mut r = req("live/../x", "record");
        r.template = Some("../../etc/x.mp4".into());
        r.format = Some("avi".into());
        let errs = r.validate(false).unwrap_err();
        let fields: Vec<_> = errs.iter().map(|e| e.field.as_str()).collect();
        assert_eq!(fields, ["stream", "format", "template"]);

        assert!(req("live/*", "record").validate(false).is_err());
        let spec = req("live/*", "record").validate(true).unwrap();
        assert_eq!(spec.wait, Some(Duration::from_secs(30)));
        assert!(spec
            .stream
            .matches(&StreamKey::parse("live/anything").unwrap()));
        assert!(!spec.stream.matches(&StreamKey::parse("other/x").unwrap()));
        assert!(req("live/cam", "ftp").validate(false).is_err());
        let mut r = req("live/cam", "rtmp");
        r.format = Some("mp4".into());
        assert!(
            r.validate(false).is_err(),
            "record fields on an rtmp egress"
        );
    }

    #[test]
    fn wildcards() {
        assert!(wildcard("*", "x"));
        assert!(wildcard("cam-*", "cam-1"));
        assert!(!wildcard("cam-*", "mic-1"));
        assert!(wildcard("*-hd", "cam-hd"));
        assert!(wildcard("a*b*c", "axxbyyc"));
        assert!(!wildcard("a*b*c", "axxc"));
        assert!(!wildcard("ab*ba", "aba"));
    }

    #[test]
    fn rule_urls_take_the_stream_name() {
        let mut r = req("live/*", "rtmp");
        r.url = Some("rtmp://cdn.example/{ns}/{stream}".into());
        let spec = r.validate(true).unwrap();
        let one = spec.for_stream(&StreamKey::parse("live/cam").unwrap());
        assert_eq!(
            one.target,
            Target::Rtmp("rtmp://cdn.example/live/cam".into())
        );
    }
}
