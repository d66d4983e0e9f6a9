//! Reading a config file's values: one section at a time, and the shared shapes (listen
//! addresses, IPs, address lists, names). Every problem found is pushed with its key and
//! the reading goes on, so `meshcast check-config` reports all of them at once.

use std::fmt;
use std::net::{IpAddr, SocketAddr};

use serde::de::DeserializeOwned;

/// One problem in a config file.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Problem {
    pub key: String,
    pub reason: String,
}

impl Problem {
    pub(super) fn new(key: &str, reason: impl Into<String>) -> Problem {
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

/// The problems of one file as they are found.
pub(super) type Problems = Vec<Problem>;

/// Whether `c` may appear in a node id or region name.
pub(super) fn valid_name_char(c: char) -> bool {
    c.is_ascii_alphanumeric() || matches!(c, '_' | '-' | '.')
}

/// A node id or region: 1-64 characters of A-Z a-z 0-9 _ - .
pub(super) fn check_name(value: &str, key: &str, problems: &mut Problems) {
    if value.is_empty() || value.len() > 64 || !value.chars().all(valid_name_char) {
        problems.push(Problem::new(
            key,
            "must be 1-64 characters of A-Z a-z 0-9 _ - .",
        ));
    }
}

/// Deserializes one section on its own so its errors don't mask the others'.
pub(super) fn section<T: DeserializeOwned + Default>(
    table: &toml::Table,
    name: &str,
    problems: &mut Problems,
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
pub(super) fn addr_or_off(
    raw: Option<String>,
    default: Option<SocketAddr>,
    key: &str,
    problems: &mut Problems,
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
pub(super) fn ip(raw: &str, key: &str, problems: &mut Problems) -> Option<IpAddr> {
    let parsed = raw.parse().ok();
    if parsed.is_none() {
        problems.push(Problem::new(key, format!("`{raw}` is not an IP address")));
    }
    parsed
}

/// A list of `IP:PORT` addresses, each once.
pub(super) fn addrs(raw: Vec<String>, key: &str, problems: &mut Problems) -> Vec<SocketAddr> {
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

/// A duration given in milliseconds under `key`, within `range` (else a problem saying
/// `why`), or the default.
pub(super) fn millis(
    raw: Option<u64>,
    default: std::time::Duration,
    key: &str,
    range: std::ops::RangeInclusive<u64>,
    why: &str,
    problems: &mut Problems,
) -> std::time::Duration {
    match raw {
        None => default,
        Some(ms) if range.contains(&ms) => std::time::Duration::from_millis(ms),
        Some(_) => {
            problems.push(Problem::new(key, why));
            default
        }
    }
}

/// A URL clients are sent to: it must start with one of `schemes` and hold no white space.
pub(super) fn check_public_url(
    url: Option<&String>,
    key: &str,
    schemes: &[&str],
    problems: &mut Problems,
) {
    if let Some(u) = url {
        if !schemes.iter().any(|s| u.starts_with(s)) || u.contains(char::is_whitespace) {
            problems.push(Problem::new(
                key,
                format!("must be a URL starting with {}", schemes.join(" or ")),
            ));
        }
    }
}
