//! meshcast: a live-media relay.
//!
//! Broadcasters publish once (RTMP) to any origin; origins form a QUIC mesh; edges pull
//! streams on demand and serve viewers over RTMP and HTTP-FLV. See `docs/` and the
//! architecture notes for the design; each module starts with what it owns.

pub mod api;
pub mod auth;
pub mod backbone;
pub mod bridge;
pub mod clock;
pub mod cluster;
pub mod config;
pub mod egress;
pub mod hub;
pub mod media;
pub mod metrics;
pub mod net;
pub mod node;
pub mod play;
pub mod rooms;
pub mod rtmp;
pub mod transcode;
pub mod webrtc;
