//! `[egress]`: the destination policy and the static rules (`[[egress]]` or
//! `[[egress.rule]]`), each rule validated like an API request ([`super::egress_spec`]).

use super::egress_spec::{EgressRequest, EgressSpec};
use super::read::{Problem, Problems};

/// `[egress]`, validated.
#[derive(Clone, Debug, Default)]
pub struct EgressConfig {
    /// Where egress may push.
    pub policy: EgressPolicy,
    /// Static egress rules.
    pub rules: Vec<EgressSpec>,
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

/// `[egress]`: either an array of rules (`[[egress]]`), or a table with the destination
/// policy and its rules as `[[egress.rule]]`.
pub(super) fn parse(table: &toml::Table, problems: &mut Problems) -> EgressConfig {
    let mut policy = EgressPolicy::default();
    let Some(value) = table.get("egress") else {
        return EgressConfig {
            policy,
            rules: vec![],
        };
    };
    if let Some(items) = value.as_array() {
        return EgressConfig {
            policy,
            rules: rules(items, "egress", problems),
        };
    }
    let Some(t) = value.as_table() else {
        problems.push(Problem::new(
            "egress",
            "must be a table ([egress]) or an array of rules ([[egress]])",
        ));
        return EgressConfig {
            policy,
            rules: vec![],
        };
    };
    let mut found = vec![];
    for (k, v) in t {
        match (k.as_str(), v) {
            ("rule", toml::Value::Array(items)) => {
                found = rules(items, "egress.rule", problems)
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
    EgressConfig {
        policy,
        rules: found,
    }
}

/// Egress rules: each validated like an API request, problems named `{at}[i].field`.
pub(super) fn rules(items: &[toml::Value], at: &str, problems: &mut Problems) -> Vec<EgressSpec> {
    let mut rules = Vec::new();
    for (i, item) in items.iter().enumerate() {
        let key = format!("{at}[{i}]");
        let req: EgressRequest = match item.clone().try_into() {
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
