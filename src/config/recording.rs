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
    }
}
