//! `[http]`: the HTTP listener (HTTP-FLV, WHIP/WHEP, the REST API, metrics, the console)
//! and the bounds on its connections.

use std::net::SocketAddr;
use std::time::Duration;

use serde::Deserialize;

use super::read::{addr_or_off, check_public_url, millis, Problem, Problems};

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

impl Default for HttpConfig {
    fn default() -> Self {
        HttpConfig {
            listen: Some(SocketAddr::from(([0, 0, 0, 0], 8080))),
            public_url: None,
            max_connections: 20_000,
            header_timeout: Duration::from_secs(10),
            idle_timeout: Duration::from_secs(60),
        }
    }
}

#[derive(Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawHttp {
    listen: Option<String>,
    public_url: Option<String>,
    max_connections: Option<usize>,
    header_timeout_ms: Option<u64>,
    idle_timeout_ms: Option<u64>,
}

pub(super) fn parse(raw: RawHttp, problems: &mut Problems) -> HttpConfig {
    check_public_url(
        raw.public_url.as_ref(),
        "http.public_url",
        &["http://", "https://"],
        problems,
    );
    let d = HttpConfig::default();
    let max_connections = raw.max_connections.unwrap_or(d.max_connections);
    if max_connections == 0 {
        problems.push(Problem::new("http.max_connections", "must be at least 1"));
    }
    let header_timeout = millis(
        raw.header_timeout_ms,
        d.header_timeout,
        "http.header_timeout_ms",
        100..=120_000,
        "must be between 100 and 120000",
        problems,
    );
    let idle_timeout = millis(
        raw.idle_timeout_ms,
        d.idle_timeout,
        "http.idle_timeout_ms",
        1000..=3_600_000,
        "must be between 1000 and 3600000",
        problems,
    );
    let listen = addr_or_off(raw.listen, d.listen, "http.listen", problems);
    HttpConfig {
        listen,
        public_url: raw.public_url,
        max_connections,
        header_timeout,
        idle_timeout,
    }
}
