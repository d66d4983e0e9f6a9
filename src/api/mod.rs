//! HTTP: HTTP-FLV playback, the REST API, Prometheus metrics and the web console.

pub mod console;
pub mod http;
