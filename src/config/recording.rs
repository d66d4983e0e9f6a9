//! `[recording]`: where recordings go, the disk floor below which they stop, and which
//! finished files are deleted.

use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::Deserialize;

use super::read::{Problem, Problems};

#[derive(Clone, Debug)]
pub struct RecordingConfig {
    /// Where recordings go (`root`, relative to the config file).
    pub root: PathBuf,
    /// Recordings stop for good when the disk has less free space than this.
    pub min_free_bytes: u64,
    /// What old recordings are deleted (`max_age_hours`, `max_total_mb`).
    pub retention: Retention,
    /// Where finished files are uploaded (`[recording.s3]`), if anywhere.
    pub s3: Option<S3Config>,
}

/// `[recording.s3]`: an S3-compatible bucket finished recording files are uploaded to.
#[derive(Clone, PartialEq, Eq)]
pub struct S3Config {
    pub bucket: String,
    /// `http(s)://host[:port]` of an S3-compatible server (MinIO, Ceph, ...); none: AWS.
    pub endpoint: Option<String>,
    pub region: String,
    /// Put before each file's path under its recording root (`recordings/`).
    pub prefix: String,
    /// Both or neither; neither: the usual AWS environment (`AWS_ACCESS_KEY_ID`, ...).
    pub access_key_id: Option<String>,
    pub secret_access_key: Option<String>,
    /// Delete the local file once it is uploaded (the default).
    pub delete_local: bool,
}

impl std::fmt::Debug for S3Config {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // The secret stays out of logs; a change of it still shows as a change.
        let secret = self.secret_access_key.as_deref().map(|s| {
            use std::hash::{Hash, Hasher};
            let mut h = std::collections::hash_map::DefaultHasher::new();
            s.hash(&mut h);
            format!("<secret {:04x}>", h.finish() & 0xffff)
        });
        f.debug_struct("S3Config")
            .field("bucket", &self.bucket)
            .field("endpoint", &self.endpoint)
            .field("region", &self.region)
            .field("prefix", &self.prefix)
            .field("access_key_id", &self.access_key_id)
            .field("secret_access_key", &secret)
            .field("delete_local", &self.delete_local)
            .finish()
    }
}

/// Which finished recordings are deleted: older than `max_age`, then the oldest while the
/// total is above `max_total_bytes`. `None`: no such rule.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Retention {
    pub max_age: Option<Duration>,
    pub max_total_bytes: Option<u64>,
}

impl Default for RecordingConfig {
    fn default() -> Self {
        RecordingConfig {
            root: PathBuf::from("recordings"),
            min_free_bytes: 256 << 20,
            retention: Retention::default(),
            s3: None,
        }
    }
}

#[derive(Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawRecording {
    root: Option<String>,
    min_free_mb: Option<u64>,
    max_age_hours: Option<u64>,
    max_total_mb: Option<u64>,
    s3: Option<RawS3>,
}

#[derive(Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawS3 {
    bucket: String,
    endpoint: Option<String>,
    region: Option<String>,
    prefix: Option<String>,
    access_key_id: Option<String>,
    secret_access_key: Option<String>,
    delete_local: Option<bool>,
}

/// `[recording.s3]`, validated.
fn parse_s3(raw: RawS3, problems: &mut Problems) -> S3Config {
    let key = |k: &str| format!("recording.s3.{k}");
    // S3 bucket names: 3-63 of a-z 0-9 . - (what every S3-compatible server takes).
    let b = &raw.bucket;
    if b.len() < 3
        || b.len() > 63
        || !b
            .chars()
            .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '.' || c == '-')
    {
        problems.push(Problem::new(
            &key("bucket"),
            "must be 3-63 characters of a-z 0-9 . -",
        ));
    }
    if let Some(e) = &raw.endpoint {
        let ok = (e.starts_with("http://") || e.starts_with("https://"))
            && !e.contains(char::is_whitespace);
        if !ok {
            problems.push(Problem::new(
                &key("endpoint"),
                "must be an http:// or https:// URL",
            ));
        }
    }
    let prefix = raw.prefix.unwrap_or_default();
    if prefix.starts_with('/') || prefix.contains("..") || prefix.contains(char::is_whitespace) {
        problems.push(Problem::new(
            &key("prefix"),
            "must be a relative key prefix (no leading /, no .., no spaces)",
        ));
    }
    if raw.access_key_id.is_some() != raw.secret_access_key.is_some() {
        problems.push(Problem::new(
            &key("access_key_id"),
            "access_key_id and secret_access_key go together (or leave both out to use the AWS environment)",
        ));
    }
    S3Config {
        bucket: raw.bucket,
        endpoint: raw.endpoint.map(|e| e.trim_end_matches('/').to_string()),
        region: raw.region.unwrap_or_else(|| "us-east-1".into()),
        prefix,
        access_key_id: raw.access_key_id,
        secret_access_key: raw.secret_access_key,
        delete_local: raw.delete_local.unwrap_or(true),
    }
}

pub(super) fn parse(raw: RawRecording, base: &Path, problems: &mut Problems) -> RecordingConfig {
    let d = RecordingConfig::default();
    for (key, v, max) in [
        ("recording.min_free_mb", raw.min_free_mb, 1u64 << 30),
        ("recording.max_age_hours", raw.max_age_hours, 24 * 365 * 100),
        ("recording.max_total_mb", raw.max_total_mb, 1u64 << 40),
    ] {
        if v.is_some_and(|v| v > max) {
            problems.push(Problem::new(key, format!("must be at most {max}")));
        }
    }
    RecordingConfig {
        root: raw.root.map(|r| base.join(r)).unwrap_or(d.root),
        min_free_bytes: raw.min_free_mb.map_or(d.min_free_bytes, |mb| mb << 20),
        retention: Retention {
            max_age: raw
                .max_age_hours
                .filter(|h| *h > 0)
                .map(|h| Duration::from_secs(h * 3600)),
            max_total_bytes: raw.max_total_mb.filter(|m| *m > 0).map(|m| m << 20),
        },
        s3: raw.s3.map(|s3| parse_s3(s3, problems)),
    }
}
