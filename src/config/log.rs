//! `[log]`: how the node logs: human-readable lines or one JSON object per line, and the
//! level (`RUST_LOG`, when set, overrides it).

use serde::Deserialize;

use super::read::{Problem, Problems};

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum LogFormat {
    Text,
    Json,
}

#[derive(Clone, Debug)]
pub struct LogConfig {
    pub format: LogFormat,
    /// A `tracing` filter: `info`, `warn,meshcast=debug`, ...
    pub level: String,
}

impl Default for LogConfig {
    fn default() -> Self {
        LogConfig {
            format: LogFormat::Text,
            level: "info".into(),
        }
    }
}

#[derive(Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawLog {
    format: Option<String>,
    level: Option<String>,
}

pub(super) fn parse(raw: RawLog, problems: &mut Problems) -> LogConfig {
    let d = LogConfig::default();
    let format = match raw.format.as_deref() {
        None | Some("text") => LogFormat::Text,
        Some("json") => LogFormat::Json,
        Some(other) => {
            problems.push(Problem::new(
                "log.format",
                format!("`{other}`: must be text or json"),
            ));
            d.format
        }
    };
    let level = raw.level.unwrap_or(d.level);
    if tracing_subscriber::EnvFilter::try_new(&level).is_err() {
        problems.push(Problem::new(
            "log.level",
            format!("`{level}` is not a level or filter (info, warn,meshcast=debug, ...)"),
        ));
    }
    LogConfig { format, level }
}
