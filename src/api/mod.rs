//! HTTP: HTTP-FLV playback, the REST API, Prometheus metrics and the web console.

mod access;
mod admin;
pub mod console;
mod egress;
pub mod http;
mod play;
pub mod reload;
mod rooms;
mod route;
mod server;
mod webrtc;
