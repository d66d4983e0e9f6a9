//! HTTP: HTTP-FLV playback, the REST API, Prometheus metrics and the web console.

mod access;
pub mod console;
pub mod http;
mod server;
