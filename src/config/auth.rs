//! `[auth]` and `[hooks]`: the keys tokens are checked with, the auth webhook, the metrics
//! token, and where events are POSTed. Public key files and hook URLs are read and parsed
//! here, once, so a bad one is a config problem at start and `auth` receives them parsed.

use std::path::{Path, PathBuf};
use std::time::Duration;

use hyper::Uri;
use jsonwebtoken::DecodingKey;
use serde::Deserialize;

use super::read::{Problem, Problems};

/// Shortest HS256 secret (and metrics token) accepted, in bytes.
pub const MIN_SECRET_BYTES: usize = 16;

/// `[auth]`, validated.
#[derive(Clone, Debug)]
pub struct AuthConfig {
    /// HS256 secrets: the first signs, all verify.
    pub secrets: Vec<String>,
    /// Ed25519 / ES256 public keys (PEM files) for tokens minted elsewhere.
    pub public_keys: Vec<PathBuf>,
    /// Asked before every publish and play (`http://...`).
    pub webhook: Option<String>,
    pub webhook_timeout: Duration,
    /// How long an allow from the webhook is remembered for the same request.
    pub webhook_cache: Duration,
    /// Bearer token `/metrics` asks for (none: open).
    pub metrics_token: Option<String>,
}

impl Default for AuthConfig {
    fn default() -> Self {
        AuthConfig {
            secrets: vec![],
            public_keys: vec![],
            webhook: None,
            webhook_timeout: Duration::from_secs(2),
            webhook_cache: Duration::from_secs(10),
            metrics_token: None,
        }
    }
}

impl AuthConfig {
    /// Whether `[auth]` asks for anything at all.
    pub fn is_on(&self) -> bool {
        !self.secrets.is_empty() || !self.public_keys.is_empty() || self.webhook.is_some()
    }
}

/// `[hooks]`.
#[derive(Clone, Debug, Default)]
pub struct HooksConfig {
    /// Where publish/play events are POSTed (`events`).
    pub events: Option<String>,
}

/// A public key that verifies tokens.
pub enum PublicKey {
    Ed25519(DecodingKey),
    Es256(DecodingKey),
}

/// Reads a PEM public key file: Ed25519 or P-256 (ES256), else an error naming the file.
pub fn read_public_key(path: &Path) -> Result<PublicKey, String> {
    let pem = std::fs::read(path).map_err(|e| format!("{}: {e}", path.display()))?;
    if let Ok(k) = DecodingKey::from_ed_pem(&pem) {
        Ok(PublicKey::Ed25519(k))
    } else if let Ok(k) = DecodingKey::from_ec_pem(&pem) {
        Ok(PublicKey::Es256(k))
    } else {
        Err(format!(
            "{}: not an Ed25519 or ES256 (P-256) public key in PEM",
            path.display()
        ))
    }
}

/// A parsed `http://host:port/path` URL (the auth webhook, the event hook).
#[derive(Clone, Debug)]
pub struct HookUrl {
    uri: Uri,
    authority: String,
}

impl HookUrl {
    pub fn parse(url: &str) -> Result<HookUrl, String> {
        let uri: Uri = url
            .parse()
            .map_err(|e| format!("`{url}` is not a URL: {e}"))?;
        if uri.scheme_str() != Some("http") {
            return Err(format!(
                "`{url}`: only http:// hooks are supported (put a local proxy in front of https)"
            ));
        }
        let authority = uri
            .authority()
            .ok_or_else(|| format!("`{url}` has no host"))?;
        let authority = match authority.port_u16() {
            Some(_) => authority.to_string(),
            None => format!("{}:80", authority.host()),
        };
        Ok(HookUrl { uri, authority })
    }

    /// `host:port` to connect to (port 80 when the URL names none).
    pub fn authority(&self) -> &str {
        &self.authority
    }

    /// The path and query to request (`/` when the URL has none).
    pub fn path_and_query(&self) -> &str {
        self.uri.path_and_query().map(|p| p.as_str()).unwrap_or("/")
    }
}

#[derive(Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawAuth {
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
pub(super) struct RawHooks {
    events: Option<String>,
}

/// `[auth]` (or a namespace's `auth`, its keys named under `at`), validated: secrets long
/// enough, public keys readable, the webhook a URL.
pub(super) fn parse(raw: RawAuth, at: &str, base: &Path, problems: &mut Problems) -> AuthConfig {
    let d = AuthConfig::default();
    for (i, s) in raw.secrets.iter().enumerate() {
        if s.len() < MIN_SECRET_BYTES {
            problems.push(Problem::new(
                &format!("{at}.secrets[{i}]"),
                format!("is shorter than {MIN_SECRET_BYTES} bytes (use a long random string)"),
            ));
        }
    }
    let public_keys: Vec<PathBuf> = raw.public_keys.iter().map(|p| base.join(p)).collect();
    if let Some(e) = public_keys.iter().find_map(|p| read_public_key(p).err()) {
        problems.push(Problem::new(&format!("{at}.public_keys"), e));
    }
    if let Some(url) = &raw.webhook {
        if let Err(e) = HookUrl::parse(url) {
            problems.push(Problem::new(&format!("{at}.webhook"), e));
        }
    }
    let timeout_ms = raw
        .webhook_timeout_ms
        .unwrap_or(d.webhook_timeout.as_millis() as u64);
    if !(50..=30_000).contains(&timeout_ms) {
        problems.push(Problem::new(
            &format!("{at}.webhook_timeout_ms"),
            "must be between 50 and 30000",
        ));
    }
    let cache_ms = raw
        .webhook_cache_ms
        .unwrap_or(d.webhook_cache.as_millis() as u64);
    if cache_ms > 600_000 {
        problems.push(Problem::new(
            &format!("{at}.webhook_cache_ms"),
            "must be at most 600000 (0: ask every time)",
        ));
    }
    if raw
        .metrics_token
        .as_ref()
        .is_some_and(|t| t.len() < MIN_SECRET_BYTES)
    {
        problems.push(Problem::new(
            &format!("{at}.metrics_token"),
            format!("is shorter than {MIN_SECRET_BYTES} bytes"),
        ));
    }
    AuthConfig {
        secrets: raw.secrets,
        public_keys,
        webhook: raw.webhook,
        webhook_timeout: Duration::from_millis(timeout_ms),
        webhook_cache: Duration::from_millis(cache_ms),
        metrics_token: raw.metrics_token,
    }
}

/// `[hooks]`, validated (the events URL parses).
pub(super) fn parse_hooks(raw: RawHooks, problems: &mut Problems) -> HooksConfig {
    if let Some(url) = &raw.events {
        if let Err(e) = HookUrl::parse(url) {
            problems.push(Problem::new("hooks.events", e));
        }
    }
    HooksConfig { events: raw.events }
}
