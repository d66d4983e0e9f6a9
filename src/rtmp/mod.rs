//! RTMP: publishers (ingest) and players, on one listener.
//!
//! The layers, bottom to top:
//! * [`guard`] reads a peer's bytes before rml_rtmp does and refuses what its parsers cannot
//!   take safely; [`chunk`] builds the media chunks players are sent.
//! * [`protocol`] is the server's RTMP session, sans-IO: bytes in, bytes to send and
//!   [`protocol::ProtocolEvent`]s out. It answers `connect`, `createStream`, pings and
//!   acknowledgements itself, and turns a `publish` or `play` into a request the driver
//!   answers with [`protocol::ServerProtocol::accept_publish`] / `refuse` and friends; every
//!   `onStatus` reply is built there.
//! * [`server`] is the driver: the listener, one task per connection that owns the socket,
//!   reads, writes, timeouts. [`ingest`] is the publish path into the hub, [`playback`] the
//!   play path out of it; both start with an *admission* (auth, the hub, the cluster's
//!   publish race) that runs beside the connection's reads, never on them.
//! * [`client`] is the client side (RTMP egress, tests and the load generator).
//!
//! A parse error or even a panic inside the RTMP library closes only that connection.
//! This folder may use the hub, auth, bridge, media and metrics; it never reaches the
//! cluster, the API or the node.

pub mod chunk;
pub mod client;
pub mod guard;
pub mod ingest;
pub mod playback;
pub mod protocol;
pub mod server;

use std::sync::Arc;
use std::time::Duration;

use crate::media::StreamKey;

pub use ingest::{IngestError, IngestMedia, IngestOutput};
pub use protocol::feed_server;
pub use server::serve;

#[derive(Clone, Debug)]
pub struct RtmpSettings {
    pub chunk_size: u32,
    pub write_timeout: Duration,
    pub max_connections: usize,
    /// SO_SNDBUF for player sockets (0: kernel default).
    pub send_buffer: usize,
    /// Merged write: a player is written at most once per this interval, all frames that
    /// arrived meanwhile in one vectored write (zero: every frame at once).
    pub merged_write: Duration,
    /// What a peer's chunks and AMF may be ([`guard`]).
    pub guard: guard::GuardLimits,
    /// A connection that is not playing and sends nothing this long is closed.
    pub idle_timeout: Duration,
    /// Who may publish and play.
    pub auth: Arc<crate::auth::Auth>,
}

/// Why a connection closed (anything but a clean end).
#[derive(Debug, thiserror::Error)]
pub enum RtmpError {
    #[error("i/o: {0}")]
    Io(#[from] std::io::Error),
    #[error("handshake failed: {0:?}")]
    Handshake(rml_rtmp::handshake::HandshakeError),
    #[error("handshake timed out")]
    HandshakeTimeout,
    #[error("protocol error: {0}")]
    Session(String),
    #[error("RTMP parser panicked on input (bug in the parser, input rejected)")]
    ParserPanic,
    #[error("refused input: {0}")]
    Guard(#[from] guard::GuardError),
    #[error("publish of {0} rejected: {1}")]
    Media(StreamKey, String),
    #[error("publish of {0} refused: {1}")]
    PublishRefused(String, String),
    #[error("viewer did not read for {0:?}")]
    WriteTimeout(Duration),
    #[error("{0} refused: {1}")]
    Denied(&'static str, String),
    #[error("sent nothing for {0:?}")]
    IdleTimeout(Duration),
}

impl RtmpError {
    /// The kind of refusal this is, for `meshcast_refused_total` (none: not a refusal).
    fn refusal_kind(&self) -> Option<&'static str> {
        match self {
            RtmpError::Denied(..) => Some("denied"),
            RtmpError::Guard(_) | RtmpError::ParserPanic => Some("bad_input"),
            RtmpError::IdleTimeout(_) => Some("idle"),
            RtmpError::HandshakeTimeout => Some("handshake_timeout"),
            _ => None,
        }
    }
}
